"""Simple (Elman) RNN kernels: NNGP and NTK against independent computations.

1. An independent per-pair reference of the recursion (:func:`reference_pair`, plain Python
   loops over the steps of ONE pair of unpadded sequences, with the erf and ReLU dual
   kernels written here in closed form) agrees with the package to ~1e-12: NNGP and NTK,
   readouts "last" and "mean", one and two stacked layers, bidirectional, erf and ReLU,
   sequences of different lengths.
2. Finite-width RNNs (:func:`gpytorch_tp.empirical.build_network`) approach the kernels as
   the hidden width grows (erf, ReLU, tanh; both readouts; two stacked layers;
   bidirectional), also when each network runs on the unpadded sequences of different lengths.
3. Padding: NaN-padding to a longer T never changes a value; diag, tiles and the
   other sequences in the batch do not either.
4. :class:`~gpytorch_tp.RNNKernel` behaves as a GPyTorch kernel.  (ExactGP's debug check
   compares training inputs with ``torch.equal``, which is False for NaN-padded tensors:
   training pads with a finite ``padding_value`` instead.)
5. Bad input gets a clear message.
"""

from __future__ import annotations

import math
import pickle
import unittest

import gpytorch
import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from kernel_checks import relative_error
from sequence_data import PaddedSequenceData, nan_padded, random_sequences

from gpytorch_tp import RNNKernel, TensorProgramKernel, evaluate
from gpytorch_tp.empirical import build_network
from gpytorch_tp.layers import RNN, Conv1d, LastStep, Linear, Sequential, Tanh, TimeMean

DTYPE = torch.float64
NAN = float("nan")


# =============================================================================================
# 1. The independent reference: one pair of unpadded sequences, plain Python.
# =============================================================================================
#
# For sequences x (length L1) and x' (length L2), step pairs (t, t') with 0 <= t < L1,
# 0 <= t' < L2.  Input kernel K_z(t, t') = <x_t, x'_t'> / d, input NTK 0.  Each RNN layer,
# with the state before a sequence's own first step equal to 0:
#
#   K_h(t, t') = w K_s(t-1, t'-1) + u K_z(t, t') + b          (K_s(-1, .) = K_s(., -1) = 0)
#   K_s(t, t') = E[phi(h) phi(h')],  h, h' ~ N(0, [[K_h(t, t), K_h(t, t')], [., K_h'(t', t')]])
#   Th_h(t, t') = K_h(t, t') + w Th_s(t-1, t'-1) + u Th_z(t, t')
#   Th_s(t, t') = E[phi'(h) phi'(h')] Th_h(t, t')
#
# where K_h(t, t) of each sequence comes from the same recursion of that sequence with itself.
# A bidirectional layer also runs the recursion over both sequences reversed (each starting at
# its own last step) and hands the next layer the mean of the two directions' kernels.  The
# readout Linear(v, b): K = v R + b, NTK = K + v R_Th, with R the states' kernel at
# (L1-1, L2-1) ("last") or its mean over all L1 L2 step pairs ("mean").


def erf_dual(k11: float, k22: float, k12: float) -> tuple[float, float]:
    """E[erf(u) erf(v)] and E[erf'(u) erf'(v)] (Williams 1997)."""
    a = (1.0 + 2.0 * k11) * (1.0 + 2.0 * k22)
    return (2.0 / math.pi) * math.asin(2.0 * k12 / math.sqrt(a)), (4.0 / math.pi) / math.sqrt(a - 4.0 * k12 * k12)


def relu_dual(k11: float, k22: float, k12: float) -> tuple[float, float]:
    """E[relu(u) relu(v)] and E[1(u>0) 1(v>0)] (arc-cosine kernels, Cho & Saul 2009)."""
    norm = math.sqrt(k11 * k22)
    c = min(1.0, max(-1.0, k12 / norm))
    theta = math.acos(c)
    return norm * (math.sin(theta) + (math.pi - theta) * c) / (2.0 * math.pi), (math.pi - theta) / (2.0 * math.pi)


DUALS = {"erf": erf_dual, "relu": relu_dual}


def _zeros(rows: int, cols: int) -> list[list[float]]:
    return [[0.0] * cols for _ in range(rows)]


def _reversed(m: list[list[float]]) -> list[list[float]]:
    return [row[::-1] for row in m[::-1]]


def _hidden_variances(kz_self: list[list[float]], dual, w: float, u: float, b: float) -> list[float]:
    """K_h(t, t) of one sequence with itself."""
    out, previous = [], 0.0
    for t in range(len(kz_self)):
        kh = w * previous + u * kz_self[t][t] + b
        out.append(kh)
        previous = dual(kh, kh, kh)[0]
    return out


def _cross_recursion(kz, tz, h1, h2, dual, w, u, b):
    """K_s and Th_s over all step pairs of two sequences with hidden variances h1, h2."""
    ks, ts = _zeros(len(h1), len(h2)), _zeros(len(h1), len(h2))
    for t in range(len(h1)):
        for s in range(len(h2)):
            earlier = t > 0 and s > 0
            kh = w * (ks[t - 1][s - 1] if earlier else 0.0) + u * kz[t][s] + b
            th = kh + w * (ts[t - 1][s - 1] if earlier else 0.0) + u * tz[t][s]
            value, derivative = dual(h1[t], h2[s], kh)
            ks[t][s] = value
            ts[t][s] = derivative * th
    return ks, ts


