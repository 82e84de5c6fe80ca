"""QC pictures of a tiled slide: the thumbnail, the tissue outline and the kept tiles (PNG, drawn with Pillow)."""

from __future__ import annotations

import logging
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
    small = np.asarray(Image.fromarray(thumbnail).resize(size, Image.Resampling.BILINEAR))  # antialiased when shrinking
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)) >= 128
    return small, small_mask


def _box_ids(shape: tuple[int, int], boxes: npt.NDArray[np.floating], values: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
    """An ``(h, w)`` map of the index of the box covering each pixel (-1: none); where boxes overlap, the
    one with the larger value."""
    ids = np.full(shape, -1, dtype=np.int64)
    h, w = shape
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    # rounded edges: neighbouring tiles meet on one pixel boundary (each box at least one pixel)
    c0 = np.clip(np.round(b[:, 0]), 0, None).astype(np.int64)
    r0 = np.clip(np.round(b[:, 1]), 0, None).astype(np.int64)
    c1 = np.minimum(w, np.maximum(c0 + 1, np.round(b[:, 2]).astype(np.int64)))
    r1 = np.minimum(h, np.maximum(r0 + 1, np.round(b[:, 3]).astype(np.int64)))
    order = np.argsort(np.asarray(values, dtype=np.float32).reshape(-1), kind="stable")  # the largest painted last
    for i in order[(c1[order] > c0[order]) & (r1[order] > r0[order])].tolist():
        ids[r0[i] : r1[i], c0[i] : c1[i]] = i
    return ids


def tile_overlay(
    shape: tuple[int, int],
    boxes: npt.NDArray[np.floating],
    values: npt.NDArray[np.floating],
) -> npt.NDArray[np.float32]:
    """An ``(h, w)`` map holding, at each pixel covered by a box, the box's value (NaN elsewhere).

    ``boxes`` are ``(x0, y0, x1, y1)`` in the map's pixels; overlapping boxes keep the larger value.
    """
    return _values_at(_box_ids(shape, boxes, values), values)


def _values_at(ids: npt.NDArray[np.int64], values: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    v = np.append(np.asarray(values, dtype=np.float32).reshape(-1), np.float32(np.nan))
    return v[ids]  # index -1 is the NaN appended


def _box_edges(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Pixels on the outline of the box they belong to (its first row and column, and its last where no box follows)."""
    covered = ids >= 0
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, 0] = edge[0] = True
    edge[:, :-1] |= ids[:, 1:] < 0
    edge[:-1] |= ids[1:] < 0
    edge[:, -1] = edge[-1] = True
    return edge & covered


_OUTLINE_RGB = (0, 200, 83)
_TILE_EDGE_RGB = (31, 78, 121)
_OVERLAY_ALPHA = 0.3
_TINT, _KEEP = 3, 7  # the same 30% as integer tenths


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
        ids = _box_ids((h, w), boxes, np.asarray(tissue, dtype=np.float32))
        overlay = _values_at(ids, np.asarray(tissue, dtype=np.float32))
        covered = ids >= 0
        level = levels(overlay, 0.0, 1.0)
        blended = (image.astype(np.uint16) * _KEEP + lut[level].astype(np.uint16) * _TINT + 5) // 10  # 30% tint
        image = np.where(covered[..., None], blended, image).astype(np.uint8)
        if size * sx >= _OUTLINE_MIN_PX:  # tile edges, blended in at 50%
            on = _box_edges(ids)
            image[on] = (image[on] // 2 + np.asarray(_TILE_EDGE_RGB, np.uint8) // 2).astype(np.uint8)
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
