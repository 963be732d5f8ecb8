"""Closed-form nonlinearity kernels at every pre-activation variance (issue 21, item 1).

Each closed form is compared, for pairs ``(k11, k22, k12)`` with variances from
1e-8 to 1e8 and correlations 1, 1 - 1e-7, 0.5, 0, -0.5, -(1 - 1e-7), -1 (equal
and unequal variances), against the textbook formula evaluated in mpmath at 50
digits on the exact floating-point inputs.  The textbook formulas cancel
catastrophically near correlation one at large variance (``(1 + 2a)(1 + 2b) -
4 r^2`` for erf, ``(1 + a)(1 + b) - r^2`` for GELU): harmless at 50 digits, NaN
or inf in float32/float64 before the fix.  The GELU formula itself is checked
against one-dimensional mpmath quadrature, so the references do not rest on
the formulas under test.
"""

from __future__ import annotations

import functools
import math

import mpmath
import pytest
import torch

from gpytorch_tp import MLPKernel
from gpytorch_tp.layers import GELU, Cos, Erf, Sigmoid, Sign, Sin, Step, Tanh
from gpytorch_tp.numerics import pair_determinant
from gpytorch_tp.tanh_moments import _TANH_AS_ERFS

DIGITS = 50

SCALES = [10.0**e for e in range(-8, 9, 2)]
# (variance of the first, variance of the second, correlation), before scaling.
SHAPES = [(1.0, 1.0, c) for c in (1.0, 1 - 1e-7, 0.5, 0.0, -0.5, -(1 - 1e-7), -1.0)] + [
    (1.0, 4.0, c) for c in (1.0, 1 - 1e-7, -0.5)
]

LAYERS = {
    "erf": Erf,
    "gelu": GELU,
    "tanh": Tanh,
    "sigmoid": Sigmoid,
    "sin": Sin,
    "cos": Cos,
    "sign": Sign,
    "step": Step,
}
# Relative tolerances; measured worst cases over the grid: values and derivative kernels 4e-14
# (float64) and 4e-6 (float32); gradients 8e-13 and 8e-4 (GELU, by autograd; the others 2e-15, 4e-6).
TOLERANCE = {torch.float64: 2e-13, torch.float32: 1e-5}
GRADIENT_TOLERANCE = {torch.float64: 1e-11, torch.float32: 3e-3}


