"""``wsienc lomo`` end to end: real BreaKHis images and generated BreaKHis trees (slow)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests._lomo_fixtures import write_breakhis_tree
from wsi_encoder.cli import main
from wsi_encoder.evaluation.lomo_outputs import EMBEDDING_KEYS, RESULTS_COLUMNS, fold_metrics
from wsi_encoder.evaluation.splits import SPLITS_COLUMNS
from wsi_encoder.io.breakhis import scan_breakhis
from wsi_encoder.pipelines import lomo as lomo_pipeline
from wsi_encoder.training import gan_trainer

pytestmark = pytest.mark.slow

QUICK = [
    "--backbone",
    "nic",
    "--image-size",
    "64",
    "--batch-size",
    "8",
    "--lr",
    "1e-3",
    "--gan-epochs",
    "1",
    "--gan-width",
    "4",
]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def check_outputs(out: Path, n_images: int, arms: list[str]) -> dict[str, Any]:
    """Assert the whole output contract of a single-split run; return config.json."""
    config = json.loads((out / "config.json").read_text())
    for key in (
        "arms",
        "held_out",
        "classes",
        "backbone",
        "embedding_dim",
        "seed",
        "shared_init",
        "image_size",
    ):
        assert key in config, key
    assert config["arms"] == arms
    assert config["classes"] == ["benign", "malignant"]
    assert config["shared_init"] is True
    held_out = config["held_out"]
    assert held_out and set(held_out) <= {40, 100, 200, 400}
    assert sorted(held_out + [int(m) for m in config["skipped_held_out"]]) == [40, 100, 200, 400]
    dim = config["embedding_dim"]

    with (out / "results.csv").open(newline="") as fh:
        assert tuple(csv.reader(fh).__next__()) == RESULTS_COLUMNS
    results = _csv(out / "results.csv")
    assert [(r["arm"], int(r["held_out"])) for r in results] == [(a, m) for a in arms for m in held_out]

    with (out / "splits.csv").open(newline="") as fh:
        assert tuple(csv.reader(fh).__next__()) == SPLITS_COLUMNS
    splits = _csv(out / "splits.csv")
    assert len(splits) == 4 * n_images
    for m in held_out:
        rows = [r for r in splits if int(r["fold"]) == m]
        test = [r for r in rows if r["role"] == "test"]
        side = [r for r in rows if r["role"] in ("train", "val")]
        assert {int(r["magnification"]) for r in test} == {m}
        assert m not in {int(r["magnification"]) for r in side}
        assert not {r["patient_id"] for r in test} & {r["patient_id"] for r in side}

    for row in results:
        arm, m = row["arm"], int(row["held_out"])
        path = out / "embeddings" / arm / f"heldout_{m}.npz"
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        assert set(EMBEDDING_KEYS) <= set(data)
        for side in ("train", "test"):
            n = len(data[f"X_{side}"])
            assert data[f"X_{side}"].dtype == np.float32 and data[f"X_{side}"].shape == (n, dim)
            assert data[f"y_{side}"].dtype == np.int64 and data[f"magnification_{side}"].dtype == np.int64
            assert data[f"patient_{side}"].dtype.kind == "U" and data[f"filename_{side}"].dtype.kind == "U"
        fold_rows = {r["filename"]: r for r in splits if int(r["fold"]) == m}
        assert {fold_rows[f]["role"] for f in data["filename_test"]} == {"test"}
        assert {fold_rows[f]["role"] for f in data["filename_train"]} <= {"train", "val"}
        assert {fold_rows[f]["role"] for f in data["filename_probe"]} <= {"probe_test"}
        assert set(data["magnification_test"].tolist()) == {m}
        assert data["prob_test"].dtype == np.float32 and len(data["prob_test"]) == int(row["n_test_images"])
        again = fold_metrics(data["y_test"], data["prob_test"], data["patient_test"])
        assert float(row["brier"]) == pytest.approx(again["brier"], abs=1e-5)
        assert int(row["n_test_patients"]) == again["n_test_patients"]

    probe = _csv(out / "probe.csv")
    assert [(r["arm"], int(r["held_out"])) for r in probe][::4] == [(a, m) for a in arms for m in held_out]
    for name in ("auc_brier_by_fold.png", "reliability.png", "magnification_probe.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    if "gan" in arms:
        for m in held_out:
            assert (out / "plots" / f"gan_samples_heldout_{m}.png").is_file()
    report = (out / "report.md").read_text()
    assert "| arm | held out | AUC [95% CI] |" in report and "Magnification probe" in report
    assert "plots/auc_brier_by_fold.png" in report and "plots/reliability.png" in report
    for m, reason in config["skipped_held_out"].items():
        assert f"{m}X: {reason}" in report
    return config


class GanSpy:
    """Records the exact images every DCGAN is trained on."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self._train = gan_trainer.train_dcgan

    def __call__(self, images: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(images.copy())
        return self._train(images, *args, **kwargs)


def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def check_gan_training_sets(out: Path, spy: GanSpy, data_dirs: list[Path], image_size: int) -> None:
    """Every DCGAN saw exactly the training-role images of its fold and class, never a test-fold image."""
    images = sorted(
        {im.filename: im for d in data_dirs for im in scan_breakhis(d)}.values(), key=lambda i: i.filename
    )
    cache = np.load(out / "cache" / f"images_{image_size}.npy", mmap_mode="r")
    # the DCGANs get the classifier-size images themselves (and crop them at random, at that scale)
    name_of = {_digest(img): im.filename for img, im in zip(np.asarray(cache), images, strict=True)}
    label_of = {im.filename: im.label for im in images}
    splits = _csv(out / "splits.csv")
    assert spy.calls
    expected: dict[tuple[int, str], set[str]] = {}
    for gan_dir in sorted((out / "gan").glob("heldout_*")):
        m = int(gan_dir.name.split("_")[1])
        record = json.loads((gan_dir / "trained_on.json").read_text())
        for cls in ("benign", "malignant"):
            if cls in record:
                expected[(m, cls)] = set(record[cls])
    matched = set()
    for call in spy.calls:
        names = {name_of[_digest(img)] for img in call}
        assert len(names) == len(call)
        keys = [k for k, v in expected.items() if v == names]
        assert keys, "a DCGAN was trained on a set of images that no fold recorded"
        # folds can share a training set (e.g. one class only imaged at 40X): take an unmatched one
        key = next((k for k in keys if k not in matched), keys[0])
        m, cls = key
        fold = {r["filename"]: r for r in splits if int(r["fold"]) == m}
        assert {fold[n]["role"] for n in names} == {"train"}
        assert {label_of[n] for n in names} == {cls}
        assert not any(int(fold[n]["magnification"]) == m for n in names)
        train_cls = {n for n, r in fold.items() if r["role"] == "train" and label_of[n] == cls}
        assert names == train_cls
        matched.add(key)
    assert len(spy.calls) == len(expected)
    assert matched == set(expected)


@pytest.fixture(scope="module")
def real_run(breakhis_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GanSpy, Any]:
    out = tmp_path_factory.mktemp("lomo_real") / "out"
    spy = GanSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gan_trainer, "train_dcgan", spy)
        result = CliRunner().invoke(
            main, ["lomo", *map(str, breakhis_dirs), "--out", str(out), "--epochs", "1", *QUICK]
        )
    assert result.exit_code == 0, result.output
    return out, spy, result


