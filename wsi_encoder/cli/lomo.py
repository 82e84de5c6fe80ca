"""``wsienc lomo``: patient-disjoint leave-one-magnification-out on BreaKHis (baseline / GAN / GRL)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from wsi_encoder.cli.common import Progress, device_option, imports_first
from wsi_encoder.pipelines.lomo_config import ARMS, LomoConfig

if TYPE_CHECKING:
    from wsi_encoder.pipelines.lomo_summary import LomoEvent

D = LomoConfig.default


def _arms(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    arms = [a.strip() for a in value.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise click.BadParameter(f"{value!r}: choose a comma-separated subset of baseline,gan,grl")
    return arms


@click.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (an earlier run there with the same options is resumed).",
)
@click.option(
    "--arms",
    default=",".join(ARMS),
    show_default=True,
    callback=_arms,
    help="Arms to run: baseline, gan (DCGAN augmentation), grl (gradient reversal on magnification).",
)
@click.option(
    "--backbone",
    default=D("backbone"),
    show_default=True,
    help="Registered encoder (see `wsienc encoders`: nic, resnet18, ..., uni, virchow2, ...) or a `wsienc train-encoder` checkpoint folder.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Local weights for the backbone in its official layout (required for pretrained encoders, or found under $WSIENC_WEIGHTS_DIR); default for nic/resnets: seeded random init.",
)
@click.option(
    "--embed-dim",
    type=click.IntRange(min=1),
    default=None,
    help="Linear embedding of this width on top of the backbone (default: the backbone's features).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=16),
    default=D("image_size"),
    show_default=True,
    help="Classifier input side in px (each 700x460 image is resized to it).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=D("epochs"),
    show_default=True,
    help="Epochs over the real training images (the same real batches in every arm).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=D("batch_size"),
    show_default=True,
    help="Real images per step (the gan arm adds its synthetic images on top).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=D("lr"),
    show_default=True,
    help="Adam learning rate (every arm).",
)
@click.option(
    "--seed",
    type=int,
    default=D("seed"),
    show_default=True,
    help="Seed of the patient split, the shared initial weights, batch order and DCGANs.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=D("repeats"),
    show_default=True,
    help="Rerun the whole protocol on R patient splits (seeds SEED..SEED+R-1); report mean ± sd.",
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help=f"Share of each class's patients in the test set  [default: {D('test_fraction')}].",
)
@click.option(
    "--patient-folds",
    type=click.IntRange(min=2),
    default=None,
    help="Instead of one split: k stratified patient folds (every patient tested once; one sub-folder per fold).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=D("val_fraction"),
    show_default=True,
    help="Share of each class's training patients used for validation (logged per epoch; best-val selection).",
)
@click.option(
    "--patient-key",
    type=click.Choice(["number", "token"]),
    default=D("patient_key"),
    show_default=True,
    help="number: one patient per case number (14-22549AB, 14-22549CD, 14-22549G are one patient); "
    "token: one per slide token (leaks patients across the split; only to reproduce work that did so).",
)
@click.option(
    "--selection",
    "--select-epoch",
    "select_epoch",
    type=click.Choice(["last", "best-val"]),
    default=D("select_epoch"),
    show_default=True,
    help="Epoch whose weights every arm keeps: last, or (sensitivity) best-val among the epochs "
    "after the GRL lambda ramp.",
)
@click.option(
    "--bootstrap",
    "n_bootstrap",
    type=click.IntRange(min=100),
    default=D("n_bootstrap"),
    show_default=True,
    help="Seeded patient-grouped bootstrap resamples behind every interval.",
)
@click.option(
    "--allow-contaminated-backbone",
    is_flag=True,
    default=D("allow_contaminated_backbone"),
    help="Accept a train-encoder checkpoint trained on BreaKHis or on DATA (the report then says so first).",
)
@click.option(
    "--gan-ratio",
    type=click.FloatRange(min=0),
    default=D("gan_ratio"),
    show_default=True,
    help="Synthetic DCGAN images added per real image of each batch (gan arm).",
)
@click.option(
    "--gan-epochs",
    type=click.IntRange(min=1),
    default=D("gan_epochs"),
    show_default=True,
    help="DCGAN training epochs (one DCGAN per class and fold).",
)
@click.option(
    "--gan-width",
    type=click.IntRange(min=1),
    default=D("gan_width"),
    show_default=True,
    help="DCGAN base filter count (64 in Radford et al.; smaller is faster).",
)
@click.option(
    "--grl-weight",
    type=click.FloatRange(min=0),
    default=D("grl_weight"),
    show_default=True,
    help="Scale of the DANN schedule lambda(p) = 2/(1+exp(-10p)) - 1 (grl arm).",
)
@click.option(
    "--max-images-per-split",
    type=click.IntRange(min=1),
    default=None,
    help="Quick runs: at most this many images per role (train/val/test) and fold.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=D("workers"),
    show_default=True,
    help="DataLoader processes reading training batches (speed only; the results do not change).",
)
@click.option(
    "--seed-null",
    is_flag=True,
    default=D("seed_null"),
    help="Also train every arm x fold with a second training seed (same initial weights, images and roles) into "
    "seed_null/: the seed-to-seed reference Jaccard of `wsienc signatures`. Resuming a finished run with it trains "
    "only the second seeds.",
)
@device_option
@imports_first("torch", "wsi_encoder.pipelines.lomo")
def lomo(
    data: tuple[Path, ...],
    out_dir: Path,
    arms: list[str],
    device: str,
    **settings: Any,
) -> None:
    """Magnification shift on BreaKHis: train on three magnifications, test on the fourth.

    DATA is one or more BreaKHis folders (the official BreaKHis_v1 tree or folders of BreaKHis-named
    PNGs). Patients are split into train/test (no patient on both sides); for each held-out
    magnification every arm trains from the same initial weights on the training patients' images at
    the other magnifications and is tested on the test patients' images at the held-out one.
    Writes results.csv, report.md, plots/, splits.csv, config.json and embeddings/ under --out.
    """
    from wsi_encoder.pipelines.lomo import run_lomo

    if settings["test_fraction"] is not None and settings["patient_folds"] is not None:
        raise click.UsageError("use either --test-fraction or --patient-folds, not both")
    if settings["test_fraction"] is None:
        del settings["test_fraction"]  # LomoConfig's default (None on the command line: exclusive with folds)
    if settings["weights"] is not None:
        settings["weights"] = str(settings["weights"].resolve())
    config = LomoConfig(**settings)  # every option is a LomoConfig field of the same name
    with _LomoProgress() as on_event:
        run = run_lomo(data, out_dir, config, arms=arms, device=device, on_event=on_event)
    click.echo(
        f"{len(run.trained)} (arm, fold) trained, {len(run.resumed)} already done; "
        f"report: {out_dir / 'report.md'}"
    )
    if run.summary:
        click.echo(f"mean ± sd over {config.repeats} repeats ({out_dir / 'repeats.csv'}):")
        for row in run.summary:
            click.echo(
                f"  {row['arm']:<8} {int(row['held_out']):>3}X held out  AUC {_ms(row, 'auc')}  "
                f"Brier {_ms(row, 'brier')}"
            )
    else:
        click.echo(f"results (95% patient-bootstrap intervals): {out_dir / 'results.csv'}")
        for row in run.results:
            delta = ""
            if row.get("delta_auc") is not None:
                delta = f"  ΔAUC vs baseline {_ci(row, 'delta_auc', '+.3f')}"
            click.echo(
                f"  {row['arm']:<8} {int(row['held_out']):>3}X held out  AUC {_ci(row, 'auc', '.3f')}  "
                f"Brier {_ci(row, 'brier', '.3f')}  ({row['n_test_images']} images, "
                f"{row['n_test_patients']} patients){delta}"
            )
    for m, reason in sorted(run.skipped.items()):
        click.echo(f"  {m}X held out: not run ({reason})")
    for key, reason in sorted(run.refused.items()):
        click.echo(f"  {key}: refused ({reason})")


def _ci(row: dict, metric: str, fmt: str) -> str:
    values = [row.get(metric), row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")]
    if values[0] is None or math.isnan(values[0]):
        return "n/a"
    if any(v is None or math.isnan(v) for v in values[1:]):
        return f"{values[0]:{fmt}} [n/a]"
    return f"{values[0]:{fmt}} [{values[1]:{fmt}}, {values[2]:{fmt}}]"


def _ms(row: dict, metric: str) -> str:
    mean, sd = row.get(f"{metric}_mean"), row.get(f"{metric}_sd")
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None and not math.isnan(sd) else f"{mean:.3f}"


#: Events drawn as a bar: kind -> (label, unit).
_BARS = {"cache": ("decoding images", "image"), "epoch": ("epochs", "epoch"), "gan_epoch": ("DCGAN", "epoch")}


class _LomoProgress:
    """Draws ``run_lomo``'s events: a bar for image decoding, classifier and DCGAN epochs; lines above it."""

    def __init__(self) -> None:
        self.bar = Progress("lomo")
        self.key: tuple[str, str | None, int | None] | None = None

    def __call__(self, event: LomoEvent) -> None:
        if event.kind in _BARS:
            key = (event.kind, event.arm, event.held_out)
            if key != self.key:
                self.bar.close()
                desc, unit = _BARS[event.kind]
                where = f"{event.arm} / {event.held_out}X " if event.arm else ""
                self.bar = Progress(f"{where}{desc}", unit=unit, total=event.total, leave=False)
                self.key = key
            self.bar.update(max(0, event.step - self.bar.done))
            stats = [
                f"{k} {v:.3f}"
                for k, v in event.values.items()
                if k != "epoch" and isinstance(v, float) and not math.isnan(v)
            ]
            if stats:
                self.bar.postfix(", ".join(stats))
            if event.kind != "epoch":
                return
        if event.message:
            self.bar.write(event.message)

    def __enter__(self) -> _LomoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
