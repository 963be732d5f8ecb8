"""Matrix-free kernel matrices: products with vectors computed block by block, never holding N x N.

GPyTorch only needs products ``K @ v`` (and their derivatives) to train and
predict with conjugate gradients and Lanczos (``gpytorch.settings.max_cholesky_size``
below N).  :class:`TiledKernelOperator` is a ``LinearOperator`` that computes
those products from blocks of the kernel matrix it recomputes every time, so an
exact GP on N points needs O(N) memory (plus one block) instead of O(N^2), and
training, which keeps every tile's intermediates for the backward pass on the
dense path, needs no more than prediction.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator
from linear_operator.utils.getitem import _noop_index
from torch import Tensor

from .. import fusion
from .options import EvaluationOptions
from .plan import LIVE_TILE_TENSORS
from .resources import default_memory_budget
from .workers import intra_op_threads, map_tiles, tile_workers

__all__ = ["BlockCovariance", "TiledKernelOperator", "dense_memory", "matrix_free_block_sizes"]

# Largest blocks (items per side).  A block is evaluated in tiles on worker
# threads (see ``gpytorch_tp.evaluate``); bigger blocks only cost memory.  With
# autograd recording every tile's intermediates are kept until the block's
# gradient is taken, hence the smaller block.
_MAX_BLOCK = {"cpu": 4096, "cuda": 16384}
_MAX_GRAD_BLOCK = {"cpu": 1024, "cuda": 4096}


@dataclass(frozen=True)
class BlockCovariance:
    """What a matrix-free operator needs of a kernel: its covariance of two blocks of inputs, and its options.

    :param function: ``function(x1, x2, diag=False)``, the dense covariance
        matrix (or diagonal) of two blocks of inputs.
    :param owner: the module whose ``named_parameters()`` the operator's
        parameter tensors are, in that order (they are substituted for them).
    :param options: the kernel's evaluation options (memory budget, progress, fusion).
    :param pair_elements: numbers stored per pair of items (position pairs of grids count).
    :param batch_shape: the batch shape of the hyperparameters.
    """

    function: Callable[..., Tensor]
    owner: torch.nn.Module
    options: EvaluationOptions
    pair_elements: int
    batch_shape: torch.Size

    def memory_budget(self, device: torch.device) -> int:
        return self.options.memory_budget or default_memory_budget(device)


def dense_memory(covariance: BlockCovariance, x1: Tensor, x2: Tensor, records_grad: bool) -> int:
    """Bytes a dense evaluation of the covariance of ``x1`` and ``x2`` takes.

    With ``records_grad``, every tile's intermediates count (they are kept for the backward pass).
    """
    batch = math.prod(torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], covariance.batch_shape))
    pairs = batch * x1.shape[-2] * x2.shape[-2]
    per_pair = covariance.pair_elements * x1.element_size() * (LIVE_TILE_TENSORS if records_grad else 1)
    return pairs * per_pair


def matrix_free_block_sizes(covariance: BlockCovariance, x: Tensor, budget: int | None = None) -> tuple[int, int]:
    """Items per block side for products (no autograd) and for their gradients, within ``budget`` bytes."""
    if budget is None:
        budget = covariance.memory_budget(x.device)
    device = "cuda" if x.device.type == "cuda" else "cpu"
    batch = math.prod(torch.broadcast_shapes(x.shape[:-2], covariance.batch_shape))
    pair_bytes = batch * covariance.pair_elements * x.element_size()
    # A product block holds the block and its product; the tiles inside take the rest of the budget.
    plain = int(math.sqrt(budget / 4 / (2 * pair_bytes)))
    grad = int(math.sqrt(budget / 2 / (LIVE_TILE_TENSORS * pair_bytes)))
    return max(1, min(plain, _MAX_BLOCK[device])), max(1, min(grad, _MAX_GRAD_BLOCK[device]))


class _CallWithParameters(torch.nn.Module):
    """Runs a function inside ``torch.func.functional_call``, i.e. with the owner's parameters substituted."""

    def __init__(self, owner: torch.nn.Module):
        super().__init__()
        self.owner = owner

    def forward(self, fn):
        return fn()


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class TiledKernelOperator(LinearOperator):
    r"""The kernel matrix :math:`K(X_1, X_2)` of a :class:`~gpytorch_tp.TensorProgramKernel`, matrix free.

    Products are computed block by block; a block of the matrix is recomputed
    each time it is needed and dropped after use:

    .. math::

        (K V)_{I} = \sum_J K(X_{1,I}, X_{2,J})\, V_J, \qquad
        \frac{\partial\, \operatorname{tr}(U^\top K V)}{\partial \theta}
            = \sum_{I, J} \frac{\partial\, \operatorname{tr}(U_I^\top K(X_{1,I}, X_{2,J}) V_J)}{\partial \theta},

    the second one by autograd through one block at a time, for the
    hyperparameters :math:`\theta` and the inputs.  When :math:`X_1` and
    :math:`X_2` are the same points (``same``) only blocks on and above the
    diagonal are computed, each used for itself and its mirror image.

    The hyperparameter tensors are the operator's arguments (so that
    ``linear_operator`` routes their gradients through it); the kernel is
    evaluated with them substituted for its parameters (``torch.func.functional_call``).

    Memory and time: when the matrix itself fits in half of the kernel's
    ``memory_budget`` it is computed once, without autograd, on the first
    product and held for the next ones (the dense path would also keep every
    tile's intermediates for the backward pass, about 24 times the matrix);
    the gradient still recomputes it block by block.  A training step of
    conjugate gradients then costs one kernel evaluation plus one with
    autograd, whatever the number of iterations.  Otherwise nothing of size
    N1 x N2 is ever held: each product recomputes the blocks (one block,
    sized by :func:`matrix_free_block_sizes`, plus O(N) vectors in memory)
    and costs a full kernel evaluation (half of one when ``same``), so a
    training step with ``k`` CG iterations costs about ``k + 1`` evaluations.

    :param x1: inputs ``(..., N1, d)``.
    :param x2: inputs ``(..., N2, d)``.
    :param params: the covariance's parameters, in the order of ``covariance.owner.named_parameters()``.
    :param covariance: the covariance of blocks and the options (:class:`BlockCovariance`).
    :param same: ``x1`` and ``x2`` hold the same points.

    Example:
        >>> import torch
        >>> from gpytorch_tp import MLPKernel
        >>> kernel = MLPKernel(depth=2, matrix_free=True)
        >>> x = torch.randn(50, 3, dtype=torch.float64)
        >>> K = kernel(x).evaluate_kernel()
        >>> type(K).__name__
        'TiledKernelOperator'
        >>> torch.allclose(K @ torch.ones(50, 1, dtype=torch.float64), kernel(x).to_dense().sum(-1, keepdim=True))
        True
    """

    def __init__(
        self, x1: Tensor, x2: Tensor, *params: Tensor, covariance: BlockCovariance, same: bool = False, **options
    ):
        # ``options``: a subclass's own keyword arguments (a process group, ...), kept by
        # ``LinearOperator`` so that the operators it rebuilds from their representation have them.
        super().__init__(x1, x2, *params, covariance=covariance, same=same, **options)
        self.x1, self.x2, self.params = x1, x2, params
        self.covariance = covariance
        self.same = bool(same)

    # -- evaluation with substituted parameters -------------------------------------------------

    def _with_parameters(self, params, fn):
        """``fn()`` with ``params`` in place of the owner's parameters (substituted once, for all threads)."""
        names = [f"owner.{name}" for name, _ in self.covariance.owner.named_parameters()]
        if len(names) != len(params):
            raise RuntimeError(
                f"the kernel has {len(names)} parameters but the operator holds {len(params)}; "
                "parameters were added to the kernel after the operator was built"
            )
        return torch.func.functional_call(
            _CallWithParameters(self.covariance.owner), dict(zip(names, params)), (fn,), strict=False
        )

    def _evaluate(self, x1: Tensor, x2: Tensor, params=None, diag: bool = False) -> Tensor:
        params = self.params if params is None else params
        return self._with_parameters(params, lambda: self.covariance.function(x1, x2, diag=diag))

    def _block_sizes(self) -> tuple[int, int]:
        return matrix_free_block_sizes(self.covariance, self.x1)

    def _pairs_of_blocks(self, size: int) -> list[tuple[slice, slice]]:
        rows = _blocks(self.x1.shape[-2], size)
        cols = rows if self.same else _blocks(self.x2.shape[-2], size)
        return [(r, c) for i, r in enumerate(rows) for j, c in enumerate(cols) if not (self.same and j < i)]

    def _held_matrix(self) -> Tensor | None:
        """The whole matrix (no autograd) when it fits in half the memory budget, computed once; else ``None``."""
        held = getattr(self, "_held", None)
        if held is None:
            budget = self.covariance.memory_budget(self.x1.device)
            if self.shape.numel() * self.x1.element_size() > budget / 2:
                self._held = False
                return None
            with torch.no_grad():
                held = self._held = self._evaluate(self.x1, self.x2).expand(self.shape)
        return held if held is not False else None

    # -- the seams of a subclass that shares the blocks out (gpytorch_tp.distributed.ShardedKernelOperator) --

    def _product_pairs(self) -> list[tuple[slice, slice]]:
        """The pairs of blocks a product evaluates (here all of them, on and above the diagonal when ``same``)."""
        return self._pairs_of_blocks(self._block_sizes()[0])

    def _gradient_pairs(self) -> list[tuple[slice, slice]]:
        """The pairs of blocks a bilinear form's gradient evaluates (smaller blocks: autograd keeps their graph)."""
        return self._pairs_of_blocks(self._block_sizes()[1])

    def _product_blocks(self):
        """``(rows, cols, block)`` for each pair of :meth:`_product_pairs`, evaluated one at a time."""
        for rows, cols in self._product_pairs():
            yield rows, cols, self._evaluate(self.x1[..., rows, :], self.x2[..., cols, :])

    def _combine(self, partial: Tensor, step: str) -> Tensor:
        """The whole result from this operator's part of it (here the part is the whole)."""
        return partial

    def _combine_gradients(self, totals: list[Tensor | None], leaves: list[Tensor], wanted: list[int]) -> list:
        """The whole gradients from this operator's part of them (here the part is the whole)."""
        return totals

    def _like(self, x1: Tensor, x2: Tensor, same: bool) -> TiledKernelOperator:
        """An operator of this kind, covariance and parameters on other inputs."""
        return TiledKernelOperator(x1, x2, *self.params, covariance=self.covariance, same=same)

    # -- products and gradients ------------------------------------------------------------------

    def _product(self, rhs: Tensor) -> Tensor:
        """``K @ rhs`` without autograd: from the held matrix, or block by block."""
        held = self._held_matrix()
        if held is not None:
            return held @ rhs
        n1 = self.x1.shape[-2]
        batch = torch.broadcast_shapes(self.batch_shape, rhs.shape[:-2])
        out = None
        with torch.no_grad():
            for rows, cols, block in self._product_blocks():
                part = block @ rhs[..., cols, :]
                if out is None:
                    out = part.new_zeros(*batch, n1, rhs.shape[-1])
                out[..., rows, :] += part
                if self.same and rows != cols:
                    out[..., cols, :] += block.transpose(-1, -2) @ rhs[..., rows, :]
        if out is None:  # no blocks here (a rank's empty share)
            dtype = torch.promote_types(self.x1.dtype, rhs.dtype)
            out = rhs.new_zeros(*batch, n1, rhs.shape[-1], dtype=dtype)
        return self._combine(out, "K @ V")

    def _bilinear_grads(self, left: Tensor, right: Tensor, params=None) -> tuple[Tensor | None, ...]:
        """Gradients of ``sum(left * (K @ right))`` for ``(x1, x2, *params)``, one block at a time."""
        params = self.params if params is None else params
        x1 = self.x1.detach().requires_grad_(self.x1.requires_grad)
        x2 = x1 if self.same else self.x2.detach().requires_grad_(self.x2.requires_grad)
        leaves = [x1] + ([] if self.same else [x2]) + [p.detach().requires_grad_(p.requires_grad) for p in params]
        wanted = [i for i, t in enumerate(leaves) if t.requires_grad and t.dtype.is_floating_point]
        totals: list[Tensor | None] = [None] * len(leaves)
        if wanted:
            left, right = left.detach(), right.detach()
            substituted = leaves[1 if self.same else 2 :]
            targets = [leaves[i] for i in wanted]
            lock = threading.Lock()

            def block_gradient(pair: tuple[slice, slice]) -> None:
                rows, cols = pair
                with torch.enable_grad():
                    block = self.covariance.function(x1[..., rows, :], x2[..., cols, :])
                    loss = (left[..., rows, :] * (block @ right[..., cols, :])).sum()
                    if self.same and rows != cols:
                        loss = loss + (left[..., cols, :] * (block.transpose(-1, -2) @ right[..., rows, :])).sum()
                grads = torch.autograd.grad(loss, targets, allow_unused=True)
                with lock:
                    for i, g in zip(wanted, grads):
                        if g is not None:
                            totals[i] = g if totals[i] is None else totals[i] + g

            # Whole blocks (forward and backward) on the worker threads, one
            # intra-op thread each: a backward pass split over the cores
            # operation by operation stalls badly whenever another process
            # holds a core (see ``gpytorch_tp.evaluation.workers.map_tiles``).  Fused
            # (compiled) blocks hold the interpreter lock while they run: one
            # after the other, each spread over the cores by its compiled loops.
            pairs = self._gradient_pairs()
            progress = self.covariance.options.progress
            device = self.x1.device
            fused = self.covariance.options.fused and fusion.fuses_gradients(device)
            on_workers = device.type == "cpu" and not fused
            workers = tile_workers(len(pairs) - 1, device) if on_workers else 1

            def all_blocks() -> None:
                # The parameters are substituted once around all the threads' work:
                # substituting per block would race with the other threads' restores.
                with intra_op_threads(1 if on_workers else None):
                    if pairs:
                        block_gradient(pairs[0])
                        map_tiles(block_gradient, pairs[1:], workers, grad=True, progress=progress)

            self._with_parameters(substituted, all_blocks)
        totals = self._combine_gradients(totals, leaves, wanted)
        x_grads = [totals[0], None] if self.same else totals[:2]
        param_grads = totals[1:] if self.same else totals[2:]
        return (*x_grads, *(_reduce_to(g, p) for g, p in zip(param_grads, params)))

    # -- LinearOperator interface ----------------------------------------------------------------

    def _matmul(self, rhs: Tensor) -> Tensor:
        return _TiledMatmul.apply(self, rhs, *self.representation())

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        return self._bilinear_grads(left_vecs, right_vecs)

    def _size(self) -> torch.Size:
        batch = torch.broadcast_shapes(self.x1.shape[:-2], self.x2.shape[:-2], self.covariance.batch_shape)
        return torch.Size([*batch, self.x1.shape[-2], self.x2.shape[-2]])

    def _transpose_nonbatch(self) -> LinearOperator:
        if self.same:
            return self
        return self._like(self.x2, self.x1, self.same)

    def _diagonal(self) -> Tensor:
        if self.x1.shape[-2] != self.x2.shape[-2]:
            raise RuntimeError(f"the diagonal of a non-square {tuple(self.shape)} kernel matrix")
        return self._evaluate(self.x1, self.x2, diag=True).expand(self.shape[:-1])

    def to_dense(self) -> Tensor:
        return self._evaluate(self.x1, self.x2).expand(self.shape)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if any(index is not _noop_index for index in batch_indices):
            return DenseLinearOperator(self.to_dense())._getitem(row_index, col_index, *batch_indices)
        same = self.same and _same_index(row_index, col_index)
        x1 = self.x1[..., row_index, :]
        x2 = x1 if same else self.x2[..., col_index, :]
        return self._like(x1, x2, same)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices) -> Tensor:
        if batch_indices and any(not isinstance(index, slice) for index in batch_indices):
            return self.to_dense()[(*batch_indices, row_index, col_index)]
        row_index, col_index = torch.broadcast_tensors(row_index, col_index)
        x1 = self.x1[..., row_index.reshape(-1), :]
        x2 = self.x2[..., col_index.reshape(-1), :]
        values = self._evaluate(x1, x2, diag=True)
        values = values.expand(*self.batch_shape, values.shape[-1])
        return values.reshape(*values.shape[:-1], *row_index.shape)

    def _expand_batch(self, batch_shape) -> LinearOperator:
        batch_shape = torch.Size(batch_shape)
        x1 = self.x1.expand(*batch_shape, *self.x1.shape[-2:])
        x2 = x1 if self.same else self.x2.expand(*batch_shape, *self.x2.shape[-2:])
        return self._like(x1, x2, self.same)

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        x1 = self.x1.unsqueeze(dim)
        x2 = x1 if self.same else self.x2.unsqueeze(dim)
        return self._like(x1, x2, self.same)

    def _permute_batch(self, *dims: int) -> LinearOperator:
        return DenseLinearOperator(self.to_dense())._permute_batch(*dims)


