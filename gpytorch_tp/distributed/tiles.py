"""Tiles of a kernel matrix and their assignment to the ranks of a process group.

A :class:`TileGrid` cuts ``K(X, X)`` (upper triangle, diagonal tiles included)
or ``K(X, Z)`` (the full rectangle) into square tiles of ``tile_size`` items a
side, numbered in one canonical order, row of tiles by row of tiles.  The grid
depends only on the matrix's shape and the tile size, never on the number of
ranks: a tile is always the same slices of the inputs, which is what makes a
kernel matrix computed by any number of processes the same bit for bit.

Two ways to share tiles out, both deterministic functions of the costs and the
world size (every rank computes the same answer without talking to the others):

* :func:`assign_balanced`: any tile to any rank, largest first to the least
  loaded rank (what precomputing a matrix wants: the shares differ by at most
  one tile's cost);
* :func:`partition_rows`: contiguous rows of tiles per rank, balanced by cost
  (what an operator that holds block rows of ``K`` for products ``K @ V`` wants).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

__all__ = ["Tile", "TileGrid", "assign_balanced", "partition_rows"]


@dataclass(frozen=True)
class Tile:
    """One tile: its number in the grid's order, its grid position and the item ranges it covers."""

    index: int
    row: int
    col: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def diagonal(self) -> bool:
        """A tile of ``K(X, X)`` on the diagonal (its rows and columns are the same items)."""
        return self.rows == self.cols

    @property
    def pairs(self) -> int:
        """Pairs of items the tile holds."""
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])

    def __str__(self) -> str:
        return f"tile {self.index} (rows {self.rows[0]}:{self.rows[1]}, columns {self.cols[0]}:{self.cols[1]})"


class TileGrid:
    """The tiles of an ``n1 x n2`` kernel matrix (``symmetric``: of a set with itself, upper triangle only).

    :param n1: rows (items of ``x1``).
    :param n2: columns (items of ``x2``; equal to ``n1`` when ``symmetric``).
    :param tile_size: items per side of a tile (the last row and column of tiles may be shorter).
    :param symmetric: the matrix is ``K(X, X)``: only tiles on or above the
        diagonal are listed; those below are their transposes.

    Example:
        >>> grid = TileGrid(10, 10, 4, symmetric=True)
        >>> len(grid), [(t.row, t.col) for t in grid][:4]
        (6, [(0, 0), (0, 1), (0, 2), (1, 1)])
        >>> str(grid[5])
        'tile 5 (rows 8:10, columns 8:10)'
    """

    def __init__(self, n1: int, n2: int, tile_size: int, symmetric: bool = False):
        if int(tile_size) != tile_size or tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
        if n1 < 0 or n2 < 0:
            raise ValueError(f"a kernel matrix has non-negative sizes, got {n1} x {n2}")
        if symmetric and n1 != n2:
            raise ValueError(f"a symmetric kernel matrix is square, got {n1} x {n2}")
        self.n1, self.n2, self.tile_size, self.symmetric = int(n1), int(n2), int(tile_size), bool(symmetric)
        self.tile_rows = -(-self.n1 // self.tile_size)
        self.tile_cols = -(-self.n2 // self.tile_size)
        tiles = []
        for i in range(self.tile_rows):
            for j in range(i if self.symmetric else 0, self.tile_cols):
                tiles.append(Tile(len(tiles), i, j, self._span(i, self.n1), self._span(j, self.n2)))
        self.tiles: tuple[Tile, ...] = tuple(tiles)
        self._by_position = {(t.row, t.col): t for t in tiles}

    def _span(self, k: int, n: int) -> tuple[int, int]:
        return k * self.tile_size, min(n, (k + 1) * self.tile_size)

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)

    def __getitem__(self, index: int) -> Tile:
        return self.tiles[index]

    def at(self, row: int, col: int) -> Tile:
        """The tile at grid position ``(row, col)`` (for ``symmetric``, ``row <= col``)."""
        try:
            return self._by_position[(row, col)]
        except KeyError:
            raise IndexError(f"no tile at ({row}, {col}) in a {self.tile_rows} x {self.tile_cols} grid") from None

    def cost(self, tile: Tile) -> float:
        """Relative work of a tile: its pairs of items (a diagonal tile of ``K(X, X)`` computes about half)."""
        if self.symmetric and tile.diagonal:
            side = tile.rows[1] - tile.rows[0]
            return side * (side + 1) / 2
        return float(tile.pairs)

    def __repr__(self) -> str:
        kind = "upper triangle of " if self.symmetric else ""
        return f"TileGrid({kind}{self.n1} x {self.n2}, tile_size={self.tile_size}, {len(self)} tiles)"


def assign_balanced(costs: list[float], world_size: int) -> list[list[int]]:
    """Share items (tiles) of the given costs out to ``world_size`` ranks, balanced.

    Largest cost first, each to the rank with the least work so far (ties: the
    lower index first, then the lower rank): every rank's total is within one
    item's cost of every other's.  Each rank's list is in increasing order.

    :param costs: the cost of each item, by index.
    :param world_size: the number of ranks.
    :return: for each rank, the indices of its items.

    Example:
        >>> assign_balanced([4, 1, 1, 1, 1, 3, 2], 2)
        [[0, 1, 2, 4], [3, 5, 6]]
    """
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    shares: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0.0, rank) for rank in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        load, rank = heapq.heappop(heap)
        shares[rank].append(index)
        heapq.heappush(heap, (load + costs[index], rank))
    return [sorted(share) for share in shares]


def partition_rows(grid: TileGrid, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ranges of tile rows, one per rank, of about equal cost.

    For a distributed operator that holds block rows of the kernel matrix
    (with ``symmetric``, a row's cost is that of its full row: the tiles on and
    above the diagonal and the mirrored ones below).  A rank may get an empty
    range when there are fewer tile rows than ranks.

    :return: for each rank, ``(first, stop)`` tile rows.

    Example:
        >>> partition_rows(TileGrid(10, 6, 2), 2)
        [(0, 3), (3, 5)]
    """
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    row_costs = [(grid._span(i, grid.n1)[1] - grid._span(i, grid.n1)[0]) * grid.n2 for i in range(grid.tile_rows)]
    total = sum(row_costs)
    bounds, running, start = [], 0.0, 0
    for rank in range(world_size):
        target = total * (rank + 1) / world_size
        stop = start
        while stop < grid.tile_rows and (rank == world_size - 1 or running + row_costs[stop] / 2 <= target):
            running += row_costs[stop]
            stop += 1
        bounds.append((start, stop))
        start = stop
    return bounds
