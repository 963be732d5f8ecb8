"""Tile planning: how many pairs of items a tile holds, how many worker threads, how the memory budget is spent."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.base import Layer
from .host_memory import resident_bytes
from .layout import InputLayout
from .resources import cpu_tile_pairs
from .workers import tile_workers

__all__ = [
    "DEFAULT_CUDA_TILE_PAIRS",
    "DEFAULT_TILE_PAIRS",
    "FUSED_CPU_TILE_PAIRS",
    "LIVE_TILE_TENSORS",
    "MemoryBudgetWarning",
    "TilePlan",
    "balanced",
    "batch_size",
    "in_column_panels",
]

# Pair elements per tile on a CPU (for dense networks: pairs of items); items
# with positions (pixels) count their position pairs, so a tile then holds fewer pairs of items.
DEFAULT_TILE_PAIRS = cpu_tile_pairs()
# On a GPU the per-operation launch cost dominates small tiles; a tile of this
# many pair elements holds the whole matrix of a few thousand points, and its
# dozen float64 intermediates take about 1.3 GiB.
DEFAULT_CUDA_TILE_PAIRS = 4096 * 4096
# Fused (compiled) pair work keeps no tile-sized intermediates and runs its tiles
# one after the other, each spread over the cores: larger CPU tiles pay for fewer
# calls (docs/benchmarks.md, "Tile sizes").
FUSED_CPU_TILE_PAIRS = 1024 * 1024
# Tile-sized tensors alive at once while a tile goes through an architecture
# (the NNGP, the NTK, a layer's intermediates), for the memory budget: 6 to 9
# were measured at the peak of one tile; 24 leaves room for other layers.
LIVE_TILE_TENSORS = 24
# A budget-forced tile this many times smaller than the efficient one warns:
# every tile pays a fixed per-operation overhead (docs/benchmarks.md, "Tile sizes").
_SLOW_TILE_FACTOR = 64
_MIN_TILE_PAIRS = 4


def batch_size(architecture: Layer, x1: Tensor, x2: Tensor | None) -> int:
    """Entries of the batch shape that every tile carries (the inputs' and the hyperparameters')."""
    shapes = [x1.shape[:-2]] + ([] if x2 is None else [x2.shape[:-2]])
    try:
        size = math.prod(torch.broadcast_shapes(*shapes, *(p.shape for p in architecture.parameters())))
    except RuntimeError:  # parameters that are not batch-shaped
        size = math.prod(torch.broadcast_shapes(*shapes))
    return max(1, size)  # an empty batch plans like one entry: nothing is evaluated


class MemoryBudgetWarning(UserWarning):
    """The memory budget forces tiles far below their efficient size: the evaluation runs several times slower."""


@dataclass(frozen=True)
class TilePlan:
    """How an evaluation is cut up and run: input layout, pairs of items per tile, progress bar, fusion, memory.

    The memory budget ``B`` is spent as follows (CPU and GPU alike, without
    autograd recording): the per-item input variances of all items and the
    prepared inputs (``fixed``) first; of the rest, ``W = B - fixed``, half goes
    to the tiles in flight (``LIVE_TILE_TENSORS`` tile-sized tensors per
    worker thread), a quarter to the per-item work shared between tiles
    (``cache_bytes``) and a quarter is left to the allocator's fragmentation:
    on a CPU, :class:`~gpytorch_tp.evaluation.host_memory.ResidentGuard` hands free pages
    back whenever resident memory comes within 15% of the budget
    (``guard_bytes``).
    """

    layout: InputLayout
    tile_pairs: int
    progress: bool | None
    fused: bool = False
    workers: int = 1
    cache_bytes: float = float("inf")
    guard_bytes: float = float("inf")
    guard_step: float = float("inf")
    # The process's resident memory when the evaluation began (CPU; None where unknown).
    resident_at_start: int | None = None

    @classmethod
    def make(
        cls,
        layout: InputLayout,
        x: Tensor,
        tile_pairs: int | None,
        budget: int,
        progress: bool | None,
        position_blocks: bool = False,
        fused: bool = False,
        *,
        items: int = 0,
        pairs: int = 0,
        batch: int = 1,
        budget_name: str = "memory_budget",
    ):
        element = x.element_size()
        # One tile-sized tensor, per pair of items; the inputs' per-item work, for all items.
        per_pair = batch * layout.pair_elements * element
        fixed = batch * items * (layout.pair_elements + 2 * x.shape[-1]) * element
        one_pair_tile = LIVE_TILE_TENSORS * per_pair
        minimum = fixed + 2 * one_pair_tile
        if budget < minimum:
            raise ValueError(
                f"{budget_name}={int(budget)} bytes is too small for this evaluation: it needs at least "
                f"{int(minimum)} bytes ({int(fixed)} for the inputs' per-item variances, and twice "
                f"{int(one_pair_tile)} for a tile of a single pair of items: {LIVE_TILE_TENSORS} tensors of "
                f"{per_pair} bytes); give a larger memory_budget"
            )
        working = budget - fixed
        # Fewer worker threads rather than tiles below one pair each.
        workers = min(tile_workers(2**30, x.device), max(1, int(working / 2 / one_pair_tile)))
        budget_pairs = max(1, int(working / 2 / workers / one_pair_tile))
        if tile_pairs is None:
            if x.device.type == "cuda":
                target = DEFAULT_CUDA_TILE_PAIRS
            else:
                target = FUSED_CPU_TILE_PAIRS if fused else DEFAULT_TILE_PAIRS
            # Items with all pixel pairs hold many numbers per pair: a tile of
            # about DEFAULT_TILE_PAIRS numbers stays in cache and is fastest even
            # when it holds only 2 x 2 items (docs/benchmarks.md, "Tile sizes").
            # The per-item work is reused across tiles (see in_column_panels).
            # A recurrent recursion works on one step (of T) at a time, so
            # sequences count the numbers of one step per pair, unless a layer
            # works on whole blocks of step pairs (attention).
            stepwise = layout.sequence and not position_blocks
            per_operation = layout.pair_elements // (layout.positions[0] if stepwise else 1)
            efficient = max(_MIN_TILE_PAIRS, target // max(1, per_operation))
            tile_pairs = min(efficient, budget_pairs)
            wanted = min(efficient, max(pairs, 1))
            if tile_pairs * _SLOW_TILE_FACTOR < wanted:
                enough = fixed + 2 * workers * wanted * one_pair_tile
                warnings.warn(
                    f"{budget_name}={int(budget)} bytes limits tiles to {tile_pairs} pairs of items where "
                    f"{wanted} would be efficient: every tile pays a fixed overhead, so this evaluation runs "
                    f"several times slower (tens of times for tiles of a few pairs); about {int(enough)} bytes "
                    "allow efficient tiles",
                    MemoryBudgetWarning,
                    stacklevel=4,
                )
        elif int(tile_pairs) < 1:
            raise ValueError(f"tile_pairs must be positive, got {tile_pairs}")
        return cls(
            layout,
            int(tile_pairs),
            progress,
            fused,
            workers=workers,
            cache_bytes=working / 4,
            # Free pages are handed back only near the budget (each trim costs tens of milliseconds,
            # docs/benchmarks.md, "Tile sizes"); while live data sits above that, again after each
            # sixteenth of the working memory of growth.
            guard_bytes=fixed + 0.85 * working,
            guard_step=working / 16,
            resident_at_start=resident_bytes() if x.device.type == "cpu" else None,
        )

def in_column_panels(
    tasks: list[tuple[int, int]], col_side: int, limit_bytes: float, per_item_bytes: float
) -> list[tuple[int, int]]:
    """Tiles ordered by panels of columns whose per-item work fits in half the per-item cache.

    Row by row, every tile row needs the per-item work of every column; when all
    columns' work outgrows the cache (all pixel pairs of many images), it would be
    emptied and recomputed for each row of tiles.  Within a panel it is computed
    once and reused by all rows.
    """
    if per_item_bytes <= 0 or not math.isfinite(limit_bytes):
        return tasks
    panel = max(col_side, int(limit_bytes / 2 / per_item_bytes) // col_side * col_side)
    return sorted(tasks, key=lambda task: (task[1] // panel, task[0], task[1]))


def balanced(n: int, side: int) -> int:
    """The tile length that cuts ``n`` items into as many tiles as ``side`` would, all of about equal length."""
    return -(-n // -(-n // side))
