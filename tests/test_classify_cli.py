"""`wsienc classify train` / `predict` through click's CliRunner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from _classify_fixtures import FAST, cached_cohort, one_torch_thread, write_cohort  # noqa: F401
from click.testing import CliRunner
from PIL import Image

from wsi_encoder.cli import main
from wsi_encoder.io.embedding_store import EmbeddingStore, SlideBags
from wsi_encoder.models.classifier_files import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(model: str) -> list[str]:
    out = []
    for key, value in FAST[model].items():
        out += ["--param", f"{key}={value}"]
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return cached_cohort(tmp_path_factory, "binary", n_patients=28)


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`classify train` of the grid CNN (4 folds)."""
    out = tmp_path_factory.mktemp("cli_gridcnn")
    result = CliRunner().invoke(
        main,
        ["classify", "train", str(cohort.store), "--labels", str(cohort.labels_csv), "--model", "gridcnn",
         "--out", str(out), "--folds", "4", "--seed", "1", "--n-boot", "100", "--device", "cpu", "--threads", "1",
         *_params("gridcnn")],
    )
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_train_prints_and_writes(trained) -> None:
    out, output = trained
    assert "gridcnn: 42 slides, 28 patients, classes normal, lesion (positive: lesion)" in output
    assert "fold 4/4" in output and "pooled [95% CI]" in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_fold"]) == 4 and metrics["pooled"]["auc"] >= 0.9
    assert metrics["config"]["width"] == 32 and metrics["config"]["epochs"] == 40
    with (out / "predictions.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header[:4] == ["slide_id", "label", "prob", "fold"]
    for png in ("roc.png", "calibration.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 200


@pytest.mark.slow
def test_predict_round_trip_with_heatmaps(trained, tmp_path: Path) -> None:
    out, _ = trained
    new = write_cohort(tmp_path / "new", n_patients=6, seed=99)  # new slides, same encoder
    result = CliRunner().invoke(
        main,
        ["classify", "predict", str(new.store), "--model", str(out), "--out", str(tmp_path / "p.csv"),
         "--heatmap-dir", str(tmp_path / "heat"), "--labels", str(new.labels_csv), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "predicted 8 slides" in result.output and '"auc"' in result.output
    with (tmp_path / "p.csv").open() as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    model, meta = load_model(out, device="cpu")
    reader = EmbeddingStore.open(new.store)
    bags = SlideBags(reader, reader.slide_ids)
    expected = model.predict_proba(bags)[:, 1]
    np.testing.assert_allclose([float(rows[b.slide_id]["prob"]) for b in bags], expected, atol=2e-6)
    assert meta["refit"]["epochs"] >= 1
    assert {r["label"] for r in rows.values()} == {"normal", "lesion"}
    assert len(list((tmp_path / "heat").glob("*.png"))) == 8
    bag = bags[0]
    heat = np.load(tmp_path / "heat" / f"{bag.slide_id}.npy", allow_pickle=False)
    assert heat.shape == bag.grid_shape and np.isnan(heat[~bag.mask]).all()
    with Image.open(tmp_path / "heat" / f"{bag.slide_id}.png") as im:
        assert im.format == "PNG"


def test_linear_train_predict_cli(cohort, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["classify", "train", str(cohort.store), "--labels", str(cohort.labels_csv), "--model", "linear",
         "--out", str(tmp_path / "m"), "--folds", "3", "--n-boot", "0", "--epochs", "5"],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["classify", "predict", str(cohort.store), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "p.csv")],
    )
    assert result.exit_code == 0, result.output
    with (tmp_path / "p.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 42 and set(rows[0]) == {"slide_id", "prob", "pred"}
    assert {r["pred"] for r in rows} == {"normal", "lesion"}


def test_predict_refuses_other_encoders_and_sizes(cohort, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["classify", "train", str(cohort.store), "--labels", str(cohort.labels_csv), "--model", "linear",
         "--out", str(tmp_path / "m"), "--folds", "3", "--n-boot", "0"],
    )
    assert result.exit_code == 0, result.output
    other = write_cohort(tmp_path / "other", n_patients=4, dim=cohort.dim)
    root = zarr.open_group(str(other.store), mode="a")
    for slide in other.slides:
        root[slide.slide_id].attrs["encoder"] = {"name": "resnet", "config": {}, "weights_sha256": "1" * 64}
    args = ["classify", "predict", str(other.store), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "p.csv")]
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert "encoded by resnet" in result.output and "--allow-encoder-mismatch" in result.output
    assert runner.invoke(main, [*args, "--allow-encoder-mismatch"]).exit_code == 0
    small = write_cohort(tmp_path / "small", n_patients=4, dim=8)
    result = runner.invoke(
        main, ["classify", "predict", str(small.store), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "q.csv")]
    )
    assert result.exit_code == 1 and "have 8 features" in result.output and "trained on 16" in result.output


def test_cli_usage_errors(cohort, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["classify", "train", str(cohort.store), "--labels", str(cohort.labels_csv), "--out", str(tmp_path / "o")]
    result = runner.invoke(main, [*base, "--model", "svm"])
    assert result.exit_code == 2 and "svm" in result.output
    result = runner.invoke(main, [*base, "--model", "linear", "--param", "nonsense"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(main, [*base, "--model", "abmil", "--param", "hiden=3"])
    assert result.exit_code == 1 and "unknown parameter(s) hiden" in result.output
    result = runner.invoke(main, [*base, "--model", "linear", "--folds", "40"])
    assert result.exit_code == 1 and "--folds" in result.output
    result = runner.invoke(main, ["classify", "predict", str(cohort.store), "--model", str(tmp_path), "--out", "x.csv"])
    assert result.exit_code == 1 and "model.json" in result.output
    result = runner.invoke(main, ["classify", "train", str(tmp_path / "none.zarr"), "--labels", str(cohort.labels_csv),
                                  "--model", "linear", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no such embedding store" in result.output
