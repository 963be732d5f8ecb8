"""The graph walk: trace a module with ``torch.fx``, propagate an example input's shapes, and map
every node (a module, through its converter; a function or tensor method; a residual sum, a readout)
onto layers.  :func:`convert_network` is what the public functions of :mod:`gpytorch_tp.conversion.api` run.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModuleError
from ..evaluation import evaluate
from ..layers import GlobalAvgPool, LastStep, Layer, Residual, Sequential, TimeMean, torch_operations
from . import batchnorm_converter, recurrent_converters  # noqa: F401  (importing them registers their converters)
from .context import INITS, ConversionContext, Value
from .module_converters import flatten_layers
from .registry import CONVERTERS

__all__ = ["ConvertedNetwork", "architecture_summary", "convert_network"]

# Elementwise torch functions and tensor methods: target -> the layer class.
_FUNCTIONS, _METHODS, _ = torch_operations()
_ADD = (operator.add, operator.iadd, torch.add)


@dataclass
class ConvertedNetwork:
    """What :func:`convert_network` found: the architecture, the item shape, and the per-parameter NTK factors."""

    architecture: Sequential
    input_shape: tuple[int, ...]
    sequence: bool
    scales: dict[str, float]
    #: the module or operation each layer came from (``id(layer)`` -> description)
    origins: dict[int, str] = field(default_factory=dict)


def convert_network(
    module: nn.Module,
    input_shape: tuple[int, ...] | int | None,
    init: str,
    weight_variance: float | None,
    bias_variance: float | None,
    input_variance: float | None,
    sequence: bool | None,
    check: bool = True,
    batchnorm: bool = False,
) -> ConvertedNetwork:
    """Trace ``module``, propagate an example input's shapes and convert every node (arguments: :func:`from_module`'s).

    ``check``: evaluate the architecture once, so that a layer's refusal comes now;
    ``batchnorm``: accept ``nn.BatchNorm1d`` (as :class:`~gpytorch_tp.conversion.batchnorm_converter.BatchNormMarker`).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module needs a torch.nn.Module, got {type(module).__name__}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    for name, value in (
        ("weight_variance", weight_variance),
        ("bias_variance", bias_variance),
        ("input_variance", input_variance),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {value}")
    module = copy.deepcopy(module)  # the example run must not touch the user's module (BatchNorm statistics)
    try:
        graph = torch.fx.GraphModule(module, _Tracer().trace(module))
    except Exception as error:
        raise UnsupportedModuleError(
            f"{type(module).__name__} (tracing its forward with torch.fx failed: {error})",
            "from_module converts nn.Sequential and modules whose forward traces with torch.fx",
        ) from error
    input_shape = _input_shape(graph, input_shape)
    if sequence is None:
        sequence = len(input_shape) == 2 and any(isinstance(m, (nn.RNN, nn.GRU, nn.LSTM)) for m in graph.modules())
    parameter = next(module.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    example = torch.randn(2, *input_shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ShapeProp(graph).propagate(example)
    converter = _GraphConverter(graph, init, weight_variance, bias_variance, input_variance, batchnorm)
    layout = "sequence" if sequence else ("features" if len(input_shape) == 1 else "grid")
    architecture = Sequential(*converter.run(Value((), layout, True, tuple(example.shape))))
    if check:
        # Layers refuse what their recursion cannot express (a nonlinearity on the input, a residual sum
        # of correlated branches, ...): evaluate once so that the refusal comes now.
        dims = math.prod(input_shape)
        x = torch.randn(2, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        try:
            evaluate(
                architecture.double(),
                x,
                input_shape=input_shape if len(input_shape) > 1 else None,
                sequence=sequence,
            )
        except (ValueError, NotImplementedError, RuntimeError) as error:
            raise UnsupportedModuleError(
                f"{type(module).__name__} (as the architecture {architecture_summary(architecture)})", str(error)
            ) from error
    return ConvertedNetwork(
        architecture.to(torch.get_default_dtype()), input_shape, sequence, converter.scales, converter.origins
    )


class _Tracer(torch.fx.Tracer):
    """Keeps modules with a registered converter whole (also user-defined types)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in CONVERTERS or super().is_leaf_module(module, qualified_name)


def _input_shape(graph: torch.fx.GraphModule, input_shape) -> tuple[int, ...]:
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModuleError(
            f"a forward with {len(placeholders)} inputs", "from_module converts networks of one input tensor"
        )
    if input_shape is not None:
        shape = (input_shape,) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"input_shape must be positive sizes, got {input_shape}")
        return shape
    for user in placeholders[0].users:
        if user.op == "call_module" and isinstance(graph.get_submodule(user.target), nn.Linear):
            return (graph.get_submodule(user.target).in_features,)
    raise ValueError(
        "from_module needs input_shape (per item, without the batch axis: (d,), (C, H, W), or (T, d) for "
        "sequences) unless the network starts with nn.Linear"
    )


class _GraphConverter:
    def __init__(self, graph, init, weight_variance, bias_variance, input_variance, batchnorm=False):
        self.graph = graph
        self.options = {
            "init": init,
            "weight_variance": weight_variance,
            "bias_variance": bias_variance,
            "input_variance": input_variance,
            "batchnorm": batchnorm,
        }
        self.scales: dict[str, float] = {}
        self.called: dict[str, str] = {}
        #: ``id(layer)`` -> the module or operation it came from (for the BatchNorm path's messages)
        self.origins: dict[int, str] = {}

    def run(self, input_value: Value) -> tuple[Layer, ...]:
        values: dict[torch.fx.Node, Any] = {}
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                values[node] = input_value
            elif node.op == "output":
                out = values[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else None
                if not isinstance(out, Value) or out.layout not in ("features", "pooled"):
                    shape = getattr(out, "shape", None)
                    raise UnsupportedModuleError(
                        f"the network output (shape {shape}, {getattr(out, 'layout', type(out).__name__)})",
                        "the network must end with one tensor of features (N, m): add a readout (flatten, "
                        "pooling, last step or mean over time) and a Linear layer",
                    )
                return out.layers
            else:
                values[node] = self.convert_node(node, values)
        raise AssertionError("a traced graph has an output node")  # pragma: no cover

    def convert_node(self, node: torch.fx.Node, values: dict) -> Any:
        args = [values.get(a, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
        kwargs = {k: values.get(v, v) if isinstance(v, torch.fx.Node) else v for k, v in node.kwargs.items()}
        tensors = [a for a in args if isinstance(a, Value)]
        meta = node.meta.get("tensor_meta")
        out_shape = tuple(meta.shape) if hasattr(meta, "shape") else None
        if node.op == "get_attr":
            raise UnsupportedModuleError(
                f"the direct use of the parameter or buffer {node.target!r} in forward",
                "weights must belong to converted modules (nn.Linear, nn.Conv2d, ...)",
            )
        if any(t.layout == "cell_state" for t in tensors):
            raise UnsupportedModuleError(
                f"the use of an LSTM's cell state c_n ({node.name})", "only its hidden states: output or h_n[-1]"
            )
        shape_query = node.target in ("size", "dim") or (node.target is getattr and args[1:] in (["shape"], ["ndim"]))
        if not tensors or shape_query:
            return _Aux()  # sizes, shapes and other non-tensor helpers of shape operations
        if node.op == "call_module":
            return self.call_module(node, tensors, args, kwargs, out_shape)
        return self.call_function(node, tensors, args, kwargs, out_shape)

    def call_module(self, node, tensors, args, kwargs, out_shape) -> Value:
        module = self.graph.get_submodule(node.target)
        what = f"{type(module).__name__} {node.target!r}"
        converter = next((CONVERTERS[t] for t in type(module).__mro__ if t in CONVERTERS), None)
        if converter is None:
            raise UnsupportedModuleError(what)
        if hasattr(converter, "unsupported_reason"):
            raise UnsupportedModuleError(what, converter.unsupported_reason)
        if len(tensors) != 1 or len(args) != 1 or kwargs:
            raise UnsupportedModuleError(f"{what} called with {len(args) + len(kwargs)} arguments", "only one input")
        if any(True for _ in module.parameters()):
            if node.target in self.called:
                raise UnsupportedModuleError(
                    f"{what} called twice", "weights shared between layers are not a layer of these kernels"
                )
            self.called[node.target] = node.name
        (value,) = tensors
        context = ConversionContext(node.target, value, out_shape, scales=self.scales, **self.options)
        layers, layout = converter(module, context)
        self.origins.update((id(layer), what) for layer in layers)
        finite = value.finite and not any(layer.has_weights for layer in layers)
        info = {"module": module} if layout == "rnn" else {}
        return value.then(layers, layout, out_shape or value.shape, finite, **info)

    def call_function(self, node, tensors, args, kwargs, out_shape) -> Value:
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        what = f"the operation {name!r} ({node.name})"
        first = args[0] if args else None
        if target in _ADD or (node.op == "call_method" and target in ("add", "add_")):
            return self.add(what, args, kwargs)
        if target is operator.getitem:
            return self.getitem(what, first, args[1], out_shape)
        if not isinstance(first, Value):
            raise UnsupportedModuleError(what, "its first argument is not the network's tensor")
        if len(tensors) > 1:
            raise UnsupportedModuleError(what, "it combines tensors in a way other than a residual sum")
        elementwise = _FUNCTIONS.get(target) if node.op == "call_function" else _METHODS.get(target)
        if elementwise is not None:
            try:
                layer = elementwise.from_torch_call(args[1:], kwargs)
            except TypeError as error:
                raise UnsupportedModuleError(what, f"arguments {args[1:]}, {kwargs}") from error
            if layer is None:
                raise UnsupportedModuleError(what, f"arguments {args[1:]}, {kwargs}")
            self.origins[id(layer)] = what
            return first.then([layer], shape=out_shape)
        if node.op == "call_method" and target in ("contiguous", "clone"):
            return first
        if (target is torch.flatten or target in ("flatten", "view", "reshape")) and out_shape is not None:
            return self.flatten(what, first, out_shape)
        if node.op == "call_method" and target == "squeeze" and first.layout == "pooled":
            return first.then([], "features", out_shape)
        if target in (torch.mean, "mean"):
            return self.mean(what, first, args, kwargs, out_shape)
        raise UnsupportedModuleError(what)

    def add(self, what, args, kwargs) -> Value:
        if len(args) != 2 or kwargs or not all(isinstance(a, Value) for a in args):
            raise UnsupportedModuleError(what, "only the sum of two tensors of the network (a residual connection)")
        a, b = args
        if a.layout != b.layout or a.shape != b.shape or a.layout in ("rnn", "final", "lstm_state"):
            raise UnsupportedModuleError(what, f"the sum of tensors of shapes {a.shape} and {b.shape}")
        common = 0
        while common < min(len(a.layers), len(b.layers)) and a.layers[common] is b.layers[common]:
            common += 1
        tail_a, tail_b = a.layers[common:], b.layers[common:]
        if not tail_a and not tail_b:
            raise UnsupportedModuleError(what, "a tensor added to itself")
        if not tail_a:
            tail_a, tail_b = tail_b, tail_a
        skip = None if not tail_b else (tail_b[0] if len(tail_b) == 1 else Sequential(*tail_b))
        residual = Residual(*tail_a, skip=skip)
        self.origins[id(residual)] = f"{what}, a residual connection"
        return Value(a.layers[:common] + (residual,), a.layout, a.finite and b.finite, a.shape)

    def getitem(self, what, value, index, out_shape) -> Any:
        if isinstance(value, _Aux):
            return value
        if value.layout == "rnn":
            if index == 0:
                return value.then([], "sequence", out_shape)
            if index == 1:
                module = value.info["module"]
                layout = "lstm_state" if isinstance(module, nn.LSTM) else "final"
                return value.then([], layout, out_shape, module=module)
            raise UnsupportedModuleError(what, f"index {index} of an RNN's output")
        if value.layout == "lstm_state":
            if index == 0:
                return value.then([], "final", out_shape, module=value.info["module"])
            if index == 1:  # unpacked with h_n; an error only if used (see convert_node)
                return value.then([], "cell_state", out_shape)
            raise UnsupportedModuleError(what, f"index {index} of an LSTM's (h_n, c_n)")
        if value.layout == "final":
            module = value.info["module"]
            count = module.num_layers * (2 if module.bidirectional else 1)
            if module.bidirectional:
                raise UnsupportedModuleError(
                    what, "h_n of a bidirectional RNN (take output[:, -1] for both directions' last states)"
                )
            if index in (-1, count - 1):
                return value.then([LastStep()], "features", out_shape)
            raise UnsupportedModuleError(what, f"h_n[{index}] (only h_n[-1], the last layer's final state)")
        if value.layout == "sequence":
            steps = value.shape[1]
            index = index if isinstance(index, tuple) else (index,)
            full = slice(None)
            if len(index) in (2, 3) and index[0] == full and index[1] in (-1, steps - 1) and index[2:] in ((), (full,)):
                return value.then([LastStep()], "features", out_shape)
        raise UnsupportedModuleError(what, f"indexing {value.layout} features of shape {value.shape} with {index!r}")

    def flatten(self, what, value, out_shape) -> Value:
        if len(out_shape) != 2 or out_shape[0] != value.shape[0] or out_shape[1] != math.prod(value.shape[1:]):
            raise UnsupportedModuleError(what, f"a reshape from {value.shape} to {out_shape} (only flattening)")
        layers, layout = flatten_layers(value)
        return value.then(layers, layout, out_shape)

    def mean(self, what, value, args, kwargs, out_shape) -> Value:
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        rank = len(value.shape)
        dims = (
            tuple(d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))) if dims is not None else ()
        )
        if value.layout == "sequence" and dims == (1,) and not keepdim:
            return value.then([TimeMean()], "features", out_shape)
        if value.layout == "grid" and sorted(dims) == list(range(2, rank)):
            return value.then([GlobalAvgPool()], "pooled" if keepdim else "features", out_shape)
        raise UnsupportedModuleError(
            what,
            f"a mean over axes {dims} of {value.layout} features of shape {value.shape} (only over time or the grid)",
        )


def architecture_summary(architecture: Sequential) -> str:
    return "[" + ", ".join(type(layer).__name__ for layer in architecture) + "]"


class _Aux:
    """A non-tensor value of the traced network (a size, a shape)."""
