"""The trained-ensemble GP against real gradient descent on wide finite networks.

An ensemble of one-hidden-layer networks, each built by :func:`gpytorch_tp.empirical.build_network`
(the NTK-parameterised initialisation the kernels are limits of), is trained by
full-batch gradient descent on ``L = 1/2 sum_i (f(x_i) - y_i)^2`` -- the loss
convention of :class:`~gpytorch_tp.TrainedNetworkGP` -- with the learning rate
``eta = max_learning_rate / 2`` (0.7 x for the readout-only test, where the fastest
mode then oscillates).  The networks are trained together as batched
tensors with hand-written gradients (checked against autograd below).  Outputs on
the training inputs and on held-out inputs are recorded after several numbers of
steps and compared with the prediction.

Tolerances (``n`` the width, ``S`` the ensemble size, ``sigma0`` the rms prior
standard deviation over the compared inputs):

* **Pathwise.**  Given its own initial function ``f_0``, the linearised network
  after ``k`` steps is ``f_lin = f_0(x) + A_k(x) (Y - f_0(X))`` -- no Monte-Carlo
  error at all.  Lee et al. (2019, Thm 2.1) bound the deviation ``delta`` of a
  trained wide network from it by ``O(n^-1/2)``; we require its rms over the
  ensemble, at every input and step, to be at most ``C_PATH sigma0 / sqrt(n)``,
  and the deviation to shrink like ``n^-1/2`` between widths 256 and 1024.
* **Mean deviation (control variate).**  ``|mean_S delta(x)| <= C_MEAN sigma0 / n + 4 rms_S delta(x) / sqrt(S)``:
  for a smooth nonlinearity the ``n^-1/2`` part of ``delta`` averages out over
  random initialisations, leaving ``O(1/n)``, plus the Monte-Carlo error of a
  mean of ``S`` deviations.  (With ReLU, trained in all layers, the benchmark
  shows the mean deviation falling only like ``n^-1/2``; the all-layer tests
  here use erf.  Readout-only training is linear in the trained weights, so its
  mean deviation is ``O(1/n)`` for any nonlinearity.)
  Subtracting each network's own ``f_lin`` removes the Monte-Carlo noise of
  ``f_0``, so this is the sharpest check: it fails for a learning rate off by 10%.
* **Mean.**  ``|mean_S f_k(x) - mu_k(x)| <= 4 sqrt(Sigma_k(x, x) / S) + C_MEAN sigma0 / n``:
  a 4-sigma Monte-Carlo band (the ensemble mean of ``f_lin`` is exactly
  ``N(mu_k, Sigma_k / S)`` for Gaussian ``f_0``) plus the mean of ``delta``.
* **Covariance.**  ``||Cov_S - Sigma_k||_F <= 3 e_MC + C_COV sigma0^2 / sqrt(n)``, with
  ``e_MC = sqrt((||Sigma_k||_F^2 + tr(Sigma_k)^2) / S)`` the rms Frobenius error of a
  sample covariance of ``S`` Gaussian draws, plus the ``O(n^-1/2)`` covariance of
  ``delta`` with ``f_lin``.

The constants were set from the observed values (erf network, widths 256 and 1024;
see ``benchmarks/dynamics_vs_training.py`` for larger runs) with a margin of about
1.5-3: pathwise rms up to 3.9 sigma0 / sqrt(n); mean of ``delta`` up to 7 sigma0 / n;
covariance change from ``delta`` up to 1.2 sigma0^2 / sqrt(n).  Observed fractions of the
allowed error: pathwise rms <= 0.65, mean deviation <= 0.4, ensemble mean <= 0.55,
covariance <= 0.45.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gpytorch_tp import TrainedNetworkGP
from gpytorch_tp.empirical import build_network
from gpytorch_tp.layers import Erf, Linear, ReLU, Sequential

C_PATH = 6.0  # rms deviation from the linearisation, in sigma0 / sqrt(width)
C_MEAN = 16.0  # mean deviation, in sigma0 / width
C_COV = 4.0  # covariance change, in sigma0^2 / sqrt(width)
WIDTH = 1024
ENSEMBLE = 256
STEPS = (0, 4, 15, 50)


class Ensemble:
    r"""``S`` networks ``f(x) = s_2 W_2 \phi(s_1 W_1 x + b_1') + b_2'`` trained together.

    Parameters are the standard-normal tensors of :func:`build_network`'s
    ``NTKLinear`` layers (``s_1 = sigma_w / sqrt(d)``, ``s_2 = sigma_w / sqrt(n)``,
    biases scaled by ``sigma_b``), stacked over the ensemble.
    """

    def __init__(self, arch: Sequential, in_features: int, width: int, size: int, seed: int = 0):
        nets = [build_network(arch, in_features, width, 1, seed=seed + s, dtype=torch.float32) for s in range(size)]
        first, act, last = nets[0]
        self.act = act.name
        if self.act not in ("ReLU", "Erf"):
            raise ValueError(f"no hand-written derivative for {self.act}")
        self.w1 = torch.stack([net[0].weight.detach().T for net in nets]).contiguous()  # (S, d, n)
        self.b1 = torch.stack([net[0].bias.detach() for net in nets])  # (S, n)
        self.w2 = torch.stack([net[2].weight.detach()[0] for net in nets])  # (S, n)
        self.b2 = torch.stack([net[2].bias.detach()[0] for net in nets])  # (S,)
        self.s1, self.t1 = first.weight_std / math.sqrt(in_features), first.bias_std
        self.s2, self.t2 = last.weight_std / math.sqrt(width), last.bias_std
        self.nets = nets

    def _pre(self, xs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.baddbmm(self.b1.unsqueeze(1), xs, self.w1, beta=self.t1, alpha=self.s1, out=out)

    def _phi(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.clamp(h, min=0, out=out) if self.act == "ReLU" else torch.erf(h, out=out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(S, N)``."""
        h = self._pre(x.unsqueeze(0).expand(self.w1.shape[0], *x.shape).contiguous())
        z = self._phi(h, out=torch.empty_like(h))
        return torch.bmm(z, self.w2.unsqueeze(-1)).squeeze(-1) * self.s2 + self.t2 * self.b2.unsqueeze(-1)

    def train(self, x, y, learning_rate, record, x_eval, *, readout=False, ridge=0.0, targets=None):
        """Gradient descent on 1/2 |f(X) - Y|^2 (+ ridge/2 |theta - theta_0|^2); outputs on ``x_eval`` at ``record`` steps.

        ``targets`` ``(S, n)`` gives every network its own targets (default: ``y`` for all).
        """
        size, d, _ = self.w1.shape
        points = x.shape[0]
        xs = x.unsqueeze(0).expand(size, points, d).contiguous()
        xs_t = xs.transpose(1, 2).contiguous()
        y = y.expand(size, points) if targets is None else targets
        start = [p.clone() for p in (self.w1, self.b1, self.w2, self.b2)]
        h = self._pre(xs)
        z = self._phi(h, out=torch.empty_like(h))
        g = torch.empty_like(h)
        deriv = 1.0 if self.act == "ReLU" else 2 / math.sqrt(math.pi)
        outputs = {}
        for step in range(max(record) + 1):
            if step in record:
                outputs[step] = self(x_eval)
            if step == max(record):
                break
            if not readout or step == 0:
                self._pre(xs, out=h)
                self._phi(h, out=z)
            f = torch.bmm(z, self.w2.unsqueeze(-1)).squeeze(-1).mul_(self.s2).add_(self.b2.unsqueeze(-1), alpha=self.t2)
            r = f.sub_(y)  # residuals (S, N)
            grad_w2 = torch.bmm(r.unsqueeze(1), z).squeeze(1).mul_(self.s2)
            grad_b2 = r.sum(-1).mul_(self.t2)
            if not readout:
                torch.mul(r.unsqueeze(-1), self.w2.unsqueeze(1), out=g)  # dL/dz / s2
                if self.act == "ReLU":
                    g.mul_(z.sign_())  # z = relu(h) >= 0, so sign(z) is the step function
                else:
                    torch.mul(h, h, out=z)
                    g.mul_(z.neg_().exp_())
                # g is dL/dh / (s2 phi'-constant); the constants go into the scalar factors
                grad_w1 = torch.bmm(xs_t, g).mul_(self.s1 * self.s2 * deriv)
                grad_b1 = g.sum(1).mul_(self.t1 * self.s2 * deriv)
                if ridge:
                    grad_w1.add_(self.w1 - start[0], alpha=ridge)
                    grad_b1.add_(self.b1 - start[1], alpha=ridge)
                self.w1.sub_(grad_w1, alpha=learning_rate)
                self.b1.sub_(grad_b1, alpha=learning_rate)
            if ridge:
                grad_w2.add_(self.w2 - start[2], alpha=ridge)
                grad_b2.add_(self.b2 - start[3], alpha=ridge)
            self.w2.sub_(grad_w2, alpha=learning_rate)
            self.b2.sub_(grad_b2, alpha=learning_rate)
        return outputs


def erf_arch() -> Sequential:
    return Sequential(Linear(4.0, 0.5), Erf(), Linear(1.0, 0.1))


def relu_arch() -> Sequential:
    return Sequential(Linear(2.0, 0.1), ReLU(), Linear(1.0, 0.1))


def dataset():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(-1))
    x_test = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return x, y, x_test


