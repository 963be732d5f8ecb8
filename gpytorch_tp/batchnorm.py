r"""Infinite-width kernels of BatchNorm + ReLU networks (Yang et al. 2019, arXiv 1902.08129).

A BatchNorm layer normalises each unit over the *batch*, so the output for one
point depends on every point of its batch and the network is a Gaussian
process over batches, not over points.  This module gives the recursion for
the MLP

.. math::

    f = L_{D+1} \circ \mathrm{ReLU} \circ \mathrm{BN} \circ L_D \circ \cdots
        \circ \mathrm{ReLU} \circ \mathrm{BN} \circ L_1, \qquad
    L_\ell(z) = \sigma_{w,\ell} W_\ell z / \sqrt{n_{\ell-1}} + \sigma_{b,\ell} b_\ell,

with BatchNorm in training mode, without affine parameters:
:math:`\mathrm{BN}(h)_i = (h_i - \bar h) / \sqrt{\frac1B \sum_j (h_j - \bar h)^2 + \epsilon}`
per unit over the :math:`B` points of the batch.

**Single batch.**  With :math:`h \sim N(0, \Sigma)` over the batch (one unit),
:math:`G = I - \mathbf 1 \mathbf 1^T / B`, :math:`z = G h \sim N(0, S)`,
:math:`S = G \Sigma G`, the normalised unit is
:math:`y = \sqrt B\, z / \sqrt{\|z\|^2 + B\epsilon}`.  Writing
:math:`1/(\|z\|^2 + B\epsilon) = \int_0^\infty e^{-s(\|z\|^2 + B\epsilon)} ds`,
the factor :math:`e^{-s\|z\|^2}` tilts :math:`N(0, S)` into
:math:`N(0, M_s)` with :math:`M_s = S (I + 2 s S)^{-1}` and mass
:math:`\det(I + 2 s S)^{-1/2}` (valid for the singular :math:`S`: the tilt
acts on the range of :math:`S` only), and ReLU is positively homogeneous, so

.. math::

    V(\Sigma)_{ij} = E[\mathrm{relu}(y_i)\,\mathrm{relu}(y_j)]
    = B \int_0^\infty \frac{e^{-s B \epsilon}}{\sqrt{\det(I + 2 s S)}}\,
      J_1\big((M_s)_{ii}, (M_s)_{jj}, (M_s)_{ij}\big)\, ds,

with :math:`J_1` the arc-cosine kernel of degree 1 (``E[relu(u) relu(v)]``).

**Two batches** (same weights, own normalisation statistics), of sizes
:math:`B_1, B_2`, with joint pre-activation covariance
:math:`\Sigma = [[\Sigma_{11}, \Sigma_{12}], [\Sigma_{21}, \Sigma_{22}]]`:
:math:`1/\sqrt{a} = \pi^{-1/2} \int_0^\infty s^{-1/2} e^{-s a} ds` for each
norm gives

.. math::

    V_{12}(\Sigma)_{ij} = \frac{\sqrt{B_1 B_2}}{\pi} \int_0^\infty \int_0^\infty
      \frac{e^{-(s B_1 + t B_2)\epsilon}}{\sqrt{s t \det(I + 2 \Delta S \Delta)}}\,
      J_1\big((M)_{ii}, (M)_{B_1 + j, B_1 + j}, (M)_{i, B_1 + j}\big)\, ds\, dt,

with :math:`S = \mathrm{diag}(G_1, G_2)\, \Sigma\, \mathrm{diag}(G_1, G_2)`,
:math:`\Delta = \mathrm{diag}(\sqrt s I_{B_1}, \sqrt t I_{B_2})` and the
tilted covariance :math:`M = \Delta^{-1} (I + 2 \Delta S \Delta)^{-1} \Delta S`.
After each BatchNorm + ReLU the next dense layer gives
:math:`\Sigma \leftarrow \sigma_w^2 V + \sigma_b^2`.
The NTK adds the backward pass through BatchNorm
(:func:`batchnorm_relu_single_ntk`, :func:`batchnorm_relu_cross_ntk`): the same
tilting with weights :math:`1, s, s^2/2` and Gaussian moments by Stein's lemma.

**Quadrature.**  In :math:`\tau = \log s` the integrands are analytic in a
strip around the real axis (the nearest singularities are the zeros of
:math:`1 + 2 e^\tau \lambda_k` at :math:`\operatorname{Im} \tau = \pi`), so
the trapezoidal rule in :math:`\tau` converges geometrically in the node
spacing, uniformly over the spread of the eigenvalues :math:`\lambda_k` of
:math:`S`.  The grid of each batch starts at
:math:`s_0 = \text{tol}^{1/(2+\alpha)} / (2 \lambda_\max)` (with
:math:`\alpha = 1` for the single batch, :math:`1/2` for each variable of
the cross-batch integral, whose integrand in :math:`\tau` is
:math:`s^\alpha F(s)` with :math:`F` analytic at 0); below :math:`s_0` the
integrand is :math:`a s^\alpha + b s^{\alpha+1} + O(s^{\alpha + 2})`, with
:math:`a, b` fitted to the first two nodes, and the grid continued there is
summed in closed form (two geometric series).  The grid stops where the
factor :math:`\det(I + 2 s S)^{-1/2}` bounds what is left by the tolerance.
The nodes of a batch depend on that batch only, so a kernel value never
depends on the other points of a kernel matrix.  The linear algebra is
Cholesky factorisations of :math:`I + 2 \Delta S \Delta` (eigenvalues
:math:`\ge 1`), which stay differentiable when :math:`S` is singular
(unlike an eigendecomposition, whose gradient is undefined at repeated
eigenvalues); eigenvalues are only used, without gradient, to place the
nodes.  Measured accuracy (``tests/test_batchnorm.py``, against a finer rule, a
closed form and Monte Carlo): about :math:`10^{-9}` relative per layer
with the default rule of :func:`quadrature_rule` (up to
:math:`1.5 \cdot 10^{-8}` at depth 2), except for the NTK of batches of
centred rank 3, accurate to about :math:`10^{-6}` with every rule (its
integrand's tail decays like :math:`s^{-1/2}`).  The quadrature always runs in
float64 (in float32 the round-off of :math:`I + 2 s S` at the large
:math:`s` that rank-deficient batches need cost three digits) and the
result is returned in the input's dtype.

**Epsilon.**  The kernel has PyTorch's ``eps`` as a parameter (default 0, the
exact normalisation); it only multiplies the integrands by
:math:`e^{-s B \epsilon}`.  An ``eps`` that is not small against the centred
variances narrows the strip of analyticity (:math:`e^{-s B\epsilon}` grows
at :math:`\operatorname{Im}\tau = \pi`): at ``eps`` one sixth of the
variance the default float64 rule is accurate to about :math:`10^{-7}`
(``accuracy="fine"``: :math:`10^{-12}`).  With ``eps = 0`` a batch whose points all have the same
pre-activation (zero centred variance) has no normalisation, and the functions
raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .dense_update import dense_update
from .finite import NTKLinear
from .numerics import arccos_moments

__all__ = [
    "BatchNormOverBatch",
    "QuadratureRule",
    "batchnorm_mlp_nngp",
    "batchnorm_mlp_nngp_cross",
    "batchnorm_mlp_ntk",
    "batchnorm_mlp_ntk_cross",
    "batchnorm_relu_cross",
    "batchnorm_relu_cross_ntk",
    "batchnorm_relu_single",
    "batchnorm_relu_single_ntk",
    "finite_batchnorm_mlp",
    "per_layer",
    "quadrature_rule",
]

# Most nodes one batch's grid may have (a rank-1 centred covariance decays slowest).
_MAX_NODES = 400


@dataclass(frozen=True)
class QuadratureRule:
    """Trapezoidal rule in ``log s``.

    :param step: node spacing in ``log s``.
    :param tolerance: relative size of what the truncation of the grid may leave out.
    """

    step: float
    tolerance: float


def quadrature_rule(dtype: torch.dtype = torch.float64, accuracy: str = "default") -> QuadratureRule:
    """The rule for a dtype and an accuracy: ``"fast"``, ``"default"`` or ``"fine"``.

    In float64 they are accurate to about 1e-6, 1e-9 and 1e-13 relative per
    layer (measured at depth 2: up to 3.3e-6, 1.5e-8 and 1.5e-13), except for
    the NTK of batches of centred rank 3, about 1e-6 with every rule (see
    ``docs/batchnorm.md``).  ``"fast"`` has about half the nodes per variable
    of ``"default"``, a quarter in the two-dimensional cross-batch quadrature.

    The maps of this module compute in float64 and use the float64 rules by default.

    The spacing ``step`` sets the discretisation error of the trapezoidal rule,
    about ``exp(-2 pi d / step)`` for a strip of analyticity of half-width
    ``d`` (measured in ``tests/test_batchnorm.py`` against a rule with half the
    spacing); ``tolerance`` sets where the grid is cut.
    """
    rules = _RULES.get(dtype, _RULES[torch.float32])
    if accuracy not in rules:
        raise ValueError(f"accuracy must be one of {tuple(rules)}, got {accuracy!r}")
    return rules[accuracy]


# Measured relative accuracy in float64 per layer (docs/batchnorm.md): fast ~1e-6, default ~1e-9, fine ~1e-13
# (NTK of centred rank 3: ~1e-6 with every rule).
_RULES = {
    torch.float64: {
        "fast": QuadratureRule(1.0, 1e-7),
        "default": QuadratureRule(0.75, 1e-10),
        "fine": QuadratureRule(0.4, 1e-14),
    },
    torch.float32: {
        "fast": QuadratureRule(1.0, 1e-6),
        "default": QuadratureRule(1.0, 1e-6),
        "fine": QuadratureRule(0.75, 1e-7),
    },
}


def _centred(cov: Tensor) -> Tensor:
    """``G cov G`` with ``G = I - 11^T / B``: remove row and column means."""
    cov = cov - cov.mean(-1, keepdim=True)
    return cov - cov.mean(-2, keepdim=True)


def _check_covariance(cov: Tensor, name: str) -> None:
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"{name} must be a (..., B, B) covariance over the batch, got shape {tuple(cov.shape)}")
    if cov.shape[-1] < 2:
        raise ValueError(f"BatchNorm needs a batch of at least 2 points, got a batch of {cov.shape[-1]}")
    if not cov.is_floating_point():
        raise TypeError(f"{name} must be float32 or float64, got {cov.dtype}")
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _grid(
    centred: Tensor,
    magnitude: Tensor,
    exponent: float,
    rule: QuadratureRule,
    eps: float,
    scale: float,
    growth: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Nodes ``s`` (``(..., Q)``), weights and node counts for ``int_0^inf s^(exponent-1) F(s) ds``.

    The integrand in ``tau = log s`` is ``s^exponent F(s)``; ``scale`` bounds
    ``F`` (times the constant in front of the integral) relative to the result,
    to cut the grid.  ``magnitude`` (the largest entry of the uncentred
    covariance) and the most negative eigenvalue of ``centred`` set the
    round-off floor of its eigenvalues:
    the grid also stops where ``2 s`` times that floor would approach 1 (there
    ``I + 2 s S`` would stop being numerically positive definite), and what a
    slowly decaying (rank-deficient) integrand leaves beyond is summed by
    :func:`_sum_with_tail`.  Nodes past a batch's own count get weight 0 (so
    that batches of different counts share one tensor).
    """
    with torch.no_grad():
        eigenvalues = torch.linalg.eigvalsh(centred.detach())
        largest = eigenvalues[..., -1]
        floor = torch.maximum(-eigenvalues[..., 0], 16 * centred.shape[-1] * torch.finfo(centred.dtype).eps * magnitude)
        if eps == 0 and bool((largest <= 64 * floor).any()):
            raise ValueError(
                "BatchNorm over a batch whose points all have the same pre-activation (zero centred variance) "
                "divides by zero; give distinct points (or eps > 0)"
            )
        eigenvalues = torch.where(eigenvalues > floor.unsqueeze(-1), eigenvalues, 0.0)
        largest = largest.clamp_min(torch.finfo(largest.dtype).tiny)
        start = -torch.log(2 * largest) + math.log(rule.tolerance) / (2 + exponent)
        offsets = torch.arange(_MAX_NODES, dtype=centred.dtype, device=centred.device) * rule.step
        log_s = start.unsqueeze(-1) + offsets
        # What is left beyond a node is bounded by det(I + 2 s S)^(-1/2) (times ``scale``).
        log_det = 0.5 * torch.log1p(2 * torch.exp(log_s).unsqueeze(-1) * eigenvalues.unsqueeze(-2)).sum(-1)
        if eps > 0:
            log_det = log_det + torch.exp(log_s) * eps
        # ``growth``: the integrand may grow like (s lambda_max)^growth on top of the determinant's decay.
        growth_term = growth * (log_s + torch.log(2 * largest).unsqueeze(-1)).clamp_min(0.0)
        needed = (math.log(scale) + growth_term - log_det) > math.log(rule.tolerance) - 4.0
        needed &= torch.exp(log_s) * floor.unsqueeze(-1) < 0.025
        # At most the _MAX_NODES nodes laid out (a very fine rule asks for more; beyond, the tail sum).
        count = (needed.sum(-1) + 1).clamp(4, _MAX_NODES)
        nodes = int(count.max())
        log_s = log_s[..., :nodes]
        valid = torch.arange(nodes, device=centred.device) < count.unsqueeze(-1)
        weights = torch.full_like(log_s, rule.step)
        first, second = _lower_tail_weights(exponent, rule.step)
        weights[..., 0] += first
        weights[..., 1] += second
        weights = torch.where(valid, weights * torch.exp(exponent * log_s), 0.0)
    return torch.exp(log_s), weights, count


