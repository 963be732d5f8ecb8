"""The registry of converters: ``torch.nn`` module type -> the function that converts it into layers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import UnsupportedModuleError
from ..layers import Layer
from .context import ConversionContext

__all__ = ["CONVERTERS", "Converter", "not_supported_yet", "register_converter", "require_layout"]


#: A converter maps a module and its context to ``(layers, output layout)``.
Converter = Callable[[nn.Module, ConversionContext], tuple[list[Layer], str]]

#: Registry: ``torch.nn`` module type -> converter.  ``register_converter(nn.GRU, convert_gru)`` adds one.
CONVERTERS: dict[type[nn.Module], Converter] = {}


def register_converter(
    module_type: type[nn.Module], converter: Converter | None = None
) -> Converter | Callable[[Converter], Converter]:
    """Register ``converter`` for ``module_type`` (replacing any); usable as a decorator."""

    def register(fn: Converter) -> Converter:
        CONVERTERS[module_type] = fn
        return fn

    return register if converter is None else register(converter)


def not_supported_yet(reason: str) -> Converter:
    """A converter that raises :class:`UnsupportedModuleError` with ``reason``: a placeholder in the registry."""

    def convert(module: nn.Module, context: ConversionContext):
        raise UnsupportedModuleError(context.describe(module), reason)

    convert.unsupported_reason = reason
    return convert


def require_layout(module: nn.Module, context: ConversionContext, layouts: tuple[str, ...], hint: str) -> None:
    """Raise :class:`UnsupportedModuleError` (with ``hint``) unless the module's input has one of ``layouts``."""
    if context.value.layout not in layouts:
        raise UnsupportedModuleError(
            f"{context.describe(module)} on a tensor of shape {context.value.shape} ({context.value.layout} layout)",
            hint,
        )
