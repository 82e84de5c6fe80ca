"""Heatmaps of a slide model over the slide's thumbnail (PNG, drawn with numpy and Pillow), and their ``.npy`` grids.

A heatmap picture has two panels: the thumbnail, and the thumbnail under the ``(R, Q)`` grid map of the
model's tile scores (attention, Grad-CAM or signed logit contributions; each grid cell drawn as the square
of slide it covers, NaN cells left clear), with a colour bar and a title giving the slide's prediction.
Drawing it takes a few milliseconds, where matplotlib took about half a second per slide of ``wsienc
predict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from wsi_encoder.io.files import atomic_path, atomic_write_image
from wsi_encoder.pictures import colormap, draw_colorbar, font, levels, value_range

if TYPE_CHECKING:
    from PIL import Image

    from wsi_encoder.io.slide_records import SlideGeometry
    from wsi_encoder.models.slide_classifiers import SlideClassifier
    from wsi_encoder.models.slide_classifiers.ensemble import FoldEnsemble

#: Longer side of each panel (px).
PANEL_PX = 480
#: Opacity of the heat over the thumbnail.
HEAT_ALPHA = 0.55


def _cell_index(n_px: int, scale: float, origin: float, step: float, n_cells: int) -> npt.NDArray[np.intp]:
    """The grid cell under the centre of each of ``n_px`` panel pixels (-1: outside the grid)."""
    at = (np.arange(n_px) + 0.5) / scale  # thumbnail pixels
    cell = np.floor((at - origin) / step).astype(np.intp)
    cell[(cell < 0) | (cell >= n_cells)] = -1
    return cell


def render_heatmap(
    thumbnail: npt.NDArray[np.uint8] | None,
    heat: npt.NDArray[np.floating],
    *,
    geometry: SlideGeometry | None = None,
    title: str = "",
    label: str = "",
    signed: bool = False,
) -> Image.Image:
    """The heatmap picture of the ``(R, Q)`` map ``heat`` (NaN: no tissue) over ``thumbnail``.

    ``geometry`` places the grid on the thumbnail (grid origin, step and slide size in level-0 pixels);
    without it the map is stretched over the whole thumbnail. ``signed`` uses a diverging colour map (RdBu)
    centred on 0, for logit contributions; otherwise a sequential one (inferno) from the map's minimum to
    its maximum. Without a thumbnail, the map alone is drawn on white.
    """
    from PIL import Image, ImageDraw

    grid: npt.NDArray[np.float64] = np.asarray(heat, dtype=np.float64)
    rows, cols = grid.shape
    lut = colormap("RdBu_r" if signed else "inferno")
    vmin, vmax = value_range(grid, signed=signed)
    if thumbnail is not None:
        base = np.asarray(thumbnail)[..., :3]
        th, tw = base.shape[:2]
        if geometry is not None:
            sx, sy = tw / geometry.size_l0[0], th / geometry.size_l0[1]
            x0, y0 = geometry.origin_l0[0] * sx, geometry.origin_l0[1] * sy
            cw, ch = geometry.stride_l0 * sx, geometry.stride_l0 * sy
        else:
            x0, y0, cw, ch = 0.0, 0.0, tw / cols, th / rows
    else:
        th, tw = rows, cols
        x0, y0, cw, ch = 0.0, 0.0, 1.0, 1.0
    scale = PANEL_PX / max(th, tw)
    pw, ph = max(1, round(tw * scale)), max(1, round(th * scale))
    if thumbnail is not None:
        resample = Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.NEAREST
        panel = np.asarray(Image.fromarray(np.ascontiguousarray(base, dtype=np.uint8)).resize((pw, ph), resample))
    else:
        panel = np.full((ph, pw, 3), 255, dtype=np.uint8)
    r = _cell_index(ph, ph / th, y0, ch, rows)
    c = _cell_index(pw, pw / tw, x0, cw, cols)
    inside = (r[:, None] >= 0) & (c[None, :] >= 0)
    values = grid[np.maximum(r, 0)[:, None], np.maximum(c, 0)[None, :]]
    shown = inside & np.isfinite(values)
    colour = lut[levels(values, vmin, vmax)].astype(np.float32)
    alpha = HEAT_ALPHA if thumbnail is not None else 1.0
    over = (1 - alpha) * panel.astype(np.float32) + alpha * colour
    overlaid = np.where(shown[..., None], over.round(), panel).astype(np.uint8)

    large, small = font(13), font(11)
    margin, top, gap, bar_w = 10, 46 if title else 26, 16, 16
    panels = [panel, overlaid] if thumbnail is not None else [overlaid]
    names = ["thumbnail", label] if thumbnail is not None else [label]
    width = margin + len(panels) * (pw + gap) + bar_w + 70
    canvas = Image.new("RGB", (width, top + ph + margin), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width // 2, 6), title, fill="black", font=large, anchor="ma")
    x = margin
    for picture, name in zip(panels, names, strict=True):
        canvas.paste(Image.fromarray(picture), (x, top))
        draw.text((x + pw // 2, top - 4), name, fill="black", font=small, anchor="md")
        x += pw + gap
    ticks = [(p, f"{vmin + p * (vmax - vmin):.3g}") for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    bar_h = max(ph * 3 // 4, 60)
    draw_colorbar(canvas, (x, top + (ph - bar_h) // 2, bar_w, bar_h), lut, ticks, alpha=alpha)
    return canvas


def plot_heatmap(
    thumbnail: npt.NDArray[np.uint8] | None,
    heat: npt.NDArray[np.floating],
    path: str | Path,
    *,
    geometry: SlideGeometry | None = None,
    title: str = "",
    label: str = "",
    signed: bool = False,
) -> Path:
    """Write :func:`render_heatmap`'s picture to ``path`` (PNG, atomically)."""
    path = Path(path)
    atomic_write_image(path, render_heatmap(thumbnail, heat, geometry=geometry, title=title, label=label, signed=signed))
    return path


