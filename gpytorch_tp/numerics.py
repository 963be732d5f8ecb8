"""Numerically careful building blocks for Gaussian expectations of pairs.

Every closed-form layer kernel is a function of the 2x2 covariance
``[[k11, k12], [k12, k22]]`` of a pair of centred Gaussian pre-activations.
Two places need care:

* the correlation ``c = k12 / sqrt(k11 k22)`` is 1 exactly on the diagonal of a
  kernel matrix (and for duplicate points), where ``arccos`` and
  ``sqrt(k11 k22 - k12^2)`` have infinite derivatives.  The *kernels* are smooth
  enough there, so the gradients are written out analytically instead of being
  left to autograd (which would produce ``inf * 0 = nan``);
* a zero-variance pre-activation (zero-norm input and zero bias variance) makes
  the correlation ``0 / 0``.  The pre-activation is then identically 0, so the
  pair is independent; we use ``c = 0`` and let each nonlinearity fix the value
  where it matters.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "safe_correlation",
    "arccos_moments",
    "gaussian_pair_moment",
    "hermite_rule",
]

_TWO_PI = 2.0 * math.pi


def safe_correlation(k11: Tensor, k22: Tensor, k12: Tensor) -> Tensor:
    """Correlation ``k12 / sqrt(k11 k22)``, clipped to [-1, 1], and 0 where a variance is 0.

    The clip only removes round-off (Cauchy-Schwarz guarantees ``|c| <= 1``);
    gradients are exact inside the interval.
    """
    prod = k11 * k22
    positive = prod > 0
    # Double ``where`` keeps the gradient finite where ``prod == 0``.
    safe_prod = torch.where(positive, prod, torch.ones_like(prod))
    c = torch.where(positive, k12 / torch.sqrt(safe_prod), torch.zeros_like(prod))
    return c.clamp(-1.0, 1.0)


def _rsqrt_or_zero(k: Tensor) -> Tensor:
    positive = k > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, k, torch.ones_like(k))), torch.zeros_like(k))


class _ArcCosineMoments(torch.autograd.Function):
    r"""``(J1, J0)`` with J1 = E[relu(u) relu(v)] and J0 = P(u > 0, v > 0).

    With ``theta = arccos(c)``:
    ``J1 = sqrt(k11 k22) (sin(theta) + (pi - theta) c) / (2 pi)`` and
    ``J0 = (pi - theta) / (2 pi)``.

    Analytic gradients (finite for every valid covariance), with
    ``s = sqrt(k11 k22 - k12^2)``:
    ``dJ1/dk12 = J0``, ``dJ1/dk11 = s / (4 pi k11)``, ``dJ1/dk22 = s / (4 pi k22)``;
    ``dJ0/dc = 1 / (2 pi sqrt(1 - c^2))`` for ``|c| < 1``.  At ``|c| = 1`` the
    correlation is at its extreme (Cauchy-Schwarz), so every smooth path of the
    inputs through that point has ``dc = 0`` to first order; the gradient of J0
    there is taken as 0 (exact on the diagonal of K(X, X), the symmetric
    sub-gradient at duplicate points, as with ``relu'(0) = 0``).

    The variances may have fewer elements than ``k12`` (``(N1, 1)`` and
    ``(1, N2)`` against ``(N1, N2)``); per-item work is then done once per item
    and the pairwise work is a handful of in-place passes, the hot loop of
    every ReLU network.
    """

    @staticmethod
    def forward(ctx, k11: Tensor, k22: Tensor, k12: Tensor):
        r1, r2 = _rsqrt_or_zero(k11), _rsqrt_or_zero(k22)
        c = k12 * r1
        # A zero variance gives c = 0.  Correlations within a few ulps of +-1 are
        # indistinguishable from +-1 (c itself carries that much round-off) but
        # arccos magnifies the difference to ~sqrt(ulp): snap them to +-1.
        c.mul_(r2 * (1 + 8 * torch.finfo(c.dtype).eps)).clamp_(-1.0, 1.0)
        theta = torch.acos(c)
        j0 = theta.mul_(-1.0 / _TWO_PI).add_(0.5)
        sin_theta = torch.addcmul(c.new_ones(()), c, c, value=-1.0).clamp_(min=0.0).sqrt_()
        j1 = sin_theta.addcmul_(j0, c, value=_TWO_PI).mul_(torch.sqrt(k11) / _TWO_PI).mul_(torch.sqrt(k22))
        ctx.save_for_backward(k11, k22, c, j0)
        return j1, j0

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_j1: Tensor | None, grad_j0: Tensor | None):
        k11, k22, c, j0 = ctx.saved_tensors
        r1, r2 = _rsqrt_or_zero(k11), _rsqrt_or_zero(k22)
        one_minus_c2 = (1 - c * c).clamp_(min=0.0)
        g12 = torch.zeros_like(c)
        g11 = torch.zeros_like(c)
        g22 = torch.zeros_like(c)
        if grad_j1 is not None:
            # s / (4 pi k11) = sqrt(1 - c^2) sqrt(k22 / k11) / (4 pi); 0 for a zero variance.
            sin_theta = torch.sqrt(one_minus_c2)
            g12 = g12 + grad_j1 * j0
            g11 = g11 + grad_j1 * sin_theta * (torch.sqrt(k22) * r1) / (2 * _TWO_PI)
            g22 = g22 + grad_j1 * sin_theta * (torch.sqrt(k11) * r2) / (2 * _TWO_PI)
        if grad_j0 is not None:
            interior = one_minus_c2 > 0
            dj0_dc = torch.where(
                interior, 1 / (_TWO_PI * torch.sqrt(torch.where(interior, one_minus_c2, 1.0))), torch.zeros_like(c)
            )
            g = grad_j0 * dj0_dc
            # c = k12 r1 r2: dc/dk12 = r1 r2, dc/dk11 = -c r1^2 / 2.
            g12 = g12 + g * (r1 * r2)
            g11 = g11 - g * c * (r1 * r1) / 2
            g22 = g22 - g * c * (r2 * r2) / 2
        return g11.sum_to_size(k11.shape), g22.sum_to_size(k22.shape), g12.sum_to_size(c.shape)


def arccos_moments(k11: Tensor, k22: Tensor, k12: Tensor) -> tuple[Tensor, Tensor]:
    """Arc-cosine kernels of degree 1 and 0 (Cho & Saul 2009), with safe gradients.

    Returns ``(E[relu(u) relu(v)], P(u > 0, v > 0))`` for
    ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``.  Inputs broadcast.
    """
    return _ArcCosineMoments.apply(k11, k22, k12)


@lru_cache(maxsize=32)
def _hermite_rule_numpy(num_points: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_points)
    return nodes, weights / math.sqrt(2 * math.pi)


def hermite_rule(num_points: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite nodes and weights for E[f(z)], z ~ N(0, 1) (weights sum to 1)."""
    nodes, weights = _hermite_rule_numpy(num_points)
    return (
        torch.as_tensor(nodes, dtype=dtype, device=device),
        torch.as_tensor(weights, dtype=dtype, device=device),
    )


def _derivative(fn, order: int, x: Tensor) -> Tensor:
    """``order``-th derivative of an elementwise torch function, by autograd."""
    if order == 0:
        with torch.no_grad():
            return fn(x)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        for i in range(order):
            (y,) = torch.autograd.grad(y.sum(), x, create_graph=i < order - 1)
            if not y.requires_grad and i < order - 1:
                # Polynomial pieces: the remaining derivatives are identically zero.
                return torch.zeros_like(x)
    return y.detach()


# Pairs per chunk times nodes^2 stays below this many elements (bounded memory).
_QUADRATURE_CHUNK_ELEMENTS = 1 << 22


class _GaussianPairMoment(torch.autograd.Function):
    r"""E[phi^(m)(u) phi^(n)(v)] by tensor-product Gauss-Hermite quadrature.

    ``u = sqrt(k11) z1`` and ``v = sqrt(k22) (c z1 + sqrt(1 - c^2) z2)``.
    The backward pass uses Price's theorem,
    ``d/dk12 E[f(u) g(v)] = E[f'(u) g'(v)]`` and
    ``d/dk11 E[f(u) g(v)] = E[f''(u) g(v)] / 2``,
    so the gradient is finite and accurate also at ``|c| = 1``.
    """

    @staticmethod
    def forward(ctx, k11, k22, k12, fn, derivative_fn, m, n, num_points):
        k11, k22, k12 = torch.broadcast_tensors(k11, k22, k12)
        shape = k11.shape
        nodes, weights = hermite_rule(num_points, k11.dtype, k11.device)
        a = k11.reshape(-1)
        b = k22.reshape(-1)
        c = safe_correlation(a, b, k12.reshape(-1))
        s = torch.sqrt(torch.clamp(1 - c * c, min=0.0))
        root_a, root_b = torch.sqrt(a), torch.sqrt(b)
        out = torch.empty_like(a)
        chunk = max(1, _QUADRATURE_CHUNK_ELEMENTS // (num_points * num_points))
        for start in range(0, a.numel(), chunk):
            sl = slice(start, start + chunk)
            u = root_a[sl, None] * nodes  # (P, q)
            v = root_b[sl, None, None] * (c[sl, None, None] * nodes[:, None] + s[sl, None, None] * nodes)  # (P, q, q)
            fu = _apply(fn, derivative_fn, m, u)
            gv = _apply(fn, derivative_fn, n, v)
            inner = gv @ weights  # (P, q): E over z2 given z1
            out[sl] = (fu * inner) @ weights
        ctx.save_for_backward(k11, k22, k12)
        ctx.config = (fn, derivative_fn, m, n, num_points)
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        k11, k22, k12 = ctx.saved_tensors
        fn, derivative_fn, m, n, q = ctx.config
        apply = _GaussianPairMoment.apply
        g12 = grad * apply(k11, k22, k12, fn, derivative_fn, m + 1, n + 1, q)
        g11 = grad * apply(k11, k22, k12, fn, derivative_fn, m + 2, n, q) / 2
        g22 = grad * apply(k11, k22, k12, fn, derivative_fn, m, n + 2, q) / 2
        return g11, g22, g12, None, None, None, None, None


def _apply(fn, derivative_fn, order: int, x: Tensor) -> Tensor:
    if order >= 1 and derivative_fn is not None:
        return _derivative(derivative_fn, order - 1, x)
    return _derivative(fn, order, x)


def gaussian_pair_moment(
    k11: Tensor,
    k22: Tensor,
    k12: Tensor,
    fn,
    *,
    derivative_fn=None,
    order: int = 0,
    num_points: int = 32,
) -> Tensor:
    """``E[phi^(order)(u) phi^(order)(v)]`` for ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``.

    ``fn`` is an elementwise torch function; its derivatives come from autograd
    unless ``derivative_fn`` (the first derivative) is given.  Accurate for
    smooth ``fn``; the error of a ``num_points``-point rule falls quickly with
    ``num_points`` for analytic functions of moderate growth.
    """
    return _GaussianPairMoment.apply(k11, k22, k12, fn, derivative_fn, order, order, num_points)
