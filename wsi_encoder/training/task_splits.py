"""Patient-disjoint train/validation splits, one per task.

A dataset's own split (Kather CRC-VAL-HE-7K, PCam ``valid``) is used when it has both a training and
a validation part; otherwise images are split by group (patient / slide) with scikit-learn's
``StratifiedGroupKFold`` (one fold of about ``val_fraction`` of the groups, classes kept in both
parts where the group count allows), falling back to ``GroupShuffleSplit``. A group never has images
on both sides.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.tasks.data import TaskData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Indices into a TaskData and how they were chosen."""

    train: npt.NDArray[np.int64]
    val: npt.NDArray[np.int64]
    method: str


def split_task(data: TaskData, val_fraction: float, seed: int) -> Split:
    """Split ``data`` into patient-disjoint train and validation indices.

    Parameters
    ----------
    data : TaskData
    val_fraction : float
        Target fraction of groups held out for validation, in [0, 1); 0 means no validation.
    seed : int
        Seed of the random group assignment.

    Returns
    -------
    Split
        ``train`` and ``val`` are sorted; ``val`` is empty when the task has fewer than two groups.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidParameterError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    everything = np.arange(len(data), dtype=np.int64)
    if data.split is not None:
        train = everything[data.split == "train"]
        val = everything[data.split == "val"]
        if len(train) and len(val):
            return Split(train, val if val_fraction > 0 else val[:0], "dataset's own split")
        everything = train if len(train) else everything[data.split != "test"]
    if val_fraction == 0:
        return Split(everything, everything[:0], "no validation (val_fraction=0)")
    groups = data.groups[everything]
    labels = data.labels[everything]
    unique_groups = np.unique(groups)
    if len(unique_groups) < 2:
        log.warning("task %s has a single group: no validation split", data.task)
        return Split(everything, everything[:0], "no validation (one group)")
    n_splits = int(min(max(2, round(1.0 / val_fraction)), len(unique_groups)))
    train_pos: npt.NDArray[np.intp] | None = None
    val_pos: npt.NDArray[np.intp] | None = None
    with warnings.catch_warnings():
        # "The least populated class in y has only k members": expected with few patients per class.
        warnings.simplefilter("ignore", UserWarning)
        try:
            sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            train_pos, val_pos = next(sgkf.split(everything, labels, groups))
            method = f"StratifiedGroupKFold(n_splits={n_splits}) fold 0"
        except ValueError:
            train_pos = None
    if train_pos is None or val_pos is None or len(val_pos) == 0 or len(train_pos) == 0:
        gss = GroupShuffleSplit(n_splits=1, test_size=1.0 / n_splits, random_state=seed)
        train_pos, val_pos = next(gss.split(everything, labels, groups))
        method = f"GroupShuffleSplit(test_size={1.0 / n_splits:.2f})"
    return Split(np.sort(everything[train_pos]), np.sort(everything[val_pos]), method)
