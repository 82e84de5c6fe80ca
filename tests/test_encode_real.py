"""Real slide end to end: `wsienc tile` then `wsienc encode` on CMU-1-Small-Region.svs (Aperio, 0.499 µm/px)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.io.embedding_store import read_slide

SLIDE_ID = "CMU-1-Small-Region"


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
@pytest.mark.integration
def test_tile_then_encode_the_real_slide(cmu_svs: Path, tmp_path: Path) -> None:
    tile = ["tile", str(cmu_svs), "--mpp", "0.5", "--tile-size", "128", "--workers", "1"]
    _run([*tile, "--out", str(tmp_path / "pixels.zarr"), "--codec", "zstd"])
    _run([*tile, "--out", str(tmp_path / "coords.zarr"), "--coords-only"])
    out = _run(
        ["encode", str(tmp_path / "pixels.zarr"), "--encoder", "nic", "--out", str(tmp_path / "emb.zarr"),
         "--dtype", "float32", "--h5-dir", str(tmp_path / "h5"), "--preview-dir", str(tmp_path / "previews")]
    )  # fmt: skip
    assert "1 slides encoded" in out
    _run(["encode", str(tmp_path / "coords.zarr"), "--encoder", "nic", "--out", str(tmp_path / "emb_coords.zarr"), "--dtype", "float32"])

    patch = zarr.open_group(str(tmp_path / "pixels.zarr" / SLIDE_ID), mode="r")
    emb = read_slide(tmp_path / "emb.zarr", SLIDE_ID)
    n = patch["coords"].shape[0]
    assert n > 50 and emb.features.shape == (n, 128)
    assert emb.grid.shape == (128, *patch.attrs["grid_shape"])
    for i, (r, c) in enumerate(emb.rowcol):
        np.testing.assert_array_equal(emb.grid[:, r, c], emb.features[i])
    assert emb.mask.sum() == n and not emb.grid[:, ~emb.mask].any()
    assert Path(emb.attrs["source"]).resolve() == cmu_svs.resolve()

    # Pixels read from the slide on the fly (coords-only) are the pixels the lossless store holds.
    on_the_fly = read_slide(tmp_path / "emb_coords.zarr", SLIDE_ID)
    np.testing.assert_array_equal(on_the_fly.coords, emb.coords)
    np.testing.assert_allclose(on_the_fly.features, emb.features, rtol=1e-4, atol=1e-5)

    with h5py.File(tmp_path / "h5" / f"{SLIDE_ID}.h5", "r") as fh:
        assert fh["features"].shape == (n, 128) and fh["coords"].shape == (n, 2)
        attrs = dict(fh["coords"].attrs)
    assert attrs["patch_size"] == 128 and attrs["patch_level"] == 0 and attrs["level0_patch_size"] == 128
    assert attrs["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert (tmp_path / "previews" / f"{SLIDE_ID}.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.integration
def test_encode_the_real_slide_with_clam_resnet50_trunc(cmu_svs: Path, tmp_path: Path) -> None:
    """CLAM's encoder from an ImageNet-layout (torchvision) state dict: 1,024-d features equal to a direct forward."""
    import torch
    import torchvision

    from wsi_encoder.models.encoders import create_encoder, file_sha256

    torch.manual_seed(0)
    weights = tmp_path / "resnet50-19c8e357.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)  # layer4 and fc included
    _run(["tile", str(cmu_svs), "--mpp", "0.5", "--tile-size", "224", "--workers", "1", "--codec", "zstd",
          "--out", str(tmp_path / "p.zarr")])  # fmt: skip
    out = _run(["encode", str(tmp_path / "p.zarr"), "--encoder", "resnet50-trunc", "--weights", str(weights),
                "--out", str(tmp_path / "emb.zarr"), "--dtype", "float32", "--batch-size", "16"])  # fmt: skip
    assert "1 slides encoded" in out and "µm/px" not in out
    emb = read_slide(tmp_path / "emb.zarr", SLIDE_ID)
    tiles = zarr.open_group(str(tmp_path / "p.zarr" / SLIDE_ID), mode="r")["tiles"]
    n = tiles.shape[0]
    assert n > 20 and emb.features.shape == (n, 1024)
    assert emb.attrs["encoder"]["weights_sha256"] == file_sha256(weights)
    assert emb.attrs["encoder"]["name"] == "resnet50-trunc"
    model = create_encoder("resnet50-trunc", weights=weights).eval()
    x = torch.from_numpy(np.asarray(tiles[:4])).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        direct = model(x).numpy()
    np.testing.assert_allclose(emb.features[:4], direct, rtol=1e-3, atol=1e-4)
