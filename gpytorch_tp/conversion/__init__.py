r"""From a ``torch.nn.Module`` to its infinite-width architecture: :func:`from_module`.

The module is traced with ``torch.fx`` (an ``nn.Sequential`` or any module
whose ``forward`` traces), shapes are propagated through it with an example
input, and every operation is mapped onto a :class:`~gpytorch_tp.layers.Layer`
by a *converter*.  Converters of ``torch.nn`` module types live in the registry
:data:`CONVERTERS` (module type -> converter); :func:`register_converter` adds
or replaces one in one line.  Anything without a converter raises
:class:`UnsupportedModuleError`, which names the module or operation and
points at :class:`~gpytorch_tp.kernels.MonteCarloKernel`, the kernel that
works for every network.

Widths in the module are ignored (the kernels are the infinite-width limit).
The variances of the weights come from, in this order: explicit arguments of
:func:`from_module`; the module's initialisation (``init="pytorch"``:
the variances of PyTorch's default initialisation of each module type, whose
limit the kernel is, except that the first layer's uniform weights over a few
input features are taken as Gaussian ones of the same variance;
``init="measured"``: the second moments of the module's current parameters).
See ``docs/from_module.md`` for the conventions, and for what the NTK of a
converted module means.  BatchNorm networks (``Linear -> BatchNorm1d -> ReLU``
MLPs) are not architectures of pairwise layers: :func:`kernel_from_module` with
``reference_points`` turns them into a :class:`~gpytorch_tp.BatchNormMLPKernel`.

The package, one concept per module: :mod:`~gpytorch_tp.conversion.context` (the traced values,
the :class:`ConversionContext` a converter gets and its variance rules),
:mod:`~gpytorch_tp.conversion.registry` (:data:`CONVERTERS`, :func:`register_converter`),
:mod:`~gpytorch_tp.conversion.module_converters` (dense, convolution, pooling, flattening, LayerNorm,
activations, identities), :mod:`~gpytorch_tp.conversion.recurrent_converters` (``nn.RNN``/``GRU``/``LSTM``),
:mod:`~gpytorch_tp.conversion.batchnorm_converter` (``nn.BatchNorm1d``),
:mod:`~gpytorch_tp.conversion.tracing` (the ``torch.fx`` graph walk) and
:mod:`~gpytorch_tp.conversion.api` (the public functions).
"""

from __future__ import annotations

from ..errors import UnsupportedModuleError
from .api import from_module, kernel_from_module, ntk_parameter_scales
# Value, Converter and not_supported_yet: public names of the former single module, not in __all__.
from .context import INITS, ConversionContext, Value  # noqa: F401
from .registry import CONVERTERS, Converter, not_supported_yet, register_converter  # noqa: F401

__all__ = [
    "CONVERTERS",
    "INITS",
    "ConversionContext",
    "UnsupportedModuleError",
    "from_module",
    "kernel_from_module",
    "ntk_parameter_scales",
    "register_converter",
]
