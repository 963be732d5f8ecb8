"""What a converter sees: the traced values (:class:`Value`) and the :class:`ConversionContext`.

The context also holds the variance rules of the conversion: :meth:`ConversionContext.weight_moment`
and :meth:`ConversionContext.bias_moment` read a weight's or bias's variance from the explicit
arguments, PyTorch's default initialisation or the module's measured parameters (:data:`INITS`),
and record the per-parameter NTK factors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..layers import Layer

__all__ = ["INITS", "ConversionContext", "Value"]

INITS = ("pytorch", "measured")

# Layouts of a tensor of the traced network, and how they map onto a kernel state:
#   "features": (N, F)             -> no positions
#   "grid":     (N, C, *grid)      -> positions grid (channel-major, as convolutions take it)
#   "sequence": (N, T, C)          -> positions (T,) (batch-first, as nn.RNN(batch_first=True) gives it)
#   "pooled":   (N, C, 1, ..., 1)  -> no positions (after global average pooling with kept axes)
#   "rnn":      the (output, h_n) tuple of an nn.RNN/GRU/LSTM;  "final": its h_n, (layers * directions, N, H)
#   "lstm_state": an nn.LSTM's (h_n, c_n);  "cell_state": its c_n (unsupported: an error where used)


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
    #: per-parameter NTK learning-rate factors, filled in by converters (see ``ntk_parameter_scales``)
    scales: dict[str, float]
    #: BatchNorm layers are accepted (``kernel_from_module(..., reference_points=...)``)
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
