"""The defining property: finite random networks converge to the kernels as the width grows.

For each architecture, the infinite-width NNGP kernel and NTK from
:func:`gpytorch_tp.evaluate` are compared with

* the empirical NNGP kernel: the output covariance over random finite networks of
  the same architecture (:func:`~gpytorch_tp.empirical.build_network` with a wide
  readout, ``out_features=width``, so each network contributes ``width`` i.i.d.
  outputs given its hidden features), averaged over a few networks;
* the empirical NTK: the parameter-gradient inner product of one-output networks
  (:func:`~gpytorch_tp.empirical.empirical_ntk`, every parameter trainable,
  including LayerNorm gains and biases), averaged over a few networks.

Checks, per architecture and kernel:

* the relative Frobenius error ``||K_emp - K||_F / ||K||_F`` at the wide width is below a
  bound (NNGP: width 1024, 4 networks, each averaging 1024 outputs; NTK: width 512,
  8 networks);
* the error of the double-centred kernels (constant mode projected out) at the wide width
  is below the typical one at a narrow width (64 for the NNGP, 16 for the NTK; mean over
  3 (NNGP) or 4 (NTK) independent batches of as many networks): the error falls with the
  width.  Its fluctuating part scales like ``1 / sqrt(width * networks)`` (finite-width
  bias like ``1 / width``), so the expected ratios are 4 and 5.7.

The bounds were set from runs of every case with 8 independent seed sets (``SEED_OFFSET``
0..7): the bound is the largest error seen over all cases and seed sets, times a margin;
the seeds are then fixed (``SEED_OFFSET = 0``), so the tests are deterministic.

Inputs: 7 points in 5 dimensions, one duplicated, one of twice and one of half the
typical norm.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import relative_error

from gpytorch_tp import evaluate
from gpytorch_tp.empirical import build_network, empirical_nngp, empirical_ntk
from gpytorch_tp.layers import (
    ELU,
    GELU,
    Erf,
    LayerNorm,
    LeakyReLU,
    Linear,
    ReLU,
    Residual,
    Sequential,
    Tanh,
    nonlinearities,
)

DTYPE = torch.float64
INPUT_DIM = 5
# (wide width, networks averaged, narrow width, batches of networks at the narrow width)
CONFIG = {"nngp": (1024, 4, 64, 3), "ntk": (512, 8, 16, 4)}
SEED_OFFSET = 0  # changed only by the offline runs that set the bounds


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(2024)
    x = torch.randn(6, INPUT_DIM, generator=g, dtype=DTYPE)
    x[2] *= 2.0  # a different norm
    x[4] *= 0.5
    return torch.cat([x, x[:1]])  # a duplicated point


X = _inputs()

# Every registered nonlinearity (the registry, so that a new one cannot skip this test), with its
# default arguments, and a few variants: name -> (factory, weight variance, bias variance).
# Weight and bias variances by name; the others get DEFAULT_VARIANCES.
VARIANCES = {
    "relu": (2.0, 0.05),
    "abs": (1.5, 0.1),
    "step": (1.7, 0.2),
    "sign": (1.7, 0.2),
    "erf": (1.8, 0.1),
    "gelu": (1.8, 0.1),
    "sin": (1.5, 0.15),
    "cos": (1.5, 0.15),
    "tanh": (1.8, 0.1),
    "sigmoid": (2.0, 0.2),
    "silu": (1.8, 0.1),
    "softplus": (1.6, 0.05),
}
DEFAULT_VARIANCES = (1.7, 0.1)
VARIANTS = {
    "leaky_relu_0.2": (lambda: LeakyReLU(0.2), 1.8, 0.1),
    "leaky_relu_-0.5": (lambda: LeakyReLU(-0.5), 1.6, 0.1),
    "elu_0.5": (lambda: ELU(0.5), 1.7, 0.1),
}
NONLINEARITIES = {name: (cls, *VARIANCES.get(name, DEFAULT_VARIANCES)) for name, cls in nonlinearities().items()}
NONLINEARITIES.update(VARIANTS)


def mlp(name: str, depth: int) -> Sequential:
    make, wv, bv = NONLINEARITIES[name]
    layers = []
    for _ in range(depth):
        layers += [Linear(wv, bv), make()]
    layers.append(Linear(wv, bv))  # the readout
    return Sequential(*layers)


def residual_relu() -> Sequential:
    return Sequential(
        Linear(1.5, 0.1),
        Residual(ReLU(), Linear(2.0, 0.05)),
        Residual(ReLU(), Linear(1.0, 0.1)),
        ReLU(),
        Linear(1.7, 0.1),
    )


def layernorm_mlp(elementwise_affine: bool) -> Sequential:
    return Sequential(
        Linear(1.7, 0.1),
        LayerNorm(elementwise_affine=elementwise_affine),
        ReLU(),
        Linear(2.0, 0.1),
        LayerNorm(elementwise_affine=elementwise_affine),
        Erf(),
        Linear(1.5, 0.2),
    )


def rms_norm_after_nonlinearity() -> Sequential:
    return Sequential(Linear(1.8, 0.1), GELU(), LayerNorm(center=False), Linear(1.5, 0.1), Tanh(), Linear(1.5, 0.1))


def layernorm_affine_then_linear() -> Sequential:
    # the affine LayerNorm's output is mixed by a Linear layer before any nonlinearity
    return Sequential(
        Linear(1.7, 0.1),
        ReLU(),
        Linear(2.0, 0.1),
        LayerNorm(elementwise_affine=True),
        Linear(1.5, 0.1),
        Erf(),
        Linear(1.5, 0.2),
    )


ARCHITECTURES = {
    "residual_relu": residual_relu,
    "layernorm": lambda: layernorm_mlp(False),
    "layernorm_affine_then_linear": layernorm_affine_then_linear,
    "layernorm_affine_then_nonlinearity": lambda: layernorm_mlp(True),
    "rmsnorm_after_gelu": rms_norm_after_nonlinearity,
}


# ---------------------------------------------------------------------------------------------




def _centred(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _centredrelative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative error of the double-centred kernels (the constant mode projected out).

    The constant mode of a kernel (e.g. the mean of sigmoid features) is estimated by a single
    chi-square-like readout statistic per network, whose error is one half-normal variable; the
    remaining modes average over many directions and compare stably across widths.
    """
    return relative_error(_centred(estimate), _centred(exact))


