r"""The NNGP kernel and NTK through a weight layer: the one update every weight layer applies.

A weight layer :math:`h = \sigma_w W z / \sqrt{n} + \sigma_b b` (NTK
parameterisation, :math:`W_{ij}, b_i \sim N(0, 1)`) maps the covariance
:math:`V` and the NTK :math:`T` of its incoming features to

.. math::

    K = \sigma_w^2 V + \sigma_b^2, \qquad \Theta = K + \sigma_w^2 T

(the first term of :math:`\Theta` is the gradient with respect to the layer's
own :math:`W` and :math:`b`).  After a nonlinearity, :math:`V = V_\phi(K)`
and :math:`T = V_{\phi'}(K)\,\Theta`; after a BatchNorm + ReLU block, the
quadratures of :mod:`gpytorch_tp.batchnorm`; for a convolution, both are
summed over the filter's footprint first.  :class:`~gpytorch_tp.layers.Linear`,
:class:`~gpytorch_tp.layers.Conv`, the BatchNorm MLP functions and
:class:`~gpytorch_tp.BatchNormMLPKernel` all call :func:`dense_update`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import scale_and_shift

__all__ = ["dense_update"]


def dense_update(
    covariance: Tensor,
    weight: Tensor | float,
    bias: Tensor | float,
    tangent: Tensor | None = None,
    track_ntk: bool = False,
) -> tuple[Tensor, Tensor | None]:
    r"""``(K, Theta)`` after a weight layer: :math:`K = \sigma_w^2 V + \sigma_b^2`, :math:`\Theta = K + \sigma_w^2 T`.

    :param covariance: :math:`V`, the covariance of the layer's incoming features.
    :param weight: :math:`\sigma_w^2`, a number or a tensor that broadcasts against ``covariance``.
    :param bias: :math:`\sigma_b^2`, likewise.
    :param tangent: :math:`T`, the NTK of the incoming features; ``None``: identically
        zero (the network input, or nothing trainable below), so that :math:`\Theta = K`.
    :param track_ntk: whether to compute :math:`\Theta`.
    :return: ``(K, Theta)``; ``Theta`` is ``None`` unless ``track_ntk``.

    Example:
        >>> nngp, ntk = dense_update(torch.tensor([1.0, 0.5]), 2.0, 0.1, torch.tensor([1.0, 1.0]), track_ntk=True)
        >>> nngp, ntk
        (tensor([2.1000, 1.1000]), tensor([4.1000, 3.1000]))
    """
    nngp = scale_and_shift(covariance, weight, bias)
    if not track_ntk:
        return nngp, None
    if tangent is None:
        return nngp, nngp
    if isinstance(weight, Tensor):
        return nngp, torch.addcmul(nngp, weight, tangent)  # one pass over the pairs
    return nngp, torch.add(nngp, tangent, alpha=weight)  # addcmul takes tensors only
