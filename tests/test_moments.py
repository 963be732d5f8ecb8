"""Gaussian moments of every nonlinearity against independent numerical integration.

For ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` each nonlinearity's
``pair_moments`` returns ``V = E[phi(u) phi(v)]`` and ``V' = E[phi'(u) phi'(v)]``,
and ``self_moment(k) = E[phi(u)^2]``.  The reference values here are computed
without any code of the package:

* ``phi`` and its derivatives are written out by hand with numpy / scipy.special;
* the 2-D expectation is an iterated integral over ``z1`` (u = sqrt(k11) z1) and
  the conditional ``z2`` (v = sqrt(k22) (c z1 + sqrt(1 - c^2) z2)), each by
  composite Gauss-Legendre on a truncated line, split at every kink or jump of
  the integrand (the kink of phi(v) moves with z1, so the inner panels do too),
  and around the narrow layer of width ~sqrt(1 - c^2) where the inner
  expectation changes fast when |c| -> 1;
* that fast reference is itself checked against polynomial moments known in
  closed form and against adaptive ``scipy.integrate.quad`` (nested).

Gradients: gradcheck in the interior; at correlation exactly +-1, the gradient
components must be finite and equal to Price's theorem
(dV/dk12 = E[phi'(u) phi'(v)], dV/dk11 = E[phi''(u) phi(v)] / 2), and derivatives
along the |c| = 1 manifold must match finite differences; then whole kernels
(hyperparameters and inputs with duplicated rows).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
import torch
from scipy import integrate, special

from gpytorch_tp import MLPKernel
from gpytorch_tp.layers import (
    ELU,
    GELU,
    NONLINEARITIES,
    Abs,
    Cos,
    Erf,
    LeakyReLU,
    Mish,
    ReLU,
    Sigmoid,
    Sign,
    SiLU,
    Sin,
    Softplus,
    Step,
    Tanh,
)

DTYPE = torch.float64

# ---------------------------------------------------------------------------------------------
# Nonlinearities, written out independently (numpy), with analytic derivatives.
# ---------------------------------------------------------------------------------------------

_SQRT_2PI = math.sqrt(2 * math.pi)
_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)


def _npdf(x):
    return np.exp(-0.5 * x * x) / _SQRT_2PI


def _leaky(a):
    return lambda x: np.where(x > 0, x, a * x)


def _leaky_d(a):
    return lambda x: np.where(x > 0, 1.0, a)


def _tanh_d(x):
    return 1 - np.tanh(x) ** 2


def _tanh_d2(x):
    t = np.tanh(x)
    return -2 * t * (1 - t * t)


def _tanh_d3(x):
    t = np.tanh(x)
    return (1 - t * t) * (6 * t * t - 2)


def _sig_d(x):
    s = special.expit(x)
    return s * (1 - s)


def _sig_d2(x):
    s = special.expit(x)
    return s * (1 - s) * (1 - 2 * s)


def _sig_d3(x):
    s = special.expit(x)
    d = s * (1 - s)
    return d * (1 - 2 * s) ** 2 - 2 * d * d


def _elu(a):
    return lambda x: np.where(x > 0, x, a * np.expm1(np.minimum(x, 0.0)))


def _elu_d(a):
    return lambda x: np.where(x > 0, 1.0, a * np.exp(np.minimum(x, 0.0)))


def _elu_d2(a):
    # the regular part; for a != 1 phi'' also holds (1 - a) delta(u)
    return lambda x: np.where(x > 0, 0.0, a * np.exp(np.minimum(x, 0.0)))


def _mish(x):
    return x * np.tanh(np.logaddexp(0.0, x))


def _mish_d(x):
    t = np.tanh(np.logaddexp(0.0, x))
    return t + x * (1 - t * t) * special.expit(x)


def _mish_d2(x):
    # d/dx of _mish_d, with t' = (1 - t^2) sigmoid(x) and sigmoid' = _sig_d
    t, s = np.tanh(np.logaddexp(0.0, x)), special.expit(x)
    dt = (1 - t * t) * s
    return 2 * dt + x * (-2 * t * dt * s + (1 - t * t) * _sig_d(x))


@dataclass(frozen=True)
class Spec:
    """A nonlinearity: the layer under test and independent numpy derivatives.

    ``d1 = None`` means phi' vanishes almost everywhere (the layer must return V' = None).
    ``d2``/``d3`` are None where they are distributions (kinks): Price-theorem checks
    then use the hand-derived values in the tests.
    ``kink_d1`` are the one-sided derivatives (left, right) at 0 for kinked functions.
    """

    make: object
    f: object
    d1: object | None
    d2: object | None = None
    d3: object | None = None
    quadrature: bool = False
    kink_d1: tuple[float, float] | None = None
    relu_family_slope: float | None = None  # a for phi = max(u, 0) + a min(u, 0)


SPECS: dict[str, Spec] = {
    "relu": Spec(ReLU, _leaky(0.0), _leaky_d(0.0), kink_d1=(0.0, 1.0), relu_family_slope=0.0),
    "leaky_relu_0.2": Spec(
        lambda: LeakyReLU(0.2), _leaky(0.2), _leaky_d(0.2), kink_d1=(0.2, 1.0), relu_family_slope=0.2
    ),
    "leaky_relu_-0.5": Spec(
        lambda: LeakyReLU(-0.5), _leaky(-0.5), _leaky_d(-0.5), kink_d1=(-0.5, 1.0), relu_family_slope=-0.5
    ),
    "leaky_relu_default": Spec(LeakyReLU, _leaky(0.01), _leaky_d(0.01), kink_d1=(0.01, 1.0), relu_family_slope=0.01),
    "abs": Spec(Abs, np.abs, np.sign, kink_d1=(-1.0, 1.0), relu_family_slope=-1.0),
    "step": Spec(Step, lambda x: (np.asarray(x) > 0).astype(float), None),
    "sign": Spec(Sign, np.sign, None),
    "erf": Spec(
        Erf,
        special.erf,
        lambda x: _TWO_OVER_SQRT_PI * np.exp(-x * x),
        lambda x: -2 * x * _TWO_OVER_SQRT_PI * np.exp(-x * x),
        lambda x: (4 * x * x - 2) * _TWO_OVER_SQRT_PI * np.exp(-x * x),
    ),
    "gelu": Spec(
        GELU,
        lambda x: x * special.ndtr(x),
        lambda x: special.ndtr(x) + x * _npdf(x),
        lambda x: (2 - x * x) * _npdf(x),
        lambda x: (x**3 - 4 * x) * _npdf(x),
    ),
    "sin": Spec(Sin, np.sin, np.cos, lambda x: -np.sin(x), lambda x: -np.cos(x)),
    "cos": Spec(Cos, np.cos, lambda x: -np.sin(x), lambda x: -np.cos(x), np.sin),
    # Tanh's quadrature path here; its default closed form (erf expansion) has tests of its own below.
    "tanh": Spec(lambda: Tanh(num_quadrature_points=96), np.tanh, _tanh_d, _tanh_d2, _tanh_d3, quadrature=True),
    "sigmoid": Spec(
        lambda: Sigmoid(num_quadrature_points=96), special.expit, _sig_d, _sig_d2, _sig_d3, quadrature=True
    ),
    "silu": Spec(
        SiLU,
        lambda x: x * special.expit(x),
        lambda x: special.expit(x) + x * _sig_d(x),
        lambda x: 2 * _sig_d(x) + x * _sig_d2(x),
        lambda x: 3 * _sig_d2(x) + x * _sig_d3(x),
        quadrature=True,
    ),
    "softplus": Spec(Softplus, lambda x: np.logaddexp(0.0, x), special.expit, _sig_d, _sig_d2, quadrature=True),
    # ELU's third derivative holds a delta at 0 (phi'' jumps): no d3; its V' gradients are checked by
    # gradcheck and along the |c| = 1 manifold.
    "elu": Spec(ELU, _elu(1.0), _elu_d(1.0), _elu_d2(1.0), quadrature=True),
    "mish": Spec(Mish, _mish, _mish_d, _mish_d2, quadrature=True),
}
CLOSED_FORM = [n for n, s in SPECS.items() if not s.quadrature]
QUADRATURE = [n for n, s in SPECS.items() if s.quadrature]
SMOOTH = ["erf", "gelu", "sin", "cos", *(n for n in QUADRATURE if n != "elu")]
RELU_FAMILY = [n for n, s in SPECS.items() if s.relu_family_slope is not None]


def test_every_registered_nonlinearity_is_covered():
    covered = {type(spec.make()).name for spec in SPECS.values()}
    assert covered | {"identity"} == set(NONLINEARITIES)


# ---------------------------------------------------------------------------------------------
# Reference integration (no package code).
# ---------------------------------------------------------------------------------------------

_LIMIT = 11.0  # |z| beyond 11 standard deviations carries < 1e-27 of the mass
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(96)


def _panels(edges) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes/weights on consecutive panels, times the standard normal density."""
    nodes, weights = [], []
    for a, b in itertools.pairwise(edges):
        if b > a:
            half = (b - a) / 2
            nodes.append(a + half * (_GL_NODES + 1))
            weights.append(half * _GL_WEIGHTS)
    z = np.concatenate(nodes)
    return z, np.concatenate(weights) * _npdf(z)


