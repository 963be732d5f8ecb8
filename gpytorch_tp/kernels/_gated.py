"""The construction shared by :class:`GRUKernel` and :class:`LSTMKernel`."""

from __future__ import annotations

import copy

import torch
from gpytorch.priors import Prior

from ..layers import LastStep, Layer, Linear, Sequential, TimeMean, nonlinearity_from_name
from .rnn_kernel import READOUTS
from .tensor_program_kernel import TensorProgramKernel


class GatedRecurrentKernel(TensorProgramKernel):
    """Stacked gated recurrent layers (``_layer``), a readout over time and a dense output layer."""

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
        **kwargs,
    ):
        name = type(self).__name__
        if kind not in ("nngp", "ntk"):
            raise ValueError(f"kind must be 'nngp' or 'ntk' for {name}, got {kind!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if input_shape is None or len(tuple(input_shape)) != 2:
            raise ValueError(f"{name} needs input_shape=(T, d), got {input_shape}")
        template = nonlinearity_from_name(nonlinearity)
        batch_shape = torch.Size(kwargs.get("batch_shape") or [])
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
        layers += [
            LastStep() if readout == "last" else TimeMean(),
            Linear(readout_variance, bias_variance, batch_shape=batch_shape),
        ]
        super().__init__(Sequential(*layers), kind=kind, input_shape=tuple(input_shape), sequence=True, **kwargs)
        self.depth, self.readout = depth, readout
