"""The average of fold models: the final model of ``classify train --cv-scheme rotate4``.

Tellez et al. (TPAMI 2019) train one grid CNN per rotation of four patient partitions and predict new
slides with the four together. :class:`FoldEnsemble` is that model: the probabilities are the mean of
the members' probabilities, the heatmap the mean of their heatmaps. It has the prediction side of the
:class:`~wsi_encoder.models.slide_classifiers.SlideClassifier` interface (it is assembled from fitted
members, never fitted itself), and is saved and loaded by :mod:`wsi_encoder.models.classifier_files`
like any model: the members' arrays under ``member<i>.`` in one ``model.safetensors``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.slide_classifiers.base import Bags, FloatArray, SlideClassifier

_PREFIX = "member"


class FoldEnsemble:
    """Several fitted slide classifiers of one kind, predicting as their mean.

    Parameters
    ----------
    members
        The fitted fold models (same class, input width and classes).
    """

    def __init__(self, members: Sequence[SlideClassifier[Any]]) -> None:
        if not members:
            raise InvalidParameterError("an ensemble needs at least one member")
        first = members[0]
        for m in members[1:]:
            if (type(m), m.in_dim, m.num_classes) != (type(first), first.in_dim, first.num_classes):
                raise InvalidParameterError("ensemble members must be one model kind with one input width and classes")
        self.members = list(members)
        self.name = first.name
        self.in_dim = first.in_dim
        self.num_classes = first.num_classes
        self.config = first.config
        self.heatmap_kind = first.heatmap_kind
        self.heatmap_signed = first.heatmap_signed
        self.uses_dihedral = first.uses_dihedral

    def predict_proba(self, bags: Bags) -> FloatArray:
        """``(n, k)``: the mean of the members' class probabilities."""
        bags = list(bags)
        return np.mean([m.predict_proba(bags) for m in self.members], axis=0)

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """The mean of the members' heatmaps (NaN outside tissue)."""
        maps = [m.heatmap(bag) for m in self.members]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (background) stay NaN
            return np.asarray(np.nanmean(maps, axis=0), dtype=np.float64)

    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Every member's arrays, under ``member<i>.``."""
        return {f"{_PREFIX}{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.state_arrays().items()}

    def describe(self) -> dict[str, Any]:
        """The members' saved config, plus ``ensemble``: how many fold models are averaged."""
        return {**self.members[0].describe(), "ensemble": len(self.members)}


def split_member_arrays(arrays: dict[str, npt.NDArray[Any]], n: int) -> list[dict[str, npt.NDArray[Any]]]:
    """The ``n`` members' arrays from :meth:`FoldEnsemble.state_arrays`' flat dict.

    Raises
    ------
    InvalidParameterError
        A key of no member, or a member with no arrays.
    """
    parts: list[dict[str, npt.NDArray[Any]]] = [{} for _ in range(n)]
    for key, value in arrays.items():
        head, _, rest = key.partition(".")
        index = head[len(_PREFIX):]
        if not head.startswith(_PREFIX) or not index.isdigit() or int(index) >= n or not rest:
            raise InvalidParameterError(f"array {key!r} belongs to no member of a {n}-model ensemble")
        parts[int(index)][rest] = value
    if any(not p for p in parts):
        raise InvalidParameterError(f"a member of the {n}-model ensemble has no arrays")
    return parts
