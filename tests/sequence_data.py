"""Sequence inputs shared by the tests of the sequence families (RNN, GRU/LSTM, attention)."""

from __future__ import annotations

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