@dataclass
class Run:
    arch: Sequential
    gp: TrainedNetworkGP  # the prediction for the ensemble
    outputs: dict  # step -> (S, N) float64 outputs on x_eval
    x_eval: torch.Tensor  # training inputs, then held-out inputs
    targets: torch.Tensor | None  # per-network targets (S, n) when noisy

    @property
    def sigma0(self) -> float:
        """rms prior standard deviation over x_eval."""
        return self.gp.mean_and_covariance(self.x_eval, steps=0, diag=True)[1].mean().sqrt().item()


def run(arch, width, size, *, steps=STEPS, readout=False, noise=0.0, seed=0, lr_fraction=0.5) -> Run:
    """Train an ensemble by gradient descent with ``lr_fraction`` times the largest stable learning rate."""
    x, y, x_test = dataset()
    trained = "readout" if readout else "all"
    eta = lr_fraction * TrainedNetworkGP(x, y, arch, trained=trained, noise=noise).max_learning_rate
    gp = TrainedNetworkGP(x, y, arch, trained=trained, noise=noise, learning_rate=eta)
    ensemble = Ensemble(arch, 3, width, size, seed=seed)
    x_eval = torch.cat([x, x_test])
    targets = None
    if noise:
        gen = torch.Generator().manual_seed(seed + 99)
        targets = y + math.sqrt(noise) * torch.randn(size, y.shape[0], generator=gen, dtype=torch.float64)
    outputs = ensemble.train(
        x.float(),
        y.float(),
        eta,
        set(steps),
        x_eval.float(),
        readout=readout,
        ridge=noise,
        targets=None if targets is None else targets.float(),
    )
    return Run(arch, gp, {k: v.double() for k, v in outputs.items()}, x_eval, targets)


