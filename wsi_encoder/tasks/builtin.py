"""Built-in tasks: BreaKHis, Kather CRC (NCT-CRC-HE-100K), PatchCamelyon, image folders, CSV lists.

The patch-store task lives in :mod:`wsi_encoder.tasks.patch_store`. Groups (for patient-disjoint
validation) come from the data wherever the public layout carries them; where it does not, the
loader says so in a note and explains what it uses instead.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from wsi_encoder.errors import DatasetError
from wsi_encoder.io.breakhis import MAGNIFICATIONS, SUBTYPES, patient_key, scan_breakhis
from wsi_encoder.tasks.data import (
    ConcatImages,
    FileImages,
    H5Images,
    ImageSource,
    TaskData,
    labels_to_indices,
    list_image_files,
)
from wsi_encoder.tasks.registry import register_task

log = logging.getLogger(__name__)

BREAKHIS_LAYOUT = (
    "BreaKHis_v1/histology_slides/breast/... tree, or any folder of BreaKHis-named PNGs "
    "(SOB_<B|M>_<subtype>-<year>-<slide>-<mag>-<seq>.png)"
)


@register_task(
    "breakhis-malignancy",
    description="BreaKHis benign vs malignant breast tumour images (group: patient)",
    layout=BREAKHIS_LAYOUT,
    classes=("benign", "malignant"),
)
def breakhis_malignancy(path: Path) -> Iterator[tuple[Path, str, str]]:
    """Label = benign/malignant parsed from the file name; group = the patient number."""
    for im in scan_breakhis(path):
        yield im.path, im.label, patient_key(im)


@register_task(
    "breakhis-subtype",
    description="BreaKHis 8 tumour subtypes (adenosis ... papillary carcinoma) (group: patient)",
    layout=BREAKHIS_LAYOUT,
    classes=tuple(SUBTYPES.values()),
)
def breakhis_subtype(path: Path) -> Iterator[tuple[Path, str, str]]:
    """Label = histological subtype parsed from the file name; group = the patient number."""
    for im in scan_breakhis(path):
        yield im.path, im.subtype, patient_key(im)


@register_task(
    "breakhis-magnification",
    description="BreaKHis objective magnification 40X/100X/200X/400X (group: patient)",
    layout=BREAKHIS_LAYOUT,
    classes=tuple(f"{m}X" for m in MAGNIFICATIONS),
)
def breakhis_magnification(path: Path) -> Iterator[tuple[Path, str, str]]:
    """Label = magnification parsed from the file name; group = the patient number."""
    for im in scan_breakhis(path):
        yield im.path, f"{im.magnification}X", patient_key(im)


KATHER_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
KATHER_VAL_NAME = "CRC-VAL-HE-7K"


def _class_dirs(folder: Path, classes: tuple[str, ...]) -> dict[str, Path]:
    lookup = {c.upper(): c for c in classes}
    return {lookup[p.name.upper()]: p for p in sorted(folder.iterdir()) if p.is_dir() and p.name.upper() in lookup}


@register_task(
    "kather-crc",
    description="Kather colorectal tissue types, 9 classes, 224 px @ 0.5 µm/px (NCT-CRC-HE-100K)",
    layout=(
        "ROOT/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/*.tif (NCT-CRC-HE-100K), or a folder holding "
        "NCT-CRC-HE-100K/ and CRC-VAL-HE-7K/ (the latter then is the validation set)"
    ),
    classes=KATHER_CLASSES,
    mpp=0.5,
)
def kather_crc(path: Path) -> TaskData:
    """NCT-CRC-HE-100K folder-per-class layout.

    The file names carry no patient id, so each image is its own group. When the folder also holds
    the official ``CRC-VAL-HE-7K`` set (patients disjoint from NCT-CRC-HE-100K), it becomes the
    validation set and the patient-disjoint guarantee holds.
    """
    if not path.is_dir():
        raise DatasetError(f"{str(path)!r} is not a folder (kather-crc expects ROOT/<class>/*.tif)")
    sets: list[tuple[str, dict[str, Path]]] = []
    direct = _class_dirs(path, KATHER_CLASSES)
    if direct:
        sets.append(("train", direct))
    else:
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            dirs = _class_dirs(sub, KATHER_CLASSES)
            if dirs:
                sets.append(("val" if sub.name.upper().startswith(KATHER_VAL_NAME) else "train", dirs))
    paths: list[Path] = []
    labels: list[str] = []
    split: list[str] = []
    for part, dirs in sets:
        for cls, folder in dirs.items():
            files = list_image_files(folder)
            paths += files
            labels += [cls] * len(files)
            split += [part] * len(files)
    classes, idx = labels_to_indices(labels, KATHER_CLASSES, task="kather-crc", root=path)
    groups = [f"{s}:{p.stem}" for s, p in zip(split, paths, strict=True)]
    has_val = "val" in split and "train" in split
    notes = (
        []
        if has_val
        else [
            "NCT-CRC-HE-100K file names carry no patient id: each image is its own group, so the "
            "validation split is not patient-disjoint (put CRC-VAL-HE-7K beside it for a disjoint one)"
        ]
    )
    return TaskData(
        "kather-crc",
        path,
        classes,
        FileImages(paths),
        idx,
        np.asarray(groups, dtype=str),
        np.full(len(idx), 0.5),
        split=np.asarray(split, dtype=str) if has_val else None,
        notes=notes if paths else [],
    )


PCAM_PREFIX = "camelyonpatch_level_2_split_"
PCAM_SPLITS = {"train": "train", "valid": "val", "test": "test"}
PCAM_MPP = 0.972  # Camelyon16 level 2: 0.243 µm/px x 4
PCAM_BLOCK = 1024


def _pcam_groups(path: Path, split_name: str, n: int) -> tuple[np.ndarray, bool]:
    meta = path / f"{PCAM_PREFIX}{split_name}_meta.csv"
    if meta.is_file():
        with open(meta, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if len(rows) == n and rows and "wsi" in rows[0]:
            return np.asarray([r["wsi"] for r in rows], dtype=str), True
        log.warning("%s does not match the %d images of split %s; ignoring it", meta, n, split_name)
    return np.asarray([f"{split_name}:block{i // PCAM_BLOCK:05d}" for i in range(n)], dtype=str), False


@register_task(
    "pcam",
    description="PatchCamelyon lymph-node metastasis, 96 px @ ~0.97 µm/px, binary (official .h5 files)",
    layout=(
        "ROOT/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (gunzipped), optional "
        "camelyonpatch_level_2_split_*_meta.csv (gives the source slide of each patch)"
    ),
    classes=("normal", "tumor"),
    mpp=PCAM_MPP,
)
def pcam(path: Path) -> TaskData:
    """PCam from its official HDF5 files, read lazily with h5py.

    Splits: ``train`` trains, ``valid`` validates (the official splits do not share slides), ``test``
    is kept out. Groups: the ``wsi`` column of the ``*_meta.csv`` files when present; otherwise PCam
    has no patient id, and consecutive blocks of 1024 patches of one file form a group (a note says
    the split is then not slide-disjoint; with both train and valid files the official split is used).
    """
    import h5py

    root = path.parent if path.is_file() else path
    sources: list[H5Images] = []
    labels_all: list[np.ndarray] = []
    groups_all: list[np.ndarray] = []
    split_all: list[np.ndarray] = []
    slide_groups = True
    for split_name, part in PCAM_SPLITS.items():
        x_path = root / f"{PCAM_PREFIX}{split_name}_x.h5"
        y_path = root / f"{PCAM_PREFIX}{split_name}_y.h5"
        if not x_path.is_file() or not y_path.is_file():
            if x_path.with_suffix(".h5.gz").is_file():
                raise DatasetError(f"{x_path!s}.gz is compressed: gunzip the PCam files first")
            continue
        try:
            with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
                x_shape = fx["x"].shape
                y = np.asarray(fy["y"][...]).reshape(-1).astype(np.int64)
        except (OSError, KeyError) as exc:
            raise DatasetError(f"cannot read PCam files {str(x_path)!r}/{str(y_path)!r}: {exc}") from exc
        if len(x_shape) != 4 or x_shape[0] != len(y) or x_shape[-1] != 3:
            raise DatasetError(f"{str(x_path)!r}: x {x_shape} does not match y ({len(y)},) as PCam (N, 96, 96, 3)")
        if len(y) and (y.min() < 0 or y.max() > 1):
            raise DatasetError(f"{str(y_path)!r}: PCam labels must be 0/1, found {sorted(set(y.tolist()))[:5]}")
        groups, from_meta = _pcam_groups(root, split_name, len(y))
        slide_groups &= from_meta
        sources.append(H5Images(x_path, "x", np.arange(len(y))))
        labels_all.append(y)
        groups_all.append(groups)
        split_all.append(np.full(len(y), part))
    if not sources:
        return TaskData(
            "pcam", path, ("normal", "tumor"), FileImages([]),
            np.empty(0, np.int64), np.empty(0, np.str_), np.empty(0, np.float64),
        )
    source: ImageSource = sources[0] if len(sources) == 1 else ConcatImages(sources)
    split = np.concatenate(split_all)
    has_val = "train" in split and "val" in split
    notes = []
    if not slide_groups and not has_val:
        notes.append(
            "PCam has no patient id and no *_meta.csv was found: groups are blocks of "
            f"{PCAM_BLOCK} consecutive patches, so the validation split is not slide-disjoint "
            "(add the valid_x/valid_y files to use the official slide-disjoint split)"
        )
    return TaskData(
        "pcam",
        path,
        ("normal", "tumor"),
        source,
        np.concatenate(labels_all),
        np.concatenate(groups_all),
        np.full(len(split), PCAM_MPP),
        split=split if has_val or "test" in split else None,
        notes=notes,
    )


@register_task(
    "imagefolder",
    description="Generic folder per class; sub-folders inside a class folder are taken as patient groups",
    layout="ROOT/<class>/*.png|jpg|tif, or ROOT/<class>/<patient>/*.png (classes = folder names)",
)
def imagefolder(path: Path) -> Iterator[tuple[Path, str, str]]:
    """Images under each class folder (recursively); group = first sub-folder below the class, else the image."""
    if not path.is_dir():
        raise DatasetError(f"{str(path)!r} is not a folder (imagefolder expects ROOT/<class>/*.png)")
    for cls_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for sub in [cls_dir, *sorted(p for p in cls_dir.rglob("*") if p.is_dir() and not p.name.startswith("."))]:
            for f in list_image_files(sub):
                rel = f.relative_to(cls_dir)
                group = rel.parts[0] if len(rel.parts) > 1 else f"{cls_dir.name}/{f.stem}"
                yield f, cls_dir.name, group


_PATH_COLUMNS = ("path", "image", "filename", "file")


@register_task(
    "csv",
    description="Generic CSV list of images: path,label[,group][,mpp] (relative paths from the CSV's folder)",
    layout="FILE.csv with header path,label[,group][,mpp]; group = patient/slide id, mpp = µm/px",
)
def csv_task(path: Path) -> TaskData:
    """A CSV of images; missing files are reported (count and first few) and skipped."""
    if not path.is_file():
        raise DatasetError(f"{str(path)!r} is not a CSV file (the csv task expects FILE.csv with path,label)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read CSV {str(path)!r}: {exc}") from exc
    col = next((c for c in _PATH_COLUMNS if c in header), None)
    if col is None or "label" not in header:
        raise DatasetError(f"{str(path)!r}: the header must have path and label columns, found {header}")
    paths, labels, groups, mpps, missing = [], [], [], [], []
    for k, row in enumerate(rows, start=2):
        if not row.get(col) or not row.get("label"):
            continue
        p = Path(row[col]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            missing.append(str(p))
            continue
        paths.append(p)
        labels.append(row["label"])
        groups.append(row.get("group") or row.get("patient_id") or row.get("slide_id") or f"row{k}")
        try:
            mpps.append(float(row["mpp"]) if row.get("mpp") else np.nan)
        except ValueError as exc:
            raise DatasetError(f"{str(path)!r} line {k}: mpp {row['mpp']!r} is not a number") from exc
    if missing:
        log.warning("%s: %d listed images are missing and skipped, e.g. %s", path, len(missing), missing[:3])
    classes, idx = labels_to_indices(labels, None, task="csv", root=path)
    notes = [] if "group" in header or "patient_id" in header else ["no group column: each row is its own group"]
    return TaskData(
        "csv", path, classes, FileImages(paths), idx, np.asarray(groups, dtype=str), np.asarray(mpps), notes=notes
    )


# Registers the patch-store task (kept in its own module).
from wsi_encoder.tasks import patch_store  # noqa: E402, F401
