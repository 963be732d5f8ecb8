"""Kernel matrices beyond one process: tiles shared over the ranks of a ``torch.distributed`` process group.

Nothing here needs a process group: without one, everything runs in the
calling process (world size 1).  With one (``torchrun``, or :func:`run_local`
for tests and notebooks), :func:`precompute_kernel` shares the tiles of a
kernel matrix out to the ranks and writes them into one store on disk, which
:func:`open_kernel_matrix` opens lazily.

* :mod:`.tiles`: the tiles of a matrix and their balanced assignment to ranks;
* :mod:`.store`: the on-disk format (``.npy`` per kind, manifest, per-rank logs of finished tiles) and its reader;
* :mod:`.agreement`: checksums the ranks must agree on, collectives with timeouts;
* :mod:`.driver`: :func:`precompute_kernel`;
* :mod:`.sharded`: :class:`ShardedKernel`, exact GPs whose products with ``K`` are shared out to the ranks;
* :mod:`.posterior`: :func:`posterior_from_store`, a GP posterior from precomputed kernel matrices;
* :mod:`.launch`: joining ``torchrun``'s group, local process groups;
* :mod:`.precompute`: the command line, ``python -m gpytorch_tp.distributed.precompute``.

See ``docs/distributed.md``.
"""

from .agreement import GroupFailureError, GroupTimeoutError, RankMismatchError, fingerprint
from .driver import PrecomputeReport, TileDone, default_tile_size, precompute_kernel
from .launch import GroupFormationError, LocalRunError, init_from_env, run_local
from .posterior import StoredPosterior, posterior_from_store
from .sharded import ShardedKernel, ShardedKernelOperator, product_exchange_bytes, traffic
from .store import IncompleteKernelMatrixError, KernelMatrix, StoreMismatchError, open_kernel_matrix
from .tiles import Tile, TileGrid, assign_balanced, partition_rows

__all__ = [
    "GroupFailureError",
    "GroupFormationError",
    "GroupTimeoutError",
    "IncompleteKernelMatrixError",
    "KernelMatrix",
    "LocalRunError",
    "PrecomputeReport",
    "RankMismatchError",
    "ShardedKernel",
    "ShardedKernelOperator",
    "StoreMismatchError",
    "StoredPosterior",
    "Tile",
    "TileDone",
    "TileGrid",
    "assign_balanced",
    "default_tile_size",
    "fingerprint",
    "init_from_env",
    "open_kernel_matrix",
    "partition_rows",
    "posterior_from_store",
    "precompute_kernel",
    "product_exchange_bytes",
    "run_local",
    "traffic",
]