def _one_direction(kz12, tz12, kz11, kz22, dual, w, u, b):
    h1 = _hidden_variances(kz11, dual, w, u, b)
    h2 = _hidden_variances(kz22, dual, w, u, b)
    ks12, ts12 = _cross_recursion(kz12, tz12, h1, h2, dual, w, u, b)
    ks11, _ = _cross_recursion(kz11, _zeros(len(h1), len(h1)), h1, h1, dual, w, u, b)
    ks22, _ = _cross_recursion(kz22, _zeros(len(h2), len(h2)), h2, h2, dual, w, u, b)
    return ks12, ts12, ks11, ks22


def _mean(a: list[list[float]], c: list[list[float]]) -> list[list[float]]:
    return [[(p + q) / 2.0 for p, q in zip(ra, rc)] for ra, rc in zip(a, c)]


def reference_pair(
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    nonlinearity: str,
    depth: int = 1,
    readout: str = "last",
    bidirectional: bool = False,
    w: float = 1.0,
    u: float = 1.0,
    b: float = 0.1,
    readout_variance: float = 1.0,
) -> tuple[float, float]:
    """(NNGP, NTK) of an RNN network for ONE pair of unpadded sequences ``(L1, d)``, ``(L2, d)``."""
    dual = DUALS[nonlinearity]
    a, c = x1.tolist(), x2.tolist()
    d = len(a[0])

    def gram(p, q):
        return [[sum(pi * qi for pi, qi in zip(row_p, row_q)) / d for row_q in q] for row_p in p]

    kz12, kz11, kz22 = gram(a, c), gram(a, a), gram(c, c)
    tz12 = _zeros(len(a), len(c))
    for _ in range(depth):
        ks12, ts12, ks11, ks22 = _one_direction(kz12, tz12, kz11, kz22, dual, w, u, b)
        if bidirectional:
            rk12, rt12, rk11, rk22 = _one_direction(
                _reversed(kz12), _reversed(tz12), _reversed(kz11), _reversed(kz22), dual, w, u, b
            )
            ks12, ts12 = _mean(ks12, _reversed(rk12)), _mean(ts12, _reversed(rt12))
            ks11, ks22 = _mean(ks11, _reversed(rk11)), _mean(ks22, _reversed(rk22))
        kz12, tz12, kz11, kz22 = ks12, ts12, ks11, ks22
    if readout == "last":
        r, r_ntk = kz12[-1][-1], tz12[-1][-1]
    else:
        count = len(a) * len(c)
        r = sum(map(sum, kz12)) / count
        r_ntk = sum(map(sum, tz12)) / count
    nngp = readout_variance * r + b
    return nngp, nngp + readout_variance * r_ntk


def reference_matrix(seqs1, seqs2, **options) -> tuple[torch.Tensor, torch.Tensor]:
    nngp = torch.zeros(len(seqs1), len(seqs2), dtype=DTYPE)
    ntk = torch.zeros_like(nngp)
    for i, s in enumerate(seqs1):
        for j, t in enumerate(seqs2):
            nngp[i, j], ntk[i, j] = reference_pair(s, t, **options)
    return nngp, ntk


def _kernel(
    steps: int,
    d: int,
    *,
    nonlinearity,
    depth=1,
    readout="last",
    bidirectional=False,
    w=1.0,
    u=1.0,
    b=0.1,
    readout_variance=1.0,
    kind="nngp",
    **kwargs,
):
    """An RNNKernel in float64 whose hyperparameters are exactly ``w, u, b, readout_variance``."""
    kernel = RNNKernel(
        (steps, d),
        depth=depth,
        nonlinearity=nonlinearity,
        kind=kind,
        readout=readout,
        bidirectional=bidirectional,
        **kwargs,
    ).double()
    # Set after the conversion: values given to the constructor pass through float32 parameters.
    for layer in kernel.architecture:
        if isinstance(layer, RNN):
            layer.weight_variance, layer.input_variance, layer.bias_variance = w, u, b
        elif isinstance(layer, Linear):
            layer.weight_variance, layer.bias_variance = readout_variance, b
    return kernel


# (nonlinearity, depth, readout, bidirectional, (w, u, b, readout variance))
REFERENCE_CASES = {
    "erf-last": ("erf", 1, "last", False, (1.3, 0.8, 0.1, 1.0)),
    "erf-mean": ("erf", 1, "mean", False, (1.3, 0.8, 0.1, 1.0)),
    "relu-last": ("relu", 1, "last", False, (0.9, 1.2, 0.2, 1.5)),
    "relu-mean": ("relu", 1, "mean", False, (0.9, 1.2, 0.2, 1.5)),
    "erf-depth2-last": ("erf", 2, "last", False, (1.5, 1.0, 0.05, 1.0)),
    "relu-depth2-mean": ("relu", 2, "mean", False, (0.7, 1.4, 0.1, 2.0)),
    "erf-bidirectional-last": ("erf", 1, "last", True, (1.2, 1.0, 0.1, 1.0)),
    "relu-bidirectional-mean": ("relu", 1, "mean", True, (0.8, 1.1, 0.3, 1.0)),
    "erf-bidirectional-depth2-mean": ("erf", 2, "mean", True, (1.1, 0.9, 0.1, 1.3)),
    "relu-bidirectional-depth2-last": ("relu", 2, "last", True, (0.8, 1.3, 0.1, 1.0)),
}

