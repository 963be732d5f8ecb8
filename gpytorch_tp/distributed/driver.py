"""Precomputing a kernel matrix, NNGP and NTK together, by every rank of a process group (or by one process).

:func:`precompute_kernel` is the one entry point; see its docstring for the
steps and ``docs/distributed.md`` for what is sharded, what is replicated and
the failure model.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .agreement import GroupFailureError, agree, broadcast_bytes, fingerprint
from .store import KernelStore
from .tiles import Tile, assign_balanced

__all__ = ["PrecomputeReport", "TileDone", "default_tile_size", "precompute_kernel", "tile_function"]

# Pair elements (pairs of items times the position pairs each carries) of a tile
# when the tile size is not given: about 8 MiB per float64 tile-sized tensor.
DEFAULT_TILE_ELEMENTS = 2**20
# Pair elements of the pieces a tile is evaluated in on a CPU when the kernel
# sets no tile_pairs: a constant, not the machine's free memory or cache size,
# so that every rank and every rerun cuts a tile alike (bit-identical tiles).
INNER_TILE_ELEMENTS = 2**17


@dataclass(frozen=True)
class TileDone:
    """What a ``progress`` callback of :func:`precompute_kernel` gets after each tile this rank finishes."""

    rank: int
    world_size: int
    tile: Tile
    done: int  # tiles this rank finished in this call, including this one
    share: int  # tiles this rank computes in this call
    seconds: float  # of this tile


@dataclass
class PrecomputeReport:
    """What one rank did in a call of :func:`precompute_kernel`."""

    path: str
    rank: int
    world_size: int
    tiles: int  # of the whole matrix
    done_before: int  # tiles finished by earlier calls, skipped
    computed: list[int] = field(default_factory=list)  # indices of the tiles this rank computed
    seconds: float = 0.0


def _pair_elements(kernel, x: Tensor) -> int:
    architecture = getattr(kernel, "architecture", None)
    options = getattr(kernel, "options", None)
    if architecture is None or options is None:
        return 1
    from ..evaluation import input_layout

    width = x.shape[-1] if kernel.active_dims is None else kernel.active_dims.numel()
    layout = input_layout(architecture, options.input_shape, width, options.sequence, options.padding_value)
    return max(1, int(layout.pair_elements))


def default_tile_size(kernel: torch.nn.Module, x1: Tensor, x2: Tensor | None = None) -> int:
    """The tile size :func:`precompute_kernel` uses when none is given.

    About :data:`DEFAULT_TILE_ELEMENTS` pair elements per tile (1,024 items a side
    for plain features; fewer for images, whose pairs carry all their position
    pairs), at most a sixteenth of the larger side, so that there are tiles to
    share.  It depends on the kernel and the inputs only, never on the number of
    ranks: the same call cuts the matrix alike on any number of processes.
    """
    side = int(math.sqrt(DEFAULT_TILE_ELEMENTS / _pair_elements(kernel, x1)))
    n = max(x1.shape[-2], 0 if x2 is None else x2.shape[-2])
    return max(1, min(side, -(-n // 16)))


def tile_function(kernel: torch.nn.Module, x1: Tensor, tile_size: int) -> tuple[tuple[str, ...], Callable]:
    """The kinds of matrix a kernel gives and the function that evaluates one tile of them.

    Kernels with ``nngp_and_ntk`` (all of this package's but ``BatchNormMLPKernel``
    and ``MonteCarloKernel``) give ``("nngp", "ntk")`` from one pass; any other
    GPyTorch kernel gives ``("kernel",)``, its own matrix.  The function
    evaluates a copy of the kernel whose evaluation options are fixed (a
    constant number of pairs per piece, no progress bar, dense), so that a tile
    is the same numbers whichever process computes it, and without the
    positive semi-definite projection of ``GRUKernel``/``LSTMKernel`` (a
    property of the whole matrix, not of a tile).
    """
    work = copy.deepcopy(kernel)
    if getattr(work, "psd_projection", False):
        work.psd_projection = False
    options = getattr(work, "options", None)
    if options is not None:
        pieces = options.tile_pairs
        if pieces is None:
            if x1.device.type == "cpu":
                pieces = max(1, INNER_TILE_ELEMENTS // _pair_elements(kernel, x1))
            else:  # on a GPU a tile goes in one piece
                pieces = tile_size * tile_size
        work.options = options.replace(tile_pairs=pieces, progress=False, matrix_free=False)
    if hasattr(work, "nngp_and_ntk"):

        def both(a: Tensor, b: Tensor | None) -> dict[str, Tensor]:
            nngp, ntk = work.nngp_and_ntk(a, b)
            return {"nngp": nngp, "ntk": ntk}

        return ("nngp", "ntk"), both

    def single(a: Tensor, b: Tensor | None) -> dict[str, Tensor]:
        value = work(a) if b is None else work(a, b)
        return {"kernel": value.to_dense() if hasattr(value, "to_dense") else value}

    return ("kernel",), single


def _check_arguments(kernel, x1, x2, tile_size, timeout) -> None:
    if not isinstance(kernel, torch.nn.Module) or not callable(kernel):
        raise TypeError(f"kernel must be a GPyTorch kernel (a torch.nn.Module), got {type(kernel).__name__}")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(
                f"{name} must be a matrix of items (N, d), got shape {tuple(x.shape)}: "
                "a distributed kernel matrix has no batch dimensions of inputs (a kernel's batch_shape is fine)"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x2 is not None:
        if x2.shape[-1] != x1.shape[-1]:
            raise ValueError(f"x1 has {x1.shape[-1]} features but x2 has {x2.shape[-1]}")
        if x2.dtype != x1.dtype or x2.device != x1.device:
            raise ValueError(
                f"x1 and x2 must share dtype and device, got {x1.dtype} on {x1.device} and {x2.dtype} on {x2.device}"
            )
    if tile_size is not None and (int(tile_size) != tile_size or tile_size < 1):
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")


def _progress_bar(progress, rank: int, world_size: int, total: int):
    show = sys.stderr.isatty() if progress is None else progress is True
    if not show or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"rank {rank}/{world_size} tiles", position=rank, leave=True, dynamic_ncols=True)


def precompute_kernel(
    kernel: torch.nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    path: str | os.PathLike,
    tile_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    progress: bool | None | Callable[[TileDone], None] = None,
    overwrite: bool = False,
    sync: bool = True,
    timeout: float = 300,
) -> PrecomputeReport:
    """Compute ``K(x1, x1)`` or ``K(x1, x2)`` (NNGP and NTK together) into a store at ``path``, shared over ranks.

    Without a process group (or with ``group`` of one rank) the calling process
    computes every tile.  With one, call it on every rank with the same
    arguments; each rank then computes a disjoint share of the tiles,
    balanced by cost, and writes them into the same files:

    1. every rank checks its arguments and computes checksums of its inputs,
       hyperparameters, architecture and arguments; the ranks exchange them
       (:class:`~gpytorch_tp.distributed.RankMismatchError` on every rank,
       naming what differs, when they disagree);
    2. rank 0 creates the store, or reopens the one at ``path`` if it holds
       this matrix (its finished tiles are kept: a rerun after a crash
       computes only the others; another matrix there raises
       :class:`~gpytorch_tp.distributed.StoreMismatchError` unless ``overwrite``),
       and tells the others which tiles are finished;
    3. each rank computes its share of the unfinished tiles, writes each
       (the upper triangle's tiles also mirrored below the diagonal) and logs
       it as finished;
    4. the ranks wait for each other; rank 0 marks the store complete.

    A tile is always the same slices of the inputs, evaluated by the same call
    in the same pieces, whatever the number of ranks: the matrix is the same
    bit for bit on 1 or P processes (given the same PyTorch build, device type
    and ``torch.get_num_threads()`` in each), and agrees with
    ``kernel.nngp_and_ntk(x1, x2)`` to round-off.

    :param kernel: a kernel of this package (or any pairwise GPyTorch kernel; see :func:`tile_function`).
    :param x1: inputs ``(N1, d)``.
    :param x2: inputs ``(N2, d)``; ``None`` (or ``x1`` itself): the symmetric ``K(x1, x1)``,
        of which only the upper triangle's tiles are computed.
    :param path: the store's directory (on a filesystem every rank sees).
    :param tile_size: items per side of a tile (``None``: :func:`default_tile_size`).
    :param group: the process group (``None``: the default group if one is initialised, else none).
    :param progress: ``True``: a progress bar per rank; ``False``: none;
        ``None``: a bar on a terminal; a callable: called with a :class:`TileDone`
        after each finished tile.
    :param overwrite: replace a store of a different matrix at ``path``.
    :param sync: flush each tile to the disk before logging it (a crash of the
        machine, not only of the process, then loses no logged tile).
    :param timeout: seconds each exchange between ranks may wait (the final
        wait for the slowest rank uses the process group's own timeout).
    :return: this rank's :class:`PrecomputeReport` (open the matrix with
        :func:`~gpytorch_tp.distributed.open_kernel_matrix`).

    Example:
        >>> import tempfile, torch
        >>> from gpytorch_tp import MLPKernel
        >>> from gpytorch_tp.distributed import open_kernel_matrix, precompute_kernel
        >>> x = torch.randn(30, 3, dtype=torch.float64)
        >>> kernel = MLPKernel(depth=2)
        >>> with tempfile.TemporaryDirectory() as path:
        ...     report = precompute_kernel(kernel, x, path=path, tile_size=8, progress=False)
        ...     matrix = open_kernel_matrix(path)
        ...     nngp, ntk = kernel.nngp_and_ntk(x)
        ...     print(len(report.computed), torch.allclose(matrix["ntk"], ntk, rtol=1e-12, atol=0))
        10 True
    """
    started = time.perf_counter()
    _check_arguments(kernel, x1, x2, tile_size, timeout)
    if x2 is not None and (x2 is x1 or (x2.shape == x1.shape and torch.equal(x2, x1))):
        x2 = None
    timeout_delta = datetime.timedelta(seconds=float(timeout))
    distributed = group is not None or (dist.is_available() and dist.is_initialized())
    if distributed:
        rank, world_size = dist.get_rank(), dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world_size))
    else:
        rank, world_size, ranks = 0, 1, [0]
    leader = ranks[0]
    if tile_size is None:
        tile_size = default_tile_size(kernel, x1, x2)
    tile_size = int(tile_size)
    symmetric = x2 is None
    kinds, evaluate_tile = tile_function(kernel, x1, tile_size)
    arguments = {"tile_size": tile_size, "kinds": list(kinds), "symmetric": symmetric, "overwrite": bool(overwrite)}
    checks = fingerprint(kernel, x1, x2, arguments)
    if distributed and world_size > 1:
        agree(checks, group, timeout_delta)

    # The matrix's dtype and batch shape, from its first pair (every rank alike).
    probe = None
    if x1.shape[0] and (symmetric or x2.shape[0]):
        with torch.no_grad():
            probe = evaluate_tile(x1[:1], None if symmetric else x2[:1])
    n1, n2 = x1.shape[0], x1.shape[0] if symmetric else x2.shape[0]
    if probe is not None:
        batch_shape = tuple(probe[kinds[0]].shape[:-2])
        dtype = str(probe[kinds[0]].dtype).replace("torch.", "")
    else:
        batch_shape, dtype = tuple(getattr(kernel, "batch_shape", ())), str(x1.dtype).replace("torch.", "")
    identity = {
        "kinds": list(kinds),
        "shape": [*batch_shape, n1, n2],
        "dtype": dtype,
        "symmetric": symmetric,
        "tile_size": tile_size,
        "checksums": {part: checks[part] for part in ("x1", "x2", "hyperparameters", "architecture")},
    }
    extra = {
        "kernel": type(kernel).__qualname__,
        "psd_projection": False if hasattr(kernel, "psd_projection") else None,
        "environment": {
            "device": x1.device.type,
            "torch": torch.__version__,
            "intra_op_threads": torch.get_num_threads(),
            "world_size": world_size,
        },
        "layout": "C order, shape batch_shape + (n1, n2); K(X, X) stored whole (lower triangle written as the "
        "transposes of the upper triangle's tiles)",
    }

    # Rank 0 makes or reopens the store and tells the others which tiles are finished (or why it failed).
    store = None
    if rank == leader:
        try:
            store = KernelStore.create(path, identity, extra, overwrite=overwrite)
            done = sorted(store.done())
            message = {"store_id": store.manifest["store_id"], "done": done, "complete": store.manifest["complete"]}
        except Exception as error:
            if not (distributed and world_size > 1):
                raise
            message = {"error": f"{type(error).__name__}: {error}"}
            failure = error
    else:
        message = None
    if distributed and world_size > 1:
        payload = broadcast_bytes(
            None if message is None else json.dumps(message).encode(), leader, group, timeout_delta, "opening the store"
        )
        message = json.loads(payload)
    if "error" in message:
        if rank == leader:
            raise failure
        raise RuntimeError(f"rank {rank}: rank {leader} could not create the store at {path}: {message['error']}")
    if store is None:
        try:
            store = KernelStore.open(path)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"rank {rank}: no kernel matrix store at {path}, which rank {leader} just created: the path must be "
                "on a filesystem that every rank shares (the same directory on every node)"
            ) from error
        if store.manifest.get("store_id") != message["store_id"]:
            raise RuntimeError(
                f"rank {rank}: the store at {path} is not the one rank {leader} opened: the path must be on a "
                "filesystem that every rank shares (the same directory on every node)"
            )

    grid = store.grid
    done = set(message["done"])
    report = PrecomputeReport(str(path), rank, world_size, len(grid), len(done))
    if not message["complete"]:
        remaining = [tile for tile in grid if tile.index not in done]
        shares = assign_balanced([grid.cost(tile) for tile in remaining], world_size)
        mine = [remaining[k] for k in shares[ranks.index(rank)]]
        bar = _progress_bar(progress if not callable(progress) else False, rank, world_size, len(mine))
        try:
            with store.writer(rank, sync=sync) as writer, torch.no_grad():
                for count, tile in enumerate(mine, 1):
                    begun = time.perf_counter()
                    rows, cols = slice(*tile.rows), slice(*tile.cols)
                    if symmetric:
                        values = evaluate_tile(x1[rows], None if tile.diagonal else x1[cols])
                    else:
                        values = evaluate_tile(x1[rows], x2[cols])
                    arrays = {kind: values[kind].detach().cpu().numpy() for kind in kinds}
                    seconds = time.perf_counter() - begun
                    writer.write(tile, arrays, seconds)
                    report.computed.append(tile.index)
                    if bar is not None:
                        bar.update(1)
                    if callable(progress):
                        progress(TileDone(rank, world_size, tile, count, len(mine), seconds))
        finally:
            if bar is not None:
                bar.close()

        # Everyone finished: rank 0 checks the logs and marks the store complete, then lets the others go.
        if distributed and world_size > 1:
            try:
                dist.barrier(group=group)
            except Exception as error:
                raise GroupFailureError(
                    f"rank {rank}: finished its {len(mine)} tiles, but the process group failed while waiting for "
                    f"the others ({type(error).__name__}: {error}); their finished tiles are kept: rerun with the "
                    "same arguments to compute only the unfinished ones"
                ) from error
        status = None
        if rank == leader:
            try:
                store.mark_complete()
                status = b""
            except Exception as error:
                if not (distributed and world_size > 1):
                    raise
                status, failure = f"{type(error).__name__}: {error}".encode(), error
        if distributed and world_size > 1:
            status = broadcast_bytes(status, leader, group, timeout_delta, "marking the store complete")
            if status:
                if rank == leader:
                    raise failure
                raise RuntimeError(f"rank {rank}: rank {leader} could not mark the store complete: {status.decode()}")
    report.seconds = time.perf_counter() - started
    return report

