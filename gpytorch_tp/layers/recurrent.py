r"""The simple (Elman) recurrent layer of infinite width.

A sequence's features live on a 1-d grid of time positions (see
:class:`~gpytorch_tp.state.KernelState`).  The recurrent layer in the NTK
parameterisation,

.. math::

    h^t = \sigma_w W s^{t-1} / \sqrt{n} + \sigma_u U z^t / \sqrt{n_z} + \sigma_b b, \qquad
    s^t = \phi(h^t), \qquad s^{\text{before the first step}} = 0,

with :math:`W, U, b \sim N(0, 1)` shared by all steps, has the
infinite-width covariances (Yang 2019, TP1 App. B.2; NTK: Alemohammad et
al. 2021, "The recurrent neural tangent kernel")

.. math::

    K_h(t, t') &= \sigma_w^2 K_s(t - 1, t' - 1) + \sigma_u^2 K_z(t, t') + \sigma_b^2, \qquad
    K_s(t, t') = V_\phi(K_h)(t, t'), \\
    \Theta_h(t, t') &= K_h(t, t') + \sigma_w^2 \Theta_s(t - 1, t' - 1) + \sigma_u^2 \Theta_z(t, t'), \qquad
    \Theta_s(t, t') = V_{\phi'}(K_h)(t, t')\, \Theta_h(t, t').

A step pair depends only on the pair one step earlier for both sequences, so a
readout of the last states needs aligned pairs only (:math:`O(T)` per pair of
sequences); a readout of the mean over time needs all pairs (:math:`O(T^2)`).
Either way the recursion runs once over time, vectorised over all pairs of
sequences.  The readouts of a sequence (``LastStep``, ``TimeMean``, ``FirstStep``)
are in :mod:`~gpytorch_tp.layers.readouts`.
"""

from __future__ import annotations

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor, nn

from ..finite import NTKRNN, BidirectionalRNN
from ..numerics import scale_and_shift
from ..state import KernelState, per_item, unit_dims
from .base import Layer, standard_deviation, variance_property
from .elementwise import Nonlinearity, nonlinearity_from_name
from .input_checks import check_sequence

# Kernels pickled before the readouts moved to .readouts name them here.
from .readouts import FirstStep, LastStep, TimeMean  # noqa: E402, F401

__all__ = ["RNN"]


