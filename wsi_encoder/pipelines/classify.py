"""Slide-level models on an embedding store: cross-validated training (prediction: :mod:`.classify_predict`).

Two calls do the whole job::

    result = train_classifier("embeddings.zarr", "labels.csv", "abmil", "runs/abmil", folds=5, seed=0)
    pooled_auc = result.metrics["pooled"]["auc"]
    # then, with wsi_encoder.pipelines.classify_predict.predict:
    predict("new_embeddings.zarr", "runs/abmil", "runs/new_predictions.csv", heatmap_dir="runs/heatmaps")

``train_classifier`` writes into ``out_dir``: ``metrics.json``, ``predictions.csv`` (out-of-fold),
``roc.png``, ``calibration.png``, the final model (``model.safetensors`` + ``model.json``) and
``cv_state/`` (finished folds, reused when the same run is restarted).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder import __version__
from wsi_encoder.errors import InvalidParameterError, WsiEncoderError
from wsi_encoder.evaluation.crossval import (
    CrossValResult,
    FoldResult,
    binary_or_multi,
    bootstrap_metrics,
    cross_validate,
    nan_to_none,
)
from wsi_encoder.evaluation.metrics import classification_metrics, regression_bootstrap, regression_metrics
from wsi_encoder.evaluation.outcome_plots import plot_kaplan_meier, plot_predicted_vs_true, risk_groups
from wsi_encoder.evaluation.plots import plot_reliability, plot_roc
from wsi_encoder.evaluation.regression_cv import RegressionCVResult, cross_validate_regression
from wsi_encoder.evaluation.survival_cv import SurvivalCVResult, cross_validate_survival, held_out_report
from wsi_encoder.io.embedding_store import EmbeddingStore
from wsi_encoder.io.files import atomic_write_csv, atomic_write_json
from wsi_encoder.io.labels import LabelTable, TargetTable, read_labels, read_targets
from wsi_encoder.io.urls import normalize
from wsi_encoder.models.classifier_files import save_model
from wsi_encoder.models.outcome_files import save_outcome_model
from wsi_encoder.models.slide_classifiers import (
    config_fields,
    model_preset,
    slide_classifier_class,
    torch_threads,
)
from wsi_encoder.models.slide_classifiers.regressors import create_regressor
from wsi_encoder.models.slide_classifiers.survival import create_cox_model

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ClassifyResult:
    """What :func:`train_classifier` wrote and measured."""

    out_dir: Path
    metrics: dict[str, Any]
    crossval: CrossValResult
    labels: LabelTable
    files: dict[str, Path]


# ---------------------------------------------------------------------------------------------- provenance
#: Patch-store attributes that say how the training slides were tiled (recorded in ``model.json``).
TILING_KEYS = (
    "target_mpp", "tile_size", "stride", "mpp_tolerance", "tissue_threshold", "thumbnail_size", "tissue_method",
    "codec", "jpeg_quality", "edge",
)  # fmt: skip
PROVENANCE_FORMAT = 1


def training_provenance(reader: EmbeddingStore, slide_ids: Sequence[str]) -> dict[str, Any]:
    """How the training embeddings were made: encoder (name, spec, weights sha256, config) and tile spec.

    Read from each slide's embedding-store attributes (and its patch store's, for stores written before
    they were copied). ``tiling`` is None, with ``tiling_note`` saying why, when the slides were tiled
    differently or the stores do not record it; ``wsienc predict`` then asks for the tile spec explicitly.
    """
    tilings: dict[str, list[str]] = {}
    encoder: dict[str, Any] = {}
    dtypes: set[str] = set()
    for sid in slide_ids:
        attrs = reader.source_attrs(sid)
        tiling = {key: attrs.get(key) for key in TILING_KEYS}
        tilings.setdefault(json.dumps(tiling, sort_keys=True), []).append(sid)
        enc = attrs.get("encoder") or {}
        if not encoder:
            encoder = {key: enc.get(key) for key in ("name", "spec", "weights_sha256", "config")}
            spec = Path(str(enc.get("spec") or ""))
            # A checkpoint folder is recorded as given to `encode` (maybe relative): keep where it is now too.
            encoder["folder"] = str(spec.resolve()) if enc.get("spec") and spec.is_dir() else None
        if attrs.get("dtype"):
            dtypes.add(str(attrs["dtype"]))
    note = None
    tiling_record: dict[str, Any] | None = None
    if len(tilings) == 1:
        tiling_record = json.loads(next(iter(tilings)))
        missing = [k for k in ("target_mpp", "tile_size", "stride") if tiling_record.get(k) is None]
        if missing:
            note = f"the embedding store does not record {', '.join(missing)} (written by an older wsienc?)"
            tiling_record = None
    elif tilings:
        groups = sorted(tilings.items(), key=lambda kv: -len(kv[1]))
        note = "training slides were tiled differently: " + "; ".join(
            f"{len(ids)} slide(s) (e.g. {ids[0]}) with {json.loads(key)}" for key, ids in groups[:3]
        )
    if note:
        logger.warning("model provenance: %s; `wsienc predict` will need --mpp/--tile-size/--stride", note)
    return {
        "format": PROVENANCE_FORMAT,
        "encoder": {**encoder, "embedding_dim": reader.embedding_dim, "dtype": dtypes.pop() if len(dtypes) == 1 else None},
        "tiling": tiling_record,
        "tiling_note": note,
    }


# ---------------------------------------------------------------------------------------------- train
def _model_overrides(
    model: str, preset: str | None, params: dict[str, Any] | None, epochs: int | None
) -> dict[str, Any]:
    """A model's config overrides, for every target: its preset, then ``params``, then ``epochs`` where it has them."""
    overrides = {**model_preset(model, preset), **dict(params or {})}
    if epochs is not None:
        if "epochs" in config_fields(slide_classifier_class(model).Config):
            overrides["epochs"] = epochs
        else:
            logger.warning("--epochs does not apply to the %s model; ignored", model)
    return overrides


