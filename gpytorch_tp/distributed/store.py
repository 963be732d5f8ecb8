"""The on-disk kernel matrix: one ``.npy`` file per kind, a JSON manifest, per-rank logs of finished tiles.

A store is a directory::

    manifest.json       what the matrix is: kinds, shape, dtype, tile size, checksums, completion
    nngp.npy, ntk.npy   one array per kind, shape ``batch_shape + (n1, n2)``, C order
    progress/rank-R.jsonl
                        one JSON line per finished tile, appended by the rank that computed it

Why memory-mapped ``.npy`` files and not a chunked format (zarr, HDF5): the
tiles of a kernel matrix are a fixed grid of dense blocks that never change
once written, which needs no chunk index, compression or new dependency; an
``.npy`` file is a header and the raw array, so any rank can write a tile with
``os.pwrite`` at computed offsets without locks (tiles never overlap), and any
later process opens the whole matrix lazily with ``numpy.load(mmap_mode="r")``
(or :func:`open_kernel_matrix`), pages read from disk as they are touched, in
NumPy, PyTorch or anything else that reads ``.npy``.

Tiles of ``K(X, X)`` are computed for the upper triangle only and written twice,
as the tile and, below the diagonal, as its transpose, so the files hold the
whole symmetric matrix and a reader needs no logic (block rows and block columns
read alike).

A tile counts as done only when its line is in a rank's log, and the line is
written (and, with ``sync``, flushed to the disk) after the tile's data is: a
job killed at any moment leaves every logged tile complete, and a restart
recomputes the others.
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .agreement import PART_NAMES, tensor_checksum
from .tiles import Tile, TileGrid

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IncompleteKernelMatrixError",
    "KernelMatrix",
    "KernelStore",
    "StoreMismatchError",
    "open_kernel_matrix",
]

FORMAT = "gpytorch_tp.kernel_matrix"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress"

# The manifest fields that say which matrix a store holds; a store is reused only if they all match.
IDENTITY = ("format", "version", "kinds", "shape", "dtype", "symmetric", "tile_size", "checksums")


class StoreMismatchError(ValueError):
    """A store already exists at the path for a different matrix (other inputs, hyperparameters, tile size ...)."""


class IncompleteKernelMatrixError(RuntimeError):
    """The store's matrix has tiles that were never computed (a job stopped before the end)."""


