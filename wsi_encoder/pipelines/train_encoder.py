"""``wsienc train-encoder`` as one function: parse task arguments, load and split the data, train.

A task argument is ``NAME=PATH[,key=value...]``. Generic keys: ``weight`` (loss weight, default 1),
``name`` (an alias, to train the same task type twice as separate heads), ``mpp`` (declare the images'
µm/px); other keys are the task's own options (e.g. ``labels=`` for ``patch-store``). Several
arguments with the same task name and no alias are pooled into one task (e.g. two BreaKHis folders).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.tasks.data import concat_task_data
from wsi_encoder.tasks.registry import get_task, load_task
from wsi_encoder.training.multitask import (
    EpochInfo,
    PhaseInfo,
    PreparedTask,
    StepInfo,
    TrainResult,
    train_multitask,
)
from wsi_encoder.training.task_splits import split_task
from wsi_encoder.training.train_config import TrainConfig

log = logging.getLogger(__name__)

GENERIC_KEYS = ("weight", "name", "mpp")


@dataclass(frozen=True)
class TaskRequest:
    """One ``--task`` argument, parsed."""

    task: str
    path: Path
    name: str
    weight: float = 1.0
    mpp: float | None = None
    options: dict[str, str] = field(default_factory=dict)


def parse_task_argument(text: str) -> TaskRequest:
    """Parse ``NAME=PATH[,key=value...]``.

    Raises
    ------
    InvalidParameterError
        Malformed argument, unknown task (the message lists the known ones), unknown option, or a
        non-numeric ``weight``/``mpp``.
    """
    if "=" not in text:
        raise InvalidParameterError(f"--task {text!r} must be NAME=PATH (e.g. kather-crc=/data/NCT-CRC-HE-100K)")
    task, rest = text.split("=", 1)
    task = task.strip()
    spec = get_task(task)
    path, *extras = rest.split(",")
    if not path.strip():
        raise InvalidParameterError(f"--task {text!r} has no path after '='")
    opts: dict[str, str] = {}
    for extra in extras:
        if "=" not in extra:
            raise InvalidParameterError(f"--task {text!r}: option {extra!r} must be key=value")
        k, v = (s.strip() for s in extra.split("=", 1))
        if k not in GENERIC_KEYS and k not in spec.options:
            allowed = ", ".join([*GENERIC_KEYS, *spec.options])
            raise InvalidParameterError(f"--task {text!r}: unknown option {k!r} (allowed: {allowed})")
        opts[k] = v
    try:
        weight = float(opts.pop("weight", 1.0))
        mpp = float(opts["mpp"]) if "mpp" in opts else None
    except ValueError as exc:
        raise InvalidParameterError(f"--task {text!r}: weight and mpp must be numbers ({exc})") from exc
    opts.pop("mpp", None)
    if weight < 0 or (mpp is not None and mpp <= 0):
        raise InvalidParameterError(f"--task {text!r}: weight must be >= 0 and mpp > 0")
    name = opts.pop("name", task)
    if not name or "." in name:
        raise InvalidParameterError(f"--task {text!r}: name {name!r} must be non-empty and without '.'")
    return TaskRequest(task, Path(path.strip()).expanduser(), name, weight, mpp, opts)


def prepare_tasks(
    requests: Sequence[TaskRequest | str], *, val_fraction: float = 0.2, seed: int = 0
) -> list[PreparedTask]:
    """Load, pool (same name) and split the requested tasks.

    Returns
    -------
    list of PreparedTask
        In first-mentioned order, each with a patient-disjoint split.
    """
    parsed = [parse_task_argument(r) if isinstance(r, str) else r for r in requests]
    if not parsed:
        raise InvalidParameterError("no task given: pass at least one --task NAME=PATH (see `wsienc tasks`)")
    by_name: dict[str, list[TaskRequest]] = {}
    for r in parsed:
        by_name.setdefault(r.name, []).append(r)
    prepared = []
    for name, reqs in by_name.items():
        if len({r.task for r in reqs}) > 1:
            raise InvalidParameterError(
                f"task name {name!r} is used by different tasks {sorted({r.task for r in reqs})}; give one name=ALIAS"
            )
        if len({r.weight for r in reqs}) > 1:
            raise InvalidParameterError(f"pooled task {name!r} is given different weights")
        parts = []
        for r in reqs:
            data = load_task(r.task, r.path, **r.options)
            parts.append(data.with_mpp(r.mpp) if r.mpp is not None else data)
        data = concat_task_data(parts)
        split = split_task(data, val_fraction, seed)
        log.info(
            "task %s: %d train / %d validation images (%s)", name, len(split.train), len(split.val), split.method
        )
        prepared.append(
            PreparedTask(
                name=name,
                task=reqs[0].task,
                paths=[str(r.path.resolve()) for r in reqs],
                options={k: v for r in reqs for k, v in r.options.items()},
                weight=reqs[0].weight,
                data=data,
                split=split,
            )
        )
    return prepared


def train_config(
    *, embed_dim: int | None = None, augment: bool = True, weights: str | Path | None = None, **settings: Any
) -> TrainConfig:
    """A :class:`TrainConfig` from ``wsienc train-encoder``'s settings (the options of the same names).

    ``embed_dim=None`` means 128 for the encoders trained from scratch (nic, resnets) and the
    pretrained backbone's own features otherwise; ``augment=False`` turns augmentation off.

    Raises
    ------
    InvalidParameterError
        An unknown backbone (the message lists the known ones) or settings TrainConfig refuses.
    """
    from wsi_encoder.models.encoders import get_spec, list_encoders
    from wsi_encoder.training.augment import NO_AUGMENT, AugmentConfig

    backbone = settings.get("backbone", TrainConfig.default("backbone"))
    if backbone not in list_encoders():
        raise InvalidParameterError(f"unknown backbone {backbone!r}; known: {', '.join(list_encoders())}")
    if embed_dim is None and not get_spec(backbone).requires_weights:
        embed_dim = TrainConfig.default("embed_dim")
    return TrainConfig(
        **settings,
        embed_dim=embed_dim,
        weights=None if weights is None else str(weights),
        augment=AugmentConfig() if augment else NO_AUGMENT,
    )


def describe_task(task: PreparedTask) -> str:
    """One line on a prepared task: its split and class counts."""
    counts = ", ".join(f"{c} {n}" for c, n in task.data.class_counts().items())
    return (
        f"task {task.name}: {len(task.split.train)} train / {len(task.split.val)} val images, "
        f"{len(set(task.data.groups.tolist()))} groups ({task.split.method}); {counts}"
    )


def train_encoder(
    tasks: Sequence[TaskRequest | str],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = True,
    on_tasks: Callable[[Sequence[PreparedTask]], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[EpochInfo], None] | None = None,
    on_phase: Callable[[PhaseInfo], None] | None = None,
) -> TrainResult:
    """Train a multitask encoder on ``tasks`` and write its checkpoint to ``out_dir``.

    Parameters
    ----------
    tasks : sequence of str or TaskRequest
        ``"NAME=PATH[,key=value...]"`` strings (as on the command line) or parsed requests.
    out_dir : path
        Checkpoint directory, loadable with :func:`wsi_encoder.load_encoder`.
    config : TrainConfig, optional
        See :func:`train_config` to build one from command-line settings.
    resume : bool
        Resume a checkpoint of the same run found in ``out_dir`` (False: start afresh).
    on_tasks : callable, optional
        Called once with the prepared tasks (loaded and split), before training starts.
    on_step, on_epoch : callable, optional
        Progress callbacks: after every optimisation step, after every epoch's validation.
    on_phase : callable, optional
        Progress between steps: decoding images into memory, validating.

    Returns
    -------
    TrainResult

    Raises
    ------
    InvalidParameterError
        ``out_dir`` is a file, or a task argument, the data or the settings are unusable (one line each).

    Examples
    --------
    >>> from wsi_encoder.pipelines.train_encoder import train_config, train_encoder
    >>> train_encoder(["breakhis-malignancy=BreaKHis_v1", "kather-crc=NCT-CRC-HE-100K"],
    ...               "encoder_out", train_config(epochs=2))  # doctest: +SKIP
    """
    config = config or TrainConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidParameterError(f"--out {str(out)!r} is a file, not a directory")
    prepared = prepare_tasks(tasks, val_fraction=config.val_fraction, seed=config.seed)
    if on_tasks is not None:
        on_tasks(prepared)
    return train_multitask(
        prepared, out, config, resume=resume, on_step=on_step, on_epoch=on_epoch, on_phase=on_phase
    )
