"""Layers of infinitely wide networks: each maps a :class:`~gpytorch_tp.state.KernelState` to another.

The nonlinearities are the names of :mod:`gpytorch_tp.layers.elementwise` and of
:mod:`~gpytorch_tp.layers.nonlinearity_registry` (their ``__all__``), so a new one
needs no line here.
"""

from . import elementwise, nonlinearity_registry
from .attention import SelfAttention
from .base import Layer
from .combinators import Residual, Sequential
from .convolution import AvgPool1d, AvgPool2d, Conv, Conv1d, Conv2d
from .dense import Linear
from .elementwise import *  # noqa: F403 (the names of elementwise.__all__, listed below)
from .gated import GRU, LSTM
from .nonlinearity_registry import *  # noqa: F403
from .normalization import LayerNorm
from .positional import PositionalEmbedding
from .readouts import FirstStep, Flatten, GlobalAvgPool, LastStep, TimeMean
from .recurrent import RNN

__all__ = sorted(
    [
        "GRU",
        "LSTM",
        "RNN",
        "AvgPool1d",
        "AvgPool2d",
        "Conv",
        "Conv1d",
        "Conv2d",
        "FirstStep",
        "Flatten",
        "GlobalAvgPool",
        "LastStep",
        "Layer",
        "LayerNorm",
        "Linear",
        "PositionalEmbedding",
        "Residual",
        "SelfAttention",
        "Sequential",
        "TimeMean",
        *elementwise.__all__,
        *nonlinearity_registry.__all__,
    ]
)
