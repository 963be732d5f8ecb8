"""MLPKernel(normalize=True): the correlation kernel with the scale left to ScaleKernel (issue 9)."""

from __future__ import annotations

import copy
import math
import unittest

import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

from gpytorch_tp import MLPKernel
from gpytorch_tp.layers import Linear


class TestNormalizedMLPKernelNNGP(BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return MLPKernel(depth=2, nonlinearity="relu", kind="nngp", normalize=True, **kwargs)


class TestNormalizedMLPKernelNTK(BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return MLPKernel(depth=2, nonlinearity="erf", kind="ntk", normalize=True, **kwargs)


def _x(n=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _dense_layers(kernel: MLPKernel) -> list[Linear]:
    return [layer for layer in kernel.architecture.layers if isinstance(layer, Linear)]


def _perturb(kernel: MLPKernel, seed: int = 0) -> MLPKernel:
    """Move every variance off its default so that the tests do not pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    for layer in _dense_layers(kernel):
        layer.weight_variance = 0.5 + 2 * torch.rand((), generator=g, dtype=torch.float64)
        layer.bias_variance = 0.05 + 0.5 * torch.rand((), generator=g, dtype=torch.float64)
    return kernel


def _correlation(raw: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    return raw / (d1.unsqueeze(-1) * d2.unsqueeze(-2)).sqrt()


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("nonlinearity", ["relu", "erf", "gelu"])
def test_normalized_kernel_is_raw_kernel_over_its_diagonal(kind, nonlinearity):
    x1, x2 = _x(6, 3, 1), _x(5, 3, 2)
    normed = _perturb(MLPKernel(depth=3, nonlinearity=nonlinearity, kind=kind, normalize=True).double())
    raw = MLPKernel(depth=3, nonlinearity=nonlinearity, kind=kind).double()
    for a, b in zip(_dense_layers(raw), _dense_layers(normed)):
        a.weight_variance, a.bias_variance = b.weight_variance, b.bias_variance
    d1, d2 = raw(x1, diag=True), raw(x2, diag=True)
    expected = _correlation(raw(x1, x2).to_dense(), d1, d2)
    assert torch.allclose(normed(x1, x2).to_dense(), expected, rtol=1e-12, atol=1e-14)
    # diag=True for different inputs equals the full matrix's diagonal.
    x3 = _x(6, 3, 15)
    assert torch.allclose(normed(x1, x3, diag=True), normed(x1, x3).to_dense().diagonal(), rtol=1e-12)
    # Unit diagonal, by construction, in the full matrix and with diag=True.
    K = normed(x1).to_dense()
    assert torch.allclose(K.diagonal(), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.equal(normed(x1, diag=True), torch.ones(6, dtype=torch.float64))
    assert torch.linalg.eigvalsh(K).min() > -1e-12
    # The raw kernel is not a correlation (the test would pass trivially otherwise).
    assert not torch.allclose(raw(x1, diag=True), torch.ones(6, dtype=torch.float64), atol=1e-2)


def _scale_layers(kernel: MLPKernel, factors: list[float], degree: float) -> None:
    """Scale layer l's output by c_l: w_l -> w_l c_l / c_{l-1}^a, b_l -> b_l c_l (c_0 = 1)."""
    previous = 1.0
    for layer, c in zip(_dense_layers(kernel), factors):
        layer.weight_variance = layer.weight_variance * c / previous**degree
        layer.bias_variance = layer.bias_variance * c
        previous = c


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize(("nonlinearity", "degree"), [("relu", 1.0), ("abs", 1.0), ("leaky_relu", 1.0)])
def test_homogeneous_layer_rescaling_changes_raw_kernel_not_normalized(kind, nonlinearity, degree):
    # Why every weight variance of a homogeneous network may be fixed: each layer
    # has a scale direction that the normalised kernel cannot see.
    x1, x2 = _x(6, 3, 3), _x(4, 3, 4)
    for normalize in (False, True):
        base = _perturb(MLPKernel(depth=3, nonlinearity=nonlinearity, kind=kind, normalize=normalize).double())
        moved = copy.deepcopy(base)
        _scale_layers(moved, [3.0, 0.2, 5.0, 0.7], degree)
        same = torch.allclose(moved(x1, x2).to_dense(), base(x1, x2).to_dense(), rtol=1e-11)
        assert same == normalize


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_readout_rescaling_is_invisible_to_normalized_kernel_for_any_nonlinearity(kind):
    x1, x2 = _x(6, 3, 5), _x(4, 3, 6)
    base = _perturb(MLPKernel(depth=2, nonlinearity="erf", kind=kind, normalize=True).double())
    moved = copy.deepcopy(base)
    readout = _dense_layers(moved)[-1]
    readout.weight_variance, readout.bias_variance = readout.weight_variance * 7, readout.bias_variance * 7
    assert torch.allclose(moved(x1, x2).to_dense(), base(x1, x2).to_dense(), rtol=1e-12)
    # A hidden layer's scale matters for erf (it saturates): that variance stays learnable.
    hidden = _dense_layers(moved)[0]
    hidden.weight_variance, hidden.bias_variance = hidden.weight_variance * 7, hidden.bias_variance * 7
    assert not torch.allclose(moved(x1, x2).to_dense(), base(x1, x2).to_dense(), rtol=1e-3)


def _learned(kernel: MLPKernel) -> set[str]:
    return {name.split("architecture.layers.")[1] for name, _ in kernel.named_parameters()}


def test_only_identifiable_variances_are_learned():
    # ReLU: biases only (4 dense layers at depth 3).
    assert _learned(MLPKernel(depth=3, normalize=True)) == {f"{i}.raw_bias_variance" for i in (0, 2, 4, 6)}
    # erf: hidden weight variances too, not the readout's.
    erf = _learned(MLPKernel(depth=2, nonlinearity="erf", normalize=True))
    assert erf == {"0.raw_weight_variance", "0.raw_bias_variance", "2.raw_weight_variance", "2.raw_bias_variance"} | {
        "4.raw_bias_variance"
    }
    # LayerNorm removes each hidden layer's scale: only biases again.
    ln = _learned(MLPKernel(depth=2, nonlinearity="erf", layer_norm=True, normalize=True))
    assert ln == {"0.raw_bias_variance", "3.raw_bias_variance", "6.raw_bias_variance"}
    # The raw kernel is unchanged: everything is learned.
    assert len(_learned(MLPKernel(depth=3))) == 8


def test_layer_norm_hidden_rescaling_is_invisible_to_normalized_kernel():
    x1, x2 = _x(5, 3, 7), _x(4, 3, 8)
    base = _perturb(MLPKernel(depth=2, nonlinearity="erf", layer_norm=True, kind="ntk", normalize=True).double())
    moved = copy.deepcopy(base)
    for layer in _dense_layers(moved)[:-1]:
        layer.weight_variance, layer.bias_variance = layer.weight_variance * 4, layer.bias_variance * 4
    assert torch.allclose(moved(x1, x2).to_dense(), base(x1, x2).to_dense(), rtol=1e-10)


def test_nngp_and_ntk_stay_raw():
    x = _x(5, 3, 9)
    k = MLPKernel(depth=2, kind="ntk", normalize=True).double()
    _, ntk = k.nngp_and_ntk(x)
    assert not torch.allclose(ntk.diagonal(), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(k(x).to_dense(), _correlation(ntk, ntk.diagonal(), ntk.diagonal()), rtol=1e-12)


def test_batch_shape_and_active_dims():
    x = _x(6, 5, 10)
    k = MLPKernel(depth=2, kind="ntk", normalize=True, batch_shape=torch.Size([2])).double()
    first = _dense_layers(k)[0]
    first.bias_variance = torch.tensor([0.01, 2.0], dtype=torch.float64)
    K = k(x).to_dense()
    assert K.shape == (2, 6, 6)
    for i in range(2):
        assert torch.allclose(k[i](x).to_dense(), K[i], rtol=1e-12)
        assert torch.allclose(K[i].diagonal(), torch.ones(6, dtype=torch.float64))
    assert not torch.allclose(K[0], K[1], rtol=1e-3)
    assert torch.equal(k(x, diag=True), torch.ones(2, 6, dtype=torch.float64))
    sub = MLPKernel(depth=2, normalize=True, active_dims=[0, 3]).double()
    ref = MLPKernel(depth=2, normalize=True).double()
    assert torch.allclose(sub(x, x.flip(0)).to_dense(), ref(x[:, [0, 3]], x.flip(0)[:, [0, 3]]).to_dense())


def test_gradients_finite_at_duplicates_and_zero_variance_points():
    k = MLPKernel(depth=2, kind="ntk", normalize=True).double()
    train = _x(4, 3, 11)
    x = torch.cat([train[:2], _x(2, 3, 12)]).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(k(x, train).to_dense().sum(), x)
    assert torch.isfinite(grad_x).all()
    k(train, x).to_dense().sum().backward()
    for p in k.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # A zero input with no bias has zero variance: correlation 0 there, not NaN.
    nobias = MLPKernel(depth=1, bias_variance=0.0, normalize=True).double()
    z = torch.cat([torch.zeros(1, 3, dtype=torch.float64), _x(2, 3, 13)])
    Kz = nobias(z).to_dense()
    assert torch.isfinite(Kz).all() and Kz[0].abs().max() == 0
    assert torch.isfinite(nobias(z, _x(3, 3, 14)).to_dense()).all()


def test_repr_shows_the_option():
    assert "normalize=True" in repr(MLPKernel(depth=1, normalize=True))
    assert "normalize" not in repr(MLPKernel(depth=1))


botorch = pytest.importorskip("botorch")


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_bo_fit_does_not_collapse_on_hartmann(kind):
    # The peer's failure mode (issue 9): fit_gpytorch_mll drives the outputscale to
    # ~1e-3..1e-11 and the noise up, leaving a flat model.  With the normalised
    # kernel (and centred inputs) the fit explains the data.
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.test_functions import Hartmann
    from gpytorch.kernels import ScaleKernel
    from gpytorch.mlls import ExactMarginalLogLikelihood

    f = Hartmann(dim=6, negate=True)
    x = torch.quasirandom.SobolEngine(6, scramble=True, seed=0).draw(20, dtype=torch.float64)
    y = f(x).unsqueeze(-1)
    model = SingleTaskGP(
        x,
        y,
        covar_module=ScaleKernel(MLPKernel(depth=3, kind=kind, normalize=True)),
        input_transform=Normalize(6, center=0.0),
        outcome_transform=Standardize(1),
    )
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    model.eval()
    with torch.no_grad():
        mean = model.posterior(x).mean
    explained = 1 - (mean - y).pow(2).sum() / (y - y.mean()).pow(2).sum()
    assert explained > 0.9
    # With a unit-diagonal base kernel the outputscale is the signal variance.
    assert model.covar_module.outputscale.item() > 0.1
    assert model.likelihood.noise.item() < 0.1
    assert math.isfinite(model.covar_module.outputscale.item())
