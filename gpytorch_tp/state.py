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

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KernelState", "per_item", "per_item_cache", "shared_per_item_work"]

# While a kernel matrix is evaluated tile by tile, per-item results are shared
# between the tiles of a row (or column) of tiles; see ``per_item``.  The cache
# is per thread; threads that compute tiles of one evaluation adopt the
# caller's cache explicitly.
_local = threading.local()


@contextlib.contextmanager
def shared_per_item_work(cache: dict | None = None) -> Iterator[None]:
    """Within this context (in this thread) :func:`per_item` computes each result once.

    :param cache: adopt this cache (from :func:`per_item_cache` in the thread
        that started an evaluation) instead of the current or a new one.
    """
    outer = getattr(_local, "cache", None)
    _local.cache = cache if cache is not None else (outer if outer is not None else {})
    try:
        yield
    finally:
        _local.cache = outer


def per_item_cache() -> dict | None:
    """The cache of the enclosing :func:`shared_per_item_work` in this thread, if any."""
    return getattr(_local, "cache", None)


def per_item(fn: Callable[..., object], *tensors: Tensor):
    """``fn(*tensors)``, computed once per evaluation for per-item statistics.

    The per-item statistics of a tile (``var1``, ``var2`` and everything a
    layer derives from them) are the same for every tile in its row (or
    column) of tiles, and the evaluation hands those tiles the very same tensor
    objects.  A layer that routes its per-item work through this function
    therefore does it once per row of tiles instead of once per tile; without
    an enclosing :func:`shared_per_item_work` it simply calls ``fn``.

    ``fn`` must be a module-level function, a builtin or a bound method (it is
    part of the cache key) and pure: a function of ``tensors`` (keyed by
    identity) and of hyperparameters, which do not change during an
    evaluation.  The result is shared: never modify it in place.
    """
    cache = getattr(_local, "cache", None)
    if cache is None:
        return fn(*tensors)
    key = (fn, *map(id, tensors))
    hit = cache.get(key)
    if hit is None:
        # Keep the arguments alive so that their ids stay unique while cached.
        hit = cache[key] = (fn(*tensors), tensors)
    return hit[0]


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
    :param ntk_feature_coupled: part of the NTK is a product of each unit's own
        features (per-unit gains, e.g. an affine LayerNorm), so it is not
        independent of the pre-activations; a weight layer decouples it again.
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
    ntk_feature_coupled: bool = False

    @property
    def item_ndim(self) -> int:
        """Number of item axes before the pair axes (2 for ``outer``, 1 for ``diagonal``)."""
        return 1 if self.diagonal else 2

    def broadcast_parameter(self, value: Tensor) -> Tensor:
        """Reshape a hyperparameter of shape ``kernel.batch_shape`` to broadcast against ``cross``."""
        count = self.item_ndim + self.pair_ndim
        reshape = _APPEND_UNIT_DIMS.get(count)
        if reshape is None:
            reshape = _APPEND_UNIT_DIMS[count] = functools.partial(_append_unit_dims, count=count)
        return per_item(reshape, value)

    def replace(self, **changes) -> KernelState:
        """A new state with ``changes``; pairs of identical items keep correlation exactly one.

        Same result as :func:`dataclasses.replace` (plus the exact self pairs),
        without its per-call cost: a layer calls this once per tile of the
        kernel matrix.
        """
        unknown = changes.keys() - _FIELD_NAMES
        if unknown:
            raise TypeError(f"KernelState has no field(s) {sorted(unknown)}")
        new = object.__new__(type(self))
        fields = new.__dict__
        fields.update(self.__dict__)
        fields.update(changes)
        if new.same_inputs and "cross" in changes:
            fields["cross"] = new._with_exact_self_pairs(new.cross)
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


_FIELD_NAMES = frozenset(field.name for field in dataclasses.fields(KernelState))


def _append_unit_dims(value: Tensor, count: int) -> Tensor:
    return value.reshape(*value.shape, *([1] * count))


# One function object per count, so that per_item can key on it.
_APPEND_UNIT_DIMS: dict[int, Callable[[Tensor], Tensor]] = {}
