"""Outputs of a LOMO run assembled from its finished (arm, fold) files: tables, intervals, probe, plots, report.

:func:`write_outputs` (re)writes ``results.csv`` (with patient-bootstrap intervals and paired
differences to the baseline), ``probe.csv``, the plots and ``report.md`` of a run folder from
whatever (arm, fold) has finished, so it can be called at any time; :func:`pool_patient_folds`
writes the top-level results of a ``--patient-folds`` run and :func:`summarise_repeats` those of a
``--repeats`` run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_encoder.errors import DatasetError
from wsi_encoder.evaluation import lomo_report
from wsi_encoder.evaluation.lomo_outputs import (
    fold_metrics,
    load_fold_embeddings,
    write_results_csv,
)
from wsi_encoder.evaluation.patient_intervals import FoldScores, patient_intervals
from wsi_encoder.evaluation.splits import read_splits_csv
from wsi_encoder.io.files import atomic_write_csv, atomic_write_json
from wsi_encoder.pipelines.lomo_config import ARMS

logger = logging.getLogger(__name__)

REPEAT_COLUMNS = (
    "arm",
    "held_out",
    "n_repeats",
    "auc_mean",
    "auc_sd",
    "brier_mean",
    "brier_sd",
    "delta_auc_mean",
    "delta_auc_sd",
    "delta_brier_mean",
    "delta_brier_sd",
    "delta_auc_ci_excludes_zero",
    "delta_brier_ci_excludes_zero",
    "n_delta_auc_ci",
    "n_delta_brier_ci",
)


@dataclass(frozen=True)
class LomoEvent:
    """A progress report: ``kind`` is ``warning``, ``cache``, ``repeat``, ``start``, ``epoch``, ``gan_epoch``, ``done``, ``skip`` or ``report``."""

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
    """What a run produced (``summary``: the per-arm × fold mean ± sd rows of a ``--repeats`` run)."""

    out_dir: Path
    results: list[dict[str, Any]]
    skipped: dict[int, str]
    trained: list[tuple[str, int]]
    resumed: list[tuple[str, int]]
    refused: dict[str, str] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)


def emit_event(handler: EventHandler | None, event: LomoEvent) -> None:
    """Log the event's message and pass the event to ``handler``."""
    if event.message:
        logger.info(event.message)
    if handler is not None:
        handler(event)


def fold_scores(
    predictions: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]], repeat: int = 0
) -> list[FoldScores]:
    """The held-out folds every arm was tested on, as :class:`FoldScores` (the arms paired on the same images).

    ``predictions[arm][m]`` holds ``y``, ``prob``, ``patients`` and ``filenames`` of the test images; arms of
    one fold must hold the same images, else :class:`DatasetError`.
    """
    arms = list(predictions)
    common = sorted(set.intersection(*(set(f) for f in predictions.values()))) if arms else []
    out = []
    for m in common:
        first = predictions[arms[0]][m]
        for arm in arms:
            if not np.array_equal(predictions[arm][m]["filenames"], first["filenames"]):
                raise DatasetError(f"held-out {m}X: the arms were tested on different images; cannot pair them")
        out.append(FoldScores(
            y=np.asarray(first["y"], dtype=np.int64),
            patients=np.asarray(first["patients"]).astype(str),
            prob={arm: np.asarray(predictions[arm][m]["prob"], dtype=float) for arm in arms},
            repeat=repeat,
            held_out=m,
        ))
    return out


#: The per-fold intervals of ``results.csv`` (the overall ones are in ``results_overall.csv``). BreaKHis is
#: about 69% malignant, so F1 and ECE carry their own intervals, and patient AUC the patient-level view.
FOLD_INTERVAL_METRICS = ("auc", "brier", "f1", "ece", "patient_auc")


