"""The QC picture: what it draws is where the tiles and the tissue are."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_encoder.qc import _tint_tiles, render_tile_qc, tile_map


def _painted(shape: tuple[int, int], boxes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference: paint the rounded boxes one by one in ascending value order (a stable sort), then mark
    the pixels whose left / upper neighbour is another box (or none), or whose right / lower one is none."""
    h, w = shape
    ids = np.full(shape, -1)
    for i in np.argsort(values.astype(np.float32), kind="stable"):
        x0, y0 = max(0, round(boxes[i, 0])), max(0, round(boxes[i, 1]))
        x1, y1 = min(w, max(x0 + 1, round(boxes[i, 2]))), min(h, max(y0 + 1, round(boxes[i, 3])))
        ids[y0:y1, x0:x1] = i
    padded = np.pad(ids, 1, constant_values=-1)
    inner = padded[1:-1, 1:-1]
    edge = (inner >= 0) & (
        (padded[1:-1, :-2] != inner) | (padded[:-2, 1:-1] != inner) | (padded[1:-1, 2:] < 0) | (padded[2:, 1:-1] < 0)
    )
    return ids, edge


def _grid(n: int, size: float, stride: float, offset: float = 0.0) -> np.ndarray:
    xy = np.stack(np.meshgrid(np.arange(n) * stride + offset, np.arange(n) * stride + offset), axis=-1).reshape(-1, 2)
    return np.column_stack([xy, xy + size])


def test_tile_map_equals_painting_the_boxes_one_by_one() -> None:
    rng = np.random.default_rng(0)
    cases = [
        ((60, 70), _grid(10, 6.25, 6.25, 0.3)),  # a full grid at a fractional scale, running past the map
        ((40, 40), _grid(8, 6.0, 3.0, 1.0)),  # overlapping tiles (stride half the size)
        ((30, 50), _grid(12, 2.6, 2.6)),  # tiles of 2-3 px
        ((25, 25), np.array([[-5, -5, 3, 3], [30, 30, 40, 40], [4.4, 4.4, 4.6, 4.6], [0, 0, 25, 25]], float)),
        ((10, 10), np.zeros((0, 4))),
    ]
    for _ in range(20):  # random boxes, overlapping, some outside or degenerate
        xy = rng.uniform(-5, 45, (30, 2))
        cases.append(((rng.integers(1, 40), rng.integers(1, 40)), np.column_stack([xy, xy + rng.uniform(0, 15, (30, 2))])))
    for shape, boxes in cases:
        for values in (rng.random(len(boxes)), rng.integers(0, 3, len(boxes)).astype(float)):  # ties too
            ids, edge = _painted(shape, boxes, values)
            tiles = tile_map(shape, boxes, values)
            np.testing.assert_array_equal(tiles.expand(tiles.box), ids)
            np.testing.assert_array_equal(tiles.expand(tiles.edge), edge)


def test_tile_map_in_small_batches_of_cells_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    # densely overlapping tiles are taken a bounded number of (box, cell) pairs at a time
    import wsi_encoder.qc as qc

    boxes, values = _grid(9, 8.0, 2.0, 0.5), np.random.default_rng(2).random(81)
    monkeypatch.setattr(qc, "_CELL_BATCH", 7)
    tiles = tile_map((30, 30), boxes, values)
    ids, edge = _painted((30, 30), boxes, values)
    np.testing.assert_array_equal(tiles.expand(tiles.box), ids)
    np.testing.assert_array_equal(tiles.expand(tiles.edge), edge)


def test_overlapping_boxes_keep_the_larger_value_in_any_order() -> None:
    boxes = np.array([[0, 0, 6, 6], [3, 3, 9, 9], [2.5, 2.5, 4.2, 4.2]])
    values = np.array([0.9, 0.2, 0.5], np.float32)
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        tiles = tile_map((10, 10), boxes[order], values[order])
        value = np.append(values[order], np.nan)[tiles.expand(tiles.box)]
        assert value[1, 1] == np.float32(0.9) and value[4, 4] == np.float32(0.9) and value[7, 7] == np.float32(0.2)
        assert np.isnan(value[9, 0]) and np.isnan(value[0, 9])


def test_tiles_are_tinted_30_percent_and_outlined_at_50_percent() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    boxes, colours = _grid(6, 6.0, 6.0, 2.0), rng.integers(0, 256, (36, 3), dtype=np.uint8)
    ids, edge = _painted((40, 40), boxes, np.zeros(36))
    tinted = _tint_tiles(image, tile_map((40, 40), boxes, np.zeros(36)), colours, edges=True).astype(float)
    colour = colours[ids].astype(float)
    inside, outline = (ids >= 0) & ~edge, edge
    assert (tinted[ids < 0] == image[ids < 0]).all()
    assert np.abs(tinted[inside] - (0.7 * image[inside] + 0.3 * colour[inside])).max() < 1
    want = 0.35 * image[outline] + 0.15 * colour[outline] + 0.5 * np.array([31, 78, 121])
    assert np.abs(tinted[outline] - want).max() < 1
    plain = _tint_tiles(image, tile_map((40, 40), boxes, np.zeros(36)), colours, edges=False).astype(float)
    assert np.abs(plain[ids >= 0] - (0.7 * image[ids >= 0] + 0.3 * colour[ids >= 0])).max() < 1


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