def _pairs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid of pairs, rounded to ``dtype`` so that c = +-1 stays exactly +-1 (k12 = +-k11, or 2 k11 with 4 k11)."""
    k11, k22, k12 = [], [], []
    for scale in SCALES:
        for v1, v2, c in SHAPES:
            a = torch.tensor(scale * v1, dtype=dtype)
            b = torch.tensor(scale * v2, dtype=dtype) if v2 != v1 else a
            if abs(c) == 1.0:
                r = math.copysign(1.0, c) * (a if v1 == v2 else 2 * a)
            else:
                r = torch.tensor(c * math.sqrt(float(a) * float(b)), dtype=dtype)
            k11.append(a)
            k22.append(b)
            k12.append(torch.as_tensor(r, dtype=dtype))
    return torch.stack(k11), torch.stack(k22), torch.stack(k12)


# ----- mpmath references (textbook forms, evaluated on the exact floating-point inputs) -----


def _mp_erf(a, b, r):
    n = (1 + 2 * a) * (1 + 2 * b)
    return 2 / mpmath.pi * mpmath.asin(2 * r / mpmath.sqrt(n)), 4 / mpmath.pi / mpmath.sqrt(n - 4 * r * r)


def _mp_gelu(a, b, r):
    # The formula of GELU's docstring (Stein's lemma); checked against quadrature below.
    aa, bb = 1 + a, 1 + b
    d = aa * bb - r * r
    asin_rho = mpmath.asin(r / mpmath.sqrt(aa * bb))
    inv_sum = 1 / aa + 1 / bb
    two_pi = 2 * mpmath.pi
    value = r / 4 + r * asin_rho / two_pi + (a * b + r * r * (inv_sum - 1)) / (two_pi * mpmath.sqrt(d))
    derivative = mpmath.mpf(1) / 4 + asin_rho / two_pi + r * inv_sum / (two_pi * mpmath.sqrt(d)) + r / (two_pi * d**1.5)
    return value, derivative


def _mp_tanh(a, b, r):
    # The six-term erf expansion of tanh used by Tanh (its error against tanh is tested in
    # test_moments.py); here, the 36 Williams terms at 50 digits.
    coefficients = [(mpmath.mpf(s), mpmath.mpf(w)) for s, w in _TANH_AS_ERFS]
    value = derivative = mpmath.mpf(0)
    for sk, wk in coefficients:
        for sl, wl in coefficients:
            p, q = 1 + 2 * sk * sk * a, 1 + 2 * sl * sl * b
            value += wk * wl * 2 / mpmath.pi * mpmath.asin(2 * sk * sl * r / mpmath.sqrt(p * q))
            derivative += wk * sk * wl * sl * 4 / mpmath.pi / mpmath.sqrt(p * q - 4 * sk * sk * sl * sl * r * r)
    return value, derivative


def _mp_sigmoid(a, b, r):
    # sigmoid(x) = (1 + tanh(x / 2)) / 2.
    value, derivative = _mp_tanh(a / 4, b / 4, r / 4)
    return (1 + value) / 4, derivative / 16


def _mp_sin(a, b, r):
    scale = mpmath.exp(-(a + b) / 2)
    return scale * mpmath.sinh(r), scale * mpmath.cosh(r)


def _mp_cos(a, b, r):
    scale = mpmath.exp(-(a + b) / 2)
    return scale * mpmath.cosh(r), scale * mpmath.sinh(r)


def _snapped_correlation(a, b, r, dtype):
    # The library's convention for the arc-cosine family (numerics.arccos_moments): correlations
    # within 8 ulps of +-1 are +-1 (copies of a point must not be told apart by round-off).
    c = r / mpmath.sqrt(a * b)
    return mpmath.sign(c) if 1 - abs(c) <= 8 * torch.finfo(dtype).eps else c


def _mp_sign(a, b, r, dtype=torch.float64):
    return 2 / mpmath.pi * mpmath.asin(_snapped_correlation(a, b, r, dtype)), None


def _mp_step(a, b, r, dtype=torch.float64):
    return mpmath.mpf(1) / 4 + mpmath.asin(_snapped_correlation(a, b, r, dtype)) / (2 * mpmath.pi), None


REFERENCES = {
    "erf": _mp_erf,
    "gelu": _mp_gelu,
    "tanh": _mp_tanh,
    "sigmoid": _mp_sigmoid,
    "sin": _mp_sin,
    "cos": _mp_cos,
    "sign": _mp_sign,
    "step": _mp_step,
}


SNAPPED = ("sign", "step")


@functools.lru_cache(maxsize=None)
def _reference(name: str, dtype: torch.dtype) -> tuple[list, list | None]:
    """``(V, V')`` of every grid pair at 50 digits (computed once per session)."""
    values, derivatives = [], []
    with mpmath.workdps(DIGITS):
        for a, b, r in zip(*(t.tolist() for t in _pairs(dtype))):
            a, b, r = mpmath.mpf(a), mpmath.mpf(b), mpmath.mpf(r)
            assert a * b - r * r >= 0, "the grid must hold valid covariances"
            value, derivative = REFERENCES[name](a, b, r, dtype) if name in SNAPPED else REFERENCES[name](a, b, r)
            values.append(value)
            derivatives.append(derivative)
    return values, None if derivatives[0] is None else derivatives


def _worst_relative_error(
    got: torch.Tensor, reference: list, dtype: torch.dtype, floor: float | None = None
) -> tuple[float, int]:
    """Largest ``|got - ref| / max(|ref|, floor)``; ``floor`` defaults to the dtype's smallest normal number."""
    tiny = torch.finfo(dtype).tiny
    floor = tiny if floor is None else floor
    errors = []
    for x, ref in zip(got.tolist(), reference):
        ref = float(ref) if abs(ref) >= tiny else 0.0
        scale = max(abs(ref), floor)
        errors.append(abs(x - ref) / scale)
    worst = max(range(len(errors)), key=errors.__getitem__)
    return errors[worst], worst


def _describe(index: int, dtype: torch.dtype) -> str:
    k11, k22, k12 = (t[index].item() for t in _pairs(dtype))
    return f"(k11, k22, k12) = ({k11:.6g}, {k22:.6g}, {k12:.9g})"


# ----- the tests -----


def test_gelu_reference_formula_matches_quadrature():
    """The textbook GELU formula used as reference agrees with 1-D quadrature of E[gelu(u) E[gelu(v) | u]]."""

    def gelu(x):
        return x * mpmath.ncdf(x)

    def conditional(mu, var):  # E[gelu(v)], E[gelu'(v)] for v ~ N(mu, var)
        s = mpmath.sqrt(1 + var)
        density = mpmath.npdf(mu / s) / s
        return mu * mpmath.ncdf(mu / s) + var * density, mpmath.ncdf(mu / s) + mu * density / (1 + var)

    with mpmath.workdps(20):
        for a, b, r in [(3.0, 3.0, -3.0), (1.0, 4.0, 2.0), (40.0, 30.0, -34.0)]:
            a, b, r = mpmath.mpf(a), mpmath.mpf(b), mpmath.mpf(r)
            var = b - r * r / a

            def integrand(z, order):
                u = mpmath.sqrt(a) * z
                given = conditional(r * u / a, var)
                first = gelu(u) if order == 0 else mpmath.ncdf(u) + u * mpmath.npdf(u)
                return first * given[order] * mpmath.npdf(z)  # |z| > 10 adds below 1e-22


            value = mpmath.quad(lambda z: integrand(z, 0), [-10, 0, 10])
            derivative = mpmath.quad(lambda z: integrand(z, 1), [-10, 0, 10])
            formula = _mp_gelu(a, b, r)
            assert abs(formula[0] - value) <= 1e-15 * abs(value)
            assert abs(formula[1] - derivative) <= 1e-15 * abs(derivative)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_closed_form_matches_high_precision_at_every_scale(name, dtype):
    k11, k22, k12 = _pairs(dtype)
    value, derivative = LAYERS[name]().pair_moments(k11, k22, k12, True)
    reference_value, reference_derivative = _reference(name, dtype)
    tol = TOLERANCE[dtype]
    floor = None
    if name in SNAPPED:
        # Functions of the correlation only, bounded by 1, on the arc-cosine path shared with ReLU
        # (unchanged: scale-free): 1/4 + arcsin(c) / 2 pi rounds at eps absolutely (c = -1 gives
        # 6e-18, not 0), and arcsin magnifies the correlation's round-off near +-1 (3e-12 at
        # 1 - 1e-7 in float64).  Absolute errors, against the bound 1.
        floor, tol = 1.0, max(tol, 1e-11)
    assert torch.isfinite(value).all()
    error, worst = _worst_relative_error(value, reference_value, dtype, floor)
    assert error <= tol, f"V of {name}: relative error {error:.2e} at {_describe(worst, dtype)}"
    if reference_derivative is None:
        assert derivative is None
        return
    assert torch.isfinite(derivative).all()
    error, worst = _worst_relative_error(derivative, reference_derivative, dtype)
    assert error <= tol, f"V' of {name}: relative error {error:.2e} at {_describe(worst, dtype)}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["erf", "gelu", "tanh", "sigmoid", "sin", "cos"])
def test_gradient_in_the_cross_covariance_is_the_derivative_kernel(name, dtype):
    """Price's theorem, dV/dk12 = V', by autograd at every grid pair, correlation one included; all gradients finite."""
    k11, k22, k12 = (t.clone().requires_grad_(True) for t in _pairs(dtype))
    value, _ = LAYERS[name]().pair_moments(k11, k22, k12, False)
    g11, g22, g12 = torch.autograd.grad(value.sum(), (k11, k22, k12))
    assert all(torch.isfinite(g).all() for g in (g11, g22, g12))
    _, reference_derivative = _reference(name, dtype)
    # GELU's gradient is autograd's: its terms cancel to O(1) out of O(k) at correlation one.
    tol = GRADIENT_TOLERANCE[dtype] if name == "gelu" else 10 * TOLERANCE[dtype]
    error, worst = _worst_relative_error(g12, reference_derivative, dtype)
    assert error <= tol, f"dV/dk12 of {name}: relative error {error:.2e} at {_describe(worst, dtype)}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_pairs_of_an_item_with_itself_give_the_self_moment_with_finite_gradients(name, dtype):
    k = torch.tensor(SCALES, dtype=dtype, requires_grad=True)
    layer = LAYERS[name]()
    value, derivative = layer.pair_moments(k, k, k, True)
    torch.testing.assert_close(value, layer.self_moment(k), rtol=4 * torch.finfo(dtype).eps, atol=0.0)
    total = value.sum() + (0.0 if derivative is None else derivative.sum())
    (grad,) = torch.autograd.grad(total, k)
    assert torch.isfinite(grad).all()


def test_pair_determinant_is_exact_where_the_plain_difference_is_noise():
    with mpmath.workdps(DIGITS):
        for dtype in (torch.float32, torch.float64):
            k11, k22, k12 = _pairs(dtype)
            det = pair_determinant(k11, k22, k12)
            for got, a, b, r in zip(det.tolist(), k11.tolist(), k22.tolist(), k12.tolist()):
                exact = mpmath.mpf(a) * mpmath.mpf(b) - mpmath.mpf(r) ** 2
                assert abs(got - exact) <= 4 * torch.finfo(dtype).eps * exact, (dtype, a, b, r, got, exact)
    # Exactly 0 for an item with itself; a hair-indefinite pair is clamped to 0, not negative.
    k = torch.tensor([1e8, 3.0, 1e-8], dtype=torch.float32)
    assert (pair_determinant(k, k, k) == 0).all()
    assert (pair_determinant(k, k, k * (1 + 1e-6)) == 0).all()


# ----- end to end: MLP kernels on large inputs -----

WEIGHT_VARIANCE, BIAS_VARIANCE = 1.0, 0.1
SELF = {  # E[phi(u)^2] and E[phi'(u)^2] for u ~ N(0, k), from the references at correlation one
    name: (lambda k, name=name: REFERENCES[name](k, k, k)) for name in REFERENCES
}


def _mp_mlp_diagonal(x: list, name: str, kind: str, depth: int = 2):
    """K(x, x) or Theta(x, x) of MLPKernel by the recursion of docs/mlp.md, in mpmath."""
    with mpmath.workdps(DIGITS):
        k = sum(mpmath.mpf(v) ** 2 for v in x) / len(x)
        theta = mpmath.mpf(0)
        for _ in range(depth):
            k = WEIGHT_VARIANCE * k + BIAS_VARIANCE
            theta = k + WEIGHT_VARIANCE * theta
            value, derivative = SELF[name](k)
            k, theta = value, (0 if derivative is None else derivative) * theta
        k = WEIGHT_VARIANCE * k + BIAS_VARIANCE
        theta = k + WEIGHT_VARIANCE * theta
        return theta if kind == "ntk" else k


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e4), (torch.float64, 1e8)], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_mlp_kernels_on_large_inputs_are_finite_with_the_exact_diagonal(name, dtype, scale):
    x = scale * torch.randn(5, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    x[3] = x[1]  # a duplicate: the cross covariance of distinct rows, rounded differently
    for kind in ("nngp", "ntk"):
        kernel = MLPKernel(2, name, kind=kind, weight_variance=WEIGHT_VARIANCE, bias_variance=BIAS_VARIANCE).to(dtype)
        with torch.no_grad():
            full = kernel(x).to_dense()
            diagonal = kernel(x, diag=True)
            cross = kernel(x, x.clone()).to_dense()
        assert torch.isfinite(full).all() and torch.isfinite(cross).all(), (name, kind)
        reference = torch.tensor([float(_mp_mlp_diagonal(row, name, kind)) for row in x.tolist()], dtype=dtype)
        tol = 1e-5 if dtype == torch.float32 else 1e-11
        torch.testing.assert_close(full.diagonal(), reference, rtol=tol, atol=0.0)
        torch.testing.assert_close(diagonal, reference, rtol=tol, atol=0.0)


def test_gelu_with_a_large_weight_variance_on_unit_inputs_is_finite():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    kernel = MLPKernel(2, "gelu", weight_variance=1e4)
    value = kernel(x).to_dense()
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in kernel.parameters() if p.grad is not None)