def _sum_with_tail(contributions: Tensor, count: Tensor, dim: int) -> Tensor:
    """Sum weighted node contributions along ``dim``, plus the grid continued past each batch's last node.

    Far out the integrand decays like a power of ``s`` (``s^(-r/2)`` for a
    centred covariance of rank ``r``), geometrically along the grid in
    ``log s``: the ratio of the last two contributions (clipped to [0, 0.9])
    continues it.  Where the bound cut the grid the last contribution is
    below the tolerance and so is the continuation.
    """
    dim = dim % contributions.dim()
    shape = list(contributions.shape)
    shape[dim] = 1
    index = (count - 1).reshape(*count.shape, *([1] * (contributions.dim() - count.dim()))).expand(shape)
    last = contributions.gather(dim, index)
    previous = contributions.gather(dim, index - 1)
    ratio = torch.where(previous > 0, last / torch.where(previous > 0, previous, 1.0), 0.0).clamp(0.0, 0.9)
    return contributions.sum(dim) + (last * ratio / (1 - ratio)).squeeze(dim)


def _lower_tail_weights(exponent: float, step: float) -> tuple[float, float]:
    """Extra weights of the first two nodes that sum the grid continued below the first node.

    Below the grid the integrand in ``tau`` is ``a e^(exponent tau) + b e^((exponent + 1) tau)``
    up to ``O(s^2)`` (``F`` is analytic at ``s = 0``); ``a`` and ``b`` fitted to
    the first two nodes, the trapezoidal sum over the continued grid is two
    geometric series.  The first node is placed where the neglected
    ``O(s^(exponent + 2))`` is below the tolerance.
    """
    ratio_a = math.exp(-exponent * step) / -math.expm1(-exponent * step)
    ratio_b = math.exp(-(exponent + 1) * step) / -math.expm1(-(exponent + 1) * step)
    coupling = (ratio_b - ratio_a) / (math.exp(exponent * step) * math.expm1(step))
    return step * (ratio_a - coupling * math.exp(exponent * step)), step * coupling


