"""The kernel state: what one layer hands to the next.

For two batches of inputs ``x1`` (N1 items) and ``x2`` (N2 items) a layer maps
the infinite-width statistics of its input features to those of its output
features.  The statistics are per *pair* of items:

* ``cross`` -- ``lim (1/n) <z(x1_i), z(x2_j)>``, the NNGP covariance of the
  features (for pre-activations, the GP covariance itself);
* ``var1``/``var2`` -- the same quantity for each item with itself (the
  marginal variances every nonlinearity needs), shaped to broadcast against
  ``cross``;
* ``ntk`` -- the neural tangent kernel of the features, when tracked.

Two *pairings* exist.  ``outer`` pairs every ``x1_i`` with every ``x2_j``:
``cross`` is ``(*batch, N1, N2, *pair_axes)``, ``var1`` is
``(*batch, N1, 1, *pair_axes)`` and ``var2`` is ``(*batch, 1, N2, *pair_axes)``.
``diagonal`` pairs ``x1_i`` with ``x2_i`` only (``Kernel(..., diag=True)``):
all three are ``(*batch, N, *pair_axes)``.  Because the variances broadcast
against ``cross``, a layer written with elementwise operations serves both
pairings without knowing which one it is.

``pair_axes`` are trailing axes that later architecture families add (pixel
or time pairs); dense layers leave them alone.

Two flags describe the features, so that layers can refuse what the
infinite-width recursion cannot express:

* ``gaussian`` -- the features are centred jointly Gaussian across units (true
  after a weight layer); nonlinearities need it;
* ``fresh`` -- the features were produced by weights that nothing else in the
  network shares since the last branching point; a residual sum is the sum of
  the branch kernels only when a branch is fresh.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KernelState"]


@dataclass(frozen=True)
class KernelState:
    """Infinite-width statistics of a layer's features for pairs of inputs.

    :param cross: NNGP covariance of the pairs (see module docstring for shapes).
    :param var1: self-covariance of the ``x1`` items, broadcastable to ``cross``.
    :param var2: self-covariance of the ``x2`` items, broadcastable to ``cross``.
    :param ntk: neural tangent kernel of the pairs; ``None`` means identically
        zero (no trainable parameter below) or not tracked.
    :param track_ntk: whether layers must propagate the NTK.
    :param diagonal: ``True`` for the ``diagonal`` pairing.
    :param same_inputs: ``x1`` and ``x2`` hold the same items in the same order,
        so the pairs ``(i, i)`` have correlation exactly one.
    :param gaussian: the features are centred and jointly Gaussian.
    :param fresh: the features come from weights private to the current branch.
    :param pair_ndim: number of trailing pair axes (0 for dense networks).
    """

    cross: Tensor
    var1: Tensor
    var2: Tensor
    ntk: Tensor | None = None
    track_ntk: bool = False
    diagonal: bool = False
    same_inputs: bool = False
    gaussian: bool = False
    fresh: bool = False
    pair_ndim: int = 0

    @property
    def item_ndim(self) -> int:
        """Number of item axes before the pair axes (2 for ``outer``, 1 for ``diagonal``)."""
        return 1 if self.diagonal else 2

    def broadcast_parameter(self, value: Tensor) -> Tensor:
        """Reshape a hyperparameter of shape ``kernel.batch_shape`` to broadcast against ``cross``."""
        return value.reshape(*value.shape, *([1] * (self.item_ndim + self.pair_ndim)))

    def replace(self, **changes) -> KernelState:
        """A new state with ``changes``; pairs of identical items keep correlation exactly one."""
        new = dataclasses.replace(self, **changes)
        if new.same_inputs and "cross" in changes:
            new = dataclasses.replace(new, cross=new._with_exact_self_pairs(new.cross))
        return new

    def _with_exact_self_pairs(self, cross: Tensor) -> Tensor:
        # Recomputing (i, i) pairs through a different code path than the
        # variances can leave them a rounding error apart, which puts the
        # correlation a hair off 1 where derivatives are steep.  Copy instead.
        if self.diagonal:
            return torch.broadcast_to(self.var1, torch.broadcast_shapes(self.var1.shape, cross.shape))
        if self.pair_ndim:
            return cross  # families with pair axes handle their own diagonals
        diagonal_shape = cross.diagonal(dim1=-2, dim2=-1).shape
        return torch.diagonal_scatter(cross, self.var1[..., 0].expand(diagonal_shape), dim1=-2, dim2=-1)
