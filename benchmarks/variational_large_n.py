#!/usr/bin/env python
"""Variational GP (SVGP) on 100k+ points with the MLP NNGP kernel, minibatches, against GPyTorch's RBF.

Trains an ``ApproximateGP`` with ``M`` learned inducing points
(``VariationalStrategy``, Cholesky variational distribution) on the
variational ELBO with Adam over shuffled minibatches, then predicts held-out
points, once with ``ScaleKernel(MLPKernel(depth=3))`` (ReLU, NNGP) and once
with ``ScaleKernel(RBFKernel())`` as the yardstick.  Each step touches only
the ``batch x M`` and ``M x M`` kernel blocks, so N sets the steps per epoch,
not the cost of a step.  Reported per kernel: seconds per epoch, the part of
it inside the kernels' forward calls (their backward runs inside autograd
with the rest of the step and is not separated, for either kernel), test
RMSE and negative log predictive density, and peak resident memory.

The data are those of ``large_n_exact_gp.py`` (d = 8 standard normal inputs,
``y = sin(2 x.w) + 0.5 relu(x_0) - 0.3 x_1 x_2 + 0.1 noise``).

    python benchmarks/variational_large_n.py                 # N = 200,000, 2 epochs, CPU
    python benchmarks/variational_large_n.py --n 1000000 --device cuda
    python benchmarks/variational_large_n.py --smoke         # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import gpytorch
import torch

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # the checkout (without installing) and the sibling benchmark
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from large_n_exact_gp import KernelTimer, make_data, peak_memory, reset_peak_memory, sync

from gpytorch_tp import MLPKernel


class VariationalGP(gpytorch.models.ApproximateGP):
    def __init__(self, inducing_points, base_kernel):
        distribution = gpytorch.variational.CholeskyVariationalDistribution(inducing_points.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing_points, distribution, learn_inducing_locations=True
        )
        super().__init__(strategy)
        self.mean = gpytorch.means.ConstantMean()
        self.covar = gpytorch.kernels.ScaleKernel(base_kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def make_kernel(name: str):
    if name == "mlp_nngp":
        return MLPKernel(depth=3, nonlinearity="relu")
    if name == "rbf":
        return gpytorch.kernels.RBFKernel()
    raise ValueError(f"unknown kernel {name!r}")


def run(name: str, data, args, device) -> dict:
    x, y, x_test, y_test = data
    generator = torch.Generator().manual_seed(0)
    start_points = x[torch.randperm(len(x), generator=generator)[: args.inducing]].clone()
    torch.manual_seed(0)
    model = VariationalGP(start_points, make_kernel(name)).to(device=device, dtype=x.dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(device=device, dtype=x.dtype)
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=len(y))
    optimizer = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=args.lr)
    timer = KernelTimer()
    kernel_class = MLPKernel if name == "mlp_nngp" else gpytorch.kernels.RBFKernel
    restore = timer.wrap(kernel_class, "forward")
    reset_peak_memory(device)
    epochs = []
    try:
        model.train(), likelihood.train()
        for _ in range(args.epochs):
            order = torch.randperm(len(x), generator=generator).to(device)
            kernel_before = timer.seconds
            start = time.perf_counter()
            losses = []
            for batch in order.split(args.batch):
                optimizer.zero_grad()
                loss = -mll(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            sync(device)
            epochs.append(
                {
                    "seconds": time.perf_counter() - start,
                    "kernel_seconds": timer.seconds - kernel_before,
                    "mean_loss": sum(losses) / len(losses),
                }
            )
        model.eval(), likelihood.eval()
        start = time.perf_counter()
        with torch.no_grad():
            prediction = likelihood(model(x_test))
            mean, variance = prediction.mean, prediction.variance
        sync(device)
        predict_seconds = time.perf_counter() - start
    finally:
        restore()
    rmse = float(((mean - y_test) ** 2).mean().sqrt())
    nlpd = float((0.5 * ((mean - y_test) ** 2 / variance + variance.log() + math.log(2 * math.pi))).mean())
    return {
        "kernel": name,
        "epochs": epochs,
        "steps_per_epoch": -(-len(x) // args.batch),
        "predict_seconds": predict_seconds,
        "test_rmse": rmse,
        "predict_mean_rmse": float(((y_test - y.mean()) ** 2).mean().sqrt()),
        "test_nlpd": nlpd,
        **peak_memory(device),
    }


def table(results: dict) -> str:
    lines = [
        (
            f"N = {results['n']}, {results['n_test']} test points, d = {results['d']}, M = {results['inducing']} "
            f"inducing points, minibatches of {results['batch']}, {results['dtype']}, {results['device']}"
        ),
        "",
        "| kernel | epoch | seconds | of which kernel forward (s) | mean minibatch loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        for i, epoch in enumerate(r["epochs"], 1):
            lines.append(
                f"| {r['kernel']} | {i} | {epoch['seconds']:.2f} | {epoch['kernel_seconds']:.2f} | "
                f"{epoch['mean_loss']:.3f} |"
            )
    lines += [
        "",
        "| kernel | steps per epoch | predict (s) | test RMSE (mean-only RMSE) | test NLPD | peak RSS (GiB) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['kernel']} | {r['steps_per_epoch']} | {r['predict_seconds']:.2f} | "
            f"{r['test_rmse']:.3f} ({r['predict_mean_rmse']:.3f}) | {r['test_nlpd']:.3f} | {r['peak_rss_gib']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="training points")
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--d", type=int, default=8, help="input dimension")
    parser.add_argument("--inducing", type=int, default=512, help="inducing points M")
    parser.add_argument("--batch", type=int, default=1024, help="minibatch size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", nargs="+", default=["mlp_nngp", "rbf"], choices=["mlp_nngp", "rbf"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="a few thousand points, one epoch (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.n_test, args.inducing, args.batch, args.epochs, args.lr = 2000, 200, 32, 250, 2, 0.05
    device = torch.device(args.device)
    data = make_data(args.n, args.n_test, args.d, getattr(torch, args.dtype), device)
    results = {
        **{k: getattr(args, k) for k in ("n", "n_test", "d", "inducing", "batch", "dtype")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "runs": [run(name, data, args, device) for name in args.kernels],
    }
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
