"""Kernel matrices on torch.distributed (issue 20): real process groups of 2 local processes, gloo over 127.0.0.1.

1. Two processes write the same kernel matrices, bit for bit, as one process (an MLP, a pooled
   CNN on 8 x 8 images, a rectangle K(X, Z)), and those agree with ``nngp_and_ntk`` to ~1e-12.
2. A job whose rank 1 dies after 3 tiles is resumed: the rerun computes exactly the unfinished
   tiles and the result is the one-process matrix bit for bit.
3. Ranks with different inputs or hyperparameters get a clear error naming what differs; a rank
   that never calls (or never starts) gives a timeout error, not a hang.
4. The store: reused only for the same matrix, a clear error otherwise; bad input; the reader.
5. The command line under ``torchrun`` (2 processes).

Every run of processes is bounded (``run_local``'s ``timeout``) and its processes end with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import distributed_workers as workers
import numpy as np
import pytest
import torch

from gpytorch_tp import CNNKernel, MLPKernel
from gpytorch_tp.distributed import (
    GroupFailureError,
    GroupFormationError,
    IncompleteKernelMatrixError,
    LocalRunError,
    StoreMismatchError,
    TileGrid,
    assign_balanced,
    open_kernel_matrix,
    partition_rows,
    precompute_kernel,
    run_local,
)
from gpytorch_tp.distributed.launch import free_port, init_group
from gpytorch_tp.distributed.precompute import main as precompute_main
from gpytorch_tp.evaluation.workers import intra_op_threads

ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.float64


def _mlp_case():
    x = torch.randn(48, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    return MLPKernel(depth=3), x


def _cnn_case():
    x = torch.randn(30, 64, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    return CNNKernel(input_shape=(1, 8, 8), depth=2), x


def _bits(matrix, kind) -> bytes:
    return np.ascontiguousarray(matrix.array(kind)).tobytes()


# -- 1. one process and two ------------------------------------------------------------------


def _cases() -> dict:
    (mlp, x), (cnn, images) = _mlp_case(), _cnn_case()
    z = torch.randn(21, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    return {
        "mlp": dict(kernel=mlp, x1=x, tile_size=8),
        "cnn": dict(kernel=cnn, x1=images, tile_size=4),
        "rectangle": dict(kernel=mlp, x1=x, x2=z, tile_size=8),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One run of two processes (each start costs seconds): the matrices of ``_cases``, then the disagreements."""
    root = tmp_path_factory.mktemp("two_ranks")
    cases = [dict(case, path=str(root / f"{name}-2")) for name, case in _cases().items()]
    kernel, x = _mlp_case()
    disagree = (kernel, x, [str(root / name) for name in ("inputs", "hyperparameters", "absent")])
    results = run_local(workers.scenarios, 2, args=(cases, disagree), timeout=180, group_timeout=20)
    return root, results


def test_two_processes_write_the_one_process_matrix_bit_for_bit(tmp_path, two_ranks):
    root, results = two_ranks
    cases = _cases()
    with intra_op_threads(1):
        single = {name: precompute_kernel(**case, path=tmp_path / name, progress=False) for name, case in cases.items()}
    for k, (name, case) in enumerate(cases.items()):
        one, two = open_kernel_matrix(tmp_path / name), open_kernel_matrix(root / f"{name}-2")
        assert one.complete and two.complete and one.kinds == ("nngp", "ntk")
        for kind in ("nngp", "ntk"):
            assert _bits(one, kind) == _bits(two, kind), (name, kind)
        # The ranks shared the tiles: disjoint, all of them, balanced by cost.
        shares = [set(results[rank]["reports"][k].computed) for rank in range(2)]
        assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(len(one.grid)))
        assert set(single[name].computed) == set(range(len(one.grid)))
        costs = [sum(one.grid.cost(one.grid[t]) for t in share) for share in shares]
        assert abs(costs[0] - costs[1]) <= max(one.grid.cost(t) for t in one.grid), (name, costs)
        # And the matrix is the kernel's.
        with torch.no_grad():
            nngp, ntk = case["kernel"].nngp_and_ntk(case["x1"], case.get("x2"))
        for kind, reference in (("nngp", nngp), ("ntk", ntk)):
            value = two[kind]
            assert value.shape == reference.shape
            assert torch.allclose(value, reference, rtol=1e-12, atol=1e-14), (name, kind)
            if name != "rectangle":
                assert torch.equal(value, value.T)
        two.check_inputs(case["x1"], case.get("x2"))


# -- 2. resume after a killed rank ------------------------------------------------------------


