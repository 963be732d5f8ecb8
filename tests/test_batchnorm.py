"""BatchNorm + ReLU MLP kernels (Yang et al. 2019) against independent computations.

1. The single-batch and cross-batch BatchNorm + ReLU maps agree with Monte Carlo sampling of
   the Gaussian pre-activations (no quadrature), with a closed form for batches of two points
   (also with eps > 0, against scipy's adaptive quadrature), and with themselves at a finer rule;
   two identical batches give the single-batch map.
2. Finite-width torch networks (BatchNorm over the batch, no affine parameters) approach the
   single-batch, cross-batch and pairwise (reference-set) kernels as the width grows.
3. The pairwise kernel is symmetric, PSD, consistent under slicing and diag=True, float32 and
   float64, batch inputs, finite gradients; it works inside an ExactGP.
4. Bad input gets a clear message.
"""

from __future__ import annotations

import copy
import math

import gpytorch
import pytest
import torch
from kernel_checks import relative_error

from gpytorch_tp import BatchNormMLPKernel
from gpytorch_tp.batchnorm import (
    BatchNormOverBatch,
    QuadratureRule,
    batchnorm_mlp_nngp,
    batchnorm_mlp_nngp_cross,
    batchnorm_mlp_ntk,
    batchnorm_mlp_ntk_cross,
    batchnorm_relu_cross,
    batchnorm_relu_cross_ntk,
    batchnorm_relu_single,
    batchnorm_relu_single_ntk,
    finite_batchnorm_mlp,
    quadrature_rule,
)
from gpytorch_tp.empirical import empirical_ntk

DTYPE = torch.float64


def _points(n: int, d: int, seed: int, dtype=DTYPE) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _joint_covariance(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """First-layer pre-activation covariance (sigma_w^2 = 2, sigma_b^2 = 0.1) of the stacked batches."""
    x = torch.cat([x1, x2])
    return 2 * x @ x.T / x.shape[-1] + 0.1


def _relu_batchnorm_samples(h: torch.Tensor) -> torch.Tensor:
    """relu(BN(h)) for samples ``h`` of shape ``(B, samples)`` (BatchNorm over the first axis)."""
    centred = h - h.mean(0)
    return (centred / centred.pow(2).mean(0).sqrt()).clamp_min(0)


# =============================================================================================
# 1. The BatchNorm + ReLU maps
# =============================================================================================


def test_single_and_cross_maps_match_monte_carlo():
    x1, x2 = _points(5, 3, 0), _points(4, 3, 1)
    joint = _joint_covariance(x1, x2)
    b1 = x1.shape[0]
    single = batchnorm_relu_single(joint[:b1, :b1])
    cross = batchnorm_relu_cross(joint[:b1, :b1], joint[:b1, b1:], joint[b1:, b1:])

    samples = 400_000
    generator = torch.Generator().manual_seed(2)
    factor = torch.linalg.cholesky(joint + 1e-12 * torch.eye(len(joint), dtype=DTYPE))
    h = factor @ torch.randn(len(joint), samples, generator=generator, dtype=DTYPE)
    y1, y2 = _relu_batchnorm_samples(h[:b1]), _relu_batchnorm_samples(h[b1:])
    # Monte Carlo standard errors of each entry; 5 of them is far below the entries (~0.2-0.8).
    for exact, a, b in ((single, y1, y1), (cross, y1, y2)):
        products = a.unsqueeze(1) * b.unsqueeze(0)
        stderr = products.std(-1) / math.sqrt(samples)
        assert ((exact - products.mean(-1)).abs() <= 5 * stderr + 1e-12).all()
        assert stderr.max() < 3e-3


def test_two_point_batch_closed_form():
    # BN of two points is sign(h1 - h2) (1, -1): relu(y) relu(y)^T averages to diag(1/2, 1/2).
    cov = torch.tensor([[1.3, 0.4], [0.4, 0.7]], dtype=DTYPE)
    expected = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=DTYPE)
    torch.testing.assert_close(batchnorm_relu_single(cov), expected, rtol=0, atol=1e-9)