def _seed(s: int) -> int:
    return 100_000 * SEED_OFFSET + s


def _empirical_nngp(arch, width, seeds):
    def factory(i):
        return build_network(arch, INPUT_DIM, width, out_features=width, seed=_seed(seeds[i]), dtype=DTYPE)

    return empirical_nngp(factory, X, n_networks=len(seeds))


def _empirical_ntk(arch, width, seeds):
    total = 0
    for s in seeds:
        total = total + empirical_ntk(build_network(arch, INPUT_DIM, width, seed=_seed(s), dtype=DTYPE), X)
    return total / len(seeds)


def convergence(arch: Sequential, kind: str, wide: int, n_networks: int, narrow: int, narrow_batches: int):
    """Errors of the empirical kernel at width ``wide`` and at width ``narrow``.

    Returns ``(error, centred error)`` at ``wide`` with ``n_networks`` networks, and the list
    of the same pairs at ``narrow`` for ``narrow_batches`` independent batches of ``n_networks``.
    """
    arch = arch.double()
    nngp, ntk = evaluate(arch, X, ntk=kind == "ntk")
    exact, estimate = (nngp, _empirical_nngp) if kind == "nngp" else (ntk, _empirical_ntk)
    offset = 0 if kind == "nngp" else 50_000

    def errors(width, seeds):
        k = estimate(arch, width, seeds)
        return relative_error(k, exact), _centredrelative_error(k, exact)

    wide_errors = errors(wide, [offset + s for s in range(n_networks)])
    narrow_errors = [
        errors(narrow, [offset + 1000 * (b + 1) + s for s in range(n_networks)]) for b in range(narrow_batches)
    ]
    return wide_errors, narrow_errors


# ---------------------------------------------------------------------------------------------
# The tests.
# ---------------------------------------------------------------------------------------------

# Bounds on the relative Frobenius error at the wide width.  Largest seen over all cases and
# 8 seed sets: 0.087 (NNGP, silu depth 3), 0.109 (NTK, silu depth 3).
BOUNDS = {"nngp": 0.12, "ntk": 0.15}
# The centred error at the wide width must be below the typical (mean over the batches)
# centred error at the narrow width divided by this factor.  Expected ratio sqrt(wide / narrow):
# 4 (NNGP), 5.7 (NTK); smallest seen over all cases and 8 seed sets: 1.89 (NNGP), 1.20 (NTK).
RATIO = {"nngp": 1.4, "ntk": 1.0}


def _check(arch: Sequential, kind: str):
    wide_width, n_networks, narrow_width, batches = CONFIG[kind]
    (wide, wide_centred), narrow = convergence(arch, kind, wide_width, n_networks, narrow_width, batches)
    typical_narrow = sum(c for _, c in narrow) / len(narrow)
    message = (
        f"{kind}: relative error {wide:.4f} at width {wide_width} ({n_networks} networks); centred "
        f"{wide_centred:.4f}, typical centred {typical_narrow:.4f} at width {narrow_width}"
    )
    assert wide < BOUNDS[kind], message
    assert wide_centred < typical_narrow / RATIO[kind], message


MLP_CASES = [pytest.param(name, depth, id=f"{name}-depth{depth}") for name in NONLINEARITIES for depth in (1, 2, 3)]


@pytest.mark.parametrize("name, depth", MLP_CASES)
def test_mlp_nngp_converges_to_the_kernel(name, depth):
    _check(mlp(name, depth), "nngp")


