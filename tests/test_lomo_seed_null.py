"""``wsienc lomo --seed-null``: each fold's encoder trained again with only the training seed changed, and
``wsienc signatures`` reading it as the seed-to-seed reference Jaccard.

A spy on the classifier training checks that the second seed sees exactly the same images, labels, roles and
initial weights as the first, with another seed; resuming a finished run with ``--seed-null`` trains only the
second seeds and leaves ``results.csv`` as it was.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests._lomo_fixtures import write_breakhis_tree
from wsi_encoder.evaluation.signatures import SignatureSpec, jaccard
from wsi_encoder.pipelines import lomo as lomo_pipeline
from wsi_encoder.pipelines.lomo_config import SEED_NULL_OFFSET, LomoConfig
from wsi_encoder.pipelines.signatures import run_signatures

pytestmark = pytest.mark.slow  # two small LOMO trainings: about 15 s on a quiet core, more under load


def _state_sha(model: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def seed_null_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lomo_seed_null")
    data = write_breakhis_tree(root / "data", n_benign=6, n_malignant=6, per_magnification=1, seed=5)
    calls: list[dict[str, Any]] = []
    real = lomo_pipeline.train_classifier

    def spy(model: Any, data_: Any, spec: Any, strategy: Any, **kw: Any) -> Any:
        calls.append({"arm": strategy.name, "train": data_.train_rows.copy(), "y": data_.y_train.copy(),
                      "val": data_.val_rows.copy(), "init": _state_sha(model), "seed": kw["seed"]})
        return real(model, data_, spec, strategy, **kw)

    config = LomoConfig(backbone="nic", image_size=64, epochs=1, batch_size=8, lr=1e-3, domain_hidden=16,
                        n_bootstrap=100, val_fraction=0.5)
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lomo_pipeline, "train_classifier", spy)
        lomo_pipeline.run_lomo([data], out, config, arms=["baseline", "grl"], device="cpu")
        first = list(calls)
        results = (out / "results.csv").read_text()
        calls.clear()
        lomo_pipeline.run_lomo([data], out, replace(config, seed_null=True),
                               arms=["baseline", "grl"], device="cpu")
    return {"out": out, "first": first, "second": list(calls), "results": results}


def test_the_second_seed_differs_from_the_first_only_in_its_seed(seed_null_run: dict[str, Any]) -> None:
    first, second = seed_null_run["first"], seed_null_run["second"]
    assert len(first) == len(second) == 2 * 4  # resuming with --seed-null trains only the second seeds
    for a, b in zip(first, second, strict=True):
        assert a["arm"] == b["arm"]
        for key in ("train", "y", "val"):
            np.testing.assert_array_equal(a[key], b[key])  # same images, labels and roles
        assert a["init"] == b["init"]  # the same initial weights
        assert b["seed"] == a["seed"] + SEED_NULL_OFFSET
    out = seed_null_run["out"]
    assert (out / "results.csv").read_text() == seed_null_run["results"]  # the first seeds' outputs are untouched
    config = json.loads((out / "config.json").read_text())
    assert config["seed_null"]["dir"] == "seed_null" and "seed_null" not in config["settings"]
    for arm in ("baseline", "grl"):
        for m in (40, 100, 200, 400):
            with np.load(out / "embeddings" / arm / f"heldout_{m}.npz") as a, \
                    np.load(out / "seed_null" / "embeddings" / arm / f"heldout_{m}.npz") as b:
                for key in ("filename_train", "patient_train", "y_train", "filename_test", "y_test"):
                    np.testing.assert_array_equal(a[key], b[key])
                assert not np.array_equal(a["X_train"], b["X_train"])  # another seed trained another encoder
            metrics = json.loads((out / "seed_null" / "runs" / arm / f"heldout_{m}" / "metrics.json").read_text())
            assert metrics["training_seed"] == m + SEED_NULL_OFFSET


def test_signatures_read_the_second_seed_as_the_seed_null(seed_null_run: dict[str, Any], tmp_path: Path) -> None:
    out = seed_null_run["out"]
    run = run_signatures(out, tmp_path / "sig", spec=SignatureSpec(bootstrap=3, inner_folds=2))
    assert run.records and all(r.seed_indices is not None for r in run.records)
    with (tmp_path / "sig" / "seed_null.csv").open(newline="") as fh:
        rows = {(r["arm"], r["fold"]): r for r in csv.DictReader(fh)}
    for rec in run.records:
        value = float(rows[(rec.arm, rec.fold)]["jaccard_seed"])
        expected = jaccard(rec.indices, rec.seed_indices or ())
        assert (np.isnan(value) and np.isnan(expected)) or value == pytest.approx(expected, abs=1e-5)
    assert {a for a, f in rows if f == "overall"} == {r.arm for r in run.records}
    assert "not computed" not in (tmp_path / "sig" / "report.md").read_text()
