"""``wsienc demo``: the main job end to end on a generated demo cohort."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True, help="Output folder.")
@click.option("--slides", "n_slides", type=click.IntRange(min=6), default=12, show_default=True, help="Slides in the cohort.")
@click.option(
    "--model",
    type=click.Choice(["abmil", "gridcnn", "linear"]),
    default="abmil",
    show_default=True,
    help="Slide-level classifier.",
)
@click.option("--encoder-steps", type=click.IntRange(min=1), default=150, show_default=True, help="Encoder training steps.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Local dask workers for tiling.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated cohort and of training.")
def demo(out: Path, n_slides: int, model: str, encoder_steps: int, workers: int, seed: int) -> None:
    """Generate a demo cohort (label: a lesion texture) and run tile -> train-encoder -> encode -> classify."""
    from wsi_encoder.pipelines.demo import DemoConfig, run_demo

    config = DemoConfig(n_slides=n_slides, classifier=model, encoder_steps=encoder_steps, workers=workers, seed=seed)
    result = run_demo(out, config, say=click.echo)
    metrics = result.metrics
    click.echo("")
    click.echo(f"cross-validated slide-level metrics ({model}, {config.folds} patient-grouped folds, {metrics['n_slides']} slides):")
    click.echo(f"  {'metric':<18} {'mean ± sd over folds':<22} pooled out-of-fold [bootstrap 95% CI]")
    for name in ("auc", "f1", "balanced_accuracy", "brier", "ece"):
        mean, sd = metrics["mean"].get(name), metrics["sd"].get(name)
        pooled = metrics["pooled"].get(name)
        low, high = (metrics.get("pooled_ci95") or {}).get(name, (None, None)) or (None, None)
        ci = f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        click.echo(f"  {name:<18} {mean:.3f} ± {sd:.3f}{'':<8} {pooled:.3f} {ci}")
    click.echo(f"  full metrics: {result.paths['classifier'] / 'metrics.json'}")
    click.echo("")
    click.echo("pictures:")
    for key in ("qc", "previews"):
        click.echo(f"  {key:<10} {result.paths[key]}")
    for key, path in result.paths.items():
        if str(path).endswith(".png"):
            click.echo(f"  {key:<10} {path}")
    click.echo(f"everything is in {result.out}")