class RNN(Layer):
    r"""Simple (Elman) recurrent layer of infinite width, run over every step of the sequence.

    See the module docstring for the recursion.  The output is the state
    :math:`s^t` at every step; end the network with a readout
    (:class:`LastStep` or :class:`TimeMean`) and a :class:`~gpytorch_tp.layers.Linear`.
    Layers stack: a second ``RNN`` reads the first one's states.

    :param nonlinearity: a name or a :class:`~gpytorch_tp.layers.Nonlinearity` (default ``"tanh"``).
    :param weight_variance: :math:`\sigma_w^2` of the recurrent weights (default 1).
    :param input_variance: :math:`\sigma_u^2` of the input weights (default 1).
    :param bias_variance: :math:`\sigma_b^2` (default 0.1; exactly 0 is held fixed).
    :param bidirectional: also run a second recursion (its own weights, same
        variances) from the last step back to the first; the output features
        are both directions' states side by side, so the kernels average.
    :param kwargs: priors and constraints (``weight_variance_prior``, ...,
        ``input_variance_constraint``) and ``batch_shape``.

    Example:
        >>> from gpytorch_tp.layers import RNN, LastStep, Linear, Sequential
        >>> net = Sequential(RNN("erf"), LastStep(), Linear())
    """

    has_weights = True

    def __init__(
        self,
        nonlinearity: str | Nonlinearity = "tanh",
        weight_variance: float | Tensor = 1.0,
        input_variance: float | Tensor = 1.0,
        bias_variance: float | Tensor = 0.1,
        *,
        weight_variance_prior: Prior | None = None,
        input_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        weight_variance_constraint: Interval | None = None,
        input_variance_constraint: Interval | None = None,
        bias_variance_constraint: Interval | None = None,
        bidirectional: bool = False,
        batch_shape: torch.Size = torch.Size(),
    ):
        super().__init__()
        self.bidirectional = bool(bidirectional)
        phi = nonlinearity_from_name(nonlinearity)
        if not isinstance(phi, Nonlinearity):
            raise TypeError(f"RNN needs an elementwise nonlinearity, got {type(phi).__name__}")
        self.nonlinearity = phi
        for name, value, prior, constraint in (
            ("weight_variance", weight_variance, weight_variance_prior, weight_variance_constraint),
            ("input_variance", input_variance, input_variance_prior, input_variance_constraint),
            ("bias_variance", bias_variance, bias_variance_prior, bias_variance_constraint),
        ):
            self.register_variance(
                name,
                value,
                batch_shape=batch_shape,
                prior=prior,
                constraint=constraint,
                allow_zero=name == "bias_variance",
            )

    weight_variance = variance_property("weight_variance")

    input_variance = variance_property("input_variance")

    bias_variance = variance_property("bias_variance")

    # -- the recursion ---------------------------------------------------------------------------

    def _variances(self, state: KernelState, per_step: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(sigma_w^2, sigma_u^2, sigma_b^2)`` shaped for one step of the pairs, or of the items' own steps."""
        # One step of the pairs keeps the item axes and, with all pairs, the other side's time axis.
        count = state.item_ndim + (1 if per_step and state.all_position_pairs else 0)
        return tuple(unit_dims(v, count) for v in (self.weight_variance, self.input_variance, self.bias_variance))

    def _hidden_variances(self, input_var: Tensor, valid: Tensor | None, w: Tensor, u: Tensor, b: Tensor) -> Tensor:
        """Each item's pre-activation variance ``K_h(t, t)`` at every step: ``(..., T)``."""
        steps = input_var.shape[-1]
        previous = None
        out = []
        for t in range(steps):
            kh = scale_and_shift(input_var[..., t], u, b)
            if previous is not None:
                kh = torch.addcmul(kh, w, previous)
            out.append(kh)
            previous = self.nonlinearity.self_moment(kh)
            if valid is not None:
                previous = previous * valid[..., t]
        return torch.stack(out, -1)

    def _recursion(
        self,
        inputs: Tensor,
        input_ntk: Tensor | None,
        var1: Tensor,
        var2: Tensor,
        valid1: Tensor | None,
        valid2: Tensor | None,
        all_pairs: bool,
        track_ntk: bool,
        params: tuple[Tensor, Tensor, Tensor],
    ) -> tuple[Tensor, Tensor | None]:
        """``K_s`` (and ``Theta_s``) over the step pairs of ``inputs`` (aligned ``(..., T)`` or all ``(..., T, T)``).

        ``var1``/``var2`` are the hidden variances ``K_h(t, t)`` of each side,
        and ``valid1``/``valid2`` its valid steps (or ``None``), shaped to
        broadcast against one step: ``(..., T)`` aligned, or for all pairs
        ``(..., T, 1)`` for side 1 (indexed by row) and ``(..., 1, T)`` for side 2.
        """
        w, u, b = params
        steps = inputs.shape[-1]
        phi = self.nonlinearity
        rows, ntk_rows = [], []
        previous = previous_ntk = None
        for t in range(steps):
            if all_pairs:
                # Row t: pairs (t, t') for every t'; the previous step pairs are (t - 1, t' - 1).
                x_t, k11, k22 = inputs[..., t, :], var1[..., t, :], var2[..., 0, :]
                m = None if valid1 is None else valid1[..., t, :] * valid2[..., 0, :]
            else:
                x_t, k11, k22 = inputs[..., t], var1[..., t], var2[..., t]
                m = None if valid1 is None else valid1[..., t] * valid2[..., t]
            kh = scale_and_shift(x_t, u, b)
            if previous is not None:
                kh = torch.addcmul(kh, w, _shift(previous) if all_pairs else previous)
            ks, kdot = phi.pair_moments(k11, k22, kh, track_ntk)
            if m is not None:
                ks = ks * m
            rows.append(ks)
            if track_ntk:
                th = kh
                if input_ntk is not None:
                    th = torch.addcmul(th, u, input_ntk[..., t, :] if all_pairs else input_ntk[..., t])
                if previous_ntk is not None:
                    th = torch.addcmul(th, w, _shift(previous_ntk) if all_pairs else previous_ntk)
                ts = torch.zeros_like(kh) if kdot is None else kdot * th
                if m is not None:
                    ts = ts * m
                ntk_rows.append(ts)
                previous_ntk = ts
            previous = ks
        axis = -2 if all_pairs else -1
        cross = torch.stack(rows, axis)
        return cross, (torch.stack(ntk_rows, axis) if track_ntk else None)

    def forward(self, state: KernelState) -> KernelState:
        check_sequence(self, state)
        forward = self._one_direction(state)
        if not self.bidirectional:
            return forward
        # The backward direction is the same recursion on the time-reversed
        # sequences (their last steps are aligned, so their first reversed
        # steps are too); the next layer sees both directions' features side
        # by side, i.e. the mean of their kernels.
        backward = _reversed(self._one_direction(_reversed(state)))
        ntk = None if forward.ntk is None else (forward.ntk + backward.ntk) / 2
        return forward.replace(
            cross=(forward.cross + backward.cross) / 2,
            var1=per_item(_mean_of_two, forward.var1, backward.var1),
            var2=per_item(_mean_of_two, forward.var2, backward.var2),
            ntk=ntk,
        )

    def _one_direction(self, state: KernelState) -> KernelState:
        all_pairs = state.all_position_pairs
        params = self._variances(state, per_step=True)
        w, u, b = self._variances(state, per_step=False)
        k11_in, k22_in = state.position_variances()
        # Per-item: each side's hidden variances K_h(t, t), from its own diagonal recursion.
        diag1 = k11_in[..., 0] if all_pairs else k11_in
        diag2 = k22_in[..., 0, :] if all_pairs else k22_in
        v1 = None if state.valid1 is None else (state.valid1[..., 0] if all_pairs else state.valid1)
        v2 = None if state.valid2 is None else (state.valid2[..., 0, :] if all_pairs else state.valid2)
        hidden1 = per_item(self._hidden_variances, diag1, v1, w, u, b)
        hidden2 = per_item(self._hidden_variances, diag2, v2, w, u, b)
        if all_pairs:
            side1, side2 = hidden1.unsqueeze(-1), hidden2.unsqueeze(-2)
        else:
            side1, side2 = hidden1, hidden2
        cross, ntk = self._recursion(
            state.cross, state.ntk, side1, side2, state.valid1, state.valid2, all_pairs, state.track_ntk, params
        )
        if all_pairs:
            # Each item's own step pairs follow the same recursion.
            var1 = per_item(self._self_recursion, state.var1, hidden1, state.valid1, *params)
            var2 = per_item(self._self_recursion, state.var2, hidden2, _as_rows(state.valid2), *params)
        else:
            var1 = per_item(self._aligned_self, hidden1, v1)
            var2 = per_item(self._aligned_self, hidden2, v2)
        return state.after_recurrence(cross=cross, var1=var1, var2=var2, ntk=ntk)

    def _self_recursion(self, self_inputs, hidden, valid_rows, w, u, b) -> Tensor:
        valid_cols = None if valid_rows is None else valid_rows.transpose(-1, -2)
        cross, _ = self._recursion(
            self_inputs,
            None,
            hidden.unsqueeze(-1),
            hidden.unsqueeze(-2),
            valid_rows,
            valid_cols,
            True,
            False,
            (w, u, b),
        )
        return cross

    def _aligned_self(self, hidden: Tensor, valid: Tensor | None) -> Tensor:
        var = self.nonlinearity.self_moment(hidden)
        return var if valid is None else var * valid

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(f"RNN needs sequence features (channels, T), got feature shape {tuple(in_shape)}")

        def direction() -> NTKRNN:
            return NTKRNN(
                in_shape[0],
                width,
                self.nonlinearity.function,
                weight_std=standard_deviation(self.weight_variance.detach()),
                input_std=standard_deviation(self.input_variance.detach()),
                bias_std=standard_deviation(self.bias_variance.detach()),
            )

        if self.bidirectional:
            return BidirectionalRNN(direction(), direction()), (2 * width, in_shape[1])
        return direction(), (width, in_shape[1])

    def extra_repr(self) -> str:
        direction = "bidirectional, " if self.bidirectional else ""
        return f"nonlinearity={type(self.nonlinearity).__name__}, {direction}" + super().extra_repr()


def _mean_of_two(a: Tensor, b: Tensor) -> Tensor:
    return (a + b) / 2


def _flip_time(t: Tensor | None, dims: tuple[int, ...]) -> Tensor | None:
    return None if t is None else torch.flip(t, dims)


def _reversed(state: KernelState) -> KernelState:
    """The state of the time-reversed sequences."""
    dims = tuple(range(-state.pair_ndim, 0))
    return state.replace(
        cross=torch.flip(state.cross, dims),
        var1=per_item(_flip_time, state.var1, dims),
        var2=per_item(_flip_time, state.var2, dims),
        ntk=_flip_time(state.ntk, dims),
        valid1=per_item(_flip_time, state.valid1, dims),
        valid2=per_item(_flip_time, state.valid2, dims),
    )


def _shift(row: Tensor) -> Tensor:
    """Row ``t - 1`` of step pairs moved to row ``t``'s columns: entry ``t'`` holds ``(t - 1, t' - 1)``, 0 at ``t' = 0``."""
    return nn.functional.pad(row[..., :-1], (1, 0))


def _as_rows(valid2: Tensor | None) -> Tensor | None:
    """Side-2 validity ``(..., 1, T)`` of all pairs as the row form ``(..., T, 1)`` of its own self pairs."""
    return None if valid2 is None else valid2.transpose(-1, -2)
