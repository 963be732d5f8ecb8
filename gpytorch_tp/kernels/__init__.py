"""GPyTorch kernels: :class:`TensorProgramKernel` and presets."""

from .cnn_kernel import CNNKernel, MyrtleKernel
from .gru_kernel import GRUKernel
from .lstm_kernel import LSTMKernel
from .mlp_kernel import MLPKernel
from .rnn_kernel import RNNKernel
from .tensor_program_kernel import KINDS, TensorProgramKernel

__all__ = [
    "KINDS",
    "CNNKernel",
    "GRUKernel",
    "LSTMKernel",
    "MLPKernel",
    "MyrtleKernel",
    "RNNKernel",
    "TensorProgramKernel",
]
