"""The ``wsienc tile`` job: slides -> a zarr patch store, as dask tasks over blocks of neighbouring tiles.

For each batch of slides two kinds of task run on the dask workers (see
:mod:`wsi_encoder.pipelines.cluster`):

1. :func:`plan_slide` -- open the slide, compute its thumbnail, tissue mask and tile grid, keep the
   tiles with enough tissue, and (re)create the slide's group in the store with coordinates, grid,
   tissue fractions, thumbnail and mask; or, for an interrupted slide, find which chunks are missing.
2. :func:`tile_chunk` -- one per missing chunk of ``chunk_tiles`` neighbouring tiles: read one region
   per block the chunk covers (never one read per tile), resample when the level does not match the
   target, cut the tiles and write the chunk straight into the store, then mark it done.

The client only sends paths and parameters and receives small records: workers open the slides and
the store themselves, and memory per task is bounded by the chunk size whatever the slide size. When
the last chunk of a slide is in, the client sets the slide's ``complete`` flag, records its status
in the store's root attributes and draws its QC picture. A slide that fails (unreadable, corrupt, no
µm/px) is recorded as failed with its reason and the others go on; a slide where no tile holds
enough tissue is recorded as ``empty`` (with a warning naming the threshold to try).

Each slide's level-0 µm/px comes, in this order, from ``slide_mpp_csv`` (per slide), a forced
``slide_mpp``, the file's metadata, or ``slide_mpp`` as the fallback for slides without one; the
store records which (``mpp_source``: csv|forced|metadata|fallback). The store is locked for the
duration of the run; a re-run skips complete slides, resumes partial ones chunk by chunk, and
retries failed ones.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

from wsi_encoder import __version__
from wsi_encoder.errors import InvalidParameterError, MissingMppError, SlideReadError, StoreError
from wsi_encoder.io.patch_store import (
    CODECS,
    PatchSlide,
    clean_slide_leftovers,
    create_patch_store,
    create_slide_group,
    mark_chunk_done,
    mark_slide_complete,
    open_slide_arrays_for_writing,
    update_slide_status,
    write_tile_chunk,
)
from wsi_encoder.io.slide_ids import SlideEntry, assign_slide_ids, expand_slide_inputs
from wsi_encoder.io.slide_mpp import read_slide_mpp_csv
from wsi_encoder.io.slides import SlideReader, get_reader, open_slide_with_mpp
from wsi_encoder.io.store_lock import StoreLock
from wsi_encoder.io.tissue_masks import find_mask_file
from wsi_encoder.io.urls import fetched_copy, filesystem, is_url, normalize, zarr_store
from wsi_encoder.pipelines.cluster import TaskFailure, TaskRunner, get_runner
from wsi_encoder.qc import save_tile_qc
from wsi_encoder.tiling import (
    ReadPart,
    SlideGrid,
    TileSpec,
    chunk_parts,
    grid_attrs,
    grid_from_attrs,
    plan_tiles,
    read_tiles,
)

logger = logging.getLogger(__name__)

DEFAULT_TISSUE_THRESHOLD = 0.25
#: Slides planned per round (their chunks then run together); bounds what the client holds.
_SLIDES_PER_ROUND = 32
_STATUS_FLUSH_S = 5.0
@dataclass(frozen=True)
class TileConfig:
    """Everything a worker needs besides the slide (small, picklable)."""

    store: str
    spec: TileSpec
    tissue_threshold: float
    codec: str | None
    jpeg_quality: int
    backend: str
    slide_mpp: float | None
    thumbnail_size: int | None
    overwrite: bool
    chunk_tiles: int | None = None
    force_slide_mpp: bool = False
    #: ``{slide id or resolved path: mpp}`` from ``--slide-mpp-csv``.
    slide_mpp_table: tuple[tuple[str, float], ...] = ()
    tissue_mask_dir: str | None = None

    def requested_mpp(self, entry: SlideEntry) -> tuple[float | None, str]:
        """The µm/px asked for ``entry`` and its source: ``csv``, ``forced``, ``fallback`` or (None) ``metadata``."""
        table = dict(self.slide_mpp_table)
        for key in (entry.slide_id, str(normalize(entry.path))):
            if key in table:
                return table[key], "csv"
        if self.slide_mpp is not None:
            return float(self.slide_mpp), "forced" if self.force_slide_mpp else "fallback"
        return None, "metadata"

    def params(self, source: str) -> dict[str, Any]:
        """The attributes identifying how a slide is tiled (compared on resume)."""
        return {
            "source": source,
            "target_mpp": float(self.spec.target_mpp),
            "tile_size": int(self.spec.tile_size),
            "stride": int(self.spec.stride_px),
            "mpp_tolerance": float(self.spec.tolerance),
            "tissue_threshold": float(self.tissue_threshold),
            "codec": self.codec,
            "jpeg_quality": int(self.jpeg_quality) if self.codec == "jpeg" else None,
            "coords_only": self.codec is None,
            "thumbnail_size": self.thumbnail_size,
            "edge": self.spec.edge,
            "tissue_mask_dir": self.tissue_mask_dir,
        }


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan_slide` reports back: the slide's layout and the chunks still to write."""

    slide_id: str
    source: str
    error: str | None = None
    backend: str = ""
    grid: SlideGrid | None = None
    rowcol: npt.NDArray[np.int32] | None = None
    chunk_tiles: int = 1
    block_size: int = 1
    todo: tuple[int, ...] = ()
    mpp_note: str | None = None


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of one slide: tiles ``[start, stop)`` read as ``parts``."""

    config: TileConfig
    slide_id: str
    source: str
    backend: str
    grid: SlideGrid
    index: int
    parts: tuple[ReadPart, ...]
    rowcol: npt.NDArray[np.int32]
    run_id: str


@dataclass(frozen=True)
class SlideOutcome:
    """How one slide ended: ``ok``, ``empty`` (no tile kept), ``failed`` (with the reason) or ``skipped`` (already complete)."""

    slide_id: str
    source: str
    status: str
    reason: str | None = None
    n_tiles: int = 0


@dataclass
class TileReport:
    """The result of :func:`tile_cohort`."""

    store: Path | str
    outcomes: list[SlideOutcome] = field(default_factory=list)
    runner: str = ""

    @property
    def failed(self) -> list[SlideOutcome]:
        """Slides that failed."""
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> list[SlideOutcome]:
        """Slides tiled by this run."""
        return [o for o in self.outcomes if o.status == "ok"]

    @property
    def empty(self) -> list[SlideOutcome]:
        """Slides tiled by this run where no tile held enough tissue."""
        return [o for o in self.outcomes if o.status == "empty"]

    @property
    def skipped(self) -> list[SlideOutcome]:
        """Slides already complete in the store."""
        return [o for o in self.outcomes if o.status == "skipped"]

    @property
    def n_tiles(self) -> int:
        """Tiles of the slides tiled or skipped."""
        return sum(o.n_tiles for o in self.outcomes if o.status != "failed")


@dataclass(frozen=True)
class ProgressEvent:
    """Reported to the ``progress`` callback: ``kind`` is ``slides``, ``tiles_planned``, ``tiles`` or ``slide``."""

    kind: str
    count: int = 0
    outcome: SlideOutcome | None = None


# ---- worker side -----------------------------------------------------------------------------
def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def _slide_attrs(config: TileConfig, reader: SlideReader, grid: SlideGrid, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        **config.params(str(reader.path)),
        "backend": reader.backend,
        "vendor": reader.vendor,
        "objective_power": reader.objective_power,
        **grid_attrs(grid),
        "wsi_encoder_version": __version__,
        **extra,
    }


def _open_with_mpp(config: TileConfig, entry: SlideEntry) -> tuple[SlideReader, str, str | None]:
    """Open the slide and settle its µm/px: ``(reader, mpp_source, note for the user or None)``."""
    requested, source = config.requested_mpp(entry)
    return open_slide_with_mpp(entry.path, config.backend, requested, source, entry.slide_id)


def _matches(attrs: dict[str, Any], params: dict[str, Any]) -> bool:
    return all(attrs.get(key) == value for key, value in params.items())


def plan_slide(item: tuple[TileConfig, SlideEntry]) -> PlanResult:
    """Worker task: plan one slide (or find what is left of an interrupted one)."""
    config, entry = item
    source = str(entry.path)
    try:
        reader, mpp_source, note = _open_with_mpp(config, entry)
        try:
            reader.validate()
            slide_mpp = reader.require_mpp()
            try:
                root = zarr.open_group(zarr_store(config.store), mode="r+", zarr_format=3)
            except FileNotFoundError as exc:
                raise StoreError(
                    f"{config.store}: the patch store is not visible on this dask worker; on a cluster --out "
                    "must be an s3:// (or gs://, az://) URL or on a file system every worker mounts at the same path"
                ) from exc
            params = config.params(source)
            existing = root.get(entry.slide_id)
            if (
                not config.overwrite
                and isinstance(existing, zarr.Group)
                and existing.attrs.get("planned")
                and _matches(dict(existing.attrs), params)
                and existing.attrs.get("backend") == reader.backend
                and isinstance(stored_mpp := existing.attrs.get("slide_mpp"), int | float)
                and np.isclose(float(stored_mpp), slide_mpp, rtol=1e-9)
            ):
                return _resume(config, entry, reader, existing)
            return _fresh_plan(config, entry, reader, root, mpp_source, note)
        finally:
            reader.close()
    except (SlideReadError, MissingMppError, InvalidParameterError, StoreError, OSError) as exc:
        return PlanResult(entry.slide_id, source, error=_reason(exc))
    except Exception as exc:
        logger.debug("planning %s failed", source, exc_info=True)
        return PlanResult(entry.slide_id, source, error=f"{type(exc).__name__}: {_reason(exc)}")


def _resume(config: TileConfig, entry: SlideEntry, reader: SlideReader, group: zarr.Group) -> PlanResult:
    clean_slide_leftovers(config.store, entry.slide_id)
    slide = PatchSlide(group, entry.slide_id)
    attrs = slide.attrs
    todo: tuple[int, ...] = ()
    done_array = group.get("chunks_done")
    if isinstance(done_array, zarr.Array):
        done = np.asarray(done_array[...], dtype=bool)
        todo = tuple(int(i) for i in np.flatnonzero(~done))
    logger.info("%s: resuming, %d chunk(s) left", entry.slide_id, len(todo))
    return PlanResult(
        entry.slide_id,
        str(entry.path),
        backend=reader.backend,
        grid=grid_from_attrs(attrs, reader),
        rowcol=slide.grid,
        chunk_tiles=int(attrs["chunk_tiles"]),
        block_size=int(attrs["block_size"]),
        todo=todo,
    )


def _fresh_plan(
    config: TileConfig, entry: SlideEntry, reader: SlideReader, root: zarr.Group, mpp_source: str, note: str | None
) -> PlanResult:
    mask_file = recorded_mask = None
    if config.tissue_mask_dir is not None:
        mask_file = find_mask_file(fetched_copy(config.tissue_mask_dir), entry.slide_id, entry.path)
        recorded_mask = (  # as given: the URL of the file, not the process's fetched copy
            f"{config.tissue_mask_dir.rstrip('/')}/{mask_file.name}" if is_url(config.tissue_mask_dir) else str(mask_file)
        )
    tiling = plan_tiles(
        reader,
        config.spec,
        config.tissue_threshold,
        mask_file=mask_file,
        thumbnail_size=config.thumbnail_size,
        chunk_tiles=config.chunk_tiles,
    )
    grid, rowcol = tiling.grid, tiling.rowcol
    extra = {
        "mpp_source": mpp_source,
        "tissue_method": tiling.tissue_mask.method,
        "tissue_mask_threshold": tiling.tissue_mask.threshold,
        "tissue_area_fraction": tiling.tissue_mask.fraction,
        "tissue_mask_file": recorded_mask,
        "thumbnail_downsample": list(tiling.thumbnail_downsample),
        "n_tiles": len(rowcol),
        "n_edge_tiles": int(np.sum(tiling.inside < 1.0)),
        "chunk_tiles": tiling.chunk_tiles,
        "block_size": tiling.block_size,
    }
    create_slide_group(
        root,
        entry.slide_id,
        _slide_attrs(config, reader, grid, extra),
        coords=grid.coords_l0(rowcol),
        grid=rowcol,
        tissue=tiling.tissue,
        inside=tiling.inside,
        thumbnail=tiling.thumbnail,
        tissue_mask=tiling.tissue_mask.mask,
        tile_size=config.spec.tile_size,
        chunk_tiles=tiling.chunk_tiles,
        codec=config.codec,
        jpeg_quality=config.jpeg_quality,
    )
    n_chunks = -(-len(rowcol) // tiling.chunk_tiles) if config.codec is not None else 0
    logger.info(
        "%s: level %d (%.4g µm/px, scale %.4g), grid %dx%d, %d tiles kept, %d chunk(s)",
        entry.slide_id, grid.level, grid.level_mpp, grid.scale, grid.rows, grid.cols, len(rowcol), n_chunks,
    )
    return PlanResult(
        entry.slide_id,
        str(entry.path),
        backend=reader.backend,
        grid=grid,
        rowcol=rowcol,
        chunk_tiles=tiling.chunk_tiles,
        block_size=tiling.block_size,
        todo=tuple(range(n_chunks)),
        mpp_note=note,
    )


_ARRAYS: OrderedDict[tuple[str, str, str], tuple[zarr.Array, zarr.Array]] = OrderedDict()
_ARRAYS_LOCK = threading.Lock()


def _arrays(store: str, slide_id: str, run_id: str) -> tuple[zarr.Array, zarr.Array]:
    key = (store, slide_id, run_id)
    with _ARRAYS_LOCK:
        if key in _ARRAYS:
            _ARRAYS.move_to_end(key)
            return _ARRAYS[key]
    arrays = open_slide_arrays_for_writing(store, slide_id)
    with _ARRAYS_LOCK:
        _ARRAYS[key] = arrays
        while len(_ARRAYS) > 16:
            _ARRAYS.popitem(last=False)
    return arrays


def tile_chunk(job: ChunkJob) -> tuple[str, int, int, str | None]:
    """Worker task: read, cut and write one chunk of tiles; returns ``(slide_id, index, n, error)``."""
    try:
        reader = get_reader(job.source, job.backend)
        tiles = read_tiles(reader, job.grid, job.rowcol, list(job.parts))
        start, stop = job.parts[0].start, job.parts[-1].stop
        tiles_array, done = _arrays(job.config.store, job.slide_id, job.run_id)
        write_tile_chunk(tiles_array, job.index, tiles)
        mark_chunk_done(done, job.index)
        return (job.slide_id, job.index, stop - start, None)
    except Exception as exc:
        logger.debug("chunk %d of %s failed", job.index, job.slide_id, exc_info=True)
        return (job.slide_id, job.index, 0, _reason(exc))


# ---- client side -----------------------------------------------------------------------------
@dataclass
class _SlideState:
    plan: PlanResult
    remaining: int
    errors: list[str] = field(default_factory=list)


class _StatusBook:
    """Per-slide status records, flushed to the store's root attrs every few seconds and at the end."""

    def __init__(self, root: zarr.Group) -> None:
        self.root = root
        self.pending: dict[str, dict[str, Any]] = {}
        self.last = time.monotonic()

    def record(self, outcome: SlideOutcome) -> None:
        status = outcome.status if outcome.status in ("failed", "empty") else "ok"
        if outcome.status == "skipped" and outcome.n_tiles == 0:
            status = "empty"
        self.pending[outcome.slide_id] = {"status": status, "reason": outcome.reason, "source": outcome.source}
        if time.monotonic() - self.last > _STATUS_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        update_slide_status(self.root, self.pending)
        self.pending = {}
        self.last = time.monotonic()


