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
  where it matters;
* at large variances ``k`` the functions that resolve distances on a fixed
  scale (erf, tanh, GELU, sine) depend on the pair through ``k11 k22 - k12^2``
  (or ``k11 + k22 - 2 k12``), which ``k11 k22 - k12 * k12`` in floating point
  gets wrong by ``eps k^2``: from ``k ~ 1 / sqrt(eps)`` on, it is noise, often
  negative (NaN).  :func:`pair_determinant` computes it from error-free
  products instead, exactly 0 for a pair of an item with itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .state import per_item

__all__ = [
    "arccos_moments",
    "determinant_item_factors",
    "fused_pair_determinant",
    "gaussian_pair_moment",
    "gaussian_rule",
    "records_grad",
    "pair_determinant",
    "safe_correlation",
    "tanh_derivative_pair_moment",
    "tanh_pair_moment",
]

_TWO_PI = 2.0 * math.pi


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd will record operations on ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def safe_correlation(k11: Tensor, k22: Tensor, k12: Tensor) -> Tensor:
    """Correlation ``k12 / sqrt(k11 k22)``, clipped to [-1, 1], and 0 where a variance is 0.

    The clip only removes round-off (Cauchy-Schwarz guarantees ``|c| <= 1``);
    gradients are exact inside the interval.
    """
    prod = k11 * k22
    positive = prod > 0
    if records_grad(k11, k22, k12):
        # Double ``where`` keeps the gradient finite where ``prod == 0``.
        safe_prod = torch.where(positive, prod, 1.0)
        return torch.where(positive, k12 / torch.sqrt(safe_prod), 0.0).clamp(-1.0, 1.0)
    return torch.where(positive, k12 / torch.sqrt(prod), 0.0).clamp_(-1.0, 1.0)


def _rsqrt_or_zero(k: Tensor) -> Tensor:
    """``1 / sqrt(k)`` where ``k > 0``, else 0 (with a finite gradient when autograd records)."""
    if records_grad(k):
        positive = k > 0
        return torch.where(positive, torch.rsqrt(torch.where(positive, k, 1.0)), 0.0)
    # rsqrt(0) = inf and rsqrt(k < 0) = nan: both become 0.
    return torch.rsqrt(k).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without changing it (so an in-place op works)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def scale_and_shift(x: Tensor, scale: Tensor | float, shift: Tensor | float) -> Tensor:
    """``shift + scale * x``, for a ``scale`` and ``shift`` of a few elements (hyperparameters) and a large ``x``.

    Not ``torch.addcmul(shift, scale, x)``: with two broadcast operands it runs
    2.6x slower than a multiply and an in-place add (float32, 2-core Xeon,
    65k elements: 43 us against 17 us).  The in-place add is safe under
    autograd (a product's backward keeps its inputs, not its output).
    """
    out = torch.mul(x, scale)
    # A number (a per-layer variance of the BatchNorm functions) always adds in place.
    in_place = not isinstance(shift, Tensor) or _broadcasts_to(shift.shape, out.shape)
    return out.add_(shift) if in_place else out + shift


