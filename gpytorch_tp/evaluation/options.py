"""How an evaluation runs: one validated object for what a kernel passes to every evaluation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["EvaluationOptions"]


@dataclass(frozen=True)
class EvaluationOptions:
    """The options of an evaluation, checked once where they are made.

    :param input_shape: layout of each item's features in the last input
        dimension: ``(C, H, W)`` images, ``(C, L)`` signals, ``(T, d)``
        sequences (``None``: plain features).
    :param sequence: the items are sequences, ``input_shape=(T, d)``,
        time-major, shorter ones padded at the end with whole steps of ``padding_value``.
    :param padding_value: the value of padding steps (NaN by default).
    :param tile_pairs: pairs of items per tile (``None``: chosen by device,
        layout and ``memory_budget``).
    :param memory_budget: bytes the evaluation may use besides its outputs
        (``None``: a quarter of the device's free memory).
    :param progress: progress bar over tiles (``None``: on a terminal, for
        evaluations longer than 2 s).
    :param fused: compile runs of elementwise pair work (see :mod:`gpytorch_tp.fusion`).
    :param matrix_free: kernel matrices as matrix-free operators: ``True``,
        ``False`` or ``None`` (automatic; see :class:`~gpytorch_tp.TensorProgramKernel`).
    """

    input_shape: tuple[int, ...] | None = None
    sequence: bool = False
    padding_value: float = float("nan")
    tile_pairs: int | None = None
    memory_budget: int | None = None
    progress: bool | None = None
    fused: bool = False
    matrix_free: bool | None = None

    def __post_init__(self):
        if self.input_shape is not None:
            shape = tuple(int(s) for s in self.input_shape)
            if not shape or any(s < 1 for s in shape):
                raise ValueError(f"input_shape must be positive sizes, e.g. (C, H, W), got {tuple(self.input_shape)}")
            object.__setattr__(self, "input_shape", shape)
        if self.sequence not in (True, False):
            raise ValueError(f"sequence must be True or False, got {self.sequence!r}")
        if self.sequence and (self.input_shape is None or len(self.input_shape) != 2):
            raise ValueError(f"sequence inputs need input_shape=(T, d), got {self.input_shape}")
        object.__setattr__(self, "sequence", bool(self.sequence))
        object.__setattr__(self, "padding_value", float(self.padding_value))
        if self.tile_pairs is not None:
            if int(self.tile_pairs) < 1:
                raise ValueError(f"tile_pairs must be positive, got {self.tile_pairs}")
            object.__setattr__(self, "tile_pairs", int(self.tile_pairs))
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")
        if self.progress not in (None, True, False):
            raise ValueError(f"progress must be True, False or None (on a terminal), got {self.progress!r}")
        if self.fused not in (True, False):
            raise ValueError(f"fused must be True or False, got {self.fused!r}")
        object.__setattr__(self, "fused", bool(self.fused))
        if self.matrix_free not in (None, True, False):
            raise ValueError(f"matrix_free must be True, False or None (automatic), got {self.matrix_free!r}")

    @property
    def nan_padding(self) -> bool:
        """Sequences padded with NaN: NaN inputs are padding, checked when the sequences are laid out."""
        return self.sequence and math.isnan(self.padding_value)

    @property
    def plain_features(self) -> bool:
        """Items are plain feature vectors (no grid, no sequence)."""
        return self.input_shape is None and not self.sequence

    def replace(self, **changes) -> EvaluationOptions:
        """These options with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    def for_dimensions(self) -> EvaluationOptions:
        """The options for one input dimension at a time (``last_dim_is_batch``): plain features."""
        return self.replace(input_shape=None, sequence=False)
