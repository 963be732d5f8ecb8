#!/usr/bin/env python3
"""Wide networks are Gaussian processes: finite networks converge to the kernels.

The kernels of ``gpytorch_tp`` are limits.  For a network with random Gaussian
weights (NTK parameterisation), as its hidden width ``n`` grows,

* the covariance of its output over random initialisations -- the *empirical
  NNGP kernel* -- tends to the NNGP kernel ``K``;
* the inner product of its parameter gradients -- the *empirical NTK* -- tends
  to the neural tangent kernel ``Theta``, already for a single network;

and the fluctuations around the limit shrink like ``n^(-1/2)``.  This tutorial
measures that convergence for four families -- a ReLU MLP, a ReLU CNN with
global average pooling, an erf RNN and a transformer (when the package has
``TransformerKernel``) -- using the finite networks that every architecture
builds for itself (:func:`gpytorch_tp.empirical.build_network`):

1. the empirical kernels of finite networks of growing width
   (:func:`~gpytorch_tp.empirical.empirical_nngp`,
   :func:`~gpytorch_tp.empirical.empirical_ntk`);
2. their relative Frobenius error ``||K_n - K||_F / ||K||_F`` against the exact
   kernels (``kernel.nngp_and_ntk``), root-mean-square over independent repeats;
3. a log-log plot of the error against the width with the ``n^(-1/2)``
   reference line, and the slope fitted to each curve.

Run it from the repository root::

    python tutorials/wide_networks_are_gps.py            # figure in docs/figures/
    python tutorials/wide_networks_are_gps.py --smoke    # a few seconds, for the tests

The full run (widths 16 to 1024; per width and kernel, 8 independent estimates,
each from one network) takes about 2.5 minutes of CPU time.  It needs matplotlib (``pip install -e ".[tutorials]"``).
The ``# %%`` markers split the script into notebook cells (VS Code, Jupytext).
"""

# %% [markdown]
# ## Setup
#
# float64 throughout, so that the errors we see are the networks' and not
# round-off.

# %%
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from torch import Tensor

import gpytorch_tp
from gpytorch_tp import CNNKernel, MLPKernel, RNNKernel
from gpytorch_tp.empirical import build_network, empirical_nngp, empirical_ntk
from gpytorch_tp.kernels import TensorProgramKernel

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"
KINDS = ("nngp", "ntk")


# %% [markdown]
# ## The families
#
# A family is a kernel, the shape its finite networks take their inputs in, and
# a handful of inputs.  The kernels take every input flattened to a vector;
# images as ``(C, H, W)`` flattened (the finite CNN takes the same layout),
# sequences time-major ``(T, d)`` flattened, while the finite RNN takes
# ``(d, T)``, so its inputs are transposed first.
#
# To add a family, append a ``Family`` to the list returned by ``families``:
# the kernel (any ``TensorProgramKernel``), the ``in_shape`` that
# ``build_network`` expects, inputs in the kernel's layout and, if the network's
# layout differs, the map from one to the other.


# %%
@dataclass
class Family:
    name: str
    kernel: TensorProgramKernel
    in_shape: int | tuple[int, ...]
    inputs: torch.Tensor
    to_network_layout: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def network(self, width: int, out_features: int, seed: int) -> torch.nn.Module:
        return build_network(
            self.kernel.architecture, self.in_shape, width, out_features=out_features, seed=seed, dtype=DTYPE
        )


def time_major_to_channels_first(steps: int, features: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, steps, features).transpose(-1, -2).reshape(x.shape)

    return convert


def families(num_inputs: int, seed: int = 0) -> list[Family]:
    g = torch.Generator().manual_seed(seed)

    def inputs(dim: int) -> torch.Tensor:
        return torch.randn(num_inputs, dim, generator=g, dtype=DTYPE)

    image_shape = (2, 5, 5)  # (C, H, W)
    steps, features = 5, 3  # sequences of 5 steps of 3 features
    result = [
        Family("MLP (ReLU, 2 hidden layers)", MLPKernel(depth=2, nonlinearity="relu"), 4, inputs(4)),
        Family(
            "CNN (ReLU, 2 conv layers, global avg pool)",
            CNNKernel(image_shape, depth=2, nonlinearity="relu", readout="global_avg_pool"),
            image_shape,
            inputs(math.prod(image_shape)),
        ),
        Family(
            "RNN (erf, last state)",
            RNNKernel((steps, features), nonlinearity="erf", readout="last", weight_variance=1.5),
            (features, steps),
            inputs(steps * features),
            time_major_to_channels_first(steps, features),
        ),
        transformer_family(inputs, steps, features),
    ]
    return [
        Family(f.name, f.kernel.to(DTYPE), f.in_shape, f.inputs, f.to_network_layout)
        for f in result  # every kernel in float64
    ]


def transformer_family(inputs: Callable[[int], torch.Tensor], steps: int, features: int) -> Family:
    # Sequences of tokens, time-major like the RNN's; the finite transformer takes (d, T) like the RNN.
    kernel = gpytorch_tp.TransformerKernel((steps, features), depth=1, readout="mean")
    return Family(
        "Transformer (1 block, mean readout)",
        kernel,
        (features, steps),
        inputs(steps * features),
        time_major_to_channels_first(steps, features),
    )


