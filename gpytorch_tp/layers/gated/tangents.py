r"""The tangent recursion behind the NTK of the gated recurrent layers (GRU, LSTM).

The NTK is :math:`\Theta(x, x') = E_{\dot\theta}[\,df(x)\, df(x')]` with
:math:`df` the forward-mode derivative of the network along a random
parameter direction :math:`\dot\theta \sim N(0, I)`.  That derivative is
itself a Netsor program (Yang 2019, TP1): per unit, the derivative of each
pre-activation family :math:`W x_t + U h_{t-1} + b` is a new centred Gaussian
family :math:`\tau`, independent of every forward family and of the other
matrices' tangent families, with covariance the forward one with every
:math:`K` replaced by :math:`K + \Theta`:

.. math::

    \Gamma(t, s) = \sigma_u^2 (K_x + \Theta_x)(t, s) + \sigma_w^2 (K_h + \Theta_h)(t - 1, s - 1) + \sigma_b^2

(independent because :math:`\dot\theta \to -\dot\theta` leaves the forward
values and flips the tangents, so :math:`E[h\, dh] = 0`).  A gated state's
tangent is linear in the :math:`\tau` with coefficients that are functions of
the forward families:

.. math::

    dh_t = k_t\, dh_{t-1} + e_t, \qquad e_t = \sum_f c^f_t \tau^f_t

(GRU: :math:`k = z`, LSTM cell: :math:`k = f`), so, per particle of the
forward families, the conditional second moments need no sampling of
:math:`\tau`:

.. math::

    P(t, s) = E[dh_t\, dh'_s \mid \text{forward}] = k_t P(t - 1, s) + R(t; s), \qquad
    R(t; s) = E[e_t\, dh'_s \mid \cdot] = \sum_{b \le s} \Big(\prod_{b < l \le s} k'_l\Big) E(t, b),

with :math:`E(t, s) = \sum_f c^f_t c'^f_s \Gamma^f(t, s)`.  Row :math:`t` of
:math:`\Gamma` needs row :math:`t - 1` of :math:`\Theta_h` (a particle mean of
:math:`P`), so the recursion runs row by row, vectorised over the columns,
the pairs and the particles (:func:`tangent_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..elementwise import Erf, Nonlinearity

__all__ = ["GATE_DERIVATIVES", "DecayedSums", "derivative", "erf_slope_moment", "shift_both", "tangent_rows"]


def _sigmoid_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _erf_gate_derivative(x: Tensor) -> Tensor:
    return torch.exp(-x * x) / math.sqrt(math.pi)


#: Derivatives of the gate functions of :data:`~gpytorch_tp.layers.gated.cell.GATES`, by name.
GATE_DERIVATIVES = {"sigmoid": _sigmoid_derivative, "erf": _erf_gate_derivative}


def derivative(phi: Nonlinearity, x: Tensor) -> Tensor:
    """``phi'(x)`` elementwise: a closed form where the nonlinearity has one, else forward-mode autodiff."""
    if isinstance(phi, Erf):
        return torch.exp(-x * x) * (2 / math.sqrt(math.pi))
    closed = getattr(phi, "derivatives", None)
    value = closed(x, 1) if closed is not None else None
    if value is None and callable(getattr(phi, "derivative", None)):
        value = phi.derivative(x)
    if value is None:
        # An elementwise function's Jacobian is diagonal: the JVP with ones is its derivative.
        value = torch.func.jvp(phi.function, (x,), (torch.ones_like(x),))[1]
    return value


def erf_slope_moment(mean1: Tensor, mean2: Tensor, var1: Tensor, var2: Tensor, cov: Tensor) -> Tensor:
    r"""``E[erf'(U) erf'(V)]`` for a Gaussian pair with means ``mean1, mean2`` and covariance ``[[var1, cov], [cov, var2]]``.

    :math:`\operatorname{erf}'(x) = \frac{2}{\sqrt\pi} e^{-x^2}` and
    :math:`E[e^{-X^\top X}] = \det(I + 2C)^{-1/2} \exp(-\mu^\top (I + 2C)^{-1} \mu)`.
    """
    a11, a22, a12 = 1 + 2 * var1, 1 + 2 * var2, 2 * cov
    det = a11 * a22 - a12 * a12
    quadratic = (mean1 * mean1 * a22 - 2 * a12 * mean1 * mean2 + mean2 * mean2 * a11) / det
    return (4 / math.pi) * torch.exp(-quadratic) / det.sqrt()


