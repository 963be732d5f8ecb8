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
(:class:`~gpytorch_tp.gaussian_particles.PairParticles`): for every pair of
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
  (:func:`~gpytorch_tp.gaussian_particles.project_psd`, ``psd_projection``);
  this layer returns the raw estimates.

Cost: :math:`O(M T^2)` per pair of sequences (:math:`M` particles), plus
:math:`T^2` Gauss-Hermite integrals over the reset gates for the GRU's
candidate (closed forms inside for erf and tanh, another 10 x 10 nodes for
other nonlinearities, then the dominant cost); all step pairs are kept
(:math:`T^2` numbers per pair).

**The NTK** (``state.track_ntk``, ``kind="ntk"``) is the forward-mode
tangent along a random parameter direction, itself a Netsor program (see
:mod:`~gpytorch_tp.layers.gated_tangents`): the tangent of every
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
"""

from __future__ import annotations

import functools
import math

import numpy
import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..finite import NTKGRU, NTKLSTM
from ..gaussian_particles import PairParticles, StepStack, base_normals
from ..numerics import tanh_pair_moment
from ..state import KernelState, per_item
from .base import Layer, standard_deviation, variance_property
from .elementwise import Erf, Nonlinearity, Tanh, nonlinearity_from_name
from .gated_tangents import GATE_DERIVATIVES, derivative, erf_slope_moment, shift_both, tangent_rows
from .recurrent import _check_sequence

__all__ = ["GATES", "GRU", "LSTM"]


def erf_gate(x: Tensor) -> Tensor:
    """The erf gate :math:`(1 + \\operatorname{erf} x) / 2 = \\Phi(\\sqrt 2 x)`."""
    return (1 + torch.erf(x)) / 2


#: Gate functions by name: the logistic sigmoid of ``torch.nn.GRU``/``LSTM``, and the erf gate.
GATES = {"sigmoid": torch.sigmoid, "erf": erf_gate}

# Numbers held per particle and step of a chunk of pairs (no autograd), and bytes
# a chunk may take; with autograd the chunk is recomputed in the backward pass
# (checkpointing), and its graph holds about ``families * M * T^2`` numbers per pair.
_CHUNK_BYTES = 96 * 2**20
# Relative jitter of the NTK's forward particles: a low-rank input covariance (steps of few
# features) makes conditional variances vanish, and rounding of the covariances (float32 inputs)
# is amplified by about 1 / sqrt(jitter); the jitter's own error is far below the particles'.
_TANGENT_JITTER = 1e-6
# Base-point stream of the NTK's forward particles (the NNGP's is 0); tests change it to get
# independent scramblings.
_TANGENT_STREAM = 1


class _GatedRecurrent(Layer):
    """Shared machinery of :class:`GRU` and :class:`LSTM`."""

    needs_all_position_pairs = True
    #: Gaussian families drawn per step, grouped by covariance: ``(group, count)``.
    _families: tuple[tuple[str, int], ...] = ()
    #: Pairs take each item's own ``K_h`` from the item's own computation (else from the pair's particles).
    _uses_own_covariances = False

    def __init__(
        self,
        nonlinearity: str | Nonlinearity = "tanh",
        gate: str = "sigmoid",
        weight_variance: float | Tensor = 1.0,
        input_variance: float | Tensor = 1.0,
        bias_variance: float | Tensor = 0.1,
        *,
        num_particles: int = 1024,
        weight_variance_prior: Prior | None = None,
        input_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        weight_variance_constraint: Interval | None = None,
        input_variance_constraint: Interval | None = None,
        bias_variance_constraint: Interval | None = None,
        batch_shape: torch.Size = torch.Size(),
    ):
        priors = {
            "weight_variance": weight_variance_prior,
            "input_variance": input_variance_prior,
            "bias_variance": bias_variance_prior,
        }
        constraints = {
            "weight_variance": weight_variance_constraint,
            "input_variance": input_variance_constraint,
            "bias_variance": bias_variance_constraint,
        }
        super().__init__()
        phi = nonlinearity_from_name(nonlinearity)
        if not isinstance(phi, Nonlinearity):
            raise TypeError(f"{type(self).__name__} needs an elementwise nonlinearity, got {type(phi).__name__}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {sorted(GATES)}, got {gate!r}")
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2:
            raise ValueError(f"num_particles must be an even integer >= 2, got {num_particles!r}")
        if num_particles % 2:
            raise ValueError(
                f"num_particles must be even (each base point comes with its swapped copy), got {num_particles}"
            )
        self.nonlinearity = phi
        self.gate = gate
        self.num_particles = num_particles
        for name, value in (
            ("weight_variance", weight_variance),
            ("input_variance", input_variance),
            ("bias_variance", bias_variance),
        ):
            self.register_variance(
                name,
                value,
                batch_shape=batch_shape,
                prior=priors.get(name),
                constraint=constraints.get(name),
                allow_zero=name == "bias_variance",
            )

    weight_variance = variance_property("weight_variance")

    input_variance = variance_property("input_variance")

    bias_variance = variance_property("bias_variance")

    # -- the kernel ----------------------------------------------------------------------------

    def forward(self, state: KernelState) -> KernelState:
        _check_sequence(self, state)
        if not state.all_position_pairs:
            raise RuntimeError(
                f"{type(self).__name__} needs all step pairs; evaluate through gpytorch_tp.evaluate or a kernel"
            )
        w, u, b = self.weight_variance, self.input_variance, self.bias_variance
        rows1 = None if state.valid1 is None else state.valid1[..., 0]  # (..., N1, 1, T)
        rows2 = None if state.valid2 is None else state.valid2[..., 0, :]  # (..., 1, N2, T)
        hidden1 = per_item(self._self_covariance, state.var1, rows1, w, u, b, state.item_ndim)
        hidden2 = per_item(self._self_covariance, state.var2, rows2, w, u, b, state.item_ndim)
        own = (hidden1, hidden2) if self._uses_own_covariances else ()
        params = (w, u, b)
        if state.track_ntk:
            # The NTK's forward particles need each pair's covariance over both sides' 2T steps.  Its
            # side blocks must come from the pair's own particles, not from each item's own
            # computation: the two estimates differ by the particle error, and for a near-duplicate
            # pair (true conditional variances ~ distance^2, far below that error) the mixed matrix is
            # indefinite, which decorrelated the two sides' particles (cross NTK 30-60% low).
            blocks = self._covariance(
                state.cross, state.var1, state.var2, rows1, rows2, params, state.item_ndim, *own, blocks=True
            )
            cross, pair11, pair22 = blocks.unbind(-3)
        else:
            cross = self._covariance(state.cross, state.var1, state.var2, rows1, rows2, params, state.item_ndim, *own)
        out = state.replace(cross=cross, var1=hidden1, var2=hidden2, ntk=None, gaussian=False, fresh=True)
        if state.track_ntk:
            input_ntk = torch.zeros_like(state.cross) if state.ntk is None else state.ntk
            steps = cross.shape[-1]

            def per_pair(grad: bool) -> int:
                # Per particle: every family's path and whitened coordinates; with autograd every step's graph.
                return self.num_particles * 8 * (steps * steps * (10 if grad else 2) + 64 * steps)

            matrices = [state.cross, state.var1, state.var2, cross, pair11, pair22, input_ntk]
            ntk = self._in_chunks(self._tangent_chunk, matrices, (), rows1, rows2, (w, u, b), state.item_ndim, per_pair)
            out = out.replace(ntk=ntk)
        return out

    def _self_covariance(self, inputs: Tensor, valid: Tensor | None, w, u, b, item_ndim: int) -> Tensor:
        """Each item's own ``K_h(t, s)``: the pair computation of the item with itself."""
        own = self._covariance(inputs, inputs, inputs, valid, valid, (w, u, b), item_ndim)
        return (own + own.transpose(-1, -2)) / 2

    def _covariance(
        self, kx12, kx11, kx22, valid1, valid2, params, item_ndim: int, *own, blocks: bool = False
    ) -> Tensor:
        """``K_h(t, s)`` of all pairs: flattened to a batch of pairs, in chunks, in float64.

        ``own``: each side's own ``K_h`` (from the items' own computations), for
        layers that take them as given (``_uses_own_covariances``); without
        them, the items are paired with themselves.  ``blocks``: also each
        side's ``K_h`` with itself from the pair's particles, stacked
        ``(..., 3, T, T)`` as (pair, side 1, side 2): together a positive
        semi-definite covariance of the pair's ``2T`` states.
        """
        steps = kx12.shape[-1]
        families = sum(n for _, n in self._families)

        def per_pair(grad: bool) -> int:
            return self.num_particles * steps * 8 * (steps * (families + 4) * 2 if grad else 2 * families * 3 + 16)

        fn = functools.partial(self._chunk, blocks=True) if blocks else self._chunk
        extra = (3,) if blocks else ()
        return self._in_chunks(fn, [kx12, kx11, kx22], own, valid1, valid2, params, item_ndim, per_pair, extra)

    def _in_chunks(self, fn, matrices, trailing, valid1, valid2, params, item_ndim: int, per_pair, extra=()) -> Tensor:
        """``fn(*matrices, v1, v2, w, u, b, *trailing)`` over all pairs, flattened to a batch, in chunks, in float64.

        ``matrices``/``trailing``: ``(..., T, T)`` per pair (or per item, broadcast);
        ``per_pair(grad)``: bytes one pair takes, with or without autograd (then
        each chunk is recomputed in the backward pass).  Returns ``(..., T, T)``
        in the first matrix's dtype (``(..., *extra, T, T)`` if ``fn`` returns ``(B, *extra, T, T)``).
        """
        kx12 = matrices[0]
        steps = kx12.shape[-1]
        pieces = [*matrices, *trailing]
        params = [p.reshape(*p.shape, *([1] * item_ndim)) for p in params]  # hyperparameter batch first
        lead = torch.broadcast_shapes(*(p.shape[:-2] for p in pieces), *(p.shape for p in params))

        def flat_matrix(t: Tensor) -> Tensor:
            return t.to(torch.float64).expand(*lead, steps, steps).reshape(-1, steps, steps)

        def flat_valid(v: Tensor | None) -> Tensor:
            if v is None:
                return kx12.new_ones((), dtype=torch.float64).expand(*lead, steps).reshape(-1, steps)
            return v.to(torch.float64).expand(*lead, steps).reshape(-1, steps)

        def flat_param(p: Tensor) -> Tensor:
            return p.to(torch.float64).expand(lead).reshape(-1)

        flat = [flat_matrix(p) for p in pieces]
        trailing_flat = flat[len(matrices) :]
        matrices = flat[: len(matrices)]
        w, u, b = (flat_param(p) for p in params)
        v1, v2 = flat_valid(valid1), flat_valid(valid2)
        count = v1.shape[0]
        if count == 0:  # no pairs (an input of 0 items): nothing to run, an empty result of the right shape
            return kx12.new_zeros(*lead, *extra, steps, steps)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*matrices, *trailing_flat, w, u, b))
        chunk = max(1, min(count, _CHUNK_BYTES // per_pair(grad)))
        outputs = []
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            args = [m[part] for m in matrices] + [v1[part], v2[part], w[part], u[part], b[part]]
            args += [m[part] for m in trailing_flat]
            if grad:
                outputs.append(checkpoint(fn, *args, use_reentrant=False))
            else:
                outputs.append(fn(*args))
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return out.reshape(*lead, *out.shape[1:]).to(kx12.dtype)

    def _chunk(self, kx12, kx11, kx22, v1, v2, w, u, b, *own, blocks=False) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _gate_moment(self, k11: Tensor, k22: Tensor, k12: Tensor) -> Tensor:
        """``E[sigma(u) sigma(v)]`` for a centred pair with covariance ``[[k11, k12], [k12, k22]]``."""
        if self.gate == "erf":
            # (1 + erf u)(1 + erf v) / 4, and E[erf u] = 0.
            return (1 + Erf().pair_moments(k11, k22, k12, False)[0]) / 4
        nodes, weights = _hermite_rule(_GATE_NODES, k11.dtype, k11.device)
        first, second = _correlated_nodes(k11, k22, k12, nodes)
        return torch.einsum("...ij,i,j->...", self._gate(first) * self._gate(second), weights, weights)

    def _gate(self, x: Tensor) -> Tensor:
        return GATES[self.gate](x)

    # -- the NTK (see gated_tangents) ----------------------------------------------------------

    def _tangent_chunk(self, kx12, kx11, kx22, kh12, kh11, kh22, tx12, v1, v2, w, u, b) -> Tensor:
        """``Theta_h`` of a chunk of pairs ``(B, T, T)`` from the inputs' ``K``, ``Theta`` and the layer's ``K_h``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _sample_paths(self, groups, v1, v2) -> list[Tensor]:
        """Particles of independent families, ``(B, M, T, families, 2)`` per group ``(c11, c12, c22, families)``
        of families sharing the covariance blocks ``c11[a, t]`` (side 1 with itself), ``c12[a, t]``
        (side 1 at ``a``, side 2 at ``t``), ``c22``.

        The same construction as the NNGP's particles (padding, symmetry).  All groups take their
        base points from one set (``_TANGENT_STREAM``, not the NNGP's), each group its own coordinates of
        every step: scramblings of the same Sobol coordinates are functions of each other, so
        independent families must never take the same coordinates from two streams.
        """
        steps = v1.shape[-1]
        lengths = torch.maximum(v1.sum(-1), v2.sum(-1)).round().long()
        total = sum(families for *_, families in groups)
        base = base_normals(self.num_particles, steps * total * 2, v1.device, stream=_TANGENT_STREAM)
        base = base.reshape(self.num_particles, steps, total, 2)
        out, first = [], 0
        for c11, c12, c22, families in groups:
            own = base[:, :, first : first + families].reshape(self.num_particles, -1)
            first += families
            sampler = PairParticles(own, steps - lengths, families, jitter=_TANGENT_JITTER)
            paths = []
            for t in range(steps):
                covariances = _new_step_covariances(
                    c11[:, : t + 1, t], c12[:, : t + 1, t], c12[:, t, : t + 1], c22[:, : t + 1, t], v1, v2, t
                )
                paths.append(sampler.step(t, *covariances))
            out.append(torch.stack(paths, 2))
        return out

    def _gate_derivative(self, x: Tensor) -> Tensor:
        return GATE_DERIVATIVES[self.gate](x)

    def extra_repr(self) -> str:
        return (
            f"nonlinearity={type(self.nonlinearity).__name__}, gate={self.gate}, "
            f"num_particles={self.num_particles}, " + super().extra_repr()
        )

    def _stds(self) -> dict:
        return {
            "weight_std": standard_deviation(self.weight_variance.detach()),
            "input_std": standard_deviation(self.input_variance.detach()),
            "bias_std": standard_deviation(self.bias_variance.detach()),
        }


# Gauss-Hermite nodes per dimension: over the reset-gate pair (a smooth gate), and over the
# candidate pair for nonlinearities without a closed form.
_RESET_NODES = 6
_CANDIDATE_NODES = 10
# Gauss-Hermite nodes per dimension for the LSTM's output-gate pair.
_GATE_NODES = 10


def _hermite_rule(count: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Nodes and weights (summing to one) of the Gauss-Hermite rule for a standard normal variable."""
    nodes, weights = numpy.polynomial.hermite_e.hermegauss(count)
    weights = weights / weights.sum()
    return torch.as_tensor(nodes, dtype=dtype, device=device), torch.as_tensor(weights, dtype=dtype, device=device)


def _correlated_nodes(k11: Tensor, k22: Tensor, k12: Tensor, nodes: Tensor) -> tuple[Tensor, Tensor]:
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


class _Block:
    """One block (a side with the other, or with itself) of a pair's GRU recursion, shell by shell."""

    def __init__(self, zero: Tensor, steps: int):
        self.zero = zero  # (B, 1)
        self.steps = steps
        self.rows: list[Tensor] = []  # K_h(t, 0..t)
        self.cols: list[Tensor] = []  # K_h(0..t, t)
        self.row = self.col = None  # per particle: Q(m, 0..m), Q(0..m, m)
        # Without autograd, Q's row and column are updated inside buffers for all steps (see StepStack).
        self._in_place = not torch.is_grad_enabled()
        self._row_buffer: Tensor | None = None
        self._col_buffer: Tensor | None = None

    def advance(self, m: int, h_n: Tensor, n_h: Tensor, keep_left: Tensor, keep_right: Tensor) -> None:
        """Shell ``m`` of ``Q`` from shell ``m - 1``: ``h_t = z_t h_{t-1} + (1 - z_t) n_t`` on each side.

        ``h_n``: ``E[h_a n'_m | z]`` and ``n_h``: ``E[n_m h'_b | z]`` for ``a, b = 0..m``;
        ``keep_left``, ``keep_right``: each side's update gate at step ``m``.
        """
        if self._in_place:
            self._advance_in_place(m, h_n, n_h, keep_left[..., 0], keep_right)
        else:
            if m == 0:
                new_col = h_n[..., :0]
                before = torch.zeros_like(n_h)
            else:
                new_col = torch.lerp(h_n[..., :m], self.col, keep_right)  # Q(a, m), a < m
                before = torch.cat([self.row, new_col[..., m - 1 :]], -1)  # Q(m-1, b), b = 0..m
            self.row = torch.lerp(n_h, before, keep_left)
            self.col = torch.cat([new_col, self.row[..., m:]], -1)
        self.rows.append(self.row.mean(1))
        self.cols.append(self.col.mean(1))

    def _advance_in_place(self, m: int, h_n: Tensor, n_h: Tensor, keep_left: Tensor, keep_right: Tensor) -> None:
        if self._row_buffer is None:
            self._row_buffer = n_h.new_empty(*n_h.shape[:-1], self.steps)
            self._col_buffer = n_h.new_empty(*n_h.shape[:-1], self.steps)
        rows, cols = self._row_buffer, self._col_buffer
        if m == 0:
            rows[..., 0] = n_h[..., 0] * (1 - keep_left)
        else:
            col = cols[..., :m]
            torch.lerp(h_n[..., :m], col, keep_right, out=col)  # Q(a, m) from Q(a, m - 1), a < m
            row = rows[..., :m]
            torch.lerp(n_h[..., :m], row, keep_left[..., None], out=row)  # Q(m, b) from Q(m - 1, b), b < m
            rows[..., m] = torch.lerp(n_h[..., m], cols[..., m - 1], keep_left)  # Q(m, m) from Q(m - 1, m)
        cols[..., m] = rows[..., m]
        self.row, self.col = rows[..., : m + 1], cols[..., : m + 1]

    def previous(self, m: int) -> tuple[Tensor, Tensor]:
        """``K_h(m - 1, a - 1)`` and ``K_h(a - 1, m - 1)`` for ``a = 0..m`` (0 where an index is -1)."""
        if m == 0:
            return self.zero, self.zero
        return _shifted(self.rows[-1]), _shifted(self.cols[-1])

    def diagonal(self, m: int) -> Tensor:
        """``K_h(a - 1, a - 1)`` for ``a = 0..m``."""
        if m == 0:
            return self.zero
        return _shifted(torch.stack([r[:, -1] for r in self.rows], -1))

    def matrix(self, steps: int) -> Tensor:
        lower = torch.stack([nn.functional.pad(r, (0, steps - r.shape[-1])) for r in self.rows], -2)
        upper = torch.stack([nn.functional.pad(c, (0, steps - c.shape[-1])) for c in self.cols], -1)
        return torch.tril(lower) + torch.triu(upper, 1)


class _GateProducts:
    """One side's update gates per particle, kept in the form :func:`_gated_scan` needs.

    With ``c_t`` the cumulative log of the gates since the start of ``t``'s block of
    ``_SCAN_BLOCK`` steps (each log kept at least ``-20``, i.e. gates below 2e-9 count
    as 2e-9, so that ``e^{-c}`` stays finite in float64): ``grow_t = e^{c_t}`` and
    ``enter_t = (1 - z_t) e^{-c_t}``.
    """

    def __init__(self, steps: int):
        self.log_gate: Tensor | None = None  # c of the last step
        self.grow, self.enter = StepStack(steps), StepStack(steps)

    def append(self, gate: Tensor) -> None:
        log_gate = torch.log(gate).clamp_min(-20.0)
        if self.grow.count % _SCAN_BLOCK:
            log_gate = self.log_gate + log_gate
        self.log_gate = log_gate
        self.grow.append(torch.exp(log_gate))
        self.enter.append((1 - gate) * torch.exp(-log_gate))


def _gated_scan(gates: _GateProducts, values: Tensor) -> Tensor:
    """``y_j = z_j y_{j-1} + (1 - z_j) values_j`` along the last axis (``y_{-1} = 0``), per particle.

    Within a block ``y = e^{c} (carry + cumsum((1 - z) values e^{-c}))``; blocks are chained by their carries.
    """
    count = values.shape[-1]
    grow, enter = gates.grow.first(count), gates.enter.first(count)
    blocks, carry = [], None
    for start in range(0, count, _SCAN_BLOCK):
        part = slice(start, start + _SCAN_BLOCK)
        total = torch.cumsum(enter[..., part] * values[..., part], -1)
        if carry is not None:
            total = total + carry
        y = grow[..., part] * total
        blocks.append(y)
        carry = y[..., -1:]
    return torch.cat(blocks, -1) if len(blocks) > 1 else blocks[0]


# Steps per block of the scan: within a block e^{-c} <= e^{20 * 32}, finite in float64 (the chunks run in float64).
_SCAN_BLOCK = 32


def _shifted(k: Tensor) -> Tensor:
    """``K_h(a - 1, .)`` for ``a = 0..t`` from its values at ``a - 1 = 0..t-1``: a zero in front."""
    return nn.functional.pad(k, (1, 0))


def _new_step_covariances(c11, c12, c21, c22, v1, v2, t):
    """The sampler's inputs for step ``t``; padding variables become independent unit variables.

    ``c11[:, a]`` is the covariance of side 1 at steps ``a`` and ``t`` (``a = 0..t``),
    ``c12[:, a]`` side 1 at ``a`` with side 2 at ``t``, ``c21[:, a]`` side 1 at ``t``
    with side 2 at ``a``, ``c22[:, a]`` side 2 at ``a`` and ``t``.
    """
    n1, n2 = v1[:, t : t + 1], v2[:, t : t + 1]
    p1, p2 = v1[:, :t], v2[:, :t]
    d11 = c11[:, t] * n1[:, 0] + (1 - n1[:, 0])
    d22 = c22[:, t] * n2[:, 0] + (1 - n2[:, 0])
    d12 = c12[:, t] * n1[:, 0] * n2[:, 0]
    if t == 0:
        return None, d11, d12, d22
    # Rows: previous variables (side 1 at a, side 2 at a) for a < t; columns: (side 1, side 2) at t.
    to_new1 = torch.stack([c11[:, :t] * p1, c21[:, :t] * p2], -1) * n1[..., None]  # (B, t, 2)
    to_new2 = torch.stack([c12[:, :t] * p1, c22[:, :t] * p2], -1) * n2[..., None]
    cross_past = torch.stack([to_new1.reshape(-1, 2 * t), to_new2.reshape(-1, 2 * t)], -1)
    return cross_past, d11, d12, d22


class GRU(_GatedRecurrent):
    r"""Gated recurrent unit of infinite width (``torch.nn.GRU``'s cell), NNGP and NTK.

    See the module docstring for the equations, the limit and the numerical
    integration; the output is the state :math:`h_t` at every step (end the
    network with :class:`~gpytorch_tp.layers.LastStep` or
    :class:`~gpytorch_tp.layers.TimeMean` and a :class:`~gpytorch_tp.layers.Linear`).

    Particles: the update-gate family :math:`\tilde z` only; given it, the
    state is linear in the candidates :math:`n_t`, whose second moments
    :math:`E[n_a n'_b]` are Gauss-Hermite integrals over the reset-gate pair
    (6 x 6 nodes) of the nonlinearity's closed form (erf; tanh through its
    six-term erf expansion, :func:`~gpytorch_tp.numerics.tanh_pair_moment`,
    1e-6) or of a 10 x 10-node rule (other nonlinearities).  The NTK samples all four families
    (:meth:`_tangent_chunk`), with erf integrating the candidate input out of the
    terms through :math:`\phi'` (closed form; half the error).

    :param nonlinearity: :math:`\phi` of the candidate state (default ``"tanh"``, as in
        ``torch.nn.GRU``); any elementwise nonlinearity (its function, and for the NTK its
        derivative: a closed form where the class has one, else forward-mode autodiff).
    :param gate: ``"sigmoid"`` (logistic, as in ``torch.nn.GRU``) or ``"erf"``
        (:math:`(1 + \operatorname{erf} x)/2`, TP1's choice).
    :param weight_variance: :math:`\sigma_w^2` of every recurrent matrix (default 1).
    :param input_variance: :math:`\sigma_u^2` of every input matrix (default 1).
    :param bias_variance: :math:`\sigma_b^2` of every bias (default 0.1; 0 is held fixed).
    :param num_particles: quasi-Monte Carlo particles per pair of sequences (even;
        default 1024).  Error and cost: see the module docstring.

    Example:
        >>> from gpytorch_tp.layers import GRU, LastStep, Linear, Sequential
        >>> net = Sequential(GRU(), LastStep(), Linear())
    """

    _families = (("gates", 1),)
    _uses_own_covariances = True

    def _chunk(self, kx12, kx11, kx22, v1, v2, w, u, b, own1=None, own2=None, blocks=False) -> Tensor:
        """``K_h`` of a chunk of pairs ``(B, T, T)``: update-gate particles, the candidate integrated exactly.

        Shell ``m`` adds the step pairs ``(m, s)`` and ``(a, m)``; per particle
        it keeps ``Q(t, s) = E[h_t h'_s | z]`` on the last shell and the
        update-gate paths, for the pair (block ``12``) and, so that the pair's
        covariance of all ``2T`` gate pre-activations is a Gram matrix (positive
        semi-definite), for each side with itself (blocks ``11``, ``22``).
        ``own1``/``own2`` only tell that the two items differ (``None``: an item
        paired with itself, where one block serves all three).
        """
        batch, steps = v1.shape
        count = self.num_particles
        lengths = torch.maximum(v1.sum(-1), v2.sum(-1)).round().long()
        sampler = PairParticles(base_normals(count, steps * 2, kx12.device), steps - lengths, 1)
        coef = (u[:, None], w[:, None], b[:, None])
        gates = (_GateProducts(steps), _GateProducts(steps))
        pair = own1 is not None
        sides = {"12": (0, 1, kx12), "11": (0, 0, kx11), "22": (1, 1, kx22)} if pair else {"12": (0, 1, kx12)}
        valid = (v1, v2)
        side_blocks = {name: _Block(kx12.new_zeros(batch, 1), steps) for name in sides}
        for m in range(steps):
            kh = {name: block.previous(m) for name, block in side_blocks.items()}  # K_h(m-1, a-1), K_h(a-1, m-1)
            row12, col12 = kh["12"]
            within1 = kh["11"][1] if pair else col12  # K_h(a-1, m-1) of side 1 with itself
            within2 = kh["22"][1] if pair else row12
            u_, w_, b_ = coef
            c11 = u_ * kx11[:, : m + 1, m] + w_ * within1 + b_
            c12 = u_ * kx12[:, : m + 1, m] + w_ * col12 + b_
            c21 = u_ * kx12[:, m, : m + 1] + w_ * row12 + b_
            c22 = u_ * kx22[:, : m + 1, m] + w_ * within2 + b_
            cross_past, d11, d12, d22 = _new_step_covariances(c11, c12, c21, c22, v1, v2, m)
            z = self._gate(sampler.step(m, cross_past, d11, d12, d22)[:, :, 0])  # (B, M, 2)
            gates[0].append(z[..., 0])
            gates[1].append(z[..., 1])
            gate_cov = {"12": (c12, c21), "11": (c11, c11), "22": (c22, c22)}
            for name, (left, right, kx) in sides.items():
                block = side_blocks[name]
                kh_row, kh_col = kh[name]
                self._shell(
                    m,
                    block,
                    kx,
                    kh_row,
                    kh_col,
                    gate_cov[name],
                    (kx11, kx22)[left].diagonal(0, -2, -1),
                    (kx11, kx22)[right].diagonal(0, -2, -1),
                    side_blocks[("11" if left == 0 else "22") if pair else "12"].diagonal(m),
                    side_blocks[("11" if right == 0 else "22") if pair else "12"].diagonal(m),
                    valid[left],
                    valid[right],
                    gates[left],
                    gates[right],
                    z[..., left : left + 1],
                    z[..., right : right + 1],
                    coef,
                )
        pair12 = side_blocks["12"].matrix(steps)
        if not blocks:
            return pair12
        if not pair:
            return torch.stack([pair12] * 3, 1)
        return torch.stack([pair12, side_blocks["11"].matrix(steps), side_blocks["22"].matrix(steps)], 1)

    def _shell(
        self,
        m,
        block,
        kx,
        kh_row,
        kh_col,
        gate_cov,
        x_left,
        x_right,
        h_left,
        h_right,
        valid_left,
        valid_right,
        gates_left,
        gates_right,
        keep_left,
        keep_right,
        coef,
    ) -> None:
        """Add shell ``m`` to ``block``: ``E[n_m n'_b]``, ``E[n_a n'_m]`` exactly, then ``Q`` per particle."""
        u, w, b = coef
        c_col, c_row = gate_cov  # Cov(left at a, right at m) and Cov(left at m, right at a), a = 0..m
        g_left, g_right = u * x_left[:, : m + 1] + w * h_left + b, u * x_right[:, : m + 1] + w * h_right + b
        a_left, a_right = u * x_left[:, : m + 1] + b, u * x_right[:, : m + 1] + b
        b_left, b_right = w * h_left + b, w * h_right + b

        def at(v: Tensor) -> Tensor:
            return v[:, m : m + 1].expand(-1, m + 1)

        n_row = self._candidate_moment(
            (at(g_left), g_right, c_row),
            (at(a_left), a_right, u * kx[:, m, : m + 1] + b),
            (at(b_left), b_right, w * kh_row + b),
        ) * (valid_left[:, m : m + 1] * valid_right[:, : m + 1])
        if gates_left is gates_right:
            # A sequence with itself: E[n_a n_m] = E[n_m n_a] (both rules are exactly symmetric up to
            # rounding), so the column is the row, and the two scans are one.
            h_n = n_h = _gated_scan(gates_left, n_row[:, None])
        else:
            n_col = self._candidate_moment(
                (g_left[:, :m], at(g_right)[:, :m], c_col[:, :m]),
                (a_left[:, :m], at(a_right)[:, :m], u * kx[:, :m, m] + b),
                (b_left[:, :m], at(b_right)[:, :m], w * kh_col[:, :m] + b),
            ) * (valid_left[:, :m] * valid_right[:, m : m + 1])
            h_n = _gated_scan(gates_left, torch.cat([n_col, n_row[:, m:]], -1)[:, None])  # E[h_a n'_m | z]
            n_h = _gated_scan(gates_right, n_row[:, None])  # E[n_m h'_b | z]
        block.advance(m, h_n, n_h, keep_left, keep_right)

    def _candidate_moment(self, reset: tuple, inputs: tuple, hidden: tuple) -> Tensor:
        r"""``E[phi(A + r B) phi(A' + r' B')]`` from the covariances ``(k11, k22, k12)`` of the reset
        pre-activations, of ``(A, A')`` and of ``(B, B')``: Gauss-Hermite over the reset pair, then the
        nonlinearity's closed form (erf, tanh to 1e-6) or Gauss-Hermite over the candidate pair.

        Both rules act on the symmetric square roots of the pair covariances, so the value is
        exactly symmetric in the two sequences.
        """
        nodes, weights = _hermite_rule(_RESET_NODES, reset[0].dtype, reset[0].device)
        first, second = _correlated_nodes(*reset, nodes)  # (..., G, G)
        r1, r2 = self._gate(first), self._gate(second)
        a11, a22, a12 = (v[..., None, None] for v in inputs)
        b11, b22, b12 = (v[..., None, None] for v in hidden)
        k11, k22, k12 = a11 + r1 * r1 * b11, a22 + r2 * r2 * b22, a12 + r1 * r2 * b12
        if isinstance(self.nonlinearity, Erf):
            moment = self.nonlinearity.pair_moments(k11, k22, k12, False)[0]
        elif isinstance(self.nonlinearity, Tanh):
            moment = tanh_pair_moment(k11, k22, k12)
        else:
            cand_nodes, cand_weights = _hermite_rule(_CANDIDATE_NODES, k11.dtype, k11.device)
            u, v = _correlated_nodes(k11, k22, k12, cand_nodes)  # (..., G, G, H, H)
            fn = self.nonlinearity.function
            moment = torch.einsum("...ij,i,j->...", fn(u) * fn(v), cand_weights, cand_weights)
        return torch.einsum("...ij,i,j->...", moment, weights, weights)

    def _tangent_chunk(self, kx12, kx11, kx22, kh12, kh11, kh22, tx12, v1, v2, w, u, b) -> Tensor:
        r"""``Theta_h`` of a chunk of pairs ``(B, T, T)``: particles of all four families, then the tangent recursion.

        Families :math:`\tilde z, \tilde r` (the gates' covariance), :math:`A = W_n x + b_n` and
        :math:`B = U_n h + b_{hn}`, drawn with the covariances of the given ``K_h``; per particle
        :math:`dh_t = z_t dh_{t-1} + c^z_t \tau^z_t + c^r_t \tau^r_t + c^A_t \tau^A_t + c^B_t \tau^B_t`
        with :math:`c^z = (h_{t-1} - n_t) \sigma'(\tilde z_t)`, :math:`c^A = (1 - z_t) \phi'(A_t + r_t B_t)`,
        :math:`c^B = c^A r_t`, :math:`c^r = c^A B_t \sigma'(\tilde r_t)`.
        """
        steps = v1.shape[-1]
        u_, w_, b_ = u[:, None, None], w[:, None, None], b[:, None, None]
        inputs = [u_ * kx + b_ for kx in (kx11, kx12, kx22)]  # Cov(A): blocks 11, 12, 22
        hidden = [w_ * shift_both(kh) + b_ for kh in (kh11, kh12, kh22)]  # Cov(B)
        gate_covariances = [a + h - b_ for a, h in zip(inputs, hidden)]
        gates, candidate_inputs, candidate_hidden = self._sample_paths(
            [(*gate_covariances, 2), (*inputs, 1), (*hidden, 1)], v1, v2
        )
        # With erf, E[phi'(U) phi'(V)] of a Gaussian pair has a closed form: the candidate input A is
        # then integrated out of the r, A and B terms given the other families (it dominates the error).
        integrate_inputs = isinstance(self.nonlinearity, Erf)
        coefficients, keeps, parts = [], [], []
        for side, valid in enumerate((v1, v2)):
            z_pre, r_pre = gates[..., 0, side], gates[..., 1, side]  # (B, M, T)
            a, bh = candidate_inputs[..., 0, side], candidate_hidden[..., 0, side]
            z, r = self._gate(z_pre), self._gate(r_pre)
            pre = a + r * bh
            n = self.nonlinearity.function(pre)
            state, before = torch.zeros_like(n[..., 0]), []
            for t in range(steps):
                before.append(state)
                state = ((1 - z[..., t]) * n[..., t] + z[..., t] * state) * valid[:, None, t]
            c_a = (1 - z) * derivative(self.nonlinearity, pre)
            c_z = (torch.stack(before, -1) - n) * self._gate_derivative(z_pre)
            c_r = c_a * bh * self._gate_derivative(r_pre)
            if integrate_inputs:
                # c^A = (1 - z) phi'(A + r B), c^B = c^A r, c^r = c^A B sigma'(r~): all but phi'(A + r B).
                coefficients.append(c_z[:, :, None] * valid[:, None, None, :])
                parts.append(((1 - z) * valid[:, None, :], r, bh * self._gate_derivative(r_pre), r * bh))
            else:
                coefficients.append(torch.stack([c_z, c_r, c_a, c_a * r], -2) * valid[:, None, None, :])
            keeps.append(z)
        input_part = u_ * (kx12 + tx12) + b_  # Gamma of A
        hidden_part = w_ * shift_both(kh12) + b_  # Gamma of B, before Theta_h

        def gammas(t: int, previous: Tensor | None) -> Tensor:
            recurrent = hidden_part[:, t]
            if previous is not None:
                recurrent = recurrent + w[:, None] * nn.functional.pad(previous[:, :-1], (1, 0))
            gate = input_part[:, t] + recurrent - b[:, None]
            return torch.stack([gate, gate, input_part[:, t], recurrent], 1)

        def readout(t: int, moments: Tensor, gamma: Tensor) -> Tensor:
            return moments.mean(1)

        integrated = None
        if integrate_inputs:
            var1, var2 = inputs[0].diagonal(0, -2, -1), inputs[2].diagonal(0, -2, -1)  # Var(A) (B, T)
            (open1, r1, slope1, shift1), (open2, r2, slope2, shift2) = parts

            def integrated(t: int, gamma: Tensor) -> Tensor:
                """The r, A, B terms of E(t, :) with E[phi'(A_t + r_t B_t) phi'(A'_s + r'_s B'_s) | z, r, B]."""
                moment = erf_slope_moment(
                    shift1[..., t, None], shift2, var1[:, t, None, None], var2[:, None], inputs[1][:, t, None]
                )
                families = (
                    gamma[:, None, 2]
                    + r1[..., t, None] * r2 * gamma[:, None, 3]
                    + slope1[..., t, None] * slope2 * gamma[:, None, 1]
                )
                return open1[..., t, None] * open2 * moment * families

        theta = tangent_rows(*coefficients, *keeps, gammas, readout, integrated)
        return theta * v1[:, :, None] * v2[:, None, :]

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(f"GRU needs sequence features (channels, T), got feature shape {tuple(in_shape)}")
        module = NTKGRU(in_shape[0], width, self.nonlinearity.function, GATES[self.gate], **self._stds())
        return module, (width, in_shape[1])


class LSTM(_GatedRecurrent):
    r"""Long short-term memory layer of infinite width (``torch.nn.LSTM``'s cell), NNGP and NTK.

    See the module docstring for the equations, the limit and the numerical
    integration.  Particles: the pre-activation families
    :math:`\tilde i, \tilde f, \tilde g` (one covariance), three coordinates
    per step and sequence; the cell state :math:`c_t` is run per particle, and
    the output gate's :math:`E[o_t o'_s]` is integrated by Gauss-Hermite
    quadrature (closed form for the erf gate); the NTK likewise
    (:meth:`_tangent_chunk`).

    :param nonlinearity: :math:`\phi` of the cell input and output (default ``"tanh"``).
    :param gate: ``"sigmoid"`` (as in ``torch.nn.LSTM``) or ``"erf"``.
    :param weight_variance: :math:`\sigma_w^2` of every recurrent matrix (default 1).
    :param input_variance: :math:`\sigma_u^2` of every input matrix (default 1).
    :param bias_variance: :math:`\sigma_b^2` of every bias (default 0.1; 0 is held fixed).
    :param num_particles: quasi-Monte Carlo particles per pair of sequences (even; default 1024).

    Example:
        >>> from gpytorch_tp.layers import LSTM, LastStep, Linear, Sequential
        >>> net = Sequential(LSTM(), LastStep(), Linear())
    """

    _families = (("gates", 3),)  # i, f, g; the output gate is integrated exactly

    def _chunk(self, kx12, kx11, kx22, v1, v2, w, u, b, blocks=False) -> Tensor:
        """``K_h`` of a chunk of pairs ``(B, T, T)``: particles of ``i, f, g``, the output gate exactly.

        ``o`` is independent of the cell state, so ``K_h(t, s) = E[o_t o'_s] E[phi(c_t) phi(c'_s)]``:
        the first factor by quadrature over the output-gate pair, the second by the particles.
        Each side's own step pairs come from the same particles and quadrature, so the pair's
        covariance of all ``2T`` pre-activations is positive semi-definite (a Hadamard product
        of two such matrices).
        """
        batch, steps = v1.shape
        count = self.num_particles
        lengths = torch.maximum(v1.sum(-1), v2.sum(-1)).round().long()
        sampler = PairParticles(base_normals(count, steps * 3 * 2, kx12.device), steps - lengths, 3)
        uw, ww, bw = u[:, None], w[:, None], b[:, None]
        out1, out2 = StepStack(steps), StepStack(steps)  # phi(c_t) per particle (B, M, t), 0 at padding
        diag1: list[Tensor] = []  # gate variances C(t, t) of each side (B,)
        diag2: list[Tensor] = []
        gate_rows: list[Tensor] = []  # C(t, 0..t): side 1 at t, side 2 at a
        gate_cols: list[Tensor] = []  # C(0..t, t)
        own_rows: tuple[list[Tensor], list[Tensor]] = ([], [])  # each side's C(t, 0..t) with itself
        previous = None  # the previous step's (c11, c12, c21, c22)
        cell = None
        for t in range(steps):
            if t == 0:
                kh_11 = kh_12 = kh_21 = kh_22 = kx12.new_zeros(batch, 1)
            else:
                s1, s2 = out1.all(), out2.all()  # (B, M, t)
                last1, last2 = s1[..., -1], s2[..., -1]
                d1, d2 = torch.stack(diag1, -1), torch.stack(diag2, -1)  # (B, t)
                p11, p12, p21, p22 = previous  # covariances of step t-1 with a' = 0..t-1

                def last(d: Tensor, t: int = t) -> Tensor:
                    return d[:, -1:].expand(-1, t)

                # K_h(a', t - 1) = E[o o'] E[phi(c) phi(c')] for a' = 0..t-1, then shifted to a = a' + 1.
                kh_12 = _shifted(
                    self._gate_moment(d1, last(d2), p12[:, :t]) * torch.einsum("bma,bm->ba", s1, last2) / count
                )
                kh_21 = _shifted(
                    self._gate_moment(last(d1), d2, p21[:, :t]) * torch.einsum("bm,bma->ba", last1, s2) / count
                )
                kh_11 = _shifted(
                    self._gate_moment(d1, last(d1), p11[:, :t]) * torch.einsum("bma,bm->ba", s1, last1) / count
                )
                kh_22 = _shifted(
                    self._gate_moment(d2, last(d2), p22[:, :t]) * torch.einsum("bma,bm->ba", s2, last2) / count
                )
            c11 = uw * kx11[:, : t + 1, t] + ww * kh_11 + bw
            c12 = uw * kx12[:, : t + 1, t] + ww * kh_12 + bw  # side 1 at a, side 2 at t
            c21 = uw * kx12[:, t, : t + 1] + ww * kh_21 + bw  # side 1 at t, side 2 at a
            c22 = uw * kx22[:, : t + 1, t] + ww * kh_22 + bw
            previous = (c11, c12, c21, c22)
            diag1.append(c11[:, t])
            diag2.append(c22[:, t])
            gate_rows.append(c21)
            gate_cols.append(c12)
            own_rows[0].append(c11)
            own_rows[1].append(c22)
            cross_past, d11, d12, d22 = _new_step_covariances(c11, c12, c21, c22, v1, v2, t)
            pre = sampler.step(t, cross_past, d11, d12, d22)  # (B, M, 3, 2): i, f, g
            i, f = self._gate(pre[:, :, 0]), self._gate(pre[:, :, 1])
            g = self.nonlinearity.function(pre[:, :, 2])
            valid = torch.stack([v1[:, t], v2[:, t]], -1)[:, None, :]
            cell = (i * g if cell is None else f * cell + i * g) * valid
            state = self.nonlinearity.function(cell) * valid
            out1.append(state[..., 0])
            out2.append(state[..., 1])
        cells = torch.einsum("bmt,bms->bts", out1.all(), out2.all()) / count
        lower = torch.stack([nn.functional.pad(r, (0, steps - r.shape[-1])) for r in gate_rows], -2)
        upper = torch.stack([nn.functional.pad(c, (0, steps - c.shape[-1])) for c in gate_cols], -1)
        gate_cov = torch.tril(lower) + torch.triu(upper, 1)
        d1, d2 = torch.stack(diag1, -1), torch.stack(diag2, -1)
        outputs = self._gate_moment(d1[:, :, None].expand_as(gate_cov), d2[:, None, :].expand_as(gate_cov), gate_cov)
        if not blocks:
            return outputs * cells
        sides = [outputs * cells]
        for rows, diag, out in zip(own_rows, (d1, d2), (out1, out2)):
            lower = torch.tril(torch.stack([nn.functional.pad(r, (0, steps - r.shape[-1])) for r in rows], -2))
            own_cov = lower + torch.tril(lower, -1).transpose(-1, -2)
            first, second = diag[:, :, None].expand_as(own_cov), diag[:, None, :].expand_as(own_cov)
            moment = self._gate_moment(first, second, own_cov)
            states = out.all()
            sides.append(moment * torch.einsum("bmt,bms->bts", states, states) / count)
        return torch.stack(sides, 1)

    def _tangent_chunk(self, kx12, kx11, kx22, kh12, kh11, kh22, tx12, v1, v2, w, u, b) -> Tensor:
        r"""``Theta_h`` of a chunk of pairs ``(B, T, T)``: particles of :math:`\tilde i, \tilde f, \tilde g`,
        the output gate by quadrature, and the tangent recursion of the cell state.

        :math:`dc_t = f_t dc_{t-1} + c_{t-1} \sigma'(\tilde f_t) \tau^f_t + g_t \sigma'(\tilde i_t) \tau^i_t
        + i_t \phi'(\tilde g_t) \tau^g_t` and :math:`dh_t = \phi(c_t) \sigma'(\tilde o_t) \tau^o_t
        + o_t \phi'(c_t) dc_t`; the output gate is independent of the rest, so
        :math:`\Theta_h(t, s) = E[\sigma'(\tilde o_t) \sigma'(\tilde o'_s)] E[\phi(c_t) \phi(c'_s)] \Gamma(t, s)
        + E[o_t o'_s] E[\phi'(c_t) \phi'(c'_s) P^c(t, s)]`.
        """
        steps, count = v1.shape[-1], self.num_particles
        u_, w_, b_ = u[:, None, None], w[:, None, None], b[:, None, None]
        cov11, cov12, cov22 = (
            u_ * kx + w_ * shift_both(kh) + b_ for kx, kh in ((kx11, kh11), (kx12, kh12), (kx22, kh22))
        )
        (paths,) = self._sample_paths([(cov11, cov12, cov22, 3)], v1, v2)
        coefficients, keeps, values, slopes = [], [], [], []
        for side, valid in enumerate((v1, v2)):
            i_pre, f_pre, g_pre = (paths[..., k, side] for k in range(3))  # (B, M, T)
            i, f, g = self._gate(i_pre), self._gate(f_pre), self.nonlinearity.function(g_pre)
            cell, before, cells = torch.zeros_like(i[..., 0]), [], []
            for t in range(steps):
                before.append(cell)
                cell = (f[..., t] * cell + i[..., t] * g[..., t]) * valid[:, None, t]
                cells.append(cell)
            cell_before, cell_now = torch.stack(before, -1), torch.stack(cells, -1)
            coefficients.append(
                torch.stack(
                    [
                        g * self._gate_derivative(i_pre),
                        cell_before * self._gate_derivative(f_pre),
                        i * derivative(self.nonlinearity, g_pre),
                    ],
                    -2,
                )
                * valid[:, None, None, :]
            )
            keeps.append(f)
            values.append(self.nonlinearity.function(cell_now) * valid[:, None, :])
            slopes.append(derivative(self.nonlinearity, cell_now) * valid[:, None, :])
        d1 = cov11.diagonal(0, -2, -1)[:, :, None].expand_as(cov12)
        d2 = cov22.diagonal(0, -2, -1)[:, None, :].expand_as(cov12)
        output_gates = self._gate_moment(d1, d2, cov12)  # E[o_t o'_s]
        output_slopes = self._gate_slope_moment(d1, d2, cov12)  # E[sigma'(o~_t) sigma'(o~'_s)]
        states = torch.einsum("bmt,bms->bts", *values) / count  # E[phi(c_t) phi(c'_s)]
        forward_part = cov12 + u_ * tx12  # Gamma before Theta_h

        def gammas(t: int, previous: Tensor | None) -> Tensor:
            gamma = forward_part[:, t]
            if previous is not None:
                gamma = gamma + w[:, None] * nn.functional.pad(previous[:, :-1], (1, 0))
            return gamma[:, None].expand(-1, 3, -1)

        def readout(t: int, moments: Tensor, gamma: Tensor) -> Tensor:
            through_cell = torch.einsum("bm,bms->bs", slopes[0][..., t], slopes[1] * moments) / count
            return output_slopes[:, t] * states[:, t] * gamma[:, 0] + output_gates[:, t] * through_cell

        theta = tangent_rows(*coefficients, *keeps, gammas, readout)
        return theta * v1[:, :, None] * v2[:, None, :]

    def _gate_slope_moment(self, k11: Tensor, k22: Tensor, k12: Tensor) -> Tensor:
        """``E[sigma'(u) sigma'(v)]`` for a centred pair with covariance ``[[k11, k12], [k12, k22]]``."""
        if self.gate == "erf":
            # sigma'(x) = exp(-x^2) / sqrt(pi), and E[exp(-u^2 - v^2)] = det(I + 2 C)^(-1/2).
            return 1 / (math.pi * torch.sqrt((1 + 2 * k11) * (1 + 2 * k22) - 4 * k12 * k12))
        nodes, weights = _hermite_rule(_GATE_NODES, k11.dtype, k11.device)
        first, second = _correlated_nodes(k11, k22, k12, nodes)
        products = self._gate_derivative(first) * self._gate_derivative(second)
        return torch.einsum("...ij,i,j->...", products, weights, weights)

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(f"LSTM needs sequence features (channels, T), got feature shape {tuple(in_shape)}")
        module = NTKLSTM(in_shape[0], width, self.nonlinearity.function, GATES[self.gate], **self._stds())
        return module, (width, in_shape[1])
