#!/usr/bin/env python3
"""Your own architecture as a GP: exact kernels of networks nobody wrote a kernel for.

The package's layer vocabulary (``nn.Linear``, convolutions, ``nn.RNN``, ...) has
no layer for a product of two branches or for a recurrent cell you invented.
``kernel_from_module`` then compiles the network itself: it runs ``forward``
once, records the tensor program it computes (weight matrices applied to
vectors, coordinatewise functions of their outputs) and applies the master
theorem of Tensor Programs (Yang, 2019-2020) to it.  This tutorial takes two
such networks,

1. a gated MLP (GLU), ``readout(value(x) * sigmoid(gate(x)))``, on a 1-D
   regression problem, and
2. a minimal gated unit (one forget gate, the gate applied to the state before
   the recurrent matrix) written as a Python loop over the steps of the
   package's flattened sequences ``(N, T * d)``, on a synthetic sequence
   regression problem,

and for each one

* compiles its exact infinite-width NNGP kernel (a ``CompiledProgram`` layer);
* fits an exact GP with it (float64; the GLU's variances learned by marginal
  likelihood too);
* puts next to it the only kernel one had before, the Monte Carlo estimate
  ``MonteCarloKernel`` of the same module at growing widths: its error against
  the exact kernel, and the test RMSE of the GP that uses it.

Run it from the repository root::

    python tutorials/your_own_architecture.py            # figure in docs/figures/ (about 1 CPU minute)
    python tutorials/your_own_architecture.py --smoke    # seconds, for the tests

It needs matplotlib (``pip install -e ".[tutorials]"``).  The ``# %%`` markers
split the script into notebook cells.
"""

# %%
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import gpytorch
import matplotlib
import torch
from torch import nn

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

from gpytorch_tp.conversion import kernel_from_module
from gpytorch_tp.kernels import MonteCarloKernel
from gpytorch_tp.programs import CompiledProgram

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"
STEPS, FEATURES = 3, 2  # sequence length and features per step of the recurrent example
# The networks are drawn with weights N(0, 2 / fan-in) and biases N(0, 0.5).  PyTorch's default
# (1/3 per fan-in) keeps the gated MLP close to linear in its input, and its GP is poor here
# (test RMSE 0.46 against 0.07 with these variances, 30 points); section 2 learns them instead.
WEIGHT_VARIANCE, BIAS_VARIANCE = 2.0, 0.5


# %% [markdown]
# ## Two networks of your own design
#
# Written the way one writes PyTorch: ``nn.Linear`` layers with PyTorch's
# default initialisation, the rest in ``forward``.  ``outputs`` widens the
# readout for the Monte Carlo estimates below (the outputs of one network are
# independent given its last hidden layer, so more of them average out noise);
# it does not change the kernel.


# %%
class GatedMLP(nn.Module):
    """Two gated linear units in a row: each a value branch times the sigmoid of a gate branch."""

    def __init__(self, width: int = 64, outputs: int = 1):
        super().__init__()
        self.value1, self.gate1 = nn.Linear(1, width), nn.Linear(1, width)
        self.value2, self.gate2 = nn.Linear(width, width), nn.Linear(width, width)
        self.readout = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.value1(x) * torch.sigmoid(self.gate1(x))
        h = self.value2(h) * torch.sigmoid(self.gate2(h))
        return self.readout(h)


class MinimalGatedUnit(nn.Module):
    """A recurrent cell with one forget gate ``f``, applied to the state before the recurrent matrix.

    Takes sequences flattened time-major, ``(N, STEPS * FEATURES)``, as the package's kernels do.
    """

    def __init__(self, width: int = 64, outputs: int = 1):
        super().__init__()
        self.forget_state = nn.Linear(width, width)
        self.forget_input = nn.Linear(FEATURES, width, bias=False)
        self.candidate_state = nn.Linear(width, width)
        self.candidate_input = nn.Linear(FEATURES, width, bias=False)
        self.readout = nn.Linear(width, outputs)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.view(x.shape[0], STEPS, FEATURES)
        h = x.new_zeros(x.shape[0], self.width)
        for t in range(STEPS):
            f = torch.sigmoid(self.forget_state(h) + self.forget_input(steps[:, t]))
            candidate = torch.tanh(self.candidate_state(f * h) + self.candidate_input(steps[:, t]))
            h = (1 - f) * h + f * candidate
        return self.readout(h)


