"""``wsienc lomo``: patient-disjoint leave-one-magnification-out on BreaKHis, three arms.

For each held-out magnification ``m`` (a fold) and each arm (``baseline``, ``gan``, ``grl``) a
classifier is trained from the same initial weights on the training patients' images at the other
magnifications and tested on the test patients' images at ``m`` (see
:mod:`wsi_encoder.evaluation.splits`). This module only orchestrates: the arms are strategies in
:mod:`wsi_encoder.training.lomo_arms`, the loop is :func:`wsi_encoder.training.lomo_trainer.train_classifier`,
the settings and their defaults are :class:`~wsi_encoder.pipelines.lomo_config.LomoConfig`.

A finished (arm, fold) leaves ``runs/<arm>/heldout_<m>/metrics.json`` (written last) and is skipped
when the run is repeated with the same settings, so an interrupted run resumes where it stopped.

Output folder::

    config.json             arms, held-out folds that ran, classes, backbone (+ provenance),
                            embedding_dim, seed, patient_key, selection per arm, shared_init, ...
    splits.csv              filename,patient_id,class,magnification,fold,role (every image, every fold)
    results.csv             one row per arm × held-out magnification, with patient-bootstrap intervals
                            and paired differences to the baseline
    probe.csv               magnification probes per arm × fold (linear / mlp, train_cv / test_patients)
    report.md, plots/*.png  tables, AUC/Brier per fold, reliability diagrams, probe, DCGAN samples
    embeddings/<arm>/heldout_<m>.npz   frozen embeddings (train, test, probe) for ``wsienc signatures``
    runs/<arm>/heldout_<m>/metrics.json, gan/heldout_<m>/<class>/ (weights folders) + trained_on.json
    init_weights.safetensors, cache/images_<size>.npy   shared initial weights, decoded images

With ``patient_folds=k`` each patient fold is such a folder (``patient_fold_<i>/``) and the top-level
``results.csv``/``report.md`` pool the out-of-fold test predictions (every patient tested once).
With ``repeats=R`` each repeat (seed ``seed + k``) is such a folder (``repeat_<k>/``) and the top
level summarises the repeats (``repeats.csv``, ``report.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_encoder import __version__
from wsi_encoder.devices import resolve_device
from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.evaluation import lomo_report
from wsi_encoder.evaluation.lomo_outputs import fold_metrics, save_fold_embeddings
from wsi_encoder.evaluation.splits import (
    LomoFold,
    PatientSplit,
    cap_fold,
    lomo_folds,
    patient_folds,
    split_patients,
    write_splits_csv,
)
from wsi_encoder.io.breakhis import CLASSES, BreakhisImage, patient_key, scan_breakhis
from wsi_encoder.io.files import atomic_write_bytes, atomic_write_json
from wsi_encoder.models.checkpoint import read_checkpoint_config, training_record
from wsi_encoder.models.encoders import Encoder, create_encoder, state_sha256
from wsi_encoder.models.encoders.weights import BUNDLED_WEIGHTS_DIR
from wsi_encoder.pipelines.lomo_config import ARMS, SEED_NULL_DIR, SEED_NULL_OFFSET, LomoConfig
from wsi_encoder.pipelines.lomo_summary import (
    EventHandler,
    LomoEvent,
    LomoRun,
    emit_event,
    pool_patient_folds,
    summarise_repeats,
    write_outputs,
)
from wsi_encoder.tasks.data import PIXEL_DIGEST, pixel_digest, read_image_file
from wsi_encoder.training.gan_trainer import DcganSpec, FoldSynthetic, fold_synthetic_images
from wsi_encoder.training.lomo_arms import BaselineArm, GanArm, GrlArm
from wsi_encoder.training.lomo_data import build_image_cache
from wsi_encoder.training.lomo_trainer import (
    TrainData,
    TrainSpec,
    build_classifier,
    embed,
    shared_state,
    train_classifier,
)

logger = logging.getLogger(__name__)

__all__ = ["ARMS", "LomoConfig", "LomoEvent", "LomoRun", "make_encoder", "run_lomo"]


def collect_images(data: Sequence[str | Path]) -> list[BreakhisImage]:
    """BreaKHis images under every DATA path, de-duplicated by path, sorted by file name.

    Raises
    ------
    DatasetError
        A path holds no BreaKHis image, or two different files share a name.
    """
    by_path: dict[Path, BreakhisImage] = {}
    for root in data:
        for im in scan_breakhis(root):
            by_path.setdefault(im.path.resolve(), im)
    by_name: dict[str, BreakhisImage] = {}
    for path, im in by_path.items():
        other = by_name.get(im.filename)
        if other is not None:
            raise DatasetError(
                f"{path}: the file name is also used by {other.path}; BreaKHis names must be unique "
                "(pass each dataset folder once)"
            )
        by_name[im.filename] = im
    return [by_name[k] for k in sorted(by_name)]


def make_encoder(config: LomoConfig) -> Encoder:
    """The backbone: a registered encoder (seeded; ``config.weights`` loaded) or a train-encoder checkpoint's encoder.

    The one place the backbone is built (every arm and fold calls it, then loads the shared state).
    """
    path = Path(config.backbone)
    if path.is_dir():
        from wsi_encoder.models.checkpoint import load_encoder

        if config.weights is not None:
            raise InvalidParameterError(
                f"--weights {config.weights!r} cannot be combined with the checkpoint folder {config.backbone!r}"
            )
        return load_encoder(path)
    return create_encoder(
        config.backbone,
        weights=config.weights,
        embed_dim=config.embed_dim,
        seed=config.seed,
        input_size=config.image_size,
    )


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def backbone_provenance(config: LomoConfig, data: Sequence[str | Path]) -> dict[str, Any]:
    """Where the backbone's weights come from, and whether it has seen BreaKHis or DATA.

    The provenance is read from the encoder actually built (:func:`make_encoder`), so weights found
    through ``$WSIENC_WEIGHTS_DIR`` or shipped with the package are identified by their file and
    SHA-256 like a ``--weights`` file. Returns ``{"name", "source" (checkpoint | weights_file |
    weights_dir | bundled | random_init), "weights", "weights_sha256", "training_tasks",
    "contamination": [reasons]}``. The training record of a ``wsienc train-encoder`` model, whether
    given as its folder or as its weights file, is read: any BreaKHis task, or a data path
    overlapping a DATA folder, is a contamination reason (the encoder may have seen the test
    patients, the held-out magnification or magnification labels), and so is any DATA image whose
    pixels are among the record's training-image digests (``content_checked``): a copy of the data
    under another name or folder is found by its content.
    """
    encoder = make_encoder(config)
    weights_path = getattr(encoder, "weights_path", None)
    info: dict[str, Any] = {
        "name": config.backbone,
        "source": "random_init",
        "weights": weights_path,
        "weights_sha256": encoder.weights_sha256 if weights_path else None,
        "training_tasks": [],
        "contamination": [],
    }
    path = Path(config.backbone)
    record: dict[str, Any] | None = None
    if path.is_dir():
        record = read_checkpoint_config(path)
        info.update(
            name=str(record.get("encoder", {}).get("name", record.get("architecture", config.backbone))),
            source="checkpoint",
            checkpoint=str(path.resolve()),
            weights_sha256=record.get("weights_sha256"),
        )
    elif weights_path is not None:
        info["source"] = _weights_source(config, Path(weights_path))
        record = training_record(weights_path)
    if record is not None:
        tasks = [t for t in record.get("tasks", []) if isinstance(t, dict)]
        info["training_tasks"] = [{"name": t.get("name"), "task": t.get("task"), "paths": t.get("paths")} for t in tasks]
        info["contamination"] = _contamination(tasks, data)
        content = record.get("training_content") or {}
        if content.get("digest") == PIXEL_DIGEST:
            shared = _shared_images(set(content.get("images") or []), data)
            info["content_checked"] = True
            if shared:
                info["contamination"].append(
                    f"{len(shared)} of the DATA images (e.g. {shared[0]}) are, pixel for pixel, among its training images"
                )
        else:
            info["content_checked"] = False
    return info


def _shared_images(digests: set[str], data: Sequence[str | Path]) -> list[str]:
    """File names of the DATA images whose pixels (:func:`pixel_digest`) are among ``digests``."""
    from concurrent.futures import ThreadPoolExecutor

    if not digests:
        return []
    images = collect_images(data)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        found = pool.map(lambda im: pixel_digest(read_image_file(im.path)) in digests, images)
        return [im.filename for im, hit in zip(images, found, strict=True) if hit]


def _weights_source(config: LomoConfig, weights_path: Path) -> str:
    """How a registered backbone's weights file was found: ``--weights``, the weights folder or the package."""
    if config.weights is not None:
        return "weights_file"
    return "bundled" if BUNDLED_WEIGHTS_DIR.resolve() in weights_path.resolve().parents else "weights_dir"


