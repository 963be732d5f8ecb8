"""Running tiles on worker threads, with a progress bar.

See :func:`map_tiles` for why tiles, not operations, are spread over the cores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from ..state import per_item_cache, shared_per_item_work

__all__ = ["intra_op_threads", "map_tiles", "tile_workers"]


def tile_workers(num_tiles: int, device: torch.device) -> int:
    """Threads that compute tiles: on a CPU, the intra-op thread budget ``torch.get_num_threads()``."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), num_tiles))


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
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


def map_tiles(work, tasks: list, workers: int, *, grad: bool, progress: bool | None = False) -> None:
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
    with _progress_bar(len(tasks) + 1, progress) as bar:
        bar.update(1)  # the first tile, computed before
        if pool is None:  # sequential, also when called from inside a worker
            for task in tasks:
                work(task)
                bar.update(1)
            return
        _map_tiles_on(pool, work, tasks, grad, bar)


def _map_tiles_on(pool, work, tasks: list, grad: bool, bar) -> None:
    # Autograd modes and the evaluation's caches are thread-local: hand the caller's to the workers.
    inference = torch.is_inference_mode_enabled()
    items = per_item_cache()

    def run(task) -> None:
        with (
            shared_per_item_work(items),
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
        ):
            work(task)
        bar.update(1)

    for _ in pool.map(run, tasks):
        pass


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def _progress_bar(total: int, progress: bool | None):
    """A ``tqdm`` bar over tiles: always (``True``), never (``False``), or on a terminal after 2 s (``None``)."""
    if progress is False or total <= 1:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    # Asked for explicitly: shown at once; by default only on a terminal and after 2 s.
    delay = 2.0 if progress is None else 0.0
    bar = tqdm(total=total, unit="tile", desc="kernel tiles", disable=None if progress is None else False, delay=delay)
    try:
        yield bar
    finally:
        bar.close()


# The worker threads live as long as the process (or until the number of
# workers changes): the memory their allocator arenas keep between
# evaluations spares the page faults of fresh memory for every tile.
_worker_pool_lock = threading.Lock()
_worker_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_worker_state = threading.local()


def _start_worker() -> None:
    _worker_state.is_worker = True
    # PyTorch's OpenMP setting is per thread; the process-wide default that
    # this call also records is restored by the caller (``intra_op_threads``).
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