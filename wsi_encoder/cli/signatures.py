"""``wsienc signatures``: sparse embedding signatures, their cross-fold Jaccard and calibrated performance."""

from __future__ import annotations

import math
from pathlib import Path

import click

from wsi_encoder.cli.common import Progress, echo_err, imports_first


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    default=None,
    help="Embedding-store input: CSV slide_id,label,patient_id (a slide's vector is the mean of its tile features).",
)
@click.option("--folds", "n_folds", type=click.IntRange(min=2), default=None, help="Embedding-store input: patient-grouped folds [default: 5].")
@click.option("--stability", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stability selection over N half-patient subsamples (0: off).")
@click.option("--stability-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.6, show_default=True,
              help="Fraction of the subsamples in which a dimension must be selected.")
@click.option("--one-se", is_flag=True, help="One-standard-error rule: the sparsest penalty within 1 SE of the best.")
@click.option("--relaxed", is_flag=True,
              help="Score penalties by an L2 refit on the selected dimensions (relaxed lasso): fewer noise dimensions.")
@click.option("--inner-folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Patient-grouped inner CV folds for the penalty.")
@click.option("--inner-repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat the inner CV with reshuffled patients (steadier penalty choice, proportionally slower).")
@click.option("--n-lambdas", type=click.IntRange(min=2), default=12, show_default=True, help="Penalties on the L1 path.")
@click.option("--solver", type=click.Choice(["liblinear", "saga"]), default="liblinear", show_default=True,
              help="scikit-learn solver of the L1 fits.")
@click.option("--positive-class", default=None, help="Embedding-store input: the label that is the positive class.")
@click.option("--allow-missing", is_flag=True, help="Embedding-store input: skip slides missing from the store or the CSV.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=20, show_default=True,
              help="Resamples of each fold's training patients, re-selected from scratch, behind the intervals of size "
              "and Jaccard (0: none; each costs one selection).")
@click.option("--select-on", type=click.Choice(["val", "train"]), default=None,
              help="LOMO input: the images whose embeddings select the signature and fit the probes: `val` (default: "
              "the validation-role patients of splits.csv, whose labels the encoder never fitted) or `train` (every "
              "training-side image; a sensitivity analysis). Embedding stores always use their training folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of folds, inner CV, subsamples and solvers.")
@imports_first("wsi_encoder.pipelines.signatures")
def signatures(
    src: Path,
    out_dir: Path,
    labels: Path | None,
    n_folds: int | None,
    stability: int,
    stability_threshold: float,
    one_se: bool,
    relaxed: bool,
    inner_folds: int,
    inner_repeats: int,
    n_lambdas: int,
    solver: str,
    positive_class: str | None,
    allow_missing: bool,
    bootstrap: int,
    select_on: str | None,
    seed: int,
) -> None:
    """Sparse signatures (L1 logistic regression) of the embeddings in SRC, per arm and fold.

    SRC is a `wsienc lomo` output folder (config.json + embeddings/<arm>/heldout_<m>.npz) or an
    embedding store with --labels and --folds. Writes signatures.csv, jaccard.csv, seed_null.csv,
    signatures.json, jaccard_<arm>.png, size_vs_auc.png and report.md in --out. A LOMO folder made with
    `wsienc lomo --seed-null` also gives each fold's seed-to-seed reference Jaccard.
    """
    from wsi_encoder.evaluation.signatures import SignatureSpec
    from wsi_encoder.pipelines.signatures import run_signatures

    spec = SignatureSpec(
        inner_folds=inner_folds,
        inner_repeats=inner_repeats,
        n_lambdas=n_lambdas,
        one_se=one_se,
        relaxed=relaxed,
        stability=stability,
        stability_threshold=stability_threshold,
        solver=solver,
        bootstrap=bootstrap,
        seed=seed,
    )
    with Progress("signatures", unit="fold") as bar:
        run = run_signatures(
            src,
            out_dir,
            labels=labels,
            n_folds=n_folds,
            spec=spec,
            positive_class=positive_class,
            allow_missing=allow_missing,
            select_on=select_on,
            iterate=bar.iterate,
        )
    arms = dict.fromkeys(r.arm for r in run.records)
    for arm in arms:
        recs = [r for r in run.records if r.arm == arm]
        sizes = ", ".join(f"{r.fold} {r.size}" for r in recs)
        aucs = [r.metrics_signature["auc"] for r in recs if math.isfinite(r.metrics_signature["auc"])]
        mean_auc = f"{sum(aucs) / len(aucs):.3f}" if aucs else "n/a (single-class test sets)"
        click.echo(f"{arm}: signature sizes {sizes}; mean AUC (signature) {mean_auc}")
    for key, reason in run.failed.items():
        echo_err(f"skipped {key}: {reason}")
    click.echo(f"wrote {run.out_dir / 'report.md'} (+ signatures.csv, jaccard.csv, signatures.json, PNGs)")
