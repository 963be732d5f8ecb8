"""What the preset kernels share: the checks of their arguments and the pieces of network they all build.

Each preset (:class:`~gpytorch_tp.MLPKernel`, :class:`~gpytorch_tp.CNNKernel`,
:class:`~gpytorch_tp.RNNKernel`, the gated recurrent kernels,
:class:`~gpytorch_tp.TransformerKernel`, :class:`~gpytorch_tp.BatchNormMLPKernel`)
checks its arguments before building anything, so that bad input gets one
clear message, the same from every preset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..layers import LastStep, Layer, Linear, TimeMean, nonlinearity_from_name
from ..layers.elementwise import variance_preserving_weight_variance

__all__ = [
    "check_choice",
    "check_depth",
    "check_sequence_shape",
    "hyperparameter_batch_shape",
    "nonlinearity_and_weight_variance",
    "recurrent_readout",
]


def check_depth(depth: int, minimum: int = 1, counts: str = "") -> None:
    """``depth`` is an integer (not a bool) of at least ``minimum`` (0 or 1); ``counts`` names what it counts."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < minimum:
        sign = "positive" if minimum >= 1 else "non-negative"
        what = f" ({counts})" if counts else ""
        raise ValueError(f"depth must be a {sign} integer{what}, got {depth!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """``value`` of the option ``name`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_sequence_shape(kernel_name: str, input_shape: Sequence[int] | None) -> tuple[int, int]:
    """``(T, d)`` of a sequence kernel, as a tuple."""
    if input_shape is None or len(tuple(input_shape)) != 2:
        raise ValueError(f"{kernel_name} needs input_shape=(T, d), got {input_shape}")
    return tuple(input_shape)


def hyperparameter_batch_shape(kernel_kwargs: Mapping) -> torch.Size:
    """The ``batch_shape`` a preset's layers get: the one given to the kernel (default none)."""
    return torch.Size(kernel_kwargs.get("batch_shape") or [])


def nonlinearity_and_weight_variance(
    nonlinearity: str | Layer, nonlinearity_kwargs: dict | None, weight_variance: float | None
) -> tuple[Layer, float]:
    """The nonlinearity (a name or a layer) and the weight variance, by default the one that preserves its scale."""
    template = nonlinearity_from_name(nonlinearity, **(nonlinearity_kwargs or {}))
    if weight_variance is None:
        weight_variance = variance_preserving_weight_variance(template)
    return template, weight_variance


def recurrent_readout(
    readout: str, readout_variance: float, bias_variance: float, batch_shape: torch.Size
) -> list[Layer]:
    """The end of a recurrent preset: the readout over time (``"last"`` or ``"mean"``) and the dense output layer."""
    return [
        LastStep() if readout == "last" else TimeMean(),
        Linear(readout_variance, bias_variance, batch_shape=batch_shape),
    ]
