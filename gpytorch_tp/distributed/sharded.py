"""Exact GPs on a process group: the blocks of ``K`` shared out to the ranks, the products summed over them.

GPyTorch's conjugate gradients and Lanczos need only products ``K @ V`` and the
gradients of bilinear forms ``tr(U^T K V)`` (its backward pass).
:class:`ShardedKernelOperator` is a :class:`~gpytorch_tp.evaluation.TiledKernelOperator`
whose blocks are the tiles of a :class:`~gpytorch_tp.distributed.TileGrid`
(the upper triangle only for ``K(X, X)``), shared out by cost with
:func:`~gpytorch_tp.distributed.assign_balanced`: each rank evaluates its share
and one ``all_reduce`` sums the partial results, so every rank holds the same
product and runs the same CG iterations on it.  :class:`ShardedKernel` is the
kernel a model uses to get one.

What the ranks must share, and how it is checked (each with a timeout):

* the inputs, hyperparameters and architecture: checksums agreed on each
  operator's first use (:class:`~gpytorch_tp.distributed.RankMismatchError` naming what differs);
* the tile size: each rank's choice (from its free memory) agreed as their minimum;
* the right-hand sides of every product and gradient: a checksum compared
  before the sum, since a rank whose vectors differ (most often GPyTorch's random
  probe vectors, drawn from a generator seeded differently) would make the sum
  meaningless without any error.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from gpytorch.kernels import Kernel
from torch import Tensor

from ..evaluation import TiledKernelOperator, check_inputs, same_inputs
from .agreement import RankMismatchError, agree, all_gather_bytes, all_reduce, fingerprint, tensor_checksum
from .tiles import Tile, TileGrid, assign_balanced

__all__ = [
    "MIN_SHARD_TILE",
    "ShardedKernel",
    "ShardedKernelOperator",
    "Traffic",
    "product_exchange_bytes",
    "shard_tile_size",
    "traffic",
]

# Tile rows per square root of the world size: with T tile rows the upper triangle
# has T (T + 1) / 2 tiles, and largest-first balancing leaves the ranks within one
# tile's cost of each other, about 2 P / T^2 of a share (3% for T = 8 sqrt(P)).
TILE_ROWS_PER_ROOT_RANK = 8
# Smallest tile side: below it the per-block overhead of an evaluation dominates.
MIN_SHARD_TILE = 64
# Bytes of the checksum each product and gradient compares across the ranks (two int64).
CHECK_BYTES = 16


@dataclass
class Traffic:
    """What this process handed to the collectives of sharded operators (its own accounting).

    ``bytes`` counts the payload this rank contributes to each collective (a
    ring all-reduce sends about ``2 (P - 1) / P`` of it per rank).
    """

    products: int = 0  # sums of K @ V (and of dense matrices)
    gradients: int = 0  # sums of bilinear-form gradients
    agreements: int = 0  # first-use checks of inputs and hyperparameters
    collectives: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.products = self.gradients = self.agreements = self.collectives = self.bytes = 0

    def add(self, payload: int, collectives: int = 1) -> None:
        self.bytes += int(payload)
        self.collectives += collectives


traffic = Traffic()


def product_exchange_bytes(rows: int, columns: int, element_size: int = 8, batch: int = 1) -> int:
    """Payload bytes one rank hands to the collectives of one sharded ``K @ V`` (``rows x columns`` result).

    The sum of the partial products and the checksum of the right-hand sides;
    a CG iteration of GPyTorch is one product with ``columns`` = 1 + the number of
    probe vectors (``gpytorch.settings.num_trace_samples``, default 10) in training.
    """
    return batch * rows * columns * element_size + CHECK_BYTES


def shard_tile_size(n1: int, n2: int, block_size: int, world_size: int) -> int:
    """Items per tile side when ``world_size`` ranks share an ``n1 x n2`` matrix of blocks of ``block_size``.

    The block size, made smaller when it leaves too few tiles to balance (about
    ``8 sqrt(P)`` tile rows), but not below :data:`MIN_SHARD_TILE` items.
    """
    balanced = -(-max(n1, n2, 1) // (TILE_ROWS_PER_ROOT_RANK * math.ceil(math.sqrt(world_size))))
    return max(1, min(block_size, max(MIN_SHARD_TILE, balanced)))


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


class ShardedKernelOperator(TiledKernelOperator):
    r"""A matrix-free kernel matrix whose blocks are shared out to the ranks of a process group.

    Each product :math:`K V` is :math:`\sum_r \sum_{(I, J) \in S_r} K_{IJ} V_J`
    (and the mirrored :math:`K_{IJ}^\top V_I` for tiles above the diagonal of
    ``K(X, X)``): rank :math:`r` evaluates its share :math:`S_r` of the tiles,
    ``all_reduce`` sums the ranks' results, and every rank gets the same
    product (the same bits).  The gradients of bilinear forms are summed alike.
    Everything else (the diagonal, single entries for a preconditioner, a dense
    matrix under autograd) is computed whole on every rank; a dense matrix
    without autograd (``to_dense()`` in predictions) is shared out and summed.

    When its share of the tiles fits in half of the kernel's ``memory_budget``
    a rank evaluates them once, on the first product, and holds them for the
    next ones; otherwise every product evaluates them again.

    :param x1: inputs ``(..., N1, d)``, the same on every rank.
    :param x2: inputs ``(..., N2, d)``, the same on every rank.
    :param params: the covariance's parameters (as for :class:`~gpytorch_tp.evaluation.TiledKernelOperator`).
    :param covariance: the kernel's :class:`~gpytorch_tp.evaluation.BlockCovariance`.
    :param same: ``x1`` and ``x2`` hold the same points (the upper triangle's tiles only).
    :param group: the process group (``None``: the default group).
    :param timeout: seconds each collective may wait for the other ranks.
    """

    def __init__(
        self,
        x1: Tensor,
        x2: Tensor,
        *params: Tensor,
        covariance,
        same: bool = False,
        group: dist.ProcessGroup | None = None,
        timeout: float = 300.0,
    ):
        super().__init__(x1, x2, *params, covariance=covariance, same=same, group=group, timeout=float(timeout))
        self.group = group
        self.timeout = float(timeout)
        self._agreed_sizes: tuple[int, int] | None = None
        self._held_share = None

    def _like(self, x1: Tensor, x2: Tensor, same: bool) -> ShardedKernelOperator:
        return ShardedKernelOperator(
            x1, x2, *self.params, covariance=self.covariance, same=same, group=self.group, timeout=self.timeout
        )

    # -- the group --------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def group_rank(self) -> int:
        return dist.get_rank(self.group)

    def _agreed_block_sizes(self) -> tuple[int, int]:
        """Check (once) that the ranks hold the same operator; agree on the block sizes (their minimum)."""
        if self._agreed_sizes is None:
            timeout = _timedelta(self.timeout)
            x2 = None if self.same else self.x2
            checks = fingerprint(self.covariance.owner, self.x1, x2, {"shape": list(self.shape), "same": self.same})
            # The tensors the blocks are evaluated with (the kernel's parameters, or those substituted for them).
            checks["hyperparameters"] = hashlib.sha256(
                "|".join(tensor_checksum(p) for p in self.params).encode()
            ).hexdigest()
            agree(checks, self.group, timeout)
            sizes = torch.tensor(self._block_sizes(), dtype=torch.int64, device=self.x1.device)
            all_reduce(sizes, self.group, timeout, "agreeing on the block sizes", op=dist.ReduceOp.MIN)
            payload = len(json.dumps(checks, sort_keys=True).encode())
            traffic.agreements += 1
            traffic.add(2 * 8 + payload + sizes.numel() * 8, collectives=3)
            self._agreed_sizes = (int(sizes[0]), int(sizes[1]))
        return self._agreed_sizes

    def tile_grid(self, grad: bool = False) -> TileGrid:
        """The tiles products (``grad``: gradients) are shared out in, the same on every rank.

        Their side is the agreed block size, made smaller when that leaves too few
        tiles to balance (:func:`shard_tile_size`).
        """
        plain, gradient = self._agreed_block_sizes()
        n1, n2 = self.x1.shape[-2], self.x2.shape[-2]
        size = shard_tile_size(n1, n2, gradient if grad else plain, self.world_size)
        return TileGrid(n1, n2, size, symmetric=self.same)

    def share(self, grad: bool = False) -> list[Tile]:
        """This rank's tiles of :meth:`tile_grid` (``assign_balanced`` on their costs)."""
        grid = self.tile_grid(grad)
        shares = assign_balanced([grid.cost(tile) for tile in grid], self.world_size)
        return [grid[k] for k in shares[self.group_rank]]

    def _check_same_on_every_rank(self, what: str, *tensors: Tensor) -> None:
        """Raise on every rank unless every rank passes the same ``tensors`` (bit for bit)."""
        digest = hashlib.sha256("|".join(tensor_checksum(t) for t in tensors).encode())
        value = int.from_bytes(digest.digest()[:7], "little")  # 56 bits: its negative fits in an int64
        extremes = torch.tensor([value, -value], dtype=torch.int64, device=self.x1.device)
        timeout = _timedelta(self.timeout)
        all_reduce(extremes, self.group, timeout, f"comparing {what}", op=dist.ReduceOp.MAX)
        traffic.add(CHECK_BYTES)
        if int(extremes[0]) == -int(extremes[1]):
            return
        # Every rank saw the same maximum and minimum, so every rank is here: gather who holds what.
        held = [b.decode() for b in all_gather_bytes(digest.hexdigest().encode(), self.group, timeout, what)]
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else list(range(len(held)))
        holders: dict[str, list[int]] = {}
        for rank, value_held in zip(ranks, held):
            holders.setdefault(value_held, []).append(rank)
        described = "; ".join(
            f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {v[:12]}" for v, r in holders.items()
        )
        raise RankMismatchError(
            f"rank {dist.get_rank()}: {what} differ between the ranks ({described}), so the sum of the ranks' "
            "shares would be no product at all. Every rank must run the same computation on the same vectors: "
            "GPyTorch draws the random probe vectors of its log-determinant and trace estimates (conjugate "
            "gradients, Lanczos) from torch's global generator, so seed it identically on every rank "
            "(torch.manual_seed(seed) on every rank, before training) and draw no random numbers on some ranks only.",
            {what: held},
        )

    # -- the seams of TiledKernelOperator ---------------------------------------------------------

    def _held_matrix(self) -> None:
        return None  # a rank holds at most its share of the tiles (see _product_blocks)

    def _product_pairs(self) -> list[tuple[slice, slice]]:
        return [(slice(*tile.rows), slice(*tile.cols)) for tile in self.share(grad=False)]

    def _gradient_pairs(self) -> list[tuple[slice, slice]]:
        return [(slice(*tile.rows), slice(*tile.cols)) for tile in self.share(grad=True)]

    def _product_blocks(self):
        if self._held_share is None:
            pairs = self._product_pairs()
            batch = math.prod(self.batch_shape)
            held_bytes = sum((r.stop - r.start) * (c.stop - c.start) for r, c in pairs) * batch * self.x1.element_size()
            if held_bytes > self.covariance.memory_budget(self.x1.device) / 2:
                self._held_share = False
            else:
                with torch.no_grad():
                    self._held_share = [
                        (r, c, self._evaluate(self.x1[..., r, :], self.x2[..., c, :])) for r, c in pairs
                    ]
        if self._held_share is False:
            return super()._product_blocks()
        return iter(self._held_share)

    def _combine(self, partial: Tensor, step: str) -> Tensor:
        partial = partial.contiguous()
        all_reduce(partial, self.group, _timedelta(self.timeout), f"summing the ranks' shares of {step}")
        traffic.products += 1
        traffic.add(partial.numel() * partial.element_size())
        return partial

    def _combine_gradients(self, totals: list[Tensor | None], leaves: list[Tensor], wanted: list[int]) -> list:
        if not wanted:
            return totals
        # One all-reduce for all of them (a rank with no tiles contributes zeros).
        parts = [totals[i] if totals[i] is not None else torch.zeros_like(leaves[i]) for i in wanted]
        dtype = parts[0].dtype
        for part in parts[1:]:
            dtype = torch.promote_types(dtype, part.dtype)
        flat = torch.cat([part.reshape(-1).to(dtype) for part in parts])
        all_reduce(flat, self.group, _timedelta(self.timeout), "summing the ranks' shares of a gradient")
        traffic.gradients += 1
        traffic.add(flat.numel() * flat.element_size())
        totals = list(totals)
        for i, piece, part in zip(wanted, flat.split([p.numel() for p in parts]), parts):
            totals[i] = piece.reshape(part.shape).to(part.dtype)
        return totals

    # -- what GPyTorch calls ----------------------------------------------------------------------

    def _product(self, rhs: Tensor) -> Tensor:
        self._agreed_block_sizes()
        self._check_same_on_every_rank("the right-hand sides of K @ V", rhs)
        return super()._product(rhs)

    def _bilinear_grads(self, left: Tensor, right: Tensor, params=None) -> tuple[Tensor | None, ...]:
        self._agreed_block_sizes()
        self._check_same_on_every_rank("the vectors of a bilinear form's gradient", left, right)
        return super()._bilinear_grads(left, right, params)

    def to_dense(self) -> Tensor:
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in (self.x1, self.x2, *self.params))
        if recording:
            return super().to_dense()  # one differentiable evaluation, the same on every rank
        self._agreed_block_sizes()
        out = None
        with torch.no_grad():
            for rows, cols, block in self._product_blocks():
                if out is None:
                    out = block.new_zeros(self.shape)
                out[..., rows, cols] = block
                if self.same and rows != cols:
                    out[..., cols, rows] = block.transpose(-1, -2)
        if out is None:
            out = self.x1.new_zeros(self.shape)
        # The other ranks add exact zeros to each entry: the sum is the tiles themselves.
        return self._combine(out, "the dense matrix")


