"""The memory budget of an evaluation: an honest bound, a clear error below one tile, a warning when it slows
tiles down, a default that leaves room, and the process's own (nested) control group read."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from gpytorch_tp import MLPKernel
from gpytorch_tp.evaluation import MemoryBudgetWarning, TiledKernelOperator, host_memory, resources

linux = pytest.mark.skipif(host_memory.resident_bytes() is None, reason="needs /proc/self/statm (Linux)")

_PEAK_CHILD = """
import sys, torch
from gpytorch_tp import CNNKernel, host_memory
budget = int(sys.argv[1])
torch.manual_seed(0)
X = torch.randn(200, 3 * 16 * 16)
kernel = CNNKernel((3, 16, 16), depth=3, kind="ntk", memory_budget=budget)
with torch.no_grad():
    kernel.nngp_and_ntk(X[:2], X[:4])  # imports and hyperparameter caches, before the measurement
    start = host_memory.resident_bytes()
    nngp, ntk = kernel.nngp_and_ntk(X[:4], X)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(peak - start, nngp.numel() * nngp.element_size() + ntk.numel() * ntk.element_size())
"""


@linux
def test_a_pooled_cnn_evaluation_stays_within_its_budget_plus_its_outputs():
    # All pixel pairs of 16 x 16 images: 256 KiB per item and per pair of items in float32, so
    # the per-item input variances alone take 53 MB of the 256 MiB here (without the guard on resident
    # memory the peak was 306 MiB: freed temporaries fragment the heaps).  Measured in a fresh
    # process: the peak resident memory (VmHWM; ru_maxrss would carry the resident memory of
    # the pytest process it was forked from across exec) over the resident memory before the call.
    budget = 256 * 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, str(budget)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    growth, outputs = map(int, out.stdout.split())
    assert growth <= budget + outputs, f"peak grew by {growth / 2**20:.0f} MiB against a {budget / 2**20:.0f} MiB budget"


def _x(n: int, d: int = 5, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_a_budget_below_one_tile_is_refused_with_the_smallest_workable_one():
    kernel = MLPKernel(depth=2, memory_budget=1).double()
    with pytest.raises(ValueError, match=r"memory_budget=1 bytes is too small for this evaluation: .* at least \d+"):
        kernel(_x(50), _x(40)).to_dense()


def test_a_budget_that_forces_slow_tiles_warns_and_an_ample_one_does_not():
    x = _x(600)
    with torch.no_grad(), pytest.warns(MemoryBudgetWarning, match="limits tiles to .* pairs of items"):
        small = MLPKernel(depth=2, kind="ntk", memory_budget=150_000).double().nngp_and_ntk(x[:100], x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", MemoryBudgetWarning)
        ample = MLPKernel(depth=2, kind="ntk", memory_budget=2**28).double().nngp_and_ntk(x[:100], x)
    for got, expected in zip(small, ample):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_default_budget_leaves_three_quarters_of_the_free_memory(monkeypatch):
    monkeypatch.setattr(resources, "meminfo_available", lambda: 24 * 2**30)
    monkeypatch.setattr(resources, "cgroup_available", lambda: 16 * 2**30)
    assert resources.default_memory_budget(torch.device("cpu")) == 4 * 2**30
    # A 50,000 x 50,000 float32 matrix (9.3 GiB) is not planned as one dense matrix on such a machine.
    kernel = MLPKernel(depth=2)
    with torch.no_grad():
        operator = kernel(torch.zeros(50_000, 3)).evaluate_kernel()
    assert isinstance(operator, TiledKernelOperator)


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_of_the_process_own_nested_group_is_read(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "memory.max", "max\n")
    _write(root / "memory.current", "123\n")
    _write(root / "user.slice" / "memory.max", str(8 * 2**30))
    _write(root / "user.slice" / "memory.current", str(1 * 2**30))
    _write(root / "user.slice" / "job" / "memory.max", str(2 * 2**30))
    _write(root / "user.slice" / "job" / "memory.current", str(2**29))
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/user.slice/job\n")
    # The job's own limit is the tightest: 2 GiB - 0.5 GiB.
    assert resources.cgroup_available(str(proc), str(root)) == 3 * 2**29
    # An enclosing group nearly full is tighter still.
    _write(root / "user.slice" / "memory.current", str(8 * 2**30 - 2**20))
    assert resources.cgroup_available(str(proc), str(root)) == 2**20
    # Without a cgroup namespace the host's path may be absent here: the mount root is read.
    proc.write_text("0::/elsewhere/not/mounted\n")
    assert resources.cgroup_available(str(proc), str(root)) is None  # the root has no limit


def test_cgroup_v1_memory_controller_of_the_process_is_read(tmp_path):
    root = tmp_path / "cgroup"
    group = root / "memory" / "docker" / "abc"
    _write(group / "memory.limit_in_bytes", str(2**30))
    _write(group / "memory.usage_in_bytes", str(2**28))
    _write(root / "memory" / "memory.limit_in_bytes", str(2**63 - 4096))  # v1's "no limit"
    _write(root / "memory" / "memory.usage_in_bytes", "0")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n0::/\n")
    assert resources.cgroup_available(str(proc), str(root)) == 3 * 2**28
