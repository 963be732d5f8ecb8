#!/usr/bin/env python3
"""Bayesian optimisation with BoTorch and an infinite-width network kernel.

BoTorch's ``SingleTaskGP`` takes any GPyTorch kernel as its ``covar_module``.
This tutorial runs a closed Bayesian-optimisation loop on the Branin function
(2-D, three global minima, negated here so that BO maximises it) with

* the NNGP kernel of an infinitely wide 3-hidden-layer ReLU network:
  ``ScaleKernel(MLPKernel(3, "relu", normalize=True))`` with a log-normal prior
  on the outputscale, on inputs centred on the origin,
* ``SingleTaskGP``'s default kernel (RBF with a dimension-scaled lengthscale
  prior), for reference,

and plots the best value found so far against the number of evaluations.

Two details make the network kernel work in BO (``docs/benchmarks.md`` has the
measurements behind them):

* **Centred inputs.**  The kernel sees its inputs through inner products, so
  the origin is special.  ``Normalize(d, center=0.0)`` maps the search box to
  ``[-1/2, 1/2]^d`` around it; on BoTorch's usual unit cube all points lie in
  one orthant and the kernel correlates all of them strongly.
* **A normalised kernel inside a ScaleKernel.**  ``normalize=True`` makes the
  kernel a correlation (unit diagonal) and fixes the weight variances that only
  rescale it, so the outputscale alone carries the scale -- the prior variance
  of ``f(x)`` in standardised units, which a ``LogNormalPrior(0, 1)`` describes
  well and which no fit can trade against the network's weight variances.

Run it from the repository root::

    python tutorials/bayesian_optimisation.py            # about 3 CPU minutes; figure in docs/figures/
    python tutorials/bayesian_optimisation.py --smoke    # a few seconds, for the tests

It needs BoTorch and matplotlib (``pip install -e ".[botorch,tutorials]"``).
The ``# %%`` markers split the script into notebook cells (VS Code, Jupytext).
"""

# %% [markdown]
# ## Setup
#
# BoTorch works in float64: its GP fits rely on Cholesky factorisations that
# are far more robust in double precision.

# %%
from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import matplotlib
import torch
from botorch.acquisition.logei import qLogExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from botorch.optim import optimize_acqf
from botorch.test_functions import Branin
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.priors import LogNormalPrior
from torch.quasirandom import SobolEngine

from gpytorch_tp import MLPKernel

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"
PROBLEM = Branin(negate=True).to(DTYPE)  # maximise -branin; optimum -0.397887 at three points
BOUNDS = PROBLEM.bounds.to(DTYPE)


# %% [markdown]
# ## The two models
#
# Both standardise the outcomes (``Standardize(1)``) and normalise the inputs
# on the problem's bounds; they differ in the kernel and in where the
# normalised box sits.


# %%
def network_kernel() -> ScaleKernel:
    """The NNGP of a 3-hidden-layer ReLU network, as a correlation, times a learned outputscale."""
    return ScaleKernel(
        MLPKernel(depth=3, nonlinearity="relu", kind="nngp", normalize=True),
        # Median 1 (standardised outcomes have unit variance); the floor keeps a
        # line search away from outputscale 0, where the prior's density is undefined.
        outputscale_prior=LogNormalPrior(0.0, 1.0),
        outputscale_constraint=GreaterThan(1e-4),
    )


KERNELS = {
    # name: (covar_module factory or None for SingleTaskGP's default, Normalize's centre)
    "MLP NNGP, depth 3 (gpytorch_tp)": (network_kernel, 0.0),
    "BoTorch default (RBF)": (None, 0.5),
}


def make_model(train_x: torch.Tensor, train_y: torch.Tensor, kernel: str) -> SingleTaskGP:
    make_covar, center = KERNELS[kernel]
    extra = {} if make_covar is None else {"covar_module": make_covar()}
    return SingleTaskGP(
        train_x,
        train_y,
        input_transform=Normalize(train_x.shape[-1], bounds=BOUNDS, center=center),
        outcome_transform=Standardize(1),
        **extra,
    ).to(DTYPE)


# %% [markdown]
# ## The loop
#
# A scrambled Sobol design of 5 points (the same for both kernels of one seed),
# then per iteration: fit a fresh model by maximising its marginal likelihood
# (``fit_gpytorch_mll``), maximise the log expected improvement over the box,
# evaluate the function at the maximiser (no noise), repeat.


# %%
def initial_design(num_points: int, seed: int) -> torch.Tensor:
    unit = SobolEngine(PROBLEM.dim, scramble=True, seed=seed).draw(num_points, dtype=DTYPE)
    return BOUNDS[0] + (BOUNDS[1] - BOUNDS[0]) * unit


