"""Finite-width torch modules whose infinite-width limits the layers describe.

These are ordinary ``torch.nn`` modules, initialised so that their random
function converges to the layer's kernel as the width grows.  They are what
the kernels are tested against, and what :meth:`Layer.finite_module` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .geometry import padding

__all__ = [
    "NTKGRU",
    "NTKLSTM",
    "NTKRNN",
    "BidirectionalRNN",
    "CorrelationNorm",
    "FirstPosition",
    "GlobalAvgPool",
    "GridAvgPool",
    "LastPosition",
    "LearnedPositions",
    "NTKConv",
    "NTKLinear",
    "NTKSelfAttention",
    "Pointwise",
    "ResidualSum",
]


class NTKLinear(nn.Module):
    r"""Dense layer in the NTK parameterisation.

    .. math:: y = \sigma_w W x / \sqrt{\text{fan\_in}} + \sigma_b b, \qquad W_{ij}, b_i \sim N(0, 1).

    Gradient descent on ``W`` and ``b`` (rather than on the scaled weights) is
    what gives the NTK its finite, width-independent limit.
    """

    def __init__(self, in_features: int, out_features: int, weight_std: float, bias_std: float):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_std = weight_std
        self.bias_std = bias_std
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features)) if bias_std > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(x, self.weight) * (self.weight_std / math.sqrt(self.in_features))
        if self.bias is not None:
            y = y + self.bias_std * self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_std={self.weight_std:.4g}, bias_std={self.bias_std:.4g}"
        )


class Pointwise(nn.Module):
    """An elementwise function as a module."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str = "fn"):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class ResidualSum(nn.Module):
    """``skip(x) + block(x)``."""

    def __init__(self, block: nn.Module, skip: nn.Module | None = None):
        super().__init__()
        self.block = block
        self.skip = skip if skip is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class CorrelationNorm(nn.Module):
    """Layer normalisation over the features, optionally with a per-unit affine map.

    Equal to ``torch.nn.LayerNorm`` with ``eps=0`` over the feature axis
    ``dim`` (the last axis of dense features, the channel axis ``-1 -
    grid_ndim`` of features on a grid, normalised at each position); the
    affine weights start at one and the biases at zero, as in PyTorch.
    """

    def __init__(self, features: int, center: bool = True, elementwise_affine: bool = False, grid_ndim: int = 0):
        super().__init__()
        self.center = center
        self.dim = -1 - grid_ndim
        unit_shape = (features,) + (1,) * grid_ndim
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(unit_shape))
            self.bias = nn.Parameter(torch.zeros(unit_shape))
        else:
            self.weight = self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if self.center:
            x = x - x.mean(self.dim, keepdim=True)
        y = x / x.pow(2).mean(self.dim, keepdim=True).sqrt()
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y