def _contamination(tasks: Sequence[dict[str, Any]], data: Sequence[str | Path]) -> list[str]:
    """Why an encoder trained on ``tasks`` may have seen DATA: a BreaKHis task, or task data overlapping DATA."""
    reasons = []
    roots = [Path(d).resolve() for d in data]
    for t in tasks:
        task = str(t.get("task") or t.get("name") or "")
        if "breakhis" in task.lower():
            reasons.append(f"it was trained on the BreaKHis task {task!r}")
        for p in t.get("paths") or []:
            q = Path(str(p)).resolve()
            if any(_overlaps(q, r) for r in roots):
                reasons.append(f"its task {task!r} was trained on {q}, which overlaps DATA")
    return reasons


def check_backbone(config: LomoConfig, provenance: dict[str, Any]) -> list[str]:
    """Refuse a contaminated backbone unless allowed; return the warnings the report must lead with."""
    reasons = provenance["contamination"]
    if reasons and not config.allow_contaminated_backbone:
        raise InvalidParameterError(
            f"--backbone {config.backbone}: {'; '.join(reasons)}; it may have seen the test patients or the "
            "held-out magnification (use a backbone not trained on BreaKHis, or --allow-contaminated-backbone)"
        )
    lines = []
    if reasons:
        lines.append(
            f"CONTAMINATED BACKBONE (allowed by --allow-contaminated-backbone): {'; '.join(reasons)}. "
            "The encoder may have seen test patients, the held-out magnification or magnification labels; "
            "these results do not measure generalisation to an unseen magnification."
        )
    if provenance["source"] == "random_init":
        lines.append(
            f"The backbone `{config.backbone}` starts from a seeded random initialisation (no --weights): "
            "expect far lower accuracy than with pretrained weights; not comparable with published figures."
        )
    return lines


