"""``wsienc lomo``: patient-disjoint leave-one-magnification-out on BreaKHis, three arms.

For each held-out magnification ``m`` (a fold) and each arm (``baseline``, ``gan``, ``grl``) a
classifier is trained from the same initial weights on the training patients' images at the other
magnifications and tested on the test patients' images at ``m`` (see
:mod:`wsi_encoder.evaluation.splits`). A finished (arm, fold) leaves
``runs/<arm>/heldout_<m>/metrics.json`` (written last) and is skipped when the run is repeated with
the same settings, so an interrupted run resumes where it stopped.

Output folder::

    config.json             arms, held-out folds that ran, classes, backbone, embedding_dim, seed,
                            shared_init, image_size, settings, init_sha256, skipped folds
    splits.csv              filename,patient_id,class,magnification,fold,role (every image, every fold)
    results.csv             one row per arm × held-out magnification
    probe.csv               magnification probe per arm × fold
    report.md, plots/*.png  tables, AUC/Brier per fold, reliability diagrams, probe, DCGAN samples
    embeddings/<arm>/heldout_<m>.npz   frozen embeddings (train and test) for ``wsienc signatures``
    runs/<arm>/heldout_<m>/metrics.json, gan/heldout_<m>/*.safetensors + trained_on.json
    init_weights.safetensors, cache/images_<size>.npy   shared initial weights, decoded images

With ``patient_folds=k`` each patient fold is such a folder (``patient_fold_<i>/``) and the top-level
``results.csv``/``report.md`` pool the out-of-fold test predictions (every patient tested once).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_encoder import __version__
from wsi_encoder.errors import CheckpointError, DatasetError, InvalidParameterError
from wsi_encoder.evaluation import lomo_report
from wsi_encoder.evaluation.lomo_outputs import (
    fold_metrics,
    save_fold_embeddings,
)
from wsi_encoder.evaluation.splits import (
    LomoFold,
    PatientSplit,
    cap_fold,
    lomo_folds,
    patient_folds,
    patient_key,
    split_patients,
    write_splits_csv,
)
from wsi_encoder.io.breakhis import CLASSES, BreakhisImage, scan_breakhis
from wsi_encoder.models.checkpoint import atomic_write_bytes, atomic_write_json
from wsi_encoder.models.encoders import create_encoder, state_sha256
from wsi_encoder.pipelines.lomo_summary import (
    EventHandler,
    LomoEvent,
    LomoRun,
    emit_event,
    pool_patient_folds,
    write_outputs,
)
from wsi_encoder.training.gan_trainer import DcganSpec, generate, load_generator, save_generator, train_dcgan
from wsi_encoder.training.lomo_data import build_image_cache, resize_batch, to_tensor
from wsi_encoder.training.lomo_trainer import (
    ARMS,
    TrainData,
    TrainSpec,
    build_classifier,
    embed,
    shared_state,
    train_classifier,
)

logger = logging.getLogger(__name__)

GAN_SIZE = 64


@dataclass(frozen=True)
class LomoConfig:
    """Settings of a LOMO run (all arms share them).

    Attributes
    ----------
    backbone : str
        Registered encoder name (``resnet18`` ...) or a ``wsienc train-encoder`` checkpoint folder.
    weights : str or None
        Local weight file for the backbone (e.g. ImageNet ResNet weights); None: seeded random init.
    embed_dim : int or None
        Linear embedding on top of the backbone (None: the backbone's own features).
    image_size : int
        Side in px of the square classifier input (the whole 700×460 image is resized to it).
    epochs, batch_size, lr : int, int, float
        Classifier budget and Adam learning rate (identical for every arm).
    seed : int
        Seed of the patient split, initial weights, batch order and GANs.
    test_fraction : float
        Share of each class's patients in the test set (ignored with ``patient_folds``).
    patient_folds : int or None
        Number of stratified patient folds (every patient tested once) instead of one split.
    val_fraction : float
        Share of each class's training patients used for validation (best-epoch selection).
    strict_patients : bool
        Group patients by number (``14-22549``) instead of slide token (``14-22549AB``).
    gan_ratio : float
        Synthetic images per real training image in the ``gan`` arm.
    gan_epochs, gan_width, gan_batch_size : int
        DCGAN training epochs, base filter count (64 in Radford et al.) and batch size (128).
    grl_weight : float
        Scale of the DANN λ schedule in the ``grl`` arm.
    domain_hidden : int
        Width of the domain head's hidden layers.
    domain_lr_mult : float
        Learning-rate multiplier of the domain head (10 as for DANN's new layers).
    max_images_per_split : int or None
        Keep at most this many images per role and fold (quick runs).
    """

    backbone: str = "resnet18"
    weights: str | None = None
    embed_dim: int | None = None
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    test_fraction: float = 0.3
    patient_folds: int | None = None
    val_fraction: float = 0.2
    strict_patients: bool = False
    gan_ratio: float = 1.0
    gan_epochs: int = 100
    gan_width: int = 64
    gan_batch_size: int = 128
    grl_weight: float = 1.0
    domain_hidden: int = 1024
    domain_lr_mult: float = 10.0
    max_images_per_split: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise InvalidParameterError(
                f"image size {self.image_size!r} px is too small (use >= 16, e.g. 224)"
            )
        if self.gan_ratio < 0:
            raise InvalidParameterError(f"--gan-ratio {self.gan_ratio!r} must be >= 0")
        self.train_spec()
        DcganSpec(epochs=self.gan_epochs, batch_size=self.gan_batch_size, width=self.gan_width)

    def train_spec(self) -> TrainSpec:
        """The classifier training settings."""
        return TrainSpec(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            grl_weight=self.grl_weight,
            domain_hidden=self.domain_hidden,
            domain_lr_mult=self.domain_lr_mult,
        )

    def gan_spec(self) -> DcganSpec:
        """The DCGAN settings."""
        return DcganSpec(epochs=self.gan_epochs, batch_size=self.gan_batch_size, width=self.gan_width)


def resolve_device(device: str | None = None) -> torch.device:
    """``cuda`` when available (or asked), else ``cpu``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError(f"--device {device!r} asked but CUDA is not available; use --device cpu")
    return torch.device(device)


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


def make_encoder(config: LomoConfig) -> torch.nn.Module:
    """The backbone: a registered encoder (seeded) or the encoder of a train-encoder checkpoint folder."""
    path = Path(config.backbone)
    if path.is_dir():
        from wsi_encoder.models.checkpoint import load_encoder

        return load_encoder(path)
    return create_encoder(
        config.backbone,
        weights=config.weights,
        embed_dim=config.embed_dim,
        seed=config.seed,
        input_size=config.image_size,
    )


def _settings(config: LomoConfig) -> dict[str, Any]:
    return asdict(config)


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


def _names_sha(filenames: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(filenames).encode()).hexdigest()


def _init_state(out_dir: Path, config: LomoConfig) -> tuple[dict[str, torch.Tensor], int, str]:
    """The shared initial weights (saved once in ``init_weights.safetensors``), embedding width and SHA-256."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    encoder = make_encoder(config)
    path = out_dir / "init_weights.safetensors"
    key = json.dumps([config.backbone, config.weights, config.embed_dim, config.image_size, config.seed])
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
    return state, int(encoder.num_features), state_sha256(probe)


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
    """
    arms = _check_arms(arms)
    out = Path(out_dir)
    images = collect_images(data)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    logger.info("%d BreaKHis images; device %s", len(images), dev)
    _check_resume(out, config, None)
    init = _init_state(out, config)  # builds the backbone first: a bad --backbone fails before decoding
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
    ctx = _Context(
        usable,
        cache,
        rows_of,
        config,
        arms,
        dev,
        on_event,
        failed,
        [str(Path(d).resolve()) for d in data],
        init,
    )
    if config.patient_folds is None:
        split = split_patients(
            usable,
            test_fraction=config.test_fraction,
            val_fraction=config.val_fraction,
            seed=config.seed,
            strict=config.strict_patients,
        )
        return _run_split(ctx, split, out)
    splits = patient_folds(
        usable,
        config.patient_folds,
        val_fraction=config.val_fraction,
        seed=config.seed,
        strict=config.strict_patients,
    )
    runs = [
        _run_split(ctx, split, out / f"patient_fold_{k}", patient_fold=(k, len(splits)))
        for k, split in enumerate(splits)
    ]
    return pool_patient_folds(out, runs, arms, on_event)


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
    init: tuple[dict[str, torch.Tensor], int, str]

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        """Cache rows of image indices."""
        return np.array([self.rows_of[self.images[i].filename] for i in idx], dtype=np.int64)

    def labels(self, idx: Sequence[int]) -> np.ndarray:
        """Classes (0 benign, 1 malignant) of image indices."""
        return np.array([CLASSES.index(self.images[i].label) for i in idx], dtype=np.int64)

    def patients(self, idx: Sequence[int]) -> list[str]:
        """Patient keys of image indices."""
        return [patient_key(self.images[i], self.config.strict_patients) for i in idx]

    def emit(self, event: LomoEvent) -> None:
        """Report progress."""
        emit_event(self.on_event, event)


def _run_split(
    ctx: _Context, split: PatientSplit, out: Path, patient_fold: tuple[int, int] | None = None
) -> LomoRun:
    """Every (arm, held-out magnification) of one patient split, into ``out``."""
    images, config, arms = ctx.images, ctx.config, ctx.arms
    out.mkdir(parents=True, exist_ok=True)
    filenames = [im.filename for im in images]
    previous = _check_resume(out, config, filenames)
    folds = [
        cap_fold(f, config.max_images_per_split, config.seed)
        for f in lomo_folds(images, split, strict=config.strict_patients)
    ]
    write_splits_csv(out / "splits.csv", images, folds, strict=config.strict_patients)
    _, dim, init_sha = ctx.init
    skipped = {f.held_out: f.skipped for f in folds if f.skipped}
    cfg: dict[str, Any] = {
        "arms": [],
        "held_out": [],
        "classes": list(CLASSES),
        "backbone": config.backbone,
        "embedding_dim": dim,
        "seed": config.seed,
        "shared_init": True,
        "image_size": config.image_size,
        "init_sha256": init_sha,
        "patient_key": "strict" if config.strict_patients else "slide",
        "patient_fold": None if patient_fold is None else patient_fold[0],
        "skipped_held_out": {str(m): r for m, r in skipped.items()},
        "unreadable_images": ctx.failed,
        "n_images": len(filenames),
        "images_sha256": _names_sha(filenames),
        "data": ctx.data,
        "settings": _settings(config),
        "wsi_encoder_version": __version__,
    }
    if previous:
        cfg["arms"] = previous.get("arms", [])
        cfg["held_out"] = previous.get("held_out", [])
    atomic_write_json(out / "config.json", cfg)
    tag = "" if patient_fold is None else f"patient fold {patient_fold[0] + 1}/{patient_fold[1]}, "
    trained: list[tuple[str, int]] = []
    resumed: list[tuple[str, int]] = []
    runnable = [f for f in folds if not f.skipped]
    total = len(runnable) * len(arms)
    done_count = 0
    for fold in folds:
        if fold.skipped:
            ctx.emit(
                LomoEvent(
                    "skip",
                    held_out=fold.held_out,
                    message=f"{tag}held-out {fold.held_out}X skipped: {fold.skipped}",
                ),
            )
            continue
        for arm in arms:
            done_count += 1
            metrics_path = out / "runs" / arm / f"heldout_{fold.held_out}" / "metrics.json"
            npz = out / "embeddings" / arm / f"heldout_{fold.held_out}.npz"
            if metrics_path.is_file() and npz.is_file():
                resumed.append((arm, fold.held_out))
                ctx.emit(
                    LomoEvent(
                        "skip",
                        arm,
                        fold.held_out,
                        done_count,
                        total,
                        message=f"{tag}{arm} / {fold.held_out}X held out: already done, skipped",
                    ),
                )
                continue
            ctx.emit(
                LomoEvent(
                    "start",
                    arm,
                    fold.held_out,
                    done_count,
                    total,
                    message=f"{tag}[{done_count}/{total}] {arm} / {fold.held_out}X held out: "
                    f"{len(fold.train)} train, {len(fold.val)} val, {len(fold.test)} test images",
                ),
            )
            metrics = _run_arm(ctx, arm, fold, out)
            atomic_write_json(metrics_path, metrics)
            trained.append((arm, fold.held_out))
            ctx.emit(
                LomoEvent(
                    "done",
                    arm,
                    fold.held_out,
                    done_count,
                    total,
                    values=metrics,
                    message=f"{tag}{arm} / {fold.held_out}X held out: AUC {_f(metrics['auc'])}, "
                    f"Brier {_f(metrics['brier'])}, F1 {_f(metrics['f1'])}",
                ),
            )
    results = write_outputs(out, ctx.on_event)
    return LomoRun(out, results, skipped, trained, resumed)


def _f(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _fold_domains(images: list[BreakhisImage], rows: Sequence[int]) -> tuple[list[int], np.ndarray]:
    mags = sorted({images[i].magnification for i in rows})
    return mags, np.array([mags.index(images[i].magnification) for i in rows], dtype=np.int64)


def _run_arm(ctx: _Context, arm: str, fold: LomoFold, out: Path) -> dict[str, Any]:
    """Train one arm on one fold, save its embeddings and return its metrics."""
    images, config, device = ctx.images, ctx.config, ctx.device
    spec = config.train_spec()
    crow, y_of, key = ctx.rows, ctx.labels, ctx.patients
    mags, domains = _fold_domains(images, fold.train)
    synthetic = y_syn = None
    if arm == "gan" and config.gan_ratio > 0:
        synthetic, y_syn = _synthetic_images(ctx, fold, out)
    data = TrainData(
        images=ctx.cache,
        train_rows=crow(fold.train),
        y_train=y_of(fold.train),
        domain_train=domains,
        val_rows=crow(fold.val),
        y_val=y_of(fold.val),
        synthetic=synthetic,
        y_synthetic=y_syn,
    )
    n_domains = len(mags) if arm == "grl" else 0
    if arm == "grl" and n_domains < 2:
        logger.warning(
            "held-out %dX: one training magnification only; the grl arm has no domain to reverse",
            fold.held_out,
        )
    model = build_classifier(
        make_encoder(config),
        ctx.init[0],
        n_domains=n_domains,
        domain_hidden=spec.domain_hidden,
        seed=config.seed,
    )

    def epoch_cb(epoch: int, epochs: int, stats: dict[str, float]) -> None:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in stats.items() if k != "epoch" and not math.isnan(v))
        ctx.emit(
            LomoEvent(
                "epoch",
                arm,
                fold.held_out,
                epoch,
                epochs,
                stats,
                f"  {arm} / {fold.held_out}X epoch {epoch}/{epochs}: {parts}",
            ),
        )

    result = train_classifier(
        model, data, spec, seed=config.seed + fold.held_out, device=device, on_epoch=epoch_cb
    )
    train_side = np.array(sorted(fold.train + fold.val), dtype=np.int64)
    x_train, _ = embed(model, ctx.cache, crow(train_side), batch_size=spec.batch_size, device=device)
    test = np.array(fold.test, dtype=np.int64)
    x_test, prob = embed(model, ctx.cache, crow(test), batch_size=spec.batch_size, device=device)
    save_fold_embeddings(
        out / "embeddings" / arm / f"heldout_{fold.held_out}.npz",
        {
            "X_train": x_train,
            "y_train": y_of(train_side),
            "patient_train": key(train_side),
            "magnification_train": [images[i].magnification for i in train_side],
            "filename_train": [images[i].filename for i in train_side],
            "X_test": x_test,
            "y_test": y_of(test),
            "patient_test": key(test),
            "magnification_test": [images[i].magnification for i in test],
            "filename_test": [images[i].filename for i in test],
            "prob_test": prob,
        },
    )
    metrics = fold_metrics(y_of(test), prob, key(test))
    probe = lomo_report.magnification_probe(
        x_train, [images[i].magnification for i in train_side], key(train_side)
    )
    return {
        "arm": arm,
        "held_out": fold.held_out,
        **metrics,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "training_magnifications": mags,
        "n_train_images": len(fold.train),
        "n_val_images": len(fold.val),
        "n_synthetic_images": 0 if synthetic is None else len(synthetic),
        "probe": probe,
        "history": result.history,
        "device": str(device),
    }


def _synthetic_images(ctx: _Context, fold: LomoFold, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """DCGAN images for a fold: one DCGAN per class trained on the fold's training images only.

    ``gan/heldout_<m>/trained_on.json`` lists, per class, the exact files each DCGAN was trained on.
    The number per class is ``round(gan_ratio · n_real(class))``.
    """
    images, config, device = ctx.images, ctx.config, ctx.device
    gan_dir = out / "gan" / f"heldout_{fold.held_out}"
    spec = config.gan_spec()
    record_path = gan_dir / "trained_on.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    fakes, labels, real_grid, fake_grid, done = [], [], {}, {}, []
    for c, cls in enumerate(CLASSES):
        idx = [i for i in fold.train if images[i].label == cls]
        if not idx:
            continue
        names = [images[i].filename for i in idx]
        weights = gan_dir / f"{cls}.safetensors"
        gen = None
        if weights.is_file() and record.get(cls) == names and record.get("spec") == asdict(spec):
            try:
                gen, _ = load_generator(weights)
            except CheckpointError as exc:
                logger.warning("%s; the DCGAN is trained again", exc)
        real64 = _to_gan_size(ctx.cache[ctx.rows(idx)], device)
        if gen is None:

            def gan_cb(epoch: int, epochs: int, stats: dict[str, float], cls: str = cls) -> None:
                ctx.emit(
                    LomoEvent(
                        "gan_epoch",
                        "gan",
                        fold.held_out,
                        epoch,
                        epochs,
                        stats,
                        f"  DCGAN {cls} / {fold.held_out}X epoch {epoch}/{epochs}: "
                        f"D {stats['loss_d']:.3f}, G {stats['loss_g']:.3f}",
                    ),
                )

            gen = train_dcgan(
                real64, spec, seed=config.seed + 31 * fold.held_out + c, device=device, on_epoch=gan_cb
            )
            save_generator(weights, gen, {"class": cls, "held_out": fold.held_out, "n_images": len(names)})
            record[cls] = names
            record["spec"] = asdict(spec)
            record["held_out"] = fold.held_out
            atomic_write_json(record_path, record)
        n = round(config.gan_ratio * len(idx))
        samples = generate(gen, n, seed=config.seed + 1000 + c, device=device)
        fakes.append(samples)
        labels.append(np.full(n, c, dtype=np.int64))
        real_grid[cls] = real64[:8]
        fake_grid[cls] = generate(gen, 16, seed=config.seed + 2000 + c, device=device)
        steps = spec.epochs * math.ceil(len(idx) / min(spec.batch_size, len(idx)))
        done.append(f"{cls}: {len(idx)} images, {steps} steps")
    lomo_report.plot_gan_samples(
        real_grid,
        fake_grid,
        out / "plots" / f"gan_samples_heldout_{fold.held_out}.png",
        f"DCGAN samples, {fold.held_out}X held out; trained on the fold's training images only "
        f"({'; '.join(done)})",
    )
    if not fakes:
        return np.zeros((0, GAN_SIZE, GAN_SIZE, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(fakes), np.concatenate(labels)


def _to_gan_size(images: np.ndarray, device: torch.device) -> np.ndarray:
    """Resize ``(N, S, S, 3)`` uint8 images to 64×64 (antialiased), the classifier's view at DCGAN size."""
    out = np.empty((len(images), GAN_SIZE, GAN_SIZE, 3), dtype=np.uint8)
    for start in range(0, len(images), 256):
        x = resize_batch(to_tensor(images[start : start + 256], device), GAN_SIZE)
        out[start : start + len(x)] = (
            (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        )
    return out
