"""Fused pair work (``fused=True``): the same kernels as the layer-by-layer reference path.

Most tests run the fused programs uncompiled (``uncompiled`` fixture: the very
functions torch.compile would trace, without its seconds of compilation); a few
compile them for real, on the paths users take (tiles of K(X, X) and K(X, Z),
float64 and float32, a matrix-free GP).
"""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch

from gpytorch_tp import CNNKernel, MLPKernel, TensorProgramKernel, evaluate, fusion
from gpytorch_tp.layers import GELU, Erf, LayerNorm, Linear, ReLU, Residual, Sequential
from gpytorch_tp.numerics import arccos_item_factors, arccos_moments, fused_arccos_moments


@pytest.fixture
def uncompiled(monkeypatch):
    monkeypatch.setattr(fusion, "_compile", lambda program: program)


def _x(n, d=4, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _both(kernel_class, dtype=torch.float64, **kwargs):
    return kernel_class(**kwargs).to(dtype), kernel_class(fused=True, **kwargs).to(dtype)


def _assert_same_kernels(reference, fused, x1, x2=None, rtol=1e-12):
    with torch.no_grad():
        expected = reference.nngp_and_ntk(x1, x2)
        got = fused.nngp_and_ntk(x1, x2)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype
        scale = e.abs().max()
        assert (g - e).abs().max() <= rtol * scale, (g - e).abs().max() / scale
    return expected, got


@pytest.mark.parametrize("nonlinearity", ["relu", "erf", "leaky_relu", "abs"])
@pytest.mark.parametrize("same", [True, False])
def test_fused_mlp_matches_the_reference_in_tiles(uncompiled, nonlinearity, same):
    # 9 x 9 tiles of 7 points, edge tiles of 6: diagonal, off-diagonal and ragged tiles.
    reference, fused = _both(MLPKernel, depth=3, nonlinearity=nonlinearity, tile_pairs=49)
    x = _x(62)
    expected, got = _assert_same_kernels(reference, fused, x, None if same else _x(55, seed=1))
    if same:
        # The self pairs hold the variances exactly after every layer, as in the reference path.
        assert torch.equal(got[0].diagonal(), expected[0].diagonal())
        assert torch.equal(got[0], got[0].mT) and torch.equal(got[1], got[1].mT)


def test_fused_relu_ntk_of_duplicate_points_is_exact(uncompiled):
    # Distinct positions of the same point in K(X, Z): correlation 1 only up to
    # round-off, snapped to 1 (the reference's 8-ulp rule), so J0 = 1/2 exactly.
    reference, fused = _both(MLPKernel, depth=4, kind="ntk", tile_pairs=16)
    x = _x(10)
    z = torch.cat([_x(5, seed=3), x[:5]])
    expected, got = _assert_same_kernels(reference, fused, x, z)
    assert torch.allclose(got[1][:5, 5:].diagonal(), expected[1][:5, 5:].diagonal(), rtol=1e-14, atol=0)


def test_fused_arccos_moments_match_the_reference_at_the_edges():
    k11 = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    k22 = torch.tensor([[0.0, 1.0, 2.0, 3.0, 1e-300]], dtype=torch.float64)
    root = (k11 * k22).sqrt()
    for k12 in (root, -root, 0.3 * root, root * (1 + 1e-15)):
        expected = arccos_moments(k11, k22, k12)
        got = fused_arccos_moments(k12, arccos_item_factors(k11, k22))
        for e, g in zip(expected, got):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)  # J at c = -1 is 0 up to round-off


def test_fused_float32_matches_float64(uncompiled):
    reference, fused = _both(MLPKernel, depth=5, tile_pairs=64)
    fused = fused.float()
    x = _x(40)
    with torch.no_grad():
        expected = reference.nngp_and_ntk(x)
        got = fused.nngp_and_ntk(x.float())
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5 * e.abs().max().item())


