"""Fused pair work: a run of layers whose per-pair work is elementwise, compiled into one pass.

A dense layer or a ReLU does two kinds of work on a tile of the kernel matrix:
per item (the variances, done once per row of tiles) and per pair (the cross
covariance and the NTK: the hot loop).  Layer by layer, a ReLU is about ten
passes over the tile and a dense layer two, each reading and writing whole
tiles.  A layer that can separate the two kinds (:meth:`Layer.fusion_split` for
the per-item part, :meth:`Layer.fused_pairs` for a pure elementwise function of
the pairs) lets :class:`~gpytorch_tp.layers.Sequential` hand a whole run of such
layers to ``torch.compile``, which generates one loop over the pairs: one read
of the input covariance, one write of each output, the per-item numbers as
broadcast operands.

Only items without positions fuse.  Evaluations without autograd recording
fuse on every device (the kernel matrix held by the matrix-free operator,
predictions, a plain evaluation of an MLP-like architecture); evaluations that
autograd records fuse where :func:`fuses_gradients` says the compiled backward
pays (CUDA), the layers' fused functions being differentiable (the arc-cosine
with its analytic gradients).  The layer-by-layer path stays the reference:
fused values and gradients agree with it to round-off (tested).  Pairs of an
item with itself get their variance exactly after every layer inside the fused
loop too, as :meth:`KernelState.replace` does.

``torch.compile`` costs seconds per process the first time a run is met (per
dtype, and for NNGP-only versus NNGP+NTK), so fusion is opt-in:
``fused=True`` on a kernel (or :func:`gpytorch_tp.evaluate`).  Where compiling
fails (no C++ compiler on a CPU machine, no Triton on a GPU), a warning says so
and the run's same elementwise functions execute uncompiled.
"""

from __future__ import annotations

import contextlib
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .state import KernelState

__all__ = ["fuses_gradients", "fusing", "fusion_active", "plain_pairs", "run_fused"]

_local = threading.local()


@contextlib.contextmanager
def fusing(enabled: bool = True) -> Iterator[None]:
    """Within this context (in this thread), :class:`Sequential` fuses runs of fusible layers.

    The caller decides when (see :func:`gpytorch_tp.evaluate`): for evaluations
    that autograd records, only where :func:`fuses_gradients`.
    """
    outer = getattr(_local, "enabled", False)
    _local.enabled = bool(enabled)
    try:
        yield
    finally:
        _local.enabled = outer


def fusion_active() -> bool:
    """Whether the enclosing :func:`fusing` context (in this thread) asks for fused runs."""
    return getattr(_local, "enabled", False)


def fuses_gradients(device: torch.device) -> bool:
    """Whether evaluations that autograd records fuse too on ``device`` (with a compiled backward).

    On CUDA every pass of the layer-by-layer backward is a round trip through
    device memory, which the compiled backward saves (not yet measured).  On a
    CPU it made exact-GP training steps no faster (1.2-1.3x on the gradient pass
    alone: its reductions to per-item and per-hyperparameter gradients recompute
    the pair work in a dozen loops; docs/benchmarks.md) and compiles for another
    10-25 s, so CPU gradients keep the layer-by-layer path.
    """
    return device.type == "cuda"


def plain_pairs(state: KernelState) -> bool:
    """Whether ``state`` is a tile that a fused run may take: a full matrix of items without positions or padding."""
    return not state.positions and not state.diagonal and state.valid1 is None and state.valid2 is None


class _FusedRun:
    """One run of layers: the compiled program and, should compiling fail, the same functions uncompiled."""

    def __init__(self, layers: Sequence, track_ntk: bool, self_pairs: bool):
        self.failed = False
        self.uncompiled = _make_program(tuple(layers), track_ntk, self_pairs)
        # torch.compile counts recompilations per code object (8 by default): each
        # run gets its own, so that many architectures in one process all compile.
        self.compiled = _compile(_own_code(self.uncompiled))

    def __call__(self, cross: Tensor, ntk: Tensor | None, args: tuple, variances: tuple) -> tuple:
        if not self.failed:
            try:
                return self.compiled(cross, ntk, args, variances)
            except Exception as error:  # noqa: BLE001 - compilers fail in many ways; the uncompiled path is exact
                self.failed = True
                warnings.warn(
                    f"fused=True: torch.compile failed ({type(error).__name__}: {str(error)[:300]}); "
                    "these layers run uncompiled (same values, no speed-up)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.uncompiled(cross, ntk, args, variances)


def _make_program(layers: tuple, track_ntk: bool, self_pairs: bool) -> Callable:
    def program(cross: Tensor, ntk: Tensor | None, args: tuple, variances: tuple) -> tuple[Tensor, Tensor | None]:
        if self_pairs:
            # Pair (i, i) of a tile on the diagonal of K(X, X); an index comparison, nothing stored.
            n1, n2 = cross.shape[-2], cross.shape[-1]
            is_self_pair = torch.arange(n1, device=cross.device)[:, None] == torch.arange(n2, device=cross.device)
        for layer, layer_args, variance in zip(layers, args, variances):
            cross, ntk = layer.fused_pairs(cross, ntk, layer_args, track_ntk)
            if self_pairs:
                # As KernelState.replace does after every layer: the variance itself, not a recomputation.
                cross = torch.where(is_self_pair, variance, cross)
        return cross, ntk

    return program


def _compile(program: Callable) -> Callable:
    return torch.compile(
        program,
        dynamic=True,
        fullgraph=True,
        # CPU loops use the intra-op threads of each call, not those of the first.
        # No FX graph cache: with it (torch 2.13), fused gradients compiled in a
        # process that had compiled other fused programs came out 34% off
        # (tests/test_fusion.py run in order; alone each test passed).
        options={"cpp.dynamic_threads": True, "fx_graph_cache": False},
    )


def _own_code(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` with a code object of its own (``torch.compile`` keeps its caches on code objects)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# Compiled runs, per owner (a Sequential) and per run of its layers; weak so that
# a discarded kernel takes its compiled programs with it.
_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RUNS_LOCK = threading.Lock()


def run_fused(
    owner: object,
    layers: Sequence,
    cross: Tensor,
    ntk: Tensor | None,
    args: tuple,
    track_ntk: bool,
    self_pair_variances: tuple | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The pair work of ``layers`` in one compiled pass.

    :param args: each layer's tensors from ``fusion_split``.
    :param self_pair_variances: for a tile whose pair ``(i, i)`` is an item
        with itself (``same_inputs``), each layer's output variances ``var1``:
        those pairs get them exactly, as in the layer-by-layer path.
    """
    self_pairs = self_pair_variances is not None
    key = (tuple(id(layer) for layer in layers), track_ntk, self_pairs)
    with _RUNS_LOCK:
        runs = _RUNS.setdefault(owner, {})
        run = runs.get(key)
        if run is None:
            run = runs[key] = _FusedRun(layers, track_ntk, self_pairs)
    return run(cross, ntk, args, self_pair_variances or ((None,) * len(layers)))
