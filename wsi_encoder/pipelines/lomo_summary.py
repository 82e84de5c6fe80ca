"""Outputs of a LOMO run assembled from its finished (arm, fold) files: tables, probe, plots, report.

:func:`write_outputs` (re)writes ``results.csv``, ``probe.csv``, the plots and ``report.md`` of a
run folder from whatever (arm, fold) has finished, so it can be called at any time;
:func:`pool_patient_folds` writes the top-level results of a ``--patient-folds`` run.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_encoder.evaluation import lomo_report
from wsi_encoder.evaluation.lomo_outputs import (
    RESULTS_COLUMNS,
    atomic_write_text,
    csv_text,
    fold_metrics,
    load_fold_embeddings,
    write_results_csv,
)
from wsi_encoder.evaluation.splits import read_splits_csv
from wsi_encoder.models.checkpoint import atomic_write_json
from wsi_encoder.training.lomo_trainer import ARMS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LomoEvent:
    """A progress report: ``kind`` is ``cache``, ``start``, ``epoch``, ``gan_epoch``, ``done``, ``skip`` or ``report``."""

    kind: str
    arm: str | None = None
    held_out: int | None = None
    step: int = 0
    total: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    message: str = ""


EventHandler = Callable[[LomoEvent], None]


@dataclass
class LomoRun:
    """What a run produced."""

    out_dir: Path
    results: list[dict[str, Any]]
    skipped: dict[int, str]
    trained: list[tuple[str, int]]
    resumed: list[tuple[str, int]]


def emit_event(handler: EventHandler | None, event: LomoEvent) -> None:
    """Log the event's message and pass the event to ``handler``."""
    if event.message:
        logger.info(event.message)
    if handler is not None:
        handler(event)


def write_outputs(out_dir: str | Path, on_event: EventHandler | None = None) -> list[dict[str, Any]]:
    """(Re)write ``results.csv``, ``probe.csv``, ``config.json`` (arms, held_out), plots and ``report.md``.

    Reads every finished (arm, fold) of the folder, so it can be re-run at any time.
    """
    out = Path(out_dir)
    cfg = json.loads((out / "config.json").read_text())
    results, extra, probe, predictions = [], {}, [], {}
    for arm in ARMS:
        for m in sorted(
            int(p.name.split("_")[1])
            for p in (out / "runs" / arm).glob("heldout_*")
            if (p / "metrics.json").is_file() and (out / "embeddings" / arm / f"{p.name}.npz").is_file()
        ):
            metrics = json.loads((out / "runs" / arm / f"heldout_{m}" / "metrics.json").read_text())
            results.append({k: metrics[k] for k in RESULTS_COLUMNS})
            extra[(arm, m)] = metrics
            emb = load_fold_embeddings(out / "embeddings" / arm / f"heldout_{m}.npz")
            predictions.setdefault(arm, {})[m] = (emb["y_test"], emb["prob_test"])
            pr = metrics.get("probe") or lomo_report.magnification_probe(
                emb["X_train"], emb["magnification_train"], emb["patient_train"]
            )
            probe.append({"arm": arm, "held_out": m, **pr})
    write_results_csv(out / "results.csv", results)
    _write_probe_csv(out / "probe.csv", probe)
    cfg["arms"] = [a for a in ARMS if any(r["arm"] == a for r in results)]
    cfg["held_out"] = sorted({int(r["held_out"]) for r in results})
    atomic_write_json(out / "config.json", cfg)
    plots = {}
    if results:
        plots["metrics"] = _rel(
            lomo_report.plot_metrics_by_fold(results, out / "plots" / "auc_brier_by_fold.png"), out
        )
        plots["reliability"] = _rel(
            lomo_report.plot_reliability(predictions, out / "plots" / "reliability.png"), out
        )
        plots["probe"] = _rel(lomo_report.plot_probe(probe, out / "plots" / "magnification_probe.png"), out)
    grids = {
        int(p.stem.rsplit("_", 1)[1]): _rel(p, out)
        for p in sorted((out / "plots").glob("gan_samples_heldout_*.png"))
    }
    text = lomo_report.render_report(
        title="Leave-one-magnification-out (BreaKHis)"
        + (f", patient fold {cfg['patient_fold']}" if cfg.get("patient_fold") is not None else ""),
        config=cfg,
        results=results,
        extra=extra,
        probe=probe,
        skipped={int(m): r for m, r in cfg.get("skipped_held_out", {}).items()},
        split_summary=_split_summary(out),
        plots=plots,
        gan_grids=grids,
        notes=_notes(cfg),
    )
    lomo_report.write_report(out / "report.md", text)
    emit_event(on_event, LomoEvent("report", message=f"report written: {out / 'report.md'}"))
    return results


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def _write_probe_csv(path: Path, probe: list[dict[str, Any]]) -> None:
    rows = [
        [
            str(r["arm"]),
            str(r["held_out"]),
            *(f"{float(r[k]):.6f}" for k in ("balanced_accuracy", "auc", "chance")),
            *(str(int(r[k])) for k in ("n_images", "n_patients", "n_splits")),
        ]
        for r in probe
    ]
    atomic_write_text(path, csv_text(lomo_report.PROBE_COLUMNS, rows))


