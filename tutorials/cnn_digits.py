#!/usr/bin/env python3
"""Classifying handwritten digits with the kernels of infinitely wide CNNs.

scikit-learn ships a small image dataset, ``digits``: 1,797 grey-scale 8 x 8
images of the digits 0-9.  This tutorial classifies them with Gaussian
processes whose kernels are

* the NNGP kernel and the NTK of an infinitely wide 3-layer ReLU CNN with
  3 x 3 filters and global average pooling
  (``CNNKernel(input_shape=(1, 8, 8), depth=3, readout="global_avg_pool")``),
* the NNGP kernel of the same CNN with a Flatten readout
  (``readout="flatten"``),
* the NNGP kernel of a 3-hidden-layer ReLU MLP on the 64 pixels (``MLPKernel``),
* GPyTorch's RBF kernel, for reference,

and compares their test accuracy, their cost, and how the accuracy grows with
the number of training images.

Classification is done "as regression", as in the NNGP/NTK literature: the
labels become centred one-hot vectors, every class gets its own GP regression
on its column (all sharing one kernel, so one Cholesky factorisation serves all
ten), and the prediction is the class with the largest posterior mean.

Run it from the repository root::

    python tutorials/cnn_digits.py            # the figure goes to docs/figures/cnn_digits.png
    python tutorials/cnn_digits.py --smoke    # a few seconds, for the tests

The full run (training sets of 50, 100, 200 and 500 images, 300 test images)
takes about 2.5 minutes of one core of an AMD EPYC (``OMP_NUM_THREADS=1``;
measured as CPU time, 8 minutes of wall time on a machine shared with other
jobs), 135 s of it in the CNN kernels with global average pooling, which cost
O(P^2) per pair of images for P pixels.  Its results and figure are in
docs/cnn.md.  The smoke run needs about 2 s of CPU besides the imports.

It needs matplotlib and scikit-learn (``pip install -e ".[tutorials]"``).
The ``# %%`` markers split the script into notebook cells.
"""

# %% [markdown]
# ## Setup
#
# float64 throughout, as in BoTorch: the noise chosen below is tiny (the
# GPs nearly interpolate the labels), and Cholesky factorisations of such
# ill-conditioned matrices need double precision.

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

from gpytorch_tp import CNNKernel, MLPKernel

DTYPE = torch.float64
FIGURE_DIR = Path(__file__).resolve().parents[1] / "docs" / "figures"
IMAGE_SHAPE = (1, 8, 8)  # (channels, height, width)
NUM_CLASSES = 10


# %% [markdown]
# ## Data
#
# The images are flattened channel-major, as `torch.flatten` of a
# `(C, H, W)` tensor: that is the layout `CNNKernel(input_shape=(C, H, W))`
# expects (the digits' 64 features are already the rows of the 8 x 8 image).
#
# The network kernels have no lengthscale: the input enters through
# $\langle x, x' \rangle / d$ (per pixel pair, for the CNN), so the inputs'
# scale matters.  We divide by the root mean square pixel of the training
# images, so that $\langle x, x \rangle / d \approx 1$, and do not subtract a
# mean: the background stays exactly 0, the value that the CNN's zero padding
# puts outside the image.
#
# The training sets are nested (the first 50, 100, ... of one shuffled pool);
# the test images are disjoint from all of them.


# %%
@dataclass
class Digits:
    train_x: torch.Tensor  # (N, 64), scaled
    train_labels: torch.Tensor  # (N,)
    test_x: torch.Tensor
    test_labels: torch.Tensor
    test_images: torch.Tensor  # (T, 8, 8), raw pixel values 0..16, for plotting


