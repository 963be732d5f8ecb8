#!/usr/bin/env python
"""Benchmark: NNGP + NTK of an infinitely wide simple (Elman) RNN, both readouts.

Times ``RNNKernel(input_shape=(T, d), nonlinearity="erf", readout=...)
.nngp_and_ntk(X)`` (both kernels from one pass of the recursion, ``x1 is x2``,
float64, one recurrent layer) for N sequences of T steps of d = 8 features,
with the readouts

* ``last``: the last state, which needs the T aligned step pairs of every pair
  of sequences (O(N^2 T));
* ``mean``: the mean of the states over time, which needs all T^2 step pairs
  (O(N^2 T^2)).

No peer library computes RNN kernels (neural-tangents has no recurrent layers;
the only public code is a set of research notebooks), so there is nothing to
time against.  As a yardstick, the script times a direct per-pair
implementation in plain Python (loops over the steps of one pair of sequences,
``math`` functions; the same recursion) on a few sequences, reports its time
per pair of sequences and its largest relative difference from our kernels,
and extrapolates that per-pair time to N (clearly labelled as an
extrapolation).

Every timed call is preceded by one untimed warm-up call; times are the best
and the median of ``--repeats`` calls under ``torch.no_grad()``; a cell whose
warm-up call takes over ``--long`` seconds is timed by that one call.  The
largest cell (N=1000, T=64, mean: 2 billion step pairs, about half an hour of
one core) is not run by default but extrapolated from N=200 (``--skip`` with no
cells runs it).  Inputs are
X ~ N(0, 1) (every sequence of full length T).  The machine's load average is
printed: other processes sharing the cores make every number slower.

Usage (from the repository root)::

    python benchmarks/rnn_kernels.py                          # N = 200 1000, T = 16 64
    python benchmarks/rnn_kernels.py --n 200 --t 50 --readouts last
    python benchmarks/rnn_kernels.py --threads 1              # one core
    python benchmarks/rnn_kernels.py --smoke                  # seconds, for the tests
    python benchmarks/rnn_kernels.py --gated                  # GRU and LSTM NNGP: N:T = 50:20 and 200:50
    python benchmarks/rnn_kernels.py --gated --kind ntk       # GRU and LSTM NNGP + NTK (one pass)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

from gpytorch_tp import RNNKernel
from gpytorch_tp.layers import RNN, Linear

FEATURES = 8
WEIGHT_VARIANCE, INPUT_VARIANCE, BIAS_VARIANCE, READOUT_VARIANCE = 1.5, 1.0, 0.1, 1.0


def our_kernel(steps: int, readout: str) -> RNNKernel:
    kernel = RNNKernel((steps, FEATURES), nonlinearity="erf", kind="ntk", readout=readout).to(torch.float64)
    # Set the variances in float64 (the constructor stores them in the default dtype).
    for layer in kernel.architecture:
        if isinstance(layer, RNN):
            layer.weight_variance, layer.input_variance, layer.bias_variance = (
                WEIGHT_VARIANCE,
                INPUT_VARIANCE,
                BIAS_VARIANCE,
            )
        elif isinstance(layer, Linear):
            layer.weight_variance, layer.bias_variance = READOUT_VARIANCE, BIAS_VARIANCE
    return kernel


def inputs(n: int, steps: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, steps * FEATURES, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------
# The yardstick: one pair of sequences at a time, plain Python.
# ----------------------------------------------------------------------------


def _erf_moments(k11: float, k22: float, k12: float) -> tuple[float, float]:
    a = (1.0 + 2.0 * k11) * (1.0 + 2.0 * k22)
    return (2.0 / math.pi) * math.asin(2.0 * k12 / math.sqrt(a)), (4.0 / math.pi) / math.sqrt(a - 4.0 * k12 * k12)


def loop_pair(a: list[list[float]], b: list[list[float]], readout: str) -> tuple[float, float]:
    """(NNGP, NTK) of the one-layer erf RNN for one pair of sequences (lists of steps)."""
    w, u, bias, v = WEIGHT_VARIANCE, INPUT_VARIANCE, BIAS_VARIANCE, READOUT_VARIANCE
    d = len(a[0])

    def dot(p, q):
        return sum(x * y for x, y in zip(p, q)) / d

    def hidden(seq):
        out, previous = [], 0.0
        for step in seq:
            kh = w * previous + u * dot(step, step) + bias
            out.append(kh)
            previous = _erf_moments(kh, kh, kh)[0]
        return out

    h1, h2 = hidden(a), hidden(b)
    if readout == "last":  # the aligned chain of step pairs ending at the last steps
        k = theta = 0.0
        for t in range(len(a)):
            kh = w * k + u * dot(a[t], b[t]) + bias
            value, derivative = _erf_moments(h1[t], h2[t], kh)
            k, theta = value, derivative * (kh + w * theta)
        r, r_ntk = k, theta
    else:
        steps = len(a)
        ks = [[0.0] * steps for _ in range(steps)]
        ts = [[0.0] * steps for _ in range(steps)]
        for t in range(steps):
            for s in range(steps):
                earlier = t > 0 and s > 0
                kh = w * (ks[t - 1][s - 1] if earlier else 0.0) + u * dot(a[t], b[s]) + bias
                value, derivative = _erf_moments(h1[t], h2[s], kh)
                ks[t][s] = value
                ts[t][s] = derivative * (kh + w * (ts[t - 1][s - 1] if earlier else 0.0))
        r = sum(map(sum, ks)) / steps**2
        r_ntk = sum(map(sum, ts)) / steps**2
    nngp = v * r + bias
    return nngp, nngp + v * r_ntk


def loop_matrices(x: torch.Tensor, steps: int, readout: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The per-pair loop over the upper triangle of K(X, X); returns (nngp, ntk, pairs computed)."""
    seqs = x.reshape(len(x), steps, FEATURES).tolist()
    n = len(seqs)
    nngp, ntk = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            nngp[i, j], ntk[i, j] = loop_pair(seqs[i], seqs[j], readout)
            nngp[j, i], ntk[j, i] = nngp[i, j], ntk[i, j]
    return nngp, ntk, n * (n + 1) // 2


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def time_call(fn, repeats: int, long_seconds: float) -> dict:
    """One warm-up call, then ``repeats`` timed calls (seconds).

    A warm-up call that takes longer than ``long_seconds`` is the only measurement
    (``single``): at that size the warm-up effects are negligible.
    """
    with torch.no_grad():
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        if first > long_seconds:
            return {"best": first, "median": first, "all": [first], "single": True}
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"best": min(times), "median": statistics.median(times), "all": times}


