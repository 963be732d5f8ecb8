"""Presets: the kernels of convolutional networks (a plain CNN and the Myrtle family)."""

from __future__ import annotations

import copy

from gpytorch.priors import Prior

from ..layers import (
    AvgPool1d,
    AvgPool2d,
    Conv,
    Flatten,
    GlobalAvgPool,
    Layer,
    Linear,
    Sequential,
    nonlinearity_from_name,
)
from .presets import check_choice, check_depth, hyperparameter_batch_shape, nonlinearity_and_weight_variance
from .tensor_program_kernel import TensorProgramKernel

__all__ = ["CNNKernel", "MyrtleKernel"]

READOUTS = ("global_avg_pool", "flatten")


def _grid_ndim(input_shape) -> int:
    if input_shape is None:
        raise ValueError("convolutional kernels need input_shape=(C, H, W) for images or (C, L) for signals")
    shape = tuple(input_shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"input_shape must be (C, L) or (C, H, W), got {shape}")
    return len(shape) - 1


class _ConvStack:
    """Builds conv layers of one kernel with shared settings (variances, priors, batch shape)."""

    def __init__(self, weight_variance, bias_variance, weight_variance_prior, bias_variance_prior, batch_shape):
        self.weight_variance, self.bias_variance = weight_variance, bias_variance
        self.weight_variance_prior, self.bias_variance_prior = weight_variance_prior, bias_variance_prior
        self.batch_shape = batch_shape

    def _options(self) -> dict:
        return {
            "weight_variance_prior": copy.deepcopy(self.weight_variance_prior),
            "bias_variance_prior": copy.deepcopy(self.bias_variance_prior),
            "batch_shape": self.batch_shape,
        }

    def conv(self, grid_ndim: int, kernel_size, padding: str) -> Conv:
        return Conv(
            kernel_size, 1, padding, self.weight_variance, self.bias_variance, grid_ndim=grid_ndim, **self._options()
        )

    def readout(self) -> Linear:
        return Linear(self.weight_variance, self.bias_variance, **self._options())


