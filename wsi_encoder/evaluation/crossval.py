"""Patient-grouped, stratified k-fold cross-validation of slide classifiers, with honest metrics.

* Outer folds: :class:`sklearn.model_selection.StratifiedGroupKFold` over patients, so a patient's
  slides are never on both sides of a split.
* Inner validation: the same splitter on the training part of each fold sets aside about
  ``val_fraction`` of its patients for early stopping / model selection.
* Every slide gets exactly one out-of-fold prediction, from the fold where it was tested. Metrics are
  reported per fold, as mean ± sd over folds, and on the pooled out-of-fold predictions with
  percentile-bootstrap 95% intervals that resample whole patients.
* A final model is refit on all slides with what the folds selected (median best epoch, most chosen C).
* ``scheme="rotate4"`` is the protocol of Tellez et al. (TPAMI 2019) instead: 4 patient partitions,
  2 train, 1 validates, 1 tests, rotating; the final model averages the 4 fold models.
* Finished folds are saved in ``state_dir`` and reused when the same run is restarted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.evaluation.metrics import classification_metrics
from wsi_encoder.io.files import atomic_write_json
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.classifier_files import MODEL_JSON, load_model, save_model
from wsi_encoder.models.slide_classifiers import FitInfo, SlideClassifier, create_slide_classifier
from wsi_encoder.models.slide_classifiers.ensemble import FoldEnsemble

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
#: Metrics of the report (``accuracy`` is kept too, as the last one).
REPORTED = ("auc", "f1", "balanced_accuracy", "brier", "ece", "accuracy")


class Take(Sequence[SlideBag]):
    """The items of ``bags`` at ``indices``, loaded lazily."""

    def __init__(self, bags: Sequence[SlideBag], indices: npt.ArrayLike) -> None:
        self.bags = bags
        self.indices = [int(i) for i in np.asarray(indices).ravel()]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> SlideBag:  # type: ignore[override]
        return self.bags[self.indices[i]]

    def __iter__(self) -> Iterator[SlideBag]:
        for i in self.indices:
            yield self.bags[i]


@dataclass(frozen=True)
class FoldResult:
    """One outer fold: its slides (positions), the fit, and its test metrics."""

    fold: int
    train_index: tuple[int, ...]
    val_index: tuple[int, ...]
    test_index: tuple[int, ...]
    n_test_patients: int
    fit: FitInfo
    metrics: dict[str, float]
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        """Sizes, fit outcome and metrics (NaN → null)."""
        return {
            "fold": self.fold,
            "n_train": len(self.train_index),
            "n_val": len(self.val_index),
            "n_test": len(self.test_index),
            "n_test_patients": self.n_test_patients,
            "fit": self.fit.to_json(),
            "metrics": nan_to_none(self.metrics),
        }


@dataclass(frozen=True)
class CrossValResult:
    """Out-of-fold predictions, per-fold and pooled metrics, and the model refit on all slides."""

    model: str
    config: dict[str, Any]
    folds: int
    seed: int
    oof_prob: FloatArray
    fold_of: IntArray
    fold_results: tuple[FoldResult, ...]
    mean: dict[str, float]
    sd: dict[str, float]
    pooled: dict[str, float]
    pooled_ci95: dict[str, tuple[float, float]]
    n_boot: int
    refit_params: dict[str, Any]
    final_model: SlideClassifier | FoldEnsemble | None
    final_fit: FitInfo | None
    scheme: str = "kfold"

    def summary_json(self) -> dict[str, Any]:
        """The metrics part of ``metrics.json``."""
        return {
            "per_fold": [f.to_json() for f in self.fold_results],
            "mean": nan_to_none(self.mean),
            "sd": nan_to_none(self.sd),
            "pooled": nan_to_none(self.pooled),
            "pooled_ci95": {k: nan_to_none(list(v)) for k, v in self.pooled_ci95.items()},
            "bootstrap": {"n_boot": self.n_boot, "unit": "patient", "interval": "percentile 95%"},
            "refit": {"params": self.refit_params, "fit": None if self.final_fit is None else self.final_fit.to_json()},
            "cv_scheme": self.scheme,
        }


def nan_to_none(value: Any) -> Any:
    """Replace NaN floats by None (JSON null) in dicts/lists."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _patients_per_class(y: IntArray, groups: npt.NDArray[Any]) -> dict[int, int]:
    return {int(c): len(set(groups[y == c])) for c in np.unique(y)}


