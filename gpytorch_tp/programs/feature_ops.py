"""Handlers of torch calls on feature vectors ``(N, width)``: dense layers, coordinatewise functions,
concatenations and slices, width averages and per-unit gains."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from ..errors import UnsupportedModuleError
from .expressions import ADD, DIV, MUL, combine, linear_sum, width_mean
from .program import (
    Apply,
    Bias,
    Block,
    GVar,
    InputFeatures,
    MatMul,
    Steps,
    UnitParameter,
    Value,
    Weight,
    scalar_product,
)
from .refusals import NotFeatureVectorsError, OutsideTheTheoremError
from .traced import PerItem, bind, check_features, constant_entries, flat, summed_error


def linear(tracer, func, name, args, kwargs, result) -> None:
    bound = bind(args, kwargs, ("input", "weight", "bias"))
    weight = tracer.weight(bound["weight"], "F.linear")
    source = tracer.value(bound["input"])
    if source is None:
        if not bool((bound["input"] == 0).all()):
            raise OutsideTheTheoremError("a dense layer of a constant input", "only a zero state is a constant")
        terms = ()
        if bound.get("bias") is not None:
            bias = tracer.weight(bound["bias"], "the bias of F.linear", bias=True)
            terms = ((Bias(bias, (0, result.shape[-1])), 1.0),)
        tracer.track(result, Value((Block(result.shape[-1], GVar(terms)),)))
        return
    if isinstance(source, Steps):
        # A dense layer on every step of a sequence: one weight shared by all steps.
        if result.dim() != 3 or len(source.steps) != result.shape[1]:
            raise NotFeatureVectorsError(f"F.linear giving shape {tuple(result.shape)}", "sequences (N, T, width)")
        steps = []
        for t, step in enumerate(source.steps):
            steps.append(linear_value(tracer, step, weight, bound.get("bias"), result.shape[-1]))
        tracer.track(result, Steps(tuple(steps)))
        return
    value = check_features(tracer, bound["input"], "F.linear")
    add_linear(tracer, value, weight, bound.get("bias"), result)


def add_linear(tracer, value: Value, weight: Weight, bias_tensor, result: Tensor) -> None:
    tracer.track(result, linear_value(tracer, value, weight, bias_tensor, result.shape[-1]))


def linear_value(tracer, value: Value, weight: Weight, bias_tensor, out: int) -> Value:
    terms: list = [(MatMul(weight, (0, out), value), 1.0)]
    if bias_tensor is not None:
        bias = tracer.weight(bias_tensor, "the bias of F.linear", bias=True)
        terms.append((Bias(bias, (0, out)), 1.0))
        if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
            tracer.finite_fan_in[bias.name] = value.width
    return Value((Block(out, GVar(tuple(terms))),))


def cat(tracer, func, name, args, kwargs, result) -> None:
    bound = bind(args, kwargs, ("tensors", "dim"))
    tensors, dim = bound["tensors"], bound.get("dim", 0)
    if result.dim() != 2 or dim not in (-1, 1):
        raise UnsupportedModuleError(
            f"torch.cat along dim {dim} of {result.dim()}-d tensors", "concatenation along the feature axis only"
        )
    blocks = []
    for tensor in tensors:
        value = tracer.value(tensor)
        if value is None:
            raise UnsupportedModuleError("torch.cat of a constant tensor", "every part must come from the input")
        blocks.extend(value.blocks)
    tracer.track(result, Value(tuple(blocks)))


def slice_value(tracer, value: Value, start: int, stop: int, result: Tensor) -> None:
    if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
        raise UnsupportedModuleError("a slice of the network input", "the input's features are finite")
    tracer.track(result, value.slice(start, stop))


def refuse_permuted(tracer, tensor: Tensor, what: str) -> None:
    if id(tensor) in tracer.permuted:
        raise UnsupportedModuleError(
            f"{what} of a flattened image", "its coordinates are compiled in another order than PyTorch's"
        )


def split(tracer, func, name, args, kwargs, result) -> None:
    value = check_features(tracer, args[0], f"{name}")
    refuse_permuted(tracer, args[0], name)
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    if dim not in (-1, 1):
        raise UnsupportedModuleError(f"{name} along dim {dim}", "only the feature axis")
    at = 0
    for part in result:
        slice_value(tracer, value, at, at + part.shape[-1], part)
        at += part.shape[-1]


def width_average(value: Value, name: str, shape: tuple[int, ...]) -> PerItem:
    if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
        raise UnsupportedModuleError(
            f"the {name} of the network input's features", "the raw input is finite: apply a dense layer to it first"
        )
    return PerItem.of(width_mean(value), shape, value.width if name == "sum" else 0)


def per_item_operation(tracer, func, name, args, kwargs, result) -> PerItem:
    """A coordinatewise function of numbers per item (and constants) is a number per item, entry by entry."""
    arguments = list(args) + [v for _, v in sorted(kwargs.items())]
    traced = [tracer.value(a) for a in arguments]
    summed = [t for t in traced if isinstance(t, PerItem) and t.summed_width]
    numbers = [a for a, t in zip(arguments, traced) if t is None and isinstance(a, (int, float))]
    if summed:
        scaling = len(arguments) == 2 and len(summed) == 1 and len(numbers) == 1 and not kwargs
        if scaling and name in MUL:
            factor = float(numbers[0])
        elif scaling and name in DIV and tracer.value(args[0]) is summed[0]:
            factor = 1.0 / float(numbers[0])
        else:
            raise summed_error(name, summed[0])
        width = summed[0].summed_width
        if abs(factor * width - 1.0) < 1e-9:
            return PerItem(summed[0].exprs)  # divided by the width: an average
        return summed[0].map(lambda e: scalar_product(e, factor), width)
    shape = tuple(result.shape[1:])

    def operand(arg) -> np.ndarray | Any:
        value = tracer.value(arg)
        if isinstance(value, PerItem):
            return np.broadcast_to(value.exprs, shape)
        if isinstance(arg, Tensor):
            return constant_entries(arg, shape, name)
        return arg

    positional = [operand(a) for a in args]
    keywords = [(k, operand(v)) for k, v in sorted(kwargs.items()) if k != "inplace"]
    exprs = np.empty(shape, dtype=object)
    for index in np.ndindex(shape):

        def entry(o):
            return o[index] if isinstance(o, np.ndarray) else o

        entries = tuple(entry(a) for a in positional)
        if name == "where" and len(entries) == 3 and isinstance(entries[0], bool):
            exprs[index] = entries[1] if entries[0] else entries[2]  # a constant mask picks one side
            continue
        exprs[index] = Apply(func, entries, tuple((k, entry(v)) for k, v in keywords))
    return PerItem(exprs)


def elementwise_value(tracer, func, name, args, kwargs, shape: tuple[int, ...], traced: list) -> Value:
    """The blocks of a coordinatewise function of feature vectors (``traced``: each argument's traced value)."""
    arguments = list(args) + [v for _, v in sorted(kwargs.items())]
    gained = _unit_parameter_operation(tracer, name, arguments, traced, shape)
    if gained is not None:
        return gained
    operands: list[Any] = []
    values: list[Value] = []
    for arg, value in zip(arguments, traced):
        if isinstance(value, PerItem):
            if value.summed_width:
                raise summed_error(name, value)
            arg = value.scalar(name)  # the same in every coordinate of the item
        elif value is not None:
            values.append(value)
        elif isinstance(arg, Tensor) and arg.numel() == 1:
            arg = float(arg)
        elif isinstance(arg, Tensor):
            if not bool((arg == 0).all()):
                raise OutsideTheTheoremError(
                    f"{name} with a constant tensor of shape {tuple(arg.shape)}",
                    "constants must be scalars (a constant vector makes features that are not centred)",
                )
            arg = 0.0
        operands.append(arg)
    if len(shape) != 2:
        raise NotFeatureVectorsError(
            f"{name} giving a tensor of shape {shape}",
            "the compiler traces feature vectors (N, width) and sequences (N, T, width) (images: the converter's "
            "layers)",
        )
    if any(v.width != shape[-1] for v in values):
        raise UnsupportedModuleError(
            f"{name} of tensors of shapes {[tuple(a.shape) for a in flat(args) if isinstance(a, Tensor)]}",
            "coordinatewise functions of feature vectors of one width only",
        )
    for value in values:
        if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
            raise UnsupportedModuleError(
                f"{name} of the network input", "the raw input is finite: apply a dense layer to it first"
            )
    keywords = tuple(
        (k, op)
        for (k, _), op, t in zip(sorted(kwargs.items()), operands[len(args) :], traced[len(args) :])
        if k != "inplace" and not isinstance(t, Value)
    )
    positional = len(args)
    cuts = sorted(set().union(*(v.boundaries() for v in values)))
    blocks = []
    for a, b in zip(cuts, cuts[1:]):
        exprs = iter([v.piece(a, b) for v in values])
        pieces = [next(exprs) if isinstance(t, Value) else op for t, op in zip(traced, operands)]
        blocks.append(Block(b - a, combine(func, name, pieces[:positional], keywords)))
    return Value(tuple(blocks))


def _unit_parameter_operation(tracer, name: str, arguments: list, traced: list, shape) -> Value | None:
    """``v * gain`` or ``v + shift`` with a per-unit parameter vector of the module (a hand-written LayerNorm's)."""
    if len(arguments) != 2 or name not in MUL | ADD:
        return None
    values = [t for t in traced if isinstance(t, Value)]
    parameters = [a for a, t in zip(arguments, traced) if t is None and id(a) in tracer.parameters]
    if len(values) != 1 or len(parameters) != 1 or parameters[0].dim() != 1 or len(shape) != 2:
        return None
    parameter, value = parameters[0], values[0]
    if name in ADD and parameter.shape == (value.width,) and not bool((parameter == parameter[0]).all()):
        # A bias written by hand (random at initialisation): a bias vector, a G-var like F.linear's.
        bias = tracer.weight(parameter, f"{name} with the parameter vector", bias=True)
        if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
            raise UnsupportedModuleError(f"{name} of the network input and a bias", "apply a dense layer first")
        blocks, at = [], 0
        for block in value.blocks:
            shifted = GVar(((Bias(bias, (at, at + block.width)), 1.0),))
            blocks.append(Block(block.width, linear_sum(((1.0, block.expr), (1.0, shifted)))))
            at += block.width
        return Value(tuple(blocks))
    gain, shift = (parameter, None) if name in MUL else (None, parameter)
    return affine(tracer, value, gain, shift, f"{name} with the parameter vector")


def affine(tracer, value: Value, gain: Tensor | None, shift: Tensor | None, what: str) -> Value:
    """``v * gain + shift`` with per-unit parameters that start the same in every unit.

    At initialisation they are constants; their perturbations are :class:`UnitParameter` atoms, which add
    :math:`E[v v'] + 1` to the NTK of what follows.
    """
    scale = 1.0 if gain is None else tracer.unit_constant(gain, f"the gain of {what}", value.width)
    if shift is not None and tracer.unit_constant(shift, f"the shift of {what}", value.width) != 0.0:
        raise OutsideTheTheoremError(
            f"the shift of {what}, which does not start at 0",
            "a constant vector makes features that are not centred",
        )
    gain_weight = None if gain is None else tracer.weight(gain, f"the gain of {what}", unit=True)
    shift_weight = None if shift is None else tracer.weight(shift, f"the shift of {what}", unit=True)
    blocks, at = [], 0
    for block in value.blocks:
        rows = (at, at + block.width)
        at += block.width
        atoms = []
        if gain_weight is not None:
            atoms.append((UnitParameter(gain_weight, rows, block.expr), 1.0))
        if shift_weight is not None:
            atoms.append((UnitParameter(shift_weight, rows, 1.0), 1.0))
        blocks.append(Block(block.width, linear_sum(((scale, block.expr), (1.0, GVar(tuple(atoms)))))))
    return Value(tuple(blocks))
