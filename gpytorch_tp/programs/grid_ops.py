"""Handlers of torch calls on images ``(N, C, H, W)``: convolutions, average pooling, flattening.

An image is a :class:`~gpytorch_tp.programs.traced.Grid`, one vector of channels per pixel.  A
convolution applies its weight, viewed as a matrix of fan-in ``C k_h k_w``, to each output pixel's
patch: the vectors of the input pixels under the kernel, one block per offset (zero blocks outside
the image: zero padding).  The order of the fan-in does not matter to the master theorem as long as
every patch uses the same one, so a patch is offset-major where PyTorch's weight is channel-major.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ..errors import UnsupportedModuleError
from .expressions import linear_sum
from .feature_ops import elementwise_value, linear_value
from .program import Block, GVar, Value
from .refusals import NotFeatureVectorsError
from .traced import Grid, bind

__all__ = ["adaptive_avg_pool2d", "avg_pool2d", "conv2d", "grid_elementwise", "grid_flatten", "grid_mean"]


def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise UnsupportedModuleError(what, f"an int or a pair, got {value!r}")


def _check_grid(tracer, tensor: Tensor, what: str) -> Grid:
    source = tracer.value(tensor)
    if not isinstance(source, Grid):
        raise NotFeatureVectorsError(what, "its input must be a traced image (N, C, H, W)")
    return source


def conv2d(tracer, func, name, args, kwargs, result) -> None:
    """``F.conv2d`` (``nn.Conv2d``): the same weight on every output pixel's patch."""
    bound = bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    source = _check_grid(tracer, bound["input"], "F.conv2d")
    if int(bound.get("groups", 1)) != 1:
        raise UnsupportedModuleError("F.conv2d with groups > 1", "grouped and depthwise convolutions are not compiled")
    weight_tensor = bound["weight"]
    out_channels, in_channels, kh, kw = weight_tensor.shape
    weight = tracer.weight(weight_tensor, "F.conv2d", fan_in=in_channels * kh * kw)
    sh, sw = _pair(bound.get("stride", 1), "the stride of F.conv2d")
    dh, dw = _pair(bound.get("dilation", 1), "the dilation of F.conv2d")
    padding = bound.get("padding", 0)
    if padding == "valid":
        padding = 0
    if padding == "same":
        if kh % 2 == 0 or kw % 2 == 0:
            raise UnsupportedModuleError("padding='same' with an even kernel", "odd kernels only")
        padding = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    ph, pw = _pair(padding, "the padding of F.conv2d")
    height, width = source.pixels.shape
    zero = Block(in_channels, GVar(()))
    pixels = np.empty(tuple(result.shape[2:]), dtype=object)
    for a, b in np.ndindex(pixels.shape):
        blocks = []
        for i in range(kh):
            for j in range(kw):
                r, c = a * sh + i * dh - ph, b * sw + j * dw - pw
                blocks.extend(source.pixels[r, c].blocks if 0 <= r < height and 0 <= c < width else (zero,))
        pixels[a, b] = linear_value(tracer, Value(tuple(blocks)), weight, bound.get("bias"), out_channels)
    tracer.track(result, Grid(pixels))


def _average(values: list[Value]) -> Value:
    """The coordinatewise mean of vectors of one width (their blocks cut where any of them is)."""
    cuts = sorted(set().union(*(v.boundaries() for v in values)))
    blocks = []
    for a, b in zip(cuts, cuts[1:]):
        terms = tuple((1.0 / len(values), v.piece(a, b)) for v in values)
        blocks.append(Block(b - a, linear_sum(terms)))
    return Value(tuple(blocks))


def avg_pool2d(tracer, func, name, args, kwargs, result) -> None:
    """``F.avg_pool2d`` without padding: each output pixel the mean of its window."""
    bound = bind(args, kwargs, ("input", "kernel_size", "stride", "padding"))
    source = _check_grid(tracer, bound["input"], "F.avg_pool2d")
    kh, kw = _pair(bound["kernel_size"], "the kernel size of F.avg_pool2d")
    stride = bound.get("stride")
    sh, sw = _pair(stride if stride not in (None, []) else (kh, kw), "the stride of F.avg_pool2d")
    if _pair(bound.get("padding", 0), "the padding of F.avg_pool2d") != (0, 0):
        raise UnsupportedModuleError("F.avg_pool2d with padding", "average pooling without padding only")
    pixels = np.empty(tuple(result.shape[2:]), dtype=object)
    for a, b in np.ndindex(pixels.shape):
        window = [source.pixels[a * sh + i, b * sw + j] for i in range(kh) for j in range(kw)]
        pixels[a, b] = _average(window)
    tracer.track(result, Grid(pixels))


def adaptive_avg_pool2d(tracer, func, name, args, kwargs, result) -> None:
    """``F.adaptive_avg_pool2d`` to sizes that divide the image (global average pooling: 1)."""
    bound = bind(args, kwargs, ("input", "output_size"))
    source = _check_grid(tracer, bound["input"], "F.adaptive_avg_pool2d")
    height, width = source.pixels.shape
    oh, ow = result.shape[2:]
    if height % oh or width % ow:
        raise UnsupportedModuleError(
            f"F.adaptive_avg_pool2d from {height} x {width} to {oh} x {ow}", "output sizes that divide the image"
        )
    kh, kw = height // oh, width // ow
    pixels = np.empty((oh, ow), dtype=object)
    for a, b in np.ndindex(pixels.shape):
        pixels[a, b] = _average([source.pixels[a * kh + i, b * kw + j] for i in range(kh) for j in range(kw)])
    tracer.track(result, Grid(pixels))


def grid_mean(tracer, source: Grid, dims: tuple[int, ...], keepdim: bool, result: Tensor) -> bool:
    """``x.mean((2, 3))`` of an image: global average pooling.  False when ``dims`` are not the pixels."""
    if sorted(d % 4 for d in dims) != [2, 3]:
        return False
    mean = _average(list(source.pixels.reshape(-1)))
    tracer.track(result, Grid(np.array([[mean]], dtype=object)) if keepdim else mean)
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
