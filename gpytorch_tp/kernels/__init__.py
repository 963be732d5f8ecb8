"""GPyTorch kernels: :class:`TensorProgramKernel` and presets."""

from .mlp_kernel import MLPKernel
from .tensor_program_kernel import KINDS, TensorProgramKernel

__all__ = ["KINDS", "MLPKernel", "TensorProgramKernel"]
