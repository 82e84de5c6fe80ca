"""``wsienc demo``: the main job end to end on a generated demo cohort."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_encoder.cli.classify import FoldProgress
from wsi_encoder.cli.common import Progress, device_option, imports_first
from wsi_encoder.cli.encode import EncodeProgress
from wsi_encoder.cli.tile import TileProgress
from wsi_encoder.cli.train import TrainProgress
from wsi_encoder.pipelines.demo import DemoConfig

D = DemoConfig()


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True, help="Output folder.")
@click.option("--slides", "n_slides", type=click.IntRange(min=6), default=D.n_slides, show_default=True, help="Slides in the cohort.")
@click.option(
    "--model",
    "classifier",
    type=click.Choice(["abmil", "gridcnn", "linear"]),
    default=D.classifier,
    show_default=True,
    help="Slide-level classifier.",
)
@click.option("--target", type=click.Choice(["classification", "survival"]), default=D.target, show_default=True,
              help="classification (label: a lesion is present) or survival (the lesion burden sets the hazard of "
              "generated death times; a Cox model is trained).")
@click.option("--encoder-steps", type=click.IntRange(min=1), default=D.encoder_steps, show_default=True, help="Encoder training steps.")
@click.option("--workers", type=click.IntRange(min=1), default=D.workers, show_default=True, help="Local dask workers for tiling.")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed of the generated cohort and of training.")
@device_option
@imports_first("torch", "wsi_encoder.pipelines.demo")
def demo(out: Path, n_slides: int, classifier: str, target: str, encoder_steps: int, workers: int, seed: int,
         device: str) -> None:
    """Generate a demo cohort (label: a lesion texture) and run tile -> train-encoder -> encode -> classify."""
    from wsi_encoder.pipelines.demo import DemoHooks, run_demo

    config = DemoConfig(
        n_slides=n_slides, classifier=classifier, target=target, encoder_steps=encoder_steps, workers=workers, seed=seed,
        device=device,
    )
    model = config.classifier
    bars = _DemoProgress(config.folds)
    with bars:
        result = run_demo(
            out,
            config,
            hooks=DemoHooks(
                say=bars.say,
                tiles=bars.tiles,
                train_tasks=bars.training.tasks,
                train_step=bars.training.step,
                train_epoch=bars.training.epoch,
                train_phase=bars.training.phase,
                encoded=bars.encoding,
                fold=bars.folds,
            ),
        )
    metrics = result.metrics
    click.echo("")
    if target == "survival":
        low, high = metrics["c_index_ci95"]
        groups = metrics["risk_groups"]
        click.echo(f"cross-validated survival ({model}, {config.folds} patient-grouped folds, {metrics['n_slides']} slides, "
                   f"{metrics['labels']['n_events']} events):")
        click.echo(f"  Harrell's C {_fmt(metrics['c_index'])} [{_fmt(low)}, {_fmt(high)}]; log-rank p of the median "
                   f"split {_fmt(groups['logrank_p'])}; integrated Brier score {_fmt(metrics.get('ibs'))}")
        click.echo(f"  full metrics: {result.paths['classifier'] / 'metrics.json'}")
        click.echo(f"  Kaplan-Meier: {result.paths['kaplan_meier']}")
        click.echo(f"everything is in {result.out}")
        return
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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


class _DemoProgress:
    """One bar per step of the demo (tiling, encoder training, encoding, cross-validation)."""

    def __init__(self, folds: int) -> None:
        self.tiles = TileProgress()
        self.training = TrainProgress("encoder training")
        self.encoding = EncodeProgress()
        self.folds = FoldProgress(folds)
        self._bars: tuple[Progress, ...] = (self.tiles, self.training, self.encoding, self.folds)

    def say(self, message: str) -> None:
        """A new step starts: the previous step's bar is finished first."""
        self.close()
        click.echo(message)

    def close(self) -> None:
        for bar in self._bars:
            bar.close()

    def __enter__(self) -> _DemoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
