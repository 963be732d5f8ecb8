"""Fully connected layer."""

from __future__ import annotations

from torch import Tensor, nn

from ..dense_update import dense_update
from ..finite import NTKConv, NTKLinear
from ..state import KernelState, per_item
from .base import Layer, WeightBiasVariances

__all__ = ["Linear"]


class Linear(WeightBiasVariances, Layer):
    r"""A fully connected layer of infinite width, in the NTK parameterisation.

    The finite layer is :math:`h = \sigma_w W z / \sqrt{n} + \sigma_b b` with
    :math:`W_{ij}, b_i \sim N(0, 1)` and :math:`n` the width of :math:`z`.  With
    :math:`K_z` and :math:`\Theta_z` the NNGP kernel and NTK of the incoming
    features,

    .. math::

        K_h = \sigma_w^2 K_z + \sigma_b^2, \qquad
        \Theta_h = K_h + \sigma_w^2 \Theta_z .

    For the network input, :math:`K_z(x, x') = \langle x, x' \rangle / d`.
    The NNGP kernel is the same in the standard parameterisation
    (:math:`W_{ij} \sim N(0, \sigma_w^2 / n)`); the NTK is not, and every NTK
    in this package is that of the NTK parameterisation.

    :param weight_variance: :math:`\sigma_w^2` (default 1).
    :param bias_variance: :math:`\sigma_b^2` (default 0.1).  A value of exactly
        0 is held fixed (a positive constraint cannot reach 0).
    :param weight_variance_prior: optional prior on :math:`\sigma_w^2`.
    :param bias_variance_prior: optional prior on :math:`\sigma_b^2`.
    :param weight_variance_constraint: constraint (default ``GreaterThan(1e-6)``, lower for smaller starting values).
    :param bias_variance_constraint: constraint (default ``GreaterThan(1e-6)``, lower for smaller starting values).
    :param learn_weight_variance: learn :math:`\sigma_w^2` (default: yes unless 0).
    :param learn_bias_variance: learn :math:`\sigma_b^2` (default: yes unless 0).

    Example:
        >>> layer = Linear(weight_variance=2.0, bias_variance=0.1)
        >>> layer.weight_variance
        tensor(2..., grad_fn=<...>)
    """

    has_weights = True

    def forward(self, state: KernelState) -> KernelState:
        after, (weight, bias) = self.fusion_split(state)
        cross, ntk = dense_update(state.cross, weight, bias, state.ntk, state.track_ntk)
        return after.replace(cross=cross, ntk=ntk)

    def fusion_split(self, state: KernelState) -> tuple[KernelState, tuple[Tensor, Tensor]]:
        weight = state.broadcast_parameter(self.weight_variance)
        bias = state.broadcast_parameter(self.bias_variance)
        # Per-item work: once per row (column) of tiles, see ``per_item``.
        var1, _ = per_item(dense_update, state.var1, weight, bias)
        var2, _ = per_item(dense_update, state.var2, weight, bias)
        after = state.after_weights(var1=var1, var2=var2)
        return after, (weight, bias)

    def fused_pairs(
        self, cross: Tensor, ntk: Tensor | None, args: tuple, track_ntk: bool
    ) -> tuple[Tensor, Tensor | None]:
        weight, bias = args
        return dense_update(cross, weight, bias, ntk, track_ntk)

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        weight_std, bias_std = self.standard_deviations()
        if len(in_shape) == 1:
            return NTKLinear(in_shape[0], width, weight_std=weight_std, bias_std=bias_std), (width,)
        # On a grid, a dense layer acts on the channels at each position: a 1 x 1 convolution.
        grid_ndim = len(in_shape) - 1
        ones = (1,) * grid_ndim
        module = NTKConv(in_shape[0], width, ones, ones, "valid", weight_std=weight_std, bias_std=bias_std)
        return module, (width, *in_shape[1:])
