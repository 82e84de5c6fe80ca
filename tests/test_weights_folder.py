"""The one weights-folder format (encoders, slide classifiers, DCGAN generators) and reading what earlier versions wrote."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_encoder.errors import CheckpointError
from wsi_encoder.io.embedding_store import SlideBag
from wsi_encoder.models.checkpoint import load_encoder, read_train_state, save_checkpoint
from wsi_encoder.models.classifier_files import load_model, save_model
from wsi_encoder.models.dcgan import Generator
from wsi_encoder.models.encoders import create_encoder
from wsi_encoder.models.slide_classifiers import create_slide_classifier
from wsi_encoder.models.weights_folder import load_folder_weights, read_folder_config, save_weights_folder
from wsi_encoder.training.gan_trainer import (
    GAN_INPUT,
    DcganSpec,
    fold_synthetic_images,
    generate,
    load_generator,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_and_load_with_the_checksum(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "b": torch.tensor([1, 2], dtype=torch.int64)}
    sha = save_weights_folder(
        tmp_path / "w", tensors, {"name": "x", "score": float("nan")}, config_name="config.json",
        extra_files={"state.pt": lambda p: torch.save({"step": torch.tensor(3)}, p)},
    )
    folder = tmp_path / "w"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "state.pt"]
    config = read_folder_config(folder, "config.json", hint="h")
    assert config == {"name": "x", "score": None, "weights": "model.safetensors", "weights_sha256": sha}
    assert sha == _sha(folder / "model.safetensors")
    back = load_folder_weights(folder, config, config_name="config.json")
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    # the config is the last file written: its mtime is not older than the others'
    assert all(os.stat(folder / "config.json").st_mtime_ns >= os.stat(p).st_mtime_ns for p in folder.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.iterdir():  # readable by the lab, not owner-only like mkstemp's 0600
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope: folder does not exist \(pass X\)"):
        read_folder_config(tmp_path / "nope", "config.json", hint="pass X")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no config\.json \(pass X\)"):
        read_folder_config(tmp_path / "empty", "config.json", hint="pass X")
    save_weights_folder(tmp_path / "w", {"a": torch.ones(3)}, {}, config_name="c.json")
    config = read_folder_config(tmp_path / "w", "c.json", hint="")
    weights = tmp_path / "w" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 differs from the one c\.json records.*; retrain"):
        load_folder_weights(tmp_path / "w", config, config_name="c.json", hint="retrain")
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot read the weights"):
        load_folder_weights(tmp_path / "w", {}, config_name="c.json")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights file is missing"):
        load_folder_weights(tmp_path / "w", config, config_name="c.json")
    (tmp_path / "w" / "c.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"c\.json: not a JSON object"):
        read_folder_config(tmp_path / "w", "c.json", hint="")


def test_a_failed_save_leaves_the_previous_folder_readable(tmp_path: Path) -> None:
    save_weights_folder(tmp_path, {"a": torch.ones(2)}, {"v": 1}, config_name="c.json")

    def boom(path: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_weights_folder(tmp_path, {"a": torch.zeros(2)}, {"v": 2}, config_name="c.json", extra_files={"s": boom})
    config = read_folder_config(tmp_path, "c.json", hint="")
    assert config["v"] == 1
    with pytest.raises(CheckpointError, match="SHA-256 differs"):  # new weights, old config: refused, not mixed
        load_folder_weights(tmp_path, config, config_name="c.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "model.safetensors"]


def test_encoder_checkpoint_with_resume_state(tmp_path: Path) -> None:
    enc = create_encoder("nic", embed_dim=8, input_size=64, seed=1)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    save_checkpoint(tmp_path, state, {"encoder": enc.config.to_dict()}, {"step": torch.tensor(7), "lr": 0.1})
    assert read_train_state(tmp_path) == {"step": torch.tensor(7), "lr": 0.1}
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(load_encoder(tmp_path)(x), enc.eval()(x))


# ------------------------------------------------------------------ folders written by earlier versions
def test_encoder_checkpoint_written_by_the_previous_version_loads(tmp_path: Path) -> None:
    """The previous writer: safetensors.torch bytes, then config.json without a ``weights`` key."""
    from safetensors.torch import save

    enc = create_encoder("nic", embed_dim=8, input_size=64, seed=2)
    (tmp_path / "model.safetensors").write_bytes(save({f"encoder.{k}": v.contiguous() for k, v in enc.state_dict().items()}))
    cfg = {
        "format": "wsi_encoder.encoder_checkpoint", "format_version": 1, "encoder": enc.config.to_dict(), "tasks": [],
        "weights_sha256": _sha(tmp_path / "model.safetensors"),
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    x = torch.rand(2, 3, 64, 64)
    loaded = load_encoder(tmp_path)
    assert torch.equal(loaded(x), enc.eval()(x)) and loaded.weights_sha256 == cfg["weights_sha256"]


def test_classifier_folder_written_by_the_previous_version_loads(tmp_path: Path) -> None:
    """The previous writer: safetensors.numpy with a format header, then model.json."""
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    model = create_slide_classifier("abmil", 6, 2, {"hidden": 8, "attention_dim": 4}, device="cpu")
    arrays = {k: np.ascontiguousarray(v) for k, v in model.state_arrays().items()}
    arrays["input_mean"] = rng.normal(size=6).astype(np.float32)
    model.load_state_arrays(arrays)
    fmt = "wsi_encoder.slide_classifier/1"
    (tmp_path / "model.safetensors").write_bytes(save(arrays, metadata={"format": fmt, "model": "abmil"}))
    record = {
        "format": fmt, **model.describe(), "classes": ["a", "b"], "weights": "model.safetensors",
        "weights_sha256": _sha(tmp_path / "model.safetensors"), "wsi_encoder_version": "0.9",
    }
    (tmp_path / "model.json").write_text(json.dumps(record, indent=2))
    loaded, meta = load_model(tmp_path, device="cpu")
    cells = np.argwhere(np.ones((3, 4), bool))
    bag = SlideBag("s", rng.normal(size=(12, 6)).astype(np.float32), cells, (3, 4))
    np.testing.assert_array_equal(loaded.predict_proba([bag]), model.predict_proba([bag]))
    assert meta["classes"] == ["a", "b"]
    save_model(loaded, tmp_path / "again", {"classes": ["a", "b"]})  # and it is written in the current format
    assert read_folder_config(tmp_path / "again", "model.json", hint="")["weights"] == "model.safetensors"


def _previous_generator_file(path: Path, gen: Generator, info: dict[str, object]) -> None:
    """The previous writer: one ``<class>.safetensors`` with nz/width/info in its header."""
    from safetensors.torch import save

    meta = {"nz": str(gen.nz), "width": str(gen.width), "info": json.dumps(info)}
    path.write_bytes(save({k: v.contiguous() for k, v in gen.state_dict().items()}, metadata=meta))


def test_generator_file_written_by_the_previous_version_loads_and_is_reused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = Generator(nz=8, width=4).eval()
    spec = DcganSpec(epochs=1, batch_size=4, nz=8, width=4)
    _previous_generator_file(tmp_path / "benign.safetensors", gen, {"class": "benign", "n_images": 3})
    back, info = load_generator(tmp_path / "benign.safetensors")
    assert info == {"class": "benign", "n_images": 3}
    assert np.array_equal(generate(back, 3, seed=1), generate(gen, 3, seed=1))
    names = ["a.png", "b.png", "c.png"]
    # reused when its record says it was trained on these files, with this spec, on crops at this scale
    record = {"benign": names, "spec": asdict(spec), "input": [GAN_INPUT, 64]}
    (tmp_path / "trained_on.json").write_text(json.dumps(record))
    images = np.random.default_rng(0).integers(0, 255, size=(3, 64, 64, 3), dtype=np.uint8)
    trained: list[str] = []
    out = fold_synthetic_images(
        {"benign": (images, names)}, ("benign",), tmp_path, spec, 1.0, on_epoch=lambda c, *_: trained.append(c)
    )
    assert trained == [] and len(out.images) == 3  # reused, not retrained
    (tmp_path / "benign.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match=r"benign\.safetensors: not a DCGAN generator file.*delete it to retrain"):
        load_generator(tmp_path / "benign.safetensors")
    fold_synthetic_images({"benign": (images, names)}, ("benign",), tmp_path, spec, 1.0, on_epoch=lambda c, *_: trained.append(c))
    assert trained == ["benign"] and (tmp_path / "benign" / "config.json").is_file()  # retrained, new layout
    assert load_generator(tmp_path / "benign")[1] == {"class": "benign", "n_images": 3, "input": GAN_INPUT}