def deviations(result: Run) -> dict:
    """Per step: ``delta = f_k(x) - [f_0(x) + A_k (Y_s - f_0(X))]`` for every network, ``(S, N)``.

    ``A_k Y'`` is the predicted mean for targets ``Y'``, so one prediction with an
    output per network (targets ``Y_s - f_0(X)``) linearises the whole ensemble.
    """
    gp = result.gp
    n = gp.num_train
    f0 = result.outputs[0]
    y = gp.train_y[:, 0] if result.targets is None else result.targets
    linear = TrainedNetworkGP(
        gp.train_x,
        (y - f0[:, :n]).T,
        result.arch,
        trained=gp.trained,
        noise=gp.noise,
        target_noise=0.0,
        learning_rate=gp.learning_rate,
    )
    out = {}
    for k, fk in result.outputs.items():
        mean, _ = linear.mean_and_covariance(result.x_eval, steps=k, diag=True)  # (N, S)
        out[k] = fk - (f0 + mean.T)
    return out


def _check_deviations(result: Run, size: int, width: int) -> dict:
    """Pathwise bound on the rms of delta, and the control-variate check of its mean; returns the rms."""
    rms = {}
    for k, delta in deviations(result).items():
        rms[k] = delta.pow(2).mean(0).sqrt()
        bound = C_PATH * result.sigma0 / math.sqrt(width)
        assert float(rms[k].max()) <= bound, f"step {k}: rms deviation {float(rms[k].max()):.4f} above {bound:.4f}"
        allowed = C_MEAN * result.sigma0 / width + 4 * rms[k] / math.sqrt(size)
        error = delta.mean(0).abs()
        assert (error <= allowed).all(), f"step {k}: mean deviation {float((error / allowed).max()):.2f} x allowed"
    return rms


