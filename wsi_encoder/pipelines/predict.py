"""``wsienc predict``: slide files -> prediction, heatmap and QuPath overlay, in one process.

For every slide the same steps as ``wsienc tile`` + ``wsienc encode`` + ``wsienc classify predict`` run
in a stream, with no store in between: the slide is opened and planned exactly as ``tile`` plans it
(:func:`wsi_encoder.tiling.plan_tiles`: thumbnail, tissue mask, grid, kept tiles in block-major order),
its tiles are read chunk by chunk with :func:`wsi_encoder.tiling.read_tiles` (one region per block) in a
background thread while the encoder embeds the previous batch
(:func:`wsi_encoder.compression.encode_tiles`), the embeddings are rounded to the dtype the training
store held (``float16`` by default, as ``wsienc encode`` writes), and the slide classifier predicts
from them. So the probabilities are those of the three-command route on a lossless (``--codec zstd``)
patch store; with the default JPEG patch store the three-command route sees JPEG-compressed tiles.

The classifier's ``model.json`` says how its training embeddings were made (``provenance``: encoder
name, folder and weights sha256; target µm/px, tile size, stride, tissue settings); these are the
defaults here, and a different encoder or tile spec is refused unless ``force``.

Outputs in ``out``: ``predictions.csv``, ``heatmaps/<slide_id>.png`` (+ ``.npy``),
``geojson/<slide_id>.geojson`` (QuPath), ``slides/<slide_id>.json`` (per-slide record: settings,
timings; a re-run skips slides whose record matches), ``run.json``; with ``keep_stores``, also
``patches.zarr`` (coords-only patch store) and ``embeddings.zarr`` (an embedding store ``classify`` reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from wsi_encoder import __version__
from wsi_encoder.errors import InvalidParameterError, WsiEncoderError
from wsi_encoder.io.files import atomic_write_csv, atomic_write_text
from wsi_encoder.io.slide_ids import SlideEntry, assign_slide_ids, expand_slide_inputs
from wsi_encoder.pipelines.predict_settings import PredictSettings, check_encoder, resolve_settings
from wsi_encoder.tiling import SlideTiling, TileSpec

if TYPE_CHECKING:
    import torch
    import zarr

    from wsi_encoder.compression import EncoderIdentity
    from wsi_encoder.io.embedding_store import EmbeddingStore
    from wsi_encoder.io.slides import SlideReader
    from wsi_encoder.models.inference import InferenceModel

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1


@dataclass
class SlidePrediction:
    """One slide's outcome: ``ok`` (predicted now), ``done`` (a matching record existed) or ``failed``."""

    slide_id: str
    source: str
    status: str
    reason: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    pred: str | None = None
    #: regression / survival models: the slide's ``prediction`` or ``risk`` (``pred`` and ``probabilities`` stay empty)
    value: float | None = None
    #: survival models: ``survival_at_<t>`` -> S(t | slide) at the horizons of the model's training run
    survival: dict[str, float] = field(default_factory=dict)
    n_tiles: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class PredictReport:
    """What :func:`predict_slides` did."""

    out: Path
    settings: PredictSettings
    classes: list[str]
    slides: list[SlidePrediction] = field(default_factory=list)
    startup: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[SlidePrediction]:
        """Slides that failed."""
        return [s for s in self.slides if s.status == "failed"]

    @property
    def predicted(self) -> list[SlidePrediction]:
        """Slides with a prediction (now or from an earlier run)."""
        return [s for s in self.slides if s.status in ("ok", "done")]


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class _Context:
    model: Any
    meta: dict[str, Any]
    classes: list[str]
    encoder: InferenceModel
    identity: EncoderIdentity
    settings: PredictSettings
    out: Path
    device: torch.device
    batch_size: int
    backend: str
    slide_mpp: float | None
    heatmaps: bool
    geojson: bool
    keep_stores: bool
    key: str
    progress: Callable[[int], None]
    #: ``classification``, or the ``regression`` / ``survival`` target of an outcome model
    target: str = "classification"
    read_threads: int = 2
    warned: set[str] = field(default_factory=set)
    #: with ``keep_stores``: the patch-store root and the embedding store, both locked for the whole run
    stores: tuple[zarr.Group, EmbeddingStore] | None = None