def with_intervals(
    rows: list[dict[str, Any]],
    predictions: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]],
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Add each fold's patient-resampled intervals (:mod:`~wsi_encoder.evaluation.patient_intervals`) and
    paired differences to the baseline to ``results`` rows."""
    stats: dict[tuple[str, int], dict[str, float]] = {}
    for fold in fold_scores(predictions):
        baseline = "baseline" if "baseline" in fold.prob else None
        for r in patient_intervals([fold], baseline=baseline, n_boot=n_boot, seed=seed + fold.held_out,
                                   metrics=FOLD_INTERVAL_METRICS):
            values = stats.setdefault((r["arm"], fold.held_out), {})
            if r["metric"].startswith("delta_"):
                values[r["metric"]] = r["estimate"]
            values[f"{r['metric']}_ci_low"], values[f"{r['metric']}_ci_high"] = r["ci_low"], r["ci_high"]
    return [{**row, **stats.get((row["arm"], int(row["held_out"])), {})} for row in rows]


def run_predictions(run_dir: Path) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """The test predictions of a finished run folder: its own folds, or its patient folds' pooled per arm × fold.

    Only folds that every patient fold ran (for that arm) are pooled, so that every patient is tested once.
    """
    dirs = sorted(run_dir.glob("patient_fold_*")) if not (run_dir / "embeddings").is_dir() else [run_dir]
    parts: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
    for d in dirs:
        for npz in sorted((d / "embeddings").glob("*/heldout_*.npz")):
            parts.setdefault((npz.parent.name, int(npz.stem.split("_")[1])), []).append(load_fold_embeddings(npz))
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for (arm, m), got in parts.items():
        if len(got) == len(dirs):
            out.setdefault(arm, {})[m] = {
                "y": np.concatenate([p["y_test"] for p in got]),
                "prob": np.concatenate([p["prob_test"] for p in got]),
                "patients": np.concatenate([p["patient_test"].astype(str) for p in got]),
                "filenames": np.concatenate([p["filename_test"].astype(str) for p in got]),
            }
    return out


#: Columns of ``results_overall.csv``.
OVERALL_COLUMNS = ("arm", "metric", "estimate", "ci_low", "ci_high", "method", "n_patients", "n_folds", "held_out")


def write_overall(out: Path, folds: Sequence[FoldScores], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """``results_overall.csv``: every arm's mean over the held-out folds (and repeats) with one joint interval each."""
    if not folds:
        return []
    baseline = "baseline" if "baseline" in folds[0].prob else None
    held = "+".join(f"{m}X" for m in sorted({f.held_out for f in folds}))
    rows = [{**r, "held_out": held} for r in patient_intervals(folds, baseline=baseline, n_boot=n_boot, seed=seed)]
    atomic_write_csv(
        out / "results_overall.csv",
        [[_num_text(r[c]) if isinstance(r[c], float) else str(r[c]) for c in OVERALL_COLUMNS] for r in rows],
        header=OVERALL_COLUMNS,
    )
    return rows


def write_outputs(out_dir: str | Path, on_event: EventHandler | None = None) -> list[dict[str, Any]]:
    """(Re)write ``results.csv``, ``probe.csv``, ``config.json`` (arms, held_out), plots and ``report.md``.

    Reads every finished (arm, fold) of the folder, so it can be re-run at any time.
    """
    out = Path(out_dir)
    cfg = json.loads((out / "config.json").read_text())
    results, extra, probe = [], {}, []
    predictions: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for arm in ARMS:
        for m in sorted(
            int(p.name.split("_")[1])
            for p in (out / "runs" / arm).glob("heldout_*")
            if (p / "metrics.json").is_file() and (out / "embeddings" / arm / f"{p.name}.npz").is_file()
        ):
            metrics = json.loads((out / "runs" / arm / f"heldout_{m}" / "metrics.json").read_text())
            results.append(metrics)
            extra[(arm, m)] = metrics
            emb = load_fold_embeddings(out / "embeddings" / arm / f"heldout_{m}.npz")
            predictions.setdefault(arm, {})[m] = {
                "y": emb["y_test"], "prob": emb["prob_test"], "patients": emb["patient_test"],
                "filenames": emb["filename_test"],
            }
            probe += [{"arm": arm, "held_out": m, **r} for r in metrics["probe"]]
    n_boot, seed = int(cfg.get("n_bootstrap", 1000)), int(cfg.get("seed", 0))
    results = with_intervals(results, predictions, n_boot, seed)
    write_results_csv(out / "results.csv", results)
    overall = write_overall(out, fold_scores(predictions), n_boot, seed)
    write_probe_csv(out / "probe.csv", probe)
    cfg["arms"] = [a for a in ARMS if any(r["arm"] == a for r in results)]
    cfg["held_out"] = sorted({int(r["held_out"]) for r in results})
    atomic_write_json(out / "config.json", cfg)
    plots = {}
    if results:
        plots["metrics"] = _rel(
            lomo_report.plot_metrics_by_fold(results, out / "plots" / "auc_brier_by_fold.png"), out
        )
        pairs = {a: {m: (p["y"], p["prob"]) for m, p in f.items()} for a, f in predictions.items()}
        plots["reliability"] = _rel(lomo_report.plot_reliability(pairs, out / "plots" / "reliability.png"), out)
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
        overall=overall,
    )
    lomo_report.write_report(out / "report.md", text)
    emit_event(on_event, LomoEvent("report", message=f"report written: {out / 'report.md'}"))
    return results


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def write_probe_csv(path: Path, probe: Sequence[Mapping[str, Any]]) -> None:
    """Write ``probe.csv``: ``arm,held_out,probe,split,balanced_accuracy,chance`` (nan as ``nan``)."""
    rows = [
        [str(r["arm"]), str(int(r["held_out"])), str(r["probe"]), str(r["split"]),
         *(_num_text(r[k]) for k in ("balanced_accuracy", "chance"))]
        for r in probe
    ]
    atomic_write_csv(path, rows, header=lomo_report.PROBE_COLUMNS)


