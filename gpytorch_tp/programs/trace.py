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

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModuleError
from . import feature_ops, grid_ops, sequence_ops
from .expressions import ELEMENTWISE_FUNCTIONS
from .program import (
    Apply,
    Block,
    GVar,
    InputFeatures,
    MatMul,
    Program,
    Steps,
    Sum,
    Value,
    Weight,
)
from .refusals import NotFeatureVectorsError, OutsideTheTheoremError, UnknownOperationError
from .traced import Heads, PerItem, flat

__all__ = [
    "ELEMENTWISE_FUNCTIONS",
    "NotFeatureVectorsError",
    "OutsideTheTheoremError",
    "UnknownOperationError",
    "trace_program",
]


# Calls that change nothing a kernel sees (layout, dtype, copies).
_SAME_VALUE = frozenset({"contiguous", "clone", "float", "double", "half", "to", "type", "detach", "__get__"})


# Calls that turn a traced tensor into Python values: data-dependent control flow.
_DATA_DEPENDENT = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy"})


# New tensors shaped like a traced one: constants, whatever the input (x.new_zeros(N, n)).
_CONSTANTS_LIKE = frozenset(
    {
        "new_zeros",
        "new_ones",
        "new_full",
        "new_empty",
        "new_tensor",
        "zeros_like",
        "ones_like",
        "full_like",
        "empty_like",
    }
)


# Calls that read shapes and the like: they run untraced.
_UNTRACED = frozenset({"size", "dim", "numel", "__len__", "is_floating_point", "is_complex", "__format__"})


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


class Tracer(TorchFunctionMode):
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
        #: ``(C, H, W)`` of an image input, flattened channel-major
        self.grid: tuple[int, int, int] | None = None
        #: traced tensors whose coordinates are not in PyTorch's order (flattened images)
        self.permuted: set[int] = set()

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
        traced = [a for a in flat(args) + flat(list(kwargs.values())) if self.value(a) is not None]
        # A dense layer of a zero state (h = x.new_zeros(N, n) before the first step) is its bias.
        zero_state = name == "linear" and any(id(a) in self.parameters for a in flat(args))
        if (not traced and not zero_state) or name in _UNTRACED or name in _CONSTANTS_LIKE:
            return result
        if name in _DATA_DEPENDENT:
            raise OutsideTheTheoremError(
                f"{name} of a traced tensor",
                "control flow or values that depend on the data change with the input; the kernel of such a "
                "network is not the master theorem's",
            )
        if not any(isinstance(r, Tensor) for r in flat([result])):
            return result  # shapes and the like (x.shape, x.size(0)): the same for every input
        if name in _SAME_VALUE and isinstance(result, Tensor):
            if name == "__get__" and isinstance(self.value(args[0]), (Steps, Heads)):
                sequence_ops.transpose(self, func, name, args, kwargs, result)  # k.mT
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
            handler = sequence_ops.elementwise
        if handler is None:
            raise UnknownOperationError(
                f"the operation {name!r}",
                "the tensor-program compiler knows dense layers, coordinatewise functions, sums, products, "
                "concatenations and slices of the feature axis",
            )
        handler(self, func, name, args, kwargs, result)
        return result

    # -- weights --------------------------------------------------------------------------------

    def weight(
        self, tensor: Any, what: str, bias: bool = False, unit: bool = False, fan_in: int | None = None
    ) -> Weight:
        found = self.parameters.get(id(tensor))
        if found is None:
            raise UnsupportedModuleError(
                what, "its weight is not a parameter of the module (weights are recognised as parameters)"
            )
        name, parameter = found
        if fan_in is None:
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


