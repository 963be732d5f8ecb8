"""Early stopping: the training time at which a predicted loss curve is smallest.

:meth:`TrainedNetworkGP.optimal_stopping_time <gpytorch_tp.dynamics.TrainedNetworkGP.optimal_stopping_time>`
hands :func:`search_stopping_time` its loss as a function of training time and the
eigenvalues of the trained modes; the search is a logarithmic grid spanning those
modes' time scales, refined by a golden-section search in log time
(:func:`golden_section_minimum`) or, for gradient-descent steps, exhaustively.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["StoppingTime", "golden_section_minimum", "search_stopping_time"]


class StoppingTime(NamedTuple):
    """Result of :meth:`~gpytorch_tp.dynamics.TrainedNetworkGP.optimal_stopping_time`.

    ``time`` is a training time (gradient flow) or a number of steps (gradient
    descent); it is ``inf`` when the loss only decreases.  ``loss`` is the
    predicted loss there, ``loss_at_end`` the predicted loss after training to
    convergence (``t = inf``), for comparison.
    """

    time: float
    loss: float
    loss_at_end: float


def search_stopping_time(
    loss: Callable[[Tensor], Tensor], eigenvalues: Tensor, rate: float, *, discrete: bool, points_per_decade: int
) -> StoppingTime:
    """The time (or number of steps, with ``discrete``) minimising ``loss``, a map of float64 times to losses.

    ``eigenvalues`` are those of the trained modes (the training kernel's, without its null
    space) and ``rate`` the gradient flow's rate, so the modes decay as ``exp(-rate mu t)``: the
    grid runs from a thousandth of the fastest mode's time scale to a thousand times the slowest's.
    """
    inf = torch.tensor([math.inf], dtype=torch.float64)
    loss_end = float(loss(inf)[0])
    if eigenvalues.numel() == 0:
        return StoppingTime(0.0, float(loss(torch.zeros(1, dtype=torch.float64))[0]), loss_end)
    fastest = float(eigenvalues.max()) * rate
    slowest = float(eigenvalues.min()) * rate
    lo, hi = 1e-3 / fastest, 1e3 / slowest
    count = max(8, math.ceil(points_per_decade * math.log10(hi / lo)))
    grid = torch.logspace(math.log10(lo), math.log10(hi), count, dtype=torch.float64)
    if discrete:
        grid = torch.unique(torch.cat([torch.arange(0.0, 10.0, dtype=torch.float64), grid.round()]))
    else:
        grid = torch.cat([torch.zeros(1, dtype=torch.float64), grid])
    values = torch.cat([loss(chunk) for chunk in grid.split(4096)])
    best = int(torch.argmin(values))
    best_time, best_loss = float(grid[best]), float(values[best])
    # Losses equal to the converged one up to round-off mean "train to convergence".
    if loss_end <= best_loss + 1e-9 * abs(best_loss) + 1e-12 * float(values[0]):
        return StoppingTime(math.inf, loss_end, loss_end)
    left = float(grid[max(best - 1, 0)])
    right = float(grid[min(best + 1, len(grid) - 1)])
    if discrete:
        candidates = torch.arange(left, right + 1.0, dtype=torch.float64)
        if candidates.numel() > 100_000:
            candidates = torch.unique(torch.linspace(left, right, 100_000, dtype=torch.float64).round())
        values = torch.cat([loss(chunk) for chunk in candidates.split(4096)])
        i = int(torch.argmin(values))
        best_time, best_loss = float(candidates[i]), float(values[i])
    elif right > left:
        best_time, best_loss = golden_section_minimum(
            lambda s: float(loss(torch.tensor([s], dtype=torch.float64))[0]), left, right, best_time, best_loss
        )
    return StoppingTime(best_time, best_loss, loss_end)


def golden_section_minimum(
    f: Callable[[float], float], left: float, right: float, best_time: float, best_value: float
) -> tuple[float, float]:
    """Minimise ``f`` over ``[left, right]`` (in log space when ``left > 0``), starting from a known best point."""
    use_log = left > 0
    a, b = (math.log(left), math.log(right)) if use_log else (left, right)
    to_time = math.exp if use_log else (lambda s: s)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(to_time(c)), f(to_time(d))
    for _ in range(80):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(to_time(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(to_time(d))
        if abs(b - a) <= 1e-10 * max(1.0, abs(a)):
            break
    for s, v in ((c, fc), (d, fd)):
        if v < best_value:
            best_time, best_value = to_time(s), v
    return best_time, best_value
