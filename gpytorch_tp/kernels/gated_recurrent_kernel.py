"""The construction shared by :class:`GRUKernel` and :class:`LSTMKernel`."""

from __future__ import annotations

import copy

import torch
from gpytorch.priors import Prior
from torch import Tensor

from ..layers import Layer, Sequential, nonlinearity_from_name
from ..layers.gated.psd_projection import project_psd
from ..state import KINDS
from .presets import check_choice, check_depth, check_sequence_shape, hyperparameter_batch_shape, recurrent_readout
from .rnn_kernel import READOUTS
from .tensor_program_kernel import TensorProgramKernel


def same_points(x1: Tensor, x2: Tensor | None) -> bool:
    """``x1`` and ``x2`` hold the same items (NaN padding counts as equal)."""
    if x2 is None or x1 is x2:
        return True
    if x1.shape != x2.shape:
        return False
    with torch.no_grad():
        return bool(((x1 == x2) | (torch.isnan(x1) & torch.isnan(x2))).all())


class GatedRecurrentKernel(TensorProgramKernel):
    """Stacked gated recurrent layers (``_layer``), a readout over time and a dense output layer.

    Kernel matrices of a set of points with itself (``k(x)``, ``k(x, x)``, dense) are made
    positive semi-definite by :func:`~gpytorch_tp.layers.gated.psd_projection.project_psd`: the
    particle estimate is per pair of sequences, which no construction makes a Gram matrix
    of per-item features (see ``docs/rnn.md``), so its smallest eigenvalues can fall below
    zero by about the particle error.
    """

    _layer: type

    def __init__(
        self,
        input_shape: tuple[int, int],
        depth: int = 1,
        nonlinearity: str | Layer = "tanh",
        gate: str = "sigmoid",
        kind: str = "nngp",
        *,
        readout: str = "last",
        weight_variance: float = 1.0,
        input_variance: float = 1.0,
        bias_variance: float = 0.1,
        readout_variance: float = 1.0,
        num_particles: int = 1024,
        weight_variance_prior: Prior | None = None,
        psd_projection: bool = True,
        **kwargs,
    ):
        name = type(self).__name__
        if psd_projection not in (True, False):
            raise ValueError(f"psd_projection must be True or False, got {psd_projection!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be 'nngp' or 'ntk' for {name}, got {kind!r}")
        check_depth(depth)
        check_choice("readout", readout, READOUTS)
        input_shape = check_sequence_shape(name, input_shape)
        template = nonlinearity_from_name(nonlinearity)
        batch_shape = hyperparameter_batch_shape(kwargs)
        layers: list[Layer] = [
            self._layer(
                template if i == 0 else copy.deepcopy(template),
                gate,
                weight_variance,
                input_variance,
                bias_variance,
                num_particles=num_particles,
                weight_variance_prior=copy.deepcopy(weight_variance_prior),
                batch_shape=batch_shape,
            )
            for i in range(depth)
        ]
        layers += recurrent_readout(readout, readout_variance, bias_variance, batch_shape)
        super().__init__(Sequential(*layers), kind=kind, input_shape=input_shape, sequence=True, **kwargs)
        self.depth, self.readout = depth, readout
        self.psd_projection = bool(psd_projection)

    def _projects(self, x1: Tensor, x2: Tensor | None, diag: bool, out: Tensor) -> bool:
        # getattr: kernels pickled before the option existed.
        if not getattr(self, "psd_projection", True) or diag or out.shape[-1] == 0:
            return False
        return same_points(x1, x2)

    def _dense_forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False) -> Tensor:
        out = super()._dense_forward(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch)
        return project_psd(out) if self._projects(x1, x2, diag, out) else out

    def nngp_and_ntk(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False) -> tuple[Tensor, Tensor]:
        nngp, ntk = super().nngp_and_ntk(x1, x2, diag=diag)
        if not self._projects(x1, x2, diag, nngp):
            return nngp, ntk
        return project_psd(nngp), project_psd(ntk)
