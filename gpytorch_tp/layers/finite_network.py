"""The finite-width ``torch.nn`` network of an architecture (what :meth:`Layer.to_module` builds).

It sits below :mod:`gpytorch_tp.layers.base` and uses no layer class, only each
layer's ``finite_module``, so that the layers can build networks without
importing anything above them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["build_network", "finite_sequence"]


def finite_sequence(
    layers: Iterable,
    in_shape: tuple[int, ...],
    width: int,
    out_shape: tuple[int, ...] | None = None,
    last_width: int | None = None,
) -> tuple[nn.Module, tuple[int, ...]]:
    """The finite modules of ``layers`` one after the other, and the shape of their output.

    Every layer gets ``width``; the last one ``out_shape[0]`` when ``out_shape``
    is given (a readout, whose output shape is then checked), else ``last_width``
    when given (not checked).
    """
    layers = list(layers)
    modules = []
    shape = tuple(in_shape)
    if out_shape is not None:
        last_width = out_shape[0]
    for i, layer in enumerate(layers):
        is_last = i == len(layers) - 1
        layer_width = last_width if (is_last and last_width is not None) else width
        module, shape = layer.finite_module(shape, layer_width)
        modules.append(module)
    if out_shape is not None and tuple(shape) != tuple(out_shape):
        raise ValueError(
            f"the architecture ends with {type(layers[-1]).__name__}, whose output has shape "
            f"{tuple(shape)}, not {tuple(out_shape)}; end it with a readout (e.g. Flatten or "
            "GlobalAvgPool for a grid) and a Linear layer"
        )
    return nn.Sequential(*modules), shape


def build_network(
    architecture: nn.Module,
    in_shape: int | tuple[int, ...],
    width: int,
    out_features: int | None = 1,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The finite network of ``architecture`` with hidden width ``width``.

    :param architecture: the infinite-width architecture (a
        :class:`~gpytorch_tp.layers.Layer`).
    :param in_shape: input dimension, or the shape ``(channels, *grid)`` of
        inputs on a grid (images ``(C, H, W)``, signals ``(C, L)``); the network
        then takes them flattened, ``(..., C * H * W)``, as the kernels do.
    :param width: width (channels) of every hidden layer.
    :param out_features: outputs of the final layer (it must then be a weight
        layer); ``None`` keeps the final layer at ``width``.
    :param seed: seed for the initialisation (``None``: the global generator).
    """
    # Layers have _finite_network (a Sequential its own, any other layer that of a
    # Sequential of itself); the check by attribute keeps this module free of layer imports.
    if not callable(getattr(architecture, "_finite_network", None)):
        raise TypeError(
            f"Sequential: item 0 is a {type(architecture).__name__}, not a gpytorch_tp Layer "
            "(torch.nn modules are not layers of an infinite-width architecture)"
        )
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    out_shape = None if out_features is None else (out_features,)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        network, _ = architecture._finite_network(in_shape, width, out_shape)
    if len(in_shape) > 1:
        network = nn.Sequential(nn.Unflatten(-1, in_shape), *network)
    return network.to(dtype=dtype or torch.get_default_dtype(), device=device)