class ShardedKernel(Kernel):
    r"""A kernel whose matrices are shared out to the ranks of a ``torch.distributed`` process group.

    Wrap the kernel of an exact GP and run the same training or prediction
    script on every rank (``torchrun``): each kernel matrix is a
    :class:`ShardedKernelOperator`, so every product GPyTorch's conjugate
    gradients take costs each rank ``1/P`` of the kernel evaluations, and the
    loss, the hyperparameters' gradients and the predictions are the same on
    every rank (and those of one process, to round-off).  Without a process
    group, or in a group of one rank, it is the wrapped kernel: nothing to start.

    Every rank must hold the same inputs and hyperparameters (checked, with
    ``timeout``) and draw the same random probe vectors: seed torch's generator
    identically on every rank (``torch.manual_seed(seed)`` before training;
    checked on every product).  The sharding pays off in GPyTorch's CG mode
    (N above ``gpytorch.settings.max_cholesky_size``, 800 by default); below it,
    GPyTorch's Cholesky path evaluates the matrix whole on every rank.

    :param base_kernel: a kernel with ``block_covariance`` (a
        :class:`~gpytorch_tp.TensorProgramKernel`: ``MLPKernel``, ``CNNKernel``, ...).
        Put ``ScaleKernel`` outside: ``ScaleKernel(ShardedKernel(MLPKernel()))``.
    :param group: the process group (``None``: the default group, if one is initialised).
    :param timeout: seconds any collective may wait for the other ranks before
        :class:`~gpytorch_tp.distributed.GroupTimeoutError`.

    Example:
        >>> import gpytorch, torch
        >>> from gpytorch_tp import MLPKernel
        >>> from gpytorch_tp.distributed import ShardedKernel
        >>> covar = gpytorch.kernels.ScaleKernel(ShardedKernel(MLPKernel(depth=2)))
        >>> x = torch.randn(20, 3, dtype=torch.float64)
        >>> torch.allclose(covar(x).to_dense(), covar.outputscale * MLPKernel(depth=2)(x).to_dense())  # one process
        True
    """

    def __init__(self, base_kernel: Kernel, group: dist.ProcessGroup | None = None, timeout: float = 300.0):
        if not callable(getattr(base_kernel, "block_covariance", None)):
            raise TypeError(
                f"ShardedKernel needs a kernel with block_covariance (a gpytorch_tp TensorProgramKernel such as "
                f"MLPKernel or CNNKernel), got {type(base_kernel).__name__}; to scale it, wrap the sharded kernel: "
                "ScaleKernel(ShardedKernel(kernel))"
            )
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        super().__init__()
        self.base_kernel = base_kernel
        self.group = group
        self.timeout = float(timeout)

    def sharded(self) -> bool:
        """Kernel matrices are shared out: a process group of more than one rank is initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            if self.group is not None:
                raise RuntimeError("ShardedKernel was given a process group, but torch.distributed is not initialised")
            return False
        return dist.get_world_size(self.group) > 1

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        base = self.base_kernel
        if base.active_dims is not None:  # calling base.forward skips base.__call__, which would select them
            x1 = x1.index_select(-1, base.active_dims)
            x2 = x2.index_select(-1, base.active_dims)
        if diag or last_dim_is_batch or not self.sharded():
            return base.forward(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)
        check_inputs(x1, x2, getattr(base, "input_dim", None), allow_nan=True)
        same = same_inputs(x1, x2)
        parameters = [p for _, p in base.named_parameters()]
        return ShardedKernelOperator(
            x1,
            x1 if same else x2,
            *parameters,
            covariance=base.block_covariance(x1),
            same=same,
            group=self.group,
            timeout=self.timeout,
        )

    def extra_repr(self) -> str:
        return f"timeout={self.timeout:g}"
