r"""Expectations of products of functions of jointly Gaussian variables, by quadrature.

:func:`gaussian_moments` computes, for a centred Gaussian vector :math:`u` of covariance
:math:`\Sigma` (one per pair of inputs, batched) and two functions :math:`F_1, F_2` of parts of it,

.. math::

    E[F_1(u_{I_1})\, F_2(u_{I_2})] \quad\text{and}\quad
    E[\partial_i F_1(u_{I_1})\, \partial_j F_2(u_{I_2})]

(the latter for the NTK), with :math:`u = L z`, :math:`L L^\top = \Sigma + \epsilon I` and a fixed
rule for :math:`z \sim N(0, I_m)`: for one dimension Gauss-Legendre panels on either side of 0
(8 panels of 12 nodes per side: round-off for smooth functions and for functions with a kink at 0,
such as the mean of a ReLU, which the trapezoidal rule gets only to 1e-3); for 2 dimensions a
tensor product of the trapezoidal rule on the Gaussian (:func:`gpytorch_tp.quadrature.gaussian_rule`,
64 nodes per dimension: geometric convergence for smooth functions, tanh times sigmoid and their
derivatives at unit variances to 1e-11 relative); for 3 and 4 dimensions Gauss-Hermite (16 and 10
nodes per dimension: exact for polynomials of degree below twice that, but only about 3e-3
relative for saturating functions such as a product of four tanh at unit variances, 3e-2 for
``tanh(u)^2`` of variance 5), which the master theorem asks for polynomials only (``hermite``);
otherwise, and above 4 dimensions, ``QMC_POINTS`` scrambled Sobol points of a fixed seed (the same
points on every call: deterministic and differentiable; absolute error about 1e-3 for smooth
integrands bounded by 1, 1e-6 to 7e-4 measured on a GRU cell's 3-dimensional expectations).
:math:`\epsilon` (``1e-12`` of the largest variance in float64, ``1e-6`` in float32) makes
perfectly correlated pairs (an input with itself) factorisable; it shifts the moments by about
:math:`\epsilon`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..layers.gated.quadrature import hermite_rule
from ..quadrature import gaussian_rule

__all__ = ["NODES_PER_DIMENSION", "QMC_POINTS", "gaussian_moments"]

# Nodes per dimension of the tensor-product rule, by dimension (at most ~10^4 points in all); one dimension:
# ``_SPLIT_PANELS`` Gauss-Legendre panels of ``NODES_PER_DIMENSION[1] // _SPLIT_PANELS // 2`` nodes per side.
NODES_PER_DIMENSION = {1: 192, 2: 64, 3: 16, 4: 10}
_SPLIT_PANELS = 8
QMC_POINTS = 4096
# Points times pairs per chunk: about a megabyte per float64 tensor, so that the chain of elementwise
# operations of one chunk stays in cache (on a 2-core EPYC, 1 << 17 took 0.56 of the time of 1 << 21 on a
# GRU cell's expectations); at least ``_CHUNK_POINTS`` points, so that large tiles do not loop in Python
# over a handful of points.
_CHUNK_ELEMENTS = 1 << 17
_CHUNK_POINTS = 64


def _split_rule(half_width: float) -> tuple[Tensor, Tensor]:
    """E[f(z)], z ~ N(0, 1), by Gauss-Legendre panels on [-L, 0] and [0, L]: exact at a kink at 0."""
    per_panel = NODES_PER_DIMENSION[1] // _SPLIT_PANELS // 2
    x, w = np.polynomial.legendre.leggauss(per_panel)
    edges = np.linspace(0.0, half_width, _SPLIT_PANELS + 1)
    nodes = np.concatenate([(a + b) / 2 + (b - a) / 2 * x for a, b in zip(edges, edges[1:])])
    weights = np.concatenate([(b - a) / 2 * w for a, b in zip(edges, edges[1:])]) * np.exp(-(nodes**2) / 2)
    nodes, weights = np.concatenate([-nodes[::-1], nodes]), np.concatenate([weights[::-1], weights])
    return torch.as_tensor(nodes).unsqueeze(-1), torch.as_tensor(weights / weights.sum())


@functools.lru_cache(maxsize=64)
def _rule_cpu(m: int, dtype: torch.dtype, hermite: bool = True) -> tuple[Tensor, Tensor]:
    if m == 1:
        points, weights = _split_rule(8.5 if dtype == torch.float64 else 6.5)
        return points.to(dtype), weights.to(dtype)
    if m in NODES_PER_DIMENSION and (m <= 2 or hermite):
        rule = gaussian_rule if m <= 2 else hermite_rule
        nodes, weights = rule(NODES_PER_DIMENSION[m], torch.float64, torch.device("cpu"))
        grids = torch.meshgrid(*([nodes] * m), indexing="ij")
        points = torch.stack([g.reshape(-1) for g in grids], -1)
        mesh = torch.meshgrid(*([weights] * m), indexing="ij")
        w = functools.reduce(torch.mul, mesh).reshape(-1)
        keep = w > w.max() * 1e-18  # nodes whose weight is below round-off change nothing
        return points[keep].to(dtype), (w[keep] / w[keep].sum()).to(dtype)
    engine = torch.quasirandom.SobolEngine(m, scramble=True, seed=0)
    uniform = engine.draw(QMC_POINTS, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    points = math.sqrt(2.0) * torch.erfinv(2 * uniform - 1)
    return points.to(dtype), torch.full((QMC_POINTS,), 1.0 / QMC_POINTS, dtype=dtype)


def _rule(m: int, dtype: torch.dtype, device: torch.device, hermite: bool = True) -> tuple[Tensor, Tensor]:
    points, weights = _rule_cpu(m, dtype, hermite)
    return points.to(device), weights.to(device)


def _factor(cov: Tensor) -> Tensor:
    """``L`` with ``L L^T = cov + eps I`` (batched), for covariances that may be singular."""
    eps = 1e-12 if cov.dtype == torch.float64 else 1e-6
    scale = cov.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(torch.finfo(cov.dtype).tiny)
    jitter = torch.diag_embed(eps * scale.expand(cov.shape[:-1]))
    if cov.shape[-1] == 1:
        return (cov + jitter).clamp_min(0).sqrt()
    factor, info = torch.linalg.cholesky_ex(cov + jitter)
    if bool((info != 0).any()):
        # Singular beyond the jitter (variables that are functions of the others): any square root
        # S S^T = cov serves u = S z; the symmetric one from the eigendecomposition always exists.
        # The floor (the jitter, not 0) keeps the square root's gradient finite where eigenvalues are clipped.
        values, vectors = torch.linalg.eigh(cov)
        floor = (eps * scale).expand(values.shape)
        factor = vectors * torch.maximum(values, floor).sqrt().unsqueeze(-2)
    return factor


def gaussian_moments(
    cov: Tensor,
    first: Callable[..., Tensor],
    second: Callable[..., Tensor],
    first_indices: Sequence[int],
    second_indices: Sequence[int],
    derivatives: bool = False,
    hermite: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``E[F1 F2]`` and, with ``derivatives``, the matrix ``E[d_i F1 d_j F2]`` (``(..., |I1|, |I2|)``).

    :param cov: covariances ``(..., m, m)`` of the Gaussian vector, one per pair (batched).
    :param first: ``F1(*u_I1)``, coordinatewise in its tensor arguments.
    :param second: ``F2(*u_I2)``.
    :param first_indices: the coordinates ``I1`` of ``u`` that ``F1`` takes, in order.
    :param second_indices: the coordinates ``I2``.
    :param hermite: Gauss-Hermite for 3 and 4 dimensions (exact for polynomials); ``False``: the
        quasi-Monte Carlo rule from 3 dimensions, for functions that saturate (Gauss-Hermite's nodes are
        too far apart near 0: 16 nodes per dimension leave ``E[tanh(u)^2]`` of ``Var u = 5`` wrong by 3e-2,
        4,096 Sobol points by 1e-3 at most).
    """
    m = cov.shape[-1]
    points, weights = _rule(m, cov.dtype, cov.device, hermite)
    recording = cov.requires_grad and torch.is_grad_enabled()
    factor = _factor(cov)
    pairs = max(1, math.prod(cov.shape[:-2]))
    chunk = max(_CHUNK_POINTS, _CHUNK_ELEMENTS // pairs)
    rows = factor.movedim(-2, 0).reshape(-1, m)  # (m * pairs, m): row i of every pair's factor, by i
    value: Tensor | None = None
    mixed: Tensor | None = None
    for start in range(0, points.shape[0], chunk):
        z, w = points[start : start + chunk], weights[start : start + chunk]
        # u_p = L z_p for all pairs at once, as one matrix product, laid out (m, ..., P): each variable's
        # values contiguous.
        u = (rows @ z.T).reshape(m, *factor.shape[:-2], z.shape[0])
        if derivatives and not recording:
            u = u.detach().requires_grad_(True)  # derivatives in the points only, nothing to record
        with torch.enable_grad() if derivatives else contextlib.nullcontext():
            args1 = [u[i] for i in first_indices]
            args2 = [u[i] for i in second_indices]
            shape = u.shape[1:]  # (..., P)
            f1, f2 = _broadcast(first(*args1), shape, u), _broadcast(second(*args2), shape, u)
            part = (f1 * f2) @ w
            if derivatives and args1 and args2:
                g1, g2 = _gradients(f1, args1, recording), _gradients(f2, args2, recording)
                # sum_p w_p d_i F1(u_p) d_j F2(u_p) for all (i, j) at once: one batched matrix product.
                block = torch.matmul(torch.stack(g1, -2) * w, torch.stack(g2, -2).transpose(-1, -2))
                mixed = block if mixed is None else mixed + block
        value = part if value is None else value + part
    if derivatives and mixed is None:  # one side has no variables: no derivative pairs
        mixed = value.new_zeros(*value.shape, len(first_indices), len(second_indices))
    if derivatives and not recording:
        value, mixed = value.detach(), mixed.detach()
    return value, mixed


def _gradients(f: Tensor, args: list[Tensor], keep: bool) -> list[Tensor]:
    if not f.requires_grad:
        return [torch.zeros_like(a) for a in args]  # a constant factor
    grads = torch.autograd.grad(f.sum(), args, create_graph=keep, allow_unused=True)
    return [torch.zeros_like(a) if g is None else g for g, a in zip(grads, args)]


def _broadcast(f: Tensor | float, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if not torch.is_tensor(f):
        return torch.full(shape, float(f), dtype=like.dtype, device=like.device)
    return f.expand(shape) if f.shape != shape else f
