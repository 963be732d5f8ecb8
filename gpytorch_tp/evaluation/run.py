"""The run: an architecture evaluated on two batches of inputs, in one piece or in tiles."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import fusion
from ..fusion import fusing
from ..layers.base import Layer
from ..state import KernelState, per_item_cache, shared_per_item_work
from .host_memory import empty_on_huge_pages, tune_allocator_if_asked
from .layout import check_inputs, input_layout, input_state
from .options import EvaluationOptions
from .plan import TilePlan, balanced, batch_size, in_column_panels
from .resources import default_memory_budget, resident_guard
from .workers import intra_op_threads, map_tiles, tile_workers

__all__ = ["evaluate", "records_grad", "same_inputs"]

# Rows and columns of tiles: at least this many items per side.
_MIN_TILE_SIDE = 64


def _run(architecture: Layer, state: KernelState) -> tuple[Tensor, Tensor | None]:
    out = architecture(state)
    if out.pair_ndim:
        raise ValueError(
            f"the architecture ends with features on a grid of positions {out.positions}; end it with a readout "
            "(Flatten or GlobalAvgPool for images, LastStep or TimeMean for sequences) and a Linear layer"
        )
    cross, ntk = out.cross, None
    if out.track_ntk:
        ntk = out.ntk if out.ntk is not None else torch.zeros_like(out.cross)
    if state.same_inputs and not state.diagonal:
        # Round-off differs between (i, j) and (j, i); make K(X, X) exactly symmetric.
        cross = (cross + cross.transpose(-1, -2)) / 2
        ntk = None if ntk is None else (ntk + ntk.transpose(-1, -2)) / 2
    return cross, ntk


def same_inputs(x1: Tensor, x2: Tensor | None) -> bool:
    """``x2`` holds the same points as ``x1`` (and mirroring tiles may not route a gradient wrongly)."""
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
    input_shape: tuple[int, ...] | None = None,
    memory_budget: int | None = None,
    progress: bool | None = None,
    sequence: bool = False,
    padding_value: float = float("nan"),
    fused: bool = False,
    options: EvaluationOptions | None = None,
) -> tuple[Tensor, Tensor | None]:
    """NNGP kernel (and NTK when ``ntk``) of ``architecture`` between ``x1`` and ``x2``.

    The evaluation options come as keywords or as one :class:`EvaluationOptions`
    (``options``, which kernels pass), not both.

    :param x1: inputs of shape ``(..., N1, d)``.
    :param x2: inputs of shape ``(..., N2, d)``; ``None`` means ``x1``.
    :param diag: return only the diagonal ``K(x1_i, x2_i)`` (needs ``N1 == N2``).
    :param ntk: also return the NTK (otherwise the second output is ``None``).
    :param tile_pairs: the full matrix is computed in tiles of about this many
        pairs of items; with ``x2`` equal to ``x1`` only tiles on or above the
        diagonal are computed and the others mirrored.  ``None`` (default)
        picks by device and by the numbers stored per pair (position pairs
        of images count): :data:`DEFAULT_TILE_PAIRS` pair elements on a CPU,
        :data:`DEFAULT_CUDA_TILE_PAIRS` on a GPU, fewer if ``memory_budget``
        requires.  On a CPU the tiles are shared out to
        ``torch.get_num_threads()`` worker threads, each running whole tiles
        with one intra-op thread (``torch.set_num_threads(1)`` makes the
        evaluation single-threaded).
    :param input_dim: expected number of features, checked when given.
    :param input_shape: the layout of each item's features: ``(C, H, W)``
        images or ``(C, L)`` signals flattened channel-major in the last
        dimension (``None``: plain features).
    :param memory_budget: bytes the evaluation may take besides its outputs:
        per-item input variances, tiles and the per-item work shared between
        them (``None``: a quarter of the free memory of the device, see
        :func:`default_memory_budget`).  Without autograd recording the
        evaluation stays within it (plus the outputs); with autograd, every
        tile's intermediates are kept for the backward pass.  A budget below
        one tile of one pair of items raises ``ValueError``; one that forces
        tiles far below their efficient size warns
        (:class:`MemoryBudgetWarning`).
    :param progress: show a ``tqdm`` progress bar over tiles: ``None``
        (default) shows one only on an interactive terminal and only for
        evaluations that last more than two seconds.
    :param sequence: the items are sequences, ``input_shape=(T, d)``, time-major,
        shorter ones padded at the end with whole steps of ``padding_value`` (see :class:`InputLayout`).
    :param padding_value: the value of padding steps of sequences (default NaN).
    :param fused: compile each run of layers with elementwise pair work (dense
        layers, ReLU-type and erf nonlinearities) into one pass over the pairs
        with ``torch.compile``, for items of plain features (not
        ``input_shape`` grids or sequences), for evaluations that autograd does
        not record and, on CUDA, also for those it does (a compiled backward;
        see :mod:`gpytorch_tp.fusion`; the first evaluation of a process pays
        the compilation, seconds).
    :param options: all the options above at once (then leave their keywords unset).
    :return: ``(nngp, ntk)``, each ``(..., N1, N2)`` (or ``(..., N)`` with ``diag``).
    """
    keywords_given = (
        any(value is not None for value in (input_shape, tile_pairs, memory_budget, progress))
        or sequence
        or fused
        or not math.isnan(padding_value)
    )
    if options is None:
        options = EvaluationOptions(
            input_shape=input_shape,
            sequence=sequence,
            padding_value=padding_value,
            tile_pairs=tile_pairs,
            memory_budget=memory_budget,
            progress=progress,
            fused=fused,
        )
    elif keywords_given:
        raise TypeError("evaluate takes its options as keywords or as options=EvaluationOptions(...), not both")
    check_inputs(x1, x2, input_dim, allow_nan=options.nan_padding)
    layout = input_layout(architecture, options.input_shape, x1.shape[-1], options.sequence, options.padding_value)
    memory_budget, budget_name = options.memory_budget, "memory_budget"
    if memory_budget is None:
        memory_budget = default_memory_budget(x1.device)
        budget_name = "the default memory_budget (a quarter of the free memory), memory_budget"
    n1 = x1.shape[-2]
    n2 = n1 if x2 is None or x2 is x1 else x2.shape[-2]
    plan = TilePlan.make(
        layout,
        x1,
        options.tile_pairs,
        memory_budget,
        options.progress,
        architecture.acts_on_position_blocks,
        # Items on a grid (images, sequences) spend their time in layers without an elementwise form
        # (convolutions, pooling, recurrences), which run best on worker threads: those stay unfused.
        fused=options.fused
        and not layout.positions
        and (fusion.fuses_gradients(x1.device) or not records_grad(architecture, x1, *(() if x2 is None else (x2,)))),
        items=n1 + (0 if x2 is None or x2 is x1 else n2),
        pairs=n1 if diag else n1 * n2,
        batch=batch_size(architecture, x1, x2),
        budget_name=budget_name,
    )
    with shared_per_item_work(limit_bytes=plan.cache_bytes):
        return _evaluate(architecture, x1, x2, diag, ntk, plan)

def _evaluate(architecture: Layer, x1: Tensor, x2: Tensor | None, diag: bool, ntk: bool, plan: TilePlan):
    layout = plan.layout
    if x2 is None or x2 is x1:
        x1, valid1 = layout.prepare(x1, "x1")
        x2, valid2, same = x1, valid1, True
    else:
        (x1, valid1), (x2, valid2) = layout.prepare(x1, "x1"), layout.prepare(x2, "x2")
        same = same_inputs(x1, x2) and (valid1 is None or torch.equal(valid1, valid2))
    if diag:
        if x1.shape[-2] != x2.shape[-2]:
            raise ValueError(f"diag=True needs as many x1 as x2 points, got {x1.shape[-2]} and {x2.shape[-2]}")
        n = x1.shape[-2]
        chunk = max(1, plan.tile_pairs)
        outputs = []
        with intra_op_threads(1 if n < _SMALL_PAIRS and x1.device.type == "cpu" else None):
            # At least one (possibly empty) chunk: 0 points give an empty result of the right shape and dtype.
            for start in range(0, max(n, 1), chunk):
                rows = slice(start, start + chunk)
                state = input_state(
                    x1[..., rows, :],
                    x2[..., rows, :],
                    diagonal=True,
                    same_inputs=same,
                    track_ntk=ntk,
                    layout=layout,
                    valid=(None, None) if valid1 is None else (valid1[..., rows, :], valid2[..., rows, :]),
                )
                outputs.append(_run(architecture, state))
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat([o[0] for o in outputs], -1), (torch.cat([o[1] for o in outputs], -1) if ntk else None)

    n1, n2 = x1.shape[-2], x2.shape[-2]
    if n1 * n2 <= plan.tile_pairs:
        small = n1 * n2 * layout.pair_elements < _SMALL_PAIRS and x1.device.type == "cpu"
        # A compiled (fused) program is specialised to the thread count it first ran with; keep it unchanged.
        with intra_op_threads(1 if small and not plan.fused else None):
            state = input_state(
                x1, x2, diagonal=False, same_inputs=same, track_ntk=ntk, layout=layout, valid=(valid1, valid2)
            )
            with fusing(plan.fused):
                return _run(architecture, state)
    return _evaluate_tiles(architecture, x1, x2, same, ntk, plan, valid1, valid2)


# Below this many pair elements an evaluation in one piece runs with one
# intra-op thread: splitting each of its small operations over the cores gains
# little and stalls for milliseconds whenever another process holds a core.
_SMALL_PAIRS = 2 * 256 * 256


def records_grad(architecture: Layer, *inputs: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(x.requires_grad for x in inputs) or any(p.requires_grad for p in architecture.parameters())


def _evaluate_tiles(
    architecture: Layer,
    x1: Tensor,
    x2: Tensor,
    same: bool,
    ntk: bool,
    plan: TilePlan,
    valid1: Tensor | None = None,
    valid2: Tensor | None = None,
):
    """The full matrix in tiles; with ``same``, tiles below the diagonal are mirrored."""
    n1, n2 = x1.shape[-2], x2.shape[-2]
    layout = plan.layout
    # Square tiles where possible, of equal lengths along each axis (no thin leftover row of tiles).
    side = max(1, int(plan.tile_pairs**0.5))
    # At least four rows (columns) of tiles, so that two to four worker threads
    # get balanced work (three tiles of 500 x 500 left one of two threads idle
    # half the time at N = 1000).
    side = min(side, max(_MIN_TILE_SIDE, -(-max(n1, n2) // 4)))
    row_side = balanced(n1, min(side, n1))
    col_side = balanced(n2, max(1, min(n2, plan.tile_pairs // row_side)))
    if same:
        row_side = col_side = min(row_side, col_side)
    dense = not layout.positions
    # Work shared by all tiles: the input variances (the same numbers
    # ``input_state`` computes) and, for plain features, the scaled inputs of
    # the cross products.
    var1 = layout.variances(x1)
    var2 = var1 if same else layout.variances(x2)
    x1_scaled = x1 / x1.shape[-1] if dense else None
    row_starts = range(0, n1, row_side)
    col_starts = row_starts if same else range(0, n2, col_side)
    # One tensor object per row (column) of tiles, so that layers share their
    # per-item work between the tiles of a row (see ``state.per_item``).
    pair_ndim = layout.pair_ndim
    item_axis = -1 - pair_ndim
    row_vars = {r: layout.outer(var1.narrow(item_axis, r, min(row_side, n1 - r)), var1)[0] for r in row_starts}
    col_vars = {c: layout.outer(var2, var2.narrow(item_axis, c, min(col_side, n2 - c)))[1] for c in col_starts}
    row_valid = {r: None for r in row_starts}
    col_valid = {c: None for c in col_starts}
    if valid1 is not None:
        row_valid = {r: layout.validity(valid1[..., r : r + row_side, :], valid2, False)[0] for r in row_starts}
        col_valid = {c: layout.validity(valid1, valid2[..., c : c + col_side, :], False)[1] for c in col_starts}

    def tile(r: int, c: int) -> tuple[Tensor, Tensor | None]:
        rows, cols = slice(r, r + row_side), slice(c, c + col_side)
        if dense:
            cross = x1_scaled[..., rows, :] @ x2[..., cols, :].transpose(-1, -2)
        else:
            cross = layout.cross(x1[..., rows, :], x2[..., cols, :])
        state = layout.state(
            row_vars[r],
            col_vars[c],
            cross,
            valid=(row_valid[r], col_valid[c]),
            track_ntk=ntk,
            same_inputs=same and r == c,
        )
        if state.same_inputs:
            state = state.replace(cross=cross)  # the self pairs get the variances exactly
        with fusing(plan.fused):
            return _run(architecture, state)

    tasks = [(r, c) for r in row_starts for c in col_starts if not (same and c < r)]
    record = records_grad(architecture, x1, x2)
    # The first tile runs in this thread before the others: it fills the caches
    # of hyperparameters and per-item work that all tiles share.  Tiles are small
    # enough that their operations run best on one core each (see map_tiles).
    # Compiled (fused) pair work is the exception: it holds the interpreter lock
    # while it runs, so its tiles run one after the other, each spread over the
    # cores by the compiled loop itself.
    spread_tiles = x1.device.type == "cpu" and not plan.fused
    workers = min(plan.workers, tile_workers(len(tasks) - 1, x1.device)) if spread_tiles else 1
    if x1.device.type == "cpu" and len(tasks) > 1:
        tune_allocator_if_asked()  # opt-in: see host_memory
    with intra_op_threads(1 if spread_tiles else None):
        cache = per_item_cache()
        held_before = 0 if cache is None else cache.held_bytes
        first = tile(*tasks[0])
        if cache is not None:
            per_item_bytes = (cache.held_bytes - held_before) / (row_side + col_side)
            tasks = tasks[:1] + in_column_panels(tasks[1:], col_side, cache.limit_bytes, per_item_bytes)
        if record:
            tiles = {tasks[0]: first}

            def compute(task: tuple[int, int]) -> None:
                tiles[task] = tile(*task)

            map_tiles(compute, tasks[1:], workers, grad=True, progress=plan.progress)
        else:
            # No autograd: each tile (and its mirror image) goes straight into the output.
            outputs = [
                None if value is None else empty_on_huge_pages(value, *value.shape[:-2], n1, n2) for value in first
            ]

            def store(r: int, c: int, values: tuple[Tensor, Tensor | None]) -> None:
                for out, value in zip(outputs, values):
                    if out is None:
                        continue
                    out[..., r : r + row_side, c : c + col_side] = value
                    if same and c > r:
                        out[..., c : c + col_side, r : r + row_side] = value.transpose(-1, -2)

            store(*tasks[0], first)
            # The outputs are filled page by page: their bytes count on top of the budget's live bound.
            output_bytes = sum(0 if out is None else out.numel() * out.element_size() for out in outputs)
            guard = resident_guard(x1.device, plan.resident_at_start, plan.guard_bytes + output_bytes, plan.guard_step)

            def store_tile(task: tuple[int, int]) -> None:
                store(*task, tile(*task))
                guard.check()

            map_tiles(store_tile, tasks[1:], workers, grad=False, progress=plan.progress)
            return outputs[0], outputs[1]

    # Autograd: build the matrix out of the tiles' graphs (mirrored tiles are views).
    def block(r: int, c: int, which: int) -> Tensor:
        return tiles[(c, r)][which].transpose(-1, -2) if same and c < r else tiles[(r, c)][which]

    def assemble(which: int) -> Tensor:
        return torch.cat([torch.cat([block(r, c, which) for c in col_starts], -1) for r in row_starts], -2)

    return assemble(0), (assemble(1) if ntk else None)