def ref_expect1(h, scale: float) -> float:
    """E[h(scale Z)], Z ~ N(0, 1); h may kink or jump at 0."""
    z, w = _panels([-_LIMIT, 0.0, _LIMIT])
    return float(np.dot(w, h(scale * z)))


def ref_expect2(f, g, k11: float, k22: float, k12: float) -> float:
    """E[f(u) g(v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]); f, g may kink or jump at 0."""
    zero = np.zeros(1)
    if k11 == 0 and k22 == 0:
        return float(f(zero)[0] * g(zero)[0])
    if k11 == 0:
        return float(f(zero)[0]) * ref_expect1(g, math.sqrt(k22))
    if k22 == 0:
        return float(g(zero)[0]) * ref_expect1(f, math.sqrt(k11))
    a, b = math.sqrt(k11), math.sqrt(k22)
    c = k12 / (a * b)
    if abs(c) >= 1 - 1e-15:  # degenerate: v = sign(c) (b / a) u
        sign = math.copysign(1.0, c)
        return ref_expect1(lambda z: f(a * z) * g(sign * b * z), 1.0)
    s = math.sqrt(1 - c * c)
    edges = [-_LIMIT, 0.0, _LIMIT]
    if c != 0:
        # the inner expectation changes over |z1| ~ s / |c| around 0
        width = min(_LIMIT / 2, 10 * s / abs(c))
        edges = [-_LIMIT, -width, 0.0, width, _LIMIT]
    z1, w1 = _panels(edges)
    # inner panels per outer node, split where v = 0 (z2 = -c z1 / s)
    kink = np.clip(-c * z1 / s, -_LIMIT, _LIMIT)[:, None]
    x, wx = (_GL_NODES + 1) / 2, _GL_WEIGHTS / 2
    left = -_LIMIT + (kink + _LIMIT) * x
    right = kink + (_LIMIT - kink) * x
    z2 = np.concatenate([left, right], axis=1)
    w2 = np.concatenate([(kink + _LIMIT) * wx, (_LIMIT - kink) * wx], axis=1) * _npdf(z2)
    inner = np.sum(w2 * g(b * (c * z1[:, None] + s * z2)), axis=1)
    return float(np.dot(w1, f(a * z1) * inner))


def slow_ref_expect2(f, g, k11, k22, k12) -> float:
    """Adaptive nested scipy quad (for spot checks of ``ref_expect2``; interior only)."""
    a, b = math.sqrt(k11), math.sqrt(k22)
    c = k12 / (a * b)
    s = math.sqrt(1 - c * c)

    def inner(z1):
        m = c * z1
        kink = -m / s
        points = [kink] if abs(kink) < _LIMIT else None
        val, _ = integrate.quad(
            lambda z2: float(g(np.array([b * (m + s * z2)]))[0]) * math.exp(-0.5 * z2 * z2) / _SQRT_2PI,
            -_LIMIT,
            _LIMIT,
            points=points,
            epsabs=1e-13,
            epsrel=1e-12,
            limit=200,
        )
        return val

    val, _ = integrate.quad(
        lambda z1: float(f(np.array([a * z1]))[0]) * inner(z1) * math.exp(-0.5 * z1 * z1) / _SQRT_2PI,
        -_LIMIT,
        _LIMIT,
        points=[0.0],
        epsabs=1e-12,
        epsrel=1e-11,
        limit=200,
    )
    return val


