"""The BoTorch recipe helper (issue 21, item 6) and the benchmark's shifted boxes (item 7)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from gpytorch.kernels import ScaleKernel
from gpytorch.priors import LogNormalPrior

from gpytorch_tp import MLPKernel, bo_covar_module, bo_input_transform, bo_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_covar_module_is_a_normalised_kernel_with_the_outputscale_prior(kind, dtype):
    covar = bo_covar_module(kind, depth=2)
    assert isinstance(covar, ScaleKernel) and isinstance(covar.base_kernel, MLPKernel)
    assert covar.base_kernel.normalize and covar.base_kernel.kind == kind
    prior = covar.outputscale_prior
    assert isinstance(prior, LogNormalPrior)
    assert float(prior.loc) == 0.0 and float(prior.scale) == 1.0
    assert covar.raw_outputscale_constraint.lower_bound.item() == pytest.approx(1e-4)
    # Normalised: unit diagonal at any scale of the inputs, so the outputscale is the signal variance.
    x = 7.0 * torch.randn(6, 5, dtype=dtype)
    base = covar.base_kernel.to(dtype)
    diag = base(x, diag=True)
    assert diag.dtype == dtype
    torch.testing.assert_close(diag, torch.ones(6, dtype=dtype))
    dense = base(x).to_dense()
    torch.testing.assert_close(dense.diagonal(), torch.ones(6, dtype=dtype))
    assert (dense.abs() <= 1 + 10 * torch.finfo(dtype).eps).all()


def test_covar_module_without_prior_and_refusing_raw_kernel():
    plain = bo_covar_module(outputscale_prior=False)
    assert not any(name == "outputscale_prior" for name, *_ in plain.named_priors())
    with pytest.raises(TypeError, match="normalize=True"):
        bo_covar_module(normalize=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_transform_centres_the_box_on_the_origin(dtype):
    pytest.importorskip("botorch")
    from botorch.models.transforms import Normalize

    bounds = torch.tensor([[-5.0, 0.0, 2.0], [10.0, 1.0, 3.0]], dtype=dtype)
    transform = bo_input_transform(bounds)
    assert isinstance(transform, Normalize)
    transform.eval()
    x = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(7, 3, dtype=dtype)
    # Independent reference: the box's centre to 0, each side to length 1.
    expected = (x - bounds.mean(0)) / (bounds[1] - bounds[0])
    torch.testing.assert_close(transform(x), expected)
    corners = transform(bounds)
    torch.testing.assert_close(corners, torch.tensor([[-0.5] * 3, [0.5] * 3], dtype=dtype))


def test_input_transform_can_put_the_origin_on_any_point():
    pytest.importorskip("botorch")
    bounds = torch.tensor([[0.0, -2.0], [1.0, 2.0]], dtype=torch.float64)
    origin = torch.tensor([0.9, -1.5], dtype=torch.float64)
    transform = bo_input_transform(bounds, origin=origin)
    transform.eval()
    x = torch.rand(5, 2, dtype=torch.float64)
    torch.testing.assert_close(transform(x), (x - origin) / torch.tensor([1.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(transform(origin[None]), torch.zeros(1, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        (torch.zeros(3, 2), r"shape \(2, d\)"),
        (torch.zeros(2), r"shape \(2, d\)"),
        (torch.zeros(2, 0), r"shape \(2, d\)"),
        (torch.tensor([[0.0, 1.0], [1.0, 1.0]]), r"lower < upper .*dimension\(s\) \[1\]"),
        (torch.tensor([[0.0, 2.0], [1.0, 1.0]]), r"lower < upper"),
        (torch.tensor([[0.0, 0.0], [1.0, float("inf")]]), "finite"),
    ],
)
def test_bad_bounds_are_refused_with_a_clear_error(bounds, message):
    pytest.importorskip("botorch")
    with pytest.raises(ValueError, match=message):
        bo_input_transform(bounds)
    with pytest.raises(ValueError, match=message):
        bo_recipe(bounds)


def test_bad_origin_and_outputs_are_refused():
    pytest.importorskip("botorch")
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"origin must be one point of shape \(2,\)"):
        bo_input_transform(bounds, origin=torch.zeros(3))
    with pytest.raises(ValueError, match="origin must be finite"):
        bo_input_transform(bounds, origin=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="num_outputs"):
        bo_recipe(bounds, num_outputs=0)


def test_missing_botorch_gives_an_install_hint(monkeypatch):
    # None in sys.modules makes the import fail as if BoTorch were not installed.
    monkeypatch.setitem(sys.modules, "botorch.models.transforms", None)
    with pytest.raises(ImportError, match=r"pip install 'gpytorch-tp\[botorch\]'"):
        bo_input_transform(torch.tensor([[0.0], [1.0]]))
    # The kernel alone needs no BoTorch.
    assert isinstance(bo_covar_module(), ScaleKernel)


def _fit_hartmann6(seed: int, n: int, **model_kwargs):
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.test_functions import Hartmann
    from gpytorch.mlls import ExactMarginalLogLikelihood
    from torch.quasirandom import SobolEngine

    torch.manual_seed(0)
    problem = Hartmann(dim=6, negate=True)
    train_x = SobolEngine(6, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    train_y = problem(train_x).unsqueeze(-1)
    model = SingleTaskGP(train_x, train_y, **model_kwargs)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    model.eval()
    with torch.no_grad():
        fitted = model.posterior(train_x).mean
    # A collapsed fit explains the data as noise: a flat posterior mean, a large noise.
    explained = (1 - (fitted - train_y).pow(2).sum() / (train_y - train_y.mean()).pow(2).sum()).item()
    return explained, model.likelihood.noise.item(), model


def test_single_task_gp_with_the_recipe_fits_hartmann6_without_collapse():
    pytest.importorskip("botorch")
    from botorch.models.transforms import Normalize

    bounds = torch.tensor([[0.0] * 6, [1.0] * 6], dtype=torch.float64)
    naive_collapses = 0
    # Two Sobol samples of N = 60 (a one-off check over seeds 0-2 and N = 30, 40, 60 found
    # the recipe's NTK sound on all nine, its NNGP partly collapsed on two of the N <= 40 ones).
    for seed in (1, 2):
        for kind in ("nngp", "ntk"):
            explained, noise, model = _fit_hartmann6(seed, 60, **bo_recipe(bounds, kind=kind))
            assert explained > 0.9 and noise < 0.1, (seed, kind, explained, noise)
            assert model.covar_module.outputscale.item() > 1e-2
        # The configuration the recipe replaces (raw kernel, unit cube) on the same data:
        # it collapses on some of these samples, which is why the recipe exists.
        explained, noise, _ = _fit_hartmann6(
            seed, 60, covar_module=ScaleKernel(MLPKernel(depth=3)), input_transform=Normalize(6, bounds=bounds)
        )
        naive_collapses += explained < 0.9 or noise > 0.1
    assert naive_collapses >= 1


@pytest.fixture(scope="module")
def benchmark():
    pytest.importorskip("botorch")
    path = ROOT / "benchmarks" / "bayesian_optimisation.py"
    spec = importlib.util.spec_from_file_location("bayesian_optimisation_benchmark_boxes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("problem_name", ["hartmann6", "ackley20", "levy10", "rosenbrock8"])
def test_benchmark_shifted_boxes_keep_the_optimum_inside_and_off_centre(benchmark, problem_name):
    standard = benchmark.make_problem(problem_name, seed=0, shift=0)
    side = standard.bounds[1] - standard.bounds[0]
    seen = []
    for seed in range(2):
        for shift in (1, 2):
            problem = benchmark.make_problem(problem_name, seed, shift)
            # The same function on a moved box of the same size.
            torch.testing.assert_close(problem.bounds[1] - problem.bounds[0], side)
            moved = problem.bounds[0] - standard.bounds[0]
            assert moved.abs().max() > 0.01 * side.max()
            assert (moved.abs() <= benchmark.SHIFT_FRACTION * side + 1e-12).all()
            seen.append(moved)
            # The known optimiser stays inside with the margin, so the known optimum is the box's.
            x_star = torch.tensor(problem._optimizers, dtype=problem.bounds.dtype)
            margin = benchmark.OPTIMUM_MARGIN * side - 1e-9
            assert ((x_star - problem.bounds[0]) >= margin).all() and ((problem.bounds[1] - x_star) >= margin).all()
            assert problem(x_star).max().item() == pytest.approx(float(problem.optimal_value), abs=1e-5)
            # Deterministic: every kernel of a seed gets the same box.
            torch.testing.assert_close(benchmark.make_problem(problem_name, seed, shift).bounds, problem.bounds)
    # Different shifts and seeds give different boxes.
    assert all((a - b).abs().max() > 1e-6 for i, a in enumerate(seen) for b in seen[i + 1 :])


# -- the learned input offset (issue 21, item 7) ------------------------------------------


def test_shifted_kernel_equals_the_base_kernel_on_shifted_inputs():
    from gpytorch.kernels import LinearKernel, RBFKernel

    from gpytorch_tp.botorch_recipe import ShiftedKernel

    torch.manual_seed(0)
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    o = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    # Independent reference: the linear kernel by hand, (x - o) . (x' - o).
    linear = ShiftedKernel(LinearKernel(), 3).double()
    linear.offset = o
    torch.testing.assert_close(linear(x1, x2).to_dense(), (x1 - o) @ (x2 - o).T * linear.base_kernel.variance)
    # A stationary kernel does not see the shift at all.
    rbf = ShiftedKernel(RBFKernel(), 3).double()
    rbf.offset = o
    torch.testing.assert_close(rbf(x1, x2).to_dense(), RBFKernel().double()(x1, x2).to_dense())
    # The MLP kernel (not shift invariant): equal to the base on x - o, different from it on x.
    for dtype in (torch.float32, torch.float64):
        base = MLPKernel(3, "relu", "ntk", normalize=True).to(dtype)
        shifted = ShiftedKernel(base, 3).to(dtype)
        assert torch.count_nonzero(shifted.offset) == 0  # initialised at the box's centre
        shifted.offset = o.to(dtype)
        a, b, oo = x1.to(dtype), x2.to(dtype), o.to(dtype)
        got = shifted(a, b).to_dense()
        assert got.dtype == dtype
        torch.testing.assert_close(got, base(a - oo, b - oo).to_dense())
        torch.testing.assert_close(shifted(a, diag=True), base(a - oo, diag=True))
        assert (got - base(a, b).to_dense()).abs().max() > 1e-3


def test_shifted_kernel_offset_gradient_matches_finite_differences():
    from gpytorch_tp.botorch_recipe import ShiftedKernel

    torch.manual_seed(1)
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    kernel = ShiftedKernel(MLPKernel(2, "relu", "nngp", normalize=True), 3).double()

    def of_offset(o):
        kernel.raw_offset.data.zero_()
        return kernel.base_kernel(x1 - o, x2 - o).to_dense()

    o = torch.tensor([[0.2, -0.1, 0.05]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(of_offset, (o,))
    # The gradient reaching the registered parameter is finite and equals the same finite differences.
    kernel.offset = o.detach()
    kernel(x1, x2).to_dense().sum().backward()
    grad = kernel.raw_offset.grad
    assert torch.isfinite(grad).all()
    eps, numeric = 1e-6, torch.zeros(3, dtype=torch.float64)
    for j in range(3):
        step = torch.zeros(1, 3, dtype=torch.float64)
        step[0, j] = eps
        with torch.no_grad():
            hi = kernel.base_kernel(x1 - (o + step), x2 - (o + step)).to_dense().sum()
            lo = kernel.base_kernel(x1 - (o - step), x2 - (o - step)).to_dense().sum()
        numeric[j] = (hi - lo) / (2 * eps)
    torch.testing.assert_close(grad.flatten(), numeric, rtol=1e-5, atol=1e-7)


def test_shifted_kernel_registers_its_prior_and_handles_batches():
    from gpytorch.priors import NormalPrior

    from gpytorch_tp.botorch_recipe import ShiftedKernel

    kernel = ShiftedKernel(MLPKernel(2, "relu", "nngp", normalize=True), 2).double()
    priors = {name: (prior, closure) for name, _, prior, closure, _ in kernel.named_priors()}
    assert set(priors) == {"offset_prior"}
    prior, closure = priors["offset_prior"]
    assert isinstance(prior, NormalPrior) and float(prior.scale) == 0.25 and float(prior.loc) == 0.0
    kernel.offset = torch.tensor([0.5, -0.25], dtype=torch.float64)
    # Gaussian log density by hand, summed over the coordinates.
    expected = sum(-0.5 * (v / 0.25) ** 2 - math.log(0.25 * math.sqrt(2 * math.pi)) for v in (0.5, -0.25))
    assert prior.log_prob(closure(kernel)).sum().item() == pytest.approx(expected, rel=1e-12)
    assert not list(ShiftedKernel(MLPKernel(2), 2, offset_prior=None).named_priors())

    # One offset per batch member: each member is its own shifted kernel.
    batched = ShiftedKernel(MLPKernel(2, "relu", "ntk", normalize=True, batch_shape=torch.Size([2])), 3).double()
    assert batched.raw_offset.shape == (2, 1, 3)
    offsets = torch.tensor([[[0.1, 0.2, 0.3]], [[-0.3, 0.0, 0.2]]], dtype=torch.float64)
    batched.offset = offsets
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    got = batched(x).to_dense()
    assert got.shape == (2, 4, 4)
    single = MLPKernel(2, "relu", "ntk", normalize=True).double()
    for b in range(2):
        torch.testing.assert_close(got[b], single(x[b] - offsets[b]).to_dense())


def test_shifted_kernel_and_learn_offset_refuse_bad_arguments():
    from gpytorch_tp.botorch_recipe import ShiftedKernel

    with pytest.raises(TypeError, match="base_kernel"):
        ShiftedKernel("rbf", 2)
    with pytest.raises(ValueError, match="dim"):
        ShiftedKernel(MLPKernel(2), 0)
    with pytest.raises(TypeError, match="offset_prior"):
        ShiftedKernel(MLPKernel(2), 2, offset_prior=0.25)
    with pytest.raises(ValueError, match="dimension 2"):
        ShiftedKernel(MLPKernel(2), 2)(torch.randn(3, 4)).to_dense()
    with pytest.raises(ValueError, match="needs dim"):
        bo_covar_module(learn_offset=True)
    with pytest.raises(ValueError, match="only used with learn_offset"):
        bo_covar_module(dim=3)


def test_recipe_with_learned_offset_moves_the_offset_towards_the_data():
    pytest.importorskip("botorch")
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    from gpytorch_tp.botorch_recipe import ShiftedKernel

    torch.manual_seed(0)
    bounds = torch.tensor([[0.0, 0.0], [4.0, 4.0]], dtype=torch.float64)
    x = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(24, 2, dtype=torch.float64)
    # A bowl centred off the box's centre (at (3, 1), centred coordinates (1/4, -1/4)).
    y = -((x - torch.tensor([3.0, 1.0], dtype=torch.float64)) ** 2).sum(-1, keepdim=True)
    model = SingleTaskGP(x, y, **bo_recipe(bounds, learn_offset=True))
    assert isinstance(model.covar_module.base_kernel, ShiftedKernel)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    offset = model.covar_module.base_kernel.offset.detach().flatten()
    assert torch.isfinite(offset).all() and offset.abs().max() > 1e-3  # fitted, not left at 0
