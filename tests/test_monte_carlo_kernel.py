"""MonteCarloKernel: the empirical NNGP / NTK of any network factory, as a GPyTorch kernel.

1. Of the finite networks of an architecture (``TensorProgramKernel.to_module``) it approaches
   the exact kernels as the width grows (MLP NTK; RNN NNGP, which also checks that the
   sequence network takes the kernel's time-major inputs).
2. It is a fixed function given its seed: symmetric positive semi-definite, the same on every
   call, its diagonal, batches and memory-bounded tiles agree with the full matrix.
3. The NTK's per-parameter scales act as learning-rate factors.
4. It works where no closed form exists (max pooling) in an exact GP; bad input raises.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from kernel_checks import relative_error
from torch import nn

from gpytorch_tp import MLPKernel, RNNKernel
from gpytorch_tp.empirical import empirical_ntk
from gpytorch_tp.kernels import MonteCarloKernel

DTYPE = torch.float64


def _x(n=5, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)




def _mlp(width=32, out=1):
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


# =============================================================================================
# 1. Convergence to the exact kernels of an architecture's finite networks.
# =============================================================================================
# Calibration (4 seed sets): MLP NTK, 4 networks: 0.021-0.064 at width 512, 0.086-0.69 at 16.
# RNN NNGP, 8 networks with a wide readout: 0.034-0.083 at width 256, 0.24-0.30 at 8.


def test_ntk_of_the_to_module_networks_approaches_the_mlp_ntk():
    kernel = MLPKernel(depth=2, nonlinearity="erf", kind="ntk", input_dim=3, weight_variance=1.5).double()
    x = _x()
    exact = kernel(x).to_dense().detach()

    def error(width):
        mc = MonteCarloKernel(lambda: kernel.to_module(width, dtype=DTYPE), "ntk", n_samples=4, seed=width)
        return relative_error(mc(x).to_dense().detach(), exact)

    wide, narrow = error(512), error(16)
    assert wide < 0.1 and wide < narrow, (wide, narrow)


def test_nngp_of_the_to_module_networks_approaches_the_rnn_nngp_with_time_major_inputs():
    kernel = RNNKernel((3, 2), nonlinearity="erf", readout="mean", weight_variance=1.5).double()
    x = _x(5, 6)  # (N, T * d), time-major
    exact = kernel(x).to_dense().detach()

    def error(width):
        mc = MonteCarloKernel(lambda: kernel.to_module(width, out_features=width), n_samples=8, seed=width)
        return relative_error(mc(x).to_dense().detach(), exact)

    wide, narrow = error(256), error(8)
    assert wide < 0.12 and wide < narrow, (wide, narrow)
    # The same network on the steps in the wrong (channel-major) order is a different function.
    swapped = x.reshape(5, 3, 2).transpose(1, 2).reshape(5, 6)
    assert relative_error(kernel(swapped).to_dense().detach(), exact) > 0.05


# =============================================================================================
# 2. A fixed function: determinism, PSD, diag, batches, tiles.
# =============================================================================================


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_deterministic_psd_and_consistent(kind):
    x, y = _x(6), _x(4, seed=1)
    k = MonteCarloKernel(lambda: _mlp(16, 4), kind, n_samples=3, seed=7)
    full = k(x).to_dense()
    torch.testing.assert_close(full, MonteCarloKernel(lambda: _mlp(16, 4), kind, n_samples=3, seed=7)(x).to_dense())
    assert not torch.allclose(full, MonteCarloKernel(lambda: _mlp(16, 4), kind, n_samples=3, seed=8)(x).to_dense())
    torch.testing.assert_close(full, full.T)
    assert torch.linalg.eigvalsh(full).min() > -1e-10 * full.diagonal().max()
    # x1 != x2, the diagonal and the cross block of the joint matrix agree.
    joint = k(torch.cat([x, y])).to_dense()
    torch.testing.assert_close(k(x, y).to_dense(), joint[:6, 6:])
    torch.testing.assert_close(k(x, diag=True), full.diagonal())
    # Batches: each batch entry on its own.
    batch = torch.stack([x, 2 * x])
    out = k(batch).to_dense()
    assert out.shape == (2, 6, 6)
    torch.testing.assert_close(out[1], k(2 * x).to_dense())
    # Memory-bounded evaluation (one item per forward / Jacobian, so tiles of 1 x 1) changes nothing.
    tiny = MonteCarloKernel(lambda: _mlp(16, 4), kind, n_samples=3, seed=7, chunk_size=1)
    torch.testing.assert_close(tiny(x[:3], y[:2]).to_dense(), k(x, y).to_dense()[:3, :2])
    torch.testing.assert_close(tiny(x[:3], diag=True), full.diagonal()[:3])


def test_float32_and_input_gradients():
    x = _x(4).float().requires_grad_(True)
    for kind in ("nngp", "ntk"):
        k = MonteCarloKernel(lambda: _mlp(8, 2), kind, n_samples=2)
        value = k(x, x.detach()[:2]).to_dense()
        assert value.dtype == torch.float32
        (grad,) = torch.autograd.grad(value.sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# =============================================================================================
# 3. Parameter scales.
# =============================================================================================


def test_parameter_scales_weight_each_parameters_gradients():
    x = _x(4)
    plain = MonteCarloKernel(lambda: _mlp(8), "ntk", n_samples=2)(x).to_dense()
    names = [name for name, _ in _mlp(8).named_parameters()]
    doubled = MonteCarloKernel(lambda: _mlp(8), "ntk", n_samples=2, parameter_scales=dict.fromkeys(names, 2.0))
    torch.testing.assert_close(doubled(x).to_dense(), 2 * plain)
    # Only the readout: the NTK of training the last layer alone is the last hidden layer's Gram matrix.
    only_readout = {name: (1.0 if name.startswith("4.") else 0.0) for name in names}
    readout = MonteCarloKernel(lambda: _mlp(8), "ntk", n_samples=1, parameter_scales=lambda net: only_readout)
    network = readout.network(0, dtype=DTYPE)
    hidden = network[:4](x)
    torch.testing.assert_close(readout(x).to_dense(), hidden @ hidden.T + 1)
    torch.testing.assert_close(empirical_ntk(network, x, parameter_scales=only_readout), hidden @ hidden.T + 1)
    with pytest.raises(KeyError, match="does not train"):
        MonteCarloKernel(lambda: _mlp(8), "ntk", parameter_scales={"nope": 1.0})(x).to_dense()


# =============================================================================================
# 4. No closed form; bad input.
# =============================================================================================


class _MaxPoolNet(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.conv = nn.Conv1d(1, width, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.readout = nn.Linear(width * 4, 1)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x.unsqueeze(1))))
        return self.readout(h.flatten(1))


def test_max_pooling_network_in_an_exact_gp():
    train_x, test_x = _x(12, 8), _x(5, 8, seed=3)
    train_y = train_x[:, :4].sum(-1).sin()
    covar = gpytorch.kernels.ScaleKernel(MonteCarloKernel(_MaxPoolNet, "nngp", n_samples=4))

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(train_x, train_y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean, self.covar = gpytorch.means.ConstantMean(), covar

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))

    model = GP().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        prediction = model.likelihood(model(test_x))
    assert torch.isfinite(prediction.mean).all() and (prediction.variance > 0).all()


def test_bad_input():
    with pytest.raises(TypeError, match="function returning a new random network"):
        MonteCarloKernel(_mlp())
    with pytest.raises(ValueError, match="kind"):
        MonteCarloKernel(_mlp, "gp")
    with pytest.raises(ValueError, match="n_samples"):
        MonteCarloKernel(_mlp, n_samples=0)
    with pytest.raises(ValueError, match="parameter_scales only"):
        MonteCarloKernel(_mlp, "nngp", parameter_scales={})
    x = _x(3)
    with pytest.raises(ValueError, match="NaN"):
        MonteCarloKernel(_mlp)(torch.full_like(x, float("nan"))).to_dense()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        MonteCarloKernel(lambda: "not a network")(x).to_dense()
    with pytest.raises(ValueError, match="outputs"):
        MonteCarloKernel(lambda: nn.Unflatten(1, (3, 1)))(x).to_dense()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_cuda_inputs_give_the_cpu_kernel(kind):
    x = _x(5)
    k = MonteCarloKernel(lambda: _mlp(16, 2), kind, n_samples=2, seed=3)
    on_gpu = k(x.cuda()).to_dense()
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), k(x).to_dense(), rtol=1e-10, atol=1e-12)