def test_reference_integrator_on_polynomial_moments():
    # E[u v] = k12, E[u^2 v^2] = k11 k22 + 2 k12^2, E[u^3 v] = 3 k11 k12, E[|u| v^2]...
    for k11, k22, c in [(0.3, 2.0, 0.4), (5.0, 0.1, -0.999), (1.0, 1.0, 1.0), (2.0, 3.0, -1.0), (1.5, 0.7, 0.0)]:
        k12 = c * math.sqrt(k11 * k22)
        assert ref_expect2(lambda x: x, lambda x: x, k11, k22, k12) == pytest.approx(k12, abs=1e-13)
        assert ref_expect2(np.square, np.square, k11, k22, k12) == pytest.approx(k11 * k22 + 2 * k12**2, rel=1e-12)
        assert ref_expect2(lambda x: x**3, lambda x: x, k11, k22, k12) == pytest.approx(3 * k11 * k12, abs=1e-12)
        # P(u > 0, v > 0) = 1/4 + arcsin(c) / (2 pi) (Sheppard), a jump in both factors
        step = SPECS["step"].f
        assert ref_expect2(step, step, k11, k22, k12) == pytest.approx(
            0.25 + math.asin(max(-1.0, min(1.0, c))) / (2 * math.pi), abs=1e-12
        )


@pytest.mark.parametrize(
    "name, k11, k22, c",
    [
        ("relu", 0.7, 2.0, 0.5),
        ("sign", 1.0, 3.0, -0.9),
        ("tanh", 3.0, 1.5, 0.3),
        ("sin", 10.0, 10.0, 0.999),
        ("elu", 2.0, 0.5, -0.7),
        ("mish", 1.5, 3.0, 0.8),
    ],
)
def test_reference_integrator_matches_adaptive_scipy_quad(name, k11, k22, c):
    spec = SPECS[name]
    k12 = c * math.sqrt(k11 * k22)
    fast = ref_expect2(spec.f, spec.f, k11, k22, k12)
    slow = slow_ref_expect2(spec.f, spec.f, k11, k22, k12)
    assert fast == pytest.approx(slow, rel=1e-9, abs=1e-11)


# ---------------------------------------------------------------------------------------------
# The grid of covariances.
# ---------------------------------------------------------------------------------------------

VARIANCE_PAIRS = [(0.05, 0.05), (1.0, 1.0), (10.0, 10.0), (0.05, 10.0), (0.3, 2.0), (3.0, 0.7)]
CORRELATIONS = [-1.0, -0.999, -0.5, 0.0, 0.5, 0.999, 1.0]
ZERO_VARIANCE = [(0.0, 1.0), (2.5, 0.0), (0.0, 10.0), (0.0, 0.0)]


def _grid(variance_pairs, correlations, with_zero=True):
    rows = [(k11, k22, c * math.sqrt(k11 * k22)) for k11, k22 in variance_pairs for c in correlations]
    if with_zero:
        rows += [(k11, k22, 0.0) for k11, k22 in ZERO_VARIANCE]
    return rows


GRID = _grid(VARIANCE_PAIRS, CORRELATIONS)


