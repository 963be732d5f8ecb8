"""Smoke test of the benchmark script (tiny N, no peers): it runs and reports sane numbers."""

import importlib.util
from pathlib import Path

import pytest

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
