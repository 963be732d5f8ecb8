r"""Readouts: the layers that end a grid or a sequence, leaving one covariance per pair of items.

A readout removes the position axes of the state (see
:class:`~gpytorch_tp.state.KernelState`), so what follows it is dense (a
:class:`~gpytorch_tp.layers.Linear` output layer).  Of a grid (images,
signals): :class:`Flatten` (the aligned positions' mean, so aligned pairs
suffice) and :class:`GlobalAvgPool` (all position pairs).  Of a sequence
(padded sequences are aligned at their ends): :class:`LastStep` (aligned step
pairs suffice), :class:`FirstStep` and :class:`TimeMean` (all step pairs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..finite import FirstPosition as FiniteFirstPosition
from ..finite import GlobalAvgPool as FiniteGlobalAvgPool
from ..finite import LastPosition as FiniteLastPosition
from ..state import KernelState, per_item
from .base import Layer
from .input_checks import check_grid, check_sequence, require_all_pairs

__all__ = ["FirstStep", "Flatten", "GlobalAvgPool", "LastStep", "TimeMean"]

# -- readouts of a grid ------------------------------------------------------------------------


class GlobalAvgPool(Layer):
    r"""Readout: the mean over all positions, :math:`K \leftarrow \frac{1}{P^2} \sum_{p, p'} K(p, p')`.

    Follow it with a :class:`~gpytorch_tp.layers.Linear` layer.
    """

    needs_all_position_pairs = True

    def forward(self, state: KernelState) -> KernelState:
        check_grid(self, state, None)
        require_all_pairs(self, state)
        dims = tuple(range(-state.pair_ndim, 0))
        return state.replace(
            cross=state.cross.mean(dims),
            var1=per_item(torch.mean, state.var1, dims),
            var2=per_item(torch.mean, state.var2, dims),
            ntk=None if state.ntk is None else state.ntk.mean(dims),
            positions=(),
            all_position_pairs=False,
        )

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        return FiniteGlobalAvgPool(len(in_shape) - 1), (in_shape[0],)


class Flatten(Layer):
    r"""Readout: all positions' features side by side, :math:`K \leftarrow \frac{1}{P} \sum_p K(p, p)`.

    A dense layer on the flattened features (fan-in :math:`C P`) sees the mean
    over aligned positions only, so a network with this readout and no pooling
    needs aligned pairs only (cost :math:`O(P)` per pair of items).  Follow it
    with a :class:`~gpytorch_tp.layers.Linear` layer.
    """

    def forward(self, state: KernelState) -> KernelState:
        check_grid(self, state, None)
        return state.replace(
            cross=_aligned_mean(state.cross, state.positions, state.all_position_pairs),
            var1=per_item(_aligned_mean, state.var1, state.positions, state.all_position_pairs),
            var2=per_item(_aligned_mean, state.var2, state.positions, state.all_position_pairs),
            ntk=None if state.ntk is None else _aligned_mean(state.ntk, state.positions, state.all_position_pairs),
            positions=(),
            all_position_pairs=False,
        )

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        return nn.Flatten(-len(in_shape)), (math.prod(in_shape),)


def _aligned_mean(tensor: Tensor, positions: tuple[int, ...], all_pairs: bool) -> Tensor:
    count = math.prod(positions)
    if all_pairs:
        lead = tensor.shape[: tensor.dim() - 2 * len(positions)]
        return tensor.reshape(*lead, count, count).diagonal(dim1=-2, dim2=-1).mean(-1)
    lead = tensor.shape[: tensor.dim() - len(positions)]
    return tensor.reshape(*lead, count).mean(-1)


# -- readouts of a sequence --------------------------------------------------------------------


class LastStep(Layer):
    r"""Readout: the state at the last step, :math:`K \leftarrow K(T - 1, T - 1)`.

    Padded sequences are aligned at their ends, so this is every sequence's
    own last step.  Needs aligned step pairs only.
    """

    def forward(self, state: KernelState) -> KernelState:
        check_sequence(self, state)
        if state.all_position_pairs:
            pick = _last_pair
        else:
            pick = _last_step
        return state.replace(
            cross=pick(state.cross),
            var1=per_item(pick, state.var1),
            var2=per_item(pick, state.var2),
            ntk=None if state.ntk is None else pick(state.ntk),
            positions=(),
            all_position_pairs=False,
            valid1=None,
            valid2=None,
        )

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        return FiniteLastPosition(), (in_shape[0],)


def _last_step(t: Tensor) -> Tensor:
    return t[..., -1]


def _last_pair(t: Tensor) -> Tensor:
    return t[..., -1, -1]


class FirstStep(Layer):
    r"""Readout: the features at each sequence's own first step (the first token, as BERT's ``[CLS]``).

    Padded sequences are aligned at their ends, so the first steps of two
    sequences of different lengths sit at different positions: this readout
    needs every step pair.
    """

    needs_all_position_pairs = True

    def forward(self, state: KernelState) -> KernelState:
        check_sequence(self, state)
        if not state.all_position_pairs:
            raise RuntimeError("FirstStep needs all step pairs; evaluate through gpytorch_tp.evaluate or a kernel")
        if state.valid1 is None:
            cross, ntk = _first_pair(state.cross), None if state.ntk is None else _first_pair(state.ntk)
            var1, var2 = per_item(_first_pair, state.var1), per_item(_first_pair, state.var2)
        else:
            first1, first2 = per_item(_first_of_rows, state.valid1), per_item(_first_of_columns, state.valid2)
            selector = first1 * first2  # per pair of items: not cached
            cross = (state.cross * selector).sum((-2, -1))
            ntk = None if state.ntk is None else (state.ntk * selector).sum((-2, -1))
            var1 = per_item(_pick_own_first, state.var1, first1)
            var2 = per_item(_pick_own_first, state.var2, per_item(_columns_as_rows, first2))
        return state.replace(
            cross=cross,
            var1=var1,
            var2=var2,
            ntk=ntk,
            positions=(),
            all_position_pairs=False,
            valid1=None,
            valid2=None,
        )

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        return FiniteFirstPosition(), (in_shape[0],)


def _first_pair(t: Tensor) -> Tensor:
    return t[..., 0, 0]


def _first_of_rows(valid: Tensor) -> Tensor:
    """1 at the first valid position of a column of positions ``(..., T, 1)``."""
    return valid * (valid.cumsum(-2) == 1)


def _first_of_columns(valid: Tensor) -> Tensor:
    return valid * (valid.cumsum(-1) == 1)


def _columns_as_rows(t: Tensor) -> Tensor:
    return t.transpose(-1, -2)


def _pick_own_first(self_covariance: Tensor, first_rows: Tensor) -> Tensor:
    return (self_covariance * first_rows * first_rows.transpose(-1, -2)).sum((-2, -1))


class TimeMean(Layer):
    r"""Readout: the mean over each sequence's own steps.

    .. math:: K \leftarrow \frac{1}{L L'} \sum_{t, t'} K(t, t'),

    with :math:`L, L'` the sequences' lengths (padding excluded).  Needs every
    step pair.
    """

    needs_all_position_pairs = True

    def forward(self, state: KernelState) -> KernelState:
        check_sequence(self, state)
        if not state.all_position_pairs:
            raise RuntimeError("TimeMean needs all step pairs; evaluate through gpytorch_tp.evaluate or a kernel")
        steps = state.positions[0]
        v1, v2 = state.valid1, state.valid2
        if v1 is None:
            n1 = n2 = None
        else:
            n1, n2 = per_item(_lengths, v1), per_item(_lengths, v2)
            # Padding positions may hold non-zero values (a bias added after the last recurrent layer).
            masked = v1 * v2  # per pair of items: not cached
        cross = state.cross if v1 is None else state.cross * masked
        ntk = state.ntk if (v1 is None or state.ntk is None) else state.ntk * masked
        var1 = state.var1 if v1 is None else per_item(_self_masked, state.var1, v1)
        var2 = state.var2 if v2 is None else per_item(_self_masked, state.var2, v2.transpose(-1, -2))
        return state.replace(
            cross=_time_mean(cross, n1, n2, steps),
            var1=per_item(_self_time_mean, var1, n1, steps),
            var2=per_item(_self_time_mean, var2, n2, steps),
            ntk=None if ntk is None else _time_mean(ntk, n1, n2, steps),
            positions=(),
            all_position_pairs=False,
            valid1=None,
            valid2=None,
        )

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        return FiniteGlobalAvgPool(1), (in_shape[0],)


def _self_masked(self_covariance: Tensor, valid_rows: Tensor) -> Tensor:
    return self_covariance * valid_rows * valid_rows.transpose(-1, -2)


def _lengths(valid: Tensor) -> Tensor:
    return valid.sum((-2, -1))


def _time_mean(t: Tensor, n1: Tensor | None, n2: Tensor | None, steps: int) -> Tensor:
    total = t.sum((-2, -1))
    if n1 is None:
        return total / steps**2
    return total / (n1 * n2)


def _self_time_mean(t: Tensor, n: Tensor | None, steps: int) -> Tensor:
    return _time_mean(t, n, n, steps)
