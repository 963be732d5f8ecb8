#!/usr/bin/env python3
"""Training dynamics: the Gaussian process of a wide network during gradient descent.

An infinitely wide network trained by gradient descent on a squared loss is a
Gaussian process at every moment of training (Lee et al. 2019).  Its mean and
covariance follow from two kernels of the architecture -- the NNGP kernel
``K`` (the prior: the network at initialisation) and the neural tangent
kernel ``Theta`` (how training moves the function) -- and
:class:`gpytorch_tp.TrainedNetworkGP` computes them for any training time.

This tutorial, on a 1-D regression problem with noisy targets:

1. shows the distribution of functions after 0, 10, 100, 1000 and 10000
   gradient-descent steps (mean +- 2 sd) next to finite networks trained the
   same way from their own random initialisations;
2. compares the predicted training and test losses with the losses measured on
   an ensemble of finite networks, and finds the best step to stop training;
3. looks at the end of training (t = inf): training only the readout, with
   weight decay towards the initial weights and noisy targets, gives exactly
   the GP posterior of GPyTorch's ``ExactGP``; training every layer gives the
   NTK's kernel-regression mean with its own uncertainty.

Run it from the repository root::

    python tutorials/training_dynamics.py            # a few minutes; figures in docs/figures/
    python tutorials/training_dynamics.py --smoke    # a few seconds, for the tests

It needs matplotlib (``pip install -e ".[tutorials]"``).  The ``# %%`` markers
split the script into notebook cells (VS Code, Jupytext).
"""

# %% [markdown]
# ## Setup

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

from gpytorch_tp import TensorProgramKernel, TrainedNetworkGP
from gpytorch_tp.empirical import build_network
from gpytorch_tp.layers import Erf, Linear, Sequential

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"


# %% [markdown]
# ## Data and network
#
# Ten noisy observations of a smooth function on two intervals, with a gap.
# The network has one hidden erf layer, in the NTK parameterisation of
# :class:`gpytorch_tp.layers.Linear` (standard-normal weights, scaled by
# ``sigma_w / sqrt(fan_in)`` in the forward pass).  A smooth nonlinearity
# matters here: with ReLU and 1-d inputs the slow modes of the NTK -- the
# fine detail between nearby points -- depend on where the few units' kinks
# fall, and finite networks approach their infinite-width limit there much
# more slowly.


# %%
def true_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(4 * x) + 0.6 * x


def make_data(seed: int = 1, noise_sd: float = 0.15):
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.linspace(-1.5, -0.35, 6, dtype=DTYPE), torch.linspace(0.45, 1.5, 4, dtype=DTYPE)])
    x = (x + 0.05 * torch.randn(10, generator=generator, dtype=DTYPE)).unsqueeze(-1)
    y = true_function(x).squeeze(-1) + noise_sd * torch.randn(10, generator=generator, dtype=DTYPE)
    return x, y


def architecture() -> Sequential:
    return Sequential(Linear(1.0, 1.0), Erf(), Linear(1.0, 0.1))


# %% [markdown]
# ## Finite networks trained by gradient descent
#
# ``build_network`` gives the finite network whose infinite-width limit the
# kernels describe: ``NTKLinear`` layers (standard-normal ``weight`` and
# ``bias``, scaled in the forward pass) and ``Pointwise`` nonlinearities.  To
# train an ensemble quickly we stack the parameters of networks built with
# different seeds and run them as one batched network; autograd gives each
# network's gradient of ``L = 1/2 sum_i (f(x_i) - y_i)^2`` (the convention of
# ``TrainedNetworkGP``).  With ``readout_only`` only the last layer is trained;
# ``ridge`` adds ``ridge/2 |theta - theta_0|^2`` (weight decay towards the
# initial parameters) and ``targets`` gives every network its own targets.


