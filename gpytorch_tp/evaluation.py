"""Running an architecture on two batches of inputs: input checks, the input state, tiling."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from .layers.base import Layer, cached_hyperparameters, hyperparameter_cache
from .state import KernelState, per_item_cache, shared_per_item_work

__all__ = ["DEFAULT_CUDA_TILE_PAIRS", "DEFAULT_TILE_PAIRS", "check_inputs", "evaluate", "input_state"]

# Pairs per tile on a CPU.  A tile costs about 70 operations of a few
# microseconds' overhead each for a depth-5 MLP, so it must hold enough pairs
# to make that small; smaller tiles keep the intermediates in faster caches
# (256 x 256 float64 pairs are 512 KiB per tensor).  128 x 128 was measurably
# slower, 181 x 181 and 512 x 512 about the same (2-core AMD EPYC, float64).
DEFAULT_TILE_PAIRS = 256 * 256
# On a GPU the per-operation launch cost dominates small tiles; a tile of this
# many pairs holds the whole matrix of a few thousand points, and its dozen
# float64 intermediates take about 1.3 GiB.
DEFAULT_CUDA_TILE_PAIRS = 4096 * 4096


def check_inputs(x1: Tensor, x2: Tensor | None, input_dim: int | None = None) -> None:
    """Raise a clear error for inputs no kernel can use."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (float32 or float64), got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape (..., n, d), got {tuple(x.shape)}")
        if input_dim is not None and x.shape[-1] != input_dim:
            raise ValueError(f"{name} has {x.shape[-1]} features but the kernel expects {input_dim}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    if x2 is not None:
        if x1.shape[-1] != x2.shape[-1]:
            raise ValueError(f"x1 has {x1.shape[-1]} features but x2 has {x2.shape[-1]}")
        if x1.dtype != x2.dtype:
            raise TypeError(f"x1 is {x1.dtype} but x2 is {x2.dtype}")
        if x1.device != x2.device:
            raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}")


def input_state(x1: Tensor, x2: Tensor, *, diagonal: bool, same_inputs: bool, track_ntk: bool) -> KernelState:
    r"""The state of the network input: :math:`K(x, x') = \langle x, x' \rangle / d`, no NTK yet."""
    d = x1.shape[-1]
    var1 = x1.pow(2).sum(-1) / d
    var2 = var1 if same_inputs else x2.pow(2).sum(-1) / d
    if diagonal:
        cross = var1 if same_inputs else (x1 * x2).sum(-1) / d
        var1, var2 = torch.broadcast_tensors(var1, var2)
    else:
        cross = x1 @ x2.transpose(-1, -2) / d
        var1, var2 = var1.unsqueeze(-1), var2.unsqueeze(-2)
    state = KernelState(
        cross=cross,
        var1=var1,
        var2=var2,
        track_ntk=track_ntk,
        diagonal=diagonal,
        same_inputs=same_inputs,
    )
    return state.replace(cross=cross) if same_inputs else state


def _run(architecture: Layer, state: KernelState) -> tuple[Tensor, Tensor | None]:
    out = architecture(state)
    if out.pair_ndim:
        raise ValueError(
            f"the architecture ends with {out.pair_ndim} spatial/time axes left; end it with a readout layer"
        )
    cross, ntk = out.cross, None
    if out.track_ntk:
        ntk = out.ntk if out.ntk is not None else torch.zeros_like(out.cross)
    if state.same_inputs and not state.diagonal:
        # Round-off differs between (i, j) and (j, i); make K(X, X) exactly symmetric.
        cross = (cross + cross.transpose(-1, -2)) / 2
        ntk = None if ntk is None else (ntk + ntk.transpose(-1, -2)) / 2
    return cross, ntk


def _same_inputs(x1: Tensor, x2: Tensor | None) -> bool:
    if x2 is None or x2 is x1:
        return True
    if x1.shape != x2.shape or x1.requires_grad or x2.requires_grad:
        # With gradients, mirroring tiles would route x2's gradient to x1.
        return False
    return bool(torch.equal(x1, x2))


