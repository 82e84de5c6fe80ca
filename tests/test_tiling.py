"""Tile grids: level choice, tolerance, coordinates, block order, chunk reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from _tile_helpers import small_slide
from PIL import Image

from wsi_encoder.errors import InvalidParameterError, MissingMppError
from wsi_encoder.io.slides import open_slide
from wsi_encoder.io.tiff_regions import TiffTileDecoder
from wsi_encoder.tiling import (
    ReadPart,
    TileSpec,
    block_size_for,
    chunk_parts,
    chunk_tiles_for,
    order_block_major,
    plan_grid,
    read_tiles,
    select_tiles,
)


def test_tile_spec_defaults_and_validation() -> None:
    spec = TileSpec()
    assert (spec.target_mpp, spec.tile_size, spec.stride, spec.tolerance) == (0.5, 224, 224, 0.05)
    assert TileSpec(tile_size=256, stride=128).stride_px == 128
    for bad in ({"target_mpp": 0}, {"tile_size": 4}, {"stride": 0}, {"tolerance": 0.7}, {"target_mpp": float("nan")}):
        with pytest.raises(InvalidParameterError):
            TileSpec(**bad)  # type: ignore[arg-type]


def test_grid_at_the_slides_own_resolution_copies_pixels(synthetic_slide: Path) -> None:
    with open_slide(synthetic_slide) as reader:
        grid = plan_grid(reader, TileSpec(0.5, 256))
    assert (grid.level, grid.scale, grid.resampled, grid.actual_mpp) == (0, 1.0, False, 0.5)
    assert grid.shape == (3072 // 256, 4096 // 256)
    assert grid.tile_size_l0 == grid.stride_l0 == 256
    np.testing.assert_array_equal(grid.coords_l0(np.array([[0, 0], [2, 3]])), [[0, 0], [768, 512]])


def test_tolerance_reads_a_near_level_as_it_is(synthetic_slide_40x: Path) -> None:
    with open_slide(synthetic_slide_40x) as reader:
        at_40x = plan_grid(reader, TileSpec(0.25, 224))
        at_10x = plan_grid(reader, TileSpec(1.0, 224))
        strict = plan_grid(reader, TileSpec(0.25, 224, tolerance=0.0))
    assert (at_40x.level, at_40x.resampled) == (0, False)
    assert at_40x.actual_mpp == pytest.approx(0.2465) and at_40x.spec.target_mpp == 0.25
    assert (at_10x.level, at_10x.resampled) == (1, False)
    assert at_10x.actual_mpp == pytest.approx(0.986, rel=1e-3)
    assert strict.resampled and strict.actual_mpp == 0.25


def test_20x_grid_from_a_40x_only_slide(tmp_path: Path) -> None:
    path = small_slide(tmp_path / "only40x.tif", 3000, 2000, mpp=0.25, level_downsamples=(1,))
    with open_slide(path) as reader:
        assert reader.level_count == 1
        grid = plan_grid(reader, TileSpec(0.5, 224))
    assert (grid.level, grid.scale, grid.resampled, grid.actual_mpp) == (0, 0.5, True, 0.5)
    assert grid.tile_size_l0 == 448
    assert grid.shape == (-(-1000 // 224), -(-1500 // 224))  # edge tiles padded (default)
    with open_slide(path) as reader:
        dropped = plan_grid(reader, TileSpec(0.5, 224, edge="drop"))
    assert dropped.shape == (1000 // 224, 1500 // 224)


def test_missing_mpp_names_the_option(synthetic_slide_no_mpp: Path) -> None:
    with open_slide(synthetic_slide_no_mpp) as reader, pytest.raises(MissingMppError, match="--slide-mpp"):
        plan_grid(reader, TileSpec())
    with open_slide(synthetic_slide_no_mpp, mpp=0.5) as reader:
        assert plan_grid(reader, TileSpec()).slide_mpp == 0.5


def test_chunk_and_block_sizes() -> None:
    assert chunk_tiles_for(224) == 64
    assert chunk_tiles_for(256) == 49
    assert chunk_tiles_for(512) == 9
    assert chunk_tiles_for(4096) == 1


def test_block_size_shrinks_for_large_reads(tmp_path: Path) -> None:
    path = small_slide(tmp_path / "s.tif", 1024, 1024, mpp=0.25, level_downsamples=(1,))
    with open_slide(path) as reader:
        fine = plan_grid(reader, TileSpec(0.5, 224))
        coarse = plan_grid(reader, TileSpec(4.0, 224))
    assert block_size_for(fine, 64) == 8
    assert 1 <= block_size_for(coarse, 64) < 8
    side = block_size_for(coarse, 64)
    assert (side * 224 / coarse.scale) ** 2 <= 4096 * 4096


def test_block_major_order_and_chunk_parts() -> None:
    cells = np.array([(r, c) for r in range(4) for c in range(6)])
    order = order_block_major(cells, 2)
    ordered = cells[order]
    np.testing.assert_array_equal(ordered[:4], [[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(ordered[4:8], [[0, 2], [0, 3], [1, 2], [1, 3]])
    spec = TileSpec(0.5, 10, 10)
    parts = chunk_parts(ordered, 2, 7, 2, spec)
    assert [(p.start, p.stop) for p in parts] == [(2, 4), (4, 7)]
    assert parts[0] == ReadPart(2, 4, u0=0, v0=10, u1=20, v1=20)
    assert parts[1] == ReadPart(4, 7, u0=20, v0=0, u1=40, v1=20)
    assert chunk_parts(ordered, 3, 3, 2, spec) == []


def test_select_tiles_keeps_tissue_in_block_order(synthetic_slide: Path) -> None:
    with open_slide(synthetic_slide) as reader:
        grid = plan_grid(reader, TileSpec(0.5, 256))
    mask = np.zeros((300, 400), dtype=bool)
    mask[:150, :200] = True  # top-left quarter of the slide
    rowcol, tissue, inside = select_tiles(grid, mask, 0.5, 4)
    assert len(rowcol) == 6 * 8
    assert (rowcol[:, 0] < 6).all() and (rowcol[:, 1] < 8).all()
    assert (tissue == 1).all() and (inside == 1).all()
    all_rowcol, all_tissue, _ = select_tiles(grid, mask, 0.0, 4)
    assert len(all_rowcol) == grid.rows * grid.cols
    assert all_tissue.min() == 0
    np.testing.assert_array_equal(all_rowcol[:4], [[0, 0], [0, 1], [0, 2], [0, 3]])


def test_read_tiles_equal_per_tile_reads(synthetic_slide: Path) -> None:
    spec = TileSpec(0.5, 200, 150)
    reader = open_slide(synthetic_slide)
    grid = plan_grid(reader, TileSpec(0.5, 200, 150, edge="drop"))
    spec = grid.spec
    rowcol, _, _ = select_tiles(grid, np.ones((10, 10), bool), 0.0, 3)
    parts = chunk_parts(rowcol, 5, 30, 3, spec)
    tiles = read_tiles(reader, grid, rowcol[5:30], parts)
    coords = grid.coords_l0(rowcol[5:30])
    with open_slide(synthetic_slide, "openslide") as reference:
        for tile, (x, y) in zip(tiles, coords, strict=True):
            np.testing.assert_array_equal(tile, reference.read_region((int(x), int(y)), 0, (200, 200)))
    reader.close()


@pytest.mark.parametrize("name", ["synthetic", "cmu", "ndpi"])
def test_direct_tile_decoding_equals_openslide(name: str, synthetic_slide_40x: Path, cmu_svs: Path, ndpi_slide: Path) -> None:
    path = {"synthetic": synthetic_slide_40x, "cmu": cmu_svs, "ndpi": ndpi_slide}[name]
    fast = open_slide(path)  # auto: tiffslide with direct tile decoding for SVS, TIFF, NDPI
    assert fast.backend == "tiffslide"
    decoder = fast.fast_decoder()
    assert isinstance(decoder, TiffTileDecoder)
    rng = np.random.default_rng(3)
    with open_slide(path, "openslide") as reference:
        for level in range(min(fast.level_count, 3)):
            assert fast.level_dimensions[level] == reference.level_dimensions[level]
            width, height = fast.level_dimensions[level]
            ds = fast.level_downsamples[level]
            for _ in range(3):
                x, y = int(rng.integers(-50, width - 10)), int(rng.integers(-50, height - 10))
                w, h = int(rng.integers(1, 400)), int(rng.integers(1, 400))
                got = decoder.read(level, x, y, w, h)
                # tiffslide's own read path gives the same pixels at every level (inside the slide) ...
                ix, iy = min(max(x, 0), width - w), min(max(y, 0), height - h)
                if ix >= 0 and iy >= 0:
                    inside = fast.read_region((int(np.ceil(ix * ds)), int(np.ceil(iy * ds))), level, (w, h))
                    np.testing.assert_array_equal(decoder.read(level, ix, iy, w, h), inside)
                # ... and OpenSlide too wherever level pixels sit on integer level-0 positions (OpenSlide
                # interpolates at a sub-pixel offset on levels with a fractional downsample such as 15.99).
                if ds == int(ds):
                    np.testing.assert_array_equal(got, reference.read_level(level, x, y, w, h))
                    np.testing.assert_array_equal(got, fast.read_level(level, x, y, w, h))
    fast.close()


@pytest.mark.parametrize("name", ["synthetic", "cmu", "ndpi"])
def test_tiles_decoded_into_the_chunk_equal_the_region_path(
    name: str, synthetic_slide: Path, cmu_svs: Path, ndpi_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct path (each TIFF tile copied once, straight into its output tile) gives the region path's
    pixels, on source tiles that do and do not line up with the grid, at the slide's edges and with a fill."""
    path = {"synthetic": synthetic_slide, "cmu": cmu_svs, "ndpi": ndpi_slide}[name]
    reader = open_slide(path)
    assert reader.reads_into
    for fill, stride in ((255, None), (0, 150)):
        grid = plan_grid(reader, TileSpec(reader.require_mpp(), 200, stride))
        grid = dataclasses.replace(grid, fill=fill)
        rowcol = np.array([[r, c] for r in range(grid.rows) for c in range(grid.cols)])[-40:]  # the last rows: edges
        direct = read_tiles(reader, grid, rowcol)
        with monkeypatch.context() as patch:
            patch.setattr(type(reader), "reads_into", property(lambda self: False))
            region = read_tiles(reader, grid, rowcol)
        np.testing.assert_array_equal(direct, region)
        out = np.zeros((30, 50, 3), np.uint8)
        width, height = reader.level_dimensions[0]
        reader.read_level_into(0, width - 20, height - 10, out, fill=fill)
        np.testing.assert_array_equal(out, reader.read_level(0, width - 20, height - 10, 50, 30, fill=fill))
    reader.close()


