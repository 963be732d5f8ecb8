"""The kernels behave as GPyTorch kernels: shapes, batches, diag, active_dims, dtypes, state."""

from __future__ import annotations

import io
import pickle
import unittest

import gpytorch
import pytest
import torch
from gpytorch.priors import GammaPrior
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

from gpytorch_tp import MLPKernel, TensorProgramKernel, evaluate
from gpytorch_tp.layers import Erf, LayerNorm, Linear, ReLU, Residual, Sequential


class TestMLPKernelNNGP(BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return MLPKernel(depth=2, nonlinearity="relu", kind="nngp", **kwargs)


class TestMLPKernelNTK(BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return MLPKernel(depth=3, nonlinearity="erf", kind="ntk", **kwargs)


class TestResidualLayerNormKernel(BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        batch_shape = kwargs.get("batch_shape") or torch.Size()
        net = Sequential(
            Linear(1.5, 0.1, batch_shape=batch_shape),
            Residual(ReLU(), Linear(2.0, 0.05, batch_shape=batch_shape)),
            LayerNorm(),
            ReLU(),
            Linear(2.0, 0.1, batch_shape=batch_shape),
        )
        return TensorProgramKernel(net, kind="ntk", **kwargs)


def _x(n=7, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_tiled_evaluation_equals_single_tile(kind):
    x1, x2 = _x(37, 5, 1), _x(23, 5, 2)
    small = MLPKernel(depth=3, kind=kind, tile_pairs=50).double()
    whole = MLPKernel(depth=3, kind=kind, tile_pairs=10**9).double()
    whole.load_state_dict(small.state_dict())
    for a, b in ((x1, x2), (x1, x1), (x1, None)):
        expected = whole(a, b).to_dense()
        got = small(a, b).to_dense()
        assert torch.allclose(got, expected, rtol=1e-13, atol=1e-13)


def test_symmetric_matrix_is_exactly_symmetric_and_psd():
    x = _x(60, 3, 3)
    for kind in ("nngp", "ntk"):
        k = MLPKernel(depth=4, kind=kind, tile_pairs=100).double()
        K = k(x).to_dense().detach()
        assert torch.equal(K, K.transpose(-1, -2))
        assert torch.linalg.eigvalsh(K).min() > -1e-10 * K.diagonal().max()


def test_diag_matches_full_diagonal_and_cross_diag():
    x1, x2 = _x(9, 4, 4), _x(9, 4, 5)
    for kind in ("nngp", "ntk"):
        k = MLPKernel(depth=2, nonlinearity="gelu", kind=kind).double()
        assert torch.allclose(k(x1, diag=True), k(x1).to_dense().diagonal(), rtol=1e-12)
        assert torch.allclose(k(x1, x2, diag=True), k(x1, x2).to_dense().diagonal(), rtol=1e-12)


def test_nngp_and_ntk_in_one_pass_match_separate_kernels():
    arch = Sequential(Linear(2.0, 0.1), ReLU(), Linear(2.0, 0.1))
    x = _x(8, 3, 6)
    nngp_kernel = TensorProgramKernel(arch, kind="nngp").double()
    ntk_kernel = TensorProgramKernel(arch, kind="ntk").double()
    nngp, ntk = ntk_kernel.nngp_and_ntk(x)
    assert torch.allclose(nngp, nngp_kernel(x).to_dense())
    assert torch.allclose(ntk, ntk_kernel(x).to_dense())
    # The NTK of a network dominates its NNGP kernel (it adds positive terms).
    assert (ntk.diagonal() > nngp.diagonal()).all()


def test_batch_shape_hyperparameters_give_one_kernel_per_batch_entry():
    k = MLPKernel(depth=2, batch_shape=torch.Size([3])).double()
    first = k.architecture[0]
    assert first.weight_variance.shape == torch.Size([3])
    first.weight_variance = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x = _x(5, 2, 7)
    K = k(x).to_dense()
    assert K.shape == (3, 5, 5)
    for i in range(3):
        single = k[i]
        assert single.batch_shape == torch.Size([])
        assert torch.allclose(single(x).to_dense(), K[i])
    assert not torch.allclose(K[0], K[2])


def test_active_dims_select_features():
    x = _x(6, 5, 8)
    k = MLPKernel(depth=2, active_dims=[0, 3]).double()
    ref = MLPKernel(depth=2).double()
    assert torch.allclose(k(x).to_dense(), ref(x[:, [0, 3]]).to_dense())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows_inputs_and_module(dtype):
    k = MLPKernel(depth=3, kind="ntk").to(dtype)
    x = _x(6, 3, 9, dtype=dtype)
    K = k(x).to_dense()
    assert K.dtype == dtype
    assert torch.isfinite(K).all()


def test_float32_deep_network_matches_float64():
    x = _x(20, 6, 10)
    k64 = MLPKernel(depth=20, kind="ntk").double()
    k32 = MLPKernel(depth=20, kind="ntk").float()
    K64 = k64(x).to_dense().detach()
    K32 = k32(x.float()).to_dense().detach()
    assert torch.isfinite(K32).all()
    assert ((K32.double() - K64).norm() / K64.norm()) < 1e-4


def test_state_dict_round_trip_and_pickle():
    k = MLPKernel(depth=2, kind="ntk", weight_variance_prior=GammaPrior(2.0, 1.0)).double()
    k.architecture[0].weight_variance = 3.0
    buffer = io.BytesIO()
    torch.save(k.state_dict(), buffer)
    buffer.seek(0)
    fresh = MLPKernel(depth=2, kind="ntk", weight_variance_prior=GammaPrior(2.0, 1.0)).double()
    fresh.load_state_dict(torch.load(buffer))
    x = _x(5, 3, 11)
    assert torch.allclose(fresh(x).to_dense(), k(x).to_dense())
    clone = pickle.loads(pickle.dumps(k))
    assert torch.allclose(clone(x).to_dense(), k(x).to_dense())


def test_priors_are_registered_and_enter_the_loss():
    k = MLPKernel(depth=1, weight_variance_prior=GammaPrior(3.0, 2.0), bias_variance_prior=GammaPrior(2.0, 10.0))
    priors = {name for name, *_ in k.named_priors()}
    assert any("weight_variance_prior" in p for p in priors)
    assert any("bias_variance_prior" in p for p in priors)
    total = sum(prior.log_prob(closure(module)).sum() for _, module, prior, closure, _ in k.named_priors())
    assert torch.isfinite(total)
    # gpytorch's sample_from_prior uses the setter closures.
    first = k.architecture[0]
    before = first.weight_variance.item()
    torch.manual_seed(0)
    first.sample_from_prior("weight_variance_prior")
    assert first.weight_variance.item() > 0
    assert first.weight_variance.item() != before


def test_hyperparameter_setters_and_constraints():
    layer = Linear(2.0, 0.1)
    layer.weight_variance = 0.5
    assert torch.isclose(layer.weight_variance, torch.tensor(0.5))
    layer.bias_variance = 0.25
    assert torch.isclose(layer.bias_variance, torch.tensor(0.25))
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"raw_weight_variance", "raw_bias_variance"}
    fixed = Linear(2.0, 0.0)
    assert {n for n, _ in fixed.named_parameters()} == {"raw_weight_variance"}
    assert float(fixed.bias_variance) == 0.0


def test_kernel_in_scale_kernel_in_exact_gp_trains():
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 30, dtype=torch.float64).unsqueeze(-1)
    y = torch.sin(2 * x).squeeze(-1) + 0.05 * torch.randn(30, dtype=torch.float64)

    class Model(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(MLPKernel(depth=2, kind="ntk"))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = Model(x, y, likelihood).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        for p in model.parameters():
            assert torch.isfinite(p.grad).all()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    model.eval()
    with torch.no_grad():
        pred = likelihood(model(x))
    rmse = (pred.mean - y).pow(2).mean().sqrt()
    assert rmse < 0.2


def test_input_gradients_are_finite_at_training_points():
    x = _x(10, 3, 12)
    x = torch.cat([x, x[:2]])  # duplicated points
    k = MLPKernel(depth=3, kind="ntk").double()
    xt = x.clone().requires_grad_(True)
    K = k(xt, x).to_dense()
    (g,) = torch.autograd.grad(K.sum(), xt)
    assert torch.isfinite(g).all()
    xs = x.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(k(xs).to_dense().sum(), xs)
    assert torch.isfinite(g2).all()


def test_evaluate_function_matches_kernel():
    arch = Sequential(Linear(1.0, 0.2), Erf(), Linear(1.0, 0.2))
    x1, x2 = _x(4, 2, 13), _x(3, 2, 14)
    nngp, ntk = evaluate(arch, x1, x2, ntk=True)
    assert nngp.shape == ntk.shape == (4, 3)
    assert torch.allclose(nngp, TensorProgramKernel(arch).double()(x1, x2).to_dense())


def test_evaluation_options_are_one_validated_object_behind_the_kernel_attributes():
    kernel = MLPKernel(depth=2, tile_pairs=64, memory_budget=2**26)
    assert kernel.options.tile_pairs == 64 and kernel.tile_pairs == 64
    kernel.tile_pairs = 16  # the attribute replaces the options, checked again
    assert kernel.options.tile_pairs == 16 and kernel.options.memory_budget == 2**26
    with pytest.raises(ValueError, match="tile_pairs must be positive"):
        kernel.tile_pairs = 0
    with pytest.raises(ValueError, match="memory_budget must be a positive"):
        kernel.memory_budget = -1
    with pytest.raises(ValueError, match="matrix_free must be True, False or None"):
        kernel.matrix_free = "yes"
    assert kernel.tile_pairs == 16  # a refused value changes nothing
    x = torch.randn(20, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="not both"):
        evaluate(kernel.architecture, x, options=kernel.options, tile_pairs=8)


def test_kernels_pickled_with_loose_option_attributes_load():
    # Before the options were one object, a kernel pickled its options as attributes (some absent in older ones).
    kernel = MLPKernel(depth=2, kind="ntk").double()
    state = kernel.__getstate__() if hasattr(kernel, "__getstate__") else dict(kernel.__dict__)
    state = dict(state)
    del state["options"]
    state.update(tile_pairs=100, memory_budget=2**27, progress=False, input_shape=None)
    old = MLPKernel.__new__(MLPKernel)
    old.__setstate__(state)
    assert old.tile_pairs == 100 and old.memory_budget == 2**27 and old.progress is False
    assert old.fused is False and old.matrix_free is None and old.sequence is False  # absent: defaults
    x = torch.randn(30, 3, dtype=torch.float64)
    torch.testing.assert_close(old(x).to_dense(), kernel(x).to_dense(), rtol=1e-12, atol=1e-12)
