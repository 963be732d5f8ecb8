"""Layers of infinitely wide networks: each maps a :class:`~gpytorch_tp.state.KernelState` to another."""

from .attention import SelfAttention
from .base import Layer
from .combinators import Residual, Sequential
from .convolution import AvgPool1d, AvgPool2d, Conv, Conv1d, Conv2d
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
    Sign,
    SiLU,
    Sin,
    Softplus,
    Step,
    Tanh,
    nonlinearity_from_name,
)
from .gated import GRU, LSTM
from .normalization import LayerNorm
from .positional import PositionalEmbedding
from .readouts import FirstStep, Flatten, GlobalAvgPool, LastStep, TimeMean
from .recurrent import RNN

__all__ = [
    "GELU",
    "GRU",
    "LSTM",
    "NONLINEARITIES",
    "RNN",
    "Abs",
    "AvgPool1d",
    "AvgPool2d",
    "Conv",
    "Conv1d",
    "Conv2d",
    "Cos",
    "Elementwise",
    "Erf",
    "FirstStep",
    "Flatten",
    "GlobalAvgPool",
    "Identity",
    "LastStep",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "Nonlinearity",
    "PositionalEmbedding",
    "ReLU",
    "Residual",
    "SelfAttention",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Sign",
    "Sin",
    "Softplus",
    "Step",
    "Tanh",
    "TimeMean",
    "nonlinearity_from_name",
]
