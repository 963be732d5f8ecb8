"""Checks shared by the kernel tests."""

from __future__ import annotations

import torch


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """Frobenius norm of the difference relative to the exact kernel's."""
    return ((estimate - exact).norm() / exact.norm()).item()
