"""Drawing pictures with numpy and Pillow: colour maps, the font and colour bars.

The pictures of the per-slide paths (the tiling QC picture, the heatmaps of ``predict`` and ``classify
predict``) are drawn with these, in tens of milliseconds and without importing matplotlib (about half a
second of a one-slide ``predict``). Summary plots (ROC, reliability, Kaplan-Meier) stay in matplotlib.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from PIL import Image, ImageFont

# 17 evenly spaced entries of matplotlib's colour maps, linearly interpolated to 256 (within 8 of 255 levels
# of matplotlib's own tables on every channel).
_ANCHORS: dict[str, list[list[int]]] = {
    "viridis": [[68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141],
                [44, 114, 142], [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128], [63, 188, 115],
                [94, 201, 98], [132, 212, 75], [173, 220, 48], [216, 226, 25], [253, 231, 37]],
    "inferno": [[0, 0, 4], [11, 7, 36], [33, 12, 74], [61, 9, 101], [87, 16, 110], [113, 25, 110],
                [138, 34, 106], [163, 44, 97], [188, 55, 84], [210, 70, 68], [228, 90, 49], [241, 115, 29],
                [249, 142, 9], [252, 172, 17], [249, 203, 53], [242, 234, 105], [252, 255, 164]],
    "RdBu_r": [[5, 48, 97], [23, 82, 144], [42, 113, 178], [63, 142, 192], [107, 172, 209], [155, 201, 224],
               [194, 221, 236], [224, 236, 243], [247, 246, 246], [251, 229, 216], [251, 204, 180],
               [245, 170, 137], [228, 128, 102], [208, 85, 72], [186, 40, 50], [147, 14, 38], [103, 0, 31]],
}  # fmt: skip

#: The colour maps :func:`colormap` knows.
COLORMAPS = tuple(_ANCHORS)


@cache
def colormap(name: str) -> npt.NDArray[np.uint8]:
    """The colour map ``name`` (one of :data:`COLORMAPS`) as a read-only ``(256, 3)`` 8-bit RGB table."""
    if name not in _ANCHORS:
        raise ValueError(f"unknown colour map {name!r}; known: {', '.join(COLORMAPS)}")
    anchors = np.asarray(_ANCHORS[name], dtype=np.float64)
    t = np.linspace(0.0, 1.0, 256)
    grid = np.linspace(0.0, 1.0, len(anchors))
    lut = np.stack([np.interp(t, grid, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)
    lut.setflags(write=False)
    return lut


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib; it has ``µ``) at ``size`` px, else Pillow's default font."""
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def value_range(values: npt.ArrayLike, *, signed: bool) -> tuple[float, float]:
    """The colour scale's limits of a heatmap: ``(-b, b)`` with ``b = max |value|`` when ``signed`` (a diverging
    map centred on 0), else the finite minimum and maximum; ``(-1, 1)`` / ``(0, 1)`` when there is no finite value."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if signed:
        bound = float(np.abs(finite).max()) if finite.size else 0.0
        return (-bound, bound) if bound > 0 else (-1.0, 1.0)
    if not finite.size:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def levels(values: npt.NDArray[np.floating], vmin: float, vmax: float) -> npt.NDArray[np.intp]:
    """Indices into a 256-entry colour map for ``values`` scaled from ``[vmin, vmax]`` (clipped; NaN -> 0)."""
    span = vmax - vmin
    scaled = (np.asarray(values, dtype=np.float64) - vmin) / (span if span > 0 else 1.0)
    return (np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0) * 255 + 0.5).astype(np.intp)


def draw_colorbar(
    canvas: Image.Image,
    box: tuple[int, int, int, int],
    lut: npt.NDArray[np.uint8],
    ticks: Sequence[tuple[float, str]],
    *,
    label: str = "",
    alpha: float = 1.0,
) -> None:
    """A vertical colour bar on ``canvas`` in ``box`` ``(x, y, width, height)``: ``lut`` from the bottom (0) to the top (1),
    blended with white at ``alpha`` as the picture is, outlined, with ``ticks`` ``(position 0..1, text)`` to its
    right and ``label`` above it."""
    from PIL import Image, ImageDraw

    x, y, width, height = box
    ramp = lut[np.linspace(255, 0, height).round().astype(np.intp)].astype(np.float32)
    tinted = ((1 - alpha) * 255 + alpha * ramp).round().astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(tinted[:, None], width, axis=1)), (x, y))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x, y, x + width - 1, y + height - 1), outline="black")
    small = font(11)
    for position, text in ticks:
        ty = y + round((1 - position) * (height - 1))
        draw.line((x + width, ty, x + width + 4, ty), fill="black")
        draw.text((x + width + 7, ty), text, fill="black", font=small, anchor="lm")
    if label:
        draw.text((x, y - 6), label, fill="black", font=small, anchor="ld")
