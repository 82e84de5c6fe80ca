"""Encoder registry, weight loading, checkpoints and the load/resolve entry points."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wsi_encoder
from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.models.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_encoder,
    resolve_encoder,
    save_checkpoint,
)
from wsi_encoder.models.encoders import EncoderConfig, create_encoder, list_encoders
from wsi_encoder.models.heads import MultiTaskModel

torch.set_num_threads(2)


def test_registry_lists_builtins() -> None:
    assert {"nic", "resnet18", "resnet34", "resnet50"} <= set(list_encoders())
    described = list_encoders(with_descriptions=True)
    assert "0.5 µm/px" in described["nic"]
    with pytest.raises(InvalidParameterError, match=r"unknown encoder 'vit'.*nic"):
        create_encoder("vit")


def test_nic_architecture_matches_the_paper() -> None:
    enc = create_encoder("nic")
    weights = sum(p.numel() for p in enc.parameters())
    bn_stats = sum(b.numel() for n, b in enc.named_buffers() if "running" in n)
    assert weights + bn_stats == 595_968  # the NIC/MTL-NIC encoder count, BN statistics included
    cfg = enc.config
    assert (cfg.input_size, cfg.input_mpp, cfg.num_features) == (128, 0.5, 128)
    assert enc.num_features == enc.embedding_dim == 128
    enc.eval()
    assert enc.forward_features(torch.rand(2, 3, 128, 128)).shape == (2, 128)
    assert enc(torch.rand(1, 3, 64, 64)).shape == (1, 128)
    with pytest.raises(InvalidParameterError, match="at least 62 px"):
        enc(torch.rand(1, 3, 32, 32))
    with pytest.raises(InvalidParameterError, match=r"\(B, 3, H, W\)"):
        enc(torch.rand(3, 64, 64))
    assert create_encoder("nic", embed_dim=32).num_features == 32


def test_normalisation_travels_with_the_model() -> None:
    enc = create_encoder("resnet18", embed_dim=16).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(enc.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.config.std).view(1, 3, 1, 1)
    assert torch.allclose(enc(x), enc._features((x - mean) / std))
    assert enc.num_features == 16


def test_seeded_init_is_reproducible_and_leaves_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = create_encoder("nic", seed=1)
    after = torch.rand(1)
    assert torch.equal(expected, after)
    b = create_encoder("nic", seed=1)
    c = create_encoder("nic", seed=2)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_config_roundtrip() -> None:
    cfg = create_encoder("resnet34", embed_dim=8, input_size=96, input_mpp=1.0).config
    again = EncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.input_mpp = 0.25  # type: ignore[misc]


def test_weights_from_local_files(tmp_path: Path) -> None:
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    enc = create_encoder("resnet18", weights=tmp_path / "tv.pth")
    assert torch.equal(enc.trunk.conv1.weight, tv.conv1.weight)
    src = create_encoder("nic", seed=5)
    save_file(src.state_dict(), str(tmp_path / "nic.safetensors"))
    loaded = create_encoder("nic", weights=tmp_path / "nic.safetensors")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(src.eval()(x), loaded.eval()(x))
    assert loaded.weights_sha256 != src.weights_sha256  # file hash, not init hash
    with pytest.raises(CheckpointError, match="does not fit encoder 'resnet18'"):
        create_encoder("resnet18", weights=tmp_path / "nic.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        create_encoder("nic", weights=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        create_encoder("nic", weights=tmp_path / "junk.pt")


def _write_checkpoint(out: Path) -> MultiTaskModel:
    enc = create_encoder("nic", embed_dim=16, input_size=64, seed=3)
    model = MultiTaskModel(enc, {"a": 2, "b": 3})
    with torch.no_grad():  # move BN statistics away from their defaults
        enc.train()(torch.rand(8, 3, 64, 64))
    save_checkpoint(out, model.state_dict(), {"encoder": enc.config.to_dict(), "tasks": []})
    return model


def test_checkpoint_roundtrip_bit_for_bit(tmp_path: Path) -> None:
    model = _write_checkpoint(tmp_path / "ckpt")
    loaded = wsi_encoder.load_encoder(tmp_path / "ckpt")
    assert not loaded.training
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        expected = model.encoder.eval()(x)
        got = loaded(x)
        again = load_encoder(tmp_path / "ckpt")(x)
    assert got.shape == (4, 16)
    assert torch.equal(expected, got) and torch.equal(got, again)
    assert loaded.config == model.encoder.config
    assert loaded.weights_sha256 == json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())["weights_sha256"]


def test_load_encoder_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_encoder(tmp_path / "empty")
    _write_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_encoder(tmp_path / "ckpt")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / CONFIG_NAME).write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a wsi_encoder encoder checkpoint"):
        load_encoder(tmp_path / "other")


def test_resolve_encoder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        enc = resolve_encoder("nic")
    assert "untrained" in caplog.text and not enc.training
    assert enc.embedding_dim == 128 and enc.config.input_mpp == 0.5 and len(enc.weights_sha256) == 64
    _write_checkpoint(tmp_path / "ckpt")
    from_dir = resolve_encoder(str(tmp_path / "ckpt"))
    assert from_dir.embedding_dim == 16
    with pytest.raises(InvalidParameterError, match="cannot be combined"):
        resolve_encoder(tmp_path / "ckpt", weights=tmp_path / "w.pt")
    with pytest.raises(InvalidParameterError, match="neither a checkpoint directory nor a registered encoder"):
        resolve_encoder(str(tmp_path / "missing_dir"))
