"""The public functions: :func:`from_module`, :func:`kernel_from_module` (with the BatchNorm kernel
builder) and :func:`ntk_parameter_scales`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..layers import Layer, Linear, ReLU, Sequential
from ..programs import CompiledProgram, compile_module
from ..programs.trace import OutsideTheTheoremError
from .batchnorm_converter import BatchNormMarker
from .tracing import architecture_summary, convert_network

if TYPE_CHECKING:
    from ..kernels import BatchNormMLPKernel, TensorProgramKernel

__all__ = ["from_module", "kernel_from_module", "ntk_parameter_scales"]


def from_module(
    module: nn.Module,
    input_shape: int | tuple[int, ...] | None = None,
    *,
    init: str = "pytorch",
    weight_variance: float | None = None,
    bias_variance: float | None = None,
    input_variance: float | None = None,
    sequence: bool | None = None,
) -> Sequential:
    r"""The infinite-width architecture of a ``torch.nn`` network.

    Converts ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (no dilation or groups;
    padding ``valid``, or ``same`` as :class:`~gpytorch_tp.layers.Conv`
    places it), ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.GELU``, ``nn.Tanh``,
    ``nn.Sigmoid``, ``nn.SiLU``, ``nn.Softplus`` and their functional forms
    (plus ``torch.erf``, ``sin``, ``cos``, ``abs``), ``nn.LayerNorm`` over the
    features, ``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d``, ``x.mean``
    over the grid or over time, ``nn.Flatten`` and flattening reshapes,
    ``nn.RNN(batch_first=True)`` followed by ``output[:, -1]``, ``h_n[-1]`` or
    ``output.mean(1)``, ``nn.GRU``/``nn.LSTM(batch_first=True)`` (not
    bidirectional, no ``proj_size``) with the same readouts, residual sums ``x + f(x)`` and ``g(x) + f(x)``, and
    ``nn.Identity``/``nn.Dropout`` (the network in eval mode).  Anything else
    raises :class:`UnsupportedModuleError`, ``nn.BatchNorm1d`` too (its network is
    converted by :func:`kernel_from_module` with ``reference_points``).

    Widths are ignored.  The variances (per fan-in for weights) are, for every
    layer: ``weight_variance`` / ``bias_variance`` / ``input_variance`` (RNN input
    weights) when given; otherwise from ``init``:

    * ``"pytorch"`` (default): PyTorch's default initialisation, exactly, at
      infinite width: ``kaiming_uniform_(a=sqrt(5))`` weights have variance
      :math:`1/(3\,\text{fan\_in})`, i.e. :math:`\sigma_w^2 = 1/3`; biases
      :math:`U(\pm 1/\sqrt{\text{fan\_in}})` have variance
      :math:`1/(3\,\text{fan\_in})`, which stays for layers reading the network
      input (fan-in :math:`d`) and vanishes for the others.  ``nn.RNN`` draws
      all its tensors with variance :math:`1/(3 H)` (:math:`H` hidden units):
      recurrent :math:`\sigma_w^2 = 1/3`, biases vanish, and the input weights of
      the first layer (variance :math:`d / (3H)` per fan-in :math:`d`) vanish
      too, which raises (pass ``input_variance`` or use ``"measured"``); the
      same for every gate of ``nn.GRU``/``nn.LSTM``.  A
      warning tells when the weights exceed the default scheme's bound (a
      re-initialised or trained module).
    * ``"measured"``: the second moments of the module's current parameters
      (fan-in times the mean square of each weight tensor, the mean square of
      each bias), i.e. the kernel of a network initialised like this one,
      whatever its scheme, at this module's width ratios; the estimate is as
      noisy as the module is small.

    The NTK of the result is that of the network in the NTK parameterisation,
    :math:`W = \sigma_w \omega / \sqrt{\text{fan\_in}}` with :math:`\omega`
    trained: for the module as written (standard parameterisation) that is the
    tangent kernel of gradient descent with a learning rate per tensor
    proportional to its initial variance (:func:`ntk_parameter_scales`).  The
    NNGP kernel is the same in both parameterisations.

    :param module: the network, mapping ``(N, *input_shape)`` to ``(N, m)``.
    :param input_shape: shape of one item: ``(d,)``, ``(C, L)``, ``(C, H, W)``,
        or ``(T, d)`` for sequences (``None``: ``(in_features,)`` of a first nn.Linear).
    :param init: ``"pytorch"`` or ``"measured"`` (see above).
    :param weight_variance: :math:`\sigma_w^2` of every weight layer (and of recurrent weights).
    :param bias_variance: :math:`\sigma_b^2` of every layer (an RNN's two biases together; for
        ``nn.GRU``/``nn.LSTM`` that of every gate pre-activation, see ``docs/from_module.md``).
    :param input_variance: :math:`\sigma_u^2` of every RNN's input weights.
    :param sequence: the input is a sequence ``(T, d)`` (``None``: when the network has a recurrent layer).
    :return: the architecture, for :class:`~gpytorch_tp.TensorProgramKernel`
        (see :func:`kernel_from_module`).

    Example:
        >>> from torch import nn
        >>> from gpytorch_tp.conversion import from_module
        >>> net = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 1))
        >>> arch = from_module(net)  # Linear(1/3, 1/9), ReLU, Linear(1/3, 0)
    """
    try:
        result = convert_network(module, input_shape, init, weight_variance, bias_variance, input_variance, sequence)
    except UnsupportedModuleError as refusal:
        compiled = _compiled(
            module, input_shape, init, weight_variance, bias_variance, input_variance, sequence, refusal
        )
        return Sequential(compiled)
    return result.architecture


def kernel_from_module(
    module: nn.Module,
    kind: str = "nngp",
    input_shape: int | tuple[int, ...] | None = None,
    *,
    init: str = "pytorch",
    weight_variance: float | None = None,
    bias_variance: float | None = None,
    input_variance: float | None = None,
    sequence: bool | None = None,
    reference_points: Tensor | None = None,
    **kernel_kwargs,
) -> TensorProgramKernel | BatchNormMLPKernel:
    r"""The :class:`~gpytorch_tp.TensorProgramKernel` of :func:`from_module`'s architecture.

    The kernel takes the module's items flattened, ``(N, prod(input_shape))``
    (for sequences: batch-first ``(N, T, d)`` reshaped to ``(N, T * d)``).
    ``kernel_kwargs`` go to :class:`~gpytorch_tp.TensorProgramKernel`.

    **BatchNorm networks.**  With ``reference_points`` :math:`R` (``(m, d)``), a
    network ``Linear -> BatchNorm1d -> ReLU`` (``depth`` times) ``-> Linear``
    (BatchNorm in training mode, with or without affine parameters, any ``eps``;
    functional ReLUs, ``nn.Identity`` and ``nn.Dropout`` may sit in between) gives
    the :class:`~gpytorch_tp.BatchNormMLPKernel` of that depth: the kernel of the
    module run, in training mode, on the batch :math:`[x; r_1; \dots; r_m]` and
    read at :math:`x`.  Its dense layers' variances come from the arguments or
    ``init`` as above (a BatchNorm gain :math:`\gamma` multiplies the next
    layer's :math:`\sigma_w^2` by the mean of :math:`\gamma^2`: 1 under
    PyTorch's initialisation; ``init="measured"`` needs a zero shift), its
    ``eps`` is the module's, and ``kernel_kwargs`` (``accuracy``, priors) go to
    :class:`~gpytorch_tp.BatchNormMLPKernel`.  The NTK is that of training with
    the BatchNorm gain and shift frozen (:func:`ntk_parameter_scales` gives them
    factor 0).  Any other BatchNorm network (BatchNorm before another
    nonlinearity, a residual, BatchNorm in eval mode, ``nn.BatchNorm2d``) raises
    :class:`UnsupportedModuleError`; without ``reference_points`` every BatchNorm
    network does.  See ``docs/from_module.md``.

    :param reference_points: the reference set :math:`R` of a BatchNorm network (``None``: no BatchNorm).
    """
    from ..kernels import TensorProgramKernel

    if reference_points is not None:
        return _batchnorm_kernel(
            module, kind, input_shape, init, weight_variance, bias_variance, reference_points, kernel_kwargs
        )
    try:
        result = convert_network(module, input_shape, init, weight_variance, bias_variance, input_variance, sequence)
    except UnsupportedModuleError as refusal:
        compiled = _compiled(
            module, input_shape, init, weight_variance, bias_variance, input_variance, sequence, refusal
        )
        program = compiled.program
        if program.grid is not None:
            shape = (program.input_width, *program.grid)
            return TensorProgramKernel(compiled, kind, input_shape=shape, **kernel_kwargs)
        if program.steps is None:
            return TensorProgramKernel(compiled, kind, input_dim=program.input_width, **kernel_kwargs)
        shape = (program.steps, program.input_width)
        return TensorProgramKernel(compiled, kind, input_shape=shape, sequence=True, **kernel_kwargs)
    shape = result.input_shape
    return TensorProgramKernel(
        result.architecture,
        kind,
        input_shape=shape if len(shape) > 1 else None,
        input_dim=math.prod(shape),
        sequence=result.sequence,
        **kernel_kwargs,
    )


def _batchnorm_kernel(
    module: nn.Module,
    kind: str,
    input_shape,
    init: str,
    weight_variance: float | None,
    bias_variance: float | None,
    reference_points: Tensor,
    kernel_kwargs: dict,
) -> BatchNormMLPKernel:
    """``kernel_from_module`` of a ``Linear -> BatchNorm1d -> ReLU`` MLP: its :class:`~gpytorch_tp.BatchNormMLPKernel`.

    The BatchNorm kernel builder: reads the :class:`.BatchNormMarker` layers (and the ``Linear``/``ReLU``
    layers around them) of the converted network.
    """
    from ..kernels import BatchNormMLPKernel

    if not torch.is_tensor(reference_points) or reference_points.dim() != 2:
        raise ValueError(
            "reference_points must be an (m, d) tensor: the points every input is normalised with, "
            f"got {reference_points if not torch.is_tensor(reference_points) else tuple(reference_points.shape)}"
        )
    if "eps" in kernel_kwargs:
        raise ValueError("eps is the BatchNorm1d layers' own (module.eps); it is not a kernel argument here")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise ValueError("reference_points is for networks with nn.BatchNorm1d; this module has none")
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0 and sub.training:
            raise UnsupportedModuleError(
                f"{type(sub).__name__} {name!r} (p={sub.p:g})",
                "BatchNormMLPKernel is the kernel of the network in training mode (batch statistics), where "
                "dropout is active; use p=0",
            )
    result = convert_network(
        module, input_shape, init, weight_variance, bias_variance, None, False, check=False, batchnorm=True
    )
    if len(result.input_shape) != 1 or reference_points.shape[-1] != result.input_shape[0]:
        raise ValueError(
            f"reference_points has {reference_points.shape[-1]} features but the network takes items of shape "
            f"{result.input_shape}; BatchNormMLPKernel takes feature vectors (d,)"
        )
    layers = list(result.architecture.double())  # .double() restores the exact variances (Layer._apply)

    def origin(layer: Layer) -> str:
        return result.origins.get(id(layer), type(layer).__name__)

    def refuse(what: str, found: str) -> UnsupportedModuleError:
        return UnsupportedModuleError(
            what,
            f"BatchNormMLPKernel models Linear -> BatchNorm1d -> ReLU blocks and a Linear readout, and {found}",
        )

    if not layers or not isinstance(layers[0], Linear):
        found = origin(layers[0]) if layers else "nothing"
        raise refuse(f"{type(module).__name__} (a BatchNorm network)", f"the network starts with {found}")
    weights, biases = [float(layers[0].weight_variance.detach())], [float(layers[0].bias_variance.detach())]
    markers = []
    position = 1
    while position < len(layers):
        marker = layers[position]
        if not isinstance(marker, BatchNormMarker):
            previous = origin(layers[position - 1])
            raise refuse(origin(marker), f"it follows {previous} where a BatchNorm1d belongs")
        after = layers[position + 1 : position + 3]
        if len(after) < 1 or not isinstance(after[0], ReLU):
            found = origin(after[0]) if after else "the network output"
            raise refuse(marker.what, f"it is followed by {found}, not by a ReLU")
        if len(after) < 2 or not isinstance(after[1], Linear):
            found = origin(after[1]) if len(after) > 1 else "the network output"
            raise refuse(origin(after[0]), f"it is followed by {found}, not by a Linear layer")
        markers.append(marker)
        weights.append(float(after[1].weight_variance.detach()) * marker.gain)
        biases.append(float(after[1].bias_variance.detach()))
        position += 3
    if not markers:  # a BatchNorm inside a residual branch, or not called in forward
        raise refuse(
            f"{type(module).__name__} (as the architecture {architecture_summary(result.architecture)})",
            "it has no such block",
        )
    if len({marker.eps for marker in markers}) != 1:
        raise UnsupportedModuleError(
            ", ".join(marker.what for marker in markers),
            f"their eps differ ({', '.join(f'{m.eps:g}' for m in markers)}), and BatchNormMLPKernel has one eps",
        )
    return BatchNormMLPKernel(
        reference_points,
        len(markers),
        weight_variance=weights,
        bias_variance=biases,
        eps=markers[0].eps,
        kind=kind,
        **kernel_kwargs,
    )


def ntk_parameter_scales(
    module: nn.Module,
    input_shape: int | tuple[int, ...] | None = None,
    *,
    init: str = "pytorch",
    weight_variance: float | None = None,
    bias_variance: float | None = None,
    input_variance: float | None = None,
    sequence: bool | None = None,
) -> dict[str, float]:
    r"""Per-parameter factors that make ``module``'s tangent kernel the NTK of :func:`from_module`.

    For a weight tensor with variance :math:`\sigma_w^2 / \text{fan\_in}` (as
    :func:`from_module` reads it) the factor is that variance, for a bias its
    variance, for LayerNorm's gain and bias 1: with
    :math:`W = \sqrt{s}\,\omega`, :math:`\langle \nabla_\omega f, \nabla_\omega f' \rangle
    = \sum_p s_p \langle \partial_{W_p} f, \partial_{W_p} f' \rangle`.  Pass the
    result (or ``lambda net: ntk_parameter_scales(net, ...)``) as
    ``MonteCarloKernel(parameter_scales=...)``.  Gradient descent on the module
    as written with these per-tensor learning-rate factors follows the NTK.
    """
    try:
        return convert_network(
            module,
            input_shape,
            init,
            weight_variance,
            bias_variance,
            input_variance,
            sequence,
            check=False,
            batchnorm=True,
        ).scales
    except UnsupportedModuleError as refusal:
        compiled = _compiled(
            module, input_shape, init, weight_variance, bias_variance, input_variance, sequence, refusal
        )
        return compiled.parameter_scales(module)


def _compiled(
    module: nn.Module, input_shape, init, weight_variance, bias_variance, input_variance, sequence, refusal
) -> CompiledProgram:
    """The module compiled as a tensor program, for what the layer vocabulary refused.

    Networks of feature vectors only (so far).  Where the compiler refuses too, its reason is
    raised when it understood every operation (the program is outside the master theorem), else
    the converter's (it names the module), with the compiler's as a note.
    """
    if input_variance is not None:
        raise refusal
    if input_shape is None:
        first = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
        if first is None or sequence:
            raise refusal
        input_shape = (first.in_features,)
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    # Feature vectors (d,), sequences (T, d) when sequence=True, grids (C, L) and images (C, H, W).
    if len(shape) != (2 if sequence else 1) and (sequence or len(shape) not in (2, 3)):
        raise refusal
    steps, grid, d = None, None, shape[0]
    if sequence:
        steps, d = shape
    elif len(shape) > 1:
        d, grid = shape[0], shape[1:]
    try:
        return compile_module(
            module, d, steps=steps, grid=grid, init=init, weight_variance=weight_variance, bias_variance=bias_variance
        )
    except OutsideTheTheoremError:
        raise  # the compiler understood the network: its reason is the one that matters
    except UnsupportedModuleError as compiler_refusal:
        # An operation of neither vocabulary: the converter's refusal names the module.
        refusal.add_note(f"The tensor-program compiler refused it too: {compiler_refusal.what}.")
        raise refusal from None
