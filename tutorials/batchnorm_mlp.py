#!/usr/bin/env python3
"""BatchNorm-MLP kernels next to plain MLP kernels, on scikit-learn's diabetes data.

A network with BatchNorm normalises each unit over the *batch*, so its output
at a point depends on the other points of the batch.  Its infinite-width limit
(Yang et al. 2019, arXiv 1902.08129; :mod:`gpytorch_tp.batchnorm`) is a
Gaussian process over batches.  This tutorial

1. follows the correlation between the outputs at different points through
   depth, for a ReLU MLP (``MLPKernel``) and a BatchNorm + ReLU MLP
   (``batchnorm_mlp_nngp``, one batch): without BatchNorm every pair of points
   becomes perfectly correlated with depth (the kernel forgets its inputs);
   BatchNorm keeps the points apart;
2. compares GP regression on the diabetes data (442 patients, 10 features)
   with three kernels: the plain MLP NNGP, the BatchNorm-MLP NNGP of the
   whole data set taken as one batch (the network normalises over training
   and test points together: a valid GP over this finite set), and the
   pairwise ``BatchNormMLPKernel`` (every point normalised in a batch with a
   fixed reference set of training points).

The kernels' hyperparameters stay at their defaults (weight variance 2, bias
variance 0.1); each GP gets its output scale and noise by maximising the
marginal likelihood on a grid (cheap with one eigendecomposition).

Run it from the repository root::

    python tutorials/batchnorm_mlp.py            # figure: docs/figures/batchnorm_mlp.png
    python tutorials/batchnorm_mlp.py --smoke    # a few seconds, for the tests

The full run spends nearly all its time in the pairwise kernel (4,170 pairs of
points at depth 2, two-dimensional quadrature per pair and layer): 1,056 s of
wall time on a shared 2-core AMD EPYC under a load average of about 14.
Results and figure are in docs/batchnorm.md.

It needs matplotlib and scikit-learn (``pip install -e ".[tutorials]"``).
The ``# %%`` markers split the script into notebook cells.
"""

# %%
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from sklearn.datasets import load_diabetes

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

from gpytorch_tp import BatchNormMLPKernel, MLPKernel
from gpytorch_tp.batchnorm import batchnorm_mlp_nngp

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"


# %% [markdown]
# ## Data: standardised features and targets, a random split.


# %%
@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_data(num_train: int, num_test: int, seed: int) -> Data:
    features, targets = load_diabetes(return_X_y=True)
    x = torch.as_tensor(features, dtype=DTYPE)
    y = torch.as_tensor(targets, dtype=DTYPE)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    y = (y - y[train].mean()) / y[train].std()
    return Data(x[train], y[train], x[test], y[test])


# %% [markdown]
# ## 1. Correlations through depth
#
# The mean correlation $K_{ij} / \sqrt{K_{ii} K_{jj}}$ over pairs of distinct
# points of one batch, for depths 1 to D.


# %%
def mean_correlation(kernel: torch.Tensor) -> float:
    scale = kernel.diagonal().rsqrt()
    correlation = kernel * scale.unsqueeze(0) * scale.unsqueeze(1)
    off_diagonal = ~torch.eye(len(kernel), dtype=torch.bool)
    return correlation[off_diagonal].mean().item()


def correlations_through_depth(x: torch.Tensor, depths: list[int]) -> dict[str, list[float]]:
    result = {"ReLU MLP": [], "BatchNorm + ReLU MLP": []}
    for depth in depths:
        with torch.no_grad():
            plain = MLPKernel(depth=depth, weight_variance=2.0, bias_variance=0.1).to(DTYPE)(x).to_dense()
            result["ReLU MLP"].append(mean_correlation(plain))
            result["BatchNorm + ReLU MLP"].append(mean_correlation(batchnorm_mlp_nngp(x, depth=depth)))
    return result


# %% [markdown]
# ## 2. GP regression
#
# With $K = U \Lambda U^T$ on the training points, the log marginal likelihood
# of $y \sim N(0, c K + \sigma^2 I)$ costs O(N) per $(c, \sigma^2)$.


# %%
@dataclass
class Result:
    name: str
    rmse: float
    nlpd: float
    kernel_seconds: float


