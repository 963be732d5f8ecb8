#!/usr/bin/env python
"""Benchmark: a CNN-GAP kernel matrix precomputed by 1 and 2 local processes, and the accounting of 8-64 ranks.

Issue 20, item 5: the precompute, and an epoch of the distributed exact GP (``ShardedKernel``).

1. **Strong scaling on this machine.** ``precompute_kernel`` of the NNGP and NTK
   of ``CNNKernel(input_shape=(3, S, S), depth=3, readout="global_avg_pool")``
   (3x3 filters, ReLU, same padding, sigma_w^2 = 2, sigma_b^2 = 0.01, float64)
   on N random images, ``K(X, X)``, into a store in a temporary directory, run as

   * 1 process x 1 thread (``run_local(..., 1, threads=1)``): the strong-scaling base;
   * 1 process x 2 threads (``threads=2``): the same two cores used by intra-op threads;
   * 2 processes x 1 thread each (``run_local(..., 2, threads=1)``, gloo over 127.0.0.1);

   and, as the in-run peer baseline, ``kernel.nngp_and_ntk(X)`` in one fresh
   process with 1 and with 2 threads (no tiles, no store).  Every measurement runs
   in its own fresh process(es), so each rank's peak resident memory
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own (it includes the
   ~300 MB of importing torch).  "precompute" is ``PrecomputeReport.seconds``
   (checksum agreement, store, tiles, final barrier), "tiles" the sum of the
   rank's tile times, "launch" the parent's wall time around ``run_local``
   (process start, imports and group formation included).  Speed-up and
   efficiency are against 1 process x 1 thread; the matrices of 1 and 2
   processes (1 thread each) are compared bit for bit.

   The issue's size (N = 2,000 images of 16x16x3) takes hours on 2 cores; the
   default here is N = 400 images of 8x8x3 (a few minutes in all).

2. **Simulated scale-out** to 8, 16, 32, 64 ranks, from the code's own accounting
   (no process is started): the ``TileGrid`` of ``default_tile_size`` (the same as
   a run would use) and ``assign_balanced`` on ``TileGrid.cost``, for
   ``--sim-n`` images of ``--sim-size`` pixels (default the issue's 2,000 of 16x16x3):
   tiles per rank, load imbalance (largest share's cost over the mean), bytes
   each rank writes (NNGP and NTK, off-diagonal tiles twice: mirrored), bytes of
   inputs each rank holds (replicated) and touches (the rows and columns of its
   tiles), and the bytes of the checksum agreement (an all-gather of each rank's
   fingerprint, a length and the JSON).

3. **Exact GP epoch, 1 -> 2 processes.** One ``ExactMarginalLogLikelihood`` forward and
   backward in GPyTorch's CG mode (``max_cholesky_size(0)``, its default CG tolerance,
   10 probe vectors, pivoted-Cholesky preconditioner of rank 15 from N = 2,000) of
   ``ScaleKernel(ShardedKernel(MLPKernel(depth=3, kind="ntk")))`` on ``--gp-n`` points of
   ``--gp-d`` features, float64, at 1 process x 1 thread, 1 process x 2 threads and 2
   processes x 1 thread: seconds of the epoch, peak resident memory per rank, the
   products summed over the ranks and the bytes each rank handed to the collectives
   (``gpytorch_tp.distributed.traffic``, the operator's own accounting), and the
   relative differences of the loss and gradients between 1 and 2 processes.  The
   simulated table adds, for 8-64 ranks, each rank's tiles and held share of ``K`` and the
   bytes it exchanges per CG iteration (``product_exchange_bytes`` of ``N x 11``, and
   ``2 (P - 1) / P`` of that for a ring all-reduce), from ``shard_tile_size``, ``TileGrid``
   and ``assign_balanced`` as the operator uses them.  The issue's N = 20,000 does not fit
   the ten minutes of this 2-core machine (``--gp-n 5000 10000`` by default).

Usage (from the repository root)::

    python benchmarks/distributed.py                 # N = 400, 8x8x3; ranks 8 16 32 64 simulated
    python benchmarks/distributed.py --n 1000 --size 8
    python benchmarks/distributed.py --smoke         # tiny sizes (seconds)
    python benchmarks/distributed.py --no-precompute --gp-n 5000   # only the exact GP epoch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import gpytorch
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

from gpytorch_tp import CNNKernel, MLPKernel
from gpytorch_tp.distributed import (
    ShardedKernel,
    TileGrid,
    assign_balanced,
    default_tile_size,
    fingerprint,
    open_kernel_matrix,
    precompute_kernel,
    product_exchange_bytes,
    run_local,
    traffic,
)
from gpytorch_tp.distributed.sharded import shard_tile_size
from gpytorch_tp.evaluation import matrix_free_block_sizes
from gpytorch_tp.layers import Conv, Linear

DEPTH = 3
CHANNELS = 3
FILTER_SIZE = 3
WEIGHT_VARIANCE = 2.0
BIAS_VARIANCE = 0.01
KINDS = ("nngp", "ntk")
ITEM = 8  # bytes of a float64
# Seconds for a whole run of processes / for the group to form and every collective.
RUN_TIMEOUT = 3600
GROUP_TIMEOUT = 120


def cnn_gap_kernel(size: int) -> CNNKernel:
    """The benchmark's kernel: depth-3 ReLU CNN with global average pooling, float64."""
    kernel = CNNKernel(
        input_shape=(CHANNELS, size, size),
        depth=DEPTH,
        kernel_size=FILTER_SIZE,
        nonlinearity="relu",
        kind="ntk",
        readout="global_avg_pool",
        padding="same",
        weight_variance=WEIGHT_VARIANCE,
        bias_variance=BIAS_VARIANCE,
    ).to(dtype=torch.float64)
    for layer in kernel.modules():  # the variances again in float64 (the constructor rounds to float32)
        if isinstance(layer, (Conv, Linear)):
            layer.weight_variance = WEIGHT_VARIANCE
            layer.bias_variance = BIAS_VARIANCE
    return kernel


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """N(0, 1) images, flattened channel-major ``(n, 3 * size * size)``, float64 (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, CHANNELS * size * size, generator=g, dtype=torch.float64)


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


# ----------------------------------------------------------------------------
# What the processes run (run_local pickles these by name: benchmarks.distributed.*)


def rank_precompute(n: int, size: int, seed: int, path: str, tile_size: int | None) -> dict:
    """This rank's share of the kernel matrix; its times, tiles and peak memory."""
    kernel, x = cnn_gap_kernel(size), images(n, size, seed)
    tile_seconds = []
    report = precompute_kernel(
        kernel, x, path=path, tile_size=tile_size, progress=lambda e: tile_seconds.append(e.seconds),
        timeout=GROUP_TIMEOUT,
    )
    return {
        "rank": report.rank,
        "world_size": report.world_size,
        "threads": torch.get_num_threads(),
        "seconds": report.seconds,
        "tile_seconds": float(sum(tile_seconds)),
        "tiles": len(report.computed),
        "grid_tiles": report.tiles,
        "peak_rss": _peak_rss_bytes(),
    }


