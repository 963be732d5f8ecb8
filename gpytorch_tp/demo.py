"""Demo: infinite-width network kernels against an RBF kernel on real data.

Run it with ``python -m gpytorch_tp.demo`` (add ``--smoke`` for a seconds-long
check, ``--seed N`` for another train/test split, ``--threads N`` to set
PyTorch's number of CPU threads; on a busy shared machine ``--threads 1`` can
be several times faster, because the kernel matrices here are small).

What it shows
-------------
An exact Gaussian process (GPyTorch ``ExactGP``) is fitted to scikit-learn's
*diabetes* data set (442 patients, 10 standardised clinical features, target:
a measure of disease progression one year later; it ships inside
scikit-learn, so no download is needed).  The same model is fitted with three
covariance functions, each wrapped in a ``ScaleKernel``:

* ``MLPKernel(depth=3, nonlinearity="relu", kind="nngp")`` -- the covariance
  of an infinitely wide 3-hidden-layer ReLU network with random weights (the
  network *is* this Gaussian process);
* ``MLPKernel(depth=3, nonlinearity="relu", kind="ntk")`` -- the neural
  tangent kernel of the same network (kernel regression with it gives the
  predictions of the infinitely wide network trained to convergence by
  gradient descent; here it is simply used as the GP's covariance);
* GPyTorch's ``RBFKernel`` with one lengthscale per feature (ARD), the usual
  default.

All hyperparameters (weight and bias variances of every layer, the output
scale, the noise variance, the RBF lengthscales) are learned by maximising
the exact marginal log likelihood with L-BFGS (strong Wolfe line search,
deterministic), in float64.  The table reports the fitted objective and, on
the held-out points:

* RMSE of the predictive mean, in the target's original units;
* mean negative log predictive density (NLPD) of the noisy targets, also in
  original units (lower is better; it rewards calibrated uncertainty);
* wall-clock fitting time and the learned hyperparameters.

Nothing is tuned per kernel: every model starts from the defaults and gets
the same optimiser and iteration budget, and the numbers are printed
whatever they are.  (On this small, nearly linear data set the three kernels
end up close to each other; the demo shows the workflow, not a winner.)
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import gpytorch
import torch
from torch import Tensor

from gpytorch_tp import MLPKernel

DTYPE = torch.float64
TEST_FRACTION = 0.2
ITERATIONS = 50  # L-BFGS iterations (at most 1.25x as many likelihood evaluations)
SMOKE_ITERATIONS = 2
SMOKE_TRAIN_POINTS = 100  # --smoke also fits on a subset of the training points


# -- data ---------------------------------------------------------------------------------


@dataclass
class Split:
    """Standardised train/test data plus what is needed to undo the target scaling."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    y_mean: float
    y_std: float


def load_data(seed: int = 0, max_train: int | None = None) -> Split:
    """The diabetes data, split at random (fixed by ``seed``), standardised with training statistics.

    :param max_train: keep only this many training points (for quick checks).
    """
    from sklearn.datasets import load_diabetes  # the `demo` extra installs scikit-learn

    x_all, y_all = load_diabetes(return_X_y=True)
    x_all = torch.as_tensor(x_all, dtype=DTYPE)
    y_all = torch.as_tensor(y_all, dtype=DTYPE)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y_all), generator=generator)
    n_test = round(TEST_FRACTION * len(y_all))
    test, train = order[:n_test], order[n_test:]
    train = train[:max_train]

    x_mean, x_std = x_all[train].mean(0), x_all[train].std(0)
    y_mean, y_std = y_all[train].mean(), y_all[train].std()
    return Split(
        train_x=(x_all[train] - x_mean) / x_std,
        train_y=(y_all[train] - y_mean) / y_std,
        test_x=(x_all[test] - x_mean) / x_std,
        test_y=(y_all[test] - y_mean) / y_std,
        y_mean=float(y_mean),
        y_std=float(y_std),
    )


# -- model --------------------------------------------------------------------------------


class ExactGPModel(gpytorch.models.ExactGP):
    """Constant mean + ``ScaleKernel(base_kernel)``: the standard exact GP regression model."""

    def __init__(self, train_x: Tensor, train_y: Tensor, likelihood, base_kernel: gpytorch.kernels.Kernel):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(base_kernel)

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_base_kernels(num_features: int) -> dict[str, gpytorch.kernels.Kernel]:
    """The three kernels being compared, by display name."""
    return {
        "MLP NNGP (relu, depth 3)": MLPKernel(depth=3, nonlinearity="relu", kind="nngp"),
        "MLP NTK (relu, depth 3)": MLPKernel(depth=3, nonlinearity="relu", kind="ntk"),
        "RBF (ARD)": gpytorch.kernels.RBFKernel(ard_num_dims=num_features),
    }


def fit(model: ExactGPModel, iterations: int) -> tuple[float, int]:
    """Maximise the exact marginal log likelihood with L-BFGS.

    :return: the final marginal log likelihood per training point, and the
        number of likelihood evaluations used.
    """
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")
    train_x, train_y = model.train_inputs[0], model.train_targets
    evaluations = 0

    def closure() -> Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        value = mll(model(train_x), train_y).item()
    return value, evaluations


