"""What the ranks of tests/test_distributed.py run: importable functions (run_local pickles them by name).

Kept out of the test module so that each spawned rank imports only this and the package.
"""

from __future__ import annotations

import os
import time

import torch

from gpytorch_tp import MLPKernel
from gpytorch_tp.distributed import GroupTimeoutError, RankMismatchError, precompute_kernel


def precompute_all(cases: list[dict]) -> list:
    """Every case's kernel matrix; this rank's reports."""
    return [precompute_kernel(**case, progress=False) for case in cases]


def precompute_dying(case: dict, die: dict) -> object:
    """The kernel matrix of ``case``; rank r exits abruptly after ``die[r]`` tiles."""
    rank = torch.distributed.get_rank()

    def progress(event):
        if event.done == die.get(rank):
            os._exit(17)  # killed mid-way: no clean-up, no message

    return precompute_kernel(**case, progress=progress)


def disagreements(kernel, x, paths: list[str]) -> list[str]:
    """The errors of calls where the ranks disagree (inputs, hyperparameters) or rank 1 never calls."""
    rank = torch.distributed.get_rank()
    messages = []
    # Different inputs on rank 1.
    try:
        precompute_kernel(kernel, x + 1e-3 * rank, path=paths[0], tile_size=8, progress=False, timeout=20)
    except RankMismatchError as error:
        messages.append(str(error))
    # Different hyperparameters on rank 1.
    other = MLPKernel(depth=3, weight_variance=2.0 + rank)
    try:
        precompute_kernel(other, x, path=paths[1], tile_size=8, progress=False, timeout=20)
    except RankMismatchError as error:
        messages.append(str(error))
    # Rank 1 does not call at all: rank 0 must time out, not hang.
    if rank == 0:
        started = time.monotonic()
        try:
            precompute_kernel(kernel, x, path=paths[2], tile_size=8, progress=False, timeout=2)
        except GroupTimeoutError as error:
            messages.append(f"{time.monotonic() - started:.1f} {error}")
    else:
        time.sleep(4)
    return messages


def scenarios(cases: list[dict], disagree: tuple) -> dict:
    """One run of two ranks for several tests: the kernel matrices of ``cases``, then the disagreements."""
    return {"reports": precompute_all(cases), "messages": disagreements(*disagree)}
