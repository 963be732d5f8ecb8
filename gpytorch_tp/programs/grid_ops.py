"""Handlers of torch calls on images ``(N, C, H, W)`` and 1-d grids ``(N, C, L)``: convolutions, average
pooling, flattening.

An image is a :class:`~gpytorch_tp.programs.traced.Grid`, one vector of channels per pixel.  A
convolution applies its weight, viewed as a matrix of fan-in ``C k_h k_w``, to each output pixel's
patch: the vectors of the input pixels under the kernel, one block per offset (zero blocks outside
the image: zero padding).  The order of the fan-in does not matter to the master theorem as long as
every patch uses the same one, so a patch is offset-major where PyTorch's weight is channel-major.
"""

from __future__ import annotations

import itertools

import numpy as np
from torch import Tensor

from ..errors import UnsupportedModuleError
from .expressions import linear_combination
from .feature_ops import elementwise_value, linear_value
from .program import Block, GVar, Value
from .refusals import NotFeatureVectorsError
from .traced import Grid, bind

__all__ = ["adaptive_avg_pool", "avg_pool", "conv", "grid_elementwise", "grid_flatten", "grid_mean"]


def _per_axis(value, ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    if isinstance(value, (tuple, list)) and len(value) == ndim:
        return tuple(int(v) for v in value)
    raise UnsupportedModuleError(what, f"an int or {ndim} of them, got {value!r}")


def _check_grid(tracer, tensor: Tensor, what: str) -> Grid:
    source = tracer.value(tensor)
    if not isinstance(source, Grid):
        raise NotFeatureVectorsError(what, "its input must be a traced image (N, C, H, W)")
    return source


def conv(tracer, func, name, args, kwargs, result) -> None:
    """``F.conv1d`` / ``F.conv2d`` (``nn.Conv1d``, ``nn.Conv2d``): the same weight on every output pixel's patch."""
    bound = bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    what = f"F.{name}"
    source = _check_grid(tracer, bound["input"], what)
    if int(bound.get("groups", 1)) != 1:
        raise UnsupportedModuleError(f"{what} with groups > 1", "grouped and depthwise convolutions are not compiled")
    weight_tensor = bound["weight"]
    out_channels, in_channels, *kernel = weight_tensor.shape
    ndim = len(kernel)
    if source.pixels.ndim != ndim:
        raise NotFeatureVectorsError(what, f"a grid of {source.pixels.ndim} axes for a {ndim}-d convolution")
    weight = tracer.weight(weight_tensor, what, fan_in=in_channels * int(np.prod(kernel)))
    stride = _per_axis(bound.get("stride", 1), ndim, f"the stride of {what}")
    dilation = _per_axis(bound.get("dilation", 1), ndim, f"the dilation of {what}")
    padding = bound.get("padding", 0)
    if padding == "valid":
        padding = 0
    if padding == "same":
        if any(k % 2 == 0 for k in kernel):
            raise UnsupportedModuleError(f"{what} with padding='same' and an even kernel", "odd kernels only")
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    padding = _per_axis(padding, ndim, f"the padding of {what}")
    zero = Block(in_channels, GVar(()))
    pixels = np.empty(tuple(result.shape[2:]), dtype=object)
    for out in np.ndindex(pixels.shape):
        blocks = []
        for offset in itertools.product(*(range(k) for k in kernel)):
            at = tuple(o * s + i * d - p for o, s, i, d, p in zip(out, stride, offset, dilation, padding))
            inside = all(0 <= a < n for a, n in zip(at, source.pixels.shape))
            blocks.extend(source.pixels[at].blocks if inside else (zero,))
        pixels[out] = linear_value(tracer, Value(tuple(blocks)), weight, bound.get("bias"), out_channels)
    tracer.track(result, Grid(pixels))


def _average(values: list[Value]) -> Value:
    return linear_combination([1.0 / len(values)] * len(values), values)


def _pool(source: Grid, kernel: tuple[int, ...], stride: tuple[int, ...], shape: tuple[int, ...]) -> Grid:
    pixels = np.empty(shape, dtype=object)
    for out in np.ndindex(shape):
        window = [
            source.pixels[tuple(o * s + i for o, s, i in zip(out, stride, offset))]
            for offset in itertools.product(*(range(k) for k in kernel))
        ]
        pixels[out] = _average(window)
    return Grid(pixels)


def avg_pool(tracer, func, name, args, kwargs, result) -> None:
    """``F.avg_pool1d`` / ``F.avg_pool2d`` without padding: each output pixel the mean of its window."""
    bound = bind(args, kwargs, ("input", "kernel_size", "stride", "padding"))
    what = f"F.{name}"
    source = _check_grid(tracer, bound["input"], what)
    ndim = source.pixels.ndim
    kernel = _per_axis(bound["kernel_size"], ndim, f"the kernel size of {what}")
    stride = bound.get("stride")
    stride = _per_axis(stride if stride not in (None, [], ()) else kernel, ndim, f"the stride of {what}")
    if any(_per_axis(bound.get("padding", 0), ndim, f"the padding of {what}")):
        raise UnsupportedModuleError(f"{what} with padding", "average pooling without padding only")
    tracer.track(result, _pool(source, kernel, stride, tuple(result.shape[2:])))


def adaptive_avg_pool(tracer, func, name, args, kwargs, result) -> None:
    """``F.adaptive_avg_pool1d`` / ``2d`` to sizes that divide the grid (global average pooling: 1)."""
    bound = bind(args, kwargs, ("input", "output_size"))
    source = _check_grid(tracer, bound["input"], f"F.{name}")
    sizes, out = source.pixels.shape, tuple(result.shape[2:])
    if any(n % o for n, o in zip(sizes, out)):
        raise UnsupportedModuleError(f"F.{name} from {sizes} to {out}", "output sizes that divide the grid")
    kernel = tuple(n // o for n, o in zip(sizes, out))
    tracer.track(result, _pool(source, kernel, kernel, out))


def grid_mean(tracer, source: Grid, dims: tuple[int, ...], keepdim: bool, result: Tensor) -> bool:
    """``x.mean((2, 3))`` of an image (``x.mean(2)`` of a 1-d grid): global average pooling.

    False when ``dims`` are not the pixel axes.
    """
    ndim = source.pixels.ndim
    if sorted(d % (ndim + 2) for d in dims) != list(range(2, ndim + 2)):
        return False
    mean = _average(list(source.pixels.reshape(-1)))
    pooled = np.empty((1,) * ndim, dtype=object)
    pooled[(0,) * ndim] = mean
    tracer.track(result, Grid(pooled) if keepdim else mean)
    return True


def grid_flatten(tracer, source: Grid, result: Tensor) -> bool:
    """``x.flatten(1)`` / ``x.view(N, -1)``: one vector of all pixels' channels, pixel-major (see module)."""
    if result.dim() != 2:
        return False
    pixels = list(source.pixels.reshape(-1))
    if len(pixels) == 1:
        tracer.track(result, pixels[0])  # a 1 x 1 image: its channels, in PyTorch's order too
        return True
    tracer.track(result, Value(tuple(b for v in pixels for b in v.blocks)))
    tracer.permuted.add(id(result))  # its coordinates are not in PyTorch's order: no slices of it
    return True


def grid_elementwise(tracer, func, name, args, kwargs, result, traced: list) -> None:
    """A coordinatewise function of images of one size: the same function at every pixel."""
    shapes = {t.pixels.shape for t in traced if isinstance(t, Grid)}
    if len(shapes) != 1 or any(t is not None and not isinstance(t, Grid) for t in traced):
        raise UnsupportedModuleError(
            f"{name} of images of shapes {sorted(shapes)} or of an image and another tensor",
            "coordinatewise functions of images of one size",
        )
    (shape,) = shapes
    pixels = np.empty(shape, dtype=object)
    for index in np.ndindex(shape):
        per_pixel = [t.pixels[index] if isinstance(t, Grid) else None for t in traced]
        pixels[index] = elementwise_value(
            tracer, func, name, args, kwargs, (result.shape[0], result.shape[1]), per_pixel
        )
    tracer.track(result, Grid(pixels))
