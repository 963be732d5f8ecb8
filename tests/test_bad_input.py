"""Bad input gets a clear error naming the problem, or a mathematically correct value -- never a NaN.

Cases:
* feature-dimension mismatch between x1 and x2, or against ``input_dim``;
* NaN / inf inputs; integer inputs; mixed dtypes; 1-d inputs to ``evaluate``;
* negative, zero (where not allowed), NaN variances, at construction and via setters;
* unknown nonlinearity, wrong ``kind``, negative depth, non-layer in ``Sequential``;
* layers used where the infinite-width recursion does not apply (nonlinearity on raw
  input, centred LayerNorm after a nonlinearity, residual branches without own weights);
* ``diag=True`` with different numbers of points;
* zero-norm inputs with zero bias variance (0/0 in the correlation): a correct value.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpytorch_tp import MLPKernel, TensorProgramKernel, evaluate
from gpytorch_tp.layers import NONLINEARITIES, LayerNorm, Linear, ReLU, Residual, Sequential, nonlinearity_from_name


def test_feature_dimension_mismatch():
    k = MLPKernel(depth=1)
    with pytest.raises((ValueError, RuntimeError), match="features|dimensions"):
        k(torch.randn(4, 3), torch.randn(5, 2)).to_dense()
    with pytest.raises(ValueError, match="x1 has 3 features but x2 has 2"):
        k.forward(torch.randn(4, 3), torch.randn(5, 2))
    k3 = MLPKernel(depth=1, input_dim=3)
    with pytest.raises(ValueError, match="expects 3"):
        k3(torch.randn(4, 4)).to_dense()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(bad):
    x = torch.randn(4, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        MLPKernel(depth=1)(x).to_dense()
    with pytest.raises(ValueError, match="NaN or infinite"):
        MLPKernel(depth=1)(torch.randn(2, 3), x).to_dense()


def test_wrong_input_types():
    with pytest.raises(TypeError, match="floating point"):
        MLPKernel(depth=1).forward(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="float32 but x2 is torch.float64"):
        MLPKernel(depth=1).forward(torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        evaluate(Sequential(Linear()), torch.ones(3))


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_invalid_variances_at_construction(value):
    with pytest.raises(ValueError, match="weight_variance"):
        Linear(weight_variance=value)
    with pytest.raises(ValueError, match="bias_variance"):
        Linear(bias_variance=value)


def test_zero_weight_variance_is_refused_and_zero_bias_is_fixed():
    with pytest.raises(ValueError, match="weight_variance must be positive"):
        Linear(weight_variance=0.0)
    with pytest.raises(ValueError, match="cannot be learned"):
        Linear(bias_variance=0.0, learn_bias_variance=True)
    layer = Linear(bias_variance=0.0)
    assert float(layer.bias_variance) == 0.0


def test_invalid_variances_via_setters():
    layer = Linear(2.0, 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        layer.weight_variance = -0.5
    with pytest.raises(ValueError, match="non-negative"):
        layer.bias_variance = float("nan")
    with pytest.raises(ValueError, match="lower bound"):
        layer.weight_variance = 0.0


def test_unknown_nonlinearity_wrong_kind_bad_depth():
    with pytest.raises(ValueError, match="unknown nonlinearity 'relu6'"):
        MLPKernel(depth=2, nonlinearity="relu6")
    with pytest.raises(ValueError, match="kind must be one of"):
        MLPKernel(depth=2, kind="ntk2")
    with pytest.raises(ValueError, match="depth"):
        MLPKernel(depth=-1)
    with pytest.raises(TypeError, match="architecture must be a gpytorch_tp Layer"):
        TensorProgramKernel(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="not a gpytorch_tp Layer"):
        Sequential(Linear(), nn.ReLU())


def test_layers_outside_the_recursion_are_refused():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="needs centred Gaussian pre-activations"):
        evaluate(Sequential(ReLU(), Linear()), x)
    with pytest.raises(ValueError, match="needs centred Gaussian pre-activations"):
        evaluate(Sequential(Linear(), ReLU(), ReLU()), x)
    with pytest.raises(ValueError, match="LayerNorm\\(center=True\\)"):
        evaluate(Sequential(Linear(), ReLU(), LayerNorm()), x)
    # RMS normalisation is fine after a nonlinearity.
    nngp, _ = evaluate(Sequential(Linear(), ReLU(), LayerNorm(center=False), Linear()), x)
    assert torch.isfinite(nngp).all()
    with pytest.raises(ValueError, match="neither branch"):
        evaluate(Sequential(Linear(), Residual(ReLU())), x)


def test_diag_needs_matching_sizes():
    with pytest.raises(ValueError, match="diag=True"):
        MLPKernel(depth=1).forward(torch.randn(3, 2), torch.randn(4, 2), diag=True)


_CONTINUOUS = sorted(set(NONLINEARITIES) - {"step", "sign"})


@pytest.mark.parametrize("name", sorted(NONLINEARITIES))
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_zero_norm_input_with_zero_bias_variance(name, kind):
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    x[0] = 0.0
    layers = []
    for _ in range(2):
        layers += [Linear(1.5, 0.0), nonlinearity_from_name(name)]
    layers.append(Linear(1.5, 0.0))
    kernel = TensorProgramKernel(Sequential(*layers), kind=kind).double()
    xg = x.clone().requires_grad_(True)
    K = kernel(xg).to_dense()
    assert torch.isfinite(K).all()
    grads = torch.autograd.grad(K.sum(), [xg, *kernel.parameters()], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    if name in _CONTINUOUS:
        # The value at 0 is the limit of the values at vanishing norms.
        x_small = x.clone()
        x_small[0] = 1e-9 * torch.randn(3, dtype=torch.float64)
        K_small = kernel(x_small).to_dense().detach()
        assert torch.allclose(K.detach(), K_small, rtol=1e-6, atol=1e-7)
    else:
        # step(0) = sign(0) = 0: the zero input's features vanish exactly.
        assert torch.equal(K[0, 1:].detach(), torch.zeros(4, dtype=torch.float64))
