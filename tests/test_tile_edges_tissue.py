"""`wsienc tile` on real-world slides (issue 12): edge tiles, tissue beyond H&E, mpp sources, external
masks, empty slides, and one tile-reading path (coords-only encode == lossless store encode)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from _tile_helpers import image_slide, scene, small_slide
from click.testing import CliRunner
from PIL import Image

from wsi_encoder.cli import hoist_verbosity_flags, main
from wsi_encoder.errors import InvalidParameterError, StoreError
from wsi_encoder.io.patch_store import open_patch_store
from wsi_encoder.io.slides import open_slide
from wsi_encoder.pipelines.encode_store import _SlideTiles, encode_store
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec, grid_from_attrs, plan_tiles, read_tiles
from wsi_encoder.tissue import TISSUE_METHOD_DARKFIELD, detect_tissue

W, H = 1100, 900  # at 224 px tiles: 204 px columns and 4 px rows left over at the right and bottom


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_edge_tiles_are_kept_padded_and_measured_inside(tmp_path: Path) -> None:
    image, truth = scene("edge", W, H)
    path = image_slide(tmp_path / "edge.tif", image)
    report = tile_cohort([path], tmp_path / "p.zarr", TileSpec(0.5, 224), codec="zstd", workers=1)
    assert [o.status for o in report.outcomes] == ["ok"]
    slide = open_patch_store(tmp_path / "p.zarr")["edge"]
    assert slide.attrs["edge"] == "pad" and slide.attrs["grid_shape"] == [5, 5] and slide.attrs["fill"] == 255
    inner = slide.tiles.metadata.codecs[0].codecs  # the zstd level is recorded where readers look, and in attrs
    assert slide.attrs["zstd_level"] == 1 and inner[-1].level == 1
    rows, cols = slide.grid[:, 0], slide.grid[:, 1]
    assert (cols == 4).any() and (rows == 4).any(), "tissue touching the right and bottom edges is tiled"
    expected_inside = (np.minimum(W - cols * 224, 224) / 224) * (np.minimum(H - rows * 224, 224) / 224)
    np.testing.assert_allclose(slide.inside, expected_inside, rtol=1e-6)
    tiles = np.asarray(slide.tiles[:])
    for tile, (row, col), tissue in zip(tiles, slide.grid, slide.tissue, strict=True):
        w, h = min(W - col * 224, 224), min(H - row * 224, 224)
        np.testing.assert_array_equal(tile[:h, :w], image[row * 224 : row * 224 + h, col * 224 : col * 224 + w])
        assert (tile[h:] == 255).all() and (tile[:, w:] == 255).all(), "padding is white glass"
        inside_truth = truth[row * 224 : row * 224 + h, col * 224 : col * 224 + w].mean()
        assert abs(tissue - inside_truth) < 0.1, "the fraction counts only pixels inside the slide"
    assert slide.attrs["n_edge_tiles"] == int((slide.inside < 1).sum()) > 0

    dropped = tile_cohort([path], tmp_path / "d.zarr", TileSpec(0.5, 224, edge="drop"), codec="zstd", workers=1)
    assert [o.status for o in dropped.outcomes] == ["ok"]
    whole = open_patch_store(tmp_path / "d.zarr")["edge"]
    assert whole.attrs["edge"] == "drop" and whole.attrs["grid_shape"] == [4, 4]
    assert (whole.inside == 1).all() and whole.grid.max() <= 3


def test_coords_only_pixels_and_features_equal_a_lossless_store_when_resampled(tmp_path: Path) -> None:
    path = small_slide(tmp_path / "s40.tif", 1500, 1100, mpp=0.25, level_downsamples=(1,))
    spec = TileSpec(0.5, 96)  # 0.25 -> 0.5 µm/px: resampled, with padded edge tiles
    tile_cohort([path], tmp_path / "px.zarr", spec, codec="zstd", tissue_threshold=0.0, workers=2)
    tile_cohort([path], tmp_path / "co.zarr", spec, coords_only=True, tissue_threshold=0.0, workers=2)
    stored = open_patch_store(tmp_path / "px.zarr")["s40"]
    assert stored.attrs["resampled"] and (stored.inside < 1).any()
    group = zarr.open_group(str(tmp_path / "co.zarr" / "s40"), mode="r")
    on_the_fly = _SlideTiles(group, batch_size=7)
    np.testing.assert_array_equal(on_the_fly.read(0, stored.n_tiles), np.asarray(stored.tiles[:]))
    # any order, any company: the same pixels
    with open_slide(path) as reader:
        grid = grid_from_attrs(stored.attrs, reader)
        picked = stored.grid[[17, 3, 40]]
        np.testing.assert_array_equal(read_tiles(reader, grid, picked), np.asarray(stored.tiles.get_orthogonal_selection(([17, 3, 40],))))
    a = encode_store(tmp_path / "px.zarr", "nic", tmp_path / "a.zarr", dtype="float32", batch_size=16, chunk_tiles=64)
    b = encode_store(tmp_path / "co.zarr", "nic", tmp_path / "b.zarr", dtype="float32", batch_size=16, chunk_tiles=64)
    assert a.slides["s40"].status == b.slides["s40"].status == "ok"
    fa = np.asarray(zarr.open_group(str(tmp_path / "a.zarr" / "s40"), mode="r")["features"][:])
    fb = np.asarray(zarr.open_group(str(tmp_path / "b.zarr" / "s40"), mode="r")["features"][:])
    np.testing.assert_array_equal(fa, fb)
    # the embedding grid holds the padded edge cells too
    emb = zarr.open_group(str(tmp_path / "a.zarr" / "s40"), mode="r")
    rows, cols = stored.attrs["grid_shape"]
    assert emb["grid"].shape[1:] == (rows, cols) and np.asarray(emb["mask"][:])[rows - 1, cols - 1]


def test_ihc_like_tissue_is_found(tmp_path: Path) -> None:
    image, truth = scene("ihc", 800, 600)
    small = np.asarray(Image.fromarray(image).resize((400, 300), Image.Resampling.BOX))
    small_truth = np.asarray(Image.fromarray(truth).resize((400, 300), Image.Resampling.NEAREST))
    mask = detect_tissue(small, 8.0)
    assert _iou(mask.mask, small_truth) > 0.85, "haematoxylin-blue counterstain is not pen ink"
    path = image_slide(tmp_path / "ihc.tif", image, mpp=2.0)
    report = tile_cohort([path], tmp_path / "p.zarr", TileSpec(2.0, 64), workers=1)
    assert [o.status for o in report.outcomes] == ["ok"] and report.outcomes[0].n_tiles > 10


@pytest.mark.parametrize("kind", ["tma", "faint"])
def test_tma_cores_and_faint_tissue_are_found(kind: str) -> None:
    image, truth = scene(kind, 800, 600)
    mask = detect_tissue(image, 8.0)
    assert _iou(mask.mask, truth) > 0.85


def test_blue_pen_is_still_removed() -> None:
    image, truth = scene("ihc", 800, 600)
    image = image.copy()
    image[40:52, 100:700] = (30, 60, 200)
    mask = detect_tissue(image, 8.0)
    assert not mask.mask[40:52, 100:700].any() and mask.ink[40:52, 100:700].mean() > 0.9
    assert _iou(mask.mask, truth) > 0.85


def test_darkfield_slide_is_found_and_padded_black(tmp_path: Path) -> None:
    image, truth = scene("darkfield", W, H)
    mask = detect_tissue(image, 1.0)
    assert mask.method == TISSUE_METHOD_DARKFIELD and _iou(mask.mask, truth) > 0.85
    path = image_slide(tmp_path / "fl.tif", image)
    with open_slide(path) as reader:
        tiling = plan_tiles(reader, TileSpec(0.5, 224), 0.0)
        assert tiling.grid.fill == 0 and tiling.tissue_mask.method == TISSUE_METHOD_DARKFIELD
        corner = read_tiles(reader, tiling.grid, np.array([[4, 4]]))[0]
    assert (corner[4:] == 0).all() and (corner[:, 204:] == 0).all(), "padding is the dark background"


def test_empty_slide_is_reported_empty(tmp_path: Path) -> None:
    image, _ = scene("empty", 800, 600)
    path = image_slide(tmp_path / "glass.tif", image)
    result = CliRunner().invoke(main, ["tile", str(path), "--out", str(tmp_path / "p.zarr"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "0 slide(s) tiled, 1 empty (no tissue found)" in result.output
    assert "glass.tif: no tissue found" in result.output and "--tissue-threshold" in result.output
    status = open_patch_store(tmp_path / "p.zarr").status
    assert status["glass"]["status"] == "empty"
    # a re-run keeps it empty, not ok
    again = tile_cohort([path], tmp_path / "p.zarr", workers=1)
    assert [o.status for o in again.outcomes] == ["skipped"]
    assert open_patch_store(tmp_path / "p.zarr").status["glass"]["status"] == "empty"


def test_slide_mpp_is_a_fallback_unless_forced(tmp_path: Path) -> None:
    small_slide(tmp_path / "in" / "recorded.tif", 1200, 900, mpp=0.5)
    missing = small_slide(tmp_path / "in" / "missing.tif", 1200, 900, mpp=None)
    spec = TileSpec(1.0, 64)

    def attrs(store: Path) -> dict[str, tuple[float, str]]:
        s = open_patch_store(store)
        return {sid: (s[sid].attrs["slide_mpp"], s[sid].attrs["mpp_source"]) for sid in s.slide_ids}

    tile_cohort([tmp_path / "in"], tmp_path / "a.zarr", spec, slide_mpp=0.25, coords_only=True, workers=1)
    assert attrs(tmp_path / "a.zarr") == {"recorded": (0.5, "metadata"), "missing": (0.25, "fallback")}
    tile_cohort([tmp_path / "in"], tmp_path / "b.zarr", spec, slide_mpp=0.25, force_slide_mpp=True, coords_only=True, workers=1)
    assert attrs(tmp_path / "b.zarr") == {"recorded": (0.25, "forced"), "missing": (0.25, "forced")}
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"path,mpp\n{missing},0.3\n")
    tile_cohort([tmp_path / "in"], tmp_path / "c.zarr", spec, slide_mpp_csv=csv, coords_only=True, workers=1)
    assert attrs(tmp_path / "c.zarr") == {"recorded": (0.5, "metadata"), "missing": (0.3, "csv")}
    (tmp_path / "ids.csv").write_text("slide_id,mpp\nrecorded,0.45\n")
    bad = tile_cohort([tmp_path / "in"], tmp_path / "d.zarr", spec, slide_mpp_csv=tmp_path / "ids.csv", coords_only=True, workers=1)
    assert {o.slide_id: o.status for o in bad.outcomes} == {"recorded": "ok", "missing": "failed"}
    assert attrs(tmp_path / "d.zarr")["recorded"] == (0.45, "csv")
    # a re-run with --slide-mpp as a fallback keeps the finished store (the recorded slide is untouched)
    again = tile_cohort([tmp_path / "in"], tmp_path / "a.zarr", spec, slide_mpp=0.25, coords_only=True, workers=1)
    assert {o.status for o in again.outcomes} == {"skipped"}


def test_geojson_and_png_masks_replace_detection(tmp_path: Path) -> None:
    image, _ = scene("edge", W, H)  # detection would find the bottom-right block
    path = image_slide(tmp_path / "masked.tif", image)
    masks = tmp_path / "masks"
    masks.mkdir()
    polygon = [[[0, 0], [448, 0], [448, 448], [0, 448], [0, 0]]]  # level-0 pixels: tiles (0..1, 0..1)
    hole = [[100, 100], [120, 100], [120, 120], [100, 120], [100, 100]]
    document = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [polygon[0], hole]}, "properties": {"objectType": "annotation"}},
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]]},
             "properties": {"classification": {"name": "Ignore*"}}},
        ],
    }  # fmt: skip
    (masks / "masked.tif.geojson").write_text(json.dumps(document))
    report = tile_cohort([path], tmp_path / "g.zarr", TileSpec(0.5, 224), tissue_threshold=0.5, tissue_mask=masks, coords_only=True, workers=1)
    assert [o.status for o in report.outcomes] == ["ok"]
    slide = open_patch_store(tmp_path / "g.zarr")["masked"]
    assert slide.attrs["tissue_method"] == "external-geojson"
    assert sorted(map(tuple, slide.grid.tolist())) == [(0, 1), (1, 0), (1, 1)], "the Ignore* region drops tile (0, 0)"

    png = np.zeros((90, 110), np.uint8)
    png[:, 55:] = 255  # right half of the slide
    Image.fromarray(png).save(masks / "png_masked.png")
    other = image_slide(tmp_path / "png_masked.tif", image)
    tile_cohort([other], tmp_path / "m.zarr", TileSpec(0.5, 224), tissue_threshold=0.5, tissue_mask=masks, coords_only=True, workers=1)
    pslide = open_patch_store(tmp_path / "m.zarr")["png_masked"]
    assert pslide.attrs["tissue_method"] == "external-png" and (pslide.grid[:, 1] >= 2).all() and len(pslide.grid) >= 10

    nomask = image_slide(tmp_path / "nomask.tif", image)
    failed = tile_cohort([nomask], tmp_path / "n.zarr", tissue_mask=masks, coords_only=True, workers=1)
    assert failed.outcomes[0].status == "failed" and "no tissue mask" in (failed.outcomes[0].reason or "")


def test_verbosity_flags_work_after_the_subcommand(tmp_path: Path) -> None:
    assert hoist_verbosity_flags(["tile", "a.svs", "-q", "--out", "x"]) == ["-q", "tile", "a.svs", "--out", "x"]
    assert hoist_verbosity_flags(["tile", "-vv", "--", "-v"]) == ["-vv", "tile", "--", "-v"]
    image, _ = scene("edge", 800, 600)
    path = image_slide(tmp_path / "q.tif", image)
    result = CliRunner().invoke(main, ["tile", str(path), "--out", str(tmp_path / "p.zarr"), "--workers", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert "tiling" not in result.output  # no progress bar
    assert "1 slide(s) tiled" in result.output


@pytest.mark.parametrize("edge", ["pad", "drop"])
def test_grid_from_attrs_rebuilds_the_grid(tmp_path: Path, edge: str) -> None:
    path = small_slide(tmp_path / "g.tif", 1300, 1000, mpp=0.25, level_downsamples=(1, 4))
    tile_cohort([path], tmp_path / "p.zarr", TileSpec(0.7, 100, 80, edge=edge), coords_only=True, workers=1)
    attrs = open_patch_store(tmp_path / "p.zarr")["g"].attrs
    with open_slide(path) as reader:
        planned = plan_tiles(reader, TileSpec(0.7, 100, 80, edge=edge), 0.25).grid
        assert grid_from_attrs(attrs, reader) == planned
    assert grid_from_attrs(attrs) == planned


def test_third_party_warnings_only_with_verbose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import wsi_encoder.pipelines.tile_cohort as tc

    monkeypatch.setenv("PYTHONWARNINGS", "default")  # restored after the test
    original = tc.tile_cohort

    calls = iter(range(10))

    def noisy(*args: object, **kwargs: object) -> object:
        # a new text each call: Python shows a warning once per text and place, and other tests may have run this place
        text = f"return getattr(self, f'parse_{{fmt}}')()  # third-party noise {tmp_path.name}-{next(calls)}"
        warnings.warn(text, UserWarning, stacklevel=1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tc, "tile_cohort", noisy)
    image, _ = scene("edge", 600, 500)
    path = image_slide(tmp_path / "w.tif", image)
    args = ["tile", str(path), "--out", str(tmp_path / "p.zarr"), "--workers", "1", "--coords-only"]
    quiet = CliRunner().invoke(main, args)
    assert quiet.exit_code == 0, quiet.output
    assert "third-party noise" not in quiet.output
    loud = CliRunner().invoke(main, [*args, "--overwrite", "-v"])
    assert loud.exit_code == 0, loud.output
    assert "third-party noise" in loud.output


def test_stores_written_before_edge_tiles_stay_readable(tmp_path: Path) -> None:
    path = small_slide(tmp_path / "old.tif", 900, 700, mpp=0.25, level_downsamples=(1,))
    store = tmp_path / "old.zarr"
    tile_cohort([path], store, TileSpec(0.5, 96, edge="drop"), codec="zstd", workers=1)
    group = zarr.open_group(str(store / "old"), mode="r+")
    # what the previous version wrote: no inside array, none of the new attributes
    shutil.rmtree(store / "old" / "inside")
    attrs = {k: v for k, v in dict(group.attrs).items() if k not in ("edge", "fill", "scale", "level_size", "mpp_source", "n_edge_tiles")}
    group.attrs.clear()
    group.attrs.update(attrs)
    slide = open_patch_store(store)["old"]
    assert (slide.inside == 1).all() and len(slide.inside) == slide.n_tiles
    reread = _SlideTiles(zarr.open_group(str(store / "old"), mode="r"), batch_size=16)
    np.testing.assert_array_equal(reread.read(0, slide.n_tiles), np.asarray(slide.tiles[:]))
    # a re-run with the old grid's settings keeps it; with the new default it asks for --overwrite
    assert {o.status for o in tile_cohort([path], store, TileSpec(0.5, 96, edge="drop"), codec="zstd", workers=1).outcomes} == {"skipped"}
    with pytest.raises(InvalidParameterError, match="edge='drop'"):
        tile_cohort([path], store, TileSpec(0.5, 96), codec="zstd", workers=1)


def test_zstd_shards_written_directly_are_zarrs_own_bytes(tmp_path: Path) -> None:
    from zarr.codecs import ZstdCodec

    from wsi_encoder.io.patch_store import write_tile_chunk

    data = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 3), dtype=np.uint8)
    data[3] = 0  # a tile equal to the fill value is written too
    arrays = []
    for name in ("zarr", "direct"):
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        array = group.create_array(
            "tiles", shape=data.shape, dtype=np.uint8, shards=(4, 8, 8, 3), chunks=(1, 8, 8, 3),
            compressors=ZstdCodec(level=3), fill_value=0,
        ).with_config({"write_empty_chunks": True})  # fmt: skip
        for index in range(3):  # the last shard is partial
            chunk = data[index * 4 : (index + 1) * 4]
            if name == "zarr":
                array[index * 4 : index * 4 + len(chunk)] = chunk
            else:
                write_tile_chunk(array, index, chunk)
        arrays.append(zarr.open_array(str(tmp_path / f"{name}.zarr" / "tiles"), mode="r"))
    for array in arrays:
        np.testing.assert_array_equal(array[:], data)
    for index in range(3):
        key = f"tiles/c/{index}/0/0/0"
        assert (tmp_path / "zarr.zarr" / key).read_bytes() == (tmp_path / "direct.zarr" / key).read_bytes()


def test_jpeg_chunks_written_directly_are_zarrs_own_bytes(tmp_path: Path) -> None:
    from wsi_encoder.io.jpeg_codec import JpegTileCodec
    from wsi_encoder.io.patch_store import write_tile_chunk

    ramp = np.linspace(0, 200, 16, dtype=np.uint8)[None, None, :, None] + np.arange(10, dtype=np.uint8)[:, None, None, None]
    data = np.broadcast_to(ramp, (10, 16, 16, 3)).copy()
    data[..., 1] //= 2
    for name in ("zarr", "direct"):
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        array = group.create_array(
            "tiles", shape=data.shape, dtype=np.uint8, chunks=(4, 16, 16, 3), serializer=JpegTileCodec(quality=85),
            compressors=None, fill_value=0,
        ).with_config({"write_empty_chunks": True})  # fmt: skip
        for index in range(3):  # the last chunk is partial
            chunk = data[index * 4 : (index + 1) * 4]
            if name == "zarr":
                array[index * 4 : index * 4 + len(chunk)] = chunk
            else:
                write_tile_chunk(array, index, chunk)
    for index in range(3):
        key = f"tiles/c/{index}/0/0/0"
        assert (tmp_path / "zarr.zarr" / key).read_bytes() == (tmp_path / "direct.zarr" / key).read_bytes()
    direct = zarr.open_array(str(tmp_path / "direct.zarr" / "tiles"), mode="r")
    np.testing.assert_array_equal(direct[:], zarr.open_array(str(tmp_path / "zarr.zarr" / "tiles"), mode="r")[:])
    assert np.abs(direct[:].astype(int) - data).mean() < 4  # lossy, but these tiles in this order


def test_chunks_done_written_directly_is_zarrs_own_byte(tmp_path: Path) -> None:
    from wsi_encoder.io.patch_store import mark_chunk_done

    arrays = {}
    for name in ("zarr", "direct"):
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        done = group.create_array("chunks_done", shape=(5,), dtype=bool, chunks=(1,), fill_value=False, compressors=None)
        for index in (0, 3):
            if name == "zarr":
                done[index] = True
            else:
                mark_chunk_done(done, index)
        arrays[name] = zarr.open_array(str(tmp_path / f"{name}.zarr" / "chunks_done"), mode="r")
    assert arrays["direct"][:].tolist() == [True, False, False, True, False] == arrays["zarr"][:].tolist()
    for index in (0, 3):
        key = f"chunks_done/c/{index}"
        assert (tmp_path / "zarr.zarr" / key).read_bytes() == (tmp_path / "direct.zarr" / key).read_bytes()


def test_real_fluorescence_ndpi_is_dark_field(ndpi_slide: Path, tmp_path: Path) -> None:
    report = tile_cohort([ndpi_slide], tmp_path / "f.zarr", TileSpec(4.0, 64), coords_only=True, workers=1)
    assert [o.status for o in report.outcomes] == ["ok"] and report.outcomes[0].n_tiles > 5
    slide = open_patch_store(tmp_path / "f.zarr")[ndpi_slide.stem]
    assert slide.attrs["tissue_method"] == TISSUE_METHOD_DARKFIELD and slide.attrs["fill"] == 0
    assert slide.attrs["mpp_source"] == "metadata" and slide.attrs["slide_mpp"] == pytest.approx(0.228, abs=1e-3)


@pytest.mark.parametrize("flat_keys", [True, False])
def test_jpeg_rows_read_directly_are_what_zarr_reads(tmp_path: Path, flat_keys: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_tile_rows gives zarr's pixels for any row range (across chunks, the partial last chunk, a chunk
    never written) on both chunk-key layouts, without zarr's codec; other stores go through zarr."""
    from wsi_encoder.io.jpeg_codec import JpegTileCodec
    from wsi_encoder.io.patch_store import _FLAT_KEYS, read_tile_rows

    rng = np.random.default_rng(2)
    data = np.clip(rng.normal(120, 40, (11, 24, 20, 3)), 0, 255).astype(np.uint8)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    tiles = group.create_array(
        "tiles", shape=data.shape, dtype=np.uint8, chunks=(4, 24, 20, 3), serializer=JpegTileCodec(quality=90),
        compressors=None, fill_value=0, **({"chunk_key_encoding": _FLAT_KEYS} if flat_keys else {}),
    )  # fmt: skip
    tiles[:8] = data[:8]
    tiles[8:] = data[8:]
    (tmp_path / "s.zarr" / "tiles" / tiles.metadata.encode_chunk_key((1, 0, 0, 0))).unlink()  # never written
    expected = tiles[:]
    assert not expected[4:8].any()
    monkeypatch.setattr(JpegTileCodec, "_decode_sync", lambda *a: pytest.fail("decoded through zarr"))
    for start, stop in ((0, 11), (0, 4), (3, 9), (5, 6), (9, 11), (10, 11), (7, 7)):
        np.testing.assert_array_equal(read_tile_rows(tiles, start, stop), expected[start:stop])
    with pytest.raises(StoreError, match=r"rows 5\.\.12"):
        read_tile_rows(tiles, 5, 12)
    last = tmp_path / "s.zarr" / "tiles" / tiles.metadata.encode_chunk_key((2, 0, 0, 0))
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])  # a truncated file is named
    with pytest.raises(StoreError, match="cut short"):
        read_tile_rows(tiles, 9, 11)
    monkeypatch.undo()
    memory = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    other = memory.create_array("tiles", data=data, chunks=(4, 24, 20, 3), serializer=JpegTileCodec(quality=90), compressors=None)
    np.testing.assert_array_equal(read_tile_rows(other, 2, 9), other[2:9])
