"""QC pictures of a tiled slide: the thumbnail, the tissue outline and the kept tiles (PNG, drawn with Pillow)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.io.files import atomic_write_image
from wsi_encoder.pictures import colormap, draw_colorbar, font, levels

if TYPE_CHECKING:
    from PIL import Image

    from wsi_encoder.io.patch_store import PatchSlide

logger = logging.getLogger(__name__)

#: Tiles drawn with their own outline when at least this many thumbnail pixels wide.
_OUTLINE_MIN_PX = 6.0
#: Longer side of the slide's picture (px).
_DISPLAY_MAX_PX = 1000


def _shrink(
    thumbnail: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_], max_px: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    from PIL import Image

    h, w = thumbnail.shape[:2]
    factor = max(h, w) / max_px
    if factor <= 1:
        return thumbnail, mask
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    # area averages (antialiased); the mask keeps the pixels that are mostly tissue
    small = np.asarray(Image.fromarray(thumbnail).resize(size, Image.Resampling.BOX))
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)) >= 128
    return small, small_mask


#: Box-cell pairs that ``np.maximum.at`` takes at once (bounds memory on densely overlapping grids).
_CELL_BATCH = 1 << 22


@dataclass(frozen=True)
class TileMap:
    """Which box covers each pixel of an ``(h, w)`` map, and which pixels are on a box's outline.

    Pixel rows of the same kind (same cell of the boxes' rounded edges, same place in it: first, last,
    both or neither) look alike, and so do columns: the map is stored as a small ``(row kind, column
    kind)`` table and expanded with :meth:`expand`.
    """

    #: ``(row kinds, column kinds)`` index of the box covering the kind (-1: none).
    box: npt.NDArray[np.intp]
    #: ``(row kinds, column kinds)``: the kind's pixels lie on their box's outline (its first row and column,
    #: and its last where no box follows).
    edge: npt.NDArray[np.bool_]
    #: The kind of each pixel row, ``(h,)``, and of each column, ``(w,)``.
    row_kind: npt.NDArray[np.intp]
    col_kind: npt.NDArray[np.intp]

    def expand(self, table: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The ``(h, w, ...)`` map of a ``(row kinds, column kinds, ...)`` table."""
        return np.take(table, self.col_kind, axis=1)[self.row_kind]  # columns first: then whole rows are copied


