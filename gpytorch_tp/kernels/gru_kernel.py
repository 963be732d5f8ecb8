"""Preset: the NNGP or NTK of a gated recurrent unit (GRU) network."""

from __future__ import annotations

from ..layers import GRU
from .gated_recurrent_kernel import GatedRecurrentKernel

__all__ = ["GRUKernel"]


class GRUKernel(GatedRecurrentKernel):
    r"""NNGP kernel or NTK of an infinitely wide GRU network (``torch.nn.GRU``'s cell).

    ``depth`` stacked :class:`~gpytorch_tp.layers.GRU` layers, a readout over
    time (``"last"`` state or ``"mean"`` over each sequence's steps) and a
    dense output layer.  With :math:`K_h` the limit covariance of the last
    GRU layer's states (see :mod:`gpytorch_tp.layers.gated`),

    .. math::

        K(x, x') = \sigma_v^2 K_h(T_x - 1, T_{x'} - 1) + \sigma_b^2 \quad\text{("last")}, \qquad
        K(x, x') = \frac{\sigma_v^2}{T_x T_{x'}} \sum_{t, s} K_h(t, s) + \sigma_b^2 \quad\text{("mean")}.

    :math:`K_h` is an integral over the gates' joint law along time, computed by
    quasi-Monte Carlo with fixed particles of the update gates (the candidate
    state is integrated exactly given them): a deterministic, differentiable
    estimate whose relative error is about 4e-3 with 1024 particles and
    1.2e-2 with 256.  Kernel matrices are symmetric; the matrix of a set of
    points with itself is projected onto the positive semi-definite ones
    (``psd_projection``; the raw estimate's smallest eigenvalue can fall to
    about -1e-3 of the largest with near-duplicate sequences, see
    :func:`~gpytorch_tp.layers.gated.psd_projection.project_psd` and ``docs/rnn.md``).
    Cost :math:`O(M T^2)` per pair of sequences plus :math:`T^2` quadratures of
    the candidate (6 x 6 nodes with the closed forms of erf and tanh, 6 x 6 x 10 x 10
    function values otherwise).

    ``kind="ntk"``: the readout's NTK :math:`\sigma_v^2 (K_h + \Theta_h) + \sigma_b^2`, with
    :math:`\Theta_h` the GRU states' tangent kernel, from a tangent recursion over
    particles of all four gate and candidate families (see
    :mod:`gpytorch_tp.layers.gated.tangents`); relative error 1-4e-2 with 1024 particles
    (1-2e-2 with the erf candidate, whose input is then integrated out; about 1e-2 with
    4096), at about twice the NNGP's cost with the erf candidate.

    Inputs are sequences flattened time-major, ``(..., N, T * d)``, shorter
    ones padded at the end with whole steps of ``padding_value`` (NaN by
    default); padding never changes a value (see :class:`~gpytorch_tp.RNNKernel`).

    :param input_shape: ``(T, d)``: maximum length and features per step.
    :param depth: number of stacked GRU layers.
    :param nonlinearity: :math:`\phi` of the candidate state (default ``"tanh"``).
    :param gate: ``"sigmoid"`` (default, as ``torch.nn.GRU``) or ``"erf"``.
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param readout: ``"last"`` or ``"mean"``.
    :param weight_variance: starting :math:`\sigma_w^2` of the recurrent matrices (default 1).
    :param input_variance: starting :math:`\sigma_u^2` of the input matrices (default 1).
    :param bias_variance: starting bias variance (default 0.1).
    :param readout_variance: starting :math:`\sigma_v^2` of the output layer (default 1).
    :param num_particles: quasi-Monte Carlo particles (even; default 1024).
    :param weight_variance_prior: prior on every layer's recurrent weight variance.
    :param psd_projection: make dense kernel matrices of a set of points with itself
        (``k(x)``, ``k(x, x)``, :meth:`nngp_and_ntk`) positive semi-definite (default
        ``True``): their negative eigenvalues are removed and the diagonal kept, which
        moves an entry by at most about the removed eigenvalues' sum (the particle
        error).  Cross matrices of different sets, ``diag=True`` and matrix-free
        evaluations are the raw estimates; ``False``: raw everywhere (then a pair's
        value depends only on the pair, also within ``k(x)``).
    :param kwargs: passed to :class:`TensorProgramKernel` (``padding_value``,
        ``batch_shape``, ``active_dims``, ``memory_budget``, ``progress``, ``tile_pairs``).

    Example:
        >>> import torch
        >>> from gpytorch_tp import GRUKernel
        >>> k = GRUKernel(input_shape=(5, 2), num_particles=64)
        >>> x = torch.randn(3, 5, 2)
        >>> x[0, 3:] = float("nan")  # the first sequence has 3 steps
        >>> k(x.reshape(3, 10)).to_dense().shape
        torch.Size([3, 3])
    """

    _layer = GRU
