"""Grid arithmetic of convolutions and pooling: padding amounts and output sizes.

Shared by the infinite-width layers and their finite-width torch modules, so
that both pad and stride in exactly the same way.
"""

from __future__ import annotations

__all__ = ["PADDING_MODES", "Padding", "grid_tuple", "padding"]

PADDING_MODES = ("same", "valid", "circular")


class Padding(tuple):
    """``(before, after, output_size)`` of one grid axis."""

    @property
    def before(self) -> int:
        return self[0]

    @property
    def after(self) -> int:
        return self[1]

    @property
    def output_size(self) -> int:
        return self[2]


def padding(size: int, kernel: int, stride: int, mode: str) -> Padding:
    """Padding of one axis of ``size`` positions for a window of ``kernel`` moved by ``stride``.

    * ``"valid"``: no padding; ``(size - kernel) // stride + 1`` outputs;
    * ``"same"``: zeros, ``ceil(size / stride)`` outputs, the padding split
      evenly with the odd one after (as TensorFlow and neural-tangents do);
    * ``"circular"``: as ``"same"``, but wrapping around (periodic images).
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {mode!r}")
    if mode == "valid":
        if size < kernel:
            raise ValueError(f"a window of {kernel} does not fit in {size} positions with padding='valid'")
        return Padding((0, 0, (size - kernel) // stride + 1))
    output_size = -(-size // stride)
    total = max((output_size - 1) * stride + kernel - size, 0)
    before = total // 2
    if mode == "circular" and max(before, total - before) > size:
        raise ValueError(f"circular padding of {total} positions is more than the {size} positions it wraps")
    return Padding((before, total - before, output_size))


def grid_tuple(value: int | tuple[int, ...], grid_ndim: int, name: str) -> tuple[int, ...]:
    """``value`` as one positive integer per grid axis."""
    if isinstance(value, int):
        values = (value,) * grid_ndim
    elif isinstance(value, (tuple, list)):
        values = tuple(value)
    else:
        raise TypeError(f"{name} must be an int or a tuple of {grid_ndim} ints, got {value!r}")
    if len(values) != grid_ndim or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be an int or a tuple of {grid_ndim} ints, got {value!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return values
