#!/usr/bin/env python3
"""Classifying digits read row by row, as sequences, with the kernels of infinitely wide RNNs.

scikit-learn ships ``digits``: 1,797 grey-scale 8 x 8 images of the digits 0-9.
Read top to bottom, an image is a sequence of 8 steps (its rows), each a vector
of 8 pixels.  This tutorial classifies these sequences with Gaussian processes
whose kernels are

* the NNGP kernel of an infinitely wide simple (Elman) ReLU RNN, reading out the
  last state (``RNNKernel(input_shape=(8, 8), readout="last")``) or the mean of
  the states over time (``readout="mean"``),
* the NTKs of the same two networks (from the same pass: ``nngp_and_ntk``),
* the NNGP kernel of a 3-hidden-layer ReLU MLP on the 64 pixels (``MLPKernel``),
* GPyTorch's RBF kernel on the 64 pixels, for reference,

and compares their test accuracy and cost.  A second experiment cuts every
digit, training and test alike, after a random number of rows (3 to 8): the RNN
kernels take these sequences of different lengths in one tensor, each padded
at the end with whole steps of NaN, and padding never changes a kernel value.
The MLP and RBF kernels, which need a fixed-length vector, see the missing rows
as blank (zero) rows.

Classification is done "as regression": the labels become centred one-hot
vectors, one GP regression per class (all sharing one kernel, so one Cholesky
factorisation serves all ten), and the prediction is the class with the
largest posterior mean.  Hyperparameters (the RNNs' recurrent weight variance,
the RBF lengthscale, and the noise of every method) are chosen from small grids
by leave-one-out accuracy on the training set.

Run it from the repository root::

    python tutorials/rnn_sequences.py            # the figure goes to docs/figures/rnn_sequences.png
    python tutorials/rnn_sequences.py --smoke    # a few seconds, for the tests
    python tutorials/rnn_sequences.py --gated --sizes 50 100 200 --num-test 200   # with GRU and LSTM kernels

The full run (training sets of 50 to 1000 digits, 500 test digits, both
experiments) took 120 s of CPU time on one core of a 2-core AMD EPYC
(``OMP_NUM_THREADS=1``; 3.6 minutes of wall time on the machine shared with
other jobs), 87 s of it in the mean-readout RNN kernels, which need all 8 x 8
step pairs of every pair of sequences; the last-state readout needs only the 8
aligned step pairs (5 s).  The smoke run needs about a second besides the
imports.  The results are in docs/rnn.md.

It needs matplotlib and scikit-learn (``pip install -e ".[tutorials]"``).
The ``# %%`` markers split the script into notebook cells.
"""

# %% [markdown]
# ## Setup
#
# float64 throughout: the noise chosen below can be tiny (the GPs nearly
# interpolate the labels), and Cholesky factorisations of such ill-conditioned
# matrices need double precision.

# %%
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gpytorch
import matplotlib
import torch
from sklearn.datasets import load_digits

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

from gpytorch_tp import GRUKernel, LSTMKernel, MLPKernel, RNNKernel

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"
STEPS, FEATURES = 8, 8  # rows of the image, pixels per row
NUM_CLASSES = 10
MIN_ROWS = 3  # the shortest cut sequences of the second experiment


# %% [markdown]
# ## Data
#
# scikit-learn stores each image as its 64 pixels row after row: exactly the
# time-major flattening of a `(T, d) = (8, 8)` sequence that
# `RNNKernel(input_shape=(8, 8))` expects.  The kernels of networks have no
# lengthscale, so the scale of the inputs matters: we divide by the root mean
# square pixel of the training digits, so that a step's $\langle x_t, x_t \rangle / d$
# is about one.
#
# For the second experiment every digit keeps its first $L$ rows, with $L$
# drawn uniformly from 3..8; its remaining rows become NaN (for the RNN
# kernels) or 0 (for the MLP and RBF kernels).


# %%
@dataclass
class Digits:
    train_x: torch.Tensor  # (N, 64), scaled; NaN rows after a cut sequence's end
    train_labels: torch.Tensor
    test_x: torch.Tensor
    test_labels: torch.Tensor
    train_rows: torch.Tensor  # (N,) rows kept (8 = the whole digit)
    test_rows: torch.Tensor