def _batched_kernels(kind="nngp"):
    """Reference and fused kernels with three sets of weight variances."""
    reference, fused = _both(MLPKernel, depth=2, kind=kind, batch_shape=torch.Size([3]), tile_pairs=25)
    for kernel in (reference, fused):
        for i, layer in enumerate(kernel.architecture):
            if isinstance(layer, Linear):
                layer.weight_variance = torch.tensor([1.0, 2.0, 3.0]) + i
    return reference, fused


def test_fused_batched_hyperparameters_and_inputs(uncompiled):
    reference, fused = _batched_kernels()
    x = torch.randn(3, 17, 4, dtype=torch.float64)
    _assert_same_kernels(reference, fused, x)
    _assert_same_kernels(reference, fused, x, torch.randn(3, 12, 4, dtype=torch.float64))


def test_fused_runs_break_at_layers_without_elementwise_pair_work(uncompiled):
    def architecture():
        return Sequential(
            Linear(1.5, 0.1),
            ReLU(),
            Linear(2.0, 0.2),
            GELU(),  # no fused form: ends the first run
            Linear(2.0, 0.0),
            Erf(),
            Residual(Linear(1.0, 0.1), ReLU(), Linear(0.5, 0.0)),  # fuses inside
            LayerNorm(center=False),
            Linear(1.0, 0.1),
            ReLU(),
            Linear(2.0, 0.0),
        )

    torch.manual_seed(0)
    reference = TensorProgramKernel(architecture(), kind="ntk", tile_pairs=30).double()
    fused = TensorProgramKernel(architecture(), kind="ntk", tile_pairs=30, fused=True).double()
    fused.load_state_dict(reference.state_dict())
    x = _x(23)
    _assert_same_kernels(reference, fused, x)
    _assert_same_kernels(reference, fused, x, _x(9, seed=2))
    # Runs (each for diagonal and off-diagonal tiles): before GELU, Linear + Erf, after LayerNorm.
    assert len({layers for layers, *_ in fusion._RUNS[fused.architecture]}) == 3
    assert len({layers for layers, *_ in fusion._RUNS[fused.architecture[6].block]}) == 1


def test_kernels_on_grids_ignore_fused(uncompiled):
    # Convolutions dominate and run best on worker threads: a CNN stays on the layer-by-layer path.
    reference, fused = _both(CNNKernel, input_shape=(1, 5, 5), depth=2, readout="flatten", tile_pairs=9)
    x = _x(8, d=25)
    _assert_same_kernels(reference, fused, x, _x(6, d=25, seed=4), rtol=0)
    assert fused.architecture not in fusion._RUNS


def test_cpu_gradients_take_the_reference_path(uncompiled):
    # On a CPU the compiled backward does not pay (see fusion.fuses_gradients).
    reference, fused = _both(MLPKernel, depth=3, kind="ntk", tile_pairs=30)
    x = _x(20).requires_grad_(True)
    grads = []
    for kernel in (reference, fused):
        value = kernel(x, _x(14, seed=1)).to_dense().sum()
        grads.append(torch.autograd.grad(value, [x, *kernel.parameters()]))
    for e, g in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=0)
    assert fused.architecture not in fusion._RUNS, "autograd went through a fused run"


@pytest.fixture
def fused_gradients(monkeypatch):
    """Fused runs also for evaluations autograd records, as on CUDA."""
    monkeypatch.setattr(fusion, "fuses_gradients", lambda device: True)


def _assert_same_gradients(reference, fused, x1, x2=None, rtol=1e-10):
    """Gradients of a random weighting of K (and of the inputs) agree; returns them."""
    weights = torch.randn(
        *x1.shape[:-1], (x1 if x2 is None else x2).shape[-2], generator=torch.Generator().manual_seed(9)
    ).to(x1.dtype)
    grads = []
    for kernel in (reference, fused):
        inputs = [x1.detach().requires_grad_(True)] + ([] if x2 is None else [x2.detach().requires_grad_(True)])
        value = (kernel(*inputs).to_dense() * weights).sum()
        grads.append(torch.autograd.grad(value, [*inputs, *kernel.parameters()]))
    for e, g in zip(*grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * float(e.abs().max()))
    assert fused.architecture in fusion._RUNS, "no fused run was taken"
    return grads


