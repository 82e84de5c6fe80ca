"""Slide overlays for viewers: tissue outlines traced from the mask, scored tiles, as QuPath GeoJSON features.

Everything is in level-0 pixel coordinates (QuPath's frame: origin at the top-left corner of the
full-resolution image). Tissue outlines are traced on the thumbnail's tissue mask with
scikit-image's marching squares (:func:`skimage.measure.find_contours`), one polygon per tissue piece
with its holes, near-collinear vertices dropped (within ``tolerance`` thumbnail pixels), scaled to level 0 and clipped to
the slide. Tiles are squares (their level-0 boxes) carrying their heatmap score as a measurement and
a colour from the heatmap's colour map, so they show coloured as soon as they are imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage import measure

from wsi_encoder.io.geojson import Ring, qupath_feature, square_ring
from wsi_encoder.pictures import colormap, levels, value_range

TISSUE_CLASS = "Tissue"
TISSUE_COLOR = (80, 160, 80)
#: Pieces are 8-connected (a piece's holes, 4-connected: SciPy's default), as ``skimage.measure.label`` with
#: connectivity 2 (1) labels them; SciPy is called directly, sparing the import of ``skimage.morphology``.
_EIGHT = np.ones((3, 3), dtype=bool)


def _ring(contour: npt.NDArray[np.float64], offset: tuple[float, float], scale: tuple[float, float],
          size_l0: tuple[float, float], tolerance: float) -> Ring | None:
    """A (row, col) marching-squares contour -> closed level-0 ring; None when degenerate."""
    simplified = _drop_collinear(contour, tolerance)
    # find_contours works on pixel centres: pixel (r, c) covers [c, c + 1) x [r, r + 1), its centre is +0.5.
    x = (simplified[:, 1] + offset[1] + 0.5) * scale[0]
    y = (simplified[:, 0] + offset[0] + 0.5) * scale[1]
    x = np.clip(x, 0.0, size_l0[0])
    y = np.clip(y, 0.0, size_l0[1])
    points = np.round(np.stack([x, y], axis=1), 2)
    if len(points) < 4:
        return None
    area = 0.5 * float(np.sum(points[:-1, 0] * points[1:, 1] - points[1:, 0] * points[:-1, 1]))
    if area == 0.0:
        return None
    ring = points.tolist()
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return ring


def _drop_collinear(contour: npt.NDArray[np.float64], tolerance: float) -> npt.NDArray[np.float64]:
    """The closed contour without vertices lying within ``tolerance`` of the line through their neighbours.

    Marching squares on a mask puts a vertex every half pixel, mostly on straight runs; dropping the
    (near-)collinear ones keeps the outline (to within ``tolerance`` px per vertex) at a fraction of the
    size. One pass, vectorised (scikit-image's ``approximate_polygon`` would import SciPy's statistics
    stack, seconds of start-up).
    """
    if tolerance <= 0 or len(contour) < 5:
        return contour
    pts = contour[:-1] if np.array_equal(contour[0], contour[-1]) else contour
    for parity in (0, 1, 0, 1, 0, 1):
        if len(pts) < 5:
            break
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        chord = nxt - prev
        length = np.hypot(chord[:, 0], chord[:, 1])
        cross = np.abs(chord[:, 0] * (pts[:, 1] - prev[:, 1]) - chord[:, 1] * (pts[:, 0] - prev[:, 0]))
        keep = (cross > tolerance * np.maximum(length, 1e-12)) | (length == 0)
        # Never drop two neighbours in one pass (each one's test assumed the other present).
        keep |= np.arange(len(pts)) % 2 == parity
        pts = pts[keep]
    return np.vstack([pts, pts[:1]])


def _oriented(ring: Ring, counter_clockwise: bool) -> Ring:
    pts = np.asarray(ring)
    area = 0.5 * float(np.sum(pts[:-1, 0] * pts[1:, 1] - pts[1:, 0] * pts[:-1, 1]))
    return ring if (area > 0) == counter_clockwise else ring[::-1]


def _pieces(labels: npt.NDArray[np.integer]) -> list[tuple[tuple[int, int], npt.NDArray[np.bool_]]]:
    """Each labelled piece's top-left corner and its pixels within its bounding box, in label order.

    What ``skimage.measure.regionprops`` gives as ``bbox[:2]`` and ``image`` (its ``image_filled`` is
    ``binary_fill_holes`` with the 8-connected structure), without its import: it loads ``scipy.spatial``,
    0.1-0.2 s of a prediction's run.
    """
    return [((box[0].start, box[1].start), labels[box] == i + 1)
            for i, box in enumerate(ndimage.find_objects(labels)) if box is not None]  # fmt: skip


def tissue_polygons(
    mask: npt.NDArray[np.bool_],
    size_l0: tuple[float, float],
    *,
    tolerance: float = 0.75,
    min_pixels: int = 4,
) -> list[list[Ring]]:
    """Polygons (exterior ring, then hole rings) of the tissue pieces of ``mask`` in level-0 pixels.

    Parameters
    ----------
    mask
        ``(h, w)`` bool tissue mask covering the whole slide (the thumbnail's resolution).
    size_l0
        The slide's level-0 ``(width, height)``; the mask is stretched over it.
    tolerance
        Simplification tolerance in mask pixels (0: every marching-squares vertex).
    min_pixels
        Pieces and holes smaller than this many mask pixels are left out.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if mask.size == 0 or not mask.any():
        return []
    scale = (size_l0[0] / w, size_l0[1] / h)
    polygons: list[list[Ring]] = []
    for (r0, c0), piece in _pieces(ndimage.label(mask, _EIGHT)[0]):
        if piece.sum() < min_pixels:
            continue
        filled = ndimage.binary_fill_holes(piece, _EIGHT)
        outer = max(measure.find_contours(np.pad(filled, 1).astype(np.uint8), 0.5), key=len)
        exterior = _ring(outer, (r0 - 1, c0 - 1), scale, size_l0, tolerance)
        if exterior is None:
            continue
        rings = [_oriented(exterior, counter_clockwise=True)]
        for (hr0, hc0), hole in _pieces(ndimage.label(filled & ~piece)[0]):
            if hole.sum() < min_pixels:
                continue
            contour = max(measure.find_contours(np.pad(hole, 1).astype(np.uint8), 0.5), key=len)
            ring = _ring(contour, (r0 + hr0 - 1, c0 + hc0 - 1), scale, size_l0, tolerance)
            if ring is not None:
                rings.append(_oriented(ring, counter_clockwise=False))
        polygons.append(rings)
    return polygons


def score_colors(values: npt.ArrayLike, *, signed: bool) -> npt.NDArray[np.uint8]:
    """``(N, 3)`` RGB colours of heatmap values: ``RdBu_r`` centred on 0 when ``signed``, else ``inferno``.

    The same colour maps and limits as the heatmap PNG; non-finite values are grey.
    """
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    lo, hi = value_range(v, signed=signed)
    rgb = colormap("RdBu_r" if signed else "inferno")[levels(v, lo, hi)]
    rgb[~finite] = 128
    return rgb


def slide_features(
    boxes_l0: npt.NDArray[np.floating],
    scores: npt.ArrayLike,
    size_l0: tuple[float, float],
    *,
    score_name: str,
    signed: bool,
    tile_measurements: Mapping[str, npt.ArrayLike] | None = None,
    tissue_mask: npt.NDArray[np.bool_] | None = None,
    tissue_measurements: Mapping[str, float] | None = None,
    tissue_name: str = "tissue",
) -> list[dict[str, Any]]:
    """QuPath features of one slide: tissue outlines (annotations), then one square per tile (detections).

    Parameters
    ----------
    boxes_l0
        ``(N, 4)`` tile boxes ``(x0, y0, x1, y1)`` in level-0 pixels (clipped to the slide).
    scores
        ``(N,)`` heatmap value of each tile, stored as the measurement ``score_name``.
    size_l0
        The slide's level-0 ``(width, height)``.
    score_name
        Measurement name of the score (e.g. ``"attention"``).
    signed
        Whether scores are signed (colour map centred on 0).
    tile_measurements
        Further ``(N,)`` per-tile measurements (e.g. tissue fraction, grid row and column).
    tissue_mask
        The thumbnail tissue mask to trace (None: no outlines).
    tissue_measurements
        Measurements put on every tissue outline (e.g. the slide's class probabilities).
    tissue_name
        Name of the outline annotations.
    """
    boxes = np.asarray(boxes_l0, dtype=float).reshape(-1, 4)
    values = np.asarray(scores, dtype=float).reshape(-1)
    width, height = size_l0
    boxes = np.stack(
        [np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 1], 0, height),
         np.clip(boxes[:, 2], 0, width), np.clip(boxes[:, 3], 0, height)], axis=1,
    )  # fmt: skip
    features: list[dict[str, Any]] = []
    if tissue_mask is not None:
        for rings in tissue_polygons(tissue_mask, size_l0):
            features.append(
                qupath_feature(rings, "annotation", name=tissue_name, classification=TISSUE_CLASS,
                               class_color=TISSUE_COLOR, measurements=tissue_measurements)
            )  # fmt: skip
    colors = score_colors(values, signed=signed)
    extra = {k: np.asarray(v, dtype=float).reshape(-1) for k, v in (tile_measurements or {}).items()}
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        measurements = {score_name: float(values[i]), **{k: float(v[i]) for k, v in extra.items()}}
        features.append(
            qupath_feature([square_ring(float(x0), float(y0), float(x1), float(y1))], "detection",
                           color=tuple(int(c) for c in colors[i]), measurements=measurements)
        )  # fmt: skip
    return features


__all__ = ["TISSUE_CLASS", "score_colors", "slide_features", "tissue_polygons"]
