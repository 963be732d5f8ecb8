"""The GP posterior (kernel regression) from kernel matrices precomputed into stores, for fixed hyperparameters.

With the kernel's hyperparameters fixed (an NTK or NNGP of a chosen
architecture, as in kernel regression with neural kernels), the matrices are
computed once by :func:`~gpytorch_tp.distributed.precompute_kernel` on any
number of ranks; :func:`posterior_from_store` then gives the posterior mean and
variance in one process from ``K(X, X)``, ``K(X*, X)`` and the diagonal of
``K(X*, X*)``, with one Cholesky factorisation of ``K(X, X) + noise I``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .store import KernelMatrix, open_kernel_matrix

__all__ = ["StoredPosterior", "posterior_from_store"]


@dataclass(frozen=True)
class StoredPosterior:
    """The posterior of a zero-mean GP with Gaussian noise at the test inputs.

    ``mean`` ``(M,)``; ``variance`` ``(M,)`` of the latent function (add the noise
    for new observations; ``None`` without the test diagonal); ``weights`` ``(N,)``,
    ``(K(X, X) + noise I)^{-1} y``, so that ``mean = K(X*, X) @ weights``.
    """

    mean: Tensor
    variance: Tensor | None
    weights: Tensor


def _matrix(source: KernelMatrix | str | os.PathLike, name: str) -> KernelMatrix:
    matrix = source if isinstance(source, KernelMatrix) else open_kernel_matrix(source)
    if len(matrix.shape) != 2:
        raise ValueError(
            f"{name} has shape {matrix.shape}: posterior_from_store takes matrices without batch dimensions "
            "(one kernel, not a batch of kernels)"
        )
    return matrix


def _kind(matrix: KernelMatrix, kind: str | None) -> str:
    if kind is None:
        if len(matrix.kinds) > 1:
            raise ValueError(f"the store holds {list(matrix.kinds)}: choose one with kind=")
        return matrix.kinds[0]
    if kind not in matrix.kinds:
        raise KeyError(f"the store at {matrix.path} holds {list(matrix.kinds)}, not {kind!r}")
    return kind


def posterior_from_store(
    train: KernelMatrix | str | os.PathLike,
    cross: KernelMatrix | str | os.PathLike,
    y: Tensor,
    noise: float,
    *,
    kind: str | None = None,
    test_diagonal: Tensor | KernelMatrix | str | os.PathLike | None = None,
) -> StoredPosterior:
    r"""The posterior mean and variance at test inputs from stored kernel matrices.

    .. math::

        \mu_* = K_{*X} (K_{XX} + \sigma^2 I)^{-1} y, \qquad
        \sigma_*^2 = \operatorname{diag} K_{**} - \operatorname{diag}\, K_{*X} (K_{XX} + \sigma^2 I)^{-1} K_{X*}.

    The stores must belong together: ``cross`` computed against the training
    inputs of ``train`` (``precompute_kernel(kernel, x_test, x)``) with the same
    kernel and hyperparameters (checked by the stores' checksums).  The
    training matrix is read whole into memory (``N^2`` numbers).

    :param train: the store (or its path) of ``K(X, X)``.
    :param cross: the store (or its path) of ``K(X*, X)``.
    :param y: training targets ``(N,)`` (subtract a prior mean first).
    :param noise: the noise variance :math:`\sigma^2` (non-negative).
    :param kind: which matrix of the stores (``"nngp"``, ``"ntk"``, ``"kernel"``);
        needed when they hold more than one.
    :param test_diagonal: ``diag K(X*, X*)`` as a tensor ``(M,)`` (e.g.
        ``kernel.nngp_and_ntk(x_test, diag=True)``) or a store of ``K(X*, X*)``;
        ``None``: no variance.
    :return: a :class:`StoredPosterior` (float64 when the stores are).

    Example:
        >>> import tempfile, torch
        >>> from gpytorch_tp import MLPKernel
        >>> from gpytorch_tp.distributed import posterior_from_store, precompute_kernel
        >>> x, x_test = torch.randn(30, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        >>> y, kernel = torch.sin(x[:, 0]), MLPKernel(depth=2)
        >>> with tempfile.TemporaryDirectory() as path:
        ...     _ = precompute_kernel(kernel, x, path=f"{path}/train", progress=False)
        ...     _ = precompute_kernel(kernel, x_test, x, path=f"{path}/cross", progress=False)
        ...     diagonal = kernel.nngp_and_ntk(x_test, diag=True)[1]
        ...     post = posterior_from_store(f"{path}/train", f"{path}/cross", y, 0.01, kind="ntk",
        ...                                 test_diagonal=diagonal)
        >>> post.mean.shape, bool((post.variance >= 0).all())
        (torch.Size([5]), True)
    """
    train, cross = _matrix(train, "the training matrix"), _matrix(cross, "the cross-covariance")
    kind = _kind(train, kind)
    _kind(cross, kind)
    if not train.symmetric:
        raise ValueError(f"the training matrix at {train.path} is a rectangle K(X, Z), not K(X, X)")
    n = train.shape[0]
    if cross.shape[1] != n:
        raise ValueError(f"the cross-covariance has {cross.shape[1]} columns but the training matrix {n} rows")
    stored, crossed = train.manifest["checksums"], cross.manifest["checksums"]
    if crossed.get("x2") != stored["x1"]:
        raise ValueError(
            f"the cross-covariance at {cross.path} was not computed against the training inputs of {train.path} "
            "(their checksums differ): compute it as precompute_kernel(kernel, x_test, x_train)"
        )
    for part in ("hyperparameters", "architecture"):
        if crossed.get(part) != stored.get(part):
            raise ValueError(f"the two stores were computed with different kernels: their {part} differ")
    if not torch.is_tensor(y) or y.shape != (n,):
        raise ValueError(f"y must be a tensor of the {n} training targets, got {getattr(y, 'shape', type(y))}")
    if not noise >= 0:
        raise ValueError(f"noise must be a non-negative variance, got {noise!r}")

    k_train = train.tensor(kind).clone()
    k_cross = cross.tensor(kind)
    k_train.diagonal().add_(float(noise))
    factor, info = torch.linalg.cholesky_ex(k_train)
    if int(info) != 0:
        raise ValueError(
            f"K(X, X) + {noise:g} I is not positive definite (Cholesky failed at row {int(info)}): "
            "raise the noise, or check for duplicate training inputs"
        )
    targets = y.to(factor.dtype)
    weights = torch.cholesky_solve(targets[:, None], factor)[:, 0]
    mean = k_cross @ weights
    variance = None
    if test_diagonal is not None:
        if not torch.is_tensor(test_diagonal):
            test = _matrix(test_diagonal, "the test matrix")
            test_diagonal = test.tensor(_kind(test, kind)).diagonal().clone()
        if test_diagonal.shape != (cross.shape[0],):
            raise ValueError(
                f"test_diagonal must hold the {cross.shape[0]} test points' variances, got {tuple(test_diagonal.shape)}"
            )
        half = torch.linalg.solve_triangular(factor, k_cross.T.contiguous(), upper=False)
        variance = (test_diagonal.to(factor.dtype) - (half**2).sum(0)).clamp_min(0)
    return StoredPosterior(mean, variance, weights)