@pytest.mark.parametrize("nonlinearity", ["relu", "erf", "leaky_relu", "abs"])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("same", [True, False])
def test_fused_gradients_match_the_reference(uncompiled, fused_gradients, nonlinearity, kind, same):
    # Tiles of 36 pairs: diagonal, off-diagonal and ragged tiles, assembled for autograd.
    reference, fused = _both(MLPKernel, depth=3, kind=kind, nonlinearity=nonlinearity, tile_pairs=36)
    _assert_same_gradients(reference, fused, _x(21), None if same else _x(16, seed=1))


def test_fused_gradients_at_correlation_one_and_zero_variance(uncompiled, fused_gradients):
    # Duplicate points (c = 1 off the diagonal), antipodal points (c = -1 with no
    # bias) and a zero input with no bias (zero variance, c = 0 / 0 -> 0): every
    # gradient finite and equal to the reference's analytic one.
    x = _x(8)
    x = torch.cat([x, x[:3], -x[3:5], torch.zeros(1, 4, dtype=x.dtype)])
    for kind in ("nngp", "ntk"):
        reference, fused = _both(MLPKernel, depth=3, kind=kind, bias_variance=0.0, tile_pairs=25)
        _assert_same_gradients(reference, fused, x)
        _assert_same_gradients(reference, fused, x, x.flip(0))


def test_fused_arccos_gradients_match_the_reference_at_the_edges():
    k11 = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    k22 = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5]], dtype=torch.float64)
    root = (k11 * k22).sqrt()
    weights = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k12 in (root, -root, 0.3 * root, root * (1 - 1e-9), root * (1 + 1e-15)):
        grads = []
        for moments in (
            lambda a, b, c: arccos_moments(a, b, c),
            lambda a, b, c: fused_arccos_moments(c, arccos_item_factors(a, b)),
        ):
            leaves = [t.clone().requires_grad_(True) for t in (k11, k22, k12)]
            j1, j0 = moments(*leaves)
            grads.append(torch.autograd.grad((weights[0] * j1 + weights[1] * j0).sum(), leaves))
        for e, g in zip(*grads):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_fused_arccos_gradients_pass_gradcheck():
    # Independent of the reference: finite differences inside the open set |c| < 1.
    k11 = torch.tensor([[0.7], [1.3]], dtype=torch.float64)
    k22 = torch.tensor([[0.9, 2.0, 1.1]], dtype=torch.float64)
    k12 = torch.tensor([[0.2, -0.5, 0.8], [0.0, 1.1, -0.9]], dtype=torch.float64)

    def moments(a, b, c):
        return fused_arccos_moments(c, arccos_item_factors(a, b))

    inputs = [t.clone().requires_grad_(True) for t in (k11, k22, k12)]
    assert torch.autograd.gradcheck(moments, inputs)


def test_fused_gradients_with_batched_hyperparameters_and_inputs(uncompiled, fused_gradients):
    reference, fused = _batched_kernels(kind="ntk")
    x = torch.randn(3, 13, 4, dtype=torch.float64)
    _assert_same_gradients(reference, fused, x)
    _assert_same_gradients(reference, fused, x, torch.randn(3, 9, 4, dtype=torch.float64))


def test_fused_gradients_of_a_matrix_free_gp(uncompiled, fused_gradients):
    # The block-by-block gradient pass with fused blocks (one after the other) equals the reference's.
    x = _x(60, d=3)
    y = torch.sin(x.sum(-1))
    results = []
    for fused in (False, True):
        torch.manual_seed(1)
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        kernel = MLPKernel(depth=3, matrix_free=True, fused=fused, memory_budget=8 * 40 * 40 * 24)
        model = _ZeroMeanGP(x, y, likelihood, kernel)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        with gpytorch.settings.max_cholesky_size(0):
            loss = -mll(model(x), y)
            loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
        if fused:
            assert kernel.architecture in fusion._RUNS
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-10, atol=0)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-8, atol=1e-12)


