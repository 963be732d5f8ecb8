"""``from_module``: torch.nn modules to infinite-width architectures.

1. For every supported module type, the converted kernel equals the kernel of the
   architecture built by hand from the documented variances (PyTorch's default
   initialisation: weight variance 1/3 per fan-in, bias variance 1/(3 fan-in) for layers
   reading the network input and 0 at infinite fan-in), NNGP and NTK.
2. The kernels are those of the user's REAL module: the Monte Carlo kernel of the module
   itself, at a wide width, approaches them (NNGP: output covariance, NTK: tangent kernel
   with the documented per-tensor learning-rate factors), closer than at a narrow width.
3. Unsupported modules and operations raise UnsupportedModuleError naming them and pointing
   at MonteCarloKernel; the registry takes new converters in one line.
4. BatchNorm networks with reference points: the converted kernel is the hand-built
   BatchNormMLPKernel, the real module in training mode (each point in a batch with the
   reference points) approaches it, and what it does not model raises.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import relative_error
from torch import nn

from gpytorch_tp import BatchNormMLPKernel, TensorProgramKernel
from gpytorch_tp import layers as L
from gpytorch_tp.conversion import (
    CONVERTERS,
    UnsupportedModuleError,
    from_module,
    kernel_from_module,
    ntk_parameter_scales,
    register_converter,
)
from gpytorch_tp.kernels import MonteCarloKernel
from gpytorch_tp.programs import CompiledProgram

DTYPE = torch.float64
THIRD = 1.0 / 3.0


def _inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return torch.cat([x, x[:1]])  # with a duplicate


def _assert_same_kernel(module, hand, input_shape=None, sequence=False, **options):
    shape = input_shape if input_shape is not None else (module[0].in_features,)
    x = _inputs(4, math.prod(shape))
    converted = kernel_from_module(module, "ntk", input_shape, **options).double()
    expected = TensorProgramKernel(
        hand, "ntk", input_shape=shape if len(shape) > 1 else None, sequence=sequence
    ).double()
    nngp, ntk = converted.nngp_and_ntk(x)
    nngp_hand, ntk_hand = expected.nngp_and_ntk(x)
    torch.testing.assert_close(nngp, nngp_hand, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ntk, ntk_hand, rtol=1e-12, atol=1e-14)
    assert nngp.std() > 0.01 * nngp.abs().mean()  # a kernel that depends on the inputs


# =============================================================================================
# 1. Converted kernel == hand-built kernel.
# =============================================================================================


def test_mlp_with_pytorch_default_init():
    module = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    hand = L.Sequential(L.Linear(THIRD, 1 / 9), L.ReLU(), L.Linear(THIRD, 0.0), L.Tanh(), L.Linear(THIRD, 0.0))
    _assert_same_kernel(module, hand)


class _Activation(nn.Module):
    def __init__(self, activation, d=3, width=8):
        super().__init__()
        self.first, self.activation, self.last = nn.Linear(d, width), activation, nn.Linear(width, 1)

    def forward(self, x):
        return self.last(self.activation(self.first(x)))


class _Functional(_Activation):
    def __init__(self, fn):
        super().__init__(nn.Identity())
        self.fn = fn

    def forward(self, x):
        return self.last(self.fn(self.first(x)))


ACTIVATIONS = {
    "nn.ReLU": (lambda: _Activation(nn.ReLU()), L.ReLU),
    "nn.GELU": (lambda: _Activation(nn.GELU()), L.GELU),
    "nn.Tanh": (lambda: _Activation(nn.Tanh()), L.Tanh),
    "nn.Sigmoid": (lambda: _Activation(nn.Sigmoid()), L.Sigmoid),
    "nn.SiLU": (lambda: _Activation(nn.SiLU()), L.SiLU),
    "nn.LeakyReLU": (lambda: _Activation(nn.LeakyReLU(0.2)), lambda: L.LeakyReLU(0.2)),
    "nn.Softplus": (lambda: _Activation(nn.Softplus()), L.Softplus),
    "F.relu": (lambda: _Functional(F.relu), L.ReLU),
    "torch.relu": (lambda: _Functional(torch.relu), L.ReLU),
    "Tensor.relu": (lambda: _Functional(lambda h: h.relu()), L.ReLU),
    "F.gelu": (lambda: _Functional(F.gelu), L.GELU),
    "torch.tanh": (lambda: _Functional(torch.tanh), L.Tanh),
    "torch.sigmoid": (lambda: _Functional(torch.sigmoid), L.Sigmoid),
    "F.silu": (lambda: _Functional(F.silu), L.SiLU),
    "F.leaky_relu": (lambda: _Functional(lambda h: F.leaky_relu(h, 0.3)), lambda: L.LeakyReLU(0.3)),
    "torch.erf": (lambda: _Functional(torch.erf), L.Erf),
    "nn.ELU": (lambda: _Activation(nn.ELU()), L.ELU),
    "nn.ELU(alpha=0.5)": (lambda: _Activation(nn.ELU(alpha=0.5)), lambda: L.ELU(0.5)),
    "F.elu": (lambda: _Functional(lambda h: F.elu(h, 2.0)), lambda: L.ELU(2.0)),
    "nn.Mish": (lambda: _Activation(nn.Mish()), L.Mish),
    "F.mish": (lambda: _Functional(F.mish), L.Mish),
}


@pytest.mark.parametrize("activation, layer_type", [(nn.ELU, L.ELU), (nn.Mish, L.Mish)])
def test_elu_and_mish_sequentials_convert_to_the_exact_kernel(activation, layer_type):
    module = nn.Sequential(nn.Linear(3, 16), activation(), nn.Linear(16, 1))
    kernel = kernel_from_module(module, "ntk")
    assert isinstance(kernel, TensorProgramKernel) and not isinstance(kernel, MonteCarloKernel)
    assert [type(layer) for layer in from_module(module).layers] == [L.Linear, layer_type, L.Linear]
    hand = L.Sequential(L.Linear(THIRD, 1 / 9), layer_type(), L.Linear(THIRD, 0.0))
    _assert_same_kernel(module, hand)


def test_every_registered_torch_module_and_function_converts_to_its_class():
    # The converter's tables are the registry's: each declared nn.Module type and torch function
    # of each registered nonlinearity gives that class.
    functions, methods, modules = L.torch_operations()
    assert {cls for cls in modules.values()} >= {L.ReLU, L.ELU, L.Mish, L.GELU, L.Softplus}
    for module_type, cls in modules.items():
        converted = from_module(nn.Sequential(nn.Linear(3, 4), module_type(), nn.Linear(4, 1)))
        assert type(converted.layers[1]) is cls, module_type
    for fn, cls in functions.items():
        converted = from_module(_Functional(fn))
        assert isinstance(converted.layers[1], cls), fn
    for name, cls in methods.items():
        converted = from_module(_Functional(lambda h, name=name: getattr(h, name)()))
        assert type(converted.layers[1]) is cls, name


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activations_and_their_functional_forms(name):
    make_module, make_layer = ACTIVATIONS[name]
    module = make_module()
    hand = L.Sequential(L.Linear(THIRD, 1 / 9), make_layer(), L.Linear(THIRD, 0.0))
    _assert_same_kernel(module, hand, input_shape=(3,))


class _ResidualMLP(nn.Module):
    """Residual additions written in forward: x + f(x), g(x) + f(x), with LayerNorm."""

    def __init__(self, d=3, width=8, out=1):
        super().__init__()
        self.embed = nn.Linear(d, width)
        self.block = nn.Linear(width, width)
        self.left, self.right = nn.Linear(width, width), nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.readout = nn.Linear(width, out)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.block(F.gelu(h))
        h = self.mix(self.norm(h))  # (a nonlinearity right after an affine LayerNorm has no NTK recursion)
        h = self.left(torch.relu(h)) + self.right(torch.tanh(h))
        return self.readout(F.relu(h))


def test_residual_sums_and_layer_norm():
    hand = L.Sequential(
        L.Linear(THIRD, 1 / 9),
        L.Residual(L.GELU(), L.Linear(THIRD, 0.0)),
        L.LayerNorm(elementwise_affine=True),
        L.Linear(THIRD, 0.0),
        L.Residual(L.ReLU(), L.Linear(THIRD, 0.0), skip=L.Sequential(L.Tanh(), L.Linear(THIRD, 0.0))),
        L.ReLU(),
        L.Linear(THIRD, 0.0),
    )
    _assert_same_kernel(_ResidualMLP(), hand, input_shape=(3,))


class _CNN(nn.Module):
    def __init__(self, width=4, out=1, readout="mean"):
        super().__init__()
        self.conv1 = nn.Conv2d(2, width, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding="same")
        self.readout = readout
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width, out)

    def forward(self, x):
        h = self.pool(self.conv1(x))
        h = h + self.conv2(F.relu(h))
        h = F.relu(self.conv3(torch.erf(h)))
        if self.readout == "mean":
            h = h.mean((2, 3))
        else:
            h = torch.flatten(self.global_pool(h), 1)
        return self.linear(h)


@pytest.mark.parametrize("readout", ["mean", "adaptive"])
def test_cnn_with_padding_stride_pooling_and_residual(readout):
    hand = L.Sequential(
        L.Conv2d(3, 2, "same", THIRD, 1 / 54),
        L.AvgPool2d(2),
        L.Residual(L.ReLU(), L.Conv2d(3, 1, "same", THIRD, 0.0)),
        L.Erf(),
        L.Conv2d(3, 1, "same", THIRD, 0.0),
        L.ReLU(),
        L.GlobalAvgPool(),
        L.Linear(THIRD, 0.0),
    )
    _assert_same_kernel(_CNN(readout=readout), hand, input_shape=(2, 7, 7))


def test_conv1d_with_flatten():
    module = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, 1))
    hand = L.Sequential(L.Conv1d(3, 1, "valid", THIRD, 1 / 18), L.Sigmoid(), L.Flatten(), L.Linear(THIRD, 0.0))
    _assert_same_kernel(module, hand, input_shape=(2, 6))


class _RNNNet(nn.Module):
    """An input projection, nn.RNN and a readout: the RNN's input then has infinite width."""

    def __init__(self, d=2, width=8, out=1, readout="last", cell=nn.RNN, **rnn):
        super().__init__()
        self.project = nn.Linear(d, width)
        self.rnn = cell(width, width, batch_first=True, **rnn)
        self.readout_kind = readout
        self.readout = nn.Linear(width * (2 if rnn.get("bidirectional") else 1), out)

    def forward(self, x):
        if isinstance(self.rnn, nn.LSTM):
            out, (h_n, _c_n) = self.rnn(self.project(x))
        else:
            out, h_n = self.rnn(self.project(x))
        if self.readout_kind == "last":
            return self.readout(out[:, -1])
        if self.readout_kind == "h_n":
            return self.readout(h_n[-1])
        return self.readout(out.mean(1))