def shift_both(k: Tensor) -> Tensor:
    """``K(t - 1, s - 1)`` of a ``(..., T, T)`` matrix, 0 where an index is -1."""
    return nn.functional.pad(k[..., :-1, :-1], (1, 0, 1, 0))


# Steps per block of :class:`DecayedSums`, and the smallest factor it resolves: within a block the
# inverse cumulative product stays below 2e-9 ** -16 = 1e139, finite in float64.
_BLOCK = 16
_SMALLEST_FACTOR = 2e-9


class DecayedSums:
    """``y_s = keep_s y_{s-1} + v_s`` along the last axis (``y_{-1} = 0``), for many ``v`` with the same ``keep``.

    That is ``y_s = sum_{b <= s} (prod_{b < l <= s} keep_l) v_b``, computed per block of
    steps as ``e^{c_s} (y_before + cumsum_b(e^{-c_b} v_b))`` with ``c`` the cumulative log of
    ``keep`` within the block: ``O(T)`` per ``v``.  Factors below 2e-9 count as 2e-9 (the
    products they enter are negligible then), so that ``e^{-c}`` stays finite.
    """

    def __init__(self, keep: Tensor):
        logs = keep.clamp_min(_SMALLEST_FACTOR).log()
        self.blocks = []
        for start in range(0, keep.shape[-1], _BLOCK):
            cumulative = torch.cumsum(logs[..., start : start + _BLOCK], -1)
            self.blocks.append((slice(start, start + _BLOCK), cumulative.exp(), (-cumulative).exp()))

    def __call__(self, values: Tensor) -> Tensor:
        out, carry = [], None
        for part, grow, shrink in self.blocks:
            total = torch.cumsum(values[..., part] * shrink, -1)
            if carry is not None:
                total = total + carry
            y = grow * total
            out.append(y)
            carry = y[..., -1:]
        return torch.cat(out, -1) if len(out) > 1 else out[0]


def tangent_rows(
    coef1: Tensor,
    coef2: Tensor,
    keep1: Tensor,
    keep2: Tensor,
    gammas: Callable[[int, Tensor | None], Tensor],
    readout: Callable[[int, Tensor, Tensor], Tensor],
    integrated: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    r"""The tangent recursion of a chunk of pairs, row by row: ``Theta_h`` ``(B, T, T)``.

    :param coef1: side 1's coefficients :math:`c^f_t` per particle ``(B, M, F, T)`` (0 at padding).
    :param coef2: side 2's ``(B, M, F, T)``.
    :param keep1: side 1's factor :math:`k_t` on the previous tangent ``(B, M, T)``.
    :param keep2: side 2's ``(B, M, T)``.
    :param gammas: ``(t, Theta_h(t - 1, :) or None) -> Gamma^f(t, :)`` ``(B, F', T)``; its first
        ``F`` channels pair with the coefficients, all of them go to ``integrated``.
    :param readout: ``(t, P(t, :) (B, M, T), Gamma(t, :)) -> Theta_h(t, :)`` ``(B, T)``.
    :param integrated: ``(t, Gamma(t, :)) -> `` further terms of :math:`E(t, :)` ``(B, M, T)``
        (families integrated out given the sampled ones).
    """
    decayed_sums = DecayedSums(keep2)
    steps = coef1.shape[-1]
    moments = previous = None
    rows = []
    for t in range(steps):
        gamma = gammas(t, previous)
        innovation = torch.einsum("bmf,bmfs,bfs->bms", coef1[..., t], coef2, gamma[:, : coef1.shape[2]])  # E(t, s)
        if integrated is not None:
            innovation = innovation + integrated(t, gamma)
        carried = decayed_sums(innovation)  # R(t; s)
        moments = carried if moments is None else keep1[..., t : t + 1] * moments + carried
        previous = readout(t, moments, gamma)
        rows.append(previous)
    return torch.stack(rows, -2)
