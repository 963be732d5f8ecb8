r"""Closed-form Gaussian pair moments of tanh, through a six-term expansion of tanh in erf functions.

:math:`\tanh(x) \approx \sum_k c_k \operatorname{erf}(a_k x)` to 4.9e-7 for all real
:math:`x`, and each pair of erf terms has Williams' (1997) closed form, so
:func:`tanh_pair_moment` (:math:`E[\tanh U \tanh V]`) and
:func:`tanh_derivative_pair_moment` (:math:`E[\tanh' U \tanh' V]`) are 36 arcsines
or reciprocal square roots per pair, accurate to ``TANH_PAIR_MOMENT_ERROR``
and ``TANH_DERIVATIVE_PAIR_MOMENT_ERROR``, with analytic gradients.  Their
radicands use :func:`~gpytorch_tp.numerics.pair_determinant` (no cancellation at
correlation one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .numerics import pair_determinant, records_grad

__all__ = [
    "TANH_DERIVATIVE_PAIR_MOMENT_ERROR",
    "TANH_PAIR_MOMENT_ERROR",
    "tanh_derivative_pair_moment",
    "tanh_pair_moment",
]


# tanh(x) = sum_k c_k erf(a_k x) + e(x) with |e(x)| <= 4.9e-7 and |e'(x)| <= 8.5e-7
# for all real x: a least-squares fit of tanh and tanh' on [0, 40] with
# sum(c_k) = 1 (so the limits at +-infinity are exact), checked on a grid of
# two million points.  Pairs (a_k, c_k):
_TANH_AS_ERFS = (
    (0.39429518792953011, 0.013669248567183592),
    (0.53972997665745936, 0.13547590088171635),
    (0.73035941988478181, 0.33956960205224196),
    (0.98147020848610111, 0.35313686553031898),
    (1.3091312407037761, 0.14447281744087856),
    (1.7535655073462646, 0.01367556552766056),
)
# Bounds on the moments' errors: twice the sup errors of tanh and of tanh' above.
TANH_PAIR_MOMENT_ERROR = 1e-6
TANH_DERIVATIVE_PAIR_MOMENT_ERROR = 2e-6


def _tanh_expansion(like: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.tensor([pair[0] for pair in _TANH_AS_ERFS], dtype=like.dtype, device=like.device)
    c = torch.tensor([pair[1] for pair in _TANH_AS_ERFS], dtype=like.dtype, device=like.device)
    return a, c


def _tanh_moment_terms(k11: Tensor, k22: Tensor, k12: Tensor):
    """Per first term ``k``: the closed forms' ingredients against every second term ``l``.

    Yields ``(k, root, first, second)``: ``root`` (shaped ``(..., K)``) is
    ``sqrt(N_kl)`` with the radicand ``N_kl = P_k Q_l - alpha_k alpha_l k12^2``
    written as ``1 + alpha_k k11 + alpha_l k22 + alpha_k alpha_l det`` (positive
    terms: no cancellation at correlation one, where the difference is ~eps k^2
    of noise at large variances), ``first`` is ``P_k = 1 + alpha_k k11`` and
    ``second`` is ``Q_l = 1 + alpha_l k22``, alpha = 2 a^2.
    One term at a time keeps the intermediates at K times the pairs, not K^2.
    """
    a, _ = _tanh_expansion(k12)
    alpha = 2 * a * a
    with torch.no_grad():
        det = pair_determinant(k11, k22, k12)
    b_part = alpha * k22[..., None]  # (..., K)
    second = 1 + b_part
    alpha_det = det[..., None] * alpha
    for k in range(len(_TANH_AS_ERFS)):
        first = 1 + alpha[k] * k11
        radicand = torch.add(b_part, alpha_det, alpha=float(alpha[k])).add_(first[..., None])
        yield k, radicand.sqrt_(), first, second


def _tanh_moment(k11: Tensor, k22: Tensor, k12: Tensor, order: int, plus_one: bool = False) -> Tensor:
    a, c = _tanh_expansion(k12)
    weights = c if order == 0 else c * a
    total = None
    for k, root, _, _ in _tanh_moment_terms(k11, k22, k12):
        if order == 0:
            # arcsin(rho_kl) = atan2(2 a_k a_l k12, sqrt(N_kl)): well conditioned where rho_kl -> +-1.
            # With plus_one, pi/2 + arcsin(rho_kl) = atan2(sqrt(N_kl), -2 a_k a_l k12): since the c_k
            # sum to 1 this gives 1 + E[tanh tanh] as a sum of positive terms, accurate also where
            # E[tanh tanh] -> -1 (correlation -1 at large variance).
            y = k12[..., None] * ((-2 if plus_one else 2) * a[k] * a)
            values = torch.atan2(root, y) if plus_one else torch.atan2(y, root)
        else:
            values = root.reciprocal_()
        term = (values @ weights) * weights[k]
        total = term if total is None else total.add_(term)
    return total * (2 / math.pi if order == 0 else 4 / math.pi)


class _TanhMoments(torch.autograd.Function):
    """The closed forms of :func:`tanh_pair_moment` (order 0) and :func:`tanh_derivative_pair_moment` (1).

    The backward pass recomputes the terms from the saved covariances (an
    autograd graph would keep K^2 = 36 times the pairs' memory per layer).
    With ``x = sqrt(N_kl)``, ``y = 2 a_k a_l k12`` and ``x^2 + y^2 = P_k Q_l``:
    ``d atan2(y, x) / d k12 = 2 a_k a_l / x``, ``/ d k11 = -y alpha_k / (2 x P_k)``,
    ``/ d k22 = -y alpha_l / (2 x Q_l)`` (all finite: ``x >= 1``); with
    ``R = 1 / x``, ``dR = -R^3 dN / 2`` and ``dN = alpha_k Q_l dk11 + alpha_l P_k dk22
    - 2 alpha_k alpha_l k12 dk12``.
    """

    @staticmethod
    def forward(ctx, k11: Tensor, k22: Tensor, k12: Tensor, order: int, plus_one: bool = False) -> Tensor:
        ctx.save_for_backward(k11, k22, k12)
        ctx.order = order
        # plus_one adds a constant: the same gradient.
        return _tanh_moment(k11, k22, k12, order, plus_one)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        k11, k22, k12 = ctx.saved_tensors
        order = ctx.order
        a, c = _tanh_expansion(k12)
        alpha = 2 * a * a
        weights = c if order == 0 else c * a
        constant = 2 / math.pi if order == 0 else 4 / math.pi
        g11 = g22 = g12 = None
        for k, root, first, second in _tanh_moment_terms(k11, k22, k12):
            if order == 0:
                # t_kl = grad * w_k w_l / x; y / 2 = a_k a_l k12.
                t = root.reciprocal_().mul_(weights).mul_(grad[..., None] * (constant * weights[k]))
                d12 = (t @ a) * (2 * a[k])
                half_y_t = t.mul_(a).mul_((a[k] * k12)[..., None])
                d11 = (half_y_t.sum(-1) / first) * -alpha[k]
                d22 = (half_y_t * (alpha / second)).sum(-1).neg_()
            else:
                # R^3 w_k w_l grad: dR/dk11 = -R^3 alpha_k Q_l / 2, dR/dk22 = -R^3 alpha_l P_k / 2,
                # dR/dk12 = R^3 alpha_k alpha_l k12.
                cubed = root.reciprocal_().pow_(3).mul_(weights).mul_(grad[..., None] * (constant * weights[k]))
                d11 = (cubed * second).sum(-1) * (-alpha[k] / 2)
                weighted = cubed @ alpha
                d22 = weighted * (-first / 2)
                d12 = weighted * (alpha[k] * k12)
            g11 = d11 if g11 is None else g11 + d11
            g22 = d22 if g22 is None else g22 + d22
            g12 = d12 if g12 is None else g12 + d12
        return g11.sum_to_size(k11.shape), g22.sum_to_size(k22.shape), g12.sum_to_size(k12.shape), None, None


def tanh_pair_moment(k11: Tensor, k22: Tensor, k12: Tensor, plus_one: bool = False) -> Tensor:
    r""":math:`E[\tanh(U) \tanh(V)]` of a centred Gaussian pair, in closed form up to 1e-6.

    With ``plus_one``, :math:`1 + E[\tanh(U) \tanh(V)]`, computed as a sum of
    positive terms (accurate where the moment tends to -1: correlation -1 at
    large variance, where the sigmoid's kernel is small).

    With :math:`\tanh(x) \approx \sum_k c_k \operatorname{erf}(a_k x)` (six
    terms, sup error 4.9e-7, so the moment is off by at most twice that) and
    Williams' (1997) closed form for each pair of terms,

    .. math::

        E[\operatorname{erf}(a U) \operatorname{erf}(b V)] = \frac{2}{\pi}
        \arcsin \frac{2 a b k_{12}}{\sqrt{(1 + 2 a^2 k_{11})(1 + 2 b^2 k_{22})}},

    the moment is 36 arcsines, against thousands of function values for a
    two-dimensional quadrature of comparable accuracy.  The arcsine's argument
    stays strictly inside (-1, 1) for finite variances, so the value is
    smooth everywhere, correlation one included; each arcsine is evaluated as
    ``atan2(2 a b k12, sqrt(N))`` with the radicand ``N`` (below) formed from
    :func:`pair_determinant`, so the terms are accurate to round-off at every
    variance and correlation; gradients are analytic (the terms recomputed in
    the backward pass).  Inputs broadcast.
    """
    if records_grad(k11, k22, k12):
        return _TanhMoments.apply(k11, k22, k12, 0, plus_one)
    return _tanh_moment(k11, k22, k12, 0, plus_one)


def tanh_derivative_pair_moment(k11: Tensor, k22: Tensor, k12: Tensor) -> Tensor:
    r""":math:`E[\tanh'(U) \tanh'(V)]` of a centred Gaussian pair, in closed form up to 2e-6.

    The derivative of the expansion of :func:`tanh_pair_moment` is a sum of
    Gaussians, :math:`\sum_k c_k a_k \frac{2}{\sqrt\pi} e^{-a_k^2 x^2}`, and

    .. math::

        E[e^{-a^2 U^2} e^{-b^2 V^2}] = \left((1 + 2 a^2 k_{11})(1 + 2 b^2 k_{22})
        - 4 a^2 b^2 k_{12}^2\right)^{-1/2},

    whose radicand is at least 1 for every valid covariance, and is formed as
    :math:`1 + 2a^2 k_{11} + 2b^2 k_{22} + 4a^2b^2 (k_{11}k_{22} - k_{12}^2)` with
    :func:`pair_determinant` (no cancellation at correlation one).  Inputs broadcast.
    """
    if records_grad(k11, k22, k12):
        return _TanhMoments.apply(k11, k22, k12, 1)
    return _tanh_moment(k11, k22, k12, 1)
