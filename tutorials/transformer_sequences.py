#!/usr/bin/env python3
"""Classifying digits read row by row with the kernels of infinitely wide transformers.

scikit-learn's ``digits`` (1,797 grey-scale 8 x 8 images of 0-9), read top to
bottom, are sequences of 8 tokens (the rows) of 8 features (the pixels).  This
tutorial classifies them with Gaussian processes whose kernels are the NNGP
kernel and the NTK of an infinitely wide post-LayerNorm transformer
(``TransformerKernel``: token embedding, learned positional embedding, one
block of self-attention + residual + LayerNorm + ReLU MLP + residual +
LayerNorm, mean over the tokens, dense output), in three variants:

* ``tied``: query and key weights tied, logits scaled by 1/n, so the limiting
  attention is the softmax of the tokens' covariance (Hron et al. 2020);
* ``uniform``: independent query and key weights, whose 1/n-scaled logits
  vanish at infinite width: every token attends to all tokens equally;
* ``causal``: tied, with a causal mask and the last token read out (a decoder);

next to GPyTorch's RBF kernel on the 64 pixels.  A second experiment cuts every
digit after a random number of rows (3 to 8): the transformer kernels take
these sequences of different lengths in one tensor, padded at the end with
NaN steps (padding never changes a kernel value); the RBF kernel sees the
missing rows as blank rows.

Classification is done "as regression" (centred one-hot targets, one GP per
class sharing the kernel); the logit scale :math:`\\sigma_{qk}^2` and the
noise are chosen by leave-one-out accuracy on the training set.

Run it from the repository root::

    python tutorials/transformer_sequences.py            # the figure goes to docs/figures/
    python tutorials/transformer_sequences.py --smoke    # seconds, for the tests

The results of the full run are in docs/attention.md.  It needs matplotlib and
scikit-learn (``pip install -e ".[tutorials]"``).  ``# %%`` markers split the
script into notebook cells.
"""

# %%
from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import gpytorch
import matplotlib
import torch
from sklearn.datasets import load_digits

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

from gpytorch_tp import TransformerKernel

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"
STEPS, FEATURES = 8, 8
NUM_CLASSES = 10
MIN_ROWS = 3

# %% [markdown]
# ## Data
#
# scikit-learn stores each image row after row: the time-major flattening of a
# `(T, d) = (8, 8)` sequence that `TransformerKernel(input_shape=(8, 8))`
# expects.  Pixels are divided by their root mean square over the training
# digits.  For the second experiment every digit keeps its first L rows
# (L uniform in 3..8) and the rest become NaN.


# %%
@dataclass
class Digits:
    train_x: torch.Tensor
    train_labels: torch.Tensor
    test_x: torch.Tensor
    test_labels: torch.Tensor
    test_rows: torch.Tensor


def load_data(num_train: int, num_test: int, seed: int = 0) -> Digits:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=DTYPE)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    scale = x[train].pow(2).mean().sqrt()
    return Digits(x[train] / scale, labels[train], x[test] / scale, labels[test], torch.full((num_test,), STEPS))


def cut(data: Digits, seed: int = 0) -> Digits:
    g = torch.Generator().manual_seed(seed + 1)

    def truncate(x):
        rows = torch.randint(MIN_ROWS, STEPS + 1, (len(x),), generator=g)
        steps = x.reshape(len(x), STEPS, FEATURES).clone()
        steps[torch.arange(STEPS) >= rows.unsqueeze(-1)] = float("nan")
        return steps.reshape(len(x), STEPS * FEATURES), rows

    (train_x, _), (test_x, test_rows) = truncate(data.train_x), truncate(data.test_x)
    return Digits(train_x, data.train_labels, test_x, data.test_labels, test_rows)


# %% [markdown]
# ## Kernels
#
# Each method maps training and test inputs to *candidates*: pairs of
# matrices $K(X, X)$, $K(X_*, X)$, one per hyperparameter setting.
# `nngp_and_ntk` returns both kernels from one pass.  The MLP's first layer
# gets weight variance 2 (it feeds a ReLU), the rest keep their defaults.


# %%
Candidates = dict[str, tuple[torch.Tensor, torch.Tensor]]

