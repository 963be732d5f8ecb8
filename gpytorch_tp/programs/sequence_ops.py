"""Handlers of torch calls on sequences ``(N, T, width)``: steps, time averages, per-token norms,
self-attention (logits, masks, softmax, token mixing) and PyTorch's recurrent modules, unrolled."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UnsupportedModuleError
from .expressions import combine, linear_sum, normalised, product, width_mean
from .feature_ops import add_linear, affine, elementwise_value, per_item_operation, slice_value, width_average
from .program import (
    Apply,
    Bias,
    Block,
    GVar,
    InputFeatures,
    MatMul,
    SoftmaxEntry,
    Steps,
    Value,
)
from .refusals import NotFeatureVectorsError, OutsideTheTheoremError, UnknownOperationError
from .traced import LayerStates, PerItem, TokensTransposed, bind, check_features, constant_entries, summed_error


def matmul(tracer, func, name, args, kwargs, result) -> None:
    left, right = args[0], args[1]
    if name == "__rmatmul__":
        left, right = right, left
    if _token_products(tracer, left, right, result):
        return
    value = check_features(tracer, left, "a matrix product")
    if tracer.value(right) is not None:
        raise OutsideTheTheoremError(
            "a matrix product of two traced tensors",
            "a product of two feature vectors (N, width) mixes the items of a batch; attention is compiled on "
            "sequences (N, T, width): q @ k.transpose(-1, -2) / width and A @ v",
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
    add_linear(tracer, value, weight, None, result)


def transpose(tracer, func, name, args, kwargs, result) -> None:
    source = tracer.value(args[0])
    n, t, w = args[0].shape if args[0].dim() == 3 else (None, None, None)
    if isinstance(source, Steps) and result.dim() == 3 and tuple(result.shape) == (n, w, t):
        tracer.track(result, TokensTransposed(source))
        return
    raise OutsideTheTheoremError(
        f"the transpose {name} of a traced tensor of shape {tuple(args[0].shape)} to {tuple(result.shape)}",
        "the token and feature axes of a sequence may be swapped (k.transpose(-1, -2) for attention logits); "
        "products across the items of a batch are not covered",
    )


def _token_products(tracer, left: Any, right: Any, result: Tensor) -> bool:
    """Attention: logits ``q @ k.transpose(-1, -2)`` (numbers per item, a sum over the width) and ``A @ v``."""
    first, second = tracer.value(left), tracer.value(right)
    if isinstance(first, Steps) and isinstance(second, TokensTransposed):
        queries, keys = first.steps, second.steps.steps
        if any(isinstance(b.expr, InputFeatures) for v in (*queries, *keys) for b in v.blocks):
            raise UnsupportedModuleError("logits of the network input", "apply a dense layer to the tokens first")
        logits = np.empty((len(queries), len(keys)), dtype=object)
        for t, q in enumerate(queries):
            for s, k in enumerate(keys):
                product = elementwise_value(tracer, torch.mul, "mul", (None, None), {}, (1, q.width), [q, k])
                logits[t, s] = width_mean(product)
        tracer.track(result, PerItem(logits, queries[0].width))
        return True
    if isinstance(first, PerItem) and isinstance(second, Steps):
        weights, values = first, second.steps
        if weights.summed_width:
            raise summed_error("a token mixing A @ v", weights)
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
                blocks.append(Block(b - a, linear_sum(terms)))
            steps.append(Value(tuple(blocks)))
        tracer.track(result, Steps(tuple(steps)))
        return True
    if isinstance(first, (Steps, PerItem, TokensTransposed)) or isinstance(second, (Steps, PerItem, TokensTransposed)):
        raise OutsideTheTheoremError(
            "a matrix product of sequences",
            "attention logits q @ k.transpose(-1, -2) (divided by the width) and token mixing A @ v are compiled",
        )
    return False


def softmax(tracer, func, name, args, kwargs, result) -> None:
    """The softmax of logits over the keys: each weight a function of its row of numbers per item."""
    bound = bind(args, kwargs, ("input", "dim"))
    source = tracer.value(bound["input"])
    dim = bound.get("dim")
    if not isinstance(source, PerItem) or source.exprs.ndim == 0 or dim not in (-1, source.exprs.ndim):
        raise OutsideTheTheoremError(
            f"the operation 'softmax' over dim {dim} of a tensor of shape {tuple(bound['input'].shape)}",
            "a softmax over the keys of attention logits (numbers per item, dim=-1) is compiled; over the features "
            "it is not coordinatewise",
        )
    if source.summed_width:
        raise summed_error("softmax", source)
    weights = np.empty(source.exprs.shape, dtype=object)
    for index in np.ndindex(source.exprs.shape[:-1]):
        row = tuple(source.exprs[index])
        for s, logit in enumerate(row):
            masked = isinstance(logit, float) and logit == float("-inf")
            weights[(*index, s)] = 0.0 if masked else Apply(SoftmaxEntry(s), row)
    tracer.track(result, PerItem(weights))


def masked_fill(tracer, func, name, args, kwargs, result) -> None:
    bound = bind(args, kwargs, ("input", "mask", "value"))
    source = tracer.value(bound["input"])
    mask = bound["mask"]
    if not isinstance(source, PerItem) or tracer.value(mask) is not None:
        raise OutsideTheTheoremError(
            f"{name} of a tensor of shape {tuple(bound['input'].shape)}",
            "masks of attention logits (numbers per item) by constant masks are compiled",
        )
    if source.summed_width:
        raise summed_error(name, source)
    entries = constant_entries(mask, source.exprs.shape, name)
    fill = float(bound["value"])
    filled = np.empty(source.exprs.shape, dtype=object)
    for index in np.ndindex(source.exprs.shape):
        filled[index] = fill if entries[index] else source.exprs[index]
    tracer.track(result, PerItem(filled))


def recurrent_module(tracer, func, name, args, kwargs, result) -> None:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (their ``torch._VF`` calls), unrolled into the program step by step.

    The cells' equations as PyTorch writes them, gate by gate from row blocks of the stacked weights (rows of
    one matrix that do not overlap are independent weights): the same program as the loop written by hand.
    """
    fields = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")
    bound = bind(args, kwargs, fields)
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
                new = combine(cell, cell.__name__, [gate(x, h, 0, False).plus(gate(x, h, 0, True))], ())
            elif name == "gru":
                r = Apply(torch.sigmoid, (gate(x, h, 0, False).plus(gate(x, h, 0, True)),))
                z = Apply(torch.sigmoid, (gate(x, h, 1, False).plus(gate(x, h, 1, True)),))
                candidate = linear_sum(((1.0, gate(x, h, 2, False)), (1.0, product(r, gate(x, h, 2, True)))))
                n = Apply(torch.tanh, (candidate,))
                keep = product(z, h.blocks[0].expr) if h is not None else None
                new = linear_sum(((1.0, n), (-1.0, product(z, n))) + (((1.0, keep),) if keep is not None else ()))
            elif name == "lstm":
                i, f, g, o = (gate(x, h, k, False).plus(gate(x, h, k, True)) for k in range(4))
                i, f, o = (Apply(torch.sigmoid, (v,)) for v in (i, f, o))
                update = product(i, Apply(torch.tanh, (g,)))
                c_expr = update if c is None else linear_sum(((1.0, product(f, c.blocks[0].expr)), (1.0, update)))
                c = Value((Block(hidden, c_expr),))
                new = product(o, Apply(torch.tanh, (c_expr,)))
            else:
                raise UnknownOperationError(f"the operation {name!r}", "nn.RNN, nn.GRU and nn.LSTM are compiled")
            h = Value((Block(hidden, new),))
            outputs.append(h)
        inputs = outputs
        last_h.append(h)
        last_c.append(c)
    tracer.track(result[0], Steps(tuple(inputs)))
    tracer.track(result[1], LayerStates(tuple(last_h)))
    if name == "lstm":
        tracer.track(result[2], LayerStates(tuple(last_c)))