def rank_direct(n: int, size: int, seed: int, path: str) -> dict:
    """``kernel.nngp_and_ntk(X)`` in one process (the peer baseline); the matrices saved to ``path``."""
    kernel, x = cnn_gap_kernel(size), images(n, size, seed)
    started = time.perf_counter()
    with torch.no_grad():
        nngp, ntk = kernel.nngp_and_ntk(x)
    seconds = time.perf_counter() - started
    torch.save({"nngp": nngp, "ntk": ntk}, path)
    return {"threads": torch.get_num_threads(), "seconds": seconds, "peak_rss": _peak_rss_bytes()}


class _ExactGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(ShardedKernel(gp_kernel(), timeout=GROUP_TIMEOUT))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def gp_kernel() -> MLPKernel:
    """The exact-GP benchmark's kernel: the NTK of a depth-3 ReLU MLP, matrix free."""
    return MLPKernel(depth=3, kind="ntk", matrix_free=True).double()


def gp_data(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform inputs in [-1, 1]^d and a smooth target with noise (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x[:, 0]) * x[:, 1 % d] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def rank_gp_epoch(n: int, d: int, seed: int) -> dict:
    """One MLL forward and backward in CG mode; its time, the collectives' traffic and this rank's peak memory."""
    x, y = gp_data(n, d, seed)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = _ExactGP(x, y, likelihood).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    traffic.reset()
    with gpytorch.settings.max_cholesky_size(0):
        torch.manual_seed(seed)  # the probe vectors: the same on every rank
        started = time.perf_counter()
        loss = -mll(model(x), y)
        forward = time.perf_counter() - started
        loss.backward()
        seconds = time.perf_counter() - started
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return {
        "rank": rank,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "forward": forward,
        "loss": float(loss),
        "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()},
        "products": traffic.products,
        "gradients": traffic.gradients,
        "collectives": traffic.collectives,
        "bytes": traffic.bytes,
        "peak_rss": _peak_rss_bytes(),
    }


def _worker_module():
    # Import this file as benchmarks.distributed (REPO is on sys.path), so that the
    # spawned processes find the functions by that name however this file was loaded.
    import importlib

    return importlib.import_module("benchmarks.distributed")


# ----------------------------------------------------------------------------
# 1. Strong scaling


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def strong_scaling(
    n: int, size: int, seed: int, tile_size: int | None, workdir: str, two_threads: bool = True
) -> dict:
    module = _worker_module()
    configs = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]
    if not two_threads:  # --smoke: fewer process starts
        configs.pop(1)
    runs, stores = [], {}
    for label, processes, threads in configs:
        path = os.path.join(workdir, f"K_{processes}x{threads}")
        started = time.perf_counter()
        ranks = run_local(
            module.rank_precompute, processes, args=(n, size, seed, path, tile_size),
            timeout=RUN_TIMEOUT, group_timeout=GROUP_TIMEOUT, threads=threads,
        )
        launch = time.perf_counter() - started
        runs.append({"label": label, "processes": processes, "threads": threads, "launch": launch,
                     "seconds": max(r["seconds"] for r in ranks), "ranks": ranks})
        stores[(processes, threads)] = open_kernel_matrix(path)
    base = runs[0]["seconds"]
    for run in runs:
        run["speedup"] = base / run["seconds"]
        run["efficiency"] = run["speedup"] / (run["processes"] * run["threads"])

    direct = []
    for threads in (1, 2) if two_threads else (1,):
        path = os.path.join(workdir, f"direct_{threads}.pt")
        started = time.perf_counter()
        (result,) = run_local(
            module.rank_direct, 1, args=(n, size, seed, path), timeout=RUN_TIMEOUT, group_timeout=GROUP_TIMEOUT,
            threads=threads,
        )
        result["launch"] = time.perf_counter() - started
        result["matrices"] = torch.load(path)
        direct.append(result)

    one, two = stores[(1, 1)], stores[(2, 1)]
    agreement = {
        "bitwise_1p_2p": all(
            np.array_equal(np.asarray(one.array(kind)), np.asarray(two.array(kind))) for kind in KINDS
        ),
        "vs_direct": max(
            _relative_difference(stores[key][kind], d["matrices"][kind])
            for key in stores for d in direct for kind in KINDS
        ),
        "vs_1p_1t": max(
            _relative_difference(stores[key][kind], one[kind]) for key in stores for kind in KINDS
        ),
        "finite": all(bool(torch.isfinite(stores[key][kind]).all()) for key in stores for kind in KINDS),
    }
    for d in direct:
        d.pop("matrices")
    return {"n": n, "size": size, "runs": runs, "direct": direct, "agreement": agreement,
            "tile_size": int(one.manifest["tile_size"]), "grid_tiles": runs[0]["ranks"][0]["grid_tiles"]}


