#!/usr/bin/env python
"""Benchmark: NNGP + NTK of an infinitely wide 3-layer ReLU CNN (issue 3, item 6).

Times ``CNNKernel(input_shape=(3, S, S), depth=3, kind="ntk", readout=R).nngp_and_ntk(X)``
(both kernels from one pass, ``x1 is x2``, float64, under ``torch.no_grad()``)
for the readouts R in {global average pooling, Flatten}, images of S x S pixels
with 3 channels (S in {8, 16}) and N images (N in {200, 1000}), next to
neural-tangents 0.6.5 computing the same kernels in the same run:
``stax.serial`` of 3 x (Conv(3 x 3, 'SAME', W_std = sqrt(2), b_std = 0.1,
NTK parameterisation) -> Relu), then GlobalAvgPool() or Flatten(), then
Dense(1), run in its own virtualenv as a subprocess by
``benchmarks/peers/neural_tangents_timing.py --family cnn``; the best of the
execution configurations tried (plain ``jit`` where it fits in memory,
``nt.batch`` sizes) is reported.

Inputs: X ~ N(0, 1) drawn once by ``numpy.random.default_rng(seed)`` as NHWC
images ``(N, S, S, 3)`` (what neural-tangents takes), exactly as the
neural-tangents script draws them; ours are the same numbers transposed to
channel-major and flattened, ``(N, 3 * S * S)``.  The kernels are compared
value by value (largest relative difference) at the smallest N of each
configuration.

Cost planning.  With global average pooling every pair of images carries all
P^2 pixel pairs (65536 for 16 x 16), so some configurations take hours.  For
each (readout, S) both libraries are first timed at a small probe N and the
time of one call at every requested N is estimated as proportional to N^2.
A requested N whose estimate exceeds ``--budget-minutes`` (15) for either
library is not measured: it is *extrapolated* (time proportional to N^2) from
measurements at N = 200 and 500, or at the largest smaller N in
(100, 50) whose estimates fit, and the table says so.

Every timed call is preceded by one untimed warm-up call; calls estimated to
take longer than ``--long-call`` seconds are warmed up on the first probe-N
images only (for neural-tangents' ``nt.batch``, whole batches: the same
compiled block function) and timed once.  Our calls are timed before and
again after neural-tangents' at each N, so that both span the same stretch of
time on a shared machine.  Times are the best and the median of the timed
calls; ratios are neural-tangents' median / ours.  The machine's load average
is printed before and after every measurement: other processes sharing the
cores make every number slower and noisier.

Usage (from the repository root)::

    python benchmarks/cnn_kernels.py                              # all 8 configurations
    python benchmarks/cnn_kernels.py --readouts flatten --sizes 8 --n 200 --repeats 5
    python benchmarks/cnn_kernels.py --threads 1                  # both libraries single-threaded
    python benchmarks/cnn_kernels.py --no-nt                      # ours only
    python benchmarks/cnn_kernels.py --smoke                      # seconds: tiny sizes, no peer

neural-tangents needs its own virtualenv (it pins old jax and numpy)::

    python -m venv nt-venv && nt-venv/bin/pip install neural-tangents==0.6.5 \\
        jax==0.4.23 jaxlib==0.4.23 tf2jax==0.3.6 "numpy<2"
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

from gpytorch_tp import CNNKernel
from gpytorch_tp.layers import Conv, Linear

DEPTH = 3
CHANNELS = 3
FILTER_SIZE = 3
WEIGHT_VARIANCE = 2.0
BIAS_VARIANCE = 0.01
READOUTS = ("global_avg_pool", "flatten")
NT_SCRIPT = REPO / "benchmarks" / "peers" / "neural_tangents_timing.py"
DEFAULT_NT_PYTHON = REPO.parent / "nt-venv" / "bin" / "python"
NT_INSTALL_HINT = (
    "python -m venv nt-venv && nt-venv/bin/pip install neural-tangents==0.6.5 "
    'jax==0.4.23 jaxlib==0.4.23 tf2jax==0.3.6 "numpy<2"'
)
# Small N at which both libraries are timed first, to estimate the cost of the others.
PROBE_N = {"global_avg_pool": 20, "flatten": 100}
# Where a requested N is too expensive: measure at these (the largest that fit) instead.
FALLBACK_NS = (500, 200, 100, 50)
# nt.batch sizes tried per readout, in order of preference; where one call is estimated
# to take longer than NT_ALL_CONFIGS_BELOW_S only the first that divides N is tried.  Pooling: the batch size barely matters (a few % either way on
# this machine), flatten: 50-100 beat plain jit by 20-30% at N = 200.
NT_BATCH_SIZES = {"global_avg_pool": (20, 10), "flatten": (100, 50)}
# neural-tangents skips configurations estimated above this (plain jit of pooled 16 x 16
# images at N = 1000 would need hundreds of GiB).
NT_MAX_BLOCK_GIB = 2.0
NT_ALL_CONFIGS_BELOW_S = 30.0


# ----------------------------------------------------------------------------
# Inputs and kernels
# ----------------------------------------------------------------------------


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """X ~ N(0, 1) as NHWC images ``(n, size, size, CHANNELS)``, drawn as the neural-tangents script draws them."""
    return np.random.default_rng(seed).standard_normal((n, size, size, CHANNELS))


def to_ours(x_nhwc: np.ndarray) -> torch.Tensor:
    """NHWC images to our layout: channel-major, flattened, ``(n, C * H * W)`` (``torch.flatten`` of NCHW)."""
    n = x_nhwc.shape[0]
    return torch.as_tensor(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)).reshape(n, -1), dtype=torch.float64)


def our_kernel(size: int, readout: str) -> CNNKernel:
    """The NTK kernel of the benchmark network, float64."""
    kernel = CNNKernel(
        input_shape=(CHANNELS, size, size),
        depth=DEPTH,
        kernel_size=FILTER_SIZE,
        nonlinearity="relu",
        kind="ntk",
        readout=readout,
        padding="same",
        weight_variance=WEIGHT_VARIANCE,
        bias_variance=BIAS_VARIANCE,
    ).to(dtype=torch.float64)
    # The constructor stores the variances in the default dtype (float32); set
    # them again in float64 so that 0.01 is 0.01 and not its float32 rounding.
    for layer in kernel.modules():
        if isinstance(layer, (Conv, Linear)):
            layer.weight_variance = WEIGHT_VARIANCE
            layer.bias_variance = BIAS_VARIANCE
    return kernel


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_ours(
    kernel: CNNKernel, x: torch.Tensor, repeats: int, warmup_n: int | None = None, warmup: bool = True
) -> dict:
    """One untimed warm-up call (on the first ``warmup_n`` items if given), then ``repeats`` timed calls."""
    with torch.no_grad():
        if warmup:
            kernel.nngp_and_ntk(x if warmup_n is None or warmup_n >= len(x) else x[:warmup_n])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel.nngp_and_ntk(x)
            times.append(time.perf_counter() - start)
    return {"best": min(times), "median": statistics.median(times), "all": times}


def max_relative_difference(a, b) -> float:
    """max |a - b| / max |b| (b the reference), as a float."""
    a = torch.as_tensor(np.asarray(a)).double()
    b = torch.as_tensor(np.asarray(b)).double()
    return float((a - b).abs().max() / b.abs().max())


def nt_environment(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads == 1:
        # XLA's CPU backend: no multi-threaded Eigen, one intra-op thread.
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    return env


def run_neural_tangents(
    nt_python: Path,
    readout: str,
    size: int,
    ns: list[int],
    repeats: int,
    batch_sizes: list[int],
    *,
    threads: int | None = None,
    warmup_n: int | None = None,
    save_kernel: bool = False,
) -> dict:
    """Run the neural-tangents timing script; returns its summary (plus the saved kernels of the first N)."""
    if not Path(nt_python).exists():
        return {"error": f"{nt_python} not found; create the neural-tangents venv with:\n    {NT_INSTALL_HINT}"}
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "nt_kernels.npz"
        command = [
            str(nt_python), str(NT_SCRIPT),
            "--family", "cnn",
            "--depth", str(DEPTH),
            "--image-size", str(size),
            "--channels", str(CHANNELS),
            "--filter-size", str(FILTER_SIZE),
            "--readout", readout,
            "--b-std", str(math.sqrt(BIAS_VARIANCE)),
            "--n", *map(str, ns),
            "--repeats", str(repeats),
            "--max-block-gib", str(NT_MAX_BLOCK_GIB),
            "--batch-sizes", *map(str, batch_sizes),
        ]  # fmt: skip
        if warmup_n is not None:
            command += ["--warmup-n", str(warmup_n)]
        if save_kernel:
            command += ["--save-kernel", str(saved)]
        log(f"running neural-tangents: {' '.join(command)}")
        proc = subprocess.run(command, capture_output=True, text=True, check=False, env=nt_environment(threads))
        for line in proc.stderr.splitlines():
            if line.startswith("[n="):
                log(f"  neural-tangents {readout} {size}x{size} {line}")
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            return {"error": f"neural-tangents run failed (exit {proc.returncode}):\n{tail}"}
        lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
        if not lines:
            return {"error": "neural-tangents printed no JSON summary"}
        summary = json.loads(lines[-1])
        if save_kernel:
            with np.load(saved) as data:
                summary["kernels"] = {key: data[key] for key in ("X", "nngp", "ntk") if key in data}
    return summary


def nt_batch_sizes(readout: str, n: int, only_one: bool) -> list[int]:
    """The nt.batch sizes to try at ``n`` (``only_one``: the preferred one only)."""
    sizes = [bs for bs in NT_BATCH_SIZES[readout] if bs < n and n % bs == 0]
    return sizes[:1] if only_one else sizes


def nt_row(summary: dict) -> dict:
    (result,) = summary["results"]
    return {
        "best": result["seconds_best"],
        "median": result["seconds_median"],
        "all": next(c["seconds_all"] for c in result["all_configs"] if c["config"] == result["config"]),
        "config": result["config"],
        "peak_rss_gib": result["peak_rss_gib_so_far"],
    }


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------


def plan(requested: list[int], per_entry: dict[str, float], budget_s: float, probe_n: int) -> dict:
    """Which N to measure, and how each requested N is obtained.

    ``per_entry``: seconds per kernel entry (call time / N^2) of each library at the probe.
    Returns ``{"measure": [...], "rows": {N: {"how": "measured"} or {"how": "extrapolated", "from": [...]}}}``.
    """

    def fits(n: int) -> bool:
        return all(cost * n * n <= budget_s for cost in per_entry.values())

    rows, measure = {}, set()
    for n in requested:
        if fits(n):
            rows[n] = {"how": "measured"}
            measure.add(n)
            continue
        fitting = [m for m in FALLBACK_NS if m < n and fits(m)]
        if {200, 500} <= set(fitting):
            chosen = [200, 500]
        else:
            chosen = sorted(fitting[:2]) or [probe_n]
        rows[n] = {"how": "extrapolated", "from": chosen}
        measure.update(chosen)
    return {"measure": sorted(measure), "rows": rows}


def benchmark_group(readout: str, size: int, ns: list[int], args, nt_python: Path | None) -> dict:
    """Plan, measure and compare one (readout, image size) for all requested N."""
    kernel = our_kernel(size, readout)
    probe_n = min(PROBE_N[readout], min(ns))
    group = {"readout": readout, "size": size, "probe_n": probe_n, "notes": [], "agreement": None}
    log(f"== {readout}, {size}x{size}x{CHANNELS}: probe at N={probe_n} (load {load()})")

    # Probe: one timed call each at a small N; also the values compared with neural-tangents.
    x_probe = images(probe_n, size, args.seed)
    ours_probe = time_ours(kernel, to_ours(x_probe), 1)
    per_entry = {"ours": ours_probe["best"] / probe_n**2}
    nt_probe = None
    if nt_python is not None:
        nt_probe = run_neural_tangents(
            nt_python, readout, size, [probe_n], 1, nt_batch_sizes(readout, probe_n, False),
            threads=args.threads, save_kernel=True,
        )  # fmt: skip
        if "error" in nt_probe:
            group["notes"].append("neural-tangents: not measured. " + nt_probe["error"])
            nt_python, nt_probe = None, None
        else:
            per_entry["nt"] = nt_probe["results"][0]["seconds_best"] / probe_n**2
            kernels = nt_probe.pop("kernels")
            if np.array_equal(kernels["X"], x_probe):
                with torch.no_grad():
                    ours_nngp, ours_ntk = kernel.nngp_and_ntk(to_ours(x_probe))
                off = ~np.eye(probe_n, dtype=bool)
                group["agreement"] = {
                    "n": probe_n,
                    "nngp": max_relative_difference(ours_nngp, kernels["nngp"]),
                    "ntk": max_relative_difference(ours_ntk, kernels["ntk"]),
                    "ntk_off_diagonal": max_relative_difference(ours_ntk.numpy()[off], kernels["ntk"][off]),
                }
            else:
                group["notes"].append("neural-tangents: saved inputs differ from ours; values not compared")
    group["seconds_per_entry_at_probe"] = per_entry
    schedule = plan(ns, per_entry, args.budget_minutes * 60, probe_n)
    group["plan"] = schedule
    log(
        "   estimated seconds per call (~N^2): "
        + "; ".join(f"N={n}: " + ", ".join(f"{k} {c * n * n:.0f}" for k, c in per_entry.items()) for n in ns)
        + f"; measuring N={schedule['measure']}"
    )

    measured = {}
    for n in schedule["measure"]:
        x = images(n, size, args.seed)
        long_call = max(per_entry.values()) * n * n > args.long_call
        repeats = 1 if long_call else args.repeats
        entry = {"n": n, "calls": repeats, "ours_calls": repeats, "load_before": load()}
        log(f"   [N={n}] gpytorch_tp ({repeats} timed call(s), load {entry['load_before']}) ...")
        entry["ours"] = time_ours(kernel, to_ours(x), repeats, probe_n if long_call else None)
        log(f"   [N={n}] gpytorch_tp best {entry['ours']['best']:.3f}s median {entry['ours']['median']:.3f}s")
        if nt_python is not None:
            summary = run_neural_tangents(
                nt_python,
                readout,
                size,
                [n],
                repeats,
                nt_batch_sizes(readout, n, per_entry["nt"] * n * n > NT_ALL_CONFIGS_BELOW_S),
                threads=args.threads, warmup_n=probe_n if long_call else None,
            )  # fmt: skip
            if "error" in summary:
                entry["nt"] = {"error": summary["error"].splitlines()[0]}
                group["notes"].append(f"neural-tangents at N={n}: " + summary["error"])
            else:
                entry["nt"] = nt_row(summary)
                group["nt_versions"] = {k: summary[k] for k in ("version", "jax", "jaxlib", "backend")}
            # Time ours again after neural-tangents, so that both libraries' numbers span the same
            # stretch of time on a shared machine (the load can change within minutes).
            again = time_ours(kernel, to_ours(x), repeats, warmup=False)
            log(f"   [N={n}] gpytorch_tp again: best {again['best']:.3f}s median {again['median']:.3f}s")
            times = entry["ours"]["all"] + again["all"]
            entry["ours"] = {"best": min(times), "median": statistics.median(times), "all": times}
            entry["ours_calls"] = len(times)
        entry["load_after"] = load()
        measured[n] = entry

    rows = []
    for n in ns:
        how = schedule["rows"][n]
        if how["how"] == "measured":
            rows.append({**measured[n], "how": "measured"})
            continue
        base = max(how["from"])
        src = measured[base]
        scale = (n / base) ** 2
        row = {
            "n": n,
            "how": "extrapolated",
            "from": how["from"],
            "calls": src["calls"],
            "ours_calls": src["ours_calls"],
        }
        row["ours"] = {"best": src["ours"]["best"] * scale, "median": src["ours"]["median"] * scale}
        if "nt" in src and "error" not in src["nt"]:
            row["nt"] = {
                "best": src["nt"]["best"] * scale,
                "median": src["nt"]["median"] * scale,
                "config": src["nt"]["config"],
            }
        rows.append(row)
        # The measured points themselves are shown too, so the N^2 scaling can be checked.
    group["measured"] = [measured[n] for n in schedule["measure"]]
    group["rows"] = rows
    return group


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _seconds(entry: dict | None) -> str:
    if entry is None:
        return "not measured"
    if "error" in entry:
        return entry["error"]
    return f"{entry['best']:.3f} / {entry['median']:.3f}"


def _ratio(entry: dict) -> str:
    nt = entry.get("nt")
    if nt is None or "error" in nt:
        return "-"
    return f"{nt['median'] / entry['ours']['median']:.1f}x"


def _per_entry_ms(entry: dict | None, n: int) -> str:
    if entry is None or "error" in entry:
        return "-"
    return f"{entry['median'] / n**2 * 1e3:.3g}"


def format_table(groups: list[dict]) -> str:
    legend = (
        "Times: best / median of the timed calls, seconds; per entry: median / N^2, milliseconds. "
        "Rows marked *extrapolated* were not run at that N: their times are the measured ones at the "
        "largest N named, scaled by (N / that N)^2."
    )
    header = (
        "| readout | image | N | how | timed calls (ours / NT) | gpytorch_tp NNGP+NTK (s) | neural-tangents NNGP+NTK (s) "
        "| ours per entry (ms) | NT per entry (ms) | NT / ours | load before -> after |"
    )
    lines = [
        legend,
        "",
        header,
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group in groups:
        image = f"{group['size']}x{group['size']}x{CHANNELS}"
        shown = [(r["n"], r) for r in group["rows"]]
        requested = {r["n"] for r in group["rows"] if r["how"] == "measured"}
        shown += [
            (m["n"], {**m, "how": "measured (for extrapolation)"}) for m in group["measured"] if m["n"] not in requested
        ]
        for n, row in sorted(shown, key=lambda item: (item[0], item[1]["how"] == "extrapolated")):
            if row["how"] == "extrapolated":
                how = f"*extrapolated* from N={max(row['from'])}"
                loads = "-"
                italic = "*"
            else:
                how = row["how"]
                loads = f"{row['load_before'].split(',')[0]} -> {row['load_after'].split(',')[0]}"
                italic = ""
            lines.append(
                f"| {group['readout']} | {image} | {n} | {how} | {row.get('ours_calls', row['calls'])} / {row['calls']} "
                f"| {italic}{_seconds(row['ours'])}{italic} | {italic}{_seconds(row.get('nt'))}{italic} "
                f"| {_per_entry_ms(row['ours'], n)} | {_per_entry_ms(row.get('nt'), n)} | {_ratio(row)} | {loads} |"
            )
    lines.append("")
    for group in groups:
        name = f"{group['readout']}, {group['size']}x{group['size']}"
        a = group["agreement"]
        if a is not None:
            lines.append(
                f"Agreement ({name}, N={a['n']}): largest relative difference from neural-tangents: "
                f"NNGP {a['nngp']:.1e}, NTK {a['ntk']:.1e} (off the diagonal {a['ntk_off_diagonal']:.1e})."
            )
        configs = sorted({f"N={m['n']}: {m['nt']['config']}" for m in group["measured"] if "config" in m.get("nt", {})})
        if configs:
            lines.append(f"neural-tangents' fastest configuration ({name}): " + ", ".join(configs) + ".")
        for note in group["notes"]:
            lines.append(f"Note ({name}): {note}")
    return "\n".join(lines)


def machine_summary(threads: int | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nt_threads = "one XLA thread" if threads == 1 else "XLA's default threads"
    return (
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads; neural-tangents: {nt_threads}); load average {load()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readouts", nargs="+", choices=READOUTS, default=list(READOUTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="image sides (default 8 16)")
    parser.add_argument("--n", type=int, nargs="+", default=[200, 1000], help="numbers of images (default 200 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (default 3)")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=15.0,
        help="a requested N whose estimated call exceeds this for either library is extrapolated (default 15)",
    )
    parser.add_argument(
        "--long-call",
        type=float,
        default=120.0,
        help="calls estimated longer than this many seconds are timed once, after a warm-up on the probe N (default 120)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(T); T=1 also runs XLA single-threaded"
    )
    parser.add_argument("--seed", type=int, default=0, help="numpy seed of the images (default 0)")
    parser.add_argument(
        "--nt-python",
        type=Path,
        default=DEFAULT_NT_PYTHON,
        help=f"python of the neural-tangents virtualenv (default {DEFAULT_NT_PYTHON})",
    )
    parser.add_argument("--no-nt", action="store_true", help="skip neural-tangents")
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds: 4x4 images, N=6 and 12, one timed call, no neural-tangents"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.n, args.repeats, args.no_nt = [4], [6, 12], 1, True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    nt_python = None if args.no_nt else args.nt_python
    print(machine_summary(args.threads))
    print(
        f"Network: {DEPTH} x (Conv {FILTER_SIZE}x{FILTER_SIZE} 'same' -> ReLU) -> readout -> Linear, "
        f"{CHANNELS} input channels, sigma_w^2={WEIGHT_VARIANCE}, sigma_b^2={BIAS_VARIANCE}, float64, x1 is x2."
    )
    groups = [
        benchmark_group(readout, size, sorted(args.n), args, nt_python)
        for readout in args.readouts
        for size in sorted(args.sizes)
    ]
    print()
    print(format_table(groups))
    print()
    print(f"Load average at the end: {load()}")
    result = {
        "groups": groups,
        "machine": machine_summary(args.threads),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