REF_STEPS, REF_D = 5, 3
# Lengths 5 (full), 3, 1, 4 and 5: the last is a copy of the first (a duplicate).
REF_SEQS = random_sequences((5, 3, 1, 4), REF_D, seed=11)
REF_SEQS = REF_SEQS + [REF_SEQS[0].clone()]
REF_OTHER = random_sequences((2, 5, 4), REF_D, seed=12)


def _reference_options(name: str) -> dict:
    nonlinearity, depth, readout, bidirectional, (w, u, b, v) = REFERENCE_CASES[name]
    return {
        "nonlinearity": nonlinearity,
        "depth": depth,
        "readout": readout,
        "bidirectional": bidirectional,
        "w": w,
        "u": u,
        "b": b,
        "readout_variance": v,
    }


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_kernel_matches_the_per_pair_reference(name):
    options = _reference_options(name)
    kernel = _kernel(REF_STEPS, REF_D, **options)
    x, y = nan_padded(REF_SEQS, REF_STEPS), nan_padded(REF_OTHER, REF_STEPS)
    for a, b, sa, sb in ((x, None, REF_SEQS, REF_SEQS), (x, y, REF_SEQS, REF_OTHER)):
        nngp, ntk = kernel.nngp_and_ntk(a, b)
        expected_nngp, expected_ntk = reference_matrix(sa, sb, **options)
        torch.testing.assert_close(nngp, expected_nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ntk, expected_ntk, rtol=1e-12, atol=1e-12)


def test_reference_differs_between_the_cases():
    # The comparisons above could not pass by accident of every option being ignored.
    s, t = REF_SEQS[0], REF_SEQS[3]
    values = {name: reference_pair(s, t, **_reference_options(name)) for name in REFERENCE_CASES}
    flat = [v for pair in values.values() for v in pair]
    assert len({round(v, 9) for v in flat}) == len(flat)
    # The NTK includes the NNGP plus non-negative gradient terms of ReLU/erf layers.
    for nngp, ntk in values.values():
        assert ntk > nngp


def test_reference_of_a_length_one_sequence_is_the_one_layer_mlp():
    # With one step there is no recurrence: a depth-1 network is an MLP of the input, whose
    # erf NNGP is v * (2/pi) asin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22))) + b with k = u <x,x'>/d + b.
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 2, generator=g, dtype=DTYPE), torch.randn(1, 2, generator=g, dtype=DTYPE)
    u, b, v = 0.7, 0.2, 1.3
    k12, k11, k22 = (u * float(p @ q) / 2 + b for p, q in ((x[0], y[0]), (x[0], x[0]), (y[0], y[0])))
    mlp = v * (2 / math.pi) * math.asin(2 * k12 / math.sqrt((1 + 2 * k11) * (1 + 2 * k22))) + b
    nngp, _ = reference_pair(x, y, nonlinearity="erf", w=5.0, u=u, b=b, readout_variance=v)
    assert abs(nngp - mlp) < 1e-14
    kernel = _kernel(4, 2, nonlinearity="erf", w=5.0, u=u, b=b, readout_variance=v)
    value = kernel(nan_padded([x], 4), nan_padded([y], 4)).to_dense()
    assert abs(value.item() - mlp) < 1e-13


# =============================================================================================
# 2. Finite-width RNNs converge to the kernels.
# =============================================================================================
#
# Each finite network (built by build_network from the kernel's own architecture) runs on the
# UNPADDED sequences, one sequence of its own length at a time (the network without its input
# Unflatten takes (d, L) for any L): no padding, masking or alignment is involved on the
# finite side.  The kernel sees the same sequences NaN-padded to T steps.
#
#   NNGP: output covariance of networks with a wide readout (out_features = width, i.i.d.
#         outputs given the hidden states), averaged over FINITE_NETWORKS networks;
#   NTK:  inner product of the parameter gradients (all parameters, computed here with
#         torch.autograd) of one-output networks, averaged over FINITE_NETWORKS networks.
#
# Checks: the relative Frobenius error at width 1024 is below FINITE_BOUNDS, and below the
# typical error at width 64 (mean over FINITE_NARROW_BATCHES batches of networks) divided by
# FINITE_RATIO; the error at 256 is reported in the message.  The bounds come from 8 seed sets
# (see the comments at FINITE_BOUNDS); the seeds are then fixed.

FIN_STEPS, FIN_D = 4, 2
FIN_SEQS = random_sequences((4, 2, 3, 4, 4), FIN_D, seed=21)
FIN_SEQS = FIN_SEQS + [FIN_SEQS[0].clone()]  # a duplicate
FINITE_NETWORKS = 4
FINITE_NARROW_BATCHES = 4
WIDTHS = (64, 256, 1024)

FINITE_CASES = {
    "erf-last": {"nonlinearity": "erf", "readout": "last", "w": 1.5, "u": 1.0, "b": 0.1},
    "erf-mean": {"nonlinearity": "erf", "readout": "mean", "w": 1.5, "u": 1.0, "b": 0.1},
    "relu-last": {"nonlinearity": "relu", "readout": "last", "w": 1.0, "u": 1.5, "b": 0.1},
    "relu-mean": {"nonlinearity": "relu", "readout": "mean", "w": 1.0, "u": 1.5, "b": 0.1},
    "tanh-last": {"nonlinearity": "tanh", "readout": "last", "w": 1.8, "u": 1.0, "b": 0.1},
    "tanh-mean": {"nonlinearity": "tanh", "readout": "mean", "w": 1.8, "u": 1.0, "b": 0.1},
    "erf-depth2-mean": {"nonlinearity": "erf", "readout": "mean", "depth": 2, "w": 1.5, "u": 1.2, "b": 0.1},
    "tanh-bidirectional-last": {
        "nonlinearity": "tanh",
        "readout": "last",
        "bidirectional": True,
        "w": 1.5,
        "u": 1.0,
        "b": 0.1,
    },
}