_LEGACY_DEFAULTS: dict[str, Any] = {"edge": "drop", "tissue_mask_dir": None}


def _check_existing(root: zarr.Group, entries: Sequence[SlideEntry], config: TileConfig) -> tuple[list[SlideEntry], list[SlideOutcome]]:
    """Split slides into to-do and already complete; refuse complete slides tiled differently."""
    todo: list[SlideEntry] = []
    skipped: list[SlideOutcome] = []
    conflicts: list[str] = []
    for entry in entries:
        group = root.get(entry.slide_id)
        attrs: dict[str, Any] = dict(group.attrs) if group is not None else {}
        if config.overwrite or not attrs.get("complete"):
            todo.append(entry)
            continue
        params = config.params(str(entry.path))
        # Stores written before these were recorded: every tile whole, tissue detected.
        attrs = {**_LEGACY_DEFAULTS, **attrs}
        diffs = [f"{k}={attrs.get(k)!r} (now {v!r})" for k, v in params.items() if attrs.get(k) != v]
        # A finished slide is kept unless this run asks for a different µm/px for it.
        requested, source = config.requested_mpp(entry)
        stored_source = attrs.get("mpp_source") or ("forced" if attrs.get("slide_mpp_override") is not None else "metadata")
        if source == "fallback" and stored_source != "fallback":
            requested = None  # the slide records its resolution: the fallback does not apply to it
        if requested is not None and not np.isclose(attrs.get("slide_mpp", -1.0), requested, rtol=1e-6):
            diffs.append(f"slide_mpp={attrs.get('slide_mpp')!r} (now {requested!r} from {source})")
        if not diffs:
            skipped.append(SlideOutcome(entry.slide_id, str(entry.path), "skipped", n_tiles=int(attrs.get("n_tiles", 0))))
            continue
        conflicts.append(f"{entry.slide_id}: {', '.join(diffs)}")
    if conflicts:
        raise InvalidParameterError(
            f"{config.store} already holds these slides tiled differently: {'; '.join(conflicts[:5])}"
            f"{' ...' if len(conflicts) > 5 else ''}; pass --overwrite to re-tile them, or write to another --out"
        )
    return todo, skipped