class CNNKernel(TensorProgramKernel):
    r"""NNGP kernel or NTK of an infinitely wide (infinitely many channels) convolutional network.

    The network is ``depth`` blocks of convolution and nonlinearity, a readout
    over the grid and a dense output layer:

    .. math::

        f(x) = L \circ R \circ (\phi \circ \mathrm{Conv})^{\circ D} (x),

    with :math:`R` the global average over positions (``"global_avg_pool"``,
    translation invariant) or the flattened features (``"flatten"``: only
    aligned pixel pairs matter, which makes the kernel :math:`O(P)` instead of
    :math:`O(P^2)` per pair of images).  Optionally, average pooling follows
    every ``pool_every`` blocks.  Each layer has its own learnable weight and
    bias variances (see :class:`~gpytorch_tp.layers.Conv`); put the kernel in a
    :class:`gpytorch.kernels.ScaleKernel` to learn an output scale.

    Inputs are flattened items, ``(..., N, C * H * W)`` (as ``torch.flatten``
    of ``(C, H, W)`` images) or ``(..., N, C * L)`` for 1-d signals.

    :param input_shape: ``(C, H, W)`` or ``(C, L)``; with ``active_dims``, the layout of the
        ``C * H * W`` (``C * L``) selected columns, in the order ``active_dims`` lists them.
    :param depth: number of convolution blocks.
    :param kernel_size: filter size (int or per axis).
    :param nonlinearity: name or layer, as for :class:`~gpytorch_tp.kernels.MLPKernel`.
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param readout: ``"global_avg_pool"`` or ``"flatten"``.
    :param padding: ``"same"``, ``"valid"`` or ``"circular"``.
    :param pool_every: put a 2 x 2 (or 2) average pooling after every this many blocks (``None``: none).
    :param weight_variance: starting weight variance (default 2 for ReLU, 1 otherwise).
    :param bias_variance: starting bias variance (default 0.1).
    :param weight_variance_prior: prior on every layer's weight variance.
    :param bias_variance_prior: prior on every layer's bias variance.
    :param nonlinearity_kwargs: extra arguments of a named nonlinearity.
    :param kwargs: passed to :class:`TensorProgramKernel` (``batch_shape``,
        ``active_dims``, ``memory_budget``, ``progress``, ``tile_pairs``).

    Example:
        >>> import torch
        >>> from gpytorch_tp import CNNKernel
        >>> k = CNNKernel(input_shape=(1, 8, 8), depth=2, readout="global_avg_pool")
        >>> k(torch.randn(4, 64)).to_dense().shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        depth: int = 3,
        kernel_size: int | tuple[int, ...] = 3,
        nonlinearity: str | Layer = "relu",
        kind: str = "nngp",
        *,
        readout: str = "global_avg_pool",
        padding: str = "same",
        pool_every: int | None = None,
        weight_variance: float | None = None,
        bias_variance: float = 0.1,
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        nonlinearity_kwargs: dict | None = None,
        **kwargs,
    ):
        grid_ndim = _grid_ndim(input_shape)
        check_depth(depth)
        check_choice("readout", readout, READOUTS)
        if pool_every is not None and (not isinstance(pool_every, int) or pool_every < 1):
            raise ValueError(f"pool_every must be a positive integer or None, got {pool_every!r}")
        template, weight_variance = nonlinearity_and_weight_variance(nonlinearity, nonlinearity_kwargs, weight_variance)
        batch_shape = hyperparameter_batch_shape(kwargs)
        stack = _ConvStack(weight_variance, bias_variance, weight_variance_prior, bias_variance_prior, batch_shape)
        pool = AvgPool1d if grid_ndim == 1 else AvgPool2d
        layers: list[Layer] = []
        for i in range(depth):
            layers += [stack.conv(grid_ndim, kernel_size, padding), template if i == 0 else copy.deepcopy(template)]
            if pool_every is not None and (i + 1) % pool_every == 0 and i + 1 < depth:
                layers.append(pool(2))
        layers += [GlobalAvgPool() if readout == "global_avg_pool" else Flatten(), stack.readout()]
        super().__init__(Sequential(*layers), kind=kind, input_shape=input_shape, **kwargs)
        self.depth, self.readout = depth, readout


# Convolution blocks per stage of the Myrtle networks (Shankar et al. 2020).
MYRTLE_STAGES = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}


class MyrtleKernel(TensorProgramKernel):
    r"""The kernel of a Myrtle network (Shankar et al. 2020, "Neural kernels without tangents").

    Three stages of 3 x 3 convolutions with ReLU (``depth`` 5, 7 or 10 counts
    the layers: stages of 2-1-1, 2-2-2 or 3-3-3 convolutions), a 2 x 2 average
    pooling after the first and the second stage, global average pooling and
    a dense readout.  (The original, for 32 x 32 images, ends with three more
    2 x 2 poolings down to one pixel, which is the global average.)  Needs
    images of at least 4 x 4 (two poolings).  Default variances
    :math:`\sigma_w^2 = 2`, :math:`\sigma_b^2 = 0` as in the paper; the bias
    variance is then fixed at 0 unless a positive value is given.

    :param input_shape: ``(C, H, W)`` (with ``active_dims``: of the selected columns).
    :param depth: 5, 7 or 10.
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param kwargs: ``weight_variance``, ``bias_variance``, their priors, and
        the options of :class:`TensorProgramKernel`.

    Example:
        >>> import torch
        >>> from gpytorch_tp import MyrtleKernel
        >>> k = MyrtleKernel(input_shape=(1, 8, 8), depth=5)
        >>> k(torch.randn(3, 64)).to_dense().shape
        torch.Size([3, 3])
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        depth: int = 5,
        kind: str = "nngp",
        *,
        weight_variance: float = 2.0,
        bias_variance: float = 0.0,
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        **kwargs,
    ):
        if _grid_ndim(input_shape) != 2:
            raise ValueError(f"MyrtleKernel needs images, input_shape=(C, H, W), got {tuple(input_shape)}")
        if depth not in MYRTLE_STAGES:
            raise ValueError(f"depth must be one of {sorted(MYRTLE_STAGES)}, got {depth!r}")
        _, height, width = input_shape
        if height < 4 or width < 4:
            raise ValueError(
                f"MyrtleKernel pools twice by 2 x 2 and needs images of at least 4 x 4, got {height} x {width}"
            )
        batch_shape = hyperparameter_batch_shape(kwargs)
        stack = _ConvStack(weight_variance, bias_variance, weight_variance_prior, bias_variance_prior, batch_shape)
        layers: list[Layer] = []
        for stage, blocks in enumerate(MYRTLE_STAGES[depth]):
            for _ in range(blocks):
                layers += [stack.conv(2, 3, "same"), nonlinearity_from_name("relu")]
            if stage < 2:
                layers.append(AvgPool2d(2))
        layers += [GlobalAvgPool(), stack.readout()]
        super().__init__(Sequential(*layers), kind=kind, input_shape=input_shape, **kwargs)
        self.depth = depth
