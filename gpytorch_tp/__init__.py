"""Exact infinite-width NNGP and NTK kernels of neural networks, as GPyTorch kernels.

Layout: :mod:`gpytorch_tp.state` (the kernel state) -> :mod:`gpytorch_tp.layers`
(maps of states; :mod:`gpytorch_tp.programs`, a traced network's master theorem as one
layer) -> :mod:`gpytorch_tp.evaluation` (inputs, tiles, memory, matrix-free operators)
-> :mod:`gpytorch_tp.kernels` (GPyTorch kernels), with :mod:`gpytorch_tp.finite` and
:mod:`gpytorch_tp.empirical` for the finite-width networks the kernels are the limits
of, :mod:`gpytorch_tp.dynamics` for the Gaussian process of a wide network during
gradient-descent training, :mod:`gpytorch_tp.conversion` for the kernels of
``torch.nn`` modules and :mod:`gpytorch_tp.distributed` for kernel matrices computed by
the ranks of a ``torch.distributed`` process group.  ``tests/test_architecture.py``
keeps the imports going down these floors.
"""

from . import layers
from .botorch_recipe import bo_covar_module, bo_input_transform, bo_recipe
from .conversion import from_module, kernel_from_module
from .dynamics import TrainedNetworkGP
from .evaluation import evaluate
from .kernels import (
    BatchNormMLPKernel,
    CNNKernel,
    GRUKernel,
    LSTMKernel,
    MLPKernel,
    MonteCarloKernel,
    MyrtleKernel,
    RNNKernel,
    TensorProgramKernel,
    TransformerKernel,
)
from .state import KernelState

__version__ = "0.1.0"

__all__ = [
    "BatchNormMLPKernel",
    "CNNKernel",
    "GRUKernel",
    "KernelState",
    "LSTMKernel",
    "MLPKernel",
    "MonteCarloKernel",
    "MyrtleKernel",
    "RNNKernel",
    "TensorProgramKernel",
    "TrainedNetworkGP",
    "TransformerKernel",
    "__version__",
    "bo_covar_module",
    "bo_input_transform",
    "bo_recipe",
    "evaluate",
    "from_module",
    "kernel_from_module",
    "layers",
]
