"""One format matrix, read locally and through s3:// (moto on 127.0.0.1): SVS, generic pyramidal TIFF, NDPI,
OME-TIFF and DICOM WSI give the same levels, dimensions, µm/px and pixels both ways, and `info`, `tile`,
`encode` and `predict` run on a small cohort of all of them; MRXS (OpenSlide only) is refused remotely in one line.

SVS and NDPI are the real files of ../shared/data/histo_real/slides (skipped, naming the folder, when missing).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests import _remote_fixtures as remote
from tests._tile_helpers import small_slide
from tests.conftest import shared_path
from tests.test_dicom import dicomize
from tests.test_ome_tiff import write_ome
from tests.test_predict import TILING, _model
from tests.test_remote_tile import assert_same_features, assert_same_store
from wsi_encoder.cli import main
from wsi_encoder.errors import SlideReadError
from wsi_encoder.io.slides import open_slide

s3_server, s3, upload = remote.s3_server, remote.s3, remote.upload
FORMATS = ("svs", "tiff", "ndpi", "ome", "dicom")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One slide per format in one folder: {format: local path (a folder for DICOM)}."""
    root = tmp_path_factory.mktemp("matrix")
    folder = root / "cohort"
    folder.mkdir()
    slides = {
        "svs": shutil.copy(shared_path("slides", "CMU-1-Small-Region.svs"), folder / "cmu.svs"),
        "tiff": small_slide(folder / "generic.tiff", width=1600, height=1200),
        "ndpi": shutil.copy(shared_path("slides", "test3-TRITC-2-560.ndpi"), folder / "ndpi.ndpi"),
        "ome": folder / "ome.ome.tif",
        "dicom": folder / "dicom1",
    }
    write_ome(slides["ome"])
    dicomize(small_slide(root / "for_dicom.tiff", width=1600, height=1200, seed=9), slides["dicom"])
    return {k: Path(v) for k, v in slides.items()}


def _upload_cohort(s3_url: str, cohort: dict[str, Path]) -> dict[str, str]:
    urls = {}
    for fmt, path in cohort.items():
        if path.is_dir():
            for f in sorted(path.iterdir()):
                upload(s3_url, f, f"cohort/{path.name}/{f.name}")
        else:
            upload(s3_url, path, f"cohort/{path.name}")
        urls[fmt] = f"{s3_url}/cohort/{path.name}"
    return urls