def batchnorm_relu_single(cov: Tensor, eps: float = 0.0, rule: QuadratureRule | None = None) -> Tensor:
    r"""``E[relu(BN(h)) relu(BN(h))^T]`` for one batch, :math:`h \sim N(0, \Sigma)` (see the module docstring).

    :param cov: :math:`\Sigma`, ``(..., B, B)``, the pre-activation covariance over the batch.
    :param eps: BatchNorm's :math:`\epsilon` (default 0).
    :param rule: quadrature rule (default :func:`quadrature_rule` of float64; the work is done in float64).
    :return: ``(..., B, B)``.
    """
    _check_covariance(cov, "cov")
    size = cov.shape[-1]
    rule = rule or quadrature_rule(torch.float64)
    dtype, cov = cov.dtype, cov.to(torch.float64)
    centred = _centred(cov)
    s, weights, count = _grid(centred, cov.detach().abs().amax((-2, -1)), 1.0, rule, eps * size, size / 4)
    tilted, mass = _tilted_single(centred, s, weights, eps)
    # Round-off can leave a variance of a point at its batch mean a hair below 0.
    variances = tilted.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    j1, _ = arccos_moments(variances.unsqueeze(-1), variances.unsqueeze(-2), tilted)
    return (size * _sum_with_tail(mass.unsqueeze(-1).unsqueeze(-1) * j1, count, count.dim())).to(dtype)


