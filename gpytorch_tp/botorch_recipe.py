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
shifted boxes.  ``learn_offset=True`` instead learns the privileged point:
the kernel sees :math:`x - o`, with the offset :math:`o` a hyperparameter
(:class:`ShiftedKernel`, a weak ``Normal(0, 1/4)`` prior per coordinate around
the box's centre) fitted with the others by the marginal likelihood.

BoTorch is an optional dependency (``pip install gpytorch-tp[botorch]``): it is
imported when a function here is called, not when :mod:`gpytorch_tp` is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.priors import LogNormalPrior, NormalPrior, Prior

from .kernels import MLPKernel

if TYPE_CHECKING:  # BoTorch is optional: imported when a recipe function is called
    from botorch.models.transforms import Normalize

__all__ = ["ShiftedKernel", "bo_covar_module", "bo_input_transform", "bo_recipe"]

#: The outputscale's floor: keeps L-BFGS off 0, where the log-normal prior's log density is undefined.
OUTPUTSCALE_FLOOR = 1e-4


#: The default offset prior's standard deviation per coordinate, in the centred coordinates (box side 1).
OFFSET_PRIOR_SCALE = 0.25


class ShiftedKernel(Kernel):
    r"""A kernel evaluated on inputs shifted by a learned offset :math:`o \in \mathbb{R}^d`.

    .. math::

        k_o(x, x') = k(x - o,\; x' - o)

    For a dot-product kernel :math:`k` (NNGP/NTK) the point :math:`o` is the one
    mapped to the origin, the point the kernel singles out (it resolves finest
    near it); learning :math:`o` by the marginal likelihood lets the data, not the
    box, choose it.  For a stationary :math:`k` the shift changes nothing.

    :param base_kernel: the kernel :math:`k`.
    :param dim: the input dimension :math:`d`.
    :param offset_prior: a prior on the offset (default ``NormalPrior(0, 1/4)``
        per coordinate: with the recipe's centred inputs, the box's centre with a
        standard deviation of a quarter of its side); ``None`` for no prior.
    :param batch_shape: one offset per batch member (default: the base kernel's batch shape).

    The offset is stored unconstrained as ``raw_offset`` of shape
    ``(*batch_shape, 1, d)``, initialised at 0 (no shift).
    """

    _DEFAULT = object()

    def __init__(
        self,
        base_kernel: Kernel,
        dim: int,
        *,
        offset_prior: Prior | None | object = _DEFAULT,
        batch_shape: torch.Size | None = None,
        **kwargs,
    ):
        if not isinstance(base_kernel, Kernel):
            raise TypeError(f"base_kernel must be a gpytorch Kernel, got {type(base_kernel).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer (the input dimension), got {dim!r}")
        batch_shape = base_kernel.batch_shape if batch_shape is None else torch.Size(batch_shape)
        super().__init__(batch_shape=batch_shape, **kwargs)
        self.base_kernel = base_kernel
        self.dim = dim
        self.register_parameter("raw_offset", torch.nn.Parameter(torch.zeros(*batch_shape, 1, dim)))
        if offset_prior is ShiftedKernel._DEFAULT:
            offset_prior = NormalPrior(0.0, OFFSET_PRIOR_SCALE)
        if offset_prior is not None:
            if not isinstance(offset_prior, Prior):
                raise TypeError(f"offset_prior must be a gpytorch Prior or None, got {type(offset_prior).__name__}")
            self.register_prior("offset_prior", offset_prior, lambda m: m.offset, lambda m, v: m._set_offset(v))

    @property
    def offset(self) -> torch.Tensor:
        return self.raw_offset

    @offset.setter
    def offset(self, value: torch.Tensor | float) -> None:
        self._set_offset(value)

    def _set_offset(self, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, dtype=self.raw_offset.dtype, device=self.raw_offset.device)
        self.initialize(raw_offset=value.expand_as(self.raw_offset))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, **params) -> torch.Tensor:
        if x1.shape[-1] != self.dim or x2.shape[-1] != self.dim:
            raise ValueError(
                f"ShiftedKernel was built for inputs of dimension {self.dim}; got x1 with "
                f"{x1.shape[-1]} and x2 with {x2.shape[-1]} features"
            )
        offset = self.offset.to(dtype=x1.dtype)
        return self.base_kernel.forward(x1 - offset, x2 - offset, diag=diag, **params)


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
    kind: str = "nngp",
    *,
    depth: int = 3,
    nonlinearity: str = "relu",
    outputscale_prior: bool = True,
    learn_offset: bool = False,
    dim: int | None = None,
    **kernel_kwargs,
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
    :param learn_offset: wrap the MLP kernel in :class:`ShiftedKernel` (a learned
        input offset, prior ``Normal(0, 1/4)`` per coordinate) so that the fit
        chooses the privileged point (default ``False``; see ``docs/benchmarks.md``,
        "Shifted boxes", for what it measured).
    :param dim: the input dimension; required with ``learn_offset=True``.
    :param kernel_kwargs: passed to :class:`~gpytorch_tp.kernels.MLPKernel`
        (``bias_variance``, ``batch_shape``, ...); ``normalize`` is always ``True``.
    """
    if "normalize" in kernel_kwargs:
        raise TypeError(
            "bo_covar_module always builds the normalised kernel (normalize=True): the outputscale prior "
            "only means the signal variance for a unit-diagonal kernel; build MLPKernel yourself otherwise"
        )
    base = MLPKernel(depth, nonlinearity, kind, normalize=True, **kernel_kwargs)
    if learn_offset:
        if dim is None:
            raise ValueError("learn_offset=True needs dim, the input dimension (one offset per coordinate)")
        base = ShiftedKernel(base, dim)
    elif dim is not None:
        raise ValueError("dim is only used with learn_offset=True")
    if not outputscale_prior:
        return ScaleKernel(base, batch_shape=base.batch_shape)
    return ScaleKernel(
        base,
        batch_shape=base.batch_shape,
        outputscale_prior=LogNormalPrior(0.0, 1.0),
        outputscale_constraint=GreaterThan(OUTPUTSCALE_FLOOR),
    )


def _check_bounds(bounds: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
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


def bo_input_transform(
    bounds: torch.Tensor | Sequence[Sequence[float]], *, origin: torch.Tensor | Sequence[float] | None = None
) -> Normalize:
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
    bounds: torch.Tensor | Sequence[Sequence[float]],
    kind: str = "nngp",
    *,
    depth: int = 3,
    nonlinearity: str = "relu",
    origin: torch.Tensor | Sequence[float] | None = None,
    learn_offset: bool = False,
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
    :param learn_offset: learn the privileged point as an input offset
        (:class:`ShiftedKernel`; see :func:`bo_covar_module`).
    :param num_outputs: number of outcome columns of ``train_Y`` (for ``Standardize``).
    :param kernel_kwargs: passed to :class:`~gpytorch_tp.kernels.MLPKernel`.
    :returns: ``{"covar_module": ..., "input_transform": ..., "outcome_transform": ...}``.
    """
    _, Standardize = _botorch_transforms()
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    input_transform = bo_input_transform(bounds, origin=origin)
    dim = input_transform.bounds.shape[-1] if learn_offset else None
    covar = bo_covar_module(
        kind, depth=depth, nonlinearity=nonlinearity, learn_offset=learn_offset, dim=dim, **kernel_kwargs
    )
    return {
        "covar_module": covar,
        "input_transform": input_transform,
        "outcome_transform": Standardize(m=num_outputs),
    }
