"""The registry of nonlinearity layers: the one list of them, and the torch operations each is the limit of.

Each nonlinearity class (:mod:`gpytorch_tp.layers.elementwise`) registers itself with
:func:`register_nonlinearity` and declares, in its own body, the torch functions,
tensor methods and ``nn.Module`` types it converts from (:class:`TorchEquivalent`);
:func:`nonlinearity_from_name`, :mod:`gpytorch_tp.conversion` (through
:func:`torch_operations`), the package's exports and the tests read the registry,
so adding a nonlinearity touches one file.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import Layer

__all__ = [
    "NONLINEARITIES",
    "TorchEquivalent",
    "nonlinearities",
    "nonlinearity_from_name",
    "register_nonlinearity",
    "torch_operations",
]

#: Registry: name -> nonlinearity class (filled by :func:`register_nonlinearity`).
NONLINEARITIES: dict[str, type[Layer]] = {}


def register_nonlinearity(cls: type[Layer]) -> type[Layer]:
    """Class decorator: register ``cls`` under ``cls.name``.

    The registry is the one list of nonlinearities: :func:`nonlinearity_from_name`,
    :func:`~gpytorch_tp.from_module` (through :func:`torch_operations`), the
    package's exports and the tests read it.  A class registered after
    :mod:`gpytorch_tp.conversion` is imported is not converted from torch modules.
    """
    if not isinstance(getattr(cls, "name", None), str):
        raise TypeError(f"{cls.__name__} needs a string class attribute 'name' to be registered")
    if NONLINEARITIES.get(cls.name, cls) is not cls:
        raise ValueError(f"a nonlinearity named {cls.name!r} is already registered")
    NONLINEARITIES[cls.name] = cls
    return cls


def nonlinearities() -> dict[str, type[Layer]]:
    """The registered nonlinearities, name -> class (a copy of :data:`NONLINEARITIES`)."""
    return dict(NONLINEARITIES)


def torch_operations() -> tuple[dict, dict[str, type[Layer]], dict[type[nn.Module], type[Layer]]]:
    """``(functions, methods, modules)``: each torch function, tensor method name and ``nn.Module``
    type that a registered nonlinearity is the limit of (see :class:`TorchEquivalent`) -> its class."""
    functions, methods, modules = {}, {}, {}
    for cls in NONLINEARITIES.values():
        own = vars(cls)  # the class's own declarations (ReLU is a LeakyReLU, but not nn.LeakyReLU's limit)
        functions.update(dict.fromkeys(own.get("torch_functions", ()), cls))
        methods.update(dict.fromkeys(own.get("torch_methods", ()), cls))
        modules.update(dict.fromkeys(own.get("torch_modules", ()), cls))
    return functions, methods, modules


class TorchEquivalent:
    """What torch operations a layer is the infinite-width limit of (read by :func:`torch_operations`).

    The declarations are the class's own: they are not inherited.
    """

    #: torch functions (``torch.relu``, ``F.relu``) that this layer is.
    torch_functions: tuple[Callable, ...] = ()
    #: tensor method names (``"relu"`` for ``x.relu()``).
    torch_methods: tuple[str, ...] = ()
    #: ``torch.nn`` module types (``nn.ReLU``).
    torch_modules: tuple[type[nn.Module], ...] = ()
    #: ``(name, default)`` of the torch functions' arguments after the input, in order; a
    #: module's are its attributes of these names.  ``inplace`` is accepted and ignored.
    torch_arguments: tuple[tuple[str, object], ...] = ()

    @classmethod
    def from_torch(cls, **arguments) -> Layer | None:
        """The layer for these torch arguments (``inplace`` removed); ``None``: not supported."""
        return cls(**arguments)

    @classmethod
    def from_torch_call(cls, args: tuple = (), kwargs: dict | None = None) -> Layer | None:
        """:meth:`from_torch` for a call ``f(x, *args, **kwargs)``; ``TypeError`` for arguments ``f`` does not take."""
        defaults = dict(vars(cls).get("torch_arguments", ()))
        kwargs = dict(kwargs or {})
        if len(args) > len(defaults) or set(kwargs) - set(defaults):
            raise TypeError(f"{cls.__name__}: unexpected torch arguments {tuple(args)}, {kwargs}")
        arguments = {**defaults, **dict(zip(defaults, args)), **kwargs}
        arguments.pop("inplace", None)
        return cls.from_torch(**arguments)

    @classmethod
    def from_torch_module(cls, module: nn.Module) -> Layer | None:
        """:meth:`from_torch` with the module's attributes named in :attr:`torch_arguments`."""
        own = vars(cls).get("torch_arguments", ())
        return cls.from_torch_call((), {name: getattr(module, name, default) for name, default in own})


def nonlinearity_from_name(name: str | Layer, **kwargs) -> Layer:
    """Build a nonlinearity layer from its name (``"relu"``, ``"erf"``, ``"tanh"``, ...).

    A :class:`Layer` instance is returned unchanged; keyword arguments go to the
    class (e.g. ``negative_slope`` for ``"leaky_relu"``).
    """
    if isinstance(name, Layer):
        if kwargs:
            raise ValueError("keyword arguments are only used when the nonlinearity is given by name")
        return name
    if not isinstance(name, str):
        raise TypeError(f"nonlinearity must be a name or a Layer, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in NONLINEARITIES:
        raise ValueError(f"unknown nonlinearity {name!r}; choose one of {sorted(NONLINEARITIES)} or pass a Layer")
    return NONLINEARITIES[key](**kwargs)