@pytest.mark.parametrize(
    "readout, rnn, layers",
    [
        ("last", {}, lambda: [L.RNN("tanh", THIRD, THIRD, 0.0), L.LastStep()]),
        ("h_n", {"nonlinearity": "relu"}, lambda: [L.RNN("relu", THIRD, THIRD, 0.0), L.LastStep()]),
        (
            "mean",
            {"num_layers": 2, "bidirectional": True, "nonlinearity": "relu"},
            # Layer 2 reads both directions: fan-in 2H with per-weight variance 1/(3H).
            lambda: [
                L.RNN("relu", THIRD, THIRD, 0.0, bidirectional=True),
                L.RNN("relu", THIRD, 2 * THIRD, 0.0, bidirectional=True),
                L.TimeMean(),
            ],
        ),
    ],
)
def test_rnn_readouts_with_pytorch_default_init(readout, rnn, layers):
    hand = L.Sequential(L.Linear(THIRD, 1 / 6), *layers(), L.Linear(THIRD, 0.0))
    _assert_same_kernel(_RNNNet(readout=readout, **rnn), hand, input_shape=(4, 2), sequence=True)


def _assert_same_nngp(module, hand, input_shape, **options):
    """NNGP only; the particle integration is deterministic, so exact."""
    x = _inputs(3, math.prod(input_shape))
    converted = kernel_from_module(module, "nngp", input_shape, **options).double()
    expected = TensorProgramKernel(hand, "nngp", input_shape=input_shape, sequence=True).double()
    with torch.no_grad():
        nngp, nngp_hand = converted(x).to_dense(), expected(x).to_dense()
    torch.testing.assert_close(nngp, nngp_hand, rtol=1e-10, atol=1e-12)
    assert nngp.std() > 0.01 * nngp.abs().mean()


