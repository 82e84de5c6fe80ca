"""The whole chain on the real BreaKHis images: ``wsienc lomo`` (quick settings) -> ``wsienc signatures``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsi_encoder.cli import main


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.integration
def test_lomo_then_signatures_on_real_breakhis(breakhis_dirs: list[Path], tmp_path: Path) -> None:
    lomo_dir = tmp_path / "lomo"
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "lomo", *map(str, breakhis_dirs), "--out", str(lomo_dir), "--arms", "baseline,grl", "--backbone", "nic",
            "--image-size", "64", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((lomo_dir / "config.json").read_text())
    assert config["shared_init"] is True and config["held_out"]

    out = tmp_path / "sig"
    # 15 patients leave a fold one or two validation patients, of one class: the default selection set
    # (--select-on val) cannot select there, and says so in one line naming the way out
    result = runner.invoke(main, ["signatures", str(lomo_dir), "--out", str(out), "--stability", "4"])
    assert result.exit_code == 1
    assert "validation patients" in result.stderr and "--select-on train" in result.stderr
    result = runner.invoke(main, ["signatures", str(lomo_dir), "--out", str(out), "--stability", "4", "--select-on", "train"])
    assert result.exit_code == 0, result.output
    assert "baseline: signature sizes" in result.stdout

    rows = _rows(out / "signatures.csv")
    data = json.loads((out / "signatures.json").read_text())
    # with strict patients a fold's training side can hold a single patient of a class: reported, skipped
    failed = data["failed"]
    assert all("patient" in reason for reason in failed.values()), failed
    expected = [(arm, f"{m}X") for arm in config["arms"] for m in config["held_out"] if f"{arm}/{m}X" not in failed]
    assert rows and [(r["arm"], r["fold"]) for r in rows] == expected
    dim = int(config["embedding_dim"])
    for r in rows:
        fold = data["arms"][r["arm"]]["folds"][r["fold"]]
        assert len(fold["indices"]) == int(r["size"]) and all(0 <= i < dim for i in fold["indices"])
        for key in ("brier_full", "brier_signature"):
            assert 0.0 <= float(r[key]) <= 1.0
    # The arm's own predictions (prob_test) give the same AUC as lomo's results.csv.
    lomo_auc = {(r["arm"], f"{r['held_out']}X"): float(r["auc"]) for r in _rows(lomo_dir / "results.csv")}
    for r in rows:
        mine, theirs = float(r["auc_network"]), lomo_auc[(r["arm"], r["fold"])]
        assert (math.isnan(mine) and math.isnan(theirs)) or mine == pytest.approx(theirs, abs=1e-5)
    per_arm = [sum(1 for r in rows if r["arm"] == arm) for arm in config["arms"]]
    assert len(_rows(out / "jaccard.csv")) == sum(n * (n - 1) // 2 for n in per_arm)
    report = (out / "report.md").read_text()
    assert "same initial weights" in report and "shared_init: true" in report
    assert "did not run the 40X-held-out fold" in report or "40" in str(config["held_out"])
    for arm in config["arms"]:
        assert (out / f"jaccard_{arm}.png").stat().st_size > 5000
    assert (out / "size_vs_auc.png").stat().st_size > 5000
