"""The inputs of an evaluation: checks, how an item's features are laid out, the input state of the recursion."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.base import Layer
from ..state import KernelState

__all__ = ["InputLayout", "check_inputs", "input_layout", "input_state"]

# Up to this many channels, aligned input covariances are summed channel by channel.
_FEW_CHANNELS = 16


@dataclass(frozen=True)
class InputLayout:
    r"""How an item's features are laid out in the last input dimension.

    ``shape == (d,)``: ``d`` features.  ``shape == (C, *grid)``: ``C`` channels
    at each position of a grid (``(C, L)`` signals, ``(C, H, W)`` images),
    flattened channel-major as ``torch.flatten`` does.  The input kernel is
    :math:`K(p, p') = \sum_c x_c(p) x'_c(p') / C` per pair of positions.

    Sequences (``sequence=True``) come as ``(T, d)``, time-major as
    ``torch.flatten`` of a ``(T, d)`` batch-first sequence gives them, and
    :meth:`prepare` turns them into the channel-major layout ``(d, T)``.
    Shorter sequences are padded at the end with whole steps of
    ``padding_value`` (NaN by default; a finite sentinel such as ``-1e6``
    keeps the inputs finite, which GPyTorch's ``ExactGP`` training checks in
    debug mode need); the steps are moved so that every sequence ends at
    position ``T - 1`` and the state records which positions hold steps (see
    :class:`~gpytorch_tp.state.KernelState`), so padding never changes a value.
    """

    shape: tuple[int, ...]
    all_position_pairs: bool = False
    sequence: bool = False
    padding_value: float = float("nan")

    def prepare(self, x: Tensor, name: str) -> tuple[Tensor, Tensor | None]:
        """Inputs in the channel-major layout and, for sequences, each item's valid steps ``(..., N, T)``."""
        if not self.sequence:
            return x, None
        steps, d = self.shape[1], self.shape[0]
        x = x.reshape(*x.shape[:-1], steps, d)
        nan_padding = math.isnan(self.padding_value)
        pad_name = "NaN" if nan_padding else f"padding value {self.padding_value:g}"
        missing = torch.isnan(x) if nan_padding else x == self.padding_value
        padded = missing.all(-1)
        if bool((missing.any(-1) & ~padded).any()):
            raise ValueError(
                f"{name} has {pad_name} in some but not all features of a step; it marks whole padding steps"
            )
        if bool((padded[..., :-1] & ~padded[..., 1:]).any()):
            raise ValueError(f"{name} has a {pad_name} padding step before a real step; pad sequences at the end only")
        lengths = steps - padded.sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError(f"{name} holds an empty sequence (every step is {pad_name} padding)")
        if not bool(torch.isfinite(x[~padded]).all()):
            raise ValueError(f"{name} contains NaN or infinite values in its steps")
        # Move each sequence to the end: position t holds step t - (T - length).
        t = torch.arange(steps, device=x.device)
        source = (t - (steps - lengths).unsqueeze(-1)) % steps
        x = torch.gather(torch.where(padded.unsqueeze(-1), 0.0, x), -2, source.unsqueeze(-1).expand(x.shape))
        valid = t >= (steps - lengths).unsqueeze(-1)
        x = x * valid.unsqueeze(-1)
        return x.transpose(-1, -2).reshape(*x.shape[:-2], steps * d), valid.to(x.dtype)

    @property
    def positions(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def pair_ndim(self) -> int:
        return len(self.positions) * (2 if self.all_position_pairs else 1)

    @property
    def pair_elements(self) -> int:
        """Numbers stored per pair of items."""
        return math.prod(self.positions) ** (2 if self.all_position_pairs else 1)

    def _grid(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:-1], self.shape[0], math.prod(self.positions))

    def _unflatten(self, t: Tensor, lead: int) -> Tensor:
        grids = (self.positions * 2) if self.all_position_pairs else self.positions
        return t.reshape(*t.shape[:lead], *grids)

    def variances(self, x: Tensor) -> Tensor:
        """Each item with itself: ``(..., N, *pair_axes)``."""
        if not self.positions:
            return x.pow(2).sum(-1) / self.shape[0]
        g = self._grid(x)
        if self.all_position_pairs:
            v = torch.einsum("...ncp,...ncq->...npq", g, g).div_(self.shape[0])  # in place: no second copy
        else:
            v = g.pow(2).sum(-2) / self.shape[0]
        return self._unflatten(v, x.dim() - 1)

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        """Every item of ``x1`` with every item of ``x2``: ``(..., N1, N2, *pair_axes)``."""
        if not self.positions:
            return x1 @ x2.transpose(-1, -2) / self.shape[0]
        g1, g2 = self._grid(x1), self._grid(x2)
        if not self.all_position_pairs and self.shape[0] <= _FEW_CHANNELS:
            # A few broadcast products beat einsum's batched matrix product of C-wide matrices.
            a, b = g1.unsqueeze(-3), g2.unsqueeze(-4)
            c = a[..., 0, :] * b[..., 0, :]
            for channel in range(1, self.shape[0]):
                c.addcmul_(a[..., channel, :], b[..., channel, :])
            return self._unflatten(c.div_(self.shape[0]), x1.dim())
        pattern = "...icp,...jcq->...ijpq" if self.all_position_pairs else "...icp,...jcp->...ijp"
        c = torch.einsum(pattern, g1, g2).contiguous().div_(self.shape[0])
        return self._unflatten(c, x1.dim())

    def cross_diagonal(self, x1: Tensor, x2: Tensor) -> Tensor:
        """Item ``i`` of ``x1`` with item ``i`` of ``x2``: ``(..., N, *pair_axes)``."""
        if not self.positions:
            return (x1 * x2).sum(-1) / self.shape[0]
        g1, g2 = self._grid(x1), self._grid(x2)
        if self.all_position_pairs:
            c = torch.einsum("...ncp,...ncq->...npq", g1, g2).div_(self.shape[0])
        else:
            c = (g1 * g2).sum(-2) / self.shape[0]
        return self._unflatten(c, x1.dim() - 1)

    def outer(self, var1: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
        """Per-item variances (from :meth:`variances`) shaped for the ``outer`` pairing."""
        return var1.unsqueeze(-1 - self.pair_ndim), var2.unsqueeze(-2 - self.pair_ndim)

    def validity(self, valid1: Tensor | None, valid2: Tensor | None, diagonal: bool) -> tuple:
        """Per-item valid positions ``(..., N, T)`` shaped like :meth:`KernelState.position_variances`."""
        if valid1 is None:
            return None, None
        if not diagonal:
            valid1, valid2 = valid1.unsqueeze(-2), valid2.unsqueeze(-3)
        if self.all_position_pairs:
            valid1, valid2 = valid1.unsqueeze(-1), valid2.unsqueeze(-2)
        return valid1, valid2

    def state(
        self,
        var1: Tensor,
        var2: Tensor,
        cross: Tensor,
        valid: tuple[Tensor | None, Tensor | None] = (None, None),
        **flags: bool,
    ) -> KernelState:
        """The input state from the variances (shaped for the pairing) and the pairs' ``cross``."""
        return KernelState(
            cross=cross,
            var1=var1,
            var2=var2,
            positions=self.positions,
            all_position_pairs=self.all_position_pairs and bool(self.positions),
            valid1=valid[0],
            valid2=valid[1],
            **flags,
        )


def input_layout(
    architecture: Layer,
    input_shape: tuple[int, ...] | None,
    d: int,
    sequence: bool = False,
    padding_value: float = float("nan"),
) -> InputLayout:
    """The layout of ``d`` input features, with all position pairs if the architecture needs them.

    With ``sequence``, ``input_shape`` is ``(T, d)`` (time-major, NaN-padded; see :class:`InputLayout`).
    """
    if sequence and (input_shape is None or len(tuple(input_shape)) != 2):
        raise ValueError(f"sequence inputs need input_shape=(T, d), got {input_shape}")
    if input_shape is None:
        return InputLayout((d,))
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, e.g. (C, H, W), got {tuple(input_shape)}")
    if math.prod(shape) != d:
        raise ValueError(
            f"the inputs have {d} features per item, but input_shape={shape} needs {math.prod(shape)} "
            "(items are flattened in the last dimension)"
        )
    if sequence:
        shape = (shape[1], shape[0])  # channel-major inside: (d, T)
    return InputLayout(
        shape,
        all_position_pairs=len(shape) > 1 and architecture.needs_all_position_pairs,
        sequence=sequence,
        padding_value=float(padding_value),
    )


def check_inputs(x1: Tensor, x2: Tensor | None, input_dim: int | None = None, allow_nan: bool = False) -> None:
    """Raise a clear error for inputs no kernel can use (``allow_nan``: NaN padding is checked later)."""
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
        if not allow_nan and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    if x2 is not None:
        if x1.shape[-1] != x2.shape[-1]:
            raise ValueError(f"x1 has {x1.shape[-1]} features but x2 has {x2.shape[-1]}")
        if x1.dtype != x2.dtype:
            raise TypeError(f"x1 is {x1.dtype} but x2 is {x2.dtype}")
        if x1.device != x2.device:
            raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}")


def input_state(
    x1: Tensor,
    x2: Tensor,
    *,
    diagonal: bool,
    same_inputs: bool,
    track_ntk: bool,
    layout: InputLayout | None = None,
    valid: tuple[Tensor | None, Tensor | None] = (None, None),
) -> KernelState:
    r"""The state of the network input: :math:`K(x, x') = \langle x, x' \rangle / d` (per position pair), no NTK yet."""
    layout = layout or InputLayout((x1.shape[-1],))
    var1 = layout.variances(x1)
    var2 = var1 if same_inputs else layout.variances(x2)
    if diagonal:
        cross = var1 if same_inputs else layout.cross_diagonal(x1, x2)
        var1, var2 = torch.broadcast_tensors(var1, var2)
    else:
        cross = layout.cross(x1, x2)
        var1, var2 = layout.outer(var1, var2)
    state = layout.state(
        var1,
        var2,
        cross,
        valid=layout.validity(*valid, diagonal),
        track_ntk=track_ntk,
        diagonal=diagonal,
        same_inputs=same_inputs,
    )
    return state.replace(cross=cross) if same_inputs else state