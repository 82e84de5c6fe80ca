"""Path options that take URLs: output folders staged per run, recorded as given."""

from __future__ import annotations

from pathlib import Path

from tests import _remote_fixtures as remote
from wsi_encoder.io.urls import filesystem, local_output

s3_server, s3 = remote.s3_server, remote.s3


def test_two_runs_writing_one_url_stage_in_separate_folders(s3: str) -> None:
    out = f"{s3}/reports"
    with local_output(out) as first, local_output(out) as second:
        assert first.parent != second.parent  # not one fixed staging folder per URL
        first.mkdir()
        (first / "a.txt").write_text("first run")
        second.mkdir()
        (second / "b.txt").write_text("second run")
        assert (first / "a.txt").read_text() == "first run"  # the second run did not clear the first's
    fs, inner = filesystem(out)
    assert sorted(Path(p).name for p in fs.find(inner)) == ["a.txt", "b.txt"]
    assert not first.parent.exists() and not second.parent.exists()  # staging removed after upload
    with local_output(out) as third:  # a later run starts from what both uploaded
        assert sorted(p.name for p in third.iterdir()) == ["a.txt", "b.txt"]


def test_tile_and_encode_path_options_take_urls(s3: str, tmp_path: Path) -> None:
    """--slide-mpp-csv read from s3://, --qc-dir, --h5-dir and --preview-dir written to s3://: the same files as local paths."""
    from click.testing import CliRunner

    from tests._tile_helpers import small_slide
    from wsi_encoder.cli import main

    folder = tmp_path / "slides"
    folder.mkdir()
    slide = small_slide(folder / "a.tiff", seed=1)
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\na,0.25\n")
    fs, inner = filesystem(s3)
    fs.put(str(slide), f"{inner}/cohort/a.tiff")
    fs.put(str(table), f"{inner}/tables/mpp.csv")
    runner = CliRunner()

    def run(args: list[str]) -> None:
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output

    run(["tile", str(folder), "--out", str(tmp_path / "p.zarr"), "--slide-mpp-csv", str(table), "--qc-dir", str(tmp_path / "qc"), "--workers", "1"])
    run(["tile", f"{s3}/cohort/", "--out", f"{s3}/p.zarr", "--slide-mpp-csv", f"{s3}/tables/mpp.csv", "--qc-dir", f"{s3}/qc", "--workers", "1"])
    run(["encode", str(tmp_path / "p.zarr"), "--encoder", "nic", "--out", str(tmp_path / "e.zarr"),
         "--h5-dir", str(tmp_path / "h5"), "--preview-dir", str(tmp_path / "pv")])  # fmt: skip
    run(["encode", f"{s3}/p.zarr", "--encoder", "nic", "--out", f"{s3}/e.zarr", "--h5-dir", f"{s3}/h5", "--preview-dir", f"{s3}/pv"])
    from wsi_encoder.io.patch_store import open_patch_store

    assert open_patch_store(f"{s3}/p.zarr")["a"].attrs["mpp_source"] == "csv"
    assert fs.cat_file(f"{inner}/qc/a.png") == (tmp_path / "qc" / "a.png").read_bytes()
    assert fs.isfile(f"{inner}/h5/a.h5") and fs.isfile(f"{inner}/pv/a.png")
    assert fs.cat_file(f"{inner}/pv/a.png") == (tmp_path / "pv" / "a.png").read_bytes()