def fit_and_predict(name: str, k_train: torch.Tensor, k_cross: torch.Tensor, k_test_diag, data: Data, seconds):
    eigenvalues, vectors = torch.linalg.eigh(k_train)
    projected = vectors.T @ data.train_y
    scales = torch.logspace(-3, 3, 61, base=math.e, dtype=DTYPE).reshape(-1, 1, 1)
    noises = torch.logspace(-6, 1, 71, base=math.e, dtype=DTYPE).reshape(1, -1, 1)
    spectra = scales * eigenvalues.clamp_min(0) + noises  # (scales, noises, N)
    mll = -0.5 * ((projected**2 / spectra).sum(-1) + spectra.log().sum(-1))
    best = int(mll.argmax())
    scale, noise = scales.flatten()[best // mll.shape[1]].item(), noises.flatten()[best % mll.shape[1]].item()
    spectrum = scale * eigenvalues.clamp_min(0) + noise
    alpha = vectors @ (projected / spectrum)
    mean = scale * k_cross @ alpha
    reduced = vectors.T @ (scale * k_cross.T)
    variance = scale * k_test_diag - (reduced**2 / spectrum.unsqueeze(-1)).sum(0) + noise
    rmse = (mean - data.test_y).pow(2).mean().sqrt().item()
    nlpd = (0.5 * (variance.log() + (data.test_y - mean) ** 2 / variance + math.log(2 * math.pi))).mean().item()
    return Result(name, rmse, nlpd, seconds)


def regression(data: Data, depth: int, num_reference: int, seed: int) -> list[Result]:
    results = []
    with torch.no_grad():
        start = time.perf_counter()
        plain = MLPKernel(depth=depth, weight_variance=2.0, bias_variance=0.1).to(DTYPE)
        k = (plain(data.train_x).to_dense(), plain(data.test_x, data.train_x).to_dense())
        diag = plain(data.test_x, diag=True)
        results.append(fit_and_predict("ReLU MLP NNGP", *k, diag, data, time.perf_counter() - start))

        start = time.perf_counter()
        everything = torch.cat([data.train_x, data.test_x])
        whole = batchnorm_mlp_nngp(everything, depth=depth)
        n = len(data.train_x)
        k = (whole[:n, :n], whole[n:, :n], whole[n:, n:].diagonal())
        results.append(fit_and_predict("BN-MLP NNGP, one batch", *k, data, time.perf_counter() - start))

        start = time.perf_counter()
        generator = torch.Generator().manual_seed(seed + 1)
        reference = data.train_x[torch.randperm(n, generator=generator)[:num_reference]]
        pairwise = BatchNormMLPKernel(reference, depth=depth, accuracy="fast").to(DTYPE)
        k = (pairwise(data.train_x).to_dense(), pairwise(data.test_x, data.train_x).to_dense())
        diag = pairwise(data.test_x, diag=True)
        name = f"BN-MLP NNGP, reference set of {num_reference}"
        results.append(fit_and_predict(name, *k, diag, data, time.perf_counter() - start))
    return results


# %% [markdown]
# ## Figure and main


# %%
def plot(depths, correlations, results):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, values in correlations.items():
        left.plot(depths, values, marker="o", label=name)
    left.set_xlabel("depth (hidden layers)")
    left.set_ylabel("mean correlation of distinct points")
    left.set_title("NNGP correlations through depth (one batch)")
    left.legend()
    names = [r.name for r in results]
    right.barh(range(len(results)), [r.rmse for r in results], color=["C0", "C1", "C2"][: len(results)])
    right.set_yticks(range(len(results)), names)
    right.set_xlabel("test RMSE (standardised targets)")
    right.set_title("GP regression, diabetes")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="BatchNorm-MLP kernels vs MLP kernels on the diabetes data.")
    parser.add_argument("--smoke", action="store_true", help="tiny problem (for tests)")
    parser.add_argument("--out", type=Path, default=FIGURE_DIR, help="directory for the figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    num_train, num_test = (8, 5) if args.smoke else (60, 40)
    depths = [1, 2, 3] if args.smoke else [1, 2, 3, 4, 6, 8, 12]
    depth, num_reference = (1, 2) if args.smoke else (2, 6)
    data = load_data(num_train, num_test, args.seed)

    correlations = correlations_through_depth(data.train_x[: min(32, num_train)], depths)
    print("mean correlation of distinct points, by depth", depths)
    for name, values in correlations.items():
        print(f"  {name:22s} " + " ".join(f"{v:.3f}" for v in values))

    results = regression(data, depth, num_reference, args.seed)
    print(f"GP regression on diabetes, depth {depth}: {num_train} training and {num_test} test points")
    for r in results:
        print(f"  {r.name:38s} test RMSE {r.rmse:.3f}  test NLPD {r.nlpd:.3f}  kernel time {r.kernel_seconds:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "batchnorm_mlp.png"
    fig = plot(depths, correlations, results)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    return {"figure": path, "correlations": correlations, "depths": depths, "results": results}


if __name__ == "__main__":
    main()
