"""GPyTorch kernels: :class:`TensorProgramKernel` and presets."""

from .batchnorm_kernel import BatchNormMLPKernel
from .cnn_kernel import CNNKernel, MyrtleKernel
from .gru_kernel import GRUKernel
from .lstm_kernel import LSTMKernel
from .mlp_kernel import MLPKernel
from .monte_carlo_kernel import MonteCarloKernel
from .rnn_kernel import RNNKernel
from .tensor_program_kernel import KINDS, TensorProgramKernel
from .transformer_kernel import TransformerKernel

__all__ = [
    "KINDS",
    "BatchNormMLPKernel",
    "CNNKernel",
    "GRUKernel",
    "LSTMKernel",
    "MLPKernel",
    "MonteCarloKernel",
    "MyrtleKernel",
    "RNNKernel",
    "TensorProgramKernel",
    "TransformerKernel",
]