@pytest.mark.parametrize("cell, layer", [(nn.GRU, L.GRU), (nn.LSTM, L.LSTM)])
@pytest.mark.parametrize(
    "readout, options",
    [("last", {}), ("h_n", {"num_layers": 2}), ("mean", {"bias": False})],
)
def test_gated_readouts_with_pytorch_default_init(cell, layer, readout, options):
    # Every tensor of nn.GRU/LSTM is U(+-1/sqrt(H)): recurrent and (infinite-width) input weights 1/3 per
    # fan-in, the biases b_ih + b_hh vanish; the sigmoid gates and tanh candidate of torch's cells.
    gated = [layer("tanh", "sigmoid", THIRD, THIRD, 0.0) for _ in range(options.get("num_layers", 1))]
    readout_layer = L.TimeMean() if readout == "mean" else L.LastStep()
    hand = L.Sequential(L.Linear(THIRD, 1 / 6), *gated, readout_layer, L.Linear(THIRD, 0.0))
    module = _RNNNet(readout=readout, cell=cell, **options)
    _assert_same_nngp(module, hand, (3, 2))


@pytest.mark.parametrize("cell, layer", [(nn.GRU, L.GRU), (nn.LSTM, L.LSTM)])
def test_gated_explicit_and_measured_variances(cell, layer):
    hand = L.Sequential(L.Linear(0.5, 0.2), layer("tanh", "sigmoid", 0.5, 1.5, 0.2), L.LastStep(), L.Linear(0.5, 0.2))
    module = _RNNNet(cell=cell)
    _assert_same_nngp(module, hand, (3, 2), weight_variance=0.5, bias_variance=0.2, input_variance=1.5)
    # Measured: fan-in times the mean square of each weight tensor (all gates), and the variance of each
    # gate pre-activation's bias, b_ih + b_hh (the GRU's b_in and b_hn each alone).
    torch.manual_seed(0)
    module = _RNNNet(width=16, cell=cell).double()  # float64 parameters: the moments below hold to rounding
    gates = 3 if cell is nn.GRU else 4
    nn.init.normal_(module.rnn.weight_ih_l0, std=0.4)
    nn.init.normal_(module.rnn.weight_hh_l0, std=0.2)
    with torch.no_grad():
        for bias in (module.rnn.bias_ih_l0, module.rnn.bias_hh_l0):
            bias.copy_(torch.linspace(-1, 1, 16, dtype=DTYPE).repeat(gates) * 0.3)
        if cell is nn.GRU:  # b_in and b_hn carry the whole bias of their terms: twice b_ir's variance
            module.rnn.bias_ih_l0[32:] *= math.sqrt(2)
            module.rnn.bias_hh_l0[32:] *= math.sqrt(2)
    mean_square = {name: (p.detach().double() ** 2).mean().item() for name, p in module.named_parameters()}
    bias = 2 * 0.3**2 * (torch.linspace(-1, 1, 16, dtype=DTYPE) ** 2).mean().item()  # b_ih + b_hh, per gate
    hand = L.Sequential(
        L.Linear(2 * mean_square["project.weight"], mean_square["project.bias"]),
        layer("tanh", "sigmoid", 16 * mean_square["rnn.weight_hh_l0"], 16 * mean_square["rnn.weight_ih_l0"], bias),
        L.LastStep(),
        L.Linear(16 * mean_square["readout.weight"], mean_square["readout.bias"]),
    )
    _assert_same_nngp(module, hand, (3, 2), init="measured")


