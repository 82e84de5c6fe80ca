"""The QC picture: what it draws is where the tiles and the tissue are."""

from __future__ import annotations

import numpy as np

from wsi_encoder.qc import render_tile_qc, tile_overlay


def test_overlapping_boxes_keep_the_larger_value_in_any_order() -> None:
    boxes = np.array([[0, 0, 6, 6], [3, 3, 9, 9], [2.5, 2.5, 4.2, 4.2]])
    values = np.array([0.9, 0.2, 0.5], np.float32)
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        overlay = tile_overlay((10, 10), boxes[order], values[order])
        assert overlay[1, 1] == np.float32(0.9) and overlay[4, 4] == np.float32(0.9) and overlay[7, 7] == np.float32(0.2)
        assert np.isnan(overlay[9, 0]) and np.isnan(overlay[0, 9])


def test_picture_draws_tiles_by_tissue_fraction_and_the_tissue_outline() -> None:
    thumbnail = np.full((200, 300, 3), 240, np.uint8)
    mask = np.zeros((200, 300), bool)
    mask[50:150, 50:150] = True
    coords = np.array([[0, 0], [2000, 1000]])  # level-0 px; the slide is 3000 x 2000, tiles of 500
    attrs = {"width": 3000, "height": 2000, "tile_size_l0": 500, "tile_size": 256, "actual_mpp": 0.5,
             "target_mpp": 0.5, "level": 0, "tissue_threshold": 0.25}  # fmt: skip
    picture = np.asarray(render_tile_qc(thumbnail, mask, coords, np.array([0.0, 1.0]), attrs, "slide"))
    assert picture.shape[1] >= 800
    top, left = 44, 10  # where the slide's picture sits on the canvas
    slide = picture[top : top + 200, left : left + 300].astype(int)
    # tile 1 (tissue 0): viridis' purple at 30% over the grey; tile 2 (tissue 1): its yellow
    assert slide[20, 20, 2] > slide[20, 20, 1] and slide[120, 220, 0] > slide[120, 220, 2]
    assert (slide[60:90, 110:140] == 240).all()  # no tile there: the thumbnail as it is
    assert (slide[50, 60:140] == [0, 200, 83]).all()  # the tissue outline, green