class NTKConv(nn.Module):
    r"""Convolution over a 1-d or 2-d grid in the NTK parameterisation.

    .. math:: y = \sigma_w W \ast x / \sqrt{C k} + \sigma_b b, \qquad W, b \sim N(0, 1),

    with :math:`C` input channels and :math:`k` positions in the filter.
    Inputs are ``(..., C, *grid)``; padding is that of
    :func:`gpytorch_tp.geometry.padding` (``"same"``, ``"valid"``, ``"circular"``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        padding_mode: str,
        weight_std: float,
        bias_std: float,
    ):
        super().__init__()
        if len(kernel_size) not in (1, 2):
            raise ValueError("NTKConv supports 1-d and 2-d grids")
        self.kernel_size, self.stride, self.padding_mode = tuple(kernel_size), tuple(stride), padding_mode
        self.in_channels, self.weight_std, self.bias_std = in_channels, weight_std, bias_std
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel_size))
        self.bias = nn.Parameter(torch.randn(out_channels)) if bias_std > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        grid_ndim = len(self.kernel_size)
        lead = x.shape[: x.dim() - grid_ndim - 1]
        x = x.reshape(-1, *x.shape[x.dim() - grid_ndim - 1 :])
        pads = [
            padding(size, k, s, self.padding_mode)
            for size, k, s in zip(x.shape[-grid_ndim:], self.kernel_size, self.stride)
        ]
        # F.pad lists the last axis first.
        amounts = [amount for pad in reversed(pads) for amount in (pad.before, pad.after)]
        if any(amounts):
            x = nn.functional.pad(x, amounts, mode="circular" if self.padding_mode == "circular" else "constant")
        conv = nn.functional.conv1d if grid_ndim == 1 else nn.functional.conv2d
        fan_in = self.in_channels * math.prod(self.kernel_size)
        y = conv(x, self.weight, stride=self.stride) * (self.weight_std / math.sqrt(fan_in))
        if self.bias is not None:
            y = y + self.bias_std * self.bias.reshape(-1, *([1] * grid_ndim))
        return y.reshape(*lead, *y.shape[1:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.weight.shape[0]}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding_mode!r}, weight_std={self.weight_std:.4g}, bias_std={self.bias_std:.4g}"
        )


class GridAvgPool(nn.Module):
    """Average pooling over the last ``len(kernel_size)`` axes, without padding."""

    def __init__(self, kernel_size: tuple[int, ...], stride: tuple[int, ...]):
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)

    def forward(self, x: Tensor) -> Tensor:
        grid_ndim = len(self.kernel_size)
        for axis, (k, s) in enumerate(zip(self.kernel_size, self.stride)):
            dim = x.dim() - grid_ndim + axis
            x = x.unfold(dim, k, s).mean(-1)
        return x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class GlobalAvgPool(nn.Module):
    """Mean over the last ``grid_ndim`` axes."""

    def __init__(self, grid_ndim: int):
        super().__init__()
        self.grid_ndim = grid_ndim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=tuple(range(-self.grid_ndim, 0)))


class NTKRNN(nn.Module):
    r"""Elman RNN in the NTK parameterisation over inputs ``(..., C, T)``, returning every state ``(..., n, T)``.

    .. math::

        h^t = \sigma_w W s^{t-1} / \sqrt{n} + \sigma_u U x^t / \sqrt{C} + \sigma_b b, \quad
        s^t = \phi(h^t), \quad s^{-1} = 0, \qquad W, U, b \sim N(0, 1).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        function: Callable[[Tensor], Tensor],
        weight_std: float,
        input_std: float,
        bias_std: float,
    ):
        super().__init__()
        self.function = function
        self.weight_std, self.input_std, self.bias_std = weight_std, input_std, bias_std
        self.recurrent = nn.Parameter(torch.randn(width, width))
        self.input = nn.Parameter(torch.randn(width, in_channels))
        self.bias = nn.Parameter(torch.randn(width)) if bias_std > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        width, in_channels = self.input.shape
        projected = torch.einsum("hc,...ct->...ht", self.input, x) * (self.input_std / math.sqrt(in_channels))
        if self.bias is not None:
            projected = projected + (self.bias_std * self.bias).unsqueeze(-1)
        states = []
        state = None
        for t in range(x.shape[-1]):
            h = projected[..., t]
            if state is not None:
                h = h + nn.functional.linear(state, self.recurrent) * (self.weight_std / math.sqrt(width))
            state = self.function(h)
            states.append(state)
        return torch.stack(states, -1)


class BidirectionalRNN(nn.Module):
    """Two RNNs, one over the reversed time axis, with their states stacked along the channels."""

    def __init__(self, forward_rnn: nn.Module, backward_rnn: nn.Module):
        super().__init__()
        self.forward_rnn, self.backward_rnn = forward_rnn, backward_rnn

    def forward(self, x: Tensor) -> Tensor:
        backward = self.backward_rnn(torch.flip(x, (-1,))).flip(-1)
        return torch.cat([self.forward_rnn(x), backward], -2)


