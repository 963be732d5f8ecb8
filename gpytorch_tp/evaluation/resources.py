"""What the machine offers an evaluation: free memory (system and control groups), cache sizes, a guard on
resident memory."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .host_memory import ResidentGuard

__all__ = ["cgroup_available", "cpu_tile_pairs", "default_memory_budget", "meminfo_available", "resident_guard"]


def cpu_tile_pairs() -> int:
    """Pair elements per CPU tile: one float64 tensor the size of a core's L2 cache.

    A tile pays a fixed per-operation overhead, so it must hold enough pairs;
    smaller tiles keep their intermediates in faster caches.  The L2 size was
    best on both machines measured (docs/benchmarks.md, "Tile sizes").
    """
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
    available = [meminfo_available(), cgroup_available()]
    known = [a for a in available if a is not None]
    return min(known) // 4 if known else 2 * 2**30


def meminfo_available() -> int | None:
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


def cgroup_available(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
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


class NoGuard:
    """No guard (GPU memory, or resident memory unknown)."""

    def check(self) -> None:
        pass


def resident_guard(
    device: torch.device, start: int | None, allowance: float, step: float
) -> ResidentGuard | NoGuard:
    """A guard on this process's resident memory for a CPU evaluation (GPU memory is the caching allocator's)."""
    if device.type != "cpu" or start is None or not math.isfinite(allowance):
        return NoGuard()
    return ResidentGuard(start + allowance, step)