# %% [markdown]
# ## Empirical kernels and their error
#
# For the NNGP kernel each network gets a readout of ``width`` outputs: they are
# independent given the hidden features, so one network already averages many
# draws of the output, and ``n_networks`` networks average over the hidden
# features too.  The NTK of each network is exact for that network; we average
# it over ``n_networks`` networks as well.  Both estimates scatter around the
# limit by ``O(width^(-1/2))``: the deterministic finite-width bias is
# ``O(1 / width)``, smaller at every width we use.


# %%
def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


def empirical_kernel(family: Family, kind: str, width: int, n_networks: int, seed: int) -> torch.Tensor:
    x = family.to_network_layout(family.inputs)
    seeds = [seed + i for i in range(n_networks)]
    if kind == "nngp":
        return empirical_nngp(lambda i: family.network(width, width, seeds[i]), x, n_networks=n_networks)
    return sum(empirical_ntk(family.network(width, 1, s), x) for s in seeds) / n_networks


def convergence(family: Family, widths: list[int], n_networks: int, repeats: int, seed: int) -> dict[str, Tensor]:
    """Relative Frobenius errors ``(len(widths), repeats)`` of the empirical NNGP kernel and NTK.

    Each of the ``repeats`` estimates at a width uses its own ``n_networks`` fresh networks.
    """
    with torch.no_grad():
        exact = dict(zip(KINDS, family.kernel.nngp_and_ntk(family.inputs), strict=True))
    errors = {kind: torch.zeros(len(widths), repeats, dtype=DTYPE) for kind in KINDS}
    for kind in KINDS:
        for k, width in enumerate(widths):
            for r in range(repeats):
                estimate = empirical_kernel(family, kind, width, n_networks, seed=seed + 1000 * k + 100 * r)
                errors[kind][k, r] = relative_error(estimate, exact[kind])
    return errors


def rms(errors: Tensor) -> list[float]:
    """Root-mean-square error over the repeats, per width: the typical error."""
    return errors.pow(2).mean(-1).sqrt().tolist()


def fitted_slope(widths: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(width)."""
    log_w = torch.tensor(widths, dtype=DTYPE).log()
    log_e = torch.tensor(errors, dtype=DTYPE).log()
    log_w = log_w - log_w.mean()
    return (log_w @ (log_e - log_e.mean()) / (log_w @ log_w)).item()


# %% [markdown]
# ## The figure
#
# One panel per kernel, one line per family: the root-mean-square error over
# the repeats.  The dashed line has slope
# ``-1/2``, drawn through the geometric mean of the errors at the narrowest width.


# %%
def plot(widths: list[int], results: dict[str, dict[str, Tensor]]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    w = torch.tensor(widths, dtype=DTYPE)
    for ax, kind in zip(axes, KINDS, strict=True):
        first = [rms(errors[kind])[0] for errors in results.values()]
        anchor = math.exp(sum(math.log(e) for e in first) / len(first))
        ax.loglog(w, anchor * (w / w[0]) ** -0.5, "k--", lw=1, label=r"$\propto \mathrm{width}^{-1/2}$")
        for name, errors in results.items():
            typical = rms(errors[kind])
            slope = fitted_slope(widths, typical)
            ax.loglog(w, typical, "o-", ms=4, label=f"{name}: slope {slope:.2f}")
        ax.set_title(f"empirical {'NNGP kernel' if kind == 'nngp' else 'NTK'} vs the limit")
        ax.set_xlabel("hidden width (units / channels)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel(r"relative error $\|K_n - K\|_F \,/\, \|K\|_F$")
    fig.tight_layout()
    return fig


# %% [markdown]
# ## Putting it together


# %%
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Empirical kernels of finite networks converge to the limits.")
    parser.add_argument("--smoke", action="store_true", help="two small widths, one network per estimate (for tests)")
    parser.add_argument("--out", type=Path, default=FIGURE_DIR, help="directory for the figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    widths = [8, 128] if args.smoke else [16, 32, 64, 128, 256, 512, 1024]
    n_networks, repeats = (1, 2) if args.smoke else (1, 8)
    num_inputs = 4 if args.smoke else 6

    results, slopes = {}, {}
    for family in families(num_inputs, seed=args.seed):
        start = time.process_time()
        results[family.name] = convergence(family, widths, n_networks, repeats, seed=args.seed)
        slopes[family.name] = {kind: fitted_slope(widths, rms(results[family.name][kind])) for kind in KINDS}
        print(f"{family.name}  ({time.process_time() - start:.1f} s CPU)")
        for kind in KINDS:
            errors = "  ".join(f"{e:.4f}" for e in rms(results[family.name][kind]))
            print(
                f"  {kind:4s} rms relative error at widths {widths}: {errors}   slope {slopes[family.name][kind]:.2f}"
            )

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "wide_networks_are_gps.png"
    fig = plot(widths, results)
    fig.savefig(path, dpi=50 if args.smoke else 110)
    plt.close(fig)
    print(f"saved {path}")
    return {"widths": widths, "errors": results, "slopes": slopes, "figure": path}


if __name__ == "__main__":
    main()
