"""``wsienc demo``: the whole main job on a small generated cohort, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.pipelines.demo import DemoConfig, run_demo


@pytest.mark.slow
@pytest.mark.integration
def test_demo_runs_end_to_end_and_learns(tmp_path: Path) -> None:
    config = DemoConfig(n_slides=8, width=3072, height=2048, encoder_steps=40, classifier="linear", workers=1)
    result = run_demo(tmp_path / "demo", config)
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