def _kfold_only(cv_scheme: str, target: str) -> None:
    """Refuse a CV scheme other than ``kfold`` for ``target`` (rotate4 is built for classification)."""
    if cv_scheme != "kfold":
        raise InvalidParameterError(f"--cv-scheme {cv_scheme} is for classification only; {target} uses kfold")


def _resume_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _predictions_rows(
    table: LabelTable, prob: npt.NDArray[np.float64], folds: Sequence[Any]
) -> tuple[list[str], list[list[Any]]]:
    header = ["slide_id", "label", "prob", "fold", "patient_id", "pred"]
    multi = table.n_classes > 2
    if multi:
        header += [f"prob_{c}" for c in table.classes]
    rows = []
    for i, sid in enumerate(table.slide_ids):
        p = prob[i]
        value = p[1] if not multi else p.max()
        row = [sid, table.labels[i], f"{value:.6f}", folds[i], table.patient_ids[i], table.classes[int(p.argmax())]]
        if multi:
            row += [f"{v:.6f}" for v in p]
        rows.append(row)
    return header, rows


def _plots(out: Path, suffix: str, y: npt.NDArray[np.int64], prob: npt.NDArray[np.float64], classes: Sequence[str],
           title: str, fold_of: npt.NDArray[np.int64] | None) -> dict[str, Path]:
    files = {}
    p = binary_or_multi(prob)
    if len(np.unique(y)) >= 2:
        files[f"roc{suffix}"] = plot_roc(y, p, out / f"roc{suffix}.png", classes=classes, fold_of=fold_of, title=title)
    files[f"calibration{suffix}"] = plot_reliability(y, p, out / f"calibration{suffix}.png", title=title)
    return files


