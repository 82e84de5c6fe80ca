"""Slide-level classification on an embedding store: cross-validated training and prediction.

Two calls do the whole job::

    result = train_classifier("embeddings.zarr", "labels.csv", "abmil", "runs/abmil", folds=5, seed=0)
    pooled_auc = result.metrics["pooled"]["auc"]
    predict("new_embeddings.zarr", "runs/abmil", "runs/new_predictions.csv", heatmap_dir="runs/heatmaps")

``train_classifier`` writes into ``out_dir``: ``metrics.json``, ``predictions.csv`` (out-of-fold),
``roc.png``, ``calibration.png``, the final model (``model.safetensors`` + ``model.json``) and
``cv_state/`` (finished folds, reused when the same run is restarted).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from safetensors.numpy import save as save_safetensors

from wsi_encoder import __version__
from wsi_encoder.errors import CheckpointError, DatasetError, StoreError, WsiEncoderError
from wsi_encoder.evaluation.crossval import (
    CrossValResult,
    FoldResult,
    binary_or_multi,
    bootstrap_metrics,
    cross_validate,
    nan_to_none,
)
from wsi_encoder.evaluation.metrics import classification_metrics
from wsi_encoder.evaluation.plots import plot_heatmap, plot_reliability, plot_roc
from wsi_encoder.io.embedding_reader import EmbeddingStoreReader, SlideBags
from wsi_encoder.io.labels import LabelTable, read_labels
from wsi_encoder.io.urls import normalize
from wsi_encoder.models.slide_classifiers import (
    SlideClassifier,
    create_slide_classifier,
    slide_classifier_class,
)
from wsi_encoder.training.slide_trainer import torch_threads

logger = logging.getLogger(__name__)

MODEL_FORMAT = "wsi_encoder.slide_classifier/1"
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ClassifyResult:
    """What :func:`train_classifier` wrote and measured."""

    out_dir: Path
    metrics: dict[str, Any]
    crossval: CrossValResult
    labels: LabelTable
    files: dict[str, Path]


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict` wrote: one row per predicted slide, heatmaps, metrics when labels were given."""

    out_csv: Path
    rows: list[dict[str, Any]]
    heatmaps: dict[str, Path]
    skipped: dict[str, str]
    metrics: dict[str, Any] | None


