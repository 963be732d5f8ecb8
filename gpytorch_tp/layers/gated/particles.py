r"""Fixed quasi-Monte Carlo particles of Gaussian families over the steps of a pair of sequences.

Gated recurrent networks (GRU, LSTM) in the infinite-width limit (Yang 2019,
TP1 App. B.5) have, per weight matrix, a centred Gaussian family of
pre-activations indexed by (sequence, step); families of different matrices
are independent.  A unit's state is a nonlinear function of those Gaussians
along the whole time axis, so its covariance is an expectation over the joint
law of each family over the ``2 T`` (sequence, step) indices of a pair of
sequences.  :class:`PairParticles` represents that law by ``M`` particles
drawn step by step:

* variables are ordered step by step, ``(side 1, side 2)`` at step 0, then at
  step 1, ...; the covariance of a step's new pair with everything before is
  known once the recursion has reached that step, so the law is built by an
  *incremental Cholesky factorisation* (a triangular solve per step);
* the new pair given the past is :math:`N(\mu, C)` and is drawn as
  :math:`\mu + C^{1/2} \varepsilon` with the *symmetric* square root of the
  2 x 2 conditional covariance, from *fixed* base normals :math:`\varepsilon`
  (a Sobol point set, the same for every pair of sequences).  The point set
  holds each point together with its copy with the two sides swapped, so the
  estimate for ``(x, x')`` equals the one for ``(x', x)`` (up to rounding): the
  kernel matrix is symmetric whichever tile computes an entry;
* base normals are indexed by the step counted from the pair's first real
  step, and their coordinates (scrambled Sobol points, made in blocks of
  coordinates with fixed seeds) do not depend on the total dimension, so
  padding a pair of sequences to a longer ``T`` changes nothing;
* steps of one side that are padding get an independent unit variable, so
  they do not influence the real steps.

Everything is a smooth function of the covariances, so the estimates are
deterministic, differentiable functions of inputs and hyperparameters; a
small relative jitter (``JITTER``) keeps degenerate pairs (a sequence with
itself) factorisable.

Each pair's estimate is its own, so a kernel matrix built from them is
positive semi-definite only up to the particle error (sharing particles
between pairs would need a joint law of all items' families, whose
covariance involves the estimates themselves).
:func:`~gpytorch_tp.layers.gated.psd_projection.project_psd` makes such a
matrix positive semi-definite, keeping its diagonal.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.quasirandom import SobolEngine

__all__ = ["JITTER", "PairParticles", "StepStack", "base_normals"]

#: Relative jitter added to each step's 2 x 2 conditional covariance.
JITTER = 1e-8

# Coordinates are made in blocks: block ``c`` is coordinates ``[c B, (c + 1) B)`` of an
# Owen-scrambled Sobol sequence of dimension ``(c + 1) B`` with a seed of its own, so
# that a coordinate never depends on how many coordinates are asked for.
_BLOCK = 32
_SEED = 20250101
# Seeds of different streams are this far apart (more than any number of blocks).
_STREAM_SEEDS = 1_000_003


@functools.lru_cache(maxsize=16)
def _base_normals_cpu(num_points: int, dims: int, stream: int = 0) -> Tensor:
    blocks = []
    for c in range(-(-dims // _BLOCK)):
        engine = SobolEngine((c + 1) * _BLOCK, scramble=True, seed=_SEED + stream * _STREAM_SEEDS + c)
        blocks.append(engine.draw(num_points, dtype=torch.float64)[:, c * _BLOCK :])
    uniform = torch.cat(blocks, -1)[:, :dims].clamp(1e-12, 1 - 1e-12)
    return torch.special.ndtri(uniform)


def base_normals(num_particles: int, dims: int, device: torch.device | str = "cpu", stream: int = 0) -> Tensor:
    """Fixed standard-normal base points ``(num_particles, dims)`` in float64, closed under swapping sides.

    Coordinates come in pairs ``(2 j, 2 j + 1)`` (the two sequences of a pair);
    the second half of the particles is the first half with every pair swapped.
    Coordinate ``k`` of a particle does not depend on ``dims``.  Another
    ``stream`` is another scrambling (other seeds) of the same Sobol
    coordinates: an independent replicate for a *separate* estimate.  Within one
    estimate, independent families need different coordinates of one stream —
    coordinate ``k`` of two streams are functions of each other.
    """
    if num_particles < 2 or num_particles % 2:
        raise ValueError(f"num_particles must be an even number >= 2, got {num_particles}")
    if dims % 2:
        raise ValueError(f"dims must be even (pairs of sides), got {dims}")
    half = _base_normals_cpu(num_particles // 2, dims, stream)
    swapped = half.reshape(-1, dims // 2, 2).flip(-1).reshape(-1, dims)
    return torch.cat([half, swapped]).to(device)


def _sqrt_and_cholesky(c11: Tensor, c12: Tensor, c22: Tensor) -> tuple[Tensor, ...]:
    """Symmetric square root ``(s11, s12, s22)`` and lower Cholesky factor ``(l11, l21, l22)`` of 2 x 2 matrices."""
    det = (c11 * c22 - c12 * c12).clamp_min(0)
    root_det = det.sqrt()
    norm = (c11 + c22 + 2 * root_det).sqrt()
    s11, s12, s22 = (c11 + root_det) / norm, c12 / norm, (c22 + root_det) / norm
    l11 = c11.sqrt()
    l21 = c12 / l11
    l22 = (det / c11).sqrt()
    return s11, s12, s22, l11, l21, l22


class StepStack:
    """Tensors appended step by step along a new last axis, read back stacked.

    Without autograd the steps are written into one buffer allocated at the
    first step, so reading the first ``count`` steps is a view and earlier steps
    are never copied again (the recursions read all previous steps at every
    step: stacking them anew each time made the copies cost as much as the
    arithmetic).  With autograd the steps are kept as separate tensors and
    stacked on reading: writing into a buffer in place would invalidate the
    values autograd saved for the backward pass.

    :param steps: the largest number of steps that will be appended.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.count = 0
        self.in_place = not torch.is_grad_enabled()
        self._buffer: Tensor | None = None
        self._items: list[Tensor] = []

    def append(self, value: Tensor) -> None:
        if self.in_place:
            if self._buffer is None:
                self._buffer = value.new_empty(*value.shape, self.steps)
            self._buffer[..., self.count] = value
        else:
            self._items.append(value)
        self.count += 1

    def first(self, count: int) -> Tensor:
        """The first ``count`` steps, stacked along the last axis."""
        if self.in_place:
            return self._buffer[..., :count]
        return torch.stack(self._items[:count], -1)

    def all(self) -> Tensor:
        return self.first(self.count)


