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

Here: the shared helpers (:func:`safe_correlation`, :func:`records_grad`,
:func:`scale_and_shift`), the arc-cosine moments of ReLU (:func:`arccos_moments`
and its fused form) and the error-free determinant.  The closed-form moments of
tanh are :mod:`gpytorch_tp.tanh_moments`, the quadrature for any other
nonlinearity :mod:`gpytorch_tp.quadrature`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .state import per_item

__all__ = [
    "arccos_moments",
    "determinant_item_factors",
    "fused_pair_determinant",
    "records_grad",
    "pair_determinant",
    "safe_correlation",
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
    several times slower than a multiply and an in-place add (docs/benchmarks.md,
    "Tile sizes").  The in-place add is safe under
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
