"""The kernels as BoTorch users use them: SingleTaskGP covar_module, fitting, q-batch posteriors."""

from __future__ import annotations

import pytest
import torch

botorch = pytest.importorskip("botorch")

from botorch.acquisition.logei import qLogExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from botorch.optim import optimize_acqf
from gpytorch.kernels import ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood

from gpytorch_tp import MLPKernel


def _branin_like(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(3 * x[..., 0]) + (x[..., 1] - 0.5) ** 2 - 0.5 * x[..., 2]).unsqueeze(-1)


def _fitted_model(kind: str, nonlinearity: str = "relu"):
    torch.manual_seed(0)
    train_x = torch.rand(20, 3, dtype=torch.float64)
    train_y = _branin_like(train_x)
    model = SingleTaskGP(
        train_x,
        train_y,
        covar_module=ScaleKernel(MLPKernel(depth=2, nonlinearity=nonlinearity, kind=kind)),
        input_transform=Normalize(d=3),
        outcome_transform=Standardize(m=1),
    )
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model, train_x, train_y


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_single_task_gp_fits_and_predicts_q_batches(kind):
    model, train_x, train_y = _fitted_model(kind)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    # The fitted model explains the data (not a flat model).
    with torch.no_grad():
        mean = model.posterior(train_x).mean
    assert (mean - train_y).pow(2).mean() < 0.1 * train_y.var()
    b, q = 4, 3
    test_x = torch.rand(b, q, 3, dtype=torch.float64)
    posterior = model.posterior(test_x)
    assert posterior.mean.shape == (b, q, 1)
    assert posterior.variance.shape == (b, q, 1)
    assert (posterior.variance > 0).all()
    # Each q-batch's joint posterior equals the un-batched one.
    single = model.posterior(test_x[1])
    assert torch.allclose(posterior.mean[1], single.mean, atol=1e-8)


def test_optimize_log_ei_with_input_gradients():
    model, train_x, train_y = _fitted_model("ntk")
    acqf = qLogExpectedImprovement(model, best_f=train_y.max())
    bounds = torch.stack([torch.zeros(3), torch.ones(3)]).double()
    candidates, value = optimize_acqf(acqf, bounds=bounds, q=2, num_restarts=2, raw_samples=32)
    assert candidates.shape == (2, 3)
    assert torch.isfinite(value)
    # Gradient w.r.t. inputs, including at a training point (correlation exactly 1).
    x = torch.cat([train_x[:1], torch.rand(1, 3, dtype=torch.float64)]).unsqueeze(0).requires_grad_(True)
    (grad,) = torch.autograd.grad(acqf(x).sum(), x)
    assert torch.isfinite(grad).all()


def test_fantasize_shapes():
    model, _, _ = _fitted_model("nngp", nonlinearity="erf")
    from botorch.sampling import SobolQMCNormalSampler

    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([5]))
    fantasy = model.fantasize(torch.rand(2, 1, 3, dtype=torch.float64), sampler=sampler)
    test_x = torch.rand(2, 4, 3, dtype=torch.float64)
    posterior = fantasy.posterior(test_x)
    assert posterior.mean.shape == (5, 2, 4, 1)
    assert torch.isfinite(posterior.variance).all()


def test_batched_multi_output_model():
    torch.manual_seed(1)
    train_x = torch.rand(15, 3, dtype=torch.float64)
    train_y = torch.cat([_branin_like(train_x), -(_branin_like(train_x) ** 2)], dim=-1)
    model = SingleTaskGP(
        train_x,
        train_y,
        covar_module=ScaleKernel(
            MLPKernel(depth=2, kind="ntk", batch_shape=torch.Size([2])), batch_shape=torch.Size([2])
        ),
        input_transform=Normalize(d=3),
        outcome_transform=Standardize(m=2),
    )
    # A capped L-BFGS budget keeps the test fast; the shapes are what is tested here.
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model), optimizer_kwargs={"options": {"maxiter": 30}})
    posterior = model.posterior(torch.rand(3, 2, 3, dtype=torch.float64))
    assert posterior.mean.shape == (3, 2, 2)
    assert torch.isfinite(posterior.variance).all()
