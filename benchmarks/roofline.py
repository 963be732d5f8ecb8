#!/usr/bin/env python
"""Achieved memory bandwidth and arithmetic rate of the MLP kernel against the device's ceilings.

Times the NNGP (and NTK, ``--kind ntk``) of ``MLPKernel(depth)``'s ReLU
network between ``X`` and ``Z`` (``gpytorch_tp.evaluate``; different inputs, so
every pair is computed once and nothing is mirrored) layer by layer and with
``fused=True``, and the gradient pass of an exact GP's training step (the
matrix-free operator's block-by-block gradient of ``sum(left * (K @ right))``
in the hyperparameters of the NNGP kernel, with GPyTorch's 11 probe
columns), and sets each time against two floors:

* **bytes**: every output written once (one matrix, two with the NTK; the
  gradient has none but the probe vectors); inputs are N x d and negligible.
  Divided by the device's *copy bandwidth* (a large tensor copy in the same
  run, bytes read plus bytes written), it gives the time no implementation can
  beat on memory traffic alone.
* **operations**: the elementwise operations per pair of the fused program,
  counted by running it once on a small tile under a dispatch mode (each
  operation whose output has one entry per pair counts one per pair:
  arcsine and square root count one, like a multiply, so this floor is
  optimistic), times the pairs.  Divided by the device's *matrix-product rate*
  in the dtype (a large ``a @ b`` in the same run: the arithmetic ceiling of
  the fused multiply-add units), it gives the arithmetic floor.

The table gives achieved bandwidth and operation rate as fractions of those
ceilings and the time over the larger floor (how far from the hardware limit
the path is).  On CUDA the gradient rows use the compiled backward of
``fused=True``; on a CPU (where ``fused=True`` keeps gradients on the
layer-by-layer path) the fused gradient row forces it on, to measure it.

    python benchmarks/roofline.py                          # CPU, N = M = 4000, float32 and float64
    python benchmarks/roofline.py --device cuda --n 20000  # a GPU
    python benchmarks/roofline.py --smoke                  # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # the checkout (without installing) and the sibling benchmark
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from large_n_exact_gp import force_fused_gradients, sync

from gpytorch_tp import MLPKernel, evaluate, fusion


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (and compilation)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of a large tensor copy, counting bytes read and written."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), repeats, device)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Floating-point operations per second of a ``size``-cubed matrix product."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    seconds = median_seconds(lambda: a @ b, repeats, device)
    return 2 * size**3 / seconds


class _PairOperationCounter(TorchDispatchMode):
    """Counts operations whose output has ``pairs`` entries (the pair work of one tile)."""

    def __init__(self, pairs: int):
        super().__init__()
        self.pairs = pairs
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.numel() == self.pairs:
                self.count += 1
        return out


def operations_per_pair(depth: int, kind: str) -> int:
    """Elementwise operations per pair of the fused program (run uncompiled on one small tile)."""
    architecture = MLPKernel(depth=depth).double().architecture
    x, z = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    compile_before = fusion._compile
    fusion._compile = lambda program: program  # the same functions, traced op by op
    try:
        counter = _PairOperationCounter(pairs=7 * 5)
        with torch.no_grad(), counter:
            evaluate(architecture, x, z, ntk=kind == "ntk", fused=True)
    finally:
        fusion._compile = compile_before
        fusion._RUNS.pop(architecture, None)
    return counter.count


def measure(args, device: torch.device, dtype: torch.dtype, ceilings: dict) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=generator, dtype=dtype).to(device)
    z = torch.randn(args.m, args.d, generator=generator, dtype=dtype).to(device)
    left = torch.randn(args.n, 11, generator=generator, dtype=dtype).to(device)  # GPyTorch: 1 + 10 probes
    right = torch.randn(args.m, 11, generator=generator, dtype=dtype).to(device)
    pairs = args.n * args.m
    outputs = 2 if args.kind == "ntk" else 1
    ops = operations_per_pair(args.depth, args.kind)
    grad_ops = operations_per_pair(args.depth, "nngp")
    rows = []
    for fused in (False, True):
        architecture = MLPKernel(depth=args.depth).to(device=device, dtype=dtype).architecture
        with torch.no_grad():
            seconds = median_seconds(
                lambda a=architecture, f=fused: evaluate(a, x, z, ntk=args.kind == "ntk", fused=f), args.repeats, device
            )
        rows.append(_row("values", fused, seconds, pairs, outputs * pairs * x.element_size(), ops * pairs, ceilings))

        # The gradient pass of an exact GP's training step: the matrix-free operator's
        # block-by-block gradient of sum(left * (K @ right)), as GPyTorch asks for it.
        grad_kernel = MLPKernel(depth=args.depth, matrix_free=True, fused=fused).to(device=device, dtype=dtype)
        operator = grad_kernel(x, z).evaluate_kernel()
        restore = force_fused_gradients() if fused and not fusion.fuses_gradients(device) else None
        try:
            seconds = median_seconds(lambda op=operator: op._bilinear_grads(left, right), args.repeats, device)
        finally:
            if restore is not None:
                restore()
        # Floors: the probe vectors read once; at least the forward's operations again for the backward.
        probe_bytes = (left.numel() + right.numel()) * x.element_size()
        rows.append(_row("gradient", fused, seconds, pairs, probe_bytes, 2 * grad_ops * pairs, ceilings))
    for row in rows:
        row.update(
            dtype=str(dtype).replace("torch.", ""), ops_per_pair=ops if row["quantity"] == "values" else grad_ops
        )
    return rows


def _row(quantity: str, fused: bool, seconds: float, pairs: int, floor_bytes: float, floor_ops: float, ceilings):
    byte_floor = floor_bytes / ceilings["copy_bytes_per_s"]
    op_floor = floor_ops / ceilings["matmul_ops_per_s"]
    return {
        "quantity": quantity,
        "path": "fused" if fused else "layer by layer",
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "achieved_bytes_per_s": floor_bytes / seconds,
        "bandwidth_fraction": byte_floor / seconds,
        "achieved_ops_per_s": floor_ops / seconds,
        "ops_fraction": op_floor / seconds,
        "floor_seconds": max(byte_floor, op_floor),
        "floor_bound": "memory" if byte_floor >= op_floor else "arithmetic",
    }


def table(results: dict) -> str:
    lines = [
        (
            f"{results['device']}, N = {results['n']}, M = {results['m']}, d = {results['d']}, "
            f"depth {results['depth']}, kind {results['kind']} (gradient: NNGP), median of {results['repeats']}"
        ),
        f"copy bandwidth {results['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write); "
        + "; ".join(f"{k} matrix product {v / 1e9:.1f} GFLOP/s" for k, v in results["matmul_ops_per_s"].items()),
        "",
        (
            "| dtype | quantity | path | time (s) | pairs/s | output GB/s (% of copy) | ops/pair "
            "| Gop/s (% of matmul) | floor (s), bound | time / floor |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['dtype']} | {r['quantity']} | {r['path']} | {r['seconds']:.4f} | {r['pairs_per_s']:.3g} | "
            f"{r['achieved_bytes_per_s'] / 1e9:.2f} ({r['bandwidth_fraction']:.1%}) | {r['ops_per_pair']} | "
            f"{r['achieved_ops_per_s'] / 1e9:.2f} ({r['ops_fraction']:.1%}) | "
            f"{r['floor_seconds']:.4f}, {r['floor_bound']} | {r['seconds'] / r['floor_seconds']:.0f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=4000, help="points in X")
    parser.add_argument("--m", type=int, default=None, help="points in Z (default: n)")
    parser.add_argument("--d", type=int, default=16, help="input dimension")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--kind", choices=["nngp", "ntk"], default="ntk")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.depth, args.repeats = 60, 4, 2, 1
    args.m = args.m or args.n
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    copy_bytes = (2 << 30 if gpu else 512 << 20) if not args.smoke else 8 << 20
    matmul_size = (8192 if gpu else 2048) if not args.smoke else 128
    ceilings = {"copy_bytes_per_s": copy_bandwidth(device, copy_bytes, args.repeats)}
    results = {
        "device": torch.cuda.get_device_name(device) if gpu else (platform.processor() or "cpu"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **{k: getattr(args, k) for k in ("n", "m", "d", "depth", "kind", "repeats")},
        "copy_bytes_per_s": ceilings["copy_bytes_per_s"],
        "matmul_ops_per_s": {},
        "rows": [],
    }
    for name in args.dtypes:
        dtype = getattr(torch, name)
        rate = matmul_rate(device, dtype, matmul_size, args.repeats)
        results["matmul_ops_per_s"][name] = rate
        results["rows"] += measure(args, device, dtype, {**ceilings, "matmul_ops_per_s": rate})
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
