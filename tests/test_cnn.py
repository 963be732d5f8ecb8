"""Convolutional networks: CNN NNGP kernels and NTKs against independent computations.

1. An independent dense reference of the recursion (written here with explicit matrices,
   see :func:`reference`) agrees with :func:`gpytorch_tp.evaluate` to ~1e-12 for every
   padding mode, strides, even filters, 1-d and 2-d grids, average pooling, both readouts,
   residual blocks, NNGP and NTK.
2. Finite-width ``torch`` CNNs (:func:`gpytorch_tp.empirical.build_network`) approach the
   kernels as the channels grow, for each readout, padding mode and a residual block.
3. The tiled evaluation, the diagonal, rectangular and batched inputs and the aligned
   position pairs of a Flatten readout all give the same numbers.
4. :class:`~gpytorch_tp.CNNKernel` and :class:`~gpytorch_tp.MyrtleKernel` behave as GPyTorch kernels.
5. Bad input gets a clear message.
6. The progress bar shows when asked for, and only then.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import pickle
import re
import unittest

import gpytorch
import numpy as np
import pytest
import torch
from gpytorch.priors import GammaPrior
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

try:  # the reference's many small matrix products run best on one BLAS thread
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

from kernel_checks import relative_error

from gpytorch_tp import CNNKernel, MyrtleKernel, evaluate
from gpytorch_tp.empirical import build_network, empirical_nngp, empirical_ntk
from gpytorch_tp.evaluation import InputLayout, input_state
from gpytorch_tp.evaluation.workers import intra_op_threads
from gpytorch_tp.layers import (
    AvgPool1d,
    AvgPool2d,
    Conv,
    Conv1d,
    Conv2d,
    Erf,
    Flatten,
    GlobalAvgPool,
    Identity,
    Linear,
    ReLU,
    Residual,
    Sequential,
)

DTYPE = torch.float64


def _images(n: int, shape: tuple[int, ...], seed: int, dtype=DTYPE) -> torch.Tensor:
    """``n`` random items of ``shape``, flattened; item 1 has twice the norm of the others."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, math.prod(shape), generator=g, dtype=dtype)
    if n > 1:
        x[1] *= 2.0
    return x


# =============================================================================================
# 1. An independent dense reference of the recursion.
# =============================================================================================
#
# An architecture is described by a small spec (tuples), from which both the package's layers
# and the reference are built:
#   ("conv", kernel_size, stride, padding, weight_variance, bias_variance)  (sizes per grid axis)
#   ("relu",)  ("erf",)  ("pool", kernel_size, stride)  ("gap",)  ("flatten",)
#   ("linear", weight_variance, bias_variance)
#   ("residual", block_spec, skip_spec or None)
#
# The reference keeps, for all N items together, the covariance of a layer's features as one
# dense (N P) x (N P) matrix over (item, position) pairs, and the NTK likewise.  A convolution
# is a sum over filter offsets o of selection matrices S_o (P_out x P_in; a row of zeros where
# the window reaches into zero padding, a wrapped index for circular padding, every s-th row for
# stride s):  K' = w / k sum_o S_o K S_o^T + b,  Theta' = K' + w / k sum_o S_o Theta S_o^T.


