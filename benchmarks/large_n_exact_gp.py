"""Exact GP on N points with the MLP NNGP kernel (matrix free) and with GPyTorch's RBF kernel as the yardstick.

Trains an exact GP (Adam on the marginal likelihood, conjugate gradients and
stochastic Lanczos as GPyTorch uses above ``max_cholesky_size``) and predicts
(LOVE variances), reporting for each kernel the total training and prediction
time, the part of it spent evaluating the kernel, the test error and the peak
resident memory.

    python benchmarks/large_n_exact_gp.py                 # N = 20000 on the CPU
    python benchmarks/large_n_exact_gp.py --n 100000 --device cuda
    python benchmarks/large_n_exact_gp.py --smoke         # a few hundred points (tests)
    python benchmarks/large_n_exact_gp.py --kernels mlp_nngp mlp_nngp_fused rbf   # also fused=True
    python benchmarks/large_n_exact_gp.py --kernels mlp_nngp mlp_nngp_fused mlp_nngp_fused_grad
    python benchmarks/large_n_exact_gp.py --n 8000 --kernels mlp_nngp mlp_nngp_dense   # matrix free or dense

``mlp_nngp_fused_grad`` is ``fused=True`` with its compiled backward forced on
(``fused=True`` compiles the backward on CUDA only; see
``gpytorch_tp.fusion.fuses_gradients``), to measure what it does on this device.

Kernel time: for ours, the time inside the kernel operator's evaluations (the
matrix computed once per training step without autograd, the block-by-block
gradient, the test-train blocks), not its products of a held matrix with
vectors (conjugate gradients, as for RBF); for RBF and for ours evaluated
densely (``mlp_nngp_dense``, ``matrix_free=False``), the time of their forward
calls only (their backward runs inside PyTorch's autograd with the rest of the
step and is not separated).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import gpytorch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpytorch_tp import MLPKernel, fusion
from gpytorch_tp.evaluation import TiledKernelOperator


class KernelTimer:
    """Seconds spent inside kernel evaluations (outermost calls only)."""

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0

    @contextlib.contextmanager
    def timing(self):
        self._depth += 1
        start = time.perf_counter() if self._depth == 1 else None
        try:
            yield
        finally:
            self._depth -= 1
            if start is not None:
                self.seconds += time.perf_counter() - start

    def wrap(self, owner, name):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            with self.timing():
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


class ExactGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, base_kernel):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean = gpytorch.means.ConstantMean()
        self.covar = gpytorch.kernels.ScaleKernel(base_kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def make_data(n: int, n_test: int, d: int, dtype, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, d, generator=generator, dtype=torch.float64)
    w = torch.randn(d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    f = torch.sin(2 * x @ w) + 0.5 * torch.relu(x[:, 0]) - 0.3 * x[:, 1] * x[:, 2]
    y = f + 0.1 * torch.randn(n + n_test, generator=generator, dtype=torch.float64)
    x, y = x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)
    return x[:n], y[:n], x[n:], y[n:]


def make_kernel(name: str):
    if name == "mlp_nngp":
        return MLPKernel(depth=3, nonlinearity="relu", matrix_free=True)
    if name == "mlp_nngp_dense":
        return MLPKernel(depth=3, nonlinearity="relu", matrix_free=False)
    if name in ("mlp_nngp_fused", "mlp_nngp_fused_grad"):
        return MLPKernel(depth=3, nonlinearity="relu", matrix_free=True, fused=True)
    if name == "rbf":
        return gpytorch.kernels.RBFKernel()
    raise ValueError(f"unknown kernel {name!r}")


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak resident set restarts from the current one


def peak_memory(device) -> dict:
    peak = _status_bytes("VmHWM")
    if peak is None:  # no /proc: the process's peak since it started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"peak_rss_gib": peak / 2**30}
    if device.type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def run(name: str, data, steps: int, device) -> dict:
    x, y, x_test, y_test = data
    torch.manual_seed(0)
    model = ExactGP(x, y, make_kernel(name)).to(device=device, dtype=x.dtype)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    timer = KernelTimer()
    if name == "rbf":
        restores = [timer.wrap(gpytorch.kernels.RBFKernel, "forward")]
    elif name == "mlp_nngp_dense":
        # Its forward (the dense matrix with its autograd graph); the backward is not separated, as for RBF.
        restores = [timer.wrap(MLPKernel, "forward")]
    else:
        restores = [
            timer.wrap(TiledKernelOperator, name)
            # Kernel evaluations (whole matrix, blocks, diagonals, entries) and the gradient pass; not
            # the products of a held matrix with vectors, which are GP inference as for RBF.
            for name in ("_evaluate", "_bilinear_grads")
        ]
    compile_seconds = 0.0
    fused_gradients = name == "mlp_nngp_fused_grad"
    if fused_gradients:
        # The compiled backward, which fused=True takes on CUDA only, forced on for the comparison.
        restores.append(force_fused_gradients())
    if "_fused" in name:
        # torch.compile's one-off cost (per process; the programs of K(X, X) and K(X*, X), and with
        # fused gradients those of the gradient's diagonal and off-diagonal blocks), timed apart.
        start = time.perf_counter()
        kernel = model.covar.base_kernel
        with torch.no_grad():
            kernel.nngp_and_ntk(x[:200])
            kernel.nngp_and_ntk(x[:200], x[200:300])
        if fused_gradients:
            for block in (kernel._dense_forward(x[:200], x[:200]), kernel._dense_forward(x[:200], x[200:300])):
                torch.autograd.grad(block.sum(), list(kernel.parameters()))
        compile_seconds = time.perf_counter() - start
    reset_peak_memory(device)
    losses = []
    try:
        with gpytorch.settings.max_cholesky_size(0):
            model.train()
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.zero_grad()
                loss = -mll(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            sync(device)
            train_seconds = time.perf_counter() - start
            train_kernel = timer.seconds

            model.eval()
            start = time.perf_counter()
            with torch.no_grad(), gpytorch.settings.fast_pred_var():
                prediction = model.likelihood(model(x_test))
                mean, variance = prediction.mean, prediction.variance
            sync(device)
            predict_seconds = time.perf_counter() - start
            predict_kernel = timer.seconds - train_kernel
    finally:
        for restore in restores:
            restore()
    rmse = float(((mean - y_test) ** 2).mean().sqrt())
    baseline = float(((y_test - y.mean()) ** 2).mean().sqrt())
    nll = float((0.5 * ((mean - y_test) ** 2 / variance + variance.log() + math.log(2 * math.pi))).mean())
    return {
        "kernel": name,
        "compile_seconds": compile_seconds,
        "train_seconds": train_seconds,
        "train_kernel_seconds": train_kernel,
        "predict_seconds": predict_seconds,
        "predict_kernel_seconds": predict_kernel,
        "losses": losses,
        "test_rmse": rmse,
        "predict_mean_rmse": baseline,
        "test_nll": nll,
        **peak_memory(device),
    }


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_or_report(name: str, data, steps: int, device) -> dict:
    """:func:`run`, or a row saying the GPU ran out of memory (RBF's dense N x N matrices at N = 100,000, say)."""
    try:
        return run(name, data, steps, device)
    except torch.cuda.OutOfMemoryError as error:
        gc.collect()
        torch.cuda.empty_cache()
        return {"kernel": name, "error": "out of GPU memory: " + str(error).split("\n")[0][:200]}


def force_fused_gradients():
    """Make ``fused=True`` fuse evaluations autograd records on this device too; returns the undo."""
    original = fusion.fuses_gradients
    fusion.fuses_gradients = lambda device: True
    return lambda: setattr(fusion, "fuses_gradients", original)


def table(results: dict) -> str:
    title = (
        f"N = {results['n']}, {results['n_test']} test points, d = {results['d']}, {results['dtype']}, "
        f"{results['steps']} training steps, {results['device']}"
    )
    header = (
        "| kernel | train (s) | of which kernel (s) | predict (s) | of which kernel (s) | kernel share | "
        "test RMSE (mean-only RMSE) | peak RSS (GiB) |"
    )
    lines = [
        title,
        "",
        header,
        "|---|---|---|---|---|---|---|---|",
    ]
    compiled = [r for r in results["runs"] if r.get("compile_seconds")]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['error']} | | | | | | |")
            continue
        total = r["train_seconds"] + r["predict_seconds"]
        share = (r["train_kernel_seconds"] + r["predict_kernel_seconds"]) / total
        memory = f"{r['peak_rss_gib']:.2f}" + (f" (GPU {r['peak_gpu_gib']:.2f})" if "peak_gpu_gib" in r else "")
        lines.append(
            f"| {r['kernel']} | {r['train_seconds']:.1f} | {r['train_kernel_seconds']:.1f} | "
            f"{r['predict_seconds']:.1f} | {r['predict_kernel_seconds']:.1f} | {share:.0%} | "
            f"{r['test_rmse']:.3f} ({r['predict_mean_rmse']:.3f}) | {memory} |"
        )
    for r in compiled:
        lines.append(
            f"\n{r['kernel']}: torch.compile before training took {r['compile_seconds']:.1f} s (not counted above)."
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="training points")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--d", type=int, default=8, help="input dimension")
    parser.add_argument("--steps", type=int, default=5, help="Adam steps on the marginal likelihood")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["mlp_nngp", "rbf"],
        choices=["mlp_nngp", "mlp_nngp_dense", "mlp_nngp_fused", "mlp_nngp_fused_grad", "rbf"],
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="a few hundred points, two steps (for tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.n_test, args.steps = 400, 50, 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    data = make_data(args.n, args.n_test, args.d, dtype, device)
    results = {
        "n": args.n,
        "n_test": args.n_test,
        "d": args.d,
        "steps": args.steps,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "runs": [run_or_report(name, data, args.steps, device) for name in args.kernels],
    }
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
