"""Allocator settings and huge-page outputs of large CPU evaluations (gpytorch_tp.host_memory)."""

import os
import subprocess
import sys

import pytest
import torch

from gpytorch_tp import MLPKernel
from gpytorch_tp.evaluation import host_memory

linux_glibc = pytest.mark.skipif(host_memory._LIBC is None, reason="needs Linux with glibc")


def test_empty_on_huge_pages_is_an_ordinary_empty_tensor():
    like = torch.zeros(2, dtype=torch.float32)
    small = host_memory.empty_on_huge_pages(like, 3, 4)
    large = host_memory.empty_on_huge_pages(like, 2, 2048, 4096)  # 64 MiB: advised
    for out, shape in ((small, (3, 4)), (large, (2, 2048, 4096))):
        assert out.shape == shape and out.dtype == like.dtype and out.device == like.device
        assert out.is_contiguous()
    large.fill_(1.5)
    assert float(large.sum()) == 1.5 * large.numel()


_CHILD = """
import resource, torch
from gpytorch_tp import MLPKernel
from gpytorch_tp.evaluation import host_memory
x = torch.randn(1500, 8, dtype=torch.float64)
# Tiles of 256 x 256 pairs (the default on a 512 KiB-L2 CPU), whatever the cache of this machine.
kernel = MLPKernel(depth=3, kind="ntk", tile_pairs=256 * 256).double()
with torch.no_grad():
    kernel.nngp_and_ntk(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kernel.nngp_and_ntk(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(host_memory._tuned, faults)
"""


def _child(env_value: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "GPYTORCH_TP_TUNE_MALLOC"}
    if env_value is not None:
        env["GPYTORCH_TP_TUNE_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@linux_glibc
def test_allocator_tuning_is_opt_in():
    untouched, faults_default = _child(None)
    refused, _ = _child("0")
    tuned, faults = _child("1")
    # A library leaves the process's allocator alone unless asked.
    assert not untouched and not refused and tuned
    # Asked, the second evaluation reuses the temporaries kept from the first: measured 0-2,800 page
    # faults against about 11,000 with glibc's defaults (its outputs alone are 2 x 1500^2 float64 =
    # 8800 pages, below the huge-page size limit, so they come from the kept heap as well).
    assert faults < faults_default / 2


@linux_glibc
def test_resident_guard_hands_free_pages_back_above_its_limit():
    now = host_memory.resident_bytes()
    assert now is not None and now > 0
    guard = host_memory.ResidentGuard(limit=now + 2**40, step=2**20)
    guard.check()
    assert guard.active and guard.trims == 0  # far below the limit: no trim
    guard = host_memory.ResidentGuard(limit=1, step=2**20)
    guard.check()
    assert guard.trims == 1
    guard.check()  # still above the limit (live data), but it has not grown by a step: no second trim
    assert guard.trims == 1


def test_values_do_not_depend_on_the_output_allocation():
    x = torch.randn(40, 5, dtype=torch.float64)
    kernel = MLPKernel(depth=2, kind="ntk", tile_pairs=100).double()
    with torch.no_grad():
        nngp, ntk = kernel.nngp_and_ntk(x)
        whole = MLPKernel(depth=2, kind="ntk", tile_pairs=10**6).double().nngp_and_ntk(x)
    torch.testing.assert_close(nngp, whole[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ntk, whole[1], rtol=1e-13, atol=1e-13)
