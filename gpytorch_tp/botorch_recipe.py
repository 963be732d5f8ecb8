"""The recommended way to use the MLP NNGP/NTK kernels in BoTorch, in one call.

Dot-product kernels need three things that BoTorch's defaults do not give them
(why, and the measurements, are in the :class:`~gpytorch_tp.kernels.MLPKernel`
docstring and ``docs/benchmarks.md``):

1. the **normalised** kernel, ``MLPKernel(..., normalize=True)``, so that the
   ScaleKernel's outputscale alone carries the signal variance;
2. a **prior on that outputscale**, ``LogNormalPrior(0, 1)`` (median 1: the
   signal variance of standardised outcomes), floored at ``1e-4`` so that its
   log density stays defined;
3. **centred inputs**, ``Normalize(d, bounds=bounds, center=0.0)``: the search
   box mapped to :math:`[-1/2, 1/2]^d`.  On BoTorch's unit cube every pair of
   points subtends a small angle at the origin, the kernel correlates all of
   them strongly and marginal-likelihood fits collapse to a flat model.

Example::

    from botorch.models import SingleTaskGP
    from gpytorch_tp import bo_recipe

    model = SingleTaskGP(train_X, train_Y, **bo_recipe(bounds))             # NNGP, depth 3
    model = SingleTaskGP(train_X, train_Y, **bo_recipe(bounds, kind="ntk"))  # the NTK

**What the centring assumes.**  The kernels see their inputs through inner
products, so the point mapped to the origin is privileged: the correlation of
two inputs depends on the angle they subtend there, so the kernel resolves
finest near it and treats points along a ray from it as alike.  The default
``origin=None`` maps the box's centre there, which assumes nothing about the
problem except that the box is where the user looks; but on a problem whose
optimum is at (or near) the centre, the kernel gets it almost for free.
``origin=x`` maps any other point ``x`` (in the problem's coordinates, e.g. the
incumbent, the best point observed so far) to the origin, with the same
scaling; ``benchmarks/bayesian_optimisation.py`` measures both on randomly
shifted boxes.

BoTorch is an optional dependency (``pip install gpytorch-tp[botorch]``): it is
imported when a function here is called, not when :mod:`gpytorch_tp` is.
"""

from __future__ import annotations

import torch
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import ScaleKernel
from gpytorch.priors import LogNormalPrior

from .kernels import MLPKernel

__all__ = ["bo_covar_module", "bo_input_transform", "bo_recipe"]

#: The outputscale's floor: keeps L-BFGS off 0, where the log-normal prior's log density is undefined.
OUTPUTSCALE_FLOOR = 1e-4


def _botorch_transforms():
    try:
        from botorch.models.transforms import Normalize, Standardize
    except ImportError as exc:  # a clear message instead of a bare ModuleNotFoundError deep in a call
        raise ImportError(
            "gpytorch_tp.botorch_recipe needs BoTorch for its input and outcome transforms: "
            "pip install 'gpytorch-tp[botorch]' (or pip install botorch)"
        ) from exc
    return Normalize, Standardize


def bo_covar_module(
    kind: str = "nngp", *, depth: int = 3, nonlinearity: str = "relu", outputscale_prior: bool = True, **kernel_kwargs
) -> ScaleKernel:
    """``ScaleKernel(MLPKernel(depth, nonlinearity, kind, normalize=True))`` with the recipe's outputscale prior.

    Every argument but ``kind`` is keyword-only (``MLPKernel`` takes ``depth`` first:
    a positional ``3`` here would be ambiguous).

    :param kind: ``"nngp"`` or ``"ntk"``.
    :param depth: number of hidden layers (default 3, the depth measured best in
        ``docs/benchmarks.md``).
    :param nonlinearity: as for :class:`~gpytorch_tp.kernels.MLPKernel` (default ``"relu"``).
    :param outputscale_prior: put ``LogNormalPrior(0, 1)`` on the outputscale and
        floor it at ``1e-4`` (default ``True``; ``False`` gives GPyTorch's plain ScaleKernel).
    :param kernel_kwargs: passed to :class:`~gpytorch_tp.kernels.MLPKernel`
        (``bias_variance``, ``batch_shape``, ...); ``normalize`` is always ``True``.
    """
    if "normalize" in kernel_kwargs:
        raise TypeError(
            "bo_covar_module always builds the normalised kernel (normalize=True): the outputscale prior "
            "only means the signal variance for a unit-diagonal kernel; build MLPKernel yourself otherwise"
        )
    base = MLPKernel(depth, nonlinearity, kind, normalize=True, **kernel_kwargs)
    if not outputscale_prior:
        return ScaleKernel(base, batch_shape=base.batch_shape)
    return ScaleKernel(
        base,
        batch_shape=base.batch_shape,
        outputscale_prior=LogNormalPrior(0.0, 1.0),
        outputscale_constraint=GreaterThan(OUTPUTSCALE_FLOOR),
    )