# ---------------------------------------------------------------------------------------------- files
def _temp_for(path: Path) -> Path:
    """A temporary sibling of ``path`` (created with plain ``open``, so the umask applies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_text(path: Path, text: str) -> None:
    tmp = _temp_for(path)
    with tmp.open("w", newline="") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    tmp = _temp_for(path)
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: SlideClassifier, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights as plain arrays, no pickle) and ``model.json`` (config + ``meta``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: v if v.flags.c_contiguous else np.ascontiguousarray(v) for k, v in model.state_arrays().items()}
    tmp = _temp_for(out / MODEL_WEIGHTS)
    tmp.write_bytes(save_safetensors(arrays, metadata={"format": MODEL_FORMAT, "model": model.name}))
    os.replace(tmp, out / MODEL_WEIGHTS)
    record = {
        "format": MODEL_FORMAT,
        **model.describe(),
        **meta,
        "weights": MODEL_WEIGHTS,
        "weights_sha256": _sha256(out / MODEL_WEIGHTS),
        "wsi_encoder_version": __version__,
    }
    _atomic_text(out / MODEL_JSON, json.dumps(nan_to_none(record), indent=2))
    return out / MODEL_JSON


def load_model(model_dir: str | Path, device: str = "auto") -> tuple[SlideClassifier, dict[str, Any]]:
    """Load a model saved by :func:`save_model` (or a ``classify train`` output folder).

    Raises
    ------
    CheckpointError
        When the folder, ``model.json`` or the weights are missing, corrupt or do not match.
    """
    folder = Path(model_dir)
    meta_path = folder / MODEL_JSON
    if not meta_path.is_file():
        raise CheckpointError(f"{folder}: no {MODEL_JSON} (pass the --out folder of `wsienc classify train`)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from exc
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {MODEL_FORMAT!r}")
    weights = folder / str(meta.get("weights", MODEL_WEIGHTS))
    if not weights.is_file():
        raise CheckpointError(f"{weights}: model weights are missing")
    if meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: checksum differs from {MODEL_JSON} (file changed or corrupt)")
    try:
        arrays = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from exc
    try:
        model = create_slide_classifier(meta["name"], int(meta["in_dim"]), int(meta["num_classes"]), meta["config"], device)
    except (KeyError, WsiEncoderError) as exc:
        raise CheckpointError(f"{meta_path}: cannot rebuild the model ({exc})") from exc
    model.load_state_arrays(arrays)
    return model, meta


# ---------------------------------------------------------------------------------------------- train
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
    """
    out = Path(out_dir)
    reader = EmbeddingStoreReader(embedding_store)
    table = read_labels(
        labels_csv, reader.slide_ids, store_name=str(embedding_store), allow_missing=allow_missing,
        positive_class=positive_class, store_skipped=reader.skipped,
    )
    encoder = reader.encoder_identity()
    overrides = dict(params or {})
    cls = slide_classifier_class(model)
    if epochs is not None:
        if "epochs" in {f for f in cls.Config.__dataclass_fields__}:
            overrides["epochs"] = epochs
        else:
            logger.warning("--epochs does not apply to the %s model; ignored", model)
    train = table.select("train")
    test = table.select("test")
    bags = SlideBags(reader, train.slide_ids)
    in_dim = reader.embedding_dim
    key = _resume_key(
        model=model, config=overrides, folds=folds, seed=seed, val_fraction=val_fraction, slides=train.slide_ids,
        labels=train.labels, patients=train.patient_ids, classes=table.classes, encoder=encoder, in_dim=in_dim,
    )
    logger.info("%s: %d training slides (%d patients), %d test slides, classes %s",
                model, len(train.slide_ids), len(set(train.patient_ids)), len(test.slide_ids), table.classes)
    with torch_threads(threads):
        cv = cross_validate(
            bags, train.y, train.patient_ids, model, num_classes=table.n_classes, config=overrides, folds=folds,
            seed=seed, device=device, val_fraction=val_fraction, n_boot=n_boot, state_dir=out / "cv_state",
            resume_key=key, on_fold=on_fold,
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
    }
    files["model"] = save_model(cv.final_model, out, meta)
    prob_rows = cv.oof_prob
    fold_labels: list[Any] = [int(f) for f in cv.fold_of]
    test_report = None
    title = f"{model}, {folds}-fold patient-grouped CV (out-of-fold)"
    files.update(_plots(out, "", train.y, cv.oof_prob, table.classes, title, cv.fold_of))
    if test.slide_ids:
        test_prob = cv.final_model.predict_proba(SlideBags(reader, test.slide_ids))
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
    _write_csv(files["predictions"], header, rows)
    metrics = {
        "model": model,
        "config": cv.config,
        "folds": folds,
        "seed": seed,
        "val_fraction": val_fraction,
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
    _atomic_text(files["metrics"], json.dumps(nan_to_none(metrics), indent=2))
    logger.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return ClassifyResult(out, metrics, cv, table, files)


# ---------------------------------------------------------------------------------------------- predict
def predict(
    embedding_store: str | Path,
    model_dir: str | Path,
    out_csv: str | Path,
    heatmap_dir: str | Path | None = None,
    *,
    labels_csv: str | Path | None = None,
    device: str = "auto",
    allow_encoder_mismatch: bool = False,
    threads: int | None = None,
    on_slide: Callable[[str], None] | None = None,
) -> PredictResult:
    """Predict every usable slide of a store with a trained model; optionally draw heatmaps and score.

    Writes ``out_csv`` with ``slide_id,prob,pred`` (``prob``: P(positive class) when binary, the top
    probability when multi-class, plus one ``prob_<class>`` column per class), and ``label`` when
    ``labels_csv`` is given (slides it lacks are predicted anyway). With ``heatmap_dir``, one
    ``<slide_id>.png`` (map over the thumbnail) and ``<slide_id>.npy`` (the ``(R, Q)`` float32 map, NaN
    outside tissue) per slide. One slide that cannot be read is reported and skipped.

    Raises
    ------
    StoreError
        When the store's embedding size differs from the model's, or (unless
        ``allow_encoder_mismatch``) it was written by another encoder than the training store.
    """
    model, meta = load_model(model_dir, device)
    reader = EmbeddingStoreReader(embedding_store)
    if not reader.slide_ids:
        raise StoreError(f"{embedding_store}: no complete slide to predict")
    if reader.embedding_dim != model.in_dim:
        raise StoreError(
            f"{embedding_store}: embeddings have {reader.embedding_dim} features but the model in {model_dir} "
            f"was trained on {model.in_dim}; encode the slides with the same encoder"
        )
    trained_with, here = meta.get("encoder") or {}, reader.encoder_identity()
    if trained_with.get("weights_sha256") and here.get("weights_sha256") and trained_with != here:
        message = (
            f"{embedding_store} was encoded by {here.get('name')} ({str(here.get('weights_sha256'))[:12]}) but the "
            f"model was trained on {trained_with.get('name')} ({str(trained_with.get('weights_sha256'))[:12]}) embeddings"
        )
        if not allow_encoder_mismatch:
            raise StoreError(message + "; re-encode with that encoder (or pass --allow-encoder-mismatch)")
        logger.warning("%s", message)
    classes = list(meta["classes"])
    labels: dict[str, str] = {}
    if labels_csv is not None:
        table = read_labels(labels_csv, None, require_two_classes=False)
        unknown = sorted(set(table.labels) - set(classes))
        if unknown:
            raise DatasetError(f"{labels_csv}: labels {unknown} are not classes of the model ({classes})")
        labels = dict(zip(table.slide_ids, table.labels, strict=True))
    multi = len(classes) > 2
    header = ["slide_id", "prob", "pred"] + ([f"prob_{c}" for c in classes] if multi else [])
    header += ["label"] if labels else []
    rows: list[dict[str, Any]] = []
    heatmaps: dict[str, Path] = {}
    skipped = dict(reader.skipped)
    heat_dir = Path(heatmap_dir) if heatmap_dir is not None else None
    with torch_threads(threads):
        for slide_id in reader.slide_ids:
            try:
                bag = reader.load(slide_id)
                prob = model.predict_proba([bag])[0]
            except StoreError as exc:
                logger.warning("%s: skipped (%s)", slide_id, exc)
                skipped[slide_id] = str(exc)
                continue
            row: dict[str, Any] = {
                "slide_id": slide_id,
                "prob": float(prob.max() if multi else prob[1]),
                "pred": classes[int(prob.argmax())],
            }
            if multi:
                row.update({f"prob_{c}": float(v) for c, v in zip(classes, prob, strict=True)})
            if labels:
                row["label"] = labels.get(slide_id, "")
            rows.append(row)
            if heat_dir is not None:
                heatmaps[slide_id] = _draw_heatmap(model, reader, bag, prob, classes, heat_dir)
            if on_slide is not None:
                on_slide(slide_id)
    out_csv = Path(out_csv)
    _write_csv(out_csv, header, [[_fmt(r.get(h, "")) for h in header] for r in rows])
    metrics = None
    scored = [r for r in rows if r.get("label")]
    if scored:
        y = np.array([classes.index(r["label"]) for r in scored])
        prob = np.array([[r[f"prob_{c}"] for c in classes] if multi else [1 - r["prob"], r["prob"]] for r in scored])
        metrics = nan_to_none(classification_metrics(y, binary_or_multi(prob)))
        metrics["n_slides"] = len(scored)
    return PredictResult(out_csv, rows, heatmaps, skipped, metrics)


def _fmt(value: Any) -> Any:
    return f"{value:.6f}" if isinstance(value, float) else value


def _draw_heatmap(
    model: SlideClassifier,
    reader: EmbeddingStoreReader,
    bag: Any,
    prob: npt.NDArray[np.float64],
    classes: Sequence[str],
    heat_dir: Path,
) -> Path:
    heat = model.heatmap(bag)
    tmp = _temp_for(heat_dir / f"{bag.slide_id}.npy")
    with tmp.open("wb") as fh:
        np.save(fh, heat.astype(np.float32), allow_pickle=False)
    os.replace(tmp, heat_dir / f"{bag.slide_id}.npy")
    top = int(prob.argmax())
    if len(classes) == 2:
        verdict = f"P({classes[1]}) = {prob[1]:.3f}"
    else:
        verdict = f"predicted {classes[top]} (p = {prob[top]:.3f})"
    return plot_heatmap(
        reader.thumbnail(bag.slide_id),
        heat,
        heat_dir / f"{bag.slide_id}.png",
        geometry=reader.geometry(bag.slide_id),
        title=f"{bag.slide_id}: {verdict}",
        label=f"{model.name}: {model.heatmap_kind}",
        signed=model.heatmap_signed,
    )