def test_gated_layers_refuse_what_they_cannot_express():
    with pytest.raises(UnsupportedModuleError, match=r"GRU 'rnn'.*bidirectional.*MonteCarloKernel"):
        from_module(_RNNNet(cell=nn.GRU, bidirectional=True), (3, 2))
    with pytest.raises(UnsupportedModuleError, match=r"LSTM 'rnn'.*bidirectional"):
        from_module(_RNNNet(cell=nn.LSTM, bidirectional=True), (3, 2))
    projected = _RNNNet(cell=nn.LSTM, proj_size=4)
    projected.readout = nn.Linear(4, 1)
    with pytest.raises(UnsupportedModuleError, match=r"LSTM 'rnn'.*proj_size"):
        from_module(projected, (3, 2))
    # PyTorch's default GRU biases: b_in, b_hn have half the variance of b_ir + b_hr, which one layer
    # bias variance cannot express.
    with pytest.raises(UnsupportedModuleError, match=r"GRU 'rnn'.*measured bias variances.*bias_variance="):
        from_module(_RNNNet(width=64, cell=nn.GRU), (3, 2), init="measured")

    class Bare(nn.Module):
        def __init__(self, cell, use_cell_state=False):
            super().__init__()
            self.rnn, self.readout = cell(2, 8, batch_first=True), nn.Linear(8, 1)
            self.use_cell_state = use_cell_state

        def forward(self, x):
            _out, (h_n, c_n) = self.rnn(x)
            return self.readout(c_n[-1] if self.use_cell_state else h_n[-1])

    with pytest.raises(UnsupportedModuleError, match=r"LSTM 'rnn'.*vanishes at infinite width"):
        from_module(Bare(nn.LSTM), (3, 2))
    with pytest.raises(UnsupportedModuleError, match=r"cell state c_n"):
        from_module(Bare(nn.LSTM, use_cell_state=True), (3, 2), input_variance=1.0)
    unidirectional = from_module(Bare(nn.LSTM), (3, 2), input_variance=1.0)
    assert isinstance(unidirectional[0], L.LSTM) and unidirectional[0].input_variance.item() == pytest.approx(1.0)


@pytest.mark.parametrize("cell, layer", [(nn.GRU, L.GRU), (nn.LSTM, L.LSTM)])
def test_gated_ntk_with_pytorch_default_init(cell, layer):
    # The NTK too: the particle integration is deterministic, so converted == hand-built exactly.
    hand = L.Sequential(
        L.Linear(THIRD, 1 / 6), layer("tanh", "sigmoid", THIRD, THIRD, 0.0), L.LastStep(), L.Linear(THIRD, 0.0)
    )
    _assert_same_kernel(_RNNNet(cell=cell), hand, input_shape=(3, 2), sequence=True)


def test_explicit_variances_override_the_initialisation():
    module = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))
    hand = L.Sequential(L.Linear(2.0, 0.1), L.ReLU(), L.Linear(2.0, 0.1))
    _assert_same_kernel(module, hand, weight_variance=2.0, bias_variance=0.1)


def test_measured_variances_are_the_moments_of_the_parameters():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 1))
    nn.init.normal_(module[0].weight, std=0.9)
    nn.init.normal_(module[0].bias, std=0.3)
    nn.init.normal_(module[2].weight, std=0.2)
    first, last = module[0], module[2]
    hand = L.Sequential(
        L.Linear(3 * (first.weight.double() ** 2).mean().item(), (first.bias.double() ** 2).mean().item()),
        L.ReLU(),
        L.Linear(32 * (last.weight.double() ** 2).mean().item(), (last.bias.double() ** 2).mean().item()),
    )
    _assert_same_kernel(module, hand, init="measured")


def test_rnn_with_default_init_on_the_network_input_raises_the_documented_error():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.readout = nn.RNN(2, 8, batch_first=True), nn.Linear(8, 1)

        def forward(self, x):
            return self.readout(self.rnn(x)[0][:, -1])

    with pytest.raises(UnsupportedModuleError, match=r"RNN 'rnn'.*vanishes at infinite width.*MonteCarloKernel"):
        from_module(Bare(), (4, 2))
    # The two remedies the message names.
    assert isinstance(from_module(Bare(), (4, 2), input_variance=1.0)[0], L.RNN)
    measured = from_module(Bare(), (4, 2), init="measured")[0]
    assert 0 < measured.input_variance.item() < 1


def test_reinitialised_module_warns_under_pytorch_init():
    module = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    nn.init.normal_(module[0].weight)
    with pytest.warns(UserWarning, match="re-initialised"):
        from_module(module)


