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

With ``edge="pad"`` (the default) the grid covers the whole slide: the last column and row may run
past the right and bottom edges, and the part of such a tile outside the slide is the slide's
background (``SlideGrid.fill``: white for bright-field, black for dark-field); ``inside`` is the
fraction of each tile lying inside the slide, and tissue fractions count only those pixels. With
``edge="drop"`` only tiles wholly inside the slide are part of the grid. Kept tiles are ordered block by block
(``block_size`` x ``block_size`` cells, blocks in raster order, raster order inside a block) and cut
into chunks of ``chunk_tiles`` consecutive tiles: a chunk is one unit of work (and one chunk of the
stored ``tiles`` array); each of its runs of tiles from one block is read as one region.

:func:`read_tiles` is the one function that turns grid cells into pixels (``wsienc tile``,
coordinates-only ``wsienc encode``, ``wsienc predict``): its result for a tile depends only on the
slide and the grid, never on which other tiles are read with it.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.slides import SlideReader
from wsi_encoder.io.tissue_masks import load_tissue_mask
from wsi_encoder.tissue import (
    TISSUE_METHOD_DARKFIELD,
    TissueMask,
    background_value,
    detect_tissue,
    tile_tissue_fractions,
)

EDGE_MODES: tuple[str, ...] = ("pad", "drop")

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
    edge
        ``"pad"``: the grid covers the whole slide, tiles crossing the right/bottom edge are padded
        with the background; ``"drop"``: only tiles wholly inside the slide.
    """

    target_mpp: float = 0.5
    tile_size: int = 224
    stride: int | None = None
    tolerance: float = 0.05
    edge: str = "pad"

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
        if self.edge not in EDGE_MODES:
            raise InvalidParameterError(f"--edge {self.edge!r}: choose one of {', '.join(EDGE_MODES)}")

    @property
    def stride_px(self) -> int:
        """The stride in target pixels (resolved)."""
        assert self.stride is not None
        return self.stride


@dataclass(frozen=True)
class SlideGrid:
    """The tile grid of one slide at a :class:`TileSpec` (see the module docstring for frames).

    ``fill`` is the background value (0-255, all channels) of pixels outside the slide.
    """

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
    fill: int = 255

    @property
    def target_size(self) -> tuple[float, float]:
        """The level's ``(width, height)`` in target pixels (the slide's extent in the grid's frame)."""
        return (self.level_width * self.scale, self.level_height * self.scale)

    def inside_fractions(self, rowcol: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
        """Fraction of each tile at ``(row, col)`` lying inside the slide (1.0 away from the edges)."""
        rc = np.asarray(rowcol, dtype=np.float64).reshape(-1, 2)
        tile, stride = self.spec.tile_size, self.spec.stride_px
        width, height = self.target_size
        fx = np.clip(width - rc[:, 1] * stride, 0, tile) / tile
        fy = np.clip(height - rc[:, 0] * stride, 0, tile) / tile
        # Float noise in level_size * scale must not make a whole tile 0.99999.
        return np.where(np.isclose(fx * fy, 1.0, rtol=0, atol=1e-6), 1.0, fx * fy).astype(np.float32)

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
        rc = np.asarray(rowcol, dtype=np.float64).reshape(-1, 2)
        x0 = rc[:, 1] * self.stride_l0
        y0 = rc[:, 0] * self.stride_l0
        return np.stack([x0, y0, x0 + self.tile_size_l0, y0 + self.tile_size_l0], axis=1)

    def all_cells(self) -> npt.NDArray[np.int32]:
        """Every ``(row, col)`` of the grid in raster order, ``(rows * cols, 2)``."""
        rr, cc = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int32)


def _cells(extent_target: float, tile: int, stride: int, edge: str) -> int:
    # A little slack absorbs float noise in level_size * scale when the tile fits exactly.
    if edge == "pad":
        if extent_target <= 1e-6:
            return 0
        return max(0, math.ceil((extent_target - tile) / stride - 1e-6)) + 1
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
        rows=_cells(target_h, spec.tile_size, spec.stride_px, spec.edge),
        cols=_cells(target_w, spec.tile_size, spec.stride_px, spec.edge),
    )


def grid_attrs(grid: SlideGrid) -> dict[str, Any]:
    """The attributes a patch store records for ``grid`` (what :func:`grid_from_attrs` reads back)."""
    return {
        "width": grid.width_l0,
        "height": grid.height_l0,
        "slide_mpp": grid.slide_mpp,
        "actual_mpp": grid.actual_mpp,
        "tile_size_l0": grid.tile_size_l0,
        "stride_l0": grid.stride_l0,
        "level": grid.level,
        "level_mpp": grid.level_mpp,
        "level_downsample": grid.level_downsample,
        "level_size": [grid.level_width, grid.level_height],
        "scale": grid.scale,
        "resampled": grid.resampled,
        "grid_shape": [grid.rows, grid.cols],
        "edge": grid.spec.edge,
        "fill": grid.fill,
    }