VARIANTS = {
    "tied": {"query_key": "tied", "readout": "mean"},
    "uniform": {"query_key": "independent", "readout": "mean"},
    "causal": {"query_key": "tied", "readout": "last", "causal": True},
}
LOGIT_SCALES = (0.5, 2.0, 8.0)


def transformer_candidates(variant: str, scales, train_x, test_x) -> dict[str, Candidates]:
    out = {"nngp": {}, "ntk": {}}
    tied = VARIANTS[variant]["query_key"] == "tied"
    for scale in scales if tied else scales[:1]:  # the uniform limit does not depend on the scale
        kernel = TransformerKernel(
            (STEPS, FEATURES), positional="add", query_key_variance=scale, mlp_weight_variance=2.0, **VARIANTS[variant]
        ).to(DTYPE)
        with torch.no_grad():
            train, test = kernel.nngp_and_ntk(train_x), kernel.nngp_and_ntk(test_x, train_x)
        for i, kind in enumerate(("nngp", "ntk")):
            out[kind][f"sigma_qk^2={scale:g}" if tied else "uniform attention"] = (train[i], test[i])
    return out


def rbf_candidates(train_x, test_x) -> Candidates:
    train_x, test_x = torch.nan_to_num(train_x), torch.nan_to_num(test_x)
    median = torch.pdist(train_x).median()
    kernel = gpytorch.kernels.RBFKernel().to(DTYPE)
    out = {}
    with torch.no_grad():
        for factor in (0.35, 0.5, 0.7, 1.0, 1.4):
            kernel.lengthscale = factor * median
            out[f"lengthscale={factor:g}*median"] = (kernel(train_x).to_dense(), kernel(test_x, train_x).to_dense())
    return out


# %% [markdown]
# ## Classification as regression, hyperparameters by leave-one-out
#
# With $A = (K + \sigma^2 I)^{-1}$ the leave-one-out prediction of $y_i$ is
# $y_i - [A Y]_i / A_{ii}$ (Rasmussen & Williams 2006, eq. 5.12); the noise is
# relative to the kernel's mean diagonal.


# %%
NOISE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def targets(labels):
    return torch.nn.functional.one_hot(labels, NUM_CLASSES).to(DTYPE) - 1.0 / NUM_CLASSES


def _cholesky(k, ratio):
    return torch.linalg.cholesky(k + ratio * k.diagonal().mean() * torch.eye(len(k), dtype=k.dtype))


def select_and_predict(candidates: Candidates, labels, n: int):
    labels = labels[:n]
    y = targets(labels)
    scores = {}
    for name, (k_train, _) in candidates.items():
        for ratio in NOISE_GRID:
            try:
                inverse = torch.cholesky_inverse(_cholesky(k_train[:n, :n], ratio))
            except torch.linalg.LinAlgError:
                continue
            residuals = (inverse @ y) / inverse.diagonal().unsqueeze(-1)
            accuracy = ((y - residuals).argmax(-1) == labels).double().mean().item()
            scores[(name, ratio)] = (accuracy, -residuals.pow(2).mean().item())
    name, ratio = max(scores, key=scores.get)
    k_train, k_test = candidates[name]
    weights = torch.cholesky_solve(y, _cholesky(k_train[:n, :n], ratio))
    return (k_test[:, :n] @ weights).argmax(-1), f"{name} noise={ratio:g}".strip()


# %% [markdown]
# ## The experiments


# %%
@dataclass
class Result:
    name: str
    accuracy: dict[int, float] = field(default_factory=dict)
    chosen: dict[int, str] = field(default_factory=dict)
    predictions: dict[int, torch.Tensor] = field(default_factory=dict)
    kernel_seconds: float = 0.0


def run(data: Digits, sizes: list[int], scales) -> list[Result]:
    methods = {f"transformer-{v}": functools.partial(transformer_candidates, v, scales) for v in VARIANTS}
    methods["rbf"] = lambda a, b: {"rbf": rbf_candidates(a, b)}
    results = []
    for method, matrices in methods.items():
        start = time.perf_counter()
        kernels = matrices(data.train_x, data.test_x)
        seconds = time.perf_counter() - start
        for kind, candidates in kernels.items():
            name = "RBF (pixels)" if method == "rbf" else f"{method.split('-')[1]} {kind.upper()}"
            result = Result(name, kernel_seconds=seconds)
            for n in sizes:
                predictions, chosen = select_and_predict(candidates, data.train_labels, n)
                result.accuracy[n] = (predictions == data.test_labels).double().mean().item()
                result.chosen[n], result.predictions[n] = chosen, predictions
            results.append(result)
            print(
                f"  {name:16s} accuracy at N={sizes[-1]}: {result.accuracy[sizes[-1]]:.3f}  "
                f"(kernels {seconds:.1f} s; {result.chosen[sizes[-1]]})",
                flush=True,
            )
    return results