# %% [markdown]
# ## Data
#
# A 1-D function observed on two intervals (the GLU), and sequences of 3 steps
# of 2 features whose target mixes the steps with a decaying memory and a
# product across steps (the recurrent cell).


# %%
def glu_target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * x) * torch.exp(-0.1 * x**2) + 0.3 * x


def glu_data(n: int, seed: int, noise_sd: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    left = torch.rand(n - n // 3, generator=generator, dtype=DTYPE) * 2.5 - 3.0
    right = torch.rand(n // 3, generator=generator, dtype=DTYPE) * 1.5 + 1.0
    x = torch.cat([left, right]).sort().values.unsqueeze(-1)
    return x, glu_target(x).squeeze(-1) + noise_sd * torch.randn(n, generator=generator, dtype=DTYPE)


def sequence_target(x: torch.Tensor) -> torch.Tensor:
    steps = x.view(x.shape[0], STEPS, FEATURES)
    decay = 0.6 ** torch.arange(STEPS - 1, -1, -1, dtype=DTYPE)  # the last step weighs most
    return (decay * torch.sin(1.5 * steps[..., 0])).sum(-1) + 0.5 * steps[:, -1, 1] * steps[:, 0, 0]


def sequence_data(n: int, seed: int, noise_sd: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, STEPS * FEATURES, generator=generator, dtype=DTYPE)
    return x, sequence_target(x) + noise_sd * torch.randn(n, generator=generator, dtype=DTYPE)


# %% [markdown]
# ## 1. The exact kernels
#
# ``kernel_from_module`` first tries the layer vocabulary; it refuses the
# product ``value * sigmoid(gate)`` and the hand-written loop, so the network
# is compiled: the kernel's architecture is one ``CompiledProgram`` layer with
# one variance per weight matrix and bias of the module.  The sequence network
# needs ``input_shape=(T, d)`` and ``sequence=True``.
#
# Where the variances come from: ``init="pytorch"`` (default) reads PyTorch's
# default initialisation of ``nn.Linear`` at infinite width (weights 1/3 per
# fan-in; biases 1/(3 fan-in), which survives only for layers reading the
# input); ``init="measured"`` reads the second moments of the module's current
# parameters (a wide module's are close to the PyTorch values, a narrow one's
# are noisy, and its hidden biases keep their finite ``1/(3 width)``);
# ``weight_variance=`` / ``bias_variance=`` set all matrices / all biases.


# %%
EXPLICIT = {"weight_variance": WEIGHT_VARIANCE, "bias_variance": BIAS_VARIANCE}


def glu_kernel(**variances) -> gpytorch.kernels.Kernel:
    return kernel_from_module(GatedMLP(), "nngp", **(variances or EXPLICIT)).double()


def sequence_kernel() -> gpytorch.kernels.Kernel:
    return kernel_from_module(MinimalGatedUnit(), "nngp", (STEPS, FEATURES), sequence=True, **EXPLICIT).double()


def variance_sources(width: int = 4096) -> dict[str, dict[str, float]]:
    """The variances of three GLU parameters under each way of choosing them."""
    wide = GatedMLP(width)
    kernels = {
        'init="pytorch"': kernel_from_module(wide, "nngp"),
        'init="measured"': kernel_from_module(wide, "nngp", init="measured"),
        f"weight_variance={WEIGHT_VARIANCE:g}, bias_variance={BIAS_VARIANCE:g}": kernel_from_module(
            wide, "nngp", **EXPLICIT
        ),
    }
    names = ("value1.weight", "value1.bias", "value2.bias")
    return {
        source: {name: float(kernel.architecture.variance(name).detach()) for name in names}
        for source, kernel in kernels.items()
    }


# %% [markdown]
# ## 2. GP regression with a fixed kernel matrix
#
# To compare kernels on equal terms, every kernel (exact or Monte Carlo) gets
# the same treatment: its matrix over the training and test points is computed
# once at the module's initialisation variances, and only an output scale and
# the noise are chosen, by the exact marginal likelihood (the Monte Carlo
# kernel has no variances to learn; the compiled recurrent kernel has, but
# costs seconds per evaluation).  The targets are centred on their mean.


# %%
@dataclass
class Posterior:
    mean: torch.Tensor
    sd: torch.Tensor
    outputscale: float
    noise: float


def fixed_kernel_posterior(matrix: torch.Tensor, y: torch.Tensor, steps: int = 40) -> Posterior:
    """The GP posterior at the last ``len(matrix) - len(y)`` points, given the first ``len(y)``."""
    n = len(y)
    k_train, k_cross, k_test = matrix[:n, :n], matrix[n:, :n], matrix[n:, n:].diagonal()
    centre = y.mean()
    targets = y - centre
    eye = torch.eye(n, dtype=matrix.dtype)
    # log output scale and log noise, started at the data's variance over the kernel's and 1% of it
    log_scale = torch.log(targets.var() / k_train.diagonal().mean()).clone().requires_grad_(True)
    log_noise = torch.log(0.01 * targets.var()).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([log_scale, log_noise], max_iter=steps, line_search_fn="strong_wolfe")

    def negative_log_likelihood() -> torch.Tensor:
        optimizer.zero_grad()
        covariance = log_scale.exp() * k_train + (log_noise.exp() + 1e-10) * eye
        loss = -torch.distributions.MultivariateNormal(torch.zeros(n, dtype=DTYPE), covariance).log_prob(targets)
        loss.backward()
        return loss

    optimizer.step(negative_log_likelihood)
    with torch.no_grad():
        scale, noise = log_scale.exp(), log_noise.exp() + 1e-10
        factor = torch.linalg.cholesky(scale * k_train + noise * eye)
        projected = torch.cholesky_solve(scale * k_cross.T, factor)  # (s K + noise I)^-1 s K(train, test)
        mean = centre + projected.T @ targets
        variance = (scale * k_test - (scale * k_cross * projected.T).sum(-1)).clamp_min(0.0)
    return Posterior(mean, variance.sqrt(), float(scale), float(noise))


def rmse(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    return (prediction - truth).pow(2).mean().sqrt().item()


# %% [markdown]
# The GLU's compiled variances are hyperparameters like any kernel's: an
# ordinary GPyTorch ``ExactGP`` learns them with the output scale and the
# noise, here starting from PyTorch's initialisation (``init="pytorch"``).


# %%
class ExactGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, covar):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(covar)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def fit_learned_glu(x: torch.Tensor, y: torch.Tensor, iterations: int) -> ExactGP:
    model = ExactGP(x, y, kernel_from_module(GatedMLP(), "nngp", init="pytorch")).double()
    with torch.no_grad():
        prior_variance = model.covar_module.base_kernel(x, diag=True).mean()
    model.covar_module.outputscale = float(y.var() / prior_variance)
    model.likelihood.noise = 0.01 * float(y.var())
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
# ## 3. The Monte Carlo estimate of the same module
#
# ``MonteCarloKernel`` averages the output products of ``networks`` random
# copies of the module (at its real, finite width, drawn at the same variances
# as the exact kernel's) over their ``width`` outputs.  Its error against the exact kernel falls as the width grows
# (sampling noise and finite-width bias both shrink); the exact kernel is the
# limit it approaches.


# %%
def initialised(network: nn.Module) -> nn.Module:
    """Weights N(0, WEIGHT_VARIANCE / fan-in), biases N(0, BIAS_VARIANCE): the exact kernel's variances."""
    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, math.sqrt(WEIGHT_VARIANCE / parameter.shape[-1]))
            else:
                parameter.normal_(0.0, math.sqrt(BIAS_VARIANCE))
    return network


def monte_carlo_matrix(network_class, width: int, networks: int, points: torch.Tensor) -> torch.Tensor:
    def network() -> nn.Module:
        return initialised(network_class(width, outputs=width))

    estimate = MonteCarloKernel(network, "nngp", n_samples=networks, seed=0)
    with torch.no_grad():
        return estimate(points).to_dense()


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


@dataclass
class Comparison:
    """One network: the exact kernel's GP and, per width, the Monte Carlo kernel's error and GP."""

    exact: Posterior
    exact_rmse: float
    kernel_seconds: float
    errors: dict[int, float]
    monte_carlo: dict[int, Posterior]
    monte_carlo_rmse: dict[int, float]


def compare(network_class, kernel, x, y, test_x, truth, widths, networks) -> Comparison:
    points = torch.cat([x, test_x])
    start = time.perf_counter()
    with torch.no_grad():
        exact_matrix = kernel(points).to_dense()
    seconds = time.perf_counter() - start
    exact = fixed_kernel_posterior(exact_matrix, y)
    errors, posteriors, rmses = {}, {}, {}
    for width in widths:
        matrix = monte_carlo_matrix(network_class, width, networks, points)
        errors[width] = relative_error(matrix, exact_matrix)
        posteriors[width] = fixed_kernel_posterior(matrix, y)
        rmses[width] = rmse(posteriors[width].mean, truth)
    return Comparison(exact, rmse(exact.mean, truth), seconds, errors, posteriors, rmses)


# %%
@dataclass
class Config:
    glu_train: int
    glu_grid: int
    glu_iterations: int
    sequence_train: int
    sequence_test: int
    widths: tuple[int, ...]
    networks: int


SMOKE = Config(
    glu_train=12, glu_grid=40, glu_iterations=5, sequence_train=10, sequence_test=6, widths=(16, 256), networks=4
)
FULL = Config(
    glu_train=30,
    glu_grid=150,
    glu_iterations=60,
    sequence_train=60,
    sequence_test=30,
    widths=(16, 64, 256, 1024),
    networks=8,
)


def report(name: str, result: Comparison) -> None:
    print(
        f"{name}: exact compiled kernel, test RMSE {result.exact_rmse:.3f} (kernel matrix {result.kernel_seconds:.1f} s)"
    )
    for width in result.errors:
        print(
            f"  MonteCarloKernel width {width:5d}: relative error of the kernel {result.errors[width]:.3f}, "
            f"test RMSE {result.monte_carlo_rmse[width]:.3f}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--outdir", type=Path, default=FIGURE_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke else FULL
    torch.manual_seed(args.seed)

    # 1. Exact kernels, compiled from the modules.
    glu, recurrent = glu_kernel(), sequence_kernel()
    for name, kernel in (("GatedMLP", glu), ("MinimalGatedUnit", recurrent)):
        layer = kernel.architecture
        assert isinstance(layer, CompiledProgram)  # not a hand-written layer: the compiler made it
        print(f"kernel_from_module({name}()) -> {type(kernel).__name__}({type(layer).__name__}: {layer.extra_repr()})")
    sources = variance_sources()
    for source, values in sources.items():
        print(f"  {source:40s} " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()))

    # 2-3. The GLU: exact GP, learned variances, Monte Carlo at growing widths.
    x, y = glu_data(config.glu_train, args.seed)
    grid = torch.linspace(-3.5, 3.5, config.glu_grid, dtype=DTYPE).unsqueeze(-1)
    inside = ((grid >= -3.0) & (grid <= -0.5) | (grid >= 1.0) & (grid <= 2.5)).squeeze(-1)  # the data's intervals
    glu_truth = glu_target(grid).squeeze(-1)
    glu_result = compare(GatedMLP, glu, x, y, grid[inside], glu_truth[inside], config.widths, config.networks)
    report("GatedMLP (RMSE to the true function on the data's intervals)", glu_result)
    with torch.no_grad():
        glu_curve = fixed_kernel_posterior(glu(torch.cat([x, grid])).to_dense(), y)
        narrow = min(config.widths)
        narrow_curve = fixed_kernel_posterior(
            monte_carlo_matrix(GatedMLP, narrow, config.networks, torch.cat([x, grid])), y
        )
    with torch.no_grad():
        default_matrix = kernel_from_module(GatedMLP(), "nngp").double()(torch.cat([x, grid[inside]])).to_dense()
    default_rmse = rmse(fixed_kernel_posterior(default_matrix, y).mean, glu_truth[inside])
    learned = fit_learned_glu(x, y, config.glu_iterations)
    with torch.no_grad():
        learned_rmse = rmse(learned(grid[inside]).mean, glu_truth[inside])
    layer = learned.covar_module.base_kernel.architecture
    learned_variances = {name: float(layer.variance(name).detach()) for name in ("value1.weight", "value2.weight")}
    print(
        f"  PyTorch's default variances, fixed: test RMSE {default_rmse:.3f}; learned from there by marginal "
        f"likelihood ({config.glu_iterations} Adam steps): test RMSE {learned_rmse:.3f}, "
        + ", ".join(f"{name} {value:.3f}" for name, value in learned_variances.items())
    )

    # 2-3. The recurrent cell.
    train_x, train_y = sequence_data(config.sequence_train, args.seed + 1)
    test_x, _ = sequence_data(config.sequence_test, args.seed + 2)
    sequence_result = compare(
        MinimalGatedUnit, recurrent, train_x, train_y, test_x, sequence_target(test_x), config.widths, config.networks
    )
    report("MinimalGatedUnit (RMSE to the noiseless targets of the test sequences)", sequence_result)

    # Figure.
    args.outdir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    g = grid.squeeze(-1)
    axes[0].fill_between(g, glu_curve.mean - 2 * glu_curve.sd, glu_curve.mean + 2 * glu_curve.sd, color="C0", alpha=0.2)
    axes[0].plot(g, glu_curve.mean, "C0-", label="exact compiled kernel")
    axes[0].plot(g, narrow_curve.mean, "C1--", label=f"MonteCarloKernel, width {narrow}")
    axes[0].plot(g, glu_truth, "k:", label="true function")
    axes[0].plot(x.squeeze(-1), y, "k.", label="data")
    axes[0].set(title="GP posterior, GatedMLP kernel", xlabel="x")
    axes[0].legend(fontsize=7)
    widths = list(config.widths)
    for result, label, color in ((glu_result, "GatedMLP", "C0"), (sequence_result, "MinimalGatedUnit", "C3")):
        axes[1].loglog(widths, [result.errors[w] for w in widths], "o-", color=color, label=label)
        axes[2].semilogx(
            widths, [result.monte_carlo_rmse[w] for w in widths], "o-", color=color, label=f"{label}, Monte Carlo"
        )
        axes[2].axhline(result.exact_rmse, color=color, ls="--", label=f"{label}, exact")
    reference = [glu_result.errors[widths[0]] * math.sqrt(widths[0] / w) for w in widths]
    axes[1].loglog(widths, reference, "k:", label="width$^{-1/2}$")
    axes[1].set(
        title=f"Monte Carlo kernel vs exact ({config.networks} networks)",
        xlabel="width",
        ylabel="relative error (Frobenius)",
    )
    axes[2].set(title="GP test RMSE", xlabel="width of the Monte Carlo kernel", ylabel="RMSE")
    for ax in axes[1:]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = args.outdir / "your_own_architecture.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure: {path}")
    return {
        "figure": path,
        "glu": glu_result,
        "sequence": sequence_result,
        "default_rmse": default_rmse,
        "learned_rmse": learned_rmse,
        "glu_truth_sd": glu_truth[inside].std().item(),
        "variance_sources": sources,
    }


if __name__ == "__main__":
    main()