# ----------------------------------------------------------------------------
# 2. Simulated scale-out


def _checksum_payload(kernel, d: int, tile_size: int) -> int:
    """Bytes of one rank's fingerprint as the agreement sends it (its JSON; the digests are fixed length)."""
    arguments = {"tile_size": tile_size, "kinds": list(KINDS), "symmetric": True, "overwrite": False}
    checks = fingerprint(kernel, torch.zeros(1, d, dtype=torch.float64), None, arguments)
    return len(json.dumps(checks, sort_keys=True).encode())


def simulate(n: int, size: int, world_sizes: list[int], tile_size: int | None = None) -> dict:
    """The accounting of ``precompute_kernel`` for ``K(X, X)`` of ``n`` images on each world size; no processes."""
    kernel = cnn_gap_kernel(size)
    d = CHANNELS * size * size
    if tile_size is None:
        tile_size = default_tile_size(kernel, torch.empty(n, d, dtype=torch.float64, device="meta"))
    grid = TileGrid(n, n, tile_size, symmetric=True)
    costs = [grid.cost(t) for t in grid]
    written = [len(KINDS) * ITEM * t.pairs * (1 if t.diagonal else 2) for t in grid]
    payload = _checksum_payload(kernel, d, tile_size)
    rows = []
    for p in world_sizes:
        shares = assign_balanced(costs, p)
        loads = [sum(costs[k] for k in share) for share in shares]
        mean = sum(loads) / p
        touched = []
        for share in shares:
            blocks = set()
            for k in share:
                blocks.update((grid[k].row, grid[k].col))
            touched.append(sum(grid._span(b, n)[1] - grid._span(b, n)[0] for b in blocks) * d * ITEM)
        per_rank_written = [sum(written[k] for k in share) for share in shares]
        rows.append({
            "world_size": p,
            "tiles_min": min(map(len, shares)),
            "tiles_max": max(map(len, shares)),
            "tiles_total": sum(map(len, shares)),
            "imbalance": max(loads) / mean - 1 if mean else 0.0,
            "ideal_speedup": sum(loads) / max(loads) if max(loads) else 0.0,
            "written_min": min(per_rank_written),
            "written_max": max(per_rank_written),
            "inputs_held": n * d * ITEM,
            "inputs_touched_max": max(touched),
            # all_gather of (int64 length, JSON padded to the longest): every rank gets P of them.
            "checksum_per_rank": p * (8 + payload),
            "checksum_total": p * p * (8 + payload),
        })
    return {"n": n, "size": size, "tile_size": tile_size, "tiles": len(grid), "checksum_payload": payload,
            "matrix_bytes": len(KINDS) * n * n * ITEM, "rows": rows}


