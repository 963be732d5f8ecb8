"""Preset: the NNGP or NTK of a long short-term memory (LSTM) network."""

from __future__ import annotations

from ..layers import LSTM
from .gated_recurrent_kernel import GatedRecurrentKernel

__all__ = ["LSTMKernel"]


class LSTMKernel(GatedRecurrentKernel):
    r"""NNGP kernel or NTK of an infinitely wide LSTM network (``torch.nn.LSTM``'s cell).

    ``depth`` stacked :class:`~gpytorch_tp.layers.LSTM` layers, a readout over
    time (``"last"`` state or ``"mean"`` over each sequence's steps) and a
    dense output layer.  With :math:`K_h` the limit covariance of the last
    LSTM layer's states :math:`h_t = o_t \odot \phi(c_t)` (see
    :mod:`gpytorch_tp.layers.gated`),

    .. math::

        K(x, x') = \sigma_v^2 K_h(T_x - 1, T_{x'} - 1) + \sigma_b^2 \quad\text{("last")}, \qquad
        K(x, x') = \frac{\sigma_v^2}{T_x T_{x'}} \sum_{t, s} K_h(t, s) + \sigma_b^2 \quad\text{("mean")}.

    :math:`K_h` is computed by quasi-Monte Carlo with fixed particles of the
    input, forget and cell-input families (the output gate is integrated by
    quadrature): a deterministic, differentiable estimate whose relative
    error is about 3e-2 with 1024 particles and 1e-2 with 4096.
    Kernel matrices are symmetric; the matrix of a set of points with itself
    is projected onto the positive semi-definite ones (``psd_projection``, as
    :class:`GRUKernel`: the raw estimate's smallest eigenvalue falls to about
    -6e-4 of the largest with near-duplicate sequences).
    Cost :math:`O(M T^2)` per pair of sequences.  ``kind="ntk"``: the tangent
    recursion of the cell state over the same kind of particles (the output
    gate by quadrature; see :mod:`gpytorch_tp.layers.gated.tangents`), relative
    error about 1e-2 with 1024 particles, at about twice the NNGP's cost.

    Inputs: as :class:`GRUKernel` (time-major ``(..., N, T * d)``, NaN-padded at the end).

    :param input_shape: ``(T, d)``: maximum length and features per step.
    :param depth: number of stacked LSTM layers.
    :param nonlinearity: :math:`\phi` of the cell input and output (default ``"tanh"``).
    :param gate: ``"sigmoid"`` (default, as ``torch.nn.LSTM``) or ``"erf"``.
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param readout: ``"last"`` or ``"mean"``.
    :param weight_variance: starting :math:`\sigma_w^2` of the recurrent matrices (default 1).
    :param input_variance: starting :math:`\sigma_u^2` of the input matrices (default 1).
    :param bias_variance: starting bias variance (default 0.1).
    :param readout_variance: starting :math:`\sigma_v^2` of the output layer (default 1).
    :param num_particles: quasi-Monte Carlo particles (even; default 1024).
    :param weight_variance_prior: prior on every layer's recurrent weight variance.
    :param psd_projection: project kernel matrices of a set with itself onto the
        positive semi-definite ones (default ``True``; see :class:`GRUKernel`).
    :param kwargs: passed to :class:`TensorProgramKernel`.

    Example:
        >>> import torch
        >>> from gpytorch_tp import LSTMKernel
        >>> k = LSTMKernel(input_shape=(5, 2), readout="mean", num_particles=64)
        >>> k(torch.randn(3, 10)).to_dense().shape
        torch.Size([3, 3])
    """

    _layer = LSTM
