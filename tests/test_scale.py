"""Large N: the matrix-free kernel operator, GPyTorch's chunked evaluation, variational GPs and SGPR."""

from __future__ import annotations

import contextlib
import os
import unittest

import gpytorch
import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

from gpytorch_tp import CNNKernel, MLPKernel, matrix_free
from gpytorch_tp.kernels import tensor_program_kernel
from gpytorch_tp.evaluation import TiledKernelOperator, matrix_free_block_sizes

# A small memory budget (1 MiB): blocks of at most 128 points, 52 with autograd.
TINY_BUDGET = 2**20


@pytest.fixture(params=["recomputed", "held"])
def mode(request, monkeypatch):
    """``recomputed``: small blocks, never the whole matrix; ``held``: the matrix held after the first product."""
    if request.param == "recomputed":
        monkeypatch.setattr(matrix_free, "_MAX_BLOCK", {"cpu": 70, "cuda": 70})
        monkeypatch.setattr(matrix_free, "_MAX_GRAD_BLOCK", {"cpu": 40, "cuda": 40})
        monkeypatch.setattr(TiledKernelOperator, "_held_matrix", lambda self: None)
    return request.param


class TestMatrixFreeMLPKernel(BaseKernelTestCase, unittest.TestCase):
    """GPyTorch's own kernel tests (batches, active_dims, getitem, pickling) on the operator path."""

    def create_kernel_no_ard(self, **kwargs):
        return MLPKernel(depth=2, kind="ntk", matrix_free=True, memory_budget=TINY_BUDGET, **kwargs)


