#!/usr/bin/env python
"""Benchmark: NNGP + NTK of an infinitely wide depth-5 ReLU MLP.

Times ``MLPKernel(depth=5, kind="ntk").nngp_and_ntk(X)`` (both kernels from one
pass of the recursion, ``x1 is x2``, float64) and the NNGP alone, next to two
peers computing the same kernels in the same run:

* BoTorch's ``InfiniteWidthBNNKernel`` (NNGP only; its ``depth`` counts the
  ReLUs as ours does; weight/bias variances set to ours);
* neural-tangents 0.6.5 (NNGP and NTK, ``stax.serial`` of ``Dense`` + ``Relu``
  blocks, NTK parameterisation), run in its own virtualenv as a subprocess by
  ``benchmarks/peers/neural_tangents_timing.py``; the best of its execution
  configurations (plain ``jit`` and ``nt.batch`` sizes) is reported.

The network: 5 x (Linear -> ReLU) -> Linear readout, sigma_w^2 = 2,
sigma_b^2 = 0.01 (neural-tangents ``W_std = sqrt(2)``, ``b_std = 0.1``), inputs
X ~ N(0, I) of dimension 32 drawn with numpy's ``default_rng(seed)`` exactly as
the neural-tangents script draws them, so the kernels are compared value by
value (largest relative difference, over the first N).

Every timed call is preceded by one untimed warm-up call; times are the best
and the median of ``--repeats`` calls, under ``torch.no_grad()`` (none of the
peers builds an autograd graph either).  Ratios are peer time / our time, both
medians of this run.  The machine's load average is printed: other processes
sharing the cores make every number slower and noisier.

Usage (from the repository root)::

    python benchmarks/mlp_kernels.py                     # N = 1000 4000, CPU
    python benchmarks/mlp_kernels.py --n 1000 --repeats 5
    python benchmarks/mlp_kernels.py --nt-python /path/to/nt-venv/bin/python
    python benchmarks/mlp_kernels.py --gpu               # adds a CUDA table (N up to 20000)
    python benchmarks/mlp_kernels.py --fused             # also fused=True (torch.compile), in the same run

neural-tangents needs its own virtualenv (it pins old jax and numpy)::

    python -m venv nt-venv && nt-venv/bin/pip install neural-tangents==0.6.5 \\
        jax==0.4.23 jaxlib==0.4.23 tf2jax==0.3.6 "numpy<2"
"""

from __future__ import annotations

import argparse
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

from gpytorch_tp import MLPKernel
from gpytorch_tp.layers import Linear

DEPTH = 5
DIM = 32
WEIGHT_VARIANCE = 2.0
BIAS_VARIANCE = 0.01
NT_SCRIPT = REPO / "benchmarks" / "peers" / "neural_tangents_timing.py"
DEFAULT_NT_PYTHON = REPO.parent / "nt-venv" / "bin" / "python"
NT_INSTALL_HINT = (
    "python -m venv nt-venv && nt-venv/bin/pip install neural-tangents==0.6.5 "
    'jax==0.4.23 jaxlib==0.4.23 tf2jax==0.3.6 "numpy<2"'
)
# On a GPU a tile can hold the whole matrix of a few thousand points; larger
# tiles only cost memory (about a dozen tile-sized float64 intermediates).
GPU_TILE_PAIRS = 4096 * 4096


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


def our_kernels(device: torch.device, tile_pairs: int | None = None) -> tuple[MLPKernel, MLPKernel]:
    """(NTK kernel, NNGP kernel) sharing one architecture, float64 on ``device``."""
    options = {} if tile_pairs is None else {"tile_pairs": tile_pairs}
    ntk = MLPKernel(
        depth=DEPTH, kind="ntk", weight_variance=WEIGHT_VARIANCE, bias_variance=BIAS_VARIANCE, **options
    ).to(device=device, dtype=torch.float64)
    # The constructor stores the variances in the default dtype (float32); set
    # them again in float64 so that 0.01 is 0.01 and not its float32 rounding.
    for layer in ntk.modules():
        if isinstance(layer, Linear):
            layer.weight_variance = WEIGHT_VARIANCE
            layer.bias_variance = BIAS_VARIANCE
    nngp = MLPKernel(depth=DEPTH, kind="nngp", **options).to(device=device, dtype=torch.float64)
    nngp.architecture = ntk.architecture  # same network, NNGP only
    return ntk, nngp


