"""From a ``torch.nn.Module`` to its infinite-width architecture (see :mod:`gpytorch_tp.conversion.tracing`)."""

from .tracing import (
    CONVERTERS,
    INITS,
    ConversionContext,
    Converter,
    UnsupportedModuleError,
    Value,
    from_module,
    kernel_from_module,
    not_supported_yet,
    ntk_parameter_scales,
    register_converter,
)

__all__ = [
    "CONVERTERS",
    "INITS",
    "ConversionContext",
    "UnsupportedModuleError",
    "from_module",
    "kernel_from_module",
    "ntk_parameter_scales",
    "register_converter",
]