def load_data(num_train: int, num_test: int, seed: int = 0) -> Digits:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=DTYPE)
    labels = torch.tensor(digits.target)
    if num_train + num_test > len(x):
        raise ValueError(f"digits has {len(x)} images, asked for {num_train} + {num_test}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    scale = x[train].pow(2).mean().sqrt()
    return Digits(x[train] / scale, labels[train], x[test] / scale, labels[test], x[test].reshape(-1, 8, 8))


# %% [markdown]
# ## Kernels
#
# Each entry maps the training and test images to the kernel matrices
# $K(X, X)$ and $K(X_*, X)$ (the test-test block is never needed: we only
# predict means).  The two GAP kernels come from one pass of the recursion
# (`nngp_and_ntk`), which costs little more than the NNGP alone.
#
# The network kernels keep their default hyperparameters (ReLU:
# $\sigma_w^2 = 2$, which keeps the variance constant through depth;
# $\sigma_b^2 = 0.1$).  For the posterior *mean* an output scale does not
# matter -- only the ratio of noise to kernel scale does, and we choose that
# below -- so what the network kernels leave untuned is the relative size of
# bias and weight variances.  Fitting them by marginal likelihood is possible
# (they are GPyTorch hyperparameters), but for the CNN with pooling a single
# evaluation of the 500 x 500 training matrix takes minutes of CPU here.
#
# The RBF kernel does have a lengthscale, and the comparison is only fair if
# it is chosen well: we give it a grid of seven lengthscales around the median
# distance between training images, chosen by the same criterion as the noise.


# %%
KernelMatrices = dict[str, tuple[torch.Tensor, torch.Tensor]]  # candidate -> (K(X, X), K(X*, X))


@dataclass
class Method:
    """A kernel (or a grid of kernel candidates) and how to compute its matrices."""

    name: str
    matrices: Callable[[torch.Tensor, torch.Tensor], KernelMatrices]
    shared_with: str | None = None  # computed in the same pass as another method's matrices


def network_matrices(kernel: gpytorch.kernels.Kernel) -> Callable:
    kernel = kernel.to(DTYPE)

    def matrices(train_x, test_x):
        with torch.no_grad():
            return {"": (kernel(train_x).to_dense(), kernel(test_x, train_x).to_dense())}

    return matrices


def nngp_and_ntk_matrices(kernel) -> Callable:
    kernel = kernel.to(DTYPE)

    def matrices(train_x, test_x):
        with torch.no_grad():
            train, test = kernel.nngp_and_ntk(train_x), kernel.nngp_and_ntk(test_x, train_x)
        return {"nngp": (train[0], test[0]), "ntk": (train[1], test[1])}

    return matrices


RBF_LENGTHSCALE_FACTORS = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)


def rbf_matrices(train_x, test_x):
    median = torch.pdist(train_x).median()
    kernel = gpytorch.kernels.RBFKernel().to(DTYPE)
    out = {}
    with torch.no_grad():
        for factor in RBF_LENGTHSCALE_FACTORS:
            kernel.lengthscale = factor * median
            out[f"lengthscale={factor:g}*median"] = (kernel(train_x).to_dense(), kernel(test_x, train_x).to_dense())
    return out


def make_methods(cnn_depth: int) -> list[Method]:
    gap = nngp_and_ntk_matrices(CNNKernel(IMAGE_SHAPE, depth=cnn_depth, readout="global_avg_pool"))
    both = {}  # one pass gives the GAP NNGP and NTK; the second method reads the cache

    def gap_part(part):
        def matrices(train_x, test_x):
            if "value" not in both:
                both["value"] = gap(train_x, test_x)
            return {"": both["value"][part]}

        return matrices

    return [
        Method(f"CNN-GAP NNGP (depth {cnn_depth})", gap_part("nngp")),
        Method(f"CNN-GAP NTK (depth {cnn_depth})", gap_part("ntk"), shared_with=f"CNN-GAP NNGP (depth {cnn_depth})"),
        Method(
            f"CNN-Flatten NNGP (depth {cnn_depth})",
            network_matrices(CNNKernel(IMAGE_SHAPE, depth=cnn_depth, readout="flatten")),
        ),
        Method("MLP NNGP (depth 3)", network_matrices(MLPKernel(depth=3, nonlinearity="relu", kind="nngp"))),
        Method("RBF (lengthscale by LOO)", rbf_matrices),
    ]


# %% [markdown]
# ## Classification as regression
#
# Targets: the one-hot label minus $1/10$, so that each row sums to zero and
# the zero prior mean sits between "this class" (0.9) and "not" (-0.1).  With
# $Y$ the $N \times 10$ target matrix, the posterior means at the test images
# are $K(X_*, X) (K(X, X) + \sigma^2 I)^{-1} Y$: one Cholesky factorisation
# serves all ten classes.
#
# The noise $\sigma^2$ (a regulariser here: the labels are not noisy) is set
# relative to the kernel's scale, $\sigma^2 = \lambda \cdot
# \mathrm{mean}_i K(x_i, x_i)$, with $\lambda$ chosen from a grid by
# leave-one-out error on the training set.  For a GP the leave-one-out means
# come in closed form from the same inverse (Rasmussen & Williams 2006,
# eq. 5.12): with $A = (K + \sigma^2 I)^{-1}$, the prediction for $x_i$ from the
# other points is $y_i - [A Y]_i / A_{ii}$.  So model selection needs no
# validation split and no kernel evaluations beyond the training matrix.  Ties
# in leave-one-out accuracy are broken by leave-one-out squared error.


