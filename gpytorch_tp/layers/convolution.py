r"""Layers of convolutional networks: convolutions and average pooling.

Features on a grid of positions (pixels, steps) carry, per pair of items, a
covariance per pair of positions (see :class:`~gpytorch_tp.state.KernelState`).
A convolution in the NTK parameterisation with a filter of :math:`k` positions
and :math:`C` input channels,
:math:`h(p) = \sigma_w \sum_{o, c} W_{o c} z_c(s p + o) / \sqrt{C k} + \sigma_b b`,
maps it by (Novak et al. 2019; Garriga-Alonso et al. 2019)

.. math::

    K_h(p, p') = \frac{\sigma_w^2}{k} \sum_o K_z(s p + o, s p' + o) + \sigma_b^2, \qquad
    \Theta_h(p, p') = K_h(p, p') + \frac{\sigma_w^2}{k} \sum_o \Theta_z(s p + o, s p' + o),

where positions outside the grid (zero padding) contribute nothing.  The sum
only shifts both positions by the same offset, so aligned pairs stay aligned;
pooling averages each side's positions independently and needs all pairs.
The readouts of a grid (``Flatten``, ``GlobalAvgPool``) are in :mod:`~gpytorch_tp.layers.readouts`.
"""

from __future__ import annotations

import math

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor, nn

from ..finite import GridAvgPool, NTKConv
from ..geometry import PADDING_MODES, Padding, grid_tuple, padding
from ..dense_update import dense_update
from ..state import KernelState, per_item
from .base import Layer, WeightBiasVariances
from .input_checks import check_grid, require_all_pairs

# Kernels pickled before the readouts moved to .readouts name them here.
from .readouts import Flatten, GlobalAvgPool  # noqa: E402, F401

__all__ = ["AvgPool1d", "AvgPool2d", "Conv", "Conv1d", "Conv2d"]


def _grid_axes(state: KernelState, axis: int) -> tuple[int, ...]:
    """The (negative) tensor axes of grid axis ``axis``: one for aligned pairs, two for all pairs."""
    grid_ndim = len(state.positions)
    first = -state.pair_ndim + axis
    return (first, first + grid_ndim) if state.all_position_pairs else (first,)


def _wrap(tensor: Tensor, axes: tuple[int, ...], pad: Padding) -> Tensor:
    """Circular padding of ``axes``."""
    for dim in axes:
        size = tensor.shape[dim]
        parts = [tensor.narrow(dim, size - pad.before, pad.before), tensor, tensor.narrow(dim, 0, pad.after)]
        tensor = torch.cat([p for p in parts if p.shape[dim] > 0], dim)
    return tensor


