r"""Self-attention over the tokens of a sequence, at infinite width.

The finite layer (features :math:`z_t \in \mathbb{R}^n` at the tokens
:math:`t` of one sequence; :math:`H` heads, each with query/key and value
widths :math:`n_k, n_v`; every weight and bias i.i.d. :math:`N(0, 1)`):

.. math::

    v^h_s &= \sigma_v W_V^h z_s / \sqrt{n}, \qquad
    q^h_t = \sigma_{qk} W_Q^h z_t / \sqrt{n}, \qquad k^h_s = \sigma_{qk} W_K^h z_s / \sqrt{n}, \\
    G^h_{ts} &= \langle q^h_t, k^h_s \rangle / n_k \quad \text{(logits scaled by } 1/n_k
        \text{, not } 1/\sqrt{n_k}\text{)}, \qquad
    A^h = \operatorname{mechanism}(G^h) \text{ over the allowed keys}, \\
    y^h_t &= \textstyle\sum_s A^h_{ts} v^h_s, \qquad
    \text{out}_t = \sigma_o W_O [y^1_t; \dots; y^H_t] / \sqrt{H n_v} + \sigma_b b .

**The limit of the logits.**  With the :math:`1/n_k` scaling the logits are
averages over the :math:`n_k` query/key units, so they converge to
deterministic values (Yang 2019, *Tensor Programs I*, master theorem):
:math:`G_{ts} \to \sigma_{qk}^2 E[W_Q z_t \cdot W_K z_s] / n`.

* ``query_key="independent"`` (separate :math:`W_Q, W_K`, the tensor-programs
  transformer): the expectation is 0, so **every limiting logit is 0** and the
  attention is uniform over the allowed keys (the mean of the values, or of the
  values so far with a causal mask).  The finite-width logits fluctuate by
  :math:`O(n_k^{-1/2})` around 0.
* ``query_key="tied"`` (:math:`W_Q = W_K`, Hron et al. 2020, "Infinite
  attention", arXiv 2006.10540, the "linear scaling" variant of
  neural-tangents' ``GlobalSelfAttention``): the logits converge to
  :math:`G_{ts} = \sigma_{qk}^2 K_z(t, s)`, with :math:`K_z(t, s) = \lim
  \langle z_t, z_s \rangle / n` the incoming features' covariance between two
  tokens **of the same sequence** (the item's own ``var`` block of the state).

Either way :math:`A^x` is a deterministic function of sequence :math:`x`
alone: ``"softmax"`` (row-wise over the allowed keys) or ``"identity"``
(:math:`A = G` on the allowed keys, 0 elsewhere; only with tied weights, as the
independent limit would be 0).  Allowed keys: the sequence's own tokens
(padding is never attended to) and, with ``causal=True``, only tokens up to
the query's.  Padding tokens get no attention row (their output is the bias).

**NNGP.**  Given the deterministic :math:`A`, the values are Gaussian and the
value path maps the token-pair cross covariance of two sequences :math:`x, x'`
linearly:

.. math::

    K_\text{out}(x, x') = \sigma_b^2 + \sigma_o^2 \sigma_v^2 \, A^x K_z(x, x') A^{x'\top}
    \qquad (T \times T' \text{ blocks}).

**NTK** (NTK parameterisation, gradients with respect to the standard-normal
weights):

.. math::

    \Theta_\text{out}(x, x') = K_\text{out}(x, x')
        + \sigma_o^2 \sigma_v^2 \, A^x \left(K_z + \Theta_z\right)(x, x') A^{x'\top}.

The terms: :math:`\sigma_b^2` (bias), :math:`\sigma_o^2 \sigma_v^2 A K_z A'^\top`
(:math:`W_O`), the same again (:math:`W_V`), and :math:`\sigma_o^2 \sigma_v^2 A
\Theta_z A'^\top` (everything below, through the values).  **Modelling
assumptions** (each checked against finite networks in ``tests/test_attention.py``):

* the gradient with respect to :math:`W_Q, W_K` (or the tied :math:`W_{QK}`)
  vanishes: a logit is an average over :math:`n_k` units, so its gradient's
  squared norm is :math:`O(1/n_k)`;
* the gradient flowing into lower layers *through the logits* vanishes for
  the same reason (the logits are averages of the features' products, as the
  statistics of a LayerNorm are);
* the gradient through the values uses the usual gradient-independence
  assumption (Yang 2020, *Tensor Programs II*): :math:`W_O` and :math:`W_V` are
  used once, so it is exact here;
* all heads share the same limit: each head's :math:`A^h` converges to the same
  deterministic matrix (same :math:`\sigma_{qk}`), and the heads' values are
  independent, so the concatenation has the kernel of one head for any number
  of heads :math:`H` (the limit is taken with :math:`n_k, n_v \to \infty` at
  fixed :math:`H`; :math:`H` only matters at finite width);
* the standard :math:`1/\sqrt{n_k}` logit scaling has Gaussian (not
  deterministic) logits in the limit and no closed form through the softmax;
  it is not offered.

The layer mixes all tokens, so it needs every token pair of two sequences
(``needs_all_position_pairs``): the state holds the :math:`(N_1, N_2, T, T')`
cross covariances and each sequence's own :math:`(T, T)` block, and one layer
costs :math:`O(N_1 N_2 T^3)` time (two batched :math:`T \times T` matrix
products per pair) and :math:`O(N_1 N_2 T^2)` memory; the attention matrices are
per-sequence work, computed once per row of tiles.
"""

