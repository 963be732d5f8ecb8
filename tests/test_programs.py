"""The tensor-program compiler: any feature network's kernels by the master theorem.

1. Exact agreement with the hand-written layers where they overlap (MLPs, concatenations, a
   hidden layer applied twice), to round-off.
2. The quadrature against independent integration.
3. Convergence of wide finite networks of the same module (Gaussian initialisation at the
   compiled variances) to the compiled NNGP kernel and NTK: GLU, products, concatenations,
   chunked gates, one weight on two inputs.
4. The GPyTorch interface: kernel_from_module, gradients, float32, batches, pickling; refusals.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import relative_error
from scipy import integrate
from torch import nn

from gpytorch_tp import TensorProgramKernel, from_module, kernel_from_module
from gpytorch_tp.conversion import UnsupportedModuleError, ntk_parameter_scales
from gpytorch_tp.kernels import MonteCarloKernel
from gpytorch_tp.layers import (
    ELU,
    GRU,
    LSTM,
    RNN,
    AvgPool1d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    Erf,
    Flatten,
    GlobalAvgPool,
    LastStep,
    LayerNorm,
    Linear,
    ReLU,
    Residual,
    SelfAttention,
    Sequential,
    Tanh,
    TimeMean,
)
from gpytorch_tp.programs import CompiledProgram, compile_module
from gpytorch_tp.programs.gaussian import gaussian_moments

DTYPE = torch.float64
WV, BV = 1.5, 0.1  # the variances the finite networks are drawn with
SEQ_T, SEQ_D = 4, 3  # steps and features of the sequence networks


def _x(n=5, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _kernel(module: nn.Module, kind: str, d: int = 3) -> TensorProgramKernel:
    return TensorProgramKernel(compile_module(module, d, weight_variance=WV, bias_variance=BV), kind=kind).double()


def _dense(kernel, x):
    with torch.no_grad():
        return kernel(x).to_dense()


# =============================================================================================
# Networks nobody wrote a kernel for.
# =============================================================================================


class GLU(nn.Module):
    """A gated linear unit: a(x) * sigmoid(b(x)), then a readout."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(d, width), nn.Linear(d, width), nn.Linear(width, out)

    def forward(self, x):
        return self.o(self.a(x) * torch.sigmoid(self.b(x)))


class Square(nn.Module):
    """h * h: a product of a G-var with itself (a polynomial, integrated exactly)."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.a, self.o = nn.Linear(d, width), nn.Linear(width, out)

    def forward(self, x):
        h = self.a(x)
        return self.o(h * h)


class Branches(nn.Module):
    """relu(a) * tanh(b) of a hidden layer: independent factors, integrated group by group."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.e, self.a, self.b, self.o = (
            nn.Linear(d, width),
            nn.Linear(width, width),
            nn.Linear(width, width),
            nn.Linear(width, out),
        )

    def forward(self, x):
        h = torch.erf(self.e(x))
        return self.o(torch.relu(self.a(h)) * torch.tanh(self.b(h)))


class ChunkedGates(nn.Module):
    """One matrix makes two gates (u, v = W h chunked): rows of one matrix are independent weights."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.e, self.g, self.o = nn.Linear(d, width), nn.Linear(width, 2 * width), nn.Linear(width, out)

    def forward(self, x):
        h = torch.tanh(self.e(x))
        u, v = self.g(h).chunk(2, dim=-1)
        return self.o(F.silu(u) * torch.sigmoid(v) + h)


class OverlappingSlices(nn.Module):
    """Two overlapping, shifted slices of one matrix's output: coordinate by coordinate, different rows."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.e, self.g, self.o = nn.Linear(d, width), nn.Linear(width, 2 * width), nn.Linear(width, out)
        self.width = width

    def forward(self, x):
        u = self.g(torch.erf(self.e(x)))
        shift = self.width // 2
        return self.o(torch.tanh(u[:, : self.width]) * torch.sigmoid(u[:, shift : shift + self.width]))


class SharedOnTwoInputs(nn.Module):
    """One hidden matrix applied to two different vectors: the weight-sharing terms of the NTK."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.a, self.b, self.w, self.o = (
            nn.Linear(d, width),
            nn.Linear(d, width),
            nn.Linear(width, width),
            nn.Linear(width, out),
        )

    def forward(self, x):
        return self.o(torch.relu(self.w(torch.tanh(self.a(x)))) + F.elu(self.w(torch.erf(self.b(x)))))


class Concatenated(nn.Module):
    """torch.cat of two branches of different widths (2 : 1)."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.a, self.b = nn.Linear(d, width), nn.Linear(d, width // 2)
        self.o = nn.Linear(width + width // 2, out)

    def forward(self, x):
        return self.o(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1))


