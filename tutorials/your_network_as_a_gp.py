#!/usr/bin/env python3
"""Your network as a GP: the NNGP and NTK kernels of a PyTorch model you already have.

This tutorial takes a small PyTorch regression model, written the usual way
(``nn.Linear`` layers, a residual connection in ``forward``, PyTorch's default
initialisation), and

1. turns it into its infinite-width kernels with
   :func:`gpytorch_tp.conversion.kernel_from_module` (NNGP and NTK), and checks
   the NNGP against the Monte Carlo kernel of the model itself
   (:class:`gpytorch_tp.kernels.MonteCarloKernel`: output covariance over random
   initialisations of the real module at a large width);
2. fits an exact GP with the NNGP kernel (the Bayesian posterior of the
   infinitely wide model);
3. trains an ensemble of finite copies of the model by gradient descent and
   compares it with :class:`gpytorch_tp.TrainedNetworkGP`, the exact
   distribution of the infinitely wide model after the same training.  The
   model is written in the standard parameterisation, so to follow the NTK the
   copies are trained with one learning rate per tensor, proportional to its
   initial variance (:func:`gpytorch_tp.conversion.ntk_parameter_scales`; see
   ``docs/from_module.md``).

Run it from the repository root::

    python tutorials/your_network_as_a_gp.py            # figure in docs/figures/ (about 5 CPU minutes)
    python tutorials/your_network_as_a_gp.py --smoke    # seconds, for the tests

It needs matplotlib (``pip install -e ".[tutorials]"``).  The ``# %%`` markers
split the script into notebook cells.
"""

# %%
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import gpytorch
import matplotlib
import torch
import torch.nn.functional as F
from torch import nn

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

from gpytorch_tp import TrainedNetworkGP
from gpytorch_tp.conversion import kernel_from_module, ntk_parameter_scales
from gpytorch_tp.kernels import MonteCarloKernel

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"


# %% [markdown]
# ## The model
#
# An ordinary PyTorch module: a residual block written in ``forward``, GELU
# and ReLU, default initialisation.  Its width is an argument; the kernels do
# not depend on it (they are the infinite-width limit).


# %%
class TinyNet(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.embed = nn.Linear(1, width)
        self.block = nn.Linear(width, width)
        self.readout = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.block(F.gelu(h))
        return self.readout(F.relu(h))


# %% [markdown]
# ## Data
#
# A noisy 1-D function observed on two intervals.


# %%
def true_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * x) + 0.3 * x


