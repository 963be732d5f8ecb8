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
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..evaluation import evaluate
from ..layers import (
    GRU,
    LSTM,
    RNN,
    AvgPool1d,
    AvgPool2d,
    Conv,
    Flatten,
    GlobalAvgPool,
    LastStep,
    Layer,
    LayerNorm,
    Linear,
    ReLU,
    Residual,
    Sequential,
    TimeMean,
    torch_operations,
)

if TYPE_CHECKING:
    from ..kernels import BatchNormMLPKernel, TensorProgramKernel

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

INITS = ("pytorch", "measured")

# Layouts of a tensor of the traced network, and how they map onto a kernel state:
#   "features": (N, F)             -> no positions
#   "grid":     (N, C, *grid)      -> positions grid (channel-major, as convolutions take it)
#   "sequence": (N, T, C)          -> positions (T,) (batch-first, as nn.RNN(batch_first=True) gives it)
#   "pooled":   (N, C, 1, ..., 1)  -> no positions (after global average pooling with kept axes)
#   "rnn":      the (output, h_n) tuple of an nn.RNN/GRU/LSTM;  "final": its h_n, (layers * directions, N, H)
#   "lstm_state": an nn.LSTM's (h_n, c_n);  "cell_state": its c_n (unsupported: an error where used)


class UnsupportedModuleError(NotImplementedError):
    """A module or operation that :func:`from_module` cannot convert into exact-kernel layers."""

    def __init__(self, what: str, reason: str = ""):
        self.what = what
        reason = f": {reason.rstrip('.')}" if reason else ""
        super().__init__(
            f"{what} is not supported by from_module{reason}. Its kernels can still be estimated from random "
            "finite networks: gpytorch_tp.kernels.MonteCarloKernel(lambda: YourModule(...), kind='nngp' or 'ntk')"
        )