@pytest.mark.parametrize("fmt", FORMATS)
def test_local_and_s3_read_the_same_slide(fmt: str, cohort: dict[str, Path], s3: str) -> None:
    url = _upload_cohort(s3, {fmt: cohort[fmt]})[fmt]
    # The local file read by the backend that reads the URL (auto: the same one for every format but NDPI/SVS,
    # which auto reads with tiffslide locally too).
    with open_slide(cohort[fmt]) as local, open_slide(url) as far:
        assert far.backend == local.backend
        assert far.level_dimensions == local.level_dimensions and far.level_downsamples == local.level_downsamples
        assert far.mpp == local.mpp and far.mpp is not None
        for level in range(far.level_count):
            w, h = far.level_dimensions[level]
            for x, y in ((0, 0), (w // 3, h // 2), (w - 150, h - 100)):  # the last runs past the edge
                assert np.array_equal(far.read_level(level, x, y, 256, 192), local.read_level(level, x, y, 256, 192)), (level, x, y)


def test_mrxs_is_refused_remotely_in_one_line(s3: str, tmp_path: Path) -> None:
    fake = tmp_path / "slide.mrxs"
    fake.write_bytes(b"not a tiff " * 100)
    url = upload(s3, fake, "cohort/slide.mrxs")
    with pytest.raises(SlideReadError) as err:
        open_slide(url)
    line = str(err.value)
    assert "\n" not in line and line.startswith(url) and "MRXS" in line and "copied to a local disk" in line


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_info_tile_encode_predict_run_on_every_format_locally_and_on_s3(cohort: dict[str, Path], s3: str, tmp_path: Path) -> None:
    urls = _upload_cohort(s3, cohort)
    folder = cohort["svs"].parent
    for fmt in FORMATS:
        local, far = (json.loads(_run(["info", "--json", str(p)])) for p in (cohort[fmt], urls[fmt]))
        assert {k: v for k, v in local.items() if k not in ("path", "other_backends")} == {
            k: v for k, v in far.items() if k not in ("path", "other_backends")}, fmt  # fmt: skip
    tiling = ["--mpp", str(TILING["target_mpp"]), "--tile-size", str(TILING["tile_size"]), "--workers", "1"]
    _run(["tile", str(folder), "--out", str(tmp_path / "p.zarr"), *tiling])
    _run(["tile", f"{s3}/cohort/", "--out", f"{s3}/p.zarr", *tiling])
    assert_same_store(tmp_path / "p.zarr", f"{s3}/p.zarr")
    _run(["encode", str(tmp_path / "p.zarr"), "--encoder", "nic", "--out", str(tmp_path / "e.zarr"), "--dtype", "float32"])
    _run(["encode", f"{s3}/p.zarr", "--encoder", "nic", "--out", f"{s3}/e.zarr", "--dtype", "float32"])
    assert_same_features(tmp_path / "e.zarr", f"{s3}/e.zarr")
    model = _model(tmp_path / "clf")
    predictions = {}
    for name, source in (("local", str(folder)), ("s3", f"{s3}/cohort/")):
        out = tmp_path / f"pred-{name}"
        _run(["predict", source, "--model", str(model), "--out", str(out), "--threads", "1"])
        with (out / "predictions.csv").open() as fh:
            predictions[name] = {r["slide_id"]: (r["prob"], r["n_tiles"]) for r in csv.DictReader(fh)}
    assert sorted(predictions["local"]) == ["cmu", "dicom1", "generic", "ndpi", "ome"]
    assert predictions["local"] == predictions["s3"]


def _qptiff(path: Path) -> Path:
    """A 3-channel 8-bit QPTIFF (Akoya/PerkinElmer: one greyscale page per channel, the QPI description)."""
    import tifffile

    desc = ('<?xml version="1.0" encoding="utf-8"?><PerkinElmer-QPI-ImageDescription><DescriptionVersion>2'
            "</DescriptionVersion><ImageType>FullResolution</ImageType><Name>{}</Name></PerkinElmer-QPI-ImageDescription>")
    with tifffile.TiffWriter(path) as tif:
        for c, name in enumerate(("DAPI", "FITC", "Cy5")):
            tif.write(np.full((512, 512), 40 * c, np.uint8), tile=(256, 256), description=desc.format(name),
                      photometric="minisblack", metadata=None, software="PerkinElmer-QPI")
    with tifffile.TiffFile(path) as written:
        assert written.is_qpi
    return path


def _fluorescence_ome(path: Path) -> Path:
    import tifffile

    data = np.random.default_rng(0).integers(0, 255, (3, 512, 512)).astype(np.uint8)
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
                     tile=(256, 256), photometric="minisblack")
    return path


@pytest.mark.parametrize("kind", ["qptiff", "ome"])
def test_multichannel_fluorescence_is_refused_in_one_line_locally_and_on_s3(kind: str, s3: str, tmp_path: Path) -> None:
    """8-bit multi-channel fluorescence (QPTIFF, OME-TIFF with a C axis) is refused, not rendered as a guess:
    no channel-to-RGB mapping is offered (export an RGB rendering)."""
    path = _qptiff(tmp_path / "f.qptiff") if kind == "qptiff" else _fluorescence_ome(tmp_path / "f.ome.tif")
    for source in (str(path), upload(s3, path, f"fluo/{path.name}")):
        result = CliRunner().invoke(main, ["info", source])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and source in lines[0] and "3-channel" in lines[0] and "fluorescence" in lines[0], lines