def _arccos_moments_forward(k11: Tensor, k22: Tensor, k12: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(J1, J0, c)`` without autograd: ten passes over the pairs, per-item work done per item."""
    (r1, root1), (r2, root2) = per_item(_first_factors, k11), per_item(_second_factors, k22)
    c = k12 * r1
    c = c.mul_(r2) if _broadcasts_to(r2.shape, c.shape) else c * r2
    c.clamp_(-1.0, 1.0)
    # |c| <= 1 makes 1 - c^2 >= 0 in floating point too (c^2 rounds to at most 1).
    sin_theta = torch.addcmul(_constant(1.0, c), c, c, value=-1.0).sqrt_()
    # J0 = (pi - theta) / (2 pi) = 1/4 + arcsin(c) / (2 pi); arcsin is a little cheaper than arccos.
    j0 = torch.asin(c)
    j0 = torch.add(_constant(0.25, c), j0, alpha=1.0 / _TWO_PI, out=j0)
    # J1 = sqrt(k11) sqrt(k22) (sin(theta) + 2 pi J0 c) / (2 pi); the scales are per item.
    j1 = sin_theta.addcmul_(j0, c, value=_TWO_PI).mul_(root1).mul_(root2)
    return j1, j0, c


def _first_factors(k11: Tensor) -> tuple[Tensor, Tensor]:
    return _rsqrt_or_zero(k11), torch.sqrt(k11).mul_(1.0 / _TWO_PI)


def _second_factors(k22: Tensor) -> tuple[Tensor, Tensor]:
    # A zero variance gives c = 0.  Correlations within a few ulps of +-1 are
    # indistinguishable from +-1 (c itself carries that much round-off) but
    # arccos magnifies the difference to ~sqrt(ulp): snap them to +-1.
    return _rsqrt_or_zero(k22).mul_(1 + 8 * torch.finfo(k22.dtype).eps), torch.sqrt(k22)


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(value: float, like: Tensor) -> Tensor:
    """A cached 0-d tensor holding ``value`` with ``like``'s dtype and device."""
    key = (value, like.dtype, like.device)
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = _CONSTANTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return constant


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
        j1, j0, c = _arccos_moments_forward(k11, k22, k12)
        # An output nothing used (J0 of an NNGP-only recursion) gets None, not a tensor of zeros.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(k11, k22, c, j0)
        return j1, j0

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_j1: Tensor | None, grad_j0: Tensor | None):
        k11, k22, c, j0 = ctx.saved_tensors
        # Per-item factors are applied after summing the pair terms down to the
        # variances' shapes ((N1, 1) and (1, N2)): fewer full-size passes.
        r1, r2 = _rsqrt_or_zero(k11), _rsqrt_or_zero(k22)
        one_minus_c2 = torch.addcmul(_constant(1.0, c), c, c, value=-1.0).clamp_(min=0.0)
        g11 = g22 = g12 = None
        if grad_j1 is not None:
            # dJ1/dk12 = J0; dJ1/dk11 = s / (4 pi k11) = sin(theta) sqrt(k22) r1 / (4 pi); 0 for a zero variance.
            g12 = grad_j1 * j0
            weighted_sin = grad_j1 * one_minus_c2.sqrt()
            g11 = (weighted_sin * torch.sqrt(k22)).sum_to_size(k11.shape) * (r1 / (2 * _TWO_PI))
            g22 = (weighted_sin * torch.sqrt(k11)).sum_to_size(k22.shape) * (r2 / (2 * _TWO_PI))
        if grad_j0 is not None:
            interior = one_minus_c2 > 0
            # dJ0/dc = 1 / (2 pi sqrt(1 - c^2)) inside, 0 at |c| = 1 (see the class docstring).
            g = torch.where(interior, torch.rsqrt(torch.where(interior, one_minus_c2, 1.0)), 0.0).mul_(grad_j0)
            g.mul_(1.0 / _TWO_PI)
            # c = k12 r1 r2: dc/dk12 = r1 r2, dc/dk11 = -c r1^2 / 2.
            through_c = g * c
            g12_c = (
                g.mul_(r1).mul_(r2)
                if _broadcasts_to(r1.shape, g.shape) and _broadcasts_to(r2.shape, g.shape)
                else g * r1 * r2
            )
            g12 = g12_c if g12 is None else g12.add_(g12_c)
            g11_c = through_c.sum_to_size(k11.shape) * (r1 * r1 / -2)
            g22_c = through_c.sum_to_size(k22.shape) * (r2 * r2 / -2)
            g11 = g11_c if g11 is None else g11 + g11_c
            g22 = g22_c if g22 is None else g22 + g22_c
        if g12 is None:
            return None, None, None
        return g11, g22, g12.sum_to_size(c.shape)