class LastPosition(nn.Module):
    """The features at the last position of a 1-d grid: ``(..., C, T) -> (..., C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x[..., -1]


class NTKSelfAttention(nn.Module):
    r"""Finite multi-head self-attention with :math:`1/n_k` logit scaling, NTK parameterisation.

    Inputs ``(..., C, L)`` (channels first, one unpadded sequence of ``L``
    tokens per leading index), outputs ``(..., out_channels, L)``; see the
    module docstring of :mod:`gpytorch_tp.layers.attention` for the formulas.
    All weights and the bias are standard normal and trained as such.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_heads: int,
        head_width: int,
        query_key: str,
        mechanism: str,
        causal: bool,
        value_std: float,
        output_std: float,
        bias_std: float,
        query_key_std: float,
    ):
        super().__init__()
        self.in_channels, self.num_heads, self.head_width = in_channels, num_heads, head_width
        self.query_key, self.mechanism, self.causal = query_key, mechanism, causal
        self.value_std, self.output_std, self.bias_std, self.query_key_std = (
            value_std,
            output_std,
            bias_std,
            query_key_std,
        )
        self.value = nn.Parameter(torch.randn(num_heads, head_width, in_channels))
        self.query = nn.Parameter(torch.randn(num_heads, head_width, in_channels))
        self.key = nn.Parameter(torch.randn(num_heads, head_width, in_channels)) if query_key == "independent" else None
        self.output = nn.Parameter(torch.randn(out_channels, num_heads * head_width))
        self.bias = nn.Parameter(torch.randn(out_channels)) if bias_std > 0 else None

    def logits(self, x: Tensor) -> Tensor:
        """The attention logits ``<q_t, k_s> / n_k`` of every head: ``(..., H, L, L)``."""
        scale = self.query_key_std / math.sqrt(self.in_channels)
        queries = torch.einsum("hkc,...ct->...htk", self.query, x) * scale
        keys = queries if self.key is None else torch.einsum("hkc,...ct->...htk", self.key, x) * scale
        return queries @ keys.transpose(-1, -2) / self.head_width  # 1/n scaling, not 1/sqrt(n)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.shape[-1]
        values = torch.einsum("hvc,...ct->...htv", self.value, x) * (self.value_std / math.sqrt(self.in_channels))
        logits = self.logits(x)
        if self.causal:
            future = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).triu(1)
            if self.mechanism == "softmax":
                logits = logits.masked_fill(future, float("-inf"))
            else:
                logits = logits.masked_fill(future, 0.0)
        weights = torch.softmax(logits, -1) if self.mechanism == "softmax" else logits
        heads = weights @ values  # (..., H, T, n_v)
        joined = heads.movedim(-3, -2).reshape(*heads.shape[:-3], tokens, self.num_heads * self.head_width)
        out = joined @ self.output.T * (self.output_std / math.sqrt(self.num_heads * self.head_width))
        if self.bias is not None:
            out = out + self.bias_std * self.bias
        return out.transpose(-1, -2)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.output.shape[0]}, heads={self.num_heads}, "
            f"head_width={self.head_width}, query_key={self.query_key!r}, mechanism={self.mechanism!r}, "
            f"causal={self.causal}"
        )


class LearnedPositions(nn.Module):
    """A learned positional embedding ``std * P[:, :L]`` (``P ~ N(0, 1)``), added to or stacked under ``(..., C, L)``."""

    def __init__(self, channels: int, max_steps: int, std: float, mode: str):
        super().__init__()
        self.std, self.mode = std, mode
        self.table = nn.Parameter(torch.randn(channels, max_steps))

    def forward(self, x: Tensor) -> Tensor:
        embedding = self.std * self.table[:, : x.shape[-1]]
        if self.mode == "add":
            return x + embedding
        return torch.cat([x, embedding.expand(*x.shape[:-2], *embedding.shape)], -2)