def save_heatmap(
    heat_dir: str | Path,
    slide_id: str,
    heat: npt.NDArray[np.floating],
    thumbnail: npt.NDArray[np.uint8] | None,
    geometry: SlideGeometry | None,
    *,
    title: str,
    label: str,
    signed: bool = False,
) -> Path:
    """``<heat_dir>/<slide_id>.npy`` (the ``(R, Q)`` float32 map, NaN outside tissue) and ``.png``; returns the PNG."""
    heat_dir = Path(heat_dir)
    with atomic_path(heat_dir / f"{slide_id}.npy") as tmp, tmp.open("wb") as fh:
        np.save(fh, np.asarray(heat, dtype=np.float32), allow_pickle=False)
    return plot_heatmap(thumbnail, heat, heat_dir / f"{slide_id}.png", geometry=geometry, title=title, label=label,
                        signed=signed)  # fmt: skip


def plot_slide_prediction(
    model: SlideClassifier | FoldEnsemble,
    slide_id: str,
    heat: npt.NDArray[np.floating],
    prob: npt.NDArray[np.floating],
    classes: Sequence[str],
    heat_dir: str | Path,
    thumbnail: npt.NDArray[np.uint8] | None,
    geometry: SlideGeometry | None,
) -> Path:
    """:func:`save_heatmap` of a slide classifier's map, titled with the slide's predicted class.

    ``model``'s ``name``, ``heatmap_kind`` and ``heatmap_signed`` label the picture.
    """
    prob = np.asarray(prob, dtype=float)
    top = int(prob.argmax())
    verdict = f"P({classes[1]}) = {prob[1]:.3f}" if len(classes) == 2 else f"predicted {classes[top]} (p = {prob[top]:.3f})"
    return save_heatmap(heat_dir, slide_id, heat, thumbnail, geometry, title=f"{slide_id}: {verdict}",
                        label=f"{model.name}: {model.heatmap_kind}", signed=bool(model.heatmap_signed))  # fmt: skip
