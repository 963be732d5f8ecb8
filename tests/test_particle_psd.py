"""GRU and LSTM kernels (particle estimates) give positive semi-definite matrices, and empty inputs work.

1. On sequences with near-duplicates and an exact duplicate, the kernel matrix of a set with
   itself (NNGP and NTK) has no eigenvalue below -1e-12 of the largest, factorises at a jitter
   of 1e-8 in float64, keeps its diagonal (``diag=True``) and differs from the raw per-pair
   estimate by no more than that estimate's negative eigenvalues; an ExactGP with noise 1e-6
   trains without GPyTorch's extra jitter (before: eigenvalues down to -2e-2 of the largest, and
   NotPSDError).
2. The NTK of a near-duplicate pair is close to the item's own (the kernel is continuous in its
   inputs); its forward particles used to mix two estimates of the pair's covariance.
3. The projection: gradients against finite differences, also at repeated eigenvalues.
4. Empty inputs: the shapes GPyTorch's RBFKernel returns.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from sequence_data import kernel_value, nan_padded, random_sequences

from gpytorch_tp import GRUKernel, LSTMKernel
from gpytorch_tp.layers.gated.psd_projection import project_psd

DTYPE = torch.float64
STEPS, D = 6, 2


def _sequences() -> torch.Tensor:
    base = random_sequences((6, 2, 5, 1, 6, 3, 4, 6), D, seed=61)
    # Two near-duplicates and an exact duplicate.
    return nan_padded(base + [base[0] + 1e-3, base[4] + 1e-3, base[2].clone()], STEPS)


# Smallest / largest eigenvalue of the raw estimates on these sequences (measured): LSTM NNGP
# (1024 particles) -6.2e-4, GRU NNGP (256, erf candidate) -8.5e-5; NTKs (256) -2.2e-2 (GRU) and
# -1.9e-2 (LSTM) before the NTK's forward particles took the pair's own blocks, -3.2e-4 and -5.6e-4 now.
CASES = {
    "lstm-nngp": (LSTMKernel, {"num_particles": 1024}),
    "gru-nngp": (GRUKernel, {"nonlinearity": "erf", "num_particles": 256}),
    "gru-ntk": (GRUKernel, {"nonlinearity": "erf", "kind": "ntk", "num_particles": 256}),
    "lstm-ntk": (LSTMKernel, {"kind": "ntk", "num_particles": 256}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matrix_is_psd_and_factorises_at_a_tiny_jitter(name):
    cls, options = CASES[name]
    x = _sequences()
    kernel = cls((STEPS, D), **options).double()
    K = kernel_value(kernel, x)
    assert torch.equal(K, K.T)
    eigenvalues = torch.linalg.eigvalsh(K)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.max(), eigenvalues
    assert torch.linalg.cholesky_ex(K + 1e-8 * torch.eye(len(K), dtype=DTYPE)).info == 0
    torch.testing.assert_close(kernel_value(kernel, x, diag=True), K.diagonal(), rtol=1e-12, atol=0)
    assert torch.equal(kernel_value(kernel, x), K)  # deterministic
    # Against the raw per-pair estimate: it was indefinite (the check is not vacuous), and the
    # projection moved no entry by more than about its negative eigenvalues.
    raw = kernel_value(cls((STEPS, D), psd_projection=False, **options).double(), x)
    raw_eigenvalues = torch.linalg.eigvalsh(raw)
    assert raw_eigenvalues.min() < -1e-6 * raw_eigenvalues.max(), raw_eigenvalues
    negative = raw_eigenvalues.clamp_max(0).abs().sum()
    assert (K - raw).abs().max() <= 3 * negative, ((K - raw).abs().max(), negative)
    # The cross matrix of two different sets is the raw estimate (no projection there).
    torch.testing.assert_close(kernel_value(kernel, x[:4], x[4:]), raw[:4, 4:], rtol=1e-10, atol=1e-14)


def test_exact_gp_with_noise_1e_6_trains():
    x = _sequences().nan_to_num(-1e6)  # ExactGP compares inputs: NaN never equals itself
    y = torch.sin(x.clamp(-3, 3).sum(-1))

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            noise = gpytorch.constraints.GreaterThan(1e-9)
            likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=noise)
            super().__init__(x, y, likelihood)
            self.mean = gpytorch.means.ConstantMean()
            self.covar = LSTMKernel((STEPS, D), num_particles=1024, padding_value=-1e6)

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean(inputs), self.covar(inputs))

    model = GP().double()
    model.likelihood.noise = 1e-6
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    # Cholesky (not conjugate gradients), without GPyTorch's retries with more jitter (a NumericalWarning).
    with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("error", gpytorch.utils.warnings.NumericalWarning)
        loss = -mll(model(x), y)
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.covar.parameters())


@pytest.mark.parametrize("cls", [GRUKernel, LSTMKernel])
def test_ntk_of_a_near_duplicate_is_close_to_the_items_own(cls):
    # The NTK is continuous in the inputs: K(a, a + delta) - K(a, a) = O(delta).  Before the fix the
    # near-duplicate pair's value was 30-65% low (GRU 0.19 against 0.54) for delta 1e-5..1e-2.
    seq = random_sequences((6,), D, seed=49)[0]
    options = {"nonlinearity": "erf"} if cls is GRUKernel else {}
    kernel = cls((STEPS, D), kind="ntk", num_particles=256, **options).double()
    for delta in (1e-2, 1e-3, 1e-5):
        K = kernel_value(kernel, nan_padded([seq, seq + delta], STEPS))
        assert abs(K[0, 1] - K[0, 0]) < 0.03 * K[0, 0], (delta, K)


def test_projection_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DTYPE))
    # Distinct eigenvalues: gradcheck against central differences.
    distinct = q @ torch.diag(torch.tensor([-0.3, -0.05, 0.2, 0.7, 1.1, 2.0], dtype=DTYPE)) @ q.T
    torch.autograd.gradcheck(project_psd, (distinct.clone().requires_grad_(True),))
    # Repeated eigenvalues (duplicated items): finite, and a directional derivative matches a difference.
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=DTYPE))
    # Pairs of equal eigenvalues, one pair just above the kink at 0 (as exact duplicates give).
    repeated = q @ torch.diag(torch.tensor([-0.02, -0.02, 1e-3, 1e-3, 0.5, 0.5, 1, 1], dtype=DTYPE)) @ q.T
    assert (repeated.diagonal() > 0).all()  # as a kernel matrix's
    direction = torch.randn(8, 8, generator=g, dtype=DTYPE)
    direction = direction + direction.T
    weights = torch.randn(8, 8, generator=g, dtype=DTYPE)
    a = repeated.clone().requires_grad_(True)
    (project_psd(a) * weights).sum().backward()
    assert torch.isfinite(a.grad).all()
    step = 1e-6
    with torch.no_grad():
        difference = ((project_psd(repeated + step * direction) - project_psd(repeated - step * direction)) * weights)
        difference = difference.sum() / (2 * step)
    torch.testing.assert_close((a.grad * direction).sum(), difference, rtol=1e-5, atol=1e-8)


def test_projection_properties():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(5, 3, generator=g, dtype=DTYPE)
    definite = features @ features.T + 0.1 * torch.eye(5, dtype=DTYPE)
    assert torch.equal(project_psd(definite), definite)  # unchanged, bit for bit
    indefinite = definite - 0.5 * torch.eye(5, dtype=DTYPE)
    projected = project_psd(indefinite)
    assert torch.equal(projected, projected.T)
    assert torch.linalg.eigvalsh(projected).min() > -1e-14
    torch.testing.assert_close(projected.diagonal(), indefinite.diagonal(), rtol=1e-14, atol=0)
    single = project_psd(indefinite.float())
    assert single.dtype == torch.float32
    assert torch.linalg.eigvalsh(single.double()).min() > -1e-6 * projected.diagonal().max()
    batch = project_psd(torch.stack([definite, indefinite]))
    assert torch.equal(batch[0], definite) and torch.allclose(batch[1], projected, rtol=1e-14, atol=1e-15)


def test_gradients_are_finite_with_the_projection_at_duplicates():
    x = _sequences().requires_grad_(True)
    kernel = LSTMKernel((STEPS, D), num_particles=32).double()
    with torch.no_grad():
        raw = kernel_value(LSTMKernel((STEPS, D), num_particles=32, psd_projection=False).double(), x)
    assert torch.linalg.eigvalsh(raw).min() < 0  # the projection acts
    kernel(x).to_dense().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in kernel.parameters())
    assert torch.isfinite(x.grad[~torch.isnan(x)]).all()


def test_bad_option():
    with pytest.raises(ValueError, match="psd_projection must be True or False"):
        GRUKernel((STEPS, D), psd_projection="yes")


@pytest.mark.parametrize("cls", [GRUKernel, LSTMKernel])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_inputs_give_empty_results_as_rbf_does(cls, kind, dtype):
    kernel = cls((3, 2), kind=kind, num_particles=8).to(dtype)
    rbf = gpytorch.kernels.RBFKernel().to(dtype)
    empty, some = torch.zeros(0, 6, dtype=dtype), torch.randn(4, 6, dtype=dtype)
    for args in ((empty,), (empty, some), (some, empty), (torch.zeros(2, 0, 6, dtype=dtype),)):
        got = kernel(*args).to_dense()
        assert got.shape == rbf(*args).to_dense().shape and got.dtype == dtype
    diagonal = kernel(empty, diag=True)
    assert diagonal.shape == rbf(empty, diag=True).shape == (0,) and diagonal.dtype == dtype
    nngp, ntk = kernel.nngp_and_ntk(empty)
    assert nngp.shape == ntk.shape == (0, 0)
    # Next to an empty evaluation, a non-empty one still works.
    assert torch.isfinite(kernel(some).to_dense()).all()


def test_former_module_path_still_imports():
    # gpytorch_tp.gaussian_particles is documented (CHANGELOG, docs/rnn.md): a thin alias of the new homes.
    from gpytorch_tp import gaussian_particles
    from gpytorch_tp.layers.gated import particles

    assert gaussian_particles.project_psd is project_psd
    assert gaussian_particles.PairParticles is particles.PairParticles