def load_data(num_train: int, num_test: int, seed: int = 0) -> Digits:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=DTYPE)
    labels = torch.tensor(digits.target)
    if num_train + num_test > len(x):
        raise ValueError(f"digits has {len(x)} images, asked for {num_train} + {num_test}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    scale = x[train].pow(2).mean().sqrt()
    rows = torch.full((num_train,), STEPS), torch.full((num_test,), STEPS)  # every digit whole
    return Digits(x[train] / scale, labels[train], x[test] / scale, labels[test], *rows)


def cut(data: Digits, seed: int = 0) -> Digits:
    """Every digit keeps its first L rows (L uniform in MIN_ROWS..8); the other rows become NaN."""
    g = torch.Generator().manual_seed(seed + 1)

    def truncate(x):
        rows = torch.randint(MIN_ROWS, STEPS + 1, (len(x),), generator=g)
        steps = x.reshape(len(x), STEPS, FEATURES).clone()
        steps[torch.arange(STEPS) >= rows.unsqueeze(-1)] = float("nan")
        return steps.reshape(len(x), STEPS * FEATURES), rows

    (train_x, train_rows), (test_x, test_rows) = truncate(data.train_x), truncate(data.test_x)
    return Digits(train_x, data.train_labels, test_x, data.test_labels, train_rows, test_rows)


def zero_filled(x: torch.Tensor) -> torch.Tensor:
    """What a fixed-length kernel sees of a cut digit: the missing rows as blank rows."""
    return torch.nan_to_num(x, nan=0.0)


# %% [markdown]
# ## Kernels
#
# Each method maps the training and test inputs to one or more *candidates*:
# kernel matrices $K(X, X)$ and $K(X_*, X)$ (the test-test block is never
# needed: we only predict means), one per hyperparameter setting on its grid.
#
# The RNN (one ReLU layer, then a readout and a dense output layer) has three
# variances: recurrent weights $\sigma_w^2$, input weights $\sigma_u^2$ and
# biases $\sigma_b^2$.  Only their ratios matter for the posterior mean (an
# overall scale is absorbed by the noise, chosen relative to the kernel's
# scale), so we keep $\sigma_u^2 = 1$, $\sigma_b^2 = 0.1$ and try a few
# $\sigma_w^2$: how strongly the earlier rows echo in the later states.  For
# ReLU, $\sigma_w^2 < 2$ keeps the state variance bounded over time.
# `nngp_and_ntk` gives the NNGP kernel and the NTK in one pass.
#
# The RBF kernel gets a grid of lengthscales around the median distance between
# training digits; the MLP keeps its defaults (ReLU, $\sigma_w^2 = 2$, $\sigma_b^2 = 0.1$).


# %%
Candidates = dict[str, tuple[torch.Tensor, torch.Tensor]]  # candidate -> (K(X, X), K(X*, X))

RECURRENT_VARIANCES = (0.5, 1.0, 1.5)
RBF_LENGTHSCALE_FACTORS = (0.35, 0.5, 0.7, 1.0, 1.4)


def rnn_candidates(readout: str, recurrent_variances) -> Callable[[torch.Tensor, torch.Tensor], dict[str, Candidates]]:
    """NNGP and NTK candidates of the ReLU RNN with this readout, one per recurrent weight variance."""

    def matrices(train_x, test_x):
        out = {"nngp": {}, "ntk": {}}
        for w in recurrent_variances:
            kernel = RNNKernel((STEPS, FEATURES), nonlinearity="relu", readout=readout).to(DTYPE)
            kernel.architecture[0].weight_variance = w
            with torch.no_grad():
                train, test = kernel.nngp_and_ntk(train_x), kernel.nngp_and_ntk(test_x, train_x)
            for i, kind in enumerate(("nngp", "ntk")):
                out[kind][f"sigma_w^2={w:g}"] = (train[i], test[i])
        return out

    return matrices


# Gated networks (``--gated``): the NNGP kernels of an infinitely wide GRU and LSTM
# (``torch.nn.GRU``/``LSTM`` cells, sigmoid gates, tanh), last-state readout.  Their
# kernels are quasi-Monte Carlo estimates over the gates (see docs/rnn.md) and cost
# O(M T^2) per pair of sequences, far more than the simple RNN's: the tutorial runs
# them only when asked, on the smaller training sets.
GATED_PARTICLES = 256
GATED_MAX_TRAIN = 200


def gated_candidates(kernel_class) -> Callable[[torch.Tensor, torch.Tensor], Candidates]:
    """The NNGP candidate of a gated network (``GRUKernel`` or ``LSTMKernel``), last state."""

    def matrices(train_x, test_x):
        kernel = kernel_class((STEPS, FEATURES), num_particles=GATED_PARTICLES).to(DTYPE)
        with torch.no_grad():
            return {"": (kernel(train_x).to_dense(), kernel(test_x, train_x).to_dense())}

    return matrices


def mlp_candidates(train_x, test_x) -> Candidates:
    kernel = MLPKernel(depth=3, nonlinearity="relu", kind="nngp").to(DTYPE)
    train_x, test_x = zero_filled(train_x), zero_filled(test_x)
    with torch.no_grad():
        return {"": (kernel(train_x).to_dense(), kernel(test_x, train_x).to_dense())}


def rbf_candidates(train_x, test_x) -> Candidates:
    train_x, test_x = zero_filled(train_x), zero_filled(test_x)
    median = torch.pdist(train_x).median()
    kernel = gpytorch.kernels.RBFKernel().to(DTYPE)
    out = {}
    with torch.no_grad():
        for factor in RBF_LENGTHSCALE_FACTORS:
            kernel.lengthscale = factor * median
            out[f"lengthscale={factor:g}*median"] = (kernel(train_x).to_dense(), kernel(test_x, train_x).to_dense())
    return out


@dataclass
class Method:
    """One or more kernels computed in one pass: ``matrices(train_x, test_x) -> {name: candidates}``."""

    matrices: Callable[[torch.Tensor, torch.Tensor], dict[str, Candidates]]


def make_methods(recurrent_variances, gated: bool = False) -> dict[str, Method]:
    def single(name, fn):
        return lambda train_x, test_x: {name: fn(train_x, test_x)}

    def renamed(fn, names):
        return lambda train_x, test_x: {names[k]: v for k, v in fn(train_x, test_x).items()}

    methods = {
        "rnn-last": Method(
            renamed(
                rnn_candidates("last", recurrent_variances),
                {"nngp": "RNN NNGP, last state", "ntk": "RNN NTK, last state"},
            )
        ),
        "rnn-mean": Method(
            renamed(
                rnn_candidates("mean", recurrent_variances),
                {"nngp": "RNN NNGP, mean over time", "ntk": "RNN NTK, mean over time"},
            )
        ),
        "mlp": Method(single("MLP NNGP (depth 3)", mlp_candidates)),
        "rbf": Method(single("RBF (lengthscale by LOO)", rbf_candidates)),
    }
    if gated:
        methods["gru"] = Method(single("GRU NNGP, last state", gated_candidates(GRUKernel)))
        methods["lstm"] = Method(single("LSTM NNGP, last state", gated_candidates(LSTMKernel)))
    return methods


# %% [markdown]
# ## Classification as regression
#
# Targets: the one-hot label minus $1/10$.  With $Y$ the $N \times 10$ target
# matrix, the posterior means at the test digits are
# $K(X_*, X) (K(X, X) + \sigma^2 I)^{-1} Y$.  The noise is set relative to the
# kernel's scale, $\sigma^2 = \lambda \cdot \mathrm{mean}_i K(x_i, x_i)$, and
# $\lambda$ (with the candidate kernel) is chosen by leave-one-out accuracy on
# the training set, which for a GP comes in closed form from the same inverse
# (Rasmussen & Williams 2006, eq. 5.12): with $A = (K + \sigma^2 I)^{-1}$, the
# prediction for $x_i$ from the other points is $y_i - [A Y]_i / A_{ii}$.  Ties
# are broken by the leave-one-out squared error.


# %%
NOISE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def targets(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, NUM_CLASSES).to(DTYPE) - 1.0 / NUM_CLASSES


def _cholesky(k_train: torch.Tensor, ratio: float) -> torch.Tensor:
    noise = ratio * k_train.diagonal().mean()
    return torch.linalg.cholesky(k_train + noise * torch.eye(len(k_train), dtype=k_train.dtype))


def leave_one_out(k_train: torch.Tensor, labels: torch.Tensor, ratio: float) -> tuple[float, float]:
    """Leave-one-out (accuracy, mean squared error) of the regression on centred one-hot targets."""
    y = targets(labels)
    inverse = torch.cholesky_inverse(_cholesky(k_train, ratio))
    residuals = (inverse @ y) / inverse.diagonal().unsqueeze(-1)
    return ((y - residuals).argmax(-1) == labels).double().mean().item(), residuals.pow(2).mean().item()


def select_and_predict(candidates: Candidates, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, str]:
    """Test predictions of the best (candidate, noise) by leave-one-out on the first ``n`` training digits."""
    labels = labels[:n]
    scores = {}
    for name, (k_train, _) in candidates.items():
        for ratio in NOISE_GRID:
            try:
                accuracy, mse = leave_one_out(k_train[:n, :n], labels, ratio)
            except torch.linalg.LinAlgError:  # too little noise for this kernel
                continue
            scores[(name, ratio)] = (accuracy, -mse)
    name, ratio = max(scores, key=scores.get)
    k_train, k_test = candidates[name]
    factor = _cholesky(k_train[:n, :n], ratio)
    predictions = (k_test[:, :n] @ torch.cholesky_solve(targets(labels), factor)).argmax(-1)
    return predictions, f"{name} noise={ratio:g}".strip()


# %% [markdown]
# ## The experiments
#
# For each method: compute the kernel matrices once, for the largest training
# set, and slice out the nested smaller ones.  We time the kernel evaluation
# (CPU time of this process; wall time too, which is the same with one thread on
# an idle machine).


# %%
@dataclass
class Result:
    name: str
    accuracy: dict[int, float] = field(default_factory=dict)  # training size -> test accuracy
    chosen: dict[int, str] = field(default_factory=dict)
    predictions: dict[int, torch.Tensor] = field(default_factory=dict)
    kernel_seconds: float = 0.0
    kernel_cpu_seconds: float = 0.0
    shared: bool = False  # computed in the same pass as the row above


def run(methods: dict[str, Method], data: Digits, sizes: list[int]) -> list[Result]:
    results = []
    for method in methods.values():
        start, cpu_start = time.perf_counter(), time.process_time()
        kernels = method.matrices(data.train_x, data.test_x)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        for i, (name, candidates) in enumerate(kernels.items()):
            result = Result(name, kernel_seconds=wall, kernel_cpu_seconds=cpu, shared=i > 0)
            for n in sizes:
                predictions, chosen = select_and_predict(candidates, data.train_labels, n)
                result.accuracy[n] = (predictions == data.test_labels).double().mean().item()
                result.chosen[n] = chosen
                result.predictions[n] = predictions
            results.append(result)
            print(
                f"  {name:28s} accuracy at N={sizes[-1]}: {result.accuracy[sizes[-1]]:.3f}  "
                f"(kernels: {wall:.1f} s wall, {cpu:.1f} s cpu)",
                flush=True,
            )
    return results


def accuracy_by_rows(result: Result, data: Digits, n: int) -> dict[int, float]:
    """Test accuracy of the cut digits, by the number of rows kept."""
    correct = result.predictions[n] == data.test_labels
    return {rows: correct[data.test_rows == rows].double().mean().item() for rows in range(MIN_ROWS, STEPS + 1)}


def print_table(title: str, results: list[Result], sizes: list[int], num_test: int) -> None:
    columns = "".join(f"  N={n:<5d}" for n in sizes)
    print(
        f"\n{title}: test accuracy on {num_test} digits (chance 0.100); kernel time for N={sizes[-1]} + {num_test} digits"
    )
    print(f"{'kernel':28s}{columns}  kernel wall/cpu s  selected at N={sizes[-1]}")
    for r in results:
        accuracies = "".join(f"  {r.accuracy[n]:7.3f}" for n in sizes)
        seconds = "(above)" if r.shared else f"{r.kernel_seconds:.2f} / {r.kernel_cpu_seconds:.2f}"
        print(f"{r.name:28s}{accuracies}  {seconds:>17s}  {r.chosen[sizes[-1]]}")
    if any(r.shared for r in results):
        print("(above): the NTK comes from the same pass as the NNGP kernel in the row above")


# %% [markdown]
# ## Figure
#
# Left: test accuracy against the number of training digits (whole digits).
# Right: the second experiment, test accuracy against the number of rows of
# the test digit that the model saw.


# %%
def plot(
    full: list[Result],
    cut_results: list[Result],
    sizes: list[int],
    cut_data: Digits,
    left_title: str = "whole digits, read as 8 rows of 8 pixels",
    right_title: str = "digits cut after 3-8 rows (train and test)",
    right_xlabel: str = "rows of the test digit seen (the rest: NaN padding, or 0 for MLP/RBF)",
) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    markers = "osDv^<>"
    for marker, r in zip(markers, full):
        left.plot(sizes, [100 * r.accuracy[n] for n in sizes], marker=marker, lw=1.6, ms=5, label=r.name)
    left.set_xscale("log")
    left.set_xticks(sizes)
    left.set_xticklabels([str(n) for n in sizes])
    left.minorticks_off()
    left.set_xlabel("training digits")
    left.set_ylabel(f"test accuracy (%), {len(cut_data.test_labels)} digits")
    left.set_title(left_title, fontsize=11)
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
            lw=1.6,
            ms=5,
            label=f"{r.name}: {100 * r.accuracy[n]:.1f}%",
        )
    right.set_xlabel(right_xlabel)
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"{right_title}, N={n}", fontsize=11)
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="lower right", title="overall accuracy", title_fontsize=8)
    return fig