def _tilted_single(centred: Tensor, s: Tensor, weights: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """At every node ``s``: ``M_s = (I + 2 s S)^(-1) S`` (symmetrised) and its mass ``w det(I + 2 s S)^(-1/2) e^(-s B eps)``.

    One Cholesky factorisation of ``I + 2 s S`` per node (``S`` the centred covariance, ``(..., B, B)``).
    """
    size = centred.shape[-1]
    s_ = s.unsqueeze(-1).unsqueeze(-1)
    identity = torch.eye(size, dtype=centred.dtype, device=centred.device)
    factor = torch.linalg.cholesky(identity + 2 * s_ * centred.unsqueeze(-3))
    # cholesky_inverse and a product: much faster than cholesky_solve on many small matrices.
    tilted = torch.cholesky_inverse(factor) @ centred.unsqueeze(-3)
    tilted = (tilted + tilted.transpose(-1, -2)) / 2
    log_det = 2 * torch.log(factor.diagonal(dim1=-2, dim2=-1)).sum(-1)
    return tilted, weights * torch.exp(-0.5 * log_det - s * (eps * size))


def _tilted_cross(
    cov11: Tensor, cov12: Tensor, cov22: Tensor, eps: float, rule: QuadratureRule, growth: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The two batches' joint tilt on the 2-d grid of ``(s, t)`` (float64 covariances in).

    Returns ``(s, t, count_s, count_t, M, mass)``: nodes and node counts of
    each batch's grid, the symmetrised tilted joint covariance ``M``
    (``(..., Qs, Qt, B1 + B2, B1 + B2)``) and the nodes' masses ``(..., Qs, Qt)``.
    """
    b1, b2 = cov11.shape[-1], cov22.shape[-1]
    centred_joint = torch.cat(
        [
            torch.cat([_centred(cov11), _centred(cov12)], -1),
            torch.cat([_centred(cov12.transpose(-1, -2)), _centred(cov22)], -1),
        ],
        -2,
    )
    magnitude = torch.maximum(cov11.detach().abs().amax((-2, -1)), cov22.detach().abs().amax((-2, -1)))
    magnitude = torch.maximum(magnitude, cov12.detach().abs().amax((-2, -1)))
    bound = math.sqrt(b1 * b2) / 2
    s, weight_s, count_s = _grid(centred_joint[..., :b1, :b1], magnitude, 0.5, rule, eps * b1, bound, growth=growth)
    t, weight_t, count_t = _grid(centred_joint[..., b1:, b1:], magnitude, 0.5, rule, eps * b2, bound, growth=growth)
    # Root tilts on the 2-d grid: (..., Qs, Qt, B1 + B2).
    roots = torch.cat(
        [
            torch.sqrt(s)[..., :, None, None].expand(*s.shape, t.shape[-1], b1),
            torch.sqrt(t)[..., None, :, None].expand(*s.shape[:-1], s.shape[-1], t.shape[-1], b2),
        ],
        -1,
    )
    scaled = roots.unsqueeze(-1) * centred_joint.unsqueeze(-3).unsqueeze(-3)  # Delta S
    identity = torch.eye(b1 + b2, dtype=cov11.dtype, device=cov11.device)
    factor = torch.linalg.cholesky(identity + 2 * scaled * roots.unsqueeze(-2))
    tilted = (torch.cholesky_inverse(factor) @ scaled) / roots.unsqueeze(-1)
    tilted = (tilted + tilted.transpose(-1, -2)) / 2
    log_det = 2 * torch.log(factor.diagonal(dim1=-2, dim2=-1)).sum(-1)
    s_, t_ = s[..., :, None], t[..., None, :]
    mass = weight_s.unsqueeze(-1) * weight_t.unsqueeze(-2) * torch.exp(-0.5 * log_det - eps * (s_ * b1 + t_ * b2))
    return s, t, count_s, count_t, tilted, mass


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


def _safe_sqrt(value: Tensor) -> Tensor:
    """``sqrt(max(value, 0))`` with a finite (zero) gradient at 0."""
    positive = value > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, value, 1.0)), 0.0)


def batchnorm_relu_single_ntk(
    cov: Tensor, ntk: Tensor, eps: float = 0.0, rule: QuadratureRule | None = None
) -> tuple[Tensor, Tensor]:
    r"""NNGP map and NTK map of BatchNorm + ReLU on one batch: ``(V(Sigma), E[J Theta J^T])``.

    ``J = d relu(BN(h)) / dh`` is the ``B x B`` Jacobian of one unit over the
    batch.  With :math:`u = G h`, :math:`r^2 = \|u\|^2 + B\epsilon`,
    :math:`J = \sqrt B\, D (I / r - u u^T / r^3) G`, :math:`D = \mathrm{diag}(1[u > 0])`,
    and with :math:`\Theta' = G \Theta G`

    .. math::

        E[J\Theta J^T]_{ij} = B\, E\Big[1_i 1_j \Big(\frac{\Theta'_{ij}}{r^2}
            - \frac{u_i (\Theta' u)_j + (\Theta' u)_i u_j}{r^4}
            + \frac{u_i u_j\, u^T \Theta' u}{r^6}\Big)\Big].

    :math:`1/r^{2k} = \int_0^\infty s^{k-1} e^{-s r^2} ds / (k-1)!` tilts
    :math:`N(0, S)` into :math:`N(0, M_s)` as for the NNGP, and Gaussian
    integration by parts (Stein's lemma) gives the tilted moments in closed
    form from :math:`J_1, J_0` and :math:`q = \sqrt{ab - c^2} / 2\pi` of each
    pair (:math:`a = M_{ii}, b = M_{jj}, c = M_{ij}`), with :math:`P = \Theta' M`,
    :math:`R = M \Theta' M`:
    :math:`E[1_i 1_j u_i (\Theta' u)_j] = P_{ji} J_0 + P_{jj} q / b`,
    :math:`E[1_i 1_j u_i u_j u^T \Theta' u] = \operatorname{tr}(P) J_1 + R_{ii} q/a + R_{jj} q/b + 2 R_{ij} J_0`.

    The NTK is finite only when every centred covariance has rank at least 3
    (:math:`E[1/\|u\|^2] = \infty` for :math:`u` in a space of dimension 1 or 2:
    BatchNorm's gradients explode for nearly collinear batches); the
    integrand then decays like :math:`s^{1 - r/2}`.

    :param cov: :math:`\Sigma`, ``(..., B, B)``.
    :param ntk: :math:`\Theta`, the NTK of the pre-activations, ``(..., B, B)``.
    """
    _check_covariance(cov, "cov")
    _check_covariance(ntk, "ntk")
    size = cov.shape[-1]
    rule = rule or quadrature_rule(torch.float64)
    dtype, cov, ntk = cov.dtype, cov.to(torch.float64), ntk.to(torch.float64)
    centred = _centred(cov)
    centred_ntk = _centred(ntk)
    magnitude = cov.detach().abs().amax((-2, -1))
    s, weights, count = _grid(centred, magnitude, 1.0, rule, eps * size, size / 4, growth=1.0)
    s_ = s.unsqueeze(-1).unsqueeze(-1)
    tilted, mass = _tilted_single(centred, s, weights, eps)
    variances = tilted.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    a, b = variances.unsqueeze(-1), variances.unsqueeze(-2)
    j1, j0 = arccos_moments(a, b, tilted)
    q = _safe_sqrt(a * b - tilted * tilted) / (2 * math.pi)
    q_a, q_b = _safe_divide(q, a), _safe_divide(q, b)
    p = centred_ntk.unsqueeze(-3) @ tilted  # P = Theta' M
    r = tilted @ p  # R = M Theta' M
    p_diag, r_diag = p.diagonal(dim1=-2, dim2=-1), r.diagonal(dim1=-2, dim2=-1)
    first = centred_ntk.unsqueeze(-3) * j0
    second = (p + p.transpose(-1, -2)) * j0 + p_diag.unsqueeze(-2) * q_b + p_diag.unsqueeze(-1) * q_a
    trace = p_diag.sum(-1).unsqueeze(-1).unsqueeze(-1)
    third = trace * j1 + r_diag.unsqueeze(-1) * q_a + r_diag.unsqueeze(-2) * q_b + 2 * r * j0
    integrand = first - s_ * second + (s_ * s_ / 2) * third
    mass_ = mass.unsqueeze(-1).unsqueeze(-1)
    nngp = size * _sum_with_tail(mass_ * j1, count, count.dim())
    derivative = size * _sum_with_tail(mass_ * integrand, count, count.dim())
    return nngp.to(dtype), derivative.to(dtype)


def batchnorm_relu_cross(
    cov11: Tensor, cov12: Tensor, cov22: Tensor, eps: float = 0.0, rule: QuadratureRule | None = None
) -> Tensor:
    r"""``E[relu(BN_1(h_1)) relu(BN_2(h_2))^T]`` for two batches normalised separately.

    :math:`(h_1, h_2)` are jointly Gaussian (the same units, i.e. the same
    weights, seen by two batches) with covariance blocks ``cov11``
    (``(..., B1, B1)``), ``cov12`` (``(..., B1, B2)``) and ``cov22``; each batch
    is normalised with its own statistics.  Two-dimensional quadrature (see
    the module docstring).

    :return: ``(..., B1, B2)``.
    """
    _check_covariance(cov11, "cov11")
    _check_covariance(cov22, "cov22")
    b1, b2 = cov11.shape[-1], cov22.shape[-1]
    if cov12.shape[-2:] != (b1, b2):
        raise ValueError(f"cov12 must be (..., {b1}, {b2}) for batches of {b1} and {b2}, got {tuple(cov12.shape)}")
    if not bool(torch.isfinite(cov12).all()):
        raise ValueError("cov12 contains NaN or infinite values")
    rule = rule or quadrature_rule(torch.float64)
    dtype = cov11.dtype
    cov11, cov12, cov22 = cov11.to(torch.float64), cov12.to(torch.float64), cov22.to(torch.float64)
    _, _, count_s, count_t, tilted, mass = _tilted_cross(cov11, cov12, cov22, eps, rule)
    variances = tilted.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    j1, _ = arccos_moments(variances[..., :b1].unsqueeze(-1), variances[..., b1:].unsqueeze(-2), tilted[..., :b1, b1:])
    # Sum over t (with its tail) for every s node, then over s.
    contributions = mass.unsqueeze(-1).unsqueeze(-1) * j1
    batch_ndim = count_s.dim()
    over_t = _sum_with_tail(contributions, count_t, batch_ndim + 1)
    return (math.sqrt(b1 * b2) / math.pi * _sum_with_tail(over_t, count_s, batch_ndim)).to(dtype)


def batchnorm_relu_cross_ntk(
    cov11: Tensor,
    cov12: Tensor,
    cov22: Tensor,
    ntk12: Tensor,
    eps: float = 0.0,
    rule: QuadratureRule | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Cross-batch NNGP map and NTK map: ``(V_12, E[J_1 Theta_12 J_2^T])`` for two batches.

    As :func:`batchnorm_relu_single_ntk` with one norm per batch:
    :math:`(I/r_1 - u_1 u_1^T/r_1^3)\,\Theta'_{12}\,(I/r_2 - u_2 u_2^T/r_2^3)`, where
    :math:`1/r = \pi^{-1/2}\int s^{-1/2} e^{-s r^2} ds` and
    :math:`1/r^3 = 2\pi^{-1/2}\int s^{1/2} e^{-s r^2} ds`; the integrand of the
    two-dimensional quadrature is
    :math:`\Theta'_{ij} J_0 - 2s\, E[1 1 u_{1i} (\Theta'^T u_1)_j] - 2t\, E[1 1 (\Theta' u_2)_i u_{2j}]
    + 4st\, E[1 1 u_{1i} u_{2j}\, u_1^T \Theta' u_2]`, each moment by Stein's lemma.

    :param ntk12: :math:`\Theta_{12}`, the cross NTK of the pre-activations, ``(..., B1, B2)``.
    """
    _check_covariance(cov11, "cov11")
    _check_covariance(cov22, "cov22")
    b1, b2 = cov11.shape[-1], cov22.shape[-1]
    for name, block in (("cov12", cov12), ("ntk12", ntk12)):
        if block.shape[-2:] != (b1, b2):
            raise ValueError(f"{name} must be (..., {b1}, {b2}) for batches of {b1} and {b2}, got {tuple(block.shape)}")
        if not bool(torch.isfinite(block).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    rule = rule or quadrature_rule(torch.float64)
    dtype = cov11.dtype
    cov11, cov12, cov22 = cov11.to(torch.float64), cov12.to(torch.float64), cov22.to(torch.float64)
    theta = _centred(ntk12.to(torch.float64))
    s, t, count_s, count_t, tilted, mass = _tilted_cross(cov11, cov12, cov22, eps, rule, growth=1.0)
    s_, t_ = s[..., :, None], t[..., None, :]
    m11, m12, m22 = tilted[..., :b1, :b1], tilted[..., :b1, b1:], tilted[..., b1:, b1:]
    a = m11.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).unsqueeze(-1)
    b = m22.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).unsqueeze(-2)
    j1, j0 = arccos_moments(a, b, m12)
    q = _safe_sqrt(a * b - m12 * m12) / (2 * math.pi)
    q_a, q_b = _safe_divide(q, a), _safe_divide(q, b)
    theta_ = theta.unsqueeze(-3).unsqueeze(-3)
    m11_theta = m11 @ theta_  # (M11 Theta')_ij
    theta_m22 = theta_ @ m22  # (Theta' M22)_ij
    diag_b = (theta_.transpose(-1, -2) @ m12).diagonal(dim1=-2, dim2=-1)  # (Theta'^T M12)_jj
    diag_a = (theta_ @ m12.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1)  # (Theta' M12^T)_ii
    second_s = m11_theta * j0 + diag_b.unsqueeze(-2) * q_b
    second_t = theta_m22 * j0 + diag_a.unsqueeze(-1) * q_a
    trace = (theta_ * m12).sum((-2, -1)).unsqueeze(-1).unsqueeze(-1)
    outer_a = (m11_theta @ m12.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1)  # (M11 Theta' M12^T)_ii
    outer_b = (m12.transpose(-1, -2) @ theta_m22).diagonal(dim1=-2, dim2=-1)  # (M12^T Theta' M22)_jj
    both = m11_theta @ m22 + m12 @ theta_.transpose(-1, -2) @ m12
    third = trace * j1 + outer_a.unsqueeze(-1) * q_a + outer_b.unsqueeze(-2) * q_b + both * j0
    s4, t4 = s_.unsqueeze(-1).unsqueeze(-1), t_.unsqueeze(-1).unsqueeze(-1)
    integrand = theta_ * j0 - 2 * s4 * second_s - 2 * t4 * second_t + 4 * s4 * t4 * third
    batch_ndim = count_s.dim()
    mass_ = mass.unsqueeze(-1).unsqueeze(-1)
    constant = math.sqrt(b1 * b2) / math.pi

    def total(values: Tensor) -> Tensor:
        over_t = _sum_with_tail(mass_ * values, count_t, batch_ndim + 1)
        return (constant * _sum_with_tail(over_t, count_s, batch_ndim)).to(dtype)

    return total(j1), total(integrand)


def per_layer(value: float | Tensor | Sequence, depth: int, name: str) -> list:
    """One value per dense layer (``depth + 1``): a list of that length as given, or one value repeated; checked."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth + 1:
            raise ValueError(f"{name} needs one value per dense layer ({depth + 1}), got {len(value)}")
        values = list(value)
    else:
        values = [value] * (depth + 1)
    for v in values:
        v_ = torch.as_tensor(v)
        if not bool(torch.isfinite(v_).all()) or bool((v_ < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative, got {v_.tolist()}")
    return values


def _layer_variances(weight_variance, bias_variance, depth: int) -> tuple[list, list]:
    return per_layer(weight_variance, depth, "weight_variance"), per_layer(bias_variance, depth, "bias_variance")


def _input_covariance(x1: Tensor, x2: Tensor) -> Tensor:
    return x1 @ x2.transpose(-1, -2) / x1.shape[-1]


def _check_batch(x: Tensor, name: str) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float32 or float64 tensor")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch (..., B, d), got shape {tuple(x.shape)}")
    if x.shape[-2] < 2:
        raise ValueError(f"BatchNorm needs a batch of at least 2 points, {name} has {x.shape[-2]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_batch_pair(x1: Tensor, x2: Tensor) -> None:
    _check_batch(x1, "x1")
    _check_batch(x2, "x2")
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"x1 has {x1.shape[-1]} features but x2 has {x2.shape[-1]}")


def batchnorm_mlp_nngp(
    x: Tensor,
    depth: int = 2,
    weight_variance: float | Tensor | Sequence = 2.0,
    bias_variance: float | Tensor | Sequence = 0.1,
    eps: float = 0.0,
    rule: QuadratureRule | None = None,
) -> Tensor:
    r"""NNGP kernel (``B x B``) of a BatchNorm + ReLU MLP on one batch ``x`` (``(..., B, d)``).

    ``depth`` blocks ``Linear -> BatchNorm -> ReLU`` and a linear readout (see
    the module docstring); ``weight_variance``/``bias_variance`` are one value
    for every dense layer or a list of ``depth + 1``.

    Example:
        >>> x = torch.randn(8, 3, dtype=torch.float64)
        >>> batchnorm_mlp_nngp(x, depth=2).shape
        torch.Size([8, 8])
    """
    _check_batch(x, "x")
    weights, biases = _layer_variances(weight_variance, bias_variance, depth)
    cov, _ = dense_update(_input_covariance(x, x), weights[0], biases[0])
    for layer in range(1, depth + 1):
        cov, _ = dense_update(batchnorm_relu_single(cov, eps, rule), weights[layer], biases[layer])
    return cov


def batchnorm_mlp_ntk(
    x: Tensor,
    depth: int = 2,
    weight_variance: float | Tensor | Sequence = 2.0,
    bias_variance: float | Tensor | Sequence = 0.1,
    eps: float = 0.0,
    rule: QuadratureRule | None = None,
) -> tuple[Tensor, Tensor]:
    r"""NNGP kernel and NTK (each ``B x B``) of a BatchNorm + ReLU MLP on one batch ``x``.

    :math:`\Theta_1 = K_1`; after each BatchNorm + ReLU block and dense layer,
    :math:`K \leftarrow \sigma_w^2 V + \sigma_b^2`,
    :math:`\Theta \leftarrow K + \sigma_w^2 E[J \Theta J^T]`
    (:func:`batchnorm_relu_single_ntk`; gradient independence, as for every NTK).
    NTK parameterisation.  Needs batches whose centred first-layer covariance has
    rank at least 3 (input dimension at least 3); see :func:`batchnorm_relu_single_ntk`.
    """
    _check_batch(x, "x")
    weights, biases = _layer_variances(weight_variance, bias_variance, depth)
    cov, ntk = dense_update(_input_covariance(x, x), weights[0], biases[0], track_ntk=True)
    for layer in range(1, depth + 1):
        value, derivative = batchnorm_relu_single_ntk(cov, ntk, eps, rule)
        cov, ntk = dense_update(value, weights[layer], biases[layer], derivative, track_ntk=True)
    return cov, ntk


def batchnorm_mlp_nngp_cross(
    x1: Tensor,
    x2: Tensor,
    depth: int = 2,
    weight_variance: float | Tensor | Sequence = 2.0,
    bias_variance: float | Tensor | Sequence = 0.1,
    eps: float = 0.0,
    rule: QuadratureRule | None = None,
) -> Tensor:
    r"""Cross-batch NNGP kernel (``B1 x B2``): the covariance of the network's outputs on two batches.

    The same network (same weights) is applied to batch ``x1`` (``(..., B1, d)``)
    and, separately, to batch ``x2`` (``(..., B2, d)``), each normalised with its
    own batch statistics; the result is
    :math:`\lim \operatorname{Cov}[f_{x_1}(x_{1,i}), f_{x_2}(x_{2,j})]`.
    """
    _check_batch_pair(x1, x2)
    weights, biases = _layer_variances(weight_variance, bias_variance, depth)
    (cov11, _), (cov12, _), (cov22, _) = (
        dense_update(_input_covariance(a, b), weights[0], biases[0]) for a, b in ((x1, x1), (x1, x2), (x2, x2))
    )
    for layer in range(1, depth + 1):
        w, b = weights[layer], biases[layer]
        cov12, _ = dense_update(batchnorm_relu_cross(cov11, cov12, cov22, eps, rule), w, b)
        cov11, _ = dense_update(batchnorm_relu_single(cov11, eps, rule), w, b)
        cov22, _ = dense_update(batchnorm_relu_single(cov22, eps, rule), w, b)
    return cov12


def finite_batchnorm_mlp(
    in_features: int,
    width: int,
    depth: int = 2,
    weight_variance: float | Sequence = 2.0,
    bias_variance: float | Sequence = 0.1,
    eps: float = 0.0,
    out_features: int = 1,
) -> nn.Sequential:
    """The finite-width network whose infinite-width limit the functions above describe.

    ``depth`` blocks ``NTKLinear -> BatchNormOverBatch -> ReLU`` and an
    ``NTKLinear`` readout.  Apply it to a batch ``(..., B, in_features)``.
    """
    weights, biases = _layer_variances(weight_variance, bias_variance, depth)
    modules: list[nn.Module] = []
    fan_in = in_features
    for layer in range(depth):
        modules.append(NTKLinear(fan_in, width, math.sqrt(float(weights[layer])), math.sqrt(float(biases[layer]))))
        modules.append(BatchNormOverBatch(eps))
        modules.append(nn.ReLU())
        fan_in = width
    modules.append(NTKLinear(fan_in, out_features, math.sqrt(float(weights[depth])), math.sqrt(float(biases[depth]))))
    return nn.Sequential(*modules)


class BatchNormOverBatch(nn.Module):
    """``torch.nn.BatchNorm1d(affine=False)`` in training mode, over the batch axis ``-2``, allowing ``eps = 0``.

    ``(h - mean) / sqrt(var + eps)`` per unit, with the biased variance over the
    batch (PyTorch refuses ``eps = 0`` in training mode; the limit kernels are
    exact at ``eps = 0``).  Leading axes are independent batches.
    """

    def __init__(self, eps: float = 0.0):
        super().__init__()
        self.eps = float(eps)

    def forward(self, h: Tensor) -> Tensor:
        centred = h - h.mean(-2, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-2, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def batchnorm_mlp_ntk_cross(
    x1: Tensor,
    x2: Tensor,
    depth: int = 2,
    weight_variance: float | Tensor | Sequence = 2.0,
    bias_variance: float | Tensor | Sequence = 0.1,
    eps: float = 0.0,
    rule: QuadratureRule | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Cross-batch NNGP kernel and NTK (each ``B1 x B2``) of a BatchNorm + ReLU MLP on batches ``x1``, ``x2``.

    The NTK is :math:`\lim \langle \nabla_\theta f_{x_1}(x_{1,i}), \nabla_\theta f_{x_2}(x_{2,j}) \rangle`
    for the same network applied to each batch (see :func:`batchnorm_mlp_ntk`).
    """
    _check_batch_pair(x1, x2)
    weights, biases = _layer_variances(weight_variance, bias_variance, depth)
    (cov11, ntk11), (cov12, ntk12), (cov22, ntk22) = (
        dense_update(_input_covariance(a, b), weights[0], biases[0], track_ntk=True)
        for a, b in ((x1, x1), (x1, x2), (x2, x2))
    )
    for layer in range(1, depth + 1):
        w, b = weights[layer], biases[layer]
        value12, derivative12 = batchnorm_relu_cross_ntk(cov11, cov12, cov22, ntk12, eps, rule)
        value11, derivative11 = batchnorm_relu_single_ntk(cov11, ntk11, eps, rule)
        value22, derivative22 = batchnorm_relu_single_ntk(cov22, ntk22, eps, rule)
        cov11, ntk11 = dense_update(value11, w, b, derivative11, track_ntk=True)
        cov12, ntk12 = dense_update(value12, w, b, derivative12, track_ntk=True)
        cov22, ntk22 = dense_update(value22, w, b, derivative22, track_ntk=True)
    return cov12, ntk12