def botorch_kernel(device: torch.device):
    """BoTorch's infinite-width BNN kernel with our depth and variances, or None if unavailable."""
    try:
        from botorch.models.kernels import InfiniteWidthBNNKernel
    except ImportError:
        return None
    # BoTorch: K0 = w <x, x'>/d + b, then `depth` times K <- b + w/(2 pi) * arc-cosine(K):
    # its depth counts the ReLUs, as MLPKernel's does, and the readout is included.
    kernel = InfiniteWidthBNNKernel(depth=DEPTH).to(device=device, dtype=torch.float64)
    kernel.weight_var = torch.tensor(WEIGHT_VARIANCE, dtype=torch.float64, device=device)
    kernel.bias_var = torch.tensor(BIAS_VARIANCE, dtype=torch.float64, device=device)
    return kernel


def inputs(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """X ~ N(0, I), drawn as the neural-tangents script draws it (same seed, same numbers)."""
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    return torch.as_tensor(x, dtype=torch.float64, device=device)


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, repeats: int, device: torch.device) -> dict:
    """One untimed warm-up call, then ``repeats`` timed calls (seconds)."""
    with torch.no_grad():
        fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"best": min(times), "median": statistics.median(times), "all": times}


def max_relative_difference(a, b) -> float:
    """max |a - b| / max |b| (b the reference), as a float."""
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).double().cpu()
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b).double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def run_neural_tangents(nt_python: Path, ns: list[int], repeats: int) -> dict:
    """Run the neural-tangents timing script; returns its summary plus the saved kernels of the first N."""
    if not nt_python.exists():
        return {"error": f"{nt_python} not found; create the neural-tangents venv with:\n    {NT_INSTALL_HINT}"}
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "nt_kernels.npz"
        command = [
            str(nt_python),
            str(NT_SCRIPT),
            "--family", "mlp",
            "--depth", str(DEPTH),
            "--dim", str(DIM),
            "--b-std", str(math.sqrt(BIAS_VARIANCE)),
            "--n", *map(str, ns),
            "--repeats", str(repeats),
            "--save-kernel", str(saved),
        ]  # fmt: skip
        print(f"running neural-tangents: {' '.join(command)}", file=sys.stderr, flush=True)
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            return {"error": f"neural-tangents run failed (exit {proc.returncode}):\n{tail}"}
        lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
        if not lines:
            return {"error": "neural-tangents printed no JSON summary"}
        summary = json.loads(lines[-1])
        with np.load(saved) as data:
            summary["kernels"] = {key: data[key] for key in ("X", "nngp", "ntk") if key in data}
    return summary


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------


