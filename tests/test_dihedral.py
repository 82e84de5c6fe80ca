"""`encode --dihedral`: every tile in its 8 views, and view v's grid equal to the grid of the slide rotated as v."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.errors import StoreError
from wsi_encoder.io.embedding_store import EmbeddingStore
from wsi_encoder.io.slide_records import DIHEDRAL_VIEWS, dihedral_cells
from wsi_encoder.models.dihedral import dihedral_view

T = 128


def numpy_view(a: np.ndarray, v: int) -> np.ndarray:
    """The documented order, on the first two axes of ``a``."""
    return np.rot90(a, v) if v < 4 else np.rot90(np.fliplr(a), v - 4)


@pytest.mark.parametrize("v", range(DIHEDRAL_VIEWS))
def test_cells_move_as_the_grid_does(v: int) -> None:
    rows, cols = 3, 5
    ids = np.arange(rows * cols).reshape(rows, cols)
    rowcol = np.argwhere(ids >= 0)
    moved, shape = dihedral_cells(rowcol, (rows, cols), v)
    turned = numpy_view(ids, v)
    assert turned.shape == shape
    np.testing.assert_array_equal(turned[moved[:, 0], moved[:, 1]], ids[rowcol[:, 0], rowcol[:, 1]])


@pytest.mark.parametrize("v", range(DIHEDRAL_VIEWS))
def test_torch_views_are_the_numpy_views(v: int) -> None:
    tiles = np.random.default_rng(v).integers(0, 255, (2, 6, 6, 3), dtype=np.uint8)
    ours = dihedral_view(torch.from_numpy(tiles).permute(0, 3, 1, 2), v).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, np.stack([numpy_view(t, v) for t in tiles]))
    assert len({dihedral_view(torch.arange(9).view(1, 1, 3, 3), w).flatten().tolist().__str__() for w in range(8)}) == 8


def _patch_store(path: Path, image: np.ndarray, cells: np.ndarray) -> Path:
    """A contract patch store holding the tiles of ``image`` at ``cells`` ((row, col), level 0, stride T)."""
    rows, cols = image.shape[0] // T, image.shape[1] // T
    root = zarr.open_group(str(path), mode="w")
    group = root.create_group("s")
    tiles = np.stack([image[r * T : (r + 1) * T, c * T : (c + 1) * T] for r, c in cells])
    group.create_array("tiles", data=tiles, chunks=(4, T, T, 3))
    group.create_array("coords", data=(cells[:, ::-1] * T).astype(np.int64))
    group.create_array("grid", data=cells.astype(np.int32))
    group.create_array("thumbnail", data=np.full((rows, cols, 3), 240, dtype=np.uint8))
    group.attrs.update(
        {
            "source": "/nowhere/s.svs", "backend": "tiffslide", "width": cols * T, "height": rows * T, "slide_mpp": 0.5,
            "target_mpp": 0.5, "actual_mpp": 0.5, "tile_size": T, "stride": T, "tile_size_l0": float(T),
            "stride_l0": float(T), "level": 0, "resampled": False, "grid_shape": [rows, cols], "codec": "zstd",
            "coords_only": False, "complete": True,
        }
    )  # fmt: skip
    root.attrs.update({"kind": "patch_store", "slides": {"s": {"status": "ok", "reason": None, "source": "/nowhere/s.svs"}}})
    return path


def _encode(patches: Path, out: Path, *extra: str) -> str:
    args = ["encode", str(patches), "--encoder", "nic-multitask-4", "--out", str(out), "--dtype", "float32",
            "--chunk-tiles", "4", "--batch-size", "3", *extra]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_view_grids_equal_the_rotated_slide_encoded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows, cols = 3, 4
    yy, xx = np.mgrid[0 : rows * T, 0 : cols * T]
    image = np.stack([(xx * 0.7 + 40 * np.sin(yy / 9.0)) % 255, (yy * 0.5 + xx * 0.2) % 255, (xx * yy / 97.0) % 255], axis=2)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)  # no symmetry left
    cells = np.array([(0, 0), (0, 3), (1, 1), (2, 0), (2, 2)])
    _encode(_patch_store(tmp_path / "p.zarr", image, cells), tmp_path / "e.zarr", "--dihedral")
    store = EmbeddingStore.open(tmp_path / "e.zarr")
    assert store.has_dihedral("s") and store.attrs("s")["dihedral"]["views"] == 8
    bag = store.load("s", dihedral=True)
    assert bag.dihedral is not None and bag.dihedral.shape == (8, len(cells), 128)
    np.testing.assert_array_equal(bag.dihedral[0], bag.features)
    for v in range(DIHEDRAL_VIEWS):
        turned = np.ascontiguousarray(numpy_view(image, v))
        moved, _ = dihedral_cells(cells, (rows, cols), v)
        _encode(_patch_store(tmp_path / f"p{v}.zarr", turned, moved), tmp_path / f"e{v}.zarr")
        direct = EmbeddingStore.open(tmp_path / f"e{v}.zarr").load("s")
        np.testing.assert_allclose(store.dihedral_grid("s", v), direct.grid(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(bag.dihedral[1], bag.dihedral[0], atol=1e-3)  # the encoder is not rotation-invariant


def test_no_views_is_a_clear_error_and_a_plain_store_is_not_silently_reused(tmp_path: Path) -> None:
    image = np.random.default_rng(1).integers(0, 255, (2 * T, 2 * T, 3), dtype=np.uint8)
    patches = _patch_store(tmp_path / "p.zarr", image, np.array([(0, 0), (1, 1)]))
    _encode(patches, tmp_path / "e.zarr")
    store = EmbeddingStore.open(tmp_path / "e.zarr")
    assert not store.has_dihedral("s")
    with pytest.raises(StoreError, match="--dihedral"):
        store.load("s", dihedral=True)
    result = CliRunner().invoke(main, ["encode", str(patches), "--encoder", "nic-multitask-4", "--out", str(tmp_path / "e.zarr"),
                                       "--dtype", "float32", "--dihedral"])  # fmt: skip
    assert result.exit_code != 0 and "without --dihedral" in result.output
    _encode(patches, tmp_path / "e.zarr", "--dihedral", "--overwrite")
    assert EmbeddingStore.open(tmp_path / "e.zarr").has_dihedral("s")
