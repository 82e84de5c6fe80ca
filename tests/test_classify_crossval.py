"""Cross-validation: learnable signal, no leakage under shuffled labels, patient grouping, metric agreement."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from _classify_fixtures import FAST, cached_cohort, one_torch_thread, write_labels  # noqa: F401
from sklearn.calibration import calibration_curve
from sklearn.metrics import balanced_accuracy_score, brier_score_loss, f1_score, roc_auc_score

from wsi_encoder.evaluation.crossval import cross_validate, inner_split, patient_folds
from wsi_encoder.io.embedding_store import EmbeddingStore, SlideBags
from wsi_encoder.io.labels import read_labels
from wsi_encoder.pipelines.classify import train_classifier
from wsi_encoder.pipelines.classify_predict import predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(cohort):
    reader = EmbeddingStore.open(cohort.store)
    table = read_labels(cohort.labels_csv, reader.slide_ids)
    return SlideBags(reader, table.slide_ids), table.y, np.array(table.patient_ids)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory):
    return cached_cohort(tmp_path_factory, "binary", n_patients=28)


@pytest.fixture(scope="module")
def linear_run(binary, tmp_path_factory: pytest.TempPathFactory):
    """One `train_classifier` run of the linear model, with a held-out test split of 4 patients."""
    rows = [(s.slide_id, s.label, s.patient_id, "test" if s.patient_id in {"P000", "P001", "P002", "P003"} else "")
            for s in binary.slides]
    labels = write_labels(tmp_path_factory.mktemp("split") / "labels.csv", rows, ("slide_id", "label", "patient_id", "split"))
    out = tmp_path_factory.mktemp("linear_run")
    folds_seen = []
    result = train_classifier(binary.store, labels, "linear", out, folds=4, seed=3, device="cpu", n_boot=200,
                              threads=1, on_fold=folds_seen.append)
    return result, out, labels, folds_seen


# ---------------------------------------------------------------------------------------------- learnable signal
@pytest.mark.parametrize("model", ["linear", pytest.param("abmil", marks=pytest.mark.slow),
                                   pytest.param("gridcnn", marks=pytest.mark.slow)])
def test_every_model_learns_the_signal(model: str, binary) -> None:
    bags, y, groups = _load(binary)
    result = cross_validate(bags, y, groups, model, config=FAST[model], folds=4, seed=0, device="cpu",
                            n_boot=0, refit=False)
    assert result.pooled["auc"] >= 0.9, result.pooled
    assert result.mean["auc"] >= 0.9
    assert np.isfinite(result.oof_prob).all() and (result.fold_of >= 0).all()


# ---------------------------------------------------------------------------------------------- no leakage
#: Standard deviation of one shuffle's pooled out-of-fold AUC on the null cohort below, measured over
#: label permutations: 0.100 (linear, 16 permutations), 0.110 (abmil, 6), 0.076 (gridcnn, 6). The
#: Hanley-McNeil value for an
#: uninformative ranking of 32 vs 32 patients is 0.073: cross-validation adds variance.
NULL_AUC_SD = 0.11


@pytest.fixture(scope="module")
def null_cohort(tmp_path_factory: pytest.TempPathFactory):
    """No lesion signal; each of 64 patients has a strong signature shared by its two slides (a leak would use it)."""
    return cached_cohort(tmp_path_factory, "null", n_patients=64, slides_per_patient=(2,), grid=(10, 10), shift=0.0,
                         patient_effect=1.0, seed=11)


def _shuffled_patient_labels(groups: np.ndarray, seed: int) -> np.ndarray:
    patients = np.unique(groups)
    label = dict(zip(patients, np.random.default_rng(seed).permutation(np.arange(len(patients)) % 2), strict=True))
    return np.array([label[g] for g in groups])


@pytest.mark.parametrize("model", ["linear", pytest.param("abmil", marks=pytest.mark.slow),
                                   pytest.param("gridcnn", marks=pytest.mark.slow)])
def test_shuffled_labels_stay_near_chance(model: str, null_cohort) -> None:
    """Labels shuffled across patients: the out-of-fold AUC is that of an uninformative ranking.

    The mean over ``m`` shuffles must lie within 3.5 standard deviations of a mean of ``m`` null AUCs
    (a false alarm has probability about 5e-4). Memorising patients (a fold leak) gives AUCs of 0.6-0.9
    on this cohort, and the direct grouping checks below catch any leak whatever its size.
    """
    bags, _, groups = _load(null_cohort)
    shuffles = 4 if model == "linear" else 2
    aucs = []
    for seed in range(shuffles):
        y = _shuffled_patient_labels(groups, seed)
        config = FAST[model] if model == "linear" else {**FAST[model], "epochs": 20}
        result = cross_validate(bags, y, groups, model, config=config, folds=4, seed=seed, device="cpu",
                                n_boot=0, refit=False)
        aucs.append(result.pooled["auc"])
    tolerance = 3.5 * NULL_AUC_SD / math.sqrt(shuffles)
    assert abs(np.mean(aucs) - 0.5) < tolerance, f"{model}: AUCs {np.round(aucs, 3)} under shuffled labels"


# ---------------------------------------------------------------------------------------------- grouping
def test_patient_grouping_holds(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(30)], rng.integers(1, 4, 30))
    y = np.array([int(g[1:]) % 2 for g in groups])
    y[groups == "p4"] = [0, 1, 0][: (groups == "p4").sum()]  # a patient with slides of both classes
    everything = set()
    for train, test in patient_folds(y, groups, folds=5, seed=1):
        assert not set(groups[train]) & set(groups[test])
        assert set(np.unique(y[test])) == {0, 1}  # stratified: both classes in every test fold
        inner_train, val = inner_split(y[train], groups[train], 0.2, seed=7)
        assert len(val) and not set(groups[train][inner_train]) & set(groups[train][val])
        assert not everything & set(test.tolist())
        everything |= set(test.tolist())
    assert everything == set(range(len(y)))


def test_predictions_csv_keeps_patients_in_one_fold(linear_run) -> None:
    result, out, _, folds_seen = linear_run
    rows = _read_csv(out / "predictions.csv")
    fold_of_patient: dict[str, set[str]] = {}
    for row in rows:
        fold_of_patient.setdefault(row["patient_id"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in fold_of_patient.values())
    assert {r["fold"] for r in rows} == {"0", "1", "2", "3", "test"}
    assert {r["patient_id"] for r in rows if r["fold"] == "test"} == {"P000", "P001", "P002", "P003"}
    assert [f.fold for f in folds_seen] == [0, 1, 2, 3]
    for fold in result.crossval.fold_results:
        train_patients = {rows[i]["patient_id"] for i in fold.train_index + fold.val_index}
        assert not train_patients & {rows[i]["patient_id"] for i in fold.test_index}


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_agree_with_sklearn(linear_run) -> None:
    _, out, _, _ = linear_run
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [r for r in _read_csv(out / "predictions.csv") if r["fold"] != "test"]
    y = np.array([r["label"] == "lesion" for r in rows], dtype=int)
    p = np.array([float(r["prob"]) for r in rows])
    pooled = metrics["pooled"]
    assert pooled["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
    assert pooled["f1"] == pytest.approx(f1_score(y, p >= 0.5), abs=1e-5)
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p >= 0.5), abs=1e-5)
    assert pooled["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-5)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    counts = np.bincount(np.minimum((p * 10).astype(int), 9), minlength=10)
    ece = np.sum(counts[counts > 0] / len(p) * np.abs(prob_true - prob_pred))
    assert pooled["ece"] == pytest.approx(ece, abs=1e-5)
    folds = np.array([int(r["fold"]) for r in rows])
    per_fold = [roc_auc_score(y[folds == k], p[folds == k]) for k in range(4)]
    assert [f["metrics"]["auc"] for f in metrics["per_fold"]] == pytest.approx(per_fold, abs=1e-5)
    assert metrics["mean"]["auc"] == pytest.approx(np.mean(per_fold), abs=1e-5)
    assert metrics["sd"]["auc"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-5)
    for name, (low, high) in metrics["pooled_ci95"].items():
        if name != "auc" or pooled[name] < 1:
            assert low <= pooled[name] + 1e-9 and pooled[name] - 1e-9 <= high, name
    assert metrics["bootstrap"] == {"n_boot": 200, "unit": "patient", "interval": "percentile 95%"}


def test_outputs_and_test_split(linear_run) -> None:
    result, out, _, _ = linear_run
    for name in ("metrics.json", "predictions.csv", "roc.png", "calibration.png", "roc_test.png",
                 "calibration_test.png", "model.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = result.metrics
    assert metrics["test"]["n_patients"] == 4 and metrics["test"]["metrics"]["auc"] is not None
    assert metrics["labels"]["class_index"] == {"normal": 0, "lesion": 1}
    model = json.loads((out / "model.json").read_text())
    assert model["classes"] == ["normal", "lesion"] and model["encoder"]["name"] == "fixture-encoder"
    assert model["refit"] == result.crossval.refit_params


def test_predict_round_trip(linear_run, binary, tmp_path: Path) -> None:
    result, out, labels, _ = linear_run
    pred = predict(binary.store, out, tmp_path / "p.csv", labels_csv=labels, device="cpu")
    rows = {r["slide_id"]: r for r in _read_csv(tmp_path / "p.csv")}
    bags, _, _ = _load(binary)
    expected = result.crossval.final_model.predict_proba(bags)[:, 1]
    got = np.array([float(rows[b.slide_id]["prob"]) for b in bags])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert pred.metrics is not None and pred.metrics["n_slides"] == len(bags)
    assert {r["label"] for r in rows.values()} == {"normal", "lesion"}


def test_resume_reuses_finished_folds(binary, tmp_path: Path) -> None:
    kwargs = {"folds": 3, "device": "cpu", "n_boot": 0}
    first = train_classifier(binary.store, binary.labels_csv, "linear", tmp_path, seed=1, **kwargs)
    seen = []
    again = train_classifier(binary.store, binary.labels_csv, "linear", tmp_path, seed=1, on_fold=seen.append, **kwargs)
    assert [f.resumed for f in seen] == [True, True, True]
    np.testing.assert_allclose(again.crossval.oof_prob, first.crossval.oof_prob)
    seen.clear()
    train_classifier(binary.store, binary.labels_csv, "linear", tmp_path, seed=2, on_fold=seen.append, **kwargs)
    assert not any(f.resumed for f in seen)


def test_multiclass(tmp_path_factory: pytest.TempPathFactory) -> None:
    cohort = cached_cohort(tmp_path_factory, "three", n_patients=27, classes=("normal", "typeA", "typeB"),
                           shift=3.5, seed=4)
    out = tmp_path_factory.mktemp("multi")
    result = train_classifier(cohort.store, cohort.labels_csv, "linear", out, folds=3, seed=0, device="cpu", n_boot=50)
    rows = _read_csv(out / "predictions.csv")
    assert {"prob_normal", "prob_typeA", "prob_typeB", "pred"} <= set(rows[0])
    classes = ["normal", "typeA", "typeB"]
    y = np.array([classes.index(r["label"]) for r in rows])
    prob = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose([float(r["prob"]) for r in rows], prob.max(1), atol=1e-6)
    pooled = result.metrics["pooled"]
    assert pooled["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"), abs=1e-4)
    assert pooled["f1"] == pytest.approx(f1_score(y, prob.argmax(1), average="macro"), abs=1e-4)
    assert pooled["auc"] >= 0.9
    assert result.metrics["labels"]["positive_class"] is None
    assert (out / "roc.png").is_file()
