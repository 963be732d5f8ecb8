"""Smoke tests of the benchmark scripts (tiny sizes, no peers): they run and report sane numbers."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mlp_kernels.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("mlp_kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_main_runs_without_peers(script, capsys):
    results = script.main(["--n", "50", "--repeats", "1", "--no-peers"])
    (row,) = results["cpu"]["rows"]
    assert row["n"] == 50
    for key in ("ours_nngp_ntk", "ours_nngp"):
        assert 0 < row[key]["best"] <= row[key]["median"]
    assert "botorch_nngp" not in row and "nt_nngp_ntk" not in row
    out = capsys.readouterr().out
    assert "| 50 |" in out and "not measured" in out


def test_missing_neural_tangents_venv_is_reported_not_faked(script, tmp_path):
    result = script.run_neural_tangents(tmp_path / "no-such-python", [50], 1)
    assert "error" in result and "pip install neural-tangents==0.6.5" in result["error"]


def test_bayesian_optimisation_smoke_writes_finite_regrets(tmp_path, capsys):
    pytest.importorskip("botorch")
    path = SCRIPT.parent / "bayesian_optimisation.py"
    spec = importlib.util.spec_from_file_location("bayesian_optimisation_benchmark", path)
    bo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs; spinning intra-op threads only slow tiny fits
    try:
        bo.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "bayesian_optimisation.json").read_text())
    runs = results["runs"]
    assert {r["kernel"] for r in runs} == {"default", "ntk1"}
    for run in runs:
        assert len(run["log10_regret"]) == 4  # the Sobol design, then 3 iterations
        assert all(math.isfinite(v) for v in run["log10_regret"])
        # Best-so-far never decreases, and regret is measured from the known optimum.
        assert all(b <= a for a, b in zip(run["log10_regret"], run["log10_regret"][1:]))
        assert all(b >= a for a, b in zip(run["best"], run["best"][1:]))
        assert run["best"][-1] <= run["optimal_value"]
        assert len(run["fits"]) == 3 and all(f["noise"] > 0 for f in run["fits"])
    assert (tmp_path / "bo_hartmann6.png").stat().st_size > 0
    assert "| Hartmann-6 |" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cnn_script():
    path = SCRIPT.parent / "cnn_kernels.py"
    spec = importlib.util.spec_from_file_location("cnn_kernels_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cnn_benchmark_smoke_runs_without_neural_tangents(cnn_script, capsys):
    results = cnn_script.main(["--smoke"])
    groups = results["groups"]
    assert {(g["readout"], g["size"]) for g in groups} == {("global_avg_pool", 4), ("flatten", 4)}
    for group in groups:
        assert [row["n"] for row in group["rows"]] == [6, 12]
        for row in group["rows"]:
            assert row["how"] == "measured" and "nt" not in row
            assert 0 < row["ours"]["best"] <= row["ours"]["median"]
    out = capsys.readouterr().out
    assert "| flatten | 4x4x3 | 12 | measured |" in out and "not measured" in out


def test_cnn_benchmark_inputs_match_neural_tangents_layout(cnn_script):
    # Our channel-major flattening of the NHWC images neural-tangents receives.
    x = cnn_script.images(2, 4)
    ours = cnn_script.to_ours(x)
    assert ours.shape == (2, 3 * 4 * 4)
    assert float(ours[1].reshape(3, 4, 4)[2, 1, 3]) == x[1, 1, 3, 2]


def test_cnn_benchmark_plan_extrapolates_expensive_sizes(cnn_script):
    # 1 ms per entry: N=1000 would take 1000 s (over a 900 s budget), N=500 250 s.
    plan = cnn_script.plan([200, 1000], {"ours": 1e-4, "nt": 1e-3}, 900.0, 20)
    assert plan["rows"][200] == {"how": "measured"}
    assert plan["rows"][1000] == {"how": "extrapolated", "from": [200, 500]}
    assert plan["measure"] == [200, 500]
    # 40 ms per entry: only N <= 150 fit; measure at the largest fallbacks that do.
    plan = cnn_script.plan([200, 1000], {"ours": 1e-2, "nt": 4e-2}, 900.0, 20)
    assert plan["rows"][200] == plan["rows"][1000] == {"how": "extrapolated", "from": [50, 100]}


def test_cnn_benchmark_missing_neural_tangents_venv_is_reported(cnn_script, tmp_path):
    result = cnn_script.run_neural_tangents(tmp_path / "no-such-python", "flatten", 4, [6], 1, [])
    assert "error" in result and "pip install neural-tangents==0.6.5" in result["error"]


def test_rnn_kernels_benchmark_smoke_times_both_readouts_and_agrees_with_the_loop(capsys):
    path = SCRIPT.parent / "rnn_kernels.py"
    spec = importlib.util.spec_from_file_location("rnn_kernels_benchmark", path)
    rnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rnn)
    result = rnn.main(["--smoke"])
    assert [(r["n"], r["t"], r["readout"]) for r in result["rows"]] == [(20, 4, "last"), (20, 4, "mean")]
    for row in result["rows"]:
        timing = row["ours_nngp_ntk"]
        assert 0 < timing["best"] <= timing["median"]
    assert {y["readout"] for y in result["yardstick"]} == {"last", "mean"}
    for y in result["yardstick"]:
        assert y["per_pair"] > 0
        assert y["max_relative_difference"] < 1e-12  # the per-pair loop computes the same kernels
    out = capsys.readouterr().out
    assert "| 20 | 4 | last |" in out and "| 20 | 4 | mean |" in out and "yardstick" in out


def test_large_n_exact_gp_smoke_trains_both_kernels_and_reports_the_kernel_time(capsys):
    path = SCRIPT.parent / "large_n_exact_gp.py"
    spec = importlib.util.spec_from_file_location("large_n_exact_gp_benchmark", path)
    large = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(large)
    results = large.main(["--smoke"])
    assert [r["kernel"] for r in results["runs"]] == ["mlp_nngp", "rbf"]
    for run in results["runs"]:
        assert 0 < run["train_kernel_seconds"] <= run["train_seconds"]
        assert 0 < run["predict_kernel_seconds"] <= run["predict_seconds"]
        assert len(run["losses"]) == 2 and all(math.isfinite(v) for v in run["losses"])
        assert run["test_rmse"] < run["predict_mean_rmse"]  # better than predicting the training mean
        assert run["peak_rss_gib"] > 0
    out = capsys.readouterr().out
    assert "| mlp_nngp |" in out and "| rbf |" in out and "N = 400" in out


def test_roofline_smoke_sets_every_path_against_the_ceilings(monkeypatch, capsys):
    from gpytorch_tp import fusion

    roofline = _load_benchmark("roofline")
    monkeypatch.setattr(fusion, "_compile", lambda program: program)  # the plumbing, not the compiler
    policy = fusion.fuses_gradients
    results = roofline.main(["--smoke", "--dtypes", "float64"])
    assert fusion.fuses_gradients is policy  # forced on for the CPU fused gradient row, then restored
    rows = results["rows"]
    assert [(r["quantity"], r["path"]) for r in rows] == [
        ("values", "layer by layer"),
        ("gradient", "layer by layer"),
        ("values", "fused"),
        ("gradient", "fused"),
    ]
    assert results["copy_bytes_per_s"] > 0 and results["matmul_ops_per_s"]["float64"] > 0
    for row in rows:
        assert 0 < row["bandwidth_fraction"] < 1 and 0 < row["ops_fraction"] < 1
        assert row["seconds"] >= row["floor_seconds"] > 0
    out = capsys.readouterr().out
    assert "| float64 | values | fused |" in out and "copy bandwidth" in out
    # The operation count is the fused program's: each extra Linear + ReLU adds the same number,
    # and the NTK adds operations to every layer.
    ops = roofline.operations_per_pair
    assert ops(3, "nngp") - ops(2, "nngp") == ops(2, "nngp") - ops(1, "nngp") > 0
    assert ops(2, "ntk") > ops(2, "nngp")


def test_large_n_exact_gp_reports_a_kernel_that_runs_out_of_gpu_memory(monkeypatch):
    large = _load_benchmark("large_n_exact_gp")

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB\nmore text")

    monkeypatch.setattr(large, "run", out_of_memory)
    row = large.run_or_report("rbf", None, 1, torch.device("cpu"))
    assert row == {"kernel": "rbf", "error": "out of GPU memory: CUDA out of memory. Tried to allocate 40.00 GiB"}
    results = {"n": 100000, "n_test": 1000, "d": 8, "steps": 3, "dtype": "float32", "device": "gpu", "runs": [row]}
    assert "| rbf | out of GPU memory: CUDA out of memory." in large.table(results)


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variational_large_n_smoke_trains_both_kernels_on_minibatches(capsys):
    variational = _load_benchmark("variational_large_n")
    results = variational.main(["--smoke"])
    assert [r["kernel"] for r in results["runs"]] == ["mlp_nngp", "rbf"]
    for run in results["runs"]:
        assert run["steps_per_epoch"] == 8  # 2000 points in minibatches of 250
        first, last = run["epochs"]
        assert 0 < first["kernel_seconds"] < first["seconds"]
        assert last["mean_loss"] < first["mean_loss"]  # the ELBO improves
        assert run["test_rmse"] < run["predict_mean_rmse"] and math.isfinite(run["test_nlpd"])
    out = capsys.readouterr().out
    assert "| mlp_nngp | 2 |" in out and "M = 32 inducing points" in out


def test_compiled_programs_benchmark_runs_and_agrees_with_the_hand_written_kernel(capsys):
    path = SCRIPT.parent / "compiled_programs.py"
    spec = importlib.util.spec_from_file_location("compiled_programs_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--n", "30", "--repeats", "1", "--sequence-n", "8", "--gru-n", "4"])
    (mlp,) = results["mlp"]
    (glu,) = results["glu"]
    (elman,) = results["elman"]
    (gru,) = results["gru"]
    assert mlp["difference"] < 1e-10 and 0 < mlp["compiled"]["best"] <= mlp["compiled"]["median"]
    assert 0 < glu["monte_carlo_error"] < 1 and math.isfinite(glu["monte_carlo"]["best"])
    # The Elman loop and the RNN layer are both closed form: round-off.  The GRU loop and the GRU layer
    # integrate by two different quasi-Monte Carlo rules (1.6e-2 apart here, NTK), so only near; the
    # reset gate applied before the recurrent matrix instead (another cell) is 9.5e-2 off (NNGP, N = 10).
    assert elman["difference"] < 1e-10 and elman["steps"] == 4
    assert 0 < gru["relative_difference"] < 0.05 and gru["compiled"]["best"] > 0
    assert "| 30 |" in capsys.readouterr().out


def test_distributed_benchmark_smoke_one_and_two_processes_agree(capsys):
    """benchmarks/distributed.py --smoke: 1 and 2 local processes, the same matrix, sane times and accounting."""
    path = SCRIPT.parent / "distributed.py"
    spec = importlib.util.spec_from_file_location("distributed_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from gpytorch_tp.distributed import TileGrid, assign_balanced, product_exchange_bytes

    results = module.main(["--smoke"])
    strong = results["strong"]
    assert strong["agreement"]["bitwise_1p_2p"] and strong["agreement"]["finite"]
    assert strong["agreement"]["vs_direct"] < 1e-12
    grid = TileGrid(strong["n"], strong["n"], strong["tile_size"], symmetric=True)
    runs = {(r["processes"], r["threads"]): r for r in strong["runs"]}
    assert set(runs) == {(1, 1), (2, 1)}
    for run in runs.values():
        ranks = run["ranks"]
        assert [r["rank"] for r in ranks] == list(range(run["processes"]))
        assert sum(r["tiles"] for r in ranks) == len(grid) == ranks[0]["grid_tiles"]
        assert all(math.isfinite(r["seconds"]) and 0 < r["tile_seconds"] <= r["seconds"] for r in ranks)
        assert all(100 * 2**20 < r["peak_rss"] < 8 * 2**30 for r in ranks)  # torch imported, nothing absurd
        assert 0 < run["seconds"] <= run["launch"]
        assert math.isfinite(run["speedup"]) and run["speedup"] > 0 and 0 < run["efficiency"]
    # The 2-process shares are assign_balanced's on the grid's costs.
    shares = assign_balanced([grid.cost(t) for t in grid], 2)
    assert [r["tiles"] for r in runs[(2, 1)]["ranks"]] == [len(s) for s in shares]
    assert all(d["seconds"] > 0 and d["threads"] == 1 for d in strong["direct"])

    sim = results["simulation"]
    sim_grid = TileGrid(sim["n"], sim["n"], sim["tile_size"], symmetric=True)
    assert sim["tiles"] == len(sim_grid)
    assert [r["world_size"] for r in sim["rows"]] == [8, 16, 32, 64]
    for row in sim["rows"]:
        assert row["tiles_total"] == len(sim_grid)
        assert 1 <= row["tiles_min"] <= row["tiles_max"]
        assert 0 <= row["imbalance"] < 1 and 0 < row["ideal_speedup"] <= row["world_size"]
        assert 0 < row["written_min"] <= row["written_max"]
        assert 0 < row["inputs_touched_max"] <= row["inputs_held"] == sim["n"] * 3 * 8 * 8 * 8
        assert row["checksum_total"] == row["world_size"] * row["checksum_per_rank"] > 0
    # Every rank's writes together are the whole matrix (NNGP and NTK, float64, stored whole).
    p8 = sim["rows"][0]
    assert p8["written_min"] * 8 <= sim["matrix_bytes"] <= p8["written_max"] * 8
    out = capsys.readouterr().out
    assert "| 2 processes x 1 thread |" in out and "| 64 |" in out
    # The exact GP epoch (N = 150): 1 and 2 processes, the same loss; each product summed once.
    (gp,) = results["gp"]
    assert [(r["processes"], r["threads"]) for r in gp["runs"]] == [(1, 1), (2, 1)]
    assert gp["agreement"]["ranks_equal"] and gp["agreement"]["loss_1p_2p"] < 1e-8
    one, two = gp["runs"][0]["ranks"], gp["runs"][1]["ranks"]
    assert one[0]["products"] == 0  # no group: the ordinary matrix-free path
    assert all(r["products"] >= 10 and r["gradients"] >= 1 for r in two)
    products_bytes = two[0]["products"] * product_exchange_bytes(gp["n"], 11)
    assert two[0]["bytes"] >= products_bytes * 0.5 and two[0]["bytes"] == two[1]["bytes"]
    gp_sim = results["gp_simulation"]
    for row in gp_sim["rows"]:
        assert row["payload"] == product_exchange_bytes(gp_sim["n"], 11)
        assert row["held_max"] * row["world_size"] >= gp_sim["matrix_bytes"] / 2
    assert "## Exact GP epoch" in out
