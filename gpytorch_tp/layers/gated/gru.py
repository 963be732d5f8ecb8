r"""The gated recurrent unit (``torch.nn.GRU``'s cell) of infinite width, NNGP and NTK.

See :mod:`gpytorch_tp.layers.gated` for the equations and the limit.  Per pair of
sequences, the update gates are particles; given them, the state is linear in the
candidates, whose second moments are integrated exactly (:class:`GRU`), and the
particles' conditional second moments of the states are carried shell by shell
of step pairs (``_Block``), with the gated sums as scans (``_gated_scan``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...finite import NTKGRU
from ...tanh_moments import tanh_pair_moment
from ..elementwise import Erf, Tanh
from .cell import GATES, GatedRecurrent, new_step_covariances, shift_one_step
from .particles import PairParticles, StepStack, base_normals
from .quadrature import correlated_nodes, hermite_rule
from .tangents import derivative, erf_slope_moment, shift_both, tangent_rows

__all__ = ["GRU"]

# Gauss-Hermite nodes per dimension: over the reset-gate pair (a smooth gate), and over the
# candidate pair for nonlinearities without a closed form.
_RESET_NODES = 6
_CANDIDATE_NODES = 10


class _Block:
    """One block (a side with the other, or with itself) of a pair's GRU recursion, shell by shell."""

    def __init__(self, zero: Tensor, steps: int):
        self.zero = zero  # (B, 1)
        self.steps = steps
        self.rows: list[Tensor] = []  # K_h(t, 0..t)
        self.cols: list[Tensor] = []  # K_h(0..t, t)
        self.row = self.col = None  # per particle: Q(m, 0..m), Q(0..m, m)
        # Without autograd, Q's row and column are updated inside buffers for all steps (see StepStack).
        self._in_place = not torch.is_grad_enabled()
        self._row_buffer: Tensor | None = None
        self._col_buffer: Tensor | None = None

    def advance(self, m: int, h_n: Tensor, n_h: Tensor, keep_left: Tensor, keep_right: Tensor) -> None:
        """Shell ``m`` of ``Q`` from shell ``m - 1``: ``h_t = z_t h_{t-1} + (1 - z_t) n_t`` on each side.

        ``h_n``: ``E[h_a n'_m | z]`` and ``n_h``: ``E[n_m h'_b | z]`` for ``a, b = 0..m``;
        ``keep_left``, ``keep_right``: each side's update gate at step ``m``.
        """
        if self._in_place:
            self._advance_in_place(m, h_n, n_h, keep_left[..., 0], keep_right)
        else:
            if m == 0:
                new_col = h_n[..., :0]
                before = torch.zeros_like(n_h)
            else:
                new_col = torch.lerp(h_n[..., :m], self.col, keep_right)  # Q(a, m), a < m
                before = torch.cat([self.row, new_col[..., m - 1 :]], -1)  # Q(m-1, b), b = 0..m
            self.row = torch.lerp(n_h, before, keep_left)
            self.col = torch.cat([new_col, self.row[..., m:]], -1)
        self.rows.append(self.row.mean(1))
        self.cols.append(self.col.mean(1))

    def _advance_in_place(self, m: int, h_n: Tensor, n_h: Tensor, keep_left: Tensor, keep_right: Tensor) -> None:
        if self._row_buffer is None:
            self._row_buffer = n_h.new_empty(*n_h.shape[:-1], self.steps)
            self._col_buffer = n_h.new_empty(*n_h.shape[:-1], self.steps)
        rows, cols = self._row_buffer, self._col_buffer
        if m == 0:
            rows[..., 0] = n_h[..., 0] * (1 - keep_left)
        else:
            col = cols[..., :m]
            torch.lerp(h_n[..., :m], col, keep_right, out=col)  # Q(a, m) from Q(a, m - 1), a < m
            row = rows[..., :m]
            torch.lerp(n_h[..., :m], row, keep_left[..., None], out=row)  # Q(m, b) from Q(m - 1, b), b < m
            rows[..., m] = torch.lerp(n_h[..., m], cols[..., m - 1], keep_left)  # Q(m, m) from Q(m - 1, m)
        cols[..., m] = rows[..., m]
        self.row, self.col = rows[..., : m + 1], cols[..., : m + 1]

    def previous(self, m: int) -> tuple[Tensor, Tensor]:
        """``K_h(m - 1, a - 1)`` and ``K_h(a - 1, m - 1)`` for ``a = 0..m`` (0 where an index is -1)."""
        if m == 0:
            return self.zero, self.zero
        return shift_one_step(self.rows[-1]), shift_one_step(self.cols[-1])

    def diagonal(self, m: int) -> Tensor:
        """``K_h(a - 1, a - 1)`` for ``a = 0..m``."""
        if m == 0:
            return self.zero
        return shift_one_step(torch.stack([r[:, -1] for r in self.rows], -1))

    def matrix(self, steps: int) -> Tensor:
        lower = torch.stack([nn.functional.pad(r, (0, steps - r.shape[-1])) for r in self.rows], -2)
        upper = torch.stack([nn.functional.pad(c, (0, steps - c.shape[-1])) for c in self.cols], -1)
        return torch.tril(lower) + torch.triu(upper, 1)