def test_two_point_batch_with_eps_matches_scipy():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    # With eps: y_1 = sqrt(2) z / sqrt(2 z^2 + 2 eps), z = (h1 - h2) / 2 ~ N(0, v / 4).
    cov = torch.tensor([[1.3, 0.4], [0.4, 0.7]], dtype=DTYPE)
    eps = 0.05
    v = (cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]).item() / 4

    def integrand(z: float) -> float:
        density = math.exp(-z * z / (2 * v)) / math.sqrt(2 * math.pi * v)
        return density * 2 * z * z / (2 * z * z + 2 * eps)

    half, _ = scipy_integrate.quad(integrand, 0, math.inf, epsabs=1e-13, epsrel=1e-13)
    expected = torch.full((2,), half, dtype=DTYPE)
    # A large eps (here 1/6 of the variance of z) narrows the integrand's strip of analyticity.
    result = batchnorm_relu_single(cov, eps=eps)
    torch.testing.assert_close(result.diagonal(), expected, rtol=2e-7, atol=0)
    assert result[0, 1].abs() < 1e-12
    fine = batchnorm_relu_single(cov, eps=eps, rule=quadrature_rule(DTYPE, "fine"))
    torch.testing.assert_close(fine.diagonal(), expected, rtol=1e-11, atol=0)


def test_quadrature_converges_and_identical_batches_give_the_single_batch_map():
    x1, x2 = _points(6, 2, 3), _points(5, 2, 4)  # rank-2 first layer: the slowest tails
    joint = _joint_covariance(x1, x2)
    c11, c12, c22 = joint[:6, :6], joint[:6, 6:], joint[6:, 6:]
    fine = quadrature_rule(DTYPE, "fine")
    single, single_fine = batchnorm_relu_single(c11), batchnorm_relu_single(c11, rule=fine)
    cross, cross_fine = batchnorm_relu_cross(c11, c12, c22), batchnorm_relu_cross(c11, c12, c22, rule=fine)
    assert (single - single_fine).abs().max() < 1e-7 * single_fine.abs().max()
    assert (cross - cross_fine).abs().max() < 1e-7 * cross_fine.abs().max()
    fast = quadrature_rule(DTYPE, "fast")
    assert (batchnorm_relu_single(c11, rule=fast) - single_fine).abs().max() < 1e-5 * single_fine.abs().max()
    assert (batchnorm_relu_cross(c11, c12, c22, rule=fast) - cross_fine).abs().max() < 1e-5 * cross_fine.abs().max()
    torch.testing.assert_close(batchnorm_relu_cross(c11, c11, c11), single_fine, rtol=0, atol=1e-7)
    # float32 inputs: the work is done in float64, only the inputs and the result are rounded.
    single32 = batchnorm_relu_single(c11.float())
    cross32 = batchnorm_relu_cross(c11.float(), c12.float(), c22.float())
    assert single32.dtype == cross32.dtype == torch.float32
    assert (single32.double() - single_fine).abs().max() < 1e-5
    assert (cross32.double() - cross_fine).abs().max() < 1e-5


def test_batch_shapes_of_the_maps():
    x = torch.stack([_points(4, 3, 5), _points(4, 3, 6)])
    cov = 2 * x @ x.transpose(-1, -2) / 3 + 0.1
    batched = batchnorm_relu_single(cov)
    for k in range(2):
        torch.testing.assert_close(batched[k], batchnorm_relu_single(cov[k]), rtol=1e-12, atol=1e-14)


# =============================================================================================
# 2. Finite-width networks
# =============================================================================================


def test_batchnorm_over_batch_is_torch_batchnorm_in_training_mode():
    h = _points(7, 5, 7)
    reference = torch.nn.BatchNorm1d(5, eps=1e-5, affine=False, track_running_stats=False).double()
    torch.testing.assert_close(BatchNormOverBatch(1e-5)(h), reference(h), rtol=1e-12, atol=1e-12)