def _split_summary(out: Path) -> list[str]:
    path = out / "splits.csv"
    if not path.is_file():
        return []
    rows = read_splits_csv(path)
    lines = []
    folds = sorted({int(r["fold"]) for r in rows})
    for m in folds:
        sel = [r for r in rows if r["fold"] == m and r["role"] != "unused"]
        parts = []
        for role in ("train", "val", "test"):
            rr = [r for r in sel if r["role"] == role]
            pts = {r["patient_id"]: r["class"] for r in rr}
            nb = sum(1 for c in pts.values() if c == "benign")
            parts.append(
                f"{role} {len(rr)} images / {len(pts)} patients ({nb} benign, {len(pts) - nb} malignant)"
            )
        lines.append(f"- {m}X held out: " + "; ".join(parts))
    lines.append("")
    lines.append("No patient is on both sides of any fold; see `splits.csv` for every image's role.")
    return lines


def _notes(cfg: dict[str, Any]) -> list[str]:
    notes = []
    if cfg.get("unreadable_images"):
        notes.append(
            f"{len(cfg['unreadable_images'])} unreadable image(s) were skipped: "
            + ", ".join(sorted(cfg["unreadable_images"])[:10])
        )
    s = cfg.get("settings", {})
    if s.get("max_images_per_split"):
        notes.append(f"quick run: at most {s['max_images_per_split']} images per role and fold were used")
    if not s.get("weights") and not Path(str(cfg.get("backbone"))).is_dir():
        notes.append(
            "the backbone started from a seeded random initialisation (no --weights): expect lower "
            "accuracy than with ImageNet-pretrained weights"
        )
    return notes


