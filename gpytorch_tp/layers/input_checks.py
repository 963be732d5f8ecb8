"""What a layer needs of its input state (a grid, a sequence, all position pairs), checked with one message each.

Shared by the layer families (convolutions, pooling, recurrent layers, readouts), so
that the same requirement is refused with the same advice wherever it is broken.
"""

from __future__ import annotations

from ..state import KernelState
from .base import Layer

__all__ = ["check_grid", "check_sequence", "require_all_pairs"]


def check_grid(layer: Layer, state: KernelState, grid_ndim: int | None) -> int:
    """The grid dimension of ``state``; refuses padded sequences, dense features and (``grid_ndim``) other grids."""
    if state.valid1 is not None:
        raise ValueError(
            f"{type(layer).__name__} on padded sequences would mix padding into the kernel; sequences of "
            "different lengths work with the recurrent layers and their readouts (LastStep, TimeMean)"
        )
    if not state.positions:
        raise ValueError(
            f"{type(layer).__name__} needs features on a grid of positions (images or signals), but its input "
            "has none: give the kernel input_shape=(C, H, W) or (C, L), and put grid layers before the readout "
            "(Flatten or GlobalAvgPool)"
        )
    if grid_ndim is not None and len(state.positions) != grid_ndim:
        raise ValueError(
            f"{type(layer).__name__} works on {grid_ndim}-d grids, but its input grid is "
            f"{len(state.positions)}-d with shape {state.positions}"
        )
    return len(state.positions)


def check_sequence(layer: Layer, state: KernelState) -> None:
    """Refuses states whose features are not on a 1-d grid of time steps."""
    if len(state.positions) != 1:
        raise ValueError(
            f"{type(layer).__name__} needs sequence features (a 1-d grid of time steps), got grid "
            f"{state.positions or 'none'}: give the kernel input_shape=(T, d) with sequence inputs"
        )


def require_all_pairs(layer: Layer, state: KernelState) -> None:
    """Refuses states with aligned position pairs only, for layers that average each side's positions."""
    if not state.all_position_pairs:
        raise RuntimeError(
            f"{type(layer).__name__} needs all position pairs but the state has aligned pairs only; "
            "evaluate the architecture through gpytorch_tp.evaluate or a kernel, which choose the pairing"
        )
