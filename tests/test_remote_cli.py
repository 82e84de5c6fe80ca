"""Path arguments as URLs on every command: bad URL, missing bucket, missing credentials -> one line each."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests import _remote_fixtures as remote
from tests._tile_helpers import small_slide
from wsi_encoder.cli import main

s3_server, s3, upload = remote.s3_server, remote.s3, remote.upload  # fixtures of this module


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def _one_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1, output
    assert "Traceback" not in output
    assert "wsienc-test-secret" not in output and remote._ENV["AWS_ACCESS_KEY_ID"] not in output.replace("testing.", "")
    return errors[0]


@pytest.fixture
def slide_url(s3: str, tmp_path: Path) -> str:
    return upload(s3, small_slide(tmp_path / "a.tiff"), "slides/a.tiff")


def test_tile_cli_writes_s3_store(s3: str, slide_url: str) -> None:
    code, out = _run(["-q", "tile", f"{s3}/slides/", "--out", f"{s3}/p.zarr", "--tile-size", "128", "--workers", "1"])
    assert code == 0, out
    assert f"in {s3}/p.zarr" in out


COMMANDS = {
    "tile-slides": lambda url, s3: ["tile", url, "--out", f"{s3}/p.zarr"],
    "tile-out": lambda url, s3: ["tile", f"{s3}/slides/a.tiff", "--out", url],
    "encode": lambda url, s3: ["encode", url, "--encoder", "nic", "--out", f"{s3}/e.zarr"],
    "encode-out": lambda url, s3: ["encode", f"{s3}/p.zarr", "--encoder", "nic", "--out", url],
    "classify-store": lambda url, s3: ["classify", "train", url, "--labels", f"{s3}/l.csv", "--model", "linear", "--out", f"{s3}/m"],
    "classify-labels": lambda url, s3: ["classify", "train", f"{s3}/e.zarr", "--labels", url, "--model", "linear", "--out", f"{s3}/m"],
    "predict-model": lambda url, s3: ["classify", "predict", f"{s3}/e.zarr", "--model", url, "--out", f"{s3}/p.csv"],
    "predict-slides": lambda url, s3: ["predict", url, "--model", f"{s3}/clf", "--out", f"{s3}/pred"],
    "predict-out": lambda url, s3: ["predict", f"{s3}/slides/a.tiff", "--model", f"{s3}/clf", "--out", url],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_url_scheme_is_one_line(s3: str, slide_url: str, command: str) -> None:
    code, out = _run(COMMANDS[command]("nosuchscheme://bucket/x", s3))
    assert code != 0
    line = _one_error_line(out)
    assert "nosuchscheme://bucket/x" in line and "unknown URL scheme" in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_bucket_is_one_line(s3: str, slide_url: str, command: str) -> None:
    code, out = _run(COMMANDS[command]("s3://no-such-bucket/x.zarr", s3))
    assert code != 0
    line = _one_error_line(out)
    assert "s3://no-such-bucket" in line and "bucket does not exist" in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_credentials_is_one_line(s3: str, slide_url: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    code, out = _run(COMMANDS[command](f"{s3}/slides/a.tiff" if command != "tile-out" else f"{s3}/p.zarr", s3))
    assert code != 0
    line = _one_error_line(out)
    assert "no credentials" in line and s3 in line


def test_bad_storage_options_json_is_one_line(s3: str) -> None:
    code, out = _run(["tile", f"{s3}/slides/", "--out", f"{s3}/p.zarr", "--storage-options", "{not json"])
    assert code != 0
    line = _one_error_line(out)
    assert "--storage-options" in line and "not json" not in line


def test_classify_train_predict_with_s3_store_labels_and_outputs(s3: str, tmp_path: Path) -> None:
    import csv

    import s3fs

    from tests._classify_fixtures import write_cohort

    cohort = write_cohort(tmp_path / "cohort", n_patients=10)
    fs = s3fs.S3FileSystem()
    fs.put(str(cohort.store) + "/", f"{s3}/e.zarr/", recursive=True)
    fs.put(str(cohort.labels_csv), f"{s3}/labels.csv")
    code, out = _run(["classify", "train", f"{s3}/e.zarr", "--labels", f"{s3}/labels.csv", "--model", "linear",
                      "--out", f"{s3}/runs/linear", "--folds", "3", "--n-boot", "0"])  # fmt: skip
    assert code == 0, out
    assert f"{s3}/runs/linear/metrics.json" in out
    assert fs.isfile(f"{s3}/runs/linear/metrics.json") and fs.isfile(f"{s3}/runs/linear/model.safetensors")
    code, out = _run(["classify", "predict", f"{s3}/e.zarr", "--model", f"{s3}/runs/linear", "--out", f"{s3}/p.csv"])
    assert code == 0, out
    rows = list(csv.DictReader(fs.open(f"{s3}/p.csv", "r")))
    assert len(rows) == len(cohort.slides) and {"slide_id", "prob", "pred"} <= set(rows[0])


def test_info_reads_s3_slide_and_refuses_openslide_for_urls(s3: str, slide_url: str) -> None:
    code, out = _run(["info", slide_url, "--json"])
    assert code == 0, out
    assert '"backend": "tiffslide"' in out and slide_url in out
    code, out = _run(["info", slide_url, "--backend", "openslide"])
    assert code != 0
    assert "OpenSlide cannot read remote slides" in out
    code, out = _run(["info", f"{s3}/slides/missing.svs"])
    assert code != 0 and "no such file or object" in out


def test_predict_slides_model_and_output_on_s3(s3: str, tmp_path: Path) -> None:
    """`wsienc predict` from s3:// slides with an s3:// model into an s3:// folder equals a local run, and resumes."""
    import s3fs

    from tests.test_predict import _model
    from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(2):
        write_synthetic_slide(folder / f"s{i}.tif", SyntheticSlideSpec(width=1536, height=1024, mpp=0.5, seed=i, pieces=1))
    model = _model(tmp_path / "clf")
    fs = s3fs.S3FileSystem()
    fs.put(str(folder) + "/", f"{s3}/slides/", recursive=True)
    fs.put(str(model) + "/", f"{s3}/clf/", recursive=True)
    code, out = _run(["predict", str(folder), "--model", str(model), "--out", str(tmp_path / "local"), "--threads", "1"])
    assert code == 0, out
    args = ["predict", f"{s3}/slides/", "--model", f"{s3}/clf", "--out", f"{s3}/pred", "--threads", "1"]
    code, out = _run(args)
    assert code == 0, out
    assert f"{s3}/pred/predictions.csv" in out
    import csv
    import io

    def rows(text: str) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(io.StringIO(text))]

    local_rows = rows((tmp_path / "local" / "predictions.csv").read_text())
    remote_rows = rows(fs.cat_file(f"{s3}/pred/predictions.csv").decode())
    assert local_rows == remote_rows and len(remote_rows) == 2
    assert fs.isfile(f"{s3}/pred/geojson/s0.geojson")
    code, out = _run(args)  # a re-run finds the finished slides in the uploaded folder
    assert code == 0 and "earlier run" in out
    # The model is recorded as given (its URL, not the local copy), the outputs relative to the folder.
    import json

    run = json.loads(fs.cat_file(f"{s3}/pred/run.json"))
    assert run["model"] == f"{s3}/clf"
    record = json.loads(fs.cat_file(f"{s3}/pred/slides/s0.json"))
    assert record["files"]["geojson"] == "geojson/s0.geojson"
