"""``wsienc classify``: slide-level classifiers on an embedding store (``train`` and ``predict``)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import click

from wsi_encoder.cli.common import (
    PATH_OR_URL,
    Progress,
    device_option,
    echo_err,
    imports_first,
    storage_options_option,
)
from wsi_encoder.io.urls import is_url, join, local_copy, local_output

if TYPE_CHECKING:
    from wsi_encoder.evaluation.crossval import FoldResult

MODELS = ("gridcnn", "abmil", "linear")
#: ``wsi_encoder.evaluation.crossval.CV_SCHEMES`` (named here so that ``--help`` does not import scikit-learn; a test
#: checks they agree).
CV_SCHEMES = ("kfold", "rotate4")
_SHOWN = ("auc", "f1", "balanced_accuracy", "brier", "ece")
#: ``--target`` values.
TARGETS = ("classification", "regression", "survival")
#: ``wsi_encoder.models.slide_classifiers.regressors.REGRESSION_LOSSES``.
REGRESSION_LOSSES = ("mse", "huber")
#: ``wsi_encoder.models.slide_classifiers.survival.SURVIVAL_LOSSES``.
SURVIVAL_LOSSES = ("cox", "nll")


def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (e.g. --param crop=64)", param_hint="--param")
        params[key.strip()] = value.strip()
    return params


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


class FoldProgress(Progress):
    """Cross-validation folds done, one line per fold (test slides, AUC, the chosen epoch or C)."""

    def __init__(self, folds: int) -> None:
        super().__init__("cross-validation", unit="fold", total=folds)
        self.folds = folds

    def __call__(self, result: FoldResult) -> None:
        note = " (resumed)" if result.resumed else ""
        epoch = f", best epoch {result.fit.best_epoch}" if result.fit.best_epoch else ""
        chosen = f", C={result.fit.selected['C']:g}" if result.fit.selected and "C" in result.fit.selected else ""
        self.update()
        self.write(
            f"fold {result.fold + 1}/{self.folds}: {len(result.test_index)} test slides, "
            f"AUC {_fmt(result.metrics['auc'])}{epoch}{chosen}{note}"
        )


@click.group()
def classify() -> None:
    """Slide-level classifiers on embedding grids: cross-validated training and prediction."""


@classify.command()
@click.argument("embeddings", type=PATH_OR_URL)
@click.option("--labels", "labels_csv", required=True, type=PATH_OR_URL,
              help="CSV with slide_id,label[,patient_id][,split] (split: train or test); "
              "slide_id,target[,...] for --target regression.")
@click.option("--model", type=click.Choice(MODELS), required=True, help="Slide classifier.")
@click.option("--target", type=click.Choice(TARGETS), default="classification", show_default=True,
              help="classification (label column), regression (a numeric target column) or survival "
              "(time,event columns; event 1 = death, 0 = censored).")
@click.option("--loss", type=click.Choice(REGRESSION_LOSSES + SURVIVAL_LOSSES), default=None,
              help="Loss of abmil and gridcnn: regression mse (default) or huber; survival cox (default, partial "
              "likelihood) or nll (discrete time, --time-bins). linear: ridge least squares / ridge Cox.")
@click.option("--time-bins", type=click.IntRange(min=2), default=10, show_default=True,
              help="Survival with --loss nll: time bins, at the quantiles of the training fold's event times.")
@click.option("--horizons", default=None, metavar="T1,T2,...",
              help="Survival: times of the time-dependent AUC (default: quartiles of the event times).")
@click.option("--risk-groups", type=click.Choice(["2", "3"]), default="2", show_default=True,
              help="Survival: Kaplan-Meier risk groups of kaplan_meier.png (2: median split, 3: tertiles).")
@click.option("--min-events", type=click.IntRange(min=1), default=2, show_default=True,
              help="Survival, abmil/gridcnn: mini-batches with fewer events are skipped.")
@click.option("--out", "out_dir", required=True, type=PATH_OR_URL, help="Output folder (local, or an s3:// URL).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Patient-grouped CV folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of splits, initialisation and batches.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Maximum epochs (gridcnn, abmil; early stopping on the inner validation split).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Model setting, repeatable (e.g. --param crop=64 --param lr=0.001); see docs/classify.md.")
@click.option("--preset", default=None, metavar="NAME",
              help="Named model settings, overridden by --param: gridcnn 'tellez2019' (the NIC paper's grid CNN and protocol) or 'light' (the default).")
@click.option("--cv-scheme", type=click.Choice(CV_SCHEMES), default="kfold", show_default=True,
              help="kfold: --folds folds, each with an inner validation split, final model refit on all slides; "
              "rotate4 (TPAMI 2019): 4 patient partitions, 2 train / 1 validate / 1 test, rotating, final model "
              "= mean of the 4 fold models (--folds and --val-fraction do not apply).")
@click.option("--positive-class", default=None, help="For two classes: the label reported as positive.")
@click.option("--allow-missing", is_flag=True, help="Skip (with a warning) slides only in the CSV or only in the store.")
@click.option("--val-fraction", type=click.FloatRange(0, 0.5), default=0.2, show_default=True,
              help="Share of each training fold's patients used for early stopping / model selection.")
@click.option("--n-boot", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples (of patients) for the 95% intervals.")
@device_option
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch CPU threads (default: torch's choice; 1-2 is plenty for these small models).")
@storage_options_option
@imports_first("torch", "wsi_encoder.pipelines.classify")
def train(
    embeddings: Path | str,
    labels_csv: Path | str,
    model: str,
    target: str,
    loss: str | None,
    time_bins: int,
    horizons: str | None,
    risk_groups: str,
    min_events: int,
    out_dir: Path | str,
    folds: int,
    seed: int,
    epochs: int | None,
    params: tuple[str, ...],
    preset: str | None,
    cv_scheme: str,
    positive_class: str | None,
    allow_missing: bool,
    val_fraction: float,
    n_boot: int,
    device: str,
    threads: int | None,
) -> None:
    """Cross-validate a slide classifier on EMBEDDINGS (an embedding store) and refit it on all slides.

    Writes OUT/metrics.json, OUT/predictions.csv (out-of-fold), OUT/roc.png, OUT/calibration.png and
    the final model (OUT/model.safetensors + OUT/model.json) for `wsienc classify predict`.
    """
    from wsi_encoder.pipelines.classify import train_classifier

    allowed = {"regression": REGRESSION_LOSSES, "survival": SURVIVAL_LOSSES}.get(target, ())
    if loss is not None and loss not in allowed:
        raise click.BadParameter(f"{loss} is not a loss of --target {target}"
                                 + (f" (choose {', '.join(allowed)})" if allowed else ""), param_hint="--loss")
    if target == "regression":
        _train_regression(embeddings, labels_csv, model, loss or "mse", out_dir, folds, seed, epochs, params, preset, cv_scheme,
                          allow_missing, val_fraction, n_boot, device, threads)
        return
    if target == "survival":
        _train_survival(embeddings, labels_csv, model, out_dir, folds, seed, epochs, params, preset, cv_scheme,
                        allow_missing, val_fraction, n_boot, device, threads, _parse_horizons(horizons), min_events,
                        loss or "cox", time_bins, int(risk_groups))
        return
    bar = FoldProgress(4 if cv_scheme == "rotate4" else folds)
    with bar, local_copy(labels_csv) as labels_file, local_output(out_dir) as out_folder:
        result = train_classifier(
            embeddings, labels_file, model, out_folder, folds, seed, epochs=epochs, params=_parse_params(params),
            allow_missing=allow_missing, positive_class=positive_class, device=device, val_fraction=val_fraction,
            n_boot=n_boot, threads=threads, on_fold=bar, preset=preset, cv_scheme=cv_scheme,
        )
    m = result.metrics
    labels = m["labels"]
    click.echo(
        f"{model}: {m['n_slides']} slides, {m['n_patients']} patients, classes {', '.join(labels['classes'])}"
        + (f" (positive: {labels['positive_class']})" if labels["positive_class"] else "")
    )
    if not labels["patient_id_given"]:
        click.echo("note: no patient_id column; each slide was treated as its own patient")
    click.echo(f"{'metric':<18} {'mean ± sd (folds)':>18}   {'pooled [95% CI]':>24}")
    for name in _SHOWN:
        low, high = m["pooled_ci95"][name]
        sd = m["sd"][name]
        click.echo(
            f"{name:<18} {_fmt(m['mean'][name]):>9} ± {_fmt(sd).strip():<6}   "
            f"{_fmt(m['pooled'][name])} [{_fmt(low).strip()}, {_fmt(high).strip()}]"
        )
    if m.get("test"):
        t = m["test"]["metrics"]
        click.echo(f"held-out test split ({m['test']['n_slides']} slides): " + ", ".join(f"{k} {_fmt(t[k])}" for k in _SHOWN))
    _echo_files(result.files, out_dir)


def _echo_files(files: dict[str, Path], out_dir: Path | str) -> None:
    """One line per written file, named as the user gave ``--out`` (a URL stays a URL)."""
    for key, path in files.items():
        click.echo(f"{key:<12} {join(out_dir, Path(path).name) if is_url(out_dir) else path}")


def _train_regression(
    embeddings: Path | str, labels_csv: Path | str, model: str, loss: str, out_dir: Path | str, folds: int, seed: int,
    epochs: int | None, params: tuple[str, ...], preset: str | None, cv_scheme: str, allow_missing: bool,
    val_fraction: float, n_boot: int, device: str, threads: int | None,
) -> None:
    from wsi_encoder.pipelines.classify import train_regressor

    bar = Progress("cross-validation", unit="fold", total=folds)

    def on_fold(fold: int, metrics: dict[str, float]) -> None:
        bar.update()
        bar.write(f"fold {fold + 1}/{folds}: Spearman {_fmt(metrics['spearman'])}, MAE {_fmt(metrics['mae'])}")

    with bar, local_copy(labels_csv) as labels_file, local_output(out_dir) as out_folder:
        result = train_regressor(
            embeddings, labels_file, model, out_folder, folds, seed, loss=loss, epochs=epochs,
            params=_parse_params(params), allow_missing=allow_missing, device=device, val_fraction=val_fraction,
            n_boot=n_boot, threads=threads, on_fold=on_fold, preset=preset, cv_scheme=cv_scheme,
        )
    m = result.metrics
    click.echo(f"{model} regression: {m['n_slides']} slides, {m['n_patients']} patients")
    click.echo(f"{'metric':<10} {'pooled [95% CI]':>24}")
    for name in ("spearman", "pearson", "mae", "r2"):
        low, high = m[f"{name}_ci95"]
        click.echo(f"{name:<10} {_fmt(m[name])} [{_fmt(low).strip()}, {_fmt(high).strip()}]")
    _echo_files(result.files, out_dir)


def _parse_horizons(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of times", param_hint="--horizons") from None


def _train_survival(
    embeddings: Path | str, labels_csv: Path | str, model: str, out_dir: Path | str, folds: int, seed: int,
    epochs: int | None, params: tuple[str, ...], preset: str | None, cv_scheme: str, allow_missing: bool,
    val_fraction: float, n_boot: int, device: str, threads: int | None, horizons: list[float] | None,
    min_events: int, loss: str, time_bins: int, n_risk_groups: int,
) -> None:
    from wsi_encoder.pipelines.classify import train_survival

    bar = Progress("cross-validation", unit="fold", total=folds)

    def on_fold(fold: int, metrics: dict[str, float]) -> None:
        bar.update()
        bar.write(f"fold {fold + 1}/{folds}: C-index {_fmt(metrics['c_index'])}")

    with bar, local_copy(labels_csv) as labels_file, local_output(out_dir) as out_folder:
        result = train_survival(
            embeddings, labels_file, model, out_folder, folds, seed, epochs=epochs, params=_parse_params(params),
            allow_missing=allow_missing, device=device, val_fraction=val_fraction, n_boot=n_boot, threads=threads,
            horizons=horizons, min_events=min_events, loss=loss, time_bins=time_bins, n_risk_groups=n_risk_groups,
            on_fold=on_fold, preset=preset, cv_scheme=cv_scheme,
        )
    m = result.metrics
    low, high = m["c_index_ci95"]
    click.echo(f"{model} survival: {m['n_slides']} slides, {m['n_patients']} patients, {m['labels']['n_events']} events")
    click.echo(f"Harrell's C {_fmt(m['c_index'])} [{_fmt(low).strip()}, {_fmt(high).strip()}] "
               "(out-of-fold, pairs within each fold)")
    if m.get("uno_c") is not None:
        click.echo(f"Uno's C (tau {m['uno_c_tau']:g}) {_fmt(m['uno_c'])}; time-dependent AUC (fold means) "
                   + ", ".join(f"t={k}: {_fmt(v)}" for k, v in m["td_auc"].items()))
    if m.get("ibs") is not None:
        low, high = m["ibs_ci95"]
        click.echo(f"integrated Brier score (t {m['ibs_times'][0]:g} to {m['ibs_times'][1]:g}) {_fmt(m['ibs'])} "
                   f"[{_fmt(low).strip()}, {_fmt(high).strip()}]")
    groups = m["risk_groups"]
    p_value = "n/a" if groups["logrank_p"] is None else f"{groups['logrank_p']:.2g}"
    click.echo(f"{groups['n_groups']} risk groups (patients): " + ", ".join(
        f"{name} {g['n_patients']} ({g['n_events']} events)" for name, g in groups["groups"].items())
        + f"; log-rank p = {p_value}")
    if m.get("test"):
        test, (low, high) = m["test"], m["test"]["c_index_ci95"]
        click.echo(f"held-out test split ({test['n_slides']} slides, {test['n_events']} events): Harrell's C "
                   f"{_fmt(test['metrics']['c_index'])} [{_fmt(low).strip()}, {_fmt(high).strip()}] (final model)")
    _echo_files(result.files, out_dir)


@classify.command()
@click.argument("embeddings", type=PATH_OR_URL)
@click.option("--model", "model_dir", required=True, type=PATH_OR_URL,
              help="The --out folder of `wsienc classify train`.")
@click.option("--out", "out_csv", required=True, type=PATH_OR_URL, help="Predictions CSV to write.")
@click.option("--heatmap-dir", type=PATH_OR_URL, default=None,
              help="Write one heatmap PNG (over the thumbnail) and .npy per slide here.")
@click.option("--labels", "labels_csv", type=PATH_OR_URL, default=None,
              help="Optional labels CSV: adds a label column and prints metrics.")
@click.option("--allow-encoder-mismatch", is_flag=True,
              help="Predict even if the store was encoded by another encoder than the training store.")
@click.option("--horizons", default=None, metavar="T1,T2,...",
              help="Survival models: write survival_at_<t> at these times (default: the training run's horizons).")
@device_option
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch CPU threads (default: torch's choice; 1-2 is plenty for these small models).")
@storage_options_option
@imports_first("torch", "wsi_encoder.pipelines.classify_predict")
def predict(
    embeddings: Path | str,
    model_dir: Path | str,
    out_csv: Path | str,
    heatmap_dir: Path | str | None,
    labels_csv: Path | str | None,
    allow_encoder_mismatch: bool,
    horizons: str | None,
    device: str,
    threads: int | None,
) -> None:
    """Predict every slide of EMBEDDINGS with a trained model; optionally draw per-slide heatmaps."""
    from wsi_encoder.pipelines.classify_predict import predict as run_predict

    with ExitStack() as stack:
        bar = stack.enter_context(Progress("predicting", unit="slide", leave=False))
        model_folder = stack.enter_context(local_copy(model_dir))
        csv_file = stack.enter_context(local_output(out_csv))
        heat_folder = None if heatmap_dir is None else stack.enter_context(local_output(heatmap_dir))
        labels_file = None if labels_csv is None else stack.enter_context(local_copy(labels_csv))
        result = run_predict(
            embeddings, model_folder, csv_file, heat_folder, labels_csv=labels_file, device=device,
            allow_encoder_mismatch=allow_encoder_mismatch, threads=threads,
            on_slide=lambda slide_id: bar.update(), horizons=_parse_horizons(horizons),
        )
    for slide_id, reason in result.skipped.items():
        echo_err(f"skipped {slide_id}: {reason}")
    click.echo(f"predicted {len(result.rows)} slides -> {out_csv}")
    if result.heatmaps:
        click.echo(f"heatmaps    {len(result.heatmaps)} PNG in {heatmap_dir}")
    if result.metrics:
        click.echo(json.dumps(result.metrics, indent=None))
