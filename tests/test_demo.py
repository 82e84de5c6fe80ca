"""``wsienc demo``: the whole main job on a small generated cohort, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.pipelines.demo import DemoConfig, DemoHooks, run_demo


@pytest.mark.slow
@pytest.mark.integration
def test_demo_runs_end_to_end_and_learns(tmp_path: Path) -> None:
    config = DemoConfig(n_slides=8, width=3072, height=2048, encoder_steps=40, classifier="linear", workers=1)
    seen: dict[str, list] = {k: [] for k in ("say", "tiles", "tasks", "step", "epoch", "encoded", "fold")}
    hooks = DemoHooks(
        say=seen["say"].append, tiles=seen["tiles"].append, train_tasks=seen["tasks"].append,
        train_step=seen["step"].append, train_epoch=seen["epoch"].append,
        encoded=lambda n, total: seen["encoded"].append((n, total)), fold=seen["fold"].append,
    )  # fmt: skip
    result = run_demo(tmp_path / "demo", config, hooks=hooks)
    # every step reports progress (the encoder-training step used to be silent for minutes)
    assert [line[:4] for line in seen["say"] if line[1] == "/"] == ["1/5 ", "2/5 ", "3/5 ", "4/5 ", "5/5 "]
    assert sum(e.count for e in seen["tiles"] if e.kind == "tiles") > 0
    assert [t.name for t in seen["tasks"][0]] == ["patch-store"]
    assert [s.step for s in seen["step"]] == list(range(1, 41)) and seen["step"][-1].total_steps == 40
    assert seen["epoch"] and sum(n for n, _ in seen["encoded"]) == seen["encoded"][0][1] > 0
    assert len(seen["fold"]) == config.folds
    out = result.out
    patches = zarr.open_group(str(out / "patches.zarr"), mode="r")
    embeddings = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    slide_ids = sorted(f"demo_{i:03d}" for i in range(8))
    for sid in slide_ids:
        assert patches[sid].attrs["complete"] is True
        assert embeddings[sid].attrs["complete"] is True
        assert embeddings[sid]["features"].shape[0] == patches[sid]["coords"].shape[0] > 0
        assert (out / "qc" / f"{sid}.png").is_file()
        assert (out / "previews" / f"{sid}.png").is_file()
    metrics = json.loads((out / "classify_linear" / "metrics.json").read_text())
    # Lesion slides carry a texture the supervised encoder was trained to see: the slide label is learnable.
    assert metrics["pooled"]["auc"] >= 0.8
    assert (out / "classify_linear" / "roc.png").is_file()

    # Re-running resumes: every step finds its work done and the metrics are reproduced.
    again = run_demo(tmp_path / "demo", config)
    assert again.metrics["pooled"]["auc"] == pytest.approx(metrics["pooled"]["auc"])


def test_demo_rejects_a_cohort_too_small_for_cross_validation(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--slides", "2"])
    assert result.exit_code == 2
    assert "--slides" in result.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_demo_survival_writes_risks_and_its_burden_sets_the_hazard(tmp_path: Path) -> None:
    import csv
    from types import SimpleNamespace

    import numpy as np

    from wsi_encoder.evaluation.metrics import harrell_c
    from wsi_encoder.pipelines.demo import write_survival_labels

    config = DemoConfig(n_slides=12, width=3072, height=2048, encoder_steps=5, classifier="linear", target="survival",
                        workers=1, device="cpu")
    result = run_demo(tmp_path / "demo", config)
    folder = tmp_path / "demo" / "survival_linear"
    with (folder / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and "risk" in rows[0] and all(np.isfinite(float(r["risk"])) for r in rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    low, high = metrics["c_index_ci95"]
    assert 0 <= low <= metrics["c_index"] <= high <= 1 and metrics["c_index"] == pytest.approx(result.metrics["c_index"])
    assert (folder / "kaplan_meier.png").stat().st_size > 0 and result.paths["kaplan_meier"] == folder / "kaplan_meier.png"
    # the generator: the demo's labels are write_survival_labels' at the demo seed, and over 10 draws of times the
    # lesion burden ranks the slides well above chance (with half the slides at burden 0, tied, C cannot reach 1)
    labels = result.paths["survival_labels"]
    with labels.open(newline="") as fh:
        given = list(csv.DictReader(fh))
    slides = [SimpleNamespace(slide_id=r["slide_id"], patient_id=r["patient_id"],
                              path=next((tmp_path / "demo" / "slides").glob(f"{r['slide_id']}.*"))) for r in given]
    again = write_survival_labels(result.paths["patches"], slides, tmp_path / "again.csv", config.seed)
    assert (tmp_path / "again.csv").read_text() == labels.read_text()
    assert 0 < sum(b > 0 for b in again.values()) < 12  # lesion and lesion-free slides
    c_values, censored = [], []
    for seed in range(10):
        burden = write_survival_labels(result.paths["patches"], slides, tmp_path / "draw.csv", seed)
        with (tmp_path / "draw.csv").open(newline="") as fh:
            draw = list(csv.DictReader(fh))
        time, event = [float(r["time"]) for r in draw], [r["event"] == "1" for r in draw]
        c_values.append(harrell_c(time, event, [burden[r["slide_id"]] for r in draw]))
        censored.append(1 - np.mean(event))
    assert np.mean(c_values) >= 0.65, c_values
    assert 0.05 <= np.mean(censored) <= 0.5, censored