def _same_index(row_index, col_index) -> bool:
    if isinstance(row_index, slice) and isinstance(col_index, slice):
        return row_index == col_index
    if torch.is_tensor(row_index) and torch.is_tensor(col_index):
        return row_index.shape == col_index.shape and bool(torch.equal(row_index, col_index))
    return False


def _reduce_to(grad: Tensor | None, like: Tensor) -> Tensor | None:
    """A gradient summed over the dimensions ``like`` was broadcast along."""
    if grad is None or grad.shape == like.shape:
        return grad
    extra = grad.dim() - like.dim()
    grad = grad.sum(tuple(range(extra))) if extra > 0 else grad
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, like.shape)) if s == 1 and g != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


class _TiledMatmul(torch.autograd.Function):
    """``K @ rhs`` whose backward pass recomputes the blocks (never the graph of all of them at once)."""

    @staticmethod
    def forward(ctx, operator: TiledKernelOperator, rhs: Tensor, *args: Tensor) -> Tensor:
        ctx.operator = operator
        ctx.save_for_backward(rhs)
        return operator._product(rhs)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (rhs,) = ctx.saved_tensors
        operator = ctx.operator
        rhs_grad = None
        if ctx.needs_input_grad[1]:
            rhs_grad = operator._transpose_nonbatch()._product(grad_output)
        arg_grads = operator._bilinear_grads(grad_output, rhs)
        return (None, rhs_grad, *arg_grads)