#: Settings left out of the resume check: ``workers`` changes speed, not results; ``seed_null`` only adds
#: the second-seed encoders (``seed_null/``) and leaves every other output as it is.
_NOT_RESUME_CHECKED = ("workers", "seed_null")


def _settings(config: LomoConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k not in _NOT_RESUME_CHECKED}


def _check_resume(out_dir: Path, config: LomoConfig, filenames: Sequence[str] | None) -> dict[str, Any]:
    """Refuse a folder holding a run with other settings or (unless None) images; return its config or {}."""
    path = out_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidParameterError(
            f"{path}: unreadable config of a previous run ({exc}); use another --out"
        ) from exc
    if previous.get("format") != RUN_FORMAT:
        raise InvalidParameterError(
            f"{out_dir} holds a LOMO run of an older wsi_encoder (before strict patients, intervals and the "
            "fair probe); it cannot be resumed: use another --out"
        )
    old = previous.get("settings", {})
    new = _settings(config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise InvalidParameterError(
            f"{out_dir} holds a LOMO run with other settings ({changes}); resume with the same options or use another --out"
        )
    if filenames is None:
        return previous
    if previous.get("n_images") not in (None, len(filenames)) or previous.get("images_sha256") not in (
        None,
        _names_sha(filenames),
    ):
        raise InvalidParameterError(f"{out_dir} holds a LOMO run on other images; use another --out")
    return previous


RUN_FORMAT = "wsi_encoder.lomo/2"


def _names_sha(filenames: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(filenames).encode()).hexdigest()


def _init_state(
    out_dir: Path, config: LomoConfig, provenance: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], int, str]:
    """The shared initial weights (saved once in ``init_weights.safetensors``), embedding width and SHA-256.

    The saved state is reused only when it was made for the same backbone *content* (the weights'
    SHA-256, not their path), embedding, image size and seed.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    encoder = make_encoder(config)
    path = out_dir / "init_weights.safetensors"
    key = json.dumps(
        [provenance["name"], provenance["weights_sha256"], config.embed_dim, config.image_size, config.seed]
    )
    state = None
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("made_for") == key:
                state = load_file(str(path))
    if state is None:
        state = shared_state(encoder, config.seed)
        atomic_write_bytes(
            path, save({k: v.contiguous() for k, v in state.items()}, metadata={"made_for": key})
        )
    probe = build_classifier(encoder, state)
    return state, encoder.num_features, state_sha256(probe)


def run_lomo(
    data: Sequence[str | Path],
    out_dir: str | Path,
    config: LomoConfig,
    *,
    arms: Sequence[str] = ARMS,
    device: str | None = None,
    on_event: EventHandler | None = None,
) -> LomoRun:
    """Run the LOMO protocol and write every output (see the module docstring).

    Parameters
    ----------
    data
        BreaKHis folders (the official tree or flat folders of BreaKHis-named PNGs).
    out_dir
        Output folder; an earlier run with the same settings there is resumed.
    config
        Settings shared by all arms.
    arms
        Subset of ``baseline``, ``gan``, ``grl``.
    device
        ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1`` ...
    on_event
        Progress callback.

    Raises
    ------
    InvalidParameterError
        A backbone trained on BreaKHis or on DATA (unless ``allow_contaminated_backbone``), other
        settings than the run already in ``out_dir``, bad options.
    """
    arms = _check_arms(arms)
    out = Path(out_dir)
    images = collect_images(data)
    provenance = backbone_provenance(config, data)
    warnings = check_backbone(config, provenance)
    for line in warnings:
        emit_event(on_event, LomoEvent("warning", message=f"WARNING: {line}"))
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    logger.info("%d BreaKHis images; device %s", len(images), dev)
    _check_resume(out, config, None)
    cache, failed = build_image_cache(
        [im.path for im in images],
        config.image_size,
        out / "cache",
        on_image=lambda i, n: emit_event(on_event, LomoEvent("cache", step=i, total=n)) if on_event else None,
    )
    rows_of = {im.filename: i for i, im in enumerate(images)}
    usable = [im for im in images if im.filename not in failed]
    if not usable:
        raise DatasetError(f"none of the {len(images)} images could be read")
    base = _Context(
        usable, cache, rows_of, config, arms, dev, on_event, failed,
        [str(Path(d).resolve()) for d in data], provenance, warnings,
    )
    if config.repeats == 1:
        return _run_seed(base, out)
    runs = []
    for k in range(config.repeats):
        sub = replace(config, seed=config.seed + k, repeats=1)
        emit_event(on_event, LomoEvent("repeat", step=k + 1, total=config.repeats,
                                       message=f"repeat {k + 1}/{config.repeats} (seed {sub.seed})"))
        runs.append(_run_seed(replace(base, config=sub), out / f"repeat_{k}"))
    return summarise_repeats(out, runs, _top_config(base, config), on_event)


def _top_config(ctx: _Context, config: LomoConfig) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "settings": _settings(config),
        "backbone": config.backbone,
        "backbone_provenance": ctx.provenance,
        "report_warnings": ctx.warnings,
        "patient_key": config.patient_key,
        "seed": config.seed,
        "classes": list(CLASSES),
        "shared_init": True,
        "data": ctx.data,
        "wsi_encoder_version": __version__,
    }


def _run_seed(ctx: _Context, out: Path) -> LomoRun:
    """One seed of the protocol: one patient split, or ``patient_folds`` of them pooled."""
    config = ctx.config
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, config, None)  # before the initial weights there are (re)written
    init = _init_state(out, config, ctx.provenance)
    ctx = replace(ctx, init=init)
    if config.patient_folds is None:
        split = split_patients(
            ctx.images,
            test_fraction=config.test_fraction,
            val_fraction=config.val_fraction,
            seed=config.seed,
            key=config.patient_key,
        )
        return _run_split(ctx, split, out)
    splits = patient_folds(
        ctx.images, config.patient_folds, val_fraction=config.val_fraction, seed=config.seed, key=config.patient_key
    )
    runs = [
        _run_split(ctx, split, out / f"patient_fold_{k}", patient_fold=(k, len(splits)))
        for k, split in enumerate(splits)
    ]
    return pool_patient_folds(out, runs, ctx.arms, ctx.on_event)


def _check_arms(arms: Sequence[str]) -> list[str]:
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise InvalidParameterError(f"unknown arms {bad or list(arms)!r}; choose from {', '.join(ARMS)}")
    return [a for a in ARMS if a in arms]


@dataclass(frozen=True)
class _Context:
    """What every (arm, fold) of a run shares."""

    images: list[BreakhisImage]
    cache: np.ndarray
    rows_of: dict[str, int]
    config: LomoConfig
    arms: list[str]
    device: torch.device
    on_event: EventHandler | None
    failed: dict[str, str]
    data: list[str]
    provenance: dict[str, Any]
    warnings: list[str]
    init: tuple[dict[str, torch.Tensor], int, str] | None = None

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        """Cache rows of image indices."""
        return np.array([self.rows_of[self.images[i].filename] for i in idx], dtype=np.int64)

    def labels(self, idx: Sequence[int]) -> np.ndarray:
        """Classes (0 benign, 1 malignant) of image indices."""
        return np.array([CLASSES.index(self.images[i].label) for i in idx], dtype=np.int64)

    def patients(self, idx: Sequence[int]) -> list[str]:
        """Patient keys of image indices."""
        return [patient_key(self.images[i], self.config.patient_key) for i in idx]

    def mags(self, idx: Sequence[int]) -> list[int]:
        """Magnifications of image indices."""
        return [self.images[i].magnification for i in idx]

    def names(self, idx: Sequence[int]) -> list[str]:
        """File names of image indices."""
        return [self.images[i].filename for i in idx]

    def emit(self, event: LomoEvent) -> None:
        """Report progress."""
        emit_event(self.on_event, event)


def _run_split(
    ctx: _Context, split: PatientSplit, out: Path, patient_fold: tuple[int, int] | None = None
) -> LomoRun:
    """Every (arm, held-out magnification) of one patient split, into ``out``."""
    images, config, arms = ctx.images, ctx.config, ctx.arms
    assert ctx.init is not None
    out.mkdir(parents=True, exist_ok=True)
    filenames = [im.filename for im in images]
    previous = _check_resume(out, config, filenames)
    folds = [
        cap_fold(f, config.max_images_per_split, config.seed)
        for f in lomo_folds(images, split, key=config.patient_key)
    ]
    write_splits_csv(out / "splits.csv", images, folds, key=config.patient_key)
    _, dim, init_sha = ctx.init
    skipped = {f.held_out: f.skipped for f in folds if f.skipped}
    refused = {
        f"grl/{f.held_out}": f"the training side of the {f.held_out}X-held-out fold holds "
        f"{len(set(ctx.mags(f.train)))} magnification(s) ({', '.join(f'{m}X' for m in sorted(set(ctx.mags(f.train))))}); "
        "gradient reversal needs at least 2, so the grl arm is not run there"
        for f in folds
        if not f.skipped and "grl" in arms and len(set(ctx.mags(f.train))) < 2
    }
    cfg: dict[str, Any] = {
        **_top_config(ctx, config),
        "arms": [],
        "held_out": [],
        "embedding_dim": dim,
        "image_size": config.image_size,
        "init_sha256": init_sha,
        "selection": {arm: config.selection(arm) for arm in arms},
        "n_bootstrap": config.n_bootstrap,
        "patient_fold": None if patient_fold is None else patient_fold[0],
        "skipped_held_out": {str(m): r for m, r in skipped.items()},
        "refused": refused,
        "unreadable_images": ctx.failed,
        "n_images": len(filenames),
        "images_sha256": _names_sha(filenames),
        "seed_null": {
            "dir": SEED_NULL_DIR,
            "training_seed": f"seed + held-out magnification + {SEED_NULL_OFFSET}",
            "shared": "initial weights, images, roles, DCGAN images, domain-head initialisation",
        } if config.seed_null else None,
    }
    if previous:
        cfg["arms"] = previous.get("arms", [])
        cfg["held_out"] = previous.get("held_out", [])
    atomic_write_json(out / "config.json", cfg)
    tag = "" if patient_fold is None else f"patient fold {patient_fold[0] + 1}/{patient_fold[1]}, "
    trained: list[tuple[str, int]] = []
    resumed: list[tuple[str, int]] = []
    jobs = [(f, a) for f in folds if not f.skipped for a in arms if f"{a}/{f.held_out}" not in refused]
    for fold in folds:
        if fold.skipped:
            ctx.emit(LomoEvent("skip", held_out=fold.held_out,
                               message=f"{tag}held-out {fold.held_out}X skipped: {fold.skipped}"))
    for key, reason in refused.items():
        ctx.emit(LomoEvent("skip", "grl", int(key.split("/")[1]), message=f"{tag}grl refused: {reason}"))
    for done_count, (fold, arm) in enumerate(jobs, start=1):
        total = len(jobs)
        metrics_path = out / "runs" / arm / f"heldout_{fold.held_out}" / "metrics.json"
        npz = out / "embeddings" / arm / f"heldout_{fold.held_out}.npz"
        if metrics_path.is_file() and npz.is_file():
            resumed.append((arm, fold.held_out))
            ctx.emit(LomoEvent("skip", arm, fold.held_out, done_count, total,
                               message=f"{tag}{arm} / {fold.held_out}X held out: already done, skipped"))
            continue
        ctx.emit(
            LomoEvent(
                "start", arm, fold.held_out, done_count, total,
                message=f"{tag}[{done_count}/{total}] {arm} / {fold.held_out}X held out: "
                f"{len(fold.train)} train, {len(fold.val)} val, {len(fold.test)} test images",
            ),
        )
        metrics = _run_arm(ctx, arm, fold, out)
        atomic_write_json(metrics_path, metrics)
        trained.append((arm, fold.held_out))
        ctx.emit(
            LomoEvent(
                "done", arm, fold.held_out, done_count, total, values=metrics,
                message=f"{tag}{arm} / {fold.held_out}X held out: AUC {_f(metrics['auc'])}, "
                f"Brier {_f(metrics['brier'])}, F1 {_f(metrics['f1'])} (epoch {metrics['selected_epoch']} kept)",
            ),
        )
    if config.seed_null:
        _run_seed_null(ctx, jobs, out, tag)
    results = write_outputs(out, ctx.on_event)
    return LomoRun(out, results, skipped, trained, resumed, refused)


def _run_seed_null(ctx: _Context, jobs: Sequence[tuple[LomoFold, str]], out: Path, tag: str) -> None:
    """Every (fold, arm) of ``jobs`` again with its second training seed, into ``out/seed_null`` (resumable)."""
    dest = out / SEED_NULL_DIR
    for done_count, (fold, arm) in enumerate(jobs, start=1):
        where = f"{tag}{arm} / {fold.held_out}X held out, second seed"
        metrics_path = dest / "runs" / arm / f"heldout_{fold.held_out}" / "metrics.json"
        if metrics_path.is_file() and (dest / "embeddings" / arm / f"heldout_{fold.held_out}.npz").is_file():
            ctx.emit(LomoEvent("skip", arm, fold.held_out, done_count, len(jobs), message=f"{where}: already done, skipped"))
            continue
        ctx.emit(LomoEvent("start", arm, fold.held_out, done_count, len(jobs), message=f"{where} (seed null)"))
        metrics = _run_arm(ctx, arm, fold, out, seed_null=True)
        atomic_write_json(metrics_path, metrics)
        ctx.emit(LomoEvent("done", arm, fold.held_out, done_count, len(jobs), values=metrics,
                           message=f"{where}: AUC {_f(metrics['auc'])} (not part of results.csv)"))


def _f(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _make_arm(ctx: _Context, arm: str, fold: LomoFold, out: Path, mags: list[int]) -> BaselineArm:
    """The strategy object of ``arm`` for ``fold``."""
    config = ctx.config
    if arm == "gan":
        syn = _synthetic_images(ctx, fold, out)
        return GanArm(syn.images, syn.labels, config.gan_ratio)
    if arm == "grl":
        return GrlArm(
            len(mags),
            hidden=config.domain_hidden,
            lr_mult=config.domain_lr_mult,
            seed=config.seed,
            weight=config.grl_weight,
        )
    return BaselineArm()


def _run_arm(ctx: _Context, arm: str, fold: LomoFold, out: Path, seed_null: bool = False) -> dict[str, Any]:
    """Train one arm on one fold, save its embeddings and return its metrics.

    With ``seed_null`` the training seed is offset by :data:`SEED_NULL_OFFSET` and the embeddings go to
    ``out/seed_null/``; everything else (initial weights, images, roles, DCGAN images) is the same.
    """
    config, device = ctx.config, ctx.device
    emb_root = out / SEED_NULL_DIR / "embeddings" if seed_null else out / "embeddings"
    assert ctx.init is not None
    spec = TrainSpec(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, selection=config.selection(arm),
        workers=config.workers,
    )
    mags = sorted(set(ctx.mags(fold.train)))
    domains = np.array([mags.index(m) for m in ctx.mags(fold.train)], dtype=np.int64)
    strategy = _make_arm(ctx, arm, fold, out, mags)
    data = TrainData(
        images=ctx.cache,
        train_rows=ctx.rows(fold.train),
        y_train=ctx.labels(fold.train),
        domain_train=domains,
        val_rows=ctx.rows(fold.val),
        y_val=ctx.labels(fold.val),
    )
    model = build_classifier(make_encoder(config), ctx.init[0], strategy)

    def epoch_cb(epoch: int, epochs: int, stats: dict[str, float]) -> None:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in stats.items() if k != "epoch" and not math.isnan(v))
        ctx.emit(LomoEvent("epoch", arm, fold.held_out, epoch, epochs, stats,
                           f"  {arm} / {fold.held_out}X epoch {epoch}/{epochs}: {parts}"))

    train_seed = config.seed + fold.held_out + (SEED_NULL_OFFSET if seed_null else 0)
    result = train_classifier(model, data, spec, strategy, seed=train_seed, device=device, on_epoch=epoch_cb)
    side = sorted(fold.train + fold.val)
    bs = config.batch_size
    x_train, _ = embed(model, ctx.cache, ctx.rows(side), batch_size=bs, device=device)
    x_test, prob = embed(model, ctx.cache, ctx.rows(fold.test), batch_size=bs, device=device)
    x_probe, _ = embed(model, ctx.cache, ctx.rows(fold.probe_test), batch_size=bs, device=device)
    save_fold_embeddings(
        emb_root / arm / f"heldout_{fold.held_out}.npz",
        {
            "X_train": x_train,
            "y_train": ctx.labels(side),
            "patient_train": ctx.patients(side),
            "magnification_train": ctx.mags(side),
            "filename_train": ctx.names(side),
            "X_test": x_test,
            "y_test": ctx.labels(fold.test),
            "patient_test": ctx.patients(fold.test),
            "magnification_test": ctx.mags(fold.test),
            "filename_test": ctx.names(fold.test),
            "prob_test": prob,
            "X_probe": x_probe,
            "patient_probe": ctx.patients(fold.probe_test),
            "magnification_probe": ctx.mags(fold.probe_test),
            "filename_probe": ctx.names(fold.probe_test),
        },
    )
    metrics = fold_metrics(ctx.labels(fold.test), prob, ctx.patients(fold.test))
    probe = lomo_report.magnification_probe(
        x_train, ctx.mags(side), ctx.patients(side), x_probe, ctx.mags(fold.probe_test), seed=config.seed
    )
    selected = result.history[result.selected_epoch - 1]
    return {
        "arm": arm,
        "held_out": fold.held_out,
        **metrics,
        "selected_epoch": result.selected_epoch,
        "selection": result.selection,
        "training_seed": train_seed,
        "grl_lambda": selected.get("lambda") if arm == "grl" else None,
        "steps": result.steps,
        "real_images_per_epoch": result.real_seen,
        "synthetic_images_per_epoch": result.extra_seen,
        "training_magnifications": mags,
        "n_train_images": len(fold.train),
        "n_val_images": len(fold.val),
        "n_probe_test_images": len(fold.probe_test),
        "n_synthetic_images": len(strategy.images) if isinstance(strategy, GanArm) else 0,
        "probe": probe,
        "history": result.history,
        "device": str(device),
    }


def _synthetic_images(ctx: _Context, fold: LomoFold, out: Path) -> FoldSynthetic:
    """DCGAN images for a fold: one DCGAN per class trained on the fold's training-role images only.

    ``gan/heldout_<m>/trained_on.json`` lists, per class, the exact files each DCGAN was trained on;
    ``plots/gan_samples_heldout_<m>.png`` shows real and generated images side by side.
    """
    config = ctx.config
    per_class = {}
    for cls in CLASSES:
        idx = [i for i in fold.train if ctx.images[i].label == cls]
        if idx:
            per_class[cls] = (np.asarray(ctx.cache[ctx.rows(idx)]), ctx.names(idx))

    def gan_cb(cls: str, epoch: int, epochs: int, stats: dict[str, float]) -> None:
        ctx.emit(LomoEvent("gan_epoch", "gan", fold.held_out, epoch, epochs, stats,
                           f"  DCGAN {cls} / {fold.held_out}X epoch {epoch}/{epochs}: "
                           f"D {stats['loss_d']:.3f}, G {stats['loss_g']:.3f}"))

    syn = fold_synthetic_images(
        per_class,
        CLASSES,
        out / "gan" / f"heldout_{fold.held_out}",
        DcganSpec(epochs=config.gan_epochs, batch_size=config.gan_batch_size, width=config.gan_width),
        config.gan_ratio,
        seed=config.seed + 31 * fold.held_out,
        device=ctx.device,
        on_epoch=gan_cb,
    )
    lomo_report.plot_gan_samples(
        syn.real_grid,
        syn.fake_grid,
        out / "plots" / f"gan_samples_heldout_{fold.held_out}.png",
        f"DCGAN samples, {fold.held_out}X held out; trained on the fold's training images only "
        f"({'; '.join(syn.notes)})",
    )
    return syn