@cache
def _reference_moments(name: str, rows: tuple) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(V, V', scale of V, scale of V') on the rows; scales are sqrt(E[phi(u)^2] E[phi(v)^2])."""
    spec = SPECS[name]
    value = np.array([ref_expect2(spec.f, spec.f, *r) for r in rows])
    scale = np.array(
        [
            math.sqrt(
                ref_expect1(lambda x: spec.f(x) ** 2, math.sqrt(k11))
                * ref_expect1(lambda x: spec.f(x) ** 2, math.sqrt(k22))
            )
            for k11, k22, _ in rows
        ]
    )
    if spec.d1 is None:
        return value, None, scale, None
    deriv = np.array([ref_expect2(spec.d1, spec.d1, *r) for r in rows])
    dscale = np.array(
        [
            math.sqrt(
                ref_expect1(lambda x: spec.d1(x) ** 2, math.sqrt(k11))
                * ref_expect1(lambda x: spec.d1(x) ** 2, math.sqrt(k22))
            )
            for k11, k22, _ in rows
        ]
    )
    return value, deriv, scale, dscale


def _package_moments(layer, rows, derivative=True):
    k = torch.tensor(rows, dtype=DTYPE)
    value, deriv = layer.pair_moments(k[:, 0], k[:, 1], k[:, 2], derivative)
    return value, deriv


def _scaled_error(got: torch.Tensor, ref: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """|got - ref| relative to the natural scale sqrt(E[phi(u)^2] E[phi(v)^2]) (and to |ref|, whichever is larger)."""
    got = got.detach().numpy()
    assert np.all(np.isfinite(got)), got
    return np.abs(got - ref) / np.maximum(np.maximum(scale, np.abs(ref)), 1e-300)


def _report(rows, err, mask=None):
    i = int(np.argmax(np.where(mask, err, -1) if mask is not None else err))
    return f"worst error {err[i]:.3g} at (k11, k22, k12) = {rows[i]}"


# ---------------------------------------------------------------------------------------------
# Values: closed forms to 1e-10, the zero-variance side exactly, never NaN.
# ---------------------------------------------------------------------------------------------

CLOSED_FORM_TOL = 1e-10  # observed <= ~2e-14; the reference is good to ~1e-13


def _is_kinked_zero_variance(spec, rows):
    return np.array([spec.kink_d1 is not None and (r[0] == 0 or r[1] == 0) for r in rows])


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_closed_form_pair_moments_match_integration(name):
    spec = SPECS[name]
    rows = tuple(GRID)
    ref_v, ref_d, scale, dscale = _reference_moments(name, rows)
    value, deriv = _package_moments(spec.make(), rows, derivative=True)
    err = _scaled_error(value, ref_v, scale)
    assert err.max() < CLOSED_FORM_TOL, _report(rows, err)
    # derivative=False gives the same V and no V'
    value_only, none = _package_moments(spec.make(), rows, derivative=False)
    assert none is None
    torch.testing.assert_close(value_only, value, rtol=0, atol=0)
    if spec.d1 is None:
        assert deriv is None, f"{name}: the derivative vanishes a.e., V' must be None"
        return
    assert deriv is not None
    # phi' is not defined at a kink; a zero-variance side sits exactly there (checked separately)
    kinked = _is_kinked_zero_variance(spec, rows)
    err = _scaled_error(deriv, ref_d, dscale)
    err = np.where(kinked, 0.0, err)
    assert err.max() < CLOSED_FORM_TOL, _report(rows, err)


@pytest.mark.parametrize("name", RELU_FAMILY)
def test_kinked_derivative_moment_at_zero_variance_uses_a_subgradient(name):
    # u == 0 exactly: V' = phi'(0) E[phi'(v)], and phi'(0) is only defined up to the
    # sub-differential [left, right].  The package must give a value inside that range
    # (it uses the midpoint), finite, never NaN; phi'(0) = midpoint for both at zero variance.
    spec = SPECS[name]
    left, right = spec.kink_d1
    for k11, k22 in ZERO_VARIANCE:
        _, deriv = _package_moments(spec.make(), [(k11, k22, 0.0)])
        got = float(deriv[0])
        assert math.isfinite(got)
        other = k22 if k11 == 0 else k11
        if other == 0:
            candidates = [left * left, right * right, left * right]
        else:
            mean_d = ref_expect1(spec.d1, math.sqrt(other))
            candidates = [left * mean_d, right * mean_d]
        assert min(candidates) - 1e-12 <= got <= max(candidates) + 1e-12, (k11, k22, got, candidates)


@pytest.mark.parametrize("name", list(SPECS))
def test_self_moment_matches_integration(name):
    spec = SPECS[name]
    variances = [0.0, 0.05, 0.3, 1.0, 3.0, 10.0]
    got = spec.make().self_moment(torch.tensor(variances, dtype=DTYPE)).detach().numpy()
    assert np.all(np.isfinite(got))
    for k, g in zip(variances, got):
        if k == 0:
            ref = float(spec.f(np.zeros(1))[0] ** 2)
        else:
            ref = ref_expect1(lambda x: spec.f(x) ** 2, math.sqrt(k))
        if spec.quadrature:
            if k > ACCURATE_1E8_UP_TO[name]:
                continue  # outside the 1e-8 regime of the rule: see the quadrature tests below
            tol = QUADRATURE_TOL
        else:
            tol = CLOSED_FORM_TOL
        assert abs(g - ref) <= tol * max(abs(ref), 1e-300) + 1e-300, (k, g, ref)
    # consistent with the pair moment on the diagonal
    k = torch.tensor(variances, dtype=DTYPE)
    diag, _ = spec.make().pair_moments(k, k, k, False)
    torch.testing.assert_close(diag, torch.as_tensor(got), rtol=1e-12, atol=1e-14)


def test_pair_moments_broadcast_over_kernel_matrix_shapes():
    # var1 (N1, 1), var2 (1, N2) against cross (N1, N2), as in a kernel matrix
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 3, generator=g, dtype=DTYPE), torch.randn(5, 3, generator=g, dtype=DTYPE)
    cross = x1 @ x2.T / 3
    v1, v2 = (x1 * x1).sum(-1, keepdim=True) / 3, (x2 * x2).sum(-1, keepdim=True).T / 3
    for name, spec in SPECS.items():
        layer = spec.make()
        value, deriv = layer.pair_moments(v1, v2, cross, True)
        full = [t.expand(4, 5).reshape(-1) for t in (v1, v2, cross)]
        value_flat, deriv_flat = layer.pair_moments(*full, True)
        torch.testing.assert_close(value.reshape(-1), value_flat, rtol=1e-12, atol=1e-14, msg=name)
        if deriv is not None:
            torch.testing.assert_close(deriv.reshape(-1), deriv_flat, rtol=1e-12, atol=1e-14, msg=name)


# ---------------------------------------------------------------------------------------------
# Quadrature nonlinearities (tanh, sigmoid, SiLU, softplus): accuracy of the default rule.
# ---------------------------------------------------------------------------------------------

# Largest pre-activation variance (of the grid 0.05 .. 10) for which the default rule is
# accurate to 1e-8 (error relative to sqrt(E[phi(u)^2] E[phi(v)^2]), over all correlations
# including +-1, for V and V'), as measured against the reference.  The functions have complex
# poles or branch points (tanh at +-i pi/2, sigmoid/SiLU/softplus at +-i pi); in z = u / sqrt(k)
# they approach the real axis like 1/sqrt(k), so the rule needs more points as k grows.  Measured
# with the default 96 points: tanh 3e-10 (V') at k = 3, but 1e-7 at k = 5 and 7e-5 at k = 10.
# Mish's poles are at log(sqrt(2)) +- 3i pi/4: 4e-9 (V') at k = 10.  ELU (panels split at its kink): 1e-13.
ACCURATE_1E8_UP_TO = {"tanh": 3.0, "sigmoid": 10.0, "silu": 10.0, "softplus": 10.0, "elu": 10.0, "mish": 10.0}
QUADRATURE_TOL = 1e-8


def _quadrature_grid(max_variance):
    pairs = [(k11, k22) for k11, k22 in VARIANCE_PAIRS + [(0.3, 0.3), (1.0, 2.0), (2.0, 2.0)]]
    pairs = [p for p in pairs if max(p) <= max_variance]
    rows = _grid(pairs, CORRELATIONS, with_zero=False)
    rows += [(0.0, max_variance, 0.0), (max_variance, 0.0, 0.0), (0.0, 0.0, 0.0)]
    return tuple(rows)


@pytest.mark.parametrize("name", QUADRATURE)
def test_quadrature_pair_moments_accurate_in_their_regime(name):
    spec = SPECS[name]
    rows = _quadrature_grid(ACCURATE_1E8_UP_TO[name])
    ref_v, ref_d, scale, dscale = _reference_moments(name, rows)
    value, deriv = _package_moments(spec.make(), rows)
    err_v = _scaled_error(value, ref_v, scale)
    err_d = _scaled_error(deriv, ref_d, dscale)
    assert err_v.max() < QUADRATURE_TOL, "V: " + _report(rows, err_v)
    assert err_d.max() < QUADRATURE_TOL, "V': " + _report(rows, err_d)


def test_tanh_outside_its_1e8_regime_is_still_accurate_to_1e4():
    # k up to 10 with the default rule: measured 7e-7 (V) and 7e-5 (V', at c = +-1).
    rows = _quadrature_grid(10.0)
    ref_v, ref_d, scale, dscale = _reference_moments("tanh", rows)
    value, deriv = _package_moments(Tanh(), rows)
    assert _scaled_error(value, ref_v, scale).max() < 5e-6
    assert _scaled_error(deriv, ref_d, dscale).max() < 5e-4


@pytest.mark.parametrize("name", QUADRATURE)
def test_quadrature_converges_with_more_points(name):
    # At variance 10 the error must fall steadily with the number of points.
    spec = SPECS[name]
    rows = tuple((10.0, 10.0, c * 10.0) for c in (0.5, 1.0)) + ((3.0, 10.0, 0.9 * math.sqrt(30.0)),)
    ref_v, ref_d, scale, dscale = _reference_moments(name, rows)
    previous = None
    for q in (32, 64, 128):
        value, deriv = _package_moments(type(spec.make())(num_quadrature_points=q), rows)
        err = max(_scaled_error(value, ref_v, scale).max(), _scaled_error(deriv, ref_d, dscale).max())
        if previous is not None and previous > 1e-12:
            assert err < previous / 3, (q, err, previous)
        previous = err


# The accuracy table of Elementwise's docstring: relative error of V for tanh, both variances
# k, correlation 0.5 - 0.99 (checked to within a factor 3, or the reference's 1e-13).
TANH_DOCSTRING_TABLE = [
    (64, 1.0, 5e-14),
    (64, 3.0, 3e-8),
    (64, 10.0, 6e-5),
    (96, 1.0, 1e-15),
    (96, 3.0, 5e-13),
    (96, 10.0, 2e-7),
    (128, 1.0, 1e-15),
    (128, 3.0, 6e-16),
    (128, 10.0, 5e-10),
]


@pytest.mark.parametrize("points, k, claimed", TANH_DOCSTRING_TABLE)
def test_elementwise_docstring_accuracy_table(points, k, claimed):
    rows = tuple((k, k, c * k) for c in (0.5, 0.7, 0.9, 0.99))
    ref_v, _, _, _ = _reference_moments("tanh", rows)
    value, _ = _package_moments(Tanh(num_quadrature_points=points), rows)
    err = np.abs(value.numpy() - ref_v) / np.abs(ref_v)
    assert err.max() <= max(3 * claimed, 1e-13), err


def test_elementwise_docstring_third_derivative_claim():
    # "at k = 4 the third-derivative moments reach 2e-7 with 96 points, 1e-3 with 64";
    # E[tanh'''(u) tanh'(v)] = 2 dV'/dk11 (Price).  Measured: 2e-7 (c <= 0.9), 5e-7 at c = 0.99
    # and 1.2e-6 at c = 1 with 96 points; 6e-4 .. 1.7e-3 with 64.
    spec = SPECS["tanh"]
    for points, bound in ((96, 6e-7), (64, 3e-3)):
        for c in (0.0, 0.5, 0.9):
            k11 = torch.tensor(4.0, dtype=DTYPE, requires_grad=True)
            _, deriv = Tanh(points).pair_moments(
                k11, torch.tensor(4.0, dtype=DTYPE), torch.tensor(4 * c, dtype=DTYPE), True
            )
            (g,) = torch.autograd.grad(deriv, k11)
            ref = ref_expect2(spec.d3, spec.d1, 4.0, 4.0, 4.0 * c)
            assert abs(2 * g.item() - ref) <= bound * abs(ref), (points, c, 2 * g.item(), ref)


# ---------------------------------------------------------------------------------------------
# Gradients of the moments.
# ---------------------------------------------------------------------------------------------


def _variance_cap(name):
    """Variances used in gradient checks: in the 1e-8 regime of the quadrature rule."""
    return ACCURATE_1E8_UP_TO.get(name, 2.0)


def _moments_fn(layer):
    def fn(k11, k22, k12):
        value, deriv = layer.pair_moments(k11, k22, k12, True)
        return value if deriv is None else (value, deriv)

    return fn


@pytest.mark.parametrize("name", list(SPECS))
def test_gradcheck_pair_moments_in_the_interior(name):
    cap = _variance_cap(name)
    k11 = torch.tensor([0.5, 1.0, 0.25, 0.8], dtype=DTYPE) * cap / 2
    k22 = torch.tensor([1.7, 0.4, 0.25, 0.8], dtype=DTYPE) * cap / 2
    c = torch.tensor([0.3, -0.6, 0.9, -0.95], dtype=DTYPE)
    if SPECS[name].quadrature:  # (slow: two covariances)
        k11, k22, c = k11[1:3], k22[1:3], c[1:3]
    k12 = c * torch.sqrt(k11 * k22)
    inputs = tuple(t.clone().requires_grad_(True) for t in (k11, k22, k12))
    assert torch.autograd.gradcheck(_moments_fn(SPECS[name].make()), inputs)


def _exact_extreme_points(name):
    """Covariances with correlation exactly +-1 in floating point (square roots exact)."""
    cap = _variance_cap(name)
    if cap < 0.5:
        pairs = [(0.25, 0.0625), (0.0625, 0.25), (0.25, 0.25)]
    elif SPECS[name].quadrature:
        pairs = [(0.25, 0.5625), (1.0, 1.0), (0.25, 1.0)]
    else:
        pairs = [(0.25, 0.5625), (1.0, 1.0), (2.25, 1.0)]
    return [(k11, k22, sign * math.sqrt(k11 * k22)) for k11, k22 in pairs for sign in (1.0, -1.0)]


def _grads(layer, k11, k22, k12, which):
    k = [torch.tensor(v, dtype=DTYPE, requires_grad=True) for v in (k11, k22, k12)]
    value, deriv = layer.pair_moments(*k, True)
    out = value if which == 0 else deriv
    return [g.item() for g in torch.autograd.grad(out, k)]


@pytest.mark.parametrize("name", list(SPECS))
def test_gradients_at_correlation_one_follow_price_theorem(name):
    # At c = +-1: dV/dk12 = E[phi'(u) phi'(v)], dV/dk11 = E[phi''(u) phi(v)] / 2,
    # dV/dk22 = E[phi(u) phi''(v)] / 2; the same one order up for V'.
    spec = SPECS[name]
    layer = spec.make()
    tol = 1e-9 if not spec.quadrature else 1e-7
    for k11, k22, k12 in _exact_extreme_points(name):
        g11, g22, g12 = _grads(layer, k11, k22, k12, 0)
        assert all(math.isfinite(g) for g in (g11, g22, g12)), (k11, k22, k12)
        if spec.d1 is None:
            continue  # step/sign: E[delta delta] is infinite at c = +-1; see the manifold test
        e12 = ref_expect2(spec.d1, spec.d1, k11, k22, k12)
        if spec.relu_family_slope is not None:
            # phi'' = (1 - a) delta(u); at c = +-1, v = 0 when u = 0 and phi(0) = 0.
            e11 = e22 = 0.0
        else:
            e11 = ref_expect2(spec.d2, spec.f, k11, k22, k12) / 2
            e22 = ref_expect2(spec.f, spec.d2, k11, k22, k12) / 2
        for got, want, label in ((g12, e12, "dV/dk12"), (g11, e11, "dV/dk11"), (g22, e22, "dV/dk22")):
            assert got == pytest.approx(want, rel=tol, abs=tol), (label, k11, k22, k12)
        if spec.d2 is None or spec.d3 is None:
            continue  # relu family: dV'/dk12 = E[delta delta] is infinite at c = +-1; elu: no d3 (a delta)
        g11, g22, g12 = _grads(layer, k11, k22, k12, 1)
        e12 = ref_expect2(spec.d2, spec.d2, k11, k22, k12)
        e11 = ref_expect2(spec.d3, spec.d1, k11, k22, k12) / 2
        e22 = ref_expect2(spec.d1, spec.d3, k11, k22, k12) / 2
        for got, want, label in ((g12, e12, "dV'/dk12"), (g11, e11, "dV'/dk11"), (g22, e22, "dV'/dk22")):
            assert got == pytest.approx(want, rel=tol, abs=tol), (label, k11, k22, k12)


@pytest.mark.parametrize("name", list(SPECS))
def test_derivative_along_the_correlation_one_manifold_matches_finite_differences(name):
    # Every path that stays at |c| = 1 (the diagonal of K(X, X) under any change of the
    # hyperparameters, duplicated inputs) must get the right derivative, also where single
    # components are infinite (arc-cosine J0, step, sign).  Points include k11 = k22 = k12
    # stored as the same float, the case of every kernel diagonal.
    spec = SPECS[name]
    layer = spec.make()
    points = _exact_extreme_points(name) + [(v, v, v) for v in (0.1, 0.3)]
    alpha, beta = 0.7, -0.4  # log-rates of k11, k22 along the path

    def path(t, k11, k22, sign):
        a, b = k11 * math.exp(alpha * t), k22 * math.exp(beta * t)
        return a, b, sign * math.sqrt(a * b)

    h = 1e-5
    for k11, k22, k12 in points:
        sign = math.copysign(1.0, k12)
        tangent = (alpha * k11, beta * k22, k12 * (alpha + beta) / 2)
        for which in (0, 1):
            if which == 1 and spec.d1 is None:
                continue
            g = _grads(layer, k11, k22, k12, which)
            assert all(math.isfinite(x) for x in g), (which, k11, k22, k12, g)
            along = sum(gi * ti for gi, ti in zip(g, tangent))

            def value(t, k11=k11, k22=k22, sign=sign, which=which):
                v, d = layer.pair_moments(*(torch.tensor(x, dtype=DTYPE) for x in path(t, k11, k22, sign)), True)
                return float(v if which == 0 else d)

            fd = (value(h) - value(-h)) / (2 * h)
            assert along == pytest.approx(fd, rel=1e-6, abs=1e-8), (which, k11, k22, k12, along, fd)


# ---------------------------------------------------------------------------------------------
# Gradients through whole kernels.
# ---------------------------------------------------------------------------------------------


def _inputs_with_duplicates(scale=1.0):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=DTYPE)
    x[3] = 2.5 * x[3]  # a different norm
    return scale * torch.cat([x, x[1:2]])  # row 5 duplicates row 1


# Quadrature layers: keep tanh's pre-activation variances (~5 here, instead of ~20) where the
# default rule is accurate for the derivative moments the gradients need, so that the checks
# below are about the gradient code, not the rule's accuracy (at full scale the tanh NTK's
# hyperparameter gradients disagree with finite differences by 3e-2).
def _input_scale(name):
    return 0.5 if name == "tanh" else 1.0


def _kernel(name, kind, depth=2):
    layer = SPECS[name].make()
    return MLPKernel(depth=depth, nonlinearity=layer, kind=kind, weight_variance=1.7, bias_variance=0.15).double()


# Kernels that are not differentiable in x at duplicated points: the correlation of the pair
# is 1 - O(|dx|^2) and enters through sqrt(1 - c) = O(|dx|) (arc-cosine J0 in the NTK of the
# ReLU family, and V itself for step/sign).  The package returns the symmetric sub-gradient
# (finite), the limit of central differences; those converge only like O(h) for one such
# layer, and like O(sqrt(h)) once two are stacked, so step/sign use depth 1 for that check.
def _kinked_in_x(name, kind):
    return name in ("step", "sign") or (kind == "ntk" and name in RELU_FAMILY)


def _central_difference(fn, x, index, h):
    xp, xm = x.clone(), x.clone()
    xp[index] += h
    xm[index] -= h
    return (fn(xp) - fn(xm)) / (2 * h)


def _parameter_differences(kernel, x, params=None, h=1e-5):
    """Central differences of sum K(x, x) in each raw hyperparameter (or those in ``params``)."""
    out = []
    with torch.no_grad():
        for p in kernel.parameters() if params is None else params:
            p += h
            up = kernel(x).to_dense().sum()
            p -= 2 * h
            down = kernel(x).to_dense().sum()
            p += h
            out.append((up - down) / (2 * h))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("name", list(SPECS))
def test_kernel_gradients_finite_and_match_finite_differences(name, kind):
    x = _inputs_with_duplicates(_input_scale(name))
    tol = 1e-6

    # hyperparameters: pairs at correlation one stay there, so the kernel is smooth
    depth = 2 if SPECS[name].quadrature else 3  # (quadrature layers are slow)
    kernel = _kernel(name, kind, depth=depth)
    params = list(kernel.parameters())
    assert len(params) == 2 * (depth + 1)
    grads = torch.stack(torch.autograd.grad(kernel(x).to_dense().sum(), params))
    assert torch.isfinite(grads).all()
    if SPECS[name].quadrature:  # (slow: the first layer's variances, whose gradients go through both layers)
        params, grads = params[:2], grads[:2]
    fd = _parameter_differences(kernel, x, params)
    err = ((grads - fd).abs() / fd.abs().clamp(min=1.0)).max().item()
    assert err < tol, (grads, fd)

    # inputs: K(X, X) (same inputs) and K(X, X') with X' an equal copy (so x1 is not x2)
    kinked = _kinked_in_x(name, kind)
    kernel = _kernel(name, kind, depth=1 if name in ("step", "sign") else 2)
    rows = (5,) if SPECS[name].quadrature else (1, 3, 5)  # duplicated pair (1, 5), different norm (3)
    # (quadrature layers are slow: only K(X, X) for them)
    for second in (None,) if SPECS[name].quadrature else (None, x.clone()):
        xg = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(kernel(xg, second).to_dense().sum(), xg)
        assert torch.isfinite(gx).all()
        with torch.no_grad():

            def total(xa, second=second):
                return kernel(xa, second).to_dense().sum()

            fd = torch.stack(
                [_central_difference(total, x, (i, j), 1e-4 if kinked else 1e-5) for i in rows for j in range(3)]
            )
        got = gx[list(rows)].reshape(-1)
        err = (got - fd).abs().max().item() / fd.abs().max().item()
        assert err < (1e-4 if kinked else tol), (second is None, err)


def test_duplicated_inputs_give_identical_kernel_rows():
    # Identical inputs have correlation exactly one at every layer.  Round-off that puts it a
    # few ulps below one must not be magnified by arccos (~sqrt(ulp) per layer, compounding
    # through stacked step/sign layers to ~1e-2 at depth 4): rows of duplicates must agree.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 7, generator=g, dtype=DTYPE)
    for _ in range(6):
        scale = 0.5 + torch.rand((), generator=g, dtype=DTYPE).item() * 2
        x = torch.cat([base, base[[0, 3]]]) * scale
        wv = 0.8 + torch.rand((), generator=g, dtype=DTYPE).item() * 2
        for name in ("step", "sign", "relu", "abs", "leaky_relu_0.2", "erf", "gelu"):
            for kind in ("nngp", "ntk"):
                kernel = MLPKernel(depth=4, nonlinearity=SPECS[name].make(), kind=kind, weight_variance=wv)
                with torch.no_grad():
                    K = kernel.double()(x).to_dense()
                for dup, orig in ((6, 0), (7, 3)):
                    torch.testing.assert_close(K[dup], K[orig], rtol=1e-12, atol=0, msg=f"{name} {kind}")
                    torch.testing.assert_close(K[dup, orig], K[orig, orig], rtol=1e-12, atol=0)


class _Projected(torch.nn.Module):
    """Three random projections of the kernel matrix (keeps gradcheck's Jacobian small)."""

    def __init__(self, kernel, x):
        super().__init__()
        self.kernel = kernel
        self.x = x
        n = x.shape[0]
        self.weights = torch.randn(n * n, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)

    def forward(self):
        return self.kernel(self.x).to_dense().reshape(-1) @ self.weights


@pytest.mark.parametrize(
    "name, kind",
    [(n, k) for n in ("relu", "abs", "erf", "gelu", "cos", "step") for k in ("nngp", "ntk")]
    + [("tanh", "nngp"), ("softplus", "ntk")],
)
def test_gradcheck_kernel_hyperparameters(name, kind):
    kernel = _kernel(name, kind, depth=2 if SPECS[name].quadrature else 3)
    x = _inputs_with_duplicates(_input_scale(name))
    if SPECS[name].quadrature:  # (slow: the duplicated pair and the point of a different norm)
        x = x[[1, 3, 5]]
    module = _Projected(kernel, x)
    names = [n for n, _ in module.named_parameters()]
    raw = tuple(p.detach().clone().requires_grad_(True) for _, p in module.named_parameters())

    def fn(*values):
        return torch.func.functional_call(module, dict(zip(names, values)), ())

    assert torch.autograd.gradcheck(fn, raw)


# A typical tanh NTK with the default rule: the Price-theorem gradients integrate phi'' and
# phi''' (less accurate than the values; with the former default of 32 Gauss-Hermite points the
# first weight variance's gradient has the wrong sign here: +2.2 vs -1.6).  Measured: 6e-7.
def test_quadrature_gradients_consistent_with_values_in_a_typical_tanh_ntk():
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=DTYPE)[:8]
    kernel = MLPKernel(depth=3, nonlinearity="tanh", kind="ntk", weight_variance=2.0).double()
    params = list(kernel.parameters())[:2]  # the first layer's: their gradients go through every layer
    grads = torch.stack(torch.autograd.grad(kernel(x).to_dense().sum(), params))
    fd = _parameter_differences(kernel, x, params)
    assert ((grads - fd).abs() / fd.abs()).max().item() < 1e-4, (grads, fd)


