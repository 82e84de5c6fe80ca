"""The multitask training loop: task-balanced batches, per-task heads and losses, checkpoints, resume.

:func:`train_multitask` takes prepared tasks (data + patient-disjoint split + loss weight) and writes
a checkpoint directory (see :mod:`wsi_encoder.models.checkpoint`) at every epoch end, every
``checkpoint_every`` steps and at the end, plus ``augmentations.png`` (what the encoder is shown) and
``training_curves.png`` (per-task loss and validation metrics per epoch). Run again with the same arguments, it resumes from the
last checkpoint and reaches the same weights as an uninterrupted run (the data order and the
augmentation are functions of ``(seed, step)``; optimiser state is saved).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsi_encoder import __version__
from wsi_encoder.devices import resolve_device
from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.evaluation.metrics import classification_metrics
from wsi_encoder.models.checkpoint import (
    CONFIG_NAME,
    load_model_state,
    read_checkpoint_config,
    read_model_state,
    read_train_state,
    save_checkpoint,
)
from wsi_encoder.models.encoders import Encoder, create_encoder, set_trainable
from wsi_encoder.models.heads import MultiTaskModel
from wsi_encoder.tasks.data import PIXEL_DIGEST, TaskData, content_digests
from wsi_encoder.training.plots import plot_augmentations, plot_training_curves
from wsi_encoder.training.task_sampling import (
    MultiTaskImages,
    PlanBatchSampler,
    TaskBalancedPlan,
    collate,
    worker_init,
)
from wsi_encoder.training.task_splits import Split
from wsi_encoder.training.train_config import TrainConfig

log = logging.getLogger(__name__)

AUGMENTATIONS_PNG = "augmentations.png"
CURVES_PNG = "training_curves.png"


@dataclass
class PreparedTask:
    """One task instance ready for training."""

    name: str
    task: str
    paths: list[str]
    options: dict[str, str]
    weight: float
    data: TaskData
    split: Split

    @property
    def train(self) -> TaskData:
        return self.data.subset(self.split.train)

    @property
    def val(self) -> TaskData:
        return self.data.subset(self.split.val)


@dataclass(frozen=True)
class StepInfo:
    """Progress after one optimisation step (``task_losses`` are running means over the epoch)."""

    step: int
    total_steps: int
    epoch: int
    lr: float
    loss: float
    task_losses: dict[str, float]
    images_per_second: float


@dataclass(frozen=True)
class PhaseInfo:
    """Progress of a phase between optimisation steps: ``decoding`` a task's images into memory, or
    ``validation`` at an epoch's end (``done`` of ``total`` images)."""

    phase: str
    done: int
    total: int
    task: str | None = None


@dataclass(frozen=True)
class EpochInfo:
    """Validation after an epoch: ``metrics[task]`` has loss, n and the task's metrics."""

    epoch: int
    step: int
    train_losses: dict[str, float]
    metrics: dict[str, dict[str, float | None]]


@dataclass(frozen=True)
class TrainResult:
    """Where the checkpoint went and how the run ended."""

    out_dir: Path
    step: int
    total_steps: int
    metrics: dict[str, dict[str, float | None]]
    history: list[dict[str, Any]]
    resumed_from: int
    already_complete: bool


