"""Small starting variances: every positive value is a valid, learnable starting point."""

import gpytorch
import pytest
import torch
from gpytorch.constraints import GreaterThan

from gpytorch_tp import MLPKernel
from gpytorch_tp.layers import Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [1e-6, 3e-7, 1e-9])
def test_small_weight_variance_is_kept(dtype, value):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        layer = Linear(value, 0.1)
    finally:
        torch.set_default_dtype(previous)
    assert layer.weight_variance.dtype == dtype
    torch.testing.assert_close(layer.weight_variance, torch.tensor(value, dtype=dtype), rtol=1e-6, atol=0.0)
    # Still learnable: the parameter moves and stays above its floor.
    raw = layer.raw_weight_variance
    assert raw.requires_grad
    floor = float(layer.raw_weight_variance_constraint.lower_bound)
    assert 0.0 < floor < value


def test_default_floor_unchanged_for_ordinary_values():
    layer = Linear(2.0, 0.1)
    assert float(layer.raw_weight_variance_constraint.lower_bound) == pytest.approx(1e-6)
    assert float(layer.raw_bias_variance_constraint.lower_bound) == pytest.approx(1e-6)


def test_kernel_with_tiny_weight_variance_evaluates():
    x = torch.randn(5, 3, dtype=torch.float64)
    kernel = MLPKernel(depth=2, weight_variance=1e-6, bias_variance=0.1).double()
    k = kernel(x).to_dense()
    assert torch.isfinite(k).all()
    # With almost no weight signal, every entry is close to the accumulated bias variance.
    assert torch.allclose(k, k[0, 0].expand_as(k), rtol=1e-4)


def test_explicit_constraint_still_refuses_values_at_its_bound():
    with pytest.raises(ValueError, match="at or below its constraint's lower bound"):
        Linear(1e-6, 0.1, weight_variance_constraint=GreaterThan(1e-6))


def test_setting_below_floor_is_refused():
    layer = Linear(2.0, 0.1)
    with pytest.raises(ValueError, match="lower bound"):
        layer.weight_variance = 1e-7
    assert isinstance(layer, gpytorch.Module)