@dataclass(frozen=True)
class Value:
    """A tensor of the traced network: the architecture from the network input to it, and its layout."""

    layers: tuple[Layer, ...]
    layout: str
    #: its width is the network input's (finite at infinite width: no weight layer before it)
    finite: bool
    #: its shape in the example run (batch first)
    shape: tuple[int, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    def then(self, layers: list[Layer], layout: str | None = None, shape=None, finite: bool | None = None, **info):
        return Value(
            self.layers + tuple(layers),
            self.layout if layout is None else layout,
            self.finite if finite is None else finite,
            self.shape if shape is None else tuple(shape),
            info,
        )


@dataclass
class ConversionContext:
    """What a converter gets besides the module: where it is, its input and the variance options."""

    #: qualified name of the module in the network (``named_modules``)
    name: str
    #: the module's input
    value: Value
    #: shape of the module's output in the example run (``None`` for tuples)
    out_shape: tuple[int, ...] | None
    init: str
    weight_variance: float | None
    bias_variance: float | None
    input_variance: float | None
    #: per-parameter NTK learning-rate factors, filled in by converters (see :func:`ntk_parameter_scales`)
    scales: dict[str, float]
    #: BatchNorm layers are accepted (``kernel_from_module(..., reference_points=...)``, see :func:`_batchnorm_kernel`)
    batchnorm: bool = False

    def describe(self, module: nn.Module) -> str:
        return f"{type(module).__name__} {self.name!r}"

    def parameter_name(self, attribute: str) -> str:
        return f"{self.name}.{attribute}" if self.name else attribute

    def weight_moment(
        self, module: nn.Module, attribute: str, fan_in: int, default: float, bound: float | None = None
    ) -> float:
        """Variance times fan-in of a weight tensor, recorded for the NTK.

        ``default`` is the value under PyTorch's initialisation, a uniform
        distribution on ``+-bound`` (default: the bound of that variance).
        """
        weight = getattr(module, attribute)
        if self.weight_variance is not None:
            value = float(self.weight_variance)
        elif self.init == "measured":
            value = fan_in * float(weight.detach().double().pow(2).mean())
        else:
            value = default
            self.check_uniform_bound(module, attribute, bound or math.sqrt(3 * default / fan_in))
        self.scales[self.parameter_name(attribute)] = value / fan_in
        return value

    def bias_moment(self, module: nn.Module, attribute: str, finite_fan_in: int | None, explicit=None) -> float:
        """Variance of a bias vector; PyTorch's default ``U(+-1/sqrt(fan_in))`` vanishes for infinite fan-in."""
        bias = getattr(module, attribute, None)
        if bias is None:
            return 0.0
        explicit = self.bias_variance if explicit is None else explicit
        if explicit is not None:
            value = float(explicit)
        elif self.init == "measured":
            value = float(bias.detach().double().pow(2).mean())
        else:
            value = 0.0 if finite_fan_in is None else 1.0 / (3.0 * finite_fan_in)
            if finite_fan_in is not None:
                self.check_uniform_bound(module, attribute, 1.0 / math.sqrt(finite_fan_in))
        self.scales[self.parameter_name(attribute)] = value
        return value

    def check_uniform_bound(self, module: nn.Module, attribute: str, bound: float) -> None:
        tensor = getattr(module, attribute).detach()
        if tensor.numel() and float(tensor.abs().max()) > bound * (1 + 1e-5):
            warnings.warn(
                f"{self.describe(module)}: {attribute} exceeds the bound {bound:.4g} of PyTorch's default "
                "initialisation, so the module was re-initialised (or trained); init='pytorch' assumes the "
                "default scheme. Use init='measured' or explicit variances.",
                stacklevel=4,
            )


#: A converter maps a module and its context to ``(layers, output layout)``.
Converter = Callable[[nn.Module, ConversionContext], tuple[list[Layer], str]]

#: Registry: ``torch.nn`` module type -> converter.  ``register_converter(nn.GRU, convert_gru)`` adds one.
CONVERTERS: dict[type[nn.Module], Converter] = {}


def register_converter(
    module_type: type[nn.Module], converter: Converter | None = None
) -> Converter | Callable[[Converter], Converter]:
    """Register ``converter`` for ``module_type`` (replacing any); usable as a decorator."""

    def register(fn: Converter) -> Converter:
        CONVERTERS[module_type] = fn
        return fn

    return register if converter is None else register(converter)


def not_supported_yet(reason: str) -> Converter:
    """A converter that raises :class:`UnsupportedModuleError` with ``reason``: a placeholder in the registry."""

    def convert(module: nn.Module, context: ConversionContext):
        raise UnsupportedModuleError(context.describe(module), reason)

    convert.unsupported_reason = reason
    return convert


# -- converters of torch.nn modules ----------------------------------------------------------------


def _require_layout(module: nn.Module, context: ConversionContext, layouts: tuple[str, ...], hint: str) -> None:
    if context.value.layout not in layouts:
        raise UnsupportedModuleError(
            f"{context.describe(module)} on a tensor of shape {context.value.shape} ({context.value.layout} layout)",
            hint,
        )


@register_converter(nn.Linear)
def _linear(module: nn.Linear, context: ConversionContext):
    _require_layout(
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
    _require_layout(module, context, ("grid",), f"it needs features on a {grid_ndim}-d grid (N, C, *grid)")
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
    _require_layout(module, context, ("grid",), f"it needs features on a {grid_ndim}-d grid")
    kernel_size = _as_tuple(module.kernel_size, grid_ndim)
    stride = _as_tuple(module.stride if module.stride is not None else module.kernel_size, grid_ndim)
    if any(_as_tuple(module.padding, grid_ndim)) or module.ceil_mode:
        raise UnsupportedModuleError(context.describe(module), "padding or ceil_mode (only windows inside the grid)")
    layer = (AvgPool1d if grid_ndim == 1 else AvgPool2d)(kernel_size, stride)
    return [layer], "grid"


def _adaptive_avg_pool(module: nn.Module, context: ConversionContext, grid_ndim: int):
    _require_layout(module, context, ("grid",), f"it needs features on a {grid_ndim}-d grid")
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
    return _flatten(context.value)


def _flatten(value: Value) -> tuple[list[Layer], str]:
    if value.layout in ("grid", "sequence"):
        return [Flatten()], "features"
    return [], "features"  # features, or a pooled grid of ones


@register_converter(nn.LayerNorm)
def _layer_norm(module: nn.LayerNorm, context: ConversionContext):
    _require_layout(module, context, ("features", "sequence"), "it normalises grid axes, not the channels")
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


def _check_recurrent(module: nn.Module, context: ConversionContext) -> None:
    _require_layout(module, context, ("sequence",), "it needs sequences (N, T, d)")
    if not module.batch_first:
        raise UnsupportedModuleError(
            context.describe(module), "batch_first=False (the kernels take batch-first sequences); use batch_first=True"
        )


def _vanishing_input_error(module: nn.Module, context: ConversionContext) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        context.describe(module),
        "with PyTorch's default initialisation its input weights have variance 1/(3 hidden_size), i.e. "
        f"{module.input_size}/(3 hidden_size) per fan-in, which vanishes at infinite width: the kernel "
        "would not depend on the input. Pass input_variance=... (the variance times the input size) or "
        "init='measured' (the kernel of the module at its own width), or initialise the input weights "
        "with a fan-in scaling",
    )


def _recurrent_weights(module: nn.Module, context: ConversionContext, tag: str, layer: int) -> tuple[float, float]:
    """``(sigma_w^2, sigma_u^2)`` of one layer (and direction) of an nn.RNN/GRU/LSTM.

    PyTorch initialises every tensor of these modules U(+-1/sqrt(hidden)): variance 1/(3 hidden),
    i.e. 1/3 per fan-in for the recurrent weights and ``input_size / (3 hidden)`` for the input ones.
    """
    hidden = module.hidden_size
    directions = 2 if module.bidirectional else 1
    input_size = module.input_size if layer == 0 else hidden * directions
    recurrent = context.weight_moment(module, f"weight_hh{tag}", hidden, 1.0 / 3.0)
    saved = context.weight_variance
    context.weight_variance = context.input_variance
    try:
        default = 0.0 if layer == 0 and context.value.finite else input_size / (3.0 * hidden)
        inputs = context.weight_moment(module, f"weight_ih{tag}", input_size, default, 1 / math.sqrt(hidden))
    finally:
        context.weight_variance = saved
    return recurrent, inputs


@register_converter(nn.RNN)
def _rnn(module: nn.RNN, context: ConversionContext):
    _check_recurrent(module, context)
    directions = 2 if module.bidirectional else 1
    layers = []
    for layer in range(module.num_layers):
        weights, inputs, biases = [], [], []
        for suffix in ("", "_reverse")[:directions]:
            tag = f"_l{layer}{suffix}"
            recurrent, input_weights = _recurrent_weights(module, context, tag, layer)
            weights.append(recurrent)
            inputs.append(input_weights)
            # b_ih + b_hh: two independent biases, their variances add.
            split = None if context.bias_variance is None else context.bias_variance / 2
            biases.append(
                context.bias_moment(module, f"bias_ih{tag}", None, explicit=split)
                + context.bias_moment(module, f"bias_hh{tag}", None, explicit=split)
            )
        input_variance = sum(inputs) / directions
        if input_variance == 0:
            raise _vanishing_input_error(module, context)
        layers.append(
            RNN(
                "tanh" if module.nonlinearity == "tanh" else "relu",
                sum(weights) / directions,
                input_variance,
                sum(biases) / directions,
                bidirectional=module.bidirectional,
            )
        )
    return layers, "rnn"


def _gate_bias_variances(module: nn.Module, context: ConversionContext, tag: str, gates: int) -> list[float]:
    """Measured variance of each gate's bias slices ``b_ih`` and ``b_hh``: ``gates`` pairs.

    The NTK scale recorded per tensor is its mean square (an explicit ``bias_variance`` of a GRU
    records none, its tensors' slices having different variances).
    """
    pairs = []
    for attribute in (f"bias_ih{tag}", f"bias_hh{tag}"):
        bias = getattr(module, attribute, None)
        if bias is None:
            pairs.append([0.0] * gates)
        else:
            pairs.append([float(chunk.pow(2).mean()) for chunk in bias.detach().double().chunk(gates)])
            context.scales[context.parameter_name(attribute)] = sum(pairs[-1]) / gates
    return list(zip(*pairs))


def _gated(module: nn.Module, context: ConversionContext, layer_type: type[Layer], gates: int):
    """nn.GRU / nn.LSTM as our GRU / LSTM layers: one variance per kind of tensor, shared by the gates."""
    _check_recurrent(module, context)
    name = type(module).__name__
    if module.bidirectional:
        raise UnsupportedModuleError(
            context.describe(module), f"bidirectional=True (the infinite-width {name} layer runs forward only)"
        )
    if getattr(module, "proj_size", 0):
        raise UnsupportedModuleError(
            context.describe(module), "proj_size > 0 (the infinite-width LSTM layer has no projection)"
        )
    layers = []
    for layer in range(module.num_layers):
        tag = f"_l{layer}"
        recurrent, inputs = _recurrent_weights(module, context, tag, layer)
        if inputs == 0:
            raise _vanishing_input_error(module, context)
        # Every gate pre-activation carries b_ih + b_hh; the GRU's candidate splits them: b_in joins the input
        # term, b_hn the recurrent term inside the reset product.  Our layers have one bias variance for each.
        if context.bias_variance is not None:
            bias = float(context.bias_variance)
            half = bias / 2 if layer_type is LSTM else None  # the GRU's per-tensor variances differ by gate
            for attribute in (f"bias_ih{tag}", f"bias_hh{tag}"):
                if getattr(module, attribute, None) is not None and half is not None:
                    context.scales[context.parameter_name(attribute)] = half
        elif context.init == "measured":
            per_gate = _gate_bias_variances(module, context, tag, gates)
            if layer_type is LSTM:
                terms = [b_ih + b_hh for b_ih, b_hh in per_gate]
            else:
                (r_ih, r_hh), (z_ih, z_hh), (n_ih, n_hh) = per_gate
                terms = [r_ih + r_hh, z_ih + z_hh, n_ih, n_hh]
            bias = sum(terms) / len(terms)
            if max(terms) > 1.5 * min(terms):
                raise UnsupportedModuleError(
                    context.describe(module),
                    f"its measured bias variances per gate pre-activation ({', '.join(f'{t:.3g}' for t in terms)}) "
                    f"differ, and the infinite-width {name} layer has one bias variance for all of them"
                    + (" (PyTorch's default gives b_in and b_hn half of b_ir + b_hr)" if layer_type is GRU else "")
                    + ". Pass bias_variance=... explicitly",
                )
        else:
            bias = 0.0  # U(+-1/sqrt(hidden)) biases vanish at infinite width
            for attribute in (f"bias_ih{tag}", f"bias_hh{tag}"):
                if getattr(module, attribute, None) is not None:
                    context.check_uniform_bound(module, attribute, 1 / math.sqrt(module.hidden_size))
                    context.scales[context.parameter_name(attribute)] = 0.0
        layers.append(layer_type("tanh", "sigmoid", recurrent, inputs, bias))
    return layers, "rnn"


@register_converter(nn.GRU)
def _gru(module: nn.GRU, context: ConversionContext):
    return _gated(module, context, GRU, 3)


@register_converter(nn.LSTM)
def _lstm(module: nn.LSTM, context: ConversionContext):
    return _gated(module, context, LSTM, 4)


class _BatchNormMarker(Layer):
    """Where an ``nn.BatchNorm1d`` sits in a converted network: not a layer of any architecture.

    :func:`kernel_from_module` with ``reference_points`` reads the markers (and the
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
    _require_layout(
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
    return [_BatchNormMarker(what, float(module.eps), gain)], "features"


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


# Elementwise torch functions and tensor methods: target -> the layer class.
_FUNCTIONS, _METHODS, _MODULES = torch_operations()
for _type, _cls in _MODULES.items():
    register_converter(_type, _activation_module(_cls))


def _identity(module: nn.Module, context: ConversionContext):
    return [], context.value.layout


# Dropout is off when the network is evaluated (eval mode); the kernels are those of that network.
for _type in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d):
    register_converter(_type, _identity)

_ADD = (operator.add, operator.iadd, torch.add)


# -- tracing ---------------------------------------------------------------------------------------


@dataclass
class _Result:
    architecture: Sequential
    input_shape: tuple[int, ...]
    sequence: bool
    scales: dict[str, float]
    #: the module or operation each layer came from (``id(layer)`` -> description)
    origins: dict[int, str] = field(default_factory=dict)


def _convert(
    module: nn.Module,
    input_shape: tuple[int, ...] | int | None,
    init: str,
    weight_variance: float | None,
    bias_variance: float | None,
    input_variance: float | None,
    sequence: bool | None,
    check: bool = True,
    batchnorm: bool = False,
) -> _Result:
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module needs a torch.nn.Module, got {type(module).__name__}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    for name, value in (
        ("weight_variance", weight_variance),
        ("bias_variance", bias_variance),
        ("input_variance", input_variance),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {value}")
    module = copy.deepcopy(module)  # the example run must not touch the user's module (BatchNorm statistics)
    try:
        graph = torch.fx.GraphModule(module, _Tracer().trace(module))
    except Exception as error:
        raise UnsupportedModuleError(
            f"{type(module).__name__} (tracing its forward with torch.fx failed: {error})",
            "from_module converts nn.Sequential and modules whose forward traces with torch.fx",
        ) from error
    input_shape = _input_shape(graph, input_shape)
    if sequence is None:
        sequence = len(input_shape) == 2 and any(isinstance(m, (nn.RNN, nn.GRU, nn.LSTM)) for m in graph.modules())
    parameter = next(module.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    example = torch.randn(2, *input_shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ShapeProp(graph).propagate(example)
    converter = _GraphConverter(graph, init, weight_variance, bias_variance, input_variance, batchnorm)
    layout = "sequence" if sequence else ("features" if len(input_shape) == 1 else "grid")
    architecture = Sequential(*converter.run(Value((), layout, True, tuple(example.shape))))
    if check:
        # Layers refuse what their recursion cannot express (a nonlinearity on the input, a residual sum
        # of correlated branches, ...): evaluate once so that the refusal comes now.
        dims = math.prod(input_shape)
        x = torch.randn(2, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        try:
            evaluate(
                architecture.double(),
                x,
                input_shape=input_shape if len(input_shape) > 1 else None,
                sequence=sequence,
            )
        except (ValueError, NotImplementedError, RuntimeError) as error:
            raise UnsupportedModuleError(
                f"{type(module).__name__} (as the architecture {_summary(architecture)})", str(error)
            ) from error
    return _Result(
        architecture.to(torch.get_default_dtype()), input_shape, sequence, converter.scales, converter.origins
    )


class _Tracer(torch.fx.Tracer):
    """Keeps modules with a registered converter whole (also user-defined types)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in CONVERTERS or super().is_leaf_module(module, qualified_name)


def _input_shape(graph: torch.fx.GraphModule, input_shape) -> tuple[int, ...]:
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModuleError(
            f"a forward with {len(placeholders)} inputs", "from_module converts networks of one input tensor"
        )
    if input_shape is not None:
        shape = (input_shape,) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"input_shape must be positive sizes, got {input_shape}")
        return shape
    for user in placeholders[0].users:
        if user.op == "call_module" and isinstance(graph.get_submodule(user.target), nn.Linear):
            return (graph.get_submodule(user.target).in_features,)
    raise ValueError(
        "from_module needs input_shape (per item, without the batch axis: (d,), (C, H, W), or (T, d) for "
        "sequences) unless the network starts with nn.Linear"
    )