def _empirical(batches: list[torch.Tensor], width: int, networks: int, depth: int, pick=None) -> list:
    """Output covariances ``f_a f_b^T / m`` averaged over networks, for every pair of batches.

    A wide readout (2048 outputs) averages the readout's sampling away, leaving the finite-width
    fluctuations of the hidden features (and their sampling over ``networks``).
    """
    d = batches[0].shape[-1]
    totals = {}
    for seed in range(networks):
        torch.manual_seed(seed)
        net = finite_batchnorm_mlp(d, width, depth, out_features=2048).to(DTYPE)
        with torch.no_grad():
            outputs = [net(b) if pick is None else pick(net(b)) for b in batches]
        for a in range(len(batches)):
            for b in range(a, len(batches)):
                cov = outputs[a] @ outputs[b].transpose(-1, -2) / outputs[a].shape[-1]
                totals[a, b] = totals.get((a, b), 0) + cov / networks
    return totals




def test_single_and_cross_batch_kernels_are_limits_of_finite_networks():
    x1, x2 = _points(6, 3, 8), _points(5, 3, 9)
    single = batchnorm_mlp_nngp(x1, depth=2)
    cross = batchnorm_mlp_nngp_cross(x1, x2, depth=2)
    errors = {}
    for width in (32, 512):
        totals = _empirical([x1, x2], width, networks=12, depth=2)
        errors[width] = (relative_error(totals[0, 0], single), relative_error(totals[0, 1], cross))
    # Measured: 0.06-0.08 at width 32, 0.027 at 512 (much of it the sampling of 12 networks).
    for narrow, wide in zip(errors[32], errors[512]):
        assert wide < 0.05 and wide < narrow, errors


def test_pairwise_kernel_is_the_limit_of_finite_networks_on_reference_batches():
    reference = _points(3, 3, 10)
    x = _points(5, 3, 11)
    kernel = BatchNormMLPKernel(reference, depth=1).to(DTYPE)
    with torch.no_grad():
        exact = kernel(x).to_dense()
    batches = torch.cat([x.unsqueeze(1), reference.expand(len(x), *reference.shape)], 1)
    errors = {}
    for width in (32, 512):
        totals = _empirical([batches], width, networks=12, depth=1, pick=lambda f: f[:, 0, :])
        errors[width] = relative_error(totals[0, 0], exact)
    # Measured: 0.085 at width 32, 0.02 at 512.
    assert errors[512] < 0.05 and errors[512] < errors[32], errors


def test_ntk_map_matches_monte_carlo_of_the_jacobian():
    # E[J Theta J^T] with J = d relu(BN(h)) / dh by finite differences for sampled h.
    x = _points(5, 6, 21)
    cov = 2 * x @ x.T / 6 + 0.1
    theta = cov + torch.eye(5, dtype=DTYPE)  # any symmetric PSD NTK of the pre-activations
    nngp, derivative = batchnorm_relu_single_ntk(cov, theta)
    torch.testing.assert_close(nngp, batchnorm_relu_single(cov), rtol=1e-13, atol=1e-15)

    samples = 100_000
    factor = torch.linalg.cholesky(cov)
    h = (factor @ torch.randn(5, samples, generator=torch.Generator().manual_seed(22), dtype=DTYPE)).T

    def block(v):
        centred = v - v.mean(-1, keepdim=True)
        return (centred / centred.pow(2).mean(-1, keepdim=True).sqrt()).clamp_min(0)

    # Central differences (a sample within 1e-6 of a ReLU kink has probability ~1e-6).
    step = 1e-6
    columns = [(block(h + step * e) - block(h - step * e)) / (2 * step) for e in torch.eye(5, dtype=DTYPE)]
    jacobians = torch.stack(columns, -1)  # (samples, B, B): d relu(BN(h))_i / dh_k
    products = jacobians @ theta @ jacobians.transpose(-1, -2)
    stderr = products.std(0) / math.sqrt(samples)
    assert ((derivative - products.mean(0)).abs() <= 5 * stderr + 1e-12).all()
    assert stderr.max() < 0.05 * derivative.diagonal().min()


