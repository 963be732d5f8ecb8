"""Converters of ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` (batch-first) into the recurrent layers.

Each registers itself in :data:`~gpytorch_tp.conversion.registry.CONVERTERS` when this module is imported.
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import UnsupportedModuleError
from ..layers import GRU, LSTM, RNN, Layer
from .context import ConversionContext
from .registry import register_converter, require_layout

__all__: list[str] = []


def _check_recurrent(module: nn.Module, context: ConversionContext) -> None:
    require_layout(module, context, ("sequence",), "it needs sequences (N, T, d)")
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