_HANDLERS: dict[str, Callable] = {
    "linear": feature_ops.linear,
    "matmul": sequence_ops.matmul,
    "__matmul__": sequence_ops.matmul,
    "__rmatmul__": sequence_ops.matmul,
    "mm": sequence_ops.matmul,
    "bmm": sequence_ops.matmul,
    "transpose": sequence_ops.transpose,
    "swapaxes": sequence_ops.transpose,
    "permute": sequence_ops.transpose,
    "softmax": sequence_ops.softmax,
    "rnn_tanh": sequence_ops.recurrent_module,
    "rnn_relu": sequence_ops.recurrent_module,
    "gru": sequence_ops.recurrent_module,
    "lstm": sequence_ops.recurrent_module,
    "masked_fill": sequence_ops.masked_fill,
    "conv1d": grid_ops.conv,
    "conv2d": grid_ops.conv,
    "avg_pool1d": grid_ops.avg_pool,
    "avg_pool2d": grid_ops.avg_pool,
    "adaptive_avg_pool1d": grid_ops.adaptive_avg_pool,
    "adaptive_avg_pool2d": grid_ops.adaptive_avg_pool,
    "scaled_dot_product_attention": sequence_ops.scaled_dot_product_attention,
    "cat": feature_ops.cat,
    "concat": feature_ops.cat,
    "concatenate": feature_ops.cat,
    "hstack": feature_ops.cat,
    "__getitem__": sequence_ops.getitem,
    "chunk": feature_ops.split,
    "split": feature_ops.split,
    "tensor_split": feature_ops.split,
    "stack": sequence_ops.stack,
    "unbind": sequence_ops.unbind,
    "mean": sequence_ops.reduce,
    "sum": sequence_ops.reduce,
    "layer_norm": sequence_ops.layer_norm,
    "rms_norm": sequence_ops.layer_norm,
    "unflatten": sequence_ops.reshape,
    "view": sequence_ops.reshape,
    "reshape": sequence_ops.reshape,
    "view_as": sequence_ops.reshape,
    "reshape_as": sequence_ops.reshape,
    "flatten": sequence_ops.reshape,
    "squeeze": sequence_ops.reshape,
}


def trace_program(
    module: nn.Module,
    input_width: int,
    *,
    steps: int | None = None,
    grid: tuple[int, int] | None = None,
    example_size: int = 3,
) -> tuple[Program, dict[str, Any]]:
    """The tensor program of ``module`` on inputs ``(N, input_width)``, and what the initialisation needs.

    :param steps: the inputs are sequences of ``steps`` steps of ``input_width`` features, flattened
        time-major, ``(N, steps * input_width)``, as the package's sequence kernels take them; ``forward``
        reshapes them (``x.view(N, T, d)``) and may loop over the steps (``x[:, t]``).
    :param grid: the inputs are images of ``(H, W)`` pixels (or 1-d grids of ``(L,)``) of ``input_width``
        channels, flattened channel-major, ``(N, C * H * W)``; ``forward`` reshapes them (``x.view(N, C, H, W)``).
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
    if grid is not None and (steps is not None or len(grid) not in (1, 2) or min(grid) < 1):
        raise ValueError(f"grid must be (L,) or (H, W) of positive sizes, without steps; got {grid}")
    grid = None if grid is None else tuple(int(n) for n in grid)
    pixels = 1 if grid is None else math.prod(grid)
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
    x = torch.randn(example_size, width * (steps or 1) * pixels, generator=generator, dtype=dtype).to(device)
    was_training = module.training
    module.eval()
    try:
        tracer = Tracer(parameters, x)
        tracer.sequence = None if steps is None else (int(steps), width)
        tracer.grid = None if grid is None else (width, *grid)
        with torch.no_grad(), tracer:
            out = module(x)
    except UnsupportedModuleError:
        raise
    except Exception as error:  # the module's own error on inputs of this layout
        layout = "sequences (T, d)" if steps else ("grids (C, ...)" if grid else "feature vectors (d,)")
        raise UnsupportedModuleError(
            f"running the module on flattened {layout} of shape {tuple(x.shape)}",
            f"it raised {type(error).__name__}: {error}; check input_shape (and sequence=True for sequences)",
        ) from error
    finally:
        module.train(was_training)
    value = tracer.value(out) if isinstance(out, Tensor) else None
    if not isinstance(value, Value):
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
    if (steps or grid) and any(b.expr == InputFeatures(width * (steps or 1) * pixels) for b in _sources(output)):
        raise NotFeatureVectorsError(
            "a dense layer on the flattened input",
            "reshape the input to (N, T, d) or (N, C, H, W) in forward and use its steps or pixels",
        )
    return Program(output, weights, width, None if steps is None else int(steps), grid), info


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