# %%
class Ensemble:
    """``size`` networks from ``build_network`` (seeds ``seed, seed + 1, ...``), evaluated together."""

    def __init__(self, size: int, width: int, seed: int = 0):
        nets = [build_network(architecture(), 1, width, 1, seed=seed + s, dtype=torch.float32) for s in range(size)]
        self.layers = []  # (module of the first network, stacked weight, stacked bias)
        for modules in zip(*nets):
            first = modules[0]
            if hasattr(first, "weight_std"):  # an NTKLinear layer
                weight = torch.stack([m.weight.detach() for m in modules]).requires_grad_()
                bias = torch.stack([m.bias.detach() for m in modules]).requires_grad_()
                self.layers.append((first, weight, bias))
            else:  # a nonlinearity
                self.layers.append((first, None, None))

    def parameters(self, readout_only: bool = False) -> list[torch.Tensor]:
        layers = [layer for layer in self.layers if layer[1] is not None]
        return [p for _, w, b in (layers[-1:] if readout_only else layers) for p in (w, b)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(size, N)`` for inputs ``(N, d)``."""
        h = x
        for module, weight, bias in self.layers:
            if weight is None:
                h = module(h)
            else:  # y = sigma_w W h / sqrt(fan_in) + sigma_b b, for every network at once
                h = (h @ weight.transpose(-1, -2)) * (module.weight_std / math.sqrt(module.in_features))
                h = h + module.bias_std * bias.unsqueeze(-2)
        return h.squeeze(-1)


def train(ensemble, x, y, learning_rate, record, x_eval, *, readout_only=False, ridge=0.0, targets=None):
    """Full-batch gradient descent; returns {step: outputs on x_eval (size, N)} and {step: training loss (size,)}."""
    params = ensemble.parameters(readout_only)
    start = [p.detach().clone() for p in params]
    targets = y if targets is None else targets
    outputs, losses = {}, {}
    for step in range(max(record) + 1):
        if step in record:
            with torch.no_grad():
                outputs[step] = ensemble(x_eval).double()
                losses[step] = 0.5 * (ensemble(x) - y).pow(2).sum(-1).double()
        if step == max(record):
            break
        loss = 0.5 * (ensemble(x) - targets).pow(2).sum()  # the sum over networks separates
        if ridge:
            loss = loss + 0.5 * ridge * sum((p - p0).pow(2).sum() for p, p0 in zip(params, start))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(learning_rate * g)
    return outputs, losses


def mean_and_sd(dist):
    """Mean and standard deviation of a MultivariateNormal (variances of fitted points can be ~0)."""
    variance = dist.lazy_covariance_matrix.diagonal(dim1=-2, dim2=-1)
    return dist.mean, variance.clamp_min(0).sqrt()


# %% [markdown]
# ## 1. The distribution of functions during training
#
# ``TrainedNetworkGP(train_x, train_y, architecture, learning_rate=eta)`` is
# called with test inputs and a time -- ``t=...`` for gradient flow,
# ``steps=...`` for gradient descent, a tensor of them for several at once --
# and returns a GPyTorch ``MultivariateNormal``.  The learning rate is half the
# largest stable one, ``gp.max_learning_rate = 2 / lambda_max(Theta)``.


# %%
def plot_functions(gp, x, y, grid, steps, sample_outputs, width):
    mean, sd = mean_and_sd(gp(grid, steps=torch.tensor(steps)))
    g = grid.squeeze(-1)
    fig, axes = plt.subplots(1, len(steps), figsize=(3.1 * len(steps), 3.2), sharey=True)
    for i, (ax, k) in enumerate(zip(axes, steps)):
        ax.fill_between(
            g,
            mean[i] - 2 * sd[i],
            mean[i] + 2 * sd[i],
            color="C0",
            alpha=0.2,
            lw=0,
            label="infinite width: mean $\\pm$ 2 sd",
        )
        ax.plot(g, mean[i], color="C0", lw=2)
        for j, path in enumerate(sample_outputs[k]):
            ax.plot(
                g, path, color="C1", lw=0.9, alpha=0.8, label=f"finite networks (width {width})" if j == 0 else None
            )
        ax.plot(g, true_function(grid).squeeze(-1), color="k", ls=":", lw=1, label="true function")
        ax.scatter(x.squeeze(-1), y, color="k", s=16, zorder=5, label="training data")
        ax.set_title(f"{k} steps" if k else "initialisation")
        ax.set_xlabel("x")
        ax.set_ylim(-3, 3)
    axes[0].set_ylabel("f(x)")
    fig.suptitle("A wide erf network during gradient descent: the GP at each step, and finite networks", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=9, frameon=False)
    return fig


# %% [markdown]
# ## 2. Loss curves and early stopping
#
# ``gp.expected_loss(steps=...)`` is the expected training loss of one
# trained network, split into ``bias`` (the loss of the ensemble's mean
# function) and ``variance`` (the spread of networks around it); with ``x`` and
# ``y`` it is the loss on other data.  The targets are noisy, so fitting them
# exactly hurts: ``gp.optimal_stopping_time(x_test, y_test, discrete=True)``
# finds the step with the smallest expected test loss.


# %%
def plot_losses(gp, x_test, y_test, record, losses, test_outputs, num_steps):
    best = gp.optimal_stopping_time(x_test, y_test, discrete=True)
    horizon = num_steps if not math.isfinite(best.time) else max(num_steps, min(3 * best.time, 1e6))
    steps = torch.unique(torch.logspace(0, math.log10(horizon), 400, dtype=DTYPE).round())
    train = gp.expected_loss(steps=steps)
    test = gp.expected_loss(steps=steps, x=x_test, y=y_test)
    rec = [k for k in sorted(record) if k > 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, pred, title in ((axes[0], train, "training loss"), (axes[1], test, "test loss (noise-free targets)")):
        ax.loglog(steps, pred.loss, color="C0", lw=2, label="predicted E[loss]")
        ax.loglog(steps, pred.bias, color="C0", ls="--", lw=1, label="  its bias part (mean function)")
        ax.loglog(steps, pred.variance, color="C0", ls=":", lw=1, label="  its variance part")
        ax.set_xlabel("gradient descent steps")
        ax.set_title(title)
    measured = torch.stack([losses[k] for k in rec])  # (steps, networks)
    sem = measured.std(-1) / math.sqrt(measured.shape[-1])
    label = f"measured: mean of {measured.shape[-1]} finite networks $\\pm$ 2 se"
    axes[0].errorbar(rec, measured.mean(-1), yerr=2 * sem, fmt="o", ms=4, color="C1", label=label)
    test_losses = torch.stack([0.5 * (test_outputs[k] - y_test).pow(2).sum(-1) for k in rec])
    sem = test_losses.std(-1) / math.sqrt(test_losses.shape[-1])
    axes[1].errorbar(rec, test_losses.mean(-1), yerr=2 * sem, fmt="o", ms=4, color="C1", label=label)
    if math.isfinite(best.time):
        axes[1].axvline(best.time, color="C2", lw=1, label=f"predicted best stop: {best.time:.0f} steps")
    axes[0].legend(fontsize=8, frameon=False, loc="lower left")
    axes[1].legend(fontsize=8, frameon=False, loc="lower left")
    axes[0].set_ylabel("1/2 sum of squared errors")
    fig.tight_layout()
    return fig, best


# %% [markdown]
# ## 3. The end of training
#
# Left: only the readout is trained, with ``noise=sigma^2`` -- weight decay
# ``sigma^2/2 |theta - theta_0|^2`` and targets perturbed by ``N(0, sigma^2)``
# noise, drawn afresh for every network.  At ``t = inf`` the ensemble is the GP
# posterior of the NNGP kernel with noise variance ``sigma^2``; we compare with
# ``gpytorch.models.ExactGP``, and with finite networks trained that way.
# Middle: every layer trained, without noise: the networks interpolate the
# data with the NTK's kernel-regression mean ``Theta(x, X) Theta^-1 Y``.
# Right: the uncertainty left at ``t = inf`` is not that of a GP posterior --
# neither the NNGP's nor the NTK's (both with a tiny noise variance, 1e-6).


# %%
class ExactGPModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, kernel, noise):
        super().__init__(x, y, gpytorch.likelihoods.FixedNoiseGaussianLikelihood(torch.full_like(y, noise)))
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def exact_gp_posterior(x, y, grid, noise, kind="nngp"):
    model = ExactGPModel(x, y, TensorProgramKernel(architecture(), kind=kind), noise).to(DTYPE).eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        return mean_and_sd(model(grid))


def plot_limits(x, y, grid, noise, readout_gp, ntk_gp, readout_outputs, readout_steps):
    g = grid.squeeze(-1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))

    ax = axes[0]
    mean, sd = mean_and_sd(readout_gp(grid, t=math.inf))
    gp_mean, gp_sd = exact_gp_posterior(x, y, grid, noise)
    ax.fill_between(g, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.2, lw=0, label="readout trained, t = inf")
    ax.plot(g, mean, color="C0", lw=2)
    ax.plot(g, gp_mean, color="k", ls="--", lw=1, label="ExactGP posterior, NNGP kernel")
    for sign in (-2, 2):
        ax.plot(g, gp_mean + sign * gp_sd, color="k", ls="--", lw=1)
    emp = readout_outputs[readout_steps]
    every = max(1, len(g) // 25)
    ax.errorbar(
        g[::every],
        emp.mean(0)[::every],
        yerr=2 * emp.std(0)[::every],
        fmt="o",
        ms=3,
        color="C1",
        label=f"{emp.shape[0]} finite networks, {readout_steps} steps",
    )
    ax.scatter(x.squeeze(-1), y, color="k", s=16, zorder=5)
    ax.set_title(f"readout only, noise $\\sigma^2$ = {noise:g}: mean $\\pm$ 2 sd")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_ylabel("f(x)")

    ax = axes[1]
    mean, sd = mean_and_sd(ntk_gp(grid, t=math.inf))
    ax.fill_between(g, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.2, lw=0)
    ax.plot(
        g,
        mean,
        color="C0",
        lw=2,
        label="all layers trained, t = inf\n(the $\\pm$ 2 sd band is mostly thinner than the line)",
    )
    ax.scatter(x.squeeze(-1), y, color="k", s=16, zorder=5)
    ax.set_title("all layers, no noise: mean $\\pm$ 2 sd")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_ylim(-3, 3)

    ax = axes[2]
    ax.semilogy(g, sd, color="C0", lw=2, label="all layers trained, t = inf")
    ax.semilogy(g, exact_gp_posterior(x, y, grid, 1e-6)[1], color="k", ls="--", lw=1, label="NNGP posterior")
    ax.semilogy(
        g, exact_gp_posterior(x, y, grid, 1e-6, kind="ntk")[1], color="C3", ls=":", lw=1.5, label="NTK-GP posterior"
    )
    for xi in x.squeeze(-1):
        ax.axvline(float(xi), color="0.85", lw=0.8, zorder=0)
    ax.set_title("standard deviation, noise-free training")
    ax.legend(fontsize=7, frameon=False, loc="upper center")
    for ax in axes:
        ax.set_xlabel("x")
    fig.tight_layout()
    return fig


# %% [markdown]
# ## Run everything


# %%
def main(argv: list[str] | None = None, figure_dir: Path | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description="Training dynamics of wide networks: the GP at every step.")
    parser.add_argument("--smoke", action="store_true", help="tiny ensembles and few steps (for tests)")
    parser.add_argument("--outdir", type=Path, default=figure_dir or FIGURE_DIR, help="where to save the figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    if args.smoke:
        num_steps, width, size, paths_shown, grid_size, readout_steps = 30, 64, 4, 2, 30, 30
    else:
        num_steps, width, size, paths_shown, grid_size, readout_steps = 10_000, 1024, 48, 5, 200, 1000
    shown = [0, 10, 100, 1000, 10_000] if not args.smoke else [0, 10, 30]

    x, y = make_data()
    grid = torch.linspace(-2.2, 2.2, grid_size, dtype=DTYPE).unsqueeze(-1)
    x_test = torch.linspace(-1.5, 1.5, 60, dtype=DTYPE).unsqueeze(-1)
    y_test = true_function(x_test).squeeze(-1)

    probe = TrainedNetworkGP(x, y, architecture())
    eta = 0.5 * probe.max_learning_rate
    gp = TrainedNetworkGP(x, y, architecture(), learning_rate=eta)
    print(f"{gp}\nlargest stable learning rate {probe.max_learning_rate:.4g}; training with {eta:.4g}")

    # 1 and 2: train an ensemble of finite networks; record outputs and losses
    record = {0, *shown, *torch.unique(torch.logspace(0, math.log10(num_steps), 13).round()).long().tolist()}
    ensemble = Ensemble(size, width, seed=args.seed * 10_000)
    x_all = torch.cat([grid, x_test])
    outputs, losses = train(ensemble, x.float(), y.float(), eta, record, x_all.float())
    if not all(torch.isfinite(v).all() for v in outputs.values()):
        raise RuntimeError("a finite network diverged")
    sample_outputs = {k: outputs[k][:paths_shown, :grid_size] for k in shown}
    test_outputs = {k: outputs[k][:, grid_size:] for k in record}

    # 3: readout-only training with weight decay and noisy targets, and the all-layer limit
    noise = 0.05
    readout_gp = TrainedNetworkGP(x, y, architecture(), trained="readout", noise=noise)
    readout_eta = 0.5 * readout_gp.max_learning_rate
    generator = torch.Generator().manual_seed(args.seed + 1)
    noisy = y + math.sqrt(noise) * torch.randn(size, len(y), generator=generator, dtype=DTYPE)
    readout_outputs, _ = train(
        Ensemble(size, width, seed=args.seed * 10_000 + 5000),
        x.float(),
        y.float(),
        readout_eta,
        {readout_steps},
        grid.float(),
        readout_only=True,
        ridge=noise,
        targets=noisy.float(),
    )

    args.outdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "functions": args.outdir / "dynamics_functions.png",
        "loss": args.outdir / "dynamics_loss.png",
        "limit": args.outdir / "dynamics_limit.png",
    }
    loss_fig, best = plot_losses(gp, x_test, y_test, record, losses, test_outputs, num_steps)
    print(
        f"predicted best stopping step {best.time:.0f}: expected test loss {best.loss:.4f} "
        f"(after training to convergence: {best.loss_at_end:.4f})"
    )
    for key, fig in (
        ("functions", plot_functions(gp, x, y, grid, shown, sample_outputs, width)),
        ("loss", loss_fig),
        ("limit", plot_limits(x, y, grid, noise, readout_gp, gp, readout_outputs, readout_steps)),
    ):
        fig.savefig(paths[key], dpi=50 if args.smoke else 110)
        plt.close(fig)
        print(f"saved {paths[key]}")
    return paths


if __name__ == "__main__":
    main()
