"""The final regression / survival model saved by ``classify train`` and used by ``classify predict``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _classify_fixtures import FAST, one_torch_thread  # noqa: F401
from test_classify_survival_target import cohort  # noqa: F401

from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.evaluation.metrics import harrell_c
from wsi_encoder.io.embedding_store import EmbeddingStore
from wsi_encoder.models.outcome_files import load_outcome_model
from wsi_encoder.models.slide_classifiers.regressors import create_regressor
from wsi_encoder.models.slide_classifiers.survival import create_cox_model
from wsi_encoder.pipelines.classify import train_regressor, train_survival
from wsi_encoder.pipelines.classify_predict import predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_linear_models_round_trip_and_predict(cohort: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    store, labels = cohort
    result = train_survival(store, labels, "linear", tmp_path / "surv", folds=3, n_boot=10, device="cpu")
    model_json = json.loads((tmp_path / "surv" / "model.json").read_text())
    assert model_json["target"] == "survival" and model_json["refit"] == result.crossval.refit_params
    out = predict(store, tmp_path / "surv", tmp_path / "surv_pred.csv", tmp_path / "heat")
    rows = _rows(out.out_csv)
    assert list(rows[0])[:2] == ["slide_id", "risk"] and not out.heatmaps  # linear draws no heatmap
    reader = EmbeddingStore.open(store)
    table = result.targets
    fresh = create_cox_model("linear", reader.embedding_dim)
    fresh.fit(reader.bags(list(table.slide_ids)), table.y, table.events, refit=result.crossval.refit_params)
    expected = fresh.predict(reader.bags([r["slide_id"] for r in rows]))
    assert np.allclose([float(r["risk"]) for r in rows], expected, rtol=1e-5, atol=1e-5)
    risk = dict(zip([r["slide_id"] for r in rows], [float(r["risk"]) for r in rows], strict=True))
    # the final model, on the slides it was fit on, ranks them by their outcome (higher risk = shorter survival)
    assert harrell_c(table.y, table.events, [risk[s] for s in table.slide_ids]) > 0.7
    # the saved Breslow baseline: survival_at_<t> at the training horizons is scikit-survival's Breslow estimate
    # on the final model's risks of its training slides
    from sksurv.linear_model.coxph import BreslowEstimator

    horizons = model_json["horizons"]
    assert horizons == result.metrics["horizons"] and len(horizons) == 3
    breslow = BreslowEstimator().fit(fresh.predict(reader.bags(list(table.slide_ids))), np.asarray(table.events),
                                     np.asarray(table.y))
    expected_s = np.stack([fn(np.array(horizons)) for fn in breslow.get_survival_function(expected)])
    got_s = np.array([[float(r[f"survival_at_{h:g}"]) for h in horizons] for r in rows])
    assert np.allclose(got_s, expected_s, atol=2e-6) and got_s.std() > 0.01
    at = predict(store, tmp_path / "surv", tmp_path / "surv_at.csv", horizons=[2.5]).rows
    assert [list(r) for r in at[:1]] == [["slide_id", "risk", "survival_at_2.5"]]
    with pytest.raises(InvalidParameterError, match="--labels scores classifiers only"):
        predict(store, tmp_path / "surv", tmp_path / "x.csv", labels_csv=labels)

    sizes = labels.parent / "labels.csv"  # the lesion-size regression labels of the same slides
    reg = train_regressor(store, sizes, "linear", tmp_path / "reg", folds=3, n_boot=10, device="cpu")
    rows = _rows(predict(store, tmp_path / "reg", tmp_path / "reg_pred.csv").out_csv)
    assert list(rows[0]) == ["slide_id", "prediction"]
    fresh_reg = create_regressor("linear", reader.embedding_dim)
    fresh_reg.fit(reader.bags(list(reg.targets.slide_ids)), reg.targets.y, refit=reg.crossval.refit_params)
    assert np.allclose([float(r["prediction"]) for r in rows],
                       fresh_reg.predict(reader.bags([r["slide_id"] for r in rows])), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cox", "nll"])
def test_gridcnn_survival_model_predicts_and_draws_grad_cam(cohort: tuple[Path, Path], tmp_path: Path,  # noqa: F811
                                                            loss: str) -> None:
    store, labels = cohort
    params = {**FAST["gridcnn"], "batch_size": 16, "epochs": 15}
    train_survival(store, labels, "gridcnn", tmp_path / "run", folds=3, n_boot=10, device="cpu", params=params,
                   loss=loss, time_bins=3)
    model, meta = load_outcome_model(tmp_path / "run", "cpu")
    assert meta["loss"] == loss and (len(meta["edges"]) == 2 if loss == "nll" else meta["edges"] == [])
    out = predict(store, tmp_path / "run", tmp_path / "pred.csv", tmp_path / "heat", device="cpu")
    assert len(out.heatmaps) == len(out.rows) > 0
    sid = out.rows[0]["slide_id"]
    heat = np.load(tmp_path / "heat" / f"{sid}.npy")
    bag = EmbeddingStore.open(store).load(sid)
    assert np.isnan(heat[~bag.mask]).all() and np.nanmin(heat) >= 0 and np.nanmax(heat) <= 1
    assert "Grad-CAM of the risk" in model.heatmap_kind
    assert out.rows[0]["risk"] == pytest.approx(float(model.predict([bag])[0]), abs=1e-5)


def test_a_classifier_folder_is_not_an_outcome_model(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text(json.dumps({"format": "wsi_encoder.slide_classifier/1"}))
    with pytest.raises(CheckpointError):
        load_outcome_model(tmp_path)


def test_breslow_baseline_matches_scikit_survival() -> None:
    from sksurv.linear_model.coxph import BreslowEstimator

    from wsi_encoder.models.slide_classifiers.survival import BreslowBaseline

    rng = np.random.default_rng(3)
    time = np.round(rng.exponential(5, 80), 1) + 0.5  # rounded: tied times
    event = rng.random(80) < 0.7
    risk = rng.normal(size=80)
    ours = BreslowBaseline.fit(risk, time, event)
    ref = BreslowEstimator().fit(risk, event, time)
    new = rng.normal(size=5)
    grid = np.linspace(time.min(), time.max(), 37)
    expected = np.stack([fn(grid) for fn in ref.get_survival_function(new)])
    assert np.allclose(ours.survival(new, grid), expected, rtol=1e-10, atol=1e-12)
    # H0 = 0 before the first time (S = 1), constant after the last
    assert np.allclose(ours.survival(new, [0.1]), 1.0)
    assert np.allclose(ours.survival(new, [time.max() * 10]), expected[:, -1:])
    again = BreslowBaseline.from_arrays(ours.to_arrays())
    assert again is not None and np.array_equal(again.survival(new, grid), ours.survival(new, grid))
    assert BreslowBaseline.from_arrays({}) is None
