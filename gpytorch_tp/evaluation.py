"""Running an architecture on two batches of inputs: input checks, the input state, tiling."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import fusion
from .fusion import fusing
from .host_memory import ResidentGuard, empty_on_huge_pages, resident_bytes, tune_allocator_if_asked
from .layers.base import Layer
from .state import KernelState, per_item_cache, shared_per_item_work

__all__ = [
    "DEFAULT_CUDA_TILE_PAIRS",
    "DEFAULT_TILE_PAIRS",
    "InputLayout",
    "check_inputs",
    "default_memory_budget",
    "evaluate",
    "input_state",
]


# Pair elements per tile on a CPU (for dense networks: pairs of items).  A
# tile costs about 70 operations of a few microseconds' overhead each for a
# depth-5 MLP, so it must hold enough pairs to make that small, the more so as
# the worker threads share one interpreter lock between those operations;
# smaller tiles keep the intermediates in faster caches.  One float64 tile
# tensor the size of a core's L2 cache was best on both machines measured:
# 2-core AMD EPYC (512 KiB L2): 256 x 256 pairs, 128 x 128 measurably slower,
# 181 x 181 to 320 x 320 about the same, 400 x 400 and more 15% slower;
# 2-core Intel Xeon (2 MiB L2, 260 MiB L3): 512 x 512 and 600 x 600 10% faster
# than 256 x 256 for the MLP, and the Flatten CNN on 8 x 8 images (N = 200)
# 1.5x faster with 4096 image pairs per tile than with 1024.  Items with
# positions (pixels) count their position pairs, so a tile then holds fewer
# pairs of items.
def _cpu_tile_pairs() -> int:
    numbers = 256 * 256
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                numbers = int(size.rstrip("KM")) * scale // 8
                break
    except (OSError, ValueError):
        pass
    return min(max(numbers, 256 * 256), 1024 * 1024)


DEFAULT_TILE_PAIRS = _cpu_tile_pairs()
# On a GPU the per-operation launch cost dominates small tiles; a tile of this
# many pair elements holds the whole matrix of a few thousand points, and its
# dozen float64 intermediates take about 1.3 GiB.
DEFAULT_CUDA_TILE_PAIRS = 4096 * 4096
# Fused (compiled) pair work keeps no tile-sized intermediates and runs its tiles
# one after the other, each spread over the cores: larger CPU tiles pay for fewer
# calls (depth-5 ReLU NNGP+NTK, K(X, Z) with N = 4000, float32, 2-core Xeon:
# about 0.17 s with these, 0.2-0.5 s with 512 x 512 tiles, 0.29 s layer by layer).
FUSED_CPU_TILE_PAIRS = 1024 * 1024
# Tile-sized tensors alive at once while a tile goes through an architecture
# (the NNGP, the NTK, a layer's intermediates), for the memory budget.
# Measured: 6 (MLP, Flatten CNN) to 9 (pooled CNN with all pixel pairs) tile-sized
# tensors at the peak of one tile, outputs included; 24 leaves room for other layers.
_LIVE_TILE_TENSORS = 24
# A budget-forced tile this many times smaller than the efficient one warns:
# each tile pays about 0.25 ms of per-operation overhead (depth-3 MLP NTK,
# float64, one thread: 75 ns per pair in tiles of 65,536 pairs, 140 ns in
# tiles of 4,096, 325 ns in 1,024, 1,260 ns in 256, 55,000 ns in 4).
_SLOW_TILE_FACTOR = 64
_MIN_TILE_PAIRS = 4
_MIN_TILE_SIDE = 64
# Up to this many channels, aligned input covariances are summed channel by channel.
_FEW_CHANNELS = 16


def default_memory_budget(device: torch.device) -> int:
    """Bytes an evaluation may use by default: a quarter of the device's free memory.

    On a CPU, "free" is the smaller of the system's available memory and what
    the process's control groups (its own and every enclosing one, as
    ``/proc/self/cgroup`` names them) still allow.  A quarter, not more: the
    outputs come on top of the budget, and the process holds other data.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 4)
    available = [_meminfo_available(), _cgroup_available()]
    known = [a for a in available if a is not None]
    return min(known) // 4 if known else 2 * 2**30


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(proc_cgroup: Path, mount: Path, version: int) -> list[Path]:
    """The process's own cgroup directory under ``mount`` and each enclosing one, up to the mount root."""
    own = None
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if (version == 2 and parts[0] == "0" and parts[1] == "") or (version == 1 and "memory" in parts[1].split(",")):
            own = parts[2]
            break
    dirs = []
    if own is not None:
        path = mount / own.strip("/") if own.strip("/") else mount
        # Without a cgroup namespace the path is the host's; it may not exist under this mount.
        if path.is_dir():
            while path != mount and mount in path.parents:
                dirs.append(path)
                path = path.parent
    dirs.append(mount)
    return dirs


