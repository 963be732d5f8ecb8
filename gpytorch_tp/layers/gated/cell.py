r"""What the gated recurrent layers (GRU, LSTM) share: hyperparameters, gates, batches of pairs, particles.

:class:`GatedRecurrent` holds the variances and the gate, maps a state by
running the subclass's per-pair computation (``_chunk``, ``_tangent_chunk``)
over all pairs of sequences flattened to batches of bounded memory, and draws
the NTK's forward particles.  See :mod:`gpytorch_tp.layers.gated` for the
equations, the limit and the numerical integration.
"""

from __future__ import annotations

import functools
import math

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...state import KernelState, per_item
from ..base import Layer, standard_deviation, variance_property
from ..elementwise import Erf, Nonlinearity, nonlinearity_from_name
from ..input_checks import check_sequence
from .particles import PairParticles, base_normals
from .quadrature import correlated_nodes, hermite_rule
from .tangents import GATE_DERIVATIVES

__all__ = ["GATES", "GatedRecurrent", "erf_gate", "new_step_covariances", "shift_one_step"]


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

# Gauss-Hermite nodes per dimension over a gate pair integrated by quadrature (the LSTM's output gate).
_GATE_NODES = 10


class GatedRecurrent(Layer):
    """Shared machinery of :class:`~gpytorch_tp.layers.GRU` and :class:`~gpytorch_tp.layers.LSTM`."""

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
        check_sequence(self, state)
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
        out = state.after_recurrence(cross=cross, var1=hidden1, var2=hidden2, ntk=None)
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
        nodes, weights = hermite_rule(_GATE_NODES, k11.dtype, k11.device)
        first, second = correlated_nodes(k11, k22, k12, nodes)
        return torch.einsum("...ij,i,j->...", self._gate(first) * self._gate(second), weights, weights)

    def _gate_slope_moment(self, k11: Tensor, k22: Tensor, k12: Tensor) -> Tensor:
        """``E[sigma'(u) sigma'(v)]`` for a centred pair with covariance ``[[k11, k12], [k12, k22]]``."""
        if self.gate == "erf":
            # sigma'(x) = exp(-x^2) / sqrt(pi), and E[exp(-u^2 - v^2)] = det(I + 2 C)^(-1/2).
            return 1 / (math.pi * torch.sqrt((1 + 2 * k11) * (1 + 2 * k22) - 4 * k12 * k12))
        nodes, weights = hermite_rule(_GATE_NODES, k11.dtype, k11.device)
        first, second = correlated_nodes(k11, k22, k12, nodes)
        products = self._gate_derivative(first) * self._gate_derivative(second)
        return torch.einsum("...ij,i,j->...", products, weights, weights)

    def _gate(self, x: Tensor) -> Tensor:
        return GATES[self.gate](x)

    # -- the NTK (see tangents) ---------------------------------------------------------------

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
                covariances = new_step_covariances(
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


def shift_one_step(k: Tensor) -> Tensor:
    """``K_h(a - 1, .)`` for ``a = 0..t`` from its values at ``a - 1 = 0..t-1``: a zero in front."""
    return nn.functional.pad(k, (1, 0))


def new_step_covariances(
    c11: Tensor, c12: Tensor, c21: Tensor, c22: Tensor, v1: Tensor, v2: Tensor, t: int
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
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
