"""DICOM WSI (a folder of .dcm instances, one series per slide) read through wsidicom: the pixels OpenSlide reads
from the same instances, µm/px from the pixel spacing, series selection, cohort discovery, and s3:// folders."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests import _remote_fixtures as remote
from tests._tile_helpers import small_slide
from wsi_encoder.cli import main
from wsi_encoder.errors import SlideReadError
from wsi_encoder.io.slide_ids import assign_slide_ids, expand_slide_inputs
from wsi_encoder.io.slides import open_slide
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec

s3_server, s3, upload = remote.s3_server, remote.s3, remote.upload


def dicomize(tiff: Path, folder: Path) -> Path:
    """Convert a generated pyramidal TIFF to a DICOM WSI folder with wsidicomizer (JPEG baseline frames)."""
    wsidicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer makes the DICOM test slides (pip install .[dev])")
    from wsidicomizer.wsidicomizer import SourceIdentifier

    folder.parent.mkdir(parents=True, exist_ok=True)
    # The tiffslide source re-encodes with imagecodecs: no libturbojpeg needed (opentile's sources need it).
    wsidicomizer.WsiDicomizer.convert(tiff, folder, tile_size=256, include_label=False, include_overview=False,
                                      include_thumbnail=False, workers=1, preferred_source=SourceIdentifier.TIFFSLIDE)
    return folder


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-level DICOM WSI (2400 x 1800 at 0.5 µm/px, 600 x 450) in its own folder."""
    root = tmp_path_factory.mktemp("dicom")
    return dicomize(small_slide(root / "src.tiff"), root / "cohort" / "case1")


def _series_uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def test_dicom_folder_reads_like_openslide(dicom_slide: Path) -> None:
    import openslide

    with open_slide(dicom_slide) as reader:
        assert reader.backend == "wsidicom" and reader.mpp == (0.5, 0.5)
        assert reader.level_dimensions == ((2400, 1800), (600, 450)) and reader.level_downsamples == (1.0, 4.0)
        reference = openslide.OpenSlide(str(next(dicom_slide.glob("*.dcm"))))  # OpenSlide 4 reads DICOM too
        assert reference.level_dimensions == reader.level_dimensions
        for level, (x, y) in ((0, (333, 257)), (1, (10, 7))):
            ds = int(reader.level_downsamples[level])
            expected = np.asarray(reference.read_region((x * ds, y * ds), level, (300, 200)))[..., :3]
            assert np.array_equal(reader.read_level(level, x, y, 300, 200), expected), level
        reference.close()
        edge = reader.read_level(0, 2300, 1700, 200, 200)  # past the edge: white
        assert (edge[100:, :] == 255).all() and (edge[:, 100:] == 255).all()


def test_several_series_are_named_and_selected(dicom_slide: Path, tmp_path: Path) -> None:
    folder = tmp_path / "two"
    shutil.copytree(dicom_slide, folder)
    dicomize(small_slide(tmp_path / "other.tiff", width=1200, height=900, seed=3), tmp_path / "other")
    for f in (tmp_path / "other").glob("*.dcm"):
        shutil.copy(f, folder / f"other-{f.name}")
    first, second = _series_uid(dicom_slide), _series_uid(tmp_path / "other")
    with pytest.raises(SlideReadError, match="2 DICOM series") as err:
        open_slide(folder)
    assert first in str(err.value) and second in str(err.value) and "\n" not in str(err.value)
    with open_slide(f"{folder}#{second}") as reader:
        assert reader.dimensions == (1200, 900)
        again = pickle.loads(pickle.dumps(reader))  # workers re-open it from its path, series included
        assert again.dimensions == (1200, 900) and np.array_equal(again.read_level(0, 0, 0, 64, 64), reader.read_level(0, 0, 0, 64, 64))
        again.close()
    assert [e.slide_id for e in assign_slide_ids(expand_slide_inputs([f"{folder}#{second}"]))] == [f"two_{second}"]
    result = CliRunner().invoke(main, ["info", "--json", f"{folder}#{first}"])
    assert result.exit_code == 0 and '"width": 2400' in result.output and '"backend": "wsidicom"' in result.output
    with pytest.raises(SlideReadError, match=r"no series 1\.2\.3"):
        open_slide(f"{folder}#1.2.3")


def test_cohort_discovery_takes_a_dicom_folder_as_one_slide(dicom_slide: Path, tmp_path: Path) -> None:
    small_slide(dicom_slide.parent / "b.tiff", width=1200, height=900)
    found = expand_slide_inputs([dicom_slide.parent])
    assert found == [dicom_slide.parent / "b.tiff", dicom_slide]
    assert [e.slide_id for e in assign_slide_ids(found)] == ["b", "case1"]
    report = tile_cohort([dicom_slide.parent], tmp_path / "p.zarr", TileSpec(target_mpp=1.0, tile_size=128), workers=1)
    assert not report.failed and sorted(o.slide_id for o in report.ok) == ["b", "case1"]


def test_dicom_folder_over_s3_equals_local(dicom_slide: Path, s3: str, tmp_path: Path) -> None:
    for f in dicom_slide.glob("*.dcm"):
        upload(s3, f, f"cohort/case1/{f.name}")
    url = f"{s3}/cohort/case1"
    with open_slide(dicom_slide) as local, open_slide(url) as far:
        assert far.backend == "wsidicom" and far.mpp == local.mpp and far.level_dimensions == local.level_dimensions
        for level in range(far.level_count):
            assert np.array_equal(far.read_level(level, 100, 50, 300, 200), local.read_level(level, 100, 50, 300, 200))
        with open_slide(f"{url}#{_series_uid(dicom_slide)}") as selected:  # a series named on a prefix
            assert selected.level_dimensions == local.level_dimensions
    assert expand_slide_inputs([f"{s3}/cohort/"]) == [url]
    spec = TileSpec(target_mpp=1.0, tile_size=128)
    tile_cohort([dicom_slide], tmp_path / "local.zarr", spec, workers=1)
    report = tile_cohort([f"{s3}/cohort/"], f"{s3}/p.zarr", spec, workers=1)
    assert not report.failed and [o.slide_id for o in report.ok] == ["case1"]
    from tests.test_remote_tile import assert_same_store

    assert_same_store(tmp_path / "local.zarr", f"{s3}/p.zarr")


def test_backend_mismatches_are_one_line(dicom_slide: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["info", "--backend", "openslide", str(dicom_slide)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "read with wsidicom" in result.output
    tiff = small_slide(tmp_path / "a.tiff", width=600, height=400)
    with pytest.raises(SlideReadError, match="not a folder of DICOM instances"):
        open_slide(tiff, backend="wsidicom")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.dcm").write_text("not dicom")
    with pytest.raises(SlideReadError, match="no DICOM whole-slide image instances"):
        open_slide(tmp_path / "empty")
