"""Patient-disjoint splits and leave-one-magnification-out (LOMO) folds for BreaKHis.

The protocol (reconstructed from Ezuma & Medaiyese 2026, see ``docs/lomo.md``):

1. Patients (not images) are split into train and test sets, stratified by class and seeded: either
   once (``test_fraction`` of each class's patients goes to test) or into ``k`` patient folds.
   A share of the training patients (``val_fraction`` of each class) is set aside for validation.
2. For each held-out magnification ``m`` the classifier fits on the training patients' images at the
   other three magnifications, validates on the validation patients' images at those magnifications,
   and is tested only on the test patients' images at ``m``. The test patients' images at the
   training magnifications are ``probe_test``: the classifier never trains on them; they only serve
   the magnification probe, scored on patients the adversary never saw. Training patients' images
   at ``m`` are ``unused``. No patient is ever on both sides.

The patient key is :func:`wsi_encoder.io.breakhis.patient_key`: by default the case number
(``14-22549``, which groups the slides ``22549AB``, ``22549CD``, ``22549G`` of one patient); with
``key="token"`` the whole slide token (``14-22549AB``).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.io.breakhis import CLASSES, MAGNIFICATIONS, BreakhisImage, patient_key
from wsi_encoder.io.files import atomic_write_csv

logger = logging.getLogger(__name__)

SPLITS_COLUMNS = ("filename", "patient_id", "class", "magnification", "fold", "role")
ROLES = ("train", "val", "test", "probe_test", "unused")


@dataclass(frozen=True)
class PatientSplit:
    """One patient-level split: disjoint sets of patient keys."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


@dataclass(frozen=True)
class LomoFold:
    """One leave-one-magnification-out fold: indices into the image list, by role.

    ``probe_test`` holds the test patients' images at the training magnifications (for the
    magnification probe only). ``skipped`` says why the fold cannot run (no test images, no
    training images), else None.
    """

    held_out: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    skipped: str | None = None
    probe_test: tuple[int, ...] = ()


def patient_labels(images: Sequence[BreakhisImage], key: str = "number") -> dict[str, str]:
    """Class of each patient key (the majority class of its images; BreaKHis patients have one class)."""
    counts: dict[str, Counter[str]] = {}
    for im in images:
        counts.setdefault(patient_key(im, key), Counter())[im.label] += 1
    labels = {}
    for key, count in counts.items():
        if len(count) > 1:
            logger.warning(
                "patient %s has images of both classes %s; stratifying by the majority", key, dict(count)
            )
        labels[key] = count.most_common(1)[0][0]
    return dict(sorted(labels.items()))


def _take_per_class(
    labels: dict[str, str], fraction: float, rng: np.random.Generator, *, keep_one: bool
) -> tuple[list[str], list[str]]:
    """Split patients into (kept, taken): ``fraction`` of each class's patients is taken, seeded.

    When a class has two patients or more, at least one is taken and (with ``keep_one``) at least
    one kept; a class with a single patient stays entirely on the kept side.
    """
    kept: list[str] = []
    taken: list[str] = []
    for cls in sorted(set(labels.values())):
        members = sorted(p for p, c in labels.items() if c == cls)
        order = [members[i] for i in rng.permutation(len(members))]
        n_take = round(fraction * len(members))
        if fraction > 0 and len(members) >= 2:
            n_take = max(n_take, 1)
        if keep_one:
            n_take = min(n_take, len(members) - 1)
        n_take = max(n_take, 0)
        taken += order[:n_take]
        kept += order[n_take:]
    return sorted(kept), sorted(taken)


