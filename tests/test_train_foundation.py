"""``train-encoder`` on a pretrained backbone loaded from a local file: frozen or partly unfrozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_fixtures import make_kather
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from wsi_encoder.cli import main
from wsi_encoder.errors import CheckpointError
from wsi_encoder.models.checkpoint import WEIGHTS_NAME, load_encoder, read_checkpoint_config
from wsi_encoder.models.encoders import create_encoder, file_sha256
from wsi_encoder.models.encoders.registry import get_builder

torch.set_num_threads(2)

FAST = ["--input-size", "32", "--batch-size", "6", "--workers", "0", "--max-steps", "2", "--no-augment"]


@pytest.fixture(scope="module")
def lunit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the official (timm) layout of the Lunit ViT-S/8."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = get_builder("lunit-vits8")().trunk
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def kather(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kather(tmp_path_factory.mktemp("kather") / "NCT-CRC-HE-100K", n_per_class=3, size=48, classes=("ADI", "TUM"))


def _train(kather: Path, out: Path, weights: Path, *extra: str):
    args = ["train-encoder", "--task", f"kather-crc={kather}", "--backbone", "lunit-vits8", "--weights", str(weights),
            "--out", str(out), *FAST, *extra]  # fmt: skip
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_frozen_backbone_trains_heads_and_reloads_from_the_same_file(kather: Path, lunit_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "enc"
    result = _train(kather, out, lunit_file, "--freeze-backbone")
    assert result.exit_code == 0, result.output
    cfg = read_checkpoint_config(out)
    assert cfg["backbone"] == {
        "name": "lunit-vits8",
        "weights": str(lunit_file.resolve()),
        "weights_sha256": file_sha256(lunit_file),
        "trained": "none (frozen)",
        "stored": "trainable",
    }
    assert cfg["embed_dim"] == 384  # the backbone's own features, no extra embedding
    stored = load_file(str(out / WEIGHTS_NAME))
    assert not any(k.startswith("encoder.trunk.") for k in stored)  # the 21 M frozen weights are not copied
    assert any(k.startswith("heads.") for k in stored)
    enc = load_encoder(out)
    base = create_encoder("lunit-vits8", weights=lunit_file, input_size=32)
    for k, v in base.trunk.state_dict().items():  # the backbone is the untouched pretrained file
        torch.testing.assert_close(enc.trunk.state_dict()[k], v)
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 384)
    # the checkpoint refuses a changed backbone file
    changed = tmp_path / "changed.safetensors"
    state = load_file(str(lunit_file))
    state["norm.weight"] = state["norm.weight"] + 1
    save_file(state, str(changed))
    lunit_copy = lunit_file.read_bytes()
    try:
        lunit_file.write_bytes(changed.read_bytes())
        with pytest.raises(CheckpointError, match="missing or changed"):
            load_encoder(out)
    finally:
        lunit_file.write_bytes(lunit_copy)


def test_unfreeze_last_trains_only_the_last_blocks(kather: Path, lunit_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "enc"
    result = _train(kather, out, lunit_file, "--unfreeze-last", "1", "--lr", "0.01")
    assert result.exit_code == 0, result.output
    stored = load_file(str(out / WEIGHTS_NAME))
    assert any(k.startswith("encoder.trunk.blocks.11.") for k in stored)
    assert "encoder.trunk.norm.weight" in stored
    assert not any(k.startswith(("encoder.trunk.blocks.10.", "encoder.trunk.patch_embed.")) for k in stored)
    enc = load_encoder(out)
    base = create_encoder("lunit-vits8", weights=lunit_file, input_size=32)
    torch.testing.assert_close(enc.trunk.blocks[0].attn.qkv.weight, base.trunk.blocks[0].attn.qkv.weight)
    assert not torch.equal(enc.trunk.blocks[11].mlp.fc2.weight, base.trunk.blocks[11].mlp.fc2.weight)


def test_exclusive_freeze_options(kather: Path, lunit_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["train-encoder", "--task", f"kather-crc={kather}", "--backbone", "lunit-vits8", "--weights", str(lunit_file),
         "--out", str(tmp_path / "o"), "--freeze-backbone", "--unfreeze-last", "2"],
    )  # fmt: skip
    assert result.exit_code != 0 and "exclusive" in result.output


def test_lomo_backbone_goes_through_the_registry(lunit_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lomo --backbone NAME --weights FILE`` builds the pretrained encoder from the file; none is refused."""
    from wsi_encoder.pipelines.lomo import LomoConfig, make_encoder

    monkeypatch.delenv("WSIENC_WEIGHTS_DIR", raising=False)
    enc = make_encoder(LomoConfig(backbone="lunit-vits8", weights=str(lunit_file), image_size=32))
    assert enc.weights_sha256 == file_sha256(lunit_file) and enc.num_features == 384
    with pytest.raises(CheckpointError, match="needs its weights"):
        make_encoder(LomoConfig(backbone="lunit-vits8", image_size=32))


@pytest.mark.slow
def test_full_finetune_checkpoint_is_self_contained(kather: Path, lunit_file: Path, tmp_path: Path) -> None:
    """Without freezing, every tensor is in the checkpoint: it loads (built on ``meta``, then assigned) without the file."""
    copy = tmp_path / "lunit.safetensors"
    copy.write_bytes(lunit_file.read_bytes())
    out = tmp_path / "enc"
    assert _train(kather, out, copy).exit_code == 0
    cfg = read_checkpoint_config(out)
    assert cfg["backbone"]["stored"] == "full" and cfg["backbone"]["weights_sha256"] == file_sha256(lunit_file)
    copy.unlink()
    enc = load_encoder(out)
    stored = load_file(str(out / WEIGHTS_NAME))
    torch.testing.assert_close(enc.trunk.blocks[3].mlp.fc1.weight, stored["encoder.trunk.blocks.3.mlp.fc1.weight"])
    assert not any(t.is_meta for t in [*enc.parameters(), *enc.buffers()])
    assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 384)


@pytest.mark.slow
def test_frozen_run_resumes_only_on_the_same_backbone_file(kather: Path, lunit_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "lunit.safetensors"
    copy.write_bytes(lunit_file.read_bytes())
    out = tmp_path / "enc"
    assert _train(kather, out, copy, "--freeze-backbone").exit_code == 0
    more = _train(kather, out, copy, "--freeze-backbone", "--max-steps", "3")
    assert more.exit_code == 0 and "resumed from step 2" in more.output
    state = load_file(str(copy))
    state["norm.bias"] = state["norm.bias"] + 1
    save_file(state, str(copy))
    result = CliRunner().invoke(
        main,
        ["train-encoder", "--task", f"kather-crc={kather}", "--backbone", "lunit-vits8", "--weights", str(copy),
         "--out", str(out), *FAST[:-3], "--max-steps", "4", "--no-augment", "--freeze-backbone"],
    )  # fmt: skip
    assert result.exit_code != 0 and "backbone_sha256" in result.output
