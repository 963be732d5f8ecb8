"""Building expressions: linear maps of G-vars stay G-vars, sums stay sums, the rest are H-vars."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UnsupportedModuleError
from .program import (
    PRODUCT_NAMES,
    Apply,
    Block,
    GVar,
    InputFeatures,
    Sum,
    Value,
    WidthMean,
    is_item_scalar,
    scalar_product,
)

# Coordinatewise torch functions of one or more tensors (by name: torch.tanh, Tensor.tanh and
# F.tanh are different objects of the same name).  Any function of these is an H-var.
ELEMENTWISE_FUNCTIONS = frozenset(
    """relu tanh sigmoid erf erfc exp expm1 sin cos abs square sqrt rsqrt log1p softplus elu selu celu
    mish silu gelu leaky_relu hardtanh hardsigmoid hardswish relu6 logsigmoid tanhshrink softsign
    sign clamp clip pow float_power reciprocal neg negative positive add sub subtract rsub mul multiply
    div divide true_divide maximum minimum where
    __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__
    __rtruediv__ __itruediv__ __neg__ __pos__ __pow__ __rpow__ __abs__""".split()
)
# Linear maps of G-vars, which keep them G-vars (a sum of Gaussians is Gaussian).
ADD = frozenset({"add", "__add__", "__radd__", "__iadd__"})
SUB = frozenset({"sub", "subtract", "__sub__", "__isub__"})
RSUB = frozenset({"rsub", "__rsub__"})
MUL = PRODUCT_NAMES
DIV = frozenset({"div", "divide", "true_divide", "__truediv__", "__itruediv__"})
NEG = frozenset({"neg", "negative", "__neg__"})


def is_random(expr: Any) -> bool:
    return isinstance(expr, (GVar, Apply, Sum)) and not is_item_scalar(expr)


def linear_sum(terms: tuple) -> Any:
    """``sum(c * e)``: a G-var when every ``e`` is one, else a :class:`Sum` (terms of coefficient 0 dropped:
    ``0 * e`` and ``e * h`` of a zero state ``h`` are the zero G-var)."""
    terms = tuple((c, e) for c, e in terms if not (isinstance(c, (int, float)) and c == 0))
    terms = tuple((c, e) for c, e in terms if not (isinstance(e, GVar) and not e.terms))  # the zero G-var
    if all(isinstance(e, GVar) for _, e in terms):
        total = GVar(())
        for c, e in terms:
            total = total.plus(e.scaled(c))
        return total
    flat = []
    for c, e in terms:
        flat.extend(((scalar_product(c, d), f) for d, f in e.terms) if isinstance(e, Sum) else ((c, e),))
    return Sum(tuple(flat))


def combine(func: Callable, name: str, args: list, keywords: tuple) -> Any:
    """The expression of ``func(*args)``: a G-var when it is a linear map of G-vars, a :class:`Sum` when it
    is one of other expressions, else an H-var."""
    scalars = [a for a in args if not is_random(a)]  # constants and numbers per item
    exprs = [a for a in args if is_random(a)]
    if not keywords and len(args) <= 2:
        linear = _as_linear(name, args, scalars, exprs)
        if linear is not None:
            return linear_sum(linear)
    return Apply(func, tuple(args), keywords)


def _as_linear(name: str, args: list, scalars: list, exprs: list) -> tuple | None:
    """``func(*args)`` as ``((c, e), ...)`` when it is a linear combination of its expressions, else None."""
    if name in ADD and len(exprs) == 2:
        return ((1.0, exprs[0]), (1.0, exprs[1]))
    # A constant (or a number per item) added is the term ``c * 1``: moments by bilinearity, E[e * 1] = E[e].
    if name in ADD and len(exprs) == 1 and len(scalars) == 1 and is_item_scalar(scalars[0]):
        return ((1.0, exprs[0]), (scalars[0], 1.0))
    if name in SUB and len(exprs) == 2:
        return ((1.0, args[0]), (-1.0, args[1]))
    if name in SUB and len(exprs) == 1 and len(args) == 2 and is_item_scalar(args[1]):
        return ((1.0, args[0]), (scalar_product(-1.0, args[1]), 1.0))
    if name in RSUB and len(exprs) == 1 and len(args) == 2 and is_item_scalar(args[1]):
        return ((-1.0, args[0]), (args[1], 1.0))  # c - e
    if name in MUL and len(exprs) == 1 and len(scalars) == 1 and is_item_scalar(scalars[0]):
        factor = scalars[0]
        return ((float(factor) if isinstance(factor, (int, float)) else factor, exprs[0]),)
    if name in DIV and len(args) == 2 and exprs and args[0] is exprs[0] and is_item_scalar(args[1]):
        divisor = args[1]
        factor = 1.0 / float(divisor) if isinstance(divisor, (int, float)) else Apply(operator.truediv, (1.0, divisor))
        return ((factor, exprs[0]),)
    if name in NEG and len(exprs) == 1 and len(args) == 1:
        return ((-1.0, exprs[0]),)
    return None


def blockwise(value: Value, fn: Callable[[Any], Any]) -> Value:
    return Value(tuple(Block(b.width, fn(b.expr)) for b in value.blocks))


def width_mean(value: Value) -> Any:
    """The per-item average of ``value``: 0 for G-vars (centred), else a :class:`WidthMean`."""
    if all(isinstance(b.expr, GVar) for b in value.blocks):
        return 0.0
    return WidthMean(value)


def product(a: Any, b: Any) -> Apply:
    return Apply(torch.mul, (a, b))


def normalised(value: Value, eps: float, center: bool) -> Value:
    """``(v - mean(v)) / sqrt(mean((v - mean(v))^2) + eps)`` (without the mean: RMS normalisation)."""
    if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
        raise UnsupportedModuleError("a normalisation of the network input", "the raw input's features are finite")
    if center:
        mean = width_mean(value)
        value = blockwise(value, lambda e: combine(torch.sub, "sub", [e, mean], ()))
    second = width_mean(blockwise(value, lambda e: Apply(torch.square, (e,))))
    scale = Apply(torch.rsqrt, (Apply(operator.add, (second, float(eps))),))
    return blockwise(value, lambda e: combine(torch.mul, "mul", [e, scale], ()))


def linear_combination(coefficients, values) -> Value:
    """``sum_i c_i v_i`` of vectors of one width, coordinatewise (blocks cut wherever any vector's are).

    The coefficients are numbers or numbers per item: a time mean, a pooling window, a row of attention.
    """
    cuts = sorted(set().union(*(v.boundaries() for v in values)))
    blocks = []
    for a, b in zip(cuts, cuts[1:]):
        terms = tuple((c, v.piece(a, b)) for c, v in zip(coefficients, values, strict=True))
        blocks.append(Block(b - a, linear_sum(terms)))
    return Value(tuple(blocks))
