"""Preset: the kernel of a transformer encoder (or decoder, with a causal mask)."""

from __future__ import annotations

import copy

from ..layers import (
    FirstStep,
    LastStep,
    Layer,
    LayerNorm,
    Linear,
    PositionalEmbedding,
    Residual,
    SelfAttention,
    Sequential,
    TimeMean,
    nonlinearity_from_name,
)
from ..layers.attention import MECHANISMS, QUERY_KEY
from .presets import check_choice, check_depth, check_sequence_shape, hyperparameter_batch_shape
from .tensor_program_kernel import TensorProgramKernel

__all__ = ["TransformerKernel"]

READOUTS = ("mean", "last", "first")
POSITIONAL = ("none", "add", "concat")


class TransformerKernel(TensorProgramKernel):
    r"""NNGP kernel or NTK of an infinitely wide (post-LayerNorm) transformer over sequences.

    The architecture: a token embedding :class:`~gpytorch_tp.layers.Linear`,
    an optional learned :class:`~gpytorch_tp.layers.PositionalEmbedding`,
    ``depth`` blocks

    .. math::

        z &\leftarrow \operatorname{LN}\big(z + \operatorname{Attention}(z)\big), \\
        z &\leftarrow \operatorname{LN}\big(z + W_2\, \phi(W_1 z + b_1) + b_2\big),

    a readout over the tokens (mean over each sequence's own tokens, its last
    or its first token) and a dense output layer.  The attention's logits are
    scaled by :math:`1/n`; with ``query_key="tied"`` (default) they converge
    to :math:`\sigma_{qk}^2 K_z(t, s)` and the attention is the softmax of the
    tokens' covariance, with ``"independent"`` to 0 (uniform attention); see
    :mod:`gpytorch_tp.layers.attention` for the recursion and what it assumes.
    Each layer costs :math:`O(N_1 N_2 T^3)` time and :math:`O(N_1 N_2 T^2)`
    memory for :math:`N_1 \times N_2` pairs of sequences of :math:`T` tokens.

    Inputs are sequences flattened time-major, ``(..., N, T * d)``; shorter
    sequences are padded at the end with whole steps of ``padding_value`` (NaN
    by default).  Padding never changes a kernel value: padding tokens are
    never attended to nor read out, and positions count from each sequence's
    own first token.

    :param input_shape: ``(T, d)``: maximum length and features per token; with
        ``active_dims``, the layout of the ``T * d`` selected columns (time-major, in the order
        ``active_dims`` lists them).
    :param depth: number of blocks.
    :param nonlinearity: the MLP's nonlinearity (``"relu"``, ``"gelu"``, ... or a layer).
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param readout: ``"mean"``, ``"last"`` or ``"first"``.
    :param causal: every token attends to itself and earlier tokens only.
    :param query_key: ``"tied"`` or ``"independent"`` (see above).
    :param mechanism: ``"softmax"`` or ``"identity"`` (tied only).
    :param positional: ``"none"``, ``"add"`` or ``"concat"`` (a learned positional embedding).
    :param num_heads: heads of the finite network (the limit does not depend on it).
    :param weight_variance: starting weight variance of the embedding, MLP and readout layers (default 1;
        2 for ReLU keeps the MLP's scale).
    :param bias_variance: starting bias variance of those layers (default 0.1).
    :param mlp_weight_variance: starting weight variance of the MLP's first layer, the
        one feeding the nonlinearity (default: ``weight_variance``; 2 suits ReLU).
    :param query_key_variance: starting scale :math:`\sigma_{qk}^2` of the limiting logits (default 1).
    :param positional_variance: starting variance of the positional embedding (default 1).
    :param layer_norm_affine: the LayerNorms have trained per-unit gains and biases
        (their NTK terms are included; the NNGP is unchanged).
    :param kwargs: passed to :class:`TensorProgramKernel` (``padding_value``,
        ``batch_shape``, ``active_dims``, ``memory_budget``, ``progress``, ``tile_pairs``).

    Example:
        >>> import torch
        >>> from gpytorch_tp import TransformerKernel
        >>> k = TransformerKernel(input_shape=(6, 3), depth=2, kind="ntk", causal=True, readout="last")
        >>> x = torch.randn(4, 6, 3)
        >>> x[0, 4:] = float("nan")  # the first sequence has 4 tokens
        >>> k(x.reshape(4, 18)).to_dense().shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        input_shape: tuple[int, int],
        depth: int = 1,
        nonlinearity: str | Layer = "relu",
        kind: str = "nngp",
        *,
        readout: str = "mean",
        causal: bool = False,
        query_key: str = "tied",
        mechanism: str = "softmax",
        positional: str = "none",
        num_heads: int = 1,
        weight_variance: float = 1.0,
        bias_variance: float = 0.1,
        mlp_weight_variance: float | None = None,
        query_key_variance: float = 1.0,
        positional_variance: float = 1.0,
        layer_norm_affine: bool = False,
        **kwargs,
    ):
        check_depth(depth)
        for option, value, choices in (
            ("readout", readout, READOUTS),
            ("positional", positional, POSITIONAL),
            ("query_key", query_key, QUERY_KEY),
            ("mechanism", mechanism, MECHANISMS),
        ):
            check_choice(option, value, choices)
        input_shape = check_sequence_shape("TransformerKernel", input_shape)
        batch_shape = hyperparameter_batch_shape(kwargs)
        nonlinearity_from_name(nonlinearity)  # a clear error for an unknown name, before building anything

        def dense(variance: float = weight_variance) -> Linear:
            return Linear(variance, bias_variance, batch_shape=batch_shape)

        hidden_variance = weight_variance if mlp_weight_variance is None else mlp_weight_variance

        layers: list[Layer] = [dense()]
        if positional != "none":
            layers.append(PositionalEmbedding(positional_variance, mode=positional, batch_shape=batch_shape))
        for _ in range(depth):
            attention = SelfAttention(
                query_key,
                mechanism,
                causal=causal,
                num_heads=num_heads,
                bias_variance=bias_variance,
                query_key_variance=query_key_variance,
                batch_shape=batch_shape,
            )
            phi = nonlinearity_from_name(nonlinearity) if isinstance(nonlinearity, str) else _copy(nonlinearity)
            layers += [
                Residual(attention),
                LayerNorm(elementwise_affine=layer_norm_affine),
                Residual(dense(hidden_variance), phi, dense()),
                LayerNorm(elementwise_affine=layer_norm_affine),
            ]
        layers += [{"mean": TimeMean, "last": LastStep, "first": FirstStep}[readout](), dense()]
        super().__init__(Sequential(*layers), kind=kind, input_shape=input_shape, sequence=True, **kwargs)
        self.depth, self.readout, self.causal = depth, readout, bool(causal)


def _copy(layer: Layer) -> Layer:
    return copy.deepcopy(layer)