# ----------------------------------------------------------------------------
# 3. Exact GP epoch


def gp_epochs(sizes: list[int], d: int, seed: int, two_threads: bool = True) -> list[dict]:
    """``rank_gp_epoch`` at 1 process x 1 thread, (1 x 2 threads), 2 processes x 1 thread, for each N."""
    module = _worker_module()
    configs = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]
    if not two_threads:
        configs.pop(1)
    results = []
    for n in sizes:
        runs = []
        for label, processes, threads in configs:
            started = time.perf_counter()
            ranks = run_local(
                module.rank_gp_epoch, processes, args=(n, d, seed),
                timeout=RUN_TIMEOUT, group_timeout=GROUP_TIMEOUT, threads=threads,
            )
            runs.append({"label": label, "processes": processes, "threads": threads,
                         "launch": time.perf_counter() - started,
                         "seconds": max(r["seconds"] for r in ranks), "ranks": ranks})
        base = runs[0]["seconds"]
        for run in runs:
            run["speedup"] = base / run["seconds"]
        one, two = runs[0]["ranks"][0], runs[-1]["ranks"]
        agreement = {
            "loss_1p_2p": abs(two[0]["loss"] - one["loss"]) / abs(one["loss"]),
            "grads_1p_2p": max(_relative_difference(two[0]["grads"][k], one["grads"][k]) for k in one["grads"]),
            "ranks_equal": two[0]["loss"] == two[1]["loss"]
            and all(torch.equal(two[0]["grads"][k], two[1]["grads"][k]) for k in one["grads"]),
        }
        for run in runs:
            for r in run["ranks"]:
                r.pop("grads")
        results.append({"n": n, "d": d, "runs": runs, "agreement": agreement})
    return results


def simulate_gp(n: int, d: int, world_sizes: list[int], probes: int = 10) -> dict:
    """The accounting of ``ShardedKernelOperator`` for an exact GP on ``n`` points, per world size; no processes."""
    x = torch.empty(0, d, dtype=torch.float64)
    plain, _ = matrix_free_block_sizes(gp_kernel().block_covariance(x), x)
    columns = 1 + probes
    payload = product_exchange_bytes(n, columns, ITEM)
    rows = []
    for p in world_sizes:
        grid = TileGrid(n, n, shard_tile_size(n, n, plain, p), symmetric=True)
        costs = [grid.cost(t) for t in grid]
        shares = assign_balanced(costs, p)
        loads = [sum(costs[k] for k in share) for share in shares]
        held = [sum(grid[k].pairs for k in share) * ITEM for share in shares]
        rows.append({
            "world_size": p,
            "tile_size": grid.tile_size,
            "tiles": len(grid),
            "tiles_min": min(map(len, shares)),
            "tiles_max": max(map(len, shares)),
            "imbalance": max(loads) / (sum(loads) / p) - 1,
            "held_max": max(held),
            "payload": payload,
            "ring_per_rank": 2 * (p - 1) / p * payload,
        })
    return {"n": n, "d": d, "columns": columns, "block_size": plain, "matrix_bytes": n * n * ITEM, "rows": rows}