def test_conversion_leaves_the_module_untouched():
    module = _ResidualMLP()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    from_module(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# =============================================================================================
# 2. The user's real module at large width approaches the converted kernels.
# =============================================================================================
#
# NNGP: MonteCarloKernel of the real module with a wide readout (out = width: i.i.d. outputs
# given the last hidden layer), SAMPLES["nngp"] networks.  NTK: MonteCarloKernel(kind="ntk") of
# the real module with one output and parameter_scales=ntk_parameter_scales (the documented
# meaning of from_module's NTK), SAMPLES["ntk"] networks.  Check: relative Frobenius error below
# BOUNDS at the wide width and below the error at the narrow width.
#
# Calibration (4 seed sets each): NNGP at the wide width 0.054-0.124 (MLP, 512), 0.013-0.056
# (RNN, 512), 0.028-0.087 (CNN, 128), 0.024-0.058 (Conv1d zoo, 512), 0.024-0.092 (RNN mean, 512);
# at the narrow width 1.6-2.4, 0.62-1.1, 0.15-0.40, 0.23-0.38, 1.4-2.4.  NTK at
# 256: 0.049-0.068 (MLP), 0.018-0.033 (RNN); at 16: 0.12-0.19, 0.08-0.26.  GRU / 2-layer LSTM
# (NNGP, 1024 particles, includes their quasi-Monte Carlo error): 0.029-0.078 / 0.019-0.031 at 512,
# 1.1-1.8 / 0.15-0.27 at 16.  The finite-width
# error is mostly PyTorch's hidden biases (variance 1/(3 width), zero in the limit).  The CNN's
# NTK (conv weights scale like dense ones) is left to the exact-equality tests above, for time.

SAMPLES = {"nngp": 8, "ntk": 4}
BOUNDS = {"nngp": 0.15, "ntk": 0.1}


def _kaiming_normal_zero_bias(module: nn.Module) -> nn.Module:
    """A common user initialisation: weights N(0, 2 / fan_in), biases 0 (sigma_w^2 = 2, sigma_b^2 = 0)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(sub.weight, nonlinearity="relu")
            nn.init.zeros_(sub.bias)
    return module


def _zero_biases(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "bias" in name:
                parameter.zero_()
    return module


def _unsquashed(module: _Conv1dZoo) -> _Conv1dZoo:
    module.squash = False
    return module


# name: (module(width, out), input_shape, {kind: (wide, narrow)}, from_module options)
FAMILIES = {
    # PyTorch's default initialisation.
    "mlp-residual-layernorm": (lambda w, o: _ResidualMLP(3, w, o), (3,), {"nngp": (512, 16), "ntk": (256, 16)}, {}),
    "rnn": (lambda w, o: _RNNNet(2, w, o), (4, 2), {"nngp": (512, 16), "ntk": (256, 16)}, {}),
    # With PyTorch's default init the CNN kernel is small (weight variance 1/3 per layer) next to
    # the 1/(3 width) variance of the finite readout bias, so the test uses a user-chosen init.
    "cnn": (
        lambda w, o: _kaiming_normal_zero_bias(_CNN(w, o)),
        (2, 7, 7),
        {"nngp": (128, 8)},
        {"weight_variance": 2.0, "bias_variance": 0.0},
    ),
    "conv1d-zoo": (
        lambda w, o: _kaiming_normal_zero_bias(_unsquashed(_Conv1dZoo(w, o))),
        (2, 6),
        {"nngp": (512, 8)},
        {"weight_variance": 2.0, "bias_variance": 0.0},
    ),
    "rnn-mean": (lambda w, o: _RNNMean(w, o), (4, 2), {"nngp": (512, 16)}, {}),
    "gru": (lambda w, o: _RNNNet(2, w, o, cell=nn.GRU), (3, 2), {"nngp": (512, 16)}, {}),
    # The stacked LSTM's kernel is small (gates near 1/2 halve the state twice per layer) next to the
    # 1/(3 width) variance of PyTorch's finite biases: the test zeroes them (a user init).
    "lstm": (
        lambda w, o: _zero_biases(_RNNNet(2, w, o, "h_n", cell=nn.LSTM, num_layers=2)),
        (3, 2),
        {"nngp": (512, 16)},
        {"bias_variance": 0.0},
    ),
}




class _Flattened(nn.Module):
    """The user's module, taking the kernels' flattened items."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.shape, self.module = shape, module

    def forward(self, x):
        return self.module(x.reshape(x.shape[0], *self.shape))


@pytest.mark.parametrize("family, kind", [(family, kind) for family, spec in FAMILIES.items() for kind in spec[2]])
def test_monte_carlo_kernel_of_the_real_module_approaches_the_converted_kernel(family, kind):
    make, shape, widths, options = FAMILIES[family]
    wide, narrow = widths[kind]
    x = _inputs(4, math.prod(shape), seed=1)
    exact = kernel_from_module(make(8, 1), kind, shape, **options).double()(x).to_dense().detach()

    def estimate(width):
        out = width if kind == "nngp" else 1  # a wide readout averages the NNGP over i.i.d. outputs
        # The factors (variance / fan-in) depend on the module's sizes and init scheme, not on its values.
        scales = ntk_parameter_scales(make(width, out), shape, **options) if kind == "ntk" else {}
        scales = {f"module.{name}": value for name, value in scales.items()}
        kernel = MonteCarloKernel(
            lambda: _Flattened(make(width, out), shape),
            kind,
            SAMPLES[kind],
            seed=width,
            parameter_scales=scales if kind == "ntk" else None,
        )
        with torch.no_grad():
            return kernel(x).to_dense()

    error_wide, error_narrow = relative_error(estimate(wide), exact), relative_error(estimate(narrow), exact)
    assert error_wide < BOUNDS[kind], (error_wide, error_narrow)
    assert error_wide < error_narrow, (error_wide, error_narrow)


class _Conv1dZoo(nn.Module):
    """The remaining module types in one network: Conv1d, SiLU, LeakyReLU, AvgPool1d, Flatten, Sigmoid, Softplus.

    Sigmoid and softplus outputs have a large mean, which makes the kernel nearly constant: the Monte
    Carlo comparison leaves them out (``squash=False``), the exact-equality test keeps them.
    """

    def __init__(self, width=4, out=1):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(2, width, 3, padding=1), nn.Conv1d(width, width, 3)
        self.pool = nn.AvgPool1d(2)
        self.dense, self.dense2 = nn.Linear(width * 2, width), nn.Linear(width, width)
        self.readout = nn.Linear(width, out)
        self.squash = True

    def forward(self, x):
        h = self.pool(self.conv2(F.silu(self.conv1(x))))
        h = self.dense(torch.flatten(F.leaky_relu(h, 0.1), 1))
        if self.squash:
            h = self.dense2(torch.sigmoid(h))
            return self.readout(F.softplus(h))
        return self.readout(h)


class _RNNMean(_RNNNet):
    def __init__(self, width=4, out=1):
        super().__init__(2, width, out, readout="mean", nonlinearity="relu")


def test_conv1d_zoo_and_rnn_mean_converted_exactly():
    hand = L.Sequential(
        L.Conv1d(3, 1, "same", 2.0, 0.0),
        L.SiLU(),
        L.Conv1d(3, 1, "valid", 2.0, 0.0),
        L.AvgPool1d(2),
        L.LeakyReLU(0.1),
        L.Flatten(),
        L.Linear(2.0, 0.0),
        L.Sigmoid(),
        L.Linear(2.0, 0.0),
        L.Softplus(),
        L.Linear(2.0, 0.0),
    )
    _assert_same_kernel(_Conv1dZoo(), hand, input_shape=(2, 6), weight_variance=2.0, bias_variance=0.0)
    hand = L.Sequential(L.Linear(THIRD, 1 / 6), L.RNN("relu", THIRD, THIRD, 0.0), L.TimeMean(), L.Linear(THIRD, 0.0))
    _assert_same_kernel(_RNNMean(), hand, input_shape=(4, 2), sequence=True)


# =============================================================================================
# 3. Unsupported modules and operations; the registry.
# =============================================================================================


class _Wrap(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.first = nn.Linear(3, 8)
        for name, m in modules.items():
            setattr(self, name, m)
        self.fn = fn
        self.last = nn.Linear(8, 1)

    def forward(self, x):
        return self.last(self.fn(self, self.first(x)))


UNSUPPORTED = {
    "GRU on features": (lambda: nn.Sequential(nn.Linear(3, 8), nn.GRU(8, 8)), r"GRU '1' on a tensor.*sequences"),
    "LSTM on features": (lambda: nn.Sequential(nn.Linear(3, 8), nn.LSTM(8, 8)), r"LSTM '1' on a tensor.*sequences"),
    "BatchNorm1d": (
        lambda: nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)),
        r"BatchNorm1d '1'.*reference_points=R",
    ),
    "MultiheadAttention": (
        lambda: _Wrap(lambda s, h: s.attention(h, h, h)[0], attention=nn.MultiheadAttention(8, 2)),
        r"MultiheadAttention 'attention'.*no closed form",
    ),
    "MaxPool1d": (lambda: nn.Sequential(nn.Linear(3, 8), nn.MaxPool1d(2)), r"MaxPool1d '1'.*no closed-form"),
    "softmax": (lambda: _Wrap(lambda s, h: torch.softmax(h, -1)), r"'softmax'"),
    "linear on a grid": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.Linear(4, 1)), r"Linear '1' on a tensor"),
    "nonlinearity on the input": (lambda: nn.Sequential(nn.ReLU(), nn.Linear(3, 1)), r"needs centred Gaussian"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_modules_raise_an_error_naming_them_and_the_monte_carlo_kernel(name):
    make, pattern = UNSUPPORTED[name]
    module = make()
    shape = (2, 6) if name == "linear on a grid" else (3,)
    with pytest.raises(UnsupportedModuleError, match=pattern) as info:
        from_module(module, shape)
    assert "MonteCarloKernel" in str(info.value)
    assert isinstance(info.value, NotImplementedError)


# What the layer vocabulary refused and the tensor-program compiler now gives exactly:
# (module, the hand-written architecture of its kernel).
COMPILED = {
    "scaling": (lambda: _Wrap(lambda s, h: 2 * h), lambda: [L.Linear(THIRD, 1 / 9), L.Linear(4 * THIRD, 0.0)]),
    "self sum": (lambda: _Wrap(lambda s, h: h + h), lambda: [L.Linear(THIRD, 1 / 9), L.Linear(4 * THIRD, 0.0)]),
    # a chain reusing one matrix has the independent layers' kernels (no transposes: Tensor Programs II)
    "shared weights": (
        lambda: _Wrap(lambda s, h: s.first2(torch.relu(s.first2(h))), first2=nn.Linear(8, 8)),
        lambda: [L.Linear(THIRD, 1 / 9), L.Linear(THIRD, 0.0), L.ReLU(), L.Linear(THIRD, 0.0), L.Linear(THIRD, 0.0)],
    ),
}


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("name", list(COMPILED))
def test_networks_outside_the_layer_vocabulary_are_compiled_exactly(name, kind):
    make, hand = COMPILED[name]
    kernel = kernel_from_module(make(), kind, (3,)).double()
    assert isinstance(kernel.architecture, CompiledProgram)
    x = _inputs(4, 3)
    expected = TensorProgramKernel(L.Sequential(*hand()), kind=kind).double()(x).to_dense()
    torch.testing.assert_close(kernel(x).to_dense(), expected, rtol=1e-12, atol=1e-12)


def test_a_converter_registers_in_one_line():
    class Cube(nn.Module):
        def forward(self, x):
            return x**3

    module = nn.Sequential(nn.Linear(3, 8), Cube(), nn.Linear(8, 1))
    assert isinstance(from_module(module)[0], CompiledProgram)  # compiled (x**3 by quadrature) until ...
    try:
        register_converter(Cube, lambda m, context: ([L.Elementwise(_cube, name="cube")], context.value.layout))
        converted = from_module(module)  # ... a converter is registered, which comes first
        assert not isinstance(converted[0], CompiledProgram)
    finally:
        CONVERTERS.pop(Cube)
    x = _inputs(4, 3)
    hand = L.Sequential(L.Linear(THIRD, 1 / 9), L.Elementwise(_cube), L.Linear(THIRD, 0.0))
    torch.testing.assert_close(
        TensorProgramKernel(converted).double()(x).to_dense(), TensorProgramKernel(hand).double()(x).to_dense()
    )


def _cube(x):
    return x**3


def test_bad_arguments():
    module = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="init must be one of"):
        from_module(module, init="xavier")
    with pytest.raises(ValueError, match="weight_variance"):
        from_module(module, weight_variance=-1.0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        from_module(lambda x: x)
    with pytest.raises(ValueError, match="needs input_shape"):
        from_module(nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(16, 1)))


