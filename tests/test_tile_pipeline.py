"""The tile job: exact pixels, resampling, backends, resume, failures, locking, the store contract."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import zarr
from _tile_helpers import assert_stores_equal, small_slide, truncated_copy
from PIL import Image
from skimage.filters import gaussian
from skimage.transform import AffineTransform, warp

from wsi_encoder.errors import InvalidParameterError, StoreError
from wsi_encoder.io.jpeg_codec import JpegTileCodec
from wsi_encoder.io.patch_store import clean_slide_leftovers, open_patch_store
from wsi_encoder.io.slide_ids import assign_slide_ids, expand_slide_inputs, slide_id_from_path
from wsi_encoder.io.slides import open_slide
from wsi_encoder.io.store_lock import StoreLock
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec

CONTRACT_ATTRS = {
    "source", "backend", "vendor", "width", "height", "slide_mpp", "objective_power", "target_mpp", "actual_mpp",
    "tile_size", "stride", "tile_size_l0", "stride_l0", "level", "resampled", "grid_shape", "tissue_method",
    "tissue_threshold", "codec", "coords_only", "wsi_encoder_version", "complete",
}  # fmt: skip


def test_tiles_equal_openslide_pixels_at_the_slides_own_mpp(cmu_svs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmu.zarr"
    report = tile_cohort([cmu_svs], out, TileSpec(0.499, 224), codec="zstd", tissue_threshold=0.1, workers=2)
    assert [o.status for o in report.outcomes] == ["ok"]
    store = open_patch_store(out)
    slide = store["CMU-1-Small-Region"]
    attrs = slide.attrs
    assert CONTRACT_ATTRS <= set(attrs)
    assert attrs["complete"] and not attrs["resampled"] and attrs["codec"] == "zstd"
    assert attrs["actual_mpp"] == pytest.approx(0.499) and attrs["target_mpp"] == 0.499
    assert attrs["source"] == str(cmu_svs.resolve())
    assert slide.n_tiles > 40
    assert slide.tiles is not None and slide.tiles.shape == (slide.n_tiles, 224, 224, 3)
    assert store.status == {"CMU-1-Small-Region": {"status": "ok", "reason": None, "source": str(cmu_svs.resolve())}}
    reference = openslide.OpenSlide(str(cmu_svs))
    try:
        for start, stop, tiles in slide.tile_batches():
            for tile, (x, y) in zip(tiles, slide.coords[start:stop], strict=True):
                rgba = np.asarray(reference.read_region((int(x), int(y)), 0, (224, 224)))
                # edge tiles: OpenSlide leaves outside pixels transparent, the tiler pads with white glass
                expected = np.where(rgba[..., 3:] == 0, 255, rgba[..., :3])
                np.testing.assert_array_equal(tile, expected)
    finally:
        reference.close()
    # grid and coords agree, tissue fractions pass the threshold, the thumbnail and mask are there
    np.testing.assert_array_equal(slide.coords, slide.grid[:, ::-1].astype(np.int64) * 224)
    assert (slide.tissue >= 0.1).all()
    assert slide.thumbnail.ndim == 3 and slide.tissue_mask.shape == slide.thumbnail.shape[:2]
    group = zarr.open_group(out / "CMU-1-Small-Region", mode="r")
    for name in ("thumbnail", "tissue_mask"):  # read whole, so one chunk (zarr's automatic chunks made 16)
        assert group[name].chunks == group[name].shape


def test_coarser_mpp_matches_a_reference_resampling(cmu_svs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmu1.zarr"
    tile_cohort([cmu_svs], out, TileSpec(1.0, 128), codec="zstd", workers=2)
    slide = open_patch_store(out)["CMU-1-Small-Region"]
    assert slide.attrs["resampled"] and slide.attrs["actual_mpp"] == 1.0
    assert slide.attrs["tile_size_l0"] == pytest.approx(128 * 1.0 / 0.499)
    tiles = np.asarray(slide.tiles[:])
    s = 0.499 / 1.0  # target pixels per level-0 pixel
    with open_slide(cmu_svs) as reader:
        full = reader.read_region((0, 0), 0, reader.dimensions)
    # edge tiles are padded with white glass: so is the reference picture
    margin = int(128 / s) + 16
    full = np.pad(full, ((0, margin), (0, margin), (0, 0)), constant_values=255)
    image = Image.fromarray(full)
    smooth = gaussian(full.astype(np.float32) / 255, sigma=(1 / s - 1) / 2, channel_axis=-1, preserve_range=True)
    exact, independent = [], []
    for tile, (row, col) in zip(tiles, slide.grid, strict=True):
        u0, v0 = col * 128, row * 128
        # the same Lanczos filter applied to the whole slide at the tile's exact sub-pixel box ...
        box = (u0 / s, v0 / s, (u0 + 128) / s, (v0 + 128) / s)
        lanczos = np.asarray(image.resize((128, 128), Image.Resampling.LANCZOS, box=box, reducing_gap=None))
        exact.append(np.abs(tile.astype(np.int16) - lanczos).max())
        # ... and an independent antialiased resampling (Gaussian prefilter + cubic, scikit-image)
        to_source = AffineTransform(scale=1 / s, translation=((u0 + 0.5) / s - 0.5, (v0 + 0.5) / s - 0.5))
        cubic = warp(smooth, to_source, output_shape=(128, 128), order=3) * 255
        independent.append(np.abs(tile - cubic).mean())
    assert max(exact) <= 1
    assert np.mean(independent) < 4 and max(independent) < 7


def test_20x_from_40x_only_slide_and_tolerance(tmp_path: Path, synthetic_slide_40x: Path) -> None:
    only40 = small_slide(tmp_path / "only40x.tif", 2400, 1800, mpp=0.25, level_downsamples=(1,))
    out = tmp_path / "s.zarr"
    report = tile_cohort([only40], out, TileSpec(0.5, 224), workers=2)
    assert [o.status for o in report.outcomes] == ["ok"]
    store = open_patch_store(out)
    a = store["only40x"].attrs
    assert (a["level"], a["resampled"], a["actual_mpp"], a["tile_size_l0"]) == (0, True, 0.5, 448.0)
    assert store["only40x"].n_tiles > 0
    # 0.25 from a 0.2465 scanner: within the 5 % tolerance, read as it is; both mpps recorded.
    tile_cohort([synthetic_slide_40x], tmp_path / "t.zarr", TileSpec(0.25, 224), coords_only=True, workers=2)
    b = open_patch_store(tmp_path / "t.zarr")["synthetic_40x"]
    assert (b.attrs["resampled"], b.attrs["target_mpp"], b.attrs["level"]) == (False, 0.25, 0)
    assert b.attrs["actual_mpp"] == pytest.approx(0.2465)
    assert b.attrs["tile_size_l0"] == 224


def test_both_backends_give_the_same_store(synthetic_slide: Path, tmp_path: Path) -> None:
    stores = []
    for backend in ("openslide", "tiffslide"):
        out = tmp_path / f"{backend}.zarr"
        tile_cohort([synthetic_slide], out, TileSpec(0.5, 224), backend=backend, workers=2)
        assert open_patch_store(out)["synthetic"].attrs["backend"] == backend
        stores.append(out)
    assert_stores_equal(*stores)


def test_coords_only_store(synthetic_slide: Path, tmp_path: Path) -> None:
    tile_cohort([synthetic_slide], tmp_path / "px.zarr", TileSpec(0.5, 224), workers=2)
    tile_cohort([synthetic_slide], tmp_path / "co.zarr", TileSpec(0.5, 224), coords_only=True, workers=2)
    px, co = open_patch_store(tmp_path / "px.zarr")["synthetic"], open_patch_store(tmp_path / "co.zarr")["synthetic"]
    assert co.tiles is None and co.complete and co.attrs["coords_only"] and co.attrs["codec"] is None
    np.testing.assert_array_equal(co.coords, px.coords)
    np.testing.assert_array_equal(co.grid, px.grid)


def test_corrupt_and_mpp_less_slides_fail_alone(
    synthetic_slide: Path, synthetic_slide_no_mpp: Path, tmp_path: Path
) -> None:
    bad = truncated_copy(synthetic_slide, tmp_path / "broken.tif")
    out = tmp_path / "c.zarr"
    report = tile_cohort([synthetic_slide, bad, synthetic_slide_no_mpp], out, TileSpec(0.5, 224), workers=2)
    status = {o.slide_id: o for o in report.outcomes}
    assert status["synthetic"].status == "ok"
    assert status["broken"].status == "failed" and "broken.tif" in (status["broken"].reason or "")
    assert status["no_mpp"].status == "failed" and "--slide-mpp" in (status["no_mpp"].reason or "")
    record = open_patch_store(out).status
    assert record["broken"]["status"] == "failed" and record["broken"]["reason"]
    assert record["synthetic"] == {"status": "ok", "reason": None, "source": str(synthetic_slide.resolve())}
    # a re-run with --slide-mpp retries the failed slide and skips the finished one
    again = tile_cohort([synthetic_slide, synthetic_slide_no_mpp], out, TileSpec(0.5, 224), slide_mpp=0.5, workers=2)
    assert {o.slide_id: o.status for o in again.outcomes} == {"no_mpp": "ok", "synthetic": "skipped"}
    assert open_patch_store(out).status["no_mpp"]["status"] == "ok"


def test_rerun_skips_refuses_changed_parameters_and_overwrites(synthetic_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.zarr"
    tile_cohort([synthetic_slide], out, TileSpec(0.5, 224), workers=2)
    again = tile_cohort([synthetic_slide], out, TileSpec(0.5, 224), workers=2)
    assert [o.status for o in again.outcomes] == ["skipped"]
    with pytest.raises(InvalidParameterError, match="--overwrite"):
        tile_cohort([synthetic_slide], out, TileSpec(1.0, 224), workers=2)
    redone = tile_cohort([synthetic_slide], out, TileSpec(1.0, 224), overwrite=True, workers=2)
    assert [o.status for o in redone.outcomes] == ["ok"]
    assert open_patch_store(out)["synthetic"].attrs["target_mpp"] == 1.0


def test_a_locked_store_is_refused(synthetic_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "l.zarr"
    with StoreLock(out), pytest.raises(StoreError, match="another wsienc run"):
        tile_cohort([synthetic_slide], out, TileSpec(0.5, 224), workers=1)
    assert not (tmp_path / "l.zarr.lock").exists()


def test_leftover_temporaries_of_a_killed_run_are_cleaned_before_resuming(synthetic_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "z.zarr"
    tile_cohort([synthetic_slide], out, TileSpec(0.5, 224), codec="zstd", workers=1)
    chunk_dir = out / "synthetic" / "tiles"  # chunk files side by side (c.<i>.0.0.0)
    nested = out / "synthetic" / "chunks_done" / "c"  # and a nested key folder
    leftovers = [chunk_dir / ".c.0.0.0.0.0123456789ab.tmp", chunk_dir / "c.0.0.0.0.partial",  # atomic_path's, zarr's
                 nested / ".0.0123456789ab.tmp"]  # fmt: skip
    for path in leftovers:
        path.write_bytes(b"half")
    clean_slide_leftovers(out, "synthetic")
    assert not any(path.exists() for path in leftovers)
    assert open_patch_store(out)["synthetic"].complete


def test_slide_id_clash_names_both_files(synthetic_slide: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        (tmp_path / sub / "x.tif").write_bytes(synthetic_slide.read_bytes())
    with pytest.raises(InvalidParameterError, match=r"a/x\.tif.*b/x\.tif"):
        tile_cohort([tmp_path / "a", tmp_path / "b"], tmp_path / "o.zarr", workers=1)


def test_plain_zarr_in_a_fresh_process_decodes_jpeg_tiles(synthetic_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "j.zarr"
    tile_cohort([synthetic_slide], out, TileSpec(0.5, 224), jpeg_quality=95, workers=2)
    code = textwrap.dedent(
        f"""
        import sys, zarr
        assert "wsi_encoder" not in sys.modules
        group = zarr.open_group({str(out)!r}, mode="r")["synthetic"]
        tiles = group["tiles"]
        print(tiles.metadata.to_dict()["codecs"][0]["name"], tiles.metadata.to_dict()["codecs"][0]["configuration"]["quality"])
        print(tiles.shape[0], int(tiles[0].mean()), int(tiles[-1].std() > 1))
        """
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120, check=True)
    name, quality, n, mean, textured = done.stdout.split()
    slide = open_patch_store(out)["synthetic"]
    assert (name, quality) == ("wsi_encoder.jpeg", "95")
    assert int(n) == slide.n_tiles and int(mean) == int(slide.tiles[0].mean()) and textured == "1"
    # partial reads decode only what is asked, and agree with whole-chunk reads
    whole = np.asarray(slide.tiles[:])
    np.testing.assert_array_equal(slide.tiles[3], whole[3])
    np.testing.assert_array_equal(slide.tiles[1:5, 10:20, ::7, 1], whole[1:5, 10:20, ::7, 1])


_KILL_SCRIPT = """
import sys
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec
tile_cohort([sys.argv[1]], sys.argv[2], TileSpec(0.25, 128), workers=1, chunk_tiles=4)
"""


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_store(tmp_path: Path) -> None:
    slide = small_slide(tmp_path / "big.tif", 4000, 3200, mpp=0.25, seed=9, pieces=3, texture_mpp=0.5)
    reference = tmp_path / "reference.zarr"
    tile_cohort([slide], reference, TileSpec(0.25, 128), workers=2, chunk_tiles=4)
    n_chunks = open_patch_store(reference)["big"].group["chunks_done"].shape[0]
    assert n_chunks >= 8
    out = tmp_path / "killed.zarr"
    process = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(slide), str(out)])
    try:
        done_dir = out / "big" / "chunks_done" / "c"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if done_dir.exists() and len(list(done_dir.iterdir())) >= 2:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    partial = zarr.open_group(str(out / "big"), mode="r")
    done = np.asarray(partial["chunks_done"][:])
    assert not partial.attrs["complete"] and 0 < done.sum() < len(done)
    assert (tmp_path / "killed.zarr.lock").exists()  # left by the killed run; taken over below
    report = tile_cohort([slide], out, TileSpec(0.25, 128), workers=2, chunk_tiles=4)
    assert [o.status for o in report.outcomes] == ["ok"]
    assert_stores_equal(reference, out)
    assert not list(out.rglob("*.partial"))


def test_slide_ids_are_safe_and_inputs_expand(tmp_path: Path) -> None:
    assert slide_id_from_path("/x/TCGA-A1-A0SB-01Z-00-DX1.svs") == "TCGA-A1-A0SB-01Z-00-DX1"
    assert slide_id_from_path("a b (2).ome.tiff") == "a_b_2"
    assert slide_id_from_path("__odd.ndpi") == "s__odd"
    assert slide_id_from_path(".tif") == "tif"
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    (tmp_path / "d" / "old.zarr").mkdir()
    for name in ("d/b.svs", "d/sub/a.ndpi", "d/.hidden/c.svs", "d/old.zarr/x.tif", "d/notes.txt", "e.tif"):
        (tmp_path / name).write_bytes(b"x")
    found = expand_slide_inputs([tmp_path / "d", tmp_path / "e.tif", tmp_path / "d" / "b.svs"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["d/b.svs", "d/sub/a.ndpi", "e.tif"]
    with pytest.raises(InvalidParameterError, match=r"A\.svs.*a\.tif"):
        assign_slide_ids([tmp_path / "A.svs", tmp_path / "x" / "a.tif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidParameterError, match="no slides found"):
        expand_slide_inputs([tmp_path / "empty"])


def test_jpeg_codec_metadata_and_refusals(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    grey = group.create_array("grey", shape=(5, 32, 32), dtype="uint8", chunks=(2, 32, 32), serializer=JpegTileCodec(quality=100), compressors=None)
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (5, 32, 1))
    grey[:] = ramp
    assert np.abs(grey[:].astype(int) - ramp).max() <= 2
    assert grey.metadata.to_dict()["codecs"][0] == {"name": "wsi_encoder.jpeg", "configuration": {"quality": 100}}
    with pytest.raises(InvalidParameterError, match="quality"):
        JpegTileCodec(quality=0)
    with pytest.raises(InvalidParameterError, match="uint8"):
        group.create_array("f", shape=(2, 8, 8, 3), dtype="float32", chunks=(1, 8, 8, 3), serializer=JpegTileCodec(), compressors=None)


def test_jpeg_chunks_decode_to_each_tiles_own_jpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole and partial chunk reads give, tile by tile, what decoding that tile's JPEG on its own gives
    (RGB tiles are decoded straight into the chunk; greyscale ones through a copy)."""
    import imagecodecs

    from wsi_encoder.io.jpeg_codec import _index_size, _parse_index

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:48, 0:40]
    data = np.stack([(np.stack([yy * 5, xx * 6, (yy + xx) * 2], -1) + rng.integers(0, 40, (48, 40, 3))) % 256 for _ in range(7)])
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    tiles = group.create_array(
        "tiles", shape=data.shape, dtype="uint8", chunks=(4, 48, 40, 3), serializer=JpegTileCodec(quality=80), compressors=None
    )
    tiles[:] = data.astype(np.uint8)
    reference = []
    for index in range(2):
        chunk = (tmp_path / "c.zarr" / "tiles" / "c" / str(index) / "0" / "0" / "0").read_bytes()
        offsets = _parse_index(chunk, 4, "test")
        body = chunk[_index_size(4) :]
        reference += [imagecodecs.jpeg8_decode(body[int(offsets[k]) : int(offsets[k + 1])]) for k in range(4)]
    into: list[bool] = []
    original = imagecodecs.jpeg8_decode
    monkeypatch.setattr(imagecodecs, "jpeg8_decode", lambda *a, **k: into.append("out" in k) or original(*a, **k))
    np.testing.assert_array_equal(tiles[:], np.stack(reference[:7]))
    np.testing.assert_array_equal(tiles[5:6], reference[5][None])
    np.testing.assert_array_equal(tiles[1:3, 10:20], np.stack(reference[1:3])[:, 10:20])
    assert into and all(into)
