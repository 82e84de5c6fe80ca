"""What ``wsienc signatures`` keeps of each arm × fold, and the cross-fold Jaccard of an arm's signatures.

:class:`SignatureRecord` is one row of ``signatures.csv`` plus the signature itself (JSON in
``signatures.json``); :func:`arm_jaccards` compares the signatures of every pair of folds of an arm,
with the overlap two random signatures of the same sizes would have by chance and the chance-corrected
value (see :mod:`wsi_encoder.evaluation.signatures` for how a signature is selected).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import DatasetError
from wsi_encoder.evaluation.signatures import (
    FoldEvaluation,
    corrected_jaccard,
    expected_jaccard,
    jaccard,
    jaccard_matrix,
    mean_off_diagonal,
)

__all__ = [
    "JACCARD_COLUMNS",
    "SEED_NULL_COLUMNS",
    "SIGNATURE_COLUMNS",
    "ArmJaccard",
    "SeedNullRow",
    "SignatureRecord",
    "arm_jaccards",
    "seed_null_rows",
]

FloatArray = npt.NDArray[np.float64]


#: Columns of ``signatures.csv``: the contract's nine first, then the extras.
SIGNATURE_COLUMNS = (
    "arm",
    "fold",
    "size",
    "auc_full",
    "auc_signature",
    "f1_full",
    "f1_signature",
    "brier_full",
    "brier_signature",
    "ece_full",
    "ece_signature",
    "balanced_accuracy_full",
    "balanced_accuracy_signature",
    "auc_lasso",
    "auc_network",
    "lasso_size",
    "lambda",
    "n_train",
    "n_test",
    "n_train_patients",
    "n_test_patients",
    "n_dims",
    "size_fraction",
    "signature_delta_auc",
    "signature_delta_auc_ci_low",
    "signature_delta_auc_ci_high",
    "signature_delta_brier",
    "signature_delta_brier_ci_low",
    "signature_delta_brier_ci_high",
    "size_ci_low",
    "size_ci_high",
)
#: Keys of :attr:`SignatureRecord.vs_full` (``signatures.csv`` prefixes them with ``signature_``).
VS_FULL_KEYS = tuple(c.removeprefix("signature_") for c in SIGNATURE_COLUMNS if c.startswith("signature_delta"))
JACCARD_COLUMNS = ("arm", "fold_a", "fold_b", "jaccard", "jaccard_chance", "jaccard_corrected")


@dataclass(frozen=True)
class SignatureRecord:
    """Everything kept about one arm × fold: the signature, its selection and the test metrics.

    ``auc_network`` is the AUC of the arm's own predictions (``prob_test`` of a LOMO fold; nan when
    there are none); ``frequencies`` maps dimension -> stability-selection frequency (non-zero only).
    """

    arm: str
    fold: str
    indices: tuple[int, ...]
    lasso_indices: tuple[int, ...]
    lam: float
    c: float
    metrics_full: dict[str, float]
    metrics_signature: dict[str, float]
    auc_lasso: float
    auc_network: float
    n_train: int
    n_test: int
    n_train_patients: int
    n_test_patients: int
    n_dims: int
    frequencies: dict[int, float] | None = None
    #: Signature minus full on the same test patients, with 95% intervals (:attr:`FoldEvaluation.vs_full`).
    vs_full: dict[str, float] = field(default_factory=dict)
    #: Signatures re-selected on patient resamples of the training set (None: a resample that failed).
    boot_indices: tuple[tuple[int, ...] | None, ...] = ()
    #: The patients whose embeddings selected the signature (the fold's selection set).
    selection_patients: tuple[str, ...] = ()
    #: The signature of the same fold's encoder trained with a second seed, by the same rule (None: no seed null).
    seed_indices: tuple[int, ...] | None = None
    #: The second seed's signatures on the same patient resamples as :attr:`boot_indices` (paired by index).
    seed_boot_indices: tuple[tuple[int, ...] | None, ...] = ()

    def size_interval(self, alpha: float = 0.05) -> tuple[float, float]:
        """Percentile interval of the signature size over the selection-patient bootstrap (nan without one)."""
        sizes = [len(b) for b in self.boot_indices if b is not None]
        if len(sizes) < 2:
            return (float("nan"), float("nan"))
        lo, hi = np.quantile(sizes, [alpha / 2, 1 - alpha / 2])
        return (float(lo), float(hi))

    @property
    def size(self) -> int:
        """Signature size (number of dimensions)."""
        return len(self.indices)

    @property
    def size_fraction(self) -> float:
        """Signature size / embedding dimension D (comparable across backbones)."""
        return self.size / self.n_dims if self.n_dims else float("nan")

    @classmethod
    def from_evaluation(cls, arm: str, fold: str, ev: FoldEvaluation, auc_network: float = float("nan")) -> SignatureRecord:
        """Build the record of ``arm``/``fold`` from :func:`evaluate_fold`'s result."""
        sel = ev.selection
        freq = None
        if sel.frequencies is not None:
            freq = {int(i): float(sel.frequencies[i]) for i in np.flatnonzero(sel.frequencies > 0)}
        return cls(
            arm=arm,
            fold=fold,
            indices=sel.indices,
            lasso_indices=sel.lasso_indices,
            lam=sel.lam,
            c=sel.c,
            metrics_full=dict(ev.metrics_full),
            metrics_signature=dict(ev.metrics_signature),
            auc_lasso=ev.auc_lasso,
            auc_network=float(auc_network),
            n_train=ev.n_train,
            n_test=ev.n_test,
            n_train_patients=ev.n_train_groups,
            n_test_patients=ev.n_test_groups,
            n_dims=ev.n_dims,
            frequencies=freq,
            vs_full=dict(ev.vs_full),
            boot_indices=ev.boot_indices,
        )

    def row(self) -> dict[str, object]:
        """The ``signatures.csv`` row (keys :data:`SIGNATURE_COLUMNS`)."""
        row: dict[str, object] = {
            "arm": self.arm,
            "fold": self.fold,
            "size": self.size,
            "size_fraction": self.size_fraction,
            "n_dims": self.n_dims,
        }
        for metric in ("auc", "f1", "brier", "ece", "balanced_accuracy"):
            row[f"{metric}_full"] = self.metrics_full[metric]
            row[f"{metric}_signature"] = self.metrics_signature[metric]
        row.update(
            auc_lasso=self.auc_lasso,
            auc_network=self.auc_network,
            lasso_size=len(self.lasso_indices),
            n_train=self.n_train,
            n_test=self.n_test,
            n_train_patients=self.n_train_patients,
            n_test_patients=self.n_test_patients,
        )
        row["lambda"] = self.lam
        row["size_ci_low"], row["size_ci_high"] = self.size_interval()
        for key in VS_FULL_KEYS:
            row[f"signature_{key}"] = self.vs_full.get(key, float("nan"))
        return {k: row[k] for k in SIGNATURE_COLUMNS}

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict (the inverse of :meth:`from_json`); nan becomes None."""

        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if not np.isfinite(v) else float(v)) for k, v in d.items()}

        return {
            "arm": self.arm,
            "fold": self.fold,
            "size": self.size,
            "indices": list(self.indices),
            "lasso_indices": list(self.lasso_indices),
            "lambda": self.lam,
            "C": None if not np.isfinite(self.c) else self.c,
            "metrics_full": clean(self.metrics_full),
            "metrics_signature": clean(self.metrics_signature),
            "auc_lasso": None if not np.isfinite(self.auc_lasso) else self.auc_lasso,
            "auc_network": None if not np.isfinite(self.auc_network) else self.auc_network,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "n_train_patients": self.n_train_patients,
            "n_test_patients": self.n_test_patients,
            "n_dims": self.n_dims,
            "stability_frequencies": None if self.frequencies is None else {str(k): v for k, v in self.frequencies.items()},
            "vs_full": clean(self.vs_full),
            "bootstrap_signatures": [None if b is None else list(b) for b in self.boot_indices],
            "selection_patients": list(self.selection_patients),
            "seed_null_indices": None if self.seed_indices is None else list(self.seed_indices),
            "seed_null_bootstrap_signatures": [None if b is None else list(b) for b in self.seed_boot_indices],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignatureRecord:
        """Rebuild a record written by :meth:`to_json`."""

        def num(v: Any) -> float:
            return float("nan") if v is None else float(v)

        def metrics(d: Mapping[str, Any]) -> dict[str, float]:
            return {str(k): num(v) for k, v in d.items()}

        freq = data.get("stability_frequencies")
        return cls(
            arm=str(data["arm"]),
            fold=str(data["fold"]),
            indices=tuple(int(i) for i in data["indices"]),
            lasso_indices=tuple(int(i) for i in data["lasso_indices"]),
            lam=num(data["lambda"]),
            c=num(data["C"]),
            metrics_full=metrics(data["metrics_full"]),
            metrics_signature=metrics(data["metrics_signature"]),
            auc_lasso=num(data["auc_lasso"]),
            auc_network=num(data["auc_network"]),
            n_train=int(data["n_train"]),
            n_test=int(data["n_test"]),
            n_train_patients=int(data["n_train_patients"]),
            n_test_patients=int(data["n_test_patients"]),
            n_dims=int(data["n_dims"]),
            frequencies=None if freq is None else {int(k): float(v) for k, v in freq.items()},
            vs_full=metrics(data.get("vs_full") or {}),
            boot_indices=_signature_list(data.get("bootstrap_signatures")),
            selection_patients=tuple(str(p) for p in data.get("selection_patients") or []),
            seed_indices=None if data.get("seed_null_indices") is None else tuple(int(i) for i in data["seed_null_indices"]),
            seed_boot_indices=_signature_list(data.get("seed_null_bootstrap_signatures")),
        )


def _signature_list(values: Any) -> tuple[tuple[int, ...] | None, ...]:
    return tuple(None if b is None else tuple(int(i) for i in b) for b in values or [])


@dataclass(frozen=True)
class ArmJaccard:
    """Cross-fold reproducibility of one arm's signatures, with the chance level of every pair.

    ``matrix`` holds the Jaccard values, ``chance`` the expected Jaccard of random subsets of the same
    sizes in ``n_dims`` dimensions (:func:`expected_jaccard`), ``corrected`` ``(J − E[J]) / (1 − E[J])``.
    """

    arm: str
    folds: tuple[str, ...]
    matrix: FloatArray
    chance: FloatArray
    corrected: FloatArray
    n_dims: int = 0
    #: Mean off-diagonal Jaccard of each selection-patient bootstrap resample (resample b of every fold).
    boot_means: tuple[float, ...] = ()

    def mean_interval(self, alpha: float = 0.05) -> tuple[float, float]:
        """Percentile interval of the mean off-diagonal Jaccard over the bootstrap (nan without one)."""
        values = [v for v in self.boot_means if np.isfinite(v)]
        if len(values) < 2:
            return (float("nan"), float("nan"))
        lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
        return (float(lo), float(hi))

    @property
    def mean_off_diagonal(self) -> float:
        """Mean Jaccard over all pairs of different folds (nan pairs left out; nan with none)."""
        return mean_off_diagonal(self.matrix)

    @property
    def mean_chance(self) -> float:
        """Mean chance Jaccard over the pairs."""
        return mean_off_diagonal(self.chance)

    @property
    def mean_corrected(self) -> float:
        """Mean chance-corrected Jaccard over the pairs."""
        return mean_off_diagonal(self.corrected)

    def pairs(self) -> list[tuple[str, str, float, float, float]]:
        """``(fold_a, fold_b, jaccard, jaccard_chance, jaccard_corrected)`` for every pair ``a < b``."""
        k = len(self.folds)
        return [
            (self.folds[i], self.folds[j], float(self.matrix[i, j]), float(self.chance[i, j]), float(self.corrected[i, j]))
            for i in range(k)
            for j in range(i + 1, k)
        ]


def arm_jaccards(records: Sequence[SignatureRecord]) -> list[ArmJaccard]:
    """Pairwise Jaccard, chance and corrected matrices of the fold signatures of each arm (record order)."""
    arms: dict[str, list[SignatureRecord]] = {}
    for rec in records:
        arms.setdefault(rec.arm, []).append(rec)
    out = []
    for arm, recs in arms.items():
        matrix = jaccard_matrix([r.indices for r in recs])
        k = len(recs)
        chance = np.full((k, k), np.nan)
        corrected = np.full((k, k), np.nan)
        dims = {r.n_dims for r in recs}
        if len(dims) > 1:
            raise DatasetError(f"arm {arm!r}: folds have different embedding sizes {sorted(dims)}")
        d = dims.pop()
        for i in range(k):
            for j in range(k):
                chance[i, j] = expected_jaccard(recs[i].size, recs[j].size, d)
                corrected[i, j] = corrected_jaccard(matrix[i, j], chance[i, j])
        n_boot = min((len(r.boot_indices) for r in recs), default=0)
        boot_means = []
        for b in range(n_boot):
            signatures = [r.boot_indices[b] for r in recs]
            if any(sig is None for sig in signatures):
                continue
            boot_means.append(mean_off_diagonal(jaccard_matrix([sig or () for sig in signatures])))
        out.append(ArmJaccard(arm, tuple(r.fold for r in recs), matrix, chance, corrected, d, tuple(boot_means)))
    return out


#: Columns of ``seed_null.csv``: per arm and fold (and ``overall``), the seed-to-seed Jaccard, the
#: cross-magnification Jaccard and their paired difference, each with a selection-patient bootstrap interval.
SEED_NULL_COLUMNS = (
    "arm",
    "fold",
    "jaccard_seed",
    "jaccard_seed_ci_low",
    "jaccard_seed_ci_high",
    "jaccard_cross",
    "jaccard_cross_ci_low",
    "jaccard_cross_ci_high",
    "difference",
    "difference_ci_low",
    "difference_ci_high",
    "n_bootstrap",
    "verdict",
)


@dataclass(frozen=True)
class SeedNullRow:
    """Cross-magnification vs seed-to-seed stability of one fold (or ``overall``: the mean over an arm's folds).

    ``jaccard_seed`` is the Jaccard of the fold's signature with that of the same fold's encoder trained
    with a second seed; ``jaccard_cross`` the mean Jaccard of the fold's signature with the other
    held-out magnifications' of the same patient split; ``difference`` = cross − seed. Intervals are 95%
    percentiles over the selection-patient bootstrap, paired: resample b re-selects every signature on
    the same drawn patients. ``verdict`` says in words what the difference's interval supports.
    """

    arm: str
    fold: str
    seed: tuple[float, float, float]
    cross: tuple[float, float, float]
    difference: tuple[float, float, float]
    n_bootstrap: int
    verdict: str

    def row(self) -> list[object]:
        """The ``seed_null.csv`` row (:data:`SEED_NULL_COLUMNS`)."""
        return [self.arm, self.fold, *self.seed, *self.cross, *self.difference, self.n_bootstrap, self.verdict]


def _percentile(values: Sequence[float], alpha: float = 0.05) -> tuple[float, float]:
    finite = [v for v in values if np.isfinite(v)]
    if len(finite) < 2:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _mean_if_all(values: Sequence[float]) -> float:
    """Mean of ``values`` when every one is finite (a resample some fold could not use is dropped), else nan."""
    return float(np.mean(values)) if all(np.isfinite(values)) else float("nan")


def seed_null_verdict(difference: tuple[float, float, float]) -> str:
    """The words for a paired difference (cross − seed Jaccard) and its 95% interval."""
    est, lo, hi = difference
    if not np.isfinite(est):
        return "not estimable (empty signatures, or no other fold to compare with)"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval (--bootstrap 0, or too few usable resamples): no claim either way"
    if lo > 0:
        return "cross-magnification stability exceeds seed-to-seed stability (the difference's 95% interval lies above 0)"
    if hi < 0:
        return "cross-magnification stability is below seed-to-seed stability (the difference's 95% interval lies below 0)"
    return "no evidence that cross-magnification stability exceeds seed-to-seed stability (the difference's 95% interval covers 0)"


def _split_of(fold: str) -> str:
    """The patient split a fold belongs to (``patient_fold_<i>`` or the single split)."""
    return fold.rsplit("/", 1)[0] if "/" in fold else ""


def _jac(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> float:
    return float("nan") if a is None or b is None else jaccard(a, b)


def seed_null_rows(records: Sequence[SignatureRecord]) -> list[SeedNullRow]:
    """Per arm, a :class:`SeedNullRow` for every fold with a second-seed signature, then the arm's ``overall`` row.

    Arms without any second seed give no rows (the report says the seed null was not computed).
    """
    arms: dict[str, list[SignatureRecord]] = {}
    for rec in records:
        arms.setdefault(rec.arm, []).append(rec)
    out: list[SeedNullRow] = []
    for arm, recs in arms.items():
        with_seed = [r for r in recs if r.seed_indices is not None]
        if not with_seed:
            continue
        per_fold: list[tuple[list[float], list[float], list[float]]] = []
        n_boot = min(len(r.boot_indices) for r in recs)
        n_boot = min([n_boot] + [len(r.seed_boot_indices) for r in with_seed])
        for rec in with_seed:
            peers = [r for r in recs if r is not rec and _split_of(r.fold) == _split_of(rec.fold)]
            seed_b = [_jac(rec.boot_indices[b], rec.seed_boot_indices[b]) for b in range(n_boot)]
            cross_b = [_nanmean([_jac(rec.boot_indices[b], p.boot_indices[b]) for p in peers]) for b in range(n_boot)]
            diff_b = [c - s for c, s in zip(cross_b, seed_b, strict=True)]
            est_seed = _jac(rec.indices, rec.seed_indices)
            est_cross = _nanmean([_jac(rec.indices, p.indices) for p in peers])
            diff = (est_cross - est_seed, *_percentile(diff_b))
            n_used = sum(np.isfinite(d) for d in diff_b)
            out.append(SeedNullRow(arm, rec.fold, (est_seed, *_percentile(seed_b)), (est_cross, *_percentile(cross_b)),
                                   diff, int(n_used), seed_null_verdict(diff)))
            if np.isfinite(diff[0]):  # the overall row averages the folds where both Jaccards are defined
                per_fold.append((seed_b, cross_b, diff_b))
        rows = [r for r in out[-len(with_seed):] if np.isfinite(r.difference[0])]
        overall = [[_mean_if_all([fold[k][b] for fold in per_fold]) for b in range(n_boot)] for k in range(3)]
        seed = (_nanmean([r.seed[0] for r in rows]), *_percentile(overall[0]))
        cross = (_nanmean([r.cross[0] for r in rows]), *_percentile(overall[1]))
        diff = (_nanmean([r.difference[0] for r in rows]), *_percentile(overall[2]))
        n_used = sum(np.isfinite(d) for d in overall[2])
        out.append(SeedNullRow(arm, "overall", seed, cross, diff, int(n_used), seed_null_verdict(diff)))
    return out
