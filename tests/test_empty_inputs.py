"""Edge inputs every kernel family must take as GPyTorch's own kernels do (issue 21, items 4 and 8).

1. Empty inputs (0 points, or an empty batch) give an empty result of the shape and dtype that
   ``gpytorch.kernels.RBFKernel`` gives: ``0 x 0``, ``0 x n``, ``n x 0``, ``diag=True`` on 0 points,
   batch inputs, kernel batch shapes, ``nngp_and_ntk``; the non-empty part of a call is unchanged.
   (The GRU and LSTM kernels are tested with their own code.)
2. A feature-size mismatch between ``x1`` and ``x2`` is a ``ValueError`` naming both sizes, for
   every family, not GPyTorch's "must have the same number of dimensions".
3. ``BatchNormMLPKernel`` promotes float32 inputs with float64 hyperparameters to float64, as
   every other family does.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from torch import nn

from gpytorch_tp.kernels import (
    BatchNormMLPKernel,
    CNNKernel,
    GRUKernel,
    LSTMKernel,
    MLPKernel,
    MonteCarloKernel,
    RNNKernel,
    TransformerKernel,
)

D = 6  # features per item for every family below


def _mc_net():
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 2))


# name -> factory(batch_shape): small configurations of every family (GRU/LSTM: see the module docstring).
FAMILIES = {
    "mlp-nngp": lambda bs: MLPKernel(2, "relu", "nngp", batch_shape=bs),
    "mlp-ntk": lambda bs: MLPKernel(2, "erf", "ntk", batch_shape=bs),
    "cnn-image": lambda bs: CNNKernel((1, 2, 3), depth=1, kernel_size=2, kind="ntk", batch_shape=bs),
    "cnn-signal-flatten": lambda bs: CNNKernel((2, 3), depth=1, readout="flatten", batch_shape=bs),
    "rnn": lambda bs: RNNKernel((3, 2), nonlinearity="erf", kind="ntk", batch_shape=bs),
    "transformer": lambda bs: TransformerKernel((3, 2), kind="ntk", positional="add", batch_shape=bs),
    "batchnorm-nngp": lambda bs: BatchNormMLPKernel(
        torch.randn(3, D, generator=torch.Generator().manual_seed(0)), depth=1, accuracy="fast"
    ),
    "batchnorm-ntk": lambda bs: BatchNormMLPKernel(
        torch.randn(4, D, generator=torch.Generator().manual_seed(0)), depth=1, kind="ntk", accuracy="fast"
    ),
    "montecarlo-nngp": lambda bs: MonteCarloKernel(_mc_net, n_samples=2),
    "montecarlo-ntk": lambda bs: MonteCarloKernel(_mc_net, kind="ntk", n_samples=2),
}
# Families whose hyperparameters may carry a batch shape.
BATCHED = [name for name in FAMILIES if not name.startswith(("batchnorm", "montecarlo"))]
WITH_NNGP_AND_NTK = BATCHED

# (x1 shape, x2 shape or None, diag)
EMPTY_CASES = [
    ((0, D), None, False),
    ((0, D), (0, D), False),
    ((0, D), (4, D), False),
    ((4, D), (0, D), False),
    ((0, D), None, True),
    ((0, D), (0, D), True),
    ((2, 0, D), None, False),
    ((2, 0, D), (2, 3, D), False),
    ((2, 0, D), None, True),
]
# An empty batch of 3-point sets.
EMPTY_BATCH_CASES = [((0, 3, D), None, False), ((0, 3, D), None, True), ((0, 3, D), (0, 2, D), False)]


def _kernel(name: str, dtype: torch.dtype, batch_shape=torch.Size()):
    return FAMILIES[name](batch_shape).to(dtype)


def _evaluate(kernel, x1, x2, diag):
    out = kernel(x1, x2, diag=diag)
    return out if diag else out.to_dense()


def _inputs(shape1, shape2, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(*shape1, generator=g, dtype=dtype)
    x2 = None if shape2 is None else torch.randn(*shape2, generator=g, dtype=dtype)
    return x1, x2


def _check_like_rbf(name, cases, dtype):
    kernel = _kernel(name, dtype)
    for shape1, shape2, diag in cases:
        x1, x2 = _inputs(shape1, shape2, dtype)
        expected = _evaluate(gpytorch.kernels.RBFKernel().to(dtype), x1, x2, diag)
        got = _evaluate(kernel, x1, x2, diag)
        assert got.shape == expected.shape, (shape1, shape2, diag)
        assert got.dtype == expected.dtype == dtype, (shape1, shape2, diag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_empty_inputs_give_what_rbf_gives(name, dtype):
    _check_like_rbf(name, EMPTY_CASES, dtype)


@pytest.mark.parametrize("name", FAMILIES)
def test_an_empty_batch_gives_what_rbf_gives(name):
    _check_like_rbf(name, EMPTY_BATCH_CASES, torch.float64)


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("name", BATCHED)
def test_empty_inputs_with_a_kernel_batch_shape(name, diag):
    batch_shape = torch.Size([2])
    x = torch.randn(0, D, dtype=torch.float64)
    expected = _evaluate(gpytorch.kernels.RBFKernel(batch_shape=batch_shape).double(), x, None, diag)
    got = _evaluate(_kernel(name, torch.float64, batch_shape), x, None, diag)
    assert got.shape == expected.shape == ((2, 0) if diag else (2, 0, 0))


@pytest.mark.parametrize("name", WITH_NNGP_AND_NTK)
def test_nngp_and_ntk_on_empty_inputs(name):
    kernel = _kernel(name, torch.float64)
    empty, x = torch.randn(0, D, dtype=torch.float64), torch.randn(4, D, dtype=torch.float64)
    for args, diag, shape in (
        ((empty,), False, (0, 0)),
        ((empty, x), False, (0, 4)),
        ((x, empty), False, (4, 0)),
        ((empty,), True, (0,)),
        ((empty.expand(2, 0, D),), True, (2, 0)),
    ):
        nngp, ntk = kernel.nngp_and_ntk(*args, diag=diag)
        assert nngp.shape == ntk.shape == shape and nngp.dtype == ntk.dtype == torch.float64


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "montecarlo-ntk"])
def test_empty_rows_do_not_change_the_rest(name):
    # Evaluating 0 points is no special state: the kernel still gives the same values afterwards,
    # and an empty x2 next to a non-empty x1 is the empty slice of the full matrix.
    kernel = _kernel(name, torch.float64)
    n = 1 if name.startswith("batchnorm") else 3  # (each BatchNorm pair is a 2-d quadrature)
    x = torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = kernel(x).to_dense()
        assert kernel(x, x[:0]).to_dense().shape == before[:, :0].shape
        after = kernel(x).to_dense()
    assert torch.equal(before, after)
    assert torch.isfinite(before).all()


@pytest.mark.parametrize("name", ["batchnorm-nngp", "batchnorm-ntk", "montecarlo-ntk"])
def test_empty_results_support_backward(name):
    # RBFKernel's empty matrix is part of the autograd graph; so is ours (sum().backward() works).
    kernel = _kernel(name, torch.float64)
    x = torch.randn(0, D, dtype=torch.float64, requires_grad=True)
    out = kernel(x).to_dense()
    assert out.requires_grad
    out.sum().backward()


# ---------------------------------------------------------------------------------------------
# 2. Feature-size mismatch
# ---------------------------------------------------------------------------------------------

ALL_FOR_MISMATCH = {
    **FAMILIES,
    # The error is raised before any GRU/LSTM code runs (TensorProgramKernel.__call__).
    "gru": lambda bs: GRUKernel((3, 2), num_particles=8),
    "lstm": lambda bs: LSTMKernel((3, 2), num_particles=8),
}


@pytest.mark.parametrize("name", list(ALL_FOR_MISMATCH))
def test_feature_size_mismatch_names_both_sizes(name):
    kernel = ALL_FOR_MISMATCH[name](torch.Size())
    x1, x2 = torch.randn(5, D), torch.randn(4, D - 2)
    for diag in (False, True):
        with pytest.raises(ValueError, match=f"x1 has {D} features but x2 has {D - 2}"):
            _evaluate(kernel, x1, x2 if not diag else torch.randn(5, D - 2), diag)
    with pytest.raises(ValueError, match=f"x1 has {D - 2} features but x2 has {D}"):
        _evaluate(kernel, x2, x1, False)


def test_feature_size_mismatch_issue_example():
    # The issue's example: x1 (5, 3), x2 (4, 2).
    with pytest.raises(ValueError, match=r"x1 has 3 features but x2 has 2 \(x1 \(5, 3\), x2 \(4, 2\)\)"):
        MLPKernel(2)(torch.randn(5, 3), torch.randn(4, 2)).to_dense()


def test_active_dims_cut_both_inputs_before_any_feature_check():
    # As in GPyTorch: with active_dims, inputs of different widths are fine once cut to the same columns.
    kernel = MLPKernel(2, active_dims=[0, 1]).double()
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    expected = MLPKernel(2).double()(x1[:, :2], x2).to_dense()
    torch.testing.assert_close(kernel(x1, x2).to_dense(), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 3. dtype promotion of BatchNormMLPKernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_batchnorm_kernel_promotes_dtypes_like_the_other_families(kind):
    # (Each value is a quadrature: a single point, one pair.)
    g = torch.Generator().manual_seed(5)
    reference = torch.randn(4, D, generator=g, dtype=torch.float64)
    x = torch.randn(2, D, generator=g, dtype=torch.float64)
    bn = BatchNormMLPKernel(reference, depth=1, kind=kind, accuracy="fast")
    mlp = MLPKernel(2, kind=kind)
    for kernel_dtype in (torch.float32, torch.float64):
        for input_dtype in (torch.float32, torch.float64):
            bn_k, mlp_k = bn.to(kernel_dtype), mlp.to(kernel_dtype)
            xi = x.to(input_dtype)
            expected = mlp_k(xi).to_dense().dtype
            assert expected == torch.promote_types(kernel_dtype, input_dtype)
            assert bn_k(xi[:1], diag=True).dtype == expected  # single-batch quadrature
            if input_dtype != kernel_dtype:
                assert bn_k(xi[:1], xi[1:]).to_dense().dtype == expected  # cross-batch quadrature
            assert bn_k(xi[:0]).to_dense().dtype == expected
    # Promoted, the float32 inputs' values are kept: the same as float64 inputs rounded to float32.
    bn64 = bn.to(torch.float64)
    x32 = x[:1].float()
    torch.testing.assert_close(bn64(x32, diag=True), bn64(x32.double(), diag=True), rtol=0, atol=0)
