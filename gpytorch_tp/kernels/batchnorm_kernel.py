r"""Pairwise GPyTorch kernel of a BatchNorm + ReLU MLP, with a fixed reference set."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from gpytorch.kernels import Kernel
from linear_operator.operators import LinearOperator
from gpytorch.priors import Prior
from torch import Tensor, nn

from ..batchnorm import (
    batchnorm_relu_cross,
    batchnorm_relu_cross_ntk,
    batchnorm_relu_single,
    batchnorm_relu_single_ntk,
    per_layer,
    quadrature_rule,
)
from ..dense_update import dense_update
from ..evaluation import check_inputs
from ..layers.base import WeightBiasVariances
from ..state import KINDS
from .presets import check_depth
from .tensor_program_kernel import check_feature_sizes

__all__ = ["BatchNormMLPKernel"]

# Pairs per chunk of the cross-batch quadrature: bounded memory (about 16 MB a pair for 9-point batches).
_PAIRS_PER_CHUNK = 16


class BatchNormMLPKernel(Kernel):
    r"""NNGP kernel or NTK of an infinitely wide BatchNorm + ReLU MLP, made pairwise by a reference set.

    The network (:mod:`gpytorch_tp.batchnorm`) has ``depth`` blocks
    ``Linear -> BatchNorm -> ReLU`` and a linear readout, NTK-parameterised
    dense layers (:class:`~gpytorch_tp.layers.Linear`) and BatchNorm in
    training mode without affine parameters.  Its output at a point depends on
    the whole batch, so it has no kernel between *points* by itself.  This
    kernel evaluates every point in a batch with a fixed reference set
    :math:`R = \{r_1, \dots, r_m\}` (a buffer set at construction):

    .. math::

        k(x, x') = \lim_{n \to \infty}
            \operatorname{Cov}\big[f_{\{x\} \cup R}(x),\; f_{\{x'\} \cup R}(x')\big],

    where :math:`f_B` is the network applied to the batch :math:`B` and
    :math:`f_{\{x\} \cup R}(x)` its output at :math:`x`.  :math:`x \mapsto
    f_{\{x\} \cup R}(x)` is one random function (the same weights for every
    :math:`x`), so :math:`k` is its covariance: symmetric and positive
    semi-definite for any points.  :math:`k(x, x')` is the cross-batch kernel
    of the batches :math:`\{x\} \cup R` and :math:`\{x'\} \cup R` (two-dimensional
    quadrature per pair and layer); :math:`k(x, x)` (and :math:`k(x, x')` for
    :math:`x' = x` exactly) is the single-batch kernel (one-dimensional).

    **Why a dedicated kernel, not a layer.**  The layer framework
    (:class:`~gpytorch_tp.state.KernelState`) passes per-pair statistics with
    per-item variances; BatchNorm needs, for each pair, the joint covariance of
    two whole batches (``(m+1) x (m+1)`` blocks) at every layer.  The kernel
    therefore runs its own recursion: per item, the single-batch covariances of
    :math:`\{x\} \cup R` at every layer (computed once per item per call); per
    pair, the cross block.  The quadrature nodes of a batch depend on that batch
    only, so the value of a pair never depends on the other points of the
    matrix (``K[i, j]`` of a big matrix equals the kernel of the slice).

    **Cost.**  Per pair and layer, a two-dimensional quadrature of roughly
    :math:`20^2`-:math:`40^2` nodes, each a Cholesky factorisation of size
    :math:`2(m + 1)`: keep :math:`m` small (a handful to a few tens of points).
    The NTK (``kind="ntk"``, NTK parameterisation) is
    :math:`\lim \langle \nabla_\theta f_{\{x\} \cup R}(x), \nabla_\theta f_{\{x'\} \cup R}(x') \rangle`,
    an inner product of features, hence PSD too; it is finite only when every
    batch's centred covariance has rank at least 3 (inputs of dimension at
    least 3 and a reference set of at least 3 points; see
    :func:`gpytorch_tp.batchnorm.batchnorm_relu_single_ntk`), and costs about
    twice the NNGP.

    The recursion runs in float64; the result has the dtype of the inputs and
    the hyperparameters together (float32 inputs with float64 hyperparameters
    give float64, as for :class:`~gpytorch_tp.TensorProgramKernel`).

    :param reference_points: :math:`R`, ``(m, d)`` with :math:`m \ge 1`.
    :param depth: number of BatchNorm + ReLU blocks.
    :param weight_variance: starting :math:`\sigma_w^2` of every dense layer (default 2), or a
        list of ``depth + 1``, one per dense layer (first to readout).
    :param bias_variance: starting :math:`\sigma_b^2` of every dense layer (default 0.1; the
        hidden layers' biases are removed by the BatchNorm that follows), or a list of ``depth + 1``.
    :param eps: BatchNorm's :math:`\epsilon` (default 0: exact normalisation; a
        batch of identical points then raises ``ValueError``).
    :param accuracy: ``"fast"`` (about 1e-6 relative, 4x faster), ``"default"`` (about 1e-9 per layer:
        up to 1.5e-8 measured at depth 2) or ``"fine"`` (1e-13); the NTK of batches of centred rank 3
        (3 reference points, or inputs of dimension 3) only to about 1e-6 with every rule (see
        :func:`gpytorch_tp.batchnorm.quadrature_rule` and ``docs/batchnorm.md``).
    :param weight_variance_prior: prior on every dense layer's :math:`\sigma_w^2`.
    :param bias_variance_prior: prior on every dense layer's :math:`\sigma_b^2`.
    :param kind: ``"nngp"`` or ``"ntk"``.

    Example:
        >>> import torch, gpytorch
        >>> from gpytorch_tp.kernels import BatchNormMLPKernel
        >>> reference = torch.randn(4, 3, dtype=torch.float64)
        >>> kernel = BatchNormMLPKernel(reference, depth=1).double()
        >>> kernel(torch.randn(5, 3, dtype=torch.float64)).to_dense().shape
        torch.Size([5, 5])
    """

    has_lengthscale = False

    def __init__(
        self,
        reference_points: Tensor,
        depth: int = 2,
        *,
        weight_variance: float | Sequence[float] = 2.0,
        bias_variance: float | Sequence[float] = 0.1,
        eps: float = 0.0,
        accuracy: str = "default",
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        kind: str = "nngp",
        **kwargs,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be 'nngp' or 'ntk', got {kind!r}")
        check_depth(depth, counts="BatchNorm blocks")
        if kwargs.get("batch_shape"):
            raise ValueError("BatchNormMLPKernel does not support a batch_shape of hyperparameters")
        if not torch.is_tensor(reference_points) or not reference_points.is_floating_point():
            raise TypeError("reference_points must be a float32 or float64 tensor")
        if reference_points.dim() != 2 or reference_points.shape[0] < 1:
            raise ValueError(
                "reference_points must be (m, d) with m >= 1: every point is normalised in a batch with them "
                f"(a batch of size 1 has no BatchNorm statistics), got shape {tuple(reference_points.shape)}"
            )
        if not bool(torch.isfinite(reference_points).all()):
            raise ValueError("reference_points contains NaN or infinite values")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        quadrature_rule(torch.float64, accuracy)  # validates ``accuracy``
        weight_variances = per_layer(weight_variance, depth, "weight_variance")
        bias_variances = per_layer(bias_variance, depth, "bias_variance")
        super().__init__(**kwargs)
        self.register_buffer("reference_points", reference_points.detach().clone())
        # The dense layers' hyperparameters only: the kernel runs its own recursion (``dense_update``).
        self.dense = nn.ModuleList(
            WeightBiasVariances(
                weight,
                bias,
                weight_variance_prior=copy.deepcopy(weight_variance_prior),
                bias_variance_prior=copy.deepcopy(bias_variance_prior),
            )
            for weight, bias in zip(weight_variances, bias_variances)
        )
        self.depth = depth
        self.eps = float(eps)
        self.accuracy = accuracy
        self.kind = kind

    def __call__(
        self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor | LinearOperator:
        check_feature_sizes(self, x1, x2)
        return super().__call__(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params) -> Tensor:
        if last_dim_is_batch:
            raise ValueError("BatchNormMLPKernel does not support last_dim_is_batch")
        features = self.reference_points.shape[-1]
        check_inputs(x1, x2)
        for name, x in (("x1", x1), ("x2", x2)):
            if x.shape[-1] != features:
                raise ValueError(
                    f"{name} has {x.shape[-1]} features but the reference points (input shape) have {features}"
                )
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
        if diag and x1.shape[-2] != x2.shape[-2]:
            raise ValueError(f"diag=True needs as many x1 as x2 points, got {x1.shape[-2]} and {x2.shape[-2]}")
        # The result's dtype is that of the inputs and the hyperparameters together, as for
        # TensorProgramKernel (float32 inputs, float64 hyperparameters: float64).
        dtype = x1.dtype
        for weight, bias in self._variances(None):
            dtype = torch.promote_types(dtype, torch.promote_types(weight.dtype, bias.dtype))
        n1, n2 = x1.shape[-2], x2.shape[-2]
        out_shape = (*batch, n1) if diag else (*batch, n1, n2)
        if math.prod(out_shape) == 0:
            # Nothing to evaluate (0 points or an empty batch): an empty result, as GPyTorch's own
            # kernels give, still attached to the hyperparameters for autograd.
            attached = sum((w + b).sum() for w, b in self._variances(None)) * 0
            return x1.new_zeros(out_shape, dtype=dtype) + attached.to(dtype)
        # Flattened batch (reshape(-1, ...) cannot infer a size for 0 points).
        x1 = x1.expand(*batch, n1, x1.shape[-1]).reshape(math.prod(batch), n1, x1.shape[-1])
        x2 = x2.expand(*batch, n2, x2.shape[-1]).reshape(math.prod(batch), n2, x2.shape[-1])
        # The quadrature works in float64 (see gpytorch_tp.batchnorm); so does the whole recursion.
        x1, x2 = x1.to(torch.float64), x2.to(torch.float64)
        results = [self._one(a, b, diag, same) for a, b in zip(x1, x2)]
        result = torch.stack(results).to(dtype)
        return result.reshape(out_shape)

    def _variances(self, dtype: torch.dtype | None) -> list[tuple[Tensor, Tensor]]:
        """Every dense layer's ``(weight, bias)`` variances, in ``dtype`` (``None``: as stored)."""
        if dtype is None:
            return [(layer.weight_variance, layer.bias_variance) for layer in self.dense]
        return [(layer.weight_variance.to(dtype), layer.bias_variance.to(dtype)) for layer in self.dense]

    def _batches(self, x: Tensor) -> Tensor:
        """``(N, m + 1, d)``: each point followed by the reference points."""
        reference = self.reference_points.to(dtype=x.dtype, device=x.device)
        return torch.cat([x.unsqueeze(-2), reference.expand(x.shape[0], *reference.shape)], -2)

    def _item_covariances(self, batches: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """Per item, at each BatchNorm and at the output: the covariance over its batch (and the NTK)."""
        variances = self._variances(batches.dtype)
        rule = quadrature_rule(torch.float64, self.accuracy)
        weight, bias = variances[0]
        track_ntk = self.kind == "ntk"
        cov, ntk = dense_update(batches @ batches.transpose(-1, -2) / batches.shape[-1], weight, bias, None, track_ntk)
        layers = [(cov, ntk)]
        for weight, bias in variances[1:]:
            if track_ntk:
                value, derivative = batchnorm_relu_single_ntk(cov, ntk, self.eps, rule)
            else:
                value, derivative = batchnorm_relu_single(cov, self.eps, rule), None
            cov, ntk = dense_update(value, weight, bias, derivative, track_ntk)
            layers.append((cov, ntk))
        return layers

    def _pairs(self, batches1: Tensor, batches2: Tensor, items1: list, items2: list, i, j) -> Tensor:
        """``k`` for the pairs ``(i[p], j[p])`` by the cross-batch recursion, in chunks."""
        variances = self._variances(batches1.dtype)
        rule = quadrature_rule(torch.float64, self.accuracy)
        track_ntk = self.kind == "ntk"
        values = []
        for start in range(0, len(i), _PAIRS_PER_CHUNK):
            a, b = i[start : start + _PAIRS_PER_CHUNK], j[start : start + _PAIRS_PER_CHUNK]
            weight, bias = variances[0]
            inputs = batches1[a] @ batches2[b].transpose(-1, -2) / batches1.shape[-1]
            cross, ntk = dense_update(inputs, weight, bias, None, track_ntk)
            for layer, (weight, bias) in enumerate(variances[1:]):
                cov11, cov22 = items1[layer][0][a], items2[layer][0][b]
                if track_ntk:
                    value, derivative = batchnorm_relu_cross_ntk(cov11, cross, cov22, ntk, self.eps, rule)
                else:
                    value, derivative = batchnorm_relu_cross(cov11, cross, cov22, self.eps, rule), None
                cross, ntk = dense_update(value, weight, bias, derivative, track_ntk)
            values.append((ntk if track_ntk else cross)[:, 0, 0])
        if not values:
            return batches1.new_zeros(0)
        return torch.cat(values)

    def _one(self, x1: Tensor, x2: Tensor, diag: bool, same: bool) -> Tensor:
        batches1 = self._batches(x1)
        items1 = self._item_covariances(batches1)
        if same:
            batches2, items2 = batches1, items1
        else:
            batches2 = self._batches(x2)
            items2 = self._item_covariances(batches2)
        n1, n2 = x1.shape[0], x2.shape[0]
        if diag:
            i = j = torch.arange(n1, device=x1.device)
        elif same:
            i, j = torch.triu_indices(n1, n2, offset=1, device=x1.device)
        else:
            i, j = torch.meshgrid(torch.arange(n1, device=x1.device), torch.arange(n2, device=x1.device), indexing="ij")
            i, j = i.reshape(-1), j.reshape(-1)
        # A pair of identical points is one batch: the single-batch value (exactly; the cross-batch
        # quadrature of two identical batches agrees to its tolerance).
        identical = (x1[i] == x2[j]).all(-1)
        output = 0 if self.kind == "nngp" else 1
        self1 = items1[-1][output][:, 0, 0]
        values = torch.where(identical, self1[i], 0.0 * self1[i])
        distinct = (~identical).nonzero().squeeze(-1)
        if len(distinct):
            cross = self._pairs(batches1, batches2, items1, items2, i[distinct], j[distinct])
            values = values.index_put((distinct,), cross)
        if diag:
            return values
        if same:
            upper = torch.zeros(n1, n2, dtype=values.dtype, device=values.device).index_put((i, j), values)
            return upper + upper.transpose(-1, -2) + torch.diag_embed(self1)
        return values.reshape(n1, n2)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, reference_points={tuple(self.reference_points.shape)}, eps={self.eps:g}"