def _x(n, d=3, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pair(make):
    """The same kernel twice: dense path and matrix-free path, identical hyperparameters."""
    dense = make(matrix_free=False).double()
    free = make(matrix_free=True).double()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the initial values, where every layer looks alike
    free.load_state_dict(dense.state_dict())
    return dense, free


KERNELS = {
    "mlp_nngp": lambda **kw: MLPKernel(depth=3, **kw),
    "mlp_ntk_erf": lambda **kw: MLPKernel(depth=2, nonlinearity="erf", kind="ntk", **kw),
    "mlp_normalized": lambda **kw: MLPKernel(depth=2, normalize=True, **kw),
    "cnn_ntk": lambda **kw: CNNKernel((1, 3, 3), depth=1, kernel_size=2, kind="ntk", readout="flatten", **kw),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_operator_products_diagonal_and_entries_equal_the_dense_kernel(name, mode):
    dense, free = _pair(KERNELS[name])
    d = 9 if name == "cnn_ntk" else 3
    n = 160  # 70-point blocks: diagonal, mirrored and ragged ones
    x, z = _x(n, d, 1), _x(90, d, 2)
    v = torch.randn(n, 4, dtype=torch.float64)
    K = dense(x).to_dense()
    op = free(x).evaluate_kernel()
    assert isinstance(op, TiledKernelOperator) and op.same and op.shape == K.shape
    scale = float(K.abs().max())
    assert torch.allclose(op @ v, K @ v, atol=1e-12 * scale * n)
    assert torch.allclose(op.diagonal(), K.diagonal(), atol=1e-13 * scale)
    assert torch.allclose(op.to_dense(), K, atol=1e-13 * scale)
    # Rectangular, transposed, sliced and indexed.
    Kxz = dense(x, z).to_dense()
    op_xz = free(x, z).evaluate_kernel()
    assert not op_xz.same
    w = torch.randn(90, 2, dtype=torch.float64)
    assert torch.allclose(op_xz @ w, Kxz @ w, atol=1e-12 * scale * 90)
    assert torch.allclose(op_xz.mT @ v, Kxz.mT @ v, atol=1e-12 * scale * n)
    assert torch.allclose(op[20:60, 50:95].to_dense(), K[20:60, 50:95], atol=1e-13 * scale)
    rows, cols = torch.tensor([0, 5, n - 1, 17]), torch.tensor([3, 5, 0, 80])
    assert torch.allclose(op[rows, cols], K[rows, cols], atol=1e-13 * scale)


@pytest.mark.parametrize("name", ["mlp_ntk_erf", "mlp_normalized", "cnn_ntk"])
def test_gradients_of_a_bilinear_form_equal_the_dense_kernels(name, mode):
    dense, free = _pair(KERNELS[name])
    d = 9 if name == "cnn_ntk" else 3
    x, z = _x(100, d, 3), _x(50, d, 4)  # 40-point blocks with autograd
    u, v, w = (torch.randn(n, 3, dtype=torch.float64) for n in (100, 100, 50))
    for second, right in ((None, v), (z, w)):
        grads = []
        for kernel in (dense, free):
            kernel.zero_grad()
            xg = x.clone().requires_grad_()
            zg = None if second is None else second.clone().requires_grad_()
            K = kernel(xg, zg)
            if kernel is free:
                assert isinstance(K.evaluate_kernel(), TiledKernelOperator)
            (u * (K @ right)).sum().backward()
            grads.append([xg.grad] + ([] if zg is None else [zg.grad]) + [p.grad for p in kernel.parameters()])
        for expected, got in zip(*grads):
            assert torch.isfinite(got).all()
            assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_automatic_choice_follows_the_memory_budget():
    x = _x(200)
    # 200 x 200 float64 is 320 kB; with autograd about 24 times that.
    kernel = MLPKernel(depth=2, memory_budget=2**22).double()
    assert isinstance(kernel(x).evaluate_kernel(), TiledKernelOperator)
    with torch.no_grad():
        assert not isinstance(kernel(x).evaluate_kernel(), TiledKernelOperator)
    kernel.memory_budget = 2**30
    assert not isinstance(kernel(x).evaluate_kernel(), TiledKernelOperator)
    with pytest.raises(ValueError, match="matrix_free must be"):
        MLPKernel(matrix_free="yes")


def test_automatic_choice_on_a_cpu_with_autograd_goes_matrix_free_from_many_pairs(monkeypatch):
    # Where the matrix-free path is the faster one too (see CPU_MATRIX_FREE_GRAD_PAIRS), here 900 pairs.
    monkeypatch.setattr(tensor_program_kernel, "CPU_MATRIX_FREE_GRAD_PAIRS", 30 * 30)
    kernel = MLPKernel(depth=2, memory_budget=2**30).double()  # the dense path fits the budget
    x = _x(30)
    assert isinstance(kernel(x).evaluate_kernel(), TiledKernelOperator)
    assert not isinstance(kernel(x[:29]).evaluate_kernel(), TiledKernelOperator)  # 841 pairs
    assert isinstance(kernel(x[:29].expand(2, 29, 3)).evaluate_kernel(), TiledKernelOperator)  # a batch of 2
    with torch.no_grad():  # without autograd only the memory budget decides
        assert not isinstance(kernel(x).evaluate_kernel(), TiledKernelOperator)
    # Items on a grid keep the memory rule (their costs were not measured).
    cnn = CNNKernel((1, 2, 2), readout="flatten", memory_budget=2**30).double()
    assert not isinstance(cnn(_x(30, 4)).evaluate_kernel(), TiledKernelOperator)
    # The same values and gradients as the dense path.
    dense = MLPKernel(depth=2, matrix_free=False).double()
    weights = _x(30, 30, seed=3)
    grads = []
    for k in (kernel, dense):
        value = (k(x).to_dense() * weights).sum()
        grads.append(torch.autograd.grad(value, list(k.parameters())))
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=0)


def test_block_sizes_shrink_with_the_budget_and_with_positions():
    mlp, cnn = MLPKernel(depth=2), CNNKernel((1, 8, 8), readout="flatten")
    x = _x(10, 1, dtype=torch.float64)
    big, big_grad = matrix_free_block_sizes(mlp.block_covariance(x), x, 2**30)
    small, small_grad = matrix_free_block_sizes(mlp.block_covariance(x), x, 2**22)
    assert small < big and small_grad < big_grad and small_grad <= small
    # 4 MiB: a product block of b x b float64 pairs and its product within a quarter of it.
    assert 2 * small**2 * 8 <= 2**22 / 4
    per_image, _ = matrix_free_block_sizes(cnn.block_covariance(_x(10, 64)), _x(10, 64), 2**22)
    assert per_image < small  # 64 aligned pixel pairs per pair of images


def _peak_rss_growth(fn) -> int:
    """Bytes by which ``fn`` raises the process's peak resident memory (Linux: VmHWM, reset first)."""

    def hwm() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM")

    def rss() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmRSS")

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak to the current resident set
    start = rss()
    fn()
    return hwm() - start


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak memory")
def test_products_and_gradients_never_hold_the_matrix():
    n = 2500
    x = _x(n, 3, 5)
    v = torch.randn(n, 2, dtype=torch.float64)
    matrix_bytes = n * n * 8  # 50 MB
    kernel = MLPKernel(depth=2, matrix_free=True, memory_budget=2**23).double()  # 8 MiB: blocks of 362, 147
    # Warm up (worker threads, their allocator arenas) on a matrix that needs several blocks too.
    (v[:800] * (kernel(x[:800]) @ v[:800])).sum().backward()
    op = kernel(x).evaluate_kernel()
    assert op._held_matrix() is None
    result = {}
    growth = _peak_rss_growth(lambda: result.update(product=op @ v))
    assert growth < matrix_bytes / 3, f"the product raised peak memory by {growth / 2**20:.1f} MiB"

    def gradient():
        (v * (kernel(x) @ v)).sum().backward()

    growth = _peak_rss_growth(gradient)
    assert growth < matrix_bytes / 3, f"the gradient raised peak memory by {growth / 2**20:.1f} MiB"
    for p in kernel.parameters():
        assert torch.isfinite(p.grad).all() and (p.grad != 0).any()
    # The product is right: rows of the matrix checked against the dense kernel.
    dense = MLPKernel(depth=2, matrix_free=False).double()
    rows = dense(x[:50], x).to_dense()
    assert torch.allclose(result["product"][:50], rows @ v, atol=1e-10 * float(rows.abs().max()) * n)


class _ExactGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, covar):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = 0.1
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ConstantMean()
        self.covar = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def _regression(n, d=2, seed=0):
    x = _x(n, d, seed)
    return x, torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] ** 2 + 0.05 * _x(n, 1, seed + 1)[:, 0]


