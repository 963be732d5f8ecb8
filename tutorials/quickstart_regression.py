#!/usr/bin/env python3
"""Quickstart: Gaussian process regression with infinite-width network kernels.

This tutorial fits the same exact GP regression model to a small noisy 1-D
problem with three kernels:

* the NNGP kernel of an infinitely wide 3-hidden-layer ReLU network
  (``gpytorch_tp.MLPKernel(depth=3, nonlinearity="relu", kind="nngp")``),
* the neural tangent kernel of that network (``kind="ntk"``),
* GPyTorch's RBF kernel, for reference,

plots each posterior (mean +- 2 standard deviations), and then looks at the
NNGP kernel itself: how the covariance of two inputs depends on the angle
between them, and how deeper networks change it, for ReLU and erf.

Run it from the repository root::

    python tutorials/quickstart_regression.py            # figures in docs/figures/
    python tutorials/quickstart_regression.py --smoke    # a few seconds, for the tests

It needs matplotlib (``pip install -e ".[tutorials]"``).  The ``# %%`` markers
split the script into notebook cells (VS Code, Jupytext).
"""

# %% [markdown]
# ## Setup
#
# As in BoTorch, we work in float64: GP marginal likelihoods involve Cholesky
# factorisations that are much more robust in double precision.

# %%
from __future__ import annotations

import argparse
import math
from pathlib import Path

import gpytorch
import matplotlib
import torch

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

from gpytorch_tp import MLPKernel

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"


# %% [markdown]
# ## Data
#
# A smooth function with a trend, observed with noise on two separate
# intervals; the gap between them and the range beyond them show how each
# kernel interpolates and extrapolates.


# %%
def true_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.5 * x) + 0.4 * x