def test_real_breakhis_run_produces_every_output(real_run: tuple[Path, GanSpy, Any]) -> None:
    out, _, result = real_run
    config = check_outputs(out, 58, ["baseline", "gan", "grl"])
    assert config["backbone"] == "nic" and config["embedding_dim"] == 128 and config["image_size"] == 64
    assert "held out" in result.output and "AUC" in result.output
    assert "epoch 1/1" in result.output  # progress per arm and fold
    assert len((out / "init_weights.safetensors").read_bytes()) > 0
    for m in config["held_out"]:
        grl = json.loads((out / "runs" / "grl" / f"heldout_{m}" / "metrics.json").read_text())
        gan = json.loads((out / "runs" / "gan" / f"heldout_{m}" / "metrics.json").read_text())
        assert gan["n_synthetic_images"] == gan["n_train_images"]  # --gan-ratio 1
        assert gan["steps"] == grl["steps"]  # the same budget in every arm
        assert gan["real_images_per_epoch"] == grl["real_images_per_epoch"]  # the same real images


def test_gan_arm_never_sees_test_fold_images(
    real_run: tuple[Path, GanSpy, Any], breakhis_dirs: list[Path]
) -> None:
    out, spy, _ = real_run
    check_gan_training_sets(out, spy, breakhis_dirs, 64)


