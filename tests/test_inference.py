"""``InferenceModel``: channels_last for CNNs, autocast precisions, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.models.encoders import create_encoder
from wsi_encoder.models.inference import InferenceModel, check_precision

torch.set_num_threads(2)


def test_cnn_runs_channels_last_with_the_same_features() -> None:
    enc = create_encoder("resnet18", embed_dim=None, seed=1).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = enc(x)
        runner = InferenceModel(enc, torch.device("cpu"))
        got = runner(x)
    assert runner.channels_last and enc.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_returns_float32_close_to_fp32() -> None:
    enc = create_encoder("nic", seed=2).eval()
    x = torch.rand(3, 3, 128, 128)
    with torch.inference_mode():
        ref = InferenceModel(enc, torch.device("cpu"))(x)
        got = InferenceModel(enc, torch.device("cpu"), precision="bf16")(x)
    assert got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.99


def test_bad_precisions_are_refused() -> None:
    with pytest.raises(InvalidParameterError, match="needs a CUDA device"):
        check_precision("fp16", torch.device("cpu"))
    with pytest.raises(InvalidParameterError, match="choose one of fp32, bf16, fp16"):
        check_precision("int8", torch.device("cpu"))
    assert check_precision("fp32", torch.device("cpu")) is None


def test_encode_cli_precision(tmp_path) -> None:
    """``encode --precision``: fp16 on a CPU is refused in one line; bf16 is recorded in the store."""
    from _encode_fixtures import random_patch_store
    from click.testing import CliRunner

    from wsi_encoder.cli import main
    from wsi_encoder.io.embedding_store import read_slide

    store = random_patch_store(tmp_path / "p.zarr", 5, (2, 3), tile_size=128)
    args = ["encode", str(store), "--encoder", "nic", "--out", str(tmp_path / "e.zarr"), "--device", "cpu"]
    bad = CliRunner().invoke(main, [*args, "--precision", "fp16"])
    assert bad.exit_code != 0 and "needs a CUDA device" in bad.output
    ok = CliRunner().invoke(main, [*args, "--precision", "bf16"])
    assert ok.exit_code == 0, ok.output
    assert read_slide(tmp_path / "e.zarr", "rand").attrs["precision"] == "bf16"
    again = CliRunner().invoke(main, [*args, "--precision", "fp32"])  # one store, one precision
    assert again.exit_code != 0 and "bf16" in again.output


@pytest.mark.slow
def test_compiled_model_gives_the_eager_features() -> None:
    enc = create_encoder("nic", seed=4).eval()
    x = torch.rand(4, 3, 128, 128)
    with torch.inference_mode():
        ref = enc(x)
        got = InferenceModel(enc, torch.device("cpu"), compile=True)(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_a_local_encode_loads_the_encoder_once(tmp_path, monkeypatch) -> None:
    """The driver's identity load and the tasks share one model (a foundation model is big)."""
    from _encode_fixtures import random_patch_store
    from safetensors.torch import save_file

    from wsi_encoder.compression import encoder_loads
    from wsi_encoder.pipelines.encode_store import encode_store

    store = random_patch_store(tmp_path / "p.zarr", 5, (2, 3), tile_size=128)
    save_file(create_encoder("nic", seed=9).state_dict(), str(tmp_path / "nic.safetensors"))
    monkeypatch.chdir(tmp_path)
    before = encoder_loads()
    result = encode_store(store, "nic", tmp_path / "e.zarr", weights="nic.safetensors", device="cpu")
    assert result.count("ok") == 1 and encoder_loads() == before + 1


def test_encode_cli_with_a_foundation_encoder(tmp_path, monkeypatch) -> None:
    """``encode --encoder lunit-vits8 --weights FILE``: 384-d features, the file's sha256 in the store; no file: one line."""
    from _encode_fixtures import random_patch_store
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from wsi_encoder.cli import main
    from wsi_encoder.io.embedding_store import read_slide
    from wsi_encoder.models.encoders import file_sha256
    from wsi_encoder.models.encoders.registry import get_builder

    monkeypatch.delenv("WSIENC_WEIGHTS_DIR", raising=False)
    store = random_patch_store(tmp_path / "p.zarr", 3, (1, 3), tile_size=112)
    torch.manual_seed(0)
    weights = tmp_path / "model.safetensors"
    save_file(get_builder("lunit-vits8")().trunk.state_dict(), str(weights))
    args = ["encode", str(store), "--encoder", "lunit-vits8", "--out", str(tmp_path / "e.zarr"), "--device", "cpu"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "needs its weights" in refused.output and "\n" == refused.output[-1]
    ok = CliRunner().invoke(main, [*args, "--weights", str(weights), "--dtype", "float32"])
    assert ok.exit_code == 0, ok.output
    emb = read_slide(tmp_path / "e.zarr", "rand")
    assert emb.features.shape == (3, 384) and np.isfinite(np.asarray(emb.features)).all()
    assert emb.attrs["encoder"]["weights_sha256"] == file_sha256(weights)
    assert emb.attrs["encoder_input"]["size"] == 224

