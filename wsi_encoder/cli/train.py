"""``wsienc tasks`` and ``wsienc train-encoder``: the task library and multitask encoder training."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from wsi_encoder.cli.common import Progress, device_option, import_frozen, imports_first
from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.training.train_config import TrainConfig

if TYPE_CHECKING:
    from wsi_encoder.pipelines.train_encoder import TaskRequest
    from wsi_encoder.training.multitask import EpochInfo, PhaseInfo, PreparedTask, StepInfo

D = TrainConfig.default


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


_TRAINING_MODULES = ("torch", "wsi_encoder.pipelines.train_encoder")


def _parse_tasks(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[TaskRequest]:
    import_frozen(*_TRAINING_MODULES)  # parsing --task needs the task library: the command's start-up is here
    from wsi_encoder.pipelines.train_encoder import parse_task_argument

    if not values:
        raise click.BadParameter("give at least one --task NAME=PATH (see `wsienc tasks`)", ctx, param)
    try:
        return [parse_task_argument(v) for v in values]
    except InvalidParameterError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def _fmt(value: float | int | None) -> str:
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
@click.option("--backbone", default=D("backbone"), show_default=True,
              help="Encoder (see `wsienc encoders`): nic, resnet18/34/50, or a pretrained one (uni, virchow2, ...) with --weights.")
@click.option("--embed-dim", type=click.IntRange(min=1), default=None,
              help=f"Linear embedding on top of the backbone (default: {D('embed_dim')} for nic/resnets, the pretrained backbone's own features otherwise).")
@click.option("--epochs", type=click.IntRange(min=1), default=D("epochs"), show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=D("max_steps"), help="Stop after N steps (overrides --epochs).")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=D("steps_per_epoch"), help="Default: all training images once.")
@click.option("--batch-size", type=click.IntRange(min=1), default=D("batch_size"), show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=D("lr"), show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=D("weight_decay"), show_default=True)
@click.option("--seed", type=int, default=D("seed"), show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=D("val_fraction"), show_default=True,
              help="Fraction of patients per task held out for validation.")
@click.option("--val-max-images", type=click.IntRange(min=1), default=D("val_max_images"), help="Cap validation images per task.")
@click.option("--input-size", type=click.IntRange(min=16), default=D("input_size"), help="Tile side in px (default: encoder's).")
@click.option("--input-mpp", type=click.FloatRange(min=0, min_open=True), default=D("input_mpp"),
              help="µm/px of the encoder's input (default: encoder's, 0.5).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Pretrained backbone weights: a local file in the backbone's official layout (never downloaded; default $WSIENC_WEIGHTS_DIR/<name>/).")
@click.option("--freeze-backbone", is_flag=True, default=D("freeze_backbone"),
              help="Train only the heads (and --embed-dim layer) on a frozen pretrained backbone.")
@click.option("--unfreeze-last", type=click.IntRange(min=0), default=D("unfreeze_last"), metavar="N",
              help="Freeze the backbone except its last N blocks (ViT blocks / ResNet stages).")
@click.option("--workers", type=click.IntRange(min=0), default=D("workers"),
              help="DataLoader worker processes (default: one per spare CPU core, at most 4; 0 = load in-process).")
@device_option
@click.option("--amp/--no-amp", default=D("amp"), help="Mixed precision (default: on with CUDA).")
@click.option("--cache-mb", type=click.IntRange(min=0), default=D("cache_mb"), show_default=True,
              help="Decode small datasets into memory up to this size.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=D("checkpoint_every"), show_default=True,
              help="Also checkpoint every N steps (0: epoch ends only).")
@click.option("--augment/--no-augment", default=True, help="Flips/rotations/colour/scale augmentation (default: on).")
@click.option("--overwrite", is_flag=True, help="Start afresh even if --out holds a checkpoint (default: resume).")
@imports_first(*_TRAINING_MODULES)
def train_encoder(task_args: list[TaskRequest], out_dir: Path, overwrite: bool, **settings: Any) -> None:
    """Train a multitask supervised patch encoder on several labelled datasets.

    Every --task gets its own head on a shared encoder; batches mix tasks evenly; each task is split
    patient-disjointly for validation (accuracy, AUC, F1 per task each epoch). The checkpoint in
    --out (model.safetensors + config.json) loads with wsi_encoder.load_encoder(OUT); running the same
    command again resumes it.
    """
    from wsi_encoder.pipelines.train_encoder import train_config
    from wsi_encoder.pipelines.train_encoder import train_encoder as run_training

    config = train_config(**settings)
    with TrainProgress() as progress:
        result = run_training(
            task_args,
            out_dir,
            config,
            resume=not overwrite,
            on_tasks=progress.tasks,
            on_step=progress.step,
            on_epoch=progress.epoch,
            on_phase=progress.phase,
        )
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


class TrainProgress(Progress):
    """Draws encoder training: a bar over steps (losses, lr, speed as postfix), each epoch's validation above it.

    Also used by ``wsienc demo`` for its encoder-training step.
    """

    def __init__(self, desc: str = "train-encoder") -> None:
        super().__init__(desc, unit="step")
        self._phase: Progress | None = None
        self._phase_key: tuple[str, str | None] | None = None

    def phase(self, info: PhaseInfo) -> None:
        """Between steps: a second, transient bar for decoding images into memory or for validation."""
        key = (info.phase, info.task)
        if self._phase is None or key != self._phase_key:
            self._close_phase()
            what = f"decoding {info.task}" if info.phase == "decoding" else info.phase
            self._phase = Progress(what, unit="image", total=info.total, leave=False)
            self._phase_key = key
        self._phase.update(info.done - self._phase.done)
        if info.done >= info.total:
            self._close_phase()

    def _close_phase(self) -> None:
        if self._phase is not None:
            self._phase.close()
        self._phase, self._phase_key = None, None

    def close(self) -> None:
        self._close_phase()
        super().close()

    def tasks(self, prepared: Sequence[PreparedTask]) -> None:
        """Once the tasks are loaded and split: one line each."""
        from wsi_encoder.pipelines.train_encoder import describe_task

        for task in prepared:
            self.write(describe_task(task))

    def step(self, info: StepInfo) -> None:
        """After each optimisation step."""
        if self.total is None:  # the first step of this run (a resumed run starts part way)
            self.total, self.initial, self.done = info.total_steps, info.step - 1, info.step - 1
        self.update()
        losses = " ".join(f"{n}={v:.3f}" for n, v in info.task_losses.items())
        self.postfix(f"ep {info.epoch} lr {info.lr:.2g} {losses} {info.images_per_second:.0f} img/s")

    def epoch(self, info: EpochInfo) -> None:
        """After each epoch's validation: one line per task."""
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
        self.write("\n".join(lines))