def _cgroup_available(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Memory left under the tightest cgroup v2 (or v1) limit of this process and its ancestors, if any."""
    root_path = Path(root)
    best = None
    for version, mount, limit_name, usage_name in (
        (2, root_path, "memory.max", "memory.current"),
        (1, root_path / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ):
        found = False
        for directory in _cgroup_dirs(Path(proc_cgroup), mount, version):
            limit, usage = _read(directory / limit_name), _read(directory / usage_name)
            if limit is None or usage is None:
                continue
            found = True
            try:
                if limit == "max" or int(limit) >= 2**60:
                    continue
                left = max(int(limit) - int(usage), 0)
            except ValueError:
                continue
            best = left if best is None else min(best, left)
        if found:
            break  # one hierarchy: v2 where it has memory files, else v1
    return best


@dataclass(frozen=True)
class InputLayout:
    r"""How an item's features are laid out in the last input dimension.

    ``shape == (d,)``: ``d`` features.  ``shape == (C, *grid)``: ``C`` channels
    at each position of a grid (``(C, L)`` signals, ``(C, H, W)`` images),
    flattened channel-major as ``torch.flatten`` does.  The input kernel is
    :math:`K(p, p') = \sum_c x_c(p) x'_c(p') / C` per pair of positions.

    Sequences (``sequence=True``) come as ``(T, d)``, time-major as
    ``torch.flatten`` of a ``(T, d)`` batch-first sequence gives them, and
    :meth:`prepare` turns them into the channel-major layout ``(d, T)``.
    Shorter sequences are padded at the end with whole steps of
    ``padding_value`` (NaN by default; a finite sentinel such as ``-1e6``
    keeps the inputs finite, which GPyTorch's ``ExactGP`` training checks in
    debug mode need); the steps are moved so that every sequence ends at
    position ``T - 1`` and the state records which positions hold steps (see
    :class:`~gpytorch_tp.state.KernelState`), so padding never changes a value.
    """

    shape: tuple[int, ...]
    all_position_pairs: bool = False
    sequence: bool = False
    padding_value: float = float("nan")

    def prepare(self, x: Tensor, name: str) -> tuple[Tensor, Tensor | None]:
        """Inputs in the channel-major layout and, for sequences, each item's valid steps ``(..., N, T)``."""
        if not self.sequence:
            return x, None
        steps, d = self.shape[1], self.shape[0]
        x = x.reshape(*x.shape[:-1], steps, d)
        nan_padding = math.isnan(self.padding_value)
        pad_name = "NaN" if nan_padding else f"padding value {self.padding_value:g}"
        missing = torch.isnan(x) if nan_padding else x == self.padding_value
        padded = missing.all(-1)
        if bool((missing.any(-1) & ~padded).any()):
            raise ValueError(
                f"{name} has {pad_name} in some but not all features of a step; it marks whole padding steps"
            )
        if bool((padded[..., :-1] & ~padded[..., 1:]).any()):
            raise ValueError(f"{name} has a {pad_name} padding step before a real step; pad sequences at the end only")
        lengths = steps - padded.sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError(f"{name} holds an empty sequence (every step is {pad_name} padding)")
        if not bool(torch.isfinite(x[~padded]).all()):
            raise ValueError(f"{name} contains NaN or infinite values in its steps")
        # Move each sequence to the end: position t holds step t - (T - length).
        t = torch.arange(steps, device=x.device)
        source = (t - (steps - lengths).unsqueeze(-1)) % steps
        x = torch.gather(torch.where(padded.unsqueeze(-1), 0.0, x), -2, source.unsqueeze(-1).expand(x.shape))
        valid = t >= (steps - lengths).unsqueeze(-1)
        x = x * valid.unsqueeze(-1)
        return x.transpose(-1, -2).reshape(*x.shape[:-2], steps * d), valid.to(x.dtype)

    @property
    def positions(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def pair_ndim(self) -> int:
        return len(self.positions) * (2 if self.all_position_pairs else 1)

    @property
    def pair_elements(self) -> int:
        """Numbers stored per pair of items."""
        return math.prod(self.positions) ** (2 if self.all_position_pairs else 1)

    def _grid(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:-1], self.shape[0], math.prod(self.positions))

    def _unflatten(self, t: Tensor, lead: int) -> Tensor:
        grids = (self.positions * 2) if self.all_position_pairs else self.positions
        return t.reshape(*t.shape[:lead], *grids)

    def variances(self, x: Tensor) -> Tensor:
        """Each item with itself: ``(..., N, *pair_axes)``."""
        if not self.positions:
            return x.pow(2).sum(-1) / self.shape[0]
        g = self._grid(x)
        if self.all_position_pairs:
            v = torch.einsum("...ncp,...ncq->...npq", g, g).div_(self.shape[0])  # in place: no second copy
        else:
            v = g.pow(2).sum(-2) / self.shape[0]
        return self._unflatten(v, x.dim() - 1)

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        """Every item of ``x1`` with every item of ``x2``: ``(..., N1, N2, *pair_axes)``."""
        if not self.positions:
            return x1 @ x2.transpose(-1, -2) / self.shape[0]
        g1, g2 = self._grid(x1), self._grid(x2)
        if not self.all_position_pairs and self.shape[0] <= _FEW_CHANNELS:
            # A few broadcast products beat einsum's batched matrix product of C-wide matrices.
            a, b = g1.unsqueeze(-3), g2.unsqueeze(-4)
            c = a[..., 0, :] * b[..., 0, :]
            for channel in range(1, self.shape[0]):
                c.addcmul_(a[..., channel, :], b[..., channel, :])
            return self._unflatten(c.div_(self.shape[0]), x1.dim())
        pattern = "...icp,...jcq->...ijpq" if self.all_position_pairs else "...icp,...jcp->...ijp"
        c = torch.einsum(pattern, g1, g2).contiguous().div_(self.shape[0])
        return self._unflatten(c, x1.dim())

    def cross_diagonal(self, x1: Tensor, x2: Tensor) -> Tensor:
        """Item ``i`` of ``x1`` with item ``i`` of ``x2``: ``(..., N, *pair_axes)``."""
        if not self.positions:
            return (x1 * x2).sum(-1) / self.shape[0]
        g1, g2 = self._grid(x1), self._grid(x2)
        if self.all_position_pairs:
            c = torch.einsum("...ncp,...ncq->...npq", g1, g2).div_(self.shape[0])
        else:
            c = (g1 * g2).sum(-2) / self.shape[0]
        return self._unflatten(c, x1.dim() - 1)

    def outer(self, var1: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
        """Per-item variances (from :meth:`variances`) shaped for the ``outer`` pairing."""
        return var1.unsqueeze(-1 - self.pair_ndim), var2.unsqueeze(-2 - self.pair_ndim)

    def validity(self, valid1: Tensor | None, valid2: Tensor | None, diagonal: bool) -> tuple:
        """Per-item valid positions ``(..., N, T)`` shaped like :meth:`KernelState.position_variances`."""
        if valid1 is None:
            return None, None
        if not diagonal:
            valid1, valid2 = valid1.unsqueeze(-2), valid2.unsqueeze(-3)
        if self.all_position_pairs:
            valid1, valid2 = valid1.unsqueeze(-1), valid2.unsqueeze(-2)
        return valid1, valid2

    def state(
        self,
        var1: Tensor,
        var2: Tensor,
        cross: Tensor,
        valid: tuple[Tensor | None, Tensor | None] = (None, None),
        **flags: bool,
    ) -> KernelState:
        """The input state from the variances (shaped for the pairing) and the pairs' ``cross``."""
        return KernelState(
            cross=cross,
            var1=var1,
            var2=var2,
            positions=self.positions,
            all_position_pairs=self.all_position_pairs and bool(self.positions),
            valid1=valid[0],
            valid2=valid[1],
            **flags,
        )


def input_layout(
    architecture: Layer,
    input_shape: tuple[int, ...] | None,
    d: int,
    sequence: bool = False,
    padding_value: float = float("nan"),
) -> InputLayout:
    """The layout of ``d`` input features, with all position pairs if the architecture needs them.

    With ``sequence``, ``input_shape`` is ``(T, d)`` (time-major, NaN-padded; see :class:`InputLayout`).
    """
    if sequence and (input_shape is None or len(tuple(input_shape)) != 2):
        raise ValueError(f"sequence inputs need input_shape=(T, d), got {input_shape}")
    if input_shape is None:
        return InputLayout((d,))
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, e.g. (C, H, W), got {tuple(input_shape)}")
    if math.prod(shape) != d:
        raise ValueError(
            f"the inputs have {d} features per item, but input_shape={shape} needs {math.prod(shape)} "
            "(items are flattened in the last dimension)"
        )
    if sequence:
        shape = (shape[1], shape[0])  # channel-major inside: (d, T)
    return InputLayout(
        shape,
        all_position_pairs=len(shape) > 1 and architecture.needs_all_position_pairs,
        sequence=sequence,
        padding_value=float(padding_value),
    )


def check_inputs(x1: Tensor, x2: Tensor | None, input_dim: int | None = None, allow_nan: bool = False) -> None:
    """Raise a clear error for inputs no kernel can use (``allow_nan``: NaN padding is checked later)."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (float32 or float64), got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape (..., n, d), got {tuple(x.shape)}")
        if input_dim is not None and x.shape[-1] != input_dim:
            raise ValueError(f"{name} has {x.shape[-1]} features but the kernel expects {input_dim}")
        if not allow_nan and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    if x2 is not None:
        if x1.shape[-1] != x2.shape[-1]:
            raise ValueError(f"x1 has {x1.shape[-1]} features but x2 has {x2.shape[-1]}")
        if x1.dtype != x2.dtype:
            raise TypeError(f"x1 is {x1.dtype} but x2 is {x2.dtype}")
        if x1.device != x2.device:
            raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}")


def input_state(
    x1: Tensor,
    x2: Tensor,
    *,
    diagonal: bool,
    same_inputs: bool,
    track_ntk: bool,
    layout: InputLayout | None = None,
    valid: tuple[Tensor | None, Tensor | None] = (None, None),
) -> KernelState:
    r"""The state of the network input: :math:`K(x, x') = \langle x, x' \rangle / d` (per position pair), no NTK yet."""
    layout = layout or InputLayout((x1.shape[-1],))
    var1 = layout.variances(x1)
    var2 = var1 if same_inputs else layout.variances(x2)
    if diagonal:
        cross = var1 if same_inputs else layout.cross_diagonal(x1, x2)
        var1, var2 = torch.broadcast_tensors(var1, var2)
    else:
        cross = layout.cross(x1, x2)
        var1, var2 = layout.outer(var1, var2)
    state = layout.state(
        var1,
        var2,
        cross,
        valid=layout.validity(*valid, diagonal),
        track_ntk=track_ntk,
        diagonal=diagonal,
        same_inputs=same_inputs,
    )
    return state.replace(cross=cross) if same_inputs else state


def _run(architecture: Layer, state: KernelState) -> tuple[Tensor, Tensor | None]:
    out = architecture(state)
    if out.pair_ndim:
        raise ValueError(
            f"the architecture ends with features on a grid of positions {out.positions}; end it with a readout "
            "(Flatten or GlobalAvgPool for images, LastStep or TimeMean for sequences) and a Linear layer"
        )
    cross, ntk = out.cross, None
    if out.track_ntk:
        ntk = out.ntk if out.ntk is not None else torch.zeros_like(out.cross)
    if state.same_inputs and not state.diagonal:
        # Round-off differs between (i, j) and (j, i); make K(X, X) exactly symmetric.
        cross = (cross + cross.transpose(-1, -2)) / 2
        ntk = None if ntk is None else (ntk + ntk.transpose(-1, -2)) / 2
    return cross, ntk


def _same_inputs(x1: Tensor, x2: Tensor | None) -> bool:
    if x2 is None or x2 is x1:
        return True
    if x1.shape != x2.shape or x1.requires_grad or x2.requires_grad:
        # With gradients, mirroring tiles would route x2's gradient to x1.
        return False
    return bool(torch.equal(x1, x2))


def evaluate(
    architecture: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    diag: bool = False,
    ntk: bool = False,
    tile_pairs: int | None = None,
    input_dim: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    memory_budget: int | None = None,
    progress: bool | None = None,
    sequence: bool = False,
    padding_value: float = float("nan"),
    fused: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """NNGP kernel (and NTK when ``ntk``) of ``architecture`` between ``x1`` and ``x2``.

    :param x1: inputs of shape ``(..., N1, d)``.
    :param x2: inputs of shape ``(..., N2, d)``; ``None`` means ``x1``.
    :param diag: return only the diagonal ``K(x1_i, x2_i)`` (needs ``N1 == N2``).
    :param ntk: also return the NTK (otherwise the second output is ``None``).
    :param tile_pairs: the full matrix is computed in tiles of about this many
        pairs of items; with ``x2`` equal to ``x1`` only tiles on or above the
        diagonal are computed and the others mirrored.  ``None`` (default)
        picks by device and by the numbers stored per pair (position pairs
        of images count): :data:`DEFAULT_TILE_PAIRS` pair elements on a CPU,
        :data:`DEFAULT_CUDA_TILE_PAIRS` on a GPU, fewer if ``memory_budget``
        requires.  On a CPU the tiles are shared out to
        ``torch.get_num_threads()`` worker threads, each running whole tiles
        with one intra-op thread (``torch.set_num_threads(1)`` makes the
        evaluation single-threaded).
    :param input_dim: expected number of features, checked when given.
    :param input_shape: the layout of each item's features: ``(C, H, W)``
        images or ``(C, L)`` signals flattened channel-major in the last
        dimension (``None``: plain features).
    :param memory_budget: bytes the evaluation may take besides its outputs:
        per-item input variances, tiles and the per-item work shared between
        them (``None``: a quarter of the free memory of the device, see
        :func:`default_memory_budget`).  Without autograd recording the
        evaluation stays within it (plus the outputs); with autograd, every
        tile's intermediates are kept for the backward pass.  A budget below
        one tile of one pair of items raises ``ValueError``; one that forces
        tiles far below their efficient size warns
        (:class:`MemoryBudgetWarning`).
    :param progress: show a ``tqdm`` progress bar over tiles: ``None``
        (default) shows one only on an interactive terminal and only for
        evaluations that last more than two seconds.
    :param sequence: the items are sequences, ``input_shape=(T, d)``, time-major,
        shorter ones padded at the end with whole steps of ``padding_value`` (see :class:`InputLayout`).
    :param padding_value: the value of padding steps of sequences (default NaN).
    :param fused: compile each run of layers with elementwise pair work (dense
        layers, ReLU-type and erf nonlinearities) into one pass over the pairs
        with ``torch.compile``, for items of plain features (not
        ``input_shape`` grids or sequences), for evaluations that autograd does
        not record and, on CUDA, also for those it does (a compiled backward;
        see :mod:`gpytorch_tp.fusion`; the first evaluation of a process pays
        the compilation, seconds).
    :return: ``(nngp, ntk)``, each ``(..., N1, N2)`` (or ``(..., N)`` with ``diag``).
    """
    check_inputs(x1, x2, input_dim, allow_nan=sequence and math.isnan(padding_value))
    layout = input_layout(architecture, input_shape, x1.shape[-1], sequence, padding_value)
    budget_name = "memory_budget"
    if memory_budget is None:
        memory_budget = default_memory_budget(x1.device)
        budget_name = "the default memory_budget (a quarter of the free memory), memory_budget"
    elif memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    n1 = x1.shape[-2]
    n2 = n1 if x2 is None or x2 is x1 else x2.shape[-2]
    plan = _TilePlan.make(
        layout,
        x1,
        tile_pairs,
        memory_budget,
        progress,
        getattr(architecture, "acts_on_position_blocks", False),
        # Items on a grid (images, sequences) spend their time in layers without an elementwise form
        # (convolutions, pooling, recurrences), which run best on worker threads: those stay unfused.
        fused=bool(fused)
        and not layout.positions
        and (fusion.fuses_gradients(x1.device) or not _records_grad(architecture, x1, *(() if x2 is None else (x2,)))),
        items=n1 + (0 if x2 is None or x2 is x1 else n2),
        pairs=n1 if diag else n1 * n2,
        batch=_batch_size(architecture, x1, x2),
        budget_name=budget_name,
    )
    with shared_per_item_work(limit_bytes=plan.cache_bytes):
        return _evaluate(architecture, x1, x2, diag, ntk, plan)


def _batch_size(architecture: Layer, x1: Tensor, x2: Tensor | None) -> int:
    """Entries of the batch shape that every tile carries (the inputs' and the hyperparameters')."""
    shapes = [x1.shape[:-2]] + ([] if x2 is None else [x2.shape[:-2]])
    try:
        size = math.prod(torch.broadcast_shapes(*shapes, *(p.shape for p in architecture.parameters())))
    except RuntimeError:  # parameters that are not batch-shaped
        size = math.prod(torch.broadcast_shapes(*shapes))
    return max(1, size)  # an empty batch plans like one entry: nothing is evaluated


class MemoryBudgetWarning(UserWarning):
    """The memory budget forces tiles far below their efficient size: the evaluation runs several times slower."""


@dataclass(frozen=True)
class _TilePlan:
    """How an evaluation is cut up and run: input layout, pairs of items per tile, progress bar, fusion, memory.

    The memory budget ``B`` is spent as follows (CPU and GPU alike, without
    autograd recording): the per-item input variances of all items and the
    prepared inputs (``fixed``) first; of the rest, ``W = B - fixed``, half goes
    to the tiles in flight (``_LIVE_TILE_TENSORS`` tile-sized tensors per
    worker thread), a quarter to the per-item work shared between tiles
    (``cache_bytes``) and a quarter is left to the allocator's fragmentation:
    on a CPU, :class:`~gpytorch_tp.host_memory.ResidentGuard` hands free pages
    back whenever resident memory comes within 15% of the budget
    (``guard_bytes``).
    """

    layout: InputLayout
    tile_pairs: int
    progress: bool | None
    fused: bool = False
    workers: int = 1
    cache_bytes: float = float("inf")
    guard_bytes: float = float("inf")
    guard_step: float = float("inf")
    # The process's resident memory when the evaluation began (CPU; None where unknown).
    resident_at_start: int | None = None

    @classmethod
    def make(
        cls,
        layout: InputLayout,
        x: Tensor,
        tile_pairs: int | None,
        budget: int,
        progress: bool | None,
        position_blocks: bool = False,
        fused: bool = False,
        *,
        items: int = 0,
        pairs: int = 0,
        batch: int = 1,
        budget_name: str = "memory_budget",
    ):
        element = x.element_size()
        # One tile-sized tensor, per pair of items; the inputs' per-item work, for all items.
        per_pair = batch * layout.pair_elements * element
        fixed = batch * items * (layout.pair_elements + 2 * x.shape[-1]) * element
        one_pair_tile = _LIVE_TILE_TENSORS * per_pair
        minimum = fixed + 2 * one_pair_tile
        if budget < minimum:
            raise ValueError(
                f"{budget_name}={int(budget)} bytes is too small for this evaluation: it needs at least "
                f"{int(minimum)} bytes ({int(fixed)} for the inputs' per-item variances, and twice "
                f"{int(one_pair_tile)} for a tile of a single pair of items: {_LIVE_TILE_TENSORS} tensors of "
                f"{per_pair} bytes); give a larger memory_budget"
            )
        working = budget - fixed
        # Fewer worker threads rather than tiles below one pair each.
        workers = min(_tile_workers(2**30, x.device), max(1, int(working / 2 / one_pair_tile)))
        budget_pairs = max(1, int(working / 2 / workers / one_pair_tile))
        if tile_pairs is None:
            if x.device.type == "cuda":
                target = DEFAULT_CUDA_TILE_PAIRS
            else:
                target = FUSED_CPU_TILE_PAIRS if fused else DEFAULT_TILE_PAIRS
            # Items with all pixel pairs hold many numbers per pair: a tile of
            # about DEFAULT_TILE_PAIRS numbers stays in cache and is fastest even
            # when it holds only 2 x 2 items (16 x 16 images, 3 convolutions and
            # global pooling, NNGP+NTK: 4.7 ms per pair in tiles of 4 pairs,
            # 13 ms in tiles of 64; 8 x 8 images: 0.40 ms in tiles of 16, 0.51 ms
            # in tiles of 64, 1.0 ms in tiles of 4).  The per-item work is
            # reused across tiles (see _in_column_panels).
            # A recurrent recursion works on one step (of T) at a time, so
            # sequences count the numbers of one step per pair, unless a layer
            # works on whole blocks of step pairs (attention).
            stepwise = layout.sequence and not position_blocks
            per_operation = layout.pair_elements // (layout.positions[0] if stepwise else 1)
            efficient = max(_MIN_TILE_PAIRS, target // max(1, per_operation))
            tile_pairs = min(efficient, budget_pairs)
            wanted = min(efficient, max(pairs, 1))
            if tile_pairs * _SLOW_TILE_FACTOR < wanted:
                enough = fixed + 2 * workers * wanted * one_pair_tile
                warnings.warn(
                    f"{budget_name}={int(budget)} bytes limits tiles to {tile_pairs} pairs of items where "
                    f"{wanted} would be efficient: every tile pays a fixed overhead, so this evaluation runs "
                    f"several times slower (tens of times for tiles of a few pairs); about {int(enough)} bytes "
                    "allow efficient tiles",
                    MemoryBudgetWarning,
                    stacklevel=4,
                )
        elif int(tile_pairs) < 1:
            raise ValueError(f"tile_pairs must be positive, got {tile_pairs}")
        return cls(
            layout,
            int(tile_pairs),
            progress,
            fused,
            workers=workers,
            cache_bytes=working / 4,
            # Free pages are handed back only near the budget (trims cost ~25 ms each; measured on a
            # pooled CNN: 3-8 trims per evaluation at 0.85, hundreds at 0.5); while live data sits
            # above that, again after each sixteenth of the working memory of growth.
            guard_bytes=fixed + 0.85 * working,
            guard_step=working / 16,
            resident_at_start=resident_bytes() if x.device.type == "cpu" else None,
        )


def _evaluate(architecture: Layer, x1: Tensor, x2: Tensor | None, diag: bool, ntk: bool, plan: _TilePlan):
    layout = plan.layout
    if x2 is None or x2 is x1:
        x1, valid1 = layout.prepare(x1, "x1")
        x2, valid2, same = x1, valid1, True
    else:
        (x1, valid1), (x2, valid2) = layout.prepare(x1, "x1"), layout.prepare(x2, "x2")
        same = _same_inputs(x1, x2) and (valid1 is None or torch.equal(valid1, valid2))
    if diag:
        if x1.shape[-2] != x2.shape[-2]:
            raise ValueError(f"diag=True needs as many x1 as x2 points, got {x1.shape[-2]} and {x2.shape[-2]}")
        n = x1.shape[-2]
        chunk = max(1, plan.tile_pairs)
        outputs = []
        with _intra_op_threads(1 if n < _SMALL_PAIRS and x1.device.type == "cpu" else None):
            # At least one (possibly empty) chunk: 0 points give an empty result of the right shape and dtype.
            for start in range(0, max(n, 1), chunk):
                rows = slice(start, start + chunk)
                state = input_state(
                    x1[..., rows, :],
                    x2[..., rows, :],
                    diagonal=True,
                    same_inputs=same,
                    track_ntk=ntk,
                    layout=layout,
                    valid=(None, None) if valid1 is None else (valid1[..., rows, :], valid2[..., rows, :]),
                )
                outputs.append(_run(architecture, state))
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat([o[0] for o in outputs], -1), (torch.cat([o[1] for o in outputs], -1) if ntk else None)

    n1, n2 = x1.shape[-2], x2.shape[-2]
    if n1 * n2 <= plan.tile_pairs:
        small = n1 * n2 * layout.pair_elements < _SMALL_PAIRS and x1.device.type == "cpu"
        # A compiled (fused) program is specialised to the thread count it first ran with; keep it unchanged.
        with _intra_op_threads(1 if small and not plan.fused else None):
            state = input_state(
                x1, x2, diagonal=False, same_inputs=same, track_ntk=ntk, layout=layout, valid=(valid1, valid2)
            )
            with fusing(plan.fused):
                return _run(architecture, state)
    return _evaluate_tiles(architecture, x1, x2, same, ntk, plan, valid1, valid2)


# Below this many pair elements an evaluation in one piece runs with one
# intra-op thread: splitting each of its small operations over the cores gains
# little and stalls for milliseconds whenever another process holds a core.
_SMALL_PAIRS = 2 * 256 * 256


def _records_grad(architecture: Layer, *inputs: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(x.requires_grad for x in inputs) or any(p.requires_grad for p in architecture.parameters())


def _evaluate_tiles(
    architecture: Layer,
    x1: Tensor,
    x2: Tensor,
    same: bool,
    ntk: bool,
    plan: _TilePlan,
    valid1: Tensor | None = None,
    valid2: Tensor | None = None,
):
    """The full matrix in tiles; with ``same``, tiles below the diagonal are mirrored."""
    n1, n2 = x1.shape[-2], x2.shape[-2]
    layout = plan.layout
    # Square tiles where possible, of equal lengths along each axis (no thin leftover row of tiles).
    side = max(1, int(plan.tile_pairs**0.5))
    # At least four rows (columns) of tiles, so that two to four worker threads
    # get balanced work (three tiles of 500 x 500 left one of two threads idle
    # half the time at N = 1000).
    side = min(side, max(_MIN_TILE_SIDE, -(-max(n1, n2) // 4)))
    row_side = _balanced(n1, min(side, n1))
    col_side = _balanced(n2, max(1, min(n2, plan.tile_pairs // row_side)))
    if same:
        row_side = col_side = min(row_side, col_side)
    dense = not layout.positions
    # Work shared by all tiles: the input variances (the same numbers
    # ``input_state`` computes) and, for plain features, the scaled inputs of
    # the cross products.
    var1 = layout.variances(x1)
    var2 = var1 if same else layout.variances(x2)
    x1_scaled = x1 / x1.shape[-1] if dense else None
    row_starts = range(0, n1, row_side)
    col_starts = row_starts if same else range(0, n2, col_side)
    # One tensor object per row (column) of tiles, so that layers share their
    # per-item work between the tiles of a row (see ``state.per_item``).
    pair_ndim = layout.pair_ndim
    item_axis = -1 - pair_ndim
    row_vars = {r: layout.outer(var1.narrow(item_axis, r, min(row_side, n1 - r)), var1)[0] for r in row_starts}
    col_vars = {c: layout.outer(var2, var2.narrow(item_axis, c, min(col_side, n2 - c)))[1] for c in col_starts}
    row_valid = {r: None for r in row_starts}
    col_valid = {c: None for c in col_starts}
    if valid1 is not None:
        row_valid = {r: layout.validity(valid1[..., r : r + row_side, :], valid2, False)[0] for r in row_starts}
        col_valid = {c: layout.validity(valid1, valid2[..., c : c + col_side, :], False)[1] for c in col_starts}

    def tile(r: int, c: int) -> tuple[Tensor, Tensor | None]:
        rows, cols = slice(r, r + row_side), slice(c, c + col_side)
        if dense:
            cross = x1_scaled[..., rows, :] @ x2[..., cols, :].transpose(-1, -2)
        else:
            cross = layout.cross(x1[..., rows, :], x2[..., cols, :])
        state = layout.state(
            row_vars[r],
            col_vars[c],
            cross,
            valid=(row_valid[r], col_valid[c]),
            track_ntk=ntk,
            same_inputs=same and r == c,
        )
        if state.same_inputs:
            state = state.replace(cross=cross)  # the self pairs get the variances exactly
        with fusing(plan.fused):
            return _run(architecture, state)

    tasks = [(r, c) for r in row_starts for c in col_starts if not (same and c < r)]
    record = _records_grad(architecture, x1, x2)
    # The first tile runs in this thread before the others: it fills the caches
    # of hyperparameters and per-item work that all tiles share.  Tiles are small
    # enough that their operations run best on one core each (see _map_tiles).
    # Compiled (fused) pair work is the exception: it holds the interpreter lock
    # while it runs, so its tiles run one after the other, each spread over the
    # cores by the compiled loop itself.
    spread_tiles = x1.device.type == "cpu" and not plan.fused
    workers = min(plan.workers, _tile_workers(len(tasks) - 1, x1.device)) if spread_tiles else 1
    if x1.device.type == "cpu" and len(tasks) > 1:
        tune_allocator_if_asked()  # opt-in: see host_memory
    with _intra_op_threads(1 if spread_tiles else None):
        cache = per_item_cache()
        held_before = 0 if cache is None else cache.held_bytes
        first = tile(*tasks[0])
        if cache is not None:
            per_item_bytes = (cache.held_bytes - held_before) / (row_side + col_side)
            tasks = tasks[:1] + _in_column_panels(tasks[1:], col_side, cache.limit_bytes, per_item_bytes)
        if record:
            tiles = {tasks[0]: first}

            def compute(task: tuple[int, int]) -> None:
                tiles[task] = tile(*task)

            _map_tiles(compute, tasks[1:], workers, grad=True, progress=plan.progress)
        else:
            # No autograd: each tile (and its mirror image) goes straight into the output.
            outputs = [
                None if value is None else empty_on_huge_pages(value, *value.shape[:-2], n1, n2) for value in first
            ]

            def store(r: int, c: int, values: tuple[Tensor, Tensor | None]) -> None:
                for out, value in zip(outputs, values):
                    if out is None:
                        continue
                    out[..., r : r + row_side, c : c + col_side] = value
                    if same and c > r:
                        out[..., c : c + col_side, r : r + row_side] = value.transpose(-1, -2)

            store(*tasks[0], first)
            # The outputs are filled page by page: their bytes count on top of the budget's live bound.
            output_bytes = sum(0 if out is None else out.numel() * out.element_size() for out in outputs)
            guard = _resident_guard(x1.device, plan.resident_at_start, plan.guard_bytes + output_bytes, plan.guard_step)

            def store_tile(task: tuple[int, int]) -> None:
                store(*task, tile(*task))
                guard.check()

            _map_tiles(store_tile, tasks[1:], workers, grad=False, progress=plan.progress)
            return outputs[0], outputs[1]

    # Autograd: build the matrix out of the tiles' graphs (mirrored tiles are views).
    def block(r: int, c: int, which: int) -> Tensor:
        return tiles[(c, r)][which].transpose(-1, -2) if same and c < r else tiles[(r, c)][which]

    def assemble(which: int) -> Tensor:
        return torch.cat([torch.cat([block(r, c, which) for c in col_starts], -1) for r in row_starts], -2)

    return assemble(0), (assemble(1) if ntk else None)


class _NoGuard:
    def check(self) -> None:
        pass


def _resident_guard(
    device: torch.device, start: int | None, allowance: float, step: float
) -> ResidentGuard | _NoGuard:
    """A guard on this process's resident memory for a CPU evaluation (GPU memory is the caching allocator's)."""
    if device.type != "cpu" or start is None or not math.isfinite(allowance):
        return _NoGuard()
    return ResidentGuard(start + allowance, step)


def _in_column_panels(
    tasks: list[tuple[int, int]], col_side: int, limit_bytes: float, per_item_bytes: float
) -> list[tuple[int, int]]:
    """Tiles ordered by panels of columns whose per-item work fits in half the per-item cache.

    Row by row, every tile row needs the per-item work of every column; when all
    columns' work outgrows the cache (all pixel pairs of many images), it would be
    emptied and recomputed for each row of tiles.  Within a panel it is computed
    once and reused by all rows.
    """
    if per_item_bytes <= 0 or not math.isfinite(limit_bytes):
        return tasks
    panel = max(col_side, int(limit_bytes / 2 / per_item_bytes) // col_side * col_side)
    return sorted(tasks, key=lambda task: (task[1] // panel, task[0], task[1]))


def _balanced(n: int, side: int) -> int:
    """The tile length that cuts ``n`` items into as many tiles as ``side`` would, all of about equal length."""
    return -(-n // -(-n // side))


def _tile_workers(num_tiles: int, device: torch.device) -> int:
    """Threads that compute tiles: on a CPU, the intra-op thread budget ``torch.get_num_threads()``."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), num_tiles))


@contextlib.contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads in this thread (``None``: unchanged)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _map_tiles(work, tasks: list, workers: int, *, grad: bool, progress: bool | None = False) -> None:
    """Run ``work(task)`` for every task on ``workers`` threads (autograd recording if ``grad``).

    PyTorch releases the GIL inside its operations, so a few Python threads,
    each running whole tiles with one intra-op thread, keep the cores busy with
    no synchronisation between the cores inside an operation.  (Parallelising
    each of the hundred or so small operations of a tile instead costs a
    fork/join per operation and stalls badly whenever another process holds
    one of the cores.)  The number of workers is the intra-op budget the user
    gave PyTorch (``torch.get_num_threads()``), spent on tiles instead of on
    operations; ``torch.set_num_threads(1)`` turns the workers off.
    """
    pool = None if workers <= 1 or getattr(_worker_state, "is_worker", False) else _worker_pool(workers)
    with _progress_bar(len(tasks) + 1, progress) as bar:
        bar.update(1)  # the first tile, computed before
        if pool is None:  # sequential, also when called from inside a worker
            for task in tasks:
                work(task)
                bar.update(1)
            return
        _map_tiles_on(pool, work, tasks, grad, bar)


def _map_tiles_on(pool, work, tasks: list, grad: bool, bar) -> None:
    # Autograd modes and the evaluation's caches are thread-local: hand the caller's to the workers.
    inference = torch.is_inference_mode_enabled()
    items = per_item_cache()

    def run(task) -> None:
        with (
            shared_per_item_work(items),
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
        ):
            work(task)
        bar.update(1)

    for _ in pool.map(run, tasks):
        pass


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def _progress_bar(total: int, progress: bool | None):
    """A ``tqdm`` bar over tiles: always (``True``), never (``False``), or on a terminal after 2 s (``None``)."""
    if progress is False or total <= 1:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    # Asked for explicitly: shown at once; by default only on a terminal and after 2 s.
    delay = 2.0 if progress is None else 0.0
    bar = tqdm(total=total, unit="tile", desc="kernel tiles", disable=None if progress is None else False, delay=delay)
    try:
        yield bar
    finally:
        bar.close()


# The worker threads live as long as the process (or until the number of
# workers changes): the memory their allocator arenas keep between
# evaluations spares the page faults of fresh memory for every tile.
_worker_pool_lock = threading.Lock()
_worker_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_worker_state = threading.local()


def _start_worker() -> None:
    _worker_state.is_worker = True
    # PyTorch's OpenMP setting is per thread; the process-wide default that
    # this call also records is restored by the caller (``_intra_op_threads``).
    torch.set_num_threads(1)


def _worker_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    with _worker_pool_lock:
        pool = _worker_pools.get(workers)
        if pool is None:
            for old in _worker_pools.values():
                old.shutdown(wait=False)
            _worker_pools.clear()
            pool = _worker_pools[workers] = concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix="gpytorch_tp_tiles", initializer=_start_worker
            )
        return pool


def _forget_worker_pools() -> None:
    # Threads do not survive fork(); a child process starts its own pool.
    global _worker_pool_lock
    _worker_pool_lock = threading.Lock()
    _worker_pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_pools)
