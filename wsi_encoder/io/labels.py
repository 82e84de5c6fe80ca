"""Slide label tables: ``slide_id,label[,patient_id][,split]`` CSV files for slide-level models.

* ``slide_id`` names a slide group of the embedding store; ``label`` is any string (integers sort
  numerically, other strings alphabetically; a binary negative-sounding class such as ``normal``,
  ``benign``, ``negative`` or ``0`` comes first, so the other is the positive class).
* ``patient_id`` groups slides of one patient, so that cross-validation never puts a patient on both
  sides. Without the column each slide is its own patient (and this is stated in the log).
* ``split`` (optional) is ``train`` (or empty) for the cross-validated cohort, ``test`` for a held-out
  set the final model is evaluated on once.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import DatasetError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("slide_id", "label")
SPLITS = ("train", "test")
#: Class names taken to be the negative class of a binary problem (compared case-insensitively).
NEGATIVE_NAMES = frozenset(
    {"0", "false", "no", "neg", "negative", "normal", "benign", "healthy", "control", "absent", "none", "non-tumor",
     "nontumor", "non_tumor", "tumor-free", "wildtype", "wild-type", "wt", "low"}
)
_MAX_LISTED = 10


@dataclass(frozen=True)
class LabelTable:
    """Labelled slides, in CSV order, after checking against a store.

    Attributes
    ----------
    slide_ids, labels, patient_ids, splits
        One entry per slide: id, label string, patient id, ``"train"`` or ``"test"``.
    classes
        Class names; ``classes[i]`` is class index ``i`` (``classes[1]`` is the positive class when binary).
    patient_id_given
        False when the CSV has no ``patient_id`` column (each slide was made its own patient).
    dropped_not_in_store, ignored_not_in_csv
        Slide ids skipped with ``allow_missing``.
    source
        The CSV it came from.
    """

    slide_ids: tuple[str, ...]
    labels: tuple[str, ...]
    patient_ids: tuple[str, ...]
    splits: tuple[str, ...]
    classes: tuple[str, ...]
    patient_id_given: bool
    dropped_not_in_store: tuple[str, ...] = ()
    ignored_not_in_csv: tuple[str, ...] = ()
    source: str = ""

    @property
    def y(self) -> npt.NDArray[np.int64]:
        """Class index of each slide."""
        index = self.class_index
        return np.array([index[label] for label in self.labels], dtype=np.int64)

    @property
    def class_index(self) -> dict[str, int]:
        """The label mapping ``{class name: index}`` (saved with every model)."""
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def select(self, split: str) -> LabelTable:
        """The rows of one split (``"train"`` or ``"test"``), same classes."""
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return replace(
            self,
            slide_ids=tuple(self.slide_ids[i] for i in keep),
            labels=tuple(self.labels[i] for i in keep),
            patient_ids=tuple(self.patient_ids[i] for i in keep),
            splits=tuple(self.splits[i] for i in keep),
        )

    def to_json(self) -> dict[str, Any]:
        """What goes into metrics.json / model.json: mapping, counts and skipped slides."""
        counts = Counter(self.labels)
        return {
            "source": self.source,
            "classes": list(self.classes),
            "class_index": self.class_index,
            "positive_class": self.classes[1] if self.n_classes == 2 else None,
            "counts": {c: counts[c] for c in self.classes},
            "n_slides": len(self.slide_ids),
            "n_patients": len(set(self.patient_ids)),
            "patient_id_given": self.patient_id_given,
            "dropped_not_in_store": list(self.dropped_not_in_store),
            "ignored_not_in_csv": list(self.ignored_not_in_csv),
        }


def _listing(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_MAX_LISTED])
    return shown + (f", ... ({len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED else "")


def match_store(
    path: Path,
    slide_ids: Sequence[str],
    store_slide_ids: Sequence[str] | None,
    store_name: str,
    allow_missing: bool,
    store_skipped: dict[str, str] | None,
) -> tuple[list[int], list[str], list[str]]:
    """Which CSV rows the store can serve: ``(kept row positions, dropped slide ids, store slides without a row)``.

    Unmatched slides either way are one :class:`DatasetError` listing them, or (``allow_missing``) a warning.
    """
    everything = list(range(len(slide_ids)))
    if store_slide_ids is None:
        return everything, [], []
    in_store = set(store_slide_ids)
    skipped = store_skipped or {}
    dropped = [s for s in slide_ids if s not in in_store]
    listed = set(slide_ids)
    ignored = sorted(s for s in in_store if s not in listed)
    problems = []
    if dropped:
        reasons = [f"{s} ({skipped[s]})" if s in skipped else s for s in dropped]
        problems.append(f"{len(dropped)} slide(s) of {path} are not usable in {store_name}: {_listing(reasons)}")
    if ignored:
        problems.append(f"{len(ignored)} slide(s) of {store_name} have no label in {path}: {_listing(ignored)}")
    if problems and not allow_missing:
        raise DatasetError("; ".join(problems) + " (use --allow-missing to skip them)")
    for problem in problems:
        logger.warning("%s; skipped (--allow-missing)", problem)
    return [i for i in everything if slide_ids[i] in in_store], dropped, ignored


def order_classes(labels: Iterable[str], positive_class: str | None = None) -> tuple[str, ...]:
    """Class order for a set of label strings.

    Integers sort numerically, other strings alphabetically. For two classes, ``positive_class`` (or else
    the one that is not a negative-sounding name such as ``normal`` when exactly one is) comes second.
    """
    names = sorted(set(labels))
    try:
        names = sorted(names, key=int)
    except ValueError:
        pass
    if len(names) == 2:
        if positive_class is not None:
            if positive_class not in names:
                raise DatasetError(f"positive class {positive_class!r} is not a label (labels: {names})")
            names = [n for n in names if n != positive_class] + [positive_class]
        else:
            negative = [n for n in names if n.strip().lower() in NEGATIVE_NAMES]
            if len(negative) == 1:
                names = [negative[0]] + [n for n in names if n != negative[0]]
    elif positive_class is not None:
        raise DatasetError(f"--positive-class applies to two classes only; the labels have {len(names)}: {names}")
    return tuple(names)


def read_labels(
    path: str | Path,
    store_slide_ids: Sequence[str] | None = None,
    *,
    store_name: str = "the embedding store",
    allow_missing: bool = False,
    positive_class: str | None = None,
    store_skipped: dict[str, str] | None = None,
    require_two_classes: bool = True,
) -> LabelTable:
    """Read and check a labels CSV.

    Parameters
    ----------
    path
        CSV with columns ``slide_id,label`` and optionally ``patient_id`` and ``split`` (``train``/``test``).
    store_slide_ids
        The usable slides of the store; slides of the CSV that are not there, and the other way round,
        are an error listing them (or a warning, and skipped, with ``allow_missing``).
    store_name
        How the store is named in messages (its path).
    allow_missing
        Skip unmatched slides with a warning instead of failing.
    positive_class
        For two classes, the label that is class 1.
    store_skipped
        ``{slide_id: reason}`` of slides the store holds but cannot use, quoted in messages.
    require_two_classes
        A single-class label set is an error (training); off for evaluating predictions.

    Raises
    ------
    DatasetError
        On a missing/empty file, missing columns, empty cells, duplicate slide ids, unknown split values,
        a patient in both splits, unmatched slides (without ``allow_missing``) or a single class.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found (a CSV with columns slide_id,label[,patient_id][,split])")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing_cols:
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in ";\t"):
            hint = " (the file seems to use ';' or tabs; use commas)"
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing_cols)}; found {header or 'no header'}{hint}. "
            "Expected a header slide_id,label[,patient_id][,split]"
        )
    if not rows:
        raise DatasetError(f"{path}: no rows under the header")
    has_patient = "patient_id" in header
    has_split = "split" in header

    slide_ids, labels, patients, splits = [], [], [], []
    empty: list[str] = []
    bad_split: list[str] = []
    for line, row in enumerate(rows, start=2):
        sid = (row.get("slide_id") or "").strip()
        label = (row.get("label") or "").strip()
        patient = (row.get("patient_id") or "").strip() if has_patient else sid
        split = (row.get("split") or "").strip().lower() if has_split else ""
        if not sid and not label and not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        for column, value in (("slide_id", sid), ("label", label), ("patient_id", patient)):
            if not value:
                empty.append(f"line {line} ({column})")
        split = split or "train"
        if split not in SPLITS:
            bad_split.append(f"line {line}: {split!r}")
        slide_ids.append(sid)
        labels.append(label)
        patients.append(patient)
        splits.append(split)
    if empty:
        raise DatasetError(f"{path}: empty cells at {_listing(empty)}; fill them or remove those rows")
    if bad_split:
        raise DatasetError(f"{path}: split must be one of {', '.join(SPLITS)} (or empty); got {_listing(bad_split)}")
    duplicated = sorted(s for s, n in Counter(slide_ids).items() if n > 1)
    if duplicated:
        raise DatasetError(f"{path}: slide ids listed more than once: {_listing(duplicated)}")
    both = sorted(
        {p for p, s in zip(patients, splits, strict=True) if s == "test"}
        & {p for p, s in zip(patients, splits, strict=True) if s == "train"}
    )
    if both:
        raise DatasetError(
            f"{path}: patients with slides in both the train and test split (leakage): {_listing(both)}; "
            "put all slides of a patient in one split"
        )
    if not has_patient:
        logger.warning("%s has no patient_id column: each slide is treated as its own patient", path)

    keep, dropped, ignored = match_store(path, slide_ids, store_slide_ids, store_name, allow_missing, store_skipped)
    slide_ids = [slide_ids[i] for i in keep]
    labels = [labels[i] for i in keep]
    patients = [patients[i] for i in keep]
    splits = [splits[i] for i in keep]
    if not slide_ids:
        raise DatasetError(f"{path}: no labelled slide left to use")
    train_labels = {lab for lab, s in zip(labels, splits, strict=True) if s == "train"}
    if require_two_classes and len(train_labels) < 2:
        raise DatasetError(
            f"{path}: the training slides have a single class {sorted(train_labels)}; a classifier needs at least two"
        )
    unseen = sorted({lab for lab, s in zip(labels, splits, strict=True) if s == "test"} - train_labels)
    if unseen and require_two_classes:
        raise DatasetError(f"{path}: test-split labels {unseen} do not occur in the training split")
    classes = order_classes(train_labels if require_two_classes else labels, positive_class)
    return LabelTable(
        slide_ids=tuple(slide_ids),
        labels=tuple(labels),
        patient_ids=tuple(patients),
        splits=tuple(splits),
        classes=classes,
        patient_id_given=has_patient,
        dropped_not_in_store=tuple(dropped),
        ignored_not_in_csv=tuple(ignored),
        source=str(path),
    )


