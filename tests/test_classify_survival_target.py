"""``--target survival``: a generated cohort whose hazard grows with the lesion size gives C-index > 0.5."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _classify_fixtures import FAST, one_torch_thread, write_labels  # noqa: F401
from test_classify_regression_target import write_size_cohort

from wsi_encoder.evaluation.survival_cv import event_strata
from wsi_encoder.pipelines.classify import train_survival

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Exponential times with hazard exp(0.2 * lesion tiles), uniform censoring (about 25% censored): the true
    lesion size ranks the slides with a C-index of about 0.87."""
    out = tmp_path_factory.mktemp("survival_cohort")
    store, sizes = write_size_cohort(out, n_patients=40)
    rng = np.random.default_rng(5)
    with sizes.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    labelled = []
    for r in rows:
        death = rng.exponential(20.0 * np.exp(-0.2 * float(r["target"])))
        censor = rng.uniform(0, 12.0)
        labelled.append((r["slide_id"], f"{min(death, censor):.4f}", int(death <= censor), r["patient_id"]))
    return store, write_labels(out / "survival.csv", labelled, ("slide_id", "time", "event", "patient_id"))


def _km_ibs(labels: Path, times: list[float]) -> float:
    """The integrated Brier score of the Kaplan-Meier curve of all slides (the same S for everyone)."""
    from sksurv.metrics import integrated_brier_score
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    with labels.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    t, e = np.array([float(r["time"]) for r in table]), np.array([r["event"] == "1" for r in table])
    grid = np.linspace(*times, 20)
    x, km = kaplan_meier_estimator(e, t)
    y = Surv.from_arrays(e, t)
    return float(integrated_brier_score(y, y, np.tile(np.interp(grid, x, km), (len(t), 1)), grid))


@pytest.mark.parametrize(("model", "loss"), [("linear", "cox"), pytest.param("abmil", "cox", marks=pytest.mark.slow),
                                          pytest.param("abmil", "nll", marks=pytest.mark.slow)])
def test_survival_model_ranks_by_lesion_size(cohort: tuple[Path, Path], tmp_path: Path, model: str, loss: str) -> None:
    store, labels = cohort
    params = {**FAST[model], "batch_size": 16} if model != "linear" else {}
    if loss == "nll":  # a mean over slides, not events: smaller gradients than Cox's at the same lr
        params["lr"] = 3e-3
    train_survival(store, labels, model, tmp_path, folds=4, seed=0, params=params, device="cpu", n_boot=100,
                   threads=1, loss=loss, time_bins=4)
    m = json.loads((tmp_path / "metrics.json").read_text())
    # every model has a survival function (Breslow baseline, or the discrete-time hazards): its IBS beats the
    # Kaplan-Meier curve's, which knows nothing of the slides
    assert m["ibs_times"] == [min(m["horizons"]), max(m["horizons"])]
    low, high = m["ibs_ci95"]
    assert 0 < low <= m["ibs"] <= high < 0.25
    assert m["ibs"] < _km_ibs(labels, m["ibs_times"]) - 0.01, (m["ibs"], _km_ibs(labels, m["ibs_times"]))
    assert m["time_bins"] == (4 if loss == "nll" else None)
    assert (tmp_path / "kaplan_meier.png").stat().st_size > 0
    assert m["risk_groups"]["n_groups"] == 2 and 0 <= m["risk_groups"]["logrank_p"] <= 1
    # the bar on the headline: C >= 0.75 out of fold (the true lesion size gives about 0.87), over pairs
    # within a fold; pooling the 4 fold models' risks as one ranking mixes 4 scales and scores lower
    assert m["c_index"] >= 0.75, (m["c_index"], m["c_index_folds_mean"], m["c_index_pooled_naive"])
    low, high = m["c_index_ci95"]
    assert low <= m["c_index"] <= high
    assert m["bootstrap"]["unit"] == "patient, resampled within its fold"
    assert len(m["horizons"]) == 3 and m["uno_c_tau"] == max(m["horizons"]) and len(m["td_auc"]) == 3
    assert len(m["uno_c_strata"]) == 4 and m["uno_c"] == pytest.approx(np.nanmean(
        [np.nan if u is None else u for u in m["uno_c_strata"]]))
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "patient_id", "fold", "risk", "time", "event"]
    assert m["c_index"] == pytest.approx(_lifelines_within_fold_c(rows), abs=1e-9)
    assert m["c_index_pooled_naive"] == pytest.approx(_lifelines_pooled_c(rows), abs=1e-9)
    # the risk sign: the same predictions with the sign flipped fall below 0.5
    for r in rows:
        r["risk"] = str(-float(r["risk"]))
    assert _lifelines_within_fold_c(rows) < 0.5


