"""Evaluating an architecture's kernels on inputs: the floor between the layers and the GPyTorch kernels.

* :mod:`.layout`: input checks, how an item's features are laid out, the input state;
* :mod:`.options`: :class:`EvaluationOptions`, what a kernel passes to every evaluation;
* :mod:`.plan`: tile planning within a memory budget;
* :mod:`.run`: :func:`evaluate`, in one piece or in tiles;
* :mod:`.workers`: worker threads and the progress bar;
* :mod:`.resources` and :mod:`.host_memory`: free memory, caches, resident memory;
* :mod:`.matrix_free`: :class:`TiledKernelOperator`, products with a kernel matrix never held.
"""

from .layout import InputLayout, check_inputs, input_layout, input_state
from .matrix_free import BlockCovariance, TiledKernelOperator, dense_memory, matrix_free_block_sizes
from .options import EvaluationOptions
from .plan import DEFAULT_CUDA_TILE_PAIRS, DEFAULT_TILE_PAIRS, MemoryBudgetWarning
from .resources import default_memory_budget
from .run import evaluate, records_grad, same_inputs

__all__ = [
    "BlockCovariance",
    "DEFAULT_CUDA_TILE_PAIRS",
    "DEFAULT_TILE_PAIRS",
    "EvaluationOptions",
    "InputLayout",
    "MemoryBudgetWarning",
    "TiledKernelOperator",
    "check_inputs",
    "default_memory_budget",
    "dense_memory",
    "evaluate",
    "input_layout",
    "input_state",
    "matrix_free_block_sizes",
    "records_grad",
    "same_inputs",
]
