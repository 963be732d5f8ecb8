"""The package's errors, on the lowest floor so that every module, on any floor, can raise them."""

from __future__ import annotations

__all__ = ["UnsupportedModuleError"]


class UnsupportedModuleError(NotImplementedError):
    """A module or operation that :func:`from_module` cannot convert into exact-kernel layers."""

    def __init__(self, what: str, reason: str = ""):
        self.what = what
        reason = f": {reason.rstrip('.')}" if reason else ""
        super().__init__(
            f"{what} is not supported by from_module{reason}. Its kernels can still be estimated from random "
            "finite networks: gpytorch_tp.kernels.MonteCarloKernel(lambda: YourModule(...), kind='nngp' or 'ntk')"
        )
