"""Generated labelled datasets in the public datasets' real on-disk layouts, for the training tests.

* Kather NCT-CRC-HE-100K: ``ROOT/<ADI|BACK|...>/<CLASS>-<8 letters>.tif`` RGB TIFFs.
* PatchCamelyon: ``camelyonpatch_level_2_split_<split>_{x,y}.h5`` with datasets ``x`` (N, 96, 96, 3)
  uint8 and ``y`` (N, 1, 1, 1) uint8, optional ``*_meta.csv`` (``,coord_y,coord_x,tumor_patch,
  center_tumor_patch,wsi``).
* Patch store: a ``wsienc tile`` store written with plain zarr following the contract.

Each class gets its own mean colour and stripe frequency, so a tiny CNN can learn it in a few steps.
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import numpy.typing as npt
import tifffile
import zarr

KATHER = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


def class_image(label: int, size: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """A tissue-like RGB image whose colour and texture depend on ``label``."""
    hue = np.array([[200, 120, 190], [120, 60, 150], [240, 200, 220], [90, 40, 120], [170, 150, 210]])
    base = hue[label % len(hue)].astype(float)
    yy, xx = np.mgrid[0:size, 0:size]
    freq = 2 + 3 * (label % 4)
    stripes = np.sin(2 * np.pi * freq * (xx + yy * (label % 2)) / size)[..., None] * 30
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(base + stripes + noise, 0, 255).astype(np.uint8)


def make_kather(root: Path, n_per_class: int = 4, size: int = 64, classes: tuple[str, ...] = KATHER, seed: int = 0) -> Path:
    """Write an NCT-CRC-HE-100K-style folder-per-class tree of .tif images."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            name = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 8))
            tifffile.imwrite(folder / f"{cls}-{name}{i}.tif", class_image(KATHER.index(cls), size, rng))
    return root


def make_pcam(
    root: Path,
    splits: dict[str, int] | None = None,
    *,
    meta: bool = False,
    wsis_per_split: int = 4,
    seed: int = 0,
    size: int = 96,
) -> Path:
    """Write PCam-layout .h5 files (alternating labels) and optionally the meta CSVs."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (splits or {"train": 16}).items():
        y = (np.arange(n) % 2).astype(np.uint8)
        x = np.stack([class_image(int(v) * 3, size, rng) for v in y])
        prefix = root / f"camelyonpatch_level_2_split_{split}"
        with h5py.File(f"{prefix}_x.h5", "w") as f:
            f.create_dataset("x", data=x, chunks=(1, size, size, 3))
        with h5py.File(f"{prefix}_y.h5", "w") as f:
            f.create_dataset("y", data=y.reshape(n, 1, 1, 1))
        if meta:
            with open(f"{prefix}_meta.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
                for i in range(n):
                    wsi = f"{split}_slide_{i % wsis_per_split}"
                    w.writerow([i, 10 * i, 20 * i, bool(y[i]), bool(y[i]), wsi])
    return root


def make_patch_store(
    store: Path,
    slides: dict[str, list[int]],
    *,
    tile_size: int = 64,
    actual_mpp: float = 0.5,
    incomplete: tuple[str, ...] = (),
    coords_only: tuple[str, ...] = (),
    failed: dict[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """A contract patch store: ``slides[slide_id]`` lists the class of each tile (drives its pixels)."""
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(store), mode="w")
    status: dict[str, dict[str, object]] = {}
    for sid, tile_classes in slides.items():
        n = len(tile_classes)
        g = root.create_group(sid)
        cols = 4
        grid = np.array([(i // cols, i % cols) for i in range(n)], dtype=np.int32).reshape(-1, 2)
        coords = (grid[:, ::-1].astype(np.int64) * tile_size * 2).reshape(-1, 2)
        if sid not in coords_only:
            tiles = np.stack([class_image(c, tile_size, rng) for c in tile_classes])
            g.create_array("tiles", data=tiles, chunks=(4, tile_size, tile_size, 3))
        g.create_array("coords", data=coords)
        g.create_array("grid", data=grid)
        g.create_array("tissue", data=np.ones(n, dtype=np.float32))
        g.attrs.update(
            {
                "source": f"/data/{sid}.tif",
                "target_mpp": actual_mpp,
                "actual_mpp": actual_mpp,
                "tile_size": tile_size,
                "coords_only": sid in coords_only,
                "complete": sid not in incomplete,
            }
        )
        status[sid] = {"status": "ok", "reason": None, "source": f"/data/{sid}.tif"}
    for sid, reason in (failed or {}).items():
        status[sid] = {"status": "failed", "reason": reason, "source": f"/data/{sid}.tif"}
    root.attrs.update({"kind": "patch_store", "slides": status})
    return store


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    """A small CSV file."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path