def _chunks(
    reader: SlideReader, plan: SlideTiling, spec: TileSpec, times: dict[str, float], threads: int
) -> Iterator[npt.NDArray[np.uint8]]:
    """Tiles of the plan, chunk by chunk and in order, read as ``wsienc tile`` reads them.

    ``threads`` chunks are read at once (JPEG decoding and resampling release the GIL; readers are
    shared by threads, as ``tile``'s threaded workers share them), a few chunks ahead of the encoder;
    the time spent reading is summed over threads into ``times['read']``.
    """
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from wsi_encoder.tiling import chunk_parts, read_tiles

    lock = threading.Lock()

    def read(bounds: tuple[int, int]) -> npt.NDArray[np.uint8]:
        t = time.perf_counter()
        start, stop = bounds
        parts = chunk_parts(plan.rowcol, start, stop, plan.block_size, spec)
        tiles = read_tiles(reader, plan.grid, plan.rowcol[start:stop], parts)
        with lock:
            times["read"] = times.get("read", 0.0) + time.perf_counter() - t
        return tiles

    ranges = iter(plan.chunk_ranges())
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsienc-read") as pool:
        pending = deque(pool.submit(read, r) for _, r in zip(range(threads + 1), ranges, strict=False))
        while pending:
            tiles = pending.popleft().result()
            nxt = next(ranges, None)
            if nxt is not None:
                pending.append(pool.submit(read, nxt))
            yield tiles