def _axis_selections(size: int, kernel: int, stride: int, mode: str) -> list[np.ndarray]:
    """One (out x size) 0/1 matrix per filter offset along one grid axis."""
    if mode == "valid":
        before, out = 0, (size - kernel) // stride + 1
    else:  # TensorFlow's "SAME": ceil(size / stride) outputs, the odd padding position at the end
        out = -(-size // stride)
        before = max((out - 1) * stride + kernel - size, 0) // 2
    selections = []
    for o in range(kernel):
        s = np.zeros((out, size))
        for q in range(out):
            p = q * stride + o - before
            if mode == "circular":
                s[q, p % size] = 1.0
            elif 0 <= p < size:
                s[q, p] = 1.0
        selections.append(s)
    return selections


def _kron_all(matrices: list[np.ndarray]) -> np.ndarray:
    out = np.ones((1, 1))
    for m in matrices:
        out = np.kron(out, m)  # row-major position order, as torch.flatten
    return out


def _conv_matrices(grid, kernel, stride, mode) -> tuple[list[np.ndarray], tuple[int, ...]]:
    per_axis = [_axis_selections(n, k, s, mode) for n, k, s in zip(grid, kernel, stride)]
    mats = [_kron_all(list(combo)) for combo in itertools.product(*per_axis)]
    return mats, tuple(a[0].shape[0] for a in per_axis)


def _pool_matrix(grid, kernel, stride) -> tuple[np.ndarray, tuple[int, ...]]:
    per_axis = []
    for n, k, s in zip(grid, kernel, stride):
        out = (n - k) // s + 1
        a = np.zeros((out, n))
        for q in range(out):
            a[q, q * s : q * s + k] = 1.0 / k
        per_axis.append(a)
    return _kron_all(per_axis), tuple(a.shape[0] for a in per_axis)


def _relu_moments(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[relu(u) relu(v)] and P(u > 0, v > 0) for (u, v) with covariance blocks of ``k``."""
    d = np.sqrt(np.diag(k))
    norms = np.outer(d, d)
    cos = np.clip(k / norms, -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)  # each (item, position) with itself: exactly (arccos is steep at 1)
    theta = np.arccos(cos)
    j1 = norms * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)
    j0 = (np.pi - theta) / (2 * np.pi)
    return j1, j0


def _erf_moments(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[erf(u) erf(v)] and E[erf'(u) erf'(v)] (Williams 1997)."""
    d = np.diag(k)
    one_plus = 1.0 + 2.0 * d
    v = (2 / np.pi) * np.arcsin(2 * k / np.sqrt(np.outer(one_plus, one_plus)))
    dv = (4 / np.pi) / np.sqrt(np.outer(one_plus, one_plus) - 4 * k**2)
    return v, dv


class _Ref:
    """Dense covariance and NTK over (item, position) pairs of N items on a grid."""

    def __init__(self, x: np.ndarray, shape: tuple[int, ...]):
        n, c = x.shape[0], shape[0]
        self.n, self.grid = n, tuple(shape[1:])
        z = x.reshape(n, c, -1).transpose(0, 2, 1).reshape(-1, c)  # rows: (item, position)
        self.k = z @ z.T / c
        self.ntk = np.zeros_like(self.k)

    def _both_sides(self, m: np.ndarray, k: np.ndarray) -> np.ndarray:
        """``(I_N kron m) k (I_N kron m)^T``: the same map of positions on every item."""
        p = k.shape[0] // self.n
        blocks = k.reshape(self.n, p, self.n, p)
        out = np.einsum("ap,ipjq,bq->iajb", m, blocks, m, optimize=True)
        return out.reshape(self.n * m.shape[0], self.n * m.shape[0])

    def apply(self, layer) -> _Ref:
        kind = layer[0]
        if kind == "conv":
            _, kernel, stride, mode, w, b = layer
            mats, out_grid = _conv_matrices(self.grid, kernel, stride, mode)
            k_sum = sum(self._both_sides(s, self.k) for s in mats)
            t_sum = sum(self._both_sides(s, self.ntk) for s in mats)
            filter_size = math.prod(kernel)
            self.k = w / filter_size * k_sum + b
            self.ntk = self.k + w / filter_size * t_sum
            self.grid = out_grid
        elif kind in ("relu", "erf"):
            value, derivative = (_relu_moments if kind == "relu" else _erf_moments)(self.k)
            self.k, self.ntk = value, derivative * self.ntk
        elif kind == "pool":
            a, out_grid = _pool_matrix(self.grid, layer[1], layer[2])
            self.k, self.ntk = self._both_sides(a, self.k), self._both_sides(a, self.ntk)
            self.grid = out_grid
        elif kind in ("gap", "flatten"):
            p = math.prod(self.grid)
            if kind == "gap":
                mean = np.full((1, p), 1.0 / p)
                self.k, self.ntk = self._both_sides(mean, self.k), self._both_sides(mean, self.ntk)
            else:  # the mean over aligned positions: sum_p K[(i, p), (j, p)] / p
                self.k = np.einsum("ipjp->ij", self.k.reshape(self.n, p, self.n, p)) / p
                self.ntk = np.einsum("ipjp->ij", self.ntk.reshape(self.n, p, self.n, p)) / p
            self.grid = ()
        elif kind == "linear":
            _, w, b = layer
            self.k = w * self.k + b
            self.ntk = self.k + w * self.ntk
        elif kind == "residual":
            _, block, skip = layer
            a = self.copy().run(block)
            s = self.copy().run(skip) if skip is not None else self
            assert a.grid == s.grid
            self.k, self.ntk, self.grid = a.k + s.k, a.ntk + s.ntk, a.grid
        else:
            raise AssertionError(kind)
        return self

    def copy(self) -> _Ref:
        new = object.__new__(_Ref)
        new.__dict__.update(self.__dict__)
        return new

    def run(self, spec) -> _Ref:
        for layer in spec:
            self.apply(layer)
        return self


def reference(spec, x: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference NNGP kernel and NTK (N x N) of ``spec`` on the flattened items ``x``."""
    with threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext():
        out = _Ref(x.detach().numpy().astype(np.float64), shape).run(spec)
    assert out.grid == (), "the spec must end with a readout"
    return torch.from_numpy(out.k), torch.from_numpy(out.ntk)


def _exact(layer, w, b):
    # Variances given as Python floats are stored in the default dtype (float32); set them again
    # in float64 so that the kernel uses exactly the reference's values.
    layer = layer.double()
    layer.weight_variance, layer.bias_variance = w, b
    return layer


def build(spec, grid_ndim: int) -> Sequential:
    """The package's architecture of ``spec``."""
    layers = []
    for layer in spec:
        kind = layer[0]
        if kind == "conv":
            _, kernel, stride, mode, w, b = layer
            conv = Conv1d if grid_ndim == 1 else Conv2d
            layers.append(_exact(conv(kernel, stride, mode, w, b), w, b))
        elif kind == "relu":
            layers.append(ReLU())
        elif kind == "erf":
            layers.append(Erf())
        elif kind == "pool":
            pool = AvgPool1d if grid_ndim == 1 else AvgPool2d
            layers.append(pool(layer[1], layer[2]))
        elif kind == "gap":
            layers.append(GlobalAvgPool())
        elif kind == "flatten":
            layers.append(Flatten())
        elif kind == "linear":
            layers.append(_exact(Linear(layer[1], layer[2]), layer[1], layer[2]))
        elif kind == "residual":
            _, block, skip = layer
            skip_layer = None if skip is None else build(skip, grid_ndim)
            layers.append(Residual(*build(block, grid_ndim), skip=skip_layer))
    return Sequential(*layers).double()


def _conv(k, s, mode, w=2.0, b=0.1, nd=2):
    return ("conv", (k,) * nd, (s,) * nd, mode, w, b)


READOUT = {"gap": [("gap",), ("linear", 1.5, 0.05)], "flatten": [("flatten",), ("linear", 1.5, 0.05)]}


def _two_layer(mode, readout, k=3, s=1, nd=2):
    return [_conv(k, s, mode, 1.7, 0.1, nd), ("relu",), _conv(k, s, mode, 2.0, 0.2, nd), ("relu",), *READOUT[readout]]


SHAPE_2D = (2, 5, 5)
SHAPE_1D = (2, 7)

REFERENCE_CASES = {
    # name: (spec, input shape)
    **{f"2d-{m}-{r}": (_two_layer(m, r), SHAPE_2D) for m in ("same", "valid", "circular") for r in ("gap", "flatten")},
    **{
        f"1d-{m}-{r}": (_two_layer(m, r, nd=1), SHAPE_1D)
        for m in ("same", "valid", "circular")
        for r in ("gap", "flatten")
    },
    "2d-stride2-same-gap": (_two_layer("same", "gap", s=2), (1, 6, 6)),
    "2d-stride2-circular-flatten": (_two_layer("circular", "flatten", s=2), (1, 5, 5)),
    "2d-stride2-valid-flatten": (_two_layer("valid", "flatten", s=2), (1, 7, 7)),
    "1d-stride2-same-flatten": (_two_layer("same", "flatten", s=2, nd=1), SHAPE_1D),
    "2d-even-kernel-same-gap": (_two_layer("same", "gap", k=2), SHAPE_2D),
    "2d-even-kernel-circular-flatten": (_two_layer("circular", "flatten", k=2), SHAPE_2D),
    "1d-even-kernel-same-flatten": (_two_layer("same", "flatten", k=2, nd=1), SHAPE_1D),
    "1d-circular-filter-wider-than-the-signal": (
        [
            _conv(5, 1, "circular", 1.5, 0.1, nd=1),
            ("relu",),
            _conv(4, 1, "circular", 2.0, 0.1, nd=1),
            ("relu",),
            *READOUT["gap"],
        ],
        (2, 3),
    ),
    "2d-rectangular-filter-stride": (
        [
            ("conv", (3, 2), (1, 2), "same", 1.8, 0.1),
            ("relu",),
            ("conv", (2, 3), (2, 1), "valid", 2.0, 0.0),
            ("relu",),
            *READOUT["flatten"],
        ],
        (1, 6, 5),
    ),
    "2d-pool-gap": (
        [_conv(3, 1, "same"), ("relu",), ("pool", (2, 2), (2, 2)), _conv(3, 1, "same"), ("relu",), *READOUT["gap"]],
        (1, 6, 6),
    ),
    "2d-pool-flatten": (
        [
            _conv(3, 1, "same"),
            ("relu",),
            ("pool", (2, 2), (1, 1)),
            _conv(2, 1, "circular"),
            ("relu",),
            *READOUT["flatten"],
        ],
        SHAPE_2D,
    ),
    "1d-pool-overlapping-flatten": (
        [
            _conv(3, 1, "same", nd=1),
            ("relu",),
            ("pool", (3,), (2,)),
            _conv(2, 1, "same", nd=1),
            ("erf",),
            *READOUT["flatten"],
        ],
        SHAPE_1D,
    ),
    "2d-erf-flatten": (
        [_conv(3, 1, "same", 1.5, 0.1), ("erf",), _conv(3, 1, "valid", 1.5, 0.1), ("erf",), *READOUT["flatten"]],
        SHAPE_2D,
    ),
    "2d-residual-conv-skip-gap": (
        [
            _conv(3, 1, "same"),
            ("relu",),
            (
                "residual",
                [_conv(3, 1, "same", 1.5, 0.1), ("relu",), _conv(3, 1, "same", 2.0, 0.05)],
                [_conv(1, 1, "same", 1.0, 0.1)],
            ),
            ("relu",),
            *READOUT["gap"],
        ],
        SHAPE_2D,
    ),
    "2d-residual-conv-skip-flatten": (
        [
            _conv(3, 1, "same"),
            ("relu",),
            (
                "residual",
                [_conv(3, 2, "same", 1.5, 0.1), ("relu",), _conv(3, 1, "same", 2.0, 0.05)],
                [_conv(1, 2, "same", 1.0, 0.1)],
            ),
            ("relu",),
            *READOUT["flatten"],
        ],
        SHAPE_2D,
    ),
    "2d-residual-identity-skip-gap": (
        [
            _conv(3, 1, "same"),
            ("residual", [("relu",), _conv(3, 1, "circular", 1.5, 0.1)], None),
            ("relu",),
            *READOUT["gap"],
        ],
        SHAPE_2D,
    ),
    "1d-residual-identity-skip-flatten": (
        [
            _conv(3, 1, "same", nd=1),
            ("residual", [("relu",), _conv(3, 1, "same", 1.5, 0.1, nd=1)], None),
            ("relu",),
            *READOUT["flatten"],
        ],
        SHAPE_1D,
    ),
}


def _grid_ndim(shape):
    return len(shape) - 1


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_kernel_matches_the_dense_reference(name):
    spec, shape = REFERENCE_CASES[name]
    x1, x2 = _images(4, shape, 1), _images(3, shape, 2)
    arch = build(spec, _grid_ndim(shape))
    for a, b in ((x1, None), (x1, x2)):
        both = a if b is None else torch.cat([a, b])
        k_ref, t_ref = reference(spec, both, shape)
        n = a.shape[0]
        if b is not None:
            k_ref, t_ref = k_ref[:n, n:], t_ref[:n, n:]
        nngp, ntk = evaluate(arch, a, b, ntk=True, input_shape=shape)
        assert nngp.shape == k_ref.shape
        torch.testing.assert_close(nngp, k_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ntk, t_ref, rtol=1e-12, atol=1e-12)
        if b is None:  # the NTK adds positive terms to the NNGP kernel on the diagonal
            assert (ntk.diagonal() > nngp.diagonal()).all()


def test_reference_selection_matrices_match_torch_convolution():
    # The reference's padding and striding, checked against torch's own convolution (zero and
    # circular padding by F.pad with TensorFlow's SAME amounts, worked out by hand here).
    g = torch.Generator().manual_seed(0)
    for size, k, s, mode, pads in [
        (5, 3, 1, "same", (1, 1)),
        (5, 2, 1, "same", (0, 1)),
        (6, 3, 2, "same", (0, 1)),
        (5, 3, 2, "same", (1, 1)),
        (6, 2, 2, "same", (0, 0)),
        (7, 3, 2, "valid", (0, 0)),
        (5, 3, 1, "circular", (1, 1)),
        (5, 2, 1, "circular", (0, 1)),
        (5, 3, 2, "circular", (1, 1)),
        (3, 5, 1, "circular", (2, 2)),
        (3, 4, 1, "circular", (1, 2)),
    ]:
        z = torch.randn(1, 1, size, generator=g, dtype=DTYPE)
        w = torch.randn(1, 1, k, generator=g, dtype=DTYPE)
        padded = torch.nn.functional.pad(z, pads, mode="circular" if mode == "circular" else "constant")
        expected = torch.nn.functional.conv1d(padded, w, stride=s)[0, 0].numpy()
        mats = _axis_selections(size, k, s, mode)
        got = sum(w[0, 0, o].item() * (m @ z[0, 0].numpy()) for o, m in enumerate(mats))
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)


# =============================================================================================
# 2. Finite-width CNNs approach the kernels as the channels grow.
# =============================================================================================
#
# Empirical NNGP: the output covariance of networks with a wide readout (``out_features`` equal
# to the width: each network gives that many outputs, i.i.d. given its hidden features),
# averaged over NETWORKS["nngp"] networks (gpytorch_tp.empirical.empirical_nngp).  Empirical
# NTK: the parameter-gradient inner product of one-output networks, averaged over
# NETWORKS["ntk"] networks (computed here item by item, see _empirical_ntk; it equals
# gpytorch_tp.empirical.empirical_ntk, checked below, and takes half its time).  Inputs: 5
# images and a duplicate of the first; one image has twice the norm of the others.
#
# Checks per case and kernel:
# * the relative Frobenius error at the wide width (256 channels) is below BOUNDS[kind];
# * it is below the typical error at the narrow width (16 channels; the mean over
#   NARROW_BATCHES independent batches of as many networks) divided by RATIO[kind]: the error
#   falls with the width.  Its fluctuating part scales like 1 / sqrt(width * networks), so the
#   expected ratio is about 4; single batches scatter widely, hence the mean at the narrow width.
# The bounds and ratios were set from runs with 8 independent seed sets (SEED_OFFSET 0..7):
# the largest error (smallest ratio) seen, with a margin.  The seeds are then fixed
# (SEED_OFFSET = 0), so the tests are deterministic.

NARROW, MIDDLE, WIDE = 16, 64, 256
NETWORKS = {"nngp": 8, "ntk": 4}
NARROW_BATCHES = 3
SEED_OFFSET = 0  # changed only by the offline runs that set the bounds


def _limit_spec(mode: str, readout: str) -> list:
    return [_conv(3, 1, mode, 1.7, 0.1), ("relu",), _conv(3, 1, mode, 2.0, 0.1), ("relu",), *READOUT[readout]]


LIMIT_CASES = {
    # name: (spec, input shape); "valid" shrinks the grid by 2 per layer, so its images are larger
    **{
        f"{mode}-{readout}": (_limit_spec(mode, readout), (2, 6, 6) if mode == "valid" else (2, 4, 4))
        for mode in ("same", "valid", "circular")
        for readout in ("gap", "flatten")
    },
    "residual-conv-skip-gap": (
        [
            _conv(3, 1, "same", 1.7, 0.1),
            ("relu",),
            (
                "residual",
                [_conv(3, 1, "same", 1.5, 0.1), ("relu",), _conv(3, 1, "same", 2.0, 0.05)],
                [_conv(1, 1, "same", 1.0, 0.1)],
            ),
            ("relu",),
            *READOUT["gap"],
        ],
        (2, 4, 4),
    ),
    "residual-identity-skip-flatten": (
        [
            _conv(3, 1, "same", 1.7, 0.1),
            ("residual", [("relu",), _conv(3, 1, "circular", 1.5, 0.1)], None),
            ("relu",),
            *READOUT["flatten"],
        ],
        (2, 4, 4),
    ),
}


def _limit_inputs(shape) -> torch.Tensor:
    x = _images(5, shape, 2024)
    return torch.cat([x, x[:1]])


def _empirical_ntk(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the parameter gradients of a one-output network, one item at a time."""
    params = list(network.parameters())
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(network(x[i : i + 1]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jacobian = torch.stack(rows)
    return jacobian @ jacobian.T


def _empirical(arch, shape, x, kind: str, width: int, seeds: list[int]) -> torch.Tensor:
    seeds = [100_000 * SEED_OFFSET + s for s in seeds]
    if kind == "nngp":
        return empirical_nngp(
            lambda i: build_network(arch, shape, width, out_features=width, seed=seeds[i], dtype=DTYPE),
            x,
            n_networks=len(seeds),
        )
    return sum(_empirical_ntk(build_network(arch, shape, width, seed=s, dtype=DTYPE), x) for s in seeds) / len(seeds)


def limit_errors(name: str, kind: str) -> tuple[float, float, list[float]]:
    """Errors at the wide and the middle width, and of each batch at the narrow width."""
    # Many small convolutions: one intra-op thread is fastest, and robust to a busy machine.
    with intra_op_threads(1):
        return _limit_errors(name, kind)


def _limit_errors(name: str, kind: str) -> tuple[float, float, list[float]]:
    spec, shape = LIMIT_CASES[name]
    arch = build(spec, _grid_ndim(shape))
    x = _limit_inputs(shape)
    nngp, ntk = evaluate(arch, x, ntk=True, input_shape=shape)
    exact = (nngp if kind == "nngp" else ntk).detach()
    n = NETWORKS[kind]

    def error(width: int, batch: int) -> float:
        seeds = [1000 * batch + s for s in range(n)]
        return relative_error(_empirical(arch, shape, x, kind, width, seeds), exact)

    return error(WIDE, 0), error(MIDDLE, 1), [error(NARROW, 2 + b) for b in range(NARROW_BATCHES)]


# Measured over 8 seed sets x 8 cases (relative Frobenius errors; median over all runs):
#   NNGP: 0.195 at 16 channels (mean of 3 batches), 0.094 at 64, 0.039 at 256; largest at 256:
#         0.133 (valid-flatten); smallest ratio typical-narrow / wide: 1.45 (median 5.3).
#   NTK:  0.154 at 16, 0.073 at 64, 0.029 at 256; largest at 256: 0.076 (valid-gap);
#         smallest ratio 1.58 (median 4.6).
# With the fixed seeds (SEED_OFFSET = 0): largest at 256 0.090 (NNGP), 0.068 (NTK); smallest
# ratios 2.57 (NNGP), 1.89 (NTK).
BOUNDS = {"nngp": 0.18, "ntk": 0.10}
RATIO = {"nngp": 1.2, "ntk": 1.2}


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("name", list(LIMIT_CASES))
def test_finite_width_cnns_converge_to_the_kernel(name, kind):
    wide, middle, narrow = limit_errors(name, kind)
    typical_narrow = sum(narrow) / len(narrow)
    message = (
        f"{name} {kind}: relative error {wide:.4f} at {WIDE} channels, {middle:.4f} at {MIDDLE}, "
        f"typical {typical_narrow:.4f} at {NARROW} ({NETWORKS[kind]} networks each)"
    )
    assert wide < BOUNDS[kind], message
    assert wide < typical_narrow / RATIO[kind], message


def test_item_by_item_empirical_ntk_equals_the_package_one():
    spec, shape = LIMIT_CASES["residual-conv-skip-gap"]
    arch = build(spec, 2)
    x = _limit_inputs(shape)
    network = build_network(arch, shape, 8, seed=3, dtype=DTYPE)
    torch.testing.assert_close(_empirical_ntk(network, x), empirical_ntk(network, x), rtol=1e-12, atol=1e-12)


def test_finite_network_shapes_follow_the_grid_arithmetic():
    # 6 x 5 images: "same" keeps the grid, stride 2 halves it (rounding up), "valid" trims it,
    # pooling without padding floors; the finite network's hidden shapes must say the same.
    arch = Sequential(
        Conv2d(3, 1, "same"),
        ReLU(),
        Conv2d(3, 2, "circular"),
        ReLU(),
        Conv2d(2, 1, "valid"),
        AvgPool2d(2, 1),
        Flatten(),
        Linear(),
    )
    network = build_network(arch, (2, 6, 5), 4, seed=0, dtype=DTYPE)
    x = torch.randn(3, 60, dtype=DTYPE)
    shapes = []
    h = x
    for module in network:
        h = module(h)
        shapes.append(tuple(h.shape[1:]))
    # (unflattened) 6x5 -> same: 6x5 -> ReLU -> circular, stride 2: 3x3 -> ReLU -> valid 2x2 filter: 2x2
    # -> pool 2, stride 1: 1x1 -> Flatten -> Linear
    assert shapes == [(2, 6, 5), (4, 6, 5), (4, 6, 5), (4, 3, 3), (4, 3, 3), (4, 2, 2), (4, 1, 1), (4,), (1,)]


# =============================================================================================
# 3. Tiles, the diagonal, rectangular and batched inputs, aligned position pairs.
# =============================================================================================

TILING_CASES = {
    # all position pairs (pooling) and aligned pairs (Flatten, no pooling); 1-d and 2-d
    "2d-pool-gap": REFERENCE_CASES["2d-pool-gap"],
    "2d-same-flatten": REFERENCE_CASES["2d-same-flatten"],
    "1d-circular-gap": REFERENCE_CASES["1d-circular-gap"],
    "2d-residual-conv-skip-flatten": REFERENCE_CASES["2d-residual-conv-skip-flatten"],
}


@pytest.mark.parametrize("name", list(TILING_CASES))
def test_tiles_give_the_same_numbers_as_one_piece(name):
    spec, shape = TILING_CASES[name]
    arch = build(spec, _grid_ndim(shape))
    x1, x2 = _images(5, shape, 3), _images(3, shape, 4)
    for a, b in ((x1, None), (x1, x2)):
        whole = evaluate(arch, a, b, ntk=True, input_shape=shape, tile_pairs=10**9)
        for tile_pairs in (1, 3):
            tiled = evaluate(arch, a, b, ntk=True, input_shape=shape, tile_pairs=tile_pairs)
            for got, expected in zip(tiled, whole):
                torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    # the symmetric matrix is exactly symmetric, also when its tiles are mirrored
    for tile_pairs in (10**9, 2):
        k, t = evaluate(arch, x1, ntk=True, input_shape=shape, tile_pairs=tile_pairs)
        assert torch.equal(k, k.T) and torch.equal(t, t.T)


class _CountCalls(Identity):
    """A layer that changes nothing and counts how often the architecture runs (once per tile)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, state):
        self.calls.append(1)  # atomic under the GIL; tiles may run on worker threads
        return state


@pytest.mark.parametrize("name", ["2d-pool-gap", "2d-same-flatten"])
def test_smallest_workable_memory_budget_forces_one_pair_per_tile(name):
    spec, shape = TILING_CASES[name]
    counter = _CountCalls()
    arch = Sequential(counter, *build(spec, _grid_ndim(shape)))
    x1, x2 = _images(6, shape, 5), _images(4, shape, 6)
    for a, b, tiles in ((x1, None, 6 * 7 // 2), (x1, x2, 6 * 4)):  # the symmetric matrix: upper triangle
        whole = evaluate(arch, a, b, ntk=True, input_shape=shape, tile_pairs=10**9)
        # A budget below one tile of one pair is refused, with the smallest one it would take.
        with pytest.raises(ValueError, match=r"memory_budget=1 bytes is too small .* at least (\d+) bytes") as error:
            evaluate(arch, a, b, ntk=True, input_shape=shape, memory_budget=1)
        smallest = int(re.search(r"at least (\d+) bytes", str(error.value)).group(1))
        with pytest.raises(ValueError, match="too small"):
            evaluate(arch, a, b, ntk=True, input_shape=shape, memory_budget=smallest - 1)
        counter.calls.clear()
        budgeted = evaluate(arch, a, b, ntk=True, input_shape=shape, memory_budget=smallest)
        assert len(counter.calls) == tiles
        for got, expected in zip(budgeted, whole):
            torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", list(TILING_CASES))
def test_diag_is_the_diagonal_of_the_full_matrix(name):
    spec, shape = TILING_CASES[name]
    arch = build(spec, _grid_ndim(shape))
    x1, x2 = _images(6, shape, 6), _images(6, shape, 7)
    for b in (None, x2):
        full = evaluate(arch, x1, b, ntk=True, input_shape=shape)
        for tile_pairs in (None, 1, 4):
            diag = evaluate(arch, x1, b, ntk=True, diag=True, input_shape=shape, tile_pairs=tile_pairs)
            for got, matrix in zip(diag, full):
                assert got.shape == (6,)
                torch.testing.assert_close(got, matrix.diagonal(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["2d-pool-gap", "2d-same-flatten"])
def test_leading_batch_dimensions_are_kept(name):
    spec, shape = TILING_CASES[name]
    arch = build(spec, _grid_ndim(shape))
    x1 = _images(2 * 3 * 4, shape, 8).reshape(2, 3, 4, -1)
    x2 = _images(2 * 3 * 5, shape, 9).reshape(2, 3, 5, -1)
    for tile_pairs in (None, 3):
        k, t = evaluate(arch, x1, x2, ntk=True, input_shape=shape, tile_pairs=tile_pairs)
        assert k.shape == t.shape == (2, 3, 4, 5)
        kd, td = evaluate(arch, x1, ntk=True, diag=True, input_shape=shape, tile_pairs=tile_pairs)
        assert kd.shape == (2, 3, 4)
        for i, j in itertools.product(range(2), range(3)):
            k_ij, t_ij = evaluate(arch, x1[i, j], x2[i, j], ntk=True, input_shape=shape)
            torch.testing.assert_close(k[i, j], k_ij, rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(t[i, j], t_ij, rtol=1e-13, atol=1e-13)
            k_ii, t_ii = evaluate(arch, x1[i, j], ntk=True, input_shape=shape)
            torch.testing.assert_close(kd[i, j], k_ii.diagonal(), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(td[i, j], t_ii.diagonal(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "name", ["2d-same-flatten", "2d-rectangular-filter-stride", "1d-residual-identity-skip-flatten"]
)
def test_aligned_position_pairs_agree_with_all_pairs(name):
    # A Flatten readout without pooling needs aligned position pairs only.
    spec, shape = REFERENCE_CASES[name]
    arch = build(spec, _grid_ndim(shape))
    assert not arch.needs_all_position_pairs
    x1, x2 = _images(5, shape, 10), _images(4, shape, 11)
    aligned = evaluate(arch, x1, x2, ntk=True, input_shape=shape)
    # The same architecture run by hand on all position pairs ...
    layout = InputLayout(shape, all_position_pairs=True)
    state = input_state(x1, x2, diagonal=False, same_inputs=False, track_ntk=True, layout=layout)
    assert state.all_position_pairs and state.cross.shape == (5, 4, *shape[1:], *shape[1:])
    out = arch(state)
    torch.testing.assert_close(out.cross, aligned[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.ntk, aligned[1], rtol=1e-13, atol=1e-13)
    # ... and with a harmless pooling (a window of one position) that makes evaluate choose all pairs.
    pool = AvgPool1d(1) if len(shape) == 2 else AvgPool2d(1)
    pooled = Sequential(pool, *arch)
    assert pooled.needs_all_position_pairs
    forced = evaluate(pooled, x1, x2, ntk=True, input_shape=shape)
    for got, expected in zip(forced, aligned):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_global_average_pooling_needs_all_pairs_and_flatten_does_not():
    assert build(REFERENCE_CASES["2d-same-gap"][0], 2).needs_all_position_pairs
    assert build(REFERENCE_CASES["2d-pool-flatten"][0], 2).needs_all_position_pairs
    assert not build(REFERENCE_CASES["2d-same-flatten"][0], 2).needs_all_position_pairs
    assert CNNKernel((1, 4, 4), readout="global_avg_pool").architecture.needs_all_position_pairs
    assert not CNNKernel((1, 4, 4), readout="flatten").architecture.needs_all_position_pairs
    assert CNNKernel((1, 8, 8), readout="flatten", pool_every=1).architecture.needs_all_position_pairs


# =============================================================================================
# 4. The kernels as GPyTorch kernels.
# =============================================================================================


class _GridData:
    """Data for BaseKernelTestCase with items of INPUT_FEATURES features (a grid)."""

    # BaseKernelTestCase.test_active_dims_range keeps dims 3..8: six features.
    INPUT_FEATURES = 6

    def create_data_no_batch(self):
        return torch.randn(12, 10)

    def create_data_single_batch(self):
        return torch.randn(2, 3, self.INPUT_FEATURES)

    def create_data_double_batch(self):
        return torch.randn(3, 2, 5, self.INPUT_FEATURES)

    def test_active_dims_list(self):
        # (The base class keeps four dims, which no grid of INPUT_FEATURES features has.)
        dims = [0, 2, 4, 6, 8, 9]
        kernel = self.create_kernel_no_ard(active_dims=dims)
        x = self.create_data_no_batch()
        self.assertAllClose(
            kernel(x).to_dense(), self.create_kernel_no_ard()(x[:, dims]).to_dense(), rtol=1e-5, atol=1e-6
        )


class TestCNNKernelGlobalAvgPoolNNGP(_GridData, BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return CNNKernel((1, 2, 3), depth=2, kernel_size=2, kind="nngp", readout="global_avg_pool", **kwargs)


class TestCNNKernelFlattenNTK1d(_GridData, BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return CNNKernel((2, 3), depth=2, kind="ntk", readout="flatten", padding="circular", **kwargs)


def test_cnn_kernel_presets_match_the_reference():
    x = _images(4, (2, 6, 6), 12)
    kernel = CNNKernel(
        (2, 6, 6), depth=3, kernel_size=3, kind="ntk", readout="flatten", pool_every=2, bias_variance=0.2
    )
    kernel = kernel.double()
    for layer in kernel.architecture.modules():
        if isinstance(layer, (Conv, Linear)):
            layer.weight_variance, layer.bias_variance = 2.0, 0.2
    conv = _conv(3, 1, "same", 2.0, 0.2)
    spec = [
        conv,
        ("relu",),
        conv,
        ("relu",),
        ("pool", (2, 2), (2, 2)),
        conv,
        ("relu",),
        ("flatten",),
        ("linear", 2.0, 0.2),
    ]
    k_ref, t_ref = reference(spec, x, (2, 6, 6))
    nngp, ntk = kernel.nngp_and_ntk(x)
    torch.testing.assert_close(nngp, k_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ntk, t_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel(x).to_dense(), t_ref, rtol=1e-12, atol=1e-12)


def test_myrtle_kernel_on_8x8_images_matches_the_reference_and_is_psd():
    x = _images(5, (1, 8, 8), 13)
    kernel = MyrtleKernel((1, 8, 8), depth=5, kind="ntk").double()
    for layer in kernel.architecture.modules():
        if isinstance(layer, (Conv, Linear)):
            layer.weight_variance = 2.0
    conv = _conv(3, 1, "same", 2.0, 0.0)
    pool = ("pool", (2, 2), (2, 2))
    spec = [
        conv,
        ("relu",),
        conv,
        ("relu",),
        pool,
        conv,
        ("relu",),
        pool,
        conv,
        ("relu",),
        ("gap",),
        ("linear", 2.0, 0.0),
    ]
    k_ref, t_ref = reference(spec, x, (1, 8, 8))
    nngp, ntk = kernel.nngp_and_ntk(x)
    torch.testing.assert_close(nngp, k_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ntk, t_ref, rtol=1e-12, atol=1e-12)
    # with a duplicate image the matrices are singular, but must stay positive semi-definite
    x = torch.cat([x, x[:1]])
    nngp, ntk = kernel.nngp_and_ntk(x)
    for matrix in (nngp, ntk, MyrtleKernel((1, 8, 8), depth=7).double()(x).to_dense().detach()):
        assert torch.equal(matrix, matrix.T)
        assert torch.linalg.eigvalsh(matrix).min() > -1e-12 * matrix.diagonal().max()


def _regression_data(n=16, shape=(1, 4, 4), dtype=DTYPE):
    x = _images(n, shape, 14, dtype=dtype)
    images = x.reshape(n, *shape)
    y = images[..., :2, :].mean((-3, -2, -1)) - images[..., 2:, :].mean((-3, -2, -1))  # top minus bottom
    return x, (y / y.std()).detach()


@pytest.mark.parametrize("readout", ["global_avg_pool", "flatten"])
def test_scale_cnn_kernel_in_exact_gp_trains(readout):
    x, y = _regression_data()

    class Model(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(CNNKernel((1, 4, 4), depth=2, kind="ntk", readout=readout))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = Model(x, y, likelihood).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    losses = []
    with intra_op_threads(1):
        for _ in range(8):
            optimizer.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            for name, p in model.named_parameters():
                assert torch.isfinite(p.grad).all(), name
            optimizer.step()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # Adam's small steps: steadily down
    assert losses[-1] < losses[0] - 0.01, losses
    # every convolution's variances received a gradient
    conv_grads = [
        p.grad
        for layer in model.covar.base_kernel.architecture.modules()
        if isinstance(layer, Conv)
        for p in layer.parameters()
    ]
    assert len(conv_grads) == 4 and all(g.abs().sum() > 0 for g in conv_grads)


@pytest.mark.parametrize("readout", ["global_avg_pool", "flatten"])
def test_float32_works_and_agrees_with_float64(readout):
    x, _ = _regression_data(8)
    k64 = CNNKernel((1, 4, 4), depth=3, kind="ntk", readout=readout).double()
    k32 = CNNKernel((1, 4, 4), depth=3, kind="ntk", readout=readout)
    k32.load_state_dict({name: value.float() for name, value in k64.state_dict().items()})
    K64 = k64(x).to_dense().detach()
    K32 = k32(x.float()).to_dense().detach()
    assert K32.dtype == torch.float32 and torch.isfinite(K32).all()
    assert ((K32.double() - K64).norm() / K64.norm()) < 1e-5
    assert torch.isfinite(k32(x.float(), diag=True)).all()


@pytest.mark.parametrize("readout", ["global_avg_pool", "flatten"])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_hyperparameter_gradients_are_finite_also_at_duplicate_inputs(readout, kind):
    x, _ = _regression_data(5)
    x = torch.cat([x, x[:2]])  # duplicates: correlation one at every aligned position
    kernel = CNNKernel((1, 4, 4), depth=2, kind=kind, readout=readout).double()
    with intra_op_threads(1):
        _check_gradients(kernel, x)


def _check_gradients(kernel, x):
    weights = torch.linspace(0.5, 1.5, x.shape[0] ** 2, dtype=DTYPE).reshape(x.shape[0], -1)
    gradients = []
    for tile_pairs in (None, 4):  # one piece, and tiles whose graphs are put together
        kernel.tile_pairs = tile_pairs
        kernel.zero_grad()
        K = kernel(x).to_dense()
        (K * weights).sum().backward()
        grads = [p.grad.clone() for p in kernel.parameters()]
        assert len(grads) == 6  # weight and bias variance of two convolutions and the readout
        assert all(torch.isfinite(g).all() for g in grads)
        gradients.append(torch.stack(grads))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-12, atol=1e-12)
    # and with respect to the inputs, between distinct and identical points
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kernel(xs, x).to_dense().sum(), xs)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "name", ["2d-pool-gap", "2d-residual-conv-skip-flatten", "1d-circular-filter-wider-than-the-signal"]
)
def test_gradients_agree_with_finite_differences(name):
    # d/d(theta) of a weighted sum of the NNGP kernel and NTK, for every raw hyperparameter and
    # for one direction in input space, against central differences.
    spec, shape = REFERENCE_CASES[name]
    arch = build(spec, _grid_ndim(shape))
    x1, x2 = _images(3, shape, 20), _images(2, shape, 21)
    direction = _images(3, shape, 22)
    weights = torch.linspace(0.5, 1.5, 6, dtype=DTYPE).reshape(3, 2)

    def objective(x):
        nngp, ntk = evaluate(arch, x, x2, ntk=True, input_shape=shape, tile_pairs=2)
        return ((nngp + 0.5 * ntk) * weights).sum()

    xs = x1.clone().requires_grad_(True)
    value = objective(xs)
    params = list(arch.parameters())
    grads = torch.autograd.grad(value, [xs, *params])
    h = 1e-6
    with torch.no_grad():
        numeric = (objective(x1 + h * direction) - objective(x1 - h * direction)) / (2 * h)
        torch.testing.assert_close((grads[0] * direction).sum(), numeric, rtol=1e-6, atol=1e-8)
        assert len(params) >= 4
        for p, g in zip(params, grads[1:]):
            p += h
            up = objective(x1)
            p -= 2 * h
            down = objective(x1)
            p += h
            torch.testing.assert_close(g, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


def test_to_float64_pickle_and_state_dict():
    x, _ = _regression_data(5)
    kernel = CNNKernel((1, 4, 4), depth=2, kind="ntk", weight_variance_prior=GammaPrior(2.0, 1.0))
    kernel = kernel.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in kernel.parameters())
    kernel.architecture[0].weight_variance = 2.5
    kernel.architecture[-1].bias_variance = 0.3
    K = kernel(x).to_dense().detach()
    assert K.dtype == torch.float64
    clone = pickle.loads(pickle.dumps(kernel))
    torch.testing.assert_close(clone(x).to_dense().detach(), K, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(kernel.state_dict(), buffer)
    buffer.seek(0)
    fresh = CNNKernel((1, 4, 4), depth=2, kind="ntk", weight_variance_prior=GammaPrior(2.0, 1.0)).double()
    assert not torch.allclose(fresh(x).to_dense().detach(), K)
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(x).to_dense().detach(), K, rtol=0, atol=0)
    myrtle = pickle.loads(pickle.dumps(MyrtleKernel((1, 8, 8), depth=5).double()))
    assert myrtle(_images(2, (1, 8, 8), 15)).to_dense().shape == (2, 2)


# =============================================================================================
# 5. Bad input gets a clear message.
# =============================================================================================


def _net(*layers):
    return Sequential(*layers, Linear(2.0, 0.1))


def test_wrong_number_of_features_for_the_input_shape():
    with pytest.raises(ValueError, match=r"15 features per item, but input_shape=\(1, 4, 4\) needs 16"):
        evaluate(_net(Conv2d(), ReLU(), Flatten()), torch.randn(3, 15), input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="expects 16"):
        CNNKernel((1, 4, 4))(torch.randn(3, 15)).to_dense()
    with pytest.raises(ValueError, match="input_shape must be positive sizes"):
        evaluate(_net(Conv2d(), ReLU(), Flatten()), torch.randn(3, 16), input_shape=(1, 0, 16))


def test_input_shape_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"Conv2d works on 2-d grids, but its input grid is 1-d"):
        evaluate(_net(Conv2d(), ReLU(), Flatten()), torch.randn(3, 16), input_shape=(2, 8))
    with pytest.raises(ValueError, match=r"Conv1d works on 1-d grids, but its input grid is 2-d"):
        evaluate(_net(Conv1d(), ReLU(), Flatten()), torch.randn(3, 16), input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"AvgPool2d works on 2-d grids"):
        evaluate(_net(Conv(3), ReLU(), AvgPool2d(2), GlobalAvgPool()), torch.randn(3, 16), input_shape=(2, 8))
    with pytest.raises(ValueError, match=r"input_shape must be \(C, L\) or \(C, H, W\)"):
        CNNKernel((1, 2, 2, 2))
    with pytest.raises(ValueError, match="need input_shape"):
        CNNKernel(None)
    with pytest.raises(ValueError, match="MyrtleKernel needs images"):
        MyrtleKernel((1, 16))


def test_valid_padding_with_a_filter_larger_than_the_grid():
    with pytest.raises(
        ValueError, match=r"Conv2d on grid axis 0 of the grid \(4, 4\): a window of 5 does not fit in 4 positions"
    ):
        evaluate(_net(Conv2d(5, padding="valid"), ReLU(), Flatten()), torch.randn(3, 16), input_shape=(1, 4, 4))
    # the second layer's grid is what is too small
    with pytest.raises(
        ValueError, match=r"Conv2d on grid axis 1 of the grid \(3, 2\): a window of 3 does not fit in 2"
    ):
        arch = _net(Conv2d((2, 3), padding="valid"), ReLU(), Conv2d((1, 3), padding="valid"), Flatten())
        evaluate(arch, torch.randn(3, 16), input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        CNNKernel((1, 4, 4), depth=2, kernel_size=3, padding="valid")(torch.randn(2, 16)).to_dense()
    with pytest.raises(ValueError, match="does not fit"):
        build_network(_net(Conv2d(5, padding="valid"), ReLU(), Flatten()), (1, 4, 4), 8)
    with pytest.raises(ValueError, match=r"circular padding of 6 positions is more than the 2 positions it wraps"):
        evaluate(_net(Conv2d(7, padding="circular"), ReLU(), Flatten()), torch.randn(3, 4), input_shape=(1, 2, 2))


def test_bad_padding_stride_and_kernel_size():
    with pytest.raises(ValueError, match=r"padding must be one of \('same', 'valid', 'circular'\), got 'reflect'"):
        Conv2d(3, padding="reflect")
    with pytest.raises(ValueError, match="padding must be one of"):
        CNNKernel((1, 4, 4), padding="zeros")
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        Conv2d(0)
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        Conv1d(-1)
    with pytest.raises(ValueError, match="stride must be positive"):
        Conv2d(3, stride=0)
    with pytest.raises(ValueError, match="stride must be positive"):
        Conv2d(3, stride=(1, -2))
    with pytest.raises(ValueError, match="kernel_size must be an int or a tuple of 2 ints"):
        Conv2d((3, 3, 3))
    with pytest.raises(TypeError, match="stride must be an int or a tuple of 1 ints, got 1.5"):
        Conv1d(3, stride=1.5)
    with pytest.raises(TypeError, match="kernel_size must be an int or a tuple of 1 ints"):
        Conv(2.0)
    with pytest.raises(ValueError, match=r"stride must be an int or a tuple of 2 ints, got \(1, 1.5\)"):
        Conv2d(3, stride=(1, 1.5))
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        AvgPool2d(0)
    with pytest.raises(ValueError, match="stride must be positive"):
        AvgPool1d(2, stride=0)
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        CNNKernel((1, 4, 4), kernel_size=0)


def test_pooling_window_larger_than_the_grid():
    with pytest.raises(ValueError, match=r"AvgPool2d on grid axis 0 of the grid \(4, 4\): a window of 5 does not fit"):
        evaluate(_net(Conv2d(), ReLU(), AvgPool2d(5), GlobalAvgPool()), torch.randn(3, 16), input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"AvgPool1d on grid axis 0 of the grid \(3,\)"):
        evaluate(_net(Conv1d(), ReLU(), AvgPool1d(2), AvgPool1d(4), Flatten()), torch.randn(3, 7), input_shape=(1, 7))
    with pytest.raises(ValueError, match="does not fit"):
        build_network(_net(Conv2d(), ReLU(), AvgPool2d(5), GlobalAvgPool()), (1, 4, 4), 8)


def test_architecture_without_a_readout():
    x = torch.randn(3, 16)
    for arch in (_net(Conv2d(), ReLU()), _net(Conv2d(), ReLU(), AvgPool2d(2))):
        with pytest.raises(ValueError, match="end it with a readout"):
            evaluate(arch, x, input_shape=(1, 4, 4))
        with pytest.raises(ValueError, match="end it with a readout"):
            build_network(arch, (1, 4, 4), 8)


def test_grid_layers_on_plain_features():
    x = torch.randn(3, 16)
    for layer in (Conv2d(), Conv(3), AvgPool2d(2), GlobalAvgPool(), Flatten()):
        arch = (
            Sequential(Linear(), layer, Linear())
            if not isinstance(layer, Conv)
            else Sequential(layer, ReLU(), Flatten(), Linear())
        )
        with pytest.raises(ValueError, match=r"needs features on a grid of positions .* input_shape=\(C, H, W\)"):
            evaluate(arch, x)
    with pytest.raises(ValueError, match="needs inputs on a grid"):
        build_network(_net(Conv2d(), ReLU(), Flatten()), 16, 8)
    with pytest.raises(ValueError, match="grid input_shape forbids"):
        CNNKernel((1, 2, 2)).forward(torch.randn(3, 4), torch.randn(3, 4), last_dim_is_batch=True)


def test_residual_branches_that_change_the_grid_differently():
    x = torch.randn(3, 16)
    strided = Residual(Conv2d(3, stride=2), ReLU(), Conv2d(3))  # identity skip keeps 4 x 4
    with pytest.raises(
        ValueError, match=r"Residual: the block's output grid \(2, 2\) differs from the skip path's \(4, 4\)"
    ):
        evaluate(_net(Conv2d(), strided, ReLU(), Flatten()), x, input_shape=(1, 4, 4))
    valid = Residual(Conv2d(3, padding="valid"), ReLU(), Conv2d(3), skip=Conv2d(1))
    with pytest.raises(ValueError, match=r"output grid \(2, 2\) differs from the skip path's \(4, 4\)"):
        evaluate(_net(Conv2d(), valid, ReLU(), GlobalAvgPool()), x, input_shape=(1, 4, 4))
    # (the finite network's message names both shapes; see the report on its wording)
    with pytest.raises(ValueError, match=r"\(8, 2, 2\).*\(8, 4, 4\)"):
        build_network(_net(Conv2d(), strided, ReLU(), Flatten()), (1, 4, 4), 8)


def test_preset_arguments():
    with pytest.raises(ValueError, match="at least 4 x 4, got 2 x 2"):
        MyrtleKernel((3, 2, 2))
    with pytest.raises(ValueError, match=r"readout must be one of \('global_avg_pool', 'flatten'\), got 'bogus'"):
        CNNKernel((1, 4, 4), readout="bogus")
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        CNNKernel((1, 4, 4), depth=0)
    with pytest.raises(ValueError, match="pool_every must be a positive integer"):
        CNNKernel((1, 4, 4), pool_every=0)
    with pytest.raises(ValueError, match="depth must be one of"):
        MyrtleKernel((1, 8, 8), depth=6)
    with pytest.raises(ValueError, match="kind must be one of"):
        CNNKernel((1, 4, 4), kind="gp")


# =============================================================================================
# 6. Progress bar.
# =============================================================================================


def _progress_case():
    spec, shape = TILING_CASES["2d-same-flatten"]
    return build(spec, 2), _images(8, shape, 16), shape


def test_progress_true_writes_a_bar_to_stderr(capsys):
    arch, x, shape = _progress_case()
    evaluate(arch, x, input_shape=shape, tile_pairs=1, progress=True)
    err = capsys.readouterr().err
    assert "kernel tiles" in err and "36/36" in err  # 8 * 9 / 2 tiles of the symmetric matrix


def test_progress_false_and_default_write_nothing(capsys):
    arch, x, shape = _progress_case()
    evaluate(arch, x, input_shape=shape, tile_pairs=1, progress=False)
    evaluate(arch, x, input_shape=shape, tile_pairs=1)  # default: only on a terminal, and stderr is captured
    CNNKernel(shape, depth=1, tile_pairs=1, progress=False)(x).to_dense()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_tiles_are_ordered_in_column_panels_that_fit_the_per_item_cache():
    from gpytorch_tp.evaluation.plan import in_column_panels

    tasks = [(r, c) for r in range(0, 12, 2) for c in range(0, 12, 2) if c >= r]
    # 10 bytes of per-item work per item, 80 bytes of cache: panels of 4 columns (2 tiles)
    ordered = in_column_panels(tasks, col_side=2, limit_bytes=80, per_item_bytes=10)
    assert sorted(ordered) == sorted(tasks)
    panels = [c // 4 for _, c in ordered]
    assert panels == sorted(panels)  # every tile of a panel before any tile of the next
    first_panel = [t for t in ordered if t[1] < 4]
    assert first_panel == [(0, 0), (0, 2), (2, 2)]
    # everything fits (or nothing is known): the row-by-row order is kept
    assert in_column_panels(tasks, 2, float("inf"), 10) == tasks
    assert in_column_panels(tasks, 2, 80, 0) == tasks
