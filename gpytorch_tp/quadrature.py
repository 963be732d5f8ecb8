"""Gaussian quadrature of pair moments ``E[phi^(m)(u) phi^(n)(v)]`` for any elementwise nonlinearity.

The fallback of every elementwise layer without a closed form:
:func:`gaussian_pair_moment` integrates over the centred Gaussian pair
``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` with a tensor-product trapezoidal
rule (:func:`gaussian_rule`), or, for a function smooth except at 0
(``split_at_zero``), with Gauss-Legendre panels split where ``u = 0`` and
``v = 0``.  The derivatives its gradients need (Price's theorem) are closed
forms where the layer gives them, else autograd of the function.  (The
Gauss-Hermite rules of the gated layers are :mod:`gpytorch_tp.layers.gated.quadrature`.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .numerics import pair_determinant, safe_correlation

__all__ = ["gaussian_pair_moment", "gaussian_rule"]

_TWO_PI = 2.0 * math.pi


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