def patient_folds(y: npt.ArrayLike, groups: npt.ArrayLike, folds: int, seed: int) -> list[tuple[IntArray, IntArray]]:
    """Outer ``(train, test)`` position arrays, stratified by class and grouped by patient.

    Raises
    ------
    InvalidParameterError
        When ``folds < 2`` or a class has fewer patients than folds.
    """
    y, groups = np.asarray(y, dtype=np.int64), np.asarray(groups)
    if folds < 2:
        raise InvalidParameterError(f"--folds must be at least 2, got {folds!r}")
    per_class = _patients_per_class(y, groups)
    smallest = min(per_class.values())
    if smallest < folds:
        raise InvalidParameterError(
            f"a class has only {smallest} patient(s) (patients per class index: {per_class}); "
            f"use --folds {max(2, smallest)} or fewer, or label more patients"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.asarray(tr, np.int64), np.asarray(te, np.int64)) for tr, te in splitter.split(np.zeros(len(y)), y, groups)]


#: Cross-validation schemes: ``kfold`` (k outer folds, an inner validation split in each) and ``rotate4``.
CV_SCHEMES = ("kfold", "rotate4")


def rotating_folds(y: npt.ArrayLike, groups: npt.ArrayLike, seed: int) -> list[tuple[IntArray, IntArray, IntArray]]:
    """The ``rotate4`` scheme of Tellez et al. (TPAMI 2019): ``(train, val, test)`` position arrays of 4 folds.

    The patients are cut into 4 stratified partitions P0..P3; fold ``k`` tests on ``P[k]``, validates on
    ``P[k+1]`` and trains on the other two (indices mod 4), so every partition is tested once and
    validates once.

    Raises
    ------
    InvalidParameterError
        A class has fewer than 4 patients.
    """
    parts = [test for _, test in patient_folds(y, groups, 4, seed)]
    return [
        (np.sort(np.concatenate([parts[(k + 2) % 4], parts[(k + 3) % 4]])), parts[(k + 1) % 4], parts[k])
        for k in range(4)
    ]


def _fold_plan(
    y: IntArray, groups: npt.NDArray[Any], folds: int, seed: int, val_fraction: float, scheme: str
) -> list[tuple[IntArray, IntArray, IntArray]]:
    """``(train, val, test)`` per outer fold under ``scheme``."""
    if scheme == "rotate4":
        return rotating_folds(y, groups, seed)
    if scheme != "kfold":
        raise InvalidParameterError(f"unknown --cv-scheme {scheme!r}; choose from {', '.join(CV_SCHEMES)}")
    plan = []
    for fold, (train_all, test) in enumerate(patient_folds(y, groups, folds, seed)):
        inner_train, inner_val = inner_split(y[train_all], groups[train_all], val_fraction, seed + 1000 + fold)
        plan.append((train_all[inner_train], train_all[inner_val], test))
    return plan


def inner_split(
    y: npt.ArrayLike, groups: npt.ArrayLike, val_fraction: float, seed: int
) -> tuple[IntArray, IntArray]:
    """Split positions into ``(train, val)`` by patient, stratified, about ``val_fraction`` for validation.

    Returns an empty validation set when a class has fewer than 2 patients (nothing can be held out).
    """
    y, groups = np.asarray(y, dtype=np.int64), np.asarray(groups)
    everything = np.arange(len(y))
    if val_fraction <= 0:
        return everything, everything[:0]
    n_splits = min(max(2, round(1 / val_fraction)), min(_patients_per_class(y, groups).values()))
    if n_splits < 2:
        logger.info("too few patients per class for an inner validation split; training without early stopping")
        return everything, everything[:0]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(y)), y, groups))
    return np.asarray(train, np.int64), np.asarray(val, np.int64)