def window_sum(tensor: Tensor, axes: tuple[int, ...], kernel: int, stride: int, pad: Padding, circular: bool) -> Tensor:
    """``sum_o tensor[s q + o - before]`` over ``o < kernel``, the same offset on every axis in ``axes``.

    Positions outside the grid count as zero (zero padding) or wrap around
    (``circular``).  Zero padding is not materialised: each offset adds the
    slice of outputs whose inputs lie inside the grid.
    """
    if circular:
        tensor, before, size = _wrap(tensor, axes, pad), 0, tensor.shape[axes[0]] + pad.before + pad.after
    else:
        before, size = pad.before, tensor.shape[axes[0]]
    out_size = pad.output_size
    pieces = []
    for offset in range(kernel):
        shift = offset - before
        # Outputs q with 0 <= s q + shift < size.
        first = max(0, -(shift // stride))
        last = min(out_size - 1, (size - 1 - shift) // stride)
        if last < first:
            continue
        source = slice(stride * first + shift, stride * last + shift + 1, stride)
        pieces.append((slice(first, last + 1), source))
    shape = list(tensor.shape)
    for dim in axes:
        shape[dim] = out_size
    full = [i for i, (target, _) in enumerate(pieces) if target == slice(0, out_size)]
    total = None
    for i in ([full[0]] if full else []) + [i for i in range(len(pieces)) if not full or i != full[0]]:
        target, source = pieces[i]
        index_in = [slice(None)] * tensor.dim()
        index_out = [slice(None)] * tensor.dim()
        for dim in axes:
            index_in[dim], index_out[dim] = source, target
        piece = tensor[tuple(index_in)]
        if total is None:
            total = piece.clone() if full else tensor.new_zeros(shape)
            if full:
                continue
        total[tuple(index_out)].add_(piece)  # in place on the view: no copy back
    return total


class Conv(WeightBiasVariances, Layer):
    r"""Convolution over a grid of any dimension (infinite channels), NTK parameterisation.

    .. math::

        K_h(p, p') = \frac{\sigma_w^2}{k} \sum_o K_z(s p + o, s p' + o) + \sigma_b^2, \qquad
        \Theta_h(p, p') = K_h(p, p') + \frac{\sigma_w^2}{k} \sum_o \Theta_z(s p + o, s p' + o),

    with :math:`k` the number of filter positions and :math:`s` the stride.

    :param kernel_size: filter size, an int or one per grid axis.
    :param stride: step, an int or one per grid axis (default 1).
    :param padding: ``"same"`` (zeros, ``ceil(n / stride)`` outputs),
        ``"valid"`` (no padding) or ``"circular"`` (periodic); see
        :func:`gpytorch_tp.geometry.padding`.
    :param weight_variance: :math:`\sigma_w^2` (default 1; 2 keeps ReLU networks' variance).
    :param bias_variance: :math:`\sigma_b^2` (default 0.1; exactly 0 is held fixed).
    :param grid_ndim: the grid dimension this layer accepts (``None``: any).
    :param kwargs: priors, constraints, ``learn_*`` flags and ``batch_shape``, as
        for :class:`~gpytorch_tp.layers.Linear`.

    Example:
        >>> from gpytorch_tp.layers import Conv2d, Flatten, Linear, ReLU, Sequential
        >>> net = Sequential(Conv2d(3, weight_variance=2.0), ReLU(), Flatten(), Linear())
    """

    has_weights = True

    def __init__(
        self,
        kernel_size: int | tuple[int, ...] = 3,
        stride: int | tuple[int, ...] = 1,
        padding: str = "same",
        weight_variance: float | Tensor = 1.0,
        bias_variance: float | Tensor = 0.1,
        *,
        grid_ndim: int | None = None,
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        weight_variance_constraint: Interval | None = None,
        bias_variance_constraint: Interval | None = None,
        learn_weight_variance: bool | None = None,
        learn_bias_variance: bool | None = None,
        batch_shape: torch.Size = torch.Size(),
    ):
        if padding not in PADDING_MODES:
            raise ValueError(f"{type(self).__name__}: padding must be one of {PADDING_MODES}, got {padding!r}")
        if grid_ndim is not None:
            kernel_size = grid_tuple(kernel_size, grid_ndim, "kernel_size")
            stride = grid_tuple(stride, grid_ndim, "stride")
        else:
            for name, value in (("kernel_size", kernel_size), ("stride", stride)):
                grid_tuple(value, len(value) if isinstance(value, (tuple, list)) else 1, name)
        super().__init__(
            weight_variance,
            bias_variance,
            weight_variance_prior=weight_variance_prior,
            bias_variance_prior=bias_variance_prior,
            weight_variance_constraint=weight_variance_constraint,
            bias_variance_constraint=bias_variance_constraint,
            learn_weight_variance=learn_weight_variance,
            learn_bias_variance=learn_bias_variance,
            batch_shape=batch_shape,
        )
        self.kernel_size, self.stride, self.padding, self.grid_ndim = kernel_size, stride, padding, grid_ndim

    def geometry(self, positions: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[Padding, ...]]:
        """``(kernel_size, stride, paddings)`` per axis of an input grid of shape ``positions``."""
        grid_ndim = len(positions)
        kernel_size = grid_tuple(self.kernel_size, grid_ndim, "kernel_size")
        stride = grid_tuple(self.stride, grid_ndim, "stride")
        pads = []
        for axis, (size, k, s) in enumerate(zip(positions, kernel_size, stride)):
            try:
                pads.append(padding(size, k, s, self.padding))
            except ValueError as error:
                raise ValueError(
                    f"{type(self).__name__} on grid axis {axis} of the grid {positions}: {error}"
                ) from None
        return kernel_size, stride, tuple(pads)

    def _filtered(self, tensor: Tensor, axes_per_grid_axis: tuple[tuple[int, ...], ...], positions: tuple[int, ...]):
        kernel_size, stride, pads = self.geometry(positions)
        for axes, k, s, pad in zip(axes_per_grid_axis, kernel_size, stride, pads):
            tensor = window_sum(tensor, axes, k, s, pad, self.padding == "circular")
        return tensor

    def forward(self, state: KernelState) -> KernelState:
        grid_ndim = check_grid(self, state, self.grid_ndim)
        kernel_size, _, pads = self.geometry(state.positions)
        filter_size = math.prod(kernel_size)
        axes = tuple(_grid_axes(state, axis) for axis in range(grid_ndim))
        weight = state.broadcast_parameter(self.weight_variance)
        bias = state.broadcast_parameter(self.bias_variance)
        scaled_weight = per_item(torch.mul, weight, 1.0 / filter_size)
        # The dense update of the footprint sums (Linear's, with sigma_w^2 / k).
        tangent = None
        if state.track_ntk and state.ntk is not None:
            tangent = self._filtered(state.ntk, axes, state.positions)
        cross, ntk = dense_update(
            self._filtered(state.cross, axes, state.positions), scaled_weight, bias, tangent, state.track_ntk
        )
        var1 = per_item(self._filtered_variance, state.var1, bias, scaled_weight, axes, state.positions)
        var2 = per_item(self._filtered_variance, state.var2, bias, scaled_weight, axes, state.positions)
        return state.after_weights(
            cross=cross, var1=var1, var2=var2, ntk=ntk, positions=tuple(pad.output_size for pad in pads)
        )

    def _filtered_variance(self, var, bias, scaled_weight, axes, positions):
        variance, _ = dense_update(self._filtered(var, axes, positions), scaled_weight, bias)
        return variance

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        positions = tuple(in_shape[1:])
        if not positions:
            raise ValueError(f"{type(self).__name__} needs inputs on a grid, got feature shape {tuple(in_shape)}")
        kernel_size, stride, pads = self.geometry(positions)
        weight_std, bias_std = self.standard_deviations()
        module = NTKConv(
            in_shape[0], width, kernel_size, stride, self.padding, weight_std=weight_std, bias_std=bias_std
        )
        return module, (width, *(pad.output_size for pad in pads))

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, " + super().extra_repr()
        )


class Conv1d(Conv):
    """:class:`Conv` on 1-d grids (signals, sequences): inputs ``(C, L)``."""

    def __init__(
        self, kernel_size: int | tuple[int] = 3, stride: int | tuple[int] = 1, padding: str = "same", *args, **kwargs
    ):
        super().__init__(kernel_size, stride, padding, *args, grid_ndim=1, **kwargs)


class Conv2d(Conv):
    """:class:`Conv` on 2-d grids (images): inputs ``(C, H, W)``."""

    def __init__(
        self,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: str = "same",
        *args,
        **kwargs,
    ):
        super().__init__(kernel_size, stride, padding, *args, grid_ndim=2, **kwargs)


class _AvgPool(Layer):
    r"""Average pooling over windows of the grid, without padding.

    Each side's positions are averaged over its own window, so every pair of
    positions is needed:

    .. math:: K(q, q') \leftarrow \frac{1}{k^2} \sum_{o, o'} K(s q + o, s q' + o').
    """

    needs_all_position_pairs = True
    grid_ndim = 0

    def __init__(self, kernel_size: int | tuple[int, ...] = 2, stride: int | tuple[int, ...] | None = None):
        super().__init__()
        self.kernel_size = grid_tuple(kernel_size, self.grid_ndim, "kernel_size")
        self.stride = self.kernel_size if stride is None else grid_tuple(stride, self.grid_ndim, "stride")

    def _paddings(self, positions: tuple[int, ...]) -> tuple[Padding, ...]:
        pads = []
        for axis, (size, k, s) in enumerate(zip(positions, self.kernel_size, self.stride)):
            try:
                pads.append(padding(size, k, s, "valid"))
            except ValueError as error:
                raise ValueError(
                    f"{type(self).__name__} on grid axis {axis} of the grid {positions}: {error}"
                ) from None
        return tuple(pads)

    def _pooled(self, tensor: Tensor, axes: tuple[tuple[int, ...], ...], positions: tuple[int, ...]) -> Tensor:
        pads = self._paddings(positions)
        for sides, k, s, pad in zip(axes, self.kernel_size, self.stride, pads):
            for dim in sides:  # each side's window on its own
                tensor = window_sum(tensor, (dim,), k, s, pad, False)
        return tensor / math.prod(self.kernel_size) ** 2

    def forward(self, state: KernelState) -> KernelState:
        check_grid(self, state, self.grid_ndim)
        require_all_pairs(self, state)
        positions = state.positions
        axes = tuple(_grid_axes(state, axis) for axis in range(len(positions)))
        return state.replace(
            cross=self._pooled(state.cross, axes, positions),
            var1=per_item(self._pooled, state.var1, axes, positions),
            var2=per_item(self._pooled, state.var2, axes, positions),
            ntk=None if state.ntk is None else self._pooled(state.ntk, axes, positions),
            positions=tuple(pad.output_size for pad in self._paddings(positions)),
        )

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        pads = self._paddings(tuple(in_shape[1:]))
        return GridAvgPool(self.kernel_size, self.stride), (in_shape[0], *(pad.output_size for pad in pads))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class AvgPool1d(_AvgPool):
    __doc__ = _AvgPool.__doc__ + "\n    On 1-d grids.\n"
    grid_ndim = 1


class AvgPool2d(_AvgPool):
    __doc__ = _AvgPool.__doc__ + "\n    On 2-d grids.\n"
    grid_ndim = 2
