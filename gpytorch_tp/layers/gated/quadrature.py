"""Gauss-Hermite rules over a centred Gaussian pair, exactly symmetric in its two variables."""

from __future__ import annotations

import numpy
import torch
from torch import Tensor

__all__ = ["correlated_nodes", "hermite_rule"]


def hermite_rule(count: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Nodes and weights (summing to one) of the Gauss-Hermite rule for a standard normal variable."""
    nodes, weights = numpy.polynomial.hermite_e.hermegauss(count)
    weights = weights / weights.sum()
    return torch.as_tensor(nodes, dtype=dtype, device=device), torch.as_tensor(weights, dtype=dtype, device=device)


def correlated_nodes(k11: Tensor, k22: Tensor, k12: Tensor, nodes: Tensor) -> tuple[Tensor, Tensor]:
    """The tensor-product nodes ``(u_ij, v_ij)`` of a centred pair with covariance ``[[k11, k12], [k12, k22]]``.

    ``(u, v) = S (x_i, x_j)`` with ``S`` the symmetric square root of the covariance, so that
    swapping the two variables permutes the nodes: the rule is exactly symmetric in them.
    Results ``(..., G, G)``.
    """
    det = (k11 * k22 - k12 * k12).clamp_min(0)
    root_det = det.clamp_min(1e-300).sqrt()
    norm = (k11 + k22 + 2 * root_det).clamp_min(1e-300).sqrt()
    s11, s12, s22 = ((k11 + root_det) / norm)[..., None], (k12 / norm)[..., None], ((k22 + root_det) / norm)[..., None]
    first = (s11 * nodes)[..., :, None] + (s12 * nodes)[..., None, :]
    second = (s12 * nodes)[..., :, None] + (s22 * nodes)[..., None, :]
    return first, second
