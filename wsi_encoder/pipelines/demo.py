"""The main job end to end on a generated cohort: slides → tile → train-encoder → encode → classify.

The demo cohort's slide label is the presence of a 'lesion' texture. The encoder is trained briefly,
with supervision, on tiles labelled from the generator's ground truth (the lesion fraction of each
tile), exactly as a user would train on annotated tiles through the ``patch-store`` task; the slide
classifier then learns from slide labels alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_encoder.errors import StoreError, WsiEncoderError
from wsi_encoder.io.files import atomic_write_csv

if TYPE_CHECKING:
    from wsi_encoder.evaluation.crossval import FoldResult
    from wsi_encoder.pipelines.tile_cohort import ProgressEvent
    from wsi_encoder.training.multitask import EpochInfo, PhaseInfo, PreparedTask, StepInfo

logger = logging.getLogger(__name__)

# numpy, zarr and the generator are imported where used: `wsienc --help` reads DemoConfig's defaults.

#: Tiles with at least this lesion fraction are labelled ``lesion``; at most ``_NORMAL_MAX``, ``normal``.
_LESION_MIN = 0.5
_NORMAL_MAX = 0.02


@dataclass(frozen=True)
class DemoConfig:
    """Size and budget of the demo (defaults run in a few minutes on a 2-core CPU)."""

    n_slides: int = 12
    width: int = 6144
    height: int = 4096
    mpp: float = 0.5
    tile_size: int = 128
    encoder_steps: int = 150
    embed_dim: int = 64
    classifier: str = "abmil"
    #: ``classification`` (label: lesion present) or ``survival`` (time, event: the lesion burden sets the hazard)
    target: str = "classification"
    folds: int = 3
    workers: int = 2
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class DemoHooks:
    """Progress of :func:`run_demo`: each hook is handed to the step it belongs to (None: that step is silent).

    ``say`` gets one line per step; ``tiles``, ``train_tasks``/``train_step``/``train_epoch``/``train_phase``,
    ``encoded`` and ``fold`` are the progress callbacks of
    :func:`~wsi_encoder.pipelines.tile_cohort.tile_cohort`,
    :func:`~wsi_encoder.pipelines.train_encoder.train_encoder`,
    :func:`~wsi_encoder.pipelines.encode_store.encode_store` and
    :func:`~wsi_encoder.pipelines.classify.train_classifier`.
    """

    say: Callable[[str], None] | None = None
    tiles: Callable[[ProgressEvent], None] | None = None
    train_tasks: Callable[[Sequence[PreparedTask]], None] | None = None
    train_step: Callable[[StepInfo], None] | None = None
    train_epoch: Callable[[EpochInfo], None] | None = None
    train_phase: Callable[[PhaseInfo], None] | None = None
    encoded: Callable[[int, int], None] | None = None
    fold: Callable[[FoldResult], None] | None = None


@dataclass
class DemoResult:
    """Where the demo wrote what, and the cross-validated metrics."""

    out: Path
    metrics: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def _tile_lesion_fractions(patch_store: str | Path, slides: dict[str, Path]) -> Iterator[tuple[str, int, float]]:
    """``(slide_id, tile_index, lesion fraction)`` of every stored tile of the generated slides (their ground truth)."""
    import numpy as np
    import zarr

    from wsi_encoder.synthetic import SlideLayout, read_synthetic_spec

    root = zarr.open_group(str(patch_store), mode="r")
    for slide_id, path in slides.items():
        spec = read_synthetic_spec(path)
        if spec is None or slide_id not in root:
            continue
        layout = SlideLayout(spec)
        group = root[slide_id]
        coords = group["coords"] if isinstance(group, zarr.Group) and "coords" in group else None
        if not isinstance(group, zarr.Group) or not isinstance(coords, zarr.Array):
            raise StoreError(f"{patch_store}: slide {slide_id!r} is not a patch-store slide group with coords")
        size_l0 = float(str(group.attrs["tile_size_l0"]))
        for index, (x, y) in enumerate(np.asarray(coords[:], dtype=np.float64).tolist()):
            yield slide_id, index, layout.fraction("lesion", x, y, size_l0, size_l0)


def write_tile_labels(patch_store: str | Path, slides: dict[str, Path], out_csv: str | Path) -> dict[str, int]:
    """Label the tiles of generated slides from their ground truth; write ``slide_id,tile_index,label,group``.

    Returns the number of tiles per label. Ambiguous tiles (lesion fraction between the thresholds)
    are left out.
    """
    counts = {"lesion": 0, "normal": 0}
    rows: list[tuple[str, int, str, str]] = []
    for slide_id, index, fraction in _tile_lesion_fractions(patch_store, slides):
        label = "lesion" if fraction >= _LESION_MIN else "normal" if fraction <= _NORMAL_MAX else None
        if label is not None:
            rows.append((slide_id, index, label, slide_id))
            counts[label] += 1
    atomic_write_csv(out_csv, rows, header=["slide_id", "tile_index", "label", "group"])
    return counts


#: Demo survival: log hazard ratio of the cohort's largest lesion burden (burden 0: ratio 1).
_BURDEN_LOG_HAZARD = 4.0


def write_survival_labels(
    patch_store: str | Path, slides: Sequence[Any], out_csv: str | Path, seed: int = 0
) -> dict[str, float]:
    """``slide_id,time,event,patient_id`` for the generated slides: the lesion burden sets the hazard.

    A slide's burden is the mean lesion fraction of its tissue tiles (0 without a lesion). Its death time is
    exponential with hazard ``0.1 * exp(4 * burden / b_max)``, ``b_max`` the cohort's largest burden (so the
    hazard ratios span 1 to e^4 whatever the slide size; a fixed coefficient per unit of burden gave ratios of
    at most 3 on small slides, whose lesions cover little tissue), and it is censored at a uniform time on
    (0, 20), about 25% censored. Returns each slide's burden.
    """
    import numpy as np

    total: dict[str, list[float]] = {}
    for slide_id, _, fraction in _tile_lesion_fractions(patch_store, {s.slide_id: s.path for s in slides}):
        total.setdefault(slide_id, []).append(fraction)
    burden = {s.slide_id: float(np.mean(total.get(s.slide_id) or [0.0])) for s in slides}
    scale = max(burden.values(), default=0.0) or 1.0
    rng = np.random.default_rng(seed + 77)
    rows = []
    for s in slides:
        death = rng.exponential(10.0 * np.exp(-_BURDEN_LOG_HAZARD * burden[s.slide_id] / scale))
        censor = rng.uniform(0.0, 20.0)
        rows.append((s.slide_id, f"{min(death, censor):.3f}", int(death <= censor), s.patient_id))
    atomic_write_csv(out_csv, rows, header=["slide_id", "time", "event", "patient_id"])
    return burden


def run_demo(
    out: str | Path,
    config: DemoConfig | None = None,
    say: Callable[[str], None] | None = None,
    *,
    hooks: DemoHooks | None = None,
) -> DemoResult:
    """Run the whole main job on a generated cohort in ``out``; re-running resumes every step.

    ``say`` (or ``hooks.say``) gets one line per step; the other ``hooks`` report each step's progress.
    """
    from wsi_encoder.pipelines.classify import train_classifier
    from wsi_encoder.pipelines.encode_store import encode_store
    from wsi_encoder.pipelines.tile_cohort import tile_cohort
    from wsi_encoder.pipelines.train_encoder import train_encoder
    from wsi_encoder.synthetic import write_demo_cohort
    from wsi_encoder.tiling import TileSpec
    from wsi_encoder.training.train_config import TrainConfig

    cfg = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hooks = hooks or DemoHooks()
    tell = say or hooks.say or (lambda message: logger.info("%s", message))
    paths = {
        "slides": out / "slides",
        "patches": out / "patches.zarr",
        "qc": out / "qc",
        "tile_labels": out / "tile_labels.csv",
        "encoder": out / "encoder",
        "embeddings": out / "embeddings.zarr",
        "previews": out / "previews",
        "h5": out / "h5",
        "classifier": out / f"classify_{cfg.classifier}",
    }

    tell(f"1/5 generating {cfg.n_slides} demo slides ({cfg.width} x {cfg.height} px at {cfg.mpp} µm/px) in {paths['slides']}")
    cohort = write_demo_cohort(paths["slides"], cfg.n_slides, width=cfg.width, height=cfg.height, mpp=cfg.mpp, seed=cfg.seed)

    tell(f"2/5 tiling at {cfg.mpp} µm/px, {cfg.tile_size} px tiles -> {paths['patches']} (QC pictures in {paths['qc']})")
    report = tile_cohort(
        [s.path for s in cohort],
        paths["patches"],
        TileSpec(target_mpp=cfg.mpp, tile_size=cfg.tile_size),
        qc_dir=paths["qc"],
        workers=cfg.workers,
        progress=hooks.tiles,
    )
    if report.failed:
        raise WsiEncoderError(f"demo tiling failed for {[o.slide_id for o in report.failed]}")
    counts = write_tile_labels(paths["patches"], {s.slide_id: s.path for s in cohort}, paths["tile_labels"])
    tell(f"   {report.n_tiles} tissue tiles; {counts['lesion']} lesion and {counts['normal']} normal tiles labelled for the encoder")

    tell(f"3/5 training a multitask-ready 'nic' encoder for {cfg.encoder_steps} steps -> {paths['encoder']}")
    train_encoder(
        [f"patch-store={paths['patches']},labels={paths['tile_labels']}"],
        paths["encoder"],
        TrainConfig(
            backbone="nic",
            embed_dim=cfg.embed_dim,
            max_steps=cfg.encoder_steps,
            batch_size=64,
            seed=cfg.seed,
            workers=0,
            checkpoint_every=cfg.encoder_steps,
            device=cfg.device,
        ),
        on_tasks=hooks.train_tasks,
        on_step=hooks.train_step,
        on_epoch=hooks.train_epoch,
        on_phase=hooks.train_phase,
    )

    tell(f"4/5 encoding every tile into embedding grids -> {paths['embeddings']} (previews in {paths['previews']})")
    encoded = encode_store(
        paths["patches"],
        paths["encoder"],
        paths["embeddings"],
        dtype="float32",
        workers=1,
        preview_dir=paths["previews"],
        h5_dir=paths["h5"],
        device=cfg.device,
        progress=hooks.encoded,
    )
    bad = [sid for sid, r in encoded.slides.items() if r.status == "failed"]
    if bad:
        raise WsiEncoderError(f"demo encoding failed for {bad}")

    if cfg.target == "survival":
        from wsi_encoder.pipelines.classify import train_survival

        survival_csv = paths["slides"] / "survival.csv"
        write_survival_labels(paths["patches"], cohort, survival_csv, cfg.seed)
        folder = out / f"survival_{cfg.classifier}"
        tell(f"5/5 {cfg.classifier} survival model, {cfg.folds}-fold patient-grouped cross-validation -> {folder}")
        outcome = train_survival(
            paths["embeddings"], survival_csv, cfg.classifier, folder, cfg.folds, cfg.seed, n_boot=200,
            device=cfg.device, params=None if cfg.classifier == "linear" else {"batch_size": 16},
        )
        return DemoResult(out=out, metrics=outcome.metrics,
                          paths={**paths, "classifier": folder, "survival_labels": survival_csv, **outcome.files})
    tell(f"5/5 {cfg.classifier} slide classifier, {cfg.folds}-fold patient-grouped cross-validation -> {paths['classifier']}")
    result = train_classifier(
        paths["embeddings"],
        paths["slides"] / "labels.csv",
        model=cfg.classifier,
        out_dir=paths["classifier"],
        folds=cfg.folds,
        seed=cfg.seed,
        positive_class="lesion",
        n_boot=200,
        device=cfg.device,
        on_fold=hooks.fold,
    )
    return DemoResult(out=out, metrics=result.metrics, paths={**paths, **result.files})
