"""Starting process groups: from ``torchrun``'s environment, or as local processes for tests and notebooks.

* :func:`init_from_env`: in a script started by ``torchrun``, join the group its
  environment describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
  with a timeout on every collective and a clear error when ranks are missing;
* :func:`run_local`: run a function on ``P`` fresh local processes that form a
  gloo group over ``127.0.0.1`` (a free port), collect what each returns, and
  always end the processes, also when one fails, hangs or never joins.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["GroupFormationError", "LocalRunError", "free_port", "init_from_env", "init_group", "run_local"]


class GroupFormationError(TimeoutError):
    """The process group did not form: not every rank joined in time."""


class LocalRunError(RuntimeError):
    """A rank of :func:`run_local` raised, died or ran out of time.

    ``errors`` maps each failed rank to its exception (a ``RuntimeError`` with
    the text when it could not be sent back), ``tracebacks`` to the formatted
    traceback, ``exitcodes`` gives every process's exit code and ``results``
    what the ranks that finished returned (``None`` for the others).
    """

    def __init__(self, message: str, errors: dict, tracebacks: dict, exitcodes: list, results: list):
        super().__init__(message)
        self.errors, self.tracebacks, self.exitcodes, self.results = errors, tracebacks, exitcodes, results


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seconds(timeout: float | datetime.timedelta) -> datetime.timedelta:
    return timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=float(timeout))


def init_group(
    backend: str,
    rank: int,
    world_size: int,
    init_method: str = "env://",
    timeout: float | datetime.timedelta = 300,
) -> None:
    """``torch.distributed.init_process_group`` with ``timeout`` on forming the group and on every collective.

    A rank that waits longer than ``timeout`` for the others to join gets
    :class:`GroupFormationError` saying how many joined, instead of the
    store's own message.
    """
    timeout = _seconds(timeout)
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    except Exception as error:
        text = str(error)
        if "timed out" in text.lower() or "timeout" in type(error).__name__.lower():
            where = init_method if init_method != "env://" else (
                f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            )
            raise GroupFormationError(
                f"rank {rank}: the process group of {world_size} ranks did not form within "
                f"{timeout.total_seconds():g} s at {where}: not every rank joined ({text.strip()}). "
                "Start all the ranks (torchrun --nproc-per-node, --nnodes on every node) with the same "
                "rendezvous address and port."
            ) from error
        raise


def init_from_env(backend: str | None = None, timeout: float | datetime.timedelta = 300) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment; do nothing without one.

    :param backend: ``"gloo"`` or ``"nccl"`` (``None``: NCCL when CUDA is
        available, else gloo).  With NCCL the rank's GPU is ``LOCAL_RANK``.
    :param timeout: seconds (or a ``timedelta``) for the group to form and for every collective.
    :return: ``(rank, world_size)``; ``(0, 1)`` when ``WORLD_SIZE`` is not set
        (a plain ``python`` run: single process, no group).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_group(backend, rank, world_size, "env://", timeout)
    return rank, world_size


def _worker(fn, args, kwargs, rank, world_size, port, results, threads, group_timeout, backend) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        init_group(backend, rank, world_size, f"tcp://127.0.0.1:{port}", group_timeout)
        try:
            value = fn(*args, **kwargs)
        finally:
            dist.destroy_process_group()
        message = ("ok", rank, value, None)
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
        message = ("error", rank, error, traceback.format_exc())
    try:
        payload = pickle.dumps(message)
    except Exception as error:  # an unpicklable result or exception: send its text
        kind, rank, value, text = message
        payload = pickle.dumps(
            ("error", rank, RuntimeError(f"{type(value).__name__}: {value} (could not be sent back: {error})"), text)
        )
    results.put(payload)


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 300,
    group_timeout: float = 60,
    threads: int | None = 1,
    ranks: list[int] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` new local processes that form one process group.

    Each process joins a group over ``127.0.0.1`` on a free port (rank
    ``i`` of ``world_size``; the environment variables ``torchrun`` sets are
    set too), calls ``fn``, leaves the group and sends back what ``fn``
    returned.  The processes are started with ``spawn``: ``fn``, its arguments
    and its result are pickled, so ``fn`` must be importable (a function of a
    module, not one defined in a notebook cell or ``__main__``).

    :param fn: the function every rank runs (``torch.distributed.get_rank()`` tells them apart).
    :param world_size: the number of ranks of the group.
    :param timeout: seconds for the whole run; processes still running then are killed.
    :param group_timeout: seconds for the group to form and for every collective.
    :param threads: ``torch.set_num_threads`` in every process (default 1, as
        ``torchrun`` sets ``OMP_NUM_THREADS=1``); ``None``: PyTorch's default.
    :param ranks: start only these ranks (default all): the others never join,
        which tests what a missing rank does.
    :param backend: the ``torch.distributed`` backend (``"gloo"``; ``"nccl"`` for one process per GPU).
    :return: what ``fn`` returned on each rank, in rank order.
    :raises LocalRunError: when a rank raised, died or ran past ``timeout``
        (the first error's text in the message, every rank's in the attributes).
    """
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    ranks = list(range(world_size)) if ranks is None else sorted(set(ranks))
    if not ranks or any(not 0 <= r < world_size for r in ranks):
        raise ValueError(f"ranks must be some of 0 .. {world_size - 1}, got {ranks}")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    call = (fn, tuple(args), dict(kwargs or {}))
    processes = {
        rank: context.Process(
            target=_worker,
            args=(*call, rank, world_size, port, results, threads, group_timeout, backend),
            name=f"gpytorch_tp-rank-{rank}",
            daemon=False,  # a rank may start processes of its own (data loaders); ended in any case below
        )
        for rank in ranks
    }
    values: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    tracebacks: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    # After the first failure the others get this long to report (their collectives time out or fail).
    grace = None
    timed_out = False
    try:
        for process in processes.values():
            process.start()
        while len(values) + len(errors) < len(processes):
            try:
                kind, rank, value, text = pickle.loads(results.get(timeout=0.05))
                if kind == "ok":
                    values[rank] = value
                else:
                    errors[rank], tracebacks[rank] = value, text
                    if grace is None:
                        grace = time.monotonic() + group_timeout + 5
                continue
            except queue_module.Empty:
                pass
            now = time.monotonic()
            for rank, process in processes.items():
                if rank not in values and rank not in errors and process.exitcode is not None:
                    # Died without a word (killed, os._exit): give a message in flight a moment to arrive.
                    try:
                        kind, sender, value, text = pickle.loads(results.get(timeout=0.5))
                        (values if kind == "ok" else errors)[sender] = value
                        if kind != "ok":
                            tracebacks[sender] = text
                    except queue_module.Empty:
                        pass
                    if rank not in values and rank not in errors:
                        errors[rank] = RuntimeError(f"rank {rank} exited with code {process.exitcode} without a result")
                        tracebacks[rank] = ""
                    if grace is None:
                        grace = now + group_timeout + 5
            if now > deadline or (grace is not None and now > grace):
                timed_out = True
                for rank in processes:
                    if rank not in values and rank not in errors:
                        errors[rank] = TimeoutError(
                            f"rank {rank} was still running after {timeout:g} s" if now > deadline else
                            f"rank {rank} was still running {group_timeout + 5:g} s after another rank failed"
                        )
                        tracebacks[rank] = ""
                break
    finally:
        for process in processes.values():
            if process.pid is None:  # never started (start() raised)
                continue
            process.join(timeout=0 if timed_out else 5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
        results.join_thread()
    exitcodes = [processes[r].exitcode if r in processes else None for r in range(world_size)]
    if errors:
        first = min(errors, key=lambda r: (isinstance(errors[r], TimeoutError) and not tracebacks[r], r))
        summary = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(errors.items()))
        raise LocalRunError(
            f"{len(errors)} of {len(processes)} started ranks failed (world size {world_size}); "
            f"first, rank {first}: {type(errors[first]).__name__}: {errors[first]}\nall: {summary}",
            errors,
            tracebacks,
            exitcodes,
            [values.get(r) for r in range(world_size)],
        )
    return [values[r] for r in range(world_size)]
