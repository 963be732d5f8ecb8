"""Exact infinite-width NNGP and NTK kernels of neural networks, as GPyTorch kernels.

Layout: :mod:`gpytorch_tp.state` (the kernel state) -> :mod:`gpytorch_tp.layers`
(maps of states) -> :mod:`gpytorch_tp.kernels` (GPyTorch kernels), with
:mod:`gpytorch_tp.finite` and :mod:`gpytorch_tp.empirical` for the finite-width
networks the kernels are the limits of, and :mod:`gpytorch_tp.dynamics` for the
Gaussian process of a wide network during gradient-descent training.
"""

from . import layers
from .dynamics import TrainedNetworkGP
from .evaluation import evaluate
from .kernels import CNNKernel, GRUKernel, LSTMKernel, MLPKernel, MyrtleKernel, RNNKernel, TensorProgramKernel
from .state import KernelState

__version__ = "0.1.0"

__all__ = [
    "CNNKernel",
    "GRUKernel",
    "KernelState",
    "LSTMKernel",
    "MLPKernel",
    "MyrtleKernel",
    "RNNKernel",
    "TensorProgramKernel",
    "TrainedNetworkGP",
    "__version__",
    "evaluate",
    "layers",
]