# =============================================================================================
# 4. BatchNorm networks: kernel_from_module(..., reference_points=R) is a BatchNormMLPKernel.
# =============================================================================================
#
# 8 features and 7 reference points: the pairwise NTK is finite only for batches of centred rank
# at least 3, and the per-network NTK has heavy tails for low-rank batches (docs/batchnorm.md).


def _batchnorm_data(points: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    reference = torch.randn(7, 8, generator=generator, dtype=DTYPE)
    x = torch.randn(points, 8, generator=generator, dtype=DTYPE)
    return reference, torch.cat([x, x[:1]])  # with a duplicate


def _batchnorm_mlp(width=16, out=1, depth=2, d=8, **batchnorm) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU, ``depth`` times, and a Linear readout: PyTorch's default init."""
    modules, fan_in = [], d
    for _ in range(depth):
        modules += [nn.Linear(fan_in, width), nn.BatchNorm1d(width, **batchnorm), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*modules, nn.Linear(fan_in, out))


class _BatchNormFunctional(nn.Module):
    """A forward with F.relu and nn.Identity; no biases, BatchNorm without affine parameters or running statistics."""

    def __init__(self, d=8, width=16):
        super().__init__()
        self.first = nn.Linear(d, width, bias=False)
        self.norm = nn.BatchNorm1d(width, eps=1e-3, affine=False, track_running_stats=False)
        self.identity, self.dropout = nn.Identity(), nn.Dropout(0.0)
        self.readout = nn.Linear(width, 1, bias=False)

    def forward(self, x):
        return self.readout(self.dropout(F.relu(self.identity(self.norm(self.first(x))))))


def _measured_batchnorm_mlp() -> tuple[nn.Module, dict]:
    """A user initialisation (normal weights and biases, BatchNorm gains around 1) and its moments."""
    torch.manual_seed(3)
    module = _batchnorm_mlp(width=32)
    for sub in module:
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=0.5 / math.sqrt(sub.in_features))
            nn.init.normal_(sub.bias, std=0.2)
        elif isinstance(sub, nn.BatchNorm1d):
            nn.init.normal_(sub.weight, mean=1.0, std=0.5)

    def moment(tensor):
        return tensor.detach().double().pow(2).mean().item()

    linear = [module[0], module[3], module[6]]
    gains = [1.0, moment(module[1].weight), moment(module[4].weight)]  # each multiplies the next layer
    weights = [layer.in_features * moment(layer.weight) * gain for layer, gain in zip(linear, gains)]
    return module, {"depth": 2, "weight_variance": weights, "bias_variance": [moment(lay.bias) for lay in linear]}


