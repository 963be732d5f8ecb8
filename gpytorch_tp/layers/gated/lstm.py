r"""The long short-term memory layer (``torch.nn.LSTM``'s cell) of infinite width, NNGP and NTK.

See :mod:`gpytorch_tp.layers.gated` for the equations and the limit.  Per pair of
sequences, the pre-activations of the input and forget gates and of the cell input are
particles, and the output gate is integrated exactly (:class:`LSTM`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...finite import NTKLSTM
from .cell import GATES, GatedRecurrent, new_step_covariances, shift_one_step
from .particles import PairParticles, StepStack, base_normals
from .tangents import derivative, shift_both, tangent_rows

__all__ = ["LSTM"]


class LSTM(GatedRecurrent):
    r"""Long short-term memory layer of infinite width (``torch.nn.LSTM``'s cell), NNGP and NTK.

    See :mod:`gpytorch_tp.layers.gated` for the equations, the limit and the numerical
    integration.  Particles: the pre-activation families
    :math:`\tilde i, \tilde f, \tilde g` (one covariance), three coordinates
    per step and sequence; the cell state :math:`c_t` is run per particle, and
    the output gate's :math:`E[o_t o'_s]` is integrated by Gauss-Hermite
    quadrature (closed form for the erf gate); the NTK likewise
    (:meth:`_tangent_chunk`).

    :param nonlinearity: :math:`\phi` of the cell input and output (default ``"tanh"``).
    :param gate: ``"sigmoid"`` (as in ``torch.nn.LSTM``) or ``"erf"``.
    :param weight_variance: :math:`\sigma_w^2` of every recurrent matrix (default 1).
    :param input_variance: :math:`\sigma_u^2` of every input matrix (default 1).
    :param bias_variance: :math:`\sigma_b^2` of every bias (default 0.1; 0 is held fixed).
    :param num_particles: quasi-Monte Carlo particles per pair of sequences (even; default 1024).

    Example:
        >>> from gpytorch_tp.layers import LSTM, LastStep, Linear, Sequential
        >>> net = Sequential(LSTM(), LastStep(), Linear())
    """

    has_weights = True
    _families = (("gates", 3),)  # i, f, g; the output gate is integrated exactly

    def _chunk(self, kx12, kx11, kx22, v1, v2, w, u, b, blocks=False) -> Tensor:
        """``K_h`` of a chunk of pairs ``(B, T, T)``: particles of ``i, f, g``, the output gate exactly.

        ``o`` is independent of the cell state, so ``K_h(t, s) = E[o_t o'_s] E[phi(c_t) phi(c'_s)]``:
        the first factor by quadrature over the output-gate pair, the second by the particles.
        Each side's own step pairs come from the same particles and quadrature, so the pair's
        covariance of all ``2T`` pre-activations is positive semi-definite (a Hadamard product
        of two such matrices).
        """
        batch, steps = v1.shape
        count = self.num_particles
        lengths = torch.maximum(v1.sum(-1), v2.sum(-1)).round().long()
        sampler = PairParticles(base_normals(count, steps * 3 * 2, kx12.device), steps - lengths, 3)
        uw, ww, bw = u[:, None], w[:, None], b[:, None]
        out1, out2 = StepStack(steps), StepStack(steps)  # phi(c_t) per particle (B, M, t), 0 at padding
        diag1: list[Tensor] = []  # gate variances C(t, t) of each side (B,)
        diag2: list[Tensor] = []
        gate_rows: list[Tensor] = []  # C(t, 0..t): side 1 at t, side 2 at a
        gate_cols: list[Tensor] = []  # C(0..t, t)
        own_rows: tuple[list[Tensor], list[Tensor]] = ([], [])  # each side's C(t, 0..t) with itself
        previous = None  # the previous step's (c11, c12, c21, c22)
        cell = None
        for t in range(steps):
            if t == 0:
                kh_11 = kh_12 = kh_21 = kh_22 = kx12.new_zeros(batch, 1)
            else:
                s1, s2 = out1.all(), out2.all()  # (B, M, t)
                last1, last2 = s1[..., -1], s2[..., -1]
                d1, d2 = torch.stack(diag1, -1), torch.stack(diag2, -1)  # (B, t)
                p11, p12, p21, p22 = previous  # covariances of step t-1 with a' = 0..t-1

                def last(d: Tensor, t: int = t) -> Tensor:
                    return d[:, -1:].expand(-1, t)

                # K_h(a', t - 1) = E[o o'] E[phi(c) phi(c')] for a' = 0..t-1, then shifted to a = a' + 1.
                kh_12 = shift_one_step(
                    self._gate_moment(d1, last(d2), p12[:, :t]) * torch.einsum("bma,bm->ba", s1, last2) / count
                )
                kh_21 = shift_one_step(
                    self._gate_moment(last(d1), d2, p21[:, :t]) * torch.einsum("bm,bma->ba", last1, s2) / count
                )
                kh_11 = shift_one_step(
                    self._gate_moment(d1, last(d1), p11[:, :t]) * torch.einsum("bma,bm->ba", s1, last1) / count
                )
                kh_22 = shift_one_step(
                    self._gate_moment(d2, last(d2), p22[:, :t]) * torch.einsum("bma,bm->ba", s2, last2) / count
                )
            c11 = uw * kx11[:, : t + 1, t] + ww * kh_11 + bw
            c12 = uw * kx12[:, : t + 1, t] + ww * kh_12 + bw  # side 1 at a, side 2 at t
            c21 = uw * kx12[:, t, : t + 1] + ww * kh_21 + bw  # side 1 at t, side 2 at a
            c22 = uw * kx22[:, : t + 1, t] + ww * kh_22 + bw
            previous = (c11, c12, c21, c22)
            diag1.append(c11[:, t])
            diag2.append(c22[:, t])
            gate_rows.append(c21)
            gate_cols.append(c12)
            own_rows[0].append(c11)
            own_rows[1].append(c22)
            cross_past, d11, d12, d22 = new_step_covariances(c11, c12, c21, c22, v1, v2, t)
            pre = sampler.step(t, cross_past, d11, d12, d22)  # (B, M, 3, 2): i, f, g
            i, f = self._gate(pre[:, :, 0]), self._gate(pre[:, :, 1])
            g = self.nonlinearity.function(pre[:, :, 2])
            valid = torch.stack([v1[:, t], v2[:, t]], -1)[:, None, :]
            cell = (i * g if cell is None else f * cell + i * g) * valid
            state = self.nonlinearity.function(cell) * valid
            out1.append(state[..., 0])
            out2.append(state[..., 1])
        cells = torch.einsum("bmt,bms->bts", out1.all(), out2.all()) / count
        lower = torch.stack([nn.functional.pad(r, (0, steps - r.shape[-1])) for r in gate_rows], -2)
        upper = torch.stack([nn.functional.pad(c, (0, steps - c.shape[-1])) for c in gate_cols], -1)
        gate_cov = torch.tril(lower) + torch.triu(upper, 1)
        d1, d2 = torch.stack(diag1, -1), torch.stack(diag2, -1)
        outputs = self._gate_moment(d1[:, :, None].expand_as(gate_cov), d2[:, None, :].expand_as(gate_cov), gate_cov)
        if not blocks:
            return outputs * cells
        sides = [outputs * cells]
        for rows, diag, out in zip(own_rows, (d1, d2), (out1, out2)):
            lower = torch.tril(torch.stack([nn.functional.pad(r, (0, steps - r.shape[-1])) for r in rows], -2))
            own_cov = lower + torch.tril(lower, -1).transpose(-1, -2)
            first, second = diag[:, :, None].expand_as(own_cov), diag[:, None, :].expand_as(own_cov)
            moment = self._gate_moment(first, second, own_cov)
            states = out.all()
            sides.append(moment * torch.einsum("bmt,bms->bts", states, states) / count)
        return torch.stack(sides, 1)

    def _tangent_chunk(self, kx12, kx11, kx22, kh12, kh11, kh22, tx12, v1, v2, w, u, b) -> Tensor:
        r"""``Theta_h`` of a chunk of pairs ``(B, T, T)``: particles of :math:`\tilde i, \tilde f, \tilde g`,
        the output gate by quadrature, and the tangent recursion of the cell state.

        :math:`dc_t = f_t dc_{t-1} + c_{t-1} \sigma'(\tilde f_t) \tau^f_t + g_t \sigma'(\tilde i_t) \tau^i_t
        + i_t \phi'(\tilde g_t) \tau^g_t` and :math:`dh_t = \phi(c_t) \sigma'(\tilde o_t) \tau^o_t
        + o_t \phi'(c_t) dc_t`; the output gate is independent of the rest, so
        :math:`\Theta_h(t, s) = E[\sigma'(\tilde o_t) \sigma'(\tilde o'_s)] E[\phi(c_t) \phi(c'_s)] \Gamma(t, s)
        + E[o_t o'_s] E[\phi'(c_t) \phi'(c'_s) P^c(t, s)]`.
        """
        steps, count = v1.shape[-1], self.num_particles
        u_, w_, b_ = u[:, None, None], w[:, None, None], b[:, None, None]
        cov11, cov12, cov22 = (
            u_ * kx + w_ * shift_both(kh) + b_ for kx, kh in ((kx11, kh11), (kx12, kh12), (kx22, kh22))
        )
        (paths,) = self._sample_paths([(cov11, cov12, cov22, 3)], v1, v2)
        coefficients, keeps, values, slopes = [], [], [], []
        for side, valid in enumerate((v1, v2)):
            i_pre, f_pre, g_pre = (paths[..., k, side] for k in range(3))  # (B, M, T)
            i, f, g = self._gate(i_pre), self._gate(f_pre), self.nonlinearity.function(g_pre)
            cell, before, cells = torch.zeros_like(i[..., 0]), [], []
            for t in range(steps):
                before.append(cell)
                cell = (f[..., t] * cell + i[..., t] * g[..., t]) * valid[:, None, t]
                cells.append(cell)
            cell_before, cell_now = torch.stack(before, -1), torch.stack(cells, -1)
            coefficients.append(
                torch.stack(
                    [
                        g * self._gate_derivative(i_pre),
                        cell_before * self._gate_derivative(f_pre),
                        i * derivative(self.nonlinearity, g_pre),
                    ],
                    -2,
                )
                * valid[:, None, None, :]
            )
            keeps.append(f)
            values.append(self.nonlinearity.function(cell_now) * valid[:, None, :])
            slopes.append(derivative(self.nonlinearity, cell_now) * valid[:, None, :])
        d1 = cov11.diagonal(0, -2, -1)[:, :, None].expand_as(cov12)
        d2 = cov22.diagonal(0, -2, -1)[:, None, :].expand_as(cov12)
        output_gates = self._gate_moment(d1, d2, cov12)  # E[o_t o'_s]
        output_slopes = self._gate_slope_moment(d1, d2, cov12)  # E[sigma'(o~_t) sigma'(o~'_s)]
        states = torch.einsum("bmt,bms->bts", *values) / count  # E[phi(c_t) phi(c'_s)]
        forward_part = cov12 + u_ * tx12  # Gamma before Theta_h

        def gammas(t: int, previous: Tensor | None) -> Tensor:
            gamma = forward_part[:, t]
            if previous is not None:
                gamma = gamma + w[:, None] * nn.functional.pad(previous[:, :-1], (1, 0))
            return gamma[:, None].expand(-1, 3, -1)

        def readout(t: int, moments: Tensor, gamma: Tensor) -> Tensor:
            through_cell = torch.einsum("bm,bms->bs", slopes[0][..., t], slopes[1] * moments) / count
            return output_slopes[:, t] * states[:, t] * gamma[:, 0] + output_gates[:, t] * through_cell

        theta = tangent_rows(*coefficients, *keeps, gammas, readout)
        return theta * v1[:, :, None] * v2[:, None, :]

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(f"LSTM needs sequence features (channels, T), got feature shape {tuple(in_shape)}")
        module = NTKLSTM(in_shape[0], width, self.nonlinearity.function, GATES[self.gate], **self._stds())
        return module, (width, in_shape[1])
