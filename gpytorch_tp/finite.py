"""Finite-width torch modules whose infinite-width limits the layers describe.

These are ordinary ``torch.nn`` modules, initialised so that their random
function converges to the layer's kernel as the width grows.  They are what
the kernels are tested against, and what :meth:`Layer.finite_module` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["CorrelationNorm", "NTKLinear", "Pointwise", "ResidualSum"]


class NTKLinear(nn.Module):
    r"""Dense layer in the NTK parameterisation.

    .. math:: y = \sigma_w W x / \sqrt{\text{fan\_in}} + \sigma_b b, \qquad W_{ij}, b_i \sim N(0, 1).

    Gradient descent on ``W`` and ``b`` (rather than on the scaled weights) is
    what gives the NTK its finite, width-independent limit.
    """

    def __init__(self, in_features: int, out_features: int, weight_std: float, bias_std: float):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_std = weight_std
        self.bias_std = bias_std
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features)) if bias_std > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(x, self.weight) * (self.weight_std / math.sqrt(self.in_features))
        if self.bias is not None:
            y = y + self.bias_std * self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_std={self.weight_std:.4g}, bias_std={self.bias_std:.4g}"
        )


class Pointwise(nn.Module):
    """An elementwise function as a module."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str = "fn"):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class ResidualSum(nn.Module):
    """``skip(x) + block(x)``."""

    def __init__(self, block: nn.Module, skip: nn.Module | None = None):
        super().__init__()
        self.block = block
        self.skip = skip if skip is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class CorrelationNorm(nn.Module):
    """Layer normalisation over the last axis, optionally with a per-unit affine map.

    Equal to ``torch.nn.LayerNorm`` with ``eps=0``; the affine weights start at
    one and the biases at zero, as in PyTorch.
    """

    def __init__(self, features: int, center: bool = True, elementwise_affine: bool = False):
        super().__init__()
        self.center = center
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(features))
            self.bias = nn.Parameter(torch.zeros(features))
        else:
            self.weight = self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        y = x / x.pow(2).mean(-1, keepdim=True).sqrt()
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y