def _versions() -> dict[str, str]:
    import safetensors
    import torchvision

    return {
        "wsi_encoder": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, numpy scalars → Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _signature(
    tasks: Sequence[PreparedTask], cfg: TrainConfig, input_size: int, input_mpp: float, backbone_sha256: str | None = None
) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (epochs / max steps may change)."""
    return _clean(
        {
            "backbone": cfg.backbone,
            "embed_dim": cfg.embed_dim,
            "input_size": input_size,
            "input_mpp": input_mpp,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "weights": cfg.weights,
            # only when used, so that runs from before these options still resume
            **({"freeze_backbone": True} if cfg.freeze_backbone else {}),
            **({"unfreeze_last": cfg.unfreeze_last} if cfg.unfreeze_last is not None else {}),
            **({"backbone_sha256": backbone_sha256} if backbone_sha256 else {}),
            "augment": dataclasses.asdict(cfg.augment),
            "tasks": [
                {
                    "name": t.name,
                    "task": t.task,
                    "paths": t.paths,
                    "options": t.options,
                    "weight": t.weight,
                    "classes": list(t.data.classes),
                    "n_train": len(t.split.train),
                    "n_val": len(t.split.val),
                }
                for t in tasks
            ],
        }
    )


def _preload(
    tasks: Sequence[PreparedTask], budget_mb: int, workers: int, on_phase: Callable[[PhaseInfo], None] | None = None
) -> None:
    budget = int(budget_mb) * 2**20
    for t in sorted(tasks, key=lambda t: len(t.data)):
        if budget <= 0:
            break
        report = None
        if on_phase is not None:
            report = functools.partial(_report_decoding, on_phase, t.name)
        if t.data.preload(budget, workers=max(1, workers), on_image=report):
            first = t.data.source.read(0)
            budget -= first.nbytes * len(t.data)
            log.info("task %s: %d images decoded into memory", t.name, len(t.data))


def _report_decoding(on_phase: Callable[[PhaseInfo], None], task: str, done: int, total: int) -> None:
    on_phase(PhaseInfo("decoding", done, total, task))


def evaluate(
    model: MultiTaskModel,
    tasks: Sequence[TaskData],
    names: Sequence[str],
    *,
    input_size: int,
    input_mpp: float,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    amp: bool = False,
    on_phase: Callable[[PhaseInfo], None] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Validation loss and classification metrics of each task on its centred, un-augmented views.

    ``on_phase`` gets a ``validation`` :class:`PhaseInfo` after every batch (progress).

    Returns
    -------
    dict
        ``{task name: {"n", "loss", "accuracy", "balanced_accuracy", "auc", "f1", "brier", "ece"}}``
        for tasks with validation images.
    """
    keys = [(t, i) for t, data in enumerate(tasks) for i in range(len(data))]
    if not keys:
        return {}
    dataset = MultiTaskImages(tasks, input_size, input_mpp)
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, worker_init_fn=worker_init
    )
    probs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    ys: dict[str, list[np.ndarray]] = {n: [] for n in names}
    was_training = model.training
    model.eval()
    done = 0
    with torch.no_grad():
        for images, task_ids, labels in loader:
            x = images.to(device).float().div_(255)
            with torch.autocast(device.type, enabled=amp):
                out = model(x, task_ids.to(device))
            for name, logits in out["logits"].items():
                pos = out["index"][name].cpu()
                probs[name].append(torch.softmax(logits.float(), dim=1).cpu().numpy())
                ys[name].append(labels[pos].numpy())
            done += len(images)
            if on_phase is not None:
                on_phase(PhaseInfo("validation", done, len(keys)))
    model.train(was_training)
    result: dict[str, dict[str, float | None]] = {}
    for name in names:
        if not probs[name]:
            continue
        p = np.concatenate(probs[name])
        y = np.concatenate(ys[name])
        loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
        with warnings.catch_warnings():
            # sklearn warns when a class is predicted but absent from a small validation set.
            warnings.simplefilter("ignore", UserWarning)
            metrics = classification_metrics(y, p[:, 1] if p.shape[1] == 2 else p)
        result[name] = _clean({"n": len(y), "loss": loss, **metrics})
    return result


def _backbone_record(encoder: Encoder, config: TrainConfig) -> dict[str, Any]:
    """What the checkpoint says about its backbone: name, the pretrained file and its SHA-256, what trained.

    With a frozen (or partly frozen) pretrained backbone the checkpoint stores only the tensors that
    training changes (``stored: trainable``) and is reloaded on top of the same file, found by its
    SHA-256; otherwise it stores every tensor (``stored: full``).
    """
    frozen = config.freeze_backbone or config.unfreeze_last is not None
    return {
        "name": config.backbone,
        "weights": encoder.weights_path,
        "weights_sha256": encoder.weights_sha256 if encoder.weights_path else None,
        "trained": "none (frozen)" if config.freeze_backbone else (
            f"last {config.unfreeze_last} blocks" if config.unfreeze_last is not None else "all"
        ),
        "stored": "trainable" if frozen and encoder.weights_path else "full",
    }  # fmt: skip


def _frozen_keys(encoder: Encoder) -> set[str]:
    """``encoder.*`` state keys that training never changes (frozen parameters, buffers of frozen modules)."""
    keys = {f"encoder.{n}" for n, p in encoder.named_parameters() if not p.requires_grad}
    frozen = {id(m) for m in getattr(encoder, "frozen_modules", ())}
    for name, module in encoder.named_modules():
        if id(module) in frozen:
            keys |= {f"encoder.{name}.{b}" if name else f"encoder.{b}" for b, _ in module.named_buffers(recurse=False)}
    return keys


