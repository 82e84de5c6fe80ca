"""`classify train --cv-scheme rotate4`: TPAMI 2019's 4 rotating patient partitions and the averaged fold models."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from _classify_fixtures import cached_cohort, one_torch_thread  # noqa: F401
from click.testing import CliRunner

from tests.test_classify_crossval import _load
from wsi_encoder.cli import main
from wsi_encoder.cli.classify import CV_SCHEMES as CLI_SCHEMES
from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.evaluation.crossval import CV_SCHEMES, cross_validate, rotating_folds
from wsi_encoder.io.embedding_store import EmbeddingStore
from wsi_encoder.models.classifier_files import load_model
from wsi_encoder.models.slide_classifiers import create_slide_classifier
from wsi_encoder.models.slide_classifiers.ensemble import FoldEnsemble
from wsi_encoder.pipelines.classify import train_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return cached_cohort(tmp_path_factory, "binary", n_patients=28)


def test_partitions_rotate_two_train_one_validates_one_tests() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat([f"P{i:02d}" for i in range(24)], rng.integers(1, 4, 24))
    label_of = {g: i % 2 for i, g in enumerate(np.unique(groups))}
    y = np.array([label_of[g] for g in groups])
    plan = rotating_folds(y, groups, seed=5)
    assert len(plan) == 4
    tests = [set(test.tolist()) for _, _, test in plan]
    assert set().union(*tests) == set(range(len(y))) and sum(map(len, tests)) == len(y)  # each slide tested once
    for k, (train, val, test) in enumerate(plan):
        patients = [set(groups[ix]) for ix in (train, val, test)]
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
        assert set(val.tolist()) == tests[(k + 1) % 4]  # the next partition validates
        assert set(train.tolist()) == tests[(k + 2) % 4] | tests[(k + 3) % 4]  # the other two train
        assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == len(y)
        assert set(y[test]) == {0, 1}  # stratified
    assert CLI_SCHEMES == CV_SCHEMES


def test_the_final_model_is_the_mean_of_the_four_fold_models(cohort, tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen = []
    result = train_classifier(cohort.store, cohort.labels_csv, "linear", out, folds=7, seed=2, device="cpu",
                              n_boot=50, threads=1, cv_scheme="rotate4", on_fold=seen.append)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cv_scheme"] == "rotate4" and metrics["folds"] == 4 and len(metrics["per_fold"]) == 4
    assert metrics["val_fraction"] is None and metrics["refit"]["params"] == {"ensemble": 4}
    assert metrics["pooled"]["auc"] >= 0.85  # the signal is learnt
    # every fold trained on exactly the two partitions after its validation one (saved fold records)
    _, y, groups = _load(cohort)
    plan = rotating_folds(y, groups, seed=2)
    for k, (train, val, test) in enumerate(plan):
        record = json.loads((out / "cv_state" / f"fold_{k}.json").read_text())
        assert record["train_index"] == train.tolist() and record["val_index"] == val.tolist()
        assert record["test_index"] == test.tolist()
    model, meta = load_model(out, "cpu")
    assert isinstance(model, FoldEnsemble) and meta["ensemble"] == 4 and meta["cv_scheme"] == "rotate4"
    members = [load_model(out / "cv_state" / f"fold_{k}_model", "cpu")[0] for k in range(4)]
    reader = EmbeddingStore.open(cohort.store)
    sample = [reader.load(s) for s in reader.slide_ids[:6]]
    expected = np.mean([m.predict_proba(sample) for m in members], axis=0)
    np.testing.assert_allclose(model.predict_proba(sample), expected, rtol=0, atol=1e-12)
    # the members differ (else averaging them would be a no-op and this test could not fail)
    assert np.abs(members[0].predict_proba(sample) - members[1].predict_proba(sample)).max() > 1e-4
    heat = model.heatmap(sample[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # background cells are NaN in every member
        mean_heat = np.nanmean([m.heatmap(sample[0]) for m in members], axis=0)
    np.testing.assert_allclose(heat, mean_heat, equal_nan=True)
    # the out-of-fold prediction of a slide comes from the one fold model that tested it
    with (out / "predictions.csv").open(newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    first = reader.slide_ids[0]
    fold = int(rows[first]["fold"])
    assert float(rows[first]["prob"]) == pytest.approx(members[fold].predict_proba([reader.load(first)])[0][1], abs=1e-6)
    # a restarted run reuses the saved fold models and gives the same ensemble
    again = train_classifier(cohort.store, cohort.labels_csv, "linear", out, folds=7, seed=2, device="cpu",
                             n_boot=50, threads=1, cv_scheme="rotate4")
    assert all(r.resumed for r in again.crossval.fold_results)
    np.testing.assert_allclose(load_model(out, "cpu")[0].predict_proba(sample), expected, atol=1e-12)
    assert result.crossval.final_model is not None


def test_cli_rotate4_trains_and_predicts(cohort, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [
        "classify", "train", str(cohort.store), "--labels", str(cohort.labels_csv), "--model", "linear",
        "--out", str(out), "--cv-scheme", "rotate4", "--n-boot", "20", "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fold 4/4" in result.output
    pred = CliRunner().invoke(main, [
        "classify", "predict", str(cohort.store), "--model", str(out), "--heatmap-dir", str(tmp_path / "h"), "--out", str(tmp_path / "p.csv"),
        "--device", "cpu",
    ])  # fmt: skip
    assert pred.exit_code == 0, pred.output
    assert (tmp_path / "p.csv").read_text().count("\n") == len(cohort.slides) + 1


def test_an_ensemble_refuses_mixed_members_and_an_unknown_scheme_is_refused(cohort) -> None:
    a = create_slide_classifier("linear", 8, 2, None, "cpu")
    b = create_slide_classifier("linear", 16, 2, None, "cpu")
    with pytest.raises(InvalidParameterError, match="one model kind"):
        FoldEnsemble([a, b])
    bags, y, groups = _load(cohort)
    with pytest.raises(InvalidParameterError, match="unknown --cv-scheme"):
        cross_validate(bags, y, groups, "linear", scheme="rotate5", device="cpu", n_boot=0)