def split_patients(
    images: Sequence[BreakhisImage],
    *,
    test_fraction: float = 0.3,
    val_fraction: float = 0.2,
    seed: int = 0,
    key: str = "number",
) -> PatientSplit:
    """One seeded, class-stratified patient split into train / validation / test patients.

    Parameters
    ----------
    images
        The BreaKHis images (from :func:`wsi_encoder.io.breakhis.scan_breakhis`).
    test_fraction
        Share of each class's patients in the test set, in (0, 1). At least one patient per class
        with two patients or more; a class with one patient stays in training.
    val_fraction
        Share of each class's training patients held out for validation, in [0, 1).
    seed
        Seed of the permutation.
    key
        Patient key (:func:`~wsi_encoder.io.breakhis.patient_key`): ``number`` (default) or ``token``.
    """
    if not 0 < test_fraction < 1:
        raise InvalidParameterError(f"test fraction {test_fraction!r} must be in (0, 1), e.g. 0.3")
    _check_val_fraction(val_fraction)
    labels = patient_labels(images, key)
    if len(labels) < 2:
        raise DatasetError(f"{len(labels)} patient(s) found; a patient-disjoint split needs at least 2")
    rng = np.random.default_rng(seed)
    train, test = _take_per_class(labels, test_fraction, rng, keep_one=True)
    if not test:
        raise DatasetError(
            f"no class has two patients or more ({_describe(labels)}); a patient-disjoint test set is impossible"
        )
    return _with_validation(train, test, labels, val_fraction, rng)


def patient_folds(
    images: Sequence[BreakhisImage],
    n_folds: int,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    key: str = "number",
) -> list[PatientSplit]:
    """``n_folds`` class-stratified patient folds (scikit-learn ``StratifiedKFold`` on patients).

    Fold ``k`` tests on the ``k``-th patient group and trains (and validates) on the others, so
    every patient is tested exactly once.
    """
    if n_folds < 2:
        raise InvalidParameterError(f"--patient-folds {n_folds!r} must be at least 2")
    _check_val_fraction(val_fraction)
    labels = patient_labels(images, key)
    per_class = Counter(labels.values())
    smallest = min(per_class.values())
    if n_folds > smallest:
        raise InvalidParameterError(
            f"--patient-folds {n_folds} but the smallest class has {smallest} patient(s) ({_describe(labels)}); "
            f"use at most {smallest} folds or --test-fraction"
        )
    keys = np.array(list(labels))
    classes = np.array([labels[k] for k in keys])
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    rng = np.random.default_rng(seed)
    splits = []
    for train_idx, test_idx in splitter.split(keys, classes):
        splits.append(
            _with_validation(sorted(keys[train_idx]), sorted(keys[test_idx]), labels, val_fraction, rng)
        )
    return splits


def _check_val_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise InvalidParameterError(f"validation fraction {val_fraction!r} must be in [0, 1), e.g. 0.2")


def _describe(labels: dict[str, str]) -> str:
    count = Counter(labels.values())
    return ", ".join(f"{count[c]} {c}" for c in sorted(count))


def _with_validation(
    train: list[str], test: list[str], labels: dict[str, str], val_fraction: float, rng: np.random.Generator
) -> PatientSplit:
    if val_fraction > 0:
        fit, val = _take_per_class({p: labels[p] for p in train}, val_fraction, rng, keep_one=True)
    else:
        fit, val = list(train), []
    split = PatientSplit(train=tuple(fit), val=tuple(val), test=tuple(sorted(test)))
    check_patient_disjoint(split)
    return split


def check_patient_disjoint(split: PatientSplit) -> None:
    """Raise :class:`DatasetError` when a patient key is in two of train / val / test."""
    sets = {"train": set(split.train), "val": set(split.val), "test": set(split.test)}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sets[a] & sets[b]
        if shared:
            raise DatasetError(
                f"patients {sorted(shared)!r} are in both {a} and {b}: the split leaks patients"
            )


