"""One reader test class run against both backends, on generated and real slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from wsi_encoder.errors import InvalidParameterError, MissingMppError, SlideNotFoundError, SlideReadError
from wsi_encoder.io.slides import open_slide
from wsi_encoder.synthetic import SyntheticSlideSpec, read_synthetic_spec, write_synthetic_slide

BACKENDS = ["openslide", "tiffslide"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestReaderOnGeneratedSlide:
    def test_dimensions_levels_mpp(self, synthetic_slide: Path, backend: str) -> None:
        with open_slide(synthetic_slide, backend) as reader:
            assert reader.backend == backend
            assert reader.dimensions == (4096, 3072)
            assert reader.level_dimensions == ((4096, 3072), (1024, 768))
            assert reader.level_downsamples == pytest.approx((1.0, 4.0))
            assert reader.mpp == pytest.approx((0.5, 0.5))
            assert reader.level_mpp(1) == pytest.approx(2.0)

    def test_region_is_rgb_and_inside_matches_outside_white(self, synthetic_slide: Path, backend: str) -> None:
        with open_slide(synthetic_slide, backend) as reader:
            region = reader.read_region((4000, 3000), 0, (200, 100))
            assert region.shape == (100, 200, 3) and region.dtype == np.uint8
            inside = reader.read_region((4000, 3000), 0, (96, 72))
            np.testing.assert_array_equal(region[:72, :96], inside)
            assert (region[72:, :] == 255).all() and (region[:, 96:] == 255).all()
            negative = reader.read_region((-50, -20), 0, (100, 100))
            assert (negative[:20] == 255).all() and (negative[:, :50] == 255).all()
            np.testing.assert_array_equal(negative[20:, 50:], reader.read_region((0, 0), 0, (50, 80)))

    def test_thumbnail_bounded(self, synthetic_slide: Path, backend: str) -> None:
        with open_slide(synthetic_slide, backend) as reader:
            thumb = reader.get_thumbnail(512)
            assert thumb.shape == (384, 512, 3)
            # Tissue (pink/purple) and glass (near white) are both present.
            assert (thumb.mean(axis=2) > 230).mean() > 0.2
            assert (thumb.mean(axis=2) < 210).mean() > 0.05

    def test_level_choice_and_resampling(self, synthetic_slide_40x: Path, backend: str) -> None:
        with open_slide(synthetic_slide_40x, backend) as reader:
            nominal = reader.level_for_mpp(0.25)  # 0.2465 is within 5 % of 0.25: no resampling
            assert nominal.level == 0 and not nominal.resample
            half = reader.level_for_mpp(0.5)  # no 0.5 level: read level 0 and downsample
            assert half.level == 0 and half.scale == pytest.approx(0.2465 / 0.5)
            coarse = reader.level_for_mpp(1.0)  # level 1 is 0.986 µm/px, within tolerance
            assert coarse.level == 1 and not coarse.resample
            np.testing.assert_array_equal(reader.read_level(0, 1000, 1000, 64, 64), reader.read_region((1000, 1000), 0, (64, 64)))
            padded = reader.read_level(1, -10, -5, 30, 20, fill=0)
            assert (padded[:5] == 0).all() and (padded[:, :10] == 0).all()
            np.testing.assert_array_equal(padded[5:, 10:], reader.read_level(1, 0, 0, 20, 15))

    def test_no_mpp_is_explicit(self, synthetic_slide_no_mpp: Path, backend: str) -> None:
        with open_slide(synthetic_slide_no_mpp, backend) as reader:
            assert reader.mpp is None
            with pytest.raises(MissingMppError, match="--slide-mpp"):
                reader.level_for_mpp(0.5)
        with open_slide(synthetic_slide_no_mpp, backend, mpp=0.25) as reader:
            assert reader.mpp == (0.25, 0.25)


class TestReaderOnRealSlides:
    def test_aperio_matches_openslide(self, cmu_svs: Path, backend: str) -> None:
        ref = openslide.OpenSlide(str(cmu_svs))
        with open_slide(cmu_svs, backend) as reader:
            assert reader.dimensions == ref.dimensions == (2220, 2967)
            assert reader.mpp == pytest.approx((0.499, 0.499))
            assert reader.objective_power == 20
            assert reader.vendor == "aperio"
            region = reader.read_region((700, 900), 0, (300, 200))
            expected = np.asarray(ref.read_region((700, 900), 0, (300, 200)))[..., :3]
            np.testing.assert_array_equal(region, expected)

    def test_ndpi(self, ndpi_slide: Path, backend: str) -> None:
        ref = openslide.OpenSlide(str(ndpi_slide))
        with open_slide(ndpi_slide, backend) as reader:
            assert reader.dimensions == (3968, 4864)
            assert reader.vendor == "hamamatsu"
            assert reader.mpp == pytest.approx((0.2281750559028887,) * 2)
            assert reader.objective_power == 40
            assert reader.level_count >= 4
            assert reader.level_dimensions[:4] == tuple(ref.level_dimensions[:4])
            region = reader.read_region((1000, 1500), 0, (256, 256))
            np.testing.assert_array_equal(region, np.asarray(ref.read_region((1000, 1500), 0, (256, 256)))[..., :3])


@pytest.mark.parametrize("path_name", ["CMU-1-Small-Region.svs", "test3-TRITC-2-560.ndpi"])
def test_backends_agree_on_real_slides(path_name: str) -> None:
    from tests.conftest import shared_path

    path = shared_path("slides", path_name)
    a = open_slide(path, "openslide")
    b = open_slide(path, "tiffslide")
    assert a.dimensions == b.dimensions
    assert a.mpp == pytest.approx(b.mpp)
    for loc in [(0, 0), (517, 1033), (1500, 2000)]:
        np.testing.assert_array_equal(a.read_region(loc, 0, (128, 96)), b.read_region(loc, 0, (128, 96)))


def test_auto_falls_back_to_tiffslide_for_plain_tiff(tmp_path: Path) -> None:
    import tifffile

    image = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    reader = open_slide(path)
    assert reader.backend == "tiffslide"
    assert reader.mpp == pytest.approx((0.5, 0.5))
    np.testing.assert_array_equal(reader.read_region((10, 20), 0, (50, 40)), image[20:60, 10:60])


def test_resolution_unit_none_gives_no_mpp(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "nounit.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb", resolution=(3.0, 3.0), resolutionunit="NONE")
    assert open_slide(path).mpp is None


def test_pickle_reopens(synthetic_slide: Path) -> None:
    import pickle

    reader = open_slide(synthetic_slide, "tiffslide", mpp=0.5)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone is not reader and clone.backend == "tiffslide" and clone.mpp == (0.5, 0.5)
    np.testing.assert_array_equal(clone.read_region((5, 5), 0, (8, 8)), reader.read_region((5, 5), 0, (8, 8)))


class TestBadInputs:
    def test_missing(self, tmp_path: Path) -> None:
        with pytest.raises(SlideNotFoundError, match="no such file"):
            open_slide(tmp_path / "nope.svs")

    def test_directory(self, tmp_path: Path) -> None:
        with pytest.raises(SlideReadError, match="directory"):
            open_slide(tmp_path)

    def test_not_a_slide(self, tmp_path: Path) -> None:
        path = tmp_path / "notes.svs"
        path.write_text("hello, not a slide\n")
        with pytest.raises(SlideReadError, match="not a readable slide"):
            open_slide(path)

    def test_unknown_backend(self, synthetic_slide: Path) -> None:
        with pytest.raises(InvalidParameterError, match="backend"):
            open_slide(synthetic_slide, "bioformats")

    def test_multichannel_fluorescence(self, tmp_path: Path) -> None:
        import tifffile

        path = tmp_path / "fluo.ome.tif"
        tifffile.imwrite(path, np.zeros((5, 256, 256), np.uint16), tile=(128, 128), metadata={"axes": "CYX"})
        with pytest.raises(SlideReadError, match="multi-channel"):
            open_slide(path)

    def test_truncated(self, tmp_path: Path) -> None:
        good = write_synthetic_slide(tmp_path / "good.tif", SyntheticSlideSpec(width=2048, height=2048, seed=1))
        data = good.read_bytes()
        bad = tmp_path / "truncated.tif"
        bad.write_bytes(data[: len(data) // 2])
        reader = open_slide(bad)
        with pytest.raises(SlideReadError, match="truncated or corrupt"):
            reader.validate()


def test_synthetic_spec_round_trip_and_determinism(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec(width=1024, height=768, seed=5, lesion=True)
    a = write_synthetic_slide(tmp_path / "a.tif", spec)
    b = write_synthetic_slide(tmp_path / "b.tif", spec)
    assert read_synthetic_spec(a) == spec
    np.testing.assert_array_equal(
        open_slide(a).read_region((0, 0), 0, (1024, 768)), open_slide(b).read_region((0, 0), 0, (1024, 768))
    )
    assert read_synthetic_spec(tmp_path / "missing.tif") is None
