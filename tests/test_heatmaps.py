"""Heatmap pictures drawn with Pillow: each grid cell lands on the slide area it covers, in the right colour."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image

from wsi_encoder.evaluation.heatmaps import HEAT_ALPHA, PANEL_PX, plot_heatmap, render_heatmap, save_heatmap
from wsi_encoder.io.slide_records import SlideGeometry
from wsi_encoder.pictures import COLORMAPS, colormap


@pytest.mark.parametrize("name", COLORMAPS)
def test_colormaps_follow_matplotlib(name: str) -> None:
    ours = colormap(name).astype(float)
    theirs = matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255
    assert np.abs(ours - theirs).max() <= 8


def _panel(picture: Image.Image, index: int) -> np.ndarray:
    """The ``index``-th panel of a heatmap picture (the layout of render_heatmap: margin 10, gap 16, top 46)."""
    x = 10 + index * (PANEL_PX + 16)
    return np.asarray(picture)[46 : 46 + PANEL_PX, x : x + PANEL_PX]


def test_cells_land_where_the_grid_covers_the_slide() -> None:
    # A 2x3 grid of 1000-px cells from (500, 0) on a 4000 x 4000 slide; the thumbnail is 400 x 400 (0.1 px/px).
    thumb = np.full((400, 400, 3), 200, dtype=np.uint8)
    heat = np.array([[0.0, 1.0, np.nan], [0.5, 0.25, 0.75]])
    geometry = SlideGeometry((500.0, 0.0), 1000.0, (4000.0, 4000.0), estimated=False)
    picture = render_heatmap(thumb, heat, geometry=geometry, title="t", label="abmil: attention")
    assert picture.height == 46 + PANEL_PX + 10
    plain, over = _panel(picture, 0), _panel(picture, 1)
    assert (plain == 200).all()
    lut = colormap("inferno").astype(float)
    scale = PANEL_PX / 400  # panel px per thumbnail px; a cell is 100 thumbnail px
    def at(row: float, col: float) -> np.ndarray:
        return over[round((row * 100 + 50) * scale), round((50 + col * 100 + 50) * scale)].astype(float)
    for (r, c), value in np.ndenumerate(heat):
        if np.isfinite(value):
            expected = (1 - HEAT_ALPHA) * 200 + HEAT_ALPHA * lut[round(value * 255)]
            np.testing.assert_allclose(at(r, c), expected, atol=1.01)
    np.testing.assert_array_equal(at(0, 2), [200, 200, 200])  # NaN: no tissue, the thumbnail shows
    assert (over[:, : round(40 * scale)] == 200).all()  # left of the grid's origin
    assert (over[round(210 * scale) :] == 200).all()  # below the grid


def test_signed_maps_are_centred_on_zero(tmp_path) -> None:
    heat = np.array([[-2.0, 0.0, 1.0]])
    png = plot_heatmap(None, heat, tmp_path / "h.png", title="s0", label="linear: logit", signed=True)
    band = np.asarray(Image.open(png).convert("RGB"))[46 + 10, 10 : 10 + PANEL_PX]  # a row of the only panel
    lut, cell = colormap("RdBu_r"), PANEL_PX // 3
    np.testing.assert_array_equal(band[cell // 2], lut[0])  # -2: the far blue end (the bound is max |heat|)
    np.testing.assert_array_equal(band[cell + cell // 2], lut[128])  # 0: the centre
    np.testing.assert_array_equal(band[2 * cell + cell // 2], lut[round(0.75 * 255)])


def test_save_heatmap_writes_the_grid_and_the_picture(tmp_path) -> None:
    heat = np.array([[np.nan, 0.2], [0.4, 0.9]], dtype=np.float64)
    png = save_heatmap(tmp_path, "s0", heat, np.zeros((50, 50, 3), np.uint8), None, title="s0", label="x")
    assert png == tmp_path / "s0.png" and Image.open(png).format == "PNG"
    np.testing.assert_array_equal(np.load(tmp_path / "s0.npy"), heat.astype(np.float32))


def test_geojson_colours_are_the_pictures_colours() -> None:
    from wsi_encoder.overlays import score_colors

    heat = np.array([[-1.5, 0.0, 3.0, np.nan]])
    band = np.asarray(render_heatmap(None, heat, title="s", signed=True))[46 + 10, 10 : 10 + PANEL_PX]
    cell = PANEL_PX // 4
    colours = score_colors(heat[0], signed=True)
    for i in range(3):
        np.testing.assert_array_equal(colours[i], band[i * cell + cell // 2])
    np.testing.assert_array_equal(colours[3], [128, 128, 128])  # no value: grey in QuPath
