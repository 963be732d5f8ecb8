"""GPyTorch's ``BaseKernelTestCase``, all 13 tests unmodified, for every structured kernel (issue 21, item 9).

The rule that makes ``active_dims`` and ``input_shape`` compose (``TensorProgramKernel``'s
docstring): as GPyTorch's ``ard_num_dims`` counts the *selected* dimensions, ``input_shape``
(and ``input_dim``) describe the features after ``active_dims`` selects them.  The stock
``test_active_dims_list`` / ``test_active_dims_range`` build a kernel with ``active_dims`` (4 and 6
of 10 columns) and compare it with a kernel without, applied to the selected columns; here the
kernel factory takes its ``input_shape`` from the width of that selection, as a user following the
rule would, and both kernels of a test have the same architecture.  Every other test runs on data
of ``DEFAULT_FEATURES`` features.

Sequence kernels get NaN padding in the test data (whole steps at the end, also after selection).
"""

from __future__ import annotations

import math
import unittest

import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

from gpytorch_tp.kernels import CNNKernel, GRUKernel, MLPKernel, RNNKernel, TransformerKernel

NAN = float("nan")
DEFAULT_FEATURES = 6


class _StructuredKernelTestCase(BaseKernelTestCase):
    """A kernel whose ``input_shape`` is that of the features it is given (after ``active_dims``)."""

    features = DEFAULT_FEATURES  # unittest makes a new instance per test: each test starts here
    padded = False  # sequence data: some items end in NaN padding steps

    def shape(self, features: int) -> tuple[int, ...]:
        raise NotImplementedError

    def make(self, input_shape: tuple[int, ...], **kwargs):
        raise NotImplementedError

    def create_kernel_no_ard(self, **kwargs):
        active_dims = kwargs.get("active_dims")
        if active_dims is not None:
            # input_shape describes the selected columns; the plain kernel the test compares with
            # (built next, without active_dims) is applied to data of that same width.
            self.features = len(active_dims)
        return self.make(self.shape(self.features), **kwargs)

    def create_data_no_batch(self):
        x = torch.randn(12, 10)
        if self.padded:
            # Columns 7-9: the last step of the range 3..8 (steps of 2), after the columns of [0, 2, 4, 6].
            x[::3, 7:] = NAN
        return x

    def create_data_single_batch(self):
        x = torch.randn(2, 3, DEFAULT_FEATURES)
        if self.padded:
            x[0, 1, 4:] = NAN
            x[1, 2, 2:] = NAN
        return x

    def create_data_double_batch(self):
        x = torch.randn(3, 2, 5, DEFAULT_FEATURES)
        if self.padded:
            x[:, :, ::2, 4:] = NAN
        return x


class _Sequences(_StructuredKernelTestCase):
    padded = True

    def shape(self, features):
        return (features // 2, 2)  # time-major steps of 2 features


class TestCNNKernelImageNNGP(_StructuredKernelTestCase, unittest.TestCase):
    def shape(self, features):
        return (1, 2, features // 2)

    def make(self, input_shape, **kwargs):
        return CNNKernel(input_shape, depth=2, kernel_size=2, kind="nngp", readout="global_avg_pool", **kwargs)


class TestCNNKernelSignalFlattenNTK(_StructuredKernelTestCase, unittest.TestCase):
    def shape(self, features):
        return (2, features // 2)

    def make(self, input_shape, **kwargs):
        return CNNKernel(input_shape, depth=1, kind="ntk", readout="flatten", padding="circular", **kwargs)


class TestRNNKernelNTK(_Sequences, unittest.TestCase):
    def make(self, input_shape, **kwargs):
        return RNNKernel(input_shape, nonlinearity="erf", kind="ntk", readout="last", **kwargs)


class TestTransformerKernelNTK(_Sequences, unittest.TestCase):
    def make(self, input_shape, **kwargs):
        return TransformerKernel(input_shape, kind="ntk", causal=True, readout="mean", positional="add", **kwargs)


class TestGRUKernelNNGP(_Sequences, unittest.TestCase):
    def make(self, input_shape, **kwargs):
        return GRUKernel(input_shape, num_particles=8, **kwargs)


# ---------------------------------------------------------------------------------------------
# The rule, beyond the stock tests
# ---------------------------------------------------------------------------------------------

FACTORIES = {
    "cnn": lambda shape, **kw: CNNKernel(shape, depth=1, kernel_size=2, **kw),
    "rnn": lambda shape, **kw: RNNKernel(shape, nonlinearity="erf", **kw),
    "transformer": lambda shape, **kw: TransformerKernel(shape, kind="ntk", positional="add", **kw),
    "gru": lambda shape, **kw: GRUKernel(shape, num_particles=8, **kw),
}
SHAPES = {"cnn": (1, 2, 3), "rnn": (3, 2), "transformer": (3, 2), "gru": (3, 2)}


@pytest.mark.parametrize("family", list(FACTORIES))
def test_active_dims_of_the_wrong_width_are_refused_at_construction(family):
    shape = SHAPES[family]
    with pytest.raises(ValueError, match=rf"active_dims selects 4 features but input_shape \(.*\) describes 6"):
        FACTORIES[family](shape, active_dims=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="active_dims selects 7 features"):
        FACTORIES[family](shape, active_dims=list(range(7)))
    FACTORIES[family](shape, active_dims=[5, 1, 0, 9, 7, 3])  # six columns of any wider data


def test_active_dims_and_input_dim():
    with pytest.raises(ValueError, match="active_dims selects 2 features but input_dim=3 describes 3"):
        MLPKernel(2, input_dim=3, active_dims=[0, 1])
    kernel = MLPKernel(2, input_dim=2, active_dims=[3, 1]).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(kernel(x).to_dense(), MLPKernel(2).double()(x[:, [3, 1]]).to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FACTORIES))
def test_permuted_active_dims_lay_out_the_selected_columns_in_their_order(family):
    # input_shape is the layout of the selection in the order active_dims gives it: the kernel of
    # wide data equals the kernel of the columns picked (and reordered) by hand, also in
    # nngp_and_ntk and on batches.
    g = torch.Generator().manual_seed(7)
    shape = SHAPES[family]
    dims = [8, 2, 5, 0, 3, 7]
    x1, x2 = torch.randn(2, 4, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    selected = FACTORIES[family](shape, active_dims=dims).double()
    plain = FACTORIES[family](shape).double()
    plain.architecture.load_state_dict(selected.architecture.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            selected(x1, x2).to_dense(), plain(x1[..., dims], x2[..., dims]).to_dense(), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(selected(x1, diag=True), plain(x1[..., dims], diag=True), rtol=1e-12, atol=1e-12)
        for got, expected in zip(selected.nngp_and_ntk(x1, x2), plain.nngp_and_ntk(x1[..., dims], x2[..., dims])):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert math.prod(shape) == len(dims)