def tile_cohort(
    inputs: Iterable[str | Path],
    out: str | Path,
    spec: TileSpec | None = None,
    *,
    tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD,
    codec: str = "jpeg",
    jpeg_quality: int = 90,
    coords_only: bool = False,
    backend: str = "auto",
    slide_mpp: float | None = None,
    force_slide_mpp: bool = False,
    slide_mpp_csv: str | Path | None = None,
    tissue_mask: str | Path | None = None,
    overwrite: bool = False,
    qc_dir: str | Path | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    thumbnail_size: int | None = None,
    chunk_tiles: int | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> TileReport:
    """Tile slides into the patch store ``out`` (created or resumed).

    Parameters
    ----------
    inputs
        Slide files and/or directories searched recursively for slides.
    out
        The patch store (a ``.zarr`` directory).
    spec
        Target µm/px, tile size, stride, mpp tolerance and edge mode (default: 0.5 µm/px, 224 px, no
        overlap, edge tiles padded).
    tissue_threshold
        Keep tiles whose tissue fraction is at least this (0 keeps every tile).
    codec
        ``"jpeg"`` (lossy, near the source's size) or ``"zstd"`` (lossless).
    jpeg_quality
        JPEG quality 1-100.
    coords_only
        Store coordinates, grid, tissue, thumbnail and mask, but no pixels.
    backend
        Slide reader: ``auto``, ``openslide`` or ``tiffslide``.
    slide_mpp
        Level-0 µm/px for slides whose metadata does not record one (a fallback; see ``force_slide_mpp``).
    force_slide_mpp
        Use ``slide_mpp`` for every slide, replacing recorded values (each replacement is logged).
    slide_mpp_csv
        CSV of per-slide level-0 µm/px (``slide_id,mpp`` or ``path,mpp``); its values win over the rest.
    tissue_mask
        A folder of per-slide PNG masks or QuPath GeoJSON files used instead of tissue detection
        (:mod:`wsi_encoder.io.tissue_masks`); a slide without one fails.
    overwrite
        Re-tile slides that are already complete in the store.
    qc_dir
        Write one QC PNG per slide here.
    workers, scheduler, client
        Where the dask tasks run (:func:`wsi_encoder.pipelines.cluster.get_runner`).
    thumbnail_size
        Longer side (px) of the thumbnail the tissue mask is computed on; default: 8 px per tile
        edge, 4-16 µm/px, between 768 and 2048 px (:func:`wsi_encoder.tiling.thumbnail_side`).
    chunk_tiles
        Tiles per chunk of the ``tiles`` array (one unit of work); default about 9.6 MB of pixels
        (64 tiles of 224 px).
    progress
        Called with :class:`ProgressEvent` records (for progress bars).

    Returns
    -------
    TileReport
        Per-slide outcomes; failed slides are recorded in the store too.
    """
    spec = spec or TileSpec()
    if codec not in CODECS:
        raise InvalidParameterError(f"--codec {codec!r}: choose one of {', '.join(CODECS)}")
    if not 1 <= jpeg_quality <= 100:
        raise InvalidParameterError(f"--jpeg-quality {jpeg_quality!r} must be in 1..100")
    if not 0 <= tissue_threshold <= 1:
        raise InvalidParameterError(f"--tissue-threshold {tissue_threshold!r} must be a fraction in [0, 1]")
    if thumbnail_size is not None and thumbnail_size < 64:
        raise InvalidParameterError(f"thumbnail size {thumbnail_size!r} must be at least 64 px")
    if chunk_tiles is not None and chunk_tiles < 1:
        raise InvalidParameterError(f"chunk_tiles {chunk_tiles!r} must be at least 1")
    if force_slide_mpp and slide_mpp is None:
        raise InvalidParameterError("--force-slide-mpp needs --slide-mpp (the value to use for every slide)")
    mask_dir: str | None = None
    if tissue_mask is not None:
        if is_url(tissue_mask):  # each worker process fetches the folder once (urls.fetched_copy)
            mask_dir = str(normalize(tissue_mask))
            fs, inner = filesystem(mask_dir)
            is_dir = fs.isdir(inner)
        else:
            mask_dir = str(Path(tissue_mask).expanduser().resolve())
            is_dir = Path(mask_dir).is_dir()
        if not is_dir:
            raise InvalidParameterError(f"--tissue-mask {tissue_mask}: not a folder of per-slide PNG or GeoJSON masks")
    table = read_slide_mpp_csv(slide_mpp_csv) if slide_mpp_csv is not None else {}
    out = normalize(out)
    entries = assign_slide_ids(expand_slide_inputs(inputs, exclude=[out]))
    config = TileConfig(
        store=str(out),
        spec=spec,
        tissue_threshold=float(tissue_threshold),
        codec=None if coords_only else codec,
        jpeg_quality=int(jpeg_quality),
        backend=backend,
        slide_mpp=slide_mpp,
        thumbnail_size=thumbnail_size,
        overwrite=overwrite,
        chunk_tiles=chunk_tiles,
        force_slide_mpp=force_slide_mpp,
        slide_mpp_table=tuple(sorted(table.items())),
        tissue_mask_dir=mask_dir,
    )
    if table:
        known = {e.slide_id for e in entries} | {str(normalize(e.path)) for e in entries}
        unused = sorted(set(table) - known)
        if unused:
            logger.warning("%s: %d row(s) match no slide of this run (e.g. %s)", slide_mpp_csv, len(unused), unused[0])
    notify = progress or (lambda event: None)
    report = TileReport(store=out)
    with StoreLock(out):
        root = create_patch_store(out)
        todo, skipped = _check_existing(root, entries, config)
        notify(ProgressEvent("slides", len(entries)))
        book = _StatusBook(root)
        for outcome in skipped:
            report.outcomes.append(outcome)
            book.record(outcome)
            notify(ProgressEvent("slide", outcome=outcome))
        runner = get_runner(workers, scheduler, client)
        report.runner = runner.describe()
        logger.info("tiling %d slide(s) (%d already complete) on %s", len(todo), len(skipped), report.runner)
        try:
            for first in range(0, len(todo), _SLIDES_PER_ROUND):
                batch = todo[first : first + _SLIDES_PER_ROUND]
                _run_round(runner, root, config, batch, book, report, notify, qc_dir)
        finally:
            book.flush()
            runner.close()
    return report


def _run_round(
    runner: TaskRunner,
    root: zarr.Group,
    config: TileConfig,
    batch: Sequence[SlideEntry],
    book: _StatusBook,
    report: TileReport,
    notify: Callable[[ProgressEvent], None],
    qc_dir: str | Path | None,
) -> None:
    run_id = uuid.uuid4().hex
    states: dict[str, _SlideState] = {}
    jobs: list[ChunkJob] = []

    def finish(state: _SlideState) -> None:
        plan = state.plan
        if state.errors:
            outcome = SlideOutcome(plan.slide_id, plan.source, "failed", reason=state.errors[0])
        else:
            try:
                mark_slide_complete(root, plan.slide_id)
                n = 0 if plan.rowcol is None else len(plan.rowcol)
                outcome = SlideOutcome(plan.slide_id, plan.source, "ok" if n else "empty", n_tiles=n)
            except StoreError as exc:
                outcome = SlideOutcome(plan.slide_id, plan.source, "failed", reason=_reason(exc))
        if outcome.status in ("ok", "empty") and qc_dir is not None:
            _write_qc(root, plan.slide_id, qc_dir)
        if outcome.status == "empty":
            hint = (
                "check its mask file"
                if config.tissue_mask_dir is not None
                else f"try --tissue-threshold {config.tissue_threshold / 4:.2g} or 0, or --tissue-mask"
                if config.tissue_threshold > 0
                else "the slide has no tile"
            )
            logger.warning(
                "%s: no tissue found (no tile with tissue fraction >= %g); %s", plan.source, config.tissue_threshold, hint
            )
        if outcome.status == "failed":
            logger.info("%s failed: %s", outcome.source, outcome.reason)
        report.outcomes.append(outcome)
        book.record(outcome)
        notify(ProgressEvent("slide", outcome=outcome))

    items = [(config, entry) for entry in batch]
    for index, plan in runner.map_unordered(plan_slide, items, name="plan"):
        if isinstance(plan, TaskFailure):  # the task raised past its guard, or its worker died
            plan = PlanResult(batch[index].slide_id, str(batch[index].path), error=plan.error)
        state = _SlideState(plan=plan, remaining=len(plan.todo))
        if plan.mpp_note is not None:
            logger.warning("%s", plan.mpp_note)
        if plan.error is not None:
            state.errors.append(plan.error)
            finish(state)
            continue
        assert plan.grid is not None and plan.rowcol is not None
        n = len(plan.rowcol)
        notify(ProgressEvent("tiles_planned", n))
        done_tiles = n - sum(min(plan.chunk_tiles, n - i * plan.chunk_tiles) for i in plan.todo)
        if config.codec is None:
            done_tiles = n
        if done_tiles:
            notify(ProgressEvent("tiles", done_tiles))
        if not plan.todo:
            finish(state)
            continue
        states[plan.slide_id] = state
        for chunk in plan.todo:
            start, stop = chunk * plan.chunk_tiles, min((chunk + 1) * plan.chunk_tiles, n)
            parts = chunk_parts(plan.rowcol, start, stop, plan.block_size, config.spec)
            jobs.append(
                ChunkJob(
                    config=config,
                    slide_id=plan.slide_id,
                    source=plan.source,
                    backend=plan.backend,
                    grid=plan.grid,
                    index=chunk,
                    parts=tuple(parts),
                    rowcol=np.ascontiguousarray(plan.rowcol[start:stop]),
                    run_id=run_id,
                )
            )
    for i, result in runner.map_unordered(tile_chunk, jobs, name="tile"):
        job = jobs[i]
        state = states[job.slide_id]
        if isinstance(result, TaskFailure):
            state.errors.append(result.error)
        else:
            _, _, n, error = result
            if error is not None:
                state.errors.append(error)
            elif n:
                notify(ProgressEvent("tiles", n))
        state.remaining -= 1
        if state.remaining == 0:
            finish(state)


def _write_qc(root: zarr.Group, slide_id: str, qc_dir: str | Path) -> None:
    try:
        group = root[slide_id]
        if not isinstance(group, zarr.Group):
            raise StoreError(f"{slide_id} in the store is a {type(group).__name__}, not a slide group")
        save_tile_qc(PatchSlide(group, slide_id), Path(qc_dir) / f"{slide_id}.png")
    except Exception as exc:  # a QC picture must never fail the run
        logger.warning("%s: could not write the QC picture (%s)", slide_id, _reason(exc))