def _predict_slide(entry: SlideEntry, ctx: _Context) -> SlidePrediction:
    from wsi_encoder.compression import encode_tiles, plan_resample
    from wsi_encoder.io.slide_records import SlideBag, SlideGeometry
    from wsi_encoder.io.slides import open_slide_with_mpp
    from wsi_encoder.models.encoders.registry import resize_options
    from wsi_encoder.tiling import plan_tiles

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    settings = ctx.settings
    source = "metadata" if ctx.slide_mpp is None else "fallback"
    reader, mpp_source, _ = open_slide_with_mpp(entry.path, ctx.backend, ctx.slide_mpp, source, entry.slide_id)
    try:
        reader.validate()
        times["open"] = time.perf_counter() - t0
        t = time.perf_counter()
        plan = plan_tiles(reader, settings.spec, settings.tissue_threshold, thumbnail_size=settings.thumbnail_size)
        times["tissue"] = time.perf_counter() - t
        if plan.n_tiles == 0:
            raise InvalidParameterError(
                f"{entry.path}: no tile has at least {settings.tissue_threshold:g} tissue (tissue covers "
                f"{100 * plan.tissue_mask.fraction:.1f}% of the thumbnail); lower --tissue-threshold to predict it"
            )
        grid = plan.grid
        resize = resize_options(ctx.identity.name)
        resample = plan_resample(
            settings.spec.tile_size, grid.actual_mpp, ctx.identity.input_size, ctx.identity.input_mpp,
            crop_fraction=resize.get("crop_fraction", 1.0),
        )  # fmt: skip
        message = resample.describe()
        if message and message not in ctx.warned:  # as `wsienc encode` says it, once per run
            ctx.warned.add(message)
            logger.warning("%s (encoder %s)", message, ctx.identity.name)
        t = time.perf_counter()
        features = encode_tiles(
            ctx.encoder, _chunks(reader, plan, settings.spec, times, ctx.read_threads), n_tiles=plan.n_tiles,
            embedding_dim=ctx.identity.embedding_dim, batch_size=ctx.batch_size, out_size=resample.out_size,
            device=ctx.device, progress=ctx.progress, **resize,
        )  # fmt: skip
        times["encode"] = time.perf_counter() - t  # includes the reads it waited for
        size_l0 = (float(grid.width_l0), float(grid.height_l0))
        slide_attrs = {
            "source": str(entry.path), "backend": reader.backend, "width": grid.width_l0, "height": grid.height_l0,
            "slide_mpp": grid.slide_mpp, "actual_mpp": grid.actual_mpp, "level": grid.level,
            "mpp_source": mpp_source,
        }  # fmt: skip
    finally:
        reader.close()
    t = time.perf_counter()
    stored = features.astype(settings.dtype)  # what an embedding store of the training dtype would hold
    bag = SlideBag(entry.slide_id, stored, plan.rowcol.astype(np.int64), grid.shape)
    if not np.isfinite(stored).all():
        raise InvalidParameterError(
            f"{entry.path}: the encoder gave non-finite embeddings (NaN/inf; in {settings.dtype}: out of range?)"
        )
    if ctx.target != "classification":
        return _predict_outcome_slide(entry, ctx, plan, bag, stored, size_l0, slide_attrs, times, t0, t)
    prob = np.asarray(ctx.model.predict_proba([bag])[0], dtype=float)
    heat = ctx.model.heatmap(bag) if (ctx.heatmaps or ctx.geojson) else None
    times["classify"] = time.perf_counter() - t
    t = time.perf_counter()
    classes = ctx.classes
    probabilities = {c: float(p) for c, p in zip(classes, prob, strict=True)}
    pred = classes[int(prob.argmax())]
    files: dict[str, str] = {}
    if ctx.heatmaps and heat is not None:
        from wsi_encoder.evaluation.heatmaps import plot_slide_prediction

        geometry = SlideGeometry((0.0, 0.0), grid.stride_l0, size_l0, estimated=False)
        png = plot_slide_prediction(
            ctx.model, entry.slide_id, heat, prob, classes, ctx.out / "heatmaps", plan.thumbnail, geometry
        )
        files["heatmap"] = _relative(png, ctx.out)
    if ctx.geojson and heat is not None:
        files["geojson"] = _relative(_write_geojson(entry, ctx, plan, heat, probabilities, pred, size_l0, slide_attrs), ctx.out)
    if ctx.keep_stores:
        files["embeddings"] = _relative(_keep_stores(entry, ctx, plan, stored, slide_attrs), ctx.out)
    times["write"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    return SlidePrediction(
        entry.slide_id, str(entry.path), "ok", probabilities=probabilities, pred=pred, n_tiles=plan.n_tiles,
        seconds=seconds, timings=times, files=files,
    )  # fmt: skip


def _outcome_column(target: str) -> str:
    """The column and measurement name of a regression (``prediction``) or survival (``risk``) model's output."""
    return "risk" if target == "survival" else "prediction"


def _predict_outcome_slide(
    entry: SlideEntry, ctx: _Context, plan: SlideTiling, bag: Any, stored: npt.NDArray[Any], size_l0: tuple[float, float],
    slide_attrs: dict[str, Any], times: dict[str, float], t0: float, t: float,
) -> SlidePrediction:  # fmt: skip
    """The rest of :func:`_predict_slide` for a regression / survival model: its value, heatmap and GeoJSON.

    The heatmap is abmil's attention or gridcnn's Grad-CAM of the prediction / risk (where the features push it
    up); ``linear`` draws none. The GeoJSON's tissue annotation carries the slide's ``prediction`` / ``risk``
    measurement, each tile the heatmap value.
    """
    from wsi_encoder.io.slide_records import SlideGeometry
    from wsi_encoder.models.outcome_files import model_horizons, survival_at

    name = _outcome_column(ctx.target)
    value = float(ctx.model.predict([bag])[0])
    survival = survival_at(ctx.model, [bag], model_horizons(ctx.meta))[0]
    drawn = ctx.model.name != "linear" and (ctx.heatmaps or ctx.geojson)
    heat = ctx.model.heatmap(bag) if drawn else None
    times["classify"] = time.perf_counter() - t
    t = time.perf_counter()
    files: dict[str, str] = {}
    if ctx.heatmaps and heat is not None:
        from wsi_encoder.evaluation.heatmaps import save_heatmap

        geometry = SlideGeometry((0.0, 0.0), plan.grid.stride_l0, size_l0, estimated=False)
        files["heatmap"] = str(save_heatmap(
            ctx.out / "heatmaps", entry.slide_id, heat, plan.thumbnail, geometry,
            title=f"{entry.slide_id}: {name} = {value:.3f}", label=f"{ctx.model.name}: {ctx.model.heatmap_kind}",
        ))  # fmt: skip
    if ctx.geojson and heat is not None:
        from wsi_encoder.io.geojson import write_feature_collection
        from wsi_encoder.overlays import slide_features

        rows, cols = plan.rowcol[:, 0], plan.rowcol[:, 1]
        features = slide_features(
            plan.grid.boxes_l0(plan.rowcol), np.asarray(heat, dtype=float)[rows, cols], size_l0,
            score_name=str(ctx.model.heatmap_kind), signed=False,
            tile_measurements={"tissue fraction": plan.tissue, "grid row": rows, "grid col": cols},
            tissue_mask=plan.tissue_mask.mask, tissue_measurements={name: value, **survival},
            tissue_name=f"tissue: {name} {value:.3f}",
        )  # fmt: skip
        properties = {
            "slide_id": entry.slide_id, **slide_attrs,
            "coordinates": "level-0 pixels, origin at the top-left corner of the full-resolution image",
            "prediction": {"target": ctx.target, name: value},
            "model": {"folder": str(ctx.meta.get("_folder")), "name": ctx.model.name, "target": ctx.target,
                      "heatmap_kind": ctx.model.heatmap_kind},
            "encoder": {"name": ctx.identity.name, "spec": ctx.identity.spec, "weights_sha256": ctx.identity.weights_sha256},
            "tiling": ctx.settings.to_json(), "n_tiles": plan.n_tiles, "wsi_encoder_version": __version__,
        }  # fmt: skip
        path = write_feature_collection(ctx.out / "geojson" / f"{entry.slide_id}.geojson", features, properties)
        files["geojson"] = str(path)
    if ctx.keep_stores:
        files["embeddings"] = str(_keep_stores(entry, ctx, plan, stored, slide_attrs))
    times["write"] = time.perf_counter() - t
    return SlidePrediction(
        entry.slide_id, str(entry.path), "ok", value=value, survival=survival, n_tiles=plan.n_tiles,
        seconds=time.perf_counter() - t0, timings=times, files=files,
    )  # fmt: skip


def _write_geojson(
    entry: SlideEntry, ctx: _Context, plan: SlideTiling, heat: npt.NDArray[np.floating], probabilities: dict[str, float],
    pred: str, size_l0: tuple[float, float], slide_attrs: dict[str, Any],
) -> Path:  # fmt: skip
    from wsi_encoder.io.geojson import write_feature_collection
    from wsi_encoder.overlays import slide_features

    rows, cols = plan.rowcol[:, 0], plan.rowcol[:, 1]
    scores = np.asarray(heat, dtype=float)[rows, cols]
    kind = str(ctx.model.heatmap_kind)
    binary = len(ctx.classes) == 2
    tissue_measurements = {f"P({c})": p for c, p in probabilities.items()}
    features = slide_features(
        plan.grid.boxes_l0(plan.rowcol), scores, size_l0, score_name=kind, signed=bool(ctx.model.heatmap_signed),
        tile_measurements={"tissue fraction": plan.tissue, "grid row": rows, "grid col": cols},
        tissue_mask=plan.tissue_mask.mask, tissue_measurements=tissue_measurements,
        tissue_name=f"tissue: {pred} " + (f"(P({ctx.classes[1]}) = {probabilities[ctx.classes[1]]:.3f})" if binary
                                         else f"(p = {probabilities[pred]:.3f})"),
    )  # fmt: skip
    properties = {
        "slide_id": entry.slide_id,
        **slide_attrs,
        "coordinates": "level-0 pixels, origin at the top-left corner of the full-resolution image",
        "prediction": {"pred": pred, "probabilities": probabilities,
                       "prob": probabilities[ctx.classes[1]] if binary else probabilities[pred]},
        "model": {"folder": str(ctx.meta.get("_folder")), "name": ctx.model.name, "classes": ctx.classes,
                  "heatmap_kind": kind},
        "encoder": {"name": ctx.identity.name, "spec": ctx.identity.spec, "weights_sha256": ctx.identity.weights_sha256},
        "tiling": ctx.settings.to_json(),
        "n_tiles": plan.n_tiles,
        "wsi_encoder_version": __version__,
    }  # fmt: skip
    return write_feature_collection(ctx.out / "geojson" / f"{entry.slide_id}.geojson", features, properties)


def _keep_stores(entry: SlideEntry, ctx: _Context, plan: SlideTiling, features: npt.NDArray[Any],
                 slide_attrs: dict[str, Any]) -> Path:  # fmt: skip
    """Write the slide into ``out/patches.zarr`` (coords-only) and ``out/embeddings.zarr`` (the stores' layouts).

    The patch store holds what ``wsienc tile --coords-only`` would (coords, grid, tissue, thumbnail, mask,
    attributes; no pixels); the embedding store what ``wsienc encode`` would, so ``classify`` reads it.
    """
    from wsi_encoder.compression import assemble_grid
    from wsi_encoder.io.embedding_store import SlideLayout
    from wsi_encoder.io.patch_store import create_slide_group, mark_slide_complete, update_slide_status
    from wsi_encoder.tiling import grid_attrs

    assert ctx.stores is not None, "predict_slides opens and locks the stores before the first slide"
    root, store = ctx.stores

    grid, spec, settings = plan.grid, ctx.settings.spec, ctx.settings
    coords = grid.coords_l0(plan.rowcol)
    tiling = {
        **slide_attrs, "target_mpp": spec.target_mpp, "tile_size": spec.tile_size, "stride": spec.stride_px,
        "mpp_tolerance": spec.tolerance, "tissue_threshold": settings.tissue_threshold, "codec": None,
        "jpeg_quality": None, "coords_only": True,
        "thumbnail_size": settings.thumbnail_size, **grid_attrs(grid), "tissue_method": plan.tissue_mask.method,
        "tissue_mask_threshold": plan.tissue_mask.threshold, "tissue_area_fraction": plan.tissue_mask.fraction,
        "thumbnail_downsample": list(plan.thumbnail_downsample), "n_tiles": plan.n_tiles,
        "n_edge_tiles": int(np.sum(plan.inside < 1.0)),
        "chunk_tiles": plan.chunk_tiles, "block_size": plan.block_size, "wsi_encoder_version": __version__,
    }  # fmt: skip
    patches = ctx.out / "patches.zarr"
    create_slide_group(
        root, entry.slide_id, tiling, coords=coords, grid=plan.rowcol, tissue=plan.tissue, thumbnail=plan.thumbnail,
        tissue_mask=plan.tissue_mask.mask, tile_size=spec.tile_size, chunk_tiles=plan.chunk_tiles, codec=None,
        jpeg_quality=0, inside=plan.inside,
    )  # fmt: skip
    mark_slide_complete(root, entry.slide_id)
    update_slide_status(root, {entry.slide_id: {"status": "ok", "reason": None, "source": str(entry.path)}})

    n, dim = features.shape
    layout = SlideLayout(n_tiles=n, embedding_dim=dim, grid_shape=grid.shape, dtype=settings.dtype,
                            chunk_tiles=max(1, n))  # fmt: skip
    attrs = {
        **{k: tiling[k] for k in ("source", "backend", "width", "height", "slide_mpp", "actual_mpp", "level",
                                  "target_mpp", "tile_size", "stride", "tile_size_l0", "stride_l0", "resampled",
                                  "coords_only", "mpp_tolerance", "tissue_threshold", "tissue_method",
                                  "thumbnail_size", "mpp_source", "codec", "jpeg_quality", "edge")},
        "encoder": ctx.identity.to_attrs(), "embedding_dim": dim, "dtype": settings.dtype, "n_tiles": n,
        "grid_shape": list(grid.shape), "patch_store": str(patches), "wsi_encoder_version": __version__,
    }  # fmt: skip
    store.delete_slide(entry.slide_id)
    store.prepare_slide(entry.slide_id, layout, coords=coords, rowcol=plan.rowcol, thumbnail=plan.thumbnail,
                        attrs=attrs)  # fmt: skip
    if n:
        store.write_features_chunk(entry.slide_id, layout, 0, features)
    values, mask = assemble_grid(features, plan.rowcol, grid.shape, dtype=settings.dtype)
    store.write_grid_band(entry.slide_id, 0, values, mask)
    store.mark_complete(entry.slide_id)
    store.update_status({entry.slide_id: {"status": "ok", "reason": None, "source": str(entry.path)}})
    return Path(str(store.path))


# ---------------------------------------------------------------------------------------------- records
def _relative(path: str | Path, out: Path) -> str:
    """``path`` as recorded in a slide record: relative to the output folder ``out`` when inside it."""
    try:
        return str(Path(path).relative_to(out))
    except ValueError:
        return str(path)


def _record_path(out: Path, slide_id: str) -> Path:
    return out / "slides" / f"{slide_id}.json"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _load_record(out: Path, entry: SlideEntry, key: str, want: Iterable[str]) -> SlidePrediction | None:
    path = _record_path(out, entry.slide_id)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key or record.get("source") != str(entry.path) or record.get("status") != "ok":
        return None
    files = record.get("files") or {}
    if any(name not in files or not (out / files[name]).exists() for name in want):
        return None
    fields_ = {k: record[k] for k in ("probabilities", "pred", "value", "survival", "n_tiles", "seconds", "timings", "files")
               if k in record}
    return SlidePrediction(entry.slide_id, str(entry.path), "done", **fields_)


def _run_key(model_sha: str | None, settings: PredictSettings, identity: EncoderIdentity, slide_mpp: float | None, backend: str) -> str:
    parts = {"model": model_sha, "settings": settings.to_json(), "encoder": identity.weights_sha256,
             "slide_mpp": slide_mpp, "backend": backend}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write_csv(path: Path, classes: list[str], slides: list[SlidePrediction], target: str = "classification") -> None:
    if target != "classification":
        done = [s for s in slides if s.value is not None]
        at = list(done[0].survival) if done else []  # survival_at_<t> columns: one model, the same horizons
        rows_ = [[s.slide_id, f"{s.value:.6g}", *[f"{s.survival.get(k, float('nan')):.6g}" for k in at], s.n_tiles,
                  f"{s.seconds:.2f}"] for s in done]
        atomic_write_csv(path, rows_, ["slide_id", _outcome_column(target), *at, "n_tiles", "seconds"])
        return
    multi = len(classes) > 2
    header = ["slide_id", "prob", "pred", "n_tiles", "seconds"] + ([f"prob_{c}" for c in classes] if multi else [])
    rows: list[list[Any]] = []
    for s in slides:
        if s.pred is None:
            continue
        prob = s.probabilities[classes[1]] if not multi else s.probabilities[s.pred]
        row: list[Any] = [s.slide_id, f"{prob:.6f}", s.pred, s.n_tiles, f"{s.seconds:.2f}"]
        if multi:
            row += [f"{s.probabilities[c]:.6f}" for c in classes]
        rows.append(row)
    atomic_write_csv(path, rows, header)


# ---------------------------------------------------------------------------------------------- the job
def predict_slides(
    inputs: Iterable[str | Path],
    model_dir: str | Path,
    out: str | Path,
    *,
    encoder: str | None = None,
    weights: str | Path | None = None,
    mpp: float | None = None,
    tile_size: int | None = None,
    stride: int | None = None,
    mpp_tolerance: float | None = None,
    tissue_threshold: float | None = None,
    thumbnail_size: int | None = None,
    force: bool = False,
    keep_stores: bool = False,
    heatmaps: bool = True,
    geojson: bool = True,
    slide_mpp: float | None = None,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int = 64,
    threads: int | None = None,
    read_threads: int | None = None,
    overwrite: bool = False,
    on_slide: Callable[[SlidePrediction], None] | None = None,
    progress: Callable[[int], None] | None = None,
    model_source: str | None = None,
) -> PredictReport:
    """Predict slide files with a ``classify train`` model, streaming tiles -> encoder -> classifier.

    Parameters
    ----------
    inputs
        Slide files and/or folders searched recursively for slides.
    model_dir
        The ``--out`` folder of ``wsienc classify train``.
    out
        Output folder (created; a re-run skips slides already predicted with the same settings).
    encoder, weights
        Encoder checkpoint folder or registered name, and local weights for a name (default: the model's
        provenance). A different encoder is refused unless ``force``.
    mpp, tile_size, stride, mpp_tolerance, tissue_threshold, thumbnail_size
        Tile spec (default: the model's provenance; required for models without one). A value that
        differs from the provenance is refused unless ``force``.
    force
        Predict even when the encoder or tile spec differs from the model's provenance (recorded in the outputs).
    keep_stores
        Also write ``out/patches.zarr`` (coords-only) and ``out/embeddings.zarr`` (the stores' layouts).
    heatmaps, geojson
        Write ``out/heatmaps/<slide_id>.png`` (+ ``.npy``) and ``out/geojson/<slide_id>.geojson``.
    slide_mpp, backend
        Level-0 µm/px override and slide reader (as for ``wsienc tile``).
    device, batch_size, threads
        Where the encoder and classifier run, tiles per forward pass, torch CPU threads (None: torch's default).
    read_threads
        Threads reading (decoding, resampling) chunks of tiles ahead of the encoder (None: the CPU count, at most 4).
    overwrite
        Predict every slide again, ignoring earlier records in ``out``.
    on_slide
        Called after each slide (progress, printing).
    progress
        Called with the number of tiles of each encoded batch.
    model_source
        What to record as the model (default ``model_dir`` as given): the URL a local copy was fetched from.

    Output files are recorded relative to ``out``, and the model and weights as given (paths or URLs,
    not absolutised), so an output folder moved or staged elsewhere stays valid.

    Returns
    -------
    PredictReport
        Per-slide outcomes (``failed`` slides with their reason), settings, start-up timings.
    """
    t0 = time.perf_counter()
    out_dir = Path(out).expanduser().resolve()
    entries = assign_slide_ids(expand_slide_inputs(inputs, exclude=[out_dir]))
    if batch_size < 1:
        raise InvalidParameterError(f"--batch-size {batch_size!r} must be at least 1")
    if read_threads is not None and read_threads < 1:
        raise InvalidParameterError(f"--read-threads {read_threads!r} must be at least 1")
    n_read = read_threads or max(1, min(4, os.cpu_count() or 1))
    startup: dict[str, float] = {}
    t = time.perf_counter()
    import torch  # noqa: F401 - timed on its own: the largest fixed cost

    from wsi_encoder.compression import load_encoder_cached
    from wsi_encoder.devices import resolve_device
    from wsi_encoder.models.classifier_files import load_model
    from wsi_encoder.models.outcome_files import is_outcome_model, load_outcome_model
    from wsi_encoder.models.slide_classifiers import torch_threads

    startup["imports"] = time.perf_counter() - t
    t = time.perf_counter()
    outcome = is_outcome_model(model_dir)
    model, meta = load_outcome_model(model_dir, device) if outcome else load_model(model_dir, device)
    target = str(meta["target"]) if outcome else "classification"
    meta["_folder"] = str(model_dir if model_source is None else model_source)  # as given, not absolutised
    settings = resolve_settings(
        meta, model_dir, encoder=encoder, weights=weights, mpp=mpp, tile_size=tile_size, stride=stride,
        mpp_tolerance=mpp_tolerance, tissue_threshold=tissue_threshold, thumbnail_size=thumbnail_size, force=force,
    )  # fmt: skip
    startup["classifier"] = time.perf_counter() - t
    t = time.perf_counter()
    module, identity = load_encoder_cached(settings.encoder, settings.weights, device)
    encoder_problems = check_encoder(identity, meta, model_dir, model.in_dim, force)
    startup["encoder"] = time.perf_counter() - t
    forced = (*settings.forced, *encoder_problems)
    if forced:
        logger.warning("predicting despite: %s (--force)", "; ".join(forced))
        settings = PredictSettings(**{**asdict(settings), "spec": settings.spec, "forced": forced})
    classes = [str(c) for c in meta.get("classes") or []]
    report = PredictReport(out=out_dir, settings=settings, classes=classes, startup=startup)
    drawn = not (outcome and model.name == "linear")  # a linear regression / survival model draws no heatmap
    want = [name for name, on in (("heatmap", heatmaps and drawn), ("geojson", geojson and drawn),
                                  ("embeddings", keep_stores)) if on]  # fmt: skip
    ctx = _Context(
        model=model, meta=meta, classes=classes, encoder=module, identity=identity, settings=settings, out=out_dir,
        device=resolve_device(device), batch_size=batch_size, backend=backend, slide_mpp=slide_mpp, heatmaps=heatmaps,
        geojson=geojson, keep_stores=keep_stores,
        key=_run_key(meta.get("weights_sha256"), settings, identity, slide_mpp, backend),
        progress=progress or (lambda n: None), read_threads=n_read, target=target,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    startup["total"] = time.perf_counter() - t0
    with contextlib.ExitStack() as held, torch_threads(threads):
        if keep_stores:  # both stores locked before the first slide: a second run is refused at once
            from wsi_encoder.io.embedding_store import EmbeddingStore
            from wsi_encoder.io.patch_store import create_patch_store
            from wsi_encoder.io.store_lock import StoreLock

            held.enter_context(StoreLock(out_dir / "patches.zarr"))
            store = held.enter_context(EmbeddingStore.writer(out_dir / "embeddings.zarr"))
            ctx.stores = (create_patch_store(out_dir / "patches.zarr"), store)
        for entry in entries:
            previous = None if overwrite else _load_record(out_dir, entry, ctx.key, want)
            if previous is not None:
                result = previous
            else:
                result = _guarded(entry, ctx)
                _write_json(_record_path(out_dir, entry.slide_id), {"format": RECORD_FORMAT, "key": ctx.key,
                                                                     **asdict(result)})  # fmt: skip
            report.slides.append(result)
            if on_slide is not None:
                on_slide(result)
    report.files["predictions"] = out_dir / "predictions.csv"
    _write_csv(report.files["predictions"], classes, report.slides, target)
    report.files["run"] = out_dir / "run.json"
    _write_json(report.files["run"], {
        "model": meta["_folder"], "model_name": model.name, "target": target, "classes": classes,
        "settings": settings.to_json(),
        "encoder": identity.to_attrs(), "device": str(ctx.device), "startup_seconds": startup,
        "slides": [asdict(s) for s in report.slides], "wsi_encoder_version": __version__,
    })  # fmt: skip
    return report


def _guarded(entry: SlideEntry, ctx: _Context) -> SlidePrediction:
    """Predict one slide; any error becomes a ``failed`` outcome with a one-line reason (the run goes on)."""
    t = time.perf_counter()
    try:
        return _predict_slide(entry, ctx)
    except (WsiEncoderError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    except Exception as exc:  # a slide boundary: report and go on
        logger.debug("predicting %s failed", entry.path, exc_info=True)
        reason = f"{type(exc).__name__}: {exc}"
    if str(entry.path) not in reason:
        reason = f"{entry.path}: {reason}"
    logger.info("%s failed: %s", entry.slide_id, reason)
    return SlidePrediction(entry.slide_id, str(entry.path), "failed", reason=reason, seconds=time.perf_counter() - t)
