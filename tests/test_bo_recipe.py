"""The BoTorch recipe helper (issue 21, item 6) and the benchmark's shifted boxes (item 7)."""

from __future__ import annotations

import importlib.util
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
