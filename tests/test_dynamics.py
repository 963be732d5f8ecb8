"""The trained-ensemble GP (:class:`gpytorch_tp.TrainedNetworkGP`) against independent computations.

References used here, none of which shares code with the module under test:

* a direct evaluation of the closed form with ``torch.linalg.matrix_exp`` /
  ``matrix_power`` and ``torch.linalg.solve`` (no eigendecomposition, no expm1);
* an exact simulation of gradient descent on a *linear model* in parameter space
  (trained random features plus an untrained random part, ridge towards the
  initial weights, per-network noisy targets), whose output mean and covariance
  are propagated exactly through every step;
* ``gpytorch.models.ExactGP`` posteriors (t = inf);
* the kernels from :func:`gpytorch_tp.evaluate`.

Finite-network training is compared in ``test_dynamics_vs_training.py``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gpytorch
import pytest
import torch

from gpytorch_tp import MLPKernel, TensorProgramKernel, TrainedNetworkGP, evaluate
from gpytorch_tp.layers import Erf, Linear, ReLU, Sequential

DTYPE = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def relu_net(bias: float = 0.1) -> Sequential:
    return Sequential(Linear(2.0, bias), ReLU(), Linear(1.0, bias))


def erf_net() -> Sequential:
    return Sequential(Linear(4.0, 0.5), Erf(), Linear(1.0, 0.1), Erf(), Linear(1.0, 0.1))


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=gen, dtype=DTYPE)
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(7, generator=gen, dtype=DTYPE)
    xt = torch.randn(5, 3, generator=gen, dtype=DTYPE)
    return x, y, xt


# ------------------------------------------------------------------ reference helpers


def reference(arch, x, y, xt, *, rate, t=None, steps=None, noise=0.0, target_noise=None, readout=False):
    """Mean (N, m) and covariance (N, N) from the closed form, with matrix_exp / matrix_power and solve."""
    target_noise = noise if target_noise is None else target_noise
    y = y.unsqueeze(-1) if y.dim() == 1 else y
    k_tt, _ = evaluate(arch, xt, ntk=True)
    k_xt, ntk_xt = evaluate(arch, x, xt, ntk=True)
    k_xx, ntk_xx = evaluate(arch, x, ntk=True)
    k_tt, k_xt, k_xx, ntk_xt, ntk_xx = (m.detach() for m in (k_tt, k_xt, k_xx, ntk_xt, ntk_xx))
    if readout:
        ntk_xt, ntk_xx = k_xt, k_xx
    eye = torch.eye(x.shape[0], dtype=DTYPE)
    m = ntk_xx + noise * eye
    n = x.shape[0]
    zero = torch.zeros(n, n, dtype=DTYPE)
    if t is not None and math.isinf(t) or steps is not None and math.isinf(steps):
        a = torch.linalg.solve(m, ntk_xt).T
    elif t is not None:
        # Van Loan: exp([[-M, I], [0, 0]] s) has the integral of exp(-M u) over [0, s] as its corner block,
        # which is M^-1 (I - exp(-M s)) without a solve (accurate for small s and singular M)
        block = torch.cat([torch.cat([-m, eye], 1), torch.cat([zero, zero], 1)]) * (rate * t)
        a = ntk_xt.T @ torch.linalg.matrix_exp(block)[:n, n:]
    else:
        # [[B, I], [0, I]]^k has sum_{j<k} B^j in its corner; rate * that is M^-1 (I - B^k) for B = I - rate M
        block = torch.cat([torch.cat([eye - rate * m, eye], 1), torch.cat([zero, eye], 1)])
        a = ntk_xt.T @ torch.linalg.matrix_power(block, steps)[:n, n:] * rate
    mean = a @ y
    cov = k_tt + a @ (k_xx + target_noise * eye) @ a.T - a @ k_xt - k_xt.T @ a.T
    return mean, cov


class LinearModel:
    """f(x) = g(x)^T w + h(x)^T z with w (trained) and z (not trained) standard normal.

    NNGP kernel K = g g^T + h h^T, NTK Theta = g g^T.  Gradient descent on
    1/2 |f(X) - Y - sqrt(s) e|^2 + lam/2 |w - w0|^2 is simulated exactly in
    parameter space: w_k = T_k xi + c_k with xi = (w0, z, e) ~ N(0, I).
    """

    def __init__(self, p: int, q: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.randn(p, 3, generator=gen, dtype=DTYPE)
        self.b = torch.randn(q, 3, generator=gen, dtype=DTYPE)
        self.p, self.q = p, q

    def g(self, x):
        return torch.cos(x @ self.a.T) / math.sqrt(self.p)

    def h(self, x):
        return 0.5 * torch.tanh(x @ self.b.T) / math.sqrt(self.q)

    def nngp(self, x1, x2):
        return self.g(x1) @ self.g(x2).T + self.h(x1) @ self.h(x2).T

    def ntk(self, x1, x2):
        return self.g(x1) @ self.g(x2).T

    def simulate(self, x, y, xt, *, rate, steps, lam, s):
        """Mean and covariance of f(xt) after ``steps`` steps of gradient descent in parameter space.

        A step is the affine map ``T <- B T + D``, ``c <- B c + rate G^T Y`` with
        ``B = I - rate (G^T G + lam I)``; ``steps`` of them are one power of the
        augmented matrix ``[[B, D], [0, I]]`` (exact, by repeated squaring).
        """
        n, p, q = x.shape[0], self.p, self.q
        G, H = self.g(x), self.h(x)
        width = p + q + n  # xi = (w0, z, e)
        w0 = torch.zeros(p, width, dtype=DTYPE)
        w0[:, :p] = torch.eye(p, dtype=DTYPE)
        residual_part = torch.zeros(n, width, dtype=DTYPE)  # f(X) - targets, apart from the G w term
        residual_part[:, p : p + q] = H
        residual_part[:, p + q :] = -math.sqrt(s) * torch.eye(n, dtype=DTYPE)
        B = torch.eye(p, dtype=DTYPE) - rate * (G.T @ G + lam * torch.eye(p, dtype=DTYPE))
        D = -rate * (G.T @ residual_part - lam * w0)
        d = rate * G.T @ y

        def power(constant):
            cols = constant.shape[1]
            aug = torch.zeros(p + cols, p + cols, dtype=DTYPE)
            aug[:p, :p], aug[:p, p:], aug[p:, p:] = B, constant, torch.eye(cols, dtype=DTYPE)
            return torch.linalg.matrix_power(aug, steps)[:p]

        step_T = power(D)
        T = step_T[:, :p] @ w0 + step_T[:, p:]  # from T_0 = w0
        c = power(d)[:, p:]  # from c_0 = 0
        gt = self.g(xt)
        out = gt @ T
        out[:, p : p + q] += self.h(xt)
        return gt @ c, out @ out.T


# --------------------------------------------------------------------- correctness


def test_time_zero_is_the_prior(data):
    x, y, xt = data
    arch = relu_net()
    gp = TrainedNetworkGP(x, y, arch, learning_rate=0.3)
    k_tt, _ = evaluate(arch, xt)
    for kwargs in ({"t": 0.0}, {"steps": 0}):
        dist = gp(xt, **kwargs)
        assert torch.equal(dist.mean, torch.zeros(5, dtype=DTYPE))
        torch.testing.assert_close(dist.covariance_matrix, k_tt.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("readout", [False, True])
@pytest.mark.parametrize("noise,target_noise", [(0.0, None), (0.05, None), (0.05, 0.0)])
def test_matches_matrix_exponential_reference(data, readout, noise, target_noise):
    x, y, xt = data
    arch = erf_net()
    gp = TrainedNetworkGP(
        x,
        y,
        arch,
        learning_rate=0.2,
        noise=noise,
        target_noise=target_noise,
        trained="readout" if readout else "all",
    )
    for t in (1e-3, 0.7, 5.0, 60.0):
        mean, cov = reference(arch, x, y, xt, rate=0.2, t=t, noise=noise, target_noise=target_noise, readout=readout)
        dist = gp(xt, t=t)
        torch.testing.assert_close(dist.mean, mean.squeeze(-1), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(dist.covariance_matrix, cov, rtol=1e-8, atol=1e-10)
    for k in (1, 7, 40):
        mean, cov = reference(
            arch, x, y, xt, rate=0.2, steps=k, noise=noise, target_noise=target_noise, readout=readout
        )
        dist = gp(xt, steps=k)
        torch.testing.assert_close(dist.mean, mean.squeeze(-1), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(dist.covariance_matrix, cov, rtol=1e-8, atol=1e-10)
    if noise > 0:  # Theta + noise is well conditioned: the limit exists without a pseudo-inverse
        mean, cov = reference(
            arch, x, y, xt, rate=0.2, t=math.inf, noise=noise, target_noise=target_noise, readout=readout
        )
        dist = gp(xt, t=math.inf)
        torch.testing.assert_close(dist.mean, mean.squeeze(-1), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(dist.covariance_matrix, cov, rtol=1e-8, atol=1e-10)


def test_ill_conditioned_kernel_and_oscillating_descent_match_the_reference():
    """1-d inputs and a near-duplicate point give an NTK with condition number > 1e5 (slow modes matter for a long time);
    a learning rate above 1 / lambda_max makes the fast modes of gradient descent oscillate."""
    x = torch.linspace(-2, 2, 10, dtype=DTYPE)
    x = torch.cat([x, x[3:4] + 1e-3]).unsqueeze(-1)  # a near-duplicate: one very slow mode
    y = torch.sin(2 * x).squeeze(-1)
    xt = torch.tensor([[-2.5], [-0.3], [0.9], [3.0]], dtype=DTYPE)
    arch = relu_net()
    gp = TrainedNetworkGP(x, y, arch)
    assert gp.eigenvalues.max() / gp.eigenvalues.min() > 1e5
    eta = 0.9 * gp.max_learning_rate  # eta * lambda_max = 1.8: factor 1 - 1.8 = -0.8 per step
    gp = TrainedNetworkGP(x, y, arch, learning_rate=eta)
    scale = float(evaluate(arch, xt, diag=True)[0].detach().max())
    for k in (1, 2, 7, 50, 999):
        mean, cov = reference(arch, x, y, xt, rate=eta, steps=k)
        dist = gp(xt, steps=k)
        torch.testing.assert_close(dist.mean, mean.squeeze(-1), rtol=1e-7, atol=1e-9 * scale)
        torch.testing.assert_close(dist.covariance_matrix, cov, rtol=1e-7, atol=1e-9 * scale)
    for t in (3.0, 300.0, 3e4):
        mean, cov = reference(arch, x, y, xt, rate=eta, t=t)
        dist = gp(xt, t=t)
        torch.testing.assert_close(dist.mean, mean.squeeze(-1), rtol=1e-7, atol=1e-9 * scale)
        torch.testing.assert_close(dist.covariance_matrix, cov, rtol=1e-7, atol=1e-9 * scale)


@pytest.mark.parametrize("p", [4, 12])  # fewer / more trained features than the 7 training points
@pytest.mark.parametrize("lam,s", [(0.0, 0.0), (0.3, 0.3), (0.3, 0.0), (0.0, 0.2)])
def test_exact_linear_model_gradient_descent(data, p, lam, s):
    """A linear model is its own linearisation: the prediction must be exact at any number of steps."""
    x, y, xt = data
    model = LinearModel(p=p, q=5)
    y2 = torch.stack([y, torch.cos(x[:, 0])], -1)
    gp = TrainedNetworkGP(x, y2, (model.nngp, model.ntk), learning_rate=0.25, noise=lam, target_noise=s)
    for steps in (0, 1, 5, 60):
        mean, cov = model.simulate(x, y2, xt, rate=0.25, steps=steps, lam=lam, s=s)
        got_mean, got_cov = gp.mean_and_covariance(xt, steps=steps)
        torch.testing.assert_close(got_mean, mean, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got_cov, cov, rtol=1e-9, atol=1e-11)
    # gradient descent converges (the rate is below 2 / lambda_max), also with a rank-deficient
    # NTK (p = 4 < 7); the limit of the simulation is reached after many steps.
    assert 0.25 < gp.max_learning_rate
    mean, cov = model.simulate(x, y2, xt, rate=0.25, steps=100_000, lam=lam, s=s)
    for kwargs in ({"t": math.inf}, {"steps": math.inf}):
        got_mean, got_cov = gp.mean_and_covariance(xt, **kwargs)
        torch.testing.assert_close(got_mean, mean, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got_cov, cov, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("noise", [0.01, 0.3])
@pytest.mark.filterwarnings("ignore:The input matches the stored training data")  # we ask for it on purpose
def test_readout_limit_is_the_exact_gp_posterior(data, noise):
    x, y, xt = data
    kernel = MLPKernel(depth=2, nonlinearity="relu", kind="nngp")

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(torch.full_like(y, noise))
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = kernel

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = Model().double().eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False), gpytorch.settings.max_cholesky_size(10_000):
        posterior = model(xt)
        posterior_train = model(x)
        expected = [
            (posterior.mean, posterior.covariance_matrix),
            (posterior_train.mean, posterior_train.covariance_matrix),
        ]
    for source in (kernel, kernel.architecture):
        gp = TrainedNetworkGP(x, y, source, trained="readout", noise=noise, learning_rate=0.1)
        for inputs, (mean, cov) in zip((xt, x), expected):
            dist = gp(inputs, t=math.inf)
            torch.testing.assert_close(dist.mean, mean, rtol=1e-8, atol=1e-9)
            torch.testing.assert_close(dist.covariance_matrix, cov, rtol=1e-7, atol=1e-9)
        # and via the eigendecomposition rather than the Cholesky factor (once it exists)
        gp(xt, t=1.0)
        torch.testing.assert_close(gp(xt, t=math.inf).covariance_matrix, expected[0][1], rtol=1e-7, atol=1e-9)


def test_ntk_limit_mean_is_kernel_regression(data):
    """Training all layers converges to the NTK kernel-regression mean Theta(x, X) (Theta + noise)^-1 Y."""
    x, y, xt = data
    arch = relu_net()
    _, ntk_tx = evaluate(arch, xt, x, ntk=True)
    _, ntk_xx = evaluate(arch, x, ntk=True)
    for noise in (0.0, 0.1):
        expected = ntk_tx.detach() @ torch.linalg.solve(ntk_xx.detach() + noise * torch.eye(7, dtype=DTYPE), y)
        gp = TrainedNetworkGP(x, y, arch, noise=noise)
        torch.testing.assert_close(gp(xt, t=math.inf).mean, expected, rtol=1e-8, atol=1e-10)
        # without noise the training targets are interpolated, with a vanishing variance
        if noise == 0.0:
            train = gp(None, t=math.inf)
            torch.testing.assert_close(train.mean, y, rtol=1e-8, atol=1e-9)
            assert train.covariance_matrix.diagonal().abs().max() < 1e-8 * evaluate(arch, x, diag=True)[0].max()


def test_kernel_sources_agree(data):
    x, y, xt = data
    arch = relu_net()
    nngp_k = TensorProgramKernel(arch, kind="nngp")
    ntk_k = TensorProgramKernel(arch, kind="ntk")

    def nngp_fn(a, b):
        return evaluate(arch, a, b)[0]

    def ntk_fn(a, b):
        return evaluate(arch, a, b, ntk=True)[1]

    sources = [arch, nngp_k, ntk_k, (nngp_k, ntk_k), (nngp_fn, ntk_fn)]
    ref = TrainedNetworkGP(x, y, sources[0], learning_rate=0.2)(xt, t=3.0)
    for source in sources[1:]:
        dist = TrainedNetworkGP(x, y, source, learning_rate=0.2)(xt, t=3.0)
        torch.testing.assert_close(dist.mean, ref.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dist.covariance_matrix, ref.covariance_matrix, rtol=1e-10, atol=1e-12)
    # readout training needs only the NNGP kernel: any GPyTorch kernel or callable does
    ref = TrainedNetworkGP(x, y, arch, trained="readout", learning_rate=0.2)(xt, t=3.0)
    for source in (nngp_k, (nngp_k, None), nngp_fn):
        dist = TrainedNetworkGP(x, y, source, trained="readout", learning_rate=0.2)(xt, t=3.0)
        torch.testing.assert_close(dist.mean, ref.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dist.covariance_matrix, ref.covariance_matrix, rtol=1e-10, atol=1e-12)
    rbf = TrainedNetworkGP(x, y, gpytorch.kernels.RBFKernel(), trained="readout")(xt, t=1.0)
    assert torch.isfinite(rbf.covariance_matrix).all()


def test_diag_matches_full_and_covariance_is_psd(data):
    x, y, xt = data
    gp = TrainedNetworkGP(x, y, erf_net(), learning_rate=0.3, noise=0.01)
    times = torch.tensor([0.0, 0.1, 2.0, 30.0, math.inf])
    full = gp(xt, t=times)
    diag = gp(xt, t=times, diag=True)
    torch.testing.assert_close(diag.mean, full.mean, rtol=0, atol=0)
    torch.testing.assert_close(diag.variance, full.covariance_matrix.diagonal(dim1=-2, dim2=-1), rtol=1e-10, atol=1e-13)
    for inputs in (xt, None, torch.cat([x, xt])):
        cov = gp(inputs, t=times).covariance_matrix
        evals = torch.linalg.eigvalsh(cov)
        assert (evals >= -1e-10 * evals.amax(-1, keepdim=True)).all()
        assert torch.equal(cov, cov.transpose(-1, -2))


def test_training_inputs_none_equals_passing_them(data):
    x, y, _ = data
    for noise in (0.0, 0.2):
        gp = TrainedNetworkGP(x, y, relu_net(), learning_rate=0.2, noise=noise)
        for kwargs in ({"t": torch.tensor([0.5, 4.0])}, {"steps": 9}, {"t": math.inf}):
            a = gp(None, **kwargs)
            b = gp(x.clone(), **kwargs)
            torch.testing.assert_close(a.mean, b.mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.covariance_matrix, b.covariance_matrix, rtol=1e-9, atol=1e-12)


def test_multiple_outputs_equal_separate_runs(data):
    x, y, xt = data
    y2 = torch.stack([y, torch.cos(x[:, 1]), -y], -1)
    gp = TrainedNetworkGP(x, y2, relu_net(), learning_rate=0.3)
    times = torch.tensor([0.0, 2.0, math.inf])
    dist = gp(xt, t=times)
    assert isinstance(dist, gpytorch.distributions.MultitaskMultivariateNormal)
    assert dist.mean.shape == (3, 5, 3)
    cov = dist.covariance_matrix  # interleaved: (point, output) pairs
    for j in range(3):
        single = TrainedNetworkGP(x, y2[:, j], relu_net(), learning_rate=0.3)(xt, t=times)
        torch.testing.assert_close(dist.mean[..., j], single.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cov[..., j::3, j::3], single.covariance_matrix, rtol=1e-10, atol=1e-12)
        other = (j + 1) % 3
        assert cov[..., j::3, other::3].abs().max() == 0  # outputs are independent
    diag = gp(xt, t=times, diag=True)
    torch.testing.assert_close(diag.variance, dist.variance, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gp.expected_loss(t=times).loss.shape, torch.Size([3]))


def test_batched_times_equal_single_calls(data):
    x, y, xt = data
    gp = TrainedNetworkGP(x, y, relu_net(), learning_rate=0.2)
    times = torch.tensor([[0.0, 1.5], [20.0, math.inf]])
    dist = gp(xt, t=times)
    assert dist.batch_shape == (2, 2) and dist.event_shape == (5,)
    for i in range(2):
        for j in range(2):
            single = gp(xt, t=float(times[i, j]))
            torch.testing.assert_close(dist.mean[i, j], single.mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(dist.covariance_matrix[i, j], single.covariance_matrix, rtol=1e-12, atol=1e-14)
    steps = gp(xt, steps=torch.tensor([0, 3, 10]))
    assert steps.batch_shape == (3,)
    torch.testing.assert_close(steps.mean[1], gp(xt, steps=3).mean, rtol=1e-12, atol=1e-14)


def test_discrete_descent_with_small_steps_approaches_the_flow(data):
    """(I - eta M)^k -> exp(-eta k M): the gap shrinks in proportion to eta (Euler's method)."""
    x, y, xt = data
    t = 4.0
    flow = TrainedNetworkGP(x, y, relu_net(), learning_rate=1.0)(xt, t=t)
    gaps = []
    for eta in (0.02, 0.002):
        gp = TrainedNetworkGP(x, y, relu_net(), learning_rate=eta)
        dist = gp(xt, steps=round(t / eta))
        # gradient flow in time t with rate eta equals flow time eta*t with rate 1
        torch.testing.assert_close(gp(xt, t=t / eta).mean, flow.mean, rtol=1e-9, atol=1e-11)
        gaps.append(
            max((dist.mean - flow.mean).abs().max(), (dist.covariance_matrix - flow.covariance_matrix).abs().max())
        )
    assert gaps[1] < 1e-3
    assert 7 < gaps[0] / gaps[1] < 13


def test_extreme_times_and_eigenvalues(data):
    x, y, xt = data
    arch = relu_net()
    gp = TrainedNetworkGP(x, y, arch, learning_rate=1.0, noise=1e-3)
    # tiny t: first order in t, f_t(x) = t * Theta(x, X) Y + O(t^2)
    _, ntk_tx = evaluate(arch, xt, x, ntk=True)
    tiny = 1e-12
    torch.testing.assert_close(gp(xt, t=tiny).mean / tiny, ntk_tx.detach() @ y, rtol=1e-6, atol=0)
    # huge t: the limit, through the same formula
    torch.testing.assert_close(gp(xt, t=1e12).mean, gp(xt, t=math.inf).mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        gp(xt, t=1e12).covariance_matrix, gp(xt, t=math.inf).covariance_matrix, rtol=1e-8, atol=1e-12
    )


def test_duplicate_points_and_null_space():
    """Duplicated training points make the NTK singular: finite for all t, and the limit is that of the unique points."""
    x = torch.linspace(-2, 2, 5, dtype=DTYPE).unsqueeze(-1)
    y = torch.sin(2 * x).squeeze(-1)
    xd, yd = torch.cat([x, x[1:3]]), torch.cat([y, y[1:3]])
    xt = torch.tensor([[-1.3], [0.2], [2.5]], dtype=DTYPE)
    arch = relu_net()
    unique = TrainedNetworkGP(x, y, arch)
    dup = TrainedNetworkGP(xd, yd, arch)
    assert dup.eigenvalues.min() < 1e-12 * dup.eigenvalues.max()
    for t in (0.0, 1e-6, 1.0, 1e3, 1e15):
        dist = dup(xt, t=t)
        assert torch.isfinite(dist.mean).all() and torch.isfinite(dist.covariance_matrix).all()
    a, b = dup(xt, t=math.inf), unique(xt, t=math.inf)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(a.covariance_matrix, b.covariance_matrix, rtol=1e-6, atol=1e-8)
    # zero bias variance in 1-d: the ReLU NTK has rank 2, a large exact null space
    low_rank = TrainedNetworkGP(x, y, relu_net(bias=0.0))
    mean = low_rank(xt, t=torch.tensor([1.0, 1e8, math.inf])).mean
    assert torch.isfinite(mean).all()
    torch.testing.assert_close(mean[1], mean[2], rtol=1e-6, atol=1e-8)


def test_cholesky_and_eigen_paths_agree(data):
    x, y, xt = data
    a = TrainedNetworkGP(x, y, relu_net(), noise=1e-4)
    first = a(xt, t=math.inf)  # Cholesky (no eigendecomposition yet)
    assert a._eig is None
    b = TrainedNetworkGP(x, y, relu_net(), noise=1e-4)
    b(xt, t=1.0)
    second = b(xt, t=math.inf)  # eigendecomposition
    torch.testing.assert_close(first.mean, second.mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(first.covariance_matrix, second.covariance_matrix, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- learning rates, losses


def test_largest_stable_learning_rate(data):
    x, y, xt = data
    arch = relu_net()
    _, ntk_xx = evaluate(arch, x, ntk=True)
    lam_max = float(torch.linalg.eigvalsh(ntk_xx.detach() + 0.1 * torch.eye(7, dtype=DTYPE)).max())
    gp = TrainedNetworkGP(x, y, arch, noise=0.1)
    assert gp.max_learning_rate == pytest.approx(2 / lam_max, rel=1e-10)
    below = TrainedNetworkGP(x, y, arch, noise=0.1, learning_rate=0.99 * gp.max_learning_rate)
    losses = below.expected_loss(steps=torch.tensor([0, 10, 100, 10_000, math.inf])).loss
    assert (losses[:-1].diff() < 0).all()
    torch.testing.assert_close(losses[-2], losses[-1], rtol=1e-6, atol=0)
    above = TrainedNetworkGP(x, y, arch, noise=0.1, learning_rate=1.01 * gp.max_learning_rate)
    with pytest.raises(ValueError, match="diverges"):
        above(xt, steps=math.inf)
    with pytest.warns(RuntimeWarning, match="largest stable learning rate"):
        losses = above.expected_loss(steps=torch.tensor([100, 1000])).loss
    assert losses[1] > 1e3 * losses[0]
    # "mse" is torch.nn.MSELoss: the same dynamics with learning rate 2 eta / (n m)
    mse = TrainedNetworkGP(x, y, arch, noise=0.1, loss="mse")
    assert mse.max_learning_rate == pytest.approx(gp.max_learning_rate * 7 / 2, rel=1e-10)


def test_mse_loss_is_a_rescaled_learning_rate(data):
    x, y, xt = data
    y2 = torch.stack([y, -2 * y], -1)
    eta = 0.8
    mse = TrainedNetworkGP(x, y2, relu_net(), learning_rate=eta, loss="mse")
    half = TrainedNetworkGP(x, y2, relu_net(), learning_rate=2 * eta / (7 * 2))
    for kwargs in ({"t": 3.0}, {"steps": 11}):
        torch.testing.assert_close(mse(xt, **kwargs).mean, half(xt, **kwargs).mean, rtol=1e-10, atol=1e-12)
    # its loss is the mean of the squared errors, not half their sum
    ratio = mse.expected_loss(steps=11).loss / half.expected_loss(steps=11).loss
    torch.testing.assert_close(ratio, torch.tensor(2 / (7 * 2), dtype=DTYPE), rtol=1e-10, atol=0)


def test_expected_loss_matches_the_distribution(data):
    x, y, xt = data
    yt = torch.sin(xt.sum(-1))
    gp = TrainedNetworkGP(x, y, erf_net(), learning_rate=0.3, noise=0.02)
    times = torch.tensor([0.0, 0.5, 4.0, 40.0, math.inf])
    for inputs, targets in ((None, None), (xt, yt)):
        dist = gp(inputs, t=times)
        ref_y = y if targets is None else targets
        bias = 0.5 * (dist.mean - ref_y).pow(2).sum(-1)
        variance = 0.5 * dist.variance.sum(-1)
        got = gp.expected_loss(t=times, x=inputs, y=targets)
        torch.testing.assert_close(got.bias, bias, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.variance, variance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.loss, bias + variance, rtol=1e-9, atol=1e-12)
    # at t = 0 the expected training loss is 1/2 (|Y|^2 + trace K)
    k_xx = evaluate(erf_net(), x, diag=True)[0].detach()
    torch.testing.assert_close(gp.expected_loss(t=0.0).loss, 0.5 * (y.pow(2).sum() + k_xx.sum()), rtol=1e-10, atol=0)
    # Monte Carlo: the mean loss of sampled functions
    samples = gp(None, t=4.0).sample(torch.Size([40_000]))
    mc = 0.5 * (samples - y).pow(2).sum(-1)
    assert abs(mc.mean() - gp.expected_loss(t=4.0).loss) < 4 * mc.std() / 200


def test_training_loss_reaches_tiny_values_accurately(data):
    """The training-set loss is a sum of squares in the eigenbasis: no cancellation near zero."""
    x, y, _ = data
    gp = TrainedNetworkGP(x, y, relu_net(), learning_rate=1.0)
    mu_min = float(gp.eigenvalues.min())
    loss = gp.expected_loss(t=torch.tensor([100 / mu_min, 200 / mu_min])).loss
    assert (loss > 0).all()
    # each mode decays like exp(-2 mu t): doubling t squares the ratio to the slowest mode's decay
    assert loss[1] / loss[0] == pytest.approx(math.exp(-200), rel=0.5)


def test_optimal_stopping_time_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    x = torch.linspace(-2, 2, 12, dtype=DTYPE).unsqueeze(-1)
    y = torch.sin(2 * x).squeeze(-1) + 0.5 * torch.randn(12, generator=gen, dtype=DTYPE)  # noisy targets
    xv = torch.linspace(-2, 2, 40, dtype=DTYPE).unsqueeze(-1)
    yv = torch.sin(2 * xv).squeeze(-1)  # clean validation targets: overfitting hurts
    gp = TrainedNetworkGP(x, y, relu_net(), learning_rate=0.05)
    for criterion in ("expected", "mean"):
        best = gp.optimal_stopping_time(xv, yv, criterion=criterion)
        grid = torch.logspace(-2, 7, 3000, dtype=DTYPE)
        dist = gp(xv, t=grid, diag=True)
        curve = 0.5 * (dist.mean - yv).pow(2).sum(-1)
        if criterion == "expected":
            curve = curve + 0.5 * dist.lazy_covariance_matrix.diagonal(dim1=-2, dim2=-1).sum(-1)
        i = int(curve.argmin())
        assert 0 < i < len(grid) - 1 and math.isfinite(best.time)  # an interior minimum exists
        assert best.loss <= float(curve.min()) + 1e-9
        assert float(grid[i - 1]) <= best.time <= float(grid[i + 1])
        assert best.loss < best.loss_at_end
        steps = gp.optimal_stopping_time(xv, yv, criterion=criterion, discrete=True)
        assert steps.time == round(steps.time)
        assert abs(steps.time - best.time) / best.time < 0.05
    # clean targets and interpolation: no early stopping
    clean = TrainedNetworkGP(x, torch.sin(2 * x).squeeze(-1), relu_net(), learning_rate=0.05)
    result = clean.optimal_stopping_time(x, torch.sin(2 * x).squeeze(-1), criterion="mean")
    assert result.time == math.inf


# -------------------------------------------------------------------------- errors


def test_errors(data):
    x, y, xt = data
    arch = relu_net()
    gp = TrainedNetworkGP(x, y, arch)
    with pytest.raises(ValueError, match="non-negative"):
        gp(xt, t=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        gp(xt, t=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="exactly one"):
        gp(xt, t=1.0, steps=3)
    with pytest.raises(ValueError, match="exactly one"):
        gp(xt)
    with pytest.raises(ValueError, match="whole numbers"):
        gp(xt, steps=2.5)
    with pytest.raises(ValueError, match="2 features but train_x has 3"):
        gp(torch.randn(4, 2, dtype=DTYPE), t=1.0)
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        gp(torch.randn(4, dtype=DTYPE), t=1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        gp(torch.full((2, 3), float("nan"), dtype=DTYPE), t=1.0)
    with pytest.raises(ValueError, match="7 points but train_y has 6"):
        TrainedNetworkGP(x, y[:6], arch)
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(n, m\)"):
        TrainedNetworkGP(x, y.view(7, 1, 1), arch)
    with pytest.raises(ValueError, match="NaN or infinite"):
        TrainedNetworkGP(x, torch.full_like(y, float("inf")), arch)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="learning_rate"):
            TrainedNetworkGP(x, y, arch, learning_rate=bad)
    with pytest.raises(ValueError, match="noise"):
        TrainedNetworkGP(x, y, arch, noise=-0.1)
    with pytest.raises(ValueError, match="trained must be"):
        TrainedNetworkGP(x, y, arch, trained="hidden")
    with pytest.raises(ValueError, match="loss must be"):
        TrainedNetworkGP(x, y, arch, loss="l1")
    with pytest.raises(ValueError, match="needs an NTK"):
        TrainedNetworkGP(x, y, (TensorProgramKernel(arch), None))
    with pytest.raises(ValueError, match="single kernel only describes readout"):
        TrainedNetworkGP(x, y, gpytorch.kernels.RBFKernel())
    with pytest.raises(TypeError, match="kernel must be"):
        TrainedNetworkGP(x, y, "relu")
    with pytest.raises(ValueError, match="y has shape"):
        gp.expected_loss(t=1.0, x=xt, y=torch.zeros(4, dtype=DTYPE))
    with pytest.raises(ValueError, match="together"):
        gp.expected_loss(t=1.0, x=xt)
    with pytest.raises(ValueError, match="criterion"):
        gp.optimal_stopping_time(xt, torch.zeros(5, dtype=DTYPE), criterion="median")


def test_non_psd_kernels_are_refused(data):
    x, y, xt = data

    def indefinite(a, b):  # a distance, not a covariance
        return torch.cdist(a, b)

    def good(a, b):
        return torch.exp(-(torch.cdist(a, b) ** 2))

    with pytest.raises(ValueError, match="NNGP kernel is not positive semi-definite"):
        TrainedNetworkGP(x, y, indefinite, trained="readout")
    with pytest.raises(ValueError, match="NTK is not positive semi-definite"):
        TrainedNetworkGP(x, y, (good, indefinite))(xt, t=1.0)

    # round-off sized negative eigenvalues are accepted
    def nearly(a, b):
        k = good(a, b)
        return k - 1e-12 * torch.eye(k.shape[0], dtype=k.dtype) if a is b else k

    TrainedNetworkGP(x, y, nearly, trained="readout")(xt, t=1.0)
    with pytest.raises(ValueError, match="returned shape"):
        TrainedNetworkGP(x, y, lambda a, b: good(a, b)[:, :2], trained="readout")


# ------------------------------------------------------------------------ tutorial


def test_tutorial_smoke(tmp_path):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    spec = importlib.util.spec_from_file_location(
        "tutorial_training_dynamics", ROOT / "tutorials" / "training_dynamics.py"
    )
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    paths = tutorial.main(["--smoke", "--outdir", str(tmp_path)])
    assert set(paths) == {"functions", "loss", "limit"}
    for path in paths.values():
        assert path.parent == tmp_path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