def _exact_loss_and_grads(model, x, y, **settings):
    model.train()
    model.zero_grad()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    torch.manual_seed(0)
    loss = -mll(model(x), y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@contextlib.contextmanager
def _conjugate_gradients():
    """GPyTorch's iterative path (never Cholesky), with fixed probe vectors: the same steps on both paths."""
    with (
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.cg_tolerance(1e-6),
        gpytorch.settings.max_cg_iterations(100),
        gpytorch.settings.deterministic_probes(True),
        gpytorch.settings.num_trace_samples(8),
    ):
        yield


def _exact_gp(x, y, **kernel_options):
    kernel = gpytorch.kernels.ScaleKernel(MLPKernel(depth=2, nonlinearity="erf", **kernel_options))
    return _ExactGP(x, y, kernel).double()


def test_exact_gp_with_conjugate_gradients_matches_the_dense_path(mode):
    x, y = _regression(80)  # 70-point blocks
    dense = _exact_gp(x, y, matrix_free=False)
    free = _exact_gp(x, y, matrix_free=True)
    free.load_state_dict(dense.state_dict())
    with _conjugate_gradients():
        loss_d, grads_d = _exact_loss_and_grads(dense, x, y)
        loss_f, grads_f = _exact_loss_and_grads(free, x, y)
    # Cholesky as the reference for the loss: CG with exact probes agrees to its tolerance.
    with gpytorch.settings.max_cholesky_size(10**6):
        loss_c, _ = _exact_loss_and_grads(dense, x, y)
    # Same CG steps up to summation order, which unconverged CG amplifies (the exact
    # equality of the gradients is the bilinear-form test above).
    assert torch.allclose(loss_f, loss_d, rtol=1e-6)
    for name in grads_d:
        assert torch.isfinite(grads_f[name]).all()
        assert torch.allclose(grads_f[name], grads_d[name], rtol=1e-4, atol=1e-6), name
    assert abs(float(loss_f - loss_c)) < 0.05  # stochastic log-determinant vs exact
    # Predictions (CG solves against the training operator) equal the dense ones.
    dense.eval(), free.eval()
    z = _x(40, 2, 9)
    with torch.no_grad(), _conjugate_gradients():
        pd, pf = dense(z), free(z)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
        exact = dense(z)
    # CG stops at 100 iterations short of its tolerance on this ill-conditioned matrix, so the
    # paths' different summation orders show at 1e-4; both are near the Cholesky prediction.
    assert torch.allclose(pf.mean, pd.mean, atol=1e-3)
    assert torch.allclose(pf.variance, pd.variance, atol=1e-3)
    assert torch.allclose(pf.mean, exact.mean, atol=1e-2)


@pytest.mark.parametrize("matrix_free", [False, True])
def test_gpytorch_checkpoint_kernel_gives_the_same_loss_and_gradients(matrix_free):
    x, y = _regression(80, seed=3)
    model = _exact_gp(x, y, matrix_free=matrix_free)
    with _conjugate_gradients():
        loss, grads = _exact_loss_and_grads(model, x, y)
        with pytest.warns(DeprecationWarning), gpytorch.beta_features.checkpoint_kernel(30):
            loss_c, grads_c = _exact_loss_and_grads(model, x, y)
    assert torch.allclose(loss_c, loss, rtol=1e-6)  # chunked products: summation order (see above)
    for name in grads:
        assert torch.isfinite(grads_c[name]).all()
        assert torch.allclose(grads_c[name], grads[name], rtol=1e-4, atol=1e-6), name


class _VariationalGP(gpytorch.models.ApproximateGP):
    def __init__(self, inducing_points):
        distribution = gpytorch.variational.CholeskyVariationalDistribution(inducing_points.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing_points, distribution, learn_inducing_locations=True
        )
        super().__init__(strategy)
        self.mean = gpytorch.means.ConstantMean()
        self.covar = gpytorch.kernels.ScaleKernel(MLPKernel(depth=2))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def test_variational_gp_with_learned_inducing_points_trains_on_minibatches():
    torch.manual_seed(0)
    x, y = _regression(300, seed=11)
    x_test, y_test = _regression(100, seed=12)
    model = _VariationalGP(x[:20].clone()).double()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=len(y))
    optimizer = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=0.1)
    start = model.variational_strategy.inducing_points.detach().clone()

    def full_elbo():
        with torch.no_grad():
            return float(mll(model(x), y))

    before = full_elbo()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50, shuffle=True)
    model.train(), likelihood.train()
    for _ in range(4):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = -mll(model(xb), yb)
            loss.backward()
            for p in [*model.parameters(), *likelihood.parameters()]:
                assert p.grad is None or torch.isfinite(p.grad).all()
            optimizer.step()
    assert full_elbo() > before + 0.3
    assert not torch.equal(model.variational_strategy.inducing_points, start)  # the inducing points moved
    model.eval(), likelihood.eval()
    with torch.no_grad():
        mean = model(x_test).mean
    # After 24 small steps: better than predicting the training mean, far from converged.
    assert float(((mean - y_test) ** 2).mean()) < 0.8 * float(((y_test - y.mean()) ** 2).mean())


def test_sgpr_with_an_inducing_point_kernel_trains_and_predicts():
    x, y = _regression(300, seed=21)
    x_test, y_test = _regression(100, seed=22)
    covar = gpytorch.kernels.InducingPointKernel(
        gpytorch.kernels.ScaleKernel(MLPKernel(depth=2)),
        inducing_points=x[:25].clone(),
        likelihood=gpytorch.likelihoods.GaussianLikelihood(),
    )
    model = _ExactGP(x, y, covar).double()
    covar.likelihood = model.likelihood
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        for p in model.parameters():
            assert torch.isfinite(p.grad).all()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3
    model.eval()
    with torch.no_grad():
        prediction = model(x_test)
    assert float(((prediction.mean - y_test) ** 2).mean()) < 0.3 * float(((y_test - y.mean()) ** 2).mean())
    assert (prediction.variance > 0).all()