def _num_text(v: Any) -> str:
    return "nan" if v is None or math.isnan(float(v)) else f"{float(v):.6f}"


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
        for role in ("train", "val", "test", "probe_test"):
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
    sub_cfg = json.loads((runs[0].out_dir / "config.json").read_text())
    results: list[dict[str, Any]] = []
    predictions: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for arm in arms:
        for m in sorted(m for a, m in pooled if a == arm):
            parts = pooled[(arm, m)]
            pred = {
                "y": np.concatenate([p["y_test"] for p in parts]),
                "prob": np.concatenate([p["prob_test"] for p in parts]),
                "patients": np.concatenate([p["patient_test"].astype(str) for p in parts]),
                "filenames": np.concatenate([p["filename_test"].astype(str) for p in parts]),
            }
            results.append({"arm": arm, "held_out": m, **fold_metrics(pred["y"], pred["prob"], pred["patients"])})
            predictions.setdefault(arm, {})[m] = pred
    # pair only the folds every arm ran in every patient fold
    for m in {m for _, m in pooled}:
        counts = {len(pooled[(a, m)]) for a in arms if (a, m) in pooled}
        if len(counts) > 1:
            for a in arms:
                predictions.get(a, {}).pop(m, None)
    n_boot, seed = int(sub_cfg.get("n_bootstrap", 1000)), int(sub_cfg.get("seed", 0))
    results = with_intervals(results, predictions, n_boot, seed)
    write_results_csv(out / "results.csv", results)
    overall = write_overall(out, fold_scores(predictions), n_boot, seed)
    cfg = {
        **sub_cfg,
        "arms": [a for a in ARMS if any(r["arm"] == a for r in results)],
        "held_out": sorted({int(r["held_out"]) for r in results}),
        "patient_fold": None,
        "patient_folds": len(runs),
        "fold_dirs": [_rel(r.out_dir, out) for r in runs],
        "refused": {f"{_rel(r.out_dir, out)}/{k}": v for r in runs for k, v in r.refused.items()},
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
    probe = _mean_probe(runs)
    if results:
        plots["metrics"] = _rel(
            lomo_report.plot_metrics_by_fold(results, out / "plots" / "auc_brier_by_fold.png"), out
        )
        pairs = {a: {m: (p["y"], p["prob"]) for m, p in f.items()} for a, f in predictions.items()}
        plots["reliability"] = _rel(lomo_report.plot_reliability(pairs, out / "plots" / "reliability.png"), out)
    if probe:
        write_probe_csv(out / "probe.csv", probe)
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
        overall=overall,
        notes=[
            "Every patient is tested once; the metrics and intervals pool the out-of-fold test predictions of "
            f"the {len(runs)} patient folds (each fold's models, embeddings and probe are in its own folder); "
            "the magnification probe is the mean over the patient folds. Epoch kept: see each fold's report.",
            *partial,
            *_notes(cfg),
        ],
    )
    lomo_report.write_report(out / "report.md", text)
    emit_event(on_event, LomoEvent("report", message=f"pooled report written: {out / 'report.md'}"))
    trained = [t for r in runs for t in r.trained]
    resumed = [t for r in runs for t in r.resumed]
    return LomoRun(out, results, skipped, trained, resumed, cfg["refused"])


