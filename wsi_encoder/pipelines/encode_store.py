"""Encode a whole patch store into an embedding store (``wsienc encode``).

Work is cut into dask tasks of ``chunk_tiles`` tiles (one row chunk of a slide's ``features``);
as soon as the last chunk of a slide is in, the driving process assembles the slide's NIC grid,
marks it ``complete`` and exports its ``.h5``. Tasks run where :mod:`wsi_encoder.pipelines.cluster`
says (as for ``wsienc tile``): by default in this process, one chunk at a time, each overlapping
tile decoding with inference and torch using every core; ``workers`` threads; a local cluster of
``workers`` processes (``scheduler="processes"``); or a running dask scheduler (``tcp://...``).
Every process loads the encoder once (:func:`wsi_encoder.compression.load_encoder_cached`), however
many tasks it runs.

Resuming and idempotence: complete slides are skipped (unless ``overwrite``), an interrupted slide
keeps the chunks it had written and only the missing ones are encoded. A slide that fails is
recorded as ``failed`` with its reason and the others finish.

Patch stores are read with plain zarr following the store contract, so stores written elsewhere
work too; coords-only stores are encoded by reading the pixels from the slide at ``source``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

from wsi_encoder import __version__
from wsi_encoder.compression import (
    MPP_TOLERANCE,
    EncoderIdentity,
    ResamplePlan,
    encode_tiles,
    grid_bands,
    iter_blocks,
    load_encoder_cached,
    plan_resample,
)
from wsi_encoder.devices import resolve_device
from wsi_encoder.errors import InvalidParameterError, StoreError, WsiEncoderError
from wsi_encoder.io.embedding_store import (
    DIHEDRAL_VIEWS,
    FEATURE_DTYPES,
    GRID_CHUNK,
    EmbeddingStore,
    SlideLayout,
)
from wsi_encoder.io.h5_export import coords_attrs, write_h5_features
from wsi_encoder.io.patch_store import open_patch_store, read_tile_rows
from wsi_encoder.io.slides import get_reader
from wsi_encoder.io.urls import is_url, normalize, zarr_store
from wsi_encoder.models.dihedral import DihedralEncoder
from wsi_encoder.models.encoders.registry import resize_options
from wsi_encoder.pipelines.cluster import LocalRunner, TaskFailure, TaskRunner, get_runner
from wsi_encoder.tiling import grid_from_attrs, read_tiles

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_TILES = 1024
#: Largest grid band built in memory when assembling a slide's grid (bytes).
_BAND_BYTES = 64 * 1024**2
#: Attributes copied from the patch store's slide group into the embedding store's.
_COPIED_ATTRS = (
    "source", "backend", "vendor", "width", "height", "slide_mpp", "objective_power", "target_mpp",
    "actual_mpp", "tile_size", "stride", "tile_size_l0", "stride_l0", "level", "resampled", "coords_only",
    "mpp_tolerance", "tissue_threshold", "tissue_method", "thumbnail_size", "mpp_source", "codec", "jpeg_quality", "edge",
)  # fmt: skip


#: What ``features_dihedral`` holds (recorded on every slide encoded with ``dihedral``).
_DIHEDRAL_ATTR = {
    "views": DIHEDRAL_VIEWS,
    "array": "features_dihedral (8, N, C)",
    "order": "v in 0..3: np.rot90(tile, v); v in 4..7: np.rot90(np.fliplr(tile), v - 4); view 0 = features",
    "grid": "the grid of view v is the cells moved the same way: EmbeddingStore.dihedral_grid(slide, v)",
}


@dataclass(frozen=True)
class EncodeOptions:
    """Everything a task needs (small and picklable: it is shipped to dask workers).

    ``torch_threads`` caps torch's intra-op threads in the process running the task (None: leave).
    """

    patch_store: str
    out: str
    encoder: str
    weights: str | None
    device: str
    batch_size: int
    dtype: str
    h5_dir: str | None
    torch_threads: int | None = None
    precision: str = "fp32"
    compile: bool = False
    #: Also encode every tile in its 8 dihedral views (``features_dihedral``).
    dihedral: bool = False
    #: This run's id: what a process opens for a slide's first chunk is reused for its others in the run.
    run_id: str = ""


@dataclass(frozen=True)
class SlideResult:
    """Outcome of one slide: ``status`` is ``ok`` (encoded now), ``done`` (already complete, skipped),
    ``failed`` (with ``reason``) or ``skipped`` (not encodable: tiling failed there)."""

    slide_id: str
    status: str
    reason: str | None = None
    n_tiles: int = 0
    source: str | None = None


@dataclass
class EncodeResult:
    """What :func:`encode_store` did."""

    out: Path | str
    slides: dict[str, SlideResult] = field(default_factory=dict)
    previews: dict[str, Path] = field(default_factory=dict)
    h5_files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[SlideResult]:
        """Slides that failed."""
        return [r for r in self.slides.values() if r.status == "failed"]

    def count(self, status: str) -> int:
        """Number of slides with ``status``."""
        return sum(r.status == status for r in self.slides.values())


@dataclass(frozen=True)
class _ChunkOutcome:
    slide_id: str
    chunk: int
    n_tiles: int
    error: str | None


# ---- reading tiles ------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, WsiEncoderError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _StoreTiles:
    """Tiles ``[a, b)`` of a slide from the patch store's ``tiles`` array."""

    def __init__(self, tiles: zarr.Array, batch_size: int) -> None:
        self._tiles = tiles
        rows = int(tiles.shards[0] if tiles.shards is not None else tiles.chunks[0])
        #: Reads are whole stored chunks (or shards), at least one batch.
        self.block = rows * max(1, -(-batch_size // rows))

    def read(self, a: int, b: int) -> npt.NDArray[np.uint8]:
        return read_tile_rows(self._tiles, a, b)


class _SlideTiles:
    """Tiles ``[a, b)`` of a coords-only slide, read from the slide file exactly as ``wsienc tile`` reads them.

    The slide's grid is rebuilt from the store's attributes and its cells read with
    :func:`wsi_encoder.tiling.read_tiles` (the one tile-reading path), so the pixels equal those a
    lossless store of the same grid holds.
    """

    def __init__(self, group: zarr.Group, batch_size: int) -> None:
        attrs: dict[str, Any] = dict(group.attrs)
        source = attrs.get("source")
        if not isinstance(source, str) or not source:
            raise StoreError(f"{group.path}: coords-only slide without a 'source' slide path to read pixels from")
        self.block = batch_size
        self._reader = get_reader(source, str(attrs.get("backend") or "auto"))
        self._grid = grid_from_attrs(attrs, self._reader)
        self._rowcol = _read_array(group, "grid").astype(np.int64).reshape(-1, 2)

    def read(self, a: int, b: int) -> npt.NDArray[np.uint8]:
        return read_tiles(self._reader, self._grid, self._rowcol[a:b])


def _tile_reader(group: zarr.Group, batch_size: int) -> _StoreTiles | _SlideTiles:
    if "tiles" in group and not group.attrs.get("coords_only", False):
        tiles = group["tiles"]
        if isinstance(tiles, zarr.Array):
            return _StoreTiles(tiles, batch_size)
    return _SlideTiles(group, batch_size)


def _plan(attrs: Mapping[str, Any], identity: EncoderIdentity) -> ResamplePlan:
    """Tiles of a slide → the encoder's input size (and its card's crop); µm/px compared within the tile spec's tolerance."""
    tolerance = attrs.get("mpp_tolerance")
    return plan_resample(
        int(attrs["tile_size"]), _tile_mpp(attrs), identity.input_size, identity.input_mpp,
        MPP_TOLERANCE if tolerance is None else float(tolerance),
        crop_fraction=resize_options(identity.name).get("crop_fraction", 1.0),
    )  # fmt: skip


def _tile_mpp(attrs: Mapping[str, Any]) -> float | None:
    value = attrs.get("actual_mpp") or attrs.get("target_mpp")
    return None if value is None else float(value)


# ---- tasks (run locally or on dask workers) ------------------------------------------------------


@dataclass(frozen=True)
class _SlideContext:
    """What every chunk of one slide needs: opened by a process for the slide's first chunk it runs."""

    store: EmbeddingStore
    layout: SlideLayout
    reader: _StoreTiles | _SlideTiles
    plan: ResamplePlan


_CONTEXTS: OrderedDict[tuple[str, str, str, str], _SlideContext] = OrderedDict()
_CONTEXTS_LOCK = threading.Lock()


def _slide_context(opts: EncodeOptions, slide_id: str, identity: EncoderIdentity) -> _SlideContext:
    """The slide's stores, layout, tile reader and resize plan, opened once per process and run: each open
    waits for zarr's event-loop thread, which queues behind the busy decoding threads for the GIL."""
    key = (opts.run_id, opts.patch_store, opts.out, slide_id)
    with _CONTEXTS_LOCK:
        if opts.run_id and key in _CONTEXTS:
            _CONTEXTS.move_to_end(key)
            return _CONTEXTS[key]
    patch_group = zarr.open_group(zarr_store(opts.patch_store, read_only=True), path=slide_id, mode="r")
    store = EmbeddingStore.open(opts.out, mode="r+")  # under the lock the driving process holds
    context = _SlideContext(
        store=store,
        layout=store.layout(slide_id),
        reader=_tile_reader(patch_group, opts.batch_size),
        plan=_plan(patch_group.attrs, identity),
    )
    if opts.run_id:
        with _CONTEXTS_LOCK:
            _CONTEXTS[key] = context
            while len(_CONTEXTS) > 8:
                _CONTEXTS.popitem(last=False)
    return context


def encode_chunk(
    opts: EncodeOptions, slide_id: str, chunk: int, progress: Callable[[int], None] | None = None
) -> _ChunkOutcome:
    """Encode row chunk ``chunk`` of a slide and write it; errors are returned, not raised."""
    try:
        if opts.torch_threads:
            import torch

            if torch.get_num_threads() != opts.torch_threads:
                torch.set_num_threads(opts.torch_threads)
        model, identity = load_encoder_cached(
            opts.encoder, opts.weights, opts.device, precision=opts.precision, compile=opts.compile
        )
        context = _slide_context(opts, slide_id, identity)
        start, stop = context.layout.chunk_range(chunk)
        reader = context.reader
        views = DIHEDRAL_VIEWS if opts.dihedral else 1
        features = encode_tiles(
            DihedralEncoder(model) if opts.dihedral else model,
            iter_blocks(reader.read, start, stop, reader.block),
            n_tiles=stop - start,
            embedding_dim=identity.embedding_dim * views,
            batch_size=opts.batch_size,
            out_size=context.plan.out_size,
            device=resolve_device(opts.device),
            progress=progress,
            **resize_options(identity.name),
        )
        dihedral = None
        if opts.dihedral:  # (n, 8 * C) view-major per tile -> (8, n, C); view 0 is the plain embedding
            dihedral = features.reshape(stop - start, views, identity.embedding_dim).transpose(1, 0, 2)
            features = np.ascontiguousarray(dihedral[0])
        context.store.write_features_chunk(slide_id, context.layout, chunk, features, dihedral)
        return _ChunkOutcome(slide_id, chunk, stop - start, None)
    except Exception as exc:  # a task boundary: the slide is reported failed, the run goes on
        logger.debug("chunk %d of %s failed", chunk, slide_id, exc_info=True)
        return _ChunkOutcome(slide_id, chunk, 0, _reason(exc))


def _read_rows(features: zarr.Array, index: npt.NDArray[np.intp]) -> npt.NDArray[np.floating[Any]]:
    if index.size == 0:
        return np.zeros((0, features.shape[1]), dtype=features.dtype)
    if index[-1] - index[0] + 1 == index.size:
        return np.asarray(features[int(index[0]) : int(index[-1]) + 1])
    return np.asarray(features.get_orthogonal_selection((index, slice(None))))


def finalize_slide(opts: EncodeOptions, slide_id: str, outcomes: Sequence[_ChunkOutcome]) -> SlideResult:
    """Assemble the grid of a slide whose chunks are encoded, mark it complete, export the .h5."""
    errors = [o.error for o in outcomes if o.error]
    source: str | None = None
    try:
        store = EmbeddingStore.open(opts.out, mode="r+")
        group = store.group(slide_id)
        source = _text(group.attrs.get("source"))
        if errors:
            return SlideResult(slide_id, "failed", errors[0], source=source)
        layout = store.layout(slide_id)
        rowcol = _read_array(group, "rowcol").astype(np.int64)
        rows, cols = layout.grid_shape
        band = max(1, _BAND_BYTES // max(1, 4 * layout.embedding_dim * max(cols, 1)))
        band = max(GRID_CHUNK, band // GRID_CHUNK * GRID_CHUNK)
        features = store.features(slide_id)
        for row0, grid, mask in grid_bands(
            rowcol, (rows, cols), lambda index: _read_rows(features, index), band_rows=band, dtype=np.float32
        ):
            store.write_grid_band(slide_id, row0, grid, mask)
        store.mark_complete(slide_id)
        if opts.h5_dir:
            export_h5(store, slide_id, opts.h5_dir)
        return SlideResult(slide_id, "ok", None, layout.n_tiles, source)
    except Exception as exc:  # a task boundary
        logger.debug("finalizing %s failed", slide_id, exc_info=True)
        return SlideResult(slide_id, "failed", _reason(exc), source=source)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def export_h5(store: EmbeddingStore, slide_id: str, h5_dir: str | Path) -> Path:
    """Write ``<h5_dir>/<slide_id>.h5`` (CLAM/TRIDENT layout) from a complete slide of an embedding store."""
    attrs = store.attrs(slide_id)
    encoder = attrs.get("encoder") or {}
    return write_h5_features(
        Path(h5_dir) / f"{slide_id}.h5",
        np.asarray(store.features(slide_id)[...]),
        store.coords(slide_id),
        {**coords_attrs(slide_id, attrs), "encoder": str(encoder.get("name")), "embedding_dim": attrs.get("embedding_dim")},
        feature_attrs={
            "encoder": str(encoder.get("name")),
            "encoder_weights_sha256": str(encoder.get("weights_sha256")),
            "embedding_store": str(store.path),
        },
    )


# ---- planning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SlidePlan:
    slide_id: str
    chunks: list[int]
    n_tiles: int
    source: str | None


def _chunk_tiles_for(patch_group: zarr.Group, requested: int) -> int:
    tiles = patch_group.get("tiles")
    if not isinstance(tiles, zarr.Array) or patch_group.attrs.get("coords_only", False):
        return requested
    rows = int(tiles.shards[0] if tiles.shards is not None else tiles.chunks[0])
    return max(rows, round(requested / rows) * rows)


def _patch_status(patch_root: zarr.Group, slide_id: str) -> dict[str, Any]:
    slides = patch_root.attrs.get("slides")
    record = slides.get(slide_id) if isinstance(slides, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else {}


def _read_array(group: zarr.Group, name: str) -> npt.NDArray[Any]:
    node = group.get(name)
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{group.store_path}: slide group without a {name!r} array")
    return np.asarray(node[...])


def _plan_slide(
    store: EmbeddingStore,
    patch_root: zarr.Group,
    slide_id: str,
    identity: EncoderIdentity,
    opts: EncodeOptions,
    chunk_tiles: int,
    overwrite: bool,
    warned: set[str],
) -> _SlidePlan | SlideResult:
    status = _patch_status(patch_root, slide_id)
    if status.get("status") == "failed":
        return SlideResult(slide_id, "skipped", f"tiling failed: {status.get('reason')}", source=status.get("source"))
    patch_group = patch_root.get(slide_id)
    if not isinstance(patch_group, zarr.Group):
        return SlideResult(slide_id, "skipped", "not a slide group")
    pattrs: dict[str, Any] = dict(patch_group.attrs)
    source = _text(pattrs.get("source"))
    if not pattrs.get("complete", False):
        return SlideResult(
            slide_id, "failed", f"the patch store's slide {slide_id!r} is incomplete; re-run `wsienc tile` to finish it", source=source
        )
    coords_array = patch_group.get("coords")
    if not isinstance(coords_array, zarr.Array):
        return SlideResult(slide_id, "failed", "the patch store's slide has no 'coords' array", source=source)
    n_patch = int(coords_array.shape[0])
    if store.is_complete(slide_id) and not overwrite:
        old: dict[str, Any] = dict(store.group(slide_id).attrs)
        old_encoder = old.get("encoder") or {}
        if opts.dihedral and "features_dihedral" not in store.group(slide_id):
            raise StoreError(
                f"{opts.out}: slide {slide_id!r} is already encoded without --dihedral; pass --overwrite to re-encode "
                "it with the 8 views or choose another --out"
            )
        if (old_encoder.get("name"), old_encoder.get("weights_sha256"), old.get("dtype"), old.get("precision", "fp32")) != (
            identity.name,
            identity.weights_sha256,
            opts.dtype,
            opts.precision,
        ):
            raise StoreError(
                f"{opts.out}: slide {slide_id!r} is already encoded with encoder {old_encoder.get('name')!r} "
                f"(weights {str(old_encoder.get('weights_sha256'))[:12]}, {old.get('dtype')}, {old.get('precision', 'fp32')}), "
                f"not with {identity.name!r} ({str(identity.weights_sha256)[:12]}, {opts.dtype}, {opts.precision}); one store holds one encoder's "
                "embeddings: pass --overwrite to re-encode or choose another --out"
            )
        n_done = int(store.features(slide_id).shape[0])
        if n_done != n_patch:
            return SlideResult(
                slide_id, "failed",
                f"encoded with {n_done} tiles but the patch store now has {n_patch} (re-tiled?); pass --overwrite to re-encode it",
                source=source,
            )  # fmt: skip
        return SlideResult(slide_id, "done", None, n_done, source)
    if overwrite:
        store.delete_slide(slide_id)
    coords = np.asarray(coords_array[...], dtype=np.int64).reshape(-1, 2)
    rowcol = _read_array(patch_group, "grid").astype(np.int64).reshape(-1, 2)
    n = n_patch
    if rowcol.shape[0] != n:
        return SlideResult(slide_id, "failed", f"coords ({n}) and grid ({rowcol.shape[0]}) differ in length", source=source)
    shape = pattrs.get("grid_shape")
    grid_shape = (
        (int(shape[0]), int(shape[1]))
        if isinstance(shape, Sequence) and len(shape) == 2
        else (int(rowcol[:, 0].max() + 1) if n else 0, int(rowcol[:, 1].max() + 1) if n else 0)
    )
    plan = _plan(pattrs, identity)
    message = plan.describe()
    if message and message not in warned:
        warned.add(message)
        logger.warning("%s (encoder %s)", message, identity.name)
    existing = store.existing_chunk_tiles(slide_id)
    layout = SlideLayout(
        n_tiles=n,
        embedding_dim=identity.embedding_dim,
        grid_shape=grid_shape,
        dtype=opts.dtype,
        chunk_tiles=existing or _chunk_tiles_for(patch_group, chunk_tiles),
        views=DIHEDRAL_VIEWS if opts.dihedral else 1,
    )
    attrs = {
        **{key: pattrs.get(key) for key in _COPIED_ATTRS},
        "encoder": identity.to_attrs(),
        "embedding_dim": identity.embedding_dim,
        "dtype": opts.dtype,
        "precision": opts.precision,
        "n_tiles": n,
        "grid_shape": list(grid_shape),
        "patch_store": str(normalize(opts.patch_store)),
        "encoder_input": {"size": plan.out_size, "mpp": plan.out_mpp, "resampled": plan.resample},
        **({"dihedral": _DIHEDRAL_ATTR} if opts.dihedral else {}),
        "wsi_encoder_version": __version__,
    }
    thumbnail = _read_array(patch_group, "thumbnail").astype(np.uint8) if "thumbnail" in patch_group else None
    try:
        chunks = store.prepare_slide(slide_id, layout, coords=coords, rowcol=rowcol, thumbnail=thumbnail, attrs=attrs)
    except WsiEncoderError as exc:
        return SlideResult(slide_id, "failed", str(exc), source=source)
    n_todo = sum(stop - start for start, stop in map(layout.chunk_range, chunks))
    return _SlidePlan(slide_id, chunks, n_todo, source)


# ---- running --------------------------------------------------------------------------------------


def _chunk_task(item: tuple[EncodeOptions, str, int]) -> _ChunkOutcome:
    """One dask task: ``item = (options, slide_id, chunk)`` (see :func:`encode_chunk`)."""
    opts, slide_id, chunk = item
    return encode_chunk(opts, slide_id, chunk)


def _run(
    runner: TaskRunner,
    opts: EncodeOptions,
    plans: Sequence[_SlidePlan],
    tick: Callable[[int], None],
    record: Callable[[SlideResult], None],
) -> None:
    """Run every chunk task on ``runner``; finish each slide (grid, complete, .h5) once its chunks are in."""
    items = [(opts, plan.slide_id, k) for plan in plans for k in plan.chunks]
    outcomes: dict[str, list[_ChunkOutcome]] = {plan.slide_id: [] for plan in plans}
    expected = {plan.slide_id: len(plan.chunks) for plan in plans}
    for plan in plans:
        if not plan.chunks:  # a slide without tiles: only its (empty) grid to write
            record(finalize_slide(opts, plan.slide_id, []))
    # In-process threads report every batch; other runners report whole chunks as they come back.
    in_process = isinstance(runner, LocalRunner)
    task = functools.partial(_chunk_task_with_progress, progress=tick) if in_process else _chunk_task
    for i, result in runner.map_unordered(task, items, name="encode"):
        _, slide_id, chunk = items[i]
        if isinstance(result, TaskFailure):
            result = _ChunkOutcome(slide_id, chunk, 0, result.error)
        elif result.error is None and not in_process:
            tick(result.n_tiles)
        done = outcomes[slide_id]
        done.append(result)
        if len(done) == expected[slide_id]:
            record(finalize_slide(opts, slide_id, done))


def _chunk_task_with_progress(item: tuple[EncodeOptions, str, int], progress: Callable[[int], None]) -> _ChunkOutcome:
    opts, slide_id, chunk = item
    return encode_chunk(opts, slide_id, chunk, progress=progress)


def encode_store(
    patch_store: str | Path,
    encoder: str | Path,
    out: str | Path,
    *,
    weights: str | Path | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    h5_dir: str | Path | None = None,
    preview_dir: str | Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    slides: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    compile: bool = False,
    dihedral: bool = False,
) -> EncodeResult:
    """Compress every slide of a patch store into an embedding grid.

    Parameters
    ----------
    patch_store
        ``patches.zarr`` written by ``wsienc tile`` (or any store with the same layout).
    encoder
        A ``wsienc train-encoder`` checkpoint directory or a registered encoder name.
    out
        The embedding store to write (created; an existing one is resumed).
    weights
        Local weights for a registered encoder name (none: fixed-seed initialisation, with a warning).
    dtype
        ``float16`` or ``float32`` for ``features`` and ``grid``.
    batch_size
        Tiles per forward pass.
    chunk_tiles
        Tiles per task and per row chunk of ``features`` (rounded to the patch store's tile chunking).
    workers
        Parallel tasks: threads of this process (default 1: one chunk at a time, torch using every
        core), or worker processes with ``scheduler="processes"``.
    scheduler
        Where tasks run (:func:`wsi_encoder.pipelines.cluster.get_runner`): None/``threads`` (this
        process), ``processes`` (a local dask cluster of ``workers`` processes, each loading the
        encoder once) or a dask scheduler address ``tcp://HOST:8786``.
    client
        An existing ``distributed.Client`` to run on (instead of ``scheduler``).
    h5_dir
        Also write ``<h5_dir>/<slide_id>.h5`` (features, coords; CLAM/TRIDENT layout).
    preview_dir
        Also write ``<preview_dir>/<slide_id>.png``: PCA-RGB grid beside the thumbnail, PCA fit on the cohort.
    overwrite
        Re-encode slides that are already complete.
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda[:i]``.
    slides
        Only these slide ids (default: every slide of the patch store).
    progress
        Called as ``progress(tiles_just_encoded, total_tiles_to_encode)``.
    precision
        ``fp32``, ``bf16`` (CUDA, or recent CPUs) or ``fp16`` (CUDA): autocast of the forward pass.
    compile
        ``torch.compile`` the encoder (each worker process compiles once).
    dihedral
        Also encode every tile in its 8 dihedral views into ``features_dihedral`` ``(8, N, C)`` (rotation-true
        compression as the NIC authors do it; 8× the encoding time, 9× the feature storage).

    Returns
    -------
    EncodeResult
        Per-slide outcomes; slides that failed are listed in ``result.failed``.

    Raises
    ------
    StoreError, InvalidParameterError, CheckpointError
        When the inputs as a whole are unusable (missing stores, unknown encoder, bad options).
    """
    if dtype not in FEATURE_DTYPES:
        raise InvalidParameterError(f"--dtype {dtype!r}: choose one of {', '.join(FEATURE_DTYPES)}")
    if batch_size < 1 or chunk_tiles < 1:
        raise InvalidParameterError(f"batch size {batch_size!r} and chunk tiles {chunk_tiles!r} must be at least 1")
    if workers is not None and workers < 1:
        raise InvalidParameterError(f"--workers {workers!r} must be at least 1")
    from wsi_encoder.models.inference import check_precision

    check_precision(precision, resolve_device(device))
    patch_root = open_patch_store(patch_store).root
    local = client is None and scheduler in (None, "", "threads", "synchronous")
    weights_path = None if weights is None else str(weights) if is_url(weights) else str(Path(weights).resolve())
    # The tasks of a local run reuse this very model (same cache key); elsewhere only its identity is needed here.
    _, identity = load_encoder_cached(
        str(encoder), weights_path, device if local else "cpu", precision=precision, compile=compile
    )
    if any(folder is not None and is_url(folder) for folder in (h5_dir, preview_dir)):
        raise InvalidParameterError("--h5-dir and --preview-dir are written to local folders; give local paths")
    with EmbeddingStore.writer(out) as store:  # one writer per embedding store (a lock file or object beside it)
        n_parallel = max(1, workers or (1 if local else os.cpu_count() or 1))
        remote = client is not None or (scheduler not in (None, "", "threads", "synchronous", "processes"))
        opts = EncodeOptions(
            patch_store=str(normalize(patch_store)),
            out=str(normalize(out)),
            encoder=str(encoder),
            weights=weights_path,
            device=device,
            batch_size=batch_size,
            dtype=dtype,
            h5_dir=None if h5_dir is None else str(Path(h5_dir).resolve()),
            # Share the local cores between parallel tasks; a remote cluster sizes its workers itself.
            torch_threads=None if remote or n_parallel == 1 else max(1, (os.cpu_count() or 1) // n_parallel),
            precision=precision,
            compile=compile,
            dihedral=dihedral,
            run_id=uuid.uuid4().hex,
        )
        listed = patch_root.attrs.get("slides")
        listed_ids = set(listed) if isinstance(listed, Mapping) else set()
        available = sorted(set(patch_root.group_keys()) | listed_ids)
        wanted = available if slides is None else list(slides)
        result = EncodeResult(out=normalize(out))
        plans: list[_SlidePlan] = []
        warned: set[str] = set()
        for slide_id in wanted:
            if slide_id not in patch_root and slide_id not in listed_ids:
                result.slides[slide_id] = SlideResult(slide_id, "failed", f"not in the patch store {patch_store}")
                continue
            if slide_id not in patch_root:
                planned: _SlidePlan | SlideResult = _plan_slide_missing(patch_root, slide_id)
            else:
                planned = _plan_slide(store, patch_root, slide_id, identity, opts, chunk_tiles, overwrite, warned)
            if isinstance(planned, SlideResult):
                result.slides[slide_id] = planned
            else:
                plans.append(planned)
        store.update_status({r.slide_id: _status(r) for r in result.slides.values() if r.status in ("failed", "done")})

        total = sum(p.n_tiles for p in plans)
        tick = (lambda n: progress(n, total)) if progress is not None else (lambda n: None)

        def record(slide: SlideResult) -> None:
            result.slides[slide.slide_id] = slide
            store.update_status({slide.slide_id: _status(slide)})
            if slide.status == "failed":
                logger.error("slide %s failed: %s", slide.slide_id, slide.reason)

        if plans:
            with get_runner(n_parallel if local else workers, scheduler, client) as runner:
                logger.info("encoding %d tiles of %d slides on %s", total, len(plans), runner.describe())
                _run(runner, opts, plans, tick, record)
        if h5_dir is not None:
            for slide_id, slide in result.slides.items():
                path = Path(h5_dir) / f"{slide_id}.h5"
                if slide.status == "done" and not path.exists():
                    export_h5(store, slide_id, h5_dir)
                if slide.status in ("ok", "done"):
                    result.h5_files[slide_id] = path
        if preview_dir is not None:
            from wsi_encoder.evaluation.embedding_previews import write_previews

            result.previews = write_previews(out, preview_dir)
        result.slides = dict(sorted(result.slides.items()))
        return result


def _plan_slide_missing(patch_root: zarr.Group, slide_id: str) -> SlideResult:
    status = _patch_status(patch_root, slide_id)
    if status.get("status") == "failed":
        return SlideResult(slide_id, "skipped", f"tiling failed: {status.get('reason')}", source=status.get("source"))
    return SlideResult(slide_id, "failed", "listed in the patch store but has no group; re-run `wsienc tile`", source=status.get("source"))


def _status(slide: SlideResult) -> dict[str, Any]:
    return {"status": "failed" if slide.status == "failed" else "ok", "reason": slide.reason, "source": slide.source}
