#!/usr/bin/env python
"""Verification: ensembles of wide networks trained by gradient descent vs. ``TrainedNetworkGP``.

For each architecture and width, ``--networks`` networks are built with
:func:`gpytorch_tp.empirical.build_network` (seeds 0, 1, ...), stacked into one
batched network and trained together by full-batch gradient descent on
``L = 1/2 sum_i (f(x_i) - y_i)^2`` (autograd gradients; learning rate
``--lr-fraction`` x the largest stable one, ``TrainedNetworkGP.max_learning_rate``).
Outputs on the 8 training inputs and 6 held-out inputs (dimension 3, standard
normal) are recorded after several numbers of steps and compared with the
prediction of :class:`gpytorch_tp.TrainedNetworkGP`:

* ``path``: rms over networks of the deviation ``delta = f_k - f_lin`` from each
  network's own linearisation ``f_lin = f_0 + A_k (Y - f_0(X))``, worst input,
  in units of ``sigma0 / sqrt(width)`` (``sigma0``: rms prior sd).  Lee et al.
  (2019) bound it by ``O(width^-1/2)``, so this column should stay roughly
  constant as the width grows;
* ``dmean``: worst ``|mean_S delta|`` in units of ``sigma0 / width`` (the
  ``width^-1/2`` part averages out; what is left is ``O(1/width)`` plus Monte
  Carlo noise ``rms / sqrt(S)``, given in the same units as ``mc``);
* ``z``: worst ``|ensemble mean - predicted mean| / sqrt(predicted var / S)`` --
  about 1-3 when the error is Monte Carlo alone;
* ``cov``: ``||ensemble covariance - predicted||_F / ||predicted||_F``, next to
  ``e_mc``, the same ratio expected from Monte Carlo alone
  (``sqrt((||Sigma||_F^2 + tr(Sigma)^2) / S) / ||Sigma||_F``).

Usage (from the repository root)::

    python benchmarks/dynamics_vs_training.py                        # erf-1, relu-1; about a minute on CPU
    python benchmarks/dynamics_vs_training.py --archs relu-3 --widths 256 1024 --networks 64   # ~8 min on CPU
    python benchmarks/dynamics_vs_training.py --device cuda --archs relu-1 erf-1 relu-3 --widths 1024 4096 16384
    python benchmarks/dynamics_vs_training.py --trained readout --noise 0.1
    python benchmarks/dynamics_vs_training.py --smoke                # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

from gpytorch_tp import TrainedNetworkGP
from gpytorch_tp.empirical import build_network
from gpytorch_tp.layers import Erf, Linear, ReLU, Sequential

ARCHITECTURES = {
    "relu-1": lambda: Sequential(Linear(2.0, 0.1), ReLU(), Linear(1.0, 0.1)),
    "erf-1": lambda: Sequential(Linear(4.0, 0.5), Erf(), Linear(1.0, 0.1)),
    "relu-3": lambda: Sequential(
        Linear(2.0, 0.1), ReLU(), Linear(2.0, 0.1), ReLU(), Linear(2.0, 0.1), ReLU(), Linear(1.0, 0.1)
    ),
}


class StackedNetworks:
    """Networks from ``build_network`` (NTKLinear / Pointwise layers) with stacked parameters, run as one."""

    def __init__(self, arch, in_features, width, size, *, seed=0, dtype=torch.float32, device="cpu"):
        self.layers = []
        nets = [build_network(arch, in_features, width, 1, seed=seed + s, dtype=dtype) for s in range(size)]
        for modules in zip(*nets):
            first = modules[0]
            if hasattr(first, "weight_std"):  # NTKLinear
                weight = torch.stack([m.weight.detach() for m in modules]).to(device).requires_grad_()
                bias = torch.stack([m.bias.detach() for m in modules]).to(device).requires_grad_()
                scale = first.weight_std / math.sqrt(first.in_features)
                self.layers.append((first, weight, bias, scale))
            else:
                self.layers.append((first, None, None, None))

    def parameters(self, readout_only=False):
        layers = [layer for layer in self.layers if layer[1] is not None]
        return [p for _, w, b, _ in (layers[-1:] if readout_only else layers) for p in (w, b)]

    def __call__(self, x):
        h = x
        for module, weight, bias, scale in self.layers:
            if weight is None:
                h = module(h)
            else:
                h = torch.baddbmm(
                    bias.unsqueeze(1),
                    h.expand(weight.shape[0], *h.shape[-2:]),
                    weight.transpose(-1, -2),
                    beta=module.bias_std,
                    alpha=scale,
                )
        return h.squeeze(-1)


def train(nets, x, targets, learning_rate, record, x_eval, *, readout_only=False, ridge=0.0):
    params = nets.parameters(readout_only)
    start = [p.detach().clone() for p in params]
    outputs = {}
    for step in range(max(record) + 1):
        if step in record:
            with torch.no_grad():
                outputs[step] = nets(x_eval).double().cpu()
        if step == max(record):
            break
        loss = 0.5 * (nets(x) - targets).pow(2).sum()
        if ridge:
            loss = loss + 0.5 * ridge * sum((p - p0).pow(2).sum() for p, p0 in zip(params, start))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(learning_rate * g)
    return outputs


def dataset(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(-1))
    x_test = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return x, y, x_test


def compare(name, width, args):
    arch = ARCHITECTURES[name]()
    x, y, x_test = dataset(args.data_seed)
    x_eval = torch.cat([x, x_test])
    trained = args.trained
    eta = args.lr_fraction * TrainedNetworkGP(x, y, arch, trained=trained, noise=args.noise).max_learning_rate
    gp = TrainedNetworkGP(x, y, arch, trained=trained, noise=args.noise, learning_rate=eta)
    size = args.networks
    dtype = torch.float64 if args.float64 else torch.float32
    targets = y.expand(size, -1)
    if args.noise:
        gen = torch.Generator().manual_seed(args.data_seed + 1)
        targets = y + math.sqrt(args.noise) * torch.randn(size, len(y), generator=gen, dtype=torch.float64)
    start = time.perf_counter()
    nets = StackedNetworks(arch, 3, width, size, dtype=dtype, device=args.device)
    outputs = train(
        nets,
        x.to(args.device, dtype),
        targets.to(args.device, dtype),
        eta,
        set(args.steps),
        x_eval.to(args.device, dtype),
        readout_only=trained == "readout",
        ridge=args.noise,
    )
    seconds = time.perf_counter() - start
    n = len(y)
    f0 = outputs[0]
    linear = TrainedNetworkGP(
        x, (targets - f0[:, :n]).T, arch, trained=trained, noise=args.noise, target_noise=0.0, learning_rate=eta
    )
    sigma0 = gp.mean_and_covariance(x_eval, steps=0, diag=True)[1].mean().sqrt().item()
    rows = []
    for k in sorted(args.steps):
        mean, cov = gp.mean_and_covariance(x_eval, steps=k)
        mean = mean[:, 0]
        emp = outputs[k]
        lin_mean, _ = linear.mean_and_covariance(x_eval, steps=k, diag=True)
        delta = emp - (f0 + lin_mean.T)
        rms = delta.pow(2).mean(0).sqrt()
        se = (cov.diagonal() / size).sqrt()
        cov_norm = float(cov.norm())
        rows.append(
            {
                "arch": name,
                "width": width,
                "step": k,
                "path": float(rms.max()) / (sigma0 / math.sqrt(width)),
                "dmean": float(delta.mean(0).abs().max()) / (sigma0 / width),
                "mc": float((rms / math.sqrt(size)).max()) / (sigma0 / width),
                "z": float(((emp.mean(0) - mean).abs() / se).max()),
                "cov": float((torch.cov(emp.T) - cov).norm()) / cov_norm,
                "e_mc": math.sqrt((cov_norm**2 + float(cov.trace()) ** 2) / size) / cov_norm,
                "seconds": seconds,
            }
        )
    return rows


def format_table(rows):
    lines = [
        "| architecture | width | step | path [sigma0/sqrt(n)] | dmean [sigma0/n] | (mc) | z | cov rel err | (e_mc) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['width']} | {r['step']} | {r['path']:.2f} | {r['dmean']:.2f} | {r['mc']:.2f} | "
            f"{r['z']:.2f} | {r['cov']:.3f} | {r['e_mc']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["erf-1", "relu-1"], choices=list(ARCHITECTURES))
    parser.add_argument("--widths", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--networks", type=int, default=128, help="ensemble size S")
    parser.add_argument("--steps", nargs="+", type=int, default=[0, 4, 15, 50, 150])
    parser.add_argument("--lr-fraction", type=float, default=0.5, help="learning rate / largest stable one")
    parser.add_argument("--trained", choices=["all", "readout"], default="all")
    parser.add_argument("--noise", type=float, default=0.0, help="ridge = target-noise variance")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--float64", action="store_true", help="train in float64 (default float32)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one tiny configuration")
    args = parser.parse_args(argv)
    if 0 not in args.steps:
        args.steps = [0, *args.steps]
    if args.smoke:
        args.archs, args.widths, args.networks, args.steps = ["erf-1"], [64], 16, [0, 3]
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}; ensemble of {args.networks} networks per width; "
        f"learning rate {args.lr_fraction} x the largest stable one; trained={args.trained}, noise={args.noise}"
    )
    rows = []
    for name in args.archs:
        for width in args.widths:
            new = compare(name, width, args)
            print(f"  {name} width {width}: trained in {new[0]['seconds']:.1f} s", flush=True)
            rows.extend(new)
    print()
    print(format_table(rows))
    if hasattr(os, "getloadavg"):
        print(f"\nLoad average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows


if __name__ == "__main__":
    main()