def benchmark(
    ns: list[int],
    device: torch.device,
    repeats: int,
    *,
    with_botorch: bool,
    nt_python: Path | None,
    tile_pairs: int | None = None,
    fused: bool = False,
) -> dict:
    ntk_kernel, nngp_kernel = our_kernels(device, tile_pairs)
    fused_kernel = None
    if fused:
        # The same network, its dense and ReLU layers compiled into one pass (gpytorch_tp.fusion).
        fused_kernel = MLPKernel(depth=DEPTH, kind="ntk", fused=True).to(device=device, dtype=torch.float64)
        fused_kernel.architecture = ntk_kernel.architecture
    bo_kernel = botorch_kernel(device) if with_botorch else None
    rows = []
    notes = []
    if with_botorch and bo_kernel is None:
        notes.append("BoTorch: not installed, not measured")
    for n in ns:
        x = inputs(n, device)
        row = {"n": n}
        print(f"[n={n}] gpytorch_tp NNGP+NTK ...", file=sys.stderr, flush=True)
        row["ours_nngp_ntk"] = time_call(lambda x=x: ntk_kernel.nngp_and_ntk(x), repeats, device)
        print(f"[n={n}] gpytorch_tp NNGP ...", file=sys.stderr, flush=True)
        row["ours_nngp"] = time_call(lambda x=x: nngp_kernel(x).to_dense(), repeats, device)
        if fused_kernel is not None:
            print(f"[n={n}] gpytorch_tp fused NNGP+NTK ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            with torch.no_grad():
                fused_kernel.nngp_and_ntk(x)  # compiles on the first N (per process, cached on disk)
            _sync(device)
            row["fused_first_call"] = time.perf_counter() - start
            row["ours_fused_nngp_ntk"] = time_call(lambda x=x: fused_kernel.nngp_and_ntk(x), repeats, device)
        if bo_kernel is not None:
            print(f"[n={n}] BoTorch NNGP ...", file=sys.stderr, flush=True)
            try:
                row["botorch_nngp"] = time_call(lambda x=x: bo_kernel(x).to_dense(), repeats, device)
            except torch.cuda.OutOfMemoryError:
                row["botorch_nngp"] = {"error": "out of memory"}
                torch.cuda.empty_cache()
        rows.append(row)

    # Agreement, on the first N (kept small enough to hold a few N x N matrices).
    n_check = ns[0]
    x = inputs(n_check, device)
    with torch.no_grad():
        ours_nngp, ours_ntk = ntk_kernel.nngp_and_ntk(x)
        agreement = {"n": n_check}
        if fused_kernel is not None:
            fused_nngp, fused_ntk = fused_kernel.nngp_and_ntk(x)
            agreement["fused"] = max(
                max_relative_difference(fused_nngp, ours_nngp), max_relative_difference(fused_ntk, ours_ntk)
            )
        if bo_kernel is not None:
            try:
                agreement["botorch_nngp"] = max_relative_difference(bo_kernel(x).to_dense(), ours_nngp)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()

    nt = None
    if nt_python is not None:
        nt = run_neural_tangents(nt_python, ns, repeats)
        if "error" in nt:
            notes.append("neural-tangents: not measured. " + nt["error"])
            nt = None
        else:
            by_n = {r["n"]: r for r in nt["results"]}
            for row in rows:
                result = by_n.get(row["n"])
                if result is not None:
                    row["nt_nngp_ntk"] = {
                        "best": result["seconds_best"],
                        "median": result["seconds_median"],
                        "config": result["config"],
                    }
            kernels = nt.pop("kernels")
            if "X" in kernels and np.array_equal(kernels["X"], inputs(n_check, torch.device("cpu")).numpy()):
                agreement["nt_nngp"] = max_relative_difference(ours_nngp, kernels["nngp"])
                agreement["nt_ntk"] = max_relative_difference(ours_ntk, kernels["ntk"])
                off = ~np.eye(n_check, dtype=bool)
                agreement["nt_ntk_off_diagonal"] = max_relative_difference(
                    ours_ntk.cpu().numpy()[off], kernels["ntk"][off]
                )
            else:
                notes.append("neural-tangents: saved inputs differ from ours; values not compared")
    return {"rows": rows, "agreement": agreement, "notes": notes, "neural_tangents": nt}


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _seconds(entry: dict | None) -> str:
    if entry is None:
        return "not measured"
    if "error" in entry:
        return entry["error"]
    return f"{entry['best']:.3f} / {entry['median']:.3f}"


def _ratio(peer: dict | None, ours: dict) -> str:
    if peer is None or "error" in peer:
        return "-"
    return f"{peer['median'] / ours['median']:.1f}x"


def format_table(result: dict, title: str) -> str:
    header = (
        "| N | gpytorch_tp NNGP+NTK (s) | gpytorch_tp NNGP (s) | BoTorch NNGP (s) | neural-tangents NNGP+NTK (s) "
        "| BoTorch / ours (NNGP) | neural-tangents / ours (NNGP+NTK) |"
    )
    lines = [f"### {title}", "", "Times: best / median of the timed calls, seconds.", "", header]
    lines.append("|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        lines.append(
            f"| {row['n']} | {_seconds(row['ours_nngp_ntk'])} | {_seconds(row['ours_nngp'])} "
            f"| {_seconds(row.get('botorch_nngp'))} | {_seconds(row.get('nt_nngp_ntk'))} "
            f"| {_ratio(row.get('botorch_nngp'), row['ours_nngp'])} "
            f"| {_ratio(row.get('nt_nngp_ntk'), row['ours_nngp_ntk'])} |"
        )
    agreement = result["agreement"]
    lines.append("")
    parts = []
    if "botorch_nngp" in agreement:
        parts.append(f"BoTorch NNGP {agreement['botorch_nngp']:.1e}")
    if "nt_nngp" in agreement:
        parts.append(
            f"neural-tangents NNGP {agreement['nt_nngp']:.1e}, NTK {agreement['nt_ntk']:.1e} "
            f"(off the diagonal {agreement['nt_ntk_off_diagonal']:.1e})"
        )
    if parts:
        lines.append(f"Largest relative difference from our kernels at N={agreement['n']}: " + "; ".join(parts) + ".")
    configs = [f"N={row['n']}: {row['nt_nngp_ntk']['config']}" for row in result["rows"] if "nt_nngp_ntk" in row]
    if configs:
        lines.append("neural-tangents' fastest configuration: " + ", ".join(configs) + ".")
    fused_rows = [row for row in result["rows"] if "ours_fused_nngp_ntk" in row]
    if fused_rows:
        lines += [
            "",
            (
                "Fused (`fused=True`, torch.compile), NNGP+NTK: best / median (s), its first call (compilation), "
                "speed-up over the layer-by-layer path, and neural-tangents / fused:"
            ),
            "",
            "| N | fused NNGP+NTK (s) | first call (s) | layer-by-layer / fused | neural-tangents / fused |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in fused_rows:
            lines.append(
                f"| {row['n']} | {_seconds(row['ours_fused_nngp_ntk'])} | {row['fused_first_call']:.1f} "
                f"| {_ratio(row['ours_nngp_ntk'], row['ours_fused_nngp_ntk'])} "
                f"| {_ratio(row.get('nt_nngp_ntk'), row['ours_fused_nngp_ntk'])} |"
            )
        if "fused" in agreement:
            lines.append(f"Largest relative difference fused / layer by layer: {agreement['fused']:.1e}.")
    for note in result["notes"]:
        lines.append(f"Note: {note}")
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
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 4000], help="numbers of points (default 1000 4000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (default 3)")
    parser.add_argument(
        "--nt-python",
        type=Path,
        default=DEFAULT_NT_PYTHON,
        help=f"python of the neural-tangents virtualenv (default {DEFAULT_NT_PYTHON})",
    )
    parser.add_argument("--no-nt", action="store_true", help="skip neural-tangents")
    parser.add_argument("--no-botorch", action="store_true", help="skip BoTorch")
    parser.add_argument("--no-peers", action="store_true", help="skip both peers")
    parser.add_argument("--fused", action="store_true", help="also time our kernel with fused=True (torch.compile)")
    parser.add_argument(
        "--gpu", action="store_true", help="also benchmark on CUDA, if available (our kernel and BoTorch's)"
    )
    parser.add_argument(
        "--gpu-n", type=int, nargs="+", default=[1000, 4000, 10000, 20000], help="numbers of points on the GPU"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with_botorch = not (args.no_botorch or args.no_peers)
    nt_python = None if (args.no_nt or args.no_peers) else args.nt_python
    print(machine_summary())
    print(
        f"Network: {DEPTH} x (Linear -> ReLU) -> Linear, input dimension {DIM}, sigma_w^2={WEIGHT_VARIANCE}, "
        f"sigma_b^2={BIAS_VARIANCE}, float64, x1 is x2."
    )
    results = {}
    cpu = benchmark(
        args.n, torch.device("cpu"), args.repeats, with_botorch=with_botorch, nt_python=nt_python, fused=args.fused
    )
    results["cpu"] = cpu
    print()
    print(format_table(cpu, "CPU"))
    if args.gpu:
        print()
        if not torch.cuda.is_available():
            print("--gpu: CUDA is not available here; GPU table skipped.")
        else:
            device = torch.device("cuda")
            gpu = benchmark(
                args.gpu_n,
                device,
                args.repeats,
                with_botorch=with_botorch,
                nt_python=None,
                tile_pairs=GPU_TILE_PAIRS,
                fused=args.fused,
            )
            gpu["notes"].append(
                f"GPU: {torch.cuda.get_device_name(device)}; our tiles hold {GPU_TILE_PAIRS} pairs; "
                "neural-tangents is not run on the GPU (its venv is CPU-only)."
            )
            results["gpu"] = gpu
            print(format_table(gpu, "GPU"))
    print()
    print(f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return results


if __name__ == "__main__":
    main()
