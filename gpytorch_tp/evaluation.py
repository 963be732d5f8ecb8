"""Running an architecture on two batches of inputs: input checks, the input state, tiling."""

from __future__ import annotations

import torch
from torch import Tensor

from .layers.base import Layer, cached_hyperparameters
from .state import KernelState

__all__ = ["check_inputs", "input_state", "evaluate", "DEFAULT_TILE_PAIRS"]

# Pairs per tile.  Small enough that a tile's intermediates stay in the CPU's
# caches, large enough that per-operation overhead is negligible.
DEFAULT_TILE_PAIRS = 128 * 128


def check_inputs(x1: Tensor, x2: Tensor | None, input_dim: int | None = None) -> None:
    """Raise a clear error for inputs no kernel can use."""
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
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    if x2 is not None:
        if x1.shape[-1] != x2.shape[-1]:
            raise ValueError(f"x1 has {x1.shape[-1]} features but x2 has {x2.shape[-1]}")
        if x1.dtype != x2.dtype:
            raise TypeError(f"x1 is {x1.dtype} but x2 is {x2.dtype}")
        if x1.device != x2.device:
            raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}")


def input_state(x1: Tensor, x2: Tensor, *, diagonal: bool, same_inputs: bool, track_ntk: bool) -> KernelState:
    r"""The state of the network input: :math:`K(x, x') = \langle x, x' \rangle / d`, no NTK yet."""
    d = x1.shape[-1]
    var1 = x1.pow(2).sum(-1) / d
    var2 = var1 if same_inputs else x2.pow(2).sum(-1) / d
    if diagonal:
        cross = var1 if same_inputs else (x1 * x2).sum(-1) / d
        var1, var2 = torch.broadcast_tensors(var1, var2)
    else:
        cross = x1 @ x2.transpose(-1, -2) / d
        var1, var2 = var1.unsqueeze(-1), var2.unsqueeze(-2)
    state = KernelState(
        cross=cross,
        var1=var1,
        var2=var2,
        track_ntk=track_ntk,
        diagonal=diagonal,
        same_inputs=same_inputs,
    )
    return state.replace(cross=cross) if same_inputs else state


def _run(architecture: Layer, state: KernelState) -> tuple[Tensor, Tensor | None]:
    out = architecture(state)
    if out.pair_ndim:
        raise ValueError(
            f"the architecture ends with {out.pair_ndim} spatial/time axes left; end it with a readout layer"
        )
    cross, ntk = out.cross, None
    if out.track_ntk:
        ntk = out.ntk if out.ntk is not None else torch.zeros_like(out.cross)
    if state.same_inputs and not state.diagonal:
        # Round-off differs between (i, j) and (j, i); make K(X, X) exactly symmetric.
        cross = (cross + cross.transpose(-1, -2)) / 2
        ntk = None if ntk is None else (ntk + ntk.transpose(-1, -2)) / 2
    return cross, ntk


def _same_inputs(x1: Tensor, x2: Tensor | None) -> bool:
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
    tile_pairs: int = DEFAULT_TILE_PAIRS,
    input_dim: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """NNGP kernel (and NTK when ``ntk``) of ``architecture`` between ``x1`` and ``x2``.

    :param x1: inputs of shape ``(..., N1, d)``.
    :param x2: inputs of shape ``(..., N2, d)``; ``None`` means ``x1``.
    :param diag: return only the diagonal ``K(x1_i, x2_i)`` (needs ``N1 == N2``).
    :param ntk: also return the NTK (otherwise the second output is ``None``).
    :param tile_pairs: the full matrix is computed in tiles of about this many
        pairs; with ``x2`` equal to ``x1`` only tiles on or above the diagonal
        are computed and the others mirrored.
    :param input_dim: expected number of features, checked when given.
    :return: ``(nngp, ntk)``, each ``(..., N1, N2)`` (or ``(..., N)`` with ``diag``).
    """
    check_inputs(x1, x2, input_dim)
    with cached_hyperparameters():
        return _evaluate(architecture, x1, x2, diag, ntk, tile_pairs)


def _evaluate(architecture: Layer, x1: Tensor, x2: Tensor | None, diag: bool, ntk: bool, tile_pairs: int):
    same = _same_inputs(x1, x2)
    if x2 is None:
        x2 = x1
    if diag:
        if x1.shape[-2] != x2.shape[-2]:
            raise ValueError(f"diag=True needs as many x1 as x2 points, got {x1.shape[-2]} and {x2.shape[-2]}")
        return _run(architecture, input_state(x1, x2, diagonal=True, same_inputs=same, track_ntk=ntk))

    n1, n2 = x1.shape[-2], x2.shape[-2]
    if n1 * n2 <= tile_pairs:
        return _run(architecture, input_state(x1, x2, diagonal=False, same_inputs=same, track_ntk=ntk))

    side = max(1, int(tile_pairs**0.5))
    row_starts = list(range(0, n1, side))
    col_starts = row_starts if same else list(range(0, n2, side))
    tiles: dict[tuple[int, int], tuple[Tensor, Tensor | None]] = {}
    for i, r in enumerate(row_starts):
        for j, c in enumerate(col_starts):
            if same and j < i:
                k, t = tiles[(j, i)]
                tiles[(i, j)] = (k.transpose(-1, -2), None if t is None else t.transpose(-1, -2))
                continue
            state = input_state(
                x1[..., r : r + side, :],
                x2[..., c : c + side, :],
                diagonal=False,
                same_inputs=same and i == j,
                track_ntk=ntk,
            )
            tiles[(i, j)] = _run(architecture, state)

    def assemble(which: int) -> Tensor:
        first = tiles[(0, 0)][which]
        if torch.is_grad_enabled() and first.requires_grad:
            rows = [torch.cat([tiles[(i, j)][which] for j in range(len(col_starts))], dim=-1) for i in range(len(row_starts))]
            return torch.cat(rows, dim=-2)
        # Without autograd, copy tiles straight into place (much faster than nested cat).
        out = first.new_empty(*first.shape[:-2], n1, n2)
        for (i, j), tile in tiles.items():
            r, c = row_starts[i], col_starts[j]
            out[..., r : r + side, c : c + side] = tile[which]
        return out

    return assemble(0), (assemble(1) if ntk else None)
