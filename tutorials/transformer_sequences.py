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
import sys
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt

from gpytorch_tp import TransformerKernel

# The data, the leave-one-out selection, the RBF baseline and the figure are
# those of the RNN tutorial next to this file (tutorials/rnn_sequences.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rnn_sequences import (
    DTYPE,
    FEATURES,
    FIGURE_DIR,
    MIN_ROWS,
    STEPS,
    Candidates,
    Digits,
    Result,
    accuracy_by_rows,
    cut,
    load_data,
    plot,
    rbf_candidates,
    select_and_predict,
)

# %% [markdown]
# ## Data
#
# scikit-learn stores each image row after row: the time-major flattening of a
# `(T, d) = (8, 8)` sequence that `TransformerKernel(input_shape=(8, 8))`
# expects.  Pixels are divided by their root mean square over the training
# digits.  For the second experiment every digit keeps its first L rows
# (L uniform in 3..8) and the rest become NaN.  `load_data` and `cut` are the
# RNN tutorial's, as are the classification as regression with the noise chosen
# by leave-one-out (`select_and_predict`), the RBF baseline and the figure.


# %% [markdown]
# ## Kernels
#
# Each method maps training and test inputs to *candidates*: pairs of
# matrices $K(X, X)$, $K(X_*, X)$, one per hyperparameter setting.
# `nngp_and_ntk` returns both kernels from one pass.  The MLP's first layer
# gets weight variance 2 (it feeds a ReLU), the rest keep their defaults.


# %%
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


# %% [markdown]
# ## The experiments


# %%
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
    fig = plot(
        full,
        cut_results,
        sizes,
        cut_data,
        left_title="transformer kernels, digits as 8 tokens of 8 pixels",
        right_title="digits cut after 3-8 rows",
        right_xlabel="rows of the test digit seen (the rest: NaN padding; 0 for RBF)",
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    return {"results": full, "cut_results": cut_results, "sizes": sizes, "figure": path, "cut_data": cut_data}


if __name__ == "__main__":
    main()