def _check_bounds(bounds) -> torch.Tensor:
    bounds = torch.as_tensor(bounds)
    if not (bounds.is_floating_point()):
        bounds = bounds.to(torch.get_default_dtype())
    if bounds.dim() != 2 or bounds.shape[0] != 2 or bounds.shape[1] == 0:
        raise ValueError(
            f"bounds must have shape (2, d), the lower bounds then the upper bounds (BoTorch's layout); "
            f"got shape {tuple(bounds.shape)}"
        )
    if not torch.isfinite(bounds).all():
        raise ValueError("bounds must be finite: the inputs are scaled by the box's side")
    bad = (bounds[1] <= bounds[0]).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"bounds must have lower < upper in every dimension; not in dimension(s) {bad}")
    return bounds


def bo_input_transform(bounds, *, origin=None):
    """BoTorch's ``Normalize`` that maps the box ``bounds`` to :math:`[-1/2, 1/2]^d` (``center=0.0``).

    :param bounds: ``(2, d)`` tensor of lower and upper bounds, as ``optimize_acqf`` takes them.
    :param origin: ``None`` (default) maps the box's centre to the origin; a
        ``(d,)`` point in the problem's coordinates (e.g. the incumbent
        ``train_X[train_Y.argmax()]``) maps that point there instead, with the
        same scale (each coordinate divided by the box's side).
    :returns: a ``botorch.models.transforms.Normalize`` with fixed bounds.
    """
    Normalize, _ = _botorch_transforms()
    bounds = _check_bounds(bounds)
    d = bounds.shape[-1]
    if origin is not None:
        origin = torch.as_tensor(origin, dtype=bounds.dtype, device=bounds.device)
        if origin.shape != (d,):
            raise ValueError(f"origin must be one point of shape ({d},), like a row of bounds; got {tuple(origin.shape)}")
        if not torch.isfinite(origin).all():
            raise ValueError("origin must be finite")
        # Normalize(center=0) maps the middle of the bounds it is given to 0: hand it a box
        # of the same side centred on the chosen point.
        half = (bounds[1] - bounds[0]) / 2
        bounds = torch.stack([origin - half, origin + half])
    return Normalize(d, bounds=bounds, center=0.0)


def bo_recipe(
    bounds,
    kind: str = "nngp",
    *,
    depth: int = 3,
    nonlinearity: str = "relu",
    origin=None,
    num_outputs: int = 1,
    **kernel_kwargs,
) -> dict:
    """Keyword arguments for ``SingleTaskGP``: the recommended kernel, input and outcome transforms.

    ``SingleTaskGP(train_X, train_Y, **bo_recipe(bounds))`` gives the normalised
    MLP kernel with the outputscale prior (:func:`bo_covar_module`), inputs
    centred on the box (:func:`bo_input_transform`) and ``Standardize`` on the
    outcomes (the prior is written for standardised outcomes; newer BoTorch
    versions standardise by default, older ones did not).

    :param bounds: ``(2, d)`` tensor of the search box.
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param depth: hidden layers (default 3).
    :param nonlinearity: default ``"relu"``.
    :param origin: the point mapped to the origin (default: the box's centre);
        see :func:`bo_input_transform`.
    :param num_outputs: number of outcome columns of ``train_Y`` (for ``Standardize``).
    :param kernel_kwargs: passed to :class:`~gpytorch_tp.kernels.MLPKernel`.
    :returns: ``{"covar_module": ..., "input_transform": ..., "outcome_transform": ...}``.
    """
    _, Standardize = _botorch_transforms()
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    input_transform = bo_input_transform(bounds, origin=origin)
    return {
        "covar_module": bo_covar_module(kind, depth=depth, nonlinearity=nonlinearity, **kernel_kwargs),
        "input_transform": input_transform,
        "outcome_transform": Standardize(m=num_outputs),
    }
