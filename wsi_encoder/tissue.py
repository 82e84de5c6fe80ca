"""Tissue detection on a low-resolution thumbnail, and the tissue fraction of tiles.

Bright-field slides (H&E, IHC, special stains) are segmented on colour saturation with an Otsu
threshold, and on darkness against the glass (faint or unstained tissue, whose colour is almost
grey but which absorbs light), after removing what is not tissue even though it is coloured or dark:

* **white or grey glass** has low saturation and the glass's own brightness;
* **marker ink**: green pen strokes (hues 75-165 degrees, which no common stain has) and strongly
  saturated blue ones (hues 165-235 degrees, saturation above 0.55). Haematoxylin counterstain of IHC
  is blue too but far less saturated at thumbnail scale, so it stays tissue;
* **black ink, slide edges and black scanner borders**: dark, neutral pixels (brightest channel
  below 25 %, low saturation; dense nuclei are dark but saturated purple and stay). The ink mask
  is dilated a little so antialiased stroke and border fringes go too.

The mask is cleaned as scikit-image's morphology cleans it (opening, closing, small-object removal,
filling of small holes; tests compare the two), with NumPy and SciPy's labelling: importing
``skimage.morphology`` pulls in ``scipy.spatial``, a tenth of a second of every command's start-up.
For the same reason the ink test computes the hue as ``skimage.color.rgb2hsv`` does (tested bit for bit)
instead of importing ``skimage.color``, which loads ``scipy.linalg``; brightness and saturation are taken
on the thumbnail's bytes before scaling them to [0, 1] (the same values, a third of the memory traffic).
Dark-field slides (fluorescence: a dark background, see :func:`is_darkfield`) are detected and segmented on brightness instead. TMA cores are tissue pieces like any other (pieces
below ``min_tissue_um2`` are dropped as debris).

What cannot be told apart by colour, and is documented rather than guessed: red ink from eosin (red
ink stays tissue); pale blue marker from haematoxylin counterstain (pale blue ink stays tissue); a
haematoxylin-only stain saturated beyond 0.55 at thumbnail scale from blue marker (removed as ink);
dark-field pen marks (none are removed). Use ``--tissue-mask`` when these matter.

Everything here works on arrays and is independent of slide readers: :func:`detect_tissue` takes an
RGB thumbnail, :func:`tile_tissue_fractions` takes the mask and tile rectangles in mask pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage import filters

from wsi_encoder.errors import InvalidParameterError

logger = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
ScalarT = TypeVar("ScalarT", np.uint8, np.float32)

#: Name recorded in stores for this detector (bump when results change).
TISSUE_METHOD = "skimage-otsu-saturation-darkness-v3"
#: Name recorded when a thumbnail was segmented as a dark-field (fluorescence) image.
TISSUE_METHOD_DARKFIELD = "skimage-otsu-darkfield-v1"

_DARK_V = 0.25
_BLUE_HUE = (165.0, 235.0)
#: Blue marker is this saturated; haematoxylin counterstain (IHC) stays below it at thumbnail scale.
_BLUE_INK_MIN_SAT = 0.55
#: Tissue absorbs light: this much darker (channel max, 0-1) than the glass is tissue, whatever its colour.
_DARKER_THAN_GLASS = 0.12
_GREEN_HUE = (75.0, 165.0)
_DARKFIELD_MEDIAN_V = 0.25
_SATURATION_RANGE = (0.04, 0.08)
#: Glass: bright (channel max above this) and unsaturated; below this share of glass pixels there is none.
_GLASS_MIN_V = 0.85
_GLASS_MAX_SAT = 0.1
_MIN_GLASS_FRACTION = 0.01
#: 4-connectivity, scikit-image's default for small objects and holes.
_CONNECTIVITY_1 = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask and how it was made.

    ``mask`` is ``(h, w)`` bool at the thumbnail's resolution; ``ink`` marks pen/dark pixels that
    were excluded; ``method`` is :data:`TISSUE_METHOD` or :data:`TISSUE_METHOD_DARKFIELD`;
    ``threshold`` is the saturation (or brightness) threshold used, in [0, 1].
    """

    mask: BoolArray
    ink: BoolArray
    method: str
    threshold: float

    @property
    def fraction(self) -> float:
        """Fraction of the thumbnail that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def ink_mask(rgb: npt.NDArray[np.floating]) -> BoolArray:
    """Blue, green and black marker ink, black borders and slide edges in an RGB image in [0, 1]."""
    rgb = np.asarray(rgb, dtype=np.float32)
    value = _channel_max(rgb)
    return _ink(rgb, value, _saturation(value, _channel_min(rgb)))


def _channel_max(rgb: npt.NDArray[ScalarT]) -> npt.NDArray[ScalarT]:
    # Elementwise over the three planes: much faster than a reduction along a length-3 axis.
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def _channel_min(rgb: npt.NDArray[ScalarT]) -> npt.NDArray[ScalarT]:
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def _value_and_low(thumbnail: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The largest and smallest channel of each pixel of a uint8 RGB image, in [0, 1]: taken on the bytes,
    then scaled (the values of :func:`_channel_max` / :func:`_channel_min` of :func:`_unit_float`, as
    scaling keeps the order, at a fraction of the memory traffic)."""
    return _unit_float(_channel_max(thumbnail)), _unit_float(_channel_min(thumbnail))


