r"""Learned positional embeddings of sequence tokens, at infinite width.

A learned positional embedding is a table :math:`P \in \mathbb{R}^{n \times T}`
of trained parameters, initialised i.i.d. :math:`N(0, 1)` and used as
:math:`\sigma_p P_{:, k}` at step :math:`k` of every sequence.  Steps count
from each sequence's own first token, so a sequence padded at the end gets
the same embeddings as the same sequence unpadded.  The table is shared by all
sequences, so the embeddings of two tokens are equal when their steps are
equal and independent otherwise:

.. math::

    K_p(x_t, x'_{t'}) = \sigma_p^2 \, [k(t) = k'(t')], \qquad \Theta_p = K_p,

(:math:`\Theta_p`: the gradient with respect to :math:`P` itself).  The layer
either adds the embedding to the features (``mode="add"``: kernels add) or
appends it as as many extra channels as the features have
(``mode="concat"``: the next layer sees both halves, so the kernels
average).  The table must be as wide as the network: the layer acts on the
Gaussian features of a wide layer (after the token embedding
:class:`~gpytorch_tp.layers.Linear`), never on the network input, whose
:math:`d` features would make a table of finitely many rows and a kernel that
stays random at infinite width.  The result is Gaussian.
"""

from __future__ import annotations

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor, nn

from ..finite import LearnedPositions
from ..state import KernelState, per_item, unit_dims
from .base import Layer, standard_deviation, variance_property

__all__ = ["MODES", "PositionalEmbedding"]

MODES = ("add", "concat")


class PositionalEmbedding(Layer):
    r"""Learned positional embedding, added to or concatenated with the token features.

    See the module docstring for the kernel.  Put it after the embedding
    :class:`~gpytorch_tp.layers.Linear` (or on the inputs themselves).

    :param variance: :math:`\sigma_p^2` (default 1).
    :param mode: ``"add"`` or ``"concat"`` (extra channels, as many as the features have).
    :param variance_prior: optional prior on :math:`\sigma_p^2`.
    :param variance_constraint: constraint (default ``GreaterThan(1e-6)``, lower for smaller starting values).

    Example:
        >>> from gpytorch_tp.layers import Linear, PositionalEmbedding, Sequential
        >>> embed = Sequential(Linear(), PositionalEmbedding(0.5, mode="add"))
    """

    def __init__(
        self,
        variance: float | Tensor = 1.0,
        mode: str = "add",
        *,
        variance_prior: Prior | None = None,
        variance_constraint: Interval | None = None,
        batch_shape: torch.Size = torch.Size(),
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.register_variance(
            "variance",
            variance,
            batch_shape=batch_shape,
            prior=variance_prior,
            constraint=variance_constraint,
            allow_zero=False,
        )

    variance = variance_property("variance")

    def forward(self, state: KernelState) -> KernelState:
        if len(state.positions) != 1:
            raise ValueError(
                f"PositionalEmbedding needs sequence features (a 1-d grid of tokens), got grid "
                f"{state.positions or 'none'}: give the kernel input_shape=(T, d) with sequence inputs"
            )
        if not state.gaussian:
            raise ValueError(
                "PositionalEmbedding needs the Gaussian features of a wide layer, e.g. after the token embedding "
                "Linear: on the network input (d features) the table would have d rows, a finite number, and "
                "its kernel would stay random as the width grows; after a nonlinearity put a Linear layer first"
            )
        all_pairs = state.all_position_pairs
        steps = state.positions[0]
        variance = unit_dims(self.variance, state.item_ndim + state.pair_ndim)
        same = _same_steps(state.valid1, state.valid2, steps, all_pairs, state.cross)
        embedding = variance * same
        var1 = per_item(self._with_self_embedding, state.var1, state.valid1, variance, all_pairs)
        var2 = per_item(self._with_self_embedding, state.var2, state.valid2, variance, all_pairs)
        cross = state.cross + embedding
        ntk = None
        if state.track_ntk:
            ntk = embedding if state.ntk is None else state.ntk + embedding
        if self.mode == "concat":
            cross = cross / 2
            ntk = None if ntk is None else ntk / 2
        return state.replace(cross=cross, var1=var1, var2=var2, ntk=ntk)

    def _with_self_embedding(self, var: Tensor, valid: Tensor | None, variance: Tensor, all_pairs: bool) -> Tensor:
        """An item's own covariance plus its embedding's: same step means same position."""
        if all_pairs:
            steps = var.shape[-1]
            own = torch.eye(steps, dtype=var.dtype, device=var.device)
            own = own if valid is None else own * valid
        else:
            own = torch.ones_like(var) if valid is None else valid
        out = var + variance * own
        return out / 2 if self.mode == "concat" else out

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(
                f"PositionalEmbedding needs sequence features (channels, T), got feature shape {tuple(in_shape)}"
            )
        channels, steps = in_shape
        module = LearnedPositions(channels, steps, standard_deviation(self.variance.detach()), self.mode)
        return module, ((2 * channels if self.mode == "concat" else channels), steps)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, " + super().extra_repr()


def _same_steps(valid1: Tensor | None, valid2: Tensor | None, steps: int, all_pairs: bool, like: Tensor) -> Tensor:
    """1 where two tokens are at the same step of their own sequences (both real tokens), else 0.

    Sequences are aligned at their ends (see :class:`~gpytorch_tp.evaluation.InputLayout`):
    position ``p`` of a sequence of length ``L`` holds step ``p - (T - L)``.
    """
    if valid1 is None:
        if all_pairs:
            return torch.eye(steps, dtype=like.dtype, device=like.device)
        return torch.ones((), dtype=like.dtype, device=like.device)
    position = torch.arange(steps, dtype=like.dtype, device=like.device)
    if all_pairs:
        # valid1 is a column of query positions (..., T, 1), valid2 a row (..., 1, T).
        first = position.unsqueeze(-1) - (steps - valid1.sum(-2, keepdim=True))
        second = position - (steps - valid2.sum(-1, keepdim=True))
    else:
        first = position - (steps - valid1.sum(-1, keepdim=True))
        second = position - (steps - valid2.sum(-1, keepdim=True))
    return (first == second).to(like.dtype) * valid1 * valid2