# ---------------------------------------------------------------------------------------------- regression / survival
#: ``--target`` values and the columns each needs besides ``slide_id`` (``classification`` uses :func:`read_labels`).
TARGET_COLUMNS = {"regression": ("target",), "survival": ("time", "event")}


@dataclass(frozen=True)
class TargetTable:
    """Slides with a continuous target (``regression``) or a ``(time, event)`` pair (``survival``), in CSV order.

    ``values`` is the target (regression) or the time (survival); ``events`` is 1 for an observed event
    (death) and 0 for a censored time (survival only; empty for regression).
    """

    kind: str
    slide_ids: tuple[str, ...]
    values: tuple[float, ...]
    events: tuple[int, ...]
    patient_ids: tuple[str, ...]
    splits: tuple[str, ...]
    patient_id_given: bool
    dropped_not_in_store: tuple[str, ...] = ()
    ignored_not_in_csv: tuple[str, ...] = ()
    source: str = ""

    @property
    def y(self) -> npt.NDArray[np.float64]:
        """The targets (regression) or times (survival) as floats."""
        return np.asarray(self.values, dtype=np.float64)

    def select(self, split: str) -> TargetTable:
        """The rows of one split (``"train"`` or ``"test"``)."""
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return replace(
            self,
            slide_ids=tuple(self.slide_ids[i] for i in keep),
            values=tuple(self.values[i] for i in keep),
            events=tuple(self.events[i] for i in keep) if self.events else (),
            patient_ids=tuple(self.patient_ids[i] for i in keep),
            splits=tuple(self.splits[i] for i in keep),
        )

    def to_json(self) -> dict[str, Any]:
        """What goes into metrics.json: the target's summary and the skipped slides."""
        y = self.y
        summary: dict[str, Any] = {
            "source": self.source,
            "target": self.kind,
            "n_slides": len(self.slide_ids),
            "n_patients": len(set(self.patient_ids)),
            "min": float(y.min()),
            "median": float(np.median(y)),
            "max": float(y.max()),
            "patient_id_given": self.patient_id_given,
            "dropped_not_in_store": list(self.dropped_not_in_store),
            "ignored_not_in_csv": list(self.ignored_not_in_csv),
        }
        if self.kind == "survival":
            summary["n_events"] = int(sum(self.events))
        return summary


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{path}: row {line}: {column} {text!r} is not a number") from None
    if not np.isfinite(value):
        raise DatasetError(f"{path}: row {line}: {column} {text!r} is not a finite number")
    return value


