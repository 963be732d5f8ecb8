"""The GPyTorch kernel of any architecture built from :mod:`gpytorch_tp.layers`."""

from __future__ import annotations

import copy
import math

import torch
from gpytorch.kernels import Kernel
from linear_operator.operators import LinearOperator
from torch import Tensor

from ..evaluation import (
    BlockCovariance,
    EvaluationOptions,
    TiledKernelOperator,
    check_inputs,
    dense_memory,
    evaluate,
    input_layout,
    records_grad,
    same_inputs,
)
from ..layers.base import Layer
from ..state import KINDS

__all__ = ["CPU_MATRIX_FREE_GRAD_PAIRS", "KINDS", "TensorProgramKernel"]

# With autograd recording on a CPU, the matrix-free path is the faster one too
# from about this many pairs of plain-feature items: the dense path's graph of
# every tile outgrows the caches and goes to memory and back, while each
# matrix-free block's forward and backward stay in cache (docs/benchmarks.md,
# "Dense or matrix free": the two cross near N = 6,000 on a 2-core CPU).
CPU_MATRIX_FREE_GRAD_PAIRS = 6000 * 6000


def check_feature_sizes(kernel: Kernel, x1, x2) -> None:
    """A clear error for inputs whose items have different numbers of features.

    Called before GPyTorch's ``Kernel.__call__``, whose own check says "x1_ and
    x2_ must have the same number of dimensions", which reads like a
    complaint about ``x.dim()``.  Without ``active_dims``, the widths compare
    as GPyTorch compares them (a 1-d input is one feature per item); with
    ``active_dims`` both inputs are cut to the same columns, as in GPyTorch.
    """
    if x2 is None or kernel.active_dims is not None or not (torch.is_tensor(x1) and torch.is_tensor(x2)):
        return
    if x1.dim() == 0 or x2.dim() == 0:
        return  # GPyTorch's own error
    d1 = x1.shape[-1] if x1.dim() > 1 else 1
    d2 = x2.shape[-1] if x2.dim() > 1 else 1
    if d1 != d2:
        raise ValueError(
            f"x1 has {d1} features but x2 has {d2} (x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)}): "
            "the last dimension of both inputs is the items' features and must be the same"
        )


def _batched_tensors(module: torch.nn.Module):
    """(owner, name, tensor) for every hyperparameter tensor whose leading dims are the batch shape."""
    for owner in module.modules():
        for name, tensor in list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False)):
            if name.startswith(("raw_", "fixed_")):
                yield owner, name, tensor


