"""The compiler's refusals: what it does not know, and what the master theorem does not cover."""

from __future__ import annotations

from ..errors import UnsupportedModuleError

__all__ = ["NotFeatureVectorsError", "OutsideTheTheoremError", "UnknownOperationError"]


class NotFeatureVectorsError(UnsupportedModuleError):
    """The network computes on tensors other than feature vectors ``(N, width)`` (grids, sequences)."""


class UnknownOperationError(UnsupportedModuleError):
    """An operation the compiler does not know (the layer vocabulary's refusal usually says more)."""


class OutsideTheTheoremError(UnsupportedModuleError):
    """Every operation was understood, but the program is not one the master theorem covers as written."""