def benchmark(
    ns: list[int],
    ts: list[int],
    readouts: list[str],
    repeats: int,
    reference_n: int,
    long_seconds: float = 20.0,
    skip: frozenset = frozenset(),
) -> dict:
    rows, yardstick = [], []
    for steps in ts:
        for readout in readouts:
            kernel = our_kernel(steps, readout)
            if reference_n > 0:
                x = inputs(reference_n, steps, seed=1)
                start = time.perf_counter()
                nngp_loop, ntk_loop, pairs = loop_matrices(x, steps, readout)
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    nngp, ntk = kernel.nngp_and_ntk(x)
                difference = max(
                    ((nngp - nngp_loop).abs().max() / nngp_loop.abs().max()).item(),
                    ((ntk - ntk_loop).abs().max() / ntk_loop.abs().max()).item(),
                )
                yardstick.append(
                    {"t": steps, "readout": readout, "n": reference_n, "seconds": seconds,
                     "per_pair": seconds / pairs, "max_relative_difference": difference}
                )  # fmt: skip
            for n in ns:
                if (n, steps, readout) in skip:
                    rows.append({"n": n, "t": steps, "readout": readout, "skipped": True})
                    continue
                x = inputs(n, steps)
                timing = time_call(lambda kernel=kernel, x=x: kernel.nngp_and_ntk(x), repeats, long_seconds)
                rows.append({"n": n, "t": steps, "readout": readout, "ours_nngp_ntk": timing})
                print(
                    f"  N={n:5d} T={steps:3d} {readout:4s}: {timing['best']:.3f} / {timing['median']:.3f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return {"rows": rows, "yardstick": yardstick, "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def format_table(result: dict) -> str:
    per_pair = {(y["t"], y["readout"]): y["per_pair"] for y in result["yardstick"]}
    lines = [
        "| N | T | readout | gpytorch_tp NNGP+NTK (s) | per-pair Python loop, extrapolated (s) |",
        "|---:|---:|---|---:|---:|",
    ]
    measured = {(r["n"], r["t"], r["readout"]): r["ours_nngp_ntk"] for r in result["rows"] if "ours_nngp_ntk" in r}
    for row in result["rows"]:
        pairs = row["n"] * (row["n"] + 1) // 2
        key = (row["t"], row["readout"])
        loop = f"~{per_pair[key] * pairs:.3g}" if key in per_pair else "-"
        if row.get("skipped"):
            # Scale the largest measured N with the same T and readout by the number of pairs.
            smaller = [n for (n, t, r) in measured if (t, r) == key and n < row["n"]]
            if smaller:
                n0 = max(smaller)
                estimate = measured[(n0, *key)]["median"] * pairs / (n0 * (n0 + 1) // 2)
                seconds = f"not run (~{estimate:.3g} extrapolated from N={n0})"
            else:
                seconds = "not run"
            lines.append(f"| {row['n']} | {row['t']} | {row['readout']} | {seconds} | {loop} |")
            continue
        timing = row["ours_nngp_ntk"]
        seconds = (
            f"{timing['best']:.1f} (one call)"
            if timing.get("single")
            else f"{timing['best']:.3f} / {timing['median']:.3f}"
        )
        lines.append(f"| {row['n']} | {row['t']} | {row['readout']} | {seconds} | {loop} |")
    lines.append("")
    lines.append(
        "Times: best / median of the timed calls after a warm-up call, seconds; x1 is x2 (the upper triangle of "
        "pairs).  (one call): the warm-up call took over the --long limit and is the only measurement."
    )
    if result["yardstick"]:
        lines.append(
            "Per-pair Python loop (a yardstick, not a peer: no library computes RNN kernels), measured on "
            "N sequences and extrapolated to N(N+1)/2 pairs:"
        )
        for y in result["yardstick"]:
            lines.append(
                f"  T={y['t']} {y['readout']}: {1e3 * y['per_pair']:.2f} ms per pair (N={y['n']}, "
                f"{y['seconds']:.2f} s); largest relative difference from ours {y['max_relative_difference']:.1e}"
            )
    lines.append(f"Peak resident memory of the process: {result['peak_rss_mib']:.0f} MiB.")
    return "\n".join(lines)


def machine_summary() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads); load average {load}"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", help="numbers of sequences (default 200 1000)")
    parser.add_argument("--t", type=int, nargs="+", help="sequence lengths (default 16 64)")
    parser.add_argument("--readouts", nargs="+", choices=["last", "mean"], default=["last", "mean"])
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default 3)")
    parser.add_argument("--reference-n", type=int, help="sequences for the per-pair Python loop (default 12; 0: skip)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--long", type=float, default=20.0, help="time cells whose first call exceeds this once (s)")
    parser.add_argument(
        "--skip",
        nargs="*",
        help="cells N:T:readout not to run, extrapolated from a smaller N (default 1000:64:mean; --skip alone: none)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for the tests)")
    parser.add_argument(
        "--gated",
        action="store_true",
        help="time the GRU and LSTM NNGP kernels instead (N:T cells from --cells; default 50:20 200:50)",
    )
    parser.add_argument("--cells", nargs="+", help="N:T cells of --gated (default 50:20 200:50)")
    parser.add_argument("--particles", type=int, default=1024, help="num_particles of --gated (default 1024)")
    parser.add_argument("--kernels", nargs="+", default=["GRUKernel", "LSTMKernel"], help="kernels of --gated")
    parser.add_argument("--options", default="", help="kernel keyword arguments of --gated, e.g. 'gate=\"erf\"'")
    parser.add_argument(
        "--kind", choices=["nngp", "ntk"], default="nngp", help="--gated: the NNGP, or NNGP + NTK (nngp_and_ntk)"
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------
# Gated networks (--gated)
# ----------------------------------------------------------------------------


def gated_benchmark(
    cells: list[tuple[int, int]],
    particles: int,
    long_seconds: float,
    kernels=("GRUKernel", "LSTMKernel"),
    options="",
    kind="nngp",
) -> dict:
    """GRU and LSTM NNGP (or, with ``kind="ntk"``, NNGP + NTK from one pass; last state), float64,
    x1 is x2: time and peak memory per cell.

    ``options``: extra keyword arguments of the kernels, as Python source
    (e.g. ``nonlinearity="erf", gate="erf"``; default: sigmoid gates, tanh).

    Each cell runs once (the first call; the kernels are seconds to minutes, so
    warm-up effects are negligible) in a fresh process, so that ``ru_maxrss``
    is the cell's own peak memory.
    """
    import subprocess

    rows = []
    for name in kernels:
        for n, steps in cells:
            code = (
                "import resource, sys, time, torch\n"
                f"sys.path.insert(0, {str(REPO)!r})\n"
                f"from gpytorch_tp import {name}\n"
                f"k = {name}(({steps}, {FEATURES}), num_particles={particles}, kind={kind!r}, {options}).double()\n"
                f"x = torch.randn({n}, {steps * FEATURES}, generator=torch.Generator().manual_seed(0), "
                "dtype=torch.float64)\n"
                "start = time.perf_counter()\n"
                "with torch.no_grad():\n"
                + ("    k.nngp_and_ntk(x)\n" if kind == "ntk" else "    k(x).to_dense()\n")
                + "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            seconds, rss = (float(v) for v in done.stdout.split())
            rows.append(
                {
                    "kernel": f"{name}({options})",
                    "kind": kind,
                    "n": n,
                    "t": steps,
                    "seconds": seconds,
                    "peak_rss_mib": rss,
                }
            )
            print(
                f"  {name} {kind} N={n:4d} T={steps:3d}: {seconds:.1f} s, peak RSS {rss:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return {"gated": rows, "particles": particles}


def format_gated_table(result: dict) -> str:
    lines = [
        f"| kernel | kind | N | T | time (s) | peak RSS (MiB) |  (num_particles={result['particles']})",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["gated"]:
        kind = "nngp + ntk" if r["kind"] == "ntk" else "nngp"
        lines.append(f"| {r['kernel']} | {kind} | {r['n']} | {r['t']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gated:
        default_cells = ["6:4"] if args.smoke else ["50:20", "200:50"]
        cells = [tuple(int(v) for v in cell.split(":")) for cell in (args.cells or default_cells)]
        print(machine_summary())
        particles = 64 if args.smoke else args.particles
        result = gated_benchmark(cells, particles, args.long, args.kernels, args.options, args.kind)
        print(format_gated_table(result))
        print(f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        return result
    ns = args.n or ([20] if args.smoke else [200, 1000])
    ts = args.t or ([4] if args.smoke else [16, 64])
    repeats = args.repeats or (1 if args.smoke else 3)
    reference_n = args.reference_n if args.reference_n is not None else (4 if args.smoke else 12)
    print(machine_summary())
    print(
        f"Network: RNN(erf, sigma_w^2={WEIGHT_VARIANCE}, sigma_u^2={INPUT_VARIANCE}, sigma_b^2={BIAS_VARIANCE}) "
        f"-> readout -> Linear, d={FEATURES}, float64, x1 is x2."
    )
    skip_args = ["1000:64:mean"] if args.skip is None else args.skip
    skip = frozenset((int(n), int(t), r) for n, t, r in (cell.split(":") for cell in skip_args))
    result = benchmark(ns, ts, args.readouts, repeats, reference_n, args.long, skip)
    print()
    print(format_table(result))
    print(f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return result


if __name__ == "__main__":
    main()