class TensorProgramKernel(Kernel):
    r"""NNGP kernel or NTK of an infinitely wide network, as a GPyTorch kernel.

    The architecture is a :class:`~gpytorch_tp.layers.Layer` (usually a
    :class:`~gpytorch_tp.layers.Sequential`).  Evaluating the kernel runs the
    architecture's infinite-width recursion on the pair statistics, starting
    from the input kernel :math:`\langle x, x' \rangle / d`:

    .. math::

        K_\text{NNGP}(x, x') = \lim_{n \to \infty} \operatorname{Cov}[f(x), f(x')], \qquad
        K_\text{NTK}(x, x') = \lim_{n \to \infty}
            \left\langle \nabla_\theta f(x), \nabla_\theta f(x') \right\rangle,

    for the network :math:`f` with i.i.d. standard normal parameters in the NTK
    parameterisation (see :class:`~gpytorch_tp.layers.Linear`).  The recursion is
    vectorised over all pairs and runs on the inputs' device and dtype; a full
    kernel matrix is computed in tiles, and only once per pair of tiles when
    ``x1`` and ``x2`` are the same points.

    The architecture's hyperparameters (weight and bias variances, ...) are the
    kernel's hyperparameters; passing one architecture object to two kernels
    (``kind="nngp"`` and ``kind="ntk"``) makes them share hyperparameters.

    :param architecture: the network, as a layer.
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param input_dim: number of input features, checked when given.
    :param input_shape: layout of each item's features, flattened in the last
        input dimension: ``(C, H, W)`` for images, ``(C, L)`` for signals
        (``None``: plain features).  Grid layers (convolutions, pooling) need it.
    :param batch_shape: batch shape of the hyperparameters (one kernel per batch entry).
    :param active_dims: input dimensions the kernel acts on.  As in GPyTorch
        (where ``ard_num_dims`` counts the selected dimensions), ``input_dim``
        and ``input_shape`` describe the features *after* ``active_dims``
        selects them, in the order given: ``input_shape=(C, H, W)`` with
        ``active_dims`` of ``C * H * W`` columns of wider data (a mismatch
        raises ``ValueError`` at construction).
    :param tile_pairs: pairs of inputs per tile of the kernel matrix (``None``:
        chosen by device, input layout and ``memory_budget``; see
        :func:`gpytorch_tp.evaluate`).
    :param memory_budget: bytes the evaluation may use for its tiles (``None``:
        a quarter of the device's free memory; see :func:`~gpytorch_tp.evaluation.evaluate`).
    :param progress: progress bar over tiles (``None``: on a terminal, for
        evaluations longer than 2 s).
    :param matrix_free: return kernel matrices as a
        :class:`~gpytorch_tp.evaluation.TiledKernelOperator`, whose products
        with vectors are computed block by block without ever holding the
        matrix (what GPyTorch's conjugate gradients need above
        ``gpytorch.settings.max_cholesky_size``): ``True`` always, ``False``
        never, ``None`` (default) when a dense evaluation would exceed
        ``memory_budget`` (with autograd, every tile's intermediates count)
        and, on a CPU with autograd recording, from
        :data:`CPU_MATRIX_FREE_GRAD_PAIRS` (6,000 x 6,000) pairs of plain
        features, where it is also the faster path.
        ``diag=True`` is always dense.
    :param sequence: the items are sequences: ``input_shape=(T, d)``, time-major,
        shorter ones padded at the end with whole steps of ``padding_value``.
    :param padding_value: value of the padding steps (default NaN; a finite
        sentinel keeps GPyTorch's debug checks of training inputs happy).
    :param fused: evaluations of plain features (not grids or sequences)
        compile each run of dense layers and ReLU-type or erf nonlinearities
        into one elementwise pass with ``torch.compile``: those without
        gradients (the matrix held for conjugate gradients, predictions) on
        every device, those with gradients (training) on CUDA, with a compiled
        backward (:mod:`gpytorch_tp.fusion`; 1.3-1.4x faster for a depth-5 ReLU
        MLP on a 2-core CPU, aimed at GPUs), after a compilation of seconds per
        process (default ``False``).

    Example:
        >>> import torch, gpytorch
        >>> from gpytorch_tp import TensorProgramKernel
        >>> from gpytorch_tp.layers import Linear, ReLU, Sequential
        >>> net = Sequential(Linear(2.0, 0.1), ReLU(), Linear(2.0, 0.1))
        >>> covar = gpytorch.kernels.ScaleKernel(TensorProgramKernel(net, kind="ntk"))
        >>> covar(torch.randn(10, 3)).to_dense().shape
        torch.Size([10, 10])
    """

    has_lengthscale = False

    def __init__(
        self,
        architecture: Layer,
        kind: str = "nngp",
        *,
        input_dim: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        batch_shape: torch.Size | None = None,
        active_dims: tuple[int, ...] | None = None,
        tile_pairs: int | None = None,
        memory_budget: int | None = None,
        progress: bool | None = None,
        sequence: bool = False,
        padding_value: float = float("nan"),
        matrix_free: bool | None = None,
        fused: bool = False,
        **kwargs,
    ):
        if not isinstance(architecture, Layer):
            raise TypeError(
                f"architecture must be a gpytorch_tp Layer (e.g. layers.Sequential), got {type(architecture).__name__}"
            )
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if input_dim is not None and int(input_dim) < 1:
            raise ValueError(f"input_dim must be a positive integer, got {input_dim}")
        options = EvaluationOptions(
            input_shape=input_shape,
            sequence=sequence,
            padding_value=padding_value,
            tile_pairs=tile_pairs,
            memory_budget=memory_budget,
            progress=progress,
            fused=fused,
            matrix_free=matrix_free,
        )
        input_shape = options.input_shape
        if input_shape is not None:
            if input_dim is not None and math.prod(input_shape) != int(input_dim):
                raise ValueError(
                    f"input_shape {input_shape} has {math.prod(input_shape)} features, not input_dim={input_dim}"
                )
            input_dim = math.prod(input_shape)
        batch_shape = torch.Size([]) if batch_shape is None else torch.Size(batch_shape)
        super().__init__(batch_shape=batch_shape, active_dims=active_dims, **kwargs)
        if self.active_dims is not None and input_dim is not None and self.active_dims.numel() != int(input_dim):
            # input_shape / input_dim describe the selected features (see the docstring).
            described = f"input_shape {input_shape}" if input_shape is not None else f"input_dim={input_dim}"
            raise ValueError(
                f"active_dims selects {self.active_dims.numel()} features but {described} describes "
                f"{int(input_dim)}: input_shape and input_dim describe the features after active_dims selects them"
            )
        self.architecture = architecture
        self.kind = kind
        self.input_dim = None if input_dim is None else int(input_dim)
        self.options = options
        if len(batch_shape):
            for owner, name, tensor in _batched_tensors(self.architecture):
                if tensor.dim() == 0:
                    tensor.data = tensor.data.expand(batch_shape).clone()
                elif tensor.shape != batch_shape:
                    raise ValueError(
                        f"hyperparameter {name} of {type(owner).__name__} has shape {tuple(tensor.shape)}, "
                        f"which is not the kernel batch_shape {tuple(batch_shape)}"
                    )

    # The evaluation options, one validated object; the attributes below read and replace it.
    options: EvaluationOptions

    input_shape = property(lambda self: self.options.input_shape, doc="Layout of each item's features (or ``None``).")
    sequence = property(lambda self: self.options.sequence, doc="The items are padded sequences ``(T, d)``.")
    padding_value = property(lambda self: self.options.padding_value, doc="Value of sequences' padding steps.")

    @property
    def tile_pairs(self) -> int | None:
        """Pairs of items per tile (``None``: chosen per evaluation)."""
        return self.options.tile_pairs

    @tile_pairs.setter
    def tile_pairs(self, value: int | None) -> None:
        self.options = self.options.replace(tile_pairs=value)

    @property
    def memory_budget(self) -> int | None:
        """Bytes an evaluation may use besides its outputs (``None``: a quarter of the free memory)."""
        return self.options.memory_budget

    @memory_budget.setter
    def memory_budget(self, value: int | None) -> None:
        self.options = self.options.replace(memory_budget=value)

    @property
    def progress(self) -> bool | None:
        """Progress bar over tiles (``None``: on a terminal, for long evaluations)."""
        return self.options.progress

    @progress.setter
    def progress(self, value: bool | None) -> None:
        self.options = self.options.replace(progress=value)

    @property
    def fused(self) -> bool:
        """Runs of elementwise pair work compiled into one pass (:mod:`gpytorch_tp.fusion`)."""
        return self.options.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.options = self.options.replace(fused=value)

    @property
    def matrix_free(self) -> bool | None:
        """Kernel matrices as matrix-free operators: ``True``, ``False`` or ``None`` (automatic)."""
        return self.options.matrix_free

    @matrix_free.setter
    def matrix_free(self, value: bool | None) -> None:
        self.options = self.options.replace(matrix_free=value)

    def __setstate__(self, state: dict) -> None:
        if "options" not in state:
            # Pickled before the options were one object: they were loose attributes, some missing.
            state = dict(state)
            loose = {name: state.pop(name) for name in _LOOSE_OPTIONS if name in state}
            state["options"] = EvaluationOptions(**loose)
        super().__setstate__(state)

    def __call__(
        self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor | LinearOperator:
        check_feature_sizes(self, x1, x2)
        return super().__call__(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor | TiledKernelOperator:
        if not diag and not last_dim_is_batch:
            # Shapes and dtypes first, so that a bad input gets the same message on either path.
            check_inputs(x1, x2, self.input_dim, allow_nan=True)
        if not diag and not last_dim_is_batch:
            covariance = self.block_covariance(x1)
            if self._use_matrix_free(x1, x2, covariance):
                same = same_inputs(x1, x2)
                parameters = (p for _, p in self.named_parameters())
                return TiledKernelOperator(x1, x1 if same else x2, *parameters, covariance=covariance, same=same)
        return self._dense_forward(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch)

    def block_covariance(self, x: Tensor) -> BlockCovariance:
        """This kernel as matrix-free operators see it (for inputs like ``x``): its dense covariance of two blocks
        and its options."""
        layout = input_layout(self.architecture, self.input_shape, x.shape[-1], self.sequence, self.padding_value)
        return BlockCovariance(self._dense_forward, self, self.options, layout.pair_elements, self.batch_shape)

    def _use_matrix_free(self, x1: Tensor, x2: Tensor, covariance: BlockCovariance) -> bool:
        if self.matrix_free is not None:
            return self.matrix_free
        recording = records_grad(self.architecture, x1, x2)
        if recording and x1.device.type == "cpu" and self._plain_pairs(x1, x2) >= CPU_MATRIX_FREE_GRAD_PAIRS:
            return True
        return dense_memory(covariance, x1, x2, recording) > covariance.memory_budget(x1.device)

    def _plain_pairs(self, x1: Tensor, x2: Tensor) -> int:
        """Pairs of items of a plain-feature kernel (0 for items on a grid or sequences)."""
        if not self.options.plain_features:
            return 0
        batch = math.prod(torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape))
        return batch * x1.shape[-2] * x2.shape[-2]

    def _dense_forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False) -> Tensor:
        """The kernel matrix (or its diagonal) as a dense tensor."""
        options = self.options
        if last_dim_is_batch:
            if self.input_shape is not None and len(self.input_shape) > 1:
                raise ValueError(
                    "last_dim_is_batch=True treats each input dimension on its own, which a grid input_shape forbids"
                )
            x1 = x1.transpose(-1, -2).unsqueeze(-1)
            x2 = x2.transpose(-1, -2).unsqueeze(-1)
            options = options.for_dimensions()
        nngp, ntk = evaluate(
            self.architecture,
            x1,
            x2,
            diag=diag,
            ntk=self.kind == "ntk",
            input_dim=None if last_dim_is_batch else self.input_dim,
            options=options,
        )
        return ntk if self.kind == "ntk" else nngp

    def nngp_and_ntk(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False) -> tuple[Tensor, Tensor]:
        """Both kernels from one pass of the recursion (dense tensors, ``active_dims`` applied)."""
        if self.active_dims is not None:
            x1 = x1.index_select(-1, self.active_dims)
            x2 = None if x2 is None else x2.index_select(-1, self.active_dims)
        return evaluate(self.architecture, x1, x2, diag=diag, ntk=True, input_dim=self.input_dim, options=self.options)

    def to_module(
        self,
        width: int,
        out_features: int | None = 1,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> torch.nn.Module:
        """The finite-width network of this kernel, taking the kernel's own inputs ``(N, input_dim)``.

        See :meth:`Layer.to_module <gpytorch_tp.layers.Layer.to_module>`;
        ``MonteCarloKernel(lambda: kernel.to_module(width))`` approaches the
        kernel as the width grows.  Sequence kernels get a network that takes
        time-major flattened sequences ``(N, T * d)`` of full length (no padding).
        """
        if self.input_shape is None and self.input_dim is None:
            raise ValueError("to_module needs the kernel's input_dim or input_shape")
        shape = self.input_shape if self.input_shape is not None else (self.input_dim,)
        if self.sequence:
            steps, d = shape
            network = self.architecture.to_module(
                (d, steps), width, out_features, dtype=dtype, device=device, seed=seed
            )
            # build_network unflattens channel-major (d, T); the kernel's sequences are time-major (T, d).
            return torch.nn.Sequential(torch.nn.Unflatten(-1, (steps, d)), _SwapLastAxes(), *network[1:])
        return self.architecture.to_module(shape, width, out_features, dtype=dtype, device=device, seed=seed)

    # GPyTorch only slices and expands a kernel's own parameters and its sub-kernels;
    # ours live in the architecture's layers.
    def __getitem__(self, index) -> TensorProgramKernel:
        if len(self.batch_shape) == 0:
            return self
        index = index if isinstance(index, tuple) else (index,)
        new = copy.deepcopy(self)
        new_batch_shape = None
        for _, _, tensor in _batched_tensors(new.architecture):
            tensor.data = tensor.data[index]
            new_batch_shape = tensor.shape
        if new_batch_shape is None:
            new_batch_shape = torch.empty(self.batch_shape)[index].shape
        new._batch_shape = torch.Size(new_batch_shape)
        return new

    def expand_batch(self, *sizes) -> TensorProgramKernel:
        if len(sizes) == 1 and hasattr(sizes[0], "__iter__"):
            new_batch_shape = torch.Size(sizes[0])
        else:
            new_batch_shape = torch.Size(sizes)
        if new_batch_shape == self.batch_shape:
            return self
        torch.broadcast_shapes(new_batch_shape, self.batch_shape)
        new = copy.deepcopy(self)
        new._batch_shape = new_batch_shape
        for _, _, tensor in _batched_tensors(new.architecture):
            tensor.data = tensor.data.expand(new_batch_shape)
        return new

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


# The evaluation options as kernels held them before ``options`` (for their pickles).
_LOOSE_OPTIONS = (
    "input_shape", "sequence", "padding_value", "tile_pairs", "memory_budget", "progress", "fused", "matrix_free"
)


class _SwapLastAxes(torch.nn.Module):
    """``(..., T, d) -> (..., d, T)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-1, -2)