def binary_or_multi(prob: FloatArray) -> FloatArray:
    """``prob[:, 1]`` for two classes (what the binary metrics take), the ``(n, k)`` matrix otherwise."""
    return prob[:, 1] if prob.shape[1] == 2 else prob


def bootstrap_metrics(
    y: IntArray, prob: FloatArray, groups: npt.ArrayLike, n_boot: int, seed: int, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric, resampling whole patients (``groups``)."""
    if n_boot < 1:
        return {m: (float("nan"), float("nan")) for m in REPORTED}
    rng = np.random.default_rng(seed)
    g = np.asarray(groups)
    units = [np.flatnonzero(g == u) for u in np.unique(g)]
    values: dict[str, list[float]] = {m: [] for m in REPORTED}
    p = binary_or_multi(prob)
    for _ in range(n_boot):
        idx = np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))])
        if len(np.unique(y[idx])) < 2:
            continue
        for name, value in classification_metrics(y[idx], p[idx]).items():
            if name in values and np.isfinite(value):
                values[name].append(value)
    return {
        m: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))) if v else (float("nan"), float("nan"))
        for m, v in values.items()
    }


def _save_fold(state_dir: Path, key: str, result: FoldResult, prob: FloatArray) -> None:
    record = {
        "key": key,
        "fold": result.fold,
        "train_index": list(result.train_index),
        "val_index": list(result.val_index),
        "test_index": list(result.test_index),
        "prob": prob.tolist(),
        "fit": result.fit.to_json(),
    }
    atomic_write_json(state_dir / f"fold_{result.fold}.json", record, indent=None)


def _load_fold(state_dir: Path | None, key: str, fold: int, test: IntArray) -> dict[str, Any] | None:
    if state_dir is None:
        return None
    path = state_dir / f"fold_{fold}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key or record.get("test_index") != test.tolist():
        return None
    return record


def cross_validate(
    bags: Sequence[SlideBag],
    y: npt.ArrayLike,
    groups: npt.ArrayLike,
    model: str,
    *,
    num_classes: int | None = None,
    config: dict[str, Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    val_fraction: float = 0.2,
    n_boot: int = 1000,
    refit: bool = True,
    state_dir: str | Path | None = None,
    resume_key: str = "",
    on_fold: Callable[[FoldResult], None] | None = None,
    scheme: str = "kfold",
) -> CrossValResult:
    """Cross-validate ``model`` on ``bags`` and refit it on all of them.

    Parameters
    ----------
    bags
        One :class:`SlideBag` per slide (a lazy sequence is fine).
    y
        Class index per slide.
    groups
        Patient id per slide.
    model
        Registered slide-classifier name (``gridcnn``, ``abmil``, ``linear``).
    num_classes
        Number of classes (default ``max(y) + 1``).
    config
        Overrides of the model's default config.
    folds, seed
        Outer folds and the seed of splits, initialisation and batch order.
    device
        Torch device for the torch models.
    val_fraction
        Share of each training fold's patients used for early stopping / model selection.
    n_boot
        Bootstrap resamples for the pooled confidence intervals (0: none).
    refit
        Also train the final model on all slides.
    state_dir, resume_key
        Finished folds are saved there under ``resume_key`` and reused when the key matches.
    on_fold
        Called after each fold (progress).
    scheme
        ``kfold`` (``folds`` outer folds, an inner validation split of ``val_fraction`` in each; the
        final model is refit on all slides) or ``rotate4`` (:func:`rotating_folds`; ``folds`` and
        ``val_fraction`` do not apply; the final model is the :class:`FoldEnsemble` of the 4 fold
        models, saved in ``state_dir`` so that a restarted run reuses them).
    """
    y = np.asarray(y, dtype=np.int64)
    groups = np.asarray(groups).astype(str)
    if len(bags) != len(y) or len(groups) != len(y):
        raise InvalidParameterError(f"{len(bags)} slides, {len(y)} labels and {len(groups)} patient ids do not match")
    k = int(num_classes or y.max() + 1)
    in_dim = int(bags[0].features.shape[1])
    state = Path(state_dir) if state_dir is not None else None
    probe = create_slide_classifier(model, in_dim, k, config, device)
    oof = np.full((len(y), k), np.nan)
    fold_of = np.full(len(y), -1, dtype=np.int64)
    results: list[FoldResult] = []
    members: list[SlideClassifier[Any]] = []
    for fold, (train, val, test) in enumerate(_fold_plan(y, groups, folds, seed, val_fraction, scheme)):
        record = _load_fold(state, resume_key, fold, test)
        member_dir = None if state is None else state / f"fold_{fold}_model"
        clf: SlideClassifier[Any] | None = None
        if record is not None and scheme == "rotate4":
            clf = _load_member(member_dir, device)
            record = None if clf is None else record
        if record is not None:
            prob = np.asarray(record["prob"], dtype=float)
            fit = FitInfo(**record["fit"])
            train, val = np.asarray(record["train_index"], np.int64), np.asarray(record["val_index"], np.int64)
            resumed = True
            logger.info("fold %d: reusing the saved result in %s", fold, state)
        else:
            clf = create_slide_classifier(model, in_dim, k, probe.config, device)
            fit = clf.fit(
                Take(bags, train), y[train], Take(bags, val) if len(val) else None, y[val] if len(val) else None,
                seed=seed + 1 + fold,
            )
            prob = clf.predict_proba(Take(bags, test))
            resumed = False
        oof[test] = prob
        fold_of[test] = fold
        result = FoldResult(
            fold=fold,
            train_index=tuple(int(i) for i in train),
            val_index=tuple(int(i) for i in val),
            test_index=tuple(int(i) for i in test),
            n_test_patients=len(set(groups[test])),
            fit=fit,
            metrics=classification_metrics(y[test], binary_or_multi(prob)),
            resumed=resumed,
        )
        if state is not None and not resumed:
            if scheme == "rotate4" and member_dir is not None and clf is not None:
                save_model(clf, member_dir, {"fold": fold})  # before the record that says the fold is done
            _save_fold(state, resume_key, result, prob)
        if scheme == "rotate4" and clf is not None:
            members.append(clf)
        results.append(result)
        logger.info("fold %d: %d test slides, AUC %.3f", fold, len(test), result.metrics["auc"])
        if on_fold is not None:
            on_fold(result)
    per_fold = {m: np.array([r.metrics[m] for r in results], dtype=float) for m in REPORTED}
    mean = {m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in per_fold.items()}
    sd = {m: float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan") for m, v in per_fold.items()}
    pooled_all = classification_metrics(y, binary_or_multi(oof))
    pooled = {m: pooled_all[m] for m in REPORTED}
    ci = bootstrap_metrics(y, oof, groups, n_boot, seed)
    params = type(probe).refit_params([r.fit for r in results])
    final_model: SlideClassifier[Any] | FoldEnsemble | None = None
    final_fit = None
    if scheme == "rotate4":
        params = {"ensemble": len(members)}
        final_model = FoldEnsemble(members) if refit else None
        logger.info("final %s model: the mean of the %d fold models (rotate4)", model, len(members))
    elif refit:
        final_model = create_slide_classifier(model, in_dim, k, probe.config, device)
        final_fit = final_model.fit(bags, y, None, None, seed=seed, refit=params)
        logger.info("final %s model refit on all %d slides with %s", model, len(y), params)
    return CrossValResult(
        model=model,
        config=probe.describe()["config"],
        folds=len(results),
        seed=seed,
        oof_prob=oof,
        fold_of=fold_of,
        fold_results=tuple(results),
        mean=mean,
        sd=sd,
        pooled=pooled,
        pooled_ci95=ci,
        n_boot=n_boot,
        refit_params=params,
        final_model=final_model,
        final_fit=final_fit,
        scheme=scheme,
    )


def _load_member(folder: Path | None, device: str) -> SlideClassifier[Any] | None:
    """A saved ``rotate4`` fold model, or None when it is missing or unreadable (the fold is then retrained)."""
    if folder is None or not (folder / MODEL_JSON).is_file():
        return None
    try:
        model, _ = load_model(folder, device)
    except CheckpointError:
        return None
    return model if isinstance(model, SlideClassifier) else None