def _cells_of_pixels(edges: npt.NDArray[np.intp], n: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """For pixels ``0..n-1`` on one axis: the cell of each (cell ``k`` spans ``[edges[k-1], edges[k])``; 0 and
    ``len(edges)`` lie outside every box) and its place in it (bit 1: the cell's first pixel, bit 2: its last)."""
    px = np.arange(n)
    cell = np.searchsorted(edges, px, side="right")
    first = px == np.concatenate([[-1], edges])[cell]
    last = px + 1 == np.concatenate([edges, [-1]])[cell]
    return cell, first + 2 * last


def tile_map(shape: tuple[int, int], boxes: npt.NDArray[np.floating], values: npt.NDArray[np.floating]) -> TileMap:
    """The :class:`TileMap` of ``boxes`` ``(x0, y0, x1, y1)`` (in the map's pixels) on an ``(h, w)`` map.

    Edges are rounded to whole pixels, so that neighbouring tiles meet on one pixel boundary; each box
    covers at least one pixel. Where boxes overlap, the one with the larger value covers the pixel (of equal
    values, the later box). Computed without a loop over the boxes: their edges cut the map into cells,
    each box covers a block of cells, and a cell takes the highest-ranked box covering it
    (``np.maximum.at``); a regular grid of tiles covers one cell per tile.
    """
    h, w = shape
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c0 = np.clip(np.round(b[:, 0]), 0, None).astype(np.intp)
    r0 = np.clip(np.round(b[:, 1]), 0, None).astype(np.intp)
    c1 = np.minimum(w, np.maximum(c0 + 1, np.round(b[:, 2]).astype(np.intp)))
    r1 = np.minimum(h, np.maximum(r0 + 1, np.round(b[:, 3]).astype(np.intp)))
    order = np.argsort(np.asarray(values, dtype=np.float32).reshape(-1), kind="stable")  # ascending: the last wins
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.arange(len(order))
    drawn = np.flatnonzero((c1 > c0) & (r1 > r0))
    xs = np.flatnonzero(np.bincount(np.concatenate([c0[drawn], c1[drawn]]), minlength=w + 1))  # sorted, unique
    ys = np.flatnonzero(np.bincount(np.concatenate([r0[drawn], r1[drawn]]), minlength=h + 1))
    a0, a1 = np.searchsorted(xs, c0[drawn]) + 1, np.searchsorted(xs, c1[drawn]) + 1  # boxes cover cells [a0, a1)
    b0, b1 = np.searchsorted(ys, r0[drawn]) + 1, np.searchsorted(ys, r1[drawn]) + 1
    span_x = a1 - a0
    n_cells = span_x * (b1 - b0)
    cells = np.full((len(ys) + 1, len(xs) + 1), -1, dtype=np.intp)  # the highest rank covering each cell
    ends = np.cumsum(n_cells)
    batches = np.searchsorted(ends, np.arange(0, int(ends[-1]) if len(ends) else 0, _CELL_BATCH), side="right")
    bounds = [*sorted(set(batches.tolist())), len(drawn)]  # the boxes where each batch of cells starts
    for lo, hi in itertools.pairwise(bounds):
        count = n_cells[lo:hi]
        box = np.repeat(np.arange(lo, hi), count)  # every cell of every box lo..hi-1
        k = np.arange(len(box)) - np.repeat(np.cumsum(count) - count, count)  # which of its box's cells
        np.maximum.at(cells, (b0[box] + k // span_x[box], a0[box] + k % span_x[box]), rank[drawn[box]])
    cell_box = np.append(order, -1)[cells]  # rank -1: no box
    row_cell, row_place = _cells_of_pixels(ys, h)
    col_cell, col_place = _cells_of_pixels(xs, w)
    row_kinds, row_kind = np.unique(row_cell * 4 + row_place, return_inverse=True)
    col_kinds, col_kind = np.unique(col_cell * 4 + col_place, return_inverse=True)
    # per cell, the sides its box's outline runs along: bit 1 left (another box or none there), 2 right
    # (none there), 4 top (another box or none), 8 bottom (none); the same bits as a pixel's place, shifted
    padded = np.pad(cell_box, 1, constant_values=-1)
    sides = (
        (padded[1:-1, :-2] != cell_box) * 1
        | (padded[1:-1, 2:] < 0) * 2
        | (padded[:-2, 1:-1] != cell_box) * 4
        | (padded[2:, 1:-1] < 0) * 8
    )
    cr, cc = (row_kinds // 4)[:, None], (col_kinds // 4)[None, :]
    box_of = cell_box[cr, cc]
    edge = (box_of >= 0) & ((sides[cr, cc] & ((col_kinds % 4)[None, :] | (row_kinds % 4 * 4)[:, None])) > 0)
    return TileMap(box=box_of, edge=edge, row_kind=row_kind.reshape(-1), col_kind=col_kind.reshape(-1))


_OUTLINE_RGB = (0, 200, 83)
_TILE_EDGE_RGB = (31, 78, 121)
_OVERLAY_ALPHA = 0.3


def _tint_tiles(image: npt.NDArray[np.uint8], tiles: TileMap, colours: npt.NDArray[np.uint8], *, edges: bool) -> npt.NDArray[np.uint8]:
    """``image`` with each tile's ``colours`` row blended in at 30%, and the tiles' outlines (when ``edges``)
    at 50% of the outline colour over that (35% image, 15% tile colour).

    Each pixel is ``(image * k + t) // 20`` in integers: ``k = 20, t = 10`` where no tile is (the pixel as
    it was), ``k = 14, t = 6 * colour + 10`` inside a tile, ``k = 7, t = 3 * colour + 10 * outline + 10`` on
    its outline; ``k`` and ``t`` are looked up once per kind of pixel (:class:`TileMap`).
    """
    n = len(colours)
    colour = np.asarray(colours, dtype=np.uint16).reshape(n, 3)
    t = np.empty((2 * n + 1, 3), dtype=np.uint16)  # rows: inside tile i, on the outline of tile i, no tile
    t[:n] = 6 * colour + 10
    t[n : 2 * n] = 3 * colour + 10 * np.asarray(_TILE_EDGE_RGB, np.uint16) + 10
    t[2 * n] = 10
    k = np.repeat(np.array([14, 7, 20], dtype=np.uint16), [n, n, 1])[:, None].repeat(3, axis=1)
    row = np.where(tiles.box < 0, 2 * n, tiles.box + n * (tiles.edge & edges))
    blended = tiles.expand(np.take(k, row, axis=0))  # np.take: rows of 3 copied faster than by indexing
    blended *= image
    blended += tiles.expand(np.take(t, row, axis=0))
    blended //= 20
    return blended.astype(np.uint8)


def _outline(mask: npt.NDArray[np.bool_], width: int = 2) -> npt.NDArray[np.bool_]:
    """The boundary pixels of ``mask``, ``width`` px thick (inside the mask)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[[0, -1], :] = False
        shrunk[:, [0, -1]] = False
        inner = shrunk
    return mask & ~inner


def render_tile_qc(
    thumbnail: npt.NDArray[np.uint8],
    tissue_mask: npt.NDArray[np.bool_],
    coords: npt.NDArray[np.integer],
    tissue: npt.NDArray[np.floating],
    attrs: dict[str, Any],
    title: str,
) -> Image.Image:
    """The QC picture: thumbnail, tissue outline (green), kept tiles coloured by tissue fraction (viridis, 30%).

    Drawn with numpy and Pillow (a few tens of milliseconds for tens of thousands of tiles), with a
    title, a legend and a colour bar for the tissue fraction.
    """
    from PIL import Image, ImageDraw

    thumbnail, tissue_mask = _shrink(thumbnail, tissue_mask, _DISPLAY_MAX_PX)
    h, w = thumbnail.shape[:2]
    sx = w / float(attrs["width"])
    sy = h / float(attrs["height"])
    size = float(attrs["tile_size_l0"])
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    boxes = np.column_stack([xy[:, 0] * sx, xy[:, 1] * sy, (xy[:, 0] + size) * sx, (xy[:, 1] + size) * sy])
    # Edge tiles run past the slide (padded): draw the part inside it.
    boxes = np.minimum(boxes, [w, h, w, h])
    n_edge = int(np.sum((xy[:, 0] + size > float(attrs["width"]) + 0.5) | (xy[:, 1] + size > float(attrs["height"]) + 0.5)))
    lut = colormap("viridis")
    image = np.array(thumbnail[..., :3], dtype=np.uint8)
    if len(boxes):
        fraction = np.asarray(tissue, dtype=np.float32).reshape(-1)
        image = _tint_tiles(image, tile_map((h, w), boxes, fraction), lut[levels(fraction, 0.0, 1.0)],
                            edges=size * sx >= _OUTLINE_MIN_PX)
    image[_outline(tissue_mask)] = _OUTLINE_RGB
    picture = Image.fromarray(image)
    large, small = font(13), font(11)
    mpp = attrs.get("actual_mpp")
    edge_note = f" ({n_edge} at the edge, padded)" if n_edge else ""
    if not len(boxes):
        edge_note = " (no tissue found)"
    detail = (
        f"{len(boxes)} tiles{edge_note} of {attrs.get('tile_size')} px at {mpp:.4g} µm/px"
        f" (requested {attrs.get('target_mpp')}), level {attrs.get('level')}"
        f"{', resampled' if attrs.get('resampled') else ''}; tissue threshold {attrs.get('tissue_threshold')}"
        if mpp is not None
        else f"{len(boxes)} tiles"
    )
    top, bar_w, margin = 44, 18, 10
    width = max(w + bar_w + 120, 800)
    canvas = Image.new("RGB", (width, h + top + 34), "white")
    canvas.paste(picture, (margin, top))
    text = ImageDraw.Draw(canvas)
    text.text((width // 2, 6), title, fill="black", font=large, anchor="ma")
    text.text((width // 2, 24), detail, fill="black", font=small, anchor="ma")
    # colour bar of the tissue fraction, to the right of the picture
    bx, bh = margin + w + 14, max(h * 3 // 4, 60)
    by = top + (h - bh) // 2
    draw_colorbar(canvas, (bx, by, bar_w, bh), lut, [(v, f"{v:g}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)],
                  label="tissue fraction", alpha=_OVERLAY_ALPHA)
    # legend under the picture
    ly = top + h + 10
    text.line((margin, ly + 7, margin + 22, ly + 7), fill=_OUTLINE_RGB, width=2)
    text.text((margin + 28, ly + 7), "tissue outline", fill="black", font=small, anchor="lm")
    if len(boxes):
        swatch = tuple(int(v) for v in ((1 - _OVERLAY_ALPHA) * 255 + _OVERLAY_ALPHA * lut[200]).round())
        text.rectangle((margin + 130, ly, margin + 152, ly + 14), fill=swatch, outline=_TILE_EDGE_RGB)
        text.text((margin + 158, ly + 7), "kept tiles (colour: tissue fraction)", fill="black", font=small, anchor="lm")
    return canvas


def save_tile_qc(slide: PatchSlide, path: str | Path) -> Path:
    """Write the QC PNG of a :class:`~wsi_encoder.io.patch_store.PatchSlide` (atomically)."""
    path = Path(path)
    picture = render_tile_qc(slide.thumbnail, slide.tissue_mask, slide.coords, slide.tissue, slide.attrs, slide.slide_id)
    atomic_write_image(path, picture)
    logger.info("wrote QC picture %s", path)
    return path
