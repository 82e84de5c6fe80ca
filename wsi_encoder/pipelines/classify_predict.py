"""``wsienc classify predict``: a trained slide model applied to an embedding store.

Apart from :mod:`wsi_encoder.pipelines.classify` (training), so that predicting imports neither
scikit-learn's model selection nor matplotlib: 2 s of the command's start-up on a 2-core machine.
scikit-learn's metrics are imported only when ``labels_csv`` asks for a score.

    result = predict("new_embeddings.zarr", "runs/abmil", "runs/new_predictions.csv", heatmap_dir="runs/heatmaps")
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import DatasetError, InvalidParameterError, StoreError
from wsi_encoder.evaluation.heatmaps import plot_slide_prediction, save_heatmap
from wsi_encoder.io.embedding_store import EmbeddingStore, SlideBag
from wsi_encoder.io.files import atomic_write_csv
from wsi_encoder.io.labels import read_labels
from wsi_encoder.models.classifier_files import load_model
from wsi_encoder.models.outcome_files import is_outcome_model, load_outcome_model, model_horizons, survival_at
from wsi_encoder.models.slide_classifiers import SlideClassifier, torch_threads
from wsi_encoder.models.slide_classifiers.ensemble import FoldEnsemble
from wsi_encoder.models.slide_classifiers.regressors import RidgeRegressor
from wsi_encoder.models.slide_classifiers.survival import CoxLinear

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict` wrote: one row per predicted slide, heatmaps, metrics when labels were given."""

    out_csv: Path
    rows: list[dict[str, Any]]
    heatmaps: dict[str, Path]
    skipped: dict[str, str]
    metrics: dict[str, Any] | None



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
    horizons: list[float] | None = None,
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
    if is_outcome_model(model_dir):
        if labels_csv is not None:
            raise InvalidParameterError(f"{model_dir} is a regression/survival model: --labels scores classifiers only")
        return _predict_outcome(embedding_store, model_dir, out_csv, heatmap_dir, device=device,
                                allow_encoder_mismatch=allow_encoder_mismatch, threads=threads, on_slide=on_slide,
                                horizons=horizons)
    model, meta = load_model(model_dir, device)
    reader = _open_for(embedding_store, model_dir, model.in_dim, meta, allow_encoder_mismatch)
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
                bag = reader.load(slide_id, dihedral=model.uses_dihedral and reader.has_dihedral(slide_id))
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
    atomic_write_csv(out_csv, [[_fmt(r.get(h, "")) for h in header] for r in rows], header)
    metrics = None
    scored = [r for r in rows if r.get("label")]
    if scored:
        # scikit-learn, only to score
        from wsi_encoder.evaluation.crossval import binary_or_multi, nan_to_none
        from wsi_encoder.evaluation.metrics import classification_metrics

        y = np.array([classes.index(r["label"]) for r in scored])
        prob = np.array([[r[f"prob_{c}"] for c in classes] if multi else [1 - r["prob"], r["prob"]] for r in scored])
        metrics = nan_to_none(classification_metrics(y, binary_or_multi(prob)))
        metrics["n_slides"] = len(scored)
    return PredictResult(out_csv, rows, heatmaps, skipped, metrics)


def _open_for(
    embedding_store: str | Path, model_dir: str | Path, in_dim: int, meta: dict[str, Any], allow_encoder_mismatch: bool
) -> EmbeddingStore:
    """The store to predict, refused when empty, of another embedding size, or (unless allowed) another encoder."""
    reader = EmbeddingStore.open(embedding_store)
    if not reader.slide_ids:
        raise StoreError(f"{embedding_store}: no complete slide to predict")
    if reader.embedding_dim != in_dim:
        raise StoreError(
            f"{embedding_store}: embeddings have {reader.embedding_dim} features but the model in {model_dir} "
            f"was trained on {in_dim}; encode the slides with the same encoder"
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
    return reader


def _predict_outcome(
    embedding_store: str | Path, model_dir: str | Path, out_csv: str | Path, heatmap_dir: str | Path | None, *,
    device: str, allow_encoder_mismatch: bool, threads: int | None, on_slide: Callable[[str], None] | None,
    horizons: list[float] | None = None,
) -> PredictResult:
    """:func:`predict` with a regression or survival model: ``slide_id,prediction`` or ``slide_id,risk``.

    A survival model adds ``survival_at_<t>`` columns, S(t | slide), at ``horizons`` (default: the horizons of
    its training run, recorded in ``model.json``).

    Heatmaps (abmil: attention; gridcnn: Grad-CAM of the prediction / risk, where the features push it up);
    ``linear`` draws none for these targets.
    """
    model, meta = load_outcome_model(model_dir, device)
    reader = _open_for(embedding_store, model_dir, int(meta["in_dim"]), meta, allow_encoder_mismatch)
    column = "risk" if meta["target"] == "survival" else "prediction"
    at = model_horizons(meta) if horizons is None else [float(h) for h in horizons]
    heat_dir = Path(heatmap_dir) if heatmap_dir is not None and model.name != "linear" else None
    if heatmap_dir is not None and heat_dir is None:
        logger.warning("the linear %s model draws no heatmap", meta["target"])
    rows: list[dict[str, Any]] = []
    heatmaps: dict[str, Path] = {}
    skipped = dict(reader.skipped)
    with torch_threads(threads):
        for slide_id in reader.slide_ids:
            try:
                bag = reader.load(slide_id, dihedral=model.name == "gridcnn" and reader.has_dihedral(slide_id))
                value = float(model.predict([bag])[0])
            except StoreError as exc:
                logger.warning("%s: skipped (%s)", slide_id, exc)
                skipped[slide_id] = str(exc)
                continue
            rows.append({"slide_id": slide_id, column: value, **survival_at(model, [bag], at)[0]})
            if heat_dir is not None and not isinstance(model, RidgeRegressor | CoxLinear):
                heatmaps[slide_id] = save_heatmap(
                    heat_dir, slide_id, model.heatmap(bag), reader.thumbnail(slide_id), reader.geometry(slide_id),
                    title=f"{slide_id}: {column} = {value:.3f}", label=f"{model.name}: {model.heatmap_kind}",
                )
            if on_slide is not None:
                on_slide(slide_id)
    out_csv = Path(out_csv)
    header = ["slide_id", column, *[k for k in (rows[0] if rows else {}) if k.startswith("survival_at_")]]
    atomic_write_csv(out_csv, [[_fmt(r[k]) for k in header] for r in rows], header)
    return PredictResult(out_csv, rows, heatmaps, skipped, None)


def _fmt(value: Any) -> Any:
    return f"{value:.6f}" if isinstance(value, float) else value


def _draw_heatmap(
    model: SlideClassifier | FoldEnsemble,
    reader: EmbeddingStore,
    bag: SlideBag,
    prob: npt.NDArray[np.float64],
    classes: Sequence[str],
    heat_dir: Path,
) -> Path:
    return plot_slide_prediction(
        model, bag.slide_id, model.heatmap(bag), prob, classes, heat_dir, reader.thumbnail(bag.slide_id),
        reader.geometry(bag.slide_id),
    )
