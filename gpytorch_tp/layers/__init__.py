"""Layers of infinitely wide networks: each maps a :class:`~gpytorch_tp.state.KernelState` to another."""

from .base import Layer
from .combinators import Residual, Sequential
from .dense import Linear
from .elementwise import (
    GELU,
    NONLINEARITIES,
    Abs,
    Cos,
    Elementwise,
    Erf,
    Identity,
    LeakyReLU,
    Nonlinearity,
    ReLU,
    Sigmoid,
    SiLU,
    Sign,
    Sin,
    Softplus,
    Step,
    Tanh,
    nonlinearity_from_name,
)
from .normalization import LayerNorm

__all__ = [
    "Layer",
    "Sequential",
    "Residual",
    "Linear",
    "LayerNorm",
    "Nonlinearity",
    "ReLU",
    "LeakyReLU",
    "Abs",
    "Step",
    "Sign",
    "Erf",
    "GELU",
    "Sin",
    "Cos",
    "Identity",
    "Elementwise",
    "Tanh",
    "Sigmoid",
    "SiLU",
    "Softplus",
    "NONLINEARITIES",
    "nonlinearity_from_name",
]
