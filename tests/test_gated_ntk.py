"""GRU and LSTM NTK (tangent recursion over fixed quasi-Monte Carlo particles) against independent computations.

1. The parameter-gradient NTK of finite NTK-parameterised GRU/LSTM networks (run on the UNPADDED
   sequences) approaches the kernel as the width grows; also stacked (a nonzero input NTK).
2. The particle estimate converges to a many-particle one.
3. Padding to a longer T, the other sequences of the batch, the order of x1 and x2, diag and tiles
   never change a value; the tangent part is symmetric and PSD up to the particle error.
4. GPyTorch interface: gradients finite (and equal to finite differences), float32, ExactGP training;
   nonlinearities without a closed-form derivative.  (Conversion of nn.GRU/LSTM: tests/test_conversion.py.)
"""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from kernel_checks import relative_error
from sequence_data import assert_wide_beats_narrow, kernel_value, nan_padded, random_sequences

from gpytorch_tp import GRUKernel, LSTMKernel, TensorProgramKernel, evaluate
from gpytorch_tp import layers as L
from gpytorch_tp.empirical import build_network, network_jacobian
from gpytorch_tp.layers.gated import cell as gated_cell

DTYPE = torch.float64




# =============================================================================================
# 1. Finite-width networks converge to the kernel.
# =============================================================================================
#
# The part of the NTK below the readout: kernel NTK - NNGP (= sigma_v^2 Theta_h, as the readout
# Linear's NTK is K + sigma_v^2 Theta) against the empirical NTK of the finite network with the
# readout's parameters left out (parameter_scales 0), averaged over a few networks.  The readout's
# own part is the NNGP, tested in test_gated_rnn.py.

FIN_STEPS, FIN_D = 4, 2
FIN_SEQS = random_sequences((4, 2, 3, 4), FIN_D, seed=21)


# 4096 particles: the kernel's own error (2-7e-2 below the readout with 1024) stays well under the bound.
FINITE_CASES = {
    "gru-tanh-last": lambda: L.Sequential(L.GRU(weight_variance=1.5, num_particles=4096), L.LastStep(), L.Linear()),
    # A Linear below: the GRU's input has an NTK of its own.
    "linear-gru-erf-erf-mean": lambda: L.Sequential(
        L.Linear(1.0, 0.1), L.GRU("erf", "erf", weight_variance=1.5, num_particles=4096), L.TimeMean(), L.Linear()
    ),
    "lstm-tanh-last": lambda: L.Sequential(L.LSTM(weight_variance=1.5, num_particles=4096), L.LastStep(), L.Linear()),
}
FINITE_NETWORKS = 2
FINITE_BOUND = 0.15
FINITE_RATIO = 1.5


def _below_readout(architecture):
    """Kernel NTK - NNGP of ``architecture`` on FIN_SEQS."""
    kernel = TensorProgramKernel(architecture, "ntk", input_shape=(FIN_STEPS, FIN_D), sequence=True).double()
    nngp, ntk = kernel.nngp_and_ntk(nan_padded(FIN_SEQS, FIN_STEPS))
    return (ntk - nngp).detach()


def _finite_below_readout(architecture, width, seeds):
    total = 0
    for seed in seeds:
        network = build_network(architecture, (FIN_D, FIN_STEPS), width, seed=seed, dtype=DTYPE)[1:]
        readout = list(network.named_children())[-1][0] + "."  # the last module: the readout Linear
        scales = {name: 0.0 for name, _ in network.named_parameters() if name.startswith(readout)}
        jacobian = torch.cat([network_jacobian(network, s.T[None], scales)[:, 0] for s in FIN_SEQS])
        total = total + jacobian @ jacobian.T
    return total / len(seeds)


@pytest.mark.parametrize("name", list(FINITE_CASES))
def test_finite_width_ntk_converges_to_the_kernel(name):
    architecture = FINITE_CASES[name]()
    exact = _below_readout(architecture)
    assert_wide_beats_narrow(
        lambda width, seeds: relative_error(_finite_below_readout(architecture, width, seeds), exact),
        name,
        FINITE_NETWORKS,
        FINITE_BOUND,
        FINITE_RATIO,
    )