BATCHNORM_NETWORKS = {
    # name: (module, from_module options, the hand-built kernel's options)
    "pytorch-init": (
        lambda: _batchnorm_mlp(),
        {},
        {"depth": 2, "weight_variance": THIRD, "bias_variance": [1 / 24, 0.0, 0.0], "eps": 1e-5},
    ),
    "functional-no-affine": (
        _BatchNormFunctional,
        {},
        {"depth": 1, "weight_variance": THIRD, "bias_variance": 0.0, "eps": 1e-3},
    ),
    "explicit": (
        lambda: _batchnorm_mlp(depth=1),
        {"weight_variance": 2.0, "bias_variance": 0.1},
        {"depth": 1, "weight_variance": 2.0, "bias_variance": 0.1, "eps": 1e-5},
    ),
    "measured": (lambda: _measured_batchnorm_mlp()[0], {"init": "measured"}, None),
}


@pytest.mark.parametrize("name", list(BATCHNORM_NETWORKS))
def test_batchnorm_network_converts_to_the_hand_built_batchnorm_kernel(name):
    make, options, expected = BATCHNORM_NETWORKS[name]
    if expected is None:
        expected = {**_measured_batchnorm_mlp()[1], "eps": 1e-5}
    reference, x = _batchnorm_data()
    module = make()
    for kind in ("nngp", "ntk"):
        converted = kernel_from_module(module, kind, reference_points=reference, accuracy="fast", **options)
        hand = BatchNormMLPKernel(reference, kind=kind, accuracy="fast", **expected)
        assert isinstance(converted, BatchNormMLPKernel) and converted.depth == hand.depth
        assert converted.eps == hand.eps and torch.equal(converted.reference_points, reference)
        with torch.no_grad():
            value, value_hand = converted.double()(x).to_dense(), hand.double()(x).to_dense()
        torch.testing.assert_close(value, value_hand, rtol=1e-10, atol=0)
        assert value.std() > 0.05 * value.abs().mean()  # a kernel that depends on the inputs


def test_batchnorm_affine_parameters_are_frozen_in_the_ntk_and_the_module_untouched():
    module = _batchnorm_mlp()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    scales = ntk_parameter_scales(module)
    assert scales["1.weight"] == scales["1.bias"] == scales["4.weight"] == scales["4.bias"] == 0.0
    assert scales["0.weight"] == pytest.approx(THIRD / 8) and scales["3.weight"] == pytest.approx(THIRD / 16)
    kernel_from_module(module, reference_points=_batchnorm_data()[0])
    # The example run (training mode) must not update the user's BatchNorm running statistics.
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    with torch.no_grad():
        module[1].weight.fill_(2.0)
    with pytest.warns(UserWarning, match="BatchNorm1d '1'.*re-initialised"):
        kernel_from_module(module, reference_points=_batchnorm_data()[0])


