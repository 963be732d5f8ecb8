"""GRU and LSTM NNGP kernels (fixed quasi-Monte Carlo particles) against independent computations.

1. Finite-width NTK-parameterised GRU/LSTM networks (:func:`gpytorch_tp.empirical.build_network`,
   run on the UNPADDED sequences) approach the kernels as the width grows (64 -> 1024).
2. The particle estimate converges: the default particle count is within the documented
   error of a much larger one, and a length-one GRU with erf gates and erf candidate matches
   an independent closed form / scipy integration.
3. Padding to a longer T, the other sequences of the batch, the order of x1 and x2, diag and
   tiles never change a value; kernel matrices are symmetric and PSD up to the stated error.
4. GPyTorch interface: gradients finite, float32, ExactGP training; bad input gets a clear message.
"""

from __future__ import annotations

import math
import sys

import gpytorch
import numpy as np
import pytest
import torch
from kernel_checks import relative_error
from sequence_data import assert_wide_beats_narrow, kernel_value, nan_padded, random_sequences

from gpytorch_tp import GRUKernel, LSTMKernel, evaluate
from gpytorch_tp.empirical import build_network
from gpytorch_tp.layers import GRU, LSTM, LastStep, Linear, Sequential

DTYPE = torch.float64
NAN = float("nan")


def _kernel(cls, steps, d, **options):
    return cls((steps, d), **options).double()




# =============================================================================================
# 1. Finite-width networks converge to the kernels.
# =============================================================================================
#
# NNGP of a finite network: output covariance with a wide readout (out_features = width),
# averaged over 4 networks; the networks run on each unpadded sequence (d, L) on its own.
# Measured (8 seed sets): error at width 1024 0.02-0.06, mean error at 64 0.10-0.14.

FIN_STEPS, FIN_D = 4, 2
FIN_SEQS = random_sequences((4, 2, 3, 4, 4), FIN_D, seed=21)
FIN_SEQS = FIN_SEQS + [FIN_SEQS[0].clone()]  # a duplicate
FINITE_NETWORKS = 4
FINITE_CASES = {
    "gru-tanh-mean": (GRUKernel, {"readout": "mean", "weight_variance": 1.5}),
    "gru-erf-last": (GRUKernel, {"nonlinearity": "erf", "gate": "erf", "weight_variance": 1.5}),
    "lstm-tanh-last": (LSTMKernel, {"weight_variance": 1.5, "num_particles": 4096}),
}
FINITE_BOUND = 0.1
FINITE_RATIO = 1.5


def _finite_nngp(kernel, width, seeds):
    total = 0
    with torch.no_grad():
        for seed in seeds:
            network = build_network(
                kernel.architecture, (FIN_D, FIN_STEPS), width, out_features=width, seed=seed, dtype=DTYPE
            )[1:]  # without the Unflatten: takes (d, L) sequences of any length
            f = torch.stack([network(s.T) for s in FIN_SEQS])
            total = total + f @ f.T / width
    return total / len(seeds)


@pytest.mark.parametrize("name", list(FINITE_CASES))
def test_finite_width_networks_converge_to_the_kernel(name):
    cls, options = FINITE_CASES[name]
    kernel = _kernel(cls, FIN_STEPS, FIN_D, **options)
    with torch.no_grad():
        exact = kernel(nan_padded(FIN_SEQS, FIN_STEPS)).to_dense()
    assert_wide_beats_narrow(
        lambda width, seeds: relative_error(_finite_nngp(kernel, width, seeds), exact),
        name,
        FINITE_NETWORKS,
        FINITE_BOUND,
        FINITE_RATIO,
    )


# =============================================================================================
# 2. The particle estimate.
# =============================================================================================

ACC_SEQS = random_sequences((4, 2, 4), 2, seed=22)


@pytest.mark.parametrize(
    ("cls", "options", "default_bound"),
    [
        (GRUKernel, {"readout": "mean"}, 0.01),
        (GRUKernel, {"nonlinearity": "erf", "gate": "erf"}, 0.01),
        (LSTMKernel, {}, 0.08),
    ],
)
def test_default_particles_are_within_the_documented_error_of_many_more(cls, options, default_bound):
    x = nan_padded(ACC_SEQS, 4)
    with torch.no_grad():
        reference = _kernel(cls, 4, 2, num_particles=16384, **options)(x).to_dense()
        errors = [
            relative_error(_kernel(cls, 4, 2, num_particles=m, **options)(x).to_dense(), reference) for m in (64, 1024)
        ]
    assert errors[1] < default_bound, errors
    assert errors[1] < errors[0] / 2, errors


