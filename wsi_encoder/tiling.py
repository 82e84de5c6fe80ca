"""Tile grids at a target resolution, and their grouping into blocks of neighbouring tiles.

Frames used here:

* **target pixels** -- the slide as if resampled to ``target_mpp`` µm/px (when a pyramid level is
  within the tolerance of the target, that level's own resolution: then target pixels *are* level
  pixels and tiles are copied, not resampled). Tile ``(row, col)`` covers target pixels
  ``[col * stride, col * stride + tile_size) x [row * stride, row * stride + tile_size)``.
* **level pixels** -- pixels of the pyramid level read; ``level_px = target_px / scale`` with
  ``scale = level_mpp / target_mpp`` (:class:`~wsi_encoder.io.slides.LevelChoice`).
* **level-0 pixels** -- ``l0 = level_px * level_downsample``; stored ``coords`` are level-0
  ``(x, y)`` of each tile's top-left corner, rounded to integers.

Only tiles lying wholly inside the slide are part of the grid. Kept tiles are ordered block by block
(``block_size`` x ``block_size`` cells, blocks in raster order, raster order inside a block) and cut
into chunks of ``chunk_tiles`` consecutive tiles: a chunk is one unit of work (and one chunk of the
stored ``tiles`` array); each of its runs of tiles from one block is read as one region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.slides import SlideReader
from wsi_encoder.io.tiff_regions import read_level_region
from wsi_encoder.tissue import TissueMask, detect_tissue, tile_tissue_fractions

#: Tiles per chunk for 224 px tiles; larger tiles get proportionally fewer (same bytes per chunk).
_CHUNK_PIXELS = 64 * 224 * 224
#: Largest region (level pixels, width x height) one read may cover.
MAX_READ_PIXELS = 4096 * 4096
#: The thumbnail tissue is detected on: at least this many pixels per tile edge, no finer than
#: :data:`THUMBNAIL_MIN_MPP` µm/px (beyond that tissue detection only costs time), no coarser than
#: :data:`THUMBNAIL_MAX_MPP` (CLAM segments at about 16 µm/px), longer side within :data:`THUMBNAIL_SIDE`.
THUMBNAIL_PX_PER_TILE = 8
THUMBNAIL_MIN_MPP = 4.0
THUMBNAIL_MAX_MPP = 16.0
THUMBNAIL_SIDE = (768, 2048)
#: A pyramid level up to this many pixels is read in one go for the thumbnail.
_THUMBNAIL_DIRECT_PIXELS = 32 * 2**20


@dataclass(frozen=True)
class TileSpec:
    """How to cut slides into tiles.

    Parameters
    ----------
    target_mpp
        Resolution of the stored tiles in µm/px (0.5 ≈ 20x, 0.25 ≈ 40x).
    tile_size
        Tile edge in pixels at ``target_mpp``.
    stride
        Step between tiles in pixels at ``target_mpp``; None means ``tile_size`` (no overlap).
    tolerance
        Relative slack: a pyramid level within ``tolerance`` of ``target_mpp`` is read as it is
        (scanners report 0.2465 or 0.263 µm/px for a nominal 0.25), without resampling.
    """

    target_mpp: float = 0.5
    tile_size: int = 224
    stride: int | None = None
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        if not (isinstance(self.target_mpp, int | float) and math.isfinite(self.target_mpp) and self.target_mpp > 0):
            raise InvalidParameterError(f"--mpp {self.target_mpp!r} must be a positive resolution in µm/px")
        if not isinstance(self.tile_size, int) or not 8 <= self.tile_size <= 8192:
            raise InvalidParameterError(f"--tile-size {self.tile_size!r} must be an integer in 8..8192 px")
        if self.stride is None:
            object.__setattr__(self, "stride", self.tile_size)
        if not isinstance(self.stride, int) or not 1 <= self.stride <= 8 * self.tile_size:
            raise InvalidParameterError(f"--stride {self.stride!r} must be an integer in 1..{8 * self.tile_size} px")
        if not 0 <= self.tolerance < 0.5:
            raise InvalidParameterError(f"--mpp-tolerance {self.tolerance!r} must be in [0, 0.5)")

    @property
    def stride_px(self) -> int:
        """The stride in target pixels (resolved)."""
        assert self.stride is not None
        return self.stride


@dataclass(frozen=True)
class SlideGrid:
    """The tile grid of one slide at a :class:`TileSpec` (see the module docstring for frames)."""

    spec: TileSpec
    width_l0: int
    height_l0: int
    slide_mpp: float
    level: int
    level_downsample: float
    level_width: int
    level_height: int
    level_mpp: float
    scale: float
    rows: int
    cols: int

    @property
    def resampled(self) -> bool:
        """Whether tiles are resampled from the level read (False: copied pixel for pixel)."""
        return self.scale != 1.0

    @property
    def actual_mpp(self) -> float:
        """µm/px of the stored pixels: the level's own when read as it is, else the target."""
        return self.spec.target_mpp if self.resampled else self.level_mpp

    @property
    def tile_size_l0(self) -> float:
        """Tile edge in level-0 pixels."""
        return self.spec.tile_size / self.scale * self.level_downsample

    @property
    def stride_l0(self) -> float:
        """Stride in level-0 pixels."""
        return self.spec.stride_px / self.scale * self.level_downsample

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the grid."""
        return (self.rows, self.cols)

    def coords_l0(self, rowcol: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
        """Level-0 ``(x, y)`` top-left of the tiles at ``(row, col)`` pairs, rounded to integers."""
        rowcol = np.asarray(rowcol, dtype=np.int64).reshape(-1, 2)
        step = self.spec.stride_px / self.scale * self.level_downsample
        xy = np.stack([rowcol[:, 1], rowcol[:, 0]], axis=1).astype(np.float64) * step
        return np.round(xy).astype(np.int64)

    def boxes_l0(self, rowcol: npt.NDArray[np.integer]) -> npt.NDArray[np.float64]:
        """Level-0 boxes ``(x0, y0, x1, y1)`` (floats) of the tiles at ``(row, col)`` pairs."""
        rowcol = np.asarray(rowcol, dtype=np.float64).reshape(-1, 2)
        x0 = rowcol[:, 1] * self.stride_l0
        y0 = rowcol[:, 0] * self.stride_l0
        return np.stack([x0, y0, x0 + self.tile_size_l0, y0 + self.tile_size_l0], axis=1)

    def all_cells(self) -> npt.NDArray[np.int32]:
        """Every ``(row, col)`` of the grid in raster order, ``(rows * cols, 2)``."""
        rr, cc = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int32)


def _cells(extent_target: float, tile: int, stride: int) -> int:
    # A little slack absorbs float noise in level_size * scale when the tile fits exactly.
    if extent_target + 1e-6 < tile:
        return 0
    return math.floor((extent_target - tile) / stride + 1e-9) + 1


def plan_grid(reader: SlideReader, spec: TileSpec) -> SlideGrid:
    """The grid of ``reader``'s slide at ``spec``: level choice, scale, grid shape.

    Raises
    ------
    MissingMppError
        The slide has no resolution and no override was given (the message names ``--slide-mpp``).
    """
    slide_mpp = reader.require_mpp()
    choice = reader.level_for_mpp(spec.target_mpp, spec.tolerance)
    level_width, level_height = reader.level_dimensions[choice.level]
    width_l0, height_l0 = reader.dimensions
    target_w, target_h = level_width * choice.scale, level_height * choice.scale
    return SlideGrid(
        spec=spec,
        width_l0=int(width_l0),
        height_l0=int(height_l0),
        slide_mpp=float(slide_mpp),
        level=int(choice.level),
        level_downsample=float(reader.level_downsamples[choice.level]),
        level_width=int(level_width),
        level_height=int(level_height),
        level_mpp=float(choice.level_mpp),
        scale=float(choice.scale),
        rows=_cells(target_h, spec.tile_size, spec.stride_px),
        cols=_cells(target_w, spec.tile_size, spec.stride_px),
    )


def chunk_tiles_for(tile_size: int) -> int:
    """Tiles per chunk (and per unit of work): a square number, about 9.6 MB of pixels."""
    side = max(1, math.isqrt(max(1, _CHUNK_PIXELS // (tile_size * tile_size))))
    return side * side


def block_size_for(grid: SlideGrid, chunk_tiles: int, max_read_pixels: int = MAX_READ_PIXELS) -> int:
    """Cells per block side: ``sqrt(chunk_tiles)``, smaller when one block's read would be too large."""
    side = max(1, math.isqrt(chunk_tiles))
    spec = grid.spec
    while side > 1:
        extent = ((side - 1) * spec.stride_px + spec.tile_size) / grid.scale
        if extent * extent <= max_read_pixels:
            break
        side -= 1
    return side


