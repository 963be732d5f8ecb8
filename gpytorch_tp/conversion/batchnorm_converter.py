"""``nn.BatchNorm1d``: a marker in the converted layers, for the BatchNorm kernel builder to read.

BatchNorm is not a layer of these architectures (a point's output depends on its batch);
:func:`~gpytorch_tp.conversion.api.kernel_from_module` with ``reference_points`` reads the markers
into a :class:`~gpytorch_tp.BatchNormMLPKernel`.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import UnsupportedModuleError
from ..layers import Layer
from .context import ConversionContext
from .registry import register_converter, require_layout

__all__ = ["BatchNormMarker"]


class BatchNormMarker(Layer):
    """Where an ``nn.BatchNorm1d`` sits in a converted network: not a layer of any architecture.

    :func:`~gpytorch_tp.conversion.api.kernel_from_module` with ``reference_points`` reads the markers (and the
    ``Linear``/``ReLU`` layers around them) into a :class:`~gpytorch_tp.BatchNormMLPKernel`.
    """

    def __init__(self, what: str, eps: float, gain: float):
        super().__init__()
        self.what, self.eps, self.gain = what, eps, gain

    def forward(self, state):
        raise UnsupportedModuleError(self.what, _BATCHNORM_REASON)


_BATCHNORM_REASON = (
    "a BatchNorm network's output at a point depends on its whole batch, so BatchNorm is not a layer of "
    "these architectures; for a Linear -> BatchNorm1d -> ReLU MLP, kernel_from_module(module, kind, "
    "reference_points=R) gives its gpytorch_tp.BatchNormMLPKernel (every point evaluated in a batch with the "
    "reference points R)"
)


@register_converter(nn.BatchNorm1d)
def _batch_norm(module: nn.BatchNorm1d, context: ConversionContext):
    what = context.describe(module)
    if not context.batchnorm:
        raise UnsupportedModuleError(what, _BATCHNORM_REASON)
    require_layout(
        module,
        context,
        ("features",),
        "BatchNorm1d on (N, C, L) normalises each channel over the batch and the length; BatchNormMLPKernel "
        "models BatchNorm1d on features (N, C) only",
    )
    if not module.training and module.track_running_stats:
        raise UnsupportedModuleError(
            f"{what} in eval mode",
            "it normalises with its running statistics, a fixed affine map per unit, not the batch statistics "
            "that BatchNormMLPKernel models (the network in training mode); convert module.train()",
        )
    gain = 1.0
    if module.affine:
        weight, bias = module.weight.detach().double(), module.bias.detach().double()
        if context.init == "measured":
            if bool((bias != 0).any()):
                raise UnsupportedModuleError(
                    what,
                    "its shift (bias) is not zero, and BatchNormMLPKernel has no shift before the ReLU; "
                    "use init='pytorch' (gain 1, shift 0) or zero the shift",
                )
            # relu(g y) = |g| relu(+-y), and y is symmetric: the gain multiplies the next layer's variance.
            gain = float(weight.pow(2).mean())
        elif bool((weight != 1).any()) or bool((bias != 0).any()):
            warnings.warn(
                f"{what}: its affine weight is not 1 or its bias not 0 (PyTorch's initialisation), so the module "
                "was re-initialised (or trained); init='pytorch' assumes the default. Use init='measured'.",
                stacklevel=4,
            )
        # BatchNormMLPKernel's NTK has no affine parameters: they are frozen (learning-rate factor 0).
        context.scales[context.parameter_name("weight")] = 0.0
        context.scales[context.parameter_name("bias")] = 0.0
    return [BatchNormMarker(what, float(module.eps), gain)], "features"