def _finite(kernel: RNNKernel, width: int, out_features: int, seed: int) -> torch.nn.Module:
    network = build_network(
        kernel.architecture, (FIN_D, FIN_STEPS), width, out_features=out_features, seed=seed, dtype=DTYPE
    )
    assert isinstance(network[0], torch.nn.Unflatten)
    return network[1:]  # takes (d, L) sequences of any length L


def _distinct(seqs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct sequences, and for each sequence the index of its copy among them."""
    distinct, index = [], []
    for s in seqs:
        match = [k for k, t in enumerate(distinct) if t.shape == s.shape and torch.equal(t, s)]
        if not match:
            distinct.append(s)
        index.append(match[0] if match else len(distinct) - 1)
    return distinct, index


# A network's outputs and gradients at a duplicate sequence are those at its original: computed once.
FIN_DISTINCT, FIN_INDEX = _distinct(FIN_SEQS)


def _finite_nngp(kernel, width, seeds):
    total = 0
    with torch.no_grad():
        for seed in seeds:
            network = _finite(kernel, width, width, seed)
            f = torch.stack([network(s.T) for s in FIN_DISTINCT])[FIN_INDEX]
            total = total + f @ f.T / width
    return total / len(seeds)


def _finite_ntk(kernel, width, seeds):
    total = 0
    for seed in seeds:
        network = _finite(kernel, width, 1, seed)
        params = list(network.parameters())
        jacobian = torch.empty(len(FIN_DISTINCT), sum(p.numel() for p in params), dtype=DTYPE)
        for row, s in zip(jacobian, FIN_DISTINCT):
            grads = torch.autograd.grad(network(s.T).sum(), params)
            torch.cat([g.reshape(-1) for g in grads], out=row)
        gram = jacobian @ jacobian.T
        total = total + gram[FIN_INDEX][:, FIN_INDEX]
    return total / len(seeds)




def _finite_errors(name: str, kind: str, seed_set: int = 0) -> dict:
    """Relative errors at each width: ``{width: error}``, and ``"narrow"``: the batches' errors at the narrowest."""
    kernel = _kernel(FIN_STEPS, FIN_D, **FINITE_CASES[name])
    nngp, ntk = kernel.nngp_and_ntk(nan_padded(FIN_SEQS, FIN_STEPS))
    exact, estimate = (nngp, _finite_nngp) if kind == "nngp" else (ntk, _finite_ntk)
    base = 10_000 * seed_set + (5_000 if kind == "ntk" else 0)

    def seeds(width, batch):
        return [base + width + 100 * batch + i for i in range(FINITE_NETWORKS)]

    errors = {width: relative_error(estimate(kernel, width, seeds(width, 0)), exact) for width in WIDTHS[1:]}
    errors["narrow"] = [
        relative_error(estimate(kernel, WIDTHS[0], seeds(WIDTHS[0], b)), exact) for b in range(FINITE_NARROW_BATCHES)
    ]
    return errors


# Calibration: every case with 8 seed sets (seed_set 0..7 of _finite_errors).  Largest error
# at width 1024: NNGP 0.103 (relu-last; the others 0.036-0.070), NTK 0.050 (erf-mean).
# Smallest ratio (mean error at 64) / (error at 1024): NNGP 2.00, NTK 1.69 (expected about
# sqrt(1024 / 64) = 4 where the sampling error dominates).  At width 256: NNGP 0.087-0.197,
# NTK 0.054-0.139 (largest over the seed sets).
FINITE_BOUNDS = {"nngp": 0.15, "ntk": 0.075}
FINITE_RATIO = {"nngp": 1.5, "ntk": 1.3}


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("name", list(FINITE_CASES))
def test_finite_width_rnns_on_unpadded_sequences_converge_to_the_kernel(name, kind):
    errors = _finite_errors(name, kind)
    narrow = sum(errors["narrow"]) / len(errors["narrow"])
    message = f"{name} {kind}: width 64 {narrow:.4f} (mean), 256 {errors[256]:.4f}, 1024 {errors[1024]:.4f}"
    assert errors[1024] < FINITE_BOUNDS[kind], message
    assert errors[1024] < narrow / FINITE_RATIO[kind], message


# =============================================================================================
# 3. Padding, diag, tiles and the rest of the batch never change a value.
# =============================================================================================

PAD_D = 2
PAD_SEQS = random_sequences((5, 2, 4, 1, 3, 5), PAD_D, seed=31)
PAD_OTHER = random_sequences((3, 5, 2, 4), PAD_D, seed=32)
# Closed-form nonlinearities, so that the checks can be exact.  (Tanh by quadrature: see
# test_default_tanh_rule_depends_on_the_batch_only_at_the_quadrature_error.)
PAD_CASES = {
    "erf-last": {"nonlinearity": "erf", "readout": "last"},
    "relu-mean": {"nonlinearity": "relu", "readout": "mean", "w": 0.9, "u": 1.3},
    "erf-depth2-bidirectional-last": {
        "nonlinearity": "erf",
        "readout": "last",
        "depth": 2,
        "bidirectional": True,
        "w": 1.6,
    },
    "erf-bidirectional-mean": {"nonlinearity": "erf", "readout": "mean", "bidirectional": True, "w": 1.4},
}


def _both(kernel, x1, x2=None, diag=False):
    nngp, ntk = kernel.nngp_and_ntk(x1, x2, diag=diag)
    return torch.stack([nngp.detach(), ntk.detach()])


@pytest.mark.parametrize("name", list(PAD_CASES))
def test_padding_to_a_longer_t_changes_nothing(name):
    options = PAD_CASES[name]
    short, long = _kernel(5, PAD_D, **options), _kernel(8, PAD_D, **options)
    expected = _both(short, nan_padded(PAD_SEQS, 5), nan_padded(PAD_OTHER, 5))
    got = _both(long, nan_padded(PAD_SEQS, 8), nan_padded(PAD_OTHER, 8))
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        _both(long, nan_padded(PAD_SEQS, 8)), _both(short, nan_padded(PAD_SEQS, 5)), rtol=1e-13, atol=1e-13
    )
    # x1 padded to 8 steps against x2 padded to 8 with a kernel of T = 8, and the values do
    # depend on the sequences (the check is not vacuous).
    assert (expected[:, 0] - expected[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(PAD_CASES))
def test_each_sequence_alone_unpadded_gives_the_same_values(name):
    options = PAD_CASES[name]
    padded = _both(_kernel(5, PAD_D, **options), nan_padded(PAD_SEQS, 5))
    for i, s in enumerate(PAD_SEQS):
        alone = _both(_kernel(s.shape[0], PAD_D, **options), s.reshape(1, -1))
        torch.testing.assert_close(padded[:, i, i], alone[:, 0, 0], rtol=1e-13, atol=1e-13)
    # Pairs of sequences of equal length, unpadded together.
    i, j = 0, 5
    assert PAD_SEQS[i].shape == PAD_SEQS[j].shape
    pair = torch.stack([PAD_SEQS[i].reshape(-1), PAD_SEQS[j].reshape(-1)])
    together = _both(_kernel(5, PAD_D, **options), pair)
    torch.testing.assert_close(padded[:, [i, j]][:, :, [i, j]], together, rtol=1e-13, atol=1e-13)


def test_padded_pairs_of_different_lengths_match_the_reference_in_a_longer_t():
    options = {
        "nonlinearity": "relu",
        "depth": 2,
        "readout": "mean",
        "bidirectional": True,
        "w": 0.8,
        "u": 1.2,
        "b": 0.15,
        "readout_variance": 1.1,
    }
    nngp, ntk = _kernel(9, PAD_D, **options).nngp_and_ntk(nan_padded(PAD_SEQS, 9), nan_padded(PAD_OTHER, 9))
    expected_nngp, expected_ntk = reference_matrix(PAD_SEQS, PAD_OTHER, **options)
    torch.testing.assert_close(nngp, expected_nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ntk, expected_ntk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(PAD_CASES))
def test_diag_is_the_diagonal_of_the_full_matrix(name):
    kernel = _kernel(6, PAD_D, **PAD_CASES[name])
    x1 = nan_padded(PAD_SEQS[:4], 6)
    x2 = nan_padded(PAD_OTHER, 6)
    full = _both(kernel, x1, x2)
    torch.testing.assert_close(
        _both(kernel, x1, x2, diag=True), full.diagonal(dim1=-2, dim2=-1), rtol=1e-13, atol=1e-13
    )
    own = _both(kernel, x1)
    torch.testing.assert_close(_both(kernel, x1, diag=True), own.diagonal(dim1=-2, dim2=-1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(kernel(x1, diag=True).detach(), own[0].diagonal(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("tile_pairs", [1, 2])
@pytest.mark.parametrize("name", list(PAD_CASES))
def test_tiles_give_the_same_numbers_as_one_piece(name, tile_pairs):
    options = PAD_CASES[name]
    whole = _kernel(6, PAD_D, tile_pairs=10**9, **options)
    tiled = _kernel(6, PAD_D, tile_pairs=tile_pairs, **options)
    x1, x2 = nan_padded(PAD_SEQS, 6), nan_padded(PAD_OTHER, 6)
    for a, b in ((x1, None), (x1, x2), (x2, x1)):
        torch.testing.assert_close(_both(tiled, a, b), _both(whole, a, b), rtol=1e-13, atol=1e-13)
    # With autograd recording the tiles are assembled differently.
    torch.testing.assert_close(tiled(x1).to_dense(), whole(x1).to_dense(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", list(PAD_CASES))
def test_a_pairs_value_does_not_depend_on_the_other_sequences(name):
    kernel = _kernel(6, PAD_D, **PAD_CASES[name])
    x = nan_padded(PAD_SEQS, 6)
    full = _both(kernel, x)
    n = x.shape[0]
    for i in range(n):
        for j in range(n):
            pair = _both(kernel, x[[i]], x[[j]])
            torch.testing.assert_close(pair[:, 0, 0], full[:, i, j], rtol=1e-13, atol=1e-13)
    # A permutation of the batch permutes the matrix; a batch of only short sequences (none of
    # which fills the T steps) gives the same sub-matrix.
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(_both(kernel, x[perm]), full[:, perm][:, :, perm], rtol=1e-13, atol=1e-13)
    short = torch.tensor([1, 3, 4])
    torch.testing.assert_close(_both(kernel, x[short]), full[:, short][:, :, short], rtol=1e-13, atol=1e-13)


def test_default_tanh_rule_depends_on_the_batch_only_at_the_quadrature_error():
    # The quadrature rule of Tanh is not symmetric in the two sequences of a pair, and K(X, X)
    # is made exactly symmetric by averaging (i, j) and (j, i); so a value computed within
    # K(X, X) and on its own differ by the quadrature error.  Measured with the default 96
    # points, for the pairs of sequence 1 (twice the norm): relative 1.5e-7 (NNGP) and 2.1e-6
    # (NTK); 192 points bring this below 1e-13.  Against 192 points the default rule is off by
    # up to 1.7e-6 (NNGP) and 1.2e-4 (NTK; the pre-activation variances reach about 17).
    kernel = _kernel(6, PAD_D, nonlinearity="tanh", readout="last")
    accurate = _kernel(6, PAD_D, nonlinearity=Tanh(num_quadrature_points=192), readout="last")
    x = nan_padded(PAD_SEQS, 6)
    full, exact = _both(kernel, x), _both(accurate, x)
    pair = torch.stack([_both(kernel, x[[1]], x[[j]])[:, 0, 0] for j in range(x.shape[0])], -1)
    torch.testing.assert_close(pair, full[:, 1], rtol=1e-5, atol=0)
    torch.testing.assert_close(full, exact, rtol=3e-4, atol=0)
    accurate_pair = torch.stack([_both(accurate, x[[1]], x[[j]])[:, 0, 0] for j in range(x.shape[0])], -1)
    torch.testing.assert_close(accurate_pair, exact[:, 1], rtol=1e-12, atol=1e-13)


def test_leading_batch_dimensions_with_padding():
    kernel = _kernel(5, PAD_D, nonlinearity="erf", readout="mean")
    x = nan_padded(PAD_SEQS, 5)
    batch = torch.stack([x, x.flip(0)])
    got = _both(kernel, batch)
    torch.testing.assert_close(got[:, 0], _both(kernel, x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got[:, 1], _both(kernel, x.flip(0)), rtol=1e-13, atol=1e-13)


# =============================================================================================
# 4. RNNKernel as a GPyTorch kernel.
# =============================================================================================


class TestRNNKernelLastNNGP(PaddedSequenceData, BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return RNNKernel((3, 2), depth=2, nonlinearity="erf", kind="nngp", readout="last", **kwargs)


class TestRNNKernelBidirectionalMeanNTK(PaddedSequenceData, BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return RNNKernel((3, 2), nonlinearity="relu", kind="ntk", readout="mean", bidirectional=True, **kwargs)


def _classification_like_data(n: int, steps: int, d: int, seed: int, pad: bool):
    """Sequences whose target is a smooth function of their steps; with ``pad`` some are shorter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, d, generator=g, dtype=DTYPE)
    y = torch.tanh(x[..., 0].mean(-1) * 2) + 0.05 * torch.randn(n, generator=g, dtype=DTYPE)
    if pad:
        for i in range(0, n, 3):
            x[i, steps - 1 - i % 2 :] = NAN
    return x.reshape(n, steps * d), y


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ConstantMean()
        self.covar = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def _train(model, likelihood, x, y, steps):
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    likelihood.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("readout", ["last", "mean"])
def test_scale_rnn_kernel_in_exact_gp_trains(readout):
    x, y = _classification_like_data(24, 4, 2, seed=41, pad=False)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = _GP(x, y, likelihood, RNNKernel((4, 2), nonlinearity="erf", kind="nngp", readout=readout)).double()
    losses = _train(model, likelihood, x, y, 15)
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    with torch.no_grad():
        prediction = likelihood(model(x[:5]))
    assert torch.isfinite(prediction.mean).all() and (prediction.variance > 0).all()


def test_exact_gp_on_padded_sequences_trains_with_gpytorch_debug_off():
    x, y = _classification_like_data(24, 4, 2, seed=42, pad=True)
    assert torch.isnan(x).any()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = _GP(x, y, likelihood, RNNKernel((4, 2), nonlinearity="relu", kind="ntk", readout="mean")).double()
    with gpytorch.settings.debug(False):
        losses = _train(model, likelihood, x, y, 15)
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    with torch.no_grad():
        prediction = likelihood(model(x[:5]))
    assert torch.isfinite(prediction.mean).all() and (prediction.variance > 0).all()


def test_exact_gp_trains_on_sequences_padded_with_a_finite_sentinel():
    # NaN padding cannot pass ExactGP's debug check (torch.equal(nan, nan) is False); a finite
    # padding value can, and gives the same kernel as NaN padding.
    x_nan, y = _classification_like_data(12, 4, 2, seed=43, pad=True)
    sentinel = -1e6
    x = torch.where(torch.isnan(x_nan), sentinel, x_nan)
    kernel = RNNKernel((4, 2), nonlinearity="erf", kind="ntk", padding_value=sentinel).double()
    reference = RNNKernel((4, 2), nonlinearity="erf", kind="ntk").double()
    with torch.no_grad():
        assert torch.equal(kernel(x).to_dense(), reference(x_nan).to_dense())
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = _GP(x, y, likelihood, kernel).double()
    with gpytorch.settings.debug(True):
        losses = _train(model, likelihood, x, y, 3)
    assert losses[-1] < losses[0]
    # With a finite sentinel, NaN in the inputs is an error again.
    with pytest.raises(ValueError, match="NaN or infinite"):
        kernel(x_nan).to_dense()


def test_float32_works_and_agrees_with_float64():
    # (Closed forms: tanh's quadrature rule differs between float32 and float64.)
    seqs = random_sequences((5, 3, 4, 5), 3, seed=44)
    x = nan_padded(seqs, 5)
    for nonlinearity, readout in (("erf", "last"), ("relu", "mean")):
        options = {"nonlinearity": nonlinearity, "kind": "ntk", "readout": readout, "depth": 2, "bidirectional": True}
        k64 = RNNKernel((5, 3), **options).double()
        k32 = RNNKernel((5, 3), **options).float()
        k32.load_state_dict(k64.state_dict())
        K32 = k32(x.float()).to_dense().detach()
        K64 = k64(x).to_dense().detach()
        assert K32.dtype == torch.float32 and torch.isfinite(K32).all()
        assert ((K32.double() - K64).norm() / K64.norm()).item() < 1e-5


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("nonlinearity, readout", [("relu", "last"), ("erf", "mean"), ("tanh", "last")])
def test_hyperparameter_and_input_gradients_are_finite_also_at_duplicate_sequences(nonlinearity, readout, kind):
    seqs = random_sequences((4, 2, 4), 2, seed=45)
    x = nan_padded(seqs + [seqs[0].clone(), seqs[1].clone()], 4)  # duplicates, padded and not
    # (Tanh's gradients go through quadratures of its higher derivatives: one layer keeps it quick.)
    depth = 1 if nonlinearity == "tanh" else 2
    kernel = RNNKernel(
        (4, 2), nonlinearity=nonlinearity, kind=kind, readout=readout, bidirectional=True, depth=depth
    ).double()
    xr = x.clone().requires_grad_(True)
    K = kernel(xr).to_dense()
    K.sum().backward()
    grads = {name: p.grad for name, p in kernel.named_parameters()}
    assert len(grads) == depth * 3 + 2  # the RNN layers (w, u, b) and the readout (w, b)
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, name
    assert torch.isfinite(xr.grad[~torch.isnan(x)]).all()
    assert (xr.grad[torch.isnan(x)] == 0).all()  # padding does not enter the kernel


def test_pickle_and_state_dict_round_trip():
    kernel = RNNKernel((4, 2), depth=2, nonlinearity="tanh", kind="ntk", readout="last", bidirectional=True).double()
    kernel.architecture[0].weight_variance = 1.7
    kernel.architecture[1].input_variance = 0.6
    x = nan_padded(random_sequences((4, 2, 3), 2, seed=46), 4)
    expected = kernel(x).to_dense()
    clone = pickle.loads(pickle.dumps(kernel))
    torch.testing.assert_close(clone(x).to_dense(), expected, rtol=0, atol=0)
    fresh = RNNKernel((4, 2), depth=2, nonlinearity="tanh", kind="ntk", readout="last", bidirectional=True).double()
    assert not torch.allclose(fresh(x).to_dense(), expected)
    fresh.load_state_dict(kernel.state_dict())
    torch.testing.assert_close(fresh(x).to_dense(), expected, rtol=0, atol=0)


def test_batch_shape_gives_one_kernel_per_batch_entry():
    x = nan_padded(random_sequences((4, 2, 3, 4), 2, seed=47), 4)
    batched = RNNKernel((4, 2), nonlinearity="erf", readout="mean", batch_shape=torch.Size([2])).double()
    values = torch.tensor([0.6, 1.9], dtype=DTYPE)
    batched.architecture[0].weight_variance = values
    K = batched(x).to_dense()
    assert K.shape == (2, 4, 4)
    for i, value in enumerate(values):
        single = _kernel(4, 2, nonlinearity="erf", readout="mean", w=float(value))
        torch.testing.assert_close(K[i], single(x).to_dense(), rtol=1e-12, atol=1e-12)
    assert (K[0] - K[1]).abs().max() > 1e-3


def test_nngp_and_ntk_in_one_pass_match_the_separate_kernels_and_evaluate():
    x = nan_padded(random_sequences((4, 3, 4), 2, seed=48), 4)
    nngp_kernel = _kernel(4, 2, nonlinearity="erf", readout="mean", depth=2)
    ntk_kernel = _kernel(4, 2, nonlinearity="erf", readout="mean", depth=2, kind="ntk")
    nngp, ntk = nngp_kernel.nngp_and_ntk(x)
    torch.testing.assert_close(nngp, nngp_kernel(x).to_dense(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ntk, ntk_kernel(x).to_dense(), rtol=1e-14, atol=1e-14)
    e_nngp, e_ntk = evaluate(nngp_kernel.architecture, x, ntk=True, input_shape=(4, 2), sequence=True)
    torch.testing.assert_close(e_nngp, nngp, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(e_ntk, ntk, rtol=1e-14, atol=1e-14)


def test_kernel_matrix_is_symmetric_and_positive_semidefinite():
    seqs = random_sequences((6, 2, 5, 1, 6, 3, 4, 6), 2, seed=49)
    x = nan_padded(seqs + [seqs[2].clone()], 6)
    for options in (
        {"nonlinearity": "relu", "readout": "last"},
        {"nonlinearity": "erf", "readout": "mean", "bidirectional": True},
    ):
        nngp, ntk = _kernel(6, 2, depth=2, **options).nngp_and_ntk(x)
        for K in (nngp, ntk):
            assert torch.equal(K, K.T)
            eigenvalues = torch.linalg.eigvalsh(K)
            assert eigenvalues.min() > -1e-12 * eigenvalues.max()


# =============================================================================================
# 5. Bad input gets a clear message.
# =============================================================================================


def _bad_input_kernel():
    return RNNKernel((4, 2), nonlinearity="erf").double()


def _good_x():
    return nan_padded(random_sequences((4, 3, 4), 2, seed=51), 4)


def test_wrong_number_of_features():
    kernel = _bad_input_kernel()
    with pytest.raises(ValueError, match="x1 has 9 features but the kernel expects 8"):
        kernel(torch.randn(3, 9, dtype=DTYPE)).to_dense()
    # A sequence longer than input_shape: 5 steps of 2 features.
    with pytest.raises(ValueError, match="x1 has 10 features but the kernel expects 8"):
        kernel(torch.randn(2, 10, dtype=DTYPE)).to_dense()
    with pytest.raises(ValueError, match="x2 has 10 features but the kernel expects 8"):
        kernel.nngp_and_ntk(_good_x(), torch.randn(2, 10, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"input_shape=\(4, 2\) needs 8"):
        evaluate(Sequential(RNN("erf"), LastStep(), Linear()), torch.randn(3, 6), input_shape=(4, 2), sequence=True)


@pytest.mark.parametrize("which", ["x1", "x2"])
def test_nan_in_part_of_a_step(which):
    bad = _good_x()
    bad[1, 3] = NAN  # step 1 of sequence 1: one of its two features
    args = (bad, _good_x()) if which == "x1" else (_good_x(), bad)
    with pytest.raises(ValueError, match=f"{which} has NaN in some but not all features of a step"):
        _bad_input_kernel()(*args).to_dense()


def test_nan_step_before_a_real_step():
    bad = _good_x()
    bad[0, 2:4] = NAN  # step 1 of 4 is padding, step 2 is not
    with pytest.raises(ValueError, match="NaN padding step before a real step; pad sequences at the end only"):
        _bad_input_kernel()(bad).to_dense()
    front = _good_x()
    front[2, :2] = NAN  # padding at the start
    with pytest.raises(ValueError, match="pad sequences at the end only"):
        _bad_input_kernel()(front, diag=True)


def test_all_nan_sequence():
    bad = _good_x()
    bad[1] = NAN
    with pytest.raises(ValueError, match="empty sequence"):
        _bad_input_kernel()(bad).to_dense()


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_values(value):
    bad = _good_x()
    bad[0, 5] = value
    with pytest.raises(ValueError, match="x1 contains NaN or infinite values"):
        _bad_input_kernel()(bad).to_dense()
    step = _good_x()
    step[2, 6:] = value  # a whole step of infinities is not padding
    with pytest.raises(ValueError, match="infinite values"):
        _bad_input_kernel()(step).to_dense()


@pytest.mark.parametrize("shape", [(4, 2, 1), (8,), None])
def test_input_shape_that_is_not_t_by_d(shape):
    with pytest.raises(ValueError, match="RNNKernel needs input_shape=\\(T, d\\)"):
        RNNKernel(shape)
    arch = Sequential(RNN("erf"), LastStep(), Linear())
    with pytest.raises(ValueError, match="input_shape=\\(T, d\\)"):
        TensorProgramKernel(arch, input_shape=shape, sequence=True)


def test_rnn_on_plain_inputs():
    arch = Sequential(RNN("erf"), LastStep(), Linear())
    with pytest.raises(ValueError, match="RNN needs sequence features"):
        TensorProgramKernel(arch)(torch.randn(3, 8)).to_dense()
    with pytest.raises(ValueError, match="TimeMean needs sequence features"):
        evaluate(Sequential(Linear(), TimeMean(), Linear()), torch.randn(3, 8))
    # NaN padding is only understood for sequence inputs.
    with pytest.raises(ValueError, match="x1 contains NaN or infinite values"):
        evaluate(arch, _good_x(), input_shape=(2, 4))


@pytest.mark.parametrize("padded", [True, False])
def test_conv1d_after_an_rnn_on_sequences(padded):
    x = _good_x() if padded else nan_padded(random_sequences((4, 4), 2, seed=52), 4)
    arch = Sequential(RNN("erf"), Conv1d(kernel_size=2), LastStep(), Linear())
    # Refused whether or not this batch happens to hold padding: a value must not depend on the batch.
    with pytest.raises(ValueError, match="Conv1d on padded sequences would mix padding into the kernel"):
        evaluate(arch, x, input_shape=(4, 2), sequence=True)


def test_bad_preset_arguments():
    with pytest.raises(ValueError, match=r"readout must be one of \('last', 'mean'\), got 'bogus'"):
        RNNKernel((4, 2), readout="bogus")
    for depth in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="depth must be a positive integer"):
            RNNKernel((4, 2), depth=depth)
    with pytest.raises(ValueError, match="unknown nonlinearity 'bogus'"):
        RNNKernel((4, 2), nonlinearity="bogus")
    with pytest.raises(TypeError, match="RNN needs an elementwise nonlinearity, got Linear"):
        RNN(Linear())
    with pytest.raises(ValueError, match="weight_variance must be non-negative"):
        RNN("erf", weight_variance=-1.0)


def test_architecture_without_a_readout():
    with pytest.raises(ValueError, match="end it with a readout"):
        evaluate(Sequential(RNN("erf")), _good_x(), input_shape=(4, 2), sequence=True)
