"""The task registry: ``@register_task`` turns one loader function into a training task.

A loader takes the dataset path (plus any task options) and either returns a :class:`TaskData` or
yields ``(image, label, group)`` tuples, where ``image`` is an image file path (or an RGB uint8 array),
``label`` a class name and ``group`` the patient/slide id used for patient-disjoint splits::

    @register_task(
        "my-task",
        description="Tumour vs stroma patches of my lab",
        layout="ROOT/<patient>/<tumour|stroma>/*.png",
        classes=("stroma", "tumour"),
        mpp=0.5,
    )
    def my_task(root):
        for p in sorted(root.glob("*/*/*.png")):
            yield p, p.parent.name, p.parent.parent.name

:func:`load_task` runs the loader and checks the result (images found, labels known, at least two
classes present), so every task fails the same clear way.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.tasks.data import FileImages, MemoryImages, TaskData, labels_to_indices

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1")
Loader = Callable[..., "TaskData | Iterable[tuple[Any, str, str]]"]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes
    ----------
    name : str
        Task name used on the command line (``--task NAME=PATH``).
    description : str
        One line shown by ``wsienc tasks``.
    layout : str
        The on-disk layout the loader expects.
    loader : callable
        ``loader(path, **options) -> TaskData | iterable of (image, label, group)``.
    kind : str
        ``"binary"``, ``"multiclass"``, or ``"classification"`` when the classes come from the data.
    classes : tuple of str or None
        Fixed class names, or None when read from the data (sorted label names).
    mpp : float or None
        Nominal µm/px of the dataset's images (None: unknown, images used at native pixels).
    options : tuple of str
        Extra ``key=value`` options the loader accepts (``--task NAME=PATH,key=value``).
    metrics : tuple of str
        Validation metrics reported each epoch.
    """

    name: str
    description: str
    layout: str
    loader: Loader
    kind: str
    classes: tuple[str, ...] | None = None
    mpp: float | None = None
    options: tuple[str, ...] = ()
    metrics: tuple[str, ...] = DEFAULT_METRICS


_TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str,
    *,
    description: str,
    layout: str,
    classes: Iterable[str] | None = None,
    mpp: float | None = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> Callable[[Loader], Loader]:
    """Register ``loader`` as task ``name`` (see the module docstring for the loader contract).

    Keyword-only parameters of the loader (besides ``path``) become the task's options.
    """

    def deco(loader: Loader) -> Loader:
        if name in _TASKS:
            raise InvalidParameterError(f"task {name!r} is already registered")
        cls = None if classes is None else tuple(classes)
        kind = "classification" if cls is None else ("binary" if len(cls) == 2 else "multiclass")
        params = inspect.signature(loader).parameters
        opts = tuple(p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)
        _TASKS[name] = TaskSpec(name, description, layout, loader, kind, cls, mpp, opts, tuple(metrics))
        return loader

    return deco


def _ensure_builtins() -> None:
    import wsi_encoder.tasks.builtin  # noqa: F401  (registers the built-in tasks)


def list_tasks() -> list[TaskSpec]:
    """All registered tasks, sorted by name."""
    _ensure_builtins()
    return [_TASKS[k] for k in sorted(_TASKS)]


def get_task(name: str) -> TaskSpec:
    """The task registered as ``name``.

    Raises
    ------
    InvalidParameterError
        Unknown name; the message lists the known tasks.
    """
    _ensure_builtins()
    spec = _TASKS.get(name)
    if spec is None:
        raise InvalidParameterError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))} (see `wsienc tasks`)"
        )
    return spec


def load_task(name: str, path: str | Path, **options: Any) -> TaskData:
    """Load task ``name`` from ``path`` and check it is trainable.

    Parameters
    ----------
    name : str
        Registered task name.
    path : path
        Dataset location (folder, file or store, as the task's ``layout`` says).
    **options
        Task-specific options (``spec.options``).

    Returns
    -------
    TaskData

    Raises
    ------
    DatasetError
        The path is missing, holds no usable image, has unknown labels, or only one class.
    InvalidParameterError
        Unknown task or option.
    """
    spec = get_task(name)
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{str(root)!r} does not exist (task {name!r} expects {spec.layout})")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise InvalidParameterError(f"task {name!r} has no option(s) {unknown}; its options: {allowed}")
    result = spec.loader(root, **options)
    data = result if isinstance(result, TaskData) else _from_items(spec, root, result)
    if len(data) == 0:
        raise DatasetError(f"{str(root)!r}: no usable images for task {name!r} (expected layout: {spec.layout})")
    present = [c for c, k in data.class_counts().items() if k > 0]
    if len(present) < 2:
        raise DatasetError(
            f"{str(root)!r}: task {name!r} found a single class {present[0]!r} ({len(data)} images); "
            "a classification task needs images of at least two classes"
        )
    for note in data.notes:
        log.warning("task %s (%s): %s", name, root, note)
    log.info("task %s: %d images, %d groups, classes %s", name, len(data), len(set(data.groups)), data.class_counts())
    return data


def _from_items(spec: TaskSpec, root: Path, items: Iterable[tuple[Any, str, str]]) -> TaskData:
    images: list[Any] = []
    labels: list[str] = []
    groups: list[str] = []
    for image, label, group in items:
        images.append(image)
        labels.append(str(label))
        groups.append(str(group))
    classes, idx = labels_to_indices(labels, spec.classes, task=spec.name, root=root)
    if images and all(isinstance(im, np.ndarray) for im in images):
        source: Any = MemoryImages(images, [f"{root}[{i}]" for i in range(len(images))])
    elif all(isinstance(im, (str, Path)) for im in images):
        source = FileImages(images)
    else:
        raise DatasetError(f"task {spec.name!r}: a loader must yield image paths or uint8 arrays, not a mix")
    mpp = np.nan if spec.mpp is None else spec.mpp
    return TaskData(spec.name, root, classes, source, idx, np.asarray(groups, dtype=str), np.full(len(idx), mpp))