def getitem(tracer, func, name, args, kwargs, result) -> None:
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    source = tracer.value(args[0])
    if isinstance(source, Steps):
        _index_steps(tracer, source, index, result)
        return
    if isinstance(source, LayerStates):
        if len(index) != 1 or not isinstance(index[0], int):
            raise UnsupportedModuleError(f"the index {args[1]!r} of a recurrent module's last states", "h_n[layer]")
        tracer.track(result, source.layers[index[0]])
        return
    value = check_features(tracer, args[0], "indexing")
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
    slice_value(tracer, value, start, stop, result)


def _index_steps(tracer, source: Steps, index: tuple, result: Tensor) -> None:
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


def stack(tracer, func, name, args, kwargs, result) -> None:
    bound = bind(args, kwargs, ("tensors", "dim"))
    if bound.get("dim", 0) not in (1, -2) or result.dim() != 3:
        raise NotFeatureVectorsError(f"torch.stack along dim {bound.get('dim', 0)}", "steps along dim 1 only")
    values = [tracer.value(t) for t in bound["tensors"]]
    if any(not isinstance(v, Value) for v in values):
        raise UnsupportedModuleError("torch.stack of constants or sequences", "every step must be a traced vector")
    tracer.track(result, Steps(tuple(values)))


def unbind(tracer, func, name, args, kwargs, result) -> None:
    source = tracer.value(args[0])
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if not isinstance(source, Steps) or dim not in (1, -2):
        raise NotFeatureVectorsError(f"{name} along dim {dim}", "the steps of a sequence (dim 1) only")
    for tensor, step in zip(result, source.steps):
        tracer.track(tensor, step)


