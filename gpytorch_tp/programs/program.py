r"""A tensor program: what a traced network computes, in the variables of the master theorem.

A wide network's hidden vectors are of two kinds (Yang, *Tensor Programs I*):

* **G-vars**, :class:`GVar`: linear combinations of *atoms*, each a weight matrix applied to a vector
  (:class:`MatMul`) or a bias vector (:class:`Bias`).  At infinite width their coordinates are
  jointly Gaussian, across inputs and across G-vars;
* **H-vars**, :class:`Apply`: coordinatewise functions of one or several G-vars;
* **per-item numbers**, :class:`WidthMean` and functions of them: averages over the width of one
  item's vector (``v.mean(-1)``, the statistics of a LayerNorm), deterministic at infinite width.
  They enter the other expressions as constants of each item (coefficients of G-vars, arguments of
  H-vars); their own gradients vanish in the NTK limit.

Per-unit parameters that start equal in every unit (a LayerNorm's gain and bias) are
:class:`UnitParameter` atoms: they add nothing to the covariances and their own term to the NTK.

A :class:`Value` is a vector of the network (its last axis is the width) as blocks of coordinates,
each block one expression: a ``torch.cat`` of two vectors is two blocks, a slice keeps a part of
one.  The block widths are the module's own; at infinite width only their ratios matter.

The master theorem reads off covariances: for atoms of the same weight rows
:math:`\operatorname{Cov}(W h_a, W h_b) = \sigma_W^2\, E[h_a h_b]` (a width-weighted sum over the
blocks of :math:`h_a, h_b`), for independent weights 0; :mod:`gpytorch_tp.programs.evaluation`
computes them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Apply",
    "Bias",
    "Block",
    "Expr",
    "GVar",
    "InputFeatures",
    "MatMul",
    "PRODUCT_NAMES",
    "Program",
    "SoftmaxEntry",
    "Steps",
    "Sum",
    "UnitParameter",
    "Value",
    "Weight",
    "WidthMean",
    "is_item_scalar",
    "scalar_product",
    "scalar_sum",
]


@dataclass(frozen=True)
class Weight:
    """A weight matrix (or bias vector) of the network, identified by its parameter: one per tensor.

    :param name: the parameter's qualified name in the module (``named_parameters``).
    :param fan_in: its input width (0 for a bias).
    :param bias: a bias vector rather than a matrix.
    :param unit: a per-unit parameter that starts the same in every unit (no variance: its NTK term
        has learning rate 1, as ``torch.nn.LayerNorm``'s gain and bias in the converter).
    """

    name: str
    fan_in: int
    bias: bool = False
    unit: bool = False


@dataclass(frozen=True)
class MatMul:
    """``W[rows] @ source``: rows ``[start, stop)`` of a weight applied to a vector."""

    weight: Weight
    rows: tuple[int, int]
    source: Value

    def restrict(self, start: int, stop: int) -> MatMul:
        first = self.rows[0]
        return MatMul(self.weight, (first + start, first + stop), self.source)


@dataclass(frozen=True)
class Bias:
    """Entries ``[start, stop)`` of a bias vector (a G-var that is the same for every input)."""

    weight: Weight
    rows: tuple[int, int]

    def restrict(self, start: int, stop: int) -> Bias:
        first = self.rows[0]
        return Bias(self.weight, (first + start, first + stop))


@dataclass(frozen=True)
class UnitParameter:
    r"""Entries ``[start, stop)`` of a per-unit parameter ``p`` in ``p * factor`` (``factor``: an expression,
    or 1.0 for a shift).  At initialisation ``p`` is a constant (part of the expression that uses it);
    this atom is its perturbation: covariance 0, tangent kernel :math:`E[\text{factor}\,\text{factor}']`.
    """

    weight: Weight
    rows: tuple[int, int]
    factor: Any = 1.0

    def restrict(self, start: int, stop: int) -> UnitParameter:
        first = self.rows[0]
        return UnitParameter(self.weight, (first + start, first + stop), restrict(self.factor, start, stop))


Atom = MatMul | Bias | UnitParameter

#: Names of the torch calls that multiply tensors coordinatewise (``a * b``, ``torch.mul``, ``a.mul(b)``):
#: the tracer's scalings of G-vars and the master theorem's products of factors.
PRODUCT_NAMES = frozenset({"mul", "multiply", "__mul__", "__rmul__", "__imul__"})


def _is_zero(c: Any) -> bool:
    return isinstance(c, (int, float)) and c == 0


def scalar_product(a: Any, b: Any) -> Any:
    """``a * b`` of numbers or per-item scalar expressions (numbers folded)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) * float(b)
    if _is_zero(a) or _is_zero(b):
        return 0.0
    if isinstance(a, (int, float)) and a == 1:
        return b
    if isinstance(b, (int, float)) and b == 1:
        return a
    return Apply(operator.mul, (a, b))


