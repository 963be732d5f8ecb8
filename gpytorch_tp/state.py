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

``pair_axes`` are trailing axes for items with positions (pixels of an image,
steps of a sequence), on a grid of shape ``positions`` (``(H, W)``, ``(L,)``).
With ``all_position_pairs`` every position of one item is paired with every
position of the other: the pair axes are ``(*positions, *positions)`` and
``var1``/``var2`` hold each item's covariance between its own positions
(``(*batch, N1, 1, *positions, *positions)``).  Otherwise only *aligned*
positions are paired (``p`` with ``p``): the pair axes are ``positions`` and
``var1``/``var2`` are the per-position variances.  Aligned pairs cost
``O(P)`` per item pair instead of ``O(P^2)`` and suffice for every layer that
never mixes different positions of the two items (convolutions, pointwise
layers, a ``Flatten`` readout); pooling needs all pairs.  Dense networks have
no positions and no pair axes.

Two flags describe the features, so that layers can refuse what the
infinite-width recursion cannot express:

* ``gaussian`` -- the features are centred jointly Gaussian across units (true
  after a weight layer); nonlinearities need it;
* ``fresh`` -- the features were produced by weights that nothing else in the
  network shares since the last branching point; a residual sum is the sum of
  the branch kernels only when a branch is fresh;
* ``ntk_feature_coupled`` -- part of the NTK is a product of each unit's own
  features (an affine LayerNorm's gains), so a nonlinearity cannot factor it.

The flags change in one place, the transitions of :class:`KernelState` that
layers call: :meth:`~KernelState.after_weights` (a weight layer: Gaussian,
fresh, decoupled), :meth:`~KernelState.after_recurrence` (a recurrent layer's
hidden states: fresh, decoupled, not Gaussian),
:meth:`~KernelState.after_coordinatewise` (a nonlinearity: neither),
:meth:`~KernelState.after_per_unit_gains` (coupled), :meth:`~KernelState.shared`
(the input of two branches) and :meth:`~KernelState.joined` (their sum).
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

__all__ = [
    "KINDS",
    "KernelState",
    "PerItemCache",
    "per_item",
    "per_item_cache",
    "self_position_variances",
    "shared_per_item_work",
    "unit_dims",
]

#: What a kernel can compute from the state: the NNGP kernel (``cross``) or the NTK (``ntk``).
KINDS = ("nngp", "ntk")

# While a kernel matrix is evaluated tile by tile, per-item results are shared
# between the tiles of a row (or column) of tiles; see ``per_item``.  The cache
# is per thread; threads that compute tiles of one evaluation adopt the
# caller's cache explicitly.
_local = threading.local()


@contextlib.contextmanager
def shared_per_item_work(cache: PerItemCache | None = None, limit_bytes: float = float("inf")) -> Iterator[None]:
    """Within this context (in this thread) :func:`per_item` computes each result once.

    :param cache: adopt this cache (from :func:`per_item_cache` in the thread
        that started an evaluation) instead of the current or a new one.
    :param limit_bytes: a new cache is emptied whenever it holds more than this.
    """
    outer = getattr(_local, "cache", None)
    _local.cache = cache if cache is not None else (outer if outer is not None else PerItemCache(limit_bytes))
    try:
        yield
    finally:
        _local.cache = outer


def per_item_cache() -> PerItemCache | None:
    """The cache of the enclosing :func:`shared_per_item_work` in this thread, if any."""
    return getattr(_local, "cache", None)


def per_item(fn: Callable[..., object], *tensors: Tensor) -> object:
    """``fn(*tensors)``, computed once per evaluation for per-item statistics.

    The per-item statistics of a tile (``var1``, ``var2`` and everything a
    layer derives from them) are the same for every tile in its row (or
    column) of tiles, and the evaluation hands those tiles the very same tensor
    objects.  A layer that routes its per-item work through this function
    therefore does it once per row of tiles instead of once per tile; without
    an enclosing :func:`shared_per_item_work` it simply calls ``fn``.

    ``fn`` must be a module-level function, a builtin or a bound method (it is
    part of the cache key) and pure: a function of ``tensors`` (keyed by
    identity; other hashable arguments are keyed by value) and of
    hyperparameters, which do not change during an evaluation.  The result is
    shared: never modify it in place.
    """
    cache = getattr(_local, "cache", None)
    if cache is None:
        return fn(*tensors)
    key = (fn, *(id(t) if isinstance(t, Tensor) else (t,) for t in tensors))
    hit = cache.get(key)
    if hit is None:
        result = fn(*tensors)
        # Keep the arguments alive so that their ids stay unique while cached.
        hit = cache[key] = (result, tensors)
        cache.account(result)
    return hit[0]


class PerItemCache(dict):
    """The store of :func:`per_item`, emptied whenever it grows past ``limit_bytes``.

    Per-item results of items with many positions (all position pairs of an
    image) can outgrow memory when kept for every row and column of tiles;
    dropping them only costs recomputation.
    """

    def __init__(self, limit_bytes: float = float("inf")):
        super().__init__()
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    def account(self, result: object) -> None:
        tensors = result if isinstance(result, tuple) else (result,)
        self.held_bytes += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))
        if self.held_bytes > self.limit_bytes:
            self.clear()
            self.held_bytes = 0


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
    :param positions: grid shape of each item's positions (``()`` for dense features).
    :param all_position_pairs: every position pair (else aligned positions only).
    :param valid1: for padded sequences, 1 where a position of an ``x1`` item
        holds a step and 0 where it is padding, shaped like the first output of
        :meth:`position_variances`; ``None``: every position is valid.
    :param valid2: the same for the ``x2`` items.
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
    positions: tuple[int, ...] = ()
    all_position_pairs: bool = False
    ntk_feature_coupled: bool = False
    valid1: Tensor | None = None
    valid2: Tensor | None = None

    @property
    def pair_ndim(self) -> int:
        """Number of trailing pair axes: ``2 s`` for all position pairs of an ``s``-d grid, ``s`` for aligned."""
        return len(self.positions) * (2 if self.all_position_pairs else 1)

    def position_variances(self) -> tuple[Tensor, Tensor]:
        """Each item's variance at each position, for ``x1`` and ``x2``, broadcastable to ``cross``.

        Nonlinearities and normalisations need these marginal variances; with
        aligned positions (or none) they are ``var1`` and ``var2`` themselves.
        """
        if not self.all_position_pairs:
            return self.var1, self.var2
        first, _ = self_position_variances(self.var1, len(self.positions))
        _, second = self_position_variances(self.var2, len(self.positions))
        return first, second

    @property
    def item_ndim(self) -> int:
        """Number of item axes before the pair axes (2 for ``outer``, 1 for ``diagonal``)."""
        return 1 if self.diagonal else 2

    def broadcast_parameter(self, value: Tensor) -> Tensor:
        """Reshape a hyperparameter of shape ``kernel.batch_shape`` to broadcast against ``cross``."""
        return unit_dims(value, self.item_ndim + self.pair_ndim)

    # -- the flags' transitions (the only places layers change them) ----------------------------

    def after_weights(self, **changes) -> KernelState:
        """Features of this branch's own weight matrices: centred Gaussian, fresh, NTK decoupled."""
        return self.replace(gaussian=True, fresh=True, ntk_feature_coupled=False, **changes)

    def after_recurrence(self, **changes) -> KernelState:
        """Hidden states of a recurrence: functions of its own weights (fresh, decoupled), not Gaussian."""
        return self.replace(gaussian=False, fresh=True, ntk_feature_coupled=False, **changes)

    def after_coordinatewise(self, **changes) -> KernelState:
        """Features after a coordinatewise function: neither Gaussian nor fresh."""
        return self.replace(gaussian=False, fresh=False, **changes)

    def after_per_unit_gains(self, gains: bool, **changes) -> KernelState:
        """Features scaled by per-unit gains (``gains``), which couple the NTK to each unit's features."""
        return self.replace(ntk_feature_coupled=self.ntk_feature_coupled or gains, **changes)

    def shared(self) -> KernelState:
        """This state as the input of two branches: its features are no branch's own."""
        return self.replace(fresh=False)

    def joined(self, other: KernelState, **changes) -> KernelState:
        """The flags of the sum of two branches' features (both Gaussian, both fresh, either coupled)."""
        return self.replace(
            gaussian=self.gaussian and other.gaussian,
            fresh=self.fresh and other.fresh,
            ntk_feature_coupled=self.ntk_feature_coupled or other.ntk_feature_coupled,
            **changes,
        )

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
        # Items are axes -2 and -1 before the pair axes; the diagonal moves to the end.
        first_item = -2 - self.pair_ndim
        diagonal_shape = cross.diagonal(dim1=first_item, dim2=first_item + 1).shape
        self_pairs = self.var1.squeeze(first_item + 1).movedim(first_item + 1, -1)
        return torch.diagonal_scatter(cross, self_pairs.expand(diagonal_shape), dim1=first_item, dim2=first_item + 1)