def train_multitask(
    tasks: Sequence[PreparedTask],
    out_dir: str | Path,
    config: TrainConfig,
    *,
    resume: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[EpochInfo], None] | None = None,
    on_phase: Callable[[PhaseInfo], None] | None = None,
) -> TrainResult:
    """Train a shared encoder with one head per task and write the checkpoint to ``out_dir``.

    Parameters
    ----------
    tasks : sequence of PreparedTask
        Task instances with distinct names, each with training images.
    out_dir : path
        Checkpoint directory; an existing checkpoint of the same run is resumed.
    config : TrainConfig
    resume : bool
        False starts afresh even when ``out_dir`` holds a checkpoint (it is overwritten).
    on_step, on_epoch : callable, optional
        Progress callbacks: after every optimisation step, after every epoch's validation.
    on_phase : callable, optional
        Progress between steps: decoding images into memory, validating (:class:`PhaseInfo`).

    Returns
    -------
    TrainResult

    Raises
    ------
    InvalidParameterError
        Duplicate task names, a task without training images, or ``out_dir`` holding a checkpoint of
        a different run.
    """
    names = [t.name for t in tasks]
    if not tasks:
        raise InvalidParameterError("no task given: pass at least one --task NAME=PATH")
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"task names must be distinct, got {names} (use name=ALIAS)")
    for t in tasks:
        if len(t.split.train) == 0:
            raise InvalidParameterError(f"task {t.name!r} has no training images after the validation split")
    out = Path(out_dir)
    device = resolve_device(config.device or "auto")
    amp = bool(config.amp if config.amp is not None else device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(config.seed)

    kw: dict[str, Any] = {}
    if config.input_size is not None:
        kw["input_size"] = config.input_size
    if config.input_mpp is not None:
        kw["input_mpp"] = config.input_mpp
    encoder = create_encoder(
        config.backbone, weights=config.weights, embed_dim=config.embed_dim, seed=config.seed, **kw
    )
    counts = set_trainable(encoder, freeze_backbone=config.freeze_backbone, unfreeze_last=config.unfreeze_last)
    log.info("backbone %s: %d trainable, %d frozen parameters", config.backbone, counts["trainable"], counts["frozen"])
    enc_cfg = encoder.config
    model = MultiTaskModel(encoder, {t.name: len(t.data.classes) for t in tasks}, seed=config.seed)
    backbone = _backbone_record(encoder, config)
    frozen_keys = _frozen_keys(encoder) if backbone["stored"] == "trainable" else set()
    # a partial checkpoint resumes on top of the same pretrained file only
    signature = _signature(
        tasks, config, enc_cfg.input_size, enc_cfg.input_mpp, backbone["weights_sha256"] if frozen_keys else None
    )

    n_train = [len(t.split.train) for t in tasks]
    steps_per_epoch = config.steps_per_epoch or max(1, math.ceil(sum(n_train) / config.batch_size))
    total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps is not None else min(100, total // 10)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    start, history = 0, []
    if resume and (out / CONFIG_NAME).is_file():
        previous = read_checkpoint_config(out)
        old_sig = previous.get("training", {}).get("signature", {})
        if old_sig != signature:
            differ = sorted(k for k in set(old_sig) | set(signature) if old_sig.get(k) != signature.get(k))
            raise InvalidParameterError(
                f"{str(out)!r} holds a checkpoint of a different run (differs in: {', '.join(differ)}); "
                "choose another --out, or pass --overwrite to start afresh"
            )
        state = read_model_state(out, previous)
        load_model_state(model, state, partial=bool(frozen_keys))
        train_state = read_train_state(out)
        if train_state is not None:
            optimizer.load_state_dict(train_state["optimizer"])
            scaler.load_state_dict(train_state["scaler"])
        start = int(previous.get("step", 0))
        history = list(previous.get("history", []))
        log.info("resuming %s at step %d of %d", out, start, total)
        if start >= total:
            return TrainResult(out, start, total, previous.get("validation", {}), history, start, True)
    model.to(device)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", config.lr)

    _preload(tasks, config.cache_mb, config.num_workers, on_phase)
    training_content = {
        "digest": PIXEL_DIGEST,
        "images": sorted(
            {d for t in tasks for d in content_digests(t.data.source, workers=max(1, config.num_workers))}
        ),
    }
    train_sets = [t.train for t in tasks]
    val_sets = [t.val for t in tasks]
    if config.val_max_images is not None:
        val_sets = [
            v.subset(np.sort(np.random.default_rng(config.seed).permutation(len(v))[: config.val_max_images]))
            for v in val_sets
        ]
    weights = {t.name: t.weight for t in tasks}
    if config.plots and start == 0:
        out.mkdir(parents=True, exist_ok=True)
        plot_augmentations(
            out / AUGMENTATIONS_PNG,
            train_sets,
            names,
            input_size=enc_cfg.input_size,
            input_mpp=enc_cfg.input_mpp,
            augment=config.augment,
            seed=config.seed,
        )
    plan = TaskBalancedPlan(tuple(n_train), config.batch_size, config.seed)
    loader = DataLoader(
        MultiTaskImages(train_sets, enc_cfg.input_size, enc_cfg.input_mpp, config.augment),
        batch_sampler=PlanBatchSampler(plan, start, total),
        num_workers=config.num_workers,
        collate_fn=collate,
        worker_init_fn=worker_init,
        pin_memory=device.type == "cuda",
    )

    def checkpoint(step: int, metrics: dict[str, Any], complete: bool) -> None:
        cfg = {
            "encoder": enc_cfg.to_dict(),
            "architecture": config.backbone,
            "backbone": backbone,
            "embed_dim": enc_cfg.num_features,
            "input_size": enc_cfg.input_size,
            "input_mpp": enc_cfg.input_mpp,
            "normalisation": {"input_range": [0.0, 1.0], "mean": list(enc_cfg.mean), "std": list(enc_cfg.std)},
            "tasks": [
                {
                    "name": t.name,
                    "task": t.task,
                    "paths": t.paths,
                    "options": t.options,
                    "kind": "binary" if len(t.data.classes) == 2 else "multiclass",
                    "classes": list(t.data.classes),
                    "loss_weight": t.weight,
                    "n_train": len(t.split.train),
                    "n_val": len(t.split.val),
                    "n_groups": len(set(t.data.groups.tolist())),
                    "split": t.split.method,
                    "class_counts": t.data.class_counts(),
                }
                for t in tasks
            ],
            "validation": metrics,
            "history": history,
            "step": step,
            "total_steps": total,
            "steps_per_epoch": steps_per_epoch,
            "epoch": step / steps_per_epoch,
            "complete": complete,
            "training": {
                "signature": signature,
                "config": _clean(dataclasses.asdict(config)),
                "device": str(device),
                "amp": amp,
            },
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "training_content": training_content,
        }
        train_state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step}
        state = {k: v for k, v in model.state_dict().items() if k not in frozen_keys}
        save_checkpoint(out, state, _clean(cfg), train_state)

    model.train()
    metrics: dict[str, Any] = history[-1]["validation"] if history else {}
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    t0, seen = time.perf_counter(), 0
    step = start
    for images, task_ids, labels in loader:
        lr = _lr_at(step, total, warmup, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = images.to(device, non_blocking=True).float().div_(255)
        with torch.autocast(device.type, enabled=amp):
            out_ = model(x, task_ids.to(device), labels.to(device), weights)
        loss = out_["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        for name, value in out_["losses"].items():
            sums[name] += float(value.detach())
            counts[name] += 1
        seen += len(images)
        step += 1
        if on_step is not None:
            elapsed = time.perf_counter() - t0
            on_step(
                StepInfo(
                    step,
                    total,
                    math.ceil(step / steps_per_epoch),
                    lr,
                    float(loss.detach()),
                    {n: sums[n] / counts[n] for n in names if counts[n]},
                    seen / elapsed if elapsed > 0 else float("nan"),
                )
            )
        epoch_end = step % steps_per_epoch == 0 or step == total
        if epoch_end:
            metrics = evaluate(
                model,
                val_sets,
                names,
                input_size=enc_cfg.input_size,
                input_mpp=enc_cfg.input_mpp,
                batch_size=config.batch_size,
                device=device,
                workers=min(config.num_workers, 1),
                amp=amp,
                on_phase=on_phase,
            )
            train_losses = {n: sums[n] / counts[n] for n in names if counts[n]}
            epoch = math.ceil(step / steps_per_epoch)
            history.append(_clean({"epoch": epoch, "step": step, "train_loss": train_losses, "validation": metrics}))
            for name in names:
                m = metrics.get(name, {})
                log.info(
                    "epoch %d step %d task %s: train loss %.4f val %s",
                    epoch,
                    step,
                    name,
                    train_losses.get(name, float("nan")),
                    {k: m.get(k) for k in ("loss", "accuracy", "auc", "f1")} if m else "n/a",
                )
            if config.plots:
                out.mkdir(parents=True, exist_ok=True)
                plot_training_curves(out / CURVES_PNG, history, names)
            if on_epoch is not None:
                on_epoch(EpochInfo(epoch, step, train_losses, metrics))
            sums = dict.fromkeys(names, 0.0)
            counts = dict.fromkeys(names, 0)
        if epoch_end or (config.checkpoint_every and step % config.checkpoint_every == 0):
            checkpoint(step, metrics, complete=step == total)
    return TrainResult(out, step, total, metrics, history, start, False)