def scalar_sum(a: Any, b: Any) -> Any:
    """``a + b`` of numbers or per-item scalar expressions (numbers folded)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) + float(b)
    if _is_zero(a):
        return b
    if _is_zero(b):
        return a
    return Apply(operator.add, (a, b))


@dataclass(frozen=True)
class GVar:
    """A G-var: ``sum(coefficient * atom)``, jointly Gaussian with every other G-var at infinite width.

    A coefficient is a number or a per-item scalar (:func:`is_item_scalar`): ``v / sqrt(mean(v^2))``
    is still Gaussian, with each item's variance divided.
    """

    terms: tuple[tuple[Atom, Any], ...]

    def restrict(self, start: int, stop: int) -> GVar:
        return GVar(tuple((atom.restrict(start, stop), c) for atom, c in self.terms))

    def scaled(self, factor: Any) -> GVar:
        return GVar(tuple((atom, scalar_product(c, factor)) for atom, c in self.terms if not _is_zero(factor)))

    def plus(self, other: GVar) -> GVar:
        merged: dict[Atom, Any] = {}
        for atom, c in self.terms + other.terms:
            merged[atom] = scalar_sum(merged.get(atom, 0.0), c)
        return GVar(tuple((atom, c) for atom, c in merged.items() if not _is_zero(c)))


@dataclass(frozen=True)
class Apply:
    """An H-var: ``fn(*args, **kwargs)`` coordinatewise, args being expressions or constants.

    ``fn`` is the torch function the network called (``torch.sigmoid``, ``Tensor.mul``, ``F.elu``, ...);
    replaying it on sample points of the G-vars' joint Gaussian integrates it.
    """

    fn: Callable
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()

    def restrict(self, start: int, stop: int) -> Apply:
        return Apply(self.fn, tuple(restrict(a, start, stop) for a in self.args), self.kwargs)


@dataclass(frozen=True)
class InputFeatures:
    """The network input: ``d`` features of finite width (its kernel is :math:`\\langle x, x'\\rangle / d`).

    For sequences, the features of step ``step``; for images, the channels of pixel ``step = (i, j)``
    (``None``: the whole flattened input).
    """

    width: int
    step: int | tuple[int, ...] | None = None

    @property
    def position(self) -> tuple[int, ...]:
        """The position as a tuple (a step ``t`` is ``(t,)``)."""
        return self.step if isinstance(self.step, tuple) else (self.step,)

    def restrict(self, start: int, stop: int) -> InputFeatures:
        if (start, stop) != (0, self.width):
            raise ValueError("a slice of the input features")  # refused by the tracer before this
        return self


@dataclass(frozen=True)
class Sum:
    """A coordinatewise linear combination of H-vars (``relu(a) + elu(b)``, a mean over time steps).

    Kept apart rather than integrated as one function: the moments of a sum are sums of moments.
    """

    terms: tuple[tuple[float, Any], ...]

    def restrict(self, start: int, stop: int) -> Sum:
        return Sum(tuple((c, restrict(e, start, stop)) for c, e in self.terms))


Expr = GVar | Apply | InputFeatures | Sum


def restrict(expr: Any, start: int, stop: int) -> Any:
    """Coordinates ``[start, stop)`` of an expression (constants are the same in every coordinate)."""
    if isinstance(expr, WidthMean):
        return expr  # a number per item: the same in every coordinate
    return expr.restrict(start, stop) if isinstance(expr, (GVar, Apply, InputFeatures, Sum)) else expr


def is_item_scalar(expr: Any) -> bool:
    """Whether ``expr`` is a number per item: a constant, a :class:`WidthMean` or a function of such."""
    if isinstance(expr, (int, float, WidthMean)):
        return True
    if isinstance(expr, Apply):
        return all(is_item_scalar(a) for a in expr.args) and all(is_item_scalar(a) for _, a in expr.kwargs)
    return False


def leaves(expr: Any) -> tuple[GVar, ...]:
    """The G-vars an expression depends on, each once, in order of appearance."""
    found: dict[GVar, None] = {}

    def visit(e: Any) -> None:
        if isinstance(e, GVar):
            found.setdefault(e)
        elif isinstance(e, Apply):
            for a in e.args:
                visit(a)
            for _, a in e.kwargs:
                visit(a)
        elif isinstance(e, Sum):
            for _, a in e.terms:
                visit(a)

    visit(expr)
    return tuple(found)


@dataclass(frozen=True)
class SoftmaxEntry:
    """Entry ``index`` of the softmax of a row of logits (numbers per item): ``fn`` of an :class:`Apply`.

    Logits that are ``-inf`` (masked) get weight 0; the row is broadcast to one shape first.
    """

    index: int

    def __call__(self, *logits):
        like = next((t for t in logits if isinstance(t, Tensor)), None)
        if like is None:
            like = torch.as_tensor(0.0, dtype=torch.get_default_dtype())
        shape = torch.broadcast_shapes(*(t.shape for t in logits if isinstance(t, Tensor)))
        row = torch.stack([torch.as_tensor(t, dtype=like.dtype, device=like.device).expand(shape) for t in logits], -1)
        return torch.softmax(row, -1)[..., self.index]


@dataclass(frozen=True)
class WidthMean:
    r"""The average over the width of one item's vector (``v.mean(-1)``): a number per item.

    At infinite width it is :math:`\sum_k r_k E[e_k]` over the blocks of ``value`` at that item, not a
    random coordinate; a vector of G-vars averages to 0.
    """

    value: Value


@dataclass(frozen=True)
class Block:
    """``width`` coordinates of a vector, all given by one expression."""

    width: int
    expr: Expr


@dataclass(frozen=True, eq=False)
class Value:
    """A vector of the network: consecutive blocks of coordinates.

    Compared by identity: atoms of the same weight rows applied to the same traced vector are the
    same atom, and hashing stays cheap however deep the program (a loop unrolled over time).
    """

    blocks: tuple[Block, ...]

    @property
    def width(self) -> int:
        return sum(b.width for b in self.blocks)

    def boundaries(self) -> tuple[int, ...]:
        edges, at = [0], 0
        for block in self.blocks:
            at += block.width
            edges.append(at)
        return tuple(edges)

    def piece(self, start: int, stop: int) -> Expr:
        """The expression of coordinates ``[start, stop)``, which must lie inside one block."""
        at = 0
        for block in self.blocks:
            if at <= start and stop <= at + block.width:
                return restrict(block.expr, start - at, stop - at)
            at += block.width
        raise ValueError(f"coordinates [{start}, {stop}) cross a block boundary")

    def slice(self, start: int, stop: int) -> Value:
        """Coordinates ``[start, stop)`` as a value (split where they cross blocks)."""
        edges = self.boundaries()
        cuts = sorted({start, stop, *(e for e in edges if start < e < stop)})
        return Value(tuple(Block(b - a, self.piece(a, b)) for a, b in zip(cuts, cuts[1:]) if b > a))


@dataclass(frozen=True, eq=False)
class Steps:
    """A sequence of vectors, one :class:`Value` per time step (a traced ``(N, T, width)`` tensor)."""

    steps: tuple[Value, ...]


def aligned_pieces(first: Value, second: Value) -> list[tuple[float, Expr, Expr]]:
    """``(fraction of the width, expression in first, expression in second)`` over common blocks."""
    if first.width != second.width:
        raise ValueError(f"vectors of widths {first.width} and {second.width}")
    cuts = sorted(set(first.boundaries()) | set(second.boundaries()))
    return [((b - a) / first.width, first.piece(a, b), second.piece(a, b)) for a, b in zip(cuts, cuts[1:]) if b > a]


@dataclass(frozen=True)
class Program:
    """A traced network: its output G-var and the weights it uses (in order of first use).

    :param output: the network output, a G-var (a readout layer's output).
    :param weights: every weight and bias, with the variances of their initialisation.
    :param input_width: features of the network input (of one step, for sequences).
    :param steps: time steps of a sequence input (``None``: feature vectors).
    :param grid: ``(H, W)`` of an image input of ``input_width`` channels (``None``: no image).
    """

    output: GVar
    weights: tuple[Weight, ...]
    input_width: int
    steps: int | None = None
    grid: tuple[int, ...] | None = None

    @property
    def positions(self) -> tuple[int, ...]:
        """The positions of an input item: ``(T,)``, ``(H, W)``, or ``()`` for feature vectors."""
        if self.steps is not None:
            return (self.steps,)
        return tuple(self.grid) if self.grid is not None else ()