def test_length_one_erf_gru_matches_an_independent_integration():
    # One step, h_{-1} = 0: h = (1 - z) n with z = g(Z), n = erf(A + r b_hn), r = g(R), g(x) = (1 + erf x)/2,
    # Z, R, A independent families.  E[(1 - z)(1 - z')] = (1 + (2/pi) asin(2 c / sqrt((1 + 2 c11)(1 + 2 c22)))) / 4
    # with c = Cov(Z, Z'); E[n n'] = E over (R, R') of the erf dual kernel at
    # Cov(A + r b, A' + r' b) = [[c11 + r^2 s, c12 + r r' s], [., c22 + r'^2 s]]  (s = bias variance; A
    # has the covariance c of the gates, u K_x + s, as h_{-1} = 0),
    # integrated here by a fine trapezoidal rule in numpy (spectrally accurate for this smooth integrand).
    from scipy.special import erf

    u, b = 1.3, 0.2
    x = torch.tensor([[0.7, -0.4], [0.2, 0.9], [-1.1, 0.3]], dtype=DTYPE)
    kernel = GRUKernel((1, 2), nonlinearity="erf", gate="erf", input_variance=u, bias_variance=b, readout_variance=1.0)
    kernel = kernel.double()
    with torch.no_grad():
        got = kernel(x).to_dense()

    def erf_dual(k11, k22, k12):
        return 2 / np.pi * np.arcsin(2 * k12 / np.sqrt((1 + 2 * k11) * (1 + 2 * k22)))

    grid = np.linspace(-9, 9, 721)
    s_, t_ = np.meshgrid(grid, grid, indexing="ij")
    density = np.exp(-(s_**2 + t_**2) / 2) / (2 * np.pi) * (grid[1] - grid[0]) ** 2
    inputs = (x @ x.T / 2).numpy()
    expected = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            c11, c22, c12 = u * inputs[i, i] + b, u * inputs[j, j] + b, u * inputs[i, j] + b
            gates = (1 + erf_dual(c11, c22, c12)) / 4
            chol = np.linalg.cholesky(np.array([[c11, c12], [c12, c22]]) + 1e-12 * np.eye(2))
            r1 = (1 + erf(chol[0, 0] * s_)) / 2
            r2 = (1 + erf(chol[1, 0] * s_ + chol[1, 1] * t_)) / 2
            candidate = erf_dual(c11 + r1 * r1 * b, c22 + r2 * r2 * b, c12 + r1 * r2 * b)
            expected[i, j] = gates * (candidate * density).sum() + b  # readout: sigma_v^2 K_h + sigma_b^2
    torch.testing.assert_close(got, torch.as_tensor(expected), rtol=2e-3, atol=2e-4)


# =============================================================================================
# 3. Padding, batch, order, diag, tiles; symmetry and PSD.
# =============================================================================================

PAD_SEQS = random_sequences((5, 2, 4, 1, 3, 5), 2, seed=31)
PAD_OTHER = random_sequences((3, 5, 2, 4), 2, seed=32)
# Closed-form candidate (erf) for speed; the tanh rule is exercised by the other tests.
PAD_CASES = {
    "gru-sigmoid-erf-last": (GRUKernel, {"nonlinearity": "erf", "num_particles": 64}),
    "gru-erf-depth2-mean": (
        GRUKernel,
        {"nonlinearity": "erf", "gate": "erf", "readout": "mean", "depth": 2, "num_particles": 32},
    ),
    "lstm-mean": (LSTMKernel, {"readout": "mean", "num_particles": 64}),
}