def read_targets(
    path: str | Path,
    target: str,
    store_slide_ids: Sequence[str] | None = None,
    *,
    store_name: str = "the embedding store",
    allow_missing: bool = False,
    store_skipped: dict[str, str] | None = None,
) -> TargetTable:
    """Read and check a regression (``slide_id,target``) or survival (``slide_id,time,event``) CSV.

    ``patient_id`` and ``split`` are optional, as in :func:`read_labels`. Survival times must be
    non-negative and events 0 (censored) or 1 (death).

    Raises
    ------
    DatasetError
        One line naming the file, and the row and problem where there is one: missing file or columns,
        an empty cell, a non-numeric target or time, a negative time, an event other than 0/1, a duplicate
        slide id, an unknown split, a patient in both splits, unmatched slides (without ``allow_missing``),
        a constant target, or survival data without any event.
    """
    path = Path(path)
    if target not in TARGET_COLUMNS:
        raise DatasetError(f"unknown target {target!r}; choose from classification, {', '.join(TARGET_COLUMNS)}")
    wanted = ("slide_id", *TARGET_COLUMNS[target])
    layout = ",".join(wanted) + "[,patient_id][,split]"
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found (a CSV with columns {layout})")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    missing_cols = [c for c in wanted if c not in header]
    if missing_cols:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing_cols)} for --target {target}; "
            f"found {header or 'no header'}; expected {layout}"
        )
    has_patient = "patient_id" in header
    slide_ids: list[str] = []
    values: list[float] = []
    events: list[int] = []
    patients: list[str] = []
    splits: list[str] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        cells = {k: (v or "").strip() for k, v in row.items() if isinstance(k, str) and not isinstance(v, list)}
        if not any(cells.values()):
            continue  # blank line
        sid = cells.get("slide_id", "")
        patient = cells.get("patient_id", "") if has_patient else sid
        for column in (*wanted, "patient_id") if has_patient else wanted:
            if not cells.get(column, ""):
                raise DatasetError(f"{path}: row {line}: empty {column}")
        if sid in seen:
            raise DatasetError(f"{path}: row {line}: slide {sid!r} already listed on row {seen[sid]}")
        seen[sid] = line
        split = cells.get("split", "").lower() or "train"
        if split not in SPLITS:
            raise DatasetError(f"{path}: row {line}: split must be one of {', '.join(SPLITS)} (or empty), got {split!r}")
        if target == "regression":
            values.append(_number(path, line, "target", cells["target"]))
        else:
            time = _number(path, line, "time", cells["time"])
            if time < 0:
                raise DatasetError(f"{path}: row {line}: time {cells['time']!r} is negative")
            if cells["event"] not in ("0", "1", "0.0", "1.0"):
                raise DatasetError(
                    f"{path}: row {line}: event must be 1 (death) or 0 (censored), got {cells['event']!r}"
                )
            values.append(time)
            events.append(int(float(cells["event"])))
        slide_ids.append(sid)
        patients.append(patient)
        splits.append(split)
    if not slide_ids:
        raise DatasetError(f"{path}: no rows under the header")
    both = sorted({p for p, s in zip(patients, splits, strict=True) if s == "test"}
                  & {p for p, s in zip(patients, splits, strict=True) if s == "train"})
    if both:
        raise DatasetError(
            f"{path}: patients with slides in both the train and test split (leakage): {_listing(both)}"
        )
    if not has_patient:
        logger.warning("%s has no patient_id column: each slide is treated as its own patient", path)
    keep, dropped, ignored = match_store(path, slide_ids, store_slide_ids, store_name, allow_missing, store_skipped)
    if not keep:
        raise DatasetError(f"{path}: no labelled slide left to use")
    train = [i for i in keep if splits[i] == "train"]
    if len({values[i] for i in train}) < 2:
        raise DatasetError(f"{path}: the training slides' {wanted[1]} is constant; nothing to learn")
    if target == "survival" and not any(events[i] for i in train):
        raise DatasetError(f"{path}: no training slide has an event (event=1); survival models need events")
    return TargetTable(
        kind=target,
        slide_ids=tuple(slide_ids[i] for i in keep),
        values=tuple(values[i] for i in keep),
        events=tuple(events[i] for i in keep) if events else (),
        patient_ids=tuple(patients[i] for i in keep),
        splits=tuple(splits[i] for i in keep),
        patient_id_given=has_patient,
        dropped_not_in_store=tuple(dropped),
        ignored_not_in_csv=tuple(ignored),
        source=str(path),
    )
