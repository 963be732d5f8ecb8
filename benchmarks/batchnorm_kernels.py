#!/usr/bin/env python3
"""Time and peak memory of the BatchNorm + ReLU MLP NNGP kernels (float64).

* single batch: ``batchnorm_mlp_nngp(x)`` for a batch of ``B`` points (default 256), the
  ``B x B`` kernel of one batch, for several depths;
* pairwise: ``BatchNormMLPKernel(reference, depth)`` on ``N`` points (time per pair of points).

Each configuration runs in a fresh child process, so that its peak resident memory
(``ru_maxrss``) is its own; the table gives the peak minus the child's resident memory after
imports and inputs (the memory the evaluation itself added).  One untimed warm-up call, then
``--repeats`` timed calls (best and median wall time, median CPU time of all threads: on a
shared machine the CPU time is the steadier number).

    python benchmarks/batchnorm_kernels.py                      # B = 256, depths 1 2 5
    python benchmarks/batchnorm_kernels.py --batch 64 --depths 1 --pairwise-n 4 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(config: dict, queue) -> None:
    import torch

    from gpytorch_tp import BatchNormMLPKernel
    from gpytorch_tp.batchnorm import batchnorm_mlp_nngp

    torch.set_num_threads(config["threads"])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(config["points"], config["features"], generator=generator, dtype=torch.float64)
    if config["kind"] == "single":

        def call():
            return batchnorm_mlp_nngp(x, depth=config["depth"])
    else:
        reference = torch.randn(config["reference"], config["features"], generator=generator, dtype=torch.float64)
        kernel = BatchNormMLPKernel(reference, depth=config["depth"], accuracy=config["accuracy"]).double()

        def call():
            return kernel(x).to_dense()

    baseline = _rss_mib()
    with torch.no_grad():
        result = call()  # warm-up
        times, cpu_times = [], []
        for _ in range(config["repeats"]):
            start, cpu_start = time.perf_counter(), time.process_time()
            result = call()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    queue.put(
        {
            **config,
            "best_s": min(times),
            "median_s": statistics.median(times),
            "median_cpu_s": statistics.median(cpu_times),
            "added_peak_mib": _rss_mib() - baseline,
            "finite": bool(torch.isfinite(result).all()),
        }
    )


def run(config: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(config, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="points in the single batch")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--pairwise-n", type=int, default=16, help="points of the pairwise kernel matrix (0: skip)")
    parser.add_argument("--reference", type=int, default=8, help="reference points of the pairwise kernel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch_threads_default())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, threads={args.threads}")
    print(f"# load average before: {os.getloadavg()}")
    rows = []
    common = {"features": args.features, "repeats": args.repeats, "threads": args.threads}
    for depth in args.depths:
        rows.append(run({**common, "kind": "single", "points": args.batch, "depth": depth}))
    if args.pairwise_n:
        for accuracy in ("fast", "default"):
            config = {"kind": "pairwise", "points": args.pairwise_n, "reference": args.reference}
            rows.append(run({**common, **config, "depth": 2, "accuracy": accuracy}))
    print(f"# load average after: {os.getloadavg()}")

    print("\n| kernel | points | depth | best (s) | median (s) | median CPU (s) | added peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "single":
            name = "single batch (B x B)"
        else:
            pairs = r["points"] * (r["points"] - 1) // 2
            name = f"pairwise, {r['reference']} reference points, {r['accuracy']} ({pairs} pairs)"
        print(
            f"| {name} | {r['points']} | {r['depth']} | {r['best_s']:.3f} | {r['median_s']:.3f} "
            f"| {r['median_cpu_s']:.3f} | {r['added_peak_mib']:.0f} |"
        )
    result = {"rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def torch_threads_default() -> int:
    # One thread: the per-node linear algebra is small (B <= a few hundred), and on a shared machine
    # two OpenMP threads made LAPACK 20-40x slower (spin-waiting at barriers) than one.
    return 1


if __name__ == "__main__":
    main()