# %%
NOISE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def targets(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, NUM_CLASSES).to(DTYPE) - 1.0 / NUM_CLASSES


def _regularised_cholesky(k_train: torch.Tensor, ratio: float) -> torch.Tensor:
    noise = ratio * k_train.diagonal().mean()
    return torch.linalg.cholesky(k_train + noise * torch.eye(len(k_train), dtype=k_train.dtype))


def leave_one_out(k_train: torch.Tensor, labels: torch.Tensor, ratio: float) -> tuple[float, float]:
    """Leave-one-out (accuracy, mean squared error) of the regression on centred one-hot targets."""
    y = targets(labels)
    inverse = torch.cholesky_inverse(_regularised_cholesky(k_train, ratio))
    residuals = (inverse @ y) / inverse.diagonal().unsqueeze(-1)
    loo_mean = y - residuals
    return (loo_mean.argmax(-1) == labels).double().mean().item(), residuals.pow(2).mean().item()


def predict(k_train, k_test, labels, ratio) -> torch.Tensor:
    """Predicted classes of the test images: argmax of the ten posterior means."""
    factor = _regularised_cholesky(k_train, ratio)
    return (k_test @ torch.cholesky_solve(targets(labels), factor)).argmax(-1)


# %% [markdown]
# ## The experiment
#
# For each method: compute the kernel matrices once, for the largest training
# set, and slice out the nested smaller ones.  For each training size, pick
# the candidate (RBF lengthscale) and noise with the best leave-one-out score,
# then predict the test images.  We time the kernel evaluation and, at the
# largest training size, the model selection and solve.


# %%
@dataclass
class Result:
    name: str
    accuracy: dict[int, float] = field(default_factory=dict)  # training size -> test accuracy
    chosen: dict[int, str] = field(default_factory=dict)  # training size -> selected candidate and noise
    kernel_seconds: float = 0.0  # wall clock
    kernel_cpu_seconds: float = 0.0  # this process's CPU time
    solve_seconds: float = 0.0
    solve_cpu_seconds: float = 0.0
    shared_with: str | None = None
    predictions: dict[int, torch.Tensor] = field(default_factory=dict)  # training size -> test predictions


def run_method(method: Method, data: Digits, sizes: list[int]) -> Result:
    result = Result(method.name, shared_with=method.shared_with)
    start, cpu_start = time.perf_counter(), time.process_time()
    candidates = method.matrices(data.train_x, data.test_x)
    result.kernel_seconds = time.perf_counter() - start
    result.kernel_cpu_seconds = time.process_time() - cpu_start
    for n in sizes:
        start, cpu_start = time.perf_counter(), time.process_time()
        labels = data.train_labels[:n]
        scores = {}
        for candidate, (k_train, _) in candidates.items():
            for ratio in NOISE_GRID:
                try:
                    accuracy, mse = leave_one_out(k_train[:n, :n], labels, ratio)
                except torch.linalg.LinAlgError:  # too little noise for this kernel
                    continue
                scores[(candidate, ratio)] = (accuracy, -mse)
        candidate, ratio = max(scores, key=scores.get)
        k_train, k_test = candidates[candidate]
        predictions = predict(k_train[:n, :n], k_test[:, :n], labels, ratio)
        result.accuracy[n] = (predictions == data.test_labels).double().mean().item()
        result.chosen[n] = f"{candidate} noise={ratio:g}".strip()
        result.predictions[n] = predictions
        result.solve_seconds = time.perf_counter() - start  # the last (largest) size
        result.solve_cpu_seconds = time.process_time() - cpu_start
    return result


