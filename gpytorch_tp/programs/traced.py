"""What the tracer records for a traced tensor besides vectors and sequences, and argument helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import UnsupportedModuleError
from .program import (
    Steps,
    Value,
)
from .refusals import NotFeatureVectorsError, OutsideTheTheoremError


@dataclass(frozen=True, eq=False)
class PerItem:
    """A traced tensor of numbers per item: ``(N,)``, ``(N, 1)``, or ``(N, T, T)`` attention logits and weights.

    ``exprs``: one expression per entry of an item (an object array of the tensor's shape without its batch
    axis), functions of width averages.  ``summed_width``: the tensor is ``summed_width`` times ``exprs`` (a sum
    over the width, ``v.sum(-1)`` or ``q @ k.transpose(-1, -2)``), which grows with the width until it is
    divided by it; 0 when it is an average.
    """

    exprs: np.ndarray
    summed_width: int = 0

    @staticmethod
    def of(expr: Any, shape: tuple[int, ...] = (), summed_width: int = 0) -> PerItem:
        exprs = np.empty(shape, dtype=object)
        for index in np.ndindex(shape):
            exprs[index] = expr
        return PerItem(exprs, summed_width)

    def map(self, fn: Callable[[Any], Any], summed_width: int = 0) -> PerItem:
        exprs = np.empty(self.exprs.shape, dtype=object)
        for index in np.ndindex(self.exprs.shape):
            exprs[index] = fn(self.exprs[index])
        return PerItem(exprs, summed_width)

    def scalar(self, what: str) -> Any:
        """The one number per item, for use in every coordinate of a vector."""
        if self.exprs.size != 1:
            raise NotFeatureVectorsError(
                f"{what} of a vector and numbers per item of shape {self.exprs.shape}",
                "one number per item ((N, 1) or (N,)) broadcasts over the width; token matrices mix tokens with @",
            )
        return self.exprs.reshape(-1)[0]


@dataclass(frozen=True, eq=False)
class TokensTransposed:
    """A sequence with its token and feature axes swapped, ``k.transpose(-1, -2)``: the right factor of logits."""

    steps: Steps


@dataclass(frozen=True, eq=False)
class Heads:
    """A sequence split into attention heads: ``(N, T, H, d_h)`` when ``tokens_first``, else ``(N, H, T, d_h)``.

    ``heads``: one sequence of ``d_h`` features per head (consecutive slices of the features); with
    ``keys`` the token and feature axes are swapped, ``(N, H, d_h, T)`` (the right factor of logits).
    """

    heads: tuple[Steps, ...]
    tokens_first: bool = True
    keys: bool = False


@dataclass(frozen=True, eq=False)
class Grid:
    """An image ``(N, C, H, W)``: one vector of channels per pixel, ``pixels[i, j]`` (a :class:`Value`)."""

    pixels: np.ndarray


@dataclass(frozen=True, eq=False)
class LayerStates:
    """``h_n`` of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: the last state of every layer, ``(layers, N, hidden)``."""

    layers: tuple[Value, ...]


def flat(items) -> list:
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(flat(item))
        else:
            out.append(item)
    return out


def bind(args, kwargs, names: tuple[str, ...]) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def check_features(tracer, tensor: Tensor, what: str) -> Value:
    value = tracer.value(tensor)
    if value is None:
        raise UnsupportedModuleError(what, "its input does not come from the network input")
    if tensor.dim() != 2:
        raise NotFeatureVectorsError(
            what,
            f"it acts on a tensor of shape {tuple(tensor.shape)}; the compiler traces feature vectors (N, width) "
            "so far (sequences and images: the converter's layers)",
        )
    return value


def constant_entries(tensor: Tensor, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A constant tensor broadcast against numbers per item of ``shape`` (a mask ``(T, T)``): its entries."""
    item = tuple(tensor.shape)
    if len(item) > len(shape) + 1 or (len(item) == len(shape) + 1 and item[0] != 1):
        raise OutsideTheTheoremError(
            f"{name} with a constant tensor of shape {item} that differs from item to item",
            "constants must be the same for every input",
        )
    if len(item) == len(shape) + 1:
        tensor = tensor[0]
    values = np.empty(tuple(tensor.shape), dtype=object)
    flat = tensor.detach().cpu().reshape(-1).tolist()
    for index, v in zip(np.ndindex(values.shape), flat):
        values[index] = float(v) if not isinstance(v, bool) else v
    return np.broadcast_to(values, shape)


def summed_error(name: str, per_item: PerItem) -> OutsideTheTheoremError:
    return OutsideTheTheoremError(
        f"{name} of a sum over the width ({per_item.summed_width} features) that is not divided by the width",
        "a sum of n features grows with n and has no infinite-width limit; divide it by the width "
        "(v.sum(-1) / v.shape[-1], q @ k.transpose(-1, -2) / k.shape[-1]): logits scaled by 1/sqrt(width) are "
        "random at infinite width, not the master theorem's numbers",
    )
