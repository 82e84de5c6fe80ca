"""``wsienc lomo``: patient-disjoint leave-one-magnification-out on BreaKHis (baseline / GAN / GRL)."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_encoder.cli.common import echo_err


def _arms(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    arms = [a.strip() for a in value.split(",") if a.strip()]
    bad = [a for a in arms if a not in ("baseline", "gan", "grl")]
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
    default="baseline,gan,grl",
    show_default=True,
    callback=_arms,
    help="Arms to run: baseline, gan (DCGAN augmentation), grl (gradient reversal on magnification).",
)
@click.option(
    "--backbone",
    default="resnet18",
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
    default=224,
    show_default=True,
    help="Classifier input side in px (each 700x460 image is resized to it).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Epochs over the real training images (the same step budget for every arm).",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per step."
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-4,
    show_default=True,
    help="Adam learning rate (every arm).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the patient split, the shared initial weights, batch order and DCGANs.",
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Share of each class's patients in the test set  [default: 0.3].",
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
    default=0.2,
    show_default=True,
    help="Share of each class's training patients used for validation (best-epoch selection).",
)
@click.option(
    "--strict-patients",
    is_flag=True,
    help="Group patients by number (14-22549 groups 22549AB and 22549CD) instead of slide token.",
)
@click.option(
    "--gan-ratio",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Synthetic DCGAN images per real training image (gan arm).",
)
@click.option(
    "--gan-epochs",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="DCGAN training epochs (one DCGAN per class and fold).",
)
@click.option(
    "--gan-width",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="DCGAN base filter count (64 in Radford et al.; smaller is faster).",
)
@click.option(
    "--grl-weight",
    type=click.FloatRange(min=0),
    default=1.0,
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
    "--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:1 ..."
)
def lomo(
    data: tuple[Path, ...],
    out_dir: Path,
    arms: list[str],
    backbone: str,
    weights: Path | None,
    embed_dim: int | None,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    test_fraction: float | None,
    patient_folds: int | None,
    val_fraction: float,
    strict_patients: bool,
    gan_ratio: float,
    gan_epochs: int,
    gan_width: int,
    grl_weight: float,
    max_images_per_split: int | None,
    device: str,
) -> None:
    """Magnification shift on BreaKHis: train on three magnifications, test on the fourth.

    DATA is one or more BreaKHis folders (the official BreaKHis_v1 tree or folders of BreaKHis-named
    PNGs). Patients are split into train/test (no patient on both sides); for each held-out
    magnification every arm trains from the same initial weights on the training patients' images at
    the other magnifications and is tested on the test patients' images at the held-out one.
    Writes results.csv, report.md, plots/, splits.csv, config.json and embeddings/ under --out.
    """
    from wsi_encoder.pipelines.lomo import LomoConfig, LomoEvent, run_lomo

    if test_fraction is not None and patient_folds is not None:
        raise click.UsageError("use either --test-fraction or --patient-folds, not both")
    config = LomoConfig(
        backbone=backbone,
        weights=None if weights is None else str(weights.resolve()),
        embed_dim=embed_dim,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        test_fraction=0.3 if test_fraction is None else test_fraction,
        patient_folds=patient_folds,
        val_fraction=val_fraction,
        strict_patients=strict_patients,
        gan_ratio=gan_ratio,
        gan_epochs=gan_epochs,
        gan_width=gan_width,
        grl_weight=grl_weight,
        max_images_per_split=max_images_per_split,
    )
    ctx = click.get_current_context()
    quiet = (ctx.find_root().obj or {}).get("verbosity", 0) < 0

    def on_event(event: LomoEvent) -> None:
        if quiet:
            return
        if event.kind == "cache":
            if event.step == 1 or event.step == event.total or event.step % 500 == 0:
                echo_err(f"decoding images {event.step}/{event.total}")
            return
        if event.kind == "gan_epoch" and event.step % max(1, event.total // 10) and event.step != event.total:
            return
        if event.message:
            echo_err(event.message)

    run = run_lomo(data, out_dir, config, arms=arms, device=device, on_event=on_event)
    click.echo(
        f"{len(run.trained)} (arm, fold) trained, {len(run.resumed)} already done; "
        f"results: {out_dir / 'results.csv'}, report: {out_dir / 'report.md'}"
    )
    for row in run.results:
        click.echo(
            f"  {row['arm']:<8} {int(row['held_out']):>3}X held out  AUC {row['auc']:.3f}  "
            f"Brier {row['brier']:.3f}  F1 {row['f1']:.3f}  ({row['n_test_images']} images)"
        )
    for m, reason in sorted(run.skipped.items()):
        click.echo(f"  {m}X held out: not run ({reason})")
