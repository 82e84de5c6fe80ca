"""Helpers for the encode tests: small patch stores written directly with zarr, following the contract.

These stores are made the way a third party would make them (plain zarr, the documented layout),
so the encoder is tested against the contract rather than against ``wsienc tile``'s writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zarr

from wsi_encoder.io.slides import open_slide
from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide


@dataclass(frozen=True)
class StoreSlide:
    """A slide to put in a test patch store: tiles of ``tile_size`` px read at level 0 of ``path``."""

    slide_id: str
    path: Path


def make_slide(directory: Path, name: str, *, width: int = 1024, height: int = 768, seed: int = 0) -> Path:
    """A small synthetic pyramidal TIFF at 0.5 µm/px."""
    spec = SyntheticSlideSpec(width=width, height=height, mpp=0.5, seed=seed, pieces=2, tile_size=256)
    return write_synthetic_slide(directory / f"{name}.tif", spec)


def _tissue_tiles(
    path: Path, tile_size: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int32], tuple[int, int], dict[str, object]]:
    with open_slide(path) as reader:
        width, height = reader.dimensions
        rows, cols = height // tile_size, width // tile_size
        tiles, coords, grid = [], [], []
        for r in range(rows):
            for c in range(cols):
                x, y = c * tile_size, r * tile_size
                tile = reader.read_region((x, y), 0, (tile_size, tile_size))
                if tile.mean() < 235:  # crude tissue test: not blank glass
                    tiles.append(tile)
                    coords.append((x, y))
                    grid.append((r, c))
        thumb = reader.get_thumbnail(128)
        meta = {
            "source": str(Path(path).resolve()),
            "backend": reader.backend,
            "vendor": reader.vendor,
            "width": int(width),
            "height": int(height),
            "slide_mpp": reader.require_mpp(),
            "objective_power": reader.objective_power,
        }
    arr = np.stack(tiles) if tiles else np.zeros((0, tile_size, tile_size, 3), np.uint8)
    return (
        arr,
        np.asarray(coords, dtype=np.int64).reshape(-1, 2),
        np.asarray(grid, dtype=np.int32).reshape(-1, 2),
        (rows, cols),
        {**meta, "thumbnail": thumb},
    )


def write_patch_store(
    store: Path,
    slides: list[StoreSlide],
    *,
    tile_size: int = 128,
    coords_only: bool = False,
    chunk_rows: int = 8,
    failed: dict[str, str] | None = None,
    incomplete: tuple[str, ...] = (),
) -> Path:
    """Write a contract patch store at ``store`` from level-0 tiles of the given slides.

    Tiles are lossless (zstd), so a coords-only store of the same slides yields identical pixels.
    ``failed`` adds root status records of slides whose tiling failed (no group);
    ``incomplete`` slides are written with ``complete = False``.
    """
    root = zarr.open_group(str(store), mode="w")
    status: dict[str, dict[str, object]] = {}
    for slide in slides:
        tiles, coords, grid, grid_shape, meta = _tissue_tiles(slide.path, tile_size)
        thumbnail = meta.pop("thumbnail")
        group = root.create_group(slide.slide_id)
        n = coords.shape[0]
        if not coords_only:
            group.create_array("tiles", data=tiles, chunks=(chunk_rows, tile_size, tile_size, 3))
        group.create_array("coords", data=coords)
        group.create_array("grid", data=grid)
        group.create_array("tissue", data=np.ones(n, dtype=np.float32))
        group.create_array("thumbnail", data=np.asarray(thumbnail))
        group.create_array("tissue_mask", data=np.asarray(thumbnail).mean(axis=2) < 235)
        group.attrs.update(
            {
                **meta,
                "target_mpp": 0.5,
                "actual_mpp": 0.5,
                "tile_size": tile_size,
                "stride": tile_size,
                "tile_size_l0": float(tile_size),
                "stride_l0": float(tile_size),
                "level": 0,
                "resampled": False,
                "grid_shape": list(grid_shape),
                "tissue_method": "test-mean",
                "tissue_threshold": 0.5,
                "codec": None if coords_only else "zstd",
                "coords_only": coords_only,
                "wsi_encoder_version": "test",
                "complete": slide.slide_id not in incomplete,
            }
        )
        status[slide.slide_id] = {"status": "ok", "reason": None, "source": meta["source"]}
    for slide_id, reason in (failed or {}).items():
        status[slide_id] = {"status": "failed", "reason": reason, "source": f"/nowhere/{slide_id}.svs"}
    root.attrs.update({"kind": "patch_store", "slides": status})
    return store


def random_patch_store(
    store: Path, n_tiles: int, grid_shape: tuple[int, int], *, tile_size: int = 128, seed: int = 0, slide_ids: tuple[str, ...] = ("rand",)
) -> Path:
    """A patch store of random tiles at random distinct grid cells, one group per id of ``slide_ids``."""
    rng = np.random.default_rng(seed)
    rows, cols = grid_shape
    root = zarr.open_group(str(store), mode="w")
    status = {}
    for slide_id in slide_ids:
        cells = np.sort(rng.choice(rows * cols, size=n_tiles, replace=False))
        grid = np.stack([cells // cols, cells % cols], axis=1).astype(np.int32)
        group = root.create_group(slide_id)
        tiles = rng.integers(0, 256, (n_tiles, tile_size, tile_size, 3), dtype=np.uint8)
        group.create_array("tiles", data=tiles, chunks=(16, tile_size, tile_size, 3))
        group.create_array("coords", data=(grid[:, ::-1].astype(np.int64) * tile_size))
        group.create_array("grid", data=grid)
        group.create_array("thumbnail", data=np.full((rows, cols, 3), 240, dtype=np.uint8))
        source = f"/nowhere/{slide_id}.svs"
        group.attrs.update(
            {
                "source": source, "backend": "tiffslide", "width": cols * tile_size, "height": rows * tile_size,
                "slide_mpp": 0.5, "target_mpp": 0.5, "actual_mpp": 0.5, "tile_size": tile_size, "stride": tile_size,
                "tile_size_l0": float(tile_size), "stride_l0": float(tile_size), "level": 0, "resampled": False,
                "grid_shape": [rows, cols], "codec": "zstd", "coords_only": False, "complete": True,
            }
        )  # fmt: skip
        status[slide_id] = {"status": "ok", "reason": None, "source": source}
    root.attrs.update({"kind": "patch_store", "slides": status})
    return store