def test_rerun_resumes_per_arm_and_fold(
    real_run: tuple[Path, GanSpy, Any], breakhis_dirs: list[Path], tmp_path: Path
) -> None:
    src, _, _ = real_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    before = (out / "results.csv").read_text()
    args = ["lomo", *map(str, breakhis_dirs), "--out", str(out), "--epochs", "1", *QUICK]
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "0 (arm, fold) trained" in again.output and "already done, skipped" in again.output
    assert (out / "results.csv").read_text() == before
    config = json.loads((out / "config.json").read_text())
    m = config["held_out"][0]
    (out / "runs" / "grl" / f"heldout_{m}" / "metrics.json").unlink()
    partial = CliRunner().invoke(main, args)
    assert partial.exit_code == 0, partial.output
    assert "1 (arm, fold) trained" in partial.output
    # same seed, same initial weights: the retrained fold reproduces its result
    assert (out / "results.csv").read_text() == before
    changed = CliRunner().invoke(main, [*args[: -len(QUICK)], *QUICK[:-2], "--gan-width", "8"])
    assert changed.exit_code == 1
    assert "other settings" in changed.output and "gan_width" in changed.output


@pytest.fixture(scope="module")
def nuisance_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Ten epochs of baseline and grl on a tree whose colour cast tracks magnification (the gan arm and its
    training sets are checked on the real run: it adds a third of the cost and nothing to this contrast)."""
    root = tmp_path_factory.mktemp("lomo_nuisance")
    data = write_breakhis_tree(root, n_benign=4, n_malignant=4, per_magnification=3, nuisance=True, seed=1)
    config = lomo_pipeline.LomoConfig(
        backbone="nic",
        image_size=64,
        embed_dim=64,
        epochs=10,
        batch_size=8,
        lr=1e-3,
        seed=0,
        domain_hidden=256,
        gan_epochs=1,
        gan_width=4,
        gan_batch_size=16,
    )
    events: list[lomo_pipeline.LomoEvent] = []
    lomo_pipeline.run_lomo(
        [data], root / "out", config, arms=["baseline", "grl"], device="cpu", on_event=events.append
    )
    assert {e.kind for e in events} >= {"cache", "start", "epoch", "done", "report"}
    return root / "out", data


def test_generated_tree_with_four_magnifications_runs_every_fold(nuisance_run: tuple[Path, Path]) -> None:
    out, data = nuisance_run
    assert (data / "histology_slides" / "breast" / "benign" / "SOB").is_dir()
    config = check_outputs(out, 96, ["baseline", "grl"])
    assert config["held_out"] == [40, 100, 200, 400] and config["skipped_held_out"] == {}
    metrics = json.loads((out / "runs" / "grl" / "heldout_200" / "metrics.json").read_text())
    assert metrics["training_magnifications"] == [40, 100, 400]
    assert metrics["history"][-1]["lambda"] == pytest.approx(0.9999, abs=1e-3)
    baseline = json.loads((out / "runs" / "baseline" / "heldout_200" / "metrics.json").read_text())
    assert baseline["steps"] == metrics["steps"]  # the same budget in every arm


def test_gradient_reversal_lowers_the_magnification_probe(nuisance_run: tuple[Path, Path]) -> None:
    out, _ = nuisance_run
    probe = [r for r in _csv(out / "probe.csv") if r["split"] == "test_patients" and r["probe"] == "linear"]
    mean = {
        arm: np.mean([float(r["balanced_accuracy"]) for r in probe if r["arm"] == arm])
        for arm in ("baseline", "grl")
    }
    assert mean["baseline"] > 0.5  # the nuisance makes magnification readable from baseline embeddings
    assert mean["grl"] < mean["baseline"] - 0.1
    assert "grl vs baseline (linear probe, test patients): probe balanced accuracy lower in" in (
        out / "report.md"
    ).read_text()


def test_patient_folds_pool_out_of_fold_predictions(tmp_path: Path) -> None:
    data = write_breakhis_tree(tmp_path, n_benign=2, n_malignant=2, per_magnification=2, seed=3)
    out = tmp_path / "kfold"
    result = CliRunner().invoke(
        main,
        [
            "lomo",
            str(data),
            "--out",
            str(out),
            "--arms",
            "baseline",
            "--epochs",
            "1",
            "--patient-folds",
            "2",
            "--val-fraction",
            "0",
            *QUICK,
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["patient_folds"] == 2 and config["fold_dirs"] == ["patient_fold_0", "patient_fold_1"]
    pooled = _csv(out / "results.csv")
    assert [int(r["held_out"]) for r in pooled] == [40, 100, 200, 400]
    for k in range(2):
        check_outputs(out / f"patient_fold_{k}", 32, ["baseline"])
    for row in pooled:
        parts = [_csv(out / f"patient_fold_{k}" / "results.csv") for k in range(2)]
        n = sum(int(r["n_test_images"]) for p in parts for r in p if r["held_out"] == row["held_out"])
        assert int(row["n_test_images"]) == n == 8  # every patient tested once: 4 patients x 2 images
    assert (out / "report.md").is_file() and (out / "plots" / "auc_brier_by_fold.png").is_file()