def _mean_probe(runs: list[LomoRun]) -> list[dict[str, Any]]:
    """Probe rows averaged over patient folds (nan where no fold measured them)."""
    import csv

    rows: dict[tuple[str, int, str, str], list[dict[str, str]]] = {}
    for run in runs:
        path = run.out_dir / "probe.csv"
        if path.is_file():
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    rows.setdefault((row["arm"], int(row["held_out"]), row["probe"], row["split"]), []).append(row)
    out = []
    for (arm, m, probe, split), parts in sorted(rows.items(), key=lambda kv: (ARMS.index(kv[0][0]), *kv[0][1:])):
        values = [float(p["balanced_accuracy"]) for p in parts]
        finite = [v for v in values if not math.isnan(v)]
        out.append({"arm": arm, "held_out": m, "probe": probe, "split": split,
                    "balanced_accuracy": float(np.mean(finite)) if finite else math.nan,
                    "chance": float(parts[0]["chance"])})
    return out


def _mean_sd(values: Sequence[Any]) -> tuple[float, float]:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _interval(row: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    lo, hi = row.get(f"delta_{metric}_ci_low"), row.get(f"delta_{metric}_ci_high")
    if lo is None or hi is None or not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        return None
    return float(lo), float(hi)


def _excludes_zero(row: Mapping[str, Any], metric: str) -> bool:
    ci = _interval(row, metric)
    return ci is not None and not (ci[0] <= 0 <= ci[1])


def summarise_repeats(
    out: Path, runs: list[LomoRun], top_config: dict[str, Any], on_event: EventHandler | None = None
) -> LomoRun:
    """Mean ± sd over the repeats (one patient split per seed) per arm × held-out magnification.

    Writes ``repeats.csv`` (:data:`REPEAT_COLUMNS`), ``config.json`` (``repeat_dirs``) and
    ``report.md``; each repeat's own folder keeps its intervals and report.
    """
    keys = sorted(
        {(r["arm"], int(r["held_out"])) for run in runs for r in run.results}, key=lambda k: (ARMS.index(k[0]), k[1])
    )
    summary = []
    for arm, m in keys:
        rows = [r for run in runs for r in run.results if r["arm"] == arm and int(r["held_out"]) == m]
        row: dict[str, Any] = {"arm": arm, "held_out": m, "n_repeats": len(rows)}
        for metric in ("auc", "brier", "delta_auc", "delta_brier"):
            row[f"{metric}_mean"], row[f"{metric}_sd"] = _mean_sd([r.get(metric) for r in rows])
        for metric in ("auc", "brier"):
            row[f"delta_{metric}_ci_excludes_zero"] = (
                sum(_excludes_zero(r, metric) for r in rows) if arm != "baseline" else None
            )
            row[f"n_delta_{metric}_ci"] = sum(_interval(r, metric) is not None for r in rows)
        summary.append(row)
    lines = [
        [str(v) if isinstance(v, int | str) else "" if v is None else _num_text(v) for v in
         (row[c] for c in REPEAT_COLUMNS)]
        for row in summary
    ]
    atomic_write_csv(out / "repeats.csv", lines, header=REPEAT_COLUMNS)
    sub_cfg = json.loads((runs[0].out_dir / "config.json").read_text())
    pooled = [f for k, run in enumerate(runs) for f in fold_scores(run_predictions(run.out_dir), repeat=k)]
    overall = write_overall(out, pooled, int(sub_cfg.get("n_bootstrap", 1000)), int(top_config.get("seed", 0)))
    cfg = {**top_config, "repeat_dirs": [_rel(r.out_dir, out) for r in runs],
           "arms": [a for a in ARMS if any(s["arm"] == a for s in summary)],
           "held_out": sorted({int(s["held_out"]) for s in summary})}
    atomic_write_json(out / "config.json", cfg)
    lomo_report.write_report(out / "report.md", lomo_report.render_repeats(cfg, summary, len(runs), overall))
    emit_event(on_event, LomoEvent("report", message=f"summary over {len(runs)} repeats: {out / 'report.md'}"))
    return LomoRun(
        out,
        [r for run in runs for r in run.results],
        {m: r for m, r in runs[0].skipped.items() if all(m in run.skipped for run in runs)},
        [t for r in runs for t in r.trained],
        [t for r in runs for t in r.resumed],
        {f"{_rel(r.out_dir, out)}/{k}": v for r in runs for k, v in r.refused.items()},
        summary,
    )
