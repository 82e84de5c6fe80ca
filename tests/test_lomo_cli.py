"""``wsienc lomo``: options and one-line errors (no training)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests._lomo_fixtures import write_breakhis_tree
from wsi_encoder.cli import main
from wsi_encoder.errors import DatasetError
from wsi_encoder.pipelines.lomo import LomoConfig, collect_images


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_breakhis_tree(
        tmp_path_factory.mktemp("tiny"), n_benign=2, n_malignant=2, per_magnification=1
    )


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["lomo", *args])
    return result.exit_code, result.output


def test_folder_without_breakhis_images_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, out = _run(str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 1
    assert "no BreaKHis images found" in out and len(out.strip().splitlines()) == 1


def test_bad_option_combinations(tiny_tree: Path, tmp_path: Path) -> None:
    code, out = _run(
        str(tiny_tree), "--out", str(tmp_path / "o"), "--test-fraction", "0.3", "--patient-folds", "2"
    )
    assert code == 2 and "either --test-fraction or --patient-folds" in out
    code, out = _run(str(tiny_tree), "--out", str(tmp_path / "o"), "--arms", "baseline,dann")
    assert code == 2 and "baseline,gan,grl" in out


def test_library_errors_name_the_problem(tiny_tree: Path, tmp_path: Path) -> None:
    base = [str(tiny_tree), "--image-size", "64", "--epochs", "1"]
    code, out = _run(*base, "--out", str(tmp_path / "a"), "--patient-folds", "3")
    assert code == 1 and "smallest class has 2 patient(s)" in out
    code, out = _run(*base, "--out", str(tmp_path / "b"), "--backbone", "no-such-net")
    assert code == 1 and "unknown encoder 'no-such-net'" in out


def test_duplicate_file_names_across_folders_are_refused(tiny_tree: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_tree, copy)
    with pytest.raises(DatasetError, match="also used by"):
        collect_images([tiny_tree, copy])
    assert len(collect_images([tiny_tree, tiny_tree / "histology_slides"])) == 16  # same files twice: fine


def test_config_validation_and_device() -> None:
    with pytest.raises(ValueError, match="gan-ratio"):
        LomoConfig(gan_ratio=-1)
    with pytest.raises(ValueError, match="epochs"):
        LomoConfig(epochs=0)
    with pytest.raises(ValueError, match="patient-key"):
        LomoConfig(patient_key="slide")
    with pytest.raises(ValueError, match="selection"):
        LomoConfig(select_epoch="first")
    # one rule for every arm: last by default, best-val (after the λ ramp) as the sensitivity option
    assert {LomoConfig().selection(a) for a in ("baseline", "gan", "grl")} == {"last"}
    assert {LomoConfig(select_epoch="best-val").selection(a) for a in ("baseline", "gan", "grl")} == {"best-val"}
    with pytest.raises(ValueError, match="unknown arm"):
        LomoConfig().selection("mixup")


def test_cli_defaults_come_from_lomo_config() -> None:
    from dataclasses import fields

    from wsi_encoder.cli.lomo import lomo

    params = {p.name: p for p in lomo.params}
    checked = 0
    for f in fields(LomoConfig):
        if f.name in params and f.name != "test_fraction":  # None on the CLI: exclusive with --patient-folds
            assert params[f.name].default == f.default, f.name
            checked += 1
    assert checked >= 15
    assert params["test_fraction"].default is None and "0.3" in (params["test_fraction"].help or "")


def test_an_output_folder_of_an_older_version_is_refused(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text('{"settings": {}, "patient_key": "slide"}')
    code, text = _run(str(tiny_tree), "--out", str(out), "--backbone", "nic", "--image-size", "64")
    assert code == 1 and "older wsi_encoder" in text and "cannot be resumed" in text
    assert not (out / "cache").exists()


def test_progress_events_are_drawn_on_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wsi_encoder.pipelines.lomo as pipeline
    from wsi_encoder.pipelines.lomo_summary import LomoEvent, LomoRun

    def fake(data, out_dir, config, *, arms, device, on_event):  # type: ignore[no-untyped-def]
        for i in range(1, 4):
            on_event(LomoEvent("cache", step=i, total=3))
        on_event(LomoEvent("start", "baseline", 40, 1, 2, message="[1/2] baseline / 40X held out: 5 train"))
        for e in (1, 2):
            on_event(LomoEvent("epoch", "baseline", 40, e, 2, {"epoch": e, "val_auc": 0.75, "loss": float("nan")},
                               message=f"  baseline / 40X epoch {e}/2: val_auc 0.750"))  # fmt: skip
        for e in range(1, 11):
            on_event(LomoEvent("gan_epoch", "gan", 40, e, 10, {"d_loss": 0.5}, message=f"gan epoch {e}"))
        on_event(LomoEvent("report", message="report written: R"))
        return LomoRun(out_dir, [], {}, [("baseline", 40)], [])

    monkeypatch.setattr(pipeline, "run_lomo", fake)
    result = CliRunner().invoke(main, ["lomo", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "decoding images" in err and "3/3" in err
    assert "[1/2] baseline / 40X held out: 5 train" in err and "baseline / 40X epoch 2/2: val_auc 0.750" in err
    assert "baseline / 40X epochs" in err and "val_auc 0.750" in err and "loss nan" not in err
    assert "gan / 40X DCGAN" in err and "10/10" in err and "gan epoch 3" not in err  # DCGAN epochs: a bar only
    assert "report written: R" in err and "1 (arm, fold) trained" in result.stdout
    quiet = CliRunner().invoke(main, ["-q", "lomo", str(tmp_path), "--out", str(tmp_path / "o")])
    assert quiet.exit_code == 0 and quiet.stderr == ""
