"""``wsienc tasks`` and ``wsienc train-encoder``: the task library and multitask encoder training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from wsi_encoder.cli.common import echo_err
from wsi_encoder.errors import InvalidParameterError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the tasks as a JSON list.")
def tasks(as_json: bool) -> None:
    """List the registered training tasks, what each predicts and the on-disk layout it expects."""
    from wsi_encoder.tasks import list_tasks

    specs = list_tasks()
    if as_json:
        rows = [
            {
                "name": s.name,
                "kind": s.kind,
                "classes": list(s.classes) if s.classes else None,
                "mpp": s.mpp,
                "description": s.description,
                "layout": s.layout,
                "options": list(s.options),
            }
            for s in specs
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    for s in specs:
        click.echo(f"{s.name}  [{s.kind}{f', {len(s.classes)} classes' if s.classes else ''}]  {s.description}")
        click.echo(f"    layout:  {s.layout}")
        if s.options:
            click.echo(f"    options: {', '.join(f'{o}=...' for o in s.options)}")
    click.echo("")
    click.echo("Use: wsienc train-encoder --task NAME=PATH[,weight=W][,name=ALIAS][,mpp=UM][,option=VALUE] ...")


def _parse_tasks(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[Any]:
    from wsi_encoder.pipelines.train_encoder import parse_task_argument

    if not values:
        raise click.BadParameter("give at least one --task NAME=PATH (see `wsienc tasks`)", ctx, param)
    try:
        return [parse_task_argument(v) for v in values]
    except InvalidParameterError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


@click.command("train-encoder")
@click.option(
    "--task",
    "task_args",
    multiple=True,
    callback=_parse_tasks,
    metavar="NAME=PATH[,k=v]",
    help="A task and its data; repeat for multitask training. Options: weight=W (loss weight), name=ALIAS, "
    "mpp=UM (images' µm/px), and the task's own (labels=CSV for patch-store). See `wsienc tasks`.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Checkpoint directory.")
@click.option("--backbone", default="nic", show_default=True,
              help="Encoder (see `wsienc encoders`): nic, resnet18/34/50, or a pretrained one (uni, virchow2, ...) with --weights.")
@click.option("--embed-dim", type=click.IntRange(min=1), default=None,
              help="Linear embedding on top of the backbone (default: 128 for nic/resnets, the pretrained backbone's own features otherwise).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after N steps (overrides --epochs).")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, help="Default: all training images once.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Fraction of patients per task held out for validation.")
@click.option("--val-max-images", type=click.IntRange(min=1), default=None, help="Cap validation images per task.")
@click.option("--input-size", type=click.IntRange(min=16), default=None, help="Tile side in px (default: encoder's).")
@click.option("--input-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="µm/px of the encoder's input (default: encoder's, 0.5).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Pretrained backbone weights: a local file in the backbone's official layout (never downloaded; default $WSIENC_WEIGHTS_DIR/<name>/).")
@click.option("--freeze-backbone", is_flag=True, help="Train only the heads (and --embed-dim layer) on a frozen pretrained backbone.")
@click.option("--unfreeze-last", type=click.IntRange(min=0), default=None, metavar="N",
              help="Freeze the backbone except its last N blocks (ViT blocks / ResNet stages).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader worker processes (default: one per spare CPU core, at most 4; 0 = load in-process).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present).")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (default: on with CUDA).")
@click.option("--cache-mb", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Decode small datasets into memory up to this size.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Also checkpoint every N steps (0: epoch ends only).")
@click.option("--no-augment", is_flag=True, help="Disable flips/rotations/colour/scale augmentation.")
@click.option("--overwrite", is_flag=True, help="Start afresh even if --out holds a checkpoint (default: resume).")
@click.pass_context
def train_encoder(ctx: click.Context, task_args: list[Any], out_dir: Path, **opts: Any) -> None:
    """Train a multitask supervised patch encoder on several labelled datasets.

    Every --task gets its own head on a shared encoder; batches mix tasks evenly; each task is split
    patient-disjointly for validation (accuracy, AUC, F1 per task each epoch). The checkpoint in
    --out (model.safetensors + config.json) loads with wsi_encoder.load_encoder(OUT); running the same
    command again resumes it.
    """
    from tqdm import tqdm

    from wsi_encoder.pipelines.train_encoder import prepare_tasks
    from wsi_encoder.training.augment import NO_AUGMENT, AugmentConfig
    from wsi_encoder.training.multitask import EpochInfo, StepInfo, TrainConfig, train_multitask

    if out_dir.exists() and not out_dir.is_dir():
        raise click.BadParameter(f"{str(out_dir)!r} is a file, not a directory", param_hint="--out")
    from wsi_encoder.models.encoders import get_spec, list_encoders

    if opts["backbone"] not in list_encoders():
        raise click.BadParameter(
            f"unknown backbone {opts['backbone']!r}; known: {', '.join(list_encoders())}", param_hint="--backbone"
        )
    if opts["freeze_backbone"] and opts["unfreeze_last"] is not None:
        raise click.BadParameter("--freeze-backbone and --unfreeze-last N are exclusive", param_hint="--unfreeze-last")
    if opts["embed_dim"] is None and not get_spec(opts["backbone"]).requires_weights:
        opts["embed_dim"] = 128
    overwrite = opts.pop("overwrite")
    augment = NO_AUGMENT if opts.pop("no_augment") else AugmentConfig()
    weights = opts.pop("weights")
    config = TrainConfig(**opts, weights=None if weights is None else str(weights), augment=augment)
    quiet = (ctx.find_root().obj or {}).get("verbosity", 0) < 0

    prepared = prepare_tasks(task_args, val_fraction=config.val_fraction, seed=config.seed)
    if not quiet:
        for t in prepared:
            counts = ", ".join(f"{c} {n}" for c, n in t.data.class_counts().items())
            echo_err(
                f"task {t.name}: {len(t.split.train)} train / {len(t.split.val)} val images, "
                f"{len(set(t.data.groups.tolist()))} groups ({t.split.method}); {counts}"
            )
    bar: Any = None

    def on_step(info: StepInfo) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(total=info.total_steps, initial=info.step - 1, desc="train-encoder", unit="step",
                       file=click.get_text_stream("stderr"), dynamic_ncols=True)
        bar.update(1)
        losses = " ".join(f"{n}={v:.3f}" for n, v in info.task_losses.items())
        bar.set_postfix_str(f"ep {info.epoch} lr {info.lr:.2g} {losses} {info.images_per_second:.0f} img/s")

    def on_epoch(info: EpochInfo) -> None:
        if quiet:
            return
        lines = [f"epoch {info.epoch} (step {info.step}):"]
        for name, loss in info.train_losses.items():
            m = info.metrics.get(name)
            val = (
                f"val loss {_fmt(m.get('loss'))} acc {_fmt(m.get('accuracy'))} auc {_fmt(m.get('auc'))} "
                f"f1 {_fmt(m.get('f1'))} (n={m.get('n')})"
                if m
                else "no validation images"
            )
            lines.append(f"  {name}: train loss {loss:.3f}; {val}")
        text = "\n".join(lines)
        if bar is not None:
            bar.write(text, file=click.get_text_stream("stderr"))
        else:
            echo_err(text)

    try:
        result = train_multitask(
            prepared, out_dir, config, resume=not overwrite, on_step=on_step, on_epoch=on_epoch
        )
    finally:
        if bar is not None:
            bar.close()
    if result.already_complete:
        click.echo(f"{out_dir}: already trained ({result.step} of {result.total_steps} steps); nothing to do")
    else:
        resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
        click.echo(f"trained {result.step} steps{resumed}; checkpoint: {out_dir}")
    for name, m in result.metrics.items():
        click.echo(
            f"  {name}: val accuracy {_fmt(m.get('accuracy'))}  auc {_fmt(m.get('auc'))}  f1 {_fmt(m.get('f1'))}"
        )
    click.echo(f"load it with: wsi_encoder.load_encoder({str(out_dir)!r})")