class FirstPosition(nn.Module):
    """The features at the first position of a 1-d grid: ``(..., C, T) -> (..., C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x[..., 0]


class _NTKGatedCell(nn.Module):
    """Shared parts of :class:`NTKGRU` and :class:`NTKLSTM`: ``gates`` stacked input and recurrent matrices."""

    def __init__(self, in_channels, width, gates, function, gate, weight_std, input_std, bias_std, biases):
        super().__init__()
        self.function, self.gate = function, gate
        self.weight_std, self.input_std, self.bias_std = weight_std, input_std, bias_std
        self.input = nn.Parameter(torch.randn(gates, width, in_channels))
        self.recurrent = nn.Parameter(torch.randn(gates, width, width))
        self.bias = nn.Parameter(torch.randn(biases, width)) if bias_std > 0 else None

    def _project_inputs(self, x: Tensor) -> Tensor:
        """``sigma_u W x / sqrt(C)`` for every gate and step: ``(..., gates, n, T)``."""
        in_channels = self.input.shape[-1]
        return torch.einsum("ghc,...ct->...ght", self.input, x) * (self.input_std / math.sqrt(in_channels))

    def _recur(self, state: Tensor) -> Tensor:
        """``sigma_w U h / sqrt(n)`` for every gate: ``(..., gates, n)``."""
        width = self.recurrent.shape[-1]
        return torch.einsum("ghk,...k->...gh", self.recurrent, state) * (self.weight_std / math.sqrt(width))

    def _bias(self, index: int) -> Tensor | float:
        return 0.0 if self.bias is None else self.bias_std * self.bias[index]


class NTKGRU(_NTKGatedCell):
    r"""GRU (``torch.nn.GRU``'s cell) in the NTK parameterisation over inputs ``(..., C, T)``; states ``(..., n, T)``.

    .. math::

        r_t &= \sigma(\sigma_u W_r x_t / \sqrt C + \sigma_w U_r h_{t-1} / \sqrt n + \sigma_b b_r), \quad
        z_t = \sigma(\sigma_u W_z x_t / \sqrt C + \sigma_w U_z h_{t-1} / \sqrt n + \sigma_b b_z), \\
        n_t &= \phi(\sigma_u W_n x_t / \sqrt C + \sigma_b b_n
               + r_t \odot (\sigma_w U_n h_{t-1} / \sqrt n + \sigma_b b_{hn})), \quad
        h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}, \quad h_{-1} = 0,

    all weights and biases :math:`N(0, 1)`.
    """

    def __init__(self, in_channels, width, function, gate, weight_std, input_std, bias_std):
        super().__init__(in_channels, width, 3, function, gate, weight_std, input_std, bias_std, biases=4)

    def forward(self, x: Tensor) -> Tensor:
        inputs = self._project_inputs(x)  # gates r, z, n
        width = self.recurrent.shape[1]
        state = x.new_zeros(*x.shape[:-2], width)
        states = []
        for t in range(x.shape[-1]):
            recurrent = self._recur(state)
            r = self.gate(inputs[..., 0, :, t] + recurrent[..., 0, :] + self._bias(0))
            z = self.gate(inputs[..., 1, :, t] + recurrent[..., 1, :] + self._bias(1))
            n = self.function(inputs[..., 2, :, t] + self._bias(2) + r * (recurrent[..., 2, :] + self._bias(3)))
            state = (1 - z) * n + z * state
            states.append(state)
        return torch.stack(states, -1)


class NTKLSTM(_NTKGatedCell):
    r"""LSTM (``torch.nn.LSTM``'s cell) in the NTK parameterisation over inputs ``(..., C, T)``; states ``(..., n, T)``.

    .. math::

        i_t, f_t, o_t &= \sigma(\cdot), \quad g_t = \phi(\cdot), \quad
        (\cdot) = \sigma_u W x_t / \sqrt C + \sigma_w U h_{t-1} / \sqrt n + \sigma_b b
        \text{ (own weights per gate)}, \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t, \quad h_t = o_t \odot \phi(c_t), \quad h_{-1} = c_{-1} = 0.
    """

    def __init__(self, in_channels, width, function, gate, weight_std, input_std, bias_std):
        super().__init__(in_channels, width, 4, function, gate, weight_std, input_std, bias_std, biases=4)

    def forward(self, x: Tensor) -> Tensor:
        inputs = self._project_inputs(x)  # gates i, f, g, o
        width = self.recurrent.shape[1]
        state = cell = x.new_zeros(*x.shape[:-2], width)
        states = []
        for t in range(x.shape[-1]):
            pre = inputs[..., t] + self._recur(state)
            i, f, o = (self.gate(pre[..., k, :] + self._bias(k)) for k in (0, 1, 3))
            g = self.function(pre[..., 2, :] + self._bias(2))
            cell = f * cell + i * g
            state = o * self.function(cell)
            states.append(state)
        return torch.stack(states, -1)