def test_a_killed_job_resumes_with_only_the_unfinished_tiles(tmp_path):
    kernel, x = _mlp_case()
    case = dict(kernel=kernel, x1=x, path=str(tmp_path / "resumed"), tile_size=8)  # 21 tiles
    with pytest.raises(LocalRunError) as caught:
        run_local(workers.precompute_dying, 2, args=(case, {1: 3}), timeout=120, group_timeout=20)
    failure = caught.value
    assert failure.exitcodes[1] == 17
    assert isinstance(failure.errors[0], GroupFailureError), failure
    assert "rerun with the same arguments" in str(failure.errors[0])

    with pytest.raises(IncompleteKernelMatrixError, match="rerun precompute_kernel with the same arguments"):
        open_kernel_matrix(case["path"])
    with pytest.warns(RuntimeWarning):
        partial = open_kernel_matrix(case["path"], allow_incomplete=True)
    missing = {tile.index for tile in partial.missing_tiles()}
    assert 0 < len(missing) < len(partial.grid)
    logged = [json.loads(line) for line in (Path(case["path"]) / "progress" / "rank-1.jsonl").read_text().splitlines()]
    assert len(logged) == 3  # rank 1 logged its 3 tiles before it died

    reports = run_local(workers.precompute_all, 2, args=([case],), timeout=120)
    recomputed = [set(report[0].computed) for report in reports]
    assert recomputed[0] | recomputed[1] == missing and not recomputed[0] & recomputed[1]
    assert all(report[0].done_before == len(partial.grid) - len(missing) for report in reports)

    with intra_op_threads(1):
        precompute_kernel(**dict(case, path=tmp_path / "reference"), progress=False)
    resumed, reference = open_kernel_matrix(case["path"]), open_kernel_matrix(tmp_path / "reference")
    for kind in ("nngp", "ntk"):
        assert _bits(resumed, kind) == _bits(reference, kind)
    # A third run finds the matrix complete and computes nothing.
    again = precompute_kernel(**case, progress=False)
    assert again.computed == [] and again.done_before == len(resumed.grid)


# -- 3. ranks that disagree, ranks that never come ----------------------------------------------


def test_disagreeing_or_absent_ranks_get_clear_errors(two_ranks):
    root, results = two_ranks
    messages = [result["messages"] for result in results]
    for rank in range(2):
        inputs, hyperparameters = messages[rank][:2]
        assert "disagree" in inputs and "the inputs x1 differ" in inputs and "hyperparameters" not in inputs
        assert "the hyperparameters" in hyperparameters and "inputs x1" not in hyperparameters
    seconds, timeout = messages[0][2].split(" ", 1)
    assert "timed out after 2 s" in timeout and "checksum agreement" in timeout
    assert float(seconds) < 10
    # Nothing was written where the ranks disagreed.
    assert not any((root / name / "manifest.json").exists() for name in ("inputs", "hyperparameters", "absent"))


def test_a_rank_that_never_starts_gives_a_timeout_error_not_a_hang():
    # This process is rank 0 of 2; rank 1 is never started.
    started = time.monotonic()
    with pytest.raises(GroupFormationError, match=r"did not form within 2 s.*1/2"):
        init_group("gloo", 0, 2, f"tcp://127.0.0.1:{free_port()}", timeout=2)
    assert time.monotonic() - started < 20
    assert not torch.distributed.is_initialized()


# -- 4. the store and bad input (one process, no group) --------------------------------------------


def test_a_store_is_reused_only_for_the_same_matrix(tmp_path):
    kernel, x = _mlp_case()
    path = tmp_path / "store"
    first = precompute_kernel(kernel, x, path=path, tile_size=16, progress=False)
    assert len(first.computed) == 6
    with pytest.raises(StoreMismatchError, match="the inputs x1 differ.*overwrite=True"):
        precompute_kernel(kernel, x * 2, path=path, tile_size=16, progress=False)
    with pytest.raises(StoreMismatchError, match="tile_size is 16 in the store but 8 now"):
        precompute_kernel(kernel, x, path=path, tile_size=8, progress=False)
    with pytest.raises(StoreMismatchError, match="the hyperparameters"):
        precompute_kernel(MLPKernel(depth=3, bias_variance=0.5), x, path=path, tile_size=16, progress=False)
    replaced = precompute_kernel(kernel, x * 2, path=path, tile_size=16, progress=False, overwrite=True)
    assert len(replaced.computed) == 6
    matrix = open_kernel_matrix(path)
    matrix.check_inputs(x * 2)
    with pytest.raises(ValueError, match="x1 is not the input"):
        matrix.check_inputs(x)
    # The files are plain .npy: numpy reads them without this package.
    assert np.load(path / "ntk.npy", mmap_mode="r").shape == (48, 48)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a kernel matrix store"):
        precompute_kernel(kernel, x, path=tmp_path / "other", progress=False)