def lomo_folds(
    images: Sequence[BreakhisImage],
    split: PatientSplit,
    *,
    key: str = "number",
    magnifications: Sequence[int] = MAGNIFICATIONS,
) -> list[LomoFold]:
    """The leave-one-magnification-out folds of a patient split, one per magnification.

    For held-out ``m``: train = training patients' images at the other magnifications, val =
    validation patients' images at the other magnifications, test = test patients' images at ``m``,
    probe_test = test patients' images at the other magnifications. A fold without test images or without training images is returned with ``skipped`` set.
    """
    roles = {p: "train" for p in split.train} | {p: "val" for p in split.val} | {p: "test" for p in split.test}
    folds = []
    for m in magnifications:
        by_role: dict[str, list[int]] = {"train": [], "val": [], "test": [], "probe_test": []}
        for i, im in enumerate(images):
            role = roles.get(patient_key(im, key))
            if role is None:
                raise DatasetError(f"{im.filename}: patient {patient_key(im, key)!r} is in no split set")
            if role == "test":
                by_role["test" if im.magnification == m else "probe_test"].append(i)
            elif im.magnification != m:
                by_role[role].append(i)
        skipped = None
        if not by_role["test"]:
            skipped = f"no test-patient images at {m}X"
        elif not by_role["train"]:
            skipped = f"no training-patient images at magnifications other than {m}X"
        elif len({images[i].label for i in by_role["train"]}) < 2:
            skipped = f"the training images without {m}X hold one class only"
        if skipped:
            logger.warning("held-out %dX: %s; this fold is skipped", m, skipped)
        folds.append(
            LomoFold(
                held_out=int(m),
                train=tuple(by_role["train"]),
                val=tuple(by_role["val"]),
                test=tuple(by_role["test"]),
                skipped=skipped,
                probe_test=tuple(by_role["probe_test"]),
            )
        )
    return folds


def cap_fold(fold: LomoFold, max_images: int | None, seed: int = 0) -> LomoFold:
    """Keep at most ``max_images`` images per role (a seeded random subset; for quick runs).

    The dropped images become ``unused``; patient-disjointness is untouched (a subset of each side).
    """
    if max_images is None:
        return fold
    if max_images < 1:
        raise InvalidParameterError(f"--max-images-per-split {max_images!r} must be at least 1")
    picked = {}
    for k, name in enumerate(("train", "val", "test", "probe_test")):
        rows = np.asarray(getattr(fold, name), dtype=np.int64)
        if len(rows) > max_images:
            rng = np.random.default_rng([seed, fold.held_out, k])
            rows = np.sort(rng.choice(rows, size=max_images, replace=False))
        picked[name] = tuple(int(i) for i in rows)
    return LomoFold(
        fold.held_out, picked["train"], picked["val"], picked["test"], fold.skipped, picked["probe_test"]
    )


def fold_roles(n_images: int, fold: LomoFold) -> list[str]:
    """The role (train / val / test / probe_test / unused) of every image index in a fold."""
    roles = ["unused"] * n_images
    for name in ("train", "val", "test", "probe_test"):
        for i in getattr(fold, name):
            roles[i] = name
    return roles


def write_splits_csv(
    path: str | Path, images: Sequence[BreakhisImage], folds: Sequence[LomoFold], *, key: str = "number"
) -> Path:
    """Write ``filename,patient_id,class,magnification,fold,role`` (one row per image and fold), atomically.

    ``fold`` is the held-out magnification (40, 100, 200, 400); ``patient_id`` is the grouping key used.
    """
    path = Path(path)
    rows = []
    for fold in folds:
        roles = fold_roles(len(images), fold)
        for im, role in zip(images, roles, strict=True):
            rows.append(
                (im.filename, patient_key(im, key), im.label, im.magnification, fold.held_out, role)
            )
    atomic_write_csv(path, rows, header=SPLITS_COLUMNS)
    return path


def read_splits_csv(path: str | Path) -> list[dict[str, str | int]]:
    """Rows of a ``splits.csv`` (``magnification`` and ``fold`` as int)."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != SPLITS_COLUMNS:
            raise DatasetError(f"{path}: columns {reader.fieldnames!r}, expected {list(SPLITS_COLUMNS)}")
        rows: list[dict[str, str | int]] = []
        for row in reader:
            rows.append({**row, "magnification": int(row["magnification"]), "fold": int(row["fold"])})
    return rows


def class_index(label: str) -> int:
    """0 for benign, 1 for malignant."""
    return CLASSES.index(label)
