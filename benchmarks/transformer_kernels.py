#!/usr/bin/env python
"""Benchmark: NNGP + NTK of an infinitely wide transformer (time and peak memory, CPU).

Times ``TransformerKernel(input_shape=(T, d), depth=2, positional="add")
.nngp_and_ntk(X)`` (both kernels from one pass, ``x1 is x2``, float64) for N
sequences of T tokens of d features, X ~ N(0, 1), every sequence of full
length (``--padded`` cuts a third of them short, with NaN padding).  Each
layer works on the (N1, N2, T, T) token-pair covariances of a tile of
sequence pairs: O(N^2 T^2) numbers, O(N^2 T^3) operations (two T x T matrix
products per pair and attention layer).

Every timed call follows one untimed warm-up call; times are the best and the
median of ``--repeats`` calls under ``torch.no_grad()``, with the CPU time of
the process during the fastest call (less sensitive to other processes on a
shared machine than wall time).  Peak memory is the
growth of the process's peak resident set (``ru_maxrss``) over its value
before the first evaluation, so it counts the evaluation's tiles, its
per-sequence work and the outputs.  The machine's load average is printed:
other processes sharing the cores make every number slower.

No peer computes this kernel (neural-tangents' attention layer has tied
query/key weights too, but it needs a different environment and its own
LayerNorm conventions), so there is nothing to time against here.

Usage (from the repository root)::

    python benchmarks/transformer_kernels.py                    # N=100, T=32, d=16, depth 2
    python benchmarks/transformer_kernels.py --n 100 200 --t 16 32 --readouts mean last
    python benchmarks/transformer_kernels.py --smoke            # seconds, for the tests
"""

from __future__ import annotations

import argparse
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

from gpytorch_tp import TransformerKernel


def inputs(n: int, steps: int, d: int, padded: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, d, generator=g, dtype=torch.float64)
    if padded:  # every third sequence loses its last quarter
        x[::3, steps - steps // 4 :] = float("nan")
    return x.reshape(n, steps * d)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_call(fn, repeats: int) -> dict:
    """Wall-clock best and median, and the CPU time of the process for the best-wall call."""
    fn()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"best": min(times), "median": statistics.median(times), "cpu": cpu[times.index(min(times))]}


def benchmark(sizes, steps_list, d: int, depth: int, readouts, repeats: int, padded: bool) -> list[dict]:
    rows = []
    baseline = peak_rss_mib()
    for steps in steps_list:
        for n in sizes:
            for readout in readouts:
                kernel = TransformerKernel(
                    (steps, d), depth=depth, readout=readout, positional="add", causal=readout == "last"
                ).double()
                x = inputs(n, steps, d, padded)

                def run(kernel=kernel, x=x):
                    with torch.no_grad():
                        nngp, ntk = kernel.nngp_and_ntk(x)
                    assert torch.isfinite(nngp).all() and torch.isfinite(ntk).all()
                    return nngp, ntk

                timing = time_call(run, repeats)
                rows.append(
                    {
                        "n": n,
                        "steps": steps,
                        "readout": readout,
                        "causal": readout == "last",
                        **timing,
                        "peak_growth_mib": peak_rss_mib() - baseline,
                        "token_pairs": n * (n + 1) // 2 * steps * steps,
                    }
                )
                print(
                    f"  N={n} T={steps} readout={readout}: best {timing['best']:.3f} s, median "
                    f"{timing['median']:.3f} s, peak RSS growth so far {rows[-1]['peak_growth_mib']:.0f} MiB",
                    flush=True,
                )
    return rows


def format_table(rows: list[dict], d: int, depth: int) -> str:
    lines = [
        "| N | T | readout | NNGP + NTK best (s) | median (s) | CPU (s) | peak RSS growth (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        readout = r["readout"] + (" (causal)" if r["causal"] else "")
        lines.append(
            f"| {r['n']} | {r['steps']} | {readout} | {r['best']:.3f} | {r['median']:.3f} | {r['cpu']:.3f} | "
            f"{r['peak_growth_mib']:.0f} |"
        )
    lines.append(f"(d = {d}, depth {depth}, float64, x1 is x2; peak growth is cumulative over the rows above)")
    return "\n".join(lines)


def machine_summary() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} intra-op threads); "
        f"load average {load}"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100], help="numbers of sequences")
    parser.add_argument("--t", type=int, nargs="+", default=[32], help="sequence lengths")
    parser.add_argument("--d", type=int, default=16, help="features per token")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
    parser.add_argument("--readouts", nargs="+", default=["mean"], choices=["mean", "last", "first"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--padded", action="store_true", help="NaN-pad every third sequence")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.n, args.t, args.d, args.repeats = [6], [5], 3, 1
    print(f"Machine: {machine_summary()}")
    rows = benchmark(args.n, args.t, args.d, args.depth, args.readouts, args.repeats, args.padded)
    table = format_table(rows, args.d, args.depth)
    print(table)
    print(f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    main()
