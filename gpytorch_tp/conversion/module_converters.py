"""Converters of the feed-forward ``torch.nn`` modules: dense, convolution, pooling, flattening,
LayerNorm, the activations of the nonlinearity registry, identities, and the modules without a kernel.

Each registers itself in :data:`~gpytorch_tp.conversion.registry.CONVERTERS` when this module is imported.
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import UnsupportedModuleError
from ..layers import (
    AvgPool1d,
    AvgPool2d,
    Conv,
    Flatten,
    GlobalAvgPool,
    Layer,
    LayerNorm,
    Linear,
    torch_operations,
)
from .context import ConversionContext, Value
from .registry import Converter, not_supported_yet, register_converter, require_layout

__all__ = ["flatten_layers"]


@register_converter(nn.Linear)
def _linear(module: nn.Linear, context: ConversionContext):
    require_layout(
        module,
        context,
        ("features", "sequence"),
        "nn.Linear acts on the last axis, which is a grid axis here, not the channels; flatten first, or use a "
        "1x1 convolution",
    )
    fan_in = module.in_features
    weight = context.weight_moment(module, "weight", fan_in, 1.0 / 3.0)
    bias = context.bias_moment(module, "bias", fan_in if context.value.finite else None)
    return [Linear(weight, bias)], context.value.layout


def _conv(module: nn.Module, context: ConversionContext, grid_ndim: int):
    require_layout(module, context, ("grid",), f"it needs features on a {grid_ndim}-d grid (N, C, *grid)")
    kernel_size, stride = tuple(module.kernel_size), tuple(module.stride)
    if any(d != 1 for d in module.dilation):
        raise UnsupportedModuleError(context.describe(module), f"dilation {module.dilation} (only 1)")
    if module.groups != 1:
        raise UnsupportedModuleError(context.describe(module), f"groups={module.groups} (only 1)")
    grid = context.value.shape[2:]
    mode = _conv_padding_mode(module, grid, kernel_size, stride, context.out_shape[2:])
    if mode is None:
        raise UnsupportedModuleError(
            context.describe(module),
            f"padding {module.padding!r} with padding_mode={module.padding_mode!r} on the grid {grid} is neither "
            "'valid' (no padding) nor 'same' as gpytorch_tp.layers.Conv pads (zeros or circular, "
            "ceil(size / stride) outputs, the odd padding position after)",
        )
    fan_in = module.in_channels * math.prod(kernel_size)
    weight = context.weight_moment(module, "weight", fan_in, 1.0 / 3.0)
    bias = context.bias_moment(module, "bias", fan_in if context.value.finite else None)
    return [Conv(kernel_size, stride, mode, weight, bias, grid_ndim=grid_ndim)], "grid"


def _conv_padding_mode(module, grid, kernel_size, stride, out_grid) -> str | None:
    """The :mod:`gpytorch_tp.geometry` padding mode that places the windows as ``module`` does, if any."""
    from ..geometry import padding

    torch_padding = module.padding
    if isinstance(torch_padding, str):
        torch_padding = (0,) * len(grid) if torch_padding == "valid" else None
    candidates = ("circular",) if module.padding_mode == "circular" else ("valid", "same")
    if module.padding_mode not in ("zeros", "circular"):
        return None
    for mode in candidates:
        try:
            pads = [padding(n, k, s, mode) for n, k, s in zip(grid, kernel_size, stride)]
        except ValueError:
            continue
        if tuple(p.output_size for p in pads) != tuple(out_grid):
            continue
        if torch_padding is None:  # padding="same" (stride 1): torch puts the odd position after, as we do
            return mode
        if all(p.before == t for p, t in zip(pads, torch_padding)):
            return mode
    return None


register_converter(nn.Conv1d, lambda m, c: _conv(m, c, 1))
register_converter(nn.Conv2d, lambda m, c: _conv(m, c, 2))


def _avg_pool(module: nn.Module, context: ConversionContext, grid_ndim: int):
    require_layout(module, context, ("grid",), f"it needs features on a {grid_ndim}-d grid")
    kernel_size = _as_tuple(module.kernel_size, grid_ndim)
    stride = _as_tuple(module.stride if module.stride is not None else module.kernel_size, grid_ndim)
    if any(_as_tuple(module.padding, grid_ndim)) or module.ceil_mode:
        raise UnsupportedModuleError(context.describe(module), "padding or ceil_mode (only windows inside the grid)")
    layer = (AvgPool1d if grid_ndim == 1 else AvgPool2d)(kernel_size, stride)
    return [layer], "grid"


def _adaptive_avg_pool(module: nn.Module, context: ConversionContext, grid_ndim: int):
    require_layout(module, context, ("grid",), f"it needs features on a {grid_ndim}-d grid")
    grid = context.value.shape[2:]
    out = tuple(o if o is not None else n for o, n in zip(_as_tuple(module.output_size, grid_ndim), grid))
    if all(o == 1 for o in out):
        return [GlobalAvgPool()], "pooled"
    if any(n % o for n, o in zip(grid, out)):
        raise UnsupportedModuleError(
            context.describe(module), f"output size {out} does not divide the grid {grid} into equal windows"
        )
    window = tuple(n // o for n, o in zip(grid, out))
    return [(AvgPool1d if grid_ndim == 1 else AvgPool2d)(window, window)], "grid"


def _as_tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


register_converter(nn.AvgPool1d, lambda m, c: _avg_pool(m, c, 1))
register_converter(nn.AvgPool2d, lambda m, c: _avg_pool(m, c, 2))
register_converter(nn.AdaptiveAvgPool1d, lambda m, c: _adaptive_avg_pool(m, c, 1))
register_converter(nn.AdaptiveAvgPool2d, lambda m, c: _adaptive_avg_pool(m, c, 2))


@register_converter(nn.Flatten)
def _flatten_module(module: nn.Flatten, context: ConversionContext):
    if module.start_dim != 1 or module.end_dim != -1:
        raise UnsupportedModuleError(context.describe(module), "only Flatten(start_dim=1, end_dim=-1)")
    return flatten_layers(context.value)


def flatten_layers(value: Value) -> tuple[list[Layer], str]:
    if value.layout in ("grid", "sequence"):
        return [Flatten()], "features"
    return [], "features"  # features, or a pooled grid of ones


@register_converter(nn.LayerNorm)
def _layer_norm(module: nn.LayerNorm, context: ConversionContext):
    require_layout(module, context, ("features", "sequence"), "it normalises grid axes, not the channels")
    if tuple(module.normalized_shape) != (context.value.shape[-1],):
        raise UnsupportedModuleError(
            context.describe(module), "only normalisation over the last (feature) axis, normalized_shape=(features,)"
        )
    if module.elementwise_affine and module.bias is None:
        raise UnsupportedModuleError(context.describe(module), "an affine map without bias (bias=False)")
    if module.elementwise_affine:
        # The gain and bias start at 1 and 0 (not random): trained with learning rate 1 in the NTK.
        context.scales[context.parameter_name("weight")] = 1.0
        context.scales[context.parameter_name("bias")] = 1.0
    return [LayerNorm(elementwise_affine=module.elementwise_affine, center=True)], context.value.layout


_NOT_YET = {
    nn.MultiheadAttention: "nn.MultiheadAttention scales its logits by 1/sqrt(head size), which has no closed "
    "form at infinite width; gpytorch_tp.layers.SelfAttention (logits scaled by 1/n) and TransformerKernel "
    "describe the networks that have one",
}
for _type, _reason in _NOT_YET.items():
    register_converter(_type, not_supported_yet(_reason))

_NO_CLOSED_FORM = {
    nn.MaxPool1d: "max pooling has no closed-form kernel",
    nn.MaxPool2d: "max pooling has no closed-form kernel",
    nn.Softmax: "softmax over features has no closed-form kernel",
    nn.BatchNorm2d: "it normalises each channel over the batch and the grid, which no kernel of the package "
    "models (kernel_from_module(..., reference_points=...) converts BatchNorm1d on features in Linear -> "
    "BatchNorm1d -> ReLU MLPs)",
    nn.BatchNorm3d: "it normalises each channel over the batch and the grid, which no kernel of the package models",
    nn.Embedding: "embeddings of discrete tokens are not a layer of these kernels",
}
for _type, _reason in _NO_CLOSED_FORM.items():
    register_converter(_type, not_supported_yet(_reason))


# -- elementwise functions -------------------------------------------------------------------------
# From the nonlinearity registry (each class declares its torch operations), so a new nonlinearity
# needs no line here.


def _activation_module(cls: type[Layer]) -> Converter:
    def convert(module: nn.Module, context: ConversionContext):
        layer = cls.from_torch_module(module)
        if layer is None:
            arguments = ", ".join(f"{name}={getattr(module, name, default)}" for name, default in cls.torch_arguments)
            raise UnsupportedModuleError(context.describe(module), f"{arguments} (only the default)")
        return [layer], context.value.layout

    return convert


# The nn.Module types of the registered nonlinearities -> their layer classes.
_, _, _MODULES = torch_operations()
for _type, _cls in _MODULES.items():
    register_converter(_type, _activation_module(_cls))


def _identity(module: nn.Module, context: ConversionContext):
    return [], context.value.layout


# Dropout is off when the network is evaluated (eval mode); the kernels are those of that network.
for _type in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d):
    register_converter(_type, _identity)
