"""Spies on a real LOMO run: what each step was given is checked against the roles ``splits.csv`` records.

Each assertion is one way the science can go wrong while every number still looks plausible: test patients'
images in training, epoch selection on the held-out magnification, the probe fit on test patients or scored on
training embeddings, intervals that resample images instead of patients.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests._lomo_fixtures import write_breakhis_tree
from wsi_encoder.pipelines import lomo as lomo_pipeline
from wsi_encoder.pipelines import lomo_summary
from wsi_encoder.pipelines.lomo_config import LomoConfig


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def spied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lomo_spies")
    data = write_breakhis_tree(root / "data", n_benign=4, n_malignant=4, per_magnification=2, seed=4)
    seen: dict[str, list[Any]] = {"train": [], "probe": [], "intervals": []}
    train, probe, intervals = (lomo_pipeline.train_classifier, lomo_pipeline.lomo_report.magnification_probe,
                               lomo_summary.patient_intervals)

    def train_spy(model: Any, data_: Any, spec: Any, strategy: Any, **kw: Any) -> Any:
        seen["train"].append({"train": data_.train_rows.copy(), "val": data_.val_rows.copy(), "arm": strategy.name})
        return train(model, data_, spec, strategy, **kw)

    def probe_spy(x_train: Any, mag_train: Any, patients_train: Any, x_test: Any, mag_test: Any, **kw: Any) -> Any:
        seen["probe"].append({"x_train": np.asarray(x_train).copy(), "patients_train": list(patients_train),
                              "x_test": np.asarray(x_test).copy(), "mag_test": np.asarray(mag_test).copy()})
        return probe(x_train, mag_train, patients_train, x_test, mag_test, **kw)

    def intervals_spy(folds: Any, **kw: Any) -> Any:
        seen["intervals"].append([(f.held_out, f.patients.copy(), f.y.copy()) for f in folds])
        return intervals(folds, **kw)

    config = LomoConfig(backbone="nic", image_size=64, epochs=2, batch_size=8, lr=1e-3, domain_hidden=32,
                        n_bootstrap=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lomo_pipeline, "train_classifier", train_spy)
        mp.setattr(lomo_pipeline.lomo_report, "magnification_probe", probe_spy)
        mp.setattr(lomo_summary, "patient_intervals", intervals_spy)
        lomo_pipeline.run_lomo([data], root / "out", config, arms=["baseline", "grl"], device="cpu")
    names = [im.filename for im in lomo_pipeline.collect_images([data])]  # the cache's row order
    return {"out": root / "out", "seen": seen, "names": names, "splits": _rows(root / "out" / "splits.csv")}


def _roles(splits: list[dict[str, str]], held_out: int) -> dict[str, set[str]]:
    roles: dict[str, set[str]] = {}
    for r in splits:
        if int(r["fold"]) == held_out:
            roles.setdefault(r["role"], set()).add(r["filename"])
    return roles


def test_training_and_epoch_selection_see_only_their_roles(spied: dict[str, Any]) -> None:
    names, splits = spied["names"], spied["splits"]
    mag_of = {r["filename"]: int(r["magnification"]) for r in splits}
    patient_of = {r["filename"]: r["patient_id"] for r in splits}
    calls = spied["seen"]["train"]
    assert len(calls) == 2 * 4  # 2 arms x 4 held-out magnifications
    for k, call in enumerate(calls):
        train = {names[i] for i in call["train"]}
        val = {names[i] for i in call["val"]}
        held_out = {m for m in (40, 100, 200, 400) if not any(mag_of[n] == m for n in train | val)}
        assert len(held_out) == 1, k  # exactly the held-out magnification is absent from training and validation
        roles = _roles(splits, held_out.pop())
        assert train == roles["train"] and val == roles.get("val", set())
        test_patients = {patient_of[n] for n in roles["test"]}
        assert not {patient_of[n] for n in train | val} & test_patients  # no test patient anywhere in training


def test_the_probe_fits_on_training_patients_and_scores_test_patients_embeddings(spied: dict[str, Any]) -> None:
    out, splits = spied["out"], spied["splits"]
    calls = spied["seen"]["probe"]
    assert len(calls) == 8
    done = set()
    for call in calls:
        (m,) = {40, 100, 200, 400} - set(call["mag_test"].tolist())  # the held-out magnification is not probed
        roles = _roles(splits, m)
        patient_of = {r["filename"]: r["patient_id"] for r in splits}
        test_patients = {patient_of[n] for n in roles["test"]}
        assert set(call["patients_train"]) == {patient_of[n] for n in roles["train"] | roles.get("val", set())}
        assert not set(call["patients_train"]) & test_patients
        matches = []
        for arm in ("baseline", "grl"):
            with np.load(out / "embeddings" / arm / f"heldout_{m}.npz", allow_pickle=False) as npz:
                if np.array_equal(call["x_test"], npz["X_probe"]):  # scored on the probe_test embeddings ...
                    assert set(npz["filename_probe"].tolist()) == roles["probe_test"]  # ... of the test patients
                    matches.append(arm)
        assert len(matches) == 1, (m, matches)
        done.add((matches[0], m))
        train_rows = {row.tobytes() for row in call["x_train"]}
        assert not any(row.tobytes() in train_rows for row in call["x_test"])  # not the training embeddings
    assert done == {(a, m) for a in ("baseline", "grl") for m in (40, 100, 200, 400)}


def test_intervals_resample_the_test_patients_of_each_fold(spied: dict[str, Any]) -> None:
    splits = spied["splits"]
    calls = spied["seen"]["intervals"]
    assert calls
    for folds in calls:
        for held_out, patients, y in folds:
            roles = _roles(splits, held_out)
            patient_of = {r["filename"]: r["patient_id"] for r in splits}
            expected = Counter(patient_of[n] for n in roles["test"])
            assert Counter(patients.tolist()) == expected  # one group per patient, every test image of it
            assert len(set(patients.tolist())) < len(y)  # patients, not images, are the resampled unit
