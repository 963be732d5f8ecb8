"""Preset: the kernel of a simple (Elman) recurrent network."""

from __future__ import annotations

import copy

from gpytorch.priors import Prior

from ..layers import RNN, Layer, Sequential, nonlinearity_from_name
from .presets import check_choice, check_depth, check_sequence_shape, hyperparameter_batch_shape, recurrent_readout
from .tensor_program_kernel import TensorProgramKernel

__all__ = ["RNNKernel"]

READOUTS = ("last", "mean")


class RNNKernel(TensorProgramKernel):
    r"""NNGP kernel or NTK of an infinitely wide simple (Elman) recurrent network.

    ``depth`` stacked :class:`~gpytorch_tp.layers.RNN` layers, a readout over
    time and a dense output layer.  The readout ``"last"`` takes each
    sequence's last state (the kernel then needs aligned step pairs only,
    :math:`O(T)` per pair of sequences); ``"mean"`` averages the states over
    each sequence's own steps (all :math:`T^2` step pairs).

    Inputs are sequences flattened time-major, ``(..., N, T * d)`` (a
    batch-first ``(N, T, d)`` tensor, reshaped).  Sequences shorter than ``T``
    are padded at the end with whole steps of ``padding_value`` (NaN by
    default); padding never changes a kernel value (the sequences are aligned
    at their ends, and the states before a sequence's first step are zero, as
    in an RNN that starts there).  GPyTorch's ``ExactGP`` compares training
    inputs with ``torch.equal`` in debug mode, which NaN never passes: to
    train on padded sequences, pad with a finite sentinel
    (``padding_value=-1e6``, say) or use ``gpytorch.settings.debug(False)``.

    :param input_shape: ``(T, d)``: maximum length and features per step; with
        ``active_dims``, the layout of the ``T * d`` selected columns (time-major, in the order
        ``active_dims`` lists them).
    :param depth: number of stacked recurrent layers.
    :param nonlinearity: name or layer (default ``"tanh"``; ``"erf"`` and
        ``"relu"`` have closed forms, ``"tanh"`` uses quadrature).
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param readout: ``"last"`` or ``"mean"``.
    :param weight_variance: starting recurrent weight variance :math:`\sigma_w^2` (default 1).
    :param input_variance: starting input weight variance :math:`\sigma_u^2` (default 1).
    :param bias_variance: starting bias variance (default 0.1).
    :param readout_variance: starting weight variance of the output layer (default 1).
    :param bidirectional: every layer also runs from the last step back (see
        :class:`~gpytorch_tp.layers.RNN`).
    :param weight_variance_prior: prior on every layer's recurrent weight variance.
    :param kwargs: passed to :class:`TensorProgramKernel` (``padding_value``,
        ``batch_shape``, ``active_dims``, ``memory_budget``, ``progress``, ``tile_pairs``).

    Example:
        >>> import torch
        >>> from gpytorch_tp import RNNKernel
        >>> k = RNNKernel(input_shape=(5, 2), nonlinearity="erf", readout="last")
        >>> x = torch.randn(3, 5, 2)
        >>> x[0, 3:] = float("nan")  # the first sequence has 3 steps
        >>> k(x.reshape(3, 10)).to_dense().shape
        torch.Size([3, 3])
    """

    def __init__(
        self,
        input_shape: tuple[int, int],
        depth: int = 1,
        nonlinearity: str | Layer = "tanh",
        kind: str = "nngp",
        *,
        readout: str = "last",
        weight_variance: float = 1.0,
        input_variance: float = 1.0,
        bias_variance: float = 0.1,
        readout_variance: float = 1.0,
        bidirectional: bool = False,
        weight_variance_prior: Prior | None = None,
        **kwargs,
    ):
        check_depth(depth)
        check_choice("readout", readout, READOUTS)
        input_shape = check_sequence_shape("RNNKernel", input_shape)
        template = nonlinearity_from_name(nonlinearity)
        batch_shape = hyperparameter_batch_shape(kwargs)
        layers: list[Layer] = [
            RNN(
                template if i == 0 else copy.deepcopy(template),
                weight_variance,
                input_variance,
                bias_variance,
                weight_variance_prior=copy.deepcopy(weight_variance_prior),
                bidirectional=bidirectional,
                batch_shape=batch_shape,
            )
            for i in range(depth)
        ]
        layers += recurrent_readout(readout, readout_variance, bias_variance, batch_shape)
        super().__init__(Sequential(*layers), kind=kind, input_shape=input_shape, sequence=True, **kwargs)
        self.depth, self.readout = depth, readout