# =============================================================================================
# 2. The particle estimate.
# =============================================================================================
#
# The reference averages two independent scramblings of the base points (another stream): the
# first M points of one scrambling are a prefix of its first 2M, so a reference from the same
# stream would share points with the estimate and understate its error.  Measured (3 sequences,
# T = 4, against 4 x 16384 particles, 3 scramblings): NTK error with 1024 particles 1.2-3.6e-2 (GRU
# tanh, mean), 0.9-2.0e-2 (GRU erf: its candidate input integrated out), 0.8-1.2e-2 (LSTM); with 64
# particles 0.03-0.32.

ACC_SEQS = random_sequences((4, 2, 4), 2, seed=22)


@pytest.mark.parametrize(
    ("cls", "options"), [(GRUKernel, {"nonlinearity": "erf", "gate": "erf"}), (LSTMKernel, {"readout": "mean"})]
)
def test_default_particles_are_within_the_documented_error_of_many_more(cls, options, monkeypatch):
    x = nan_padded(ACC_SEQS, 4)
    references = []
    for stream in (101, 201):
        monkeypatch.setattr(gated_cell, "_TANGENT_STREAM", stream)
        references.append(kernel_value(cls((4, 2), kind="ntk", num_particles=8192, **options).double(), x))
    monkeypatch.undo()
    reference = sum(references) / 2
    errors = [
        relative_error(kernel_value(cls((4, 2), kind="ntk", num_particles=m, **options).double(), x), reference)
        for m in (64, 1024)
    ]
    assert errors[1] < 0.05, errors
    assert errors[1] < errors[0] / 2, errors


# =============================================================================================
# 3. Padding, batch, order, diag, tiles; symmetry and PSD.
# =============================================================================================

PAD_SEQS = random_sequences((5, 2, 4, 1, 3, 5), 2, seed=31)
PAD_OTHER = random_sequences((3, 5, 2, 4), 2, seed=32)
# Mostly the erf candidate (closed forms; its input integrated out of the NTK) for speed, tanh once (the
# candidate input sampled); depth 2: the second layer's input has an NTK.
PAD_CASES = {
    "gru-erf-depth2-mean": (
        GRUKernel,
        {"nonlinearity": "erf", "gate": "erf", "readout": "mean", "depth": 2, "num_particles": 16},
    ),
    "gru-tanh-sigmoid-last": (GRUKernel, {"num_particles": 64}),  # the sampled candidate input (not erf)
    "lstm-mean": (LSTMKernel, {"readout": "mean", "num_particles": 64}),
}


@pytest.mark.parametrize("name", list(PAD_CASES))
def test_padding_batch_order_diag_and_tiles_never_change_a_value(name):
    cls, options = PAD_CASES[name]
    # The raw per-pair estimates: projecting k(x) onto the PSD cone makes a subset's matrix depend on the whole set.
    short, long = (cls((steps, 2), kind="ntk", psd_projection=False, **options).double() for steps in (5, 7))
    x1, x2 = nan_padded(PAD_SEQS, 5), nan_padded(PAD_OTHER, 5)
    full = kernel_value(short, x1, x2)
    close = {"rtol": 1e-8, "atol": 1e-10}
    torch.testing.assert_close(kernel_value(long, nan_padded(PAD_SEQS, 7), nan_padded(PAD_OTHER, 7)), full, **close)
    torch.testing.assert_close(kernel_value(short, x2, x1), full.T, **close)
    torch.testing.assert_close(kernel_value(short, x1[[2]], x2[[1]])[0, 0], full[2, 1], **close)
    own = kernel_value(short, x1)
    torch.testing.assert_close(kernel_value(short, x1, diag=True), own.diagonal(), **close)
    torch.testing.assert_close(kernel_value(short, x1[[3, 0]]), own[[3, 0]][:, [3, 0]], **close)
    tiled = cls((5, 2), kind="ntk", tile_pairs=4, psd_projection=False, **options).double()
    torch.testing.assert_close(kernel_value(tiled, x1), own, **close)
    nngp = kernel_value(cls((5, 2), **options).double(), x1, x2)
    assert ((full - nngp).max() - (full - nngp).min()) > 1e-2  # the tangent part is not vacuous