def test_tanh_expansion_moments_match_integration():
    """Tanh's default closed form (six erf terms): V, V' and the self moment against the independent integrator."""
    from gpytorch_tp.tanh_moments import TANH_DERIVATIVE_PAIR_MOMENT_ERROR, TANH_PAIR_MOMENT_ERROR

    rows = _grid(VARIANCE_PAIRS + [(40.0, 0.01), (200.0, 150.0)], CORRELATIONS)
    k11, k22, k12 = (torch.tensor(column, dtype=DTYPE) for column in zip(*rows))
    layer = Tanh()
    value, derivative = layer.pair_moments(k11, k22, k12, True)
    reference = np.array([ref_expect2(np.tanh, np.tanh, *row) for row in rows])
    reference_d = np.array([ref_expect2(_tanh_d, _tanh_d, *row) for row in rows])
    error = np.abs(value.numpy() - reference)
    error_d = np.abs(derivative.numpy() - reference_d)
    assert error.max() < TANH_PAIR_MOMENT_ERROR, rows[int(error.argmax())]
    assert error_d.max() < TANH_DERIVATIVE_PAIR_MOMENT_ERROR, rows[int(error_d.argmax())]
    variances = torch.tensor([0.0, 0.05, 1.0, 10.0, 200.0], dtype=DTYPE)
    self_reference = np.array([ref_expect1(lambda z: np.tanh(z) ** 2, math.sqrt(v)) for v in variances.tolist()])
    assert np.abs(layer.self_moment(variances).numpy() - self_reference).max() < TANH_PAIR_MOMENT_ERROR
    # Symmetric in the two variables up to rounding.
    swapped, swapped_d = layer.pair_moments(k22, k11, k12, True)
    assert torch.allclose(value, swapped, rtol=0, atol=1e-15)
    assert torch.allclose(derivative, swapped_d, rtol=0, atol=1e-15)