@pytest.mark.parametrize("name", ["synthetic", "cmu"])
def test_grid_tiles_on_the_files_tiles_are_decoded_straight_into_the_output(
    name: str, synthetic_slide: Path, cmu_svs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grid whose tiles are the file's JPEG tiles is decoded into the output tiles (no second copy), with
    tiffslide's and OpenSlide's pixels; a decode whose colours differed from tifffile's is not used."""
    import imagecodecs

    path = {"synthetic": synthetic_slide, "cmu": cmu_svs}[name]
    reader = open_slide(path)
    decoder = reader.fast_decoder()
    assert isinstance(decoder, TiffTileDecoder)
    size = decoder._levels[0].chunk_w
    grid = plan_grid(reader, TileSpec(reader.require_mpp(), size))
    rowcol = np.array([[r, c] for r in range(grid.rows) for c in range(grid.cols)])
    calls: list[bool] = []
    original = imagecodecs.jpeg_decode

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("out") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(imagecodecs, "jpeg_decode", spy)
    tiles = read_tiles(reader, grid, rowcol)
    inside = grid.inside_fractions(rowcol) == 1.0
    assert sum(calls) >= inside.sum() > 0  # every whole tile went straight into its output tile
    with open_slide(path, "openslide") as reference:
        for tile, (x, y), whole in zip(tiles, grid.coords_l0(rowcol), inside, strict=True):
            if whole:
                np.testing.assert_array_equal(tile, reader.read_region((int(x), int(y)), 0, (size, size)))
                np.testing.assert_array_equal(tile, reference.read_region((int(x), int(y)), 0, (size, size)))
    # A level whose direct decode differs from tifffile's (here: one pixel off) is copied instead.
    reader.close()

    def off_by_one(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        if kwargs.get("out") is not None:
            kwargs["out"][0, 0, 0] ^= 1  # type: ignore[index]
        return result

    monkeypatch.setattr(imagecodecs, "jpeg_decode", off_by_one)
    fresh = TiffTileDecoder(path, 0, reader.level_dimensions)
    assert fresh._levels[0].jpeg is not None
    out = np.zeros((size, size, 3), np.uint8)
    fresh.read(0, size, 0, size, size, out=out)
    np.testing.assert_array_equal(out, tiles[1])
    assert fresh._levels[0].jpeg is None
    fresh.close()


def test_thumbnails_read_in_bands_equal_one_read(synthetic_slide: Path, cmu_svs: Path) -> None:
    """The thumbnail's level, read in row bands on several threads, is the one-read Lanczos thumbnail exactly."""
    from wsi_encoder.tiling import read_thumbnail

    for path in (synthetic_slide, cmu_svs):
        with open_slide(path) as reader:
            for side in (300, 777, 1024):
                w0, h0 = reader.dimensions
                factor = max(w0, h0) / side
                size = (max(1, round(w0 / factor)), max(1, round(h0 / factor)))
                level = max(k for k in range(reader.level_count) if min(np.subtract(reader.level_dimensions[k], size)) >= 0)
                lw, lh = reader.level_dimensions[level]
                one_read = Image.fromarray(reader.read_level(level, 0, 0, lw, lh))
                expected = np.asarray(one_read.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
                np.testing.assert_array_equal(read_thumbnail(reader, side), expected)
