"""Closed-form Gaussian pair moments of the smooth nonlinearities (erf, GELU, sine and cosine).

Each function returns ``(V, V')`` for ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``,
written so that no cancellation occurs at correlation ``+-1`` or at large variances
(see :mod:`gpytorch_tp.layers.elementwise`, whose layers use them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..numerics import determinant_item_factors, fused_pair_determinant, records_grad, t_minus_arctan
from ..state import per_item

__all__ = ["erf_item_factors", "erf_moments", "erf_self_moment", "gelu_moments", "sinh_cosh_moments"]

_TWO_PI = 2.0 * math.pi


def erf_item_factors(k11: Tensor, k22: Tensor) -> tuple:
    """Per-item factors of :func:`erf_moments`."""
    return (per_item(_one_plus_twice, k11), per_item(_twice, k22), *determinant_item_factors(k11, k22))


def erf_moments(k12: Tensor, factors: tuple, derivative: bool) -> tuple[Tensor, Tensor | None]:
    """Erf's ``(V, V')`` (see :class:`~gpytorch_tp.layers.Erf`) from :func:`erf_item_factors`.

    Out-of-place elementwise operations: autograd-safe, and fusable.
    """
    first, second, *det_factors = factors
    return _erf_moments(k12, first + second + 4 * fused_pair_determinant(k12, tuple(det_factors)), derivative)


def erf_self_moment(k: Tensor) -> Tensor:
    """``E[erf(u)^2]``, u ~ N(0, k): the pair formula at k11 = k22 = k12 (determinant exactly 0)."""
    return _erf_moments(k, _one_plus_twice(k) + _twice(k), False)[0]


def _erf_moments(k12: Tensor, radicand: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
    root = torch.sqrt(radicand)
    value = (2 / math.pi) * torch.atan2(2 * k12, root)
    return value, ((4 / math.pi) / root if derivative else None)


def _one_plus_twice(k: Tensor) -> Tensor:
    return 1 + 2 * k


def _twice(k: Tensor) -> Tensor:
    return 2 * k


def _gelu_inverse_sum(k11: Tensor) -> Tensor:
    return 1 / (1 + k11)


def _one_plus(k: Tensor) -> Tensor:
    return 1 + k


def gelu_moments(k11: Tensor, k22: Tensor, k12: Tensor, det: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
    r"""GELU's closed forms from the determinant ``det = k11 k22 - k12^2`` (see :class:`GELU`).

    With ``D = 1 + a + b + det`` (positive terms) and
    :math:`\pi/2 + \arcsin\rho = \operatorname{atan2}(\sqrt D, -r)` (no
    cancellation at :math:`\rho \to -1`):
    :math:`2\pi V_\phi = r \operatorname{atan2}(\sqrt D, -r) + (\det + r^2 S)/\sqrt D`,
    :math:`2\pi V_{\phi'} = \operatorname{atan2}(\sqrt D, -r) + r (S + 1/D)/\sqrt D`,
    :math:`S = 1/(1+a) + 1/(1+b)`.  For ``r < -sqrt(D)`` (correlation near -1 at
    large variance) the two terms of :math:`V_\phi` cancel to :math:`O(k^{-1/2})`
    out of :math:`O(k^{1/2})`; there, with ``m = -r`` and ``t = sqrt(D) / m < 1``,
    the same value is :math:`m (t - \arctan t) + (1 - S D)/\sqrt D`, whose terms
    cancel by at most a small factor (``S D >= 2``).
    """
    inverse_sum = per_item(_gelu_inverse_sum, k11) + per_item(_gelu_inverse_sum, k22)
    d = (per_item(_one_plus, k11) + k22) + det
    root = torch.sqrt(d)
    angle = torch.atan2(root, -k12)
    value = k12 * angle + (det + k12 * k12 * inverse_sum) / root
    anticorrelated = -k12 > root
    if bool(anticorrelated.any()):
        # Only those pairs (out of place: autograd-safe); t = sqrt(D) / m < 1 there.
        shape = anticorrelated.shape
        m, rt = -k12.broadcast_to(shape)[anticorrelated], root.broadcast_to(shape)[anticorrelated]
        s, dd = inverse_sum.broadcast_to(shape)[anticorrelated], d.broadcast_to(shape)[anticorrelated]
        near_minus_one = m * t_minus_arctan(rt / m) + (1 - s * dd) / rt
        value = value.broadcast_to(shape).index_put((anticorrelated,), near_minus_one)
    value = value * (1 / _TWO_PI)
    if not derivative:
        return value, None
    return value, (angle + k12 * (inverse_sum + 1 / d) / root) * (1 / _TWO_PI)


def sinh_cosh_moments(
    k11: Tensor, k22: Tensor, k12: Tensor, both: bool, cosh_first: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``e^{-(k11 + k22)/2}`` times ``sinh k12`` and ``cosh k12`` (the first; the second if ``both``)."""
    if records_grad(k11, k22, k12):
        sinh, cosh = _SinhCoshMoments.apply(k11, k22, k12)
    else:
        sinh, cosh = _sinh_cosh_values(k11, k22, k12)
    first, second = (cosh, sinh) if cosh_first else (sinh, cosh)
    return first, (second if both else None)


def _sinh_cosh_values(k11: Tensor, k22: Tensor, k12: Tensor) -> tuple[Tensor, Tensor]:
    # Never recorded by autograd (_SinhCoshMoments has the gradients): in place on temporaries.
    m = k12.abs()
    near = (k11 - m).add_(k22 - m).clamp_(min=0.0).mul_(-0.5).exp_()  # e^{-(k11 + k22)/2 + |k12|}
    e = torch.expm1(m.mul_(-2.0))  # e^{-2|k12|} - 1, accurate at small |k12|
    sinh = torch.copysign((near * e).mul_(-0.5), k12)
    return sinh, e.add_(2.0).mul_(near).mul_(0.5)


class _SinhCoshMoments(torch.autograd.Function):
    """``(S, C) = e^{-(k11 + k22)/2} (sinh k12, cosh k12)`` with analytic gradients.

    ``dS/dk12 = C``, ``dC/dk12 = S`` (Price's theorem) and ``d/dk11 = d/dk22 = -1/2`` times
    the value: autograd of the two-exponential form would difference nearly equal
    exponentials (all digits lost at small ``k12``).
    """

    @staticmethod
    def forward(ctx, k11: Tensor, k22: Tensor, k12: Tensor):
        sinh, cosh = _sinh_cosh_values(k11, k22, k12)
        ctx.save_for_backward(sinh, cosh)
        ctx.shapes = (k11.shape, k22.shape, k12.shape)
        ctx.set_materialize_grads(False)
        return sinh, cosh

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sinh: Tensor | None, grad_cosh: Tensor | None):
        sinh, cosh = ctx.saved_tensors
        shape11, shape22, shape12 = ctx.shapes
        g12 = g_own = None
        if grad_sinh is not None:
            g12, g_own = grad_sinh * cosh, grad_sinh * sinh
        if grad_cosh is not None:
            g12 = grad_cosh * sinh if g12 is None else g12 + grad_cosh * sinh
            g_own = grad_cosh * cosh if g_own is None else g_own + grad_cosh * cosh
        if g12 is None:
            return None, None, None
        g_own = g_own * -0.5
        return g_own.sum_to_size(shape11), g_own.sum_to_size(shape22), g12.sum_to_size(shape12)