def accuracy_by_rows(result: Result, data: Digits, n: int) -> dict[int, float]:
    correct = result.predictions[n] == data.test_labels
    return {rows: correct[data.test_rows == rows].double().mean().item() for rows in range(MIN_ROWS, STEPS + 1)}


# %% [markdown]
# ## Figure: accuracy against training size (left), and by rows seen for cut digits (right)


# %%
def plot(full: list[Result], cut_results: list[Result], sizes: list[int], cut_data: Digits):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    markers = "osDv^<>p"
    for marker, r in zip(markers, full):
        left.plot(sizes, [100 * r.accuracy[n] for n in sizes], marker=marker, lw=1.5, ms=5, label=r.name)
    left.set_xscale("log")
    left.set_xticks(sizes)
    left.set_xticklabels([str(n) for n in sizes])
    left.minorticks_off()
    left.set_xlabel("training digits")
    left.set_ylabel(f"test accuracy (%), {len(cut_data.test_labels)} digits")
    left.set_title("transformer kernels, digits as 8 tokens of 8 pixels", fontsize=11)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    n = sizes[-1]
    rows = list(range(MIN_ROWS, STEPS + 1))
    for marker, r in zip(markers, cut_results):
        by_rows = accuracy_by_rows(r, cut_data, n)
        right.plot(
            rows,
            [100 * by_rows[k] for k in rows],
            marker=marker,
            lw=1.5,
            ms=5,
            label=f"{r.name}: {100 * r.accuracy[n]:.1f}%",
        )
    right.set_xlabel("rows of the test digit seen (the rest: NaN padding; 0 for RBF)")
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"digits cut after 3-8 rows, N={n}", fontsize=11)
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="lower right", title="overall accuracy", title_fontsize=8)
    return fig


# %%
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="GP classification of digits read as sequences, transformer kernels.")
    parser.add_argument("--smoke", action="store_true", help="tiny problem, one logit scale (for tests)")
    parser.add_argument("--out", type=Path, default=FIGURE_DIR, help="directory for the figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", help="training sizes (default 50 100 200 500)")
    parser.add_argument("--num-test", type=int, help="test digits (default 500)")
    args = parser.parse_args(argv)

    sizes = sorted(args.sizes or ([40] if args.smoke else [50, 100, 200, 500]))
    num_test = args.num_test or (30 if args.smoke else 500)
    scales = (2.0,) if args.smoke else LOGIT_SCALES
    data = load_data(sizes[-1], num_test, seed=args.seed)
    cut_data = cut(data, seed=args.seed)
    start = time.perf_counter()
    print(f"digits as {STEPS} tokens of {FEATURES} pixels: {sizes[-1]} training (subsets {sizes}), {num_test} test")
    full = run(data, sizes, scales)
    print(f"\nwhole digits, test accuracy (chance 0.100); columns N = {sizes}")
    for r in full:
        print(f"  {r.name:16s}" + "".join(f"  {r.accuracy[n]:.3f}" for n in sizes))
    print(f"\ndigits cut after {MIN_ROWS}..{STEPS} rows (NaN-padded)")
    cut_results = run(cut_data, sizes[-1:], scales)
    print("test accuracy by rows seen:  " + " ".join(f"{k:>5d}" for k in range(MIN_ROWS, STEPS + 1)))
    for r in cut_results:
        by_rows = accuracy_by_rows(r, cut_data, sizes[-1])
        print(f"  {r.name:16s}            " + " ".join(f"{by_rows[k]:5.2f}" for k in range(MIN_ROWS, STEPS + 1)))
    print(f"\ntotal wall time: {time.perf_counter() - start:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "transformer_sequences.png"
    fig = plot(full, cut_results, sizes, cut_data)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    return {"results": full, "cut_results": cut_results, "sizes": sizes, "figure": path, "cut_data": cut_data}


if __name__ == "__main__":
    main()