@pytest.mark.parametrize("name, depth", MLP_CASES)
def test_mlp_ntk_converges_to_the_kernel(name, depth):
    _check(mlp(name, depth), "ntk")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_nngp_converges_to_the_kernel(name):
    _check(ARCHITECTURES[name](), "nngp")


# layernorm_affine_then_nonlinearity: its NTK is refused (see below); the hand-derived limit is
# checked against finite networks there.
@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n != "layernorm_affine_then_nonlinearity"])
def test_architecture_ntk_converges_to_the_kernel(name):
    _check(ARCHITECTURES[name](), "ntk")


# ---------------------------------------------------------------------------------------------
# LayerNorm with a trainable affine map followed by a nonlinearity: the right limit.
# ---------------------------------------------------------------------------------------------

_LAYERNORM_AFFINE_BUG = (
    "LayerNorm(elementwise_affine=True) adds K_new + 1 to the NTK as if the gain's contribution "
    "concentrated.  The gain g_i of unit i contributes z_i(x) z_i(x') to that unit's NTK, and z_i is "
    "the unit's own pre-activation: a following nonlinearity sees E[phi'(u) phi'(v) u v], not "
    "E[phi'(u) phi'(v)] E[u v].  Exact only when a Linear layer comes next."
)

_W1, _B1, _W2, _B2 = 1.7, 0.1, 2.0, 0.1


def _layernorm_affine_relu() -> Sequential:
    return Sequential(Linear(_W1, _B1), LayerNorm(elementwise_affine=True), ReLU(), Linear(_W2, _B2)).double()


def _layernorm_affine_relu_ntk_by_hand() -> torch.Tensor:
    """NTK of Linear -> LayerNorm(affine) -> ReLU -> Linear, derived by hand.

    With h the first pre-activation (K_h = w1 <x, x'> / d + b1 = Theta_h), z = LayerNorm(h) has
    unit variances and correlation rho; the affine output is y_i = g_i z_i + b_i = z_i at
    initialisation, and its NTK for unit i is Theta_h / sqrt(K_h(x, x) K_h(x', x')) (weights
    below, concentrated) + z_i(x) z_i(x') (gain) + 1 (bias).  Through ReLU and the readout:

        Theta = K_out + w2 (J0(rho) (Theta_h / sqrt(..) + 1) + E[1(u>0) 1(v>0) u v]),

    and E[1(u>0) 1(v>0) u v] = E[relu(u) relu(v)] = J1(rho) (unit variances).
    """
    k_h = _W1 * (X @ X.T) / INPUT_DIM + _B1
    diagonal = k_h.diagonal()
    norm = torch.sqrt(diagonal[:, None] * diagonal[None, :])
    rho = (k_h / norm).clamp(-1.0, 1.0)
    ones = torch.ones_like(rho)
    j1, j0 = ReLU().pair_moments(ones, ones, rho, True)  # closed forms, checked in test_moments
    return _W2 * j1 + _B2 + _W2 * (j0 * (k_h / norm + 1) + j1)


def test_layernorm_affine_then_relu_finite_ntk_converges_to_the_hand_derived_limit():
    exact = _layernorm_affine_relu_ntk_by_hand()
    arch = _layernorm_affine_relu()
    width, n_networks, _, _ = CONFIG["ntk"]
    wide = relative_error(_empirical_ntk(arch, width, list(range(n_networks))), exact)
    # 8 seed sets: 0.015 .. 0.037 (and 0.113 .. 0.146 from the package's NTK, 0.12 from this one)
    assert wide < 0.06, wide


def test_layernorm_affine_then_nonlinearity_ntk_is_refused_not_wrong():
    # The package does not track the unit-correlated gain term (see _LAYERNORM_AFFINE_BUG), so it
    # must refuse this NTK rather than return the wrong value; the NNGP is unaffected.
    with pytest.raises(NotImplementedError, match="elementwise_affine=True"):
        evaluate(_layernorm_affine_relu(), X, ntk=True)
    nngp, _ = evaluate(_layernorm_affine_relu(), X)
    assert torch.isfinite(nngp).all()


# ---------------------------------------------------------------------------------------------
# Tanh with its default closed form (erf expansion).
# ---------------------------------------------------------------------------------------------


def test_default_tanh_is_accurate_in_this_ntk():
    # The point of twice the typical norm has pre-activation variance 10.2.  With an early
    # default (32 Gauss-Hermite points) its depth-1 NTK entry was 3.46 instead of 4.48 (-23%)
    # and width-1024 networks disagreed with the NTK by 0.15; the default (the closed form,
    # formerly a 96-point rule) agrees with a 256-point rule well within the bound.
    def arch(points=None):
        tanh = Tanh() if points is None else Tanh(num_quadrature_points=points)
        return Sequential(Linear(1.8, 0.1), tanh, Linear(1.8, 0.1)).double()

    _, default = evaluate(arch(), X, ntk=True)
    _, accurate = evaluate(arch(256), X, ntk=True)
    torch.testing.assert_close(default, accurate, rtol=5e-4, atol=0)
