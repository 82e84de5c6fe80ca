"""QC pictures of a tiled slide: the thumbnail, the tissue outline and the kept tiles (PNG, matplotlib Agg)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.io.files import atomic_write_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from wsi_encoder.io.patch_store import PatchSlide

logger = logging.getLogger(__name__)

#: Tiles drawn with their own outline when at least this many thumbnail pixels wide.
_OUTLINE_MIN_PX = 6.0
#: Longer side of the picture drawn (the figure is about 1000 px wide).
_DISPLAY_MAX_PX = 1200


def _shrink(
    thumbnail: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_], max_px: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    from PIL import Image

    h, w = thumbnail.shape[:2]
    factor = max(h, w) / max_px
    if factor <= 1:
        return thumbnail, mask
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    small = np.asarray(Image.fromarray(thumbnail).resize(size, Image.Resampling.LANCZOS))
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)) >= 128
    return small, small_mask


def tile_overlay(
    shape: tuple[int, int],
    boxes: npt.NDArray[np.floating],
    values: npt.NDArray[np.floating],
) -> npt.NDArray[np.float32]:
    """An ``(h, w)`` map holding, at each pixel covered by a box, the box's value (NaN elsewhere).

    ``boxes`` are ``(x0, y0, x1, y1)`` in the map's pixels; overlapping boxes keep the larger value.
    """
    overlay = np.full(shape, np.nan, dtype=np.float32)
    h, w = shape
    for (x0, y0, x1, y1), value in zip(boxes, values, strict=True):
        c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        c1, r1 = min(w, max(c0 + 1, int(np.ceil(x1)))), min(h, max(r0 + 1, int(np.ceil(y1))))
        if c1 > c0 and r1 > r0:
            region = overlay[r0:r1, c0:c1]
            np.fmax(region, value, out=region)
    return overlay


def render_tile_qc(
    thumbnail: npt.NDArray[np.uint8],
    tissue_mask: npt.NDArray[np.bool_],
    coords: npt.NDArray[np.integer],
    tissue: npt.NDArray[np.floating],
    attrs: dict[str, Any],
    title: str,
) -> Figure:
    """A matplotlib figure: thumbnail, tissue outline (green), kept tiles coloured by tissue fraction."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

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
    aspect = h / max(w, 1)
    fig = Figure(figsize=(10, max(3.0, 10 * aspect) + 0.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(thumbnail, interpolation="antialiased")
    if len(boxes):
        overlay = tile_overlay((h, w), boxes, np.asarray(tissue, dtype=np.float32))
        image = ax.imshow(np.ma.masked_invalid(overlay), cmap="viridis", vmin=0, vmax=1, alpha=0.3, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.035, pad=0.01, label="tissue fraction of tile")
        if size * sx >= _OUTLINE_MIN_PX:
            rects = [Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
            ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor="#1f4e79", linewidth=0.4, alpha=0.7))
    if tissue_mask.any():
        ax.contour(tissue_mask.astype(np.float32), levels=[0.5], colors=["#00c853"], linewidths=1.2)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D

    handles: list[Artist] = [Line2D([], [], color="#00c853", linewidth=1.5, label="tissue outline")]
    if len(boxes):
        handles.append(Rectangle((0, 0), 1, 1, facecolor="#35b779", alpha=0.5, edgecolor="#1f4e79", label="kept tiles"))
    ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.8)
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
    ax.set_title(f"{title}\n{detail}", fontsize=9)
    fig.tight_layout()
    return fig


def save_tile_qc(slide: PatchSlide, path: str | Path) -> Path:
    """Write the QC PNG of a :class:`~wsi_encoder.io.patch_store.PatchSlide` (atomically)."""
    path = Path(path)
    fig = render_tile_qc(slide.thumbnail, slide.tissue_mask, slide.coords, slide.tissue, slide.attrs, slide.slide_id)
    atomic_write_figure(path, fig, format="png", bbox_inches="tight", pad_inches=0.1)
    logger.info("wrote QC picture %s", path)
    return path