@pytest.fixture(scope="module")
def erf_runs():
    arch = erf_arch()
    return run(arch, WIDTH, ENSEMBLE), run(arch, WIDTH // 4, 64, seed=10_000)


def test_hand_written_gradients_match_autograd():
    x, y, _ = dataset()
    for arch in (erf_arch(), relu_arch()):
        ensemble = Ensemble(arch, 3, 64, 2, seed=5)
        ensemble.train(x.float(), y.float(), 0.05, {1}, x.float())  # one step
        for s, net in enumerate(ensemble.nets):
            loss = 0.5 * (net(x.float()).squeeze(-1) - y.float()).pow(2).sum()
            loss.backward()
            with torch.no_grad():
                expected = [p - 0.05 * p.grad for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias)]
            got = [ensemble.w1[s].T, ensemble.b1[s], ensemble.w2[s].unsqueeze(0), ensemble.b2[s].reshape(1)]
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_trained_networks_follow_their_linearisation(erf_runs):
    wide, narrow = erf_runs
    rms = _check_deviations(wide, ENSEMBLE, WIDTH)
    assert float(rms[0].max()) < 1e-5  # at step 0 both sides are f_0
    # the deviation is a finite-width effect: it shrinks like width^-1/2
    rms_narrow = _check_deviations(narrow, 64, WIDTH // 4)
    overall = torch.stack([rms[k] for k in STEPS[1:]]).pow(2).mean().sqrt()
    overall_narrow = torch.stack([rms_narrow[k] for k in STEPS[1:]]).pow(2).mean().sqrt()
    ratio = float(overall_narrow / overall)
    assert 1.4 < ratio < 2.9, f"width 256 -> 1024 changed the deviation by {ratio:.2f}, expected about 2"


def _check_distribution(result: Run, steps, size, width, gp_steps=None):
    """Ensemble mean and covariance at each step against the prediction (see the module docstring)."""
    sigma0 = result.sigma0
    for k in steps:
        mean, cov = result.gp.mean_and_covariance(result.x_eval, steps=k if gp_steps is None else gp_steps)
        mean = mean[:, 0]
        emp = result.outputs[k]
        se = (cov.diagonal() / size).sqrt()
        error = (emp.mean(0) - mean).abs()
        allowed = 4 * se + C_MEAN * sigma0 / width
        assert (error <= allowed).all(), f"step {k}: mean error {float((error / allowed).max()):.2f} x allowed"
        cov_error = float((torch.cov(emp.T) - cov).norm())
        e_mc = math.sqrt((cov.pow(2).sum() + cov.trace() ** 2) / size)
        allowed = 3 * e_mc + C_COV * sigma0**2 / math.sqrt(width)
        assert cov_error <= allowed, f"step {k}: covariance error {cov_error:.4f} above {allowed:.4f}"


def test_ensemble_mean_and_covariance_match_the_prediction(erf_runs):
    for result, size, width in zip(erf_runs, (ENSEMBLE, 64), (WIDTH, WIDTH // 4)):
        _check_distribution(result, STEPS, size, width)
    # the prediction moves a lot over these steps, so the checks above are not vacuous
    wide = erf_runs[0]
    start = wide.gp.mean_and_covariance(wide.x_eval, steps=0)
    end = wide.gp.mean_and_covariance(wide.x_eval, steps=STEPS[-1])
    assert float((end[0] - start[0]).abs().max()) > 0.5 * wide.sigma0
    assert float(end[1].trace()) < 0.3 * float(start[1].trace())


def test_readout_training_with_ridge_and_noisy_targets():
    """Only the readout trained (at 0.7 x the largest stable learning rate, so the fastest mode
    oscillates), with weight decay to the initial weights and per-network noisy targets:
    the ensemble approaches the GP posterior with that noise variance."""
    steps = (0, 10, 80)
    result = run(relu_arch(), WIDTH, ENSEMBLE, steps=steps, readout=True, noise=0.3, seed=500, lr_fraction=0.7)
    _check_deviations(result, ENSEMBLE, WIDTH)
    _check_distribution(result, steps, ENSEMBLE, WIDTH)
    # after 80 steps the prediction is the GP posterior (t = inf), and the ensemble matches it
    posterior = result.gp.mean_and_covariance(result.x_eval, t=math.inf)
    last = result.gp.mean_and_covariance(result.x_eval, steps=steps[-1])
    torch.testing.assert_close(last[0], posterior[0], rtol=0, atol=1e-3)
    _check_distribution(result, steps[-1:], ENSEMBLE, WIDTH, gp_steps=math.inf)


def test_benchmark_script_smoke(capsys):
    """``benchmarks/dynamics_vs_training.py --smoke`` runs (autograd training of stacked networks) and reports."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dynamics_vs_training.py"
    spec = importlib.util.spec_from_file_location("dynamics_vs_training_benchmark", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.main(["--smoke"])
    assert [row["step"] for row in rows] == [0, 3]
    assert rows[0]["path"] < 1e-4  # step 0: each network is its own linearisation
    assert all(math.isfinite(row[key]) for row in rows for key in ("path", "dmean", "z", "cov", "e_mc"))
    assert "| erf-1 | 64 | 3 |" in capsys.readouterr().out