def arccos_moments(k11: Tensor, k22: Tensor, k12: Tensor) -> tuple[Tensor, Tensor]:
    """Arc-cosine kernels of degree 1 and 0 (Cho & Saul 2009), with safe gradients.

    Returns ``(E[relu(u) relu(v)], P(u > 0, v > 0))`` for
    ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``.  Inputs broadcast.
    """
    if not records_grad(k11, k22, k12):
        j1, j0, _ = _arccos_moments_forward(k11, k22, k12)
        return j1, j0
    return _ArcCosineMoments.apply(k11, k22, k12)


def arccos_item_factors(k11: Tensor, k22: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-item factors of :func:`fused_arccos_moments`, computed once per item (see ``per_item``).

    When autograd records, they come from out-of-place operations whose
    gradients are finite at a zero variance (separate functions, so that the
    per-item cache never hands a fused run factors computed without autograd).
    """
    if records_grad(k11, k22):
        return (*per_item(_differentiable_first_factors, k11), *per_item(_differentiable_second_factors, k22))
    return (*per_item(_first_factors, k11), *per_item(_second_factors, k22))


def _sqrt_or_zero(k: Tensor) -> Tensor:
    """``sqrt(k)`` (``k >= 0``) whose gradient at ``k = 0`` is 0 instead of infinite (double ``where``)."""
    positive = k > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, k, 1.0)), 0.0)


def _differentiable_first_factors(k11: Tensor) -> tuple[Tensor, Tensor]:
    return _rsqrt_or_zero(k11), _sqrt_or_zero(k11) * (1.0 / _TWO_PI)


def _differentiable_second_factors(k22: Tensor) -> tuple[Tensor, Tensor]:
    return _rsqrt_or_zero(k22) * (1 + 8 * torch.finfo(k22.dtype).eps), _sqrt_or_zero(k22)


def fused_arccos_moments(k12: Tensor, factors: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(J1, J0)`` of :func:`arccos_moments` as out-of-place elementwise operations, for ``torch.compile``.

    The same formulas and per-item factors as the reference (so the same
    snapping of correlations within a few ulps of +-1) and, when autograd
    records, the same analytic gradients (finite at correlation +-1 and at
    zero variance), which ``torch.compile`` compiles with the forward.
    """
    if records_grad(k12, *factors):
        return _FusedArcCosineMoments.apply(k12, *factors)
    return _fused_arccos_values(k12, *factors)


def _fused_arccos_values(k12: Tensor, r1: Tensor, root1: Tensor, r2: Tensor, root2: Tensor) -> tuple[Tensor, Tensor]:
    c, j0, sin_theta = _fused_arccos_terms(k12, r1, r2)
    return (sin_theta + 6.283185307179586 * j0 * c) * root1 * root2, j0


def _fused_arccos_terms(k12: Tensor, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(c, J0, sin(theta))`` of a pair from the per-item factors ``r = 1 / sqrt(k)``."""
    # Literal constants: torch.compile (dynamic shapes) fails on module-level floats
    # inside an autograd.Function (pytorch/pytorch#193194).
    c = (k12 * r1 * r2).clamp(-1.0, 1.0)
    j0 = 0.25 + torch.asin(c) * 0.15915494309189535  # 1 / (2 pi)
    return c, j0, torch.sqrt(1.0 - c * c)


class _FusedArcCosineMoments(torch.autograd.Function):
    """:class:`_ArcCosineMoments` in elementwise form: pair covariance and per-item factors in, ``(J1, J0)`` out.

    With ``R = root1 root2 = sqrt(k11 k22) / (2 pi)``, ``J1 = (sin(theta) + 2 pi J0 c) R``;
    its total derivative in ``c`` is ``2 pi J0 R`` (the infinite slopes of
    ``sin(theta)`` and ``J0`` cancel analytically, so they are never formed),
    and ``dJ0/dc = 1 / (2 pi sin(theta))``, taken as 0 at ``|c| = 1`` as in the
    reference.  The backward pass recomputes ``c``, ``J0`` and ``sin(theta)``
    from the saved inputs instead of saving three more tensors of pairs.
    """

    @staticmethod
    def forward(ctx, k12: Tensor, r1: Tensor, root1: Tensor, r2: Tensor, root2: Tensor):
        j1, j0 = _fused_arccos_values(k12, r1, root1, r2, root2)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(k12, r1, root1, r2, root2)
        return j1, j0

    @staticmethod
    def backward(ctx, grad_j1: Tensor | None, grad_j0: Tensor | None):
        k12, r1, root1, r2, root2 = ctx.saved_tensors
        c, j0, sin_theta = _fused_arccos_terms(k12, r1, r2)
        grad_c = grad_scale = grad_k12 = None
        if grad_j1 is not None:
            grad_c = grad_j1 * (6.283185307179586 * j0) * (root1 * root2)
            grad_scale = grad_j1 * (sin_theta + 6.283185307179586 * j0 * c)
            # dJ1/dk12 = J0, written out: also where a variance is 0 (c = 0 there), as in the reference.
            grad_k12 = grad_j1 * j0
        if grad_j0 is not None:
            interior = sin_theta > 0
            through_j0 = torch.where(interior, grad_j0 / torch.where(interior, sin_theta, 1.0), 0.0)
            through_j0 = through_j0 * 0.15915494309189535
            grad_c = through_j0 if grad_c is None else grad_c + through_j0
            grad_k12 = through_j0 * r1 * r2 if grad_k12 is None else grad_k12 + through_j0 * r1 * r2
        if grad_c is None:
            return None, None, None, None, None
        # c = k12 r1 r2 (the clip only removes round-off: gradients pass through it, as in the reference).
        return (
            grad_k12.sum_to_size(k12.shape),
            (grad_c * k12 * r2).sum_to_size(r1.shape),
            None if grad_scale is None else (grad_scale * root2).sum_to_size(root1.shape),
            (grad_c * k12 * r1).sum_to_size(r2.shape),
            None if grad_scale is None else (grad_scale * root1).sum_to_size(root2.shape),
        )


# --- The determinant k11 k22 - k12^2 of a pair covariance, without cancellation ---------------


def _split_constant(dtype: torch.dtype) -> float:
    """Veltkamp's splitting constant ``2^ceil(p / 2) + 1`` for a ``p``-bit significand (literals: ``torch.compile``)."""
    if dtype == torch.float64:
        return 134217729.0  # p = 53
    if dtype == torch.float32:
        return 4097.0  # p = 24
    return 65.0 if dtype == torch.float16 else 17.0  # p = 11, bfloat16 p = 8


def _veltkamp_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` with ``hi + lo == x`` exactly and products of halves exact in ``x``'s dtype."""
    x = x.detach()
    t = x * _split_constant(x.dtype)
    hi = t - (t - x)
    return hi, x - hi


def determinant_item_factors(k11: Tensor, k22: Tensor) -> tuple[Tensor, ...]:
    """The per-item tensors of :func:`fused_pair_determinant`: each variance and its Veltkamp halves."""
    return (k11, *per_item(_veltkamp_split, k11), k22, *per_item(_veltkamp_split, k22))


def _determinant_values(
    k12: Tensor, k11: Tensor, h11: Tensor, l11: Tensor, k22: Tensor, h22: Tensor, l22: Tensor
) -> Tensor:
    # Dekker's error-free products: k11 k22 = p + e_p and k12^2 = q + e_q exactly, so
    # (p - q) + (e_p - e_q) is the determinant up to a few roundings of the result itself
    # (p - q is exact where the two are close, Sterbenz).  About 20 elementwise operations.
    # In place on fresh temporaries only (never called with autograd recording: see _PairDeterminant).
    # The products of halves are exact, so an addcmul fused into an FMA computes the same.
    t = k12 * _split_constant(k12.dtype)
    h12 = t.sub_(t - k12)  # t - (t - k12)
    l12 = k12 - h12
    q = k12 * k12
    e_q = (h12 * h12).sub_(q).add_(h12.mul_(l12), alpha=2.0).addcmul_(l12, l12)
    p = k11 * k22
    e_p = (h11 * h22).sub_(p).addcmul_(h11, l22).addcmul_(l11, h22).addcmul_(l11, l22)
    # Round-off can leave a valid covariance (Cauchy-Schwarz) a hair negative.
    return p.sub_(q).add_(e_p.sub_(e_q)).clamp_(min=0.0)


class _PairDeterminant(torch.autograd.Function):
    """:func:`_determinant_values` with the gradient of ``k11 k22 - k12^2`` (the split halves get none)."""

    @staticmethod
    def forward(ctx, k12, k11, h11, l11, k22, h22, l22):
        ctx.save_for_backward(k12, k11, k22)
        return _determinant_values(k12, k11, h11, l11, k22, h22, l22)

    @staticmethod
    def backward(ctx, grad):
        k12, k11, k22 = ctx.saved_tensors
        return (
            (grad * k12 * -2.0).sum_to_size(k12.shape),
            (grad * k22).sum_to_size(k11.shape),
            None,
            None,
            (grad * k11).sum_to_size(k22.shape),
            None,
            None,
        )


def fused_pair_determinant(k12: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
    """:func:`pair_determinant` from :func:`determinant_item_factors`, as elementwise operations on ``k12``."""
    if records_grad(k12, factors[0], factors[3]):
        return _PairDeterminant.apply(k12, *factors)
    return _determinant_values(k12, *factors)


def pair_determinant(k11: Tensor, k22: Tensor, k12: Tensor) -> Tensor:
    r""":math:`k_{11} k_{22} - k_{12}^2` of a pair covariance, accurate to a few ulps of the result, and :math:`\ge 0`.

    ``k11 * k22 - k12 * k12`` loses everything once :math:`1 - c^2` is below
    the dtype's resolution (at large variances that is where the kernels of
    saturating nonlinearities live) and can come out negative; the error-free
    products used here give the determinant of the floating-point inputs to a
    few ulps, exactly 0 for ``k11 == k22 == k12`` (a pair of an item with
    itself), clamped at 0 where round-off upstream made the covariance a hair
    indefinite.  The gradient is that of :math:`k_{11} k_{22} - k_{12}^2`.
    Inputs broadcast (per-item work done per item).  Valid while the products
    do not overflow: variances below ~1e19 (float32), ~1e154 (float64).
    """
    return fused_pair_determinant(k12, determinant_item_factors(k11, k22))


def t_minus_arctan(t: Tensor) -> Tensor:
    r""":math:`t - \arctan t` for :math:`t \ge 0`, without the cancellation at small ``t``.

    Below 0.25 the series :math:`t^3 \sum_n (-1)^n t^{2n} / (2n + 3)`, to the
    dtype's resolution; above, the difference, which loses at most 6 bits there.
    """
    small = t < 0.25
    # Double where: the series sees only small arguments (its gradient stays finite).
    s = torch.where(small, t, 0.0)
    s2 = s * s
    # Truncation error 16^-terms / 3 relative at t = 0.25.
    terms = 13 if t.dtype == torch.float64 else 6
    series = torch.full_like(s2, 1.0 / (2 * terms + 1))
    for n in range(terms - 2, -1, -1):
        series = 1.0 / (2 * n + 3) - s2 * series
    return torch.where(small, s * s2 * series, t - torch.atan(t))


@lru_cache(maxsize=32)
def _gaussian_rule_numpy(num_points: int, half_width: float) -> tuple[np.ndarray, np.ndarray]:
    nodes = np.linspace(-half_width, half_width, num_points)
    weights = np.exp(-nodes * nodes / 2)
    return nodes, weights / weights.sum()


def gaussian_rule(num_points: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Nodes and weights for E[f(z)], z ~ N(0, 1): the trapezoidal rule on [-L, L].

    For integrands analytic in a strip around the real axis the trapezoidal rule
    converges geometrically in the node spacing, and on the Gaussian weight it
    beats Gauss-Hermite with the same number of nodes by orders of magnitude
    (Gauss-Hermite spends most nodes far in the tails; e.g. for tanh at variance
    10, 128 trapezoid nodes give 1e-10 where 128 Gauss-Hermite nodes give 1e-5).
    ``L`` is where the neglected Gaussian tail falls below the dtype's resolution.
    Weights are normalised to sum to one.
    """
    half_width = 8.5 if dtype == torch.float64 else 6.5
    nodes, weights = _gaussian_rule_numpy(int(num_points), half_width)
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
    r"""E[phi^(m)(u) phi^(n)(v)] by a tensor-product trapezoidal rule (see :func:`gaussian_rule`).

    ``u = sqrt(k11) z1`` and ``v = sqrt(k22) (c z1 + sqrt(1 - c^2) z2)``.
    The backward pass uses Price's theorem,
    ``d/dk12 E[f(u) g(v)] = E[f'(u) g'(v)]`` and
    ``d/dk11 E[f(u) g(v)] = E[f''(u) g(v)] / 2``,
    so the gradient is finite and accurate also at ``|c| = 1``.
    """

    @staticmethod
    def forward(ctx, k11, k22, k12, integrand, m, n, num_points):
        k11, k22, k12 = torch.broadcast_tensors(k11, k22, k12)
        shape = k11.shape
        nodes, weights = gaussian_rule(num_points, k11.dtype, k11.device)
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
            fu = integrand(m, u)
            gv = integrand(n, v)
            inner = gv @ weights  # (P, q): E over z2 given z1
            out[sl] = (fu * inner) @ weights
        ctx.save_for_backward(k11, k22, k12)
        ctx.config = (integrand, m, n, num_points)
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        k11, k22, k12 = ctx.saved_tensors
        integrand, m, n, q = ctx.config
        apply = _GaussianPairMoment.apply
        g12 = grad * apply(k11, k22, k12, integrand, m + 1, n + 1, q)
        g11 = grad * apply(k11, k22, k12, integrand, m + 2, n, q) / 2
        g22 = grad * apply(k11, k22, k12, integrand, m, n + 2, q) / 2
        return g11, g22, g12, None, None, None, None


class _Integrand:
    """``order -> phi^(order)``: closed forms where given, autograd otherwise."""

    def __init__(self, fn, derivative_fn=None, derivatives=None):
        self.fn = fn
        self.derivative_fn = derivative_fn
        self.derivatives = derivatives

    def __call__(self, order: int, x: Tensor) -> Tensor:
        if self.derivatives is not None:
            value = self.derivatives(x, order)
            if value is not None:
                return value
        if order >= 1 and self.derivative_fn is not None:
            return _derivative(self.derivative_fn, order - 1, x)
        return _derivative(self.fn, order, x)


def gaussian_pair_moment(
    k11: Tensor,
    k22: Tensor,
    k12: Tensor,
    fn: Callable[[Tensor], Tensor],
    *,
    derivative_fn: Callable[[Tensor], Tensor] | None = None,
    derivatives: Callable[[Tensor, int], Tensor | None] | None = None,
    order: int = 0,
    num_points: int = 96,
    split_at_zero: bool = False,
) -> Tensor:
    """``E[phi^(order)(u) phi^(order)(v)]`` for ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``.

    ``fn`` is an elementwise torch function.  Its derivatives come from
    ``derivatives(x, n)`` (closed forms; may return ``None`` for orders it does
    not know), else from autograd of ``derivative_fn`` (the first derivative)
    or of ``fn``.  Accurate for
    smooth ``fn``; the error of a ``num_points``-point rule falls quickly with
    ``num_points`` for analytic functions of moderate growth.

    ``split_at_zero``: ``fn`` is smooth except at 0, where it or a derivative may
    jump (ELU); then Gauss-Legendre panels split where ``u = 0`` and ``v = 0``
    are used instead (see :class:`_SplitPairMoment`).
    """
    integrand = _Integrand(fn, derivative_fn, derivatives)
    moment = _SplitPairMoment if split_at_zero else _GaussianPairMoment
    return moment.apply(k11, k22, k12, integrand, order, order, num_points)


@lru_cache(maxsize=32)
def _legendre_numpy(num_points: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(num_points)
    return (nodes + 1) / 2, weights / 2  # on [0, 1]


def _legendre(num_points: int, like: Tensor) -> tuple[Tensor, Tensor]:
    nodes, weights = _legendre_numpy(max(2, int(num_points)))
    return like.new_tensor(nodes), like.new_tensor(weights)


def _normal_density(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))


def _panels(edges: Tensor, nodes: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights (times the normal density) on the panels between ``edges[..., i]``."""
    a, b = edges[..., :-1, None], edges[..., 1:, None]
    z = a + (b - a) * nodes
    w = (b - a) * weights * _normal_density(z)
    return z.flatten(-2), w.flatten(-2)


def _split_values(k11, k22, k12, integrand, m, n, num_points) -> Tensor:
    """``E[phi^(m)(u) phi^(n)(v)]`` by Gauss-Legendre panels on which the integrand is smooth.

    Outer variable ``z1`` (``u = sqrt(k11) z1``): panels split at 0 and at
    ``+-w``, ``w ~ 10 sqrt(1 - c^2) / |c|``, the width over which the inner
    expectation changes fast when ``|c| -> 1``; inner ``z2`` split where ``v = 0``,
    which moves with ``z1``.  ``num_points`` nodes per dimension in all.
    """
    half_width = 8.5 if k11.dtype == torch.float64 else 6.5
    outer, outer_w = _legendre(num_points // 4, k11)
    inner, inner_w = _legendre(num_points // 2, k11)
    k11, k22, k12 = torch.broadcast_tensors(k11, k22, k12)
    shape = k11.shape
    a, b = k11.reshape(-1), k22.reshape(-1)
    c = safe_correlation(a, b, k12.reshape(-1))
    s = torch.sqrt(torch.clamp(1 - c * c, min=0.0))
    width = torch.where(c != 0, 10 * s / c.abs(), half_width).clamp(max=half_width / 2)
    limit = torch.full_like(width, half_width)
    z1, w1 = _panels(torch.stack([-limit, -width, 0 * width, width, limit], -1), outer, outer_w)  # (P, q1)
    # z2 where v = 0; any value when s = 0 (v does not depend on z2 then).
    kink = torch.where(s[:, None] > 0, -c[:, None] * z1 / torch.where(s > 0, s, 1.0)[:, None], 0.0)
    kink = kink.clamp(-half_width, half_width)
    bound = torch.full_like(kink, half_width)
    z2, w2 = _panels(torch.stack([-bound, kink, bound], -1), inner, inner_w)  # (P, q1, q2)
    u = torch.sqrt(a)[:, None] * z1
    v = torch.sqrt(b)[:, None, None] * (c[:, None, None] * z1[..., None] + s[:, None, None] * z2)
    inner_mean = (integrand(n, v) * w2).sum(-1)
    return ((integrand(m, u) * inner_mean) * w1).sum(-1).reshape(shape)


def _conditional_mean(integrand, order: int, scale: Tensor, num_points: int) -> Tensor:
    """``E[phi^(order)(scale z)]``, z ~ N(0, 1), on the half-lines.

    At ``scale = 0``: the mean of the one-sided limits at 0 (the limit of small scales).
    """
    half_width = 8.5 if scale.dtype == torch.float64 else 6.5
    nodes, weights = _legendre(num_points // 2, scale)
    limit = torch.full_like(scale, half_width)
    z, w = _panels(torch.stack([-limit, 0 * limit, limit], -1), nodes, weights)
    tiny = torch.finfo(scale.dtype).tiny
    return (integrand(order, scale.clamp(min=tiny)[..., None] * z) * w).sum(-1)


def _jump(integrand, order: int, like: Tensor) -> float:
    """``phi^(order)(0+) - phi^(order)(0-)``."""
    tiny = torch.finfo(like.dtype).tiny
    left, right = integrand(order, like.new_tensor([-tiny, tiny])).tolist()
    return right - left


class _SplitPairMoment(torch.autograd.Function):
    r"""E[phi^(m)(u) phi^(n)(v)] for ``phi`` smooth except at 0 (:func:`_split_values`).

    The backward pass is Price's theorem with the derivatives as distributions:
    a jump ``J_k`` of ``phi^(k)`` at 0 adds ``J_k delta`` to ``phi^(k+1)``, and
    ``E[delta(u) g(v)] = p_u(0) E[g(v) | u = 0]``,
    ``E[delta'(u) g(v)] = -p_u(0) (k12 / k11) E[g'(v) | u = 0]``,
    ``E[delta(u) delta(v)] = 1 / (2 pi sqrt(k11 k22 - k12^2))``.  The last (and the
    jump part of ``g'`` in the second) is infinite at ``|c| = 1``; there those
    terms are left out: together they are orthogonal to every path that stays at
    ``|c| = 1`` (the symmetric sub-gradient, as for the arc-cosine kernels).  A
    zero-variance side (identically 0) gets no delta terms either.
    """

    @staticmethod
    def forward(ctx, k11, k22, k12, integrand, m, n, num_points):
        ctx.save_for_backward(k11, k22, k12)
        ctx.config = (integrand, m, n, num_points)
        with torch.no_grad():
            return _split_values(k11, k22, k12, integrand, m, n, num_points)

    @staticmethod
    def backward(ctx, grad):
        k11, k22, k12 = ctx.saved_tensors
        integrand, m, n, q = ctx.config
        apply = _SplitPairMoment.apply
        g12 = apply(k11, k22, k12, integrand, m + 1, n + 1, q)
        g11 = apply(k11, k22, k12, integrand, m + 2, n, q) / 2
        g22 = apply(k11, k22, k12, integrand, m, n + 2, q) / 2
        jumps = [_jump(integrand, k, k11) for k in range(max(m, n) + 2)]
        if any(jumps):
            d12, d11, d22 = _delta_terms(k11, k22, k12, integrand, m, n, q, jumps)
            g12, g11, g22 = g12 + d12, g11 + d11, g22 + d22
        g11, g22, g12 = grad * g11, grad * g22, grad * g12
        sizes = (g11.sum_to_size(k11.shape), g22.sum_to_size(k22.shape), g12.sum_to_size(k12.shape))
        return (*sizes, None, None, None, None)


def _delta_terms(k11, k22, k12, integrand, m, n, q, jumps):
    """The terms of :class:`_SplitPairMoment`'s gradient (k12, k11, k22) that the jumps at 0 add."""
    k11, k22, k12 = torch.broadcast_tensors(k11, k22, k12)
    det = pair_determinant(k11, k22, k12).clamp(min=0.0)
    regular = det > 0
    safe_det = torch.where(regular, det, 1.0)
    delta_delta = torch.where(regular, torch.rsqrt(safe_det) / _TWO_PI, 0.0)

    def one_side(k_own, other):
        # (E[delta(u) phi^(other + 1)(v)], E[delta(u) phi^(other)(v)], E[delta'(u) phi^(other)(v)]),
        # u the side with variance k_own; v | u = 0 ~ N(0, det / k_own).
        positive = k_own > 0
        safe = torch.where(positive, k_own, 1.0)
        density = torch.where(positive, torch.rsqrt(2 * math.pi * safe), 0.0)
        scale = torch.sqrt(det / safe)
        mean, mean_next = (_conditional_mean(integrand, other + i, scale, q) for i in (0, 1))
        # E[delta(v) | u = 0] = 1 / sqrt(2 pi det / k_own), left out at |c| = 1 (see the class).
        jump_density = torch.where(regular, torch.rsqrt(2 * math.pi * torch.where(regular, scale * scale, 1.0)), 0.0)
        slope = -density * (k12 / safe) * (mean_next + jumps[other] * jump_density)
        return density * mean_next, density * mean, slope

    first, second = one_side(k11, n), one_side(k22, m)
    d12 = jumps[m] * first[0] + jumps[n] * second[0] + jumps[m] * jumps[n] * delta_delta
    d11 = (jumps[m + 1] * first[1] + jumps[m] * first[2]) / 2
    d22 = (jumps[n + 1] * second[1] + jumps[n] * second[2]) / 2
    return d12, d11, d22


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