class _GateProducts:
    """One side's update gates per particle, kept in the form :func:`_gated_scan` needs.

    With ``c_t`` the cumulative log of the gates since the start of ``t``'s block of
    ``_SCAN_BLOCK`` steps (each log kept at least ``-20``, i.e. gates below 2e-9 count
    as 2e-9, so that ``e^{-c}`` stays finite in float64): ``grow_t = e^{c_t}`` and
    ``enter_t = (1 - z_t) e^{-c_t}``.
    """

    def __init__(self, steps: int):
        self.log_gate: Tensor | None = None  # c of the last step
        self.grow, self.enter = StepStack(steps), StepStack(steps)

    def append(self, gate: Tensor) -> None:
        log_gate = torch.log(gate).clamp_min(-20.0)
        if self.grow.count % _SCAN_BLOCK:
            log_gate = self.log_gate + log_gate
        self.log_gate = log_gate
        self.grow.append(torch.exp(log_gate))
        self.enter.append((1 - gate) * torch.exp(-log_gate))


def _gated_scan(gates: _GateProducts, values: Tensor) -> Tensor:
    """``y_j = z_j y_{j-1} + (1 - z_j) values_j`` along the last axis (``y_{-1} = 0``), per particle.

    Within a block ``y = e^{c} (carry + cumsum((1 - z) values e^{-c}))``; blocks are chained by their carries.
    """
    count = values.shape[-1]
    grow, enter = gates.grow.first(count), gates.enter.first(count)
    blocks, carry = [], None
    for start in range(0, count, _SCAN_BLOCK):
        part = slice(start, start + _SCAN_BLOCK)
        total = torch.cumsum(enter[..., part] * values[..., part], -1)
        if carry is not None:
            total = total + carry
        y = grow[..., part] * total
        blocks.append(y)
        carry = y[..., -1:]
    return torch.cat(blocks, -1) if len(blocks) > 1 else blocks[0]


# Steps per block of the scan: within a block e^{-c} <= e^{20 * 32}, finite in float64 (the chunks run in float64).
_SCAN_BLOCK = 32