@pytest.mark.parametrize("name", list(PAD_CASES))
def test_padding_batch_order_diag_and_tiles_never_change_a_value(name):
    cls, options = PAD_CASES[name]
    # The raw per-pair estimates: projecting k(x) onto the PSD cone makes a subset's matrix depend on the whole set.
    options = {**options, "psd_projection": False}
    short, long = _kernel(cls, 5, 2, **options), _kernel(cls, 7, 2, **options)
    x1, x2 = nan_padded(PAD_SEQS, 5), nan_padded(PAD_OTHER, 5)
    full = kernel_value(short, x1, x2)
    torch.testing.assert_close(
        kernel_value(long, nan_padded(PAD_SEQS, 7), nan_padded(PAD_OTHER, 7)), full, rtol=1e-8, atol=1e-10
    )
    torch.testing.assert_close(kernel_value(short, x2, x1), full.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(kernel_value(short, x1[[2]], x2[[1]])[0, 0], full[2, 1], rtol=1e-8, atol=1e-10)
    own = kernel_value(short, x1)
    torch.testing.assert_close(kernel_value(short, x1, diag=True), own.diagonal(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(kernel_value(short, x1[[3, 0]]), own[[3, 0]][:, [3, 0]], rtol=1e-8, atol=1e-10)
    tiled = _kernel(cls, 5, 2, tile_pairs=4, **options)
    torch.testing.assert_close(kernel_value(tiled, x1), own, rtol=1e-8, atol=1e-10)
    assert (full.max() - full.min()) > 1e-2  # not vacuous


# Smallest eigenvalue / largest, measured with 512 particles: GRU +1.5e-4 (positive), LSTM -1.1e-3 (its
# particle error, a few 1e-2 with 512 particles, differs between a sequence with itself and with a
# near-duplicate of itself).
@pytest.mark.parametrize(("cls", "tolerance"), [(GRUKernel, 1e-4), (LSTMKernel, 3e-3)])
def test_kernel_matrix_is_symmetric_and_psd_up_to_the_particle_error(cls, tolerance):
    seqs = random_sequences((6, 2, 5, 1, 6, 3, 4, 6, 5, 6), 2, seed=49)
    seqs.append(seqs[0] + 1e-3)  # a near-duplicate
    x = nan_padded(seqs, 6)
    options = {"nonlinearity": "erf"} if cls is GRUKernel else {}  # closed-form candidate: faster
    K = kernel_value(_kernel(cls, 6, 2, num_particles=512, **options), x)
    assert torch.equal(K, K.T)
    eigenvalues = torch.linalg.eigvalsh(K)
    assert eigenvalues.min() > -tolerance * eigenvalues.max(), eigenvalues


# =============================================================================================
# 4. Interface and bad input.
# =============================================================================================


@pytest.mark.parametrize("cls", [GRUKernel, LSTMKernel])
def test_gradients_are_finite_also_at_duplicates(cls):
    seqs = random_sequences((3, 2), 2, seed=51)
    x = nan_padded(seqs + [seqs[0].clone()], 3).requires_grad_(True)
    kernel = _kernel(cls, 3, 2, num_particles=16, readout="mean")
    kernel(x).to_dense().sum().backward()
    grads = [p.grad for p in kernel.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(x.grad[~torch.isnan(x)]).all()
    assert (x.grad[torch.isnan(x)] == 0).all()


def test_float32_agrees_with_float64():
    x = nan_padded(random_sequences((4, 3, 4), 2, seed=52), 4)
    k64 = _kernel(GRUKernel, 4, 2, num_particles=64)
    k32 = GRUKernel((4, 2), num_particles=64)
    got = kernel_value(k32, x.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), kernel_value(k64, x), rtol=1e-4, atol=1e-5)


def test_exact_gp_trains_with_a_finite_padding_value():
    seqs = random_sequences((3, 2, 3, 1), 2, seed=53)
    x = nan_padded(seqs, 3).nan_to_num(-1e6)
    y = torch.sin(x.clamp(-3, 3).sum(-1))

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(x, y, likelihood)
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(LSTMKernel((3, 2), num_particles=32, padding_value=-1e6))

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean(inputs), self.covar(inputs))

    model = GP().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)


def test_bad_input_and_arguments():
    with pytest.raises(ValueError, match="kind must be 'nngp' or 'ntk'"):
        GRUKernel((4, 2), kind="ntkk")
    with pytest.raises(ValueError, match="num_particles must be even"):
        LSTM(num_particles=101)
    with pytest.raises(ValueError, match="gate must be one of"):
        GRU(gate="relu")
    with pytest.raises(ValueError, match="input_shape=\\(T, d\\)"):
        LSTMKernel((8,))
    with pytest.raises(ValueError, match="needs sequence features"):
        evaluate(Sequential(GRU(num_particles=8), LastStep(), Linear()), torch.randn(3, 4, dtype=DTYPE))
    kernel = _kernel(GRUKernel, 4, 2, num_particles=8)
    bad = nan_padded(random_sequences((4, 3, 4), 2, seed=54), 4)
    bad[0, 1] = NAN  # part of a step
    with pytest.raises(ValueError, match="NaN in some but not all features of a step"):
        kernel(bad).to_dense()


def test_tutorial_gated_kernels_on_a_few_digits():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tutorials" / "rnn_sequences.py"
    spec = importlib.util.spec_from_file_location("rnn_sequences_tutorial", path)
    tutorial = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tutorial  # dataclasses look their module up
    try:
        spec.loader.exec_module(tutorial)
    finally:
        del sys.modules[spec.name]
    tutorial.GATED_PARTICLES = 32
    data = tutorial.cut(tutorial.load_data(5, 2), seed=1)  # digits of different lengths
    assert "gru" in tutorial.make_methods((1.0,), gated=True)
    for kernel_class in (LSTMKernel,):  # GRUKernel goes through the same code, at more cost
        (train, test) = tutorial.gated_candidates(kernel_class)(data.train_x[:5], data.test_x[:2])[""]
        assert train.shape == (5, 5) and test.shape == (2, 5)
        assert torch.isfinite(train).all() and torch.isfinite(test).all()
        assert torch.linalg.eigvalsh(train).min() > -1e-3 * train.diagonal().max()