def train_classifier(
    embedding_store: str | Path,
    labels_csv: str | Path,
    model: str = "linear",
    out_dir: str | Path = "classify_out",
    folds: int = 5,
    seed: int = 0,
    *,
    epochs: int | None = None,
    params: dict[str, Any] | None = None,
    allow_missing: bool = False,
    positive_class: str | None = None,
    device: str = "auto",
    val_fraction: float = 0.2,
    n_boot: int = 1000,
    threads: int | None = None,
    on_fold: Callable[[FoldResult], None] | None = None,
    preset: str | None = None,
    cv_scheme: str = "kfold",
) -> ClassifyResult:
    """Cross-validate a slide classifier, refit it on all training slides, and write the report.

    Parameters
    ----------
    embedding_store
        ``embeddings.zarr`` written by ``wsienc encode`` (or any store with that layout).
    labels_csv
        ``slide_id,label[,patient_id][,split]``; ``split=test`` rows are held out of cross-validation
        and scored once by the final model.
    model
        ``gridcnn``, ``abmil`` or ``linear``.
    out_dir
        Output folder (created).
    folds, seed
        Patient-grouped stratified folds and the seed of everything random.
    epochs
        Maximum epochs of the torch models (shortcut for ``params["epochs"]``; ignored by ``linear``).
    params
        Overrides of the model's config (see ``docs/classify.md``).
    allow_missing
        Skip, with a warning, slides that are only in the CSV or only in the store.
    positive_class
        For binary labels, the class reported as positive (``prob`` column, ROC).
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
    val_fraction
        Share of each training fold's patients used for early stopping / selecting ``C``.
    n_boot
        Bootstrap resamples (of patients) for the 95% intervals of the pooled metrics.
    threads
        Torch CPU threads while training (None: torch's default).
    on_fold
        Called after every fold (progress).
    preset
        Named settings of the model (``gridcnn``: ``light`` or ``tellez2019``, the TPAMI 2019 network and
        protocol); ``params`` override them one by one.
    cv_scheme
        ``kfold`` (``folds`` folds, an inner validation split, a final model refit on all slides) or
        ``rotate4`` (TPAMI 2019: 4 patient partitions, 2 train / 1 validate / 1 test, rotating; the final
        model averages the 4 fold models; ``folds`` and ``val_fraction`` do not apply).
    """
    out = Path(out_dir)
    reader = EmbeddingStore.open(embedding_store)
    table = read_labels(
        labels_csv, reader.slide_ids, store_name=str(embedding_store), allow_missing=allow_missing,
        positive_class=positive_class, store_skipped=reader.skipped,
    )
    encoder = reader.encoder_identity()
    cls = slide_classifier_class(model)
    overrides = _model_overrides(model, preset, params, epochs)
    train = table.select("train")
    test = table.select("test")
    dihedral = cls.uses_dihedral and reader.all_dihedral(train.slide_ids + test.slide_ids)
    bags = reader.bags(train.slide_ids, dihedral=dihedral)
    in_dim = reader.embedding_dim
    key = _resume_key(
        model=model, config=overrides, folds=folds, seed=seed, val_fraction=val_fraction, slides=train.slide_ids,
        **({"cv_scheme": cv_scheme} if cv_scheme != "kfold" else {}),
        labels=train.labels, patients=train.patient_ids, classes=table.classes, encoder=encoder, in_dim=in_dim,
    )
    logger.info("%s: %d training slides (%d patients), %d test slides, classes %s",
                model, len(train.slide_ids), len(set(train.patient_ids)), len(test.slide_ids), table.classes)
    with torch_threads(threads):
        cv = cross_validate(
            bags, train.y, train.patient_ids, model, num_classes=table.n_classes, config=overrides, folds=folds,
            seed=seed, device=device, val_fraction=val_fraction, n_boot=n_boot, state_dir=out / "cv_state",
            resume_key=key, on_fold=on_fold, scheme=cv_scheme,
        )
    if cv.final_model is None:  # cross_validate refits by default
        raise WsiEncoderError("internal: no final model was refit")
    files: dict[str, Path] = {}
    meta = {
        "classes": list(table.classes),
        "class_index": table.class_index,
        "positive_class": table.classes[1] if table.n_classes == 2 else None,
        "encoder": encoder,
        "embedding_store": str(normalize(embedding_store)),
        "labels": str(Path(labels_csv).resolve()),
        "n_training_slides": len(train.slide_ids),
        "seed": seed,
        "refit": cv.refit_params,
        "cv_scheme": cv_scheme,
        "provenance": training_provenance(reader, train.slide_ids + test.slide_ids),
    }
    files["model"] = save_model(cv.final_model, out, meta)
    prob_rows = cv.oof_prob
    fold_labels: list[Any] = [int(f) for f in cv.fold_of]
    test_report = None
    title = (
        f"{model}, rotate4 patient-grouped CV (out-of-fold)" if cv_scheme == "rotate4"
        else f"{model}, {folds}-fold patient-grouped CV (out-of-fold)"
    )
    files.update(_plots(out, "", train.y, cv.oof_prob, table.classes, title, cv.fold_of))
    if test.slide_ids:
        test_prob = cv.final_model.predict_proba(reader.bags(test.slide_ids, dihedral=dihedral))
        y_test = test.y
        test_report = {
            "n_slides": len(test.slide_ids),
            "n_patients": len(set(test.patient_ids)),
            "metrics": nan_to_none(classification_metrics(y_test, binary_or_multi(test_prob))),
            "ci95": {k: nan_to_none(list(v)) for k, v in bootstrap_metrics(y_test, test_prob, test.patient_ids, n_boot, seed).items()},
        }
        files.update(_plots(out, "_test", y_test, test_prob, table.classes, f"{model}, held-out test split", None))
        prob_rows = np.concatenate([cv.oof_prob, test_prob])
        fold_labels += ["test"] * len(test.slide_ids)
    both = LabelTable(
        slide_ids=train.slide_ids + test.slide_ids, labels=train.labels + test.labels,
        patient_ids=train.patient_ids + test.patient_ids, splits=train.splits + test.splits,
        classes=table.classes, patient_id_given=table.patient_id_given,
    )
    header, rows = _predictions_rows(both, prob_rows, fold_labels)
    files["predictions"] = out / "predictions.csv"
    atomic_write_csv(files["predictions"], rows, header)
    metrics = {
        "model": model,
        "preset": preset,
        "dihedral_views": dihedral,
        "config": cv.config,
        "folds": cv.folds,
        "seed": seed,
        "val_fraction": None if cv_scheme == "rotate4" else val_fraction,
        "embedding_store": str(normalize(embedding_store)),
        "encoder": encoder,
        "labels": table.to_json(),
        "n_slides": len(train.slide_ids),
        "n_patients": len(set(train.patient_ids)),
        **cv.summary_json(),
        "test": test_report,
        "store_skipped": reader.skipped,
        "wsi_encoder_version": __version__,
    }
    files["metrics"] = out / "metrics.json"
    atomic_write_json(files["metrics"], nan_to_none(metrics))
    logger.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return ClassifyResult(out, metrics, cv, table, files)