def test_sigmoid_expansion_moments_match_integration():
    """Sigmoid's default closed form (tanh's erf expansion at half the argument) against the integrator."""
    rows = _grid(VARIANCE_PAIRS + [(40.0, 0.01), (200.0, 150.0)], CORRELATIONS)
    k11, k22, k12 = (torch.tensor(column, dtype=DTYPE) for column in zip(*rows))
    value, derivative = Sigmoid().pair_moments(k11, k22, k12, True)
    reference = np.array([ref_expect2(special.expit, special.expit, *row) for row in rows])
    reference_d = np.array([ref_expect2(_sig_d, _sig_d, *row) for row in rows])
    assert np.abs(value.numpy() - reference).max() < 2.5e-7
    assert np.abs(derivative.numpy() - reference_d).max() < 1.3e-7


def test_tanh_expansion_agrees_with_fine_quadrature_in_a_deep_ntk_and_has_exact_gradients():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    x[5] = x[2]  # a duplicate: correlation one off the diagonal too
    closed = MLPKernel(depth=3, nonlinearity="tanh", kind="ntk", weight_variance=2.0).double()
    fine = MLPKernel(depth=3, nonlinearity=Tanh(num_quadrature_points=256), kind="ntk", weight_variance=2.0).double()
    with torch.no_grad():
        k_closed, k_fine = closed(x).to_dense(), fine(x).to_dense()
    assert ((k_closed - k_fine).norm() / k_fine.norm()).item() < 1e-7  # measured 1e-8
    # The closed form is smooth: gradcheck of the hyperparameters through the whole NTK, duplicates included.
    module = _Projected(closed, x[[1, 2, 5]])
    names = [n for n, _ in module.named_parameters()]
    raw = tuple(p.detach().clone().requires_grad_(True) for _, p in module.named_parameters())
    assert torch.autograd.gradcheck(lambda *v: torch.func.functional_call(module, dict(zip(names, v)), ()), raw)