def _write_json_atomically(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


def _describe_difference(key: str, stored, wanted) -> str:
    if key == "checksums":
        parts = [PART_NAMES.get(part, part) for part in sorted(set(stored or {}) | set(wanted or {}))
                 if (stored or {}).get(part) != (wanted or {}).get(part)]
        return "; ".join(f"{part} differ" for part in parts)
    return f"{key} is {stored!r} in the store but {wanted!r} now"


class KernelStore:
    """A kernel matrix store on disk (see the module's description of the format).

    Made with :meth:`create` (by one process) and opened with :meth:`open` (by any).
    """

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.kinds: tuple[str, ...] = tuple(manifest["kinds"])
        self.shape: tuple[int, ...] = tuple(manifest["shape"])
        self.dtype = np.dtype(manifest["dtype"])
        self.grid = TileGrid(self.shape[-2], self.shape[-1], manifest["tile_size"], manifest["symmetric"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> KernelStore:
        """The store at ``path`` (``FileNotFoundError`` if there is none, ``ValueError`` if it is not one)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no kernel matrix at {path}: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest_path} is not valid JSON ({error})") from error
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{manifest_path} is not a gpytorch_tp kernel matrix manifest (format {manifest.get('format')!r})"
            )
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} has format version {manifest.get('version')}, this gpytorch_tp reads {FORMAT_VERSION}"
            )
        return cls(path, manifest)

    @classmethod
    def create(cls, path: str | os.PathLike, identity: dict, extra: dict, overwrite: bool = False) -> KernelStore:
        """The store for the matrix ``identity`` describes: the existing one at ``path`` if it holds that matrix
        (finished tiles kept), else a new one.

        :param identity: the :data:`IDENTITY` fields but ``format`` and ``version``.
        :param extra: further manifest fields, for information (kernel class, creation time ...).
        :param overwrite: replace a store of a different matrix (else :class:`StoreMismatchError`).
        """
        path = Path(path)
        wanted = {"format": FORMAT, "version": FORMAT_VERSION, **identity}
        if (path / MANIFEST).exists():
            try:
                existing = cls.open(path)
            except ValueError:
                if not overwrite:
                    raise
                existing = None
            if existing is not None:
                differences = [
                    _describe_difference(key, existing.manifest.get(key), wanted[key])
                    for key in IDENTITY
                    if existing.manifest.get(key) != wanted[key]
                ]
                if not differences:
                    return existing
                if not overwrite:
                    raise StoreMismatchError(
                        f"{path} already holds a different kernel matrix: " + "; ".join(differences)
                        + ". Pass overwrite=True (--overwrite) to replace it, or choose another path."
                    )
            cls._remove(path)
        elif path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(
                f"{path} exists and is not a kernel matrix store (no {MANIFEST}): give an empty or new directory"
            )
        path.mkdir(parents=True, exist_ok=True)
        (path / PROGRESS).mkdir(exist_ok=True)
        files, offsets = {}, {}
        for kind in wanted["kinds"]:
            name = f"{kind}.npy"
            # A sparse file of the right size: only written tiles take disk blocks.
            array = np.lib.format.open_memmap(
                path / name, mode="w+", dtype=np.dtype(wanted["dtype"]), shape=tuple(wanted["shape"])
            )
            del array
            files[kind], offsets[kind] = name, _data_offset(path / name)
        manifest = {
            **wanted,
            **extra,
            "files": files,
            "data_offsets": offsets,
            "store_id": uuid.uuid4().hex,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "complete": False,
        }
        _write_json_atomically(path / MANIFEST, manifest)
        return cls(path, manifest)

    @staticmethod
    def _remove(path: Path) -> None:
        """Remove a store's own files (never anything else in the directory)."""
        manifest_path = path / MANIFEST
        names = []
        try:
            names = list(json.loads(manifest_path.read_text()).get("files", {}).values())
        except (OSError, ValueError, AttributeError):
            pass
        for name in names + [MANIFEST]:
            (path / name).unlink(missing_ok=True)
        progress = path / PROGRESS
        if progress.is_dir():
            for log in progress.glob("rank-*.jsonl"):
                log.unlink()

    # -- tiles done ----------------------------------------------------------------------

    def tile_records(self) -> list[dict]:
        """Every logged finished tile (a killed job's half-written last line is skipped)."""
        records = []
        for log in sorted((self.path / PROGRESS).glob("rank-*.jsonl")):
            for line in log.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                tile = record.get("tile") if isinstance(record, dict) else None
                if isinstance(tile, int) and 0 <= tile < len(self.grid):
                    records.append(record)
        return records

    def done(self) -> set[int]:
        """The indices of the tiles finished (data written, then logged)."""
        return {record["tile"] for record in self.tile_records()}

    def missing(self) -> list[Tile]:
        """The tiles not finished, in grid order."""
        if self.manifest.get("complete"):
            return []
        done = self.done()
        return [tile for tile in self.grid if tile.index not in done]

    def mark_complete(self) -> None:
        """Record in the manifest that every tile is finished."""
        missing = self.missing()
        if missing:
            raise IncompleteKernelMatrixError(
                f"{len(missing)} tiles of {self.path} are not finished, e.g. {missing[0]}"
            )
        self.manifest = {**self.manifest, "complete": True}
        _write_json_atomically(self.path / MANIFEST, self.manifest)

    def writer(self, rank: int, sync: bool = True) -> TileWriter:
        """A writer of tiles for ``rank`` (use as a context manager)."""
        return TileWriter(self, rank, sync)


class TileWriter:
    """Writes finished tiles into a store's files and logs them, for one rank."""

    def __init__(self, store: KernelStore, rank: int, sync: bool):
        self.store, self.rank, self.sync = store, rank, sync
        self._fds: dict[str, int] = {}
        self._log = None

    def __enter__(self) -> TileWriter:
        store = self.store
        try:
            for kind in store.kinds:
                self._fds[kind] = os.open(store.path / store.manifest["files"][kind], os.O_RDWR)
            log_path = store.path / PROGRESS / f"rank-{self.rank}.jsonl"
            self._log = open(log_path, "a+b")
            self._log.seek(0, os.SEEK_END)
            if self._log.tell() > 0:
                self._log.seek(-1, os.SEEK_END)
                if self._log.read(1) != b"\n":  # a killed job's half line: start a fresh one
                    self._log.write(b"\n")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._log is not None:
            self._log.close()
            self._log = None

    def write(self, tile: Tile, values: dict[str, np.ndarray], seconds: float) -> None:
        """Write ``values[kind]`` (``batch_shape + tile shape``) of ``tile`` (and its mirror image), then log it."""
        store = self.store
        n1, n2 = store.shape[-2], store.shape[-1]
        (r0, r1), (c0, c1) = tile.rows, tile.cols
        item = store.dtype.itemsize
        for kind in store.kinds:
            value = np.ascontiguousarray(values[kind], dtype=store.dtype)
            expected = store.shape[:-2] + (r1 - r0, c1 - c0)
            if value.shape != expected:
                raise ValueError(f"{kind} of {tile} has shape {value.shape}, expected {expected}")
            value = value.reshape(-1, r1 - r0, c1 - c0)
            fd, offset = self._fds[kind], store.manifest["data_offsets"][kind]
            for b in range(value.shape[0]):
                base = offset + b * n1 * n2 * item
                for k in range(r1 - r0):
                    os.pwrite(fd, value[b, k].data, base + ((r0 + k) * n2 + c0) * item)
                if store.grid.symmetric and not tile.diagonal:
                    mirror = np.ascontiguousarray(value[b].T)
                    for k in range(c1 - c0):
                        os.pwrite(fd, mirror[k].data, base + ((c0 + k) * n2 + r0) * item)
            if self.sync:
                os.fdatasync(fd)
        record = {"tile": tile.index, "row": tile.row, "col": tile.col, "rank": self.rank, "seconds": round(seconds, 6)}
        self._log.write((json.dumps(record) + "\n").encode())
        self._log.flush()
        if self.sync:
            os.fsync(self._log.fileno())


class KernelMatrix:
    """A kernel matrix on disk, opened lazily (see :func:`open_kernel_matrix`).

    ``matrix["ntk"]`` (or :meth:`tensor`) is a ``torch.Tensor`` over a
    memory map of the file: nothing is read until its entries are touched, and
    writes to it stay in this process's memory (copy on write), never reach the
    file.  :meth:`array` gives the read-only ``numpy.memmap``.
    """

    def __init__(self, store: KernelStore):
        self._store = store
        self.path: Path = store.path
        self.manifest: dict = store.manifest
        self.kinds: tuple[str, ...] = store.kinds
        self.shape: tuple[int, ...] = store.shape
        self.grid: TileGrid = store.grid

    @property
    def symmetric(self) -> bool:
        """The matrix is ``K(X, X)`` (stored whole: the lower triangle mirrors the upper)."""
        return self.grid.symmetric

    @property
    def complete(self) -> bool:
        """Every tile is finished."""
        return not self.missing_tiles()

    def missing_tiles(self) -> list[Tile]:
        """The tiles never computed (their entries in the files are zeros)."""
        return self._store.missing()

    def _file(self, kind: str) -> Path:
        if kind not in self.kinds:
            raise KeyError(f"this kernel matrix holds {list(self.kinds)}, not {kind!r}")
        return self.path / self.manifest["files"][kind]

    def array(self, kind: str) -> np.memmap:
        """The matrix of ``kind`` (``"nngp"``, ``"ntk"``) as a read-only ``numpy.memmap``."""
        return np.load(self._file(kind), mmap_mode="r")

    def tensor(self, kind: str) -> Tensor:
        """The matrix of ``kind`` as a ``torch.Tensor`` over a copy-on-write memory map (read lazily)."""
        return torch.from_numpy(np.load(self._file(kind), mmap_mode="c"))

    def __getitem__(self, kind: str) -> Tensor:
        return self.tensor(kind)

    def check_inputs(self, x1: Tensor, x2: Tensor | None = None) -> None:
        """``ValueError`` unless ``x1`` (and ``x2``) are the inputs the matrix was computed for (by checksum)."""
        stored = self.manifest["checksums"]
        if x2 is x1:
            x2 = None
        for name, x in (("x1", x1), ("x2", x2)):
            if tensor_checksum(x) != stored.get(name):
                raise ValueError(
                    f"{name} is not the input this kernel matrix was computed for (checksums differ: "
                    f"{(tensor_checksum(x) or 'none')[:12]} given, {(stored.get(name) or 'none')[:12]} stored)"
                )

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.missing_tiles())} of {len(self.grid)} tiles missing"
        return f"KernelMatrix({str(self.path)!r}, kinds={list(self.kinds)}, shape={self.shape}, {state})"


def open_kernel_matrix(path: str | os.PathLike, allow_incomplete: bool = False) -> KernelMatrix:
    """Open a kernel matrix written by :func:`~gpytorch_tp.distributed.precompute_kernel`, lazily.

    :param path: the store's directory.
    :param allow_incomplete: open a matrix with unfinished tiles (their
        entries read as zeros; :meth:`KernelMatrix.missing_tiles` lists them)
        with a warning, instead of raising :class:`IncompleteKernelMatrixError`.
    :return: a :class:`KernelMatrix`; ``matrix["nngp"]``, ``matrix["ntk"]`` are tensors over memory maps.
    """
    matrix = KernelMatrix(KernelStore.open(path))
    missing = matrix.missing_tiles()
    if missing:
        message = (
            f"{len(missing)} of {len(matrix.grid)} tiles of the kernel matrix at {matrix.path} were never computed "
            f"(e.g. {missing[0]}): rerun precompute_kernel with the same arguments to compute just those"
        )
        if not allow_incomplete:
            raise IncompleteKernelMatrixError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return matrix