def pool_patient_folds(
    out: Path, runs: list[LomoRun], arms: list[str], on_event: EventHandler | None = None
) -> LomoRun:
    """Top-level results of a k-fold run: every patient's out-of-fold test predictions pooled per arm × fold."""
    pooled: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
    for run in runs:
        for arm in arms:
            for npz in sorted((run.out_dir / "embeddings" / arm).glob("heldout_*.npz")):
                m = int(npz.stem.split("_")[1])
                pooled.setdefault((arm, m), []).append(load_fold_embeddings(npz))
    results, predictions = [], {}
    for arm in arms:
        for m in sorted(m for a, m in pooled if a == arm):
            parts = pooled[(arm, m)]
            y = np.concatenate([p["y_test"] for p in parts])
            prob = np.concatenate([p["prob_test"] for p in parts])
            pts = np.concatenate([p["patient_test"].astype(str) for p in parts])
            metrics = fold_metrics(y, prob, pts)
            results.append({"arm": arm, "held_out": m, **metrics})
            predictions.setdefault(arm, {})[m] = (y, prob)
    write_results_csv(out / "results.csv", results)
    sub_cfg = json.loads((runs[0].out_dir / "config.json").read_text())
    cfg = {
        **sub_cfg,
        "arms": [a for a in ARMS if any(r["arm"] == a for r in results)],
        "held_out": sorted({int(r["held_out"]) for r in results}),
        "patient_fold": None,
        "patient_folds": len(runs),
        "fold_dirs": [_rel(r.out_dir, out) for r in runs],
    }
    skipped: dict[int, str] = {}  # held out in no patient fold
    partial: list[str] = []  # skipped in some patient folds only
    for m in sorted({m for run in runs for m in run.skipped}):
        where = [(k, run.skipped[m]) for k, run in enumerate(runs) if m in run.skipped]
        if len(where) == len(runs):
            skipped[m] = where[0][1]
        else:
            folds = ", ".join(str(k) for k, _ in where)
            partial.append(
                f"{m}X held out: skipped in patient fold(s) {folds} ({where[0][1]}); pooled over the others"
            )
    cfg["skipped_held_out"] = {str(m): r for m, r in skipped.items()}
    atomic_write_json(out / "config.json", cfg)
    plots = {}
    if results:
        plots["metrics"] = _rel(
            lomo_report.plot_metrics_by_fold(results, out / "plots" / "auc_brier_by_fold.png"), out
        )
        plots["reliability"] = _rel(
            lomo_report.plot_reliability(predictions, out / "plots" / "reliability.png"), out
        )
    probe = _mean_probe(runs)
    if probe:
        plots["probe"] = _rel(lomo_report.plot_probe(probe, out / "plots" / "magnification_probe.png"), out)
    text = lomo_report.render_report(
        title=f"Leave-one-magnification-out (BreaKHis), {len(runs)} patient folds pooled",
        config=cfg,
        results=results,
        extra={(r["arm"], int(r["held_out"])): r for r in results},
        probe=probe,
        skipped=skipped,
        split_summary=[
            f"- patient fold {k}: see `{_rel(r.out_dir, out)}/report.md`" for k, r in enumerate(runs)
        ],
        plots=plots,
        gan_grids={},
        notes=[
            "Every patient is tested once; the metrics pool the out-of-fold test predictions of the "
            f"{len(runs)} patient folds (each fold's models, embeddings and probe are in its own folder); "
            "the magnification probe is the mean over the patient folds.",
            *partial,
            *_notes(cfg),
        ],
    )
    lomo_report.write_report(out / "report.md", text)
    emit_event(on_event, LomoEvent("report", message=f"pooled report written: {out / 'report.md'}"))
    trained = [t for r in runs for t in r.trained]
    resumed = [t for r in runs for t in r.resumed]
    return LomoRun(out, results, skipped, trained, resumed)


def _mean_probe(runs: list[LomoRun]) -> list[dict[str, Any]]:
    """Probe rows averaged over patient folds (images and patients summed)."""
    rows: dict[tuple[str, int], list[dict[str, str]]] = {}
    for run in runs:
        path = run.out_dir / "probe.csv"
        if path.is_file():
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    rows.setdefault((row["arm"], int(row["held_out"])), []).append(row)
    out = []
    for (arm, m), parts in sorted(rows.items(), key=lambda kv: (ARMS.index(kv[0][0]), kv[0][1])):
        mean = {
            k: float(np.nanmean([float(p[k]) for p in parts])) for k in ("balanced_accuracy", "auc", "chance")
        }
        sums = {k: float(sum(float(p[k]) for p in parts)) for k in ("n_images", "n_patients")}
        out.append({"arm": arm, "held_out": m, **mean, **sums, "n_splits": float(len(parts))})
    return out