def test_ntk_is_the_limit_of_finite_networks():
    # A batch of 10 points in 12 dimensions: the per-network NTK of a BatchNorm network has heavy
    # tails when the centred batch has low rank (its variance involves E[1/|u|^4]).
    x = _points(10, 12, 23)
    nngp, ntk = batchnorm_mlp_ntk(x, depth=2)
    torch.testing.assert_close(nngp, batchnorm_mlp_nngp(x, depth=2), rtol=1e-13, atol=1e-15)
    fine = batchnorm_mlp_ntk(x, depth=2, rule=quadrature_rule(DTYPE, "fine"))[1]
    assert (ntk - fine).abs().max() < 1e-7 * fine.abs().max()
    errors = {}
    for width in (32, 512):
        mean = 0
        for seed in range(6):
            torch.manual_seed(seed)
            mean = mean + empirical_ntk(finite_batchnorm_mlp(12, width, 2).to(DTYPE), x) / 6
        errors[width] = relative_error(mean, ntk)
    # Measured (6 networks): 0.31 at width 32, 0.043 at 512.
    assert errors[512] < 0.09 and errors[512] < errors[32], errors


def test_cross_batch_ntk_map_of_identical_batches_is_the_single_batch_map():
    # The two-dimensional decomposition (one norm per batch) against the one-dimensional one.
    x = _points(6, 8, 24)
    cov = 2 * x @ x.T / 8 + 0.1
    theta = cov + 0.5 * torch.eye(6, dtype=DTYPE)
    nngp, derivative = batchnorm_relu_single_ntk(cov, theta)
    cross_nngp, cross_derivative = batchnorm_relu_cross_ntk(cov, cov, cov, theta)
    torch.testing.assert_close(cross_nngp, nngp, rtol=0, atol=1e-8)
    torch.testing.assert_close(cross_derivative, derivative, rtol=0, atol=1e-8 * derivative.abs().max().item())


def test_cross_batch_ntk_is_the_limit_of_finite_networks():
    x1, x2 = _points(10, 12, 25), _points(9, 12, 26)
    nngp, ntk = batchnorm_mlp_ntk_cross(x1, x2, depth=2)
    torch.testing.assert_close(nngp, batchnorm_mlp_nngp_cross(x1, x2, depth=2), rtol=1e-13, atol=1e-15)
    errors = {}
    for width in (32, 512):
        mean = 0
        for seed in range(6):
            torch.manual_seed(seed)
            mean = mean + empirical_ntk(finite_batchnorm_mlp(12, width, 2).to(DTYPE), x1, x2) / 6
        errors[width] = relative_error(mean, ntk)
    # Measured (6 networks): 0.29 at width 32, 0.058 at 512.
    assert errors[512] < 0.1 and errors[512] < errors[32], errors


# =============================================================================================
# 3. The pairwise kernel as a GPyTorch kernel
# =============================================================================================


@pytest.fixture(scope="module")
def pairwise():
    reference = _points(3, 2, 12)
    x = torch.cat([_points(5, 2, 13), _points(1, 2, 12)])  # the last point is a reference point
    kernel = BatchNormMLPKernel(reference, depth=2).to(DTYPE)
    with torch.no_grad():
        matrix = kernel(x).to_dense()
    return kernel, x, matrix