def test_bad_input_gets_a_clear_error(tmp_path):
    kernel, x = _mlp_case()
    with pytest.raises(ValueError, match=r"must be a matrix of items \(N, d\)"):
        precompute_kernel(kernel, x[None], path=tmp_path / "a")
    with pytest.raises(ValueError, match="x1 has 5 features but x2 has 4"):
        precompute_kernel(kernel, x, x[:, :4], path=tmp_path / "a")
    with pytest.raises(ValueError, match="tile_size must be a positive integer"):
        precompute_kernel(kernel, x, path=tmp_path / "a", tile_size=0)
    with pytest.raises(TypeError, match="kernel must be a GPyTorch kernel"):
        precompute_kernel(lambda a, b: a, x, path=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        open_kernel_matrix(tmp_path / "nowhere")
    assert not (tmp_path / "a").exists()


def test_tiles_cover_the_matrix_once_and_are_balanced():
    for n1, n2, size, symmetric in [(10, 10, 4, True), (10, 7, 3, False), (1, 1, 5, True), (0, 0, 3, True)]:
        grid = TileGrid(n1, n2, size, symmetric)
        covered = np.zeros((n1, n2), dtype=int)
        for tile in grid:
            covered[slice(*tile.rows), slice(*tile.cols)] += 1
            if symmetric and not tile.diagonal:
                covered[slice(*tile.cols), slice(*tile.rows)] += 1
        assert (covered == 1).all()
    grid = TileGrid(100, 100, 7, symmetric=True)
    costs = [grid.cost(t) for t in grid]
    for world in (1, 2, 3, 8):
        shares = assign_balanced(costs, world)
        assert sorted(i for s in shares for i in s) == list(range(len(grid)))
        loads = [sum(costs[i] for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(costs)
        assert shares == assign_balanced(costs, world)  # deterministic
    rows = partition_rows(TileGrid(100, 50, 10), 3)
    assert rows[0][0] == 0 and rows[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


# -- 5. the command line -------------------------------------------------------------------------


def test_command_line_under_torchrun_and_alone(tmp_path):
    kernel, x = _mlp_case()
    torch.save(kernel, tmp_path / "kernel.pt")
    torch.save(x, tmp_path / "x.pt")
    arguments = ["--kernel", str(tmp_path / "kernel.pt"), "--inputs", str(tmp_path / "x.pt"), "--tile-size", "8"]
    arguments += ["--no-progress", "--timeout", "60"]
    python_path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    environment = dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0"]
    command += ["--standalone", "-m", "gpytorch_tp.distributed.precompute", *arguments, "--out", str(tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2: computed" in result.stderr and "rank 1/2: computed" in result.stderr
    with intra_op_threads(1):
        assert precompute_main([*arguments, "--out", str(tmp_path / "one")]) == 0
    one, two = open_kernel_matrix(tmp_path / "one"), open_kernel_matrix(tmp_path / "two")
    for kind in ("nngp", "ntk"):
        assert _bits(one, kind) == _bits(two, kind)


# -- 6. other kernels of the package, one process -------------------------------------------------


def _other_kernels():
    from gpytorch_tp import BatchNormMLPKernel, GRUKernel, RNNKernel, TransformerKernel, kernel_from_module

    g = torch.Generator().manual_seed(3)
    sequences = torch.randn(10, 4 * 2, dtype=DTYPE, generator=g)
    plain = torch.randn(10, 3, dtype=DTYPE, generator=g)
    module = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return {
        "rnn": (RNNKernel(input_shape=(4, 2)), sequences),
        "transformer": (TransformerKernel(input_shape=(4, 2)), sequences),
        "gru": (GRUKernel(input_shape=(4, 2), num_particles=64), sequences),
        "from_module": (kernel_from_module(module).double(), plain),
        "batchnorm": (BatchNormMLPKernel(torch.randn(3, 3, dtype=DTYPE, generator=g), depth=1).double(), plain[:4]),
    }


@pytest.mark.parametrize("name", ["rnn", "transformer", "gru", "from_module", "batchnorm"])
def test_other_kernels_of_the_package(tmp_path, name):
    kernel, x = _other_kernels()[name]
    precompute_kernel(kernel, x, path=tmp_path, tile_size=4 if name != "batchnorm" else 2, progress=False)
    matrix = open_kernel_matrix(tmp_path)
    with torch.no_grad():
        if name == "batchnorm":  # no nngp_and_ntk: its own kind of matrix
            assert matrix.kinds == ("kernel",)
            references = {"kernel": kernel(x).to_dense()}
        else:
            if name == "gru":  # tiles are not projected onto the PSD cone (a property of the whole matrix)
                kernel = type(kernel)(input_shape=(4, 2), num_particles=64, psd_projection=False)
            references = dict(zip(("nngp", "ntk"), kernel.nngp_and_ntk(x)))
    for kind, reference in references.items():
        assert torch.allclose(matrix[kind], reference, rtol=1e-10, atol=1e-12), (name, kind)
