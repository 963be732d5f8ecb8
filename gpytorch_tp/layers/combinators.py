"""Combinators that build architectures from layers."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..finite import ResidualSum
from ..fusion import fusion_active, plain_pairs, run_fused
from ..state import KernelState, per_item
from .base import Layer
from .finite_network import finite_sequence

__all__ = ["Residual", "Sequential"]


class Sequential(Layer):
    """Layers applied one after the other.

    Example:
        >>> from gpytorch_tp.layers import Linear, ReLU, Sequential
        >>> net = Sequential(Linear(2.0, 0.1), ReLU(), Linear(2.0, 0.1))
    """

    def __init__(self, *layers: Layer):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"Sequential: item {i} is a {type(layer).__name__}, not a gpytorch_tp Layer "
                    "(torch.nn modules are not layers of an infinite-width architecture)"
                )
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def forward(self, state: KernelState) -> KernelState:
        if not fusion_active():
            for layer in self.layers:
                state = layer(state)
            return state
        # Runs of layers with elementwise pair work become one compiled pass
        # (see gpytorch_tp.fusion); the per-item work is done as it comes.
        run: list[tuple[Layer, tuple, Tensor]] = []
        run_input = state
        for layer in self.layers:
            split = layer.fusion_split(state) if plain_pairs(state) else None
            if split is None:
                state = layer(self._finish_run(run, run_input, state))
                run, run_input = [], state
            else:
                state, layer_args = split
                run.append((layer, layer_args, state.var1))
        return self._finish_run(run, run_input, state)

    def _finish_run(self, run: list[tuple[Layer, tuple, Tensor]], run_input: KernelState, state: KernelState):
        """``state`` with the pair work of ``run`` (layers, their split arguments, their variances) done."""
        if not run:
            return state
        if len(run) == 1:
            # Nothing to fuse: the layer's own forward is the reference.
            return run[0][0](run_input)
        layers, args, variances = zip(*run)
        cross, ntk = run_fused(
            self,
            layers,
            run_input.cross,
            run_input.ntk,
            args,
            state.track_ntk,
            self_pair_variances=variances if state.same_inputs else None,
        )
        # The self pairs already hold the variances: skip replace()'s copy of them.
        return dataclasses.replace(state, cross=cross, ntk=ntk)

    @property
    def needs_all_position_pairs(self) -> bool:
        return any(layer.needs_all_position_pairs for layer in self.layers)

    @property
    def acts_on_position_blocks(self) -> bool:
        return any(layer.acts_on_position_blocks for layer in self.layers)

    @property
    def has_weights(self) -> bool:
        return any(layer.has_weights for layer in self.layers)

    def finite_module(
        self,
        in_shape: tuple[int, ...],
        width: int,
        out_shape: tuple[int, ...] | None = None,
        last_width: int | None = None,
    ) -> tuple[nn.Module, tuple[int, ...]]:
        """Finite network; the last layer gets output shape ``out_shape`` when given (a readout).

        ``last_width`` only sets the last layer's width, without checking the output shape.
        """
        return finite_sequence(self.layers, in_shape, width, out_shape=out_shape, last_width=last_width)

    def _finite_network(
        self, in_shape: tuple[int, ...], width: int, out_shape: tuple[int, ...] | None
    ) -> tuple[nn.Module, tuple[int, ...]]:
        # Through finite_module, so that a subclass's own finite_module is the network.
        return self.finite_module(in_shape, width, out_shape=out_shape)


class Residual(Layer):
    r"""Skip connection: the output is ``skip(z) + block(z)``.

    The block's output must come from weights private to the block (end it
    with a :class:`Linear`, possibly followed by a normalisation), so that it
    is uncorrelated with the skip path; then kernels add:

    .. math:: K \leftarrow K_\text{skip} + K_\text{block}, \qquad
              \Theta \leftarrow \Theta_\text{skip} + \Theta_\text{block}.

    :param layers: the block, as layers applied in sequence.
    :param skip: the skip path (default: identity).
    """

    def __init__(self, *layers: Layer, skip: Layer | None = None):
        super().__init__()
        if not layers:
            raise ValueError("Residual needs at least one layer in its block")
        self.block = layers[0] if len(layers) == 1 else Sequential(*layers)
        self.skip = skip

    def forward(self, state: KernelState) -> KernelState:
        # Mark the input as shared, so a block without weights of its own is caught.
        shared = state.shared()
        block = self.block(shared)
        skip = self.skip(shared) if self.skip is not None else shared
        if block.positions != skip.positions or block.all_position_pairs != skip.all_position_pairs:
            raise ValueError(
                f"Residual: the block's output grid {block.positions} differs from the skip path's "
                f"{skip.positions}; give the skip path the same stride and padding (e.g. a 1x1 Conv)"
            )
        if not (block.fresh or skip.fresh):
            raise ValueError(
                "Residual: neither branch ends in weights of its own (e.g. a Linear layer), so the "
                "branches are correlated and the kernel is not the sum of the branch kernels"
            )
        if block.track_ntk:
            parts = [s.ntk for s in (block, skip) if s.ntk is not None]
            ntk = None if not parts else (parts[0] if len(parts) == 1 else parts[0] + parts[1])
        else:
            ntk = None
        return block.joined(
            skip,
            cross=block.cross + skip.cross,
            # Per-item work (see ``state.per_item``): a new tensor per tile would
            # make every later per-item result a cache miss held until the end.
            var1=per_item(torch.add, block.var1, skip.var1),
            var2=per_item(torch.add, block.var2, skip.var2),
            ntk=ntk,
        )

    @property
    def needs_all_position_pairs(self) -> bool:
        return self.block.needs_all_position_pairs or (self.skip is not None and self.skip.needs_all_position_pairs)

    @property
    def acts_on_position_blocks(self) -> bool:
        return self.block.acts_on_position_blocks or (self.skip is not None and self.skip.acts_on_position_blocks)

    @property
    def has_weights(self) -> bool:
        return self.block.has_weights or (self.skip is not None and self.skip.has_weights)

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        in_shape = tuple(in_shape)
        if self.skip is None:
            skip, skip_out = None, in_shape
        else:
            skip, skip_out = self.skip.finite_module(in_shape, width)
        if isinstance(self.block, Sequential):
            block, out = self.block.finite_module(in_shape, width, last_width=skip_out[0])
        else:
            block, out = self.block.finite_module(in_shape, skip_out[0])
        if tuple(out) != tuple(skip_out):
            raise ValueError(f"Residual: the block outputs shape {tuple(out)} but the skip path {tuple(skip_out)}")
        return ResidualSum(block, skip), out