def predict_and_score(model: ExactGPModel, split: Split) -> tuple[float, float]:
    """Test RMSE and mean NLPD, both in the target's original units."""
    model.eval()
    with torch.no_grad():
        predictive = model.likelihood(model(split.test_x))  # includes the observation noise
        mean, var = predictive.mean, predictive.variance
    # Back to original units: y = y_mean + y_std * y_standardised.
    error = (mean - split.test_y) * split.y_std
    var = var * split.y_std**2
    rmse = error.pow(2).mean().sqrt().item()
    nlpd = (0.5 * torch.log(2 * math.pi * var) + 0.5 * error.pow(2) / var).mean().item()
    return rmse, nlpd


# -- reporting ----------------------------------------------------------------------------


def _fmt(values: Tensor) -> str:
    values = values.detach().reshape(-1)
    if values.numel() == 1:
        return f"{values.item():.3g}"
    return "[" + ", ".join(f"{v:.3g}" for v in values.tolist()) + "]"


def describe_hyperparameters(model: ExactGPModel) -> str:
    """A one-line summary of the learned hyperparameters."""
    scale = model.covar_module
    base = scale.base_kernel
    parts = [f"noise={_fmt(model.likelihood.noise)}", f"outputscale={_fmt(scale.outputscale)}"]
    if isinstance(base, MLPKernel):
        linears = [layer for layer in base.architecture if hasattr(layer, "weight_variance")]
        parts.append("sigma_w^2=" + _fmt(torch.stack([layer.weight_variance for layer in linears])))
        parts.append("sigma_b^2=" + _fmt(torch.stack([layer.bias_variance for layer in linears])))
    else:
        lengthscale = base.lengthscale.detach().reshape(-1)
        parts.append(f"lengthscales in [{lengthscale.min().item():.3g}, {lengthscale.max().item():.3g}]")
    return ", ".join(parts)


@dataclass
class Result:
    """One row of the table."""

    kernel: str
    rmse: float
    nlpd: float
    train_mll: float  # marginal log likelihood per training point (standardised targets)
    fit_seconds: float
    evaluations: int
    hyperparameters: str


def format_table(results: list[Result], split: Split) -> str:
    """The results as an aligned text table, then the learned hyperparameters, then notes."""
    header = f"{'kernel':<25} {'test RMSE':>9} {'test NLPD':>9} {'train MLL':>9} {'fit (s)':>7} {'evals':>5}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.kernel:<25} {r.rmse:>9.2f} {r.nlpd:>9.3f} {r.train_mll:>9.4f} {r.fit_seconds:>7.2f} {r.evaluations:>5}"
        )
    lines += ["", "Learned hyperparameters (sigma_w^2, sigma_b^2: one per Linear layer, input layer first):"]
    lines += [f"  {r.kernel:<25} {r.hyperparameters}" for r in results]
    baseline = (split.test_y * split.y_std).pow(2).mean().sqrt().item()  # predicting the training mean
    lines += [
        "",
        f"{len(split.train_y)} training / {len(split.test_y)} test points.  "
        + "Test RMSE and NLPD (lower is better) are in the target's original units;",
        f"for scale, predicting the training mean gives a test RMSE of {baseline:.2f}.  "
        + "Train MLL (marginal log likelihood per point),",
        "noise and outputscale refer to the standardised target.  Evals: likelihood evaluations the fit used.",
    ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def warm_up(split: Split) -> None:
    """One throwaway fit on a few points, so one-off start-up costs are not timed with the first kernel."""
    few = slice(0, 10)
    for base_kernel in make_base_kernels(split.train_x.shape[-1]).values():
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = ExactGPModel(split.train_x[few], split.train_y[few], likelihood, base_kernel).to(DTYPE)
        fit(model, 1)
        predict_and_score(model, split)


def run(seed: int = 0, smoke: bool = False) -> tuple[list[Result], Split]:
    """Fit and score every kernel on one train/test split."""
    split = load_data(seed, max_train=SMOKE_TRAIN_POINTS if smoke else None)
    iterations = SMOKE_ITERATIONS if smoke else ITERATIONS
    warm_up(split)
    results = []
    for name, base_kernel in make_base_kernels(split.train_x.shape[-1]).items():
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = ExactGPModel(split.train_x, split.train_y, likelihood, base_kernel).to(DTYPE)
        start = time.perf_counter()
        train_mll, evaluations = fit(model, iterations)
        seconds = time.perf_counter() - start
        rmse, nlpd = predict_and_score(model, split)
        results.append(Result(name, rmse, nlpd, train_mll, seconds, evaluations, describe_hyperparameters(model)))
    return results, split


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help=f"{SMOKE_ITERATIONS} iterations on {SMOKE_TRAIN_POINTS} points (for tests)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    mode = "smoke test" if args.smoke else f"L-BFGS, at most {ITERATIONS} iterations"
    print(
        f"Exact GP regression on scikit-learn's diabetes data (split seed {args.seed}, {mode}, float64, "
        f"CPU threads: {torch.get_num_threads()})\n"
    )
    results, split = run(seed=args.seed, smoke=args.smoke)
    print(format_table(results, split))
    return results


if __name__ == "__main__":
    main()
