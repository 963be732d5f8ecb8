"""Sequence inputs and checks shared by the tests of the sequence families (RNN, GRU/LSTM, attention)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def random_sequences(
    lengths: tuple[int, ...], d: int, seed: int, dtype: torch.dtype = torch.float64
) -> list[torch.Tensor]:
    """Unpadded sequences ``(L, d)``; the second one has twice the typical norm."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(length, d, generator=g, dtype=dtype) for length in lengths]
    if len(seqs) > 1:
        seqs[1] = 2.0 * seqs[1]
    return seqs


def nan_padded(seqs: list[torch.Tensor], steps: int) -> torch.Tensor:
    """The sequences NaN-padded at the end to ``steps`` steps, flattened time-major: ``(N, steps * d)``."""
    d = seqs[0].shape[-1]
    out = torch.full((len(seqs), steps, d), float("nan"), dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out.reshape(len(seqs), steps * d)


def kernel_value(kernel, x1: torch.Tensor, x2: torch.Tensor | None = None, diag: bool = False) -> torch.Tensor:
    """The kernel's dense matrix (or diagonal), without autograd."""
    with torch.no_grad():
        out = kernel(x1, x2, diag=diag)
        return out if diag else out.to_dense()


def assert_wide_beats_narrow(
    error_at: Callable[[int, list[int]], float], name: str, networks: int, bound: float, ratio: float
) -> None:
    """Finite networks approach the kernel: ``error_at(width, seeds)`` at width 1024 is below ``bound``
    and ``ratio`` times below its mean over three seed sets at width 64."""
    wide = error_at(1024, [1024 + i for i in range(networks)])
    narrow = [error_at(64, [64 + 100 * b + i for i in range(networks)]) for b in range(3)]
    message = f"{name}: width 64 {sum(narrow) / 3:.4f} (mean), 1024 {wide:.4f}"
    assert wide < bound, message
    assert wide < sum(narrow) / 3 / ratio, message


class PaddedSequenceData:
    """Data for BaseKernelTestCase: sequences of 3 steps of 2 features (6 features), some padded.

    ``test_active_dims_range`` keeps the columns 3..8 of the 10-column data, the overridden
    ``test_active_dims_list`` the columns [0, 2, 4, 6, 8, 9]; columns 7, 8, 9 of some rows are
    NaN, so that both selections hold sequences with a NaN last step.
    """

    def create_data_no_batch(self):
        x = torch.randn(12, 10)
        x[::3, 7:] = float("nan")
        return x

    def create_data_single_batch(self):
        x = torch.randn(2, 3, 6)
        x[0, 1, 4:] = float("nan")
        x[1, 2, 2:] = float("nan")
        return x

    def create_data_double_batch(self):
        x = torch.randn(3, 2, 5, 6)
        x[:, :, ::2, 4:] = float("nan")
        return x

    def test_active_dims_list(self):
        dims = [0, 2, 4, 6, 8, 9]
        kernel = self.create_kernel_no_ard(active_dims=dims)
        x = self.create_data_no_batch()
        expected = self.create_kernel_no_ard()(x[:, dims]).to_dense()
        self.assertAllClose(kernel(x).to_dense(), expected, rtol=1e-5, atol=1e-6)