def test_pairwise_kernel_is_symmetric_psd_and_consistent_under_slicing(pairwise):
    kernel, x, matrix = pairwise
    assert torch.equal(matrix, matrix.T)
    assert torch.linalg.eigvalsh(matrix).min() > -1e-8 * matrix.diagonal().max()
    with torch.no_grad():
        part = kernel(x[1:4]).to_dense()
        block = kernel(x[:2], x[3:]).to_dense()
        diagonal = kernel(x, diag=True)
        pair_diag = kernel(x[:3], x[3:], diag=True)
    torch.testing.assert_close(part, matrix[1:4, 1:4], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block, matrix[:2, 3:], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(diagonal, matrix.diagonal(), rtol=0, atol=0)
    torch.testing.assert_close(pair_diag, matrix[:3, 3:].diagonal(), rtol=1e-12, atol=1e-14)


def test_pairwise_kernel_float32_batches_and_gradients(pairwise):
    kernel, x, matrix = pairwise
    single = copy.deepcopy(kernel).float()(x[:4].float()).to_dense()
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), matrix[:4, :4], rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        batched = kernel(torch.stack([x[:3], x[3:]])).to_dense()
    torch.testing.assert_close(batched[1], matrix[3:, 3:], rtol=1e-12, atol=1e-14)

    inputs = x[:3].clone().requires_grad_(True)
    kernel(inputs).to_dense().sum().backward()
    parameters = [p for p in kernel.parameters() if p.requires_grad]
    assert parameters and all(p.grad is not None and torch.isfinite(p.grad).all() for p in parameters)
    assert torch.isfinite(inputs.grad).all() and inputs.grad.abs().sum() > 0
    kernel.zero_grad()


def test_pairwise_ntk_is_psd_consistent_and_the_limit_of_finite_networks():
    # 7 reference points in 8 dimensions: the per-network NTK has heavy tails for low-rank batches.
    reference = _points(7, 8, 27)
    x = _points(4, 8, 28)
    kernel = BatchNormMLPKernel(reference, depth=1, kind="ntk").to(DTYPE)
    with torch.no_grad():
        matrix = kernel(x).to_dense()
        torch.testing.assert_close(kernel(x[1:3]).to_dense(), matrix[1:3, 1:3], rtol=1e-12, atol=1e-14)
    assert torch.equal(matrix, matrix.T) and torch.linalg.eigvalsh(matrix).min() > 0
    batches = torch.cat([x.unsqueeze(1), reference.expand(len(x), *reference.shape)], 1)
    torch.testing.assert_close(matrix[0, 1], batchnorm_mlp_ntk_cross(batches[0], batches[1], depth=1)[1][0, 0])
    torch.testing.assert_close(matrix[2, 2], batchnorm_mlp_ntk(batches[2], depth=1)[1][0, 0])
    errors = {}
    for width in (32, 512):
        mean = 0
        for seed in range(6):
            torch.manual_seed(seed)
            network = finite_batchnorm_mlp(8, width, 1).to(DTYPE)
            mean = mean + empirical_ntk(_FirstOfBatch(network), batches) / 6
        errors[width] = relative_error(mean, matrix)
    # Measured (6 networks): 0.15 at width 32, 0.048 at 512.
    assert errors[512] < 0.09 and errors[512] < errors[32], errors


def test_pairwise_kernel_takes_one_variance_per_dense_layer():
    # Per-layer lists (as kernel_from_module gives them) against the batch functions, which take lists too.
    reference, x = _points(3, 3, 29), _points(2, 3, 30)
    weights, biases = [0.5, 3.0, 1.5], [0.2, 0.0, 0.4]
    kernel = BatchNormMLPKernel(reference, depth=2, weight_variance=weights, bias_variance=biases).to(DTYPE)
    assert [layer.weight_variance.item() for layer in kernel.dense] == pytest.approx(weights, rel=1e-12)
    with torch.no_grad():
        value = kernel(x).to_dense()
    batches = torch.cat([x.unsqueeze(1), reference.expand(len(x), *reference.shape)], 1)
    expected = batchnorm_mlp_nngp_cross(batches[0], batches[1], 2, weights, biases)[0, 0]
    torch.testing.assert_close(value[0, 1], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        value[1, 1], batchnorm_mlp_nngp(batches[1], 2, weights, biases)[0, 0], rtol=1e-12, atol=0
    )
    with pytest.raises(ValueError, match="one value per dense layer"):
        BatchNormMLPKernel(reference, depth=2, weight_variance=[1.0, 2.0])


