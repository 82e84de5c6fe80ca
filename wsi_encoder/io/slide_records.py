"""What an embedding store holds for one slide, as plain records: the bag of tile embeddings, its dihedral views,
the slide's geometry, its arrays and its write layout (:mod:`wsi_encoder.io.embedding_store` reads and writes them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import StoreError

FloatArray = npt.NDArray[np.floating[Any]]


@dataclass(frozen=True)
class SlideBag:
    """The tiles of one slide: features, their grid cells and the grid size (what slide classifiers consume).

    Attributes
    ----------
    slide_id
        Name of the slide group in the store.
    features
        ``(N, C)`` tile embeddings, stored dtype (float16 or float32).
    rowcol
        ``(N, 2)`` int grid cell (row, col) of each tile.
    grid_shape
        ``(R, Q)`` rows and columns of the slide's grid.
    """

    slide_id: str
    features: FloatArray
    rowcol: npt.NDArray[np.integer[Any]]
    grid_shape: tuple[int, int]
    #: ``(8, N, C)`` embeddings of the tiles' 8 dihedral views (``encode --dihedral``), when loaded; view 0 is
    #: ``features``. See :func:`dihedral_cells` for the order.
    dihedral: FloatArray | None = None

    def view(self, v: int) -> SlideBag:
        """The slide as its dihedral view ``v`` sees it: the view's embeddings at the rotated/flipped cells.

        ``bag.view(v).grid()`` equals the grid of the slide image transformed as view ``v`` transforms a tile
        (``np.rot90(image, v)``, or ``np.rot90(np.fliplr(image), v - 4)`` for ``v >= 4``), each tile encoded as
        it appears there. Needs :attr:`dihedral` (``EmbeddingStore.load(..., dihedral=True)``).
        """
        if self.dihedral is None:
            raise StoreError(f"slide {self.slide_id!r} was not encoded with --dihedral (no features_dihedral)")
        rowcol, shape = dihedral_cells(self.rowcol, self.grid_shape, v)
        return SlideBag(self.slide_id, self.dihedral[v], rowcol, shape)

    @property
    def n_tiles(self) -> int:
        """Number of tissue tiles ``N``."""
        return int(self.features.shape[0])

    @property
    def mask(self) -> npt.NDArray[np.bool_]:
        """``(R, Q)`` bool, True where a tile exists."""
        mask = np.zeros(self.grid_shape, dtype=bool)
        mask[self.rowcol[:, 0], self.rowcol[:, 1]] = True
        return mask

    def grid(self, dtype: npt.DTypeLike = np.float32) -> FloatArray:
        """``(C, R, Q)`` grid of features, zeros outside tissue (the NIC compressed slide)."""
        out: FloatArray = np.zeros((self.features.shape[1], *self.grid_shape), dtype=dtype)
        out[:, self.rowcol[:, 0], self.rowcol[:, 1]] = self.features.T
        return out

    def to_grid(self, values: npt.ArrayLike, fill: float = np.nan) -> npt.NDArray[np.float64]:
        """Place per-tile ``values`` ``(N,)`` onto an ``(R, Q)`` map (``fill`` outside tissue)."""
        out = np.full(self.grid_shape, fill, dtype=float)
        out[self.rowcol[:, 0], self.rowcol[:, 1]] = np.asarray(values, dtype=float)
        return out

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays, in bytes."""
        return int(self.features.nbytes + self.rowcol.nbytes + (0 if self.dihedral is None else self.dihedral.nbytes))


#: The number of dihedral views of a square tile (4 rotations × with and without a mirror).
DIHEDRAL_VIEWS = 8


def dihedral_cells(
    rowcol: npt.NDArray[np.integer[Any]], grid_shape: tuple[int, int], v: int
) -> tuple[npt.NDArray[np.int64], tuple[int, int]]:
    """Where each grid cell ``(row, col)`` goes, and the grid's new shape, under dihedral view ``v``.

    Views ``v = 0..3`` are ``np.rot90(·, v)`` (counter-clockwise quarter turns) and ``v = 4..7`` are
    ``np.rot90(np.fliplr(·), v - 4)``, applied to the whole slide (and so to the grid of cells) exactly as
    ``encode --dihedral`` applies them to each tile's pixels.
    """
    if not 0 <= v < DIHEDRAL_VIEWS:
        raise StoreError(f"dihedral view {v!r} is not one of 0..{DIHEDRAL_VIEWS - 1}")
    r = np.asarray(rowcol, dtype=np.int64)[:, 0].copy()
    c = np.asarray(rowcol, dtype=np.int64)[:, 1].copy()
    rows, cols = int(grid_shape[0]), int(grid_shape[1])
    if v >= 4:  # fliplr mirrors the columns
        c = cols - 1 - c
    for _ in range(v % 4):  # np.rot90: cell (r, c) of an R×Q array goes to (Q-1-c, r) of a Q×R one
        r, c = cols - 1 - c, r
        rows, cols = cols, rows
    return np.stack([r, c], axis=1), (rows, cols)


@dataclass(frozen=True)
class SlideGeometry:
    """Where the grid lies on the slide and on its thumbnail (for heatmaps).

    ``origin_l0`` is the level-0 (x, y) of grid cell (0, 0)'s top-left corner, ``stride_l0`` the level-0
    size of one grid step, ``size_l0`` the slide's level-0 (width, height) (``estimated`` when the store
    does not record it and it was inferred from the thumbnail and the grid).
    """

    origin_l0: tuple[float, float]
    stride_l0: float
    size_l0: tuple[float, float]
    estimated: bool


@dataclass(frozen=True)
class EncodedSlide:
    """One slide of an embedding store, read into memory (every array).

    Attributes
    ----------
    slide_id
        The slide's group name.
    features
        ``(N, C)`` embeddings, one row per tile.
    coords
        ``(N, 2)`` level-0 top-left ``(x, y)`` of each tile, in pixels.
    rowcol
        ``(N, 2)`` ``(row, col)`` of each tile in :attr:`grid`.
    grid
        ``(C, R, Q)`` NIC grid, zeros where :attr:`mask` is False.
    mask
        ``(R, Q)`` True where a tile was encoded.
    thumbnail
        ``(h, w, 3)`` uint8 slide thumbnail, or None when the patch store had none.
    attrs
        The group's attributes (encoder identity, resolution, provenance, ``complete``).
    """

    slide_id: str
    features: FloatArray
    coords: npt.NDArray[np.int64]
    rowcol: npt.NDArray[np.int32]
    grid: FloatArray
    mask: npt.NDArray[np.bool_]
    thumbnail: npt.NDArray[np.uint8] | None
    attrs: dict[str, Any]


@dataclass(frozen=True)
class SlideLayout:
    """Shape of one slide's embedding arrays, as planned before encoding.

    ``chunk_tiles`` is the number of tiles per row chunk of ``features`` (one encoding task).
    """

    n_tiles: int
    embedding_dim: int
    grid_shape: tuple[int, int]
    dtype: str
    chunk_tiles: int
    #: 1, or :data:`DIHEDRAL_VIEWS` when every tile is also encoded in its 8 dihedral views.
    views: int = 1

    @property
    def n_chunks(self) -> int:
        """Number of row chunks of ``features``."""
        return -(-self.n_tiles // self.chunk_tiles)

    def chunk_range(self, k: int) -> tuple[int, int]:
        """Tile index range ``[start, stop)`` of row chunk ``k``."""
        start = k * self.chunk_tiles
        return start, min(start + self.chunk_tiles, self.n_tiles)