def evaluate(
    architecture: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    diag: bool = False,
    ntk: bool = False,
    tile_pairs: int | None = None,
    input_dim: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """NNGP kernel (and NTK when ``ntk``) of ``architecture`` between ``x1`` and ``x2``.

    :param x1: inputs of shape ``(..., N1, d)``.
    :param x2: inputs of shape ``(..., N2, d)``; ``None`` means ``x1``.
    :param diag: return only the diagonal ``K(x1_i, x2_i)`` (needs ``N1 == N2``).
    :param ntk: also return the NTK (otherwise the second output is ``None``).
    :param tile_pairs: the full matrix is computed in tiles of about this many
        pairs; with ``x2`` equal to ``x1`` only tiles on or above the diagonal
        are computed and the others mirrored.  ``None`` (default) picks by
        device: :data:`DEFAULT_TILE_PAIRS` on a CPU, :data:`DEFAULT_CUDA_TILE_PAIRS`
        on a GPU.  On a CPU the tiles are shared out to
        ``torch.get_num_threads()`` worker threads, each running whole tiles
        with one intra-op thread (``torch.set_num_threads(1)`` makes the
        evaluation single-threaded).
    :param input_dim: expected number of features, checked when given.
    :return: ``(nngp, ntk)``, each ``(..., N1, N2)`` (or ``(..., N)`` with ``diag``).
    """
    check_inputs(x1, x2, input_dim)
    if tile_pairs is None:
        tile_pairs = DEFAULT_CUDA_TILE_PAIRS if x1.device.type == "cuda" else DEFAULT_TILE_PAIRS
    with cached_hyperparameters(), shared_per_item_work():
        return _evaluate(architecture, x1, x2, diag, ntk, tile_pairs)


def _evaluate(architecture: Layer, x1: Tensor, x2: Tensor | None, diag: bool, ntk: bool, tile_pairs: int):
    same = _same_inputs(x1, x2)
    if x2 is None:
        x2 = x1
    if diag:
        if x1.shape[-2] != x2.shape[-2]:
            raise ValueError(f"diag=True needs as many x1 as x2 points, got {x1.shape[-2]} and {x2.shape[-2]}")
        with _intra_op_threads(1 if x1.shape[-2] < _SMALL_PAIRS and x1.device.type == "cpu" else None):
            return _run(architecture, input_state(x1, x2, diagonal=True, same_inputs=same, track_ntk=ntk))

    n1, n2 = x1.shape[-2], x2.shape[-2]
    if n1 * n2 <= tile_pairs:
        with _intra_op_threads(1 if n1 * n2 < _SMALL_PAIRS and x1.device.type == "cpu" else None):
            return _run(architecture, input_state(x1, x2, diagonal=False, same_inputs=same, track_ntk=ntk))
    return _evaluate_tiles(architecture, x1, x2, same, ntk, max(1, int(tile_pairs**0.5)))


# Below this many pairs an evaluation in one piece runs with one intra-op
# thread: splitting each of its small operations over the cores gains little
# and stalls for milliseconds whenever another process holds a core.
_SMALL_PAIRS = 2 * 256 * 256


def _records_grad(architecture: Layer, *inputs: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(x.requires_grad for x in inputs) or any(p.requires_grad for p in architecture.parameters())


def _evaluate_tiles(architecture: Layer, x1: Tensor, x2: Tensor, same: bool, ntk: bool, side: int):
    """The full matrix in tiles of about ``side x side``; with ``same``, tiles below the diagonal are mirrored."""
    n1, n2 = x1.shape[-2], x2.shape[-2]
    # Equal tiles along each axis (no thin leftover row or column of tiles).
    row_side, col_side = _balanced(n1, side), _balanced(n2, side)
    d = x1.shape[-1]
    # Work shared by all tiles: the input variances (the same numbers
    # ``input_state`` computes) and the scaled inputs of the cross products.
    var1 = x1.pow(2).sum(-1) / d
    var2 = var1 if same else x2.pow(2).sum(-1) / d
    x1_scaled = x1 / d
    row_starts = range(0, n1, row_side)
    col_starts = row_starts if same else range(0, n2, col_side)
    # One tensor object per row (column) of tiles, so that layers share their
    # per-item work between the tiles of a row (see ``state.per_item``).
    row_vars = {r: var1[..., r : r + row_side].unsqueeze(-1) for r in row_starts}
    col_vars = {c: var2[..., c : c + col_side].unsqueeze(-2) for c in col_starts}

    def tile(r: int, c: int) -> tuple[Tensor, Tensor | None]:
        rows, cols = slice(r, r + row_side), slice(c, c + col_side)
        cross = x1_scaled[..., rows, :] @ x2[..., cols, :].transpose(-1, -2)
        state = KernelState(
            cross=cross,
            var1=row_vars[r],
            var2=col_vars[c],
            track_ntk=ntk,
            same_inputs=same and r == c,
        )
        if state.same_inputs:
            state = state.replace(cross=cross)  # the self pairs get the variances exactly
        return _run(architecture, state)

    tasks = [(r, c) for r in row_starts for c in col_starts if not (same and c < r)]
    record = _records_grad(architecture, x1, x2)
    workers = _tile_workers(len(tasks) - 1, x1.device)
    # The first tile runs in this thread before the others: it fills the caches
    # of hyperparameters and per-item work that all tiles share.  Tiles are small
    # enough that their operations run best on one core each (see _map_tiles).
    with _intra_op_threads(1 if x1.device.type == "cpu" else None):
        first = tile(*tasks[0])
        if record:
            tiles = {tasks[0]: first}

            def compute(task: tuple[int, int]) -> None:
                tiles[task] = tile(*task)

            _map_tiles(compute, tasks[1:], workers, grad=True)
        else:
            # No autograd: each tile (and its mirror image) goes straight into the output.
            outputs = [None if value is None else value.new_empty(*value.shape[:-2], n1, n2) for value in first]

            def store(r: int, c: int, values: tuple[Tensor, Tensor | None]) -> None:
                for out, value in zip(outputs, values):
                    if out is None:
                        continue
                    out[..., r : r + row_side, c : c + col_side] = value
                    if same and c > r:
                        out[..., c : c + col_side, r : r + row_side] = value.transpose(-1, -2)

            store(*tasks[0], first)
            _map_tiles(lambda task: store(*task, tile(*task)), tasks[1:], workers, grad=False)
            return outputs[0], outputs[1]

    # Autograd: build the matrix out of the tiles' graphs (mirrored tiles are views).
    def block(r: int, c: int, which: int) -> Tensor:
        return tiles[(c, r)][which].transpose(-1, -2) if same and c < r else tiles[(r, c)][which]

    def assemble(which: int) -> Tensor:
        return torch.cat([torch.cat([block(r, c, which) for c in col_starts], -1) for r in row_starts], -2)

    return assemble(0), (assemble(1) if ntk else None)


def _balanced(n: int, side: int) -> int:
    """The tile length that cuts ``n`` items into as many tiles as ``side`` would, all of about equal length."""
    return -(-n // -(-n // side))


def _tile_workers(num_tiles: int, device: torch.device) -> int:
    """Threads that compute tiles: on a CPU, the intra-op thread budget ``torch.get_num_threads()``."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), num_tiles))


@contextlib.contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads in this thread (``None``: unchanged)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _map_tiles(work, tasks: list, workers: int, *, grad: bool) -> None:
    """Run ``work(task)`` for every task on ``workers`` threads (autograd recording if ``grad``).

    PyTorch releases the GIL inside its operations, so a few Python threads,
    each running whole tiles with one intra-op thread, keep the cores busy with
    no synchronisation between the cores inside an operation.  (Parallelising
    each of the hundred or so small operations of a tile instead costs a
    fork/join per operation and stalls badly whenever another process holds
    one of the cores.)  The number of workers is the intra-op budget the user
    gave PyTorch (``torch.get_num_threads()``), spent on tiles instead of on
    operations; ``torch.set_num_threads(1)`` turns the workers off.
    """
    pool = None if workers <= 1 or getattr(_worker_state, "is_worker", False) else _worker_pool(workers)
    if pool is None:  # sequential, also when called from inside a worker
        for task in tasks:
            work(task)
        return
    # Autograd modes and the evaluation's caches are thread-local: hand the caller's to the workers.
    inference = torch.is_inference_mode_enabled()
    hyperparameters, items = hyperparameter_cache(), per_item_cache()

    def run(task) -> None:
        with (
            cached_hyperparameters(hyperparameters),
            shared_per_item_work(items),
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
        ):
            work(task)

    for _ in pool.map(run, tasks):
        pass


# The worker threads live as long as the process (or until the number of
# workers changes): the memory their allocator arenas keep between
# evaluations spares the page faults of fresh memory for every tile.
_worker_pool_lock = threading.Lock()
_worker_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_worker_state = threading.local()


def _start_worker() -> None:
    _worker_state.is_worker = True
    # PyTorch's OpenMP setting is per thread; the process-wide default that
    # this call also records is restored by the caller (``_intra_op_threads``).
    torch.set_num_threads(1)


def _worker_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    with _worker_pool_lock:
        pool = _worker_pools.get(workers)
        if pool is None:
            for old in _worker_pools.values():
                old.shutdown(wait=False)
            _worker_pools.clear()
            pool = _worker_pools[workers] = concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix="gpytorch_tp_tiles", initializer=_start_worker
            )
        return pool


def _forget_worker_pools() -> None:
    # Threads do not survive fork(); a child process starts its own pool.
    global _worker_pool_lock
    _worker_pool_lock = threading.Lock()
    _worker_pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_pools)