class _FirstOfBatch(torch.nn.Module):
    """The network on each batch ``(N, m + 1, d)``, read at the first point of the batch: ``(N, out)``."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, batches: torch.Tensor) -> torch.Tensor:
        return self.network(batches)[:, 0, :]


def test_pairwise_kernel_in_an_exact_gp():
    reference = _points(2, 2, 14)
    train_x = _points(5, 2, 15)
    train_y = torch.sin(2 * train_x[:, 0]) + 0.1 * train_x[:, 1]

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            kernel = BatchNormMLPKernel(reference, depth=1, accuracy="fast")
            self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = GP().to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    loss = -mll(model(train_x), train_y)
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        prediction = model(_points(2, 2, 16))
    assert torch.isfinite(prediction.mean).all() and (prediction.variance > 0).all()


# =============================================================================================
# 4. Bad input
# =============================================================================================


def test_bad_input_messages():
    reference = _points(3, 2, 17)
    kernel = BatchNormMLPKernel(reference, depth=1).to(DTYPE)
    with pytest.raises(ValueError, match="3 features but the reference points"):
        kernel(_points(4, 3, 18)).to_dense()
    with pytest.raises(ValueError, match="batch of size 1"):
        BatchNormMLPKernel(reference[:0])
    with pytest.raises(ValueError, match="at least 2 points"):
        batchnorm_mlp_nngp(_points(1, 2, 19))
    with pytest.raises(ValueError, match="at least 2 points"):
        batchnorm_relu_single(torch.ones(1, 1, dtype=DTYPE))
    identical = torch.ones(4, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="zero centred variance"):
        batchnorm_mlp_nngp(identical)
    with pytest.raises(ValueError, match="zero centred variance"):
        BatchNormMLPKernel(identical[:2], depth=1).to(DTYPE)(identical[:1]).to_dense()
    # With eps > 0 an all-identical batch is defined: every output is the readout bias.
    constant = batchnorm_mlp_nngp(identical, depth=1, eps=1e-3)
    torch.testing.assert_close(constant, torch.full((4, 4), 0.1, dtype=DTYPE), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="NaN"):
        kernel(torch.full((2, 2), float("nan"), dtype=DTYPE)).to_dense()
    with pytest.raises(ValueError, match="kind must be"):
        BatchNormMLPKernel(reference, kind="ntks")
    with pytest.raises(ValueError, match="cov12 must be"):
        batchnorm_relu_cross(torch.eye(3, dtype=DTYPE), torch.zeros(3, 2, dtype=DTYPE), torch.eye(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="one value per dense layer"):
        batchnorm_mlp_nngp(_points(4, 2, 20), depth=2, weight_variance=[2.0, 2.0])


def test_a_rule_finer_than_the_grid_holds_is_cut_at_the_grid():
    # A rule asking for more than the 400 nodes laid out used to fail with a shape mismatch.
    x1, x2 = _points(6, 3, 1), _points(5, 3, 2)
    nngp = batchnorm_mlp_ntk_cross(x1, x2, depth=1, rule=QuadratureRule(0.1, 1e-16))[0]
    fine = batchnorm_mlp_ntk_cross(x1, x2, depth=1, rule=quadrature_rule(DTYPE, "fine"))[0]
    assert (nngp - fine).abs().max() < 1e-12 * fine.abs().max()


def test_documented_ntk_accuracy():
    # docs/batchnorm.md: default ~1e-9 per layer from centred rank 4 on; rank 3 ~1e-6.
    converged = QuadratureRule(0.15, 1e-16)
    for d, bound in ((4, 2e-9), (3, 5e-6)):
        x1, x2 = _points(6, d, 1), _points(5, d, 2)
        exact = batchnorm_mlp_ntk_cross(x1, x2, depth=1, rule=converged)[1]
        got = batchnorm_mlp_ntk_cross(x1, x2, depth=1)[1]
        assert (got - exact).abs().max() < bound * exact.abs().max()