def make_data(n: int, seed: int = 0, noise_sd: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy observations on [-3, -0.5] and [1, 2.5]; inputs have shape (n, 1)."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.rand(n - n // 3, generator=generator, dtype=DTYPE) * 2.5 - 3.0
    right = torch.rand(n // 3, generator=generator, dtype=DTYPE) * 1.5 + 1.0
    x = torch.cat([left, right]).sort().values.unsqueeze(-1)
    y = true_function(x).squeeze(-1) + noise_sd * torch.randn(n, generator=generator, dtype=DTYPE)
    return x, y


# %% [markdown]
# ## Model and fitting
#
# An ordinary GPyTorch exact GP: constant mean, a `ScaleKernel` around the base
# kernel, Gaussian noise.  The MLP kernels are plain GPyTorch kernels, so
# nothing else changes.  Their hyperparameters are the weight and bias
# variances of every layer; together with the output scale and the noise they
# are fitted by maximising the exact marginal log likelihood (L-BFGS).
#
# One choice matters here: the starting bias variance.  With a 1-D input, the
# first layer's pre-activations are $\sigma_w w x + \sigma_b b$, so the ReLU
# kinks of the random network sit at $x = -\sigma_b b / (\sigma_w w)$: the bias
# variance sets over what range of $x$ the network can bend.  From the default
# $\sigma_b^2 = 0.1$ the kinks crowd around 0, and on this problem the NNGP fit
# stalls in a poor local optimum that explains the data as noise.  Starting at
# $\sigma_b^2 = 1$ (for both MLP kernels, to keep them comparable) avoids that.


# %%
class ExactGPModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, base_kernel):
        super().__init__(train_x, train_y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(base_kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def base_kernels() -> dict[str, gpytorch.kernels.Kernel]:
    return {
        "MLP NNGP (ReLU, depth 3)": MLPKernel(depth=3, nonlinearity="relu", kind="nngp", bias_variance=1.0),
        "MLP NTK (ReLU, depth 3)": MLPKernel(depth=3, nonlinearity="relu", kind="ntk", bias_variance=1.0),
        "RBF": gpytorch.kernels.RBFKernel(),
    }


def fit(model: ExactGPModel, iterations: int) -> float:
    """Maximise the marginal log likelihood; returns its final value per data point."""
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")
    x, y = model.train_inputs[0], model.train_targets

    def closure():
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return mll(model(x), y).item()


def posterior(model: ExactGPModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the latent function at ``x``."""
    model.eval()
    with torch.no_grad():
        f = model(x)
        return f.mean, f.variance.sqrt()


# %% [markdown]
# ## Figure 1: the three posteriors
#
# All three interpolate the data.  They differ away from it: the RBF kernel is
# stationary, so its posterior reverts to the constant mean with a bounded
# variance.  The ReLU network kernels are not stationary -- the prior variance
# $k(x, x)$ grows like $x^2$ and a ReLU network is piecewise linear -- so they
# extrapolate roughly linearly, with uncertainty that keeps growing.


# %%
def plot_posteriors(fits: dict, train_x, train_y, test_x) -> plt.Figure:
    fig, axes = plt.subplots(1, len(fits), figsize=(4.2 * len(fits), 3.4), sharey=True, constrained_layout=True)
    grid = test_x.squeeze(-1)
    for ax, (name, (mean, sd, mll)) in zip(axes, fits.items()):
        ax.fill_between(grid, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.25, lw=0, label="mean ± 2 sd")
        ax.plot(grid, mean, color="C0", lw=2, label="posterior mean")
        ax.plot(grid, true_function(test_x).squeeze(-1), "k--", lw=1, label="true function")
        ax.plot(train_x.squeeze(-1), train_y, "o", ms=3.5, color="C3", label="observations")
        ax.set_title(f"{name}\nlog marginal likelihood / n = {mll:.3f}", fontsize=10)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("f(x)")
    axes[0].set_ylim(-5, 5)
    axes[0].legend(loc="upper left", fontsize=8)
    return fig


# %% [markdown]
# ## Figure 2: the NNGP kernel as a function of the angle between inputs
#
# Two inputs of equal norm at angle $\theta$: after the first layer their
# pre-activations have correlation $\cos\theta$ (up to the bias term); each
# further layer maps the correlation through the nonlinearity's kernel.  We
# plot $k(x, x') / k(x, x)$ -- for inputs of equal norm, the correlation of the
# network outputs -- against $\theta$ for increasing depth.  With the default
# hyperparameters (ReLU: $\sigma_w^2 = 2$; erf: $\sigma_w^2 = 1$;
# $\sigma_b^2 = 0.1$) deeper networks correlate every pair of inputs more
# strongly: the kernel flattens towards a constant, so very deep networks
# distinguish inputs less and less.


# %%
def correlation_vs_angle(nonlinearity: str, depth: int, angles: torch.Tensor) -> torch.Tensor:
    """``k(x, x') / k(x, x)`` for ``|x| = |x'|`` at the given angles (2-D inputs of unit variance)."""
    kernel = MLPKernel(depth=depth, nonlinearity=nonlinearity, kind="nngp").to(DTYPE)
    x = torch.tensor([[math.sqrt(2.0), 0.0]], dtype=DTYPE)  # <x, x>/d = 1
    others = math.sqrt(2.0) * torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    with torch.no_grad():
        k = kernel(x, others).to_dense().squeeze(0)
        return k / kernel(x, diag=True)


def plot_kernel_vs_depth(depths: list[int], num_angles: int) -> plt.Figure:
    angles = torch.linspace(0, math.pi, num_angles, dtype=DTYPE)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True, constrained_layout=True)
    colors = plt.cm.viridis(torch.linspace(0, 0.9, len(depths)).tolist())
    for ax, nonlinearity in zip(axes, ["relu", "erf"]):
        for color, depth in zip(colors, depths):
            corr = correlation_vs_angle(nonlinearity, depth, angles)
            ax.plot(angles, corr, color=color, lw=2, label=f"depth {depth}")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_title(f"NNGP kernel, {nonlinearity}", fontsize=11)
        ax.set_xlabel(r"angle $\theta$ between $x$ and $x'$")
        ax.set_xticks([0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi])
        ax.set_xticklabels(["0", "π/4", "π/2", "3π/4", "π"])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r"$k(x, x') \,/\, k(x, x)$")
    axes[1].legend(fontsize=8, loc="lower left")
    return fig


# %% [markdown]
# ## Putting it together


# %%
def main(argv: list[str] | None = None, figure_dir: Path | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description="Quickstart regression with MLP NNGP/NTK kernels.")
    parser.add_argument("--smoke", action="store_true", help="tiny problem and few iterations (for tests)")
    parser.add_argument("--outdir", type=Path, default=figure_dir or FIGURE_DIR, help="where to save the figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    n, iterations, num_angles = (12, 2, 9) if args.smoke else (40, 50, 121)
    depths = [1, 3] if args.smoke else [1, 2, 3, 5, 10, 20]
    train_x, train_y = make_data(n, seed=args.seed)
    test_x = torch.linspace(-4.5, 4.5, 60 if args.smoke else 300, dtype=DTYPE).unsqueeze(-1)

    fits = {}
    for name, kernel in base_kernels().items():
        model = ExactGPModel(train_x, train_y, kernel).to(DTYPE)
        mll = fit(model, iterations)
        mean, sd = posterior(model, test_x)
        fits[name] = (mean, sd, mll)
        print(
            f"{name:26s} log marginal likelihood / n = {mll:7.3f}   noise sd = {model.likelihood.noise.sqrt().item():.3f}"
        )

    args.outdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "posteriors": args.outdir / "quickstart_posteriors.png",
        "kernel_vs_depth": args.outdir / "nngp_kernel_vs_depth.png",
    }
    for key, fig in (
        ("posteriors", plot_posteriors(fits, train_x, train_y, test_x)),
        ("kernel_vs_depth", plot_kernel_vs_depth(depths, num_angles)),
    ):
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)
        print(f"saved {paths[key]}")
    return paths


if __name__ == "__main__":
    main()