# ---------------------------------------------------------------------------------------------- regression
def _outcome_meta(
    reader: EmbeddingStore, embedding_store: str | Path, labels_csv: str | Path, slide_ids: list[str], n_training: int,
    seed: int, refit: dict[str, Any],
) -> dict[str, Any]:
    """What ``model.json`` of a regression / survival model records beside the model itself."""
    return {
        "encoder": reader.encoder_identity(),
        "embedding_store": str(normalize(embedding_store)),
        "labels": str(Path(labels_csv).resolve()),
        "n_training_slides": n_training,
        "seed": seed,
        "refit": refit,
        "cv_scheme": "kfold",
        "provenance": training_provenance(reader, slide_ids),
    }


@dataclass(frozen=True)
class RegressResult:
    """What :func:`train_regressor` wrote and measured."""

    out_dir: Path
    metrics: dict[str, Any]
    crossval: RegressionCVResult
    targets: TargetTable
    files: dict[str, Path]


def train_regressor(
    embedding_store: str | Path,
    labels_csv: str | Path,
    model: str = "linear",
    out_dir: str | Path = "regress_out",
    folds: int = 5,
    seed: int = 0,
    *,
    loss: str = "mse",
    epochs: int | None = None,
    params: dict[str, Any] | None = None,
    allow_missing: bool = False,
    device: str = "auto",
    val_fraction: float = 0.2,
    n_boot: int = 1000,
    threads: int | None = None,
    on_fold: Callable[[int, dict[str, float]], None] | None = None,
    preset: str | None = None,
    cv_scheme: str = "kfold",
) -> RegressResult:
    """Cross-validate a slide regressor (``--target regression``) and write ``metrics.json`` and ``predictions.csv``.

    ``labels_csv`` is ``slide_id,target[,patient_id][,split]``. ``predictions.csv`` holds
    ``slide_id,patient_id,fold,prediction,target`` (out-of-fold; ``fold=test`` for ``split=test`` rows,
    predicted by a model refit on all training slides with what the folds selected). ``metrics.json``
    has the pooled out-of-fold ``spearman``, ``pearson``, ``mae`` and ``r2`` at the top level, each with
    ``<name>_ci95`` (patient bootstrap); ``predicted_vs_true.png`` plots the out-of-fold predictions against the
    target with the identity line. The other arguments are those of :func:`train_classifier`;
    ``loss`` (``mse`` or ``huber``) applies to ``abmil`` and ``gridcnn``. Only ``cv_scheme="kfold"``.
    """
    _kfold_only(cv_scheme, "regression")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = EmbeddingStore.open(embedding_store)
    table = read_targets(labels_csv, "regression", reader.slide_ids, store_name=str(embedding_store),
                         allow_missing=allow_missing, store_skipped=reader.skipped)
    overrides = _model_overrides(model, preset, params, epochs)
    train, test = table.select("train"), table.select("test")
    dihedral = model == "gridcnn" and reader.all_dihedral(train.slide_ids + test.slide_ids)
    logger.info("%s regression (%s loss): %d training slides (%d patients), %d test slides", model, loss,
                len(train.slide_ids), len(set(train.patient_ids)), len(test.slide_ids))
    with torch_threads(threads):
        cv = cross_validate_regression(
            reader.bags(train.slide_ids, dihedral=dihedral), train.y, train.patient_ids, model, config=overrides,
            loss=loss, folds=folds, seed=seed, device=device, val_fraction=val_fraction, n_boot=n_boot,
            on_fold=on_fold,
        )
        rows: list[list[Any]] = [
            [sid, pid, int(f), f"{p:.6g}", f"{t:.6g}"]
            for sid, pid, f, p, t in zip(train.slide_ids, train.patient_ids, cv.fold_of, cv.oof_pred, train.y, strict=True)
        ]
        final = create_regressor(model, reader.embedding_dim, overrides, loss, device)
        final.fit(reader.bags(train.slide_ids, dihedral=dihedral), train.y, seed=seed, refit=cv.refit_params)
        test_report = None
        if test.slide_ids:
            pred = final.predict(reader.bags(test.slide_ids, dihedral=dihedral))
            test_report = {
                "n_slides": len(test.slide_ids),
                "n_patients": len(set(test.patient_ids)),
                "metrics": regression_metrics(test.y, pred),
                "ci95": {k: list(v) for k, v in regression_bootstrap(test.y, pred, test.patient_ids, n_boot, seed).items()},
            }
            rows += [[sid, pid, "test", f"{p:.6g}", f"{t:.6g}"]
                     for sid, pid, p, t in zip(test.slide_ids, test.patient_ids, pred, test.y, strict=True)]
    files = {"predictions": out / "predictions.csv", "metrics": out / "metrics.json"}
    atomic_write_csv(files["predictions"], rows, ["slide_id", "patient_id", "fold", "prediction", "target"])
    files["model"] = save_outcome_model(final, "regression", out, _outcome_meta(
        reader, embedding_store, labels_csv, list(train.slide_ids + test.slide_ids), len(train.slide_ids), seed, cv.refit_params,
    ))
    files["scatter"] = plot_predicted_vs_true(
        train.y, cv.oof_pred, out / "predicted_vs_true.png", spearman=cv.pooled["spearman"],
        title=f"{model}, {folds}-fold patient-grouped CV",
    )
    metrics = {
        "target": "regression",
        "model": model,
        "loss": None if model == "linear" else loss,
        "preset": preset,
        "config": cv.config,
        "folds": folds,
        "seed": seed,
        "val_fraction": val_fraction,
        "embedding_store": str(normalize(embedding_store)),
        "encoder": reader.encoder_identity(),
        "labels": table.to_json(),
        "n_slides": len(train.slide_ids),
        "n_patients": len(set(train.patient_ids)),
        **cv.summary_json(),
        "cv_scheme": cv_scheme,
        "test": test_report,
        "store_skipped": reader.skipped,
        "wsi_encoder_version": __version__,
    }
    atomic_write_json(files["metrics"], nan_to_none(metrics))
    logger.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return RegressResult(out, metrics, cv, table, files)