# %% [markdown]
# ## Putting it together


# %%
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description="GP classification of scikit-learn's digits read as sequences of rows."
    )
    parser.add_argument("--smoke", action="store_true", help="tiny problem, one hyperparameter setting (for tests)")
    parser.add_argument("--out", type=Path, default=FIGURE_DIR, help="directory for the figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", help="training-set sizes (default 50 100 200 500 1000)")
    parser.add_argument("--num-test", type=int, help="test digits (default 500)")
    parser.add_argument(
        "--gated", action="store_true", help=f"also GRU and LSTM kernels (training sets up to {GATED_MAX_TRAIN})"
    )
    args = parser.parse_args(argv)

    sizes = sorted(args.sizes or ([60] if args.smoke else [50, 100, 200, 500, 1000]))
    if args.gated:
        sizes = [n for n in sizes if n <= GATED_MAX_TRAIN] or [min(sizes[0], GATED_MAX_TRAIN)]
    num_test = args.num_test or (40 if args.smoke else 500)
    methods = make_methods((1.0,) if args.smoke else RECURRENT_VARIANCES, gated=args.gated)
    data = load_data(sizes[-1], num_test, seed=args.seed)
    cut_data = cut(data, seed=args.seed)
    start = time.process_time()

    print(f"digits as sequences of {STEPS} rows: {sizes[-1]} training (nested subsets {sizes}), {num_test} test")
    full = run(methods, data, sizes)
    print_table("whole digits", full, sizes, num_test)

    lengths = torch.bincount(cut_data.train_rows, minlength=STEPS + 1)[MIN_ROWS:].tolist()
    print(f"\ndigits cut after {MIN_ROWS}..{STEPS} rows (training digits per length: {lengths})")
    cut_results = run(methods, cut_data, sizes[-1:])
    print_table("cut digits", cut_results, sizes[-1:], num_test)
    print("test accuracy by rows seen:", " ".join(f"{k:>5d}" for k in range(MIN_ROWS, STEPS + 1)))
    for r in cut_results:
        by_rows = accuracy_by_rows(r, cut_data, sizes[-1])
        print(f"  {r.name:28s}      " + " ".join(f"{by_rows[k]:5.2f}" for k in range(MIN_ROWS, STEPS + 1)))
    print(f"\ntotal CPU time: {time.process_time() - start:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rnn_sequences.png"
    fig = plot(full, cut_results, sizes, cut_data)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    return {"results": full, "cut_results": cut_results, "sizes": sizes, "figure": path, "cut_data": cut_data}


if __name__ == "__main__":
    main()