_FIELD_NAMES = frozenset(field.name for field in dataclasses.fields(KernelState))


def self_position_variances(self_covariance: Tensor, grid_ndim: int) -> tuple[Tensor, Tensor]:
    """The position variances of an all-position-pairs self-covariance, on the first and on the second grid.

    ``self_covariance`` has trailing axes ``(*positions, *positions)``; the
    results have its shape with the second (first) grid collapsed to ones, so
    that ``first * second`` broadcasts to it.  Per-item work: cached with
    :func:`per_item`.
    """
    return per_item(_POSITION_DIAGONALS[grid_ndim], self_covariance)


def _position_diagonals(self_covariance: Tensor, grid_ndim: int) -> tuple[Tensor, Tensor]:
    grid = self_covariance.shape[self_covariance.dim() - grid_ndim :]
    lead = self_covariance.shape[: self_covariance.dim() - 2 * grid_ndim]
    count = 1
    for size in grid:
        count *= size
    diagonal = self_covariance.reshape(*lead, count, count).diagonal(dim1=-2, dim2=-1).reshape(*lead, *grid)
    ones = (1,) * grid_ndim
    return diagonal.reshape(*lead, *grid, *ones), diagonal.reshape(*lead, *ones, *grid)


# One function object per grid dimension, so that per_item can key on it.
_POSITION_DIAGONALS = {ndim: functools.partial(_position_diagonals, grid_ndim=ndim) for ndim in (1, 2, 3)}


def unit_dims(value: Tensor, count: int) -> Tensor:
    """A hyperparameter of shape ``batch_shape`` with ``count`` trailing unit axes (cached per evaluation)."""
    reshape = _APPEND_UNIT_DIMS.get(count)
    if reshape is None:
        reshape = _APPEND_UNIT_DIMS[count] = functools.partial(_append_unit_dims, count=count)
    return per_item(reshape, value)


def _append_unit_dims(value: Tensor, count: int) -> Tensor:
    return value.reshape(*value.shape, *([1] * count))


# One function object per count, so that per_item can key on it.
_APPEND_UNIT_DIMS: dict[int, Callable[[Tensor], Tensor]] = {}