@pytest.mark.parametrize("outputs", ["j1", "j0", "both"])
@pytest.mark.parametrize("per_item", [True, False])
def test_arccos_moments_backward_matches_finite_differences(outputs, per_item):
    """The hand-written backward of the ReLU moments, for per-item or full-size variances and either output."""
    from gpytorch_tp.numerics import arccos_moments

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    b = torch.randn(5, 3, generator=gen, dtype=DTYPE)
    k11 = (a * a).sum(-1, keepdim=True) + 0.1  # (4, 1)
    k22 = ((b * b).sum(-1) + 0.1)[None, :]  # (1, 5)
    k12 = a @ b.T + 0.1  # a Gram matrix of (a, sqrt(0.1)) and (b, sqrt(0.1)): correlations inside (-1, 1)
    if not per_item:
        k11, k22 = k11.expand(4, 5).clone(), k22.expand(4, 5).clone()
    weights = torch.randn(2, 4, 5, generator=gen, dtype=DTYPE)

    def fn(k11, k22, k12):
        j1, j0 = arccos_moments(k11, k22, k12)
        terms = {"j1": [j1 * weights[0]], "j0": [j0 * weights[1]], "both": [j1 * weights[0], j0 * weights[1]]}
        return sum(t.sum() for t in terms[outputs])

    inputs = tuple(t.detach().requires_grad_(True) for t in (k11, k22, k12))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("order", [0, 1])
