"""Generated embedding stores (written with plain zarr to the store contract) for the classify tests.

A cohort has patients with one or more slides; every slide is a small grid of tissue tiles whose
features are standard normal noise, plus a per-patient offset (``patient_effect``) shared by all the
patient's slides. Slides of a non-negative class carry a "lesion": a disk of tiles whose features are
shifted by ``shift`` along a few dimensions (a different set per class), a learnable slide-level signal
that only a few tiles hold.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

ENCODER = {"name": "fixture-encoder", "config": {"dim": None}, "weights_sha256": "f" * 64}


@dataclass(frozen=True)
class FixtureSlide:
    """One generated slide: ids, label, grid and the lesion cells (ground truth for heatmaps)."""

    slide_id: str
    patient_id: str
    label: str
    grid_shape: tuple[int, int]
    lesion: np.ndarray  # (R, Q) bool


@dataclass(frozen=True)
class FixtureCohort:
    """A written store, its labels CSV and the slides."""

    store: Path
    labels_csv: Path
    slides: tuple[FixtureSlide, ...]
    dim: int

    def by_id(self) -> dict[str, FixtureSlide]:
        return {s.slide_id: s for s in self.slides}


def _tissue_mask(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    rr, cc = np.mgrid[:rows, :cols]
    cy, cx = rows / 2 + rng.uniform(-1, 1), cols / 2 + rng.uniform(-1, 1)
    ry, rx = rows * rng.uniform(0.36, 0.46), cols * rng.uniform(0.36, 0.46)
    return ((rr - cy) / ry) ** 2 + ((cc - cx) / rx) ** 2 <= 1.0


def write_slide(
    root: zarr.Group,
    slide_id: str,
    features: np.ndarray,
    rowcol: np.ndarray,
    grid_shape: tuple[int, int],
    *,
    complete: bool = True,
    encoder: dict | None = None,
    stride_l0: float = 448.0,
    origin_l0: tuple[float, float] = (100.0, 60.0),
    cell_px: int = 6,
    record_size: bool = True,
) -> None:
    """Write one slide group to the embedding-store contract (``record_size``: include width/height attrs)."""
    rows, cols = grid_shape
    dim = features.shape[1]
    group = root.create_group(slide_id, overwrite=True)
    feats = features.astype(np.float16)
    grid = np.zeros((dim, rows, cols), dtype=np.float16)
    grid[:, rowcol[:, 0], rowcol[:, 1]] = feats.T
    mask = np.zeros((rows, cols), dtype=bool)
    mask[rowcol[:, 0], rowcol[:, 1]] = True
    coords = np.stack([origin_l0[0] + rowcol[:, 1] * stride_l0, origin_l0[1] + rowcol[:, 0] * stride_l0], 1)
    # A thumbnail covering the slide (origin + grid + a partial step), pink where tissue is.
    width_l0 = origin_l0[0] + cols * stride_l0 + stride_l0 / 3
    height_l0 = origin_l0[1] + rows * stride_l0 + stride_l0 / 3
    scale = cell_px / stride_l0
    thumb = np.full((round(height_l0 * scale), round(width_l0 * scale), 3), 245, dtype=np.uint8)
    for r, c in rowcol:
        y0, x0 = round((origin_l0[1] + r * stride_l0) * scale), round((origin_l0[0] + c * stride_l0) * scale)
        thumb[y0 : y0 + cell_px, x0 : x0 + cell_px] = (214, 140, 190)
    group.create_array("features", data=feats)
    group.create_array("coords", data=coords.astype(np.int64))
    group.create_array("rowcol", data=rowcol.astype(np.int32))
    group.create_array("grid", data=grid)
    group.create_array("mask", data=mask)
    group.create_array("thumbnail", data=thumb)
    group.attrs.update(
        {
            "encoder": encoder or ENCODER,
            "embedding_dim": dim,
            "patch_store": "",
            "source": f"/slides/{slide_id}.svs",
            "target_mpp": 0.5,
            "tile_size": 224,
            "tile_size_l0": stride_l0,
            "stride_l0": stride_l0,
            "grid_shape": [rows, cols],
            "complete": complete,
        }
    )
    if record_size:  # `wsienc encode` copies the slide's level-0 size from the patch store
        group.attrs.update({"width": round(width_l0), "height": round(height_l0)})


def write_cohort(
    out_dir: Path,
    *,
    n_patients: int = 24,
    slides_per_patient: tuple[int, ...] = (1, 2),
    classes: tuple[str, ...] = ("normal", "lesion"),
    dim: int = 16,
    grid: tuple[int, int] = (16, 16),
    shift: float = 3.0,
    signal_dims: int = 3,
    lesion_radius: float = 1.8,
    patient_effect: float = 0.0,
    seed: int = 0,
    name: str = "embeddings.zarr",
) -> FixtureCohort:
    """Write a cohort store and ``labels.csv`` (``slide_id,label,patient_id``) into ``out_dir``.

    Patients cycle through ``classes`` (balanced) and have ``slides_per_patient[(i // n_classes) % len]`` slides each.
    """
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / name
    root = zarr.open_group(str(store), mode="w")
    slides: list[FixtureSlide] = []
    status = {}
    for p in range(n_patients):
        patient = f"P{p:03d}"
        class_index = p % len(classes)
        offset = rng.normal(0, patient_effect, dim) if patient_effect else np.zeros(dim)
        for s in range(slides_per_patient[(p // len(classes)) % len(slides_per_patient)]):
            slide_id = f"{patient}_S{s}"
            rows = grid[0] + int(rng.integers(-2, 3))
            cols = grid[1] + int(rng.integers(-2, 3))
            mask = _tissue_mask(rng, rows, cols)
            rowcol = np.argwhere(mask)
            features = rng.normal(0, 1, (len(rowcol), dim)) + offset
            lesion = np.zeros((rows, cols), dtype=bool)
            if class_index > 0:
                center = rowcol[rng.integers(len(rowcol))]
                near = np.hypot(*(rowcol - center).T) <= lesion_radius
                dims = slice((class_index - 1) * signal_dims, class_index * signal_dims)
                features[near, dims] += shift
                lesion[rowcol[near, 0], rowcol[near, 1]] = True
            write_slide(root, slide_id, features, rowcol, (rows, cols))
            status[slide_id] = {"status": "ok", "reason": None, "source": f"/slides/{slide_id}.svs"}
            slides.append(FixtureSlide(slide_id, patient, classes[class_index], (rows, cols), lesion))
    root.attrs.update({"kind": "embedding_store", "slides": status})
    labels_csv = out_dir / "labels.csv"
    write_labels(labels_csv, [(s.slide_id, s.label, s.patient_id) for s in slides], ("slide_id", "label", "patient_id"))
    return FixtureCohort(store, labels_csv, tuple(slides), dim)


def write_labels(path: Path, rows: list[tuple], header: tuple[str, ...] = ("slide_id", "label", "patient_id")) -> Path:
    """Write a labels CSV."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


_COHORTS: dict[str, FixtureCohort] = {}

#: Small, fast model settings for tests (the defaults are sized for real cohorts).
FAST = {
    "linear": {},
    "abmil": {"epochs": 40, "batch_size": 4, "hidden": 32, "attention_dim": 16},
    "gridcnn": {"epochs": 40, "batch_size": 4, "width": 32, "depth": 3},
}


def cached_cohort(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: object) -> FixtureCohort:
    """A cohort written once per test session (shared by the classify test modules)."""
    if name not in _COHORTS:
        _COHORTS[name] = write_cohort(tmp_path_factory.getbasetemp() / f"classify_{name}", **kwargs)  # type: ignore[arg-type]
    return _COHORTS[name]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread (two cores are shared; spinning OpenMP threads waste them), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
