r"""Gated recurrent layers of infinite width: GRU and LSTM (NNGP and NTK).

The finite layers are PyTorch's ``nn.GRU`` and ``nn.LSTM`` cells in the NTK
parameterisation: every weight matrix has i.i.d. :math:`N(0, 1)` entries and
is scaled by :math:`\sigma / \sqrt{\text{fan-in}}` (input weights
:math:`\sigma_u`, recurrent weights :math:`\sigma_w`), every bias is
:math:`\sigma_b b` with :math:`b \sim N(0, 1)`; the state before a sequence's
first step is 0.  GRU (``torch.nn.GRU``'s equations, one bias per gate):

.. math::

    r_t &= \sigma(\tilde r_t), \quad \tilde r_t = W_r x_t + U_r h_{t-1} + b_r, \qquad
    z_t = \sigma(\tilde z_t), \quad \tilde z_t = W_z x_t + U_z h_{t-1} + b_z, \\
    n_t &= \phi\big(A_t + r_t \odot B_t\big), \quad A_t = W_n x_t + b_n, \quad B_t = U_n h_{t-1} + b_{hn}, \\
    h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}.

LSTM (``torch.nn.LSTM``; :math:`\phi = \tanh` there):

.. math::

    i_t, f_t, o_t = \sigma(\tilde i_t), \sigma(\tilde f_t), \sigma(\tilde o_t), \quad
    g_t = \phi(\tilde g_t), \quad
    c_t = f_t \odot c_{t-1} + i_t \odot g_t, \quad h_t = o_t \odot \phi(c_t),

each pre-activation :math:`W x_t + U h_{t-1} + b` with its own matrices.

**The limit** (Yang 2019, TP1, App. B.5; a Netsor program): as the width
grows, the outputs of each weight matrix, over all (sequence, step) indices,
form a centred Gaussian family, independent across matrices, and a unit's
state is the same function of its coordinates of those families.  With
:math:`K_x(t, s)` the input covariance and :math:`K_h(t, s) = \lim \frac1n
\langle h_t, h'_s \rangle` (:math:`K_h(-1, \cdot) = 0`), every gate
pre-activation family has covariance

.. math::

    C(t, s) = \sigma_u^2 K_x(t, s) + \sigma_w^2 K_h(t - 1, s - 1) + \sigma_b^2

(:math:`A`: :math:`\sigma_u^2 K_x + \sigma_b^2`; :math:`B`:
:math:`\sigma_w^2 K_h(t-1, s-1) + \sigma_b^2`), and

.. math::

    K_h(t, s) = E\left[h_t(\text{families}) \, h'_s(\text{families})\right].

A unit's state at step :math:`t` depends on its gates at *all* earlier steps,
so this is an integral over the joint law of each family over the
:math:`2T` (sequence, step) indices of a pair; it has no closed form (for the
erf gate :math:`\sigma(x) = (1 + \operatorname{erf} x)/2` the gate products
are Gaussian orthant probabilities, TP1 Lemma B.11, which have none beyond
three dimensions either).  Both layers therefore integrate numerically, by
**quasi-Monte Carlo with fixed particles**
(:class:`~gpytorch_tp.layers.gated.particles.PairParticles`): for every pair of
sequences the families are drawn step by step (an incremental Cholesky
factorisation of the pair's covariance, which the recursion extends one step
at a time) from the same scrambled Sobol base points, the state is run
forward per particle, and :math:`K_h(t, s)` is the particle mean of
:math:`h_t h'_s`.  Consequences:

* the kernel is a deterministic, differentiable function of the inputs and
  hyperparameters (fixed base points, no resampling);
* a pair's value depends on that pair only (each item's own statistics come
  from the same computation of the item with itself), also under padding to a
  longer ``T`` (base points are indexed by the pair's own steps), and
  :math:`K(x, x') = K(x', x)` (the base set is closed under swapping the two
  sequences, and each step's 2 x 2 block is drawn with the symmetric square root);
* what can be integrated exactly is: the GRU samples only its update gates
  (its candidate state is linear given them, and its second moments are
  Gauss-Hermite integrals over the reset gate), the LSTM samples
  :math:`\tilde i, \tilde f, \tilde g` and integrates its output gate;
* it is an estimate: relative errors (Frobenius, against 16384-65536
  particles) about 4e-3 (GRU) and 3e-2 (LSTM) with the default 1024
  particles, 1.2e-2 and 5e-2 with 256 (see ``docs/rnn.md``); kernel matrices
  are symmetric, and positive semi-definite up to that error (smallest
  eigenvalue / largest down to about -6e-4 with near-duplicate sequences: each
  entry is its own pair's estimate, which no construction makes a Gram matrix
  of per-item features).  :class:`~gpytorch_tp.GRUKernel` and
  :class:`~gpytorch_tp.LSTMKernel` therefore project the matrix of a set with
  itself onto the positive semi-definite ones
  (:func:`~gpytorch_tp.layers.gated.psd_projection.project_psd`, ``psd_projection``);
  this layer returns the raw estimates.

Cost: :math:`O(M T^2)` per pair of sequences (:math:`M` particles), plus
:math:`T^2` Gauss-Hermite integrals over the reset gates for the GRU's
candidate (closed forms inside for erf and tanh, another 10 x 10 nodes for
other nonlinearities, then the dominant cost); all step pairs are kept
(:math:`T^2` numbers per pair).

**The NTK** (``state.track_ntk``, ``kind="ntk"``) is the forward-mode
tangent along a random parameter direction, itself a Netsor program (see
:mod:`~gpytorch_tp.layers.gated.tangents`): the tangent of every
pre-activation family is a new Gaussian family, independent of the forward
ones, with the forward covariance's :math:`K` replaced by :math:`K + \Theta`
(:math:`\Theta_x` the input's NTK, :math:`\Theta_h(t-1, s-1)` the layer's
own), and the state's tangent is linear in them with coefficients that are
functions of the forward families.  So, per particle of *all* forward
families (the GRU's :math:`\tilde z, \tilde r, A, B`; the LSTM's
:math:`\tilde i, \tilde f, \tilde g`, its output gate by quadrature),
drawn with the covariances of the :math:`K_h` computed above — the pair's and
each side's own *from the pair's particles*, so that the pair's covariance of
its :math:`2T` states is positive semi-definite (each side's own estimate
differs from the pair's by the particle error, which made that matrix
indefinite for near-duplicates and their NTK 30-65% low) — (fixed base
points of their own, the same construction: deterministic, symmetric,
padding-invariant, a pair's value its own), the conditional second moments
of the tangents are carried exactly, row by row of step pairs, and
:math:`\Theta_h(t, s)` is their particle mean.  Relative errors (Frobenius,
against independent scramblings of 4 x 16384 particles, T = 4) of the whole
network's NTK with the default 1024 particles: 1-4e-2 (GRU; 1-2e-2 with
erf, whose candidate input is integrated out), 1e-2 (LSTM),
about twice that for its part below the readout (:math:`\Theta_h`); 4096
particles halve to third them.  Cost: another
:math:`O(M T^2)` per pair (the particles of four (GRU) or three (LSTM)
families and the recursion), about as much again as the NNGP with the erf
candidate (see ``docs/rnn.md``).

Modules: :mod:`~gpytorch_tp.layers.gated.gru` and :mod:`~gpytorch_tp.layers.gated.lstm` (the
layers), :mod:`~gpytorch_tp.layers.gated.cell` (what they share: hyperparameters, gates, the
batches of pairs), :mod:`~gpytorch_tp.layers.gated.particles` (the quasi-Monte Carlo
particles), :mod:`~gpytorch_tp.layers.gated.quadrature` (Gauss-Hermite rules over a Gaussian
pair), :mod:`~gpytorch_tp.layers.gated.tangents` (the NTK's tangent recursion) and
:mod:`~gpytorch_tp.layers.gated.psd_projection` (the kernels' positive semi-definite projection).
"""

from .cell import GATES
from .gru import GRU
from .lstm import LSTM

__all__ = ["GATES", "GRU", "LSTM"]