@pytest.mark.parametrize(("cls", "tolerance"), [(GRUKernel, 1e-2), (LSTMKernel, 1e-2)])
def test_tangent_part_is_symmetric_and_psd_up_to_the_particle_error(cls, tolerance):
    seqs = random_sequences((6, 2, 5, 1, 6, 3, 4, 6), 2, seed=49)
    seqs.append(seqs[0] + 1e-3)  # a near-duplicate
    x = nan_padded(seqs, 6)
    options = {"nonlinearity": "erf"} if cls is GRUKernel else {}  # closed-form candidate: faster
    with torch.no_grad():
        nngp, ntk = cls((6, 2), kind="ntk", num_particles=512, **options).double().nngp_and_ntk(x)
    assert torch.equal(ntk, ntk.T)
    tangent = ntk - nngp  # sigma_v^2 Theta_h(last, last): PSD in the limit
    eigenvalues = torch.linalg.eigvalsh(tangent)
    assert eigenvalues.min() > -tolerance * eigenvalues.max(), eigenvalues
    assert (ntk.diagonal() > nngp.diagonal()).all()


# =============================================================================================
# 4. Interface.
# =============================================================================================


@pytest.mark.parametrize("cls", [GRUKernel, LSTMKernel])
def test_gradients_are_finite_and_match_finite_differences(cls):
    seqs = random_sequences((3, 2), 2, seed=51)
    x = nan_padded(seqs + [seqs[0].clone()], 3).requires_grad_(True)
    kernel = cls((3, 2), kind="ntk", num_particles=16, readout="mean", nonlinearity="erf").double()
    kernel(x).to_dense().sum().backward()
    grads = [p.grad for p in kernel.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(x.grad[~torch.isnan(x)]).all()
    assert (x.grad[torch.isnan(x)] == 0).all()
    # A central difference in one input coordinate (the estimate is a smooth function of it).
    step = 1e-5
    with torch.no_grad():
        plus, minus = x.detach().clone(), x.detach().clone()
        plus[1, 0] += step
        minus[1, 0] -= step
        difference = (kernel(plus).to_dense().sum() - kernel(minus).to_dense().sum()) / (2 * step)
    torch.testing.assert_close(x.grad[1, 0], difference, rtol=1e-5, atol=1e-8)


def test_float32_agrees_with_float64():
    x = nan_padded(random_sequences((4, 3, 4), 2, seed=52), 4)
    k64 = GRUKernel((4, 2), kind="ntk", num_particles=64).double()
    k32 = GRUKernel((4, 2), kind="ntk", num_particles=64)
    got = kernel_value(k32, x.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), kernel_value(k64, x), rtol=1e-4, atol=1e-5)


def test_exact_gp_trains_with_the_ntk():
    seqs = random_sequences((3, 2, 3, 1), 2, seed=53)
    x = nan_padded(seqs, 3).nan_to_num(-1e6)  # ExactGP compares inputs: NaN never equals itself
    y = torch.sin(x.clamp(-3, 3).sum(-1))

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(x, y, likelihood)
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(
                GRUKernel((3, 2), nonlinearity="erf", kind="ntk", num_particles=16, padding_value=-1e6)
            )

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
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:2]).mean).all()


def test_nonlinearities_without_a_closed_form_derivative_use_autodiff():
    # GELU has no derivatives() method: its phi' comes from forward-mode autodiff.
    x = nan_padded(random_sequences((3, 2), 2, seed=55), 3)
    options = {"ntk": True, "input_shape": (3, 2), "sequence": True}
    gelu = evaluate(L.Sequential(L.GRU(L.GELU(), num_particles=16), L.LastStep(), L.Linear()), x, **options)
    tanh = evaluate(L.Sequential(L.GRU("tanh", num_particles=16), L.LastStep(), L.Linear()), x, **options)
    assert all(torch.isfinite(t).all() for t in (*gelu, *tanh))
    assert not torch.allclose(gelu[1], tanh[1])