def test_a_failing_compiler_warns_and_falls_back(monkeypatch):
    def broken_compile(program):
        def fail(*args):
            raise RuntimeError("no C++ compiler here")

        return fail

    monkeypatch.setattr(fusion, "_compile", broken_compile)
    reference, fused = _both(MLPKernel, depth=2, tile_pairs=36)
    x = _x(15)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        _assert_same_kernels(reference, fused, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per run, not per tile
        _assert_same_kernels(reference, fused, x)


def test_fused_option_is_checked():
    with pytest.raises(ValueError, match="fused must be True or False"):
        MLPKernel(fused="yes")


class _ZeroMeanGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.covar = gpytorch.kernels.ScaleKernel(kernel)
        self.double()

    def forward(self, inputs):
        return gpytorch.distributions.MultivariateNormal(torch.zeros_like(inputs[:, 0]), self.covar(inputs))


# ---- compiled for real: a few seconds each on the first call of a process ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_fused_kernel_matches_the_reference(dtype):
    reference, fused = _both(MLPKernel, dtype=dtype, depth=3, tile_pairs=400)
    x, z = _x(50, dtype=dtype), _x(37, seed=1, dtype=dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    expected, got = _assert_same_kernels(reference, fused, x, rtol=rtol)
    assert torch.equal(got[0].diagonal(), expected[0].diagonal())
    _assert_same_kernels(reference, fused, x, z, rtol=rtol)
    # evaluate() takes the option too.
    with torch.no_grad():
        got_kernels = evaluate(fused.architecture, x, z, ntk=True, fused=True, tile_pairs=400)
        expected_kernels = reference.nngp_and_ntk(x, z)
    for g, e in zip(got_kernels, expected_kernels):
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * float(e.abs().max()))


def test_compiled_fused_matrix_free_gp_matches_the_dense_gp():
    torch.manual_seed(0)
    x = _x(300, d=3)
    y = torch.sin(x.sum(-1))
    results = []
    for fused in (False, True):
        torch.manual_seed(1)  # the same probe vectors for the stochastic log-determinant
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        likelihood.noise = 0.1  # well conditioned: CG converges, so the paths agree to its tolerance
        model = _ZeroMeanGP(x, y, likelihood, MLPKernel(depth=3, matrix_free=True, fused=fused))
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        settings = (gpytorch.settings.cg_tolerance(1e-10), gpytorch.settings.eval_cg_tolerance(1e-10))
        with gpytorch.settings.max_cholesky_size(0), settings[0], settings[1]:
            loss = -mll(model(x), y)
            loss.backward()
            model.eval()
            with torch.no_grad():
                mean = model(_x(20, d=3, seed=5)).mean
        results.append((loss.detach(), [p.grad for p in model.parameters()], mean))
    (loss0, grads0, mean0), (loss1, grads1, mean1) = results
    # The held matrices agree to round-off (1e-16, see the next test); stochastic
    # Lanczos and the pivoted-Cholesky preconditioner of CG magnify that to ~1e-5.
    assert math.isfinite(loss1.item())
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean1, mean0, rtol=1e-4, atol=1e-6)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-8)


def test_compiled_fused_matrix_free_products_match():
    x, v = _x(200, d=3), _x(200, d=2, seed=7)
    products = []
    for fused in (False, True):
        operator = MLPKernel(depth=3, kind="ntk", matrix_free=True, fused=fused).double()(x).evaluate_kernel()
        products.append(operator @ v)
    torch.testing.assert_close(products[1], products[0], rtol=1e-12, atol=0)


def test_compiled_fused_gradients_match_the_reference(fused_gradients):
    # The compiled backward (AOTAutograd over the fused arc-cosine's analytic gradients), float64.
    # Run after the compiled tests above, in one process, this failed (34% off) with
    # torch's FX graph cache on (torch 2.13); fusion turns that cache off.
    reference, fused = _both(MLPKernel, depth=3, kind="ntk", tile_pairs=400)
    x = _x(30)
    _assert_same_gradients(reference, fused, x)
    _assert_same_gradients(reference, fused, x, _x(23, seed=1))
