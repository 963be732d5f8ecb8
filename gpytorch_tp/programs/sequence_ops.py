"""Handlers of torch calls on sequences ``(N, T, width)``: steps, time averages, per-token norms,
self-attention (logits, masks, softmax, token mixing) and PyTorch's recurrent modules, unrolled.

The calls every layout shares (matrix products, indexing, reshapes, coordinatewise functions,
reductions, norms) are dispatched from here by the kind of their traced arguments: feature vectors
to :mod:`.feature_ops`, images to :mod:`.grid_ops`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UnsupportedModuleError
from .expressions import combine, linear_combination, linear_sum, normalised, product, width_mean
from .feature_ops import (
    add_linear,
    affine,
    elementwise_value,
    per_item_operation,
    refuse_permuted,
    slice_value,
    width_average,
)
from .grid_ops import grid_elementwise, grid_flatten, grid_mean
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
from .traced import (
    Grid,
    Heads,
    LayerStates,
    PerItem,
    TokensTransposed,
    bind,
    check_features,
    constant_entries,
    summed_error,
)


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


def _axes_moved(before: Tensor, after: Tensor, name: str, args: tuple) -> tuple[int, ...] | None:
    """The permutation ``after = before.permute(order)`` of a transpose, permute or ``.mT`` call."""
    ndim = before.dim()
    if name == "permute":
        order = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
        return tuple(int(a) % ndim for a in order)
    if name == "__get__":  # .mT: the last two axes
        first, second = ndim - 2, ndim - 1
    elif len(args) >= 3:
        first, second = int(args[1]) % ndim, int(args[2]) % ndim
    else:
        return None
    order = list(range(ndim))
    order[first], order[second] = order[second], order[first]
    return tuple(order)


def transpose(tracer, func, name, args, kwargs, result) -> None:
    source = tracer.value(args[0])
    order = _axes_moved(args[0], result, name, args)
    if isinstance(source, Steps) and order == (0, 2, 1):
        tracer.track(result, TokensTransposed(source))
        return
    if isinstance(source, Heads) and not source.keys and order == (0, 2, 1, 3):
        tracer.track(result, Heads(source.heads, tokens_first=not source.tokens_first))
        return
    if isinstance(source, Heads) and not source.keys and not source.tokens_first and order == (0, 1, 3, 2):
        tracer.track(result, Heads(source.heads, tokens_first=False, keys=True))
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
        tracer.track(result, PerItem(_logits(tracer, first.steps, second.steps.steps), first.steps[0].width))
        return True
    if isinstance(first, PerItem) and isinstance(second, Steps):
        if first.summed_width:
            raise summed_error("a token mixing A @ v", first)
        tracer.track(result, _mix(first.exprs, second.steps))
        return True
    if isinstance(first, Heads) and isinstance(second, Heads) and not first.tokens_first and second.keys:
        # One head's logits per head: numbers per item (H, T, T).
        per_head = [_logits(tracer, q.steps, k.steps) for q, k in zip(first.heads, second.heads, strict=True)]
        tracer.track(result, PerItem(np.stack(per_head), first.heads[0].steps[0].width))
        return True
    if isinstance(first, PerItem) and isinstance(second, Heads) and not second.tokens_first and not second.keys:
        if first.summed_width:
            raise summed_error("a token mixing A @ v", first)
        if first.exprs.ndim != 3 or first.exprs.shape[0] != len(second.heads):
            raise NotFeatureVectorsError(
                f"A @ v with A of shape {first.exprs.shape} and {len(second.heads)} heads", "(H, T, T') @ (H, T', d)"
            )
        mixed = tuple(_mix(first.exprs[h], v.steps) for h, v in enumerate(second.heads))
        tracer.track(result, Heads(mixed, tokens_first=False))
        return True
    kinds = (Steps, PerItem, TokensTransposed, Heads)
    if isinstance(first, kinds) or isinstance(second, kinds):
        raise OutsideTheTheoremError(
            "a matrix product of sequences",
            "attention logits q @ k.transpose(-1, -2) (divided by the width) and token mixing A @ v are compiled",
        )
    return False


def _logits(tracer, queries: tuple[Value, ...], keys: tuple[Value, ...]) -> np.ndarray:
    """``E[q_t k_s]`` of every token pair: the width averages of the products (a sum until divided)."""
    if any(isinstance(b.expr, InputFeatures) for v in (*queries, *keys) for b in v.blocks):
        raise UnsupportedModuleError("logits of the network input", "apply a dense layer to the tokens first")
    logits = np.empty((len(queries), len(keys)), dtype=object)
    for t, q in enumerate(queries):
        for s, k in enumerate(keys):
            product = elementwise_value(tracer, torch.mul, "mul", (None, None), {}, (1, q.width), [q, k])
            logits[t, s] = width_mean(product)
    return logits


def _mix(weights: np.ndarray, values: tuple[Value, ...]) -> Steps:
    """``A @ v``: each token a linear combination of the values, with per-item coefficients."""
    if weights.shape[-1] != len(values):
        raise NotFeatureVectorsError(
            f"A @ v with A of shape {weights.shape} and {len(values)} tokens", "(T, T') @ (T', d)"
        )
    if any(isinstance(b.expr, InputFeatures) for v in values for b in v.blocks):
        raise UnsupportedModuleError("a token mixing of the network input", "apply a dense layer first")
    return Steps(tuple(linear_combination(weights[t], values) for t in range(weights.shape[0])))


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Softmax weights of every row of logits (numbers per item); masked (-inf) logits get weight 0."""
    weights = np.empty(logits.shape, dtype=object)
    for index in np.ndindex(logits.shape[:-1]):
        row = tuple(logits[index])
        for s, logit in enumerate(row):
            masked = isinstance(logit, float) and logit == float("-inf")
            weights[(*index, s)] = 0.0 if masked else Apply(SoftmaxEntry(s), row)
    return weights


