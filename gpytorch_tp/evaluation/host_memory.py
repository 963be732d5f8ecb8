"""Host (CPU) memory behaviour of large tiled evaluations: resident memory, allocator settings, huge pages.

**Keeping the memory budget.**  A tiled CPU evaluation allocates and frees a
dozen tile-sized temporaries per tile and layer, while the per-item work it
keeps between tiles (:func:`gpytorch_tp.state.per_item`) and the Python and
tensor objects around it stay alive.  glibc's heaps then fragment: the freed
temporaries lie in holes between long-lived allocations that later, larger
requests cannot reuse, and the process keeps them resident (measured:
docs/benchmarks.md, "Tile sizes").  :class:`ResidentGuard` watches the
process's resident memory between tiles and, when it comes near the
evaluation's budget, hands the free pages back to the operating system
(``malloc_trim``, tens of milliseconds each).

**Allocator tuning (opt-in).**  With glibc's defaults, freed temporaries are
also handed back between tiles (heap trimming) and fetched again, page by page,
for the next tile, and every 4 KiB page of a new output matrix costs a page
fault when first written (a tenth of a large evaluation's time went to page
faults; docs/benchmarks.md, "Tile sizes").  :func:`tune_allocator` keeps allocations
below 32 MiB in glibc's heaps (``M_MMAP_THRESHOLD``, the largest value glibc's
own adaptive threshold reaches) and keeps 64 MiB of freed memory per heap
instead of trimming it (``M_TOP_PAD``), which removed nearly all of them.  It
changes the allocator of the whole process (every library in it, for the rest
of its life), and costs up to 64 MiB of resident memory per allocator arena (one
per thread that allocated), so it is never applied unasked: call
:func:`tune_allocator` yourself, or set the environment variable ``GPYTORCH_TP_TUNE_MALLOC=1`` to have the first tiled CPU evaluation apply it.

**Huge pages.**  :func:`empty_on_huge_pages`: output matrices of at least
32 MiB are advised to use transparent huge pages (2 MiB), one fault per 512
pages.  Only advice about that one allocation: without transparent huge pages
it changes nothing.

All of this does nothing outside Linux with glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

from torch import Tensor

__all__ = ["ResidentGuard", "empty_on_huge_pages", "release_free_memory", "resident_bytes", "tune_allocator"]

_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
# Tensors at least this large are advised onto huge pages.
_HUGE_PAGE_MIN_BYTES = 32 << 20
# The environment variable that opts evaluations into tune_allocator.
TUNE_ENV = "GPYTORCH_TP_TUNE_MALLOC"

_lock = threading.Lock()
_tuned = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no such function)  # noqa: B018
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def tune_allocator() -> bool:
    """Apply the allocator settings of the module docstring to this process (once); whether they are in effect.

    Process-wide and irreversible: call it only in a program that owns its
    process (a script or a benchmark), not from a library.
    """
    global _tuned
    with _lock:
        if _tuned or _LIBC is None:
            return _tuned
        _tuned = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(_LIBC.mallopt(_M_TOP_PAD, 64 << 20))
        return _tuned


def tune_allocator_if_asked() -> bool:
    """:func:`tune_allocator` when ``GPYTORCH_TP_TUNE_MALLOC=1`` is set (what evaluations call); else nothing."""
    if os.environ.get(TUNE_ENV, "0").strip().lower() in ("1", "true", "yes", "on"):
        return tune_allocator()
    return _tuned


def empty_on_huge_pages(like: Tensor, *shape: int) -> Tensor:
    """``like.new_empty(shape)``, advised onto transparent huge pages when large and on the CPU."""
    out = like.new_empty(*shape)
    nbytes = out.numel() * out.element_size()
    if _LIBC is None or out.device.type != "cpu" or nbytes < _HUGE_PAGE_MIN_BYTES:
        return out
    start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # whole huge pages inside the tensor
    end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _LIBC.madvise(start, end - start, _MADV_HUGEPAGE)
    return out


try:
    _PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):
    _PAGE_BYTES = 4096


def resident_bytes() -> int | None:
    """The process's resident memory (Linux ``/proc/self/statm``), or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the operating system (glibc ``malloc_trim``); whether it could."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


class ResidentGuard:
    """Keeps the process's resident memory below ``limit`` bytes by releasing free allocator pages.

    :meth:`check` is cheap (one read of ``/proc/self/statm``, a few
    microseconds) and is called between tiles.  When the resident memory has
    passed the limit it calls :func:`release_free_memory`; should the memory
    still be above the limit afterwards (live data, which no trim can give
    back), the next trim waits until it has grown by ``step`` more, so that a
    full budget does not cost a trim per tile.  Does nothing where resident
    memory cannot be read or released.
    """

    def __init__(self, limit: float, step: float):
        self.limit = float(limit)
        self.step = max(float(step), 1.0)
        self.trims = 0
        self._trigger = self.limit
        self._lock = threading.Lock()
        self.active = _LIBC is not None and resident_bytes() is not None

    def check(self) -> None:
        if not self.active:
            return
        rss = resident_bytes()
        if rss is None or rss <= self._trigger or not self._lock.acquire(blocking=False):
            return
        try:
            release_free_memory()
            self.trims += 1
            after = resident_bytes() or 0
            self._trigger = max(self.limit, after + self.step)
        finally:
            self._lock.release()