# ----------------------------------------------------------------------------
# Output


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def _size(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def strong_table(result: dict) -> str:
    lines = [
        f"N = {result['n']} images of {result['size']}x{result['size']}x3, CNN-GAP depth {DEPTH}, NNGP + NTK, "
        f"float64, tile size {result['tile_size']}",
        "",
        "| run | precompute (s) | launch (s) | per rank: precompute / tiles (s) | tiles per rank "
        "| peak RSS per rank (MiB) | speed-up | efficiency | nngp_and_ntk, same threads / precompute |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    direct = {d["threads"]: d for d in result["direct"]}
    for run in result["runs"]:
        ranks = run["ranks"]
        peer = direct.get(run["threads"] * run["processes"])
        ratio = "-" if peer is None else f"{peer['seconds'] / run['seconds']:.2f}"
        lines.append(
            f"| {run['label']} | {run['seconds']:.2f} | {run['launch']:.2f} | "
            + ", ".join(f"{r['seconds']:.2f} / {r['tile_seconds']:.2f}" for r in ranks)
            + " | " + ", ".join(str(r["tiles"]) for r in ranks)
            + " | " + ", ".join(_mib(r["peak_rss"]) for r in ranks)
            + f" | {run['speedup']:.2f}x | {100 * run['efficiency']:.0f}% | {ratio} |"
        )
    lines += ["", "| peer baseline: `kernel.nngp_and_ntk(X)`, one process | seconds | launch (s) | peak RSS (MiB) |",
              "|---|---|---|---|"]
    for d in result["direct"]:
        lines.append(f"| 1 process x {d['threads']} thread{'s' if d['threads'] > 1 else ''} | {d['seconds']:.2f} "
                     f"| {d['launch']:.2f} | {_mib(d['peak_rss'])} |")
    a = result["agreement"]
    lines += ["", f"1 and 2 processes (1 thread each) bit for bit equal: {a['bitwise_1p_2p']}; largest relative "
              f"difference of any store to `nngp_and_ntk`: {a['vs_direct']:.1e}, to 1 process x 1 thread: "
              f"{a['vs_1p_1t']:.1e}. Speed-up and efficiency: against 1 process x 1 thread "
              "(efficiency = speed-up / cores used). The last column: `nngp_and_ntk` with the run's total "
              "threads (2 for the 2-process run) over the run's precompute time."]
    return "\n".join(lines)


def simulation_table(sim: dict) -> str:
    lines = [
        f"K(X, X) of N = {sim['n']} images of {sim['size']}x{sim['size']}x3: tile size {sim['tile_size']} "
        f"(default_tile_size), {sim['tiles']} tiles (upper triangle), matrix {_size(sim['matrix_bytes'])} "
        f"(NNGP + NTK, float64); fingerprint {sim['checksum_payload']} bytes of JSON",
        "",
        "| ranks | tiles per rank (min / max) | load imbalance (max / mean - 1) | ideal speed-up "
        "| written per rank (min / max) | inputs held per rank | inputs its tiles touch (max) "
        "| checksum bytes gathered per rank (own included) / in all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sim["rows"]:
        lines.append(
            f"| {r['world_size']} | {r['tiles_min']} / {r['tiles_max']} | {100 * r['imbalance']:.3f}% "
            f"| {r['ideal_speedup']:.2f} | {_size(r['written_min'])} / {_size(r['written_max'])} "
            f"| {_size(r['inputs_held'])} | {_size(r['inputs_touched_max'])} "
            f"| {_size(r['checksum_per_rank'])} / {_size(r['checksum_total'])} |"
        )
    return "\n".join(lines)


def gp_table(results: list[dict]) -> str:
    lines = [
        f"ScaleKernel(ShardedKernel(MLPKernel(depth=3, kind='ntk'))), d = {results[0]['d']}, float64; one "
        "ExactMarginalLogLikelihood forward + backward, GPyTorch CG mode, default settings",
        "",
        "| N | run | epoch (s) | forward (s) | launch (s) | speed-up | products summed / bytes per rank "
        "| peak RSS per rank (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for run in result["runs"]:
            ranks = run["ranks"]
            traffic_text = "-" if run["processes"] == 1 else ", ".join(
                f"{r['products']} / {_size(r['bytes'])}" for r in ranks
            )
            lines.append(
                f"| {result['n']} | {run['label']} | {run['seconds']:.2f} | "
                + ", ".join(f"{r['forward']:.2f}" for r in ranks)
                + f" | {run['launch']:.2f} | {run['speedup']:.2f}x | {traffic_text} | "
                + ", ".join(_mib(r["peak_rss"]) for r in ranks) + " |"
            )
    lines.append("")
    for result in results:
        a = result["agreement"]
        lines.append(
            f"N = {result['n']}: 2 processes against 1 (1 thread each): loss {a['loss_1p_2p']:.1e}, gradients "
            f"{a['grads_1p_2p']:.1e} relative; both ranks bit for bit equal: {a['ranks_equal']}."
        )
    return "\n".join(lines)


def gp_simulation_table(sim: dict) -> str:
    lines = [
        f"Exact GP on N = {sim['n']} points (d = {sim['d']}, float64): K is {_size(sim['matrix_bytes'])}; a CG "
        f"iteration is one product with N x {sim['columns']} (y and 10 probe vectors); blocks of "
        f"{sim['block_size']} on this machine's memory budget",
        "",
        "| ranks | tile size | tiles (per rank min / max) | load imbalance | K held per rank (max) "
        "| bytes per CG iteration per rank: payload / ring all-reduce sends |",
        "|---|---|---|---|---|---|",
    ]
    for r in sim["rows"]:
        lines.append(
            f"| {r['world_size']} | {r['tile_size']} | {r['tiles']} ({r['tiles_min']} / {r['tiles_max']}) "
            f"| {100 * r['imbalance']:.2f}% | {_size(r['held_max'])} | {_size(r['payload'])} / "
            f"{_size(r['ring_per_rank'])} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="images of the strong-scaling run (default 400)")
    parser.add_argument("--size", type=int, default=8, help="image side in pixels (default 8: 8x8x3)")
    parser.add_argument("--tile-size", type=int, default=None, help="items per tile side (default: default_tile_size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-n", type=int, default=2000, help="images of the simulated scale-out (default 2000)")
    parser.add_argument("--sim-size", type=int, default=16, help="image side of the simulation (default 16)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64], help="simulated world sizes")
    parser.add_argument("--no-run", action="store_true", help="only the simulations (no processes)")
    parser.add_argument("--no-precompute", action="store_true", help="skip the precompute's strong scaling")
    parser.add_argument("--no-gp", action="store_true", help="skip the exact GP epochs")
    parser.add_argument("--gp-n", type=int, nargs="+", default=[5000, 10000],
                        help="points of the exact GP epochs (default 5000 10000)")
    parser.add_argument("--gp-d", type=int, default=8, help="features of the exact GP's inputs (default 8)")
    parser.add_argument("--sim-gp-n", type=int, default=20000,
                        help="points of the simulated exact GP (default the issue's 20,000)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (N = 24 of 4x4x3, simulation N = 200), no 2-thread runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.size, args.tile_size, args.sim_n, args.sim_size = 24, 4, 6, 200, 8
        args.gp_n, args.sim_gp_n = [150], 2000
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "load_before": os.getloadavg()},
    }
    print(f"# Distributed kernel precompute ({platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f})\n")
    if not args.no_run and not args.no_precompute:
        with tempfile.TemporaryDirectory(prefix="distbench-") as workdir:
            results["strong"] = strong_scaling(
                args.n, args.size, args.seed, args.tile_size, workdir, two_threads=not args.smoke
            )
        print("## Strong scaling, 1 -> 2 processes\n")
        print(strong_table(results["strong"]) + "\n")
    if not args.no_run and not args.no_gp:
        results["gp"] = gp_epochs(args.gp_n, args.gp_d, args.seed, two_threads=not args.smoke)
        print("## Exact GP epoch, 1 -> 2 processes\n")
        print(gp_table(results["gp"]) + "\n")
    results["simulation"] = simulate(args.sim_n, args.sim_size, args.ranks)
    results["gp_simulation"] = simulate_gp(args.sim_gp_n, args.gp_d, args.ranks)
    print("## Simulated scale-out (accounting only, no processes)\n")
    print(simulation_table(results["simulation"]) + "\n")
    print(gp_simulation_table(results["gp_simulation"]) + "\n")
    results["machine"]["load_after"] = os.getloadavg()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