def order_block_major(rowcol: npt.NDArray[np.integer], block_size: int) -> npt.NDArray[np.intp]:
    """Permutation putting ``(row, col)`` cells in block-major order (blocks in raster order)."""
    rowcol = np.asarray(rowcol, dtype=np.int64).reshape(-1, 2)
    rows, cols = rowcol[:, 0], rowcol[:, 1]
    return np.lexsort((cols, rows, cols // block_size, rows // block_size))


@dataclass(frozen=True)
class ReadPart:
    """A run of consecutive tiles ``[start, stop)`` from one block, read as one region.

    ``u0, v0, u1, v1`` bound the run's tiles in target pixels (x from u0 to u1, y from v0 to v1).
    """

    start: int
    stop: int
    u0: int
    v0: int
    u1: int
    v1: int


def chunk_parts(
    rowcol: npt.NDArray[np.integer], start: int, stop: int, block_size: int, spec: TileSpec
) -> list[ReadPart]:
    """Split tiles ``[start, stop)`` (block-major ordered) into per-block runs with their bounds."""
    cells = np.asarray(rowcol[start:stop], dtype=np.int64).reshape(-1, 2)
    if len(cells) == 0:
        return []
    blocks = (cells[:, 0] // block_size) * (1 << 32) + cells[:, 1] // block_size
    breaks = np.flatnonzero(np.diff(blocks)) + 1
    parts = []
    stride, tile = spec.stride_px, spec.tile_size
    for run in np.split(np.arange(len(cells)), breaks):
        sub = cells[run]
        r0, c0 = sub.min(axis=0)
        r1, c1 = sub.max(axis=0)
        parts.append(
            ReadPart(
                start=start + int(run[0]),
                stop=start + int(run[-1]) + 1,
                u0=int(c0 * stride),
                v0=int(r0 * stride),
                u1=int(c1 * stride + tile),
                v1=int(r1 * stride + tile),
            )
        )
    return parts


def select_tiles(
    grid: SlideGrid, tissue_mask: npt.NDArray[np.bool_], threshold: float, block_size: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The tiles to keep, in block-major order, and their tissue fractions.

    Parameters
    ----------
    grid
        The slide's grid.
    tissue_mask
        ``(h, w)`` mask covering the whole slide (a thumbnail's resolution).
    threshold
        Keep tiles whose tissue fraction is at least this (0 keeps every tile of the grid).
    block_size
        Cells per block side (see :func:`block_size_for`).

    Returns
    -------
    rowcol, tissue
        ``(N, 2)`` int32 (row, col) and ``(N,)`` float32 tissue fraction.
    """
    if not 0 <= threshold <= 1:
        raise InvalidParameterError(f"--tissue-threshold {threshold!r} must be a fraction in [0, 1]")
    cells = grid.all_cells()
    boxes = grid.boxes_l0(cells)
    sx = tissue_mask.shape[1] / grid.width_l0
    sy = tissue_mask.shape[0] / grid.height_l0
    tissue = tile_tissue_fractions(tissue_mask, boxes * np.array([sx, sy, sx, sy]))
    keep = np.ones(len(cells), dtype=bool) if threshold <= 0 else tissue >= threshold
    cells, tissue = cells[keep], tissue[keep]
    order = order_block_major(cells, block_size)
    return cells[order].astype(np.int32), tissue[order].astype(np.float32)


def read_part(reader: SlideReader, grid: SlideGrid, part: ReadPart) -> npt.NDArray[np.uint8]:
    """Pixels of target-pixel rectangle ``[u0, u1) x [v0, v1)`` of ``part``, as RGB uint8.

    One region of the chosen level is read. When the level matches the target the pixels are the
    slide's own; otherwise the region (with a margin for the filter) is resampled once with an
    antialiased Lanczos filter, at the exact sub-pixel position of the target rectangle, so the result
    does not depend on how tiles were grouped into reads.
    """
    width, height = part.u1 - part.u0, part.v1 - part.v0
    if not grid.resampled:
        return read_level_region(reader, grid.level, part.u0, part.v0, width, height)
    s = grid.scale
    fx0, fy0, fx1, fy1 = part.u0 / s, part.v0 / s, part.u1 / s, part.v1 / s
    margin = math.ceil(3 * max(1.0, 1.0 / s)) + 1  # Lanczos-3 support in level pixels
    lx0, ly0 = math.floor(fx0) - margin, math.floor(fy0) - margin
    lx1, ly1 = math.ceil(fx1) + margin, math.ceil(fy1) + margin
    region = read_level_region(reader, grid.level, lx0, ly0, lx1 - lx0, ly1 - ly0)
    resized = Image.fromarray(region).resize(
        (width, height),
        Image.Resampling.LANCZOS,
        box=(fx0 - lx0, fy0 - ly0, fx1 - lx0, fy1 - ly0),
        reducing_gap=None,
    )
    return np.asarray(resized)


def read_tiles(
    reader: SlideReader, grid: SlideGrid, rowcol: npt.NDArray[np.integer], parts: list[ReadPart]
) -> npt.NDArray[np.uint8]:
    """Read the tiles of consecutive ``parts`` (one region per part) as ``(n, T, T, 3)`` uint8.

    ``rowcol`` holds the (row, col) of the tiles ``parts[0].start`` to ``parts[-1].stop``.
    """
    if not parts:
        return np.zeros((0, grid.spec.tile_size, grid.spec.tile_size, 3), dtype=np.uint8)
    first = parts[0].start
    tile, stride = grid.spec.tile_size, grid.spec.stride_px
    out = np.empty((parts[-1].stop - first, tile, tile, 3), dtype=np.uint8)
    for part in parts:
        region = read_part(reader, grid, part)
        for i in range(part.start, part.stop):
            row, col = int(rowcol[i - first][0]), int(rowcol[i - first][1])
            y, x = row * stride - part.v0, col * stride - part.u0
            out[i - first] = region[y : y + tile, x : x + tile]
    return out


def thumbnail_side(grid: SlideGrid) -> int:
    """Longer side (px) of the thumbnail to detect tissue on for ``grid`` (see :data:`THUMBNAIL_PX_PER_TILE`)."""
    tile_um = grid.spec.tile_size * grid.actual_mpp
    mpp = min(max(tile_um / THUMBNAIL_PX_PER_TILE, THUMBNAIL_MIN_MPP), THUMBNAIL_MAX_MPP)
    longest = max(grid.width_l0, grid.height_l0)
    side = math.ceil(longest * grid.slide_mpp / mpp)
    return int(min(max(side, THUMBNAIL_SIDE[0]), THUMBNAIL_SIDE[1], longest))


def read_thumbnail(reader: SlideReader, max_side: int) -> npt.NDArray[np.uint8]:
    """An RGB thumbnail whose longer side is ``max_side`` (or the slide's, if smaller).

    Reads the coarsest level that is at least as large in one go (fast path) when it is small
    enough, and resamples it with an antialiased Lanczos filter; otherwise falls back to the reader's
    strip-wise :meth:`~wsi_encoder.io.slides.SlideReader.get_thumbnail` (bounded memory).
    """
    w0, h0 = reader.dimensions
    factor = max(w0, h0) / max_side
    size = (max(1, round(w0 / factor)), max(1, round(h0 / factor))) if factor > 1 else (w0, h0)
    level = 0
    for candidate in range(reader.level_count):
        lw, lh = reader.level_dimensions[candidate]
        if lw >= size[0] and lh >= size[1]:
            level = candidate
    lw, lh = reader.level_dimensions[level]
    if lw * lh > _THUMBNAIL_DIRECT_PIXELS:
        return reader.get_thumbnail(max_side)
    image = read_level_region(reader, level, 0, 0, lw, lh)
    if (lw, lh) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))


@dataclass(frozen=True)
class TilePlan:
    """What one slide is cut into: its grid, thumbnail and tissue mask, and the kept tiles.

    ``rowcol`` (block-major order) and ``tissue`` describe the kept tiles; tiles ``[start, stop)`` of
    chunk ``k`` (``chunk_tiles`` per chunk) are read as :func:`chunk_parts` says.
    """

    grid: SlideGrid
    thumbnail: npt.NDArray[np.uint8]
    tissue_mask: TissueMask
    thumbnail_downsample: tuple[float, float]
    rowcol: npt.NDArray[np.int32]
    tissue: npt.NDArray[np.float32]
    chunk_tiles: int
    block_size: int

    @property
    def n_tiles(self) -> int:
        """Number of kept tiles."""
        return len(self.rowcol)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of every chunk of ``chunk_tiles`` consecutive kept tiles."""
        n, k = self.n_tiles, self.chunk_tiles
        return [(a, min(a + k, n)) for a in range(0, n, k)]


def plan_tiles(
    reader: SlideReader,
    spec: TileSpec,
    tissue_threshold: float,
    *,
    thumbnail_size: int | None = None,
    chunk_tiles: int | None = None,
) -> TilePlan:
    """Grid, thumbnail, tissue mask and kept tiles of ``reader``'s slide (what ``wsienc tile`` stores).

    Parameters
    ----------
    reader
        The opened slide.
    spec
        Target µm/px, tile size, stride and tolerance.
    tissue_threshold
        Keep tiles whose tissue fraction is at least this (0 keeps every tile).
    thumbnail_size
        Longer side of the thumbnail tissue is detected on (default: :func:`thumbnail_side`).
    chunk_tiles
        Tiles per chunk (default: :func:`chunk_tiles_for`).
    """
    grid = plan_grid(reader, spec)
    thumbnail = read_thumbnail(reader, thumbnail_size or thumbnail_side(grid))
    downsample = (grid.width_l0 / thumbnail.shape[1], grid.height_l0 / thumbnail.shape[0])
    tissue_mask = detect_tissue(thumbnail, grid.slide_mpp * (downsample[0] + downsample[1]) / 2)
    chunk_tiles = chunk_tiles or chunk_tiles_for(spec.tile_size)
    block_size = block_size_for(grid, chunk_tiles)
    rowcol, tissue = select_tiles(grid, tissue_mask.mask, tissue_threshold, block_size)
    return TilePlan(
        grid=grid,
        thumbnail=thumbnail,
        tissue_mask=tissue_mask,
        thumbnail_downsample=(float(downsample[0]), float(downsample[1])),
        rowcol=rowcol,
        tissue=tissue,
        chunk_tiles=chunk_tiles,
        block_size=block_size,
    )