class _GraphConverter:
    def __init__(self, graph, init, weight_variance, bias_variance, input_variance, batchnorm=False):
        self.graph = graph
        self.options = {
            "init": init,
            "weight_variance": weight_variance,
            "bias_variance": bias_variance,
            "input_variance": input_variance,
            "batchnorm": batchnorm,
        }
        self.scales: dict[str, float] = {}
        self.called: dict[str, str] = {}
        #: ``id(layer)`` -> the module or operation it came from (for the BatchNorm path's messages)
        self.origins: dict[int, str] = {}

    def run(self, input_value: Value) -> tuple[Layer, ...]:
        values: dict[torch.fx.Node, Any] = {}
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                values[node] = input_value
            elif node.op == "output":
                out = values[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else None
                if not isinstance(out, Value) or out.layout not in ("features", "pooled"):
                    shape = getattr(out, "shape", None)
                    raise UnsupportedModuleError(
                        f"the network output (shape {shape}, {getattr(out, 'layout', type(out).__name__)})",
                        "the network must end with one tensor of features (N, m): add a readout (flatten, "
                        "pooling, last step or mean over time) and a Linear layer",
                    )
                return out.layers
            else:
                values[node] = self.convert_node(node, values)
        raise AssertionError("a traced graph has an output node")  # pragma: no cover

    def convert_node(self, node: torch.fx.Node, values: dict) -> Any:
        args = [values.get(a, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
        kwargs = {k: values.get(v, v) if isinstance(v, torch.fx.Node) else v for k, v in node.kwargs.items()}
        tensors = [a for a in args if isinstance(a, Value)]
        meta = node.meta.get("tensor_meta")
        out_shape = tuple(meta.shape) if hasattr(meta, "shape") else None
        if node.op == "get_attr":
            raise UnsupportedModuleError(
                f"the direct use of the parameter or buffer {node.target!r} in forward",
                "weights must belong to converted modules (nn.Linear, nn.Conv2d, ...)",
            )
        if any(t.layout == "cell_state" for t in tensors):
            raise UnsupportedModuleError(
                f"the use of an LSTM's cell state c_n ({node.name})", "only its hidden states: output or h_n[-1]"
            )
        shape_query = node.target in ("size", "dim") or (node.target is getattr and args[1:] in (["shape"], ["ndim"]))
        if not tensors or shape_query:
            return _Aux()  # sizes, shapes and other non-tensor helpers of shape operations
        if node.op == "call_module":
            return self.call_module(node, tensors, args, kwargs, out_shape)
        return self.call_function(node, tensors, args, kwargs, out_shape)

    def call_module(self, node, tensors, args, kwargs, out_shape) -> Value:
        module = self.graph.get_submodule(node.target)
        what = f"{type(module).__name__} {node.target!r}"
        converter = next((CONVERTERS[t] for t in type(module).__mro__ if t in CONVERTERS), None)
        if converter is None:
            raise UnsupportedModuleError(what)
        if hasattr(converter, "unsupported_reason"):
            raise UnsupportedModuleError(what, converter.unsupported_reason)
        if len(tensors) != 1 or len(args) != 1 or kwargs:
            raise UnsupportedModuleError(f"{what} called with {len(args) + len(kwargs)} arguments", "only one input")
        if any(True for _ in module.parameters()):
            if node.target in self.called:
                raise UnsupportedModuleError(
                    f"{what} called twice", "weights shared between layers are not a layer of these kernels"
                )
            self.called[node.target] = node.name
        (value,) = tensors
        context = ConversionContext(node.target, value, out_shape, scales=self.scales, **self.options)
        layers, layout = converter(module, context)
        self.origins.update((id(layer), what) for layer in layers)
        finite = value.finite and not any(_has_weights(layer) for layer in layers)
        info = {"module": module} if layout == "rnn" else {}
        return value.then(layers, layout, out_shape or value.shape, finite, **info)

    def call_function(self, node, tensors, args, kwargs, out_shape) -> Value:
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        what = f"the operation {name!r} ({node.name})"
        first = args[0] if args else None
        if target in _ADD or (node.op == "call_method" and target in ("add", "add_")):
            return self.add(what, args, kwargs)
        if target is operator.getitem:
            return self.getitem(what, first, args[1], out_shape)
        if not isinstance(first, Value):
            raise UnsupportedModuleError(what, "its first argument is not the network's tensor")
        if len(tensors) > 1:
            raise UnsupportedModuleError(what, "it combines tensors in a way other than a residual sum")
        elementwise = _FUNCTIONS.get(target) if node.op == "call_function" else _METHODS.get(target)
        if elementwise is not None:
            try:
                layer = elementwise.from_torch_call(args[1:], kwargs)
            except TypeError as error:
                raise UnsupportedModuleError(what, f"arguments {args[1:]}, {kwargs}") from error
            if layer is None:
                raise UnsupportedModuleError(what, f"arguments {args[1:]}, {kwargs}")
            self.origins[id(layer)] = what
            return first.then([layer], shape=out_shape)
        if node.op == "call_method" and target in ("contiguous", "clone"):
            return first
        if (target is torch.flatten or target in ("flatten", "view", "reshape")) and out_shape is not None:
            return self.flatten(what, first, out_shape)
        if node.op == "call_method" and target == "squeeze" and first.layout == "pooled":
            return first.then([], "features", out_shape)
        if target in (torch.mean, "mean"):
            return self.mean(what, first, args, kwargs, out_shape)
        raise UnsupportedModuleError(what)

    def add(self, what, args, kwargs) -> Value:
        if len(args) != 2 or kwargs or not all(isinstance(a, Value) for a in args):
            raise UnsupportedModuleError(what, "only the sum of two tensors of the network (a residual connection)")
        a, b = args
        if a.layout != b.layout or a.shape != b.shape or a.layout in ("rnn", "final", "lstm_state"):
            raise UnsupportedModuleError(what, f"the sum of tensors of shapes {a.shape} and {b.shape}")
        common = 0
        while common < min(len(a.layers), len(b.layers)) and a.layers[common] is b.layers[common]:
            common += 1
        tail_a, tail_b = a.layers[common:], b.layers[common:]
        if not tail_a and not tail_b:
            raise UnsupportedModuleError(what, "a tensor added to itself")
        if not tail_a:
            tail_a, tail_b = tail_b, tail_a
        skip = None if not tail_b else (tail_b[0] if len(tail_b) == 1 else Sequential(*tail_b))
        residual = Residual(*tail_a, skip=skip)
        self.origins[id(residual)] = f"{what}, a residual connection"
        return Value(a.layers[:common] + (residual,), a.layout, a.finite and b.finite, a.shape)

    def getitem(self, what, value, index, out_shape) -> Any:
        if isinstance(value, _Aux):
            return value
        if value.layout == "rnn":
            if index == 0:
                return value.then([], "sequence", out_shape)
            if index == 1:
                module = value.info["module"]
                layout = "lstm_state" if isinstance(module, nn.LSTM) else "final"
                return value.then([], layout, out_shape, module=module)
            raise UnsupportedModuleError(what, f"index {index} of an RNN's output")
        if value.layout == "lstm_state":
            if index == 0:
                return value.then([], "final", out_shape, module=value.info["module"])
            if index == 1:  # unpacked with h_n; an error only if used (see convert_node)
                return value.then([], "cell_state", out_shape)
            raise UnsupportedModuleError(what, f"index {index} of an LSTM's (h_n, c_n)")
        if value.layout == "final":
            module = value.info["module"]
            count = module.num_layers * (2 if module.bidirectional else 1)
            if module.bidirectional:
                raise UnsupportedModuleError(
                    what, "h_n of a bidirectional RNN (take output[:, -1] for both directions' last states)"
                )
            if index in (-1, count - 1):
                return value.then([LastStep()], "features", out_shape)
            raise UnsupportedModuleError(what, f"h_n[{index}] (only h_n[-1], the last layer's final state)")
        if value.layout == "sequence":
            steps = value.shape[1]
            index = index if isinstance(index, tuple) else (index,)
            full = slice(None)
            if len(index) in (2, 3) and index[0] == full and index[1] in (-1, steps - 1) and index[2:] in ((), (full,)):
                return value.then([LastStep()], "features", out_shape)
        raise UnsupportedModuleError(what, f"indexing {value.layout} features of shape {value.shape} with {index!r}")

    def flatten(self, what, value, out_shape) -> Value:
        if len(out_shape) != 2 or out_shape[0] != value.shape[0] or out_shape[1] != math.prod(value.shape[1:]):
            raise UnsupportedModuleError(what, f"a reshape from {value.shape} to {out_shape} (only flattening)")
        layers, layout = _flatten(value)
        return value.then(layers, layout, out_shape)

    def mean(self, what, value, args, kwargs, out_shape) -> Value:
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        rank = len(value.shape)
        dims = (
            tuple(d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))) if dims is not None else ()
        )
        if value.layout == "sequence" and dims == (1,) and not keepdim:
            return value.then([TimeMean()], "features", out_shape)
        if value.layout == "grid" and sorted(dims) == list(range(2, rank)):
            return value.then([GlobalAvgPool()], "pooled" if keepdim else "features", out_shape)
        raise UnsupportedModuleError(
            what,
            f"a mean over axes {dims} of {value.layout} features of shape {value.shape} (only over time or the grid)",
        )


def _summary(architecture: Sequential) -> str:
    return "[" + ", ".join(type(layer).__name__ for layer in architecture) + "]"


class _Aux:
    """A non-tensor value of the traced network (a size, a shape)."""


def _has_weights(layer: Layer) -> bool:
    return isinstance(layer, (Linear, Conv, RNN, GRU, LSTM))


# -- public API ------------------------------------------------------------------------------------


def from_module(
    module: nn.Module,
    input_shape: int | tuple[int, ...] | None = None,
    *,
    init: str = "pytorch",
    weight_variance: float | None = None,
    bias_variance: float | None = None,
    input_variance: float | None = None,
    sequence: bool | None = None,
) -> Sequential:
    r"""The infinite-width architecture of a ``torch.nn`` network.

    Converts ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (no dilation or groups;
    padding ``valid``, or ``same`` as :class:`~gpytorch_tp.layers.Conv`
    places it), ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.GELU``, ``nn.Tanh``,
    ``nn.Sigmoid``, ``nn.SiLU``, ``nn.Softplus`` and their functional forms
    (plus ``torch.erf``, ``sin``, ``cos``, ``abs``), ``nn.LayerNorm`` over the
    features, ``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d``, ``x.mean``
    over the grid or over time, ``nn.Flatten`` and flattening reshapes,
    ``nn.RNN(batch_first=True)`` followed by ``output[:, -1]``, ``h_n[-1]`` or
    ``output.mean(1)``, ``nn.GRU``/``nn.LSTM(batch_first=True)`` (not
    bidirectional, no ``proj_size``) with the same readouts, residual sums ``x + f(x)`` and ``g(x) + f(x)``, and
    ``nn.Identity``/``nn.Dropout`` (the network in eval mode).  Anything else
    raises :class:`UnsupportedModuleError`, ``nn.BatchNorm1d`` too (its network is
    converted by :func:`kernel_from_module` with ``reference_points``).

    Widths are ignored.  The variances (per fan-in for weights) are, for every
    layer: ``weight_variance`` / ``bias_variance`` / ``input_variance`` (RNN input
    weights) when given; otherwise from ``init``:

    * ``"pytorch"`` (default): PyTorch's default initialisation, exactly, at
      infinite width: ``kaiming_uniform_(a=sqrt(5))`` weights have variance
      :math:`1/(3\,\text{fan\_in})`, i.e. :math:`\sigma_w^2 = 1/3`; biases
      :math:`U(\pm 1/\sqrt{\text{fan\_in}})` have variance
      :math:`1/(3\,\text{fan\_in})`, which stays for layers reading the network
      input (fan-in :math:`d`) and vanishes for the others.  ``nn.RNN`` draws
      all its tensors with variance :math:`1/(3 H)` (:math:`H` hidden units):
      recurrent :math:`\sigma_w^2 = 1/3`, biases vanish, and the input weights of
      the first layer (variance :math:`d / (3H)` per fan-in :math:`d`) vanish
      too, which raises (pass ``input_variance`` or use ``"measured"``); the
      same for every gate of ``nn.GRU``/``nn.LSTM``.  A
      warning tells when the weights exceed the default scheme's bound (a
      re-initialised or trained module).
    * ``"measured"``: the second moments of the module's current parameters
      (fan-in times the mean square of each weight tensor, the mean square of
      each bias), i.e. the kernel of a network initialised like this one,
      whatever its scheme, at this module's width ratios; the estimate is as
      noisy as the module is small.

    The NTK of the result is that of the network in the NTK parameterisation,
    :math:`W = \sigma_w \omega / \sqrt{\text{fan\_in}}` with :math:`\omega`
    trained: for the module as written (standard parameterisation) that is the
    tangent kernel of gradient descent with a learning rate per tensor
    proportional to its initial variance (:func:`ntk_parameter_scales`).  The
    NNGP kernel is the same in both parameterisations.

    :param module: the network, mapping ``(N, *input_shape)`` to ``(N, m)``.
    :param input_shape: shape of one item: ``(d,)``, ``(C, L)``, ``(C, H, W)``,
        or ``(T, d)`` for sequences (``None``: ``(in_features,)`` of a first nn.Linear).
    :param init: ``"pytorch"`` or ``"measured"`` (see above).
    :param weight_variance: :math:`\sigma_w^2` of every weight layer (and of recurrent weights).
    :param bias_variance: :math:`\sigma_b^2` of every layer (an RNN's two biases together; for
        ``nn.GRU``/``nn.LSTM`` that of every gate pre-activation, see ``docs/from_module.md``).
    :param input_variance: :math:`\sigma_u^2` of every RNN's input weights.
    :param sequence: the input is a sequence ``(T, d)`` (``None``: when the network has a recurrent layer).
    :return: the architecture, for :class:`~gpytorch_tp.TensorProgramKernel`
        (see :func:`kernel_from_module`).

    Example:
        >>> from torch import nn
        >>> from gpytorch_tp.conversion import from_module
        >>> net = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 1))
        >>> arch = from_module(net)  # Linear(1/3, 1/9), ReLU, Linear(1/3, 0)
    """
    return _convert(module, input_shape, init, weight_variance, bias_variance, input_variance, sequence).architecture


def kernel_from_module(
    module: nn.Module,
    kind: str = "nngp",
    input_shape: int | tuple[int, ...] | None = None,
    *,
    init: str = "pytorch",
    weight_variance: float | None = None,
    bias_variance: float | None = None,
    input_variance: float | None = None,
    sequence: bool | None = None,
    reference_points: Tensor | None = None,
    **kernel_kwargs,
) -> TensorProgramKernel | BatchNormMLPKernel:
    r"""The :class:`~gpytorch_tp.TensorProgramKernel` of :func:`from_module`'s architecture.

    The kernel takes the module's items flattened, ``(N, prod(input_shape))``
    (for sequences: batch-first ``(N, T, d)`` reshaped to ``(N, T * d)``).
    ``kernel_kwargs`` go to :class:`~gpytorch_tp.TensorProgramKernel`.

    **BatchNorm networks.**  With ``reference_points`` :math:`R` (``(m, d)``), a
    network ``Linear -> BatchNorm1d -> ReLU`` (``depth`` times) ``-> Linear``
    (BatchNorm in training mode, with or without affine parameters, any ``eps``;
    functional ReLUs, ``nn.Identity`` and ``nn.Dropout`` may sit in between) gives
    the :class:`~gpytorch_tp.BatchNormMLPKernel` of that depth: the kernel of the
    module run, in training mode, on the batch :math:`[x; r_1; \dots; r_m]` and
    read at :math:`x`.  Its dense layers' variances come from the arguments or
    ``init`` as above (a BatchNorm gain :math:`\gamma` multiplies the next
    layer's :math:`\sigma_w^2` by the mean of :math:`\gamma^2`: 1 under
    PyTorch's initialisation; ``init="measured"`` needs a zero shift), its
    ``eps`` is the module's, and ``kernel_kwargs`` (``accuracy``, priors) go to
    :class:`~gpytorch_tp.BatchNormMLPKernel`.  The NTK is that of training with
    the BatchNorm gain and shift frozen (:func:`ntk_parameter_scales` gives them
    factor 0).  Any other BatchNorm network (BatchNorm before another
    nonlinearity, a residual, BatchNorm in eval mode, ``nn.BatchNorm2d``) raises
    :class:`UnsupportedModuleError`; without ``reference_points`` every BatchNorm
    network does.  See ``docs/from_module.md``.

    :param reference_points: the reference set :math:`R` of a BatchNorm network (``None``: no BatchNorm).
    """
    from ..kernels import TensorProgramKernel

    if reference_points is not None:
        return _batchnorm_kernel(
            module, kind, input_shape, init, weight_variance, bias_variance, reference_points, kernel_kwargs
        )
    result = _convert(module, input_shape, init, weight_variance, bias_variance, input_variance, sequence)
    shape = result.input_shape
    return TensorProgramKernel(
        result.architecture,
        kind,
        input_shape=shape if len(shape) > 1 else None,
        input_dim=math.prod(shape),
        sequence=result.sequence,
        **kernel_kwargs,
    )


def _batchnorm_kernel(
    module: nn.Module,
    kind: str,
    input_shape,
    init: str,
    weight_variance: float | None,
    bias_variance: float | None,
    reference_points: Tensor,
    kernel_kwargs: dict,
) -> BatchNormMLPKernel:
    """``kernel_from_module`` of a ``Linear -> BatchNorm1d -> ReLU`` MLP: its :class:`~gpytorch_tp.BatchNormMLPKernel`."""
    from ..kernels import BatchNormMLPKernel

    if not torch.is_tensor(reference_points) or reference_points.dim() != 2:
        raise ValueError(
            "reference_points must be an (m, d) tensor: the points every input is normalised with, "
            f"got {reference_points if not torch.is_tensor(reference_points) else tuple(reference_points.shape)}"
        )
    if "eps" in kernel_kwargs:
        raise ValueError("eps is the BatchNorm1d layers' own (module.eps); it is not a kernel argument here")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise ValueError("reference_points is for networks with nn.BatchNorm1d; this module has none")
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0 and sub.training:
            raise UnsupportedModuleError(
                f"{type(sub).__name__} {name!r} (p={sub.p:g})",
                "BatchNormMLPKernel is the kernel of the network in training mode (batch statistics), where "
                "dropout is active; use p=0",
            )
    result = _convert(
        module, input_shape, init, weight_variance, bias_variance, None, False, check=False, batchnorm=True
    )
    if len(result.input_shape) != 1 or reference_points.shape[-1] != result.input_shape[0]:
        raise ValueError(
            f"reference_points has {reference_points.shape[-1]} features but the network takes items of shape "
            f"{result.input_shape}; BatchNormMLPKernel takes feature vectors (d,)"
        )
    layers = list(result.architecture.double())  # .double() restores the exact variances (Layer._apply)

    def origin(layer: Layer) -> str:
        return result.origins.get(id(layer), type(layer).__name__)

    def refuse(what: str, found: str) -> UnsupportedModuleError:
        return UnsupportedModuleError(
            what,
            f"BatchNormMLPKernel models Linear -> BatchNorm1d -> ReLU blocks and a Linear readout, and {found}",
        )

    if not layers or not isinstance(layers[0], Linear):
        found = origin(layers[0]) if layers else "nothing"
        raise refuse(f"{type(module).__name__} (a BatchNorm network)", f"the network starts with {found}")
    weights, biases = [float(layers[0].weight_variance.detach())], [float(layers[0].bias_variance.detach())]
    markers = []
    position = 1
    while position < len(layers):
        marker = layers[position]
        if not isinstance(marker, _BatchNormMarker):
            previous = origin(layers[position - 1])
            raise refuse(origin(marker), f"it follows {previous} where a BatchNorm1d belongs")
        after = layers[position + 1 : position + 3]
        if len(after) < 1 or not isinstance(after[0], ReLU):
            found = origin(after[0]) if after else "the network output"
            raise refuse(marker.what, f"it is followed by {found}, not by a ReLU")
        if len(after) < 2 or not isinstance(after[1], Linear):
            found = origin(after[1]) if len(after) > 1 else "the network output"
            raise refuse(origin(after[0]), f"it is followed by {found}, not by a Linear layer")
        markers.append(marker)
        weights.append(float(after[1].weight_variance.detach()) * marker.gain)
        biases.append(float(after[1].bias_variance.detach()))
        position += 3
    if not markers:  # a BatchNorm inside a residual branch, or not called in forward
        raise refuse(
            f"{type(module).__name__} (as the architecture {_summary(result.architecture)})", "it has no such block"
        )
    if len({marker.eps for marker in markers}) != 1:
        raise UnsupportedModuleError(
            ", ".join(marker.what for marker in markers),
            f"their eps differ ({', '.join(f'{m.eps:g}' for m in markers)}), and BatchNormMLPKernel has one eps",
        )
    return BatchNormMLPKernel(
        reference_points,
        len(markers),
        weight_variance=weights,
        bias_variance=biases,
        eps=markers[0].eps,
        kind=kind,
        **kernel_kwargs,
    )


def ntk_parameter_scales(
    module: nn.Module,
    input_shape: int | tuple[int, ...] | None = None,
    *,
    init: str = "pytorch",
    weight_variance: float | None = None,
    bias_variance: float | None = None,
    input_variance: float | None = None,
    sequence: bool | None = None,
) -> dict[str, float]:
    r"""Per-parameter factors that make ``module``'s tangent kernel the NTK of :func:`from_module`.

    For a weight tensor with variance :math:`\sigma_w^2 / \text{fan\_in}` (as
    :func:`from_module` reads it) the factor is that variance, for a bias its
    variance, for LayerNorm's gain and bias 1: with
    :math:`W = \sqrt{s}\,\omega`, :math:`\langle \nabla_\omega f, \nabla_\omega f' \rangle
    = \sum_p s_p \langle \partial_{W_p} f, \partial_{W_p} f' \rangle`.  Pass the
    result (or ``lambda net: ntk_parameter_scales(net, ...)``) as
    ``MonteCarloKernel(parameter_scales=...)``.  Gradient descent on the module
    as written with these per-tensor learning-rate factors follows the NTK.
    """
    return _convert(
        module, input_shape, init, weight_variance, bias_variance, input_variance, sequence, check=False, batchnorm=True
    ).scales