class PairParticles:
    r"""Particles of independent Gaussian families sharing one covariance, for a batch of pairs of sequences.

    :param base: base normals ``(M, steps * families * 2)`` from :func:`base_normals`.
    :param offsets: ``(B,)`` each pair's first real step; step ``t`` of a pair
        draws from the base's step ``t - offset`` (steps before get zeros).
    :param families: number of independent families drawn with the same covariance.
    :param jitter: relative jitter of each step's conditional covariance (default :data:`JITTER`).

    Call :meth:`step` once per step with the covariances of the step's new
    pair of variables; it returns the particles ``(B, M, families, 2)``.
    """

    def __init__(self, base: Tensor, offsets: Tensor, families: int, jitter: float = JITTER):
        self.grid = base.reshape(base.shape[0], -1, families, 2)
        self.offsets = offsets
        self.jitter = jitter
        self.factor: Tensor | None = None  # lower Cholesky factor of all previous variables (B, k, k)
        self.whitened: Tensor | None = None  # factor^-1 (previous particles): (B, M, families, k)
        # Without autograd both grow inside buffers for all steps (see StepStack for why not with it).
        self._in_place = not torch.is_grad_enabled()
        self._factor_buffer: Tensor | None = None
        self._whitened_buffer: Tensor | None = None

    def _base_at(self, t: int) -> Tensor:
        index = t - self.offsets
        eps = self.grid[:, index.clamp_min(0)].transpose(0, 1)  # (B, M, F, 2)
        return eps * (index >= 0).to(eps.dtype)[:, None, None, None]

    def step(self, t: int, cross_past: Tensor | None, c11: Tensor, c12: Tensor, c22: Tensor) -> Tensor:
        """Draw step ``t``.

        :param cross_past: covariances of the new pair with all previous
            variables ``(B, 2 t, 2)`` in the order ``(side 1, side 2)`` per step
            (``None`` at the first step).
        :param c11: variances of side 1 ``(B,)``; ``c12`` the covariance, ``c22`` side 2.
        """
        eps = self._base_at(t)
        # Relative to the marginal variances: conditional variances that vanish
        # (a low-rank input covariance, a sequence with itself) stay well above rounding;
        # the floor keeps the 2 x 2 determinant of a family of variance 0 (a bias-free
        # recurrent term at the first step) from underflowing.
        jitter = self.jitter * (c11 + c22).clamp_min(1e-140) / 2
        if cross_past is not None:
            regression = torch.linalg.solve_triangular(self.factor, cross_past, upper=False)  # (B, k, 2)
            c11 = c11 - regression[..., 0].pow(2).sum(-1)
            c22 = c22 - regression[..., 1].pow(2).sum(-1)
            c12 = c12 - (regression[..., 0] * regression[..., 1]).sum(-1)
        # Covariances assembled from estimates (stacked layers) can be slightly
        # indefinite: project the conditional block onto the positive semi-definite ones.
        c11, c22 = c11.clamp_min(0), c22.clamp_min(0)
        bound = (c11 * c22).clamp_min(1e-300).sqrt()
        c12 = torch.minimum(torch.maximum(c12, -bound), bound)
        c11, c22 = c11 + jitter, c22 + jitter
        s11, s12, s22, l11, l21, l22 = _sqrt_and_cholesky(c11, c12, c22)
        e1, e2 = eps[..., 0], eps[..., 1]
        unit = (slice(None), None, None)
        new1 = s11[unit] * e1 + s12[unit] * e2
        new2 = s12[unit] * e1 + s22[unit] * e2
        # Whitened coordinates of the new pair: L_tt^-1 S eps (an orthogonal map of eps).
        w1 = new1 / l11[unit]
        w2 = (new2 - l21[unit] * w1) / l22[unit]
        if cross_past is not None:
            mean = torch.einsum("bmfk,bkc->bmfc", self.whitened, regression)
            new1 = new1 + mean[..., 0]
            new2 = new2 + mean[..., 1]
        block = torch.stack([torch.stack([l11, torch.zeros_like(l11)], -1), torch.stack([l21, l22], -1)], -2)
        whitened = torch.stack([w1, w2], -1)
        if self._in_place:
            self._grow_in_place(block, whitened, None if cross_past is None else regression)
        elif self.factor is None:
            self.factor, self.whitened = block, whitened
        else:
            batch, k = self.factor.shape[0], self.factor.shape[-1]
            top = torch.cat([self.factor, self.factor.new_zeros(batch, k, 2)], -1)
            bottom = torch.cat([regression.transpose(-1, -2), block], -1)
            self.factor = torch.cat([top, bottom], -2)
            self.whitened = torch.cat([self.whitened, whitened], -1)
        return torch.stack([new1, new2], -1)

    def _grow_in_place(self, block: Tensor, whitened: Tensor, regression: Tensor | None) -> None:
        """Append the new pair's rows of the factor and its whitened particles inside the buffers."""
        if self._factor_buffer is None:
            size = 2 * self.grid.shape[1]
            self._factor_buffer = block.new_zeros(block.shape[0], size, size)
            self._whitened_buffer = whitened.new_empty(*whitened.shape[:-1], size)
        k = 0 if self.factor is None else self.factor.shape[-1]
        if regression is not None:
            self._factor_buffer[:, k : k + 2, :k] = regression.transpose(-1, -2)
        self._factor_buffer[:, k : k + 2, k : k + 2] = block
        self._whitened_buffer[..., k : k + 2] = whitened
        self.factor = self._factor_buffer[:, : k + 2, : k + 2]
        self.whitened = self._whitened_buffer[..., : k + 2]