def scaled_dot_product_attention(tracer, func, name, args, kwargs, result) -> None:
    """``F.scaled_dot_product_attention`` with ``scale=1 / head width`` (the limit of this package)."""
    fields = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = bind(args, kwargs, fields)
    query, key, value = (tracer.value(bound[k]) for k in ("query", "key", "value"))
    what = "F.scaled_dot_product_attention"
    if not all(isinstance(v, (Steps, Heads)) for v in (query, key, value)):
        raise NotFeatureVectorsError(what, "queries, keys and values must be traced sequences (N, [H,] T, d)")
    as_heads = [v.heads if isinstance(v, Heads) else (v,) for v in (query, key, value)]
    if any(isinstance(v, Heads) and (v.tokens_first or v.keys) for v in (query, key, value)):
        raise NotFeatureVectorsError(what, "heads must be (N, H, T, d): transpose(1, 2) after splitting them")
    width = as_heads[0][0].steps[0].width
    scale = bound.get("scale")
    if scale is None or abs(float(scale) * width - 1.0) > 1e-9:
        raise OutsideTheTheoremError(
            f"{what} with scale={scale} (head width {width})",
            "logits scaled by 1/sqrt(width) (the default) are random at infinite width; pass scale=1 / head width",
        )
    if bound.get("dropout_p"):
        raise UnsupportedModuleError(what, "dropout_p > 0")
    mask = bound.get("attn_mask")
    if mask is not None and (tracer.value(mask) is not None or mask.dtype != torch.bool):
        raise UnsupportedModuleError(what, "attention masks must be constant boolean tensors (True: attend)")
    outputs = []
    for q, k, v in zip(*as_heads, strict=True):
        logits = _logits(tracer, q.steps, k.steps)
        tokens, keys = logits.shape
        allowed = np.ones((tokens, keys), dtype=bool)
        if bound.get("is_causal"):
            allowed &= np.tril(np.ones((tokens, keys), dtype=bool))
        if mask is not None:
            allowed &= np.asarray(constant_entries(mask, (tokens, keys), what), dtype=bool)
        for index in np.ndindex(logits.shape):
            if not allowed[index]:
                logits[index] = float("-inf")
        outputs.append(_mix(_softmax_rows(logits), v.steps))
    tracer.track(result, Heads(tuple(outputs), tokens_first=False) if isinstance(query, Heads) else outputs[0])


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
    tracer.track(result, PerItem(_softmax_rows(source.exprs)))


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
    refuse_permuted(tracer, args[0], "indexing")
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
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if isinstance(source, Grid) and isinstance(dim, (tuple, list)) and name == "mean":
        if grid_mean(tracer, source, tuple(dim), bool(keepdim), result):
            return
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
    tracer.track(result, linear_combination([weight] * len(source.steps), source.steps))


def reshape(tracer, func, name, args, kwargs, result) -> None:
    source = tracer.value(args[0])
    if (
        tracer.grid is not None
        and isinstance(source, Value)
        and source.blocks == tracer.flat_input.blocks
        and tuple(result.shape[1:]) == tracer.grid
    ):
        channels, *sizes = tracer.grid
        pixels = np.empty(tuple(sizes), dtype=object)
        for at in np.ndindex(pixels.shape):
            pixels[at] = Value((Block(channels, InputFeatures(channels, at)),))
        tracer.track(result, Grid(pixels))
        return
    if isinstance(source, Grid) and grid_flatten(tracer, source, result):
        return
    if (
        tracer.sequence is not None
        and isinstance(source, Value)
        and source.blocks == tracer.flat_input.blocks
        and tuple(result.shape[1:]) == tracer.sequence
    ):
        steps, d = tracer.sequence
        tracer.track(result, Steps(tuple(Value((Block(d, InputFeatures(d, t)),)) for t in range(steps))))
        return
    if isinstance(source, Steps) and result.dim() == 4 and tuple(result.shape[:2]) == tuple(args[0].shape[:2]):
        # (N, T, width) -> (N, T, H, width / H): heads are consecutive slices of the features.
        count, size = result.shape[2], result.shape[3]
        heads = tuple(Steps(tuple(v.slice(h * size, (h + 1) * size) for v in source.steps)) for h in range(count))
        tracer.track(result, Heads(heads))
        return
    if isinstance(source, Heads) and source.tokens_first and not source.keys and result.dim() == 3:
        # (N, T, H, d) -> (N, T, H d): the heads joined again, token by token.
        steps = tuple(
            Value(tuple(b for head in source.heads for b in head.steps[t].blocks))
            for t in range(len(source.heads[0].steps))
        )
        tracer.track(result, Steps(steps))
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
    if any(isinstance(t, Grid) for t in traced):
        grid_elementwise(tracer, func, name, args, kwargs, result, traced)
        return
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
