"""Fully connected layer."""

from __future__ import annotations

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor, nn

from ..finite import NTKConv, NTKLinear
from ..numerics import scale_and_shift
from ..state import KernelState, per_item
from .base import Layer, standard_deviation, variance_property

__all__ = ["Linear"]


class Linear(Layer):
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

    def __init__(
        self,
        weight_variance: float | Tensor = 1.0,
        bias_variance: float | Tensor = 0.1,
        *,
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        weight_variance_constraint: Interval | None = None,
        bias_variance_constraint: Interval | None = None,
        learn_weight_variance: bool | None = None,
        learn_bias_variance: bool | None = None,
        batch_shape: torch.Size = torch.Size(),
    ):
        super().__init__()
        self.register_variance(
            "weight_variance",
            weight_variance,
            batch_shape=batch_shape,
            prior=weight_variance_prior,
            constraint=weight_variance_constraint,
            learnable=learn_weight_variance,
            allow_zero=False,
        )
        self.register_variance(
            "bias_variance",
            bias_variance,
            batch_shape=batch_shape,
            prior=bias_variance_prior,
            constraint=bias_variance_constraint,
            learnable=learn_bias_variance,
        )

    weight_variance = variance_property("weight_variance")

    bias_variance = variance_property("bias_variance")

    def forward(self, state: KernelState) -> KernelState:
        after, (weight, bias) = self.fusion_split(state)
        cross = scale_and_shift(state.cross, weight, bias)
        ntk = None
        if state.track_ntk:
            ntk = cross if state.ntk is None else torch.addcmul(cross, weight, state.ntk)
        return after.replace(cross=cross, ntk=ntk)

    def fusion_split(self, state: KernelState) -> tuple[KernelState, tuple[Tensor, Tensor]]:
        weight = state.broadcast_parameter(self.weight_variance)
        bias = state.broadcast_parameter(self.bias_variance)
        # Per-item work: once per row (column) of tiles, see ``per_item``.
        var1 = per_item(torch.addcmul, bias, weight, state.var1)
        var2 = per_item(torch.addcmul, bias, weight, state.var2)
        after = state.replace(var1=var1, var2=var2, gaussian=True, fresh=True, ntk_feature_coupled=False)
        return after, (weight, bias)

    def fused_pairs(
        self, cross: Tensor, ntk: Tensor | None, args: tuple, track_ntk: bool
    ) -> tuple[Tensor, Tensor | None]:
        weight, bias = args
        cross = bias + weight * cross
        if not track_ntk:
            return cross, None
        return cross, (cross if ntk is None else cross + weight * ntk)

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        weight_std = standard_deviation(self.weight_variance.detach())
        bias_std = standard_deviation(self.bias_variance.detach())
        if len(in_shape) == 1:
            return NTKLinear(in_shape[0], width, weight_std=weight_std, bias_std=bias_std), (width,)
        # On a grid, a dense layer acts on the channels at each position: a 1 x 1 convolution.
        grid_ndim = len(in_shape) - 1
        ones = (1,) * grid_ndim
        module = NTKConv(in_shape[0], width, ones, ones, "valid", weight_std=weight_std, bias_std=bias_std)
        return module, (width, *in_shape[1:])
