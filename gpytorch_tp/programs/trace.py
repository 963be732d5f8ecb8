"""From a ``torch.nn.Module`` to a :class:`~gpytorch_tp.programs.program.Program`: tracing by running it.

The module runs once on a small example batch under a ``TorchFunctionMode`` that sees every torch
call at the level the user wrote it (``F.linear``, ``torch.sigmoid``, ``h * g``, ``torch.cat``,
``h[:, :n]``), so Python loops are unrolled and shape code (``x.new_zeros(x.shape[0], n)``) simply
runs.  Each tensor computed from the input gets a :class:`~gpytorch_tp.programs.program.Value`;
weights are recognised by the identity of their parameters, so a layer called twice is one weight
used twice (weight sharing).  What the master theorem does not cover raises
:class:`~gpytorch_tp.errors.UnsupportedModuleError` naming the operation.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModuleError
from .program import (
    PRODUCT_NAMES,
    Apply,
    Bias,
    Block,
    GVar,
    InputFeatures,
    MatMul,
    Program,
    SoftmaxEntry,
    Steps,
    Sum,
    UnitParameter,
    Value,
    Weight,
    WidthMean,
    is_item_scalar,
    scalar_product,
)

__all__ = [
    "ELEMENTWISE_FUNCTIONS",
    "NotFeatureVectorsError",
    "OutsideTheTheoremError",
    "UnknownOperationError",
    "trace_program",
]


class NotFeatureVectorsError(UnsupportedModuleError):
    """The network computes on tensors other than feature vectors ``(N, width)`` (grids, sequences)."""


class UnknownOperationError(UnsupportedModuleError):
    """An operation the compiler does not know (the layer vocabulary's refusal usually says more)."""


class OutsideTheTheoremError(UnsupportedModuleError):
    """Every operation was understood, but the program is not one the master theorem covers as written."""

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
_ADD = frozenset({"add", "__add__", "__radd__", "__iadd__"})
_SUB = frozenset({"sub", "subtract", "__sub__", "__isub__"})
_RSUB = frozenset({"rsub", "__rsub__"})
_MUL = PRODUCT_NAMES
_DIV = frozenset({"div", "divide", "true_divide", "__truediv__", "__itruediv__"})
_NEG = frozenset({"neg", "negative", "__neg__"})
# Calls that change nothing a kernel sees (layout, dtype, copies).
_SAME_VALUE = frozenset({"contiguous", "clone", "float", "double", "half", "to", "type", "detach", "__get__"})
# Calls that turn a traced tensor into Python values: data-dependent control flow.
_DATA_DEPENDENT = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy"})
# New tensors shaped like a traced one: constants, whatever the input (x.new_zeros(N, n)).
_CONSTANTS_LIKE = frozenset(
    {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like", "full_like",
     "empty_like"}
)
# Calls that read shapes and the like: they run untraced.
_UNTRACED = frozenset({"size", "dim", "numel", "__len__", "is_floating_point", "is_complex", "__format__"})


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


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


class _Tracer(TorchFunctionMode):
    def __init__(self, parameters: dict[int, tuple[str, nn.Parameter]], input_tensor: Tensor):
        super().__init__()
        self.parameters = parameters
        self.values: dict[int, Value] = {}
        self.alive: list[Tensor] = []  # keeps traced tensors alive so that their ids stay unique
        #: transposes of weight parameters (``W.T``, ``W.t()``), by the transpose's id
        self.transposed: dict[int, Tensor] = {}
        self.weights: dict[str, Weight] = {}
        #: biases added to a layer of finite fan-in (the network input): name -> fan-in
        self.finite_fan_in: dict[str, int] = {}
        d = input_tensor.shape[-1]
        self.flat_input = Value((Block(d, InputFeatures(d)),))
        self.track(input_tensor, self.flat_input)
        #: ``(T, d)`` of a sequence input, flattened time-major in the input's last axis
        self.sequence: tuple[int, int] | None = None

    def track(self, tensor: Tensor, value: Value) -> None:
        self.values[id(tensor)] = value
        self.alive.append(tensor)

    def value(self, obj: Any) -> Value | Steps | PerItem | None:
        return self.values.get(id(obj)) if isinstance(obj, Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = _name(func)
        if args and id(args[0]) in self.parameters and _is_transpose(name, args[0], result):
            self.transposed[id(result)] = args[0]  # x @ W.T is a dense layer with the weight W
            self.alive.append(result)
        traced = [a for a in _flat(args) + _flat(list(kwargs.values())) if self.value(a) is not None]
        # A dense layer of a zero state (h = x.new_zeros(N, n) before the first step) is its bias.
        zero_state = name == "linear" and any(id(a) in self.parameters for a in _flat(args))
        if (not traced and not zero_state) or name in _UNTRACED or name in _CONSTANTS_LIKE:
            return result
        if name in _DATA_DEPENDENT:
            raise OutsideTheTheoremError(
                f"{name} of a traced tensor",
                "control flow or values that depend on the data change with the input; the kernel of such a "
                "network is not the master theorem's",
            )
        if not any(isinstance(r, Tensor) for r in _flat([result])):
            return result  # shapes and the like (x.shape, x.size(0)): the same for every input
        if name in _SAME_VALUE and isinstance(result, Tensor):
            if name == "__get__" and isinstance(self.value(args[0]), Steps):
                _transpose(self, func, name, args, kwargs, result)  # k.mT
                return result
            if name == "__get__" and result.shape != args[0].shape:
                raise OutsideTheTheoremError(
                    "a transpose (x.T) of traced features",
                    "products across the items of a batch (attention on (N, width) features) are not compiled",
                )
            self.track(result, self.value(args[0]))
            return result
        handler = _HANDLERS.get(name)
        if handler is None and name in ELEMENTWISE_FUNCTIONS:
            handler = _elementwise
        if handler is None:
            raise UnknownOperationError(
                f"the operation {name!r}",
                "the tensor-program compiler knows dense layers, coordinatewise functions, sums, products, "
                "concatenations and slices of the feature axis",
            )
        handler(self, func, name, args, kwargs, result)
        return result

    # -- weights --------------------------------------------------------------------------------

    def weight(self, tensor: Any, what: str, bias: bool = False, unit: bool = False) -> Weight:
        found = self.parameters.get(id(tensor))
        if found is None:
            raise UnsupportedModuleError(
                what, "its weight is not a parameter of the module (weights are recognised as parameters)"
            )
        name, parameter = found
        fan_in = 0 if bias or unit else parameter.shape[-1]
        weight = self.weights.setdefault(name, Weight(name, fan_in, bias or unit, unit))
        if weight.unit != unit:
            raise OutsideTheTheoremError(
                f"the parameter {name!r} used both as a weight and as a per-unit gain or shift",
                "a parameter is either random (a weight) or a per-unit constant at initialisation",
            )
        return weight

    def unit_constant(self, tensor: Tensor, what: str, width: int) -> float:
        """The value of a per-unit parameter (a LayerNorm gain or bias) that starts the same in every unit."""
        if tensor.dim() != 1 or tensor.shape[0] != width:
            raise UnsupportedModuleError(
                what, f"per-unit parameters of shape ({width},) only, got {tuple(tensor.shape)}"
            )
        first = float(tensor.reshape(-1)[0])
        if not bool((tensor == first).all()):
            raise OutsideTheTheoremError(
                what,
                "it differs from unit to unit at initialisation: the units of a layer are no longer exchangeable "
                "(a trained LayerNorm's gain is a finite-width network's, not an infinite one's)",
            )
        return first


def _is_transpose(name: str, parameter: Tensor, result: Any) -> bool:
    return (
        name in ("t", "transpose", "__get__", "permute")
        and isinstance(result, Tensor)
        and result.dim() == 2
        and parameter.dim() == 2
        and tuple(result.shape) == tuple(parameter.shape)[::-1]
    )


def _flat(items) -> list:
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flat(item))
        else:
            out.append(item)
    return out


def _check_features(tracer: _Tracer, tensor: Tensor, what: str) -> Value:
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


def _linear(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    bound = _bind(args, kwargs, ("input", "weight", "bias"))
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
            steps.append(_linear_value(tracer, step, weight, bound.get("bias"), result.shape[-1]))
        tracer.track(result, Steps(tuple(steps)))
        return
    value = _check_features(tracer, bound["input"], "F.linear")
    _add_linear(tracer, value, weight, bound.get("bias"), result)


def _add_linear(tracer: _Tracer, value: Value, weight: Weight, bias_tensor, result: Tensor) -> None:
    tracer.track(result, _linear_value(tracer, value, weight, bias_tensor, result.shape[-1]))


def _linear_value(tracer: _Tracer, value: Value, weight: Weight, bias_tensor, out: int) -> Value:
    terms: list = [(MatMul(weight, (0, out), value), 1.0)]
    if bias_tensor is not None:
        bias = tracer.weight(bias_tensor, "the bias of F.linear", bias=True)
        terms.append((Bias(bias, (0, out)), 1.0))
        if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
            tracer.finite_fan_in[bias.name] = value.width
    return Value((Block(out, GVar(tuple(terms))),))


def _matmul(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    left, right = args[0], args[1]
    if name == "__rmatmul__":
        left, right = right, left
    if _token_products(tracer, left, right, result):
        return
    value = _check_features(tracer, left, "a matrix product")
    if tracer.value(right) is not None:
        raise OutsideTheTheoremError(
            "a matrix product of two traced tensors",
            "token mixing (attention) is not compiled yet; products of features with a weight are",
        )
    found = tracer.parameters.get(id(right))
    transposed = tracer.transposed.get(id(right))
    if transposed is not None:
        # x @ W.T: the weight W (out, in) applied as a linear layer.
        weight = tracer.weight(transposed, "a matrix product")
    elif found is not None:
        raise UnsupportedModuleError(
            "x @ W with a parameter W of shape (in, out)",
            "write F.linear(x, W) or x @ W.T with W of shape (out, in), so that the fan-in is W's last axis",
        )
    else:
        raise UnsupportedModuleError("a matrix product", "its right factor is not a parameter of the module")
    _add_linear(tracer, value, weight, None, result)


@dataclass(frozen=True, eq=False)
class _TokensTransposed:
    """A sequence with its token and feature axes swapped, ``k.transpose(-1, -2)``: the right factor of logits."""

    steps: Steps


def _transpose(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    source = tracer.value(args[0])
    n, t, w = args[0].shape if args[0].dim() == 3 else (None, None, None)
    if isinstance(source, Steps) and result.dim() == 3 and tuple(result.shape) == (n, w, t):
        tracer.track(result, _TokensTransposed(source))
        return
    raise OutsideTheTheoremError(
        f"the transpose {name} of a traced tensor of shape {tuple(args[0].shape)} to {tuple(result.shape)}",
        "the token and feature axes of a sequence may be swapped (k.transpose(-1, -2) for attention logits); "
        "products across the items of a batch are not covered",
    )


def _token_products(tracer: _Tracer, left: Any, right: Any, result: Tensor) -> bool:
    """Attention: logits ``q @ k.transpose(-1, -2)`` (numbers per item, a sum over the width) and ``A @ v``."""
    first, second = tracer.value(left), tracer.value(right)
    if isinstance(first, Steps) and isinstance(second, _TokensTransposed):
        queries, keys = first.steps, second.steps.steps
        if any(isinstance(b.expr, InputFeatures) for v in (*queries, *keys) for b in v.blocks):
            raise UnsupportedModuleError("logits of the network input", "apply a dense layer to the tokens first")
        logits = np.empty((len(queries), len(keys)), dtype=object)
        for t, q in enumerate(queries):
            for s, k in enumerate(keys):
                product = _elementwise_value(tracer, torch.mul, "mul", (None, None), {}, (1, q.width), [q, k])
                logits[t, s] = _width_mean_expr(product)
        tracer.track(result, PerItem(logits, queries[0].width))
        return True
    if isinstance(first, PerItem) and isinstance(second, Steps):
        weights, values = first, second.steps
        if weights.summed_width:
            raise _summed_error("a token mixing A @ v", weights)
        if weights.exprs.shape != (result.shape[1], len(values)):
            raise NotFeatureVectorsError(
                f"A @ v with A of shape {weights.exprs.shape} and {len(values)} tokens", "(T, T') @ (T', width)"
            )
        if any(isinstance(b.expr, InputFeatures) for v in values for b in v.blocks):
            raise UnsupportedModuleError("a token mixing of the network input", "apply a dense layer first")
        cuts = sorted(set().union(*(v.boundaries() for v in values)))
        steps = []
        for t in range(weights.exprs.shape[0]):
            blocks = []
            for a, b in zip(cuts, cuts[1:]):
                terms = tuple((weights.exprs[t, s], v.piece(a, b)) for s, v in enumerate(values))
                blocks.append(Block(b - a, _linear_sum(terms)))
            steps.append(Value(tuple(blocks)))
        tracer.track(result, Steps(tuple(steps)))
        return True
    if isinstance(first, (Steps, PerItem, _TokensTransposed)) or isinstance(second, (Steps, PerItem, _TokensTransposed)):
        raise OutsideTheTheoremError(
            "a matrix product of sequences",
            "attention logits q @ k.transpose(-1, -2) (divided by the width) and token mixing A @ v are compiled",
        )
    return False


def _softmax(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    """The softmax of logits over the keys: each weight a function of its row of numbers per item."""
    bound = _bind(args, kwargs, ("input", "dim"))
    source = tracer.value(bound["input"])
    dim = bound.get("dim")
    if not isinstance(source, PerItem) or source.exprs.ndim == 0 or dim not in (-1, source.exprs.ndim):
        raise OutsideTheTheoremError(
            f"the operation 'softmax' over dim {dim} of a tensor of shape {tuple(bound['input'].shape)}",
            "a softmax over the keys of attention logits (numbers per item, dim=-1) is compiled; over the features "
            "it is not coordinatewise",
        )
    if source.summed_width:
        raise _summed_error("softmax", source)
    weights = np.empty(source.exprs.shape, dtype=object)
    for index in np.ndindex(source.exprs.shape[:-1]):
        row = tuple(source.exprs[index])
        for s, logit in enumerate(row):
            masked = isinstance(logit, float) and logit == float("-inf")
            weights[(*index, s)] = 0.0 if masked else Apply(SoftmaxEntry(s), row)
    tracer.track(result, PerItem(weights))


def _masked_fill(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    bound = _bind(args, kwargs, ("input", "mask", "value"))
    source = tracer.value(bound["input"])
    mask = bound["mask"]
    if not isinstance(source, PerItem) or tracer.value(mask) is not None:
        raise OutsideTheTheoremError(
            f"{name} of a tensor of shape {tuple(bound['input'].shape)}",
            "masks of attention logits (numbers per item) by constant masks are compiled",
        )
    if source.summed_width:
        raise _summed_error(name, source)
    entries = _constant_entries(mask, source.exprs.shape, name)
    fill = float(bound["value"])
    filled = np.empty(source.exprs.shape, dtype=object)
    for index in np.ndindex(source.exprs.shape):
        filled[index] = fill if entries[index] else source.exprs[index]
    tracer.track(result, PerItem(filled))


@dataclass(frozen=True, eq=False)
class _LayerStates:
    """``h_n`` of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: the last state of every layer, ``(layers, N, hidden)``."""

    layers: tuple[Value, ...]


def _recurrent_module(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (their ``torch._VF`` calls), unrolled into the program step by step.

    The cells' equations as PyTorch writes them, gate by gate from row blocks of the stacked weights (rows of
    one matrix that do not overlap are independent weights): the same program as the loop written by hand.
    """
    fields = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional",
              "batch_first")
    bound = _bind(args, kwargs, fields)
    source = tracer.value(bound["input"])
    what = f"the recurrent module ({name})"
    if not isinstance(source, Steps):
        raise NotFeatureVectorsError(what, "its input must be a traced sequence (N, T, d), batch first")
    if not bound["batch_first"]:
        raise UnsupportedModuleError(what, "batch_first=False; use batch_first=True (the package's layout)")
    if bound["bidirectional"]:
        raise UnsupportedModuleError(what, "bidirectional modules are not compiled yet")
    if bound["dropout"] and bound["train"]:
        raise UnsupportedModuleError(what, "dropout while training")
    states = bound["hx"] if isinstance(bound["hx"], (tuple, list)) else (bound["hx"],)
    for state in states:
        if tracer.value(state) is not None or not bool((state == 0).all()):
            raise UnsupportedModuleError(what, "initial states other than zeros are not compiled yet")
    per_layer = 4 if bound["has_biases"] else 2
    params = list(bound["params"])
    cell = {"rnn_tanh": torch.tanh, "rnn_relu": torch.relu}.get(name)
    inputs = list(source.steps)
    last_h, last_c = [], []
    for layer in range(int(bound["num_layers"])):
        chunk = params[layer * per_layer : (layer + 1) * per_layer]
        w_ih, w_hh = chunk[0], chunk[1]
        b_ih, b_hh = (chunk[2], chunk[3]) if bound["has_biases"] else (None, None)
        hidden = w_hh.shape[-1]
        weights = [tracer.weight(w_ih, what), tracer.weight(w_hh, what)]
        biases = [None if b is None else tracer.weight(b, what, bias=True) for b in (b_ih, b_hh)]
        if layer == 0 and any(isinstance(b.expr, InputFeatures) for b in inputs[0].blocks):
            tracer.finite_fan_in[weights[0].name] = inputs[0].width  # the network input: finite fan-in

        def gate(x: Value, h: Value | None, k: int, recurrent: bool) -> GVar:
            rows = (k * hidden, (k + 1) * hidden)
            matrix, bias, value = (weights[1], biases[1], h) if recurrent else (weights[0], biases[0], x)
            terms = [] if value is None else [(MatMul(matrix, rows, value), 1.0)]
            if bias is not None:
                terms.append((Bias(bias, rows), 1.0))
            return GVar(tuple(terms))

        h = c = None
        outputs = []
        for x in inputs:
            if cell is not None:  # Elman: h = f(W_ih x + b_ih + W_hh h + b_hh)
                new = _combine(cell, cell.__name__, [gate(x, h, 0, False).plus(gate(x, h, 0, True))], ())
            elif name == "gru":
                r = Apply(torch.sigmoid, (gate(x, h, 0, False).plus(gate(x, h, 0, True)),))
                z = Apply(torch.sigmoid, (gate(x, h, 1, False).plus(gate(x, h, 1, True)),))
                candidate = _linear_sum(((1.0, gate(x, h, 2, False)), (1.0, _product(r, gate(x, h, 2, True)))))
                n = Apply(torch.tanh, (candidate,))
                keep = _product(z, h.blocks[0].expr) if h is not None else None
                new = _linear_sum(((1.0, n), (-1.0, _product(z, n))) + (((1.0, keep),) if keep is not None else ()))
            elif name == "lstm":
                i, f, g, o = (gate(x, h, k, False).plus(gate(x, h, k, True)) for k in range(4))
                i, f, o = (Apply(torch.sigmoid, (v,)) for v in (i, f, o))
                update = _product(i, Apply(torch.tanh, (g,)))
                c_expr = update if c is None else _linear_sum(((1.0, _product(f, c.blocks[0].expr)), (1.0, update)))
                c = Value((Block(hidden, c_expr),))
                new = _product(o, Apply(torch.tanh, (c_expr,)))
            else:
                raise UnknownOperationError(f"the operation {name!r}", "nn.RNN, nn.GRU and nn.LSTM are compiled")
            h = Value((Block(hidden, new),))
            outputs.append(h)
        inputs = outputs
        last_h.append(h)
        last_c.append(c)
    tracer.track(result[0], Steps(tuple(inputs)))
    tracer.track(result[1], _LayerStates(tuple(last_h)))
    if name == "lstm":
        tracer.track(result[2], _LayerStates(tuple(last_c)))


def _product(a: Any, b: Any) -> Apply:
    return Apply(torch.mul, (a, b))


def _cat(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    bound = _bind(args, kwargs, ("tensors", "dim"))
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


def _getitem(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    source = tracer.value(args[0])
    if isinstance(source, Steps):
        _index_steps(tracer, source, index, result)
        return
    if isinstance(source, _LayerStates):
        if len(index) != 1 or not isinstance(index[0], int):
            raise UnsupportedModuleError(f"the index {args[1]!r} of a recurrent module's last states", "h_n[layer]")
        tracer.track(result, source.layers[index[0]])
        return
    value = _check_features(tracer, args[0], "indexing")
    if index and index[0] is Ellipsis:
        index = (slice(None),) + index[1:]
    if len(index) == 1 and index[0] == slice(None):
        tracer.track(result, value)
        return
    if len(index) != 2 or index[0] != slice(None) or not isinstance(index[1], slice) or result.dim() != 2:
        raise UnsupportedModuleError(
            f"the index {args[1]!r}", "only slices of the feature axis (x[:, a:b]) are compiled"
        )
    start, stop, step = index[1].indices(value.width)
    if step != 1:
        raise UnsupportedModuleError(f"the slice {index[1]!r}", "steps other than 1")
    _slice(tracer, value, start, stop, result)


def _index_steps(tracer: _Tracer, source: Steps, index: tuple, result: Tensor) -> None:
    """``x[:, t]``, ``x[:, t, :]``, ``x[:, a:b]`` of a sequence ``(N, T, width)``."""
    rest = index[2:]
    if index[:1] != (slice(None),) or len(index) < 2 or any(i != slice(None) for i in rest):
        raise UnsupportedModuleError(f"the index {index!r} of a sequence", "x[:, t] and x[:, a:b] (steps) only")
    if isinstance(index[1], int):
        tracer.track(result, source.steps[index[1]])  # out of range: the network's own IndexError came first
        return
    if isinstance(index[1], slice):
        tracer.track(result, Steps(tuple(source.steps[index[1]])))
        return
    raise UnsupportedModuleError(f"the index {index[1]!r} of the time axis", "integers and slices only")


def _stack(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    bound = _bind(args, kwargs, ("tensors", "dim"))
    if bound.get("dim", 0) not in (1, -2) or result.dim() != 3:
        raise NotFeatureVectorsError(f"torch.stack along dim {bound.get('dim', 0)}", "steps along dim 1 only")
    values = [tracer.value(t) for t in bound["tensors"]]
    if any(not isinstance(v, Value) for v in values):
        raise UnsupportedModuleError("torch.stack of constants or sequences", "every step must be a traced vector")
    tracer.track(result, Steps(tuple(values)))


def _unbind(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    source = tracer.value(args[0])
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if not isinstance(source, Steps) or dim not in (1, -2):
        raise NotFeatureVectorsError(f"{name} along dim {dim}", "the steps of a sequence (dim 1) only")
    for tensor, step in zip(result, source.steps):
        tracer.track(tensor, step)


def _reduce(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    """``h.mean(-1)`` / ``h.sum(-1)`` of feature vectors (numbers per item), ``h.mean(1)`` of a sequence."""
    source = tracer.value(args[0])
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    if isinstance(source, Value) and args[0].dim() == 2 and dim in (-1, 1):
        tracer.track(result, _width_average(source, name, tuple(result.shape[1:])))
        return
    if isinstance(source, Steps) and args[0].dim() == 3 and dim in (-1, 2):
        # Each token's own average: numbers per item of shape (T, 1) (keepdim) or (T,).
        per_step = [_width_average(step, name, ()) for step in source.steps]
        exprs = np.empty(tuple(result.shape[1:]), dtype=object)
        for t, average in enumerate(per_step):
            exprs[t] = average.exprs[()]
        tracer.track(result, PerItem(exprs, per_step[0].summed_width))
        return
    if not isinstance(source, Steps) or dim not in (1, -2) or kwargs.get("keepdim", False):
        raise UnknownOperationError(
            f"the operation {name!r} over dim {dim} of a tensor of shape {tuple(args[0].shape)}",
            "averages over the width of feature vectors and over the time steps of sequences are compiled; over "
            "the batch, or all axes at once, they are not",
        )
    _reduce_steps(tracer, source, name, result)


def _width_average(value: Value, name: str, shape: tuple[int, ...]) -> PerItem:
    if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
        raise UnsupportedModuleError(
            f"the {name} of the network input's features", "the raw input is finite: apply a dense layer to it first"
        )
    return PerItem.of(_width_mean_expr(value), shape, value.width if name == "sum" else 0)


def _width_mean_expr(value: Value) -> Any:
    """The per-item average of ``value``: 0 for G-vars (centred), else a :class:`WidthMean`."""
    if all(isinstance(b.expr, GVar) for b in value.blocks):
        return 0.0
    return WidthMean(value)


def _reduce_steps(tracer: _Tracer, source: Steps, name: str, result: Tensor) -> None:
    """``h.mean(1)`` / ``h.sum(1)`` of a sequence: a sum of the steps' vectors (moments by bilinearity)."""
    weight = 1.0 / len(source.steps) if name == "mean" else 1.0
    cuts = sorted(set().union(*(v.boundaries() for v in source.steps)))
    blocks = []
    for a, b in zip(cuts, cuts[1:]):
        terms = tuple((weight, step.piece(a, b)) for step in source.steps)
        blocks.append(Block(b - a, _linear_sum(terms)))
    tracer.track(result, Value(tuple(blocks)))


def _linear_sum(terms: tuple) -> Any:
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


def _slice(tracer: _Tracer, value: Value, start: int, stop: int, result: Tensor) -> None:
    if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
        raise UnsupportedModuleError("a slice of the network input", "the input's features are finite")
    tracer.track(result, value.slice(start, stop))


def _split(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    value = _check_features(tracer, args[0], f"{name}")
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    if dim not in (-1, 1):
        raise UnsupportedModuleError(f"{name} along dim {dim}", "only the feature axis")
    at = 0
    for part in result:
        _slice(tracer, value, at, at + part.shape[-1], part)
        at += part.shape[-1]


def _reshape(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    source = tracer.value(args[0])
    if (
        tracer.sequence is not None
        and isinstance(source, Value)
        and source.blocks == tracer.flat_input.blocks
        and tuple(result.shape[1:]) == tracer.sequence
    ):
        steps, d = tracer.sequence
        tracer.track(result, Steps(tuple(Value((Block(d, InputFeatures(d, t)),)) for t in range(steps))))
        return
    if result.shape != args[0].shape:
        raise NotFeatureVectorsError(
            f"{name} to shape {tuple(result.shape)}", "the compiler traces feature vectors (N, width) so far"
        )
    tracer.track(result, tracer.value(args[0]))


def _random(expr: Any) -> bool:
    return isinstance(expr, (GVar, Apply, Sum)) and not is_item_scalar(expr)


def _summed_error(name: str, per_item: PerItem) -> OutsideTheTheoremError:
    return OutsideTheTheoremError(
        f"{name} of a sum over the width ({per_item.summed_width} features) that is not divided by the width",
        "a sum of n features grows with n and has no infinite-width limit; divide it by the width "
        "(v.sum(-1) / v.shape[-1], q @ k.transpose(-1, -2) / k.shape[-1]): logits scaled by 1/sqrt(width) are "
        "random at infinite width, not the master theorem's numbers",
    )


def _constant_entries(tensor: Tensor, shape: tuple[int, ...], name: str) -> np.ndarray:
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


def _per_item_operation(tracer: _Tracer, func, name, args, kwargs, result) -> PerItem:
    """A coordinatewise function of numbers per item (and constants) is a number per item, entry by entry."""
    arguments = list(args) + [v for _, v in sorted(kwargs.items())]
    traced = [tracer.value(a) for a in arguments]
    summed = [t for t in traced if isinstance(t, PerItem) and t.summed_width]
    numbers = [a for a, t in zip(arguments, traced) if t is None and isinstance(a, (int, float))]
    if summed:
        scaling = len(arguments) == 2 and len(summed) == 1 and len(numbers) == 1 and not kwargs
        if scaling and name in _MUL:
            factor = float(numbers[0])
        elif scaling and name in _DIV and tracer.value(args[0]) is summed[0]:
            factor = 1.0 / float(numbers[0])
        else:
            raise _summed_error(name, summed[0])
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
            return _constant_entries(arg, shape, name)
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


def _steps_elementwise(tracer: _Tracer, func, name, args, kwargs, result, traced: list) -> None:
    """A coordinatewise function of sequences ``(N, T, width)``: the same function at every step."""
    lengths = {len(t.steps) for t in traced if isinstance(t, Steps)}
    if len(lengths) != 1 or result.dim() != 3 or result.shape[1] != lengths.pop():
        raise NotFeatureVectorsError(
            f"{name} of sequences giving shape {tuple(result.shape)}", "sequences of one length (N, T, width)"
        )
    steps_count = result.shape[1]
    for t in traced:
        per_token = isinstance(t, PerItem) and t.exprs.shape in ((steps_count, 1), (steps_count,))
        if t is not None and not isinstance(t, Steps) and not per_token:
            raise UnsupportedModuleError(
                f"{name} of a sequence and a tensor of another shape",
                "coordinatewise functions of sequences with sequences and with numbers per token (T, 1)",
            )

    def at_step(traced_value, t: int):
        if isinstance(traced_value, Steps):
            return traced_value.steps[t]
        if isinstance(traced_value, PerItem):
            return PerItem(traced_value.exprs[t], traced_value.summed_width)
        return None

    steps = []
    for t in range(steps_count):
        per_step = [at_step(v, t) for v in traced]
        steps.append(_elementwise_value(tracer, func, name, args, kwargs, tuple(result[:, t].shape), per_step))
    tracer.track(result, Steps(tuple(steps)))


def _elementwise(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    arguments = list(args) + [v for _, v in sorted(kwargs.items())]
    traced = [tracer.value(a) for a in arguments]
    if all(t is None or isinstance(t, PerItem) for t in traced):
        tracer.track(result, _per_item_operation(tracer, func, name, args, kwargs, result))
        return
    if any(isinstance(t, Steps) for t in traced):
        _steps_elementwise(tracer, func, name, args, kwargs, result, traced)
        return
    tracer.track(result, _elementwise_value(tracer, func, name, args, kwargs, tuple(result.shape), traced))


def _elementwise_value(tracer: _Tracer, func, name, args, kwargs, shape: tuple[int, ...], traced: list) -> Value:
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
                raise _summed_error(name, value)
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
            f"{name} of tensors of shapes {[tuple(a.shape) for a in _flat(args) if isinstance(a, Tensor)]}",
            "coordinatewise functions of feature vectors of one width only",
        )
    for value in values:
        if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
            raise UnsupportedModuleError(
                f"{name} of the network input", "the raw input is finite: apply a dense layer to it first"
            )
    keywords = tuple(
        (k, op) for (k, _), op, t in zip(sorted(kwargs.items()), operands[len(args):], traced[len(args):])
        if k != "inplace" and not isinstance(t, Value)
    )
    positional = len(args)
    cuts = sorted(set().union(*(v.boundaries() for v in values)))
    blocks = []
    for a, b in zip(cuts, cuts[1:]):
        exprs = iter([v.piece(a, b) for v in values])
        pieces = [next(exprs) if isinstance(t, Value) else op for t, op in zip(traced, operands)]
        blocks.append(Block(b - a, _combine(func, name, pieces[:positional], keywords)))
    return Value(tuple(blocks))


def _unit_parameter_operation(tracer: _Tracer, name: str, arguments: list, traced: list, shape) -> Value | None:
    """``v * gain`` or ``v + shift`` with a per-unit parameter vector of the module (a hand-written LayerNorm's)."""
    if len(arguments) != 2 or name not in _MUL | _ADD:
        return None
    values = [t for t in traced if isinstance(t, Value)]
    parameters = [a for a, t in zip(arguments, traced) if t is None and id(a) in tracer.parameters]
    if len(values) != 1 or len(parameters) != 1 or parameters[0].dim() != 1 or len(shape) != 2:
        return None
    gain, shift = (parameters[0], None) if name in _MUL else (None, parameters[0])
    return _affine(tracer, values[0], gain, shift, f"{name} with the parameter vector")


def _combine(func: Callable, name: str, args: list, keywords: tuple) -> Any:
    """The expression of ``func(*args)``: a G-var when it is a linear map of G-vars, a :class:`Sum` when it
    is one of other expressions, else an H-var."""
    scalars = [a for a in args if not _random(a)]  # constants and numbers per item
    exprs = [a for a in args if _random(a)]
    if not keywords and len(args) <= 2:
        linear = _as_linear(name, args, scalars, exprs)
        if linear is not None:
            return _linear_sum(linear)
    return Apply(func, tuple(args), keywords)


def _as_linear(name: str, args: list, scalars: list, exprs: list) -> tuple | None:
    """``func(*args)`` as ``((c, e), ...)`` when it is a linear combination of its expressions, else None."""
    if name in _ADD and len(exprs) == 2:
        return ((1.0, exprs[0]), (1.0, exprs[1]))
    # A constant (or a number per item) added is the term ``c * 1``: moments by bilinearity, E[e * 1] = E[e].
    if name in _ADD and len(exprs) == 1 and len(scalars) == 1 and is_item_scalar(scalars[0]):
        return ((1.0, exprs[0]), (scalars[0], 1.0))
    if name in _SUB and len(exprs) == 2:
        return ((1.0, args[0]), (-1.0, args[1]))
    if name in _SUB and len(exprs) == 1 and len(args) == 2 and is_item_scalar(args[1]):
        return ((1.0, args[0]), (scalar_product(-1.0, args[1]), 1.0))
    if name in _RSUB and len(exprs) == 1 and len(args) == 2 and is_item_scalar(args[1]):
        return ((-1.0, args[0]), (args[1], 1.0))  # c - e
    if name in _MUL and len(exprs) == 1 and len(scalars) == 1 and is_item_scalar(scalars[0]):
        factor = scalars[0]
        return ((float(factor) if isinstance(factor, (int, float)) else factor, exprs[0]),)
    if name in _DIV and len(args) == 2 and exprs and args[0] is exprs[0] and is_item_scalar(args[1]):
        divisor = args[1]
        factor = 1.0 / float(divisor) if isinstance(divisor, (int, float)) else Apply(operator.truediv, (1.0, divisor))
        return ((factor, exprs[0]),)
    if name in _NEG and len(exprs) == 1 and len(args) == 1:
        return ((-1.0, exprs[0]),)
    return None


def _blockwise(value: Value, fn: Callable[[Any], Any]) -> Value:
    return Value(tuple(Block(b.width, fn(b.expr)) for b in value.blocks))


def _normalised(value: Value, eps: float, center: bool) -> Value:
    """``(v - mean(v)) / sqrt(mean((v - mean(v))^2) + eps)`` (without the mean: RMS normalisation)."""
    if any(isinstance(b.expr, InputFeatures) for b in value.blocks):
        raise UnsupportedModuleError("a normalisation of the network input", "the raw input's features are finite")
    if center:
        mean = _width_mean_expr(value)
        value = _blockwise(value, lambda e: _combine(torch.sub, "sub", [e, mean], ()))
    second = _width_mean_expr(_blockwise(value, lambda e: Apply(torch.square, (e,))))
    scale = Apply(torch.rsqrt, (Apply(operator.add, (second, float(eps))),))
    return _blockwise(value, lambda e: _combine(torch.mul, "mul", [e, scale], ()))


def _affine(tracer: _Tracer, value: Value, gain: Tensor | None, shift: Tensor | None, what: str) -> Value:
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
        blocks.append(Block(block.width, _linear_sum(((scale, block.expr), (1.0, GVar(tuple(atoms)))))))
    return Value(tuple(blocks))


def _layer_norm(tracer: _Tracer, func, name, args, kwargs, result) -> None:
    """``F.layer_norm`` / ``F.rms_norm`` over the feature axis (``nn.LayerNorm``, ``nn.RMSNorm``)."""
    fields = ("input", "normalized_shape", "weight", "bias", "eps") if name == "layer_norm" else (
        "input", "normalized_shape", "weight", "eps"
    )
    bound = _bind(args, kwargs, fields)
    source = tracer.value(bound["input"])
    # Every token of a sequence is normalised on its own, with the same gain and shift.
    values = source.steps if isinstance(source, Steps) else (_check_features(tracer, bound["input"], name),)
    if tuple(bound["normalized_shape"]) != (values[0].width,):
        raise UnsupportedModuleError(
            f"{name} over the shape {tuple(bound['normalized_shape'])}", "normalisation over the feature axis only"
        )
    eps = bound.get("eps")
    if eps is None:
        eps = 1e-5 if name == "layer_norm" else torch.finfo(result.dtype).eps
    outputs = []
    for value in values:
        normalised = _normalised(value, float(eps), center=name == "layer_norm")
        outputs.append(_affine(tracer, normalised, bound.get("weight"), bound.get("bias"), name))
    tracer.track(result, Steps(tuple(outputs)) if isinstance(source, Steps) else outputs[0])


def _bind(args, kwargs, names: tuple[str, ...]) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


_HANDLERS: dict[str, Callable] = {
    "linear": _linear,
    "matmul": _matmul,
    "__matmul__": _matmul,
    "__rmatmul__": _matmul,
    "mm": _matmul,
    "bmm": _matmul,
    "transpose": _transpose,
    "swapaxes": _transpose,
    "permute": _transpose,
    "softmax": _softmax,
    "rnn_tanh": _recurrent_module,
    "rnn_relu": _recurrent_module,
    "gru": _recurrent_module,
    "lstm": _recurrent_module,
    "masked_fill": _masked_fill,
    "cat": _cat,
    "concat": _cat,
    "concatenate": _cat,
    "hstack": _cat,
    "__getitem__": _getitem,
    "chunk": _split,
    "split": _split,
    "tensor_split": _split,
    "stack": _stack,
    "unbind": _unbind,
    "mean": _reduce,
    "sum": _reduce,
    "layer_norm": _layer_norm,
    "rms_norm": _layer_norm,
    "unflatten": _reshape,
    "view": _reshape,
    "reshape": _reshape,
    "view_as": _reshape,
    "reshape_as": _reshape,
    "flatten": _reshape,
    "squeeze": _reshape,
}


def trace_program(
    module: nn.Module, input_width: int, *, steps: int | None = None, example_size: int = 3
) -> tuple[Program, dict[str, Any]]:
    """The tensor program of ``module`` on inputs ``(N, input_width)``, and what the initialisation needs.

    :param steps: the inputs are sequences of ``steps`` steps of ``input_width`` features, flattened
        time-major, ``(N, steps * input_width)``, as the package's sequence kernels take them; ``forward``
        reshapes them (``x.view(N, T, d)``) and may loop over the steps (``x[:, t]``).
    :return: the program and, by parameter name, ``{"tensor": the parameter, "module": the module
        owning it, "finite_fan_in": the fan-in of a bias added to the network input (else None)}``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    width = int(input_width)
    if width < 1:
        raise ValueError(f"input_width must be positive, got {input_width}")
    if steps is not None and int(steps) < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    parameters = {id(p): (name, p) for name, p in module.named_parameters()}
    owners = {}
    for module_name, sub in module.named_modules():
        for attr, p in sub.named_parameters(recurse=False):
            owners.setdefault(id(p), sub)
    try:
        reference = next(module.parameters())
        dtype, device = reference.dtype, reference.device
    except StopIteration:
        dtype, device = torch.get_default_dtype(), torch.device("cpu")
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(example_size, width * (steps or 1), generator=generator, dtype=dtype).to(device)
    was_training = module.training
    module.eval()
    try:
        tracer = _Tracer(parameters, x)
        tracer.sequence = None if steps is None else (int(steps), width)
        with torch.no_grad(), tracer:
            out = module(x)
    finally:
        module.train(was_training)
    value = tracer.value(out) if isinstance(out, Tensor) else None
    if value is None or isinstance(value, Steps):
        raise UnsupportedModuleError(
            f"the network output ({type(out).__name__})", "the output must be one tensor computed from the input"
        )
    if out.dim() != 2:
        raise UnsupportedModuleError(f"an output of shape {tuple(out.shape)}", "outputs (N, out_features) only")
    kinds = {type(b.expr) for b in value.blocks}
    if kinds != {GVar} or len(value.blocks) != 1:
        raise OutsideTheTheoremError(
            "the network output",
            "it must end with a dense layer (a readout), whose outputs are Gaussian at infinite width; "
            "this one ends with a coordinatewise function or joins outputs of different kernels",
        )
    output = value.blocks[0].expr.restrict(0, 1)  # every coordinate of a readout has the same kernel
    weights = tuple(tracer.weights.values())
    by_name = {name: p for name, p in parameters.values()}
    info = {
        w.name: {
            "tensor": by_name[w.name],
            "module": owners.get(id(by_name[w.name])),
            "finite_fan_in": tracer.finite_fan_in.get(w.name),
        }
        for w in weights
    }
    if steps is not None and any(b.expr == InputFeatures(width * steps) for b in _sources(output)):
        raise NotFeatureVectorsError(
            "a dense layer on the flattened sequence", "reshape the input to (N, T, d) in forward and use its steps"
        )
    return Program(output, weights, width, None if steps is None else int(steps)), info


def _sources(output: GVar) -> list[Block]:
    """The blocks of every vector a matrix of the program is applied to (a walk down the program)."""
    seen, stack, blocks = set(), [output], []
    while stack:
        g = stack.pop()
        for atom, _ in g.terms:
            if isinstance(atom, MatMul) and id(atom.source) not in seen:
                seen.add(id(atom.source))
                for block in atom.source.blocks:
                    blocks.append(block)
                    stack.extend(_gvars(block.expr))
    return blocks


def _gvars(expr: Any) -> list[GVar]:
    if isinstance(expr, GVar):
        return [expr]
    if isinstance(expr, Apply):
        return [g for a in expr.args for g in _gvars(a)]
    if isinstance(expr, Sum):
        return [g for _, e in expr.terms for g in _gvars(e)]
    return []