from __future__ import annotations

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor, nn

from ..finite import NTKSelfAttention
from ..numerics import scale_and_shift
from ..state import KernelState, per_item, unit_dims
from .base import Layer, standard_deviation, variance_property

__all__ = ["MECHANISMS", "QUERY_KEY", "SelfAttention"]

MECHANISMS = ("softmax", "identity")
QUERY_KEY = ("tied", "independent")


def _check_sequence_pairs(layer: Layer, state: KernelState) -> None:
    if len(state.positions) != 1:
        raise ValueError(
            f"{type(layer).__name__} needs sequence features (a 1-d grid of tokens), got grid "
            f"{state.positions or 'none'}: give the kernel input_shape=(T, d) with sequence inputs"
        )
    if not state.all_position_pairs:
        raise RuntimeError(
            f"{type(layer).__name__} needs every token pair; evaluate through gpytorch_tp.evaluate or a kernel"
        )


class SelfAttention(Layer):
    r"""Multi-head self-attention of infinite width with logits scaled by :math:`1/n` (see the module docstring).

    :param query_key: ``"tied"`` (:math:`W_Q = W_K`: the logits converge to
        :math:`\sigma_{qk}^2 K_z(t, s)`) or ``"independent"`` (the logits converge
        to 0: uniform attention).
    :param mechanism: ``"softmax"`` or ``"identity"`` (tied only).
    :param causal: a token attends only to itself and earlier tokens.
    :param num_heads: heads of the finite network; the limit does not depend on it.
    :param value_variance: :math:`\sigma_v^2` (default 1).
    :param output_variance: :math:`\sigma_o^2` of the output projection (default 1).
    :param bias_variance: :math:`\sigma_b^2` of the output bias (default 0; exactly 0 is held fixed).
    :param query_key_variance: :math:`\sigma_{qk}^2`, the scale of the limiting
        logits (tied); it does not enter the independent limit (default 1).
    :param kwargs: priors and constraints (``value_variance_prior``, ...,
        ``query_key_variance_constraint``) and ``batch_shape``.

    Example:
        >>> from gpytorch_tp.layers import Linear, Sequential, SelfAttention, TimeMean
        >>> net = Sequential(Linear(), SelfAttention(causal=True), TimeMean(), Linear())
    """

    needs_all_position_pairs = True
    acts_on_position_blocks = True
    has_weights = True

    def __init__(
        self,
        query_key: str = "tied",
        mechanism: str = "softmax",
        *,
        causal: bool = False,
        num_heads: int = 1,
        value_variance: float | Tensor = 1.0,
        output_variance: float | Tensor = 1.0,
        bias_variance: float | Tensor = 0.0,
        query_key_variance: float | Tensor = 1.0,
        value_variance_prior: Prior | None = None,
        output_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        query_key_variance_prior: Prior | None = None,
        value_variance_constraint: Interval | None = None,
        output_variance_constraint: Interval | None = None,
        bias_variance_constraint: Interval | None = None,
        query_key_variance_constraint: Interval | None = None,
        batch_shape: torch.Size = torch.Size(),
    ):
        super().__init__()
        if query_key not in QUERY_KEY:
            raise ValueError(f"query_key must be one of {QUERY_KEY}, got {query_key!r}")
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        if mechanism == "identity" and query_key == "independent":
            raise ValueError(
                "mechanism='identity' with independent query and key weights has limiting attention 0 "
                "(the logits converge to 0); use query_key='tied' or mechanism='softmax'"
            )
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
        self.query_key, self.mechanism = query_key, mechanism
        self.causal, self.num_heads = bool(causal), num_heads
        for name, value, prior, constraint in (
            ("value_variance", value_variance, value_variance_prior, value_variance_constraint),
            ("output_variance", output_variance, output_variance_prior, output_variance_constraint),
            ("bias_variance", bias_variance, bias_variance_prior, bias_variance_constraint),
            ("query_key_variance", query_key_variance, query_key_variance_prior, query_key_variance_constraint),
        ):
            self.register_variance(
                name,
                value,
                batch_shape=batch_shape,
                prior=prior,
                constraint=constraint,
                allow_zero=name in ("bias_variance", "query_key_variance"),
            )

    value_variance = variance_property("value_variance")

    output_variance = variance_property("output_variance")

    bias_variance = variance_property("bias_variance")

    query_key_variance = variance_property("query_key_variance")

    # -- the attention matrices (per sequence) -----------------------------------------------------

    def attention(self, self_covariance: Tensor, valid: Tensor | None, valid_is_rows: bool, scale: Tensor) -> Tensor:
        """Each sequence's limiting attention matrix ``(..., T, T)`` (rows: queries, columns: keys).

        :param self_covariance: the sequence's token covariance ``K_z(t, s)``, ``(..., T, T)``.
        :param valid: its valid tokens, ``(..., T, 1)`` (``valid_is_rows``) or ``(..., 1, T)``; ``None``: all.
        :param scale: :math:`\\sigma_{qk}^2`, broadcastable to ``(..., T, T)``.
        """
        steps = self_covariance.shape[-1]
        allowed = None
        query_valid = None
        if valid is not None:
            rows, cols = (valid, valid.transpose(-1, -2)) if valid_is_rows else (valid.transpose(-1, -2), valid)
            allowed, query_valid = cols > 0, rows
        if self.causal:
            lower = torch.ones(steps, steps, dtype=torch.bool, device=self_covariance.device).tril()
            allowed = lower if allowed is None else allowed & lower
        if self.query_key == "tied":
            logits = scale * self_covariance
        else:
            logits = torch.zeros_like(self_covariance)
        if allowed is not None:
            allowed = torch.broadcast_to(allowed, logits.shape)
        if self.mechanism == "softmax":
            if allowed is not None:
                # The smallest finite number, not -inf: rows of padding tokens may allow no key.
                logits = torch.where(allowed, logits, torch.finfo(logits.dtype).min)
            weights = torch.softmax(logits, -1)
        else:
            weights = logits
        if allowed is not None:
            weights = weights * allowed
        if query_valid is not None:
            weights = weights * query_valid
        return weights

    # -- the recursion ------------------------------------------------------------------------------

    def forward(self, state: KernelState) -> KernelState:
        _check_sequence_pairs(self, state)
        scale = unit_dims(self.query_key_variance, state.item_ndim + 2)
        first = per_item(self.attention, state.var1, state.valid1, True, scale)
        second = per_item(self.attention, state.var2, state.valid2, False, scale)
        # Through per_item, so that every tile gets the same tensor (and the per-item cache hits).
        gain = unit_dims(per_item(torch.mul, self.output_variance, self.value_variance), state.item_ndim + 2)
        bias = unit_dims(self.bias_variance, state.item_ndim + 2)
        mixed = _mix(first, state.cross, second)
        cross = scale_and_shift(mixed, gain, bias)
        ntk = None
        if state.track_ntk:
            through = mixed if state.ntk is None else mixed + _mix(first, state.ntk, second)
            ntk = torch.addcmul(cross, gain, through)
        var1 = per_item(_mixed_self, first, state.var1, gain, bias)
        var2 = per_item(_mixed_self, second, state.var2, gain, bias)
        return state.after_weights(cross=cross, var1=var1, var2=var2, ntk=ntk)

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(
                f"SelfAttention needs sequence features (channels, T), got feature shape {tuple(in_shape)}"
            )
        module = NTKSelfAttention(
            in_shape[0],
            width,
            num_heads=self.num_heads,
            head_width=width,
            query_key=self.query_key,
            mechanism=self.mechanism,
            causal=self.causal,
            value_std=standard_deviation(self.value_variance.detach()),
            output_std=standard_deviation(self.output_variance.detach()),
            bias_std=standard_deviation(self.bias_variance.detach()),
            query_key_std=standard_deviation(self.query_key_variance.detach()),
        )
        return module, (width, in_shape[1])

    def extra_repr(self) -> str:
        causal = "causal, " if self.causal else ""
        return f"query_key={self.query_key!r}, mechanism={self.mechanism!r}, {causal}" + super().extra_repr()


def _mix(first: Tensor, covariance: Tensor, second: Tensor) -> Tensor:
    """``A1 K A2^T`` for every pair of sequences: two batched ``T x T`` matrix products."""
    return torch.matmul(torch.matmul(first, covariance), second.transpose(-1, -2))


def _mixed_self(attention: Tensor, self_covariance: Tensor, gain: Tensor, bias: Tensor) -> Tensor:
    return scale_and_shift(_mix(attention, self_covariance, attention), gain, bias)