def reduce(tracer, func, name, args, kwargs, result) -> None:
    """``h.mean(-1)`` / ``h.sum(-1)`` of feature vectors (numbers per item), ``h.mean(1)`` of a sequence."""
    source = tracer.value(args[0])
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    if isinstance(source, Value) and args[0].dim() == 2 and dim in (-1, 1):
        tracer.track(result, width_average(source, name, tuple(result.shape[1:])))
        return
    if isinstance(source, Steps) and args[0].dim() == 3 and dim in (-1, 2):
        # Each token's own average: numbers per item of shape (T, 1) (keepdim) or (T,).
        per_step = [width_average(step, name, ()) for step in source.steps]
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


def _reduce_steps(tracer, source: Steps, name: str, result: Tensor) -> None:
    """``h.mean(1)`` / ``h.sum(1)`` of a sequence: a sum of the steps' vectors (moments by bilinearity)."""
    weight = 1.0 / len(source.steps) if name == "mean" else 1.0
    cuts = sorted(set().union(*(v.boundaries() for v in source.steps)))
    blocks = []
    for a, b in zip(cuts, cuts[1:]):
        terms = tuple((weight, step.piece(a, b)) for step in source.steps)
        blocks.append(Block(b - a, linear_sum(terms)))
    tracer.track(result, Value(tuple(blocks)))


def reshape(tracer, func, name, args, kwargs, result) -> None:
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


def _steps_elementwise(tracer, func, name, args, kwargs, result, traced: list) -> None:
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
        steps.append(elementwise_value(tracer, func, name, args, kwargs, tuple(result[:, t].shape), per_step))
    tracer.track(result, Steps(tuple(steps)))


def elementwise(tracer, func, name, args, kwargs, result) -> None:
    arguments = list(args) + [v for _, v in sorted(kwargs.items())]
    traced = [tracer.value(a) for a in arguments]
    if all(t is None or isinstance(t, PerItem) for t in traced):
        tracer.track(result, per_item_operation(tracer, func, name, args, kwargs, result))
        return
    if any(isinstance(t, Steps) for t in traced):
        _steps_elementwise(tracer, func, name, args, kwargs, result, traced)
        return
    tracer.track(result, elementwise_value(tracer, func, name, args, kwargs, tuple(result.shape), traced))


def layer_norm(tracer, func, name, args, kwargs, result) -> None:
    """``F.layer_norm`` / ``F.rms_norm`` over the feature axis (``nn.LayerNorm``, ``nn.RMSNorm``)."""
    fields = (
        ("input", "normalized_shape", "weight", "bias", "eps")
        if name == "layer_norm"
        else ("input", "normalized_shape", "weight", "eps")
    )
    bound = bind(args, kwargs, fields)
    source = tracer.value(bound["input"])
    # Every token of a sequence is normalised on its own, with the same gain and shift.
    values = source.steps if isinstance(source, Steps) else (check_features(tracer, bound["input"], name),)
    if tuple(bound["normalized_shape"]) != (values[0].width,):
        raise UnsupportedModuleError(
            f"{name} over the shape {tuple(bound['normalized_shape'])}", "normalisation over the feature axis only"
        )
    eps = bound.get("eps")
    if eps is None:
        eps = 1e-5 if name == "layer_norm" else torch.finfo(result.dtype).eps
    outputs = []
    for value in values:
        unit_scale = normalised(value, float(eps), center=name == "layer_norm")
        outputs.append(affine(tracer, unit_scale, bound.get("weight"), bound.get("bias"), name))
    tracer.track(result, Steps(tuple(outputs)) if isinstance(source, Steps) else outputs[0])
