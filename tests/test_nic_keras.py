"""The NIC authors' Keras encoders (encoder_multitask-4.h5, encoder_bigan.h5, encoder_mean-rgb.h5) read with h5py.

The reference is Keras's own output (``tests/fixtures/nic_keras/reference.npz``, written by ``make_reference.py``
beside it with Keras 3), on the repository's example patch and on real image crops of ``../shared/data``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED_DATA
from PIL import Image

from wsi_encoder.cli import main
from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.io.embedding_store import read_slide
from wsi_encoder.models.encoders import WEIGHTS_DIR_ENV, build_encoder, file_sha256, get_spec
from wsi_encoder.models.encoders.weights import BUNDLED_WEIGHTS_DIR

REFERENCE = Path(__file__).parent / "fixtures" / "nic_keras" / "reference.npz"
NAMES = ("nic-multitask-4", "nic-bigan", "nic-mean-rgb")
SHARED = SHARED_DATA.parent


def _bundled(name: str) -> Path:
    return BUNDLED_WEIGHTS_DIR / name / str(get_spec(name).weights_file)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE))


@pytest.fixture(scope="module")
def tiles(reference: dict[str, np.ndarray]) -> torch.Tensor:
    """The reference's input tiles as (B, 3, 128, 128) floats in [0, 1], checked against the pixels Keras saw."""
    out = [reference["example_pixels"]]
    for source, (x, y) in zip(reference["sources"][1:], reference["corners"][1:], strict=True):
        path = SHARED / str(source)
        if not path.is_file():
            pytest.skip(f"real test data {path} is missing (expected ../shared/data beside the checkout)")
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB"))[y : y + 128, x : x + 128])
    for tile, sha in zip(out, reference["pixel_sha256"], strict=True):
        assert hashlib.sha256(np.ascontiguousarray(tile).tobytes()).hexdigest() == sha
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.parametrize("name", NAMES)
def test_features_equal_keras(name: str, reference: dict[str, np.ndarray], tiles: torch.Tensor) -> None:
    encoder = build_encoder(name).eval()
    with torch.inference_mode():
        ours = encoder.forward_features(tiles).numpy()
    keras = reference[f"features/{name}"]
    assert ours.shape == keras.shape
    rel = np.linalg.norm(ours - keras, axis=1) / np.linalg.norm(keras, axis=1)
    assert rel.max() <= 1e-5, rel
    np.testing.assert_allclose(ours, keras, rtol=1e-5, atol=1e-5 * np.abs(keras).max())


def test_the_shipped_files_are_the_authors_and_their_sha_is_recorded() -> None:
    for name in NAMES:
        shared = SHARED / "nic_encoders" / str(get_spec(name).weights_file)
        if shared.is_file():
            assert file_sha256(shared) == file_sha256(_bundled(name))
        encoder = build_encoder(name)
        assert encoder.weights_sha256 == file_sha256(_bundled(name))
        assert Path(str(encoder.weights_path)) == _bundled(name).resolve()
    assert (BUNDLED_WEIGHTS_DIR / "LICENSE-neural-image-compression").read_text().startswith("MIT License")


