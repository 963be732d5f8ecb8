"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..finite import CorrelationNorm
from ..state import KernelState, per_item, self_position_variances
from .base import Layer

__all__ = ["LayerNorm"]


def _safe_ratio(numerator: Tensor, denominator_squared: Tensor) -> Tensor:
    """``numerator / sqrt(denominator_squared)``, and 0 where the denominator is 0."""
    positive = denominator_squared > 0
    safe = torch.where(positive, denominator_squared, torch.ones_like(denominator_squared))
    return torch.where(positive, numerator / torch.sqrt(safe), torch.zeros_like(numerator))


class LayerNorm(Layer):
    r"""Layer normalisation over the features (Ba et al. 2016), infinite width.

    The feature mean and norm of a layer concentrate at infinite width, so the
    normalisation maps the kernel to its correlation:

    .. math::

        K(x, x') \leftarrow \frac{K(x, x')}{\sqrt{K(x, x) K(x', x')}}, \qquad
        \Theta(x, x') \leftarrow \frac{\Theta(x, x')}{\sqrt{K(x, x) K(x', x')}}
            \; [+\, K_\text{new}(x, x') + 1 \text{ with a learnable affine map}].

    The gradient through the normalisation statistics vanishes in the limit.
    Centring is exact only for centred features: on Gaussian pre-activations it
    does nothing at infinite width.  Features after a nonlinearity have a
    non-zero mean, which this layer does not track, so it refuses them unless
    ``center=False`` (RMS normalisation).  An input that is identically zero is
    mapped to zero.

    :param elementwise_affine: the finite layer has per-unit gain (initialised to
        1) and bias (initialised to 0) that are trained, as ``torch.nn.LayerNorm``
        does by default; they add :math:`K_\text{new} + 1` to the NTK.  The gain's
        term is a product of each unit's own features, so the NTK recursion is
        exact only when a weight layer follows; a nonlinearity directly after an
        affine LayerNorm raises ``NotImplementedError`` for the NTK.
    :param center: subtract the feature mean (``torch.nn.LayerNorm``) or not (RMSNorm).
    """

    def __init__(self, elementwise_affine: bool = False, center: bool = True):
        super().__init__()
        self.elementwise_affine = bool(elementwise_affine)
        self.center = bool(center)

    def forward(self, state: KernelState) -> KernelState:
        if self.center and not state.gaussian:
            raise ValueError(
                "LayerNorm(center=True) needs centred (Gaussian) features, i.e. after a Linear layer or a "
                "residual sum of such; after a nonlinearity the feature mean matters and is not tracked. "
                "Use LayerNorm(center=False) to normalise by the root mean square only."
            )
        k11, k22 = state.position_variances()
        norm = k11 * k22
        cross = _safe_ratio(state.cross, norm)
        ntk = state.ntk
        if state.track_ntk:
            ntk = None if ntk is None else _safe_ratio(ntk, norm)
            if self.elementwise_affine:
                ntk = cross + 1 if ntk is None else ntk + cross + 1
        if state.all_position_pairs:
            # Each position is normalised on its own: self-covariances become correlations.
            grid_ndim = len(state.positions)
            var1 = per_item(_self_correlation, state.var1, *self_position_variances(state.var1, grid_ndim))
            var2 = per_item(_self_correlation, state.var2, *self_position_variances(state.var2, grid_ndim))
        else:
            var1, var2 = _unit_or_zero(state.var1), _unit_or_zero(state.var2)
        return state.after_per_unit_gains(
            self.elementwise_affine and state.track_ntk, cross=cross, var1=var1, var2=var2, ntk=ntk
        )

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        norm = CorrelationNorm(
            in_shape[0], center=self.center, elementwise_affine=self.elementwise_affine, grid_ndim=len(in_shape) - 1
        )
        return norm, in_shape

    def extra_repr(self) -> str:
        return f"elementwise_affine={self.elementwise_affine}, center={self.center}"


def _self_correlation(covariance: Tensor, first: Tensor, second: Tensor) -> Tensor:
    return _safe_ratio(covariance, first * second)


def _unit_or_zero(var: Tensor) -> Tensor:
    return (var > 0).to(var.dtype)