def make_data(n: int, seed: int = 0, noise_sd: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    left = torch.rand(n - n // 3, generator=generator, dtype=DTYPE) * 2.0 - 2.5
    right = torch.rand(n // 3, generator=generator, dtype=DTYPE) * 1.5 + 0.5
    x = torch.cat([left, right]).sort().values.unsqueeze(-1)
    y = true_function(x).squeeze(-1) + noise_sd * torch.randn(n, generator=generator, dtype=DTYPE)
    return x, y


# %% [markdown]
# ## 1. The kernels of the model
#
# ``kernel_from_module`` traces the module with ``torch.fx`` and maps every
# layer onto its infinite-width counterpart, with the variances of PyTorch's
# default initialisation (weights: 1/3 per fan-in; biases: 1/(3 fan-in) for
# the first layer, vanishing for the others at infinite width).  The Monte
# Carlo kernel of the real module at a large width is the check.  (A
# ``Linear -> BatchNorm1d -> ReLU`` network converts too, given reference points:
# ``kernel_from_module(net, reference_points=R)``; see ``docs/from_module.md``.)


# %%
def kernel_check(grid: torch.Tensor, width: int, samples: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    exact = kernel_from_module(TinyNet(), "nngp").double()(grid).to_dense().detach()

    def wide_readout_net() -> nn.Module:  # `width` i.i.d. outputs per network: less sampling noise
        net = TinyNet(width)
        net.readout = nn.Linear(width, width)
        return net

    with torch.no_grad():
        estimate = MonteCarloKernel(wide_readout_net, "nngp", n_samples=samples)(grid).to_dense()
    error = ((estimate - exact).norm() / exact.norm()).item()
    return exact, estimate, error


# %% [markdown]
# ## 2. An exact GP with the NNGP kernel
#
# The kernel's hyperparameters (each layer's weight and bias variance) start at
# the module's initialisation and are learned with an output scale and the
# noise, by marginal likelihood.


# %%
class ExactGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, covar):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(covar)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def fit_gp(x, y, iterations: int) -> ExactGP:
    model = ExactGP(x, y, kernel_from_module(TinyNet(), "nngp")).double()
    # PyTorch's default initialisation gives small outputs (weight variance 1/3 per fan-in): start the
    # output scale near the data's variance over the kernel's, and the noise small.
    with torch.no_grad():
        prior_variance = model.covar_module.base_kernel(x, diag=True).mean()
    model.covar_module.outputscale = float(y.var() / prior_variance)
    model.likelihood.noise = 0.01
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(iterations):
        optimizer.zero_grad()
        (-mll(model(x), y)).backward()
        optimizer.step()
    model.eval()
    return model


# %% [markdown]
# ## 3. Trained finite models versus the trained infinite model
#
# Each copy of the model is trained by full-batch gradient descent on
# ``L = 1/2 sum_i (f(x_i) - y_i)^2`` with one learning rate per tensor,
# ``eta * s_p``: ``s_p`` is the tensor's initial variance
# (``ntk_parameter_scales``), which is what gradient descent on the NTK
# parameterisation of the same network does.  Tensors whose variance vanishes
# at infinite width (hidden biases) get ``s_p = 0``.  ``TrainedNetworkGP``
# gives the distribution of the infinitely wide model after the same number of
# steps.  Between the data the two agree closely; far outside it the finite
# networks still deviate at width 512, by less as the width grows (RMS gap over
# the plotted range, 4 networks, 300 steps: 0.31 at width 128, 0.14 at 512).


# %%
def train_ensemble(x, y, grid, width, members, steps, learning_rate, seed=0) -> torch.Tensor:
    """Predictions on ``grid`` of ``members`` trained copies, ``(members, len(grid))``."""
    scales = ntk_parameter_scales(TinyNet(width))  # variance / fan-in: depends on the width
    predictions = []
    for member in range(members):
        torch.manual_seed(seed + member)
        net = TinyNet(width).double()
        groups = [{"params": [p], "lr": learning_rate * scales[name]} for name, p in net.named_parameters()]
        optimizer = torch.optim.SGD(groups, lr=learning_rate)
        for _ in range(steps):
            optimizer.zero_grad()
            (0.5 * (net(x).squeeze(-1) - y).pow(2).sum()).backward()
            optimizer.step()
        with torch.no_grad():
            predictions.append(net(grid).squeeze(-1))
    return torch.stack(predictions)


# %%
@dataclass
class Config:
    n_train: int
    grid_points: int
    check_width: int
    check_samples: int
    gp_iterations: int
    width: int
    members: int
    steps: int


SMOKE = Config(
    n_train=12, grid_points=40, check_width=256, check_samples=4, gp_iterations=5, width=128, members=4, steps=40
)
FULL = Config(
    n_train=30,
    grid_points=200,
    check_width=2048,
    check_samples=16,
    gp_iterations=100,
    width=512,
    members=16,
    steps=300,
)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--outdir", type=Path, default=FIGURE_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke else FULL
    torch.manual_seed(args.seed)
    x, y = make_data(config.n_train, seed=args.seed)
    grid = torch.linspace(-3.5, 3.0, config.grid_points, dtype=DTYPE).unsqueeze(-1)

    # 1. The kernel of the module, and the Monte Carlo check.
    row = torch.linspace(-3, 3, 25, dtype=DTYPE).unsqueeze(-1)
    exact, estimate, error = kernel_check(row, config.check_width, config.check_samples)
    print(f"NNGP of TinyNet vs Monte Carlo of the real module (width {config.check_width}): relative error {error:.3f}")

    # 2. GP posterior.
    model = fit_gp(x, y, config.gp_iterations)
    with torch.no_grad():
        posterior = model.likelihood(model(grid))
        gp_mean, gp_sd = posterior.mean, posterior.variance.sqrt()
    inside = ((grid >= -2.5) & (grid <= -0.5) | (grid >= 0.5) & (grid <= 2.0)).squeeze(-1)  # the data's intervals
    gp_rmse = (gp_mean - true_function(grid).squeeze(-1))[inside].pow(2).mean().sqrt().item()
    print(f"NNGP posterior: RMSE to the true function on the data's intervals {gp_rmse:.3f}")

    # 3. Trained ensemble vs the infinite-width trained model.
    ntk = kernel_from_module(TinyNet(), "ntk").double()
    dynamics = TrainedNetworkGP(x, y, ntk, learning_rate=1.0)
    learning_rate = 0.5 * dynamics.max_learning_rate  # a stable step size for the infinite model
    dynamics = TrainedNetworkGP(x, y, ntk, learning_rate=learning_rate)
    infinite = dynamics(grid, steps=config.steps)
    inf_mean, inf_sd = infinite.mean.detach(), infinite.variance.detach().sqrt()
    ensemble = train_ensemble(x, y, grid, config.width, config.members, config.steps, learning_rate, args.seed)
    ens_mean, ens_sd = ensemble.mean(0), ensemble.std(0)
    gap = (ens_mean - inf_mean).pow(2).mean().sqrt().item()
    spread = inf_sd.pow(2).mean().sqrt().item()
    print(
        f"{config.members} trained networks of width {config.width} after {config.steps} steps: RMS gap between "
        f"the ensemble mean and the infinite-width mean {gap:.3f} (infinite-width prediction sd {spread:.3f}, "
        f"sd of an ensemble mean {spread / math.sqrt(config.members):.3f})"
    )

    # Figure.
    args.outdir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    middle = len(row) // 2
    axes[0].plot(row.squeeze(-1), exact[middle], "k-", label="from_module (exact)")
    axes[0].plot(row.squeeze(-1), estimate[middle], "C1--", label=f"MonteCarloKernel, width {config.check_width}")
    axes[0].set(title="NNGP k(0, x) of TinyNet", xlabel="x")
    axes[0].legend()
    g = grid.squeeze(-1)
    for ax, mean, sd, label, color in (
        (axes[1], gp_mean, gp_sd, "NNGP posterior", "C0"),
        (axes[2], inf_mean, inf_sd, "infinite width (TrainedNetworkGP)", "C0"),
    ):
        ax.fill_between(g, mean - 2 * sd, mean + 2 * sd, color=color, alpha=0.2)
        ax.plot(g, mean, color=color, label=label)
        ax.plot(g, true_function(grid).squeeze(-1), "k:", label="true function")
        ax.plot(x.squeeze(-1), y, "k.", label="data")
    axes[2].plot(g, ens_mean, "C3-", label=f"{config.members} trained TinyNets, width {config.width}")
    axes[2].fill_between(g, ens_mean - 2 * ens_sd, ens_mean + 2 * ens_sd, color="C3", alpha=0.15)
    axes[1].set(title="GP regression with the NNGP kernel", xlabel="x")
    axes[2].set(title=f"after {config.steps} steps of gradient descent", xlabel="x")
    for ax in axes[1:]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = args.outdir / "your_network_as_a_gp.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure: {path}")
    return {
        "figure": path,
        "kernel_error": error,
        "ensemble_gap": gap,
        "infinite_sd": spread,
        "prediction_rms": inf_mean.pow(2).mean().sqrt().item(),
    }


if __name__ == "__main__":
    main()