class _EachWithReference(nn.Module):
    """The module in training mode on each item's own batch ``[x_i; R]``, read at ``x_i``.

    This is the definition of BatchNormMLPKernel's ``k(x, x')``: one random function of ``x``.
    """

    def __init__(self, module: nn.Module, reference: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("reference", reference)

    def forward(self, x):
        return torch.stack([self.module(torch.cat([item.unsqueeze(0), self.reference]))[0] for item in x])


def _kaiming_normal_batchnorm_mlp(width, out):
    # torch.func's Jacobians cannot update the running statistics (not used in training mode anyway).
    return _kaiming_normal_zero_bias(_batchnorm_mlp(width, out, depth=1, track_running_stats=False))


# kind: (module(width, out), from_module options, samples, (wide, narrow) widths)
# NNGP: PyTorch's default initialisation.  NTK: the documented per-tensor factors; with normal first-layer
# weights: PyTorch's uniform ones on 8 input features make the first pre-activations non-Gaussian, which
# moves this NTK by about 10% even at infinite width (measured: 0.09-0.13 at width 512 and 2048; 0.008 at
# 2048 with 64 features).
# Calibration (3 seed sets): NNGP 0.035-0.076 at 512, 0.10-0.51 at 32; NTK 0.022-0.08 at 512, 0.16-0.49 at 32.
BATCHNORM_FAMILIES = {
    "nngp": (lambda width, out: _batchnorm_mlp(width, out), {}, 8, (512, 32)),
    "ntk": (_kaiming_normal_batchnorm_mlp, {"weight_variance": 2.0, "bias_variance": 0.0}, 6, (512, 32)),
}


@pytest.mark.parametrize("kind", list(BATCHNORM_FAMILIES))
def test_real_batchnorm_module_in_training_mode_approaches_the_converted_kernel(kind):
    make, options, samples, (wide, narrow) = BATCHNORM_FAMILIES[kind]
    reference, x = _batchnorm_data(4)
    kernel = kernel_from_module(make(8, 1), kind, reference_points=reference, **options).double()
    with torch.no_grad():
        exact = kernel(x).to_dense()

    def estimate(width):
        out = width if kind == "nngp" else 1  # a wide readout averages the NNGP over i.i.d. outputs
        scales = {f"module.{k}": v for k, v in ntk_parameter_scales(make(width, out), **options).items()}
        estimator = MonteCarloKernel(
            lambda: _EachWithReference(make(width, out), reference),
            kind,
            samples,
            seed=width,
            parameter_scales=scales if kind == "ntk" else None,
            train_mode=True,
        )
        with torch.no_grad():
            return estimator(x).to_dense()

    error_wide, error_narrow = relative_error(estimate(wide), exact), relative_error(estimate(narrow), exact)
    assert error_wide < 0.12, (error_wide, error_narrow)
    assert error_wide < error_narrow, (error_wide, error_narrow)


class _BatchNormResidual(nn.Module):
    def __init__(self, d=8, width=16):
        super().__init__()
        self.embed, self.block, self.readout = nn.Linear(d, width), nn.Linear(width, width), nn.Linear(width, 1)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x):
        h = self.embed(x)
        return self.readout(h + self.block(F.relu(self.norm(h))))


BATCHNORM_UNSUPPORTED = {
    # name: (module, input_shape, options, pattern)
    "before tanh": (
        lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1)),
        None,
        {},
        r"BatchNorm1d '1'.*followed by Tanh '2', not by a ReLU",
    ),
    "relu before batchnorm": (
        lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 1)),
        None,
        {},
        r"ReLU '1'.*follows Linear '0' where a BatchNorm1d belongs",
    ),
    "no readout": (
        lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()),
        None,
        {},
        r"ReLU '2'.*followed by the network output, not by a Linear",
    ),
    "residual": (_BatchNormResidual, None, {}, r"'add'.*residual connection.*where a BatchNorm1d belongs"),
    "eval mode": (lambda: _batchnorm_mlp().eval(), None, {}, r"BatchNorm1d '1' in eval mode.*running statistics"),
    "BatchNorm2d": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 1)),
        (2, 5, 5),
        {},
        r"BatchNorm2d '1'.*over the batch and the grid",
    ),
    "BatchNorm1d on a grid": (
        lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 1)),
        (2, 6),
        {},
        r"BatchNorm1d '1' on a tensor.*\(N, C, L\)",
    ),
    "dropout": (
        lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1)),
        None,
        {},
        r"Dropout '3' \(p=0.1\).*training mode",
    ),
    "two eps": (
        lambda: nn.Sequential(*list(_batchnorm_mlp())[:4], nn.BatchNorm1d(16, eps=1e-3), *list(_batchnorm_mlp())[5:]),
        None,
        {},
        r"BatchNorm1d '1', BatchNorm1d '4'.*eps differ",
    ),
    "measured shift": (
        lambda: _batchnorm_mlp().apply(lambda m: nn.init.ones_(m.bias) if isinstance(m, nn.BatchNorm1d) else None),
        None,
        {"init": "measured"},
        r"BatchNorm1d '1'.*shift \(bias\) is not zero",
    ),
}


@pytest.mark.parametrize("name", list(BATCHNORM_UNSUPPORTED))
def test_batchnorm_networks_the_kernel_does_not_model_raise(name):
    make, shape, options, pattern = BATCHNORM_UNSUPPORTED[name]
    reference = torch.randn(3, math.prod(shape) if shape else 8, dtype=DTYPE)
    with pytest.raises(UnsupportedModuleError, match=pattern) as info:
        kernel_from_module(make(), "nngp", shape, reference_points=reference, **options)
    assert "MonteCarloKernel" in str(info.value)


def test_batchnorm_without_reference_points_and_reference_points_without_batchnorm():
    for convert in (from_module, kernel_from_module):
        with pytest.raises(UnsupportedModuleError, match=r"BatchNorm1d '1'.*reference_points=R"):
            convert(_batchnorm_mlp())
    with pytest.raises(ValueError, match="reference_points is for networks with nn.BatchNorm1d"):
        kernel_from_module(
            nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)), reference_points=torch.randn(3, 8)
        )
    with pytest.raises(ValueError, match="reference_points has 3 features"):
        kernel_from_module(_batchnorm_mlp(), reference_points=torch.randn(3, 3))
    with pytest.raises(ValueError, match="eps is the BatchNorm1d layers' own"):
        kernel_from_module(_batchnorm_mlp(), reference_points=torch.randn(3, 8), eps=0.1)