def test_tanh_moments_backward_matches_finite_differences(order):
    """The analytic backward of the tanh closed forms, per-item variances against a matrix of pairs."""
    from gpytorch_tp.tanh_moments import tanh_derivative_pair_moment, tanh_pair_moment

    gen = torch.Generator().manual_seed(5)
    a = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    b = torch.randn(5, 3, generator=gen, dtype=DTYPE)
    k11 = (a * a).sum(-1, keepdim=True) + 0.1
    k22 = ((b * b).sum(-1) + 0.1)[None, :]
    k12 = a @ b.T + 0.1
    k12[0, 0] = (k11[0, 0] * k22[0, 0]).sqrt() * 0.999999  # nearly correlation one: still smooth
    fn = tanh_pair_moment if order == 0 else tanh_derivative_pair_moment
    inputs = tuple(t.detach().requires_grad_(True) for t in (k11, k22, k12))
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# ELU with alpha != 1: phi itself kinks at 0 (phi'' holds (1 - alpha) delta), as the ReLU family.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_elu_alpha_moments_and_gradients(alpha):
    layer = ELU(alpha)
    f, d1 = _elu(alpha), _elu_d(alpha)
    rows = _quadrature_grid(10.0)
    value, deriv = _package_moments(layer, rows)
    for got, g in ((value, f), (deriv, d1)):
        ref = np.array([ref_expect2(g, g, *r) for r in rows])
        scale = np.array([math.sqrt(ref_expect2(g, g, k, k, k) * ref_expect2(g, g, m, m, m)) for k, m, _ in rows])
        err = _scaled_error(got, ref, scale)
        assert err.max() < 1e-10, _report(rows, err)
    # gradients in the interior (delta terms of Price's theorem included) ...
    k11, k22 = torch.tensor([1.0, 0.3], dtype=DTYPE), torch.tensor([0.4, 2.0], dtype=DTYPE)
    k12 = torch.tensor([-0.6, 0.9], dtype=DTYPE) * torch.sqrt(k11 * k22)
    inputs = tuple(t.clone().requires_grad_(True) for t in (k11, k22, k12))
    assert torch.autograd.gradcheck(_moments_fn(layer), inputs)
    # ... and at |c| = 1: finite, dV/dk12 = E[phi' phi'], and along the manifold as finite differences.
    for k11, k22, k12 in [(0.25, 1.0, 0.5), (1.0, 1.0, -1.0)]:
        for which in (0, 1):
            g = _grads(layer, k11, k22, k12, which)
            assert all(math.isfinite(x) for x in g), (which, g)
            if which == 0:
                assert g[2] == pytest.approx(ref_expect2(d1, d1, k11, k22, k12), rel=1e-9)
            h, rate = 1e-5, (0.7, -0.4)

            def value_at(t, which=which, k11=k11, k22=k22, k12=k12):
                a, b = k11 * math.exp(rate[0] * t), k22 * math.exp(rate[1] * t)
                ks = (torch.tensor(x, dtype=DTYPE) for x in (a, b, math.copysign(math.sqrt(a * b), k12)))
                return float(layer.pair_moments(*ks, True)[which])

            along = g[0] * rate[0] * k11 + g[1] * rate[1] * k22 + g[2] * k12 * sum(rate) / 2
            fd = (value_at(h) - value_at(-h)) / (2 * h)
            assert along == pytest.approx(fd, rel=1e-6, abs=1e-8), (which, k11, k22, along, fd)


def test_elu_is_picklable_and_converts_alpha():
    import pickle

    layer = pickle.loads(pickle.dumps(ELU(0.3)))
    x = torch.linspace(-3, 3, 7, dtype=DTYPE)
    torch.testing.assert_close(layer.function(x), torch.nn.functional.elu(x, 0.3))
    with pytest.raises(ValueError, match="alpha must be finite"):
        ELU(float("nan"))


@pytest.mark.parametrize("make", [ELU, lambda: ELU(0.5), Mish], ids=["elu", "elu_0.5", "mish"])
def test_elu_and_mish_kernels_in_float32_and_batches(make):
    # float32 (its own truncation of the rule) against float64, on inputs with a batch shape.
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    for kind in ("nngp", "ntk"):
        kernel = MLPKernel(depth=2, nonlinearity=make(), kind=kind, weight_variance=1.7, bias_variance=0.1)
        k64 = kernel.double()(x).to_dense()
        k32 = kernel.float()(x.float()).to_dense()
        assert k32.dtype == torch.float32 and k64.shape == (2, 3, 5, 5)
        torch.testing.assert_close(k32.double(), k64, rtol=2e-5, atol=2e-6)
        # each batch entry is the kernel of its own inputs
        torch.testing.assert_close(k64[1, 2], kernel.double()(x[1, 2]).to_dense(), rtol=1e-12, atol=1e-14)