def run(kernel: str, seed: int, iterations: int, num_restarts: int, raw_samples: int) -> dict:
    train_x = initial_design(5, seed)
    train_y = PROBLEM(train_x).unsqueeze(-1)
    best = [train_y.max().item()]
    for iteration in range(iterations):
        torch.manual_seed(1000 * seed + iteration)  # optimize_acqf's random restarts
        model = make_model(train_x, train_y, kernel)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BoTorch's notes on input scaling and optimiser restarts
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
            acquisition = qLogExpectedImprovement(model, best_f=train_y.max())
            candidate, _ = optimize_acqf(
                acquisition, bounds=BOUNDS, q=1, num_restarts=num_restarts, raw_samples=raw_samples
            )
        train_x = torch.cat([train_x, candidate])
        train_y = torch.cat([train_y, PROBLEM(candidate).unsqueeze(-1)])
        best.append(train_y.max().item())
    return {"kernel": kernel, "seed": seed, "best": best, "x": train_x, "y": train_y}


def log10_regret(best: list[float]) -> list[float]:
    optimum = float(PROBLEM.optimal_value)
    return [math.log10(max(optimum - b, 1e-10)) for b in best]


# %% [markdown]
# ## The figure
#
# Left: ``log10`` of the regret of the best point so far (the gap to the known
# optimum), one thin line per seed and the median in bold.  Right: where the
# network kernel's first run evaluated the function, on the function's contours.


# %%
def plot(runs: list[dict]) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=[1.3, 1])
    for color, kernel in zip(("C0", "C1"), KERNELS, strict=True):
        curves = torch.tensor([log10_regret(r["best"]) for r in runs if r["kernel"] == kernel])
        steps = torch.arange(curves.shape[1])
        for curve in curves:
            left.plot(steps, curve, color=color, lw=0.7, alpha=0.4)
        # quantile, not median(): with an even number of seeds median() is the lower middle value
        left.plot(steps, curves.quantile(0.5, dim=0), color=color, lw=2.2, label=f"{kernel} (median)")
    left.set_xlabel("iteration (after 5 initial points)")
    left.set_ylabel(r"$\log_{10}$ regret of the best point so far")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    grid = torch.linspace(0, 1, 120, dtype=DTYPE)
    u, v = torch.meshgrid(grid, grid, indexing="xy")
    points = BOUNDS[0] + (BOUNDS[1] - BOUNDS[0]) * torch.stack([u, v], dim=-1)
    values = -PROBLEM(points.reshape(-1, 2)).reshape(u.shape)  # the Branin function itself
    right.contourf(points[..., 0], points[..., 1], values.log10(), levels=20, cmap="Greys")
    first = next(r for r in runs if r["kernel"] == next(iter(KERNELS)))
    x = first["x"]
    right.scatter(x[:5, 0], x[:5, 1], marker="s", s=18, color="C2", label="initial design")
    right.scatter(x[5:, 0], x[5:, 1], c=torch.arange(len(x) - 5), cmap="viridis", s=18, label="BO (light: late)")
    minima = torch.tensor([[-math.pi, 12.275], [math.pi, 2.275], [9.42478, 2.475]])
    right.scatter(minima[:, 0], minima[:, 1], marker="*", s=90, color="C3", label="global minima")
    right.set_title(f"evaluations, network kernel, seed {first['seed']}", fontsize=9)
    right.set_xlabel("$x_1$")
    right.set_ylabel("$x_2$")
    right.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


# %% [markdown]
# ## Putting it together


# %%
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Bayesian optimisation of Branin with an MLP NNGP kernel.")
    parser.add_argument("--smoke", action="store_true", help="one seed, one iteration (for tests)")
    parser.add_argument("--out", type=Path, default=FIGURE_DIR, help="directory for the figure")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 4; 1 with --smoke)")
    args = parser.parse_args(argv)

    seeds = args.seeds or (1 if args.smoke else 4)
    iterations, num_restarts, raw_samples = (1, 2, 16) if args.smoke else (15, 4, 128)

    runs = []
    # Small matrices: one thread is fastest (and kind to a shared machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in range(seeds):
            for kernel in KERNELS:
                start = time.process_time()
                result = run(kernel, seed, iterations, num_restarts, raw_samples)
                runs.append(result)
                regret = log10_regret(result["best"])
                print(
                    f"seed {seed}  {kernel:32s} log10 regret {regret[0]:6.2f} -> {regret[-1]:6.2f}"
                    f"   ({time.process_time() - start:.1f} s CPU)"
                )
    finally:
        torch.set_num_threads(threads)
    for kernel in KERNELS:
        final = torch.tensor([log10_regret(r["best"])[-1] for r in runs if r["kernel"] == kernel])
        print(f"{kernel:32s} median final log10 regret over {seeds} seeds: {final.quantile(0.5).item():.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bo_tutorial_branin.png"
    fig = plot(runs)
    fig.savefig(path, dpi=50 if args.smoke else 110)
    plt.close(fig)
    print(f"saved {path}")
    return {"runs": runs, "figure": path, "iterations": iterations}


if __name__ == "__main__":
    main()
