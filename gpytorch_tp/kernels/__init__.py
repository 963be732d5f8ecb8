"""GPyTorch kernels: :class:`TensorProgramKernel` and presets."""

from .cnn_kernel import CNNKernel, MyrtleKernel
from .mlp_kernel import MLPKernel
from .monte_carlo_kernel import MonteCarloKernel
from .rnn_kernel import RNNKernel
from .tensor_program_kernel import KINDS, TensorProgramKernel

__all__ = ["KINDS", "CNNKernel", "MLPKernel", "MonteCarloKernel", "MyrtleKernel", "RNNKernel", "TensorProgramKernel"]
