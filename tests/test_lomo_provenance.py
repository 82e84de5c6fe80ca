"""The LOMO backbone guard reads the encoder actually built, and finds contamination by image content."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from tests._lomo_fixtures import write_breakhis_tree
from wsi_encoder.cli import main
from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.breakhis import scan_breakhis
from wsi_encoder.models.checkpoint import save_checkpoint, training_record
from wsi_encoder.models.encoders import create_encoder
from wsi_encoder.models.encoders.weights import BUNDLED_WEIGHTS_DIR, WEIGHTS_DIR_ENV
from wsi_encoder.pipelines import lomo as lomo_pipeline
from wsi_encoder.pipelines.lomo_config import LomoConfig
from wsi_encoder.tasks.data import PIXEL_DIGEST, FileImages, content_digests, pixel_digest, read_image_file


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundled_and_weights_dir_files_are_identified_by_file_and_sha(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    bundled = lomo_pipeline.backbone_provenance(LomoConfig(backbone="nic-multitask-4", image_size=128), [tmp_path])
    shipped = next((BUNDLED_WEIGHTS_DIR / "nic-multitask-4").glob("*.h5"))
    assert bundled["source"] == "bundled"
    assert bundled["weights"] == str(shipped.resolve()) and bundled["weights_sha256"] == _sha(shipped)
    assert not any("random initialisation" in w for w in lomo_pipeline.check_backbone(LomoConfig(), bundled))

    folder = tmp_path / "weights"
    (folder / "nic").mkdir(parents=True)
    save_file(create_encoder("nic", seed=3).state_dict(), str(folder / "nic" / "model.safetensors"))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    found = lomo_pipeline.backbone_provenance(LomoConfig(backbone="nic"), [tmp_path])
    assert found["source"] == "weights_dir"
    assert found["weights_sha256"] == _sha(folder / "nic" / "model.safetensors")
    # another file at the same path is another backbone: the init cache key (the SHA) changes with it
    state = create_encoder("nic", seed=3).state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1.0
    save_file(state, str(folder / "nic" / "model.safetensors"))
    again = lomo_pipeline.backbone_provenance(LomoConfig(backbone="nic"), [tmp_path])
    assert again["weights_sha256"] != found["weights_sha256"]


def _trained_on(folder: Path, images: list[Path], task_paths: list[str]) -> Path:
    """A train-encoder checkpoint whose record says it was trained on ``images`` (by content)."""
    encoder = create_encoder("nic", seed=0, input_size=64)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    content = {"digest": PIXEL_DIGEST, "images": content_digests(FileImages(images))}
    tasks = [{"name": "tiles", "task": "folder", "paths": task_paths}]
    save_checkpoint(folder, state, {"encoder": encoder.config.to_dict(), "tasks": tasks, "training_content": content})
    return folder / "model.safetensors"


def test_a_renamed_copy_of_the_data_is_found_by_content_through_a_bare_weights_file(tmp_path: Path) -> None:
    data = write_breakhis_tree(tmp_path / "data", n_benign=2, n_malignant=2, per_magnification=1)
    # the encoder was trained on a copy of three DATA images, renamed, in an unrelated folder
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    originals = [im.path for im in scan_breakhis(data)][:3]
    copies = [Path(shutil.copy(p, elsewhere / f"tile_{i}.png")) for i, p in enumerate(originals)]
    weights = _trained_on(tmp_path / "enc", copies, [str(elsewhere)])
    # only the weights file travels: the record goes with it (safetensors metadata)
    bare = tmp_path / "moved" / "backbone.safetensors"
    bare.parent.mkdir()
    shutil.copy(weights, bare)
    assert training_record(bare)["training_content"]["images"]
    config = LomoConfig(backbone="nic", weights=str(bare), image_size=64)
    provenance = lomo_pipeline.backbone_provenance(config, [data])
    assert provenance["source"] == "weights_file" and provenance["content_checked"]
    assert provenance["weights_sha256"] == _sha(bare)
    assert any("3 of the DATA images" in r for r in provenance["contamination"])
    with pytest.raises(InvalidParameterError, match="pixel for pixel"):
        lomo_pipeline.check_backbone(config, provenance)
    result = CliRunner().invoke(
        main, ["lomo", str(data), "--out", str(tmp_path / "o"), "--backbone", "nic", "--weights", str(bare),
               "--image-size", "64"]
    )
    assert result.exit_code == 1 and "pixel for pixel" in result.output
    assert len(result.output.strip().splitlines()) == 1
    allowed = LomoConfig(backbone="nic", weights=str(bare), image_size=64, allow_contaminated_backbone=True)
    assert lomo_pipeline.check_backbone(allowed, provenance)[0].startswith("CONTAMINATED BACKBONE")


def test_an_encoder_trained_on_other_images_passes(tmp_path: Path) -> None:
    data = write_breakhis_tree(tmp_path / "data", n_benign=2, n_malignant=2, per_magnification=1)
    other = write_breakhis_tree(tmp_path / "other", n_benign=1, n_malignant=1, per_magnification=1, seed=99)
    weights = _trained_on(tmp_path / "enc", [im.path for im in scan_breakhis(other)], [str(tmp_path / "other")])
    provenance = lomo_pipeline.backbone_provenance(LomoConfig(backbone="nic", weights=str(weights)), [data])
    assert provenance["content_checked"] and provenance["contamination"] == []


def test_pixel_digest_follows_pixels_not_names(tmp_path: Path) -> None:
    data = write_breakhis_tree(tmp_path / "data", n_benign=1, n_malignant=1, per_magnification=1)
    first, second = [im.path for im in scan_breakhis(data)][:2]
    pixels = read_image_file(first)
    assert pixel_digest(pixels) == pixel_digest(pixels.copy())
    assert pixel_digest(pixels) != pixel_digest(read_image_file(second))
    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    assert pixel_digest(changed) != pixel_digest(pixels)
