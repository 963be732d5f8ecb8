"""Compiled tensor programs against the hand-written kernels and against Monte Carlo (issue 19, item 4).

Rows:

* ``mlp``: a depth-3 ReLU MLP, NNGP+NTK, compiled from its ``nn.Sequential`` (``compile_module``) against the
  hand-written ``Sequential(Linear, ReLU, ...)``: time of ``nngp_and_ntk(X)`` and the largest difference;
* ``glu``: a gated unit ``a(x) * sigmoid(b(x))`` (no hand-written kernel), compiled, against the only kernel
  users had for it before, ``MonteCarloKernel`` (16 networks of width 512), with that estimate's error.

Times: best / median of ``--repeats`` calls after one untimed call, float64, this process's threads.

    python benchmarks/compiled_programs.py [--n 1000 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gpytorch_tp import TensorProgramKernel
from gpytorch_tp.kernels import MonteCarloKernel
from gpytorch_tp.layers import Linear, ReLU, Sequential
from gpytorch_tp.programs import compile_module

D = 8


class GLU(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(D, width), nn.Linear(D, width), nn.Linear(width, 16)

    def forward(self, x):
        return self.out(self.a(x) * torch.sigmoid(self.b(x)))


def _time(fn, repeats: int) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"best": min(times), "median": statistics.median(times)}


def _mlp_row(n: int, repeats: int) -> dict:
    net = nn.Sequential(
        nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    compiled = TensorProgramKernel(compile_module(net, D, weight_variance=2.0, bias_variance=0.1)).double()
    layers = [m for _ in range(3) for m in (Linear(2.0, 0.1), ReLU())] + [Linear(2.0, 0.1)]
    hand = TensorProgramKernel(Sequential(*layers)).double()
    x = torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        row = {"case": "mlp", "n": n}
        row["hand"] = _time(lambda: hand.nngp_and_ntk(x), repeats)
        row["compiled"] = _time(lambda: compiled.nngp_and_ntk(x), repeats)
        difference = max((a - b).abs().max().item() for a, b in zip(hand.nngp_and_ntk(x), compiled.nngp_and_ntk(x)))
    row["difference"] = difference
    return row


def _glu_row(n: int, repeats: int, networks: int = 16, width: int = 512) -> dict:
    compiled = TensorProgramKernel(compile_module(GLU(), D)).double()
    monte_carlo = MonteCarloKernel(lambda: GLU(width).double(), "nngp", n_samples=networks)
    x = torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        row = {"case": "glu", "n": n}
        row["compiled"] = _time(lambda: compiled(x).to_dense(), repeats)
        row["monte_carlo"] = _time(lambda: monte_carlo(x).to_dense(), repeats)
        exact, estimate = compiled(x).to_dense(), monte_carlo(x).to_dense()
    row["monte_carlo_error"] = ((estimate - exact).norm() / exact.norm()).item()
    return row


def _cell(t: dict) -> str:
    return f"{t['best']:.3f} / {t['median']:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 2000], help="numbers of points")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    args = parser.parse_args(argv)
    mlp = [_mlp_row(n, args.repeats) for n in args.n]
    glu = [_glu_row(n, args.repeats) for n in args.n]
    print("| N | MLP hand-written NNGP+NTK (s) | MLP compiled (s) | compiled / hand | largest difference |")
    print("|---:|---:|---:|---:|---:|")
    for r in mlp:
        ratio = r["compiled"]["best"] / r["hand"]["best"]
        print(f"| {r['n']} | {_cell(r['hand'])} | {_cell(r['compiled'])} | {ratio:.2f}x | {r['difference']:.1e} |")
    print()
    print("| N | GLU compiled NNGP (s) | GLU MonteCarloKernel 16 x width 512 (s) | MC / compiled | MC error |")
    print("|---:|---:|---:|---:|---:|")
    for r in glu:
        ratio = r["monte_carlo"]["best"] / r["compiled"]["best"]
        error = r["monte_carlo_error"]
        print(f"| {r['n']} | {_cell(r['compiled'])} | {_cell(r['monte_carlo'])} | {ratio:.1f}x | {error:.3f} |")
    return {"mlp": mlp, "glu": glu}


if __name__ == "__main__":
    main()
