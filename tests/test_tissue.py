"""Tissue detection: generated slides with known tissue and pen marks, real slides and patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image
from skimage.transform import resize

from wsi_encoder.io.slides import open_slide
from wsi_encoder.synthetic import SlideLayout, read_synthetic_spec
from wsi_encoder.synthetic.textures import OD_EOSIN, OD_HAEMATOXYLIN
from wsi_encoder.tissue import (
    TISSUE_METHOD,
    TISSUE_METHOD_DARKFIELD,
    detect_tissue,
    ink_mask,
    tile_tissue_fractions,
)


def _thumb(path: Path, size: int = 1024) -> tuple[np.ndarray, float]:
    with open_slide(path) as reader:
        thumb = reader.get_thumbnail(size)
        mpp = reader.require_mpp() * reader.dimensions[0] / thumb.shape[1]
    return thumb, mpp


def _stain_rgb(c_h: float, c_e: float) -> np.ndarray:
    od = c_h * OD_HAEMATOXYLIN + c_e * OD_EOSIN
    return np.clip(255 * 10 ** (-od), 0, 255).astype(np.uint8)


def test_generated_slide_tissue_matches_ground_truth_and_drops_pen(synthetic_slide: Path) -> None:
    thumb, mpp = _thumb(synthetic_slide)
    result = detect_tissue(thumb, mpp)
    layout = SlideLayout(read_synthetic_spec(synthetic_slide))
    truth = resize(layout.tissue, thumb.shape[:2], order=1) > 0.5
    pen = resize(layout.pen, thumb.shape[:2], order=1) > 0.3
    assert pen.sum() > 100  # the fixture does carry a pen stroke
    iou = (truth & result.mask).sum() / (truth | result.mask).sum()
    assert iou > 0.9
    assert (pen & result.mask).sum() == 0
    assert result.ink[pen].mean() > 0.9
    assert result.method == TISSUE_METHOD


def test_blue_green_black_ink_and_black_border_are_not_tissue() -> None:
    rng = np.random.default_rng(0)
    image = np.full((300, 400, 3), 242, dtype=np.uint8)
    image += rng.integers(0, 6, image.shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:300, 0:400]
    tissue = (yy - 150) ** 2 / 80**2 + (xx - 200) ** 2 / 110**2 < 1
    image[tissue] = _stain_rgb(0.6, 0.5)
    image[40:52, 20:380] = (35, 70, 170)  # blue marker
    image[250:262, 20:380] = (30, 130, 60)  # green marker
    image[120:180, 340:352] = (25, 25, 30)  # black marker
    image[:, :12] = 5  # black scanner border
    result = detect_tissue(image, thumbnail_mpp=8.0)
    assert result.mask[tissue & (xx < 330)].mean() > 0.95
    for rows, cols in ((slice(40, 52), slice(20, 380)), (slice(250, 262), slice(20, 380)), (slice(120, 180), slice(340, 352))):
        assert not result.mask[rows, cols].any()
    assert not result.mask[:, :12].any()


@pytest.mark.parametrize("c_h", [0.2, 0.6, 1.2, 2.0])
@pytest.mark.parametrize("c_e", [0.0, 0.3, 0.9])
def test_haematoxylin_and_eosin_colours_are_never_ink(c_h: float, c_e: float) -> None:
    colour = _stain_rgb(c_h, c_e).astype(np.float32)[None, None, :] / 255
    assert not ink_mask(colour).any()


def test_white_glass_has_no_tissue() -> None:
    rng = np.random.default_rng(1)
    glass = (240 + rng.integers(0, 8, (256, 256, 3))).astype(np.uint8)
    assert detect_tissue(glass).fraction < 0.01


def test_real_slide_tissue_is_kept_and_background_dropped(cmu_svs: Path) -> None:
    thumb, mpp = _thumb(cmu_svs)
    result = detect_tissue(thumb, mpp)
    assert 0.2 < result.fraction < 0.6
    h, w = result.mask.shape
    assert not result.mask[: h // 10, : w // 5].any()  # glass in the top-left corner
    assert result.mask[int(0.8 * h) : int(0.9 * h), int(0.35 * w) : int(0.55 * w)].mean() > 0.9  # the dermis


def test_real_patches_seen_at_thumbnail_scale() -> None:
    def thumb(name: str) -> np.ndarray:  # 512 px level-0 crops shrunk 8x, as a slide thumbnail sees them
        image = Image.open(shared_path("patches", "histolab", name)).convert("RGB")
        return np.asarray(image.resize((64, 64), Image.Resampling.LANCZOS))

    assert detect_tissue(thumb("no-tissue.png")).fraction < 0.05
    assert detect_tissue(thumb("almost-white-2.png")).fraction < 0.1
    assert detect_tissue(thumb("tissue-level0-4302-10273-4814-10785.png")).fraction > 0.8


def test_fluorescence_slide_is_segmented_as_darkfield(ndpi_slide: Path) -> None:
    thumb, mpp = _thumb(ndpi_slide, 512)
    result = detect_tissue(thumb, mpp)
    assert result.method == TISSUE_METHOD_DARKFIELD
    assert 0.5 < result.fraction < 0.95
    assert not result.mask[-5:, :].all()


def test_tile_fractions_are_exact_area_means() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True
    boxes = np.array(
        [
            [0, 0, 5, 5],  # all tissue
            [5, 0, 10, 10],  # none
            [2.5, 0, 7.5, 10],  # half
            [4.5, 3, 5.5, 4],  # half, sub-pixel edges
            [-5, 0, 5, 10],  # half outside the mask: outside counts as no tissue
            [3, 3, 3, 3],  # empty box
        ]
    )
    np.testing.assert_allclose(tile_tissue_fractions(mask, boxes), [1, 0, 0.5, 0.5, 0.5, 0], atol=1e-6)
    assert tile_tissue_fractions(mask, np.zeros((0, 4))).shape == (0,)


def test_a_field_of_tissue_without_glass_is_not_split_in_two(breakhis_dirs: list[Path]) -> None:
    # BreaKHis images are microscope fields inside tissue: Otsu on saturation alone would call the paler
    # half of the tissue background (one image came out 12 % tissue).
    fractions = {}
    for folder in breakhis_dirs:
        for path in sorted(folder.glob("*.png")):
            image = np.asarray(Image.open(path).convert("RGB").resize((350, 230)))
            fractions[path.name] = detect_tissue(image).fraction
    assert len(fractions) == 58
    assert min(fractions.values()) > 0.3, sorted(fractions.items(), key=lambda kv: kv[1])[:3]


def test_ink_hue_is_tested_wherever_it_could_make_ink() -> None:
    # ink_mask computes the hue only where it can matter; a colour cube (every channel in steps of 5,
    # ties between channels included) must give exactly what the hue of every pixel gives.
    from skimage.color import rgb2hsv

    levels = np.arange(0, 256, 5, dtype=np.float32) / 255
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(1, -1, 3)
    hsv = rgb2hsv(cube)[0]
    hue, sat, value = hsv[:, 0] * 360, hsv[:, 1], hsv[:, 2]
    blue = (hue >= 165) & (hue < 235) & (sat > 0.55)
    green = (hue >= 75) & (hue < 165)
    expected = ((value < 0.25) & (sat < 0.4)) | ((sat > 0.2) & (blue | green))
    got = ink_mask(cube)[0]
    assert expected.sum() > 1000
    np.testing.assert_array_equal(got, expected)


def test_hue_equals_scikit_image_rgb2hsv() -> None:
    # The ink test computes the hue itself (skimage.color's import loads scipy.linalg): it must be
    # rgb2hsv's hue bit for bit, ties between channels and greys included.
    from skimage.color import rgb2hsv

    from wsi_encoder.tissue import _hue

    levels = np.arange(0, 256, 5, dtype=np.float32) / 255
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    pixels = np.concatenate([cube, np.random.default_rng(0).random((20000, 3), dtype=np.float32)])
    np.testing.assert_array_equal(_hue(pixels), rgb2hsv(pixels[None])[0][:, 0])


def test_mask_cleaning_equals_scikit_image_morphology() -> None:
    # The cleaning calls SciPy as scikit-image does (to spare start-up skimage.morphology's imports);
    # it must give scikit-image's opening, closing, small-object removal and hole filling, borders
    # (reflect mode) and 4-connectivity included.
    import inspect

    from scipy import ndimage
    from skimage import morphology

    from wsi_encoder.tissue import _clean, _dilate, _erode, _remove_small

    new_api = "max_size" in inspect.signature(morphology.remove_small_objects).parameters

    def objects(m: np.ndarray, n: int) -> np.ndarray:
        return morphology.remove_small_objects(m, **({"max_size": n} if new_api else {"min_size": n + 1}))

    def holes(m: np.ndarray, n: int) -> np.ndarray:
        return morphology.remove_small_holes(m, **({"max_size": n} if new_api else {"area_threshold": n + 1}))

    rng = np.random.default_rng(11)
    for case in range(40):
        shape = (int(rng.integers(1, 70)), int(rng.integers(1, 70)))  # smaller than the disks too
        smooth = ndimage.gaussian_filter(rng.random(shape), sigma=float(rng.uniform(0.5, 3)))
        mask = smooth > np.quantile(smooth, rng.uniform(0.2, 0.8))
        if case % 3 == 0:  # single pixels, diagonal neighbours and edge pixels
            mask |= rng.random(shape) > 0.97
        min_obj, max_hole = int(rng.integers(0, 30)), int(rng.integers(0, 30))
        expected = morphology.closing(morphology.opening(mask, morphology.disk(1)), morphology.disk(2))
        expected = holes(objects(expected, min_obj), max_hole)
        np.testing.assert_array_equal(_clean(mask, min_obj, max_hole), expected)
        np.testing.assert_array_equal(_remove_small(mask, min_obj), objects(mask, min_obj))
        radius = case % 5
        np.testing.assert_array_equal(_erode(mask, radius), morphology.erosion(mask, morphology.disk(radius)))
        np.testing.assert_array_equal(_dilate(mask, radius), morphology.dilation(mask, morphology.disk(radius)))


def test_ink_is_grown_around_every_stroke_as_over_the_whole_picture() -> None:
    # The ink dilation runs on the box around the ink only; it must equal dilating the whole picture,
    # strokes at the edges and corners included.
    from skimage.morphology import dilation, disk

    from wsi_encoder.tissue import _dilate_where_set

    rng = np.random.default_rng(3)
    for case in range(30):
        mask = np.zeros((40, 60), dtype=bool)
        for _ in range(case % 4):
            y, x = rng.integers(0, 40), rng.integers(0, 60)
            mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 9)] = True
        if case % 5 == 0:
            mask[0, 0] = mask[-1, -1] = True
        for radius in (1, 2, 3):
            np.testing.assert_array_equal(_dilate_where_set(mask, radius), dilation(mask, disk(radius)))
