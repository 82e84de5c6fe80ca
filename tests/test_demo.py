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