def grid_from_attrs(attrs: Mapping[str, Any], reader: SlideReader | None = None) -> SlideGrid:
    """The grid a slide of a patch store was tiled on, rebuilt from its attributes.

    Reading its tiles with :func:`read_tiles` gives exactly the stored pixels (before the codec).
    Stores written before ``scale``/``level_size``/``edge``/``fill`` were recorded are read too: the
    missing values come from the other attributes and from ``reader`` (the slide itself).

    Raises
    ------
    InvalidParameterError
        The attributes lack what a grid needs, or the slide's size differs from the recorded one.
    """
    try:
        target_mpp = float(attrs["target_mpp"])
        level = int(attrs.get("level") or 0)
        level_mpp = float(attrs["level_mpp"]) if attrs.get("level_mpp") is not None else float(attrs["actual_mpp"])
        resampled = bool(attrs.get("resampled", False))
        scale = float(attrs["scale"]) if attrs.get("scale") is not None else (level_mpp / target_mpp if resampled else 1.0)
        rows, cols = (int(v) for v in attrs["grid_shape"])
        spec = TileSpec(
            target_mpp=target_mpp,
            tile_size=int(attrs["tile_size"]),
            stride=int(attrs.get("stride") or attrs["tile_size"]),
            tolerance=float(attrs.get("mpp_tolerance", 0.05)),
            edge=str(attrs.get("edge") or "drop"),
        )
        width_l0, height_l0 = int(attrs["width"]), int(attrs["height"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidParameterError(f"the patch store's slide attributes do not describe a tile grid (missing or bad {exc})") from exc
    if reader is not None:
        if tuple(reader.dimensions) != (width_l0, height_l0):
            raise InvalidParameterError(
                f"{reader.path}: the slide is {reader.dimensions[0]}x{reader.dimensions[1]} px, the store recorded "
                f"{width_l0}x{height_l0}: not the slide that was tiled"
            )
        level_size = reader.level_dimensions[level]
        downsample = reader.level_downsamples[level]
    else:
        level_size = attrs["level_size"]
        downsample = float(attrs["level_downsample"])
    level_size = attrs.get("level_size") or level_size
    return SlideGrid(
        spec=spec,
        width_l0=width_l0,
        height_l0=height_l0,
        slide_mpp=float(attrs.get("slide_mpp") or level_mpp),
        level=level,
        level_downsample=float(attrs.get("level_downsample") or downsample),
        level_width=int(level_size[0]),
        level_height=int(level_size[1]),
        level_mpp=level_mpp,
        scale=scale,
        rows=rows,
        cols=cols,
        fill=int(attrs.get("fill", 255)),
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
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The tiles to keep, in block-major order, their tissue fractions and inside fractions.

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
    rowcol, tissue, inside
        ``(N, 2)`` int32 (row, col), ``(N,)`` float32 tissue fraction of the part of each tile inside
        the slide, and ``(N,)`` float32 fraction of each tile inside the slide.
    """
    if not 0 <= threshold <= 1:
        raise InvalidParameterError(f"--tissue-threshold {threshold!r} must be a fraction in [0, 1]")
    cells = grid.all_cells()
    boxes = grid.boxes_l0(cells)
    # Tissue is measured on the part of each tile inside the slide (padding is not glass).
    boxes[:, 2] = np.minimum(boxes[:, 2], grid.width_l0)
    boxes[:, 3] = np.minimum(boxes[:, 3], grid.height_l0)
    sx = tissue_mask.shape[1] / grid.width_l0
    sy = tissue_mask.shape[0] / grid.height_l0
    tissue = tile_tissue_fractions(tissue_mask, boxes * np.array([sx, sy, sx, sy]))
    keep = np.ones(len(cells), dtype=bool) if threshold <= 0 else tissue >= threshold
    cells, tissue = cells[keep], tissue[keep]
    order = order_block_major(cells, block_size)
    cells = cells[order].astype(np.int32)
    return cells, tissue[order].astype(np.float32), grid.inside_fractions(cells)


def _lanczos_margin(scale: float) -> int:
    """Level pixels either side of a tile the Lanczos-3 filter reads at ``scale``."""
    return math.ceil(3 * max(1.0, 1.0 / scale)) + 1


def _tile_source(grid: SlideGrid, row: int, col: int) -> tuple[int, int, int, int, tuple[float, float, float, float]]:
    """Level-pixel window ``(x, y, w, h)`` a resampled tile is computed from, and its box inside it.

    Depends only on the tile's cell and the grid, so a tile's pixels never depend on the tiles read
    with it.
    """
    s, stride, tile = grid.scale, grid.spec.stride_px, grid.spec.tile_size
    fx0, fy0 = col * stride / s, row * stride / s
    fx1, fy1 = (col * stride + tile) / s, (row * stride + tile) / s
    margin = _lanczos_margin(s)
    x0, y0 = math.floor(fx0) - margin, math.floor(fy0) - margin
    x1, y1 = math.ceil(fx1) + margin, math.ceil(fy1) + margin
    return x0, y0, x1 - x0, y1 - y0, (fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0)


def read_part(
    reader: SlideReader,
    grid: SlideGrid,
    part: ReadPart,
    rowcol: npt.NDArray[np.integer],
    out: npt.NDArray[np.uint8] | None = None,
) -> npt.NDArray[np.uint8]:
    """The tiles of ``part`` as ``(n, T, T, 3)`` uint8, from one region read of the grid's level.

    ``rowcol`` holds the (row, col) of the part's tiles. When the level matches the target the pixels
    are the slide's own, cut from the region; otherwise each tile is resampled from the region with
    an antialiased Lanczos filter over its own window (:func:`_tile_source`). Pixels outside the slide
    are ``grid.fill``. ``out`` (optional) receives the tiles.
    """
    cells = np.asarray(rowcol, dtype=np.int64).reshape(-1, 2)
    tile, stride = grid.spec.tile_size, grid.spec.stride_px
    if out is None:
        out = np.empty((len(cells), tile, tile, 3), dtype=np.uint8)
    if not grid.resampled and reader.reads_into:  # each tile decoded straight into its place in ``out``
        for i, (row, col) in enumerate(cells):
            reader.read_level_into(grid.level, int(col) * stride, int(row) * stride, out[i], fill=grid.fill)
        return out
    if not grid.resampled:
        region = reader.read_level(grid.level, part.u0, part.v0, part.u1 - part.u0, part.v1 - part.v0, fill=grid.fill)
        for i, (row, col) in enumerate(cells):
            y, x = int(row) * stride - part.v0, int(col) * stride - part.u0
            out[i] = region[y : y + tile, x : x + tile]
        return out
    windows = [_tile_source(grid, int(row), int(col)) for row, col in cells]
    lx0 = min(w[0] for w in windows)
    ly0 = min(w[1] for w in windows)
    lx1 = max(w[0] + w[2] for w in windows)
    ly1 = max(w[1] + w[3] for w in windows)
    region = reader.read_level(grid.level, lx0, ly0, lx1 - lx0, ly1 - ly0, fill=grid.fill)
    for i, (x, y, w, h, box) in enumerate(windows):
        window = Image.fromarray(region[y - ly0 : y - ly0 + h, x - lx0 : x - lx0 + w])
        out[i] = np.asarray(window.resize((tile, tile), Image.Resampling.LANCZOS, box=box, reducing_gap=None))
    return out


def read_tiles(
    reader: SlideReader,
    grid: SlideGrid,
    rowcol: npt.NDArray[np.integer],
    parts: list[ReadPart] | None = None,
) -> npt.NDArray[np.uint8]:
    """Pixels of the grid tiles at ``rowcol`` as ``(n, T, T, 3)`` uint8 RGB: the one tile-reading function.

    Every consumer reads tiles through here (``wsienc tile``, coordinates-only ``wsienc encode``,
    ``wsienc predict``); a tile's pixels depend only on the slide and ``grid``, never on the order or
    company it is read in. Tiles crossing the slide's edge are padded with ``grid.fill``.

    Parameters
    ----------
    reader
        The slide (any backend; :func:`wsi_encoder.io.slides.open_slide`).
    grid
        From :func:`plan_grid`, or :func:`grid_from_attrs` for a patch store's slide.
    rowcol
        ``(n, 2)`` (row, col) cells, in any order; the result follows it.
    parts
        How the cells group into region reads (:func:`chunk_parts` over block-major ``rowcol``, as
        the tiler plans its chunks); None groups them here (block by block, one read per block).
    """
    cells = np.asarray(rowcol, dtype=np.int64).reshape(-1, 2)
    tile = grid.spec.tile_size
    if len(cells) == 0:
        return np.zeros((0, tile, tile, 3), dtype=np.uint8)
    if parts is None:
        block = block_size_for(grid, chunk_tiles_for(tile))
        order = order_block_major(cells, block)
        ordered = read_tiles(reader, grid, cells[order], chunk_parts(cells[order], 0, len(cells), block, grid.spec))
        out = np.empty_like(ordered)
        out[order] = ordered
        return out
    first = parts[0].start
    out = np.empty((parts[-1].stop - first, tile, tile, 3), dtype=np.uint8)
    for part in parts:
        span = slice(part.start - first, part.stop - first)
        read_part(reader, grid, part, cells[span], out=out[span])
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
    strip-wise :meth:`~wsi_encoder.io.slides.SlideReader.get_thumbnail` (bounded memory). The level
    is read in horizontal bands on up to :data:`_THUMBNAIL_THREADS` threads (decoders release the GIL).
    (Resizing in bands is not exact: Pillow orders its two passes by the image's shape.)
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
    image = np.empty((lh, lw, 3), dtype=np.uint8)
    bands = _bands(lh, min(_THUMBNAIL_THREADS, max(1, lh // 256)))
    with ThreadPoolExecutor(max_workers=len(bands), thread_name_prefix="wsienc-thumbnail") as pool:
        list(pool.map(lambda band: reader.read_level_into(level, 0, band[0], image[band[0] : band[1]]), bands))
    if (lw, lh) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))


#: Threads reading a thumbnail's level (its slide's planning runs alone on one core otherwise).
_THUMBNAIL_THREADS = max(1, min(4, os.cpu_count() or 1))


def _bands(length: int, n: int) -> list[tuple[int, int]]:
    """``n`` consecutive ``[start, stop)`` ranges covering ``range(length)``."""
    cuts = [length * k // n for k in range(n + 1)]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


@dataclass(frozen=True)
class SlideTiling:
    """Where a slide's tiles are: its grid, the kept cells and what they were chosen on.

    ``rowcol``, ``tissue`` and ``inside`` are in block-major order (see the module docstring);
    ``thumbnail_downsample`` is level-0 pixels per thumbnail pixel, ``(x, y)``.
    """

    grid: SlideGrid
    rowcol: npt.NDArray[np.int32]
    tissue: npt.NDArray[np.float32]
    inside: npt.NDArray[np.float32]
    thumbnail: npt.NDArray[np.uint8]
    tissue_mask: TissueMask
    thumbnail_downsample: tuple[float, float]
    chunk_tiles: int
    block_size: int

    @property
    def n_tiles(self) -> int:
        """Number of kept tiles."""
        return len(self.rowcol)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of every chunk of ``chunk_tiles`` consecutive kept tiles (as the tiler stores them)."""
        n, k = self.n_tiles, self.chunk_tiles
        return [(a, min(a + k, n)) for a in range(0, n, k)]


def plan_tiles(
    reader: SlideReader,
    spec: TileSpec,
    tissue_threshold: float,
    *,
    mask_file: str | Path | None = None,
    thumbnail_size: int | None = None,
    chunk_tiles: int | None = None,
) -> SlideTiling:
    """Plan a slide's tiles: grid, thumbnail, tissue (detected, or from ``mask_file``), kept cells.

    Read the kept tiles with ``read_tiles(reader, tiling.grid, tiling.rowcol)``.

    Parameters
    ----------
    reader
        The slide, with a known µm/px (metadata or :meth:`~wsi_encoder.io.slides.SlideReader.override_mpp`).
    spec
        Target µm/px, tile size, stride, tolerance and edge mode.
    tissue_threshold
        Keep tiles whose tissue fraction (of their part inside the slide) is at least this.
    mask_file
        A PNG mask or QuPath GeoJSON (:mod:`wsi_encoder.io.tissue_masks`) used instead of detection.
    thumbnail_size
        Longer side of the thumbnail; default :func:`thumbnail_side`.
    chunk_tiles
        Tiles per chunk; default :func:`chunk_tiles_for`.
    """
    grid = plan_grid(reader, spec)
    thumbnail = read_thumbnail(reader, thumbnail_size or thumbnail_side(grid))
    downsample = (grid.width_l0 / thumbnail.shape[1], grid.height_l0 / thumbnail.shape[0])
    if mask_file is not None:
        mask = load_tissue_mask(mask_file, grid.width_l0, grid.height_l0, thumbnail.shape[:2])
        method = "external-png" if Path(mask_file).suffix.lower() == ".png" else "external-geojson"
        tissue_mask = TissueMask(mask=mask, ink=np.zeros_like(mask), method=method, threshold=0.0)
    else:
        tissue_mask = detect_tissue(thumbnail, grid.slide_mpp * (downsample[0] + downsample[1]) / 2)
    dark = tissue_mask.method == TISSUE_METHOD_DARKFIELD if mask_file is None else background_value(thumbnail) == 0
    grid = replace(grid, fill=0 if dark else 255)
    chunk_tiles = chunk_tiles or chunk_tiles_for(spec.tile_size)
    block_size = block_size_for(grid, chunk_tiles)
    rowcol, tissue, inside = select_tiles(grid, tissue_mask.mask, tissue_threshold, block_size)
    return SlideTiling(
        grid=grid,
        rowcol=rowcol,
        tissue=tissue,
        inside=inside,
        thumbnail=thumbnail,
        tissue_mask=tissue_mask,
        thumbnail_downsample=(float(downsample[0]), float(downsample[1])),
        chunk_tiles=chunk_tiles,
        block_size=block_size,
    )
