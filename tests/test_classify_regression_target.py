"""``--target regression``: a generated cohort whose slide target is its lesion size is learnt (Spearman > 0.5)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from _classify_fixtures import FAST, one_torch_thread, write_labels, write_slide  # noqa: F401
from click.testing import CliRunner

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.evaluation.regression_cv import target_strata
from wsi_encoder.pipelines.classify import train_regressor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_size_cohort(out: Path, n_patients: int = 30, dim: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Slides with a lesion disk of random radius (0 to 4 tiles); target = lesion tiles + N(0, 1) noise."""
    rng = np.random.default_rng(seed)
    store = out / "embeddings.zarr"
    root = zarr.open_group(str(store), mode="w")
    rows, status = [], {}
    for p in range(n_patients):
        for s in range(1 + p % 2):
            sid = f"P{p:03d}_S{s}"
            grid = np.argwhere(np.ones((14, 14), dtype=bool))
            features = rng.normal(0, 1, (len(grid), dim))
            near = np.hypot(*(grid - rng.integers(3, 11, 2)).T) <= rng.uniform(0, 4)
            features[near, :3] += 3.0
            write_slide(root, sid, features, grid, (14, 14))
            status[sid] = {"status": "ok", "reason": None, "source": f"/slides/{sid}.svs"}
            rows.append((sid, f"{near.sum() + rng.normal(0, 1):.4f}", f"P{p:03d}"))
    root.attrs.update({"kind": "embedding_store", "slides": status})
    return store, write_labels(out / "labels.csv", rows, ("slide_id", "target", "patient_id"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_size_cohort(tmp_path_factory.mktemp("size_cohort"))


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(("model", "loss"), [("linear", "mse"), pytest.param("abmil", "huber", marks=pytest.mark.slow),
                                          pytest.param("gridcnn", "mse", marks=pytest.mark.slow)])
def test_regressor_learns_lesion_size(cohort: tuple[Path, Path], tmp_path: Path, model: str, loss: str) -> None:
    store, labels = cohort
    result = train_regressor(store, labels, model, tmp_path, folds=4, seed=0, loss=loss, params=FAST[model],
                             device="cpu", n_boot=200, threads=1)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["spearman"] >= 0.8, metrics["pooled"]  # the bar (the target is the lesion size plus unit noise)
    assert result.files["scatter"] == tmp_path / "predicted_vs_true.png" and result.files["scatter"].stat().st_size > 0
    for name in ("spearman", "pearson", "mae", "r2"):
        low, high = metrics[f"{name}_ci95"]
        assert low <= metrics[name] <= high, (name, metrics[name], low, high)
    rows = _read(tmp_path / "predictions.csv")
    assert list(rows[0]) == ["slide_id", "patient_id", "fold", "prediction", "target"]
    assert len(rows) == len(result.targets.slide_ids) == 45
    # patient-grouped: a patient's slides are all tested in one fold
    folds_of: dict[str, set[str]] = {}
    for row in rows:
        folds_of.setdefault(row["patient_id"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in folds_of.values())
    from scipy.stats import spearmanr

    pooled = spearmanr([float(r["target"]) for r in rows], [float(r["prediction"]) for r in rows]).statistic
    assert metrics["spearman"] == pytest.approx(pooled, abs=1e-4)
    # predictions are on the target's scale in every fold: pooling them loses little against the per-fold mean
    per_fold = [spearmanr([float(r["target"]) for r in rows if r["fold"] == str(k)],
                          [float(r["prediction"]) for r in rows if r["fold"] == str(k)]).statistic for k in range(4)]
    assert metrics["spearman_folds_mean"] == pytest.approx(np.mean(per_fold), abs=1e-4)
    assert metrics["spearman"] >= metrics["spearman_folds_mean"] - 0.05


def test_shuffled_targets_are_not_learnt(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    store, labels = cohort
    rows = _read(labels)
    targets = np.random.default_rng(1).permutation([r["target"] for r in rows])
    shuffled = write_labels(tmp_path / "shuffled.csv", [(r["slide_id"], t, r["patient_id"]) for r, t in zip(rows, targets, strict=True)],
                            ("slide_id", "target", "patient_id"))
    metrics = train_regressor(store, shuffled, "linear", tmp_path / "run", folds=4, device="cpu", n_boot=0).metrics
    assert metrics["spearman"] < 0.4


def test_target_strata_are_patient_quantiles() -> None:
    y = np.array([1.0, 1.0, 5.0, 2.0, 9.0, 8.0, 3.0, 7.0])
    groups = np.array(["a", "a", "b", "c", "d", "e", "f", "g"])
    strata = target_strata(y, groups, folds=2)
    assert strata[0] == strata[1]  # one patient, one stratum
    assert strata[groups == "a"][0] == 0 and strata[groups == "d"][0] == strata.max() == 2


def test_regression_refuses_rotate4_and_class_labels(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    store, labels = cohort
    with pytest.raises(InvalidParameterError, match="classification only"):
        train_regressor(store, labels, "linear", tmp_path, cv_scheme="rotate4")
    class_csv = write_labels(tmp_path / "classes.csv", [("P000_S0", "tumor")], ("slide_id", "label"))
    with pytest.raises(DatasetError, match="missing column"):
        train_regressor(store, class_csv, "linear", tmp_path)


def test_cli_target_regression(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    from wsi_encoder.cli import main

    store, labels = cohort
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["classify", "train", str(store), "--labels", str(labels), "--model", "linear",
                                    "--target", "regression", "--out", str(out), "--folds", "3", "--n-boot", "50",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "spearman" in res.output
    assert json.loads((out / "metrics.json").read_text())["target"] == "regression"


def test_cli_lists_agree_with_the_library() -> None:
    from wsi_encoder.cli.classify import REGRESSION_LOSSES as CLI_LOSSES
    from wsi_encoder.models.slide_classifiers.regressors import REGRESSION_LOSSES

    assert CLI_LOSSES == REGRESSION_LOSSES


def test_test_split_is_scored_by_the_refit_model(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    store, labels = cohort
    rows = _read(labels)
    held = {"P000", "P001", "P002", "P003", "P004", "P005"}
    split_csv = write_labels(
        tmp_path / "split.csv",
        [(r["slide_id"], r["target"], r["patient_id"], "test" if r["patient_id"] in held else "") for r in rows],
        ("slide_id", "target", "patient_id", "split"),
    )
    metrics = train_regressor(store, split_csv, "linear", tmp_path / "run", folds=4, device="cpu", n_boot=50).metrics
    out = _read(tmp_path / "run" / "predictions.csv")
    test_rows = [r for r in out if r["fold"] == "test"]
    assert {r["patient_id"] for r in test_rows} == held
    assert metrics["test"]["n_slides"] == len(test_rows) == 9
    assert metrics["test"]["metrics"]["spearman"] > 0.5
    assert "alpha" in metrics["refit"]["params"]