def _saturation(value: npt.NDArray[np.float32], low: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """HSV saturation ``(max - min) / max`` (what ``skimage.color.rgb2hsv`` gives, without the hue)."""
    return np.divide(value - low, value, out=np.zeros_like(value), where=value > 0)


def _ink(rgb: npt.NDArray[np.float32], value: npt.NDArray[np.float32], sat: npt.NDArray[np.float32]) -> BoolArray:
    # Black ink, scanner borders and slide edges are dark and neutral; dense nuclei are dark but purple.
    ink = (value < _DARK_V) & (sat < 0.4)
    # H&E never reaches the blue/green hues: haematoxylin has red above green (hue >= 240), eosin is
    # red. Hue is computed (as scikit-image does) only where it could make a pixel ink: saturated, red not
    # the brightest channel (else the hue lies in [300, 360) or [0, 60], outside both ranges), and green
    # the brightest or blue-ink saturated (blue brightest puts the hue in [180, 300): only blue ink can be there).
    r, g = rgb[..., 0], rgb[..., 1]
    coloured = np.flatnonzero((sat > 0.2) & (r < value) & ((g == value) | (sat > _BLUE_INK_MIN_SAT)))
    if coloured.size:
        hue, s = _hue(rgb.reshape(-1, 3)[coloured]) * 360.0, sat.reshape(-1)[coloured]
        blue = (hue >= _BLUE_HUE[0]) & (hue < _BLUE_HUE[1]) & (s > _BLUE_INK_MIN_SAT)
        green = (hue >= _GREEN_HUE[0]) & (hue < _GREEN_HUE[1])
        ink.reshape(-1)[coloured[blue | green]] = True
    return ink


def _hue(pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The HSV hue in [0, 1) of ``(n, 3)`` float32 RGB pixels, as ``skimage.color.rgb2hsv`` computes it
    (the same float32 steps; where channels tie for the maximum, blue's formula over green's over red's;
    0 for grey). Spares its import (``skimage.color`` loads ``scipy.linalg``) and its other channels."""
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    v = np.maximum(np.maximum(r, g), b)
    delta = v - np.minimum(np.minimum(r, g), b)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(b == v, 4.0 + (r - g) / delta, np.where(g == v, 2.0 + (b - r) / delta, (g - b) / delta))
    h = (h / 6.0) % 1.0
    h[delta == 0.0] = 0.0
    return h


def is_darkfield(thumbnail: npt.NDArray[np.uint8]) -> bool:
    """Whether a slide's thumbnail shows a dark background (fluorescence, dark-field), not bright glass.

    Dark when most of the picture is dark, or when its outer frame (where glass shows on almost every
    slide) is dark although the tissue covers more than half of the view.
    """
    if thumbnail.size == 0:
        return False
    return _is_darkfield(*_value_and_low(thumbnail))


def _unit_float(thumbnail: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """uint8 -> float32 in [0, 1], in one pass (the values of ``astype(float32) / 255``)."""
    return np.divide(thumbnail, np.float32(255.0), dtype=np.float32)


def _is_darkfield(value: npt.NDArray[np.float32], low: npt.NDArray[np.float32]) -> bool:
    if float(np.median(value)) < _DARKFIELD_MEDIAN_V:
        return True
    h, w = value.shape
    band = max(1, min(h, w) // 20)
    frame = np.concatenate([value[:band].ravel(), value[-band:].ravel(), value[:, :band].ravel(), value[:, -band:].ravel()])
    if float(np.median(frame)) >= _DARKFIELD_MEDIAN_V:
        return False
    bright_glass = float(np.mean((value > _GLASS_MIN_V) & (_saturation(value, low) < _GLASS_MAX_SAT)))
    return bright_glass < _MIN_GLASS_FRACTION


def background_value(thumbnail: npt.NDArray[np.uint8]) -> int:
    """The value padding takes on a slide: 0 on a dark-field slide, 255 (white glass) otherwise."""
    return 0 if is_darkfield(thumbnail) else 255


def _area_px(area_um2: float, mpp: float | None, fallback_fraction: float, shape: tuple[int, int]) -> int:
    if mpp is not None and mpp > 0:
        return max(1, round(area_um2 / (mpp * mpp)))
    return max(1, round(fallback_fraction * shape[0] * shape[1]))


def detect_tissue(
    thumbnail: npt.NDArray[np.uint8],
    thumbnail_mpp: float | None = None,
    *,
    min_tissue_um2: float = 10_000.0,
    max_hole_um2: float = 10_000.0,
) -> TissueMask:
    """Segment tissue on an RGB thumbnail.

    Parameters
    ----------
    thumbnail
        ``(h, w, 3)`` uint8 RGB image of the whole slide.
    thumbnail_mpp
        µm per thumbnail pixel, used to express the area limits physically; when None the limits
        become fractions of the thumbnail (1e-4 of its area).
    min_tissue_um2
        Tissue pieces smaller than this (µm²) are dropped (dust, debris).
    max_hole_um2
        Holes inside tissue smaller than this (µm²) are filled (small lumens, nuclei-free gaps).

    Returns
    -------
    TissueMask
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise InvalidParameterError(f"thumbnail must be (h, w, 3) uint8 RGB, got {thumbnail.shape} {thumbnail.dtype}")
    shape = (int(thumbnail.shape[0]), int(thumbnail.shape[1]))
    if min(shape) < 4:
        empty = np.zeros(shape, dtype=bool)
        return TissueMask(mask=empty, ink=empty.copy(), method=TISSUE_METHOD, threshold=0.0)
    value, low = _value_and_low(thumbnail)
    min_obj = _area_px(min_tissue_um2, thumbnail_mpp, 1e-4, shape)
    max_hole = _area_px(max_hole_um2, thumbnail_mpp, 1e-4, shape)
    if _is_darkfield(value, low):
        return _darkfield(value, min_obj, max_hole)

    rgb = _unit_float(thumbnail)
    sat = _saturation(value, low)
    # Isolated specks of ink colour inside tissue (a dark nucleus, a bluish pixel) are not pen
    # strokes; drop them, then grow the rest a little: antialiased stroke and border fringes go too.
    ink = _dilate_where_set(_remove_small(_ink(rgb, value, sat), max(8, min_obj // 20)), 2)
    saturation = filters.gaussian(sat, sigma=1.0, preserve_range=True)
    candidates = saturation[~ink]
    glass = float(np.mean((value > _GLASS_MIN_V) & (sat < _GLASS_MAX_SAT)))
    if candidates.size < 16 or float(np.ptp(candidates)) < 1e-3:
        threshold = _SATURATION_RANGE[1]
    elif glass < _MIN_GLASS_FRACTION:
        # No glass in view (a field of tissue: a crop, a TMA core, a BreaKHis image): Otsu would split
        # the tissue itself in two, so everything more saturated than glass counts.
        threshold = _SATURATION_RANGE[0]
    else:
        threshold = float(np.clip(filters.threshold_otsu(candidates), *_SATURATION_RANGE))
    mask = saturation > threshold
    glassy = (value > _GLASS_MIN_V) & (sat < _GLASS_MAX_SAT)
    if glass >= _MIN_GLASS_FRACTION:
        # Faint and unstained tissue is nearly grey but darker than the glass around it.
        glass_v = float(np.median(value[glassy]))
        mask |= filters.gaussian(value, sigma=1.0, preserve_range=True) < glass_v - _DARKER_THAN_GLASS
    mask &= ~ink
    mask = _clean(mask, min_obj, max_hole)
    mask &= ~ink
    logger.debug("tissue: saturation threshold %.3f, %.1f%% tissue, %.1f%% ink", threshold, 100 * mask.mean(), 100 * ink.mean())
    return TissueMask(mask=mask, ink=ink, method=TISSUE_METHOD, threshold=threshold)


def _darkfield(value: npt.NDArray[np.float32], min_obj: int, max_hole: int) -> TissueMask:
    value = filters.gaussian(value, sigma=1.0, preserve_range=True)
    if float(np.ptp(value)) < 1e-3:
        threshold = 1.0
    else:
        threshold = float(filters.threshold_otsu(value))
    # Otsu on dim fluorescence often splits inside the tissue; the tissue is whatever is above the
    # dark background, so place the cut between the background level and Otsu's value.
    background = float(np.percentile(value, 5))
    threshold = background + 0.5 * max(threshold - background, 0.0)
    mask = _clean(value > threshold, min_obj, max_hole)
    return TissueMask(mask=mask, ink=np.zeros_like(mask), method=TISSUE_METHOD_DARKFIELD, threshold=threshold)


def _dilate_where_set(mask: BoolArray, radius: int) -> BoolArray:
    """``skimage.morphology.dilation(mask, disk(radius))``, computed on the box around the set pixels only.

    Ink covers a small part of most thumbnails (none of many): dilating the whole picture cost a
    fifth of the detection. Within ``radius`` of the box's edge nothing is set beyond it, so the
    result equals the full dilation.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask.copy()
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(int(rows[0]) - 2 * radius, 0), min(int(rows[-1]) + 2 * radius + 1, mask.shape[0])
    x0, x1 = max(int(cols[0]) - 2 * radius, 0), min(int(cols[-1]) + 2 * radius + 1, mask.shape[1])
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = _dilate(mask[y0:y1, x0:x1], radius)
    return out


def _disk_offsets(radius: int) -> npt.NDArray[np.intp]:
    """``(k, 2)`` row and column offsets, from 0 to ``2 * radius``, of ``skimage.morphology.disk(radius)``'s pixels."""
    d = np.arange(-radius, radius + 1)
    return np.argwhere(d[:, None] ** 2 + d[None, :] ** 2 <= radius * radius)


def _erode(mask: BoolArray, radius: int) -> BoolArray:
    """``skimage.morphology.erosion(mask, disk(radius))``, border mode ``reflect``.

    The AND of the mask shifted by each of the disk's offsets, on a copy padded by reflection
    (NumPy's ``symmetric`` is SciPy's ``reflect``): on a bool mask a tenth of the time of SciPy's
    minimum filter with the disk's footprint."""
    return _combine_shifted(mask, radius, np.logical_and, True)


def _dilate(mask: BoolArray, radius: int) -> BoolArray:
    """``skimage.morphology.dilation(mask, disk(radius))``, border mode ``reflect``: the OR of the
    shifted masks (the disk is symmetric, so scikit-image's mirroring of it changes nothing)."""
    return _combine_shifted(mask, radius, np.logical_or, False)


def _combine_shifted(mask: BoolArray, radius: int, op: np.ufunc, start: bool) -> BoolArray:
    h, w = mask.shape
    padded = np.pad(mask, radius, mode="symmetric")
    out = np.full_like(mask, start)
    for dy, dx in _disk_offsets(radius):
        op(out, padded[dy : dy + h, dx : dx + w], out=out)
    return out


def _clean(mask: BoolArray, min_obj: int, max_hole: int) -> BoolArray:
    """Opening with ``disk(1)``, closing with ``disk(2)``, then components and holes of at most
    ``min_obj`` / ``max_hole`` px removed: ``skimage.morphology``'s opening, closing,
    ``remove_small_objects`` and ``remove_small_holes`` (border mode ``reflect``, 4-connectivity)."""
    mask = _erode(_dilate(_dilate(_erode(mask, 1), 1), 2), 2)
    mask = _remove_small(mask, min_obj)
    return ~_remove_small(~mask, max_hole)


def _remove_small(mask: BoolArray, max_px: int) -> BoolArray:
    """Drop 4-connected components of at most ``max_px`` pixels."""
    labels, _ = ndimage.label(mask, _CONNECTIVITY_1)
    too_small = np.bincount(labels.ravel()) <= max_px  # label 0 (background) stays False under the &
    return mask & ~too_small[labels]


def tile_tissue_fractions(mask: BoolArray, boxes: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Fraction of each box covered by the mask, with sub-pixel box edges.

    Parameters
    ----------
    mask
        ``(h, w)`` bool tissue mask.
    boxes
        ``(N, 4)`` boxes ``(x0, y0, x1, y1)`` in mask pixels (floats; parts outside count as no tissue).

    Returns
    -------
    ``(N,)`` float32 in [0, 1]: the area-weighted mean of the mask over each box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.float32)
    h, w = mask.shape
    # Summed-area table with a zero border: sat[i, j] = mask[:i, :j].sum(); it is exactly bilinear
    # between integer nodes for a piecewise-constant mask, so interpolating it gives exact areas.
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    x0 = np.clip(boxes[:, 0], 0, w)
    y0 = np.clip(boxes[:, 1], 0, h)
    x1 = np.clip(boxes[:, 2], 0, w)
    y1 = np.clip(boxes[:, 3], 0, h)

    def at(y: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        iy = np.minimum(np.floor(y).astype(np.int64), h - 1)
        ix = np.minimum(np.floor(x).astype(np.int64), w - 1)
        fy, fx = y - iy, x - ix
        return (
            sat[iy, ix] * (1 - fy) * (1 - fx)
            + sat[iy + 1, ix] * fy * (1 - fx)
            + sat[iy, ix + 1] * (1 - fy) * fx
            + sat[iy + 1, ix + 1] * fy * fx
        )

    covered = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(area > 0, covered / np.where(area > 0, area, 1.0), 0.0)
    return np.clip(fraction, 0.0, 1.0).astype(np.float32)
