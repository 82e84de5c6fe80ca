"""``wsienc tile`` as a user runs it (click's CliRunner)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _tile_helpers import truncated_copy
from click.testing import CliRunner
from PIL import Image

from wsi_encoder.cli import main
from wsi_encoder.io.patch_store import open_patch_store


def test_tile_a_folder_with_qc_pictures(synthetic_slide: Path, cmu_svs: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "nested").mkdir()
    (slides / "nested" / "generated.tif").write_bytes(synthetic_slide.read_bytes())
    (slides / "notes.txt").write_text("not a slide")
    out, qc = tmp_path / "cohort.zarr", tmp_path / "qc"
    result = CliRunner().invoke(
        main,
        ["tile", str(slides), str(cmu_svs), "--out", str(out), "--mpp", "0.5", "--tile-size", "256", "--stride", "192",
         "--qc-dir", str(qc), "--workers", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 slide(s) tiled" in result.output
    store = open_patch_store(out)
    assert store.slide_ids == ["CMU-1-Small-Region", "generated"]
    generated = store["generated"]
    assert generated.attrs["stride"] == 192 and generated.attrs["tile_size"] == 256 and generated.attrs["codec"] == "jpeg"
    assert generated.tiles is not None and generated.tiles.shape[1:] == (256, 256, 3)
    for slide_id in store.slide_ids:
        picture = np.asarray(Image.open(qc / f"{slide_id}.png"))
        assert picture.ndim == 3 and picture.shape[1] >= 800
        assert picture[..., :3].std() > 10  # a picture, not a blank canvas
    again = CliRunner().invoke(main, ["tile", str(slides), str(cmu_svs), "--out", str(out), "--mpp", "0.5", "--tile-size", "256", "--stride", "192"])
    assert again.exit_code == 0 and "2 already complete" in again.output


def test_a_corrupt_slide_is_reported_and_the_exit_code_is_one(synthetic_slide: Path, tmp_path: Path) -> None:
    bad = truncated_copy(synthetic_slide, tmp_path / "truncated.tif", 0.5)
    out = tmp_path / "c.zarr"
    result = CliRunner().invoke(main, ["tile", str(synthetic_slide), str(bad), "--out", str(out), "--coords-only"])
    assert result.exit_code == 1
    assert "failed:" in result.output and "truncated.tif" in result.output
    assert "1 slide(s) tiled, 1 failed" in result.output
    store = open_patch_store(out)
    assert store.status["truncated"]["status"] == "failed"
    assert store["synthetic"].complete and store["synthetic"].tiles is None


def test_missing_mpp_is_a_clear_error_naming_the_option(synthetic_slide_no_mpp: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    result = CliRunner().invoke(main, ["tile", str(synthetic_slide_no_mpp), "--out", str(out), "--codec", "zstd"])
    assert result.exit_code == 1
    assert "--slide-mpp" in result.output and "no_mpp.tif" in result.output
    fixed = CliRunner().invoke(main, ["tile", str(synthetic_slide_no_mpp), "--out", str(out), "--codec", "zstd", "--slide-mpp", "0.5"])
    assert fixed.exit_code == 0, fixed.output
    assert open_patch_store(out)["no_mpp"].attrs["slide_mpp"] == 0.5


def test_bad_arguments_are_one_line_errors(synthetic_slide: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["tile", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "o.zarr")])
    assert missing.exit_code == 1 and "nope.svs" in missing.output and "Traceback" not in missing.output
    scheduler = runner.invoke(main, ["tile", str(synthetic_slide), "--out", str(tmp_path / "o.zarr"), "--scheduler", "bogus"])
    assert scheduler.exit_code == 1 and "--scheduler" in scheduler.output
    not_store = tmp_path / "file.zarr"
    not_store.mkdir()
    (not_store / "x").write_text("x")
    refused = runner.invoke(main, ["tile", str(synthetic_slide), "--out", str(not_store)])
    assert refused.exit_code == 1 and "not a zarr store" in refused.output