def test_nic_self_checks() -> None:
    """595,968 weights (BN statistics included, the 4 step counters excluded); 64 → 31 → 15 → 7 → 3; F = 384."""
    encoder = build_encoder("nic-multitask-4")
    n = sum(v.numel() for k, v in encoder.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert n == 595_968
    x = torch.zeros(1, 3, 128, 128)
    sides = []
    for module in encoder.trunk:
        x = module(x)
        if isinstance(module, torch.nn.Conv2d):
            sides.append(x.shape[-1])
    assert sides == [31, 15, 7, 3]
    stride, channels = 128, encoder.num_features
    assert 3 * stride**2 / channels == 384


def test_a_weights_dir_copy_takes_precedence_and_nic_loads_the_file_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site" / "nic-bigan"
    site.mkdir(parents=True)
    shutil.copy(_bundled("nic-bigan"), site / "encoder_bigan.h5")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "site"))
    assert Path(str(build_encoder("nic-bigan").weights_path)) == (site / "encoder_bigan.h5").resolve()
    plain = build_encoder("nic", weights=_bundled("nic-multitask-4")).eval()
    published = build_encoder("nic-multitask-4").eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), published(x))


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def test_strict_loading_refuses_what_is_not_the_published_network(tmp_path: Path) -> None:
    src = _bundled("nic-multitask-4")

    def drop_bias(f: h5py.File) -> None:
        del f["model_weights/conv2d_2/conv2d_2/bias:0"]

    def wider_dense(f: h5py.File) -> None:
        del f["model_weights/encoded/encoded/kernel:0"]
        f["model_weights/encoded/encoded"].create_dataset("kernel:0", data=np.zeros((1152, 64), np.float32))

    def strided_differently(f: h5py.File) -> None:
        cfg = json.loads(f.attrs["model_config"])
        cfg["config"]["layers"][4]["config"]["strides"] = [1, 1]
        f.attrs["model_config"] = json.dumps(cfg)

    for edit, words in ((drop_bias, "conv2d_2"), (wider_dense, r"embed.weight has shape \(64, 1152\)"), (strided_differently, "stride-2")):
        path = _edited(src, tmp_path / f"{edit.__name__}.h5", edit)
        with pytest.raises(CheckpointError, match=words) as info:
            build_encoder("nic-multitask-4", weights=path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="fits only the nic encoders"):
        build_encoder("resnet18", weights=src)
    with pytest.raises(CheckpointError, match="GlobalAveragePooling2D"):
        build_encoder("nic-mean-rgb", weights=src)
    with pytest.raises(InvalidParameterError, match="fixed 128-feature"):
        build_encoder("nic-multitask-4", embed_dim=64)


def test_batchnorm_epsilon_and_slope_are_carried_over(tmp_path: Path) -> None:
    def edit(f: h5py.File) -> None:
        cfg = json.loads(f.attrs["model_config"])
        for layer in cfg["config"]["layers"]:
            if layer["class_name"] == "BatchNormalization":
                layer["config"]["epsilon"] = 0.25
            if layer["class_name"] == "LeakyReLU":
                layer["config"]["alpha"] = 0.1
        f.attrs["model_config"] = json.dumps(cfg)

    encoder = build_encoder("nic-multitask-4", weights=_edited(_bundled("nic-multitask-4"), tmp_path / "e.h5", edit))
    assert {m.eps for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.25}
    assert {m.negative_slope for m in encoder.modules() if isinstance(m, torch.nn.LeakyReLU)} == {0.1}
    assert {round(m.momentum, 6) for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.2}


@pytest.mark.slow
def test_encode_a_real_slide_with_the_published_encoder(cmu_svs: Path, tmp_path: Path) -> None:
    """`wsienc encode --encoder nic-multitask-4` with no weights file: the shipped file, its SHA-256 recorded."""
    runner = CliRunner()
    tile = ["tile", str(cmu_svs), "--mpp", "0.5", "--tile-size", "128", "--workers", "1", "--codec", "zstd",
            "--out", str(tmp_path / "p.zarr")]  # fmt: skip
    assert runner.invoke(main, tile).exit_code == 0
    args = ["encode", str(tmp_path / "p.zarr"), "--encoder", "nic-multitask-4", "--out", str(tmp_path / "e.zarr"),
            "--dtype", "float32"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    emb = read_slide(tmp_path / "e.zarr", "CMU-1-Small-Region")
    assert emb.features.shape[1] == 128 and emb.features.shape[0] > 50
    assert json.dumps(emb.attrs).count(file_sha256(_bundled("nic-multitask-4"))) >= 1
    import zarr

    pixels = zarr.open_group(str(tmp_path / "p.zarr" / "CMU-1-Small-Region"), mode="r")["tiles"][:4]
    x = torch.from_numpy(np.asarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        direct = build_encoder("nic-multitask-4").eval()(x).numpy()
    np.testing.assert_allclose(emb.features[:4], direct, rtol=1e-4, atol=1e-4)