class GRU(GatedRecurrent):
    r"""Gated recurrent unit of infinite width (``torch.nn.GRU``'s cell), NNGP and NTK.

    See :mod:`gpytorch_tp.layers.gated` for the equations, the limit and the numerical
    integration; the output is the state :math:`h_t` at every step (end the
    network with :class:`~gpytorch_tp.layers.LastStep` or
    :class:`~gpytorch_tp.layers.TimeMean` and a :class:`~gpytorch_tp.layers.Linear`).

    Particles: the update-gate family :math:`\tilde z` only; given it, the
    state is linear in the candidates :math:`n_t`, whose second moments
    :math:`E[n_a n'_b]` are Gauss-Hermite integrals over the reset-gate pair
    (6 x 6 nodes) of the nonlinearity's closed form (erf; tanh through its
    six-term erf expansion, :func:`~gpytorch_tp.tanh_moments.tanh_pair_moment`,
    1e-6) or of a 10 x 10-node rule (other nonlinearities).  The NTK samples all four families
    (:meth:`_tangent_chunk`), with erf integrating the candidate input out of the
    terms through :math:`\phi'` (closed form; half the error).

    :param nonlinearity: :math:`\phi` of the candidate state (default ``"tanh"``, as in
        ``torch.nn.GRU``); any elementwise nonlinearity (its function, and for the NTK its
        derivative: a closed form where the class has one, else forward-mode autodiff).
    :param gate: ``"sigmoid"`` (logistic, as in ``torch.nn.GRU``) or ``"erf"``
        (:math:`(1 + \operatorname{erf} x)/2`, TP1's choice).
    :param weight_variance: :math:`\sigma_w^2` of every recurrent matrix (default 1).
    :param input_variance: :math:`\sigma_u^2` of every input matrix (default 1).
    :param bias_variance: :math:`\sigma_b^2` of every bias (default 0.1; 0 is held fixed).
    :param num_particles: quasi-Monte Carlo particles per pair of sequences (even;
        default 1024).  Error and cost: see :mod:`gpytorch_tp.layers.gated`.

    Example:
        >>> from gpytorch_tp.layers import GRU, LastStep, Linear, Sequential
        >>> net = Sequential(GRU(), LastStep(), Linear())
    """

    has_weights = True
    _families = (("gates", 1),)
    _uses_own_covariances = True

    def _chunk(self, kx12, kx11, kx22, v1, v2, w, u, b, own1=None, own2=None, blocks=False) -> Tensor:
        """``K_h`` of a chunk of pairs ``(B, T, T)``: update-gate particles, the candidate integrated exactly.

        Shell ``m`` adds the step pairs ``(m, s)`` and ``(a, m)``; per particle
        it keeps ``Q(t, s) = E[h_t h'_s | z]`` on the last shell and the
        update-gate paths, for the pair (block ``12``) and, so that the pair's
        covariance of all ``2T`` gate pre-activations is a Gram matrix (positive
        semi-definite), for each side with itself (blocks ``11``, ``22``).
        ``own1``/``own2`` only tell that the two items differ (``None``: an item
        paired with itself, where one block serves all three).
        """
        batch, steps = v1.shape
        count = self.num_particles
        lengths = torch.maximum(v1.sum(-1), v2.sum(-1)).round().long()
        sampler = PairParticles(base_normals(count, steps * 2, kx12.device), steps - lengths, 1)
        coef = (u[:, None], w[:, None], b[:, None])
        gates = (_GateProducts(steps), _GateProducts(steps))
        pair = own1 is not None
        sides = {"12": (0, 1, kx12), "11": (0, 0, kx11), "22": (1, 1, kx22)} if pair else {"12": (0, 1, kx12)}
        valid = (v1, v2)
        side_blocks = {name: _Block(kx12.new_zeros(batch, 1), steps) for name in sides}
        for m in range(steps):
            kh = {name: block.previous(m) for name, block in side_blocks.items()}  # K_h(m-1, a-1), K_h(a-1, m-1)
            row12, col12 = kh["12"]
            within1 = kh["11"][1] if pair else col12  # K_h(a-1, m-1) of side 1 with itself
            within2 = kh["22"][1] if pair else row12
            u_, w_, b_ = coef
            c11 = u_ * kx11[:, : m + 1, m] + w_ * within1 + b_
            c12 = u_ * kx12[:, : m + 1, m] + w_ * col12 + b_
            c21 = u_ * kx12[:, m, : m + 1] + w_ * row12 + b_
            c22 = u_ * kx22[:, : m + 1, m] + w_ * within2 + b_
            cross_past, d11, d12, d22 = new_step_covariances(c11, c12, c21, c22, v1, v2, m)
            z = self._gate(sampler.step(m, cross_past, d11, d12, d22)[:, :, 0])  # (B, M, 2)
            gates[0].append(z[..., 0])
            gates[1].append(z[..., 1])
            gate_cov = {"12": (c12, c21), "11": (c11, c11), "22": (c22, c22)}
            for name, (left, right, kx) in sides.items():
                block = side_blocks[name]
                kh_row, kh_col = kh[name]
                self._shell(
                    m,
                    block,
                    kx,
                    kh_row,
                    kh_col,
                    gate_cov[name],
                    (kx11, kx22)[left].diagonal(0, -2, -1),
                    (kx11, kx22)[right].diagonal(0, -2, -1),
                    side_blocks[("11" if left == 0 else "22") if pair else "12"].diagonal(m),
                    side_blocks[("11" if right == 0 else "22") if pair else "12"].diagonal(m),
                    valid[left],
                    valid[right],
                    gates[left],
                    gates[right],
                    z[..., left : left + 1],
                    z[..., right : right + 1],
                    coef,
                )
        pair12 = side_blocks["12"].matrix(steps)
        if not blocks:
            return pair12
        if not pair:
            return torch.stack([pair12] * 3, 1)
        return torch.stack([pair12, side_blocks["11"].matrix(steps), side_blocks["22"].matrix(steps)], 1)

    def _shell(
        self,
        m,
        block,
        kx,
        kh_row,
        kh_col,
        gate_cov,
        x_left,
        x_right,
        h_left,
        h_right,
        valid_left,
        valid_right,
        gates_left,
        gates_right,
        keep_left,
        keep_right,
        coef,
    ) -> None:
        """Add shell ``m`` to ``block``: ``E[n_m n'_b]``, ``E[n_a n'_m]`` exactly, then ``Q`` per particle."""
        u, w, b = coef
        c_col, c_row = gate_cov  # Cov(left at a, right at m) and Cov(left at m, right at a), a = 0..m
        g_left, g_right = u * x_left[:, : m + 1] + w * h_left + b, u * x_right[:, : m + 1] + w * h_right + b
        a_left, a_right = u * x_left[:, : m + 1] + b, u * x_right[:, : m + 1] + b
        b_left, b_right = w * h_left + b, w * h_right + b

        def at(v: Tensor) -> Tensor:
            return v[:, m : m + 1].expand(-1, m + 1)

        n_row = self._candidate_moment(
            (at(g_left), g_right, c_row),
            (at(a_left), a_right, u * kx[:, m, : m + 1] + b),
            (at(b_left), b_right, w * kh_row + b),
        ) * (valid_left[:, m : m + 1] * valid_right[:, : m + 1])
        if gates_left is gates_right:
            # A sequence with itself: E[n_a n_m] = E[n_m n_a] (both rules are exactly symmetric up to
            # rounding), so the column is the row, and the two scans are one.
            h_n = n_h = _gated_scan(gates_left, n_row[:, None])
        else:
            n_col = self._candidate_moment(
                (g_left[:, :m], at(g_right)[:, :m], c_col[:, :m]),
                (a_left[:, :m], at(a_right)[:, :m], u * kx[:, :m, m] + b),
                (b_left[:, :m], at(b_right)[:, :m], w * kh_col[:, :m] + b),
            ) * (valid_left[:, :m] * valid_right[:, m : m + 1])
            h_n = _gated_scan(gates_left, torch.cat([n_col, n_row[:, m:]], -1)[:, None])  # E[h_a n'_m | z]
            n_h = _gated_scan(gates_right, n_row[:, None])  # E[n_m h'_b | z]
        block.advance(m, h_n, n_h, keep_left, keep_right)

    def _candidate_moment(self, reset: tuple, inputs: tuple, hidden: tuple) -> Tensor:
        r"""``E[phi(A + r B) phi(A' + r' B')]`` from the covariances ``(k11, k22, k12)`` of the reset
        pre-activations, of ``(A, A')`` and of ``(B, B')``: Gauss-Hermite over the reset pair, then the
        nonlinearity's closed form (erf, tanh to 1e-6) or Gauss-Hermite over the candidate pair.

        Both rules act on the symmetric square roots of the pair covariances, so the value is
        exactly symmetric in the two sequences.
        """
        nodes, weights = hermite_rule(_RESET_NODES, reset[0].dtype, reset[0].device)
        first, second = correlated_nodes(*reset, nodes)  # (..., G, G)
        r1, r2 = self._gate(first), self._gate(second)
        a11, a22, a12 = (v[..., None, None] for v in inputs)
        b11, b22, b12 = (v[..., None, None] for v in hidden)
        k11, k22, k12 = a11 + r1 * r1 * b11, a22 + r2 * r2 * b22, a12 + r1 * r2 * b12
        if isinstance(self.nonlinearity, Erf):
            moment = self.nonlinearity.pair_moments(k11, k22, k12, False)[0]
        elif isinstance(self.nonlinearity, Tanh):
            moment = tanh_pair_moment(k11, k22, k12)
        else:
            cand_nodes, cand_weights = hermite_rule(_CANDIDATE_NODES, k11.dtype, k11.device)
            u, v = correlated_nodes(k11, k22, k12, cand_nodes)  # (..., G, G, H, H)
            fn = self.nonlinearity.function
            moment = torch.einsum("...ij,i,j->...", fn(u) * fn(v), cand_weights, cand_weights)
        return torch.einsum("...ij,i,j->...", moment, weights, weights)

    def _tangent_chunk(self, kx12, kx11, kx22, kh12, kh11, kh22, tx12, v1, v2, w, u, b) -> Tensor:
        r"""``Theta_h`` of a chunk of pairs ``(B, T, T)``: particles of all four families, then the tangent recursion.

        Families :math:`\tilde z, \tilde r` (the gates' covariance), :math:`A = W_n x + b_n` and
        :math:`B = U_n h + b_{hn}`, drawn with the covariances of the given ``K_h``; per particle
        :math:`dh_t = z_t dh_{t-1} + c^z_t \tau^z_t + c^r_t \tau^r_t + c^A_t \tau^A_t + c^B_t \tau^B_t`
        with :math:`c^z = (h_{t-1} - n_t) \sigma'(\tilde z_t)`, :math:`c^A = (1 - z_t) \phi'(A_t + r_t B_t)`,
        :math:`c^B = c^A r_t`, :math:`c^r = c^A B_t \sigma'(\tilde r_t)`.
        """
        steps = v1.shape[-1]
        u_, w_, b_ = u[:, None, None], w[:, None, None], b[:, None, None]
        inputs = [u_ * kx + b_ for kx in (kx11, kx12, kx22)]  # Cov(A): blocks 11, 12, 22
        hidden = [w_ * shift_both(kh) + b_ for kh in (kh11, kh12, kh22)]  # Cov(B)
        gate_covariances = [a + h - b_ for a, h in zip(inputs, hidden)]
        gates, candidate_inputs, candidate_hidden = self._sample_paths(
            [(*gate_covariances, 2), (*inputs, 1), (*hidden, 1)], v1, v2
        )
        # With erf, E[phi'(U) phi'(V)] of a Gaussian pair has a closed form: the candidate input A is
        # then integrated out of the r, A and B terms given the other families (it dominates the error).
        integrate_inputs = isinstance(self.nonlinearity, Erf)
        coefficients, keeps, parts = [], [], []
        for side, valid in enumerate((v1, v2)):
            z_pre, r_pre = gates[..., 0, side], gates[..., 1, side]  # (B, M, T)
            a, bh = candidate_inputs[..., 0, side], candidate_hidden[..., 0, side]
            z, r = self._gate(z_pre), self._gate(r_pre)
            pre = a + r * bh
            n = self.nonlinearity.function(pre)
            state, before = torch.zeros_like(n[..., 0]), []
            for t in range(steps):
                before.append(state)
                state = ((1 - z[..., t]) * n[..., t] + z[..., t] * state) * valid[:, None, t]
            c_a = (1 - z) * derivative(self.nonlinearity, pre)
            c_z = (torch.stack(before, -1) - n) * self._gate_derivative(z_pre)
            c_r = c_a * bh * self._gate_derivative(r_pre)
            if integrate_inputs:
                # c^A = (1 - z) phi'(A + r B), c^B = c^A r, c^r = c^A B sigma'(r~): all but phi'(A + r B).
                coefficients.append(c_z[:, :, None] * valid[:, None, None, :])
                parts.append(((1 - z) * valid[:, None, :], r, bh * self._gate_derivative(r_pre), r * bh))
            else:
                coefficients.append(torch.stack([c_z, c_r, c_a, c_a * r], -2) * valid[:, None, None, :])
            keeps.append(z)
        input_part = u_ * (kx12 + tx12) + b_  # Gamma of A
        hidden_part = w_ * shift_both(kh12) + b_  # Gamma of B, before Theta_h

        def gammas(t: int, previous: Tensor | None) -> Tensor:
            recurrent = hidden_part[:, t]
            if previous is not None:
                recurrent = recurrent + w[:, None] * nn.functional.pad(previous[:, :-1], (1, 0))
            gate = input_part[:, t] + recurrent - b[:, None]
            return torch.stack([gate, gate, input_part[:, t], recurrent], 1)

        def readout(t: int, moments: Tensor, gamma: Tensor) -> Tensor:
            return moments.mean(1)

        integrated = None
        if integrate_inputs:
            var1, var2 = inputs[0].diagonal(0, -2, -1), inputs[2].diagonal(0, -2, -1)  # Var(A) (B, T)
            (open1, r1, slope1, shift1), (open2, r2, slope2, shift2) = parts

            def integrated(t: int, gamma: Tensor) -> Tensor:
                """The r, A, B terms of E(t, :) with E[phi'(A_t + r_t B_t) phi'(A'_s + r'_s B'_s) | z, r, B]."""
                moment = erf_slope_moment(
                    shift1[..., t, None], shift2, var1[:, t, None, None], var2[:, None], inputs[1][:, t, None]
                )
                families = (
                    gamma[:, None, 2]
                    + r1[..., t, None] * r2 * gamma[:, None, 3]
                    + slope1[..., t, None] * slope2 * gamma[:, None, 1]
                )
                return open1[..., t, None] * open2 * moment * families

        theta = tangent_rows(*coefficients, *keeps, gammas, readout, integrated)
        return theta * v1[:, :, None] * v2[:, None, :]

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(f"GRU needs sequence features (channels, T), got feature shape {tuple(in_shape)}")
        module = NTKGRU(in_shape[0], width, self.nonlinearity.function, GATES[self.gate], **self._stds())
        return module, (width, in_shape[1])
