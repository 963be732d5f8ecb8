"""Host (CPU) memory behaviour of large tiled evaluations: allocator settings and huge pages.

A tiled CPU evaluation allocates and frees a dozen tile-sized temporaries
(hundreds of KiB each) per tile and layer, and writes its results into
matrices of hundreds of MiB.  With glibc's defaults, the freed temporaries
are handed back to the operating system between tiles (heap trimming) and
fetched again, page by page, for the next tile, and every 4 KiB page of a new
output matrix costs a page fault when first written: measured on a 2-core
AMD EPYC (depth-5 MLP NNGP+NTK, N = 4000, float64), 140,000 page faults and
0.3 s of system time per call against about 1.3 s of arithmetic.

Two settings remove almost all of that (to 1,200 faults and 0.05 s):

* :func:`tune_allocator`: glibc keeps allocations below 32 MiB in its heaps
  (``M_MMAP_THRESHOLD``, the largest value glibc's own adaptive threshold
  reaches) and keeps 64 MiB of freed memory per heap instead of trimming it
  (``M_TOP_PAD``).  This changes the process's allocator, so it is applied
  once, at the first tiled CPU evaluation, and not at import; set the
  environment variable ``GPYTORCH_TP_TUNE_MALLOC=0`` to leave the allocator
  alone.  The cost is up to 64 MiB of freed memory kept per allocator arena
  (one per thread that allocated).
* :func:`empty_on_huge_pages`: output matrices of at least 32 MiB are advised
  to use transparent huge pages (2 MiB), one fault per 512 pages.  Only
  advice: without transparent huge pages it changes nothing.

Both do nothing outside Linux with glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

from torch import Tensor

__all__ = ["empty_on_huge_pages", "tune_allocator"]

_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
# Tensors at least this large are advised onto huge pages.
_HUGE_PAGE_MIN_BYTES = 32 << 20

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
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def tune_allocator() -> bool:
    """Apply the allocator settings of the module docstring once per process; whether they are in effect."""
    global _tuned
    with _lock:
        if _tuned or _LIBC is None or os.environ.get("GPYTORCH_TP_TUNE_MALLOC", "1") == "0":
            return _tuned
        _tuned = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(_LIBC.mallopt(_M_TOP_PAD, 64 << 20))
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
