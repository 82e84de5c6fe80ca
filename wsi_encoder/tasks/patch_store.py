"""The ``patch-store`` task: tiles of a ``wsienc tile`` store, labelled per slide or per tile by a CSV.

Usage: ``--task patch-store=patches.zarr,labels=labels.csv``. The labels CSV has a header and one
of three shapes (extra columns are ignored):

``slide_id,label``
    Per-slide labels: every tile of the slide gets the slide's label.
``slide_id,tile_index,label``
    Per-tile labels by row of the slide's ``tiles``/``coords`` arrays (0-based).
``slide_id,x,y,label``
    Per-tile labels by the tile's level-0 top-left corner, as in the store's ``coords``.

An optional ``group`` (or ``patient_id``) column names the patient for patient-disjoint splits;
without it the slide id is the group. Rows with an empty label are skipped. Slides that are missing,
failed, incomplete or stored without pixels (``--coords-only``) are reported and skipped; tile rows
that match no tile are counted and skipped. The tiles' µm/px is the store's ``actual_mpp``.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from wsi_encoder.errors import DatasetError, StoreError
from wsi_encoder.io.patch_store import PatchStore, open_patch_store
from wsi_encoder.tasks.data import PatchStoreTiles, TaskData, labels_to_indices
from wsi_encoder.tasks.registry import register_task

log = logging.getLogger(__name__)


def _read_labels(labels: Path) -> tuple[str, list[dict[str, str]]]:
    if not labels.is_file():
        raise DatasetError(f"labels CSV {str(labels)!r} does not exist")
    try:
        with open(labels, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read labels CSV {str(labels)!r}: {exc}") from exc
    if "slide_id" not in header or "label" not in header:
        raise DatasetError(
            f"{str(labels)!r}: the header needs slide_id and label (and tile_index, or x and y, for "
            f"per-tile labels); found {header}"
        )
    mode = "tile_index" if "tile_index" in header else "xy" if {"x", "y"} <= set(header) else "slide"
    return mode, rows


def _open_store(path: Path) -> PatchStore:
    try:
        return open_patch_store(path)
    except StoreError as exc:
        raise DatasetError(str(exc)) from exc


def _slide_problem(store: PatchStore, sid: str) -> str | None:
    status = store.status.get(sid, {})
    if status.get("status") == "failed":
        return f"tiling failed ({status.get('reason')})"
    if sid not in store:
        return "not in the store"
    slide = store[sid]
    if not slide.complete:
        return "incomplete (re-run wsienc tile to finish it)"
    if slide.attrs.get("coords_only", False) or slide.tiles is None:
        return "stored without pixels (--coords-only); re-tile it with pixels"
    return None


def _int(value: str, what: str, where: str) -> int:
    try:
        return int(float(value))
    except ValueError as exc:
        raise DatasetError(f"{where}: {what} {value!r} is not an integer") from exc


@register_task(
    "patch-store",
    description="Tiles of a `wsienc tile` patch store with per-slide or per-tile labels from a CSV",
    layout=(
        "STORE.zarr from wsienc tile, with labels=LABELS.csv: slide_id,label (per slide) or "
        "slide_id,tile_index,label or slide_id,x,y,label (per tile) [,group|patient_id]"
    ),
)
def patch_store_task(path: Path, *, labels: str | None = None) -> TaskData:
    """Load labelled tiles from a patch store (see the module docstring for the CSV shapes)."""
    if labels is None:
        raise DatasetError(
            f"task 'patch-store' needs a labels CSV: --task patch-store={path},labels=LABELS.csv "
            "(slide_id,label or slide_id,tile_index,label or slide_id,x,y,label)"
        )
    labels_path = Path(labels).expanduser()
    mode, rows = _read_labels(labels_path)
    root = _open_store(path)
    by_slide: dict[str, list[tuple[int, dict[str, str]]]] = defaultdict(list)
    for line, row in enumerate(rows, start=2):
        if row.get("slide_id") and row.get("label"):
            by_slide[row["slide_id"]].append((line, row))
    slide_ids: list[str] = []
    tile_rows: list[np.ndarray] = []
    label_list: list[str] = []
    groups: list[str] = []
    mpps: list[float] = []
    skipped_slides: dict[str, str] = {}
    unmatched = 0
    for sid, entries in by_slide.items():
        problem = _slide_problem(root, sid)
        if problem is not None:
            skipped_slides[sid] = problem
            continue
        slide = root[sid]
        n = slide.n_tiles
        mpp = float(slide.attrs.get("actual_mpp") or np.nan)
        if mode == "slide":
            line, row = entries[-1]
            rows_here = np.arange(n, dtype=np.int64)
            labels_here = [row["label"]] * n
            groups_here = [row.get("group") or row.get("patient_id") or sid] * n
        else:
            lookup: dict[tuple[int, int], int] = {}
            if mode == "xy":
                lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(slide.coords)}
            picked: list[int] = []
            labels_here, groups_here = [], []
            for line, row in entries:
                where = f"{labels_path}:{line}"
                if mode == "tile_index":
                    i = _int(row.get("tile_index", ""), "tile_index", where)
                    ok = 0 <= i < n
                else:
                    key = (_int(row.get("x", ""), "x", where), _int(row.get("y", ""), "y", where))
                    i = lookup.get(key, -1)
                    ok = i >= 0
                if not ok:
                    unmatched += 1
                    continue
                picked.append(i)
                labels_here.append(row["label"])
                groups_here.append(row.get("group") or row.get("patient_id") or sid)
            rows_here = np.asarray(picked, dtype=np.int64)
        slide_ids += [sid] * len(rows_here)
        tile_rows.append(rows_here)
        label_list += labels_here
        groups += groups_here
        mpps += [mpp] * len(rows_here)
    for sid, problem in skipped_slides.items():
        log.warning("patch-store %s: slide %s skipped: %s", path, sid, problem)
    if unmatched:
        log.warning("patch-store %s: %d label rows of %s match no tile and were skipped", path, unmatched, labels_path)
    if not label_list and skipped_slides:
        sid, problem = next(iter(skipped_slides.items()))
        raise DatasetError(
            f"{str(path)!r}: no usable tiles for the {len(by_slide)} labelled slides; e.g. slide {sid!r}: {problem}"
        )
    classes, idx = labels_to_indices(label_list, None, task="patch-store", root=labels_path)
    rows_all = np.concatenate(tile_rows) if tile_rows else np.zeros(0, dtype=np.int64)
    return TaskData(
        "patch-store",
        path,
        classes,
        PatchStoreTiles(path, slide_ids, rows_all),
        idx,
        np.asarray(groups, dtype=str),
        np.asarray(mpps, dtype=np.float64),
    )
