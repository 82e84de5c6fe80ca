"""``wsienc tasks`` and ``wsienc train-encoder`` through click's CliRunner, including every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _train_fixtures import make_kather, make_patch_store, make_pcam, write_csv
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.models.checkpoint import load_encoder, read_checkpoint_config, training_record
from wsi_encoder.tasks.data import PIXEL_DIGEST, pixel_digest, read_image_file

torch.set_num_threads(2)

FAST = ["--input-size", "64", "--embed-dim", "8", "--batch-size", "6", "--workers", "0", "--max-steps", "2"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_cli")
    store = make_patch_store(root / "patches.zarr", {"s1": [0, 1, 0, 1], "s2": [1, 0, 1, 0], "s3": [0, 0, 1, 1]})
    rows = [[sid, i, "lesion" if (i + k) % 2 else "normal"] for k, sid in enumerate(["s1", "s2", "s3"]) for i in range(4)]
    return {
        "kather": make_kather(root / "NCT-CRC-HE-100K", n_per_class=2, size=64, classes=("ADI", "TUM", "LYM")),
        "pcam": make_pcam(root / "pcam", {"train": 8, "valid": 4}),
        "store": store,
        "tile_labels": write_csv(root / "tiles.csv", ["slide_id", "tile_index", "label"], rows),
        "one_class": make_kather(root / "one", n_per_class=3, size=64, classes=("TUM",)),
        "empty": Path(root / "empty").resolve(),
        "root": root,
    }


def test_tasks_lists_every_task_with_layout() -> None:
    result = run("tasks")
    assert result.exit_code == 0
    for name in ("breakhis-malignancy", "breakhis-subtype", "breakhis-magnification", "kather-crc", "pcam"):
        assert name in result.output
    assert "layout:" in result.output and "labels=..." in result.output
    rows = json.loads(run("tasks", "--json").output)
    assert {r["name"] for r in rows} >= {"imagefolder", "csv", "patch-store"}


@pytest.mark.slow
def test_train_encoder_writes_a_loadable_checkpoint_and_resumes(datasets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "enc"
    args = [
        "train-encoder",
        "--task", f"kather-crc={datasets['kather']}",
        "--task", f"pcam={datasets['pcam']},weight=0.5",
        "--task", f"patch-store={datasets['store']},labels={datasets['tile_labels']}",
        "--out", str(out), *FAST,
    ]  # fmt: skip
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and "load_encoder" in result.output
    cfg = read_checkpoint_config(out)
    assert [t["name"] for t in cfg["tasks"]] == ["kather-crc", "pcam", "patch-store"]
    assert cfg["tasks"][1]["loss_weight"] == 0.5 and cfg["tasks"][1]["split"] == "dataset's own split"
    assert cfg["tasks"][2]["classes"] == ["normal", "lesion"]
    # what it was trained on, by content, travels inside the weights file (the LOMO guard reads it)
    content = cfg["training_content"]
    assert content["digest"] == PIXEL_DIGEST
    kather_image = next(p for p in sorted(datasets["kather"].rglob("*")) if p.is_file())
    assert pixel_digest(read_image_file(kather_image)) in content["images"]
    assert training_record(out / "model.safetensors")["training_content"] == content
    assert load_encoder(out)(torch.rand(1, 3, 64, 64)).shape == (1, 8)
    for png in ("augmentations.png", "training_curves.png"):
        assert (out / png).stat().st_size > 10_000
    again = run(*args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    more = run(*args[:-2], "--max-steps", "3")
    assert more.exit_code == 0 and "resumed from step 2" in more.output


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("kather=/x", "unknown task 'kather'; known tasks: breakhis-magnification"),
        ("kather-crc", "must be NAME=PATH"),
        ("kather-crc=/data,labels=x.csv", "unknown option 'labels'"),
        ("pcam=/data,weight=-1", "weight must be >= 0"),
    ],
)
def test_bad_task_arguments(task: str, message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train-encoder", "--task", task, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.output


def _fails(args: list[str], message: str, code: int = 1) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_data_and_options(datasets: dict[str, Path], tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "o"), *FAST]
    datasets["empty"].mkdir(exist_ok=True)
    _fails(["train-encoder", *out], "give at least one --task", code=2)
    _fails(["train-encoder", "--task", f"kather-crc={tmp_path / 'missing'}", *out], "does not exist")
    _fails(["train-encoder", "--task", f"kather-crc={datasets['empty']}", *out], "no usable images for task 'kather-crc'")
    _fails(["train-encoder", "--task", f"pcam={datasets['empty']}", *out], "no usable images for task 'pcam'")
    _fails(["train-encoder", "--task", f"kather-crc={datasets['one_class']}", *out], "single class 'TUM'")
    _fails(["train-encoder", "--task", f"patch-store={datasets['store']}", *out], "needs a labels CSV")
    _fails(
        ["train-encoder", "--task", f"kather-crc={datasets['kather']}", "--backbone", "vgg", *out],
        "unknown backbone 'vgg'",
    )
    (tmp_path / "file").write_text("x")
    _fails(
        ["train-encoder", "--task", f"kather-crc={datasets['kather']}", "--out", str(tmp_path / "file"), *FAST],
        "is a file",
    )
    _fails(
        ["train-encoder", "--task", f"kather-crc={datasets['kather']}", "--weights", str(tmp_path / "w.pt"), *out],
        "does not exist",
        code=2,
    )
    (tmp_path / "junk.pt").write_bytes(b"junk")
    _fails(
        ["train-encoder", "--task", f"kather-crc={datasets['kather']}", "--weights", str(tmp_path / "junk.pt"), *out],
        "cannot read weights file",
    )
    _fails(
        ["train-encoder", "--task", f"kather-crc={datasets['kather']}", "--task", f"pcam={datasets['pcam']}",
         "--out", str(tmp_path / "o2"), *FAST[:-6], "--batch-size", "1", "--workers", "0", "--max-steps", "1"],
        "smaller than the number of tasks",
    )  # fmt: skip
    _fails(["train-encoder", "--task", f"kather-crc={datasets['kather']}", *out, "--device", "gpu"], "device 'gpu' is not one of")
    for flag, value in [("--epochs", "0"), ("--batch-size", "0"), ("--lr", "0"), ("--val-fraction", "1")]:
        _fails(["train-encoder", "--task", f"kather-crc={datasets['kather']}", *out, flag, value], flag, code=2)


def test_resuming_a_different_run_is_refused(datasets: dict[str, Path], tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "o"), *FAST]
    first = run("train-encoder", "--task", f"kather-crc={datasets['kather']}", *out)
    assert first.exit_code == 0, first.output
    # progress on stderr: the task's split, a bar over the steps with running losses, each epoch's validation
    assert "task kather-crc: " in first.stderr and "train-encoder: 100%" in first.stderr
    assert "2/2" in first.stderr and "kather-crc=" in first.stderr and "epoch 2 (step 2):" in first.stderr
    assert "decoding kather-crc" in first.stderr and "validation" in first.stderr  # the phases between steps
    assert "trained 2 steps" in first.stdout and "train-encoder" not in first.stdout
    assert read_checkpoint_config(tmp_path / "o")["training"]["device"] == "cpu"  # --device auto, no GPU here
    quiet = run("-q", "train-encoder", "--task", f"kather-crc={datasets['kather']}", *out)
    assert quiet.exit_code == 0 and quiet.stderr == "" and "nothing to do" in quiet.stdout
    _fails(
        ["train-encoder", "--task", f"kather-crc={datasets['kather']}", *out, "--lr", "0.01"],
        "holds a checkpoint of a different run (differs in: lr)",
    )
    fresh = run("train-encoder", "--task", f"kather-crc={datasets['kather']}", *out, "--lr", "0.01", "--overwrite")
    assert fresh.exit_code == 0 and "trained 2 steps" in fresh.output