def print_table(results: list[Result], sizes: list[int], num_test: int) -> None:
    accuracy_columns = "".join(f"  N={n:<5d}" for n in sizes)
    print(f"\ntest accuracy on {num_test} images (chance: 0.100); times at N={sizes[-1]}, in seconds")
    print(f"{'kernel':32s}{accuracy_columns}  kernel wall/cpu s  solve wall/cpu s  selected at N={sizes[-1]}")
    for r in results:
        accuracies = "".join(f"  {r.accuracy[n]:7.3f}" for n in sizes)
        if r.shared_with:
            kernel_time = "(above)"
        else:
            kernel_time = f"{r.kernel_seconds:.2f} / {r.kernel_cpu_seconds:.2f}"
        solve_time = f"{r.solve_seconds:.2f} / {r.solve_cpu_seconds:.2f}"
        print(f"{r.name:32s}{accuracies}  {kernel_time:>17s}  {solve_time:>16s}  {r.chosen[sizes[-1]]}")
    if any(r.shared_with for r in results):
        print("(above): computed in the same pass as the row above, whose kernel time covers both")
    print("(cpu: this process's CPU time; equal to wall time with one thread on an otherwise idle machine)")


# %% [markdown]
# ## Figure
#
# Left: test accuracy against the number of training images.  Right: test
# digits that the CNN-GAP NNGP got wrong, with their true and predicted
# labels, at the largest training size where it still makes a handful of
# mistakes.


# %%
def plot(results: list[Result], sizes: list[int], data: Digits, max_mistakes: int = 8) -> plt.Figure:
    fig = plt.figure(figsize=(11, 4.2), constrained_layout=True)
    left, right = fig.subfigures(1, 2, width_ratios=[1.25, 1])
    ax = left.subplots()
    for marker, r in zip("osDv^", results):
        ax.plot(sizes, [100 * r.accuracy[n] for n in sizes], marker=marker, lw=1.8, ms=5, label=r.name)
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training images")
    ax.set_ylabel(f"test accuracy (%), {len(data.test_labels)} images")
    ax.set_title("8 x 8 digits: GP classification as regression", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    reference = results[0]
    mistakes = {n: (reference.predictions[n] != data.test_labels).nonzero().squeeze(-1) for n in sizes}
    shown = max((n for n in sizes if len(mistakes[n]) >= max_mistakes), default=sizes[0])
    predictions, wrong = reference.predictions[shown], mistakes[shown][:max_mistakes]
    axes = right.subplots(2, max_mistakes // 2)
    for ax, index in zip(axes.flat, wrong.tolist() + [None] * max_mistakes):
        ax.set_axis_off()
        if index is None:
            continue
        ax.imshow(data.test_images[index].numpy(), cmap="gray_r", vmin=0, vmax=16)
        ax.set_title(f"{data.test_labels[index].item()} → {predictions[index].item()}", fontsize=10)
    count = f"{len(mistakes[shown])} of {len(data.test_labels)}"
    right.suptitle(f"{reference.name}: mistakes at N={shown} ({count})\ntrue → predicted", fontsize=10)
    return fig


# %% [markdown]
# ## Putting it together


# %%
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="GP classification of scikit-learn's 8x8 digits with CNN kernels.")
    parser.add_argument("--smoke", action="store_true", help="tiny problem, depth-2 CNN (for tests)")
    parser.add_argument("--out", type=Path, default=FIGURE_DIR, help="directory for the figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", help="training-set sizes (default 50 100 200 500)")
    parser.add_argument("--num-test", type=int, help="test images (default 300)")
    args = parser.parse_args(argv)

    sizes = sorted(args.sizes or ([60] if args.smoke else [50, 100, 200, 500]))
    num_test = args.num_test or (40 if args.smoke else 300)
    data = load_data(sizes[-1], num_test, seed=args.seed)
    print(f"digits: {sizes[-1]} training images (nested subsets {sizes}), {num_test} test images")

    results = []
    for method in make_methods(cnn_depth=2 if args.smoke else 3):
        results.append(run_method(method, data, sizes))
        r = results[-1]
        times = f"kernels: {r.kernel_seconds:.1f} s wall, {r.kernel_cpu_seconds:.1f} s cpu"
        print(f"  {r.name:32s} accuracy at N={sizes[-1]}: {r.accuracy[sizes[-1]]:.3f}  ({times})")
    print_table(results, sizes, num_test)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cnn_digits.png"
    fig = plot(results, sizes, data)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    return {"results": results, "sizes": sizes, "figure": path}


if __name__ == "__main__":
    main()
