"""``compile_module``: a ``torch.nn.Module`` to the layer of its exact infinite-width kernels."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModuleError
from .master_theorem import CompiledProgram
from .trace import trace_program

__all__ = ["INITS", "compile_module"]

INITS = ("pytorch", "measured")
# Modules whose default initialisation is kaiming_uniform(a=sqrt(5)): weights U(+-1/sqrt(fan_in)),
# variance 1/(3 fan_in), i.e. sigma_W^2 = 1/3 (nn.Bilinear is not an F.linear the tracer sees).
_PYTORCH_DEFAULTS = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Every tensor of these is U(+-1/sqrt(hidden)): 1/(3 hidden) per entry, i.e. fan_in / (3 hidden) for matrices
# (1/3 for the recurrent ones) and biases that vanish at infinite width.
_PYTORCH_RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)


def compile_module(
    module: nn.Module,
    input_dim: int,
    *,
    steps: int | None = None,
    grid: tuple[int, int] | None = None,
    init: str = "pytorch",
    weight_variance: float | None = None,
    bias_variance: float | None = None,
) -> CompiledProgram:
    """The layer of ``module``'s NNGP kernel and NTK on inputs ``(N, input_dim)``, from its tensor program.

    With ``steps``, the inputs are sequences of ``steps`` steps of ``input_dim`` features, flattened
    time-major ``(N, steps * input_dim)`` (``forward`` reshapes them and may loop over the steps); the
    layer then goes in a ``TensorProgramKernel(..., input_shape=(steps, input_dim), sequence=True)``.
    With ``grid=(H, W)``, the inputs are images of ``input_dim`` channels, flattened channel-major
    ``(N, C * H * W)`` (``forward`` reshapes them, ``x.view(N, C, H, W)``); the layer goes in a
    ``TensorProgramKernel(..., input_shape=(C, H, W))``.

    The variances of the weights come from, in this order: ``weight_variance`` / ``bias_variance``
    (all matrices / all biases); ``init="measured"``: the second moments of the module's current
    parameters (times the fan-in for matrices); ``init="pytorch"``: PyTorch's default
    initialisation for parameters of ``nn.Linear`` (matrices 1/3; biases ``1/(3 fan_in)``, which
    vanishes at infinite fan-in unless the layer takes the network input), the measured moments for
    every other parameter.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from gpytorch_tp import TensorProgramKernel
        >>> class GLU(nn.Module):  # a gated unit: no layer of the vocabulary is a product
        ...     def __init__(self, width=64):
        ...         super().__init__()
        ...         self.a, self.b, self.out = nn.Linear(3, width), nn.Linear(3, width), nn.Linear(width, 1)
        ...     def forward(self, x):
        ...         return self.out(self.a(x) * torch.sigmoid(self.b(x)))
        >>> kernel = TensorProgramKernel(compile_module(GLU(), 3), kind="ntk")
        >>> kernel(torch.randn(5, 3)).to_dense().shape
        torch.Size([5, 5])
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    program, info = trace_program(module, input_dim, steps=steps, grid=grid)
    variances = {}
    for weight in program.weights:
        if weight.unit:
            continue  # per-unit parameters have no variance (their NTK learning rate is 1)
        entry = info[weight.name]
        tensor = entry["tensor"].detach().double()
        explicit = bias_variance if weight.bias else weight_variance
        if explicit is not None:
            value = float(explicit)
        elif init == "pytorch" and isinstance(entry["module"], _PYTORCH_RECURRENT):
            value = _recurrent_default(entry["module"], weight, entry["finite_fan_in"])
        elif init == "pytorch" and isinstance(entry["module"], _PYTORCH_DEFAULTS):
            finite = entry["finite_fan_in"]
            value = (0.0 if finite is None else 1.0 / (3.0 * finite)) if weight.bias else 1.0 / 3.0
        else:
            second_moment = float(tensor.pow(2).mean()) if tensor.numel() else 0.0
            value = second_moment if weight.bias else weight.fan_in * second_moment
        if value < 0 or value != value:
            raise ValueError(f"the variance of {weight.name} must be non-negative and finite, got {value}")
        variances[weight.name] = value
    return CompiledProgram(program, variances)


def _recurrent_default(module: nn.Module, weight, finite_fan_in: int | None) -> float:
    if weight.bias:
        return 0.0
    if finite_fan_in is not None:
        raise UnsupportedModuleError(
            f"{weight.name} of {type(module).__name__}",
            "with PyTorch's default initialisation its input weights have variance 1/(3 hidden_size) on a finite "
            "input, which vanishes at infinite width: the kernel would not depend on the input. Pass "
            "weight_variance=..., init='measured' (the module at its own width), or put a dense layer first",
        )
    return weight.fan_in / (3.0 * module.hidden_size)
