"""The demo (``python -m gpytorch_tp.demo``) and the tutorials run end to end in smoke mode."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the `demo` extra)")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def _load_tutorial(name: str):
    path = TUTORIALS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tutorial_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_demo_smoke_prints_a_table_of_finite_results(capsys):
    from gpytorch_tp import demo

    results = demo.main(["--smoke", "--seed", "1"])
    out = capsys.readouterr().out

    assert [r.kernel for r in results] == list(demo.make_base_kernels(10))
    for r in results:
        assert math.isfinite(r.rmse) and r.rmse > 0
        assert math.isfinite(r.nlpd)
        assert math.isfinite(r.train_mll)
        assert r.fit_seconds >= 0 and r.evaluations >= 1
        assert r.kernel in out and "noise=" in r.hyperparameters
    assert "test RMSE" in out and "test NLPD" in out and "predicting the training mean" in out


def test_demo_data_split_is_standardised_and_reproducible():
    from gpytorch_tp import demo

    a, b = demo.load_data(seed=3), demo.load_data(seed=3)
    assert a.train_x.shape == (354, 10) and a.test_x.shape == (88, 10)
    assert a.train_x.dtype == demo.DTYPE
    assert (a.train_y == b.train_y).all() and (a.test_x == b.test_x).all()
    assert abs(a.train_y.mean().item()) < 1e-10 and abs(a.train_y.std().item() - 1) < 1e-10
    assert not (demo.load_data(seed=4).test_y.sort().values == a.test_y.sort().values).all()


def test_quickstart_tutorial_smoke_writes_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    tutorial = _load_tutorial("quickstart_regression")

    paths = tutorial.main(["--smoke", "--outdir", str(tmp_path)])

    assert set(paths) == {"posteriors", "kernel_vs_depth"}
    for path in paths.values():
        assert path.parent == tmp_path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    for line in out.splitlines():
        if "log marginal likelihood" in line:
            assert math.isfinite(float(line.split("=")[1].split()[0]))


def test_quickstart_kernel_correlation_is_one_at_zero_angle():
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    import torch

    tutorial = _load_tutorial("quickstart_regression")
    angles = torch.linspace(0, math.pi, 5, dtype=torch.float64)
    for nonlinearity in ("relu", "erf"):
        corr = tutorial.correlation_vs_angle(nonlinearity, depth=2, angles=angles)
        assert torch.isfinite(corr).all()
        assert abs(corr[0].item() - 1) < 1e-12
        assert (corr[1:] < 1).all() and (corr.diff() <= 1e-12).all()  # decreasing in the angle


def test_cnn_digits_tutorial_smoke_beats_chance(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    tutorial = _load_tutorial("cnn_digits")

    run = tutorial.main(["--smoke", "--out", str(tmp_path), "--seed", "0"])

    assert run["figure"] == tmp_path / "cnn_digits.png"
    assert run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "test accuracy on 40 images" in out and "kernel wall/cpu s" in out
    (size,) = run["sizes"]
    for r in run["results"]:
        assert r.name in out
        assert 0 <= r.accuracy[size] <= 1 and r.solve_seconds >= 0
    # Chance is 0.1.  Guessing, 16 or more of the 40 test digits right has
    # probability below 1e-5 (binomial), while the depth-2 CNN kernels score
    # about 0.8 on this split: 0.4 is far above chance and far below the usual value.
    cnn = [r for r in run["results"] if r.name.startswith("CNN")]
    assert len(cnn) == 3
    for r in cnn:
        assert r.accuracy[size] >= 0.4, (r.name, r.accuracy)


def test_rnn_sequences_tutorial_smoke_beats_chance(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    import torch

    tutorial = _load_tutorial("rnn_sequences")

    run = tutorial.main(["--smoke", "--out", str(tmp_path), "--seed", "0"])

    assert run["figure"] == tmp_path / "rnn_sequences.png"
    assert run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "test accuracy on 40 digits" in out and "kernel wall/cpu s" in out
    (size,) = run["sizes"]
    names = [r.name for r in run["results"]]
    assert names == [r.name for r in run["cut_results"]]
    expected = {"RNN NNGP, last state", "RNN NNGP, mean over time", "RNN NTK, last state", "RBF (lengthscale by LOO)"}
    assert expected <= set(names)
    # The cut digits really are sequences of different lengths, NaN-padded at the end.
    cut = run["cut_data"]
    steps = cut.train_x.reshape(len(cut.train_x), 8, 8)
    assert (torch.isnan(steps).all(-1).sum(-1) == 8 - cut.train_rows).all()
    assert len(set(cut.train_rows.tolist())) > 1
    # Chance is 0.1; on whole digits 16 or more of 40 right by guessing has probability below
    # 1e-5, while the RNN kernels score about 0.8 on this split.
    for r in run["results"]:
        assert r.name in out
        assert 0 <= r.accuracy[size] <= 1
        if r.name.startswith("RNN"):
            assert r.accuracy[size] >= 0.4, (r.name, r.accuracy)
    # Digits cut after 3-8 rows are harder (0.35-0.58 on this split); 12 or more of 40 right by
    # guessing has probability about 2e-4.
    for r in run["cut_results"]:
        assert r.accuracy[size] >= 0.3, (r.name, r.accuracy)


def test_transformer_sequences_tutorial_smoke_beats_chance(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    import torch

    tutorial = _load_tutorial("transformer_sequences")

    run = tutorial.main(["--smoke", "--out", str(tmp_path), "--seed", "0"])

    assert run["figure"] == tmp_path / "transformer_sequences.png"
    assert run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "whole digits, test accuracy" in out and "test accuracy by rows seen" in out
    (size,) = run["sizes"]
    names = [r.name for r in run["results"]]
    assert names == [r.name for r in run["cut_results"]]
    assert {"tied NNGP", "tied NTK", "uniform NNGP", "causal NTK", "RBF (pixels)"} <= set(names)
    for r in run["results"]:
        if r.name.startswith("tied"):
            assert r.accuracy[size] >= 0.5, (r.name, r.accuracy)  # chance is 0.1
    cut = run["cut_data"]
    steps = cut.test_x.reshape(len(cut.test_x), 8, 8)
    assert (torch.isnan(steps).all(-1).sum(-1) == 8 - cut.test_rows).all()


def test_batchnorm_tutorial_smoke_writes_a_figure(tmp_path, capsys):
    import itertools

    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    tutorial = _load_tutorial("batchnorm_mlp")

    run = tutorial.main(["--smoke", "--out", str(tmp_path), "--seed", "0"])

    assert run["figure"] == tmp_path / "batchnorm_mlp.png"
    assert run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "mean correlation of distinct points" in out and "test RMSE" in out
    # Without BatchNorm the outputs at distinct points grow more correlated with every layer;
    # BatchNorm keeps them apart (Yang et al. 2019): below the plain MLP's from depth 2 on.
    plain, batchnorm = run["correlations"]["ReLU MLP"], run["correlations"]["BatchNorm + ReLU MLP"]
    assert all(a < b for a, b in itertools.pairwise(plain))
    assert all(bn < p for bn, p in zip(batchnorm[1:], plain[1:]))
    assert len(run["results"]) == 3
    for r in run["results"]:
        assert r.name in out
        assert math.isfinite(r.rmse) and r.rmse > 0 and math.isfinite(r.nlpd)


def test_bayesian_optimisation_tutorial_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    pytest.importorskip("botorch", reason="the Bayesian optimisation tutorial needs BoTorch")
    tutorial = _load_tutorial("bayesian_optimisation")

    run = tutorial.main(["--smoke", "--out", str(tmp_path)])

    assert run["figure"] == tmp_path / "bo_tutorial_branin.png"
    assert run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["kernel"] for r in run["runs"]} == set(tutorial.KERNELS)
    optimum = -0.397887  # Branin's minimum value, negated (Dixon and Szego 1978)
    bounds = tutorial.BOUNDS
    for r in run["runs"]:
        best = r["best"]
        assert len(best) == run["iterations"] + 1 and len(r["x"]) == 5 + run["iterations"]
        assert all(math.isfinite(b) and b <= optimum + 1e-6 for b in best)
        assert all(later >= earlier for earlier, later in itertools.pairwise(best))
        assert ((r["x"] >= bounds[0]) & (r["x"] <= bounds[1])).all()  # candidates stay in the box
        assert best[-1] == r["y"].max().item()
    out = capsys.readouterr().out
    assert "median final log10 regret" in out


def test_wide_networks_tutorial_smoke_errors_fall_with_width(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    tutorial = _load_tutorial("wide_networks_are_gps")

    run = tutorial.main(["--smoke", "--out", str(tmp_path)])

    assert run["figure"] == tmp_path / "wide_networks_are_gps.png"
    assert run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run["widths"] == [8, 128]
    families = list(run["errors"])
    assert [name.split()[0] for name in families] == ["MLP", "CNN", "RNN", "Transformer"]
    for name in families:
        for kind in ("nngp", "ntk"):
            typical = tutorial.rms(run["errors"][name][kind])
            # The error of a width-n estimate scatters like n^-1/2: from width 8 to 128 it
            # should fall about 4-fold (1.7-7.5 seen); at 128 the typical error is 0.04-0.31.
            assert typical[1] < typical[0] / 1.3, (name, kind, typical)
            assert typical[1] < 0.5, (name, kind, typical)
            assert math.isfinite(run["slopes"][name][kind]) and run["slopes"][name][kind] < 0
    assert "rms relative error" in capsys.readouterr().out


def test_your_network_as_a_gp_tutorial_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    tutorial = _load_tutorial("your_network_as_a_gp")

    run = tutorial.main(["--smoke", "--outdir", str(tmp_path)])

    assert run["figure"] == tmp_path / "your_network_as_a_gp.png"
    assert run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "relative error" in out and "RMS gap" in out
    # The real module's Monte Carlo NNGP is near the converted kernel (0.10 on this seed at width 256; a
    # kernel of the wrong layers or variances is off by far more), and the trained finite ensemble follows
    # the infinite-width trained model far more closely than the size of its predictions (RMS gap 0.09
    # against 1.1 here; hidden-layer learning rates of the wrong width give 0.2 and diverge at large widths).
    assert run["kernel_error"] < 0.25
    assert run["ensemble_gap"] < 0.2 * run["prediction_rms"]


def test_your_own_architecture_tutorial_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the tutorials need matplotlib")
    tutorial = _load_tutorial("your_own_architecture")

    run = tutorial.main(["--smoke", "--outdir", str(tmp_path)])

    assert run["figure"] == tmp_path / "your_own_architecture.png"
    assert run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "CompiledProgram" in out and "MonteCarloKernel width" in out
    # The Monte Carlo estimate of the same module approaches the compiled kernel as its width grows
    # (about 10x less error from width 16 to 256 on this seed; a compiled kernel of other variances or
    # another program would stay off by its own distance, not fall towards it).
    for result in (run["glu"], run["sequence"]):
        narrow, wide = min(result.errors), max(result.errors)
        assert result.errors[wide] < result.errors[narrow] / 2, result.errors
        assert result.errors[wide] < 0.15, result.errors
        assert math.isfinite(result.exact_rmse) and all(math.isfinite(r) for r in result.monte_carlo_rmse.values())
    # The GLU's exact GP fits its 1-D function far better than predicting a constant (0.22 against
    # the function's sd 0.6 here), with 12 points.
    assert run["glu"].exact_rmse < 0.6 * run["glu_truth_sd"]
    # init="measured" reads a wide module's parameters: close to PyTorch's default scheme,
    # kaiming_uniform(a=sqrt(5)) weights of variance 1/(3 fan-in); explicit variances are taken as given.
    sources = run["variance_sources"]
    assert abs(sources['init="measured"']["value1.weight"] - 1 / 3) < 0.03
    explicit = sources[f"weight_variance={tutorial.WEIGHT_VARIANCE:g}, bias_variance={tutorial.BIAS_VARIANCE:g}"]
    assert explicit["value2.bias"] == tutorial.BIAS_VARIANCE