def _lifelines_within_fold_c(rows: list[dict[str, str]]) -> float:
    """Harrell's C of ``predictions.csv`` over pairs within a fold, from lifelines' pair counts per fold."""
    from lifelines.utils.concordance import _concordance_summary_statistics

    good = pairs = 0.0
    for fold in {r["fold"] for r in rows}:
        sel = [r for r in rows if r["fold"] == fold]
        correct, tied, n = _concordance_summary_statistics(  # lifelines: a higher score = longer survival
            np.array([float(r["time"]) for r in sel]), -np.array([float(r["risk"]) for r in sel]),
            np.array([r["event"] == "1" for r in sel]))
        good, pairs = good + correct + 0.5 * tied, pairs + n
    return good / pairs


def _lifelines_pooled_c(rows: list[dict[str, str]]) -> float:
    from lifelines.utils import concordance_index

    return float(concordance_index([float(r["time"]) for r in rows], [-float(r["risk"]) for r in rows],
                                   [r["event"] == "1" for r in rows]))


def test_event_strata_are_per_patient() -> None:
    strata = event_strata([0, 1, 0, 0], ["a", "a", "b", "c"])
    assert strata.tolist() == [1, 1, 0, 0]


def test_cli_target_survival(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsi_encoder.cli import main

    store, labels = cohort
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["classify", "train", str(store), "--labels", str(labels), "--model", "linear",
                                    "--target", "survival", "--out", str(out), "--folds", "3", "--n-boot", "50",
                                    "--horizons", "1,3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "Harrell's C" in res.output and "log-rank p" in res.output and "kaplan_meier.png" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["target"] == "survival" and m["horizons"] == [1.0, 3.0] and m["uno_c_tau"] == 3.0
    assert "pairs within each fold" in res.output
    res = CliRunner().invoke(main, ["classify", "predict", str(store), "--model", str(out), "--out",
                                    str(tmp_path / "p.csv"), "--horizons", "2,4.5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with (tmp_path / "p.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "risk", "survival_at_2", "survival_at_4.5"]
    assert all(1 >= float(r["survival_at_2"]) >= float(r["survival_at_4.5"]) >= 0 for r in rows)


def test_cli_survival_losses(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsi_encoder.cli import main
    from wsi_encoder.cli.classify import SURVIVAL_LOSSES as CLI_LOSSES
    from wsi_encoder.models.slide_classifiers.survival import SURVIVAL_LOSSES

    assert CLI_LOSSES == SURVIVAL_LOSSES
    store, labels = cohort
    base = ["classify", "train", str(store), "--labels", str(labels), "--target", "survival", "--folds", "3",
            "--n-boot", "20", "--device", "cpu"]
    res = CliRunner().invoke(main, [*base, "--model", "linear", "--loss", "huber", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "huber is not a loss of --target survival" in res.output
    assert not (tmp_path / "x").exists()
    out = tmp_path / "nll"
    res = CliRunner().invoke(main, [*base, "--model", "abmil", "--loss", "nll", "--time-bins", "3", "--epochs", "2",
                                    "--param", "hidden=8", "--param", "attention_dim=8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "integrated Brier score" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["time_bins"] == 3 and m["loss"].startswith("nll") and m["min_events_per_batch"] is None


def test_test_split_is_scored_by_the_final_model(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    from lifelines.utils import concordance_index

    from wsi_encoder.io.embedding_store import EmbeddingStore
    from wsi_encoder.models.outcome_files import load_outcome_model

    store, labels = cohort
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    held = {f"P{i:03d}" for i in range(0, 40, 3)}  # 14 of the 40 patients
    split_csv = write_labels(tmp_path / "split.csv", [(r["slide_id"], r["time"], r["event"], r["patient_id"],
                                                       "test" if r["patient_id"] in held else "") for r in rows],
                             ("slide_id", "time", "event", "patient_id", "split"))
    m = train_survival(store, split_csv, "linear", tmp_path / "run", folds=4, device="cpu", n_boot=200).metrics
    with (tmp_path / "run" / "predictions.csv").open(newline="") as fh:
        out = list(csv.DictReader(fh))
    test_rows = [r for r in out if r["fold"] == "test"]
    assert {r["patient_id"] for r in test_rows} == held and m["test"]["n_slides"] == len(test_rows)
    assert m["n_slides"] == len(out) - len(test_rows) and not held & {r["patient_id"] for r in out if r["fold"] != "test"}
    # the test slides' risks are the saved final model's, and their C is lifelines' on those rows
    model, _ = load_outcome_model(tmp_path / "run", "cpu")
    bags = EmbeddingStore.open(store).bags([r["slide_id"] for r in test_rows])
    assert np.allclose([float(r["risk"]) for r in test_rows], model.predict(bags), atol=1e-5)
    c = concordance_index([float(r["time"]) for r in test_rows], [-float(r["risk"]) for r in test_rows],
                          [r["event"] == "1" for r in test_rows])
    test = m["test"]
    assert test["metrics"]["c_index"] == pytest.approx(c, abs=1e-5) and c >= 0.7, c
    low, high = test["c_index_ci95"]
    assert low <= c <= high and 0 < test["ibs_ci95"][0] <= test["metrics"]["ibs"] <= test["ibs_ci95"][1] < 0.25
    assert test["n_events"] == sum(r["event"] == "1" for r in test_rows)
