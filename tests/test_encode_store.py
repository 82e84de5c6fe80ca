"""`encode_store` / `wsienc encode` on small contract patch stores written with plain zarr."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from _encode_fixtures import StoreSlide, make_slide, random_patch_store, write_patch_store
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.compression import load_encoder_cached
from wsi_encoder.errors import StoreError
from wsi_encoder.evaluation.embedding_previews import fit_pca_rgb, rgb_grid, write_previews
from wsi_encoder.io.embedding_store import EmbeddingStore, read_slide
from wsi_encoder.io.h5_export import read_h5_features
from wsi_encoder.pipelines.encode_store import encode_store


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[StoreSlide]:
    d = tmp_path_factory.mktemp("enc_slides")
    return [StoreSlide("alpha", make_slide(d, "alpha", seed=1)), StoreSlide("beta", make_slide(d, "beta", seed=2))]


@pytest.fixture(scope="module")
def patch_store(tmp_path_factory: pytest.TempPathFactory, slides: list[StoreSlide]) -> Path:
    return write_patch_store(tmp_path_factory.mktemp("enc_store") / "patches.zarr", slides, failed={"gamma": "unreadable"})


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, patch_store: Path) -> tuple[Path, Path, Path]:
    out = tmp_path_factory.mktemp("enc_out")
    result = encode_store(
        patch_store, "nic", out / "emb.zarr", dtype="float32", chunk_tiles=8, batch_size=5,
        h5_dir=out / "h5", preview_dir=out / "previews",
    )  # fmt: skip
    assert {s: r.status for s, r in result.slides.items()} == {"alpha": "ok", "beta": "ok", "gamma": "skipped"}
    return out / "emb.zarr", out / "h5", out / "previews"


def test_grid_holds_every_feature_row_and_the_mask_is_the_tiles(encoded: tuple[Path, Path, Path], patch_store: Path) -> None:
    store = encoded[0]
    for slide_id in ("alpha", "beta"):
        emb = read_slide(store, slide_id)
        patch = zarr.open_group(str(patch_store / slide_id), mode="r")
        np.testing.assert_array_equal(emb.coords, patch["coords"][:])
        np.testing.assert_array_equal(emb.rowcol, patch["grid"][:])
        assert emb.grid.shape == (128, *patch.attrs["grid_shape"])
        assert emb.features.shape == (patch["coords"].shape[0], 128)
        for i, (r, c) in enumerate(emb.rowcol):
            np.testing.assert_array_equal(emb.grid[:, r, c], emb.features[i])
        expected = np.zeros(emb.mask.shape, dtype=bool)
        expected[emb.rowcol[:, 0], emb.rowcol[:, 1]] = True
        np.testing.assert_array_equal(emb.mask, expected)
        assert 0 < expected.sum() < expected.size  # the fixture has tissue and glass
        assert not emb.grid[:, ~emb.mask].any()
        np.testing.assert_array_equal(emb.thumbnail, patch["thumbnail"][:])
        copied = zarr.open_group(str(store / slide_id), mode="r")["thumbnail"]
        assert copied.chunks == copied.shape  # read whole: one chunk


def test_features_equal_a_direct_forward_pass_on_the_stored_tiles(encoded: tuple[Path, Path, Path], patch_store: Path) -> None:
    model, _ = load_encoder_cached("nic", None, "cpu")
    for slide_id in ("alpha", "beta"):
        tiles = zarr.open_group(str(patch_store / slide_id), mode="r")["tiles"][:]
        with torch.inference_mode():
            direct = model(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0).numpy()
        np.testing.assert_allclose(read_slide(encoded[0], slide_id).features, direct, rtol=1e-4, atol=1e-5)


def test_store_attributes_follow_the_contract(encoded: tuple[Path, Path, Path], patch_store: Path) -> None:
    root = zarr.open_group(str(encoded[0]), mode="r")
    assert root.attrs["kind"] == "embedding_store"
    assert {k: v["status"] for k, v in root.attrs["slides"].items()} == {"alpha": "ok", "beta": "ok"}
    attrs = dict(root["alpha"].attrs)
    _, identity = load_encoder_cached("nic", None, "cpu")
    assert attrs["encoder"]["name"] == "nic" and attrs["encoder"]["weights_sha256"] == identity.weights_sha256
    assert attrs["encoder"]["config"]["input_mpp"] == 0.5
    assert attrs["embedding_dim"] == 128 and attrs["complete"] is True and attrs["dtype"] == "float32"
    assert Path(attrs["patch_store"]) == patch_store.resolve()
    patch_attrs = zarr.open_group(str(patch_store / "alpha"), mode="r").attrs
    for key in ("source", "target_mpp", "tile_size", "tile_size_l0", "stride_l0", "grid_shape"):
        assert attrs[key] == patch_attrs[key], key
    assert root["alpha"]["features"].dtype == np.float32


def test_h5_files_read_back_with_the_clam_trident_layout(encoded: tuple[Path, Path, Path], patch_store: Path) -> None:
    store, h5_dir, _ = encoded
    assert sorted(p.name for p in h5_dir.iterdir()) == ["alpha.h5", "beta.h5"]
    with h5py.File(h5_dir / "alpha.h5", "r") as fh:
        features, coords = fh["features"][:], fh["coords"][:]
        attrs = dict(fh["coords"].attrs)
    emb = read_slide(store, "alpha")
    np.testing.assert_array_equal(features, emb.features)
    np.testing.assert_array_equal(coords, emb.coords)
    assert features.shape == (emb.coords.shape[0], 128) and coords.shape == (emb.coords.shape[0], 2)
    assert coords.dtype == np.int64
    assert attrs["patch_size"] == 128 and attrs["patch_level"] == 0
    assert attrs["level0_patch_size"] == 128 and attrs["patch_size_level0"] == 128
    assert attrs["mpp"] == pytest.approx(0.5) and attrs["name"] == "alpha"
    assert read_h5_features(h5_dir / "beta.h5").attrs["patch_size"] == 128


def test_previews_are_drawn_with_one_cohort_projection(encoded: tuple[Path, Path, Path], tmp_path: Path) -> None:
    store, _, previews = encoded
    assert sorted(p.name for p in previews.iterdir()) == ["alpha.png", "beta.png"]
    from PIL import Image

    with Image.open(previews / "alpha.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200
    # Drawing one slide alone uses the same cohort fit, hence the same colours.
    single = write_previews(store, tmp_path, slide_ids=["alpha"])
    assert list(single) == ["alpha"]
    embeddings = EmbeddingStore.open(store)
    samples = [embeddings.features(s)[:] for s in ("alpha", "beta")]
    projection = fit_pca_rgb(samples)
    image = rgb_grid(embeddings, "alpha", projection)
    mask = embeddings.read("alpha").mask
    assert (image[~mask] == 255).all() and image[mask].std() > 0
    alone = fit_pca_rgb(samples[:1])
    assert not np.array_equal(rgb_grid(embeddings, "alpha", alone), image)


def test_rerun_skips_complete_slides_and_overwrite_redoes_them(patch_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.zarr"
    encode_store(patch_store, "nic", out, chunk_tiles=8)
    before = read_slide(out, "alpha").features
    ticks: list[int] = []
    again = encode_store(patch_store, "nic", out, chunk_tiles=8, progress=lambda n, total: ticks.append(n))
    assert {s: r.status for s, r in again.slides.items() if r.status != "skipped"} == {"alpha": "done", "beta": "done"}
    assert ticks == []
    redo = encode_store(patch_store, "nic", out, chunk_tiles=8, overwrite=True, slides=["alpha"])
    assert redo.slides["alpha"].status == "ok"
    np.testing.assert_array_equal(read_slide(out, "alpha").features, before)
    assert read_slide(out, "alpha").features.dtype == np.float16


def test_partially_encoded_slide_redoes_only_missing_chunks(patch_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.zarr"
    encode_store(patch_store, "nic", out, chunk_tiles=8, slides=["alpha"])
    full = read_slide(out, "alpha")
    group = zarr.open_group(str(out / "alpha"), mode="r+")
    group["features"][8:16] = 0  # chunk 1 lost, as after a kill before its flag was written
    group["encoded_chunks"][1] = False
    group["grid"][:] = 0
    group.attrs["complete"] = False
    ticks: list[int] = []
    result = encode_store(patch_store, "nic", out, chunk_tiles=8, slides=["alpha"], progress=lambda n, total: ticks.append(total))
    assert result.slides["alpha"].status == "ok"
    assert set(ticks) == {min(16, full.features.shape[0]) - 8}  # only the missing chunk was encoded
    again = read_slide(out, "alpha")
    np.testing.assert_array_equal(again.features, full.features)
    np.testing.assert_array_equal(again.grid, full.grid)


def test_coords_only_store_reads_pixels_from_the_slide(slides: list[StoreSlide], encoded: tuple[Path, Path, Path], tmp_path: Path) -> None:
    coords_store = write_patch_store(tmp_path / "coords.zarr", slides, coords_only=True)
    result = encode_store(coords_store, "nic", tmp_path / "emb.zarr", dtype="float32", chunk_tiles=8, batch_size=5)
    assert all(r.status == "ok" for r in result.slides.values())
    for slide_id in ("alpha", "beta"):
        np.testing.assert_allclose(
            read_slide(tmp_path / "emb.zarr", slide_id).features, read_slide(encoded[0], slide_id).features, rtol=1e-4, atol=1e-5
        )


def test_a_failing_slide_is_reported_and_the_others_finish(slides: list[StoreSlide], tmp_path: Path) -> None:
    moved = tmp_path / "beta_moved.tif"
    broken = [slides[0], StoreSlide("beta", Path(shutil.copy(slides[1].path, moved)))]
    store = write_patch_store(tmp_path / "coords.zarr", broken, coords_only=True, incomplete=())
    moved.unlink()  # the slide behind a coords-only store has gone
    runner = CliRunner()
    res = runner.invoke(main, ["encode", str(store), "--encoder", "nic", "--out", str(tmp_path / "emb.zarr"), "--chunk-tiles", "8"])
    assert res.exit_code == 1, res.output
    assert "slide beta" in res.output and "beta_moved.tif" in res.output
    assert "1 slides encoded" in res.output and "1 failed" in res.output
    root = zarr.open_group(str(tmp_path / "emb.zarr"), mode="r")
    assert root.attrs["slides"]["beta"]["status"] == "failed" and root.attrs["slides"]["alpha"]["status"] == "ok"
    assert root["alpha"].attrs["complete"] is True and root["beta"].attrs["complete"] is False


def test_incomplete_patch_store_slide_fails_with_advice(slides: list[StoreSlide], tmp_path: Path) -> None:
    store = write_patch_store(tmp_path / "p.zarr", slides[:1], incomplete=("alpha",))
    result = encode_store(store, "nic", tmp_path / "emb.zarr")
    assert result.slides["alpha"].status == "failed" and "wsienc tile" in (result.slides["alpha"].reason or "")


def test_another_encoder_on_the_same_store_is_refused(encoded: tuple[Path, Path, Path], patch_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.zarr"
    shutil.copytree(encoded[0], out)
    with pytest.raises(StoreError, match="--overwrite"):
        encode_store(patch_store, "nic", out, dtype="float16")


def test_resampled_tiles_warn_with_both_resolutions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = random_patch_store(tmp_path / "p.zarr", 6, (3, 4), tile_size=256)
    group = zarr.open_group(str(store / "rand"), mode="r+")
    group.attrs.update({"actual_mpp": 0.5, "target_mpp": 0.5})
    with caplog.at_level(logging.WARNING, logger="wsi_encoder"):
        encode_store(store, "nic", tmp_path / "emb.zarr", dtype="float32")
    assert any("256 px at 0.5 µm/px" in r.getMessage() and "128 px at 0.5 µm/px" in r.getMessage() for r in caplog.records)
    emb = read_slide(tmp_path / "emb.zarr", "rand")
    assert emb.attrs["encoder_input"] == {"size": 128, "mpp": 1.0, "resampled": True}
    assert emb.features.shape == (6, 128)


def test_cli_encode_reports_and_writes(patch_store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["encode", str(patch_store), "--encoder", "nic", "--out", str(tmp_path / "e.zarr"), "--h5-dir", str(tmp_path / "h5"),
            "--batch-size", "7", "--dtype", "float16"]  # fmt: skip
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "2 slides encoded" in res.output and "skipped: slide gamma: tiling failed: unreadable" in res.output
    assert (tmp_path / "h5" / "alpha.h5").is_file()
    res = runner.invoke(main, args)
    assert res.exit_code == 0 and "2 already complete" in res.output
    bad = runner.invoke(main, ["encode", str(tmp_path / "missing.zarr"), "--encoder", "nic", "--out", str(tmp_path / "x.zarr")])
    assert bad.exit_code == 1 and "no such patch store" in bad.output
    bad = runner.invoke(main, ["encode", str(patch_store), "--encoder", "nosuch", "--out", str(tmp_path / "x.zarr")])
    assert bad.exit_code == 1 and "nosuch" in bad.output


def test_a_slide_without_tiles_gets_an_empty_grid(tmp_path: Path) -> None:
    store = random_patch_store(tmp_path / "p.zarr", 0, (3, 4))
    result = encode_store(store, "nic", tmp_path / "emb.zarr", h5_dir=tmp_path / "h5")
    assert result.slides["rand"].status == "ok"
    emb = read_slide(tmp_path / "emb.zarr", "rand")
    assert emb.features.shape == (0, 128) and emb.grid.shape == (128, 3, 4)
    assert not emb.mask.any() and not emb.grid.any()
    assert read_h5_features(tmp_path / "h5" / "rand.h5").coords.shape == (0, 2)


def test_a_retiled_slide_is_not_silently_kept(tmp_path: Path) -> None:
    encode_store(random_patch_store(tmp_path / "p.zarr", 6, (3, 4)), "nic", tmp_path / "emb.zarr")
    store = random_patch_store(tmp_path / "p.zarr", 8, (3, 4))
    result = encode_store(store, "nic", tmp_path / "emb.zarr")
    assert result.slides["rand"].status == "failed" and "--overwrite" in (result.slides["rand"].reason or "")
    assert encode_store(store, "nic", tmp_path / "emb.zarr", overwrite=True).slides["rand"].status == "ok"
    assert read_slide(tmp_path / "emb.zarr", "rand").features.shape == (8, 128)


def test_parallel_threads_share_one_model_and_equal_a_serial_run(patch_store: Path, encoded: tuple[Path, Path, Path], tmp_path: Path) -> None:
    result = encode_store(patch_store, "nic", tmp_path / "emb.zarr", dtype="float32", chunk_tiles=8, batch_size=5, workers=2)
    assert result.slides["alpha"].status == "ok" and result.slides["beta"].status == "ok"
    for slide_id in ("alpha", "beta"):
        np.testing.assert_allclose(
            read_slide(tmp_path / "emb.zarr", slide_id).features, read_slide(encoded[0], slide_id).features, rtol=1e-4, atol=1e-5
        )


def test_checkpoint_folder_and_weights_file_are_used(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from wsi_encoder.models.checkpoint import save_checkpoint
    from wsi_encoder.models.encoders import create_encoder, file_sha256

    trained = create_encoder("nic", seed=3).eval()
    state = trained.state_dict()
    sha = save_checkpoint(tmp_path / "ckpt", {f"encoder.{k}": v for k, v in state.items()}, {"encoder": trained.config.to_dict()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "nic.safetensors"))
    store = random_patch_store(tmp_path / "p.zarr", 5, (2, 4))
    tiles = zarr.open_group(str(store / "rand"), mode="r")["tiles"][:]
    with torch.inference_mode():
        direct = trained(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0).numpy()

    encode_store(store, str(tmp_path / "ckpt"), tmp_path / "a.zarr", dtype="float32")
    a = read_slide(tmp_path / "a.zarr", "rand")
    assert a.attrs["encoder"]["weights_sha256"] == sha and a.attrs["encoder"]["name"] == "nic"
    np.testing.assert_allclose(a.features, direct, rtol=1e-4, atol=1e-5)

    encode_store(store, "nic", tmp_path / "b.zarr", weights=tmp_path / "nic.safetensors", dtype="float32")
    b = read_slide(tmp_path / "b.zarr", "rand")
    assert b.attrs["encoder"]["weights_sha256"] == file_sha256(tmp_path / "nic.safetensors")
    np.testing.assert_allclose(b.features, direct, rtol=1e-4, atol=1e-5)
