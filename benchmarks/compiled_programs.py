"""Compiled tensor programs against the hand-written kernels and against Monte Carlo (issue 19, item 4).

Rows:

* ``mlp``: a depth-3 ReLU MLP, NNGP+NTK, compiled from its ``nn.Sequential`` (``compile_module``) against the
  hand-written ``Sequential(Linear, ReLU, ...)``: time of ``nngp_and_ntk(X)`` and the largest difference;
* ``glu``: a gated unit ``a(x) * sigmoid(b(x))`` (no hand-written kernel), compiled, against the only kernel
  users had for it before, ``MonteCarloKernel`` (16 networks of width 512), with that estimate's error;
* ``elman``: an Elman RNN written as a Python loop in ``forward`` over the flattened sequences ``(N, T * d)``,
  last state read out, NNGP+NTK, compiled against the hand-written ``Sequential(RNN, LastStep, Linear)``
  (both closed form: the difference is round-off);
* ``gru``: a ``torch.nn.GRU``-convention cell written as a loop (``r``, ``z`` gates,
  ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h = (1 - z) * n + z * h``), NNGP+NTK, compiled against the
  hand-written ``Sequential(GRU, LastStep, Linear)``.  Neither side is closed form (the compiler integrates
  the cell's gates and candidates apart, groups of up to 6 dimensions with 4,096 quasi-Monte Carlo points,
  the GRU layer with 1,024 particles of its update gates), so the row reports their relative difference
  (Frobenius), not round-off.
  Timed with one call each and no untimed call first: a call costs seconds to minutes.

Times: best / median of ``--repeats`` calls after one untimed call, float64, this process's threads.

    python benchmarks/compiled_programs.py [--n 1000 2000] [--repeats 5] [--sequence-n 200 500] [--gru-n 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gpytorch_tp import TensorProgramKernel
from gpytorch_tp.kernels import MonteCarloKernel
from gpytorch_tp.layers import GRU, RNN, LastStep, Linear, ReLU, Sequential
from gpytorch_tp.programs import compile_module

D = 8
STEPS, FEATURES = 4, 3  # the sequences of the elman row (the gru row uses STEPS - 1)
WEIGHT_VARIANCE, BIAS_VARIANCE = 1.5, 0.1


class GLU(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(D, width), nn.Linear(D, width), nn.Linear(width, 16)

    def forward(self, x):
        return self.out(self.a(x) * torch.sigmoid(self.b(x)))


class ElmanLoop(nn.Module):
    """h = tanh(W h + U x_t + b) from a zero state, written as a loop; the last state read out."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.recurrent, self.input = nn.Linear(width, width), nn.Linear(FEATURES, width, bias=False)
        self.out, self.width = nn.Linear(width, 1), width

    def forward(self, x):
        x = x.view(x.shape[0], STEPS, FEATURES)
        h = x.new_zeros(x.shape[0], self.width)
        for t in range(STEPS):
            h = torch.tanh(self.recurrent(h) + self.input(x[:, t]))
        return self.out(h)


class GRULoop(nn.Module):
    """torch.nn.GRU's cell as a loop, with the GRU layer's biases: one per gate, two for the candidate."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.input_reset, self.state_reset = nn.Linear(FEATURES, width), nn.Linear(width, width, bias=False)
        self.input_update, self.state_update = nn.Linear(FEATURES, width), nn.Linear(width, width, bias=False)
        self.input_candidate, self.state_candidate = nn.Linear(FEATURES, width), nn.Linear(width, width)
        self.out, self.width = nn.Linear(width, 1), width

    def forward(self, x):
        x = x.view(x.shape[0], STEPS - 1, FEATURES)
        h = x.new_zeros(x.shape[0], self.width)
        for t in range(STEPS - 1):
            r = torch.sigmoid(self.input_reset(x[:, t]) + self.state_reset(h))
            z = torch.sigmoid(self.input_update(x[:, t]) + self.state_update(h))
            n = torch.tanh(self.input_candidate(x[:, t]) + r * self.state_candidate(h))
            h = (1 - z) * n + z * h
        return self.out(h)


def _time(fn, repeats: int, warm_up: bool = True) -> dict:
    if warm_up:
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


def _sequence_row(case: str, n: int, repeats: int) -> dict:
    """A recurrent loop compiled against the hand-written recurrent layer of the same network, NNGP+NTK."""
    wv, bv = WEIGHT_VARIANCE, BIAS_VARIANCE
    if case == "elman":
        module, steps, layer, warm_up = ElmanLoop(), STEPS, RNN("tanh", wv, wv, bv), True
    else:
        module, steps, layer, warm_up = (
            GRULoop(),
            STEPS - 1,
            GRU(weight_variance=wv, input_variance=wv, bias_variance=bv),
            False,
        )
    shape = (steps, FEATURES)
    program = compile_module(module, FEATURES, steps=steps, weight_variance=wv, bias_variance=bv)
    compiled = TensorProgramKernel(program, "ntk", input_shape=shape, sequence=True).double()
    hand = TensorProgramKernel(
        Sequential(layer, LastStep(), Linear(wv, bv)), "ntk", input_shape=shape, sequence=True
    ).double()
    x = torch.randn(n, steps * FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    values = {}

    def run(name, kernel):
        values[name] = kernel.nngp_and_ntk(x)

    with torch.no_grad():
        row = {"case": case, "n": n, "steps": steps}
        row["hand"] = _time(lambda: run("hand", hand), repeats, warm_up)
        row["compiled"] = _time(lambda: run("compiled", compiled), repeats, warm_up)
    pairs = list(zip(values["hand"], values["compiled"]))
    row["difference"] = max((a - b).abs().max().item() for a, b in pairs)
    row["relative_difference"] = max(((a - b).norm() / a.norm()).item() for a, b in pairs)
    return row


def _cell(t: dict) -> str:
    return f"{t['best']:.3f} / {t['median']:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 2000], help="numbers of points")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--sequence-n", type=int, nargs="+", default=[200, 500], help="sequences, elman row")
    parser.add_argument("--gru-n", type=int, nargs="+", default=[50], help="sequences, gru row (one call each)")
    args = parser.parse_args(argv)
    mlp = [_mlp_row(n, args.repeats) for n in args.n]
    glu = [_glu_row(n, args.repeats) for n in args.n]
    elman = [_sequence_row("elman", n, args.repeats) for n in args.sequence_n]
    gru = [_sequence_row("gru", n, 1) for n in args.gru_n]
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
    print()
    print(
        "| row | N | T | hand-written NNGP+NTK (s) | compiled (s) | compiled / hand | largest difference "
        "| relative difference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in elman + gru:
        ratio = r["compiled"]["best"] / r["hand"]["best"]
        print(
            f"| {r['case']} | {r['n']} | {r['steps']} | {_cell(r['hand'])} | {_cell(r['compiled'])} | {ratio:.2f}x "
            f"| {r['difference']:.1e} | {r['relative_difference']:.1e} |"
        )
    return {"mlp": mlp, "glu": glu, "elman": elman, "gru": gru}


if __name__ == "__main__":
    main()
