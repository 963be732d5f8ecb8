"""The nearest positive semi-definite kernel matrix, with its diagonal kept, and an exact gradient.

The gated recurrent kernels estimate each pair of sequences on its own
(:mod:`~gpytorch_tp.layers.gated.particles`), so their kernel matrices are
positive semi-definite only up to the particle error; :func:`project_psd`
removes the negative eigenvalues.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_psd"]


class _ProjectPSD(torch.autograd.Function):
    r"""``A - V_- \Lambda_- V_-^T`` of a symmetric ``A`` (its negative eigenvalues removed), and its exact derivative.

    The derivative of a spectral function :math:`F(A) = V f(\Lambda) V^\top` is
    :math:`dF = V \big(G \circ (V^\top dA\, V)\big) V^\top` (Daleckii-Krein), with
    :math:`G_{ij} = (f(\lambda_i) - f(\lambda_j)) / (\lambda_i - \lambda_j)` and
    :math:`G_{ii} = f'(\lambda_i)`; for :math:`f(\lambda) = \max(\lambda, 0)` every
    :math:`G_{ij}` lies in ``[0, 1]``, so the gradient stays finite at repeated eigenvalues
    (duplicated items), where autograd through ``eigh`` divides by their differences.
    """

    @staticmethod
    def forward(ctx, matrix: Tensor) -> Tensor:
        values, vectors = torch.linalg.eigh(matrix)
        negative = values.clamp_max(0)
        # Only the negative part is subtracted: a matrix without negative eigenvalues comes back unchanged.
        projected = matrix - (vectors * negative[..., None, :]) @ vectors.transpose(-1, -2)
        projected = (projected + projected.transpose(-1, -2)) / 2  # exactly symmetric
        ctx.save_for_backward(values, vectors)
        return projected

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        values, vectors = ctx.saved_tensors
        positive = values.clamp_min(0)
        gap = values[..., :, None] - values[..., None, :]
        slope = (values > 0).to(values.dtype)
        close = gap.abs() <= 1e-12 * values.abs().amax(-1, keepdim=True)[..., None].clamp_min(1e-300)
        ratio = (positive[..., :, None] - positive[..., None, :]) / torch.where(close, torch.ones_like(gap), gap)
        same_sign = (slope[..., :, None] + slope[..., None, :]) / 2
        loewner = torch.where(close, same_sign, ratio)
        grad = (grad + grad.transpose(-1, -2)) / 2
        inner = vectors.transpose(-1, -2) @ grad @ vectors
        return vectors @ (loewner * inner) @ vectors.transpose(-1, -2)


def project_psd(matrix: Tensor) -> Tensor:
    r"""A symmetric kernel matrix made positive semi-definite, keeping its diagonal: ``(..., N, N)``.

    The symmetric part :math:`A` of ``matrix`` loses its negative eigenvalues (the nearest
    positive semi-definite matrix in the Frobenius norm, :math:`A_+ = A - V_- \Lambda_- V_-^\top`),
    then rows and columns are scaled, :math:`D A_+ D` with :math:`D = \operatorname{diag}(A)^{1/2}
    \operatorname{diag}(A_+)^{-1/2}`, so that the diagonal is ``matrix``'s own (a kernel's
    ``diag=True`` still agrees with its full matrix).  Both steps keep the result positive
    semi-definite; they change an entry by at most about the negative eigenvalues' magnitude.
    A matrix that is already positive definite (a Cholesky factorisation succeeds) comes back
    unchanged, without an eigendecomposition.  Computed in float64; differentiable, with finite
    gradients also at repeated eigenvalues (see :class:`_ProjectPSD`).
    """
    if matrix.shape[-1] == 0:
        return matrix
    work = matrix.to(torch.float64)
    work = (work + work.transpose(-1, -2)) / 2
    with torch.no_grad():
        definite = bool((torch.linalg.cholesky_ex(work).info == 0).all())
    if definite:
        return matrix
    projected = _ProjectPSD.apply(work)
    diagonal = work.diagonal(0, -2, -1)
    grown = projected.diagonal(0, -2, -1)
    # diag(A_+) >= diag(A); a row whose diagonal is not positive (no kernel's) keeps its projected
    # values (scale 1), and the inner where keeps the square root's gradient finite there.
    usable = (diagonal > 0) & (grown > 0)
    scale = torch.where(usable, torch.where(usable, diagonal / grown, torch.ones_like(grown)).sqrt(), 1.0)
    result = projected * (scale[..., :, None] * scale[..., None, :])  # the outer product keeps exact symmetry
    return result.to(matrix.dtype)