class Reused(nn.Module):
    """A hidden layer applied twice in a row (weight reuse along depth)."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.a, self.h, self.o = nn.Linear(d, width), nn.Linear(width, width), nn.Linear(width, out)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.tanh(self.h(h))
        return self.o(torch.erf(self.h(h)))


# =============================================================================================
# 1. Exact agreement where the hand-written layers overlap.
# =============================================================================================


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize(
    ("activation", "layer"),
    [(nn.ReLU(), ReLU()), (nn.Tanh(), Tanh()), (nn.ELU(0.5), ELU(0.5))],
    ids=["relu", "tanh", "elu"],
)
def test_a_compiled_mlp_equals_the_hand_written_kernel(kind, activation, layer):
    net = nn.Sequential(nn.Linear(3, 8), activation, nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    reference = TensorProgramKernel(
        Sequential(Linear(WV, BV), layer, Linear(WV, BV), Tanh(), Linear(WV, BV)), kind=kind
    ).double()
    x = _x(6)
    torch.testing.assert_close(_dense(_kernel(net, kind), x), _dense(reference, x), rtol=1e-12, atol=1e-12)


class NormByHand(nn.Module):
    """A LayerNorm written out: centre, divide by the root mean square, per-unit gain and shift."""

    def __init__(self, width=8, d=3, center=True):
        super().__init__()
        self.a, self.m, self.o = nn.Linear(d, width), nn.Linear(width, width), nn.Linear(width, 1)
        self.gain, self.shift = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.center = center

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.center:
            h = h - h.mean(-1, keepdim=True)
        h = h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) / h.shape[-1])
        return self.o(torch.relu(self.m(h * self.gain + self.shift)))


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_a_compiled_layer_norm_equals_the_layer_norm_layer(kind, affine):
    # Centred features (after a dense layer): nn.LayerNorm is the LayerNorm layer (eps=0: the layer has none).
    net = nn.Sequential(
        nn.Linear(3, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.LayerNorm(8, eps=0.0, elementwise_affine=affine),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 1),
    )
    reference = Sequential(
        Linear(WV, BV),
        Tanh(),
        Linear(WV, BV),
        LayerNorm(elementwise_affine=affine),
        Linear(WV, BV),
        ReLU(),
        Linear(WV, BV),
    )
    x = _x(6)
    expected = _dense(TensorProgramKernel(reference, kind=kind).double(), x)
    assert relative_error(_dense(_kernel(net, kind), x), expected) < 1e-12
    # RMS normalisation of tanh features by hand (their mean is 0 at infinite width, so centring changes nothing).
    reference = Sequential(
        Linear(WV, BV),
        Tanh(),
        LayerNorm(elementwise_affine=True, center=False),
        Linear(WV, BV),
        ReLU(),
        Linear(WV, BV),
    )
    expected = _dense(TensorProgramKernel(reference, kind=kind).double(), x)
    assert relative_error(_dense(_kernel(NormByHand(center=False), kind), x), expected) < 1e-12
    # Centred: the mean and the centred second moment by the 1-d trapezoidal rule (the layer: its tanh rule).
    assert relative_error(_dense(_kernel(NormByHand(center=True), kind), x), expected) < 1e-8


def test_a_layer_norm_of_features_with_a_mean_centres_them():
    # relu features: E[h] = sqrt(q / 2 pi), so centring matters; the covariance of the normalised features is
    # (E[h h'] - m m') / sqrt(v v'), with v = E[h^2] - m^2 (closed forms of the ReLU layer).
    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

        def forward(self, x):
            return self.o(F.layer_norm(torch.relu(self.a(x)), (8,), eps=0.0))

    x = _x(5)
    q = WV * (x @ x.T) / 3 + BV
    d = q.diagonal().sqrt()
    rho = (q / (d[:, None] * d[None, :])).clamp(-1, 1)
    second = d[:, None] * d[None, :] * (torch.sqrt(1 - rho**2) + (math.pi - torch.acos(rho)) * rho) / (2 * math.pi)
    mean = d / math.sqrt(2 * math.pi)
    centred = second - mean[:, None] * mean[None, :]
    expected = WV * centred / (centred.diagonal().sqrt()[:, None] * centred.diagonal().sqrt()[None, :]) + BV
    assert relative_error(_dense(_kernel(Centred(), "nngp"), x), expected) < 1e-10


class HandWrittenAttention(nn.Module):
    """One attention layer as users write it: logits divided by the width, a causal mask, softmax, A @ v."""

    def __init__(self, width=8, causal=True, tied=True):
        super().__init__()
        self.embed, self.q = nn.Linear(SEQ_D, width), nn.Linear(width, width, bias=False)
        self.k = self.q if tied else nn.Linear(width, width, bias=False)
        self.v, self.out, self.o = nn.Linear(width, width, bias=False), nn.Linear(width, width), nn.Linear(width, 1)
        self.causal = causal

    def forward(self, x):
        z = self.embed(x.view(x.shape[0], SEQ_T, SEQ_D))
        q, k = self.q(z), self.k(z)
        logits = q @ k.transpose(-1, -2) / k.shape[-1]
        if self.causal:
            logits = logits.masked_fill(torch.ones(SEQ_T, SEQ_T, dtype=torch.bool).triu(1), float("-inf"))
        return self.o(self.out(torch.softmax(logits, -1) @ self.v(z)).mean(1))


class MultiHeadAttention(nn.Module):
    """Heads split by reshaping, (N, H, T, d_h) logits and mixing, joined again; or the same by F.sdpa."""

    def __init__(self, width=8, heads=2, fused=False, scale=None):
        super().__init__()
        self.embed, self.qk = nn.Linear(SEQ_D, width), nn.Linear(width, width, bias=False)
        self.v, self.out, self.o = nn.Linear(width, width, bias=False), nn.Linear(width, width), nn.Linear(width, 1)
        self.heads, self.fused, self.scale = heads, fused, scale

    def forward(self, x):
        n = x.shape[0]
        z = self.embed(x.view(n, SEQ_T, SEQ_D))
        q = self.qk(z).view(n, SEQ_T, self.heads, -1).transpose(1, 2)
        v = self.v(z).view(n, SEQ_T, self.heads, -1).transpose(1, 2)
        if self.fused:
            scale = 1 / q.shape[-1] if self.scale is None else self.scale
            y = F.scaled_dot_product_attention(q, q, v, is_causal=True, scale=scale)
        else:
            logits = q @ q.transpose(-2, -1) / q.shape[-1]
            logits = logits.masked_fill(torch.ones(SEQ_T, SEQ_T, dtype=torch.bool).triu(1), float("-inf"))
            y = torch.softmax(logits, dim=-1) @ v
        return self.o(self.out(y.transpose(1, 2).contiguous().view(n, SEQ_T, -1)).mean(1))


class PreNormBlock(nn.Module):
    """A pre-norm transformer block (causal tied attention, ReLU MLP, residuals), last-token readout."""

    def __init__(self, width=8):
        super().__init__()
        self.embed, self.qk = nn.Linear(SEQ_D, width), nn.Linear(width, width, bias=False)
        self.v, self.out = nn.Linear(width, width, bias=False), nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=0.0), nn.LayerNorm(width, eps=0.0)
        self.up, self.down, self.o = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Linear(width, 1)

    def forward(self, x):
        z = self.embed(x.view(x.shape[0], SEQ_T, SEQ_D))
        h = self.norm1(z)
        q = self.qk(h)
        future = torch.tril(torch.ones(SEQ_T, SEQ_T)) == 0
        weights = torch.softmax(torch.where(future, -math.inf, q @ q.mT / q.shape[-1]), dim=-1)
        z = z + self.out(weights @ self.v(h))
        z = z + self.down(torch.relu(self.up(self.norm2(z))))
        return self.o(z[:, -1])


def _sequence_kernels(module: nn.Module, reference, kind: str):
    compiled = compile_module(module, SEQ_D, steps=SEQ_T, weight_variance=WV, bias_variance=BV)
    return [
        TensorProgramKernel(arch, kind=kind, input_shape=(SEQ_T, SEQ_D), sequence=True).double()
        for arch in (compiled, reference)
    ]


def _attention(query_key: str, causal: bool) -> SelfAttention:
    return SelfAttention(
        query_key, causal=causal, value_variance=WV, output_variance=WV, bias_variance=BV, query_key_variance=WV
    )


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize(
    ("tied", "causal"), [(True, False), (True, True), (False, True)], ids=["tied", "tied-causal", "independent-causal"]
)
def test_hand_written_attention_equals_the_self_attention_layer(kind, tied, causal):
    reference = Sequential(
        Linear(WV, BV), _attention("tied" if tied else "independent", causal), TimeMean(), Linear(WV, BV)
    )
    compiled, expected = _sequence_kernels(HandWrittenAttention(causal=causal, tied=tied), reference, kind)
    x = _x(5, SEQ_T * SEQ_D)
    assert relative_error(_dense(compiled, x), _dense(expected, x)) < 1e-12


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("fused", [False, True], ids=["by-hand", "scaled-dot-product-attention"])
def test_multi_head_attention_equals_the_self_attention_layer(kind, fused):
    # Every head's logits converge to the same token covariance: the limit of H heads is one head's.
    reference = Sequential(Linear(WV, BV), _attention("tied", causal=True), TimeMean(), Linear(WV, BV))
    compiled, expected = _sequence_kernels(MultiHeadAttention(fused=fused), reference, kind)
    x = _x(5, SEQ_T * SEQ_D)
    assert relative_error(_dense(compiled, x), _dense(expected, x)) < 1e-12


def test_scaled_dot_product_attention_with_its_default_scale_is_refused():
    with pytest.raises(UnsupportedModuleError, match="1/sqrt"):
        compile_module(MultiHeadAttention(fused=True, scale=0.5), SEQ_D, steps=SEQ_T)


class RMSNormByHand(nn.Module):
    """An RMS norm as written in many transformer codebases, with a gain and a shift."""

    def __init__(self, width):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * self.weight + self.bias


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("norm", ["nn.LayerNorm", "rms-by-hand"])
def test_a_pre_norm_transformer_block_equals_the_layers(kind, norm):
    block = PreNormBlock()
    if norm == "rms-by-hand":
        block.norm1, block.norm2 = RMSNormByHand(8), RMSNormByHand(8)
    center = norm == "nn.LayerNorm"
    reference = Sequential(
        Linear(WV, BV),
        Residual(LayerNorm(elementwise_affine=True, center=center), _attention("tied", causal=True)),
        Residual(LayerNorm(elementwise_affine=True, center=center), Linear(WV, BV), ReLU(), Linear(WV, BV)),
        LastStep(),
        Linear(WV, BV),
    )
    compiled, expected = _sequence_kernels(block, reference, kind)
    x = _x(5, SEQ_T * SEQ_D, seed=2)
    assert relative_error(_dense(compiled, x), _dense(expected, x)) < 1e-12


class _RootWidthLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.Linear(SEQ_D, 8), nn.Linear(8, 1)

    def forward(self, x):
        z = self.e(x.view(x.shape[0], SEQ_T, SEQ_D))
        return self.o((torch.softmax(z @ z.transpose(-1, -2) / math.sqrt(z.shape[-1]), -1) @ z).mean(1))


class _SoftmaxOverFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.Linear(SEQ_D, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.o(torch.softmax(self.e(x.view(x.shape[0], SEQ_T, SEQ_D)), -1).mean(1))


@pytest.mark.parametrize(
    ("module", "message"),
    [(_RootWidthLogits(), "1/sqrt\\(width\\)"), (_SoftmaxOverFeatures(), "softmax' over dim -1")],
    ids=["root-width-logits", "softmax-over-features"],
)
def test_attention_outside_the_theorem_is_refused(module, message):
    with pytest.raises(UnsupportedModuleError, match=message) as info:
        kernel_from_module(module, "nngp", (SEQ_T, SEQ_D), sequence=True)
    assert "MonteCarloKernel" in str(info.value)


class _GainInsideANonlinearity(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.o = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 1)

    def forward(self, x):
        return self.o(torch.tanh(self.norm(self.a(x))))


def test_a_gain_inside_a_nonlinearity_has_an_nngp_but_its_ntk_is_refused():
    x = _x(4)
    reference = Sequential(Linear(WV, BV), LayerNorm(), Tanh(), Linear(WV, BV))
    nngp = _dense(_kernel(_GainInsideANonlinearity(), "nngp"), x)
    assert relative_error(nngp, _dense(TensorProgramKernel(reference).double(), x)) < 1e-5  # eps = 1e-5
    with pytest.raises(NotImplementedError, match="norm.weight"):
        _dense(_kernel(_GainInsideANonlinearity(), "ntk"), x)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_a_concatenation_is_the_width_weighted_sum_of_its_branches(kind):
    x = _x(6)
    relu = _dense(TensorProgramKernel(Sequential(Linear(WV, BV), ReLU(), Linear(WV, BV)), kind=kind).double(), x)
    tanh = _dense(TensorProgramKernel(Sequential(Linear(WV, BV), Tanh(), Linear(WV, BV)), kind=kind).double(), x)
    # The readout's fan-in is 2/3 ReLU units and 1/3 tanh units: both kernels are the 2 : 1 mixture.
    expected = (2 * relu + tanh) / 3
    torch.testing.assert_close(_dense(_kernel(Concatenated(), kind), x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_a_layer_reused_along_depth_has_the_kernel_of_independent_layers(kind):
    # Without transposes, a matrix reused in a chain gives the independent-weights kernels in the limit
    # (Tensor Programs II: the cross terms of different uses vanish like 1/sqrt(width)).
    reference = TensorProgramKernel(
        Sequential(Linear(WV, BV), ReLU(), Linear(WV, BV), Tanh(), Linear(WV, BV), Erf(), Linear(WV, BV)), kind=kind
    ).double()
    x = _x(6)
    torch.testing.assert_close(_dense(_kernel(Reused(), kind), x), _dense(reference, x), rtol=1e-12, atol=1e-12)


def test_a_square_has_the_isserlis_moment():
    # E[g^2 g'^2] = k11 k22 + 2 k12^2 for the first layer's G-var g, then the readout.
    x = _x(6)
    k = WV * (x @ x.T) / 3 + BV
    d = k.diagonal()
    expected = WV * (d[:, None] * d[None, :] + 2 * k**2) + BV
    torch.testing.assert_close(_dense(_kernel(Square(), "nngp"), x), expected, rtol=1e-10, atol=1e-10)


# =============================================================================================
# 2. Quadrature against independent integration.
# =============================================================================================


def test_two_dimensional_quadrature_matches_adaptive_integration():
    cov = torch.tensor([[1.3, 0.7], [0.7, 2.1]], dtype=DTYPE)
    value, mixed = gaussian_moments(cov, torch.tanh, torch.sigmoid, [0], [1], derivatives=True)
    inverse, det = torch.linalg.inv(cov).numpy(), float(torch.linalg.det(cov))

    def density(u, v):
        q = inverse[0, 0] * u * u + 2 * inverse[0, 1] * u * v + inverse[1, 1] * v * v
        return math.exp(-q / 2) / (2 * math.pi * math.sqrt(det))

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def reference(f):
        return integrate.dblquad(lambda v, u: f(u, v) * density(u, v), -12, 12, -12, 12, epsabs=1e-14, epsrel=1e-12)[0]

    ref = reference(lambda u, v: math.tanh(u) * sig(v))
    ref_d = reference(lambda u, v: (1 - math.tanh(u) ** 2) * sig(v) * (1 - sig(v)))
    assert abs(float(value) - ref) < 1e-10 * abs(ref)
    assert abs(float(mixed[0, 0]) - ref_d) < 1e-10 * abs(ref_d)


def test_higher_dimensional_rules_against_their_factorised_values():
    # Block-diagonal covariances: the 4- (Gauss-Hermite) and 6-dimensional (quasi-Monte Carlo) rules
    # against products of the 2-dimensional one, for a polynomial (Isserlis: exact) and a smooth function.
    block = torch.tensor([[1.0, 0.4], [0.4, 0.8]], dtype=DTYPE)
    two_dimensional, _ = gaussian_moments(block, torch.tanh, torch.tanh, [0], [1])
    for m, fn, tol, exact_block in (
        (4, lambda t: t * t, 1e-10, 1.0 * 0.8 + 2 * 0.4**2),  # relative; 1e-12 jitter: see gaussian.py
        (4, torch.tanh, 5e-3, float(two_dimensional)),  # relative: Gauss-Hermite, 10 nodes: 3e-3 for tanh
        (6, torch.tanh, 1e-3, float(two_dimensional)),  # absolute: quasi-Monte Carlo
    ):
        value, _ = gaussian_moments(
            torch.block_diag(*[block] * (m // 2)),
            lambda *u: math.prod(fn(ui) for ui in u),
            lambda *v: math.prod(fn(vi) for vi in v),
            list(range(0, m, 2)),
            list(range(1, m, 2)),
        )
        exact = exact_block ** (m // 2)
        scale = 1.0 if m > 4 else exact
        assert abs(float(value) - exact) < tol * scale, (m, float(value), exact)


class AsymmetricTwoLayers(nn.Module):
    """Two gated layers whose moments come in swapped pairs, E[tanh(a) sigmoid(b) sigmoid(a')] and its mirror."""

    def __init__(self, width=16, out=1):
        super().__init__()
        self.a, self.b = nn.Linear(3, width), nn.Linear(3, width)
        self.c, self.d, self.o = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, out)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        h = torch.tanh(a) * torch.sigmoid(b) + torch.sigmoid(a)
        c, d = self.c(h), self.d(h)
        return self.o(torch.tanh(c) * torch.sigmoid(d) + torch.erf(c))


def test_a_diagonal_tile_mirrors_the_swapped_moments(monkeypatch):
    # K(X, X): the moments of (e2, e1) are taken as those of (e1, e2) transposed. Against computing both
    # (1- and 2-dimensional rules, not exactly symmetric in their variables: 1e-8 apart at unit variances;
    # untransposed, 2e-5 off), NNGP and NTK; a second layer feeds the covariances into nonlinearities.
    from gpytorch_tp.programs import master_theorem

    x = 0.6 * _x(5)  # variances about 1, where the rules are accurate
    mirrored = [_dense(_kernel(AsymmetricTwoLayers(), kind), x) for kind in ("nngp", "ntk")]
    monkeypatch.setattr(master_theorem._Recursion, "_mirrored", lambda self, memo, swapped: None)
    computed = [_dense(_kernel(AsymmetricTwoLayers(), kind), x) for kind in ("nngp", "ntk")]
    for a, b in zip(mirrored, computed):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_saturating_functions_of_three_variables_take_the_sobol_rule():
    # E[tanh(u)^2 sigmoid(v) sigmoid(w)], Var u = 5, independent: the 1-dimensional rule's E[tanh(u)^2] (round-off)
    # times E[sigmoid]^2 = 1/4. Gauss-Hermite (16 nodes per dimension) misses it by 8e-3; the Sobol points
    # (hermite=False, what the recursion asks for non-polynomial integrands) are within 1e-3.
    cov = torch.diag(torch.tensor([5.0, 1.0, 2.0], dtype=DTYPE))
    one_dimensional, _ = gaussian_moments(cov[:1, :1], lambda u: torch.tanh(u) ** 2, lambda: 1.0, [0], [])
    exact = float(one_dimensional) / 4

    def first(u, v):
        return torch.tanh(u) ** 2 * torch.sigmoid(v)

    sobol, _ = gaussian_moments(cov, first, torch.sigmoid, [0, 1], [2], hermite=False)
    hermite, _ = gaussian_moments(cov, first, torch.sigmoid, [0, 1], [2])
    assert abs(float(sobol) - exact) < 1e-3
    assert abs(float(hermite) - exact) > 5e-3  # the reason for the switch


class SeparableSum(nn.Module):
    """A gate times a sum whose first term is a product of independent factors:
    ``exp(c / 2) * (tanh(a) * exp(b / 2) + erf(a))``, as ``z * h`` of a gated cell."""

    def __init__(self, width=16):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, width), nn.Linear(3, width), nn.Linear(3, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        return self.out(torch.exp(c / 2) * (torch.tanh(a) * torch.exp(b / 2) + torch.erf(a)))


class PolynomialSum(nn.Module):
    """A G-var times a polynomial with a separable term, ``c * (a * b^2 + a^3)``: Gauss-Hermite integrates the
    sum's moments (4 dimensions) exactly, jointly."""

    def __init__(self, width=16):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, width), nn.Linear(3, width), nn.Linear(3, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        return self.out(c * (a * (b * b) + a * a * a))


def test_a_separable_sum_is_distributed_into_independent_factors():
    # E[h h'] of h = exp(c/2) (tanh(a) exp(b/2) + erf(a)), a, b, c independent with covariance k: the product
    # is distributed over the sum and each term's factors integrate apart,
    # E[exp(b/2) exp(b'/2)] = exp((k11 + k22 + 2 k12) / 8) (also for c), E[exp(b/2)] = exp(k11 / 8),
    # tanh against erf by the 2-dimensional rule (1e-11 at these variances, about 1), tanh against tanh by the
    # Tanh layer's rule (as the recursion), erf against erf in closed form.
    x = 0.6 * _x(4)
    k = WV * (x @ x.T) / 3 + BV
    d = k.diagonal()
    expected = torch.empty_like(k)
    for i in range(4):
        for j in range(4):
            cov = torch.tensor([[d[i], k[i, j]], [k[i, j], d[j]]], dtype=DTYPE)
            tanh_tanh = float(Tanh().pair_moments(cov[0, 0], cov[1, 1], cov[0, 1], False)[0])
            tanh_erf = float(gaussian_moments(cov, torch.tanh, torch.erf, [0], [1])[0])
            erf_tanh = float(gaussian_moments(cov, torch.erf, torch.tanh, [0], [1])[0])
            erf_erf = 2 / math.pi * math.asin(2 * k[i, j] / math.sqrt((1 + 2 * d[i]) * (1 + 2 * d[j])))
            moment = (
                tanh_tanh * math.exp((d[i] + d[j] + 2 * k[i, j]) / 8)
                + tanh_erf * math.exp(d[i] / 8)
                + erf_tanh * math.exp(d[j] / 8)
                + erf_erf
            )
            expected[i, j] = WV * math.exp((d[i] + d[j] + 2 * k[i, j]) / 8) * moment + BV
    torch.testing.assert_close(_dense(_kernel(SeparableSum(), "nngp"), x), expected, rtol=1e-9, atol=1e-10)


def test_distributing_a_separable_sum_changes_no_exact_moment(monkeypatch):
    # A polynomial program, NNGP and NTK: distributed (independent groups of 1-2 dimensions) against the
    # joint integration of each product (4 dimensions, Gauss-Hermite: exact for polynomials).
    from gpytorch_tp.programs import master_theorem

    x = _x(4)
    distributed = [_dense(_kernel(PolynomialSum(), kind), x) for kind in ("nngp", "ntk")]
    monkeypatch.setattr(master_theorem, "_distributed", lambda factors1, factors2: None)
    joint = [_dense(_kernel(PolynomialSum(), kind), x) for kind in ("nngp", "ntk")]
    for a, b in zip(distributed, joint):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# =============================================================================================
# 3. Wide finite networks converge to the compiled kernels.
# =============================================================================================


def _gaussian(network: nn.Module) -> nn.Module:
    """The network drawn at the compiled variances: weights N(0, WV / fan_in), biases N(0, BV).

    Per-unit gains and shifts (LayerNorm's, ``gain`` vectors) keep their initial 1 and 0.
    """
    per_unit = {id(p) for m in network.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    per_unit |= {id(p) for name, p in network.named_parameters() if name.endswith("gain")}
    with torch.no_grad():
        for p in network.parameters():
            if id(p) in per_unit:
                continue
            if p.dim() > 1:
                p.normal_(0.0, math.sqrt(WV / p[0].numel()))  # fan-in: C k_h k_w for convolutions
            else:
                p.normal_(0.0, math.sqrt(BV))
    return network.double()


class NormalisedAfterANonlinearity(nn.Module):
    """nn.LayerNorm (centred, affine) of relu features, whose mean is not 0: beyond the LayerNorm layer."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.a, self.norm = nn.Linear(d, width), nn.LayerNorm(width)
        self.m, self.o = nn.Linear(width, width), nn.Linear(width, out)

    def forward(self, x):
        return self.o(F.gelu(self.m(self.norm(torch.relu(self.a(x))))))


class HandWrittenRMSNorm(nn.Module):
    """An RMS norm written by hand, with a gain vector, inside a gated unit."""

    def __init__(self, width=16, d=3, out=1):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(d, width), nn.Linear(d, width), nn.Linear(width, out)
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, x):
        h = self.a(x) * torch.sigmoid(self.b(x))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.o(h * self.gain)


class AttentionOnItsKeys(nn.Module):
    """Causal softmax attention whose values are its keys (tied queries and keys), gated: no layer of the
    vocabulary.  Sequences (N, T * d), reshaped in forward."""

    def __init__(self, width=16, d=SEQ_D, out=1):
        super().__init__()
        self.embed, self.k, self.gate = nn.Linear(d, width), nn.Linear(width, width, bias=False), nn.Linear(d, width)
        self.o = nn.Linear(width, out)

    def forward(self, x):
        x = x.view(x.shape[0], SEQ_T, SEQ_D)
        keys = self.k(torch.tanh(self.embed(x)))
        logits = keys @ keys.transpose(-1, -2) / keys.shape[-1]
        mask = torch.ones(SEQ_T, SEQ_T, dtype=torch.bool).triu(1)
        mixed = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1) @ keys
        return self.o((mixed * torch.sigmoid(self.gate(x))).mean(1))


class GRUWithAGatedHead(nn.Module):
    """torch's nn.GRU inside a network of the user's: its last state through a gated unit."""

    def __init__(self, width=16, d=SEQ_D, out=1):
        super().__init__()
        self.embed, self.rnn = nn.Linear(d, width), nn.GRU(width, width, batch_first=True)
        self.gate, self.o = nn.Linear(width, width), nn.Linear(width, out)

    def forward(self, x):
        states, _ = self.rnn(self.embed(x.view(x.shape[0], SEQ_T, SEQ_D)))
        last = states[:, -1]
        return self.o(last * torch.sigmoid(self.gate(last)))


IMAGE_C, IMAGE_H, IMAGE_W = 2, 4, 4


class GatedConvolution(nn.Module):
    """A gated convolution (conv(x) * sigmoid(conv'(x))) and global average pooling: no layer is a product."""

    def __init__(self, width=16, out=1):
        super().__init__()
        self.a = nn.Conv2d(IMAGE_C, width, 3, padding=1)
        self.b = nn.Conv2d(IMAGE_C, width, 3, padding=1)
        self.o = nn.Linear(width, out)

    def forward(self, x):
        x = x.view(x.shape[0], IMAGE_C, IMAGE_H, IMAGE_W)
        return self.o((self.a(x) * torch.sigmoid(self.b(x))).mean((2, 3)))


CASES = {
    "glu": GLU,
    "square": Square,
    "independent-factors": Branches,
    "chunked-gates": ChunkedGates,
    "overlapping-slices": OverlappingSlices,
    "shared-on-two-inputs": SharedOnTwoInputs,
    "layernorm-after-relu": NormalisedAfterANonlinearity,
    "hand-written-rms-norm": HandWrittenRMSNorm,
    "attention-on-its-keys": AttentionOnItsKeys,
    "gru-with-a-gated-head": GRUWithAGatedHead,
    "gated-convolution": GatedConvolution,
}
IMAGE_CASES = {GatedConvolution}
SEQUENCE_CASES = {AttentionOnItsKeys, GRUWithAGatedHead}


def _finite_nngp(cls, width: int, seed: int, x: torch.Tensor, networks: int = 16) -> torch.Tensor:
    """The NNGP kernel given each network's last hidden layer (no sampling noise of the readout itself)."""
    total = 0.0
    for k in range(networks):
        torch.manual_seed(1000 * seed + k)
        network = _gaussian(cls(width))
        features = {}
        network.o.register_forward_pre_hook(lambda module, args: features.setdefault("h", args[0]))
        with torch.no_grad():
            network(x)
        h = features["h"]
        total = total + WV * (h @ h.T) / h.shape[-1] + BV
    return total / networks


def _finite_ntk(cls, width: int, seed: int, x: torch.Tensor, program: CompiledProgram) -> torch.Tensor:
    mc = MonteCarloKernel(
        lambda: _gaussian(cls(width, out=8)), "ntk", n_samples=4, seed=seed, parameter_scales=program.parameter_scales
    )
    return _dense(mc, x)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("name", list(CASES))
def test_wide_finite_networks_converge_to_the_compiled_kernel(name, kind):
    cls = CASES[name]
    if cls in IMAGE_CASES:
        program = compile_module(cls(), IMAGE_C, grid=(IMAGE_H, IMAGE_W), weight_variance=WV, bias_variance=BV)
        x = _x(4, IMAGE_C * IMAGE_H * IMAGE_W)
        kernel = TensorProgramKernel(program.double(), kind=kind, input_shape=(IMAGE_C, IMAGE_H, IMAGE_W))
    elif cls in SEQUENCE_CASES:
        program = compile_module(cls(), SEQ_D, steps=SEQ_T, weight_variance=WV, bias_variance=BV).double()
        x = _x(4, SEQ_T * SEQ_D)
        kernel = TensorProgramKernel(program, kind=kind, input_shape=(SEQ_T, SEQ_D), sequence=True)
    else:
        program = compile_module(cls(), 3, weight_variance=WV, bias_variance=BV).double()
        x = _x(4)
        kernel = TensorProgramKernel(program, kind=kind)
    exact = _dense(kernel, x)

    def error(width: int, seed: int) -> float:
        finite = _finite_nngp(cls, width, seed, x) if kind == "nngp" else _finite_ntk(cls, width, seed, x, program)
        return relative_error(finite, exact)

    # The finite networks' error falls like width^-1/2: by 4 from 64 to 1024 units (NNGP), by 2.8 from
    # 32 to 256 (NTK, whose Jacobians cost more); asserted at least 2 and 1.6 times, over three seeds.
    narrow_width, wide_width, factor, bound = (64, 1024, 2.0, 0.05) if kind == "nngp" else (32, 256, 1.6, 0.15)
    if name == "square" and kind == "nngp":
        wide_width, factor = 16384, 3.0  # products of four Gaussians: heavy tails, slow to average
    narrow = sum(error(narrow_width, seed) for seed in (0, 1, 2)) / 3
    wide = error(wide_width, 3)
    message = f"{name} {kind}: width {narrow_width} {narrow:.4f} (mean of 3), {wide_width} {wide:.4f}"
    assert wide < bound and wide < narrow / factor, message


# =============================================================================================
# 4. The GPyTorch interface and the refusals.
# =============================================================================================


def test_kernel_from_module_compiles_what_the_layer_vocabulary_refuses():
    kernel = kernel_from_module(GLU(), "ntk")
    assert isinstance(kernel, TensorProgramKernel) and isinstance(kernel.architecture, CompiledProgram)
    arch = from_module(GLU())
    assert isinstance(arch[0], CompiledProgram)
    scales = ntk_parameter_scales(GLU(width=32))
    assert scales["a.weight"] == pytest.approx((1 / 3) / 3) and scales["o.weight"] == pytest.approx((1 / 3) / 32)
    # init="pytorch": nn.Linear's defaults (weights 1/3; biases 1/(3 d) on the input, vanishing after).
    assert float(kernel.architecture.variance("a.bias")) == pytest.approx(1 / 9)
    assert float(kernel.architecture.variance("o.bias")) == 0.0
    # what the converter already knows keeps its layers
    assert not isinstance(
        kernel_from_module(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))).architecture, CompiledProgram
    )


def test_measured_initialisation_reads_the_module_parameters():
    net = GLU(width=256)
    with torch.no_grad():
        net.a.weight.normal_(0, math.sqrt(2.0 / 3))
    program = compile_module(net, 3, init="measured")
    assert float(program.variance("a.weight")) == pytest.approx(2.0, rel=0.1)


def test_gradients_are_finite_at_the_diagonal_and_float32_agrees():
    kernel = _kernel(ChunkedGates(), "ntk")
    x = _x(5)
    k = kernel(x).to_dense()
    k.sum().backward()
    grads = [p.grad for p in kernel.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    k32 = _dense(
        TensorProgramKernel(compile_module(ChunkedGates(), 3, weight_variance=WV, bias_variance=BV), kind="ntk"),
        x.float(),
    )
    assert k32.dtype == torch.float32
    torch.testing.assert_close(k32.double(), k.detach(), rtol=1e-4, atol=1e-5)
    assert torch.linalg.eigvalsh(k.detach()).min() > -1e-10


def test_batched_hyperparameters_and_pickling():
    kernel = TensorProgramKernel(
        compile_module(GLU(), 3, weight_variance=WV, bias_variance=BV), batch_shape=torch.Size([2])
    ).double()
    x = _x(4)
    assert _dense(kernel, x).shape == (2, 4, 4)
    clone = pickle.loads(pickle.dumps(kernel))
    torch.testing.assert_close(_dense(clone, x), _dense(kernel, x))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.q(x)
        return self.o(torch.softmax(h @ h.T, -1) @ h)


class _Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.o(torch.relu(self.a(x) + torch.arange(8.0)))


class _EndsInSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return torch.sigmoid(self.o(torch.relu(self.a(x))))


class _MaxOverFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(1, 1)

    def forward(self, x):
        return self.o(self.a(x).amax(-1, keepdim=True))


class _SumOverTheWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.o(h * torch.sigmoid(h.sum(-1, keepdim=True) / math.sqrt(8)))


class _GainThatDiffersByUnit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.o = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.o(self.norm(self.a(x)))


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (_SumOverTheWidth(), "sum over the width"),
        (_GainThatDiffersByUnit(), "differs from unit to unit"),
        (_Attention(), "transpose"),
        (_Shifted(), "constant tensor"),
        (_EndsInSigmoid(), "network output"),
        (_MaxOverFeatures(), "amax"),
    ],
    ids=[
        "sum-over-the-width",
        "trained-gain",
        "attention-without-width-scaling",
        "constant-vector",
        "output-nonlinearity",
        "max",
    ],
)
def test_what_the_theorem_does_not_cover_is_refused_with_the_operation_named(module, message):
    with pytest.raises(UnsupportedModuleError, match=message) as info:
        compile_module(module, 3)
    assert "MonteCarloKernel" in str(info.value)
    # The layer vocabulary has an output nonlinearity, and its LayerNorm takes the gain as 1 whatever its value.
    if not isinstance(module, (_EndsInSigmoid, _GainThatDiffersByUnit)):
        with pytest.raises(UnsupportedModuleError, match=message):
            kernel_from_module(module, input_shape=(3,))


class _ShapeCode(nn.Module):
    """Shape code runs as written: a zero state built from the input's shape, a loop over a Python range."""

    def __init__(self):
        super().__init__()
        self.a, self.h, self.o = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        state = x.new_zeros(x.shape[0], 8)
        h = torch.tanh(self.a(x) + state)
        for _ in range(2):  # unrolled: one weight used twice
            h = torch.tanh(self.h(h))
        return self.o(h)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_shape_code_and_python_loops_are_traced(kind):
    reference = TensorProgramKernel(
        Sequential(Linear(WV, BV), Tanh(), Linear(WV, BV), Tanh(), Linear(WV, BV), Tanh(), Linear(WV, BV)), kind=kind
    ).double()
    x = _x(5)
    torch.testing.assert_close(_dense(_kernel(_ShapeCode(), kind), x), _dense(reference, x), rtol=1e-12, atol=1e-12)


# =============================================================================================
# 5. Sequences: recurrent cells written as Python loops.
# =============================================================================================

STEPS, FEATURES = 4, 3


class ElmanLoop(nn.Module):
    """An Elman RNN written by hand: a zero state, a loop over the steps, the last state or the mean."""

    def __init__(self, width=16, out=1, mean=False):
        super().__init__()
        self.w, self.u, self.o = nn.Linear(width, width), nn.Linear(FEATURES, width, bias=False), nn.Linear(width, out)
        self.width, self.mean = width, mean

    def forward(self, x):
        x = x.view(x.shape[0], STEPS, FEATURES)
        h = x.new_zeros(x.shape[0], self.width)
        states = []
        for t in range(STEPS):
            h = torch.tanh(self.w(h) + self.u(x[:, t]))
            states.append(h)
        return self.o(torch.stack(states, 1).mean(1) if self.mean else h)


class ResetFirstGRU(nn.Module):
    """A gated cell of the user's design: the reset gate applied before the recurrent matrix."""

    def __init__(self, width=16, out=1):
        super().__init__()
        self.wz, self.uz = nn.Linear(width, width), nn.Linear(FEATURES, width, bias=False)
        self.wr, self.ur = nn.Linear(width, width), nn.Linear(FEATURES, width, bias=False)
        self.w, self.u = nn.Linear(width, width), nn.Linear(FEATURES, width, bias=False)
        self.o, self.width = nn.Linear(width, out), width

    def forward(self, x):
        x = x.view(x.shape[0], STEPS - 1, FEATURES)
        h = x.new_zeros(x.shape[0], self.width)
        for t in range(STEPS - 1):
            z = torch.sigmoid(self.wz(h) + self.uz(x[:, t]))
            r = torch.sigmoid(self.wr(h) + self.ur(x[:, t]))
            h = (1 - z) * h + z * torch.tanh(self.w(r * h) + self.u(x[:, t]))
        return self.o(h)


def _sequences(n=5, steps=STEPS, seed=0):
    return torch.randn(n, steps * FEATURES, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("mean", [False, True], ids=["last", "mean"])
def test_a_python_loop_rnn_equals_the_rnn_layer(kind, mean):
    kernel = kernel_from_module(
        ElmanLoop(mean=mean), kind, (STEPS, FEATURES), sequence=True, weight_variance=WV, bias_variance=BV
    ).double()
    assert isinstance(kernel.architecture, CompiledProgram)
    readout = TimeMean() if mean else LastStep()
    reference = TensorProgramKernel(
        Sequential(RNN("tanh", WV, WV, BV), readout, Linear(WV, BV)),
        kind=kind,
        input_shape=(STEPS, FEATURES),
        sequence=True,
    ).double()
    x = _sequences()
    torch.testing.assert_close(_dense(kernel, x), _dense(reference, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_a_gated_cell_of_the_users_design_is_the_limit_of_its_wide_networks(kind):
    program = compile_module(ResetFirstGRU(), FEATURES, steps=STEPS - 1, weight_variance=WV, bias_variance=BV)
    kernel = TensorProgramKernel(program.double(), kind=kind, input_shape=(STEPS - 1, FEATURES), sequence=True)
    x = _sequences(4, STEPS - 1)
    exact = _dense(kernel, x)

    def error(width: int, seed: int) -> float:
        if kind == "nngp":
            return relative_error(_finite_nngp(ResetFirstGRU, width, seed, x), exact)
        mc = MonteCarloKernel(
            lambda: _gaussian(ResetFirstGRU(width)),
            "ntk",
            n_samples=4,
            seed=seed,
            parameter_scales=program.parameter_scales,
        )
        return relative_error(_dense(mc, x), exact)

    # Measured: NNGP 0.031 at width 64, 0.009 at 1,024; NTK 0.08-0.11 at 32, 0.02-0.04 at 256.
    narrow_width, wide_width, factor, bound = (64, 1024, 2.0, 0.03) if kind == "nngp" else (32, 256, 1.6, 0.08)
    narrow = sum(error(narrow_width, seed) for seed in (0, 1)) / 2
    wide = error(wide_width, 2)
    message = f"{kind}: width {narrow_width} {narrow:.4f}, {wide_width} {wide:.4f}"
    assert wide < bound and wide < narrow / factor, message


class TorchConventionGRU(nn.Module):
    """torch.nn.GRU's cell as a loop: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h = (1 - z) n + z h``."""

    def __init__(self, width=16, steps=2):
        super().__init__()
        self.ir, self.hr = nn.Linear(FEATURES, width), nn.Linear(width, width, bias=False)
        self.iz, self.hz = nn.Linear(FEATURES, width), nn.Linear(width, width, bias=False)
        self.in_, self.hn = nn.Linear(FEATURES, width), nn.Linear(width, width)
        self.o, self.width, self.steps = nn.Linear(width, 1), width, steps

    def forward(self, x):
        x = x.view(x.shape[0], self.steps, FEATURES)
        h = x.new_zeros(x.shape[0], self.width)
        for t in range(self.steps):
            r = torch.sigmoid(self.ir(x[:, t]) + self.hr(h))
            z = torch.sigmoid(self.iz(x[:, t]) + self.hz(h))
            n = torch.tanh(self.in_(x[:, t]) + r * self.hn(h))
            h = (1 - z) * n + z * h
        return self.o(h)


def test_a_gated_cell_is_integrated_to_its_rules_accuracy(monkeypatch):
    # NNGP and NTK against the same recursion with 8 times the Sobol points and twice the Gauss-Hermite nodes.
    # Measured: 2.4e-4 (NNGP) and 1.7e-4 (NTK) of the largest entry; with Gauss-Hermite for the 3-4
    # dimensional candidate and gate moments (before the Sobol rule took them) 4.3e-3 and 1.7e-3.
    from gpytorch_tp.programs import gaussian

    program = compile_module(TorchConventionGRU(), FEATURES, steps=2, weight_variance=WV, bias_variance=BV)
    x = _sequences(3, 2)

    def kernels():
        kernel = TensorProgramKernel(program, "ntk", input_shape=(2, FEATURES), sequence=True).double()
        with torch.no_grad():
            return kernel.nngp_and_ntk(x)

    computed = kernels()
    monkeypatch.setattr(gaussian, "QMC_POINTS", 1 << 15)
    monkeypatch.setitem(gaussian.NODES_PER_DIMENSION, 3, 32)
    monkeypatch.setitem(gaussian.NODES_PER_DIMENSION, 4, 16)
    gaussian._rule_cpu.cache_clear()
    try:
        reference = kernels()
    finally:
        gaussian._rule_cpu.cache_clear()  # the monkeypatched sizes are undone after the test; so are their rules
    for a, b in zip(computed, reference):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-3


def test_a_program_refuses_inputs_of_another_layout_and_padded_sequences():
    features = compile_module(GLU(), 3, weight_variance=WV, bias_variance=BV)
    with pytest.raises(ValueError, match="takes feature vectors"):
        TensorProgramKernel(features, input_shape=(STEPS, FEATURES), sequence=True).double()(_sequences()).to_dense()
    loop = compile_module(ElmanLoop(), FEATURES, steps=STEPS, weight_variance=WV, bias_variance=BV)
    with pytest.raises(ValueError, match=f"takes sequences of {STEPS} steps"):
        TensorProgramKernel(loop).double()(_x(4, STEPS * FEATURES)).to_dense()
    padded = _sequences()
    padded[0, -FEATURES:] = float("nan")  # the first sequence is one step shorter
    with pytest.raises(ValueError, match="full-length sequences"):
        TensorProgramKernel(loop, input_shape=(STEPS, FEATURES), sequence=True).double()(padded).to_dense()
    with pytest.raises(ValueError, match="steps must be positive"):
        compile_module(ElmanLoop(), FEATURES, steps=0)


class _ForgetGateCell(nn.Module):
    """A gated cell whose joint covariances at one item are singular (the state is a function of its gates)."""

    def __init__(self, width=8):
        super().__init__()
        self.fs, self.fx = nn.Linear(width, width), nn.Linear(1, width, bias=False)
        self.cs, self.cx = nn.Linear(width, width), nn.Linear(1, width, bias=False)
        self.o, self.width = nn.Linear(width, 1), width

    def forward(self, x):
        x = x.view(x.shape[0], 3, 1)
        h = x.new_zeros(x.shape[0], self.width)
        for t in range(3):
            f = torch.sigmoid(self.fs(h) + self.fx(x[:, t]))
            h = (1 - f) * h + f * torch.tanh(self.cs(f * h) + self.cx(x[:, t]))
        return self.o(h)


def test_gradients_of_a_gated_cell_are_finite_on_the_diagonal():
    kernel = kernel_from_module(
        _ForgetGateCell(), "nngp", (3, 1), sequence=True, weight_variance=1.5, bias_variance=0.1
    ).double()
    for seed in range(6):
        kernel.zero_grad()
        kernel(_x(2, 3, seed=seed)).to_dense().sum().backward()
        grads = [p.grad for p in kernel.parameters() if p.requires_grad]
        assert grads and all(torch.isfinite(g).all() for g in grads), seed


class _RecurrentModuleNet(nn.Module):
    """nn.RNN / nn.GRU / nn.LSTM inside a module of the user's, on projected tokens, with both readouts."""

    def __init__(self, cell, width=8, readout="last", layers=1, project=True):
        super().__init__()
        self.project = nn.Linear(SEQ_D, width) if project else nn.Identity()
        self.rnn = cell(width if project else SEQ_D, width, batch_first=True, num_layers=layers)
        self.o, self.readout = nn.Linear(width, 1), readout

    def forward(self, x):
        out, last = self.rnn(self.project(x.view(x.shape[0], SEQ_T, SEQ_D)))
        if isinstance(self.rnn, nn.LSTM):
            last = last[0]
        return self.o(out[:, -1] if self.readout == "last" else last[-1])


THIRD = 1.0 / 3.0


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize(
    ("cell", "layer", "tolerance"),
    [
        (nn.RNN, lambda: RNN("tanh", THIRD, THIRD, 0.0), 1e-12),  # closed form on both sides
        # Not closed form on either side: the compiled quasi-Monte Carlo rule against the layers' particles.
        (nn.GRU, lambda: GRU("tanh", "sigmoid", THIRD, THIRD, 0.0), 5e-3),
        (nn.LSTM, lambda: LSTM("tanh", "sigmoid", THIRD, THIRD, 0.0), 3e-2),
    ],
    ids=["rnn", "gru", "lstm"],
)
def test_torch_recurrent_modules_inside_a_traced_network_are_the_recurrent_layers(kind, cell, layer, tolerance):
    # PyTorch's default initialisation: every tensor U(+-1/sqrt(H)), 1/3 per fan-in, biases vanish.
    hand = Sequential(Linear(THIRD, 1 / (3 * SEQ_D)), layer(), LastStep(), Linear(THIRD, 0.0))
    expected = TensorProgramKernel(hand, kind=kind, input_shape=(SEQ_T, SEQ_D), sequence=True).double()
    x = _x(4, SEQ_T * SEQ_D)
    for readout in ("last", "h_n"):
        module = _RecurrentModuleNet(cell, readout=readout)
        compiled = TensorProgramKernel(
            compile_module(module, SEQ_D, steps=SEQ_T), kind=kind, input_shape=(SEQ_T, SEQ_D), sequence=True
        ).double()
        assert relative_error(_dense(compiled, x), _dense(expected, x)) < tolerance, readout


def test_a_recurrent_module_on_the_raw_input_with_pytorch_defaults_is_refused():
    module = _RecurrentModuleNet(nn.GRU, project=False)
    with pytest.raises(UnsupportedModuleError, match="vanishes at infinite width"):
        compile_module(module, SEQ_D, steps=SEQ_T)
    compiled = compile_module(module, SEQ_D, steps=SEQ_T, init="measured")  # the module at its own width
    assert float(compiled.variance("rnn.weight_ih_l0")) > 0
    with pytest.raises(UnsupportedModuleError, match="bidirectional"):
        compile_module(_BidirectionalNet(), SEQ_D, steps=SEQ_T, init="measured")


class _BidirectionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.o = nn.RNN(SEQ_D, 8, batch_first=True, bidirectional=True), nn.Linear(16, 1)

    def forward(self, x):
        return self.o(self.rnn(x.view(x.shape[0], SEQ_T, SEQ_D))[0][:, -1])


class _ConvNet(nn.Module):
    def __init__(self, readout: str, width=8):
        super().__init__()
        self.c1 = nn.Conv2d(IMAGE_C, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding="same")
        pixels = {"flatten": IMAGE_H * IMAGE_W, "mean": 1, "pool": (IMAGE_H // 2) * (IMAGE_W // 2)}[readout]
        self.o, self.readout = nn.Linear(width * pixels, 1), readout

    def forward(self, x):
        h = torch.relu(self.c1(x.view(x.shape[0], IMAGE_C, IMAGE_H, IMAGE_W)))
        h = torch.tanh(self.c2(h))
        if self.readout == "flatten":
            return self.o(h.flatten(1))
        if self.readout == "pool":
            return self.o(F.avg_pool2d(h, 2).reshape(x.shape[0], -1))
        return self.o(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("readout", ["flatten", "mean", "pool"])
def test_a_compiled_cnn_equals_the_convolution_layers(kind, readout):
    readouts = {
        "flatten": [Flatten()],
        "mean": [GlobalAvgPool()],
        "pool": [AvgPool2d(2), Flatten()],
    }[readout]
    reference = Sequential(
        Conv2d(3, weight_variance=WV, bias_variance=BV),
        ReLU(),
        Conv2d(3, weight_variance=WV, bias_variance=BV),
        Tanh(),
        *readouts,
        Linear(WV, BV),
    )
    shape = (IMAGE_C, IMAGE_H, IMAGE_W)
    compiled = compile_module(_ConvNet(readout), IMAGE_C, grid=shape[1:], weight_variance=WV, bias_variance=BV)
    x = _x(3, math.prod(shape))
    expected = _dense(TensorProgramKernel(reference, kind=kind, input_shape=shape).double(), x)
    assert (
        relative_error(_dense(TensorProgramKernel(compiled, kind=kind, input_shape=shape).double(), x), expected)
        < 1e-12
    )


def test_kernel_from_module_compiles_a_gated_convolution_and_refuses_max_pooling():
    kernel = kernel_from_module(GatedConvolution(), "nngp", (IMAGE_C, IMAGE_H, IMAGE_W))
    assert isinstance(kernel.architecture, CompiledProgram)
    assert kernel(_x(2, IMAGE_C * IMAGE_H * IMAGE_W).float()).to_dense().shape == (2, 2)

    class MaxPooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Conv2d(IMAGE_C, 8, 3, padding=1), nn.Linear(8, 1)

        def forward(self, x):
            h = torch.relu(self.a(x.view(x.shape[0], IMAGE_C, IMAGE_H, IMAGE_W)))
            return self.o(F.adaptive_max_pool2d(h * torch.sigmoid(h), 1).flatten(1))

    with pytest.raises(UnsupportedModuleError, match="max_pool"):
        kernel_from_module(MaxPooled(), "nngp", (IMAGE_C, IMAGE_H, IMAGE_W))


@pytest.mark.parametrize("network", ["transformer-block", "gated-convolution"])
def test_attention_and_images_in_float32_with_finite_gradients(network):
    if network == "transformer-block":
        shape, options = (SEQ_T, SEQ_D), {"sequence": True}
        program = compile_module(PreNormBlock(), SEQ_D, steps=SEQ_T, weight_variance=WV, bias_variance=BV)
    else:
        shape, options = (IMAGE_C, IMAGE_H, IMAGE_W), {}
        program = compile_module(GatedConvolution(), IMAGE_C, grid=shape[1:], weight_variance=WV, bias_variance=BV)
    kernel = TensorProgramKernel(program, kind="ntk", input_shape=shape, **options).double()
    x = _x(4, math.prod(shape)).requires_grad_(True)
    k = kernel(x).to_dense()
    k.sum().backward()
    grads = [p.grad for p in kernel.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and torch.isfinite(x.grad).all()
    assert torch.linalg.eigvalsh(k.detach()).min() > 0
    k32 = kernel.float()(x.detach().float()).to_dense()
    assert k32.dtype == torch.float32
    assert relative_error(k32.double(), k.detach()) < 1e-5


class _Conv1dNet(nn.Module):
    def __init__(self, width=8, length=6):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(IMAGE_C, width, 3, padding=1), nn.Conv1d(width, width, 3, padding=1)
        self.o, self.length = nn.Linear(width * length // 2, 1), length

    def forward(self, x):
        h = torch.tanh(self.c2(torch.relu(self.c1(x.view(x.shape[0], IMAGE_C, self.length)))))
        return self.o(F.avg_pool1d(h, 2).flatten(1))


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_a_compiled_1d_cnn_equals_the_convolution_layers(kind):
    reference = Sequential(
        Conv1d(3, weight_variance=WV, bias_variance=BV),
        ReLU(),
        Conv1d(3, weight_variance=WV, bias_variance=BV),
        Tanh(),
        AvgPool1d(2),
        Flatten(),
        Linear(WV, BV),
    )
    compiled = compile_module(_Conv1dNet(), IMAGE_C, grid=(6,), weight_variance=WV, bias_variance=BV)
    x = _x(4, IMAGE_C * 6)
    kernels = [TensorProgramKernel(a, kind=kind, input_shape=(IMAGE_C, 6)).double() for a in (compiled, reference)]
    assert relative_error(_dense(kernels[0], x), _dense(kernels[1], x)) < 1e-12


class _HandWrittenBias(nn.Module):
    """A dense layer written as x @ W.T + b with its own (random) bias vector."""

    def __init__(self, width=8):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(width, 3) / math.sqrt(3)), nn.Parameter(torch.randn(width) * 0.3)
        self.o = nn.Linear(width, 1)

    def forward(self, x):
        return self.o(torch.tanh(x @ self.w.T + self.b))


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_a_bias_vector_written_by_hand_is_a_bias(kind):
    reference = Sequential(Linear(WV, BV), Tanh(), Linear(WV, BV))
    x = _x(5)
    expected = _dense(TensorProgramKernel(reference, kind=kind).double(), x)
    assert relative_error(_dense(_kernel(_HandWrittenBias(), kind), x), expected) < 1e-12