# ---------------------------------------------------------------------------------------------- survival
@dataclass(frozen=True)
class SurvivalResult:
    """What :func:`train_survival` wrote and measured."""

    out_dir: Path
    metrics: dict[str, Any]
    crossval: SurvivalCVResult
    targets: TargetTable
    files: dict[str, Path]


def train_survival(
    embedding_store: str | Path,
    labels_csv: str | Path,
    model: str = "linear",
    out_dir: str | Path = "survival_out",
    folds: int = 5,
    seed: int = 0,
    *,
    epochs: int | None = None,
    params: dict[str, Any] | None = None,
    allow_missing: bool = False,
    device: str = "auto",
    val_fraction: float = 0.2,
    n_boot: int = 1000,
    threads: int | None = None,
    horizons: list[float] | None = None,
    min_events: int = 2,
    loss: str = "cox",
    time_bins: int = 10,
    n_risk_groups: int = 2,
    on_fold: Callable[[int, dict[str, float]], None] | None = None,
    preset: str | None = None,
    cv_scheme: str = "kfold",
) -> SurvivalResult:
    """Cross-validate a slide Cox model (``--target survival``); write ``metrics.json`` and ``predictions.csv``.

    ``labels_csv`` is ``slide_id,time,event[,patient_id][,split]`` (event 1 = death, 0 = censored).
    ``predictions.csv`` is ``slide_id,patient_id,fold,risk,time,event`` (out-of-fold; higher risk = shorter
    survival). ``metrics.json`` has the pooled ``c_index`` (Harrell) with ``c_index_ci95`` (patient
    bootstrap), ``uno_c`` truncated at ``uno_c_tau`` (the last horizon), ``td_auc`` at ``horizons`` (default:
    quartiles of the event times), the integrated Brier score ``ibs`` over ``ibs_times`` with ``ibs_ci95``, and
    the per-fold C. ``loss`` of the torch models: ``cox`` (``min_events``: mini-batches with fewer events are
    skipped) or ``nll``, the discrete-time likelihood over ``time_bins`` bins. ``kaplan_meier.png``: Kaplan-Meier
    curves of ``n_risk_groups`` (2: median split, 3: tertiles) patient risk groups with the log-rank p-value
    (``risk_groups`` in ``metrics.json``; see :mod:`wsi_encoder.evaluation.outcome_plots`). ``split=test`` rows
    stay out of cross-validation and are scored by the final model (refit on the training slides; ``fold=test``
    in ``predictions.csv``, ``test`` in ``metrics.json``, see
    :func:`~wsi_encoder.evaluation.survival_cv.held_out_report`). The other arguments are
    those of :func:`train_classifier`; only ``kfold``.
    """
    _kfold_only(cv_scheme, "survival")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = EmbeddingStore.open(embedding_store)
    table = read_targets(labels_csv, "survival", reader.slide_ids, store_name=str(embedding_store),
                         allow_missing=allow_missing, store_skipped=reader.skipped)
    overrides = _model_overrides(model, preset, params, epochs)
    train, test = table.select("train"), table.select("test")
    dihedral = model == "gridcnn" and reader.all_dihedral(list(train.slide_ids + test.slide_ids))
    events = np.asarray(train.events)
    logger.info("%s survival: %d training slides (%d patients, %d events), %d test slides", model,
                len(train.slide_ids), len(set(train.patient_ids)), int(events.sum()), len(test.slide_ids))
    with torch_threads(threads):
        cv = cross_validate_survival(
            reader.bags(list(train.slide_ids), dihedral=dihedral), train.y, events, train.patient_ids, model,
            config=overrides, folds=folds, seed=seed, device=device, val_fraction=val_fraction, n_boot=n_boot,
            horizons=horizons, min_events=min_events, loss=loss, time_bins=time_bins, on_fold=on_fold,
        )
    rows: list[list[Any]] = [
        [sid, pid, int(f), f"{r:.6g}", f"{t:.6g}", int(e)]
        for sid, pid, f, r, t, e in zip(train.slide_ids, train.patient_ids, cv.fold_of, cv.oof_risk, train.y, events,
                                        strict=True)
    ]
    with torch_threads(threads):
        final = create_cox_model(model, reader.embedding_dim, overrides, device, min_events, loss, time_bins)
        final.fit(reader.bags(list(train.slide_ids), dihedral=dihedral), train.y, events, seed=seed,
                  groups=train.patient_ids, refit=cv.refit_params)
        test_report = None
        if test.slide_ids:
            test_bags = reader.bags(list(test.slide_ids), dihedral=dihedral)
            test_report = held_out_report(final, test_bags, test.y, test.events, test.patient_ids,
                                          list(cv.pooled["horizons"]), n_boot, seed)
            rows += [[sid, pid, "test", f"{r:.6g}", f"{t:.6g}", int(e)] for sid, pid, r, t, e in zip(
                test.slide_ids, test.patient_ids, test_report.pop("risk"), test.y, test.events, strict=True)]
    files = {"predictions": out / "predictions.csv", "metrics": out / "metrics.json"}
    atomic_write_csv(files["predictions"], rows, ["slide_id", "patient_id", "fold", "risk", "time", "event"])
    files["model"] = save_outcome_model(final, "survival", out, _outcome_meta(
        reader, embedding_store, labels_csv, list(train.slide_ids + test.slide_ids), len(train.slide_ids), seed,
        cv.refit_params,
    ) | {"horizons": cv.pooled["horizons"]})
    grouped = risk_groups(train.y, events, cv.oof_risk, train.patient_ids, cv.fold_of, n_risk_groups)
    files["kaplan_meier"] = plot_kaplan_meier(
        grouped, out / "kaplan_meier.png", title=f"{model}, {folds}-fold CV: out-of-fold risk groups"
    )
    metrics = {
        "target": "survival",
        "model": model,
        "loss": None if model == "linear" else {
            "cox": "cox (Breslow ties, risk sets within each mini-batch)",
            "nll": f"nll (discrete time, {time_bins} bins at the training fold's event-time quantiles)",
        }[loss],
        "min_events_per_batch": min_events if model != "linear" and loss == "cox" else None,
        "time_bins": time_bins if model != "linear" and loss == "nll" else None,
        "preset": preset,
        "config": cv.config,
        "folds": folds,
        "seed": seed,
        "val_fraction": val_fraction,
        "embedding_store": str(normalize(embedding_store)),
        "encoder": reader.encoder_identity(),
        "labels": table.to_json(),
        "n_slides": len(train.slide_ids),
        "n_patients": len(set(train.patient_ids)),
        **cv.summary_json(),
        "risk_groups": grouped.to_json(),
        "cv_scheme": cv_scheme,
        "test": test_report,
        "store_skipped": reader.skipped,
        "wsi_encoder_version": __version__,
    }
    atomic_write_json(files["metrics"], nan_to_none(metrics))
    return SurvivalResult(out, metrics, cv, table, files)

