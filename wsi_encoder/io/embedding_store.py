"""The embedding store: one zarr v3 group per slide holding its tile embeddings and NIC grid.

Layout (the contract every command relies on; plain ``zarr.open_group`` reads it)::

    embeddings.zarr/                       root attrs: kind="embedding_store", slides={id: {status, reason, source}}
      <slide_id>/
        features        (N, C) float16|float32   one row per tile, aligned with the patch store's coords
        coords          (N, 2) int64             level-0 top-left (x, y), copied from the patch store
        rowcol          (N, 2) int32             (row, col) of each tile in the grid (the patch store's grid)
        grid            (C, R, Q) float          the compressed slide; zeros outside tissue
        mask            (R, Q) bool              True where a tile was encoded
        thumbnail       (h, w, 3) uint8          copied from the patch store (when it has one)
        encoded_chunks  (K,) bool                bookkeeping: row chunk k of ``features`` is written
        attrs: encoder {name, config, weights_sha256}, embedding_dim, patch_store, source, target_mpp,
               tile_size, tile_size_l0, stride_l0, grid_shape, dtype, n_tiles, complete, ...

:class:`EmbeddingStore` is the one way to open, list, read and write such a store; ``encode``, ``classify``,
``signatures``, ``predict --keep-stores`` and the previews all go through it, so they share one set of rules:

* The root must say ``kind="embedding_store"`` (a store made elsewhere to this layout sets that attribute);
  anything else is refused with one :class:`~wsi_encoder.errors.StoreError` line naming the store.
* A slide is *usable* when its group exists, its ``complete`` attribute is true (absent counts as false),
  the root does not record it as ``failed``, and it has a two-dimensional ``features`` with at least one row
  (a slide vector, :meth:`EmbeddingStore.mean`, needs nothing else; :meth:`EmbeddingStore.load` also needs
  ``rowcol`` and the grid shape, and says so when they are missing). Listing skips every other slide with one warning naming it and the reason
  (:attr:`EmbeddingStore.skipped`), so one interrupted or failed slide does not stop a cohort; asking for a
  skipped slide by name raises :class:`~wsi_encoder.errors.StoreError` with that reason.
* One store holds one encoder's embeddings: :meth:`EmbeddingStore.encoder_identity` and
  :attr:`EmbeddingStore.embedding_dim` refuse a store whose usable slides disagree.
* The arrays of a complete slide without tiles can be read (:meth:`EmbeddingStore.read`: empty features,
  an all-False mask), but it is not listed among the usable slides that models and signatures consume.
* Reading a slide checks its arrays (row counts, cells inside the grid, finite features) and raises one
  line naming the store and slide when they are broken.

Writing: ``features`` is chunked by ``chunk_tiles`` rows so that independent tasks (threads, processes or
dask workers) write disjoint chunks; zarr's local store writes every chunk atomically (temp file then
rename), so a killed run leaves each chunk either whole or absent and ``encoded_chunks`` records which are
whole. A slide is ``complete`` only once its grid is written. The process driving a write holds the
store's writer lock (:meth:`EmbeddingStore.writer`, a ``<store>.lock`` beside it); the tasks it runs open the
store with ``mode="r+"`` under that lock.

This module only stores and reads arrays; running encoders and building grids lives in
:mod:`wsi_encoder.compression` and :mod:`wsi_encoder.pipelines.encode_store`.
"""

from __future__ import annotations

import builtins
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import zarr

from wsi_encoder.errors import StoreError
from wsi_encoder.io.slide_records import (
    DIHEDRAL_VIEWS,
    EncodedSlide,
    SlideBag,
    SlideGeometry,
    SlideLayout,
)
from wsi_encoder.io.store_lock import StoreLock
from wsi_encoder.io.urls import check_bucket, describe_error, exists, is_file, is_url, normalize, zarr_store

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_DTYPES",
    "GRID_CHUNK",
    "KIND",
    "EmbeddingStore",
    "EncodedSlide",
    "SlideBag",
    "SlideBags",
    "SlideGeometry",
    "SlideLayout",
    "read_slide",
]

KIND = "embedding_store"
FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32")
#: Spatial chunk edge of the ``grid`` and ``mask`` arrays (grid cells).
GRID_CHUNK = 64
#: Rows of ``features`` read at once when a whole slide is reduced (mean) or streamed.
_BLOCK_ROWS = 65536

FloatArray = npt.NDArray[np.floating[Any]]
Mode = Literal["r", "r+", "a"]


# ---------------------------------------------------------------------------------------------- the store
class EmbeddingStore:
    """An opened embedding store: its slides, their arrays, and the writes ``wsienc encode`` makes.

    Open with :meth:`open` (reading, or ``mode="r+"`` for tasks writing under a lock their driver holds)
    or :meth:`writer` (creating or resuming, under the store's writer lock). See the module docstring for
    the rules every reader shares.

    Attributes
    ----------
    path
        The store's path or URL (normalised).
    root
        The root :class:`zarr.Group`.
    """

    def __init__(self, root: zarr.Group, path: str | Path, *, cache_bytes: int = 2 * 1024**3) -> None:
        self.root = root
        self.path = path
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, SlideBag] = OrderedDict()
        self._listing: tuple[tuple[str, ...], dict[str, str]] | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, mode: Mode = "r", *, cache_bytes: int = 2 * 1024**3) -> EmbeddingStore:
        """Open the embedding store at ``path`` (a folder or URL).

        Parameters
        ----------
        path
            The ``embeddings.zarr`` folder (or ``s3://...`` URL).
        mode
            ``r`` read only; ``r+`` write into an existing store (tasks under the driver's lock);
            ``a`` create it when absent or empty (use :meth:`writer`, which also takes the lock).
        cache_bytes
            Slides loaded with :meth:`load` are kept in memory up to this many bytes (least recently
            used dropped first).

        Raises
        ------
        StoreError
            The path is missing (unless ``mode="a"``), is a file, is not a zarr v3 group, or is not an
            embedding store (another kind, or no ``kind`` attribute).
        """
        where = normalize(path)
        if mode != "r+":  # tasks (r+) open a store their driver has just checked: no extra requests per task
            if is_url(where):
                check_bucket(str(where))
            if mode == "r" and not exists(where):
                raise StoreError(f"{where}: no such embedding store (run `wsienc encode ... --out {where}` first)")
            if is_file(where):
                raise StoreError(f"{where}: is a file, not a zarr store directory; choose another --out")
            local = None if is_url(where) else Path(where)
            if local is not None and local.is_dir() and not (local / "zarr.json").exists() and any(local.iterdir()):
                raise StoreError(f"{where}: exists and is not a zarr store; choose another --out")
        try:
            root = zarr.open_group(zarr_store(where, read_only=mode == "r"), mode=mode)
        except Exception as exc:
            raise StoreError(f"{where}: not a readable zarr v3 group ({describe_error(where, exc)})") from None
        kind = root.attrs.get("kind")
        if kind is None and mode == "a" and not builtins.list(root.keys()):
            root.update_attributes({"kind": KIND, "slides": {}})
        elif kind is None:
            raise StoreError(
                f"{where}: has no root attribute kind, so it is not an embedding store written by `wsienc encode`; "
                f'a store made elsewhere to this layout needs zarr.open_group(path).attrs["kind"] = "{KIND}"'
            )
        elif kind != KIND:
            raise StoreError(f"{where}: is a {kind!r} store, not an embedding store; pass the output of `wsienc encode`")
        return cls(root, where, cache_bytes=cache_bytes)

    @classmethod
    @contextmanager
    def writer(cls, path: str | Path) -> Iterator[EmbeddingStore]:
        """Hold the store's writer lock and yield it opened for writing (created when absent).

        Raises
        ------
        StoreError
            Another run holds the lock (the line names its host, pid and start time), or :meth:`open`
            refuses the path.
        """
        with StoreLock(path):
            yield cls.open(path, mode="a")

    # ------------------------------------------------------------------ listing
    def _scan(self) -> tuple[tuple[str, ...], dict[str, str]]:
        if self._listing is not None:
            return self._listing
        usable: builtins.list[str] = []
        skipped: dict[str, str] = {}
        for slide_id in sorted(set(self.status()) | set(self.root.group_keys())):
            reason = self._why_not_usable(slide_id)
            if reason:
                skipped[slide_id] = reason
            else:
                usable.append(slide_id)
        for slide_id, reason in sorted(skipped.items()):
            logger.warning("%s: slide %s skipped: %s", self.path, slide_id, reason)
        self._listing = (tuple(usable), dict(sorted(skipped.items())))
        return self._listing

    def _unusable_because(self, slide_id: str) -> str | None:
        group = self.root[slide_id]
        if not isinstance(group, zarr.Group):
            return "not a group"
        if group.attrs.get("complete") is not True:
            return "incomplete (interrupted encode; rerun `wsienc encode` to finish it)"
        features = group.get("features")
        if not isinstance(features, zarr.Array):
            return "array 'features' missing"
        if features.ndim != 2 or features.shape[0] == 0:
            return f"no tissue tiles (features of shape {features.shape})"
        return None

    @property
    def slide_ids(self) -> tuple[str, ...]:
        """Ids of the usable slides (complete, not failed, with tiles), sorted."""
        return self._scan()[0]

    @property
    def skipped(self) -> dict[str, str]:
        """``{slide_id: reason}`` of the slides the store lists or holds that are not usable."""
        return dict(self._scan()[1])

    def list_slides(self, *, usable_only: bool = True) -> builtins.list[str]:
        """Slide ids, sorted: the usable ones (default), or every slide group (complete or not)."""
        if usable_only:
            return builtins.list(self.slide_ids)
        return sorted(self.root.group_keys())

    def status(self) -> dict[str, dict[str, Any]]:
        """The root's ``slides`` record: ``{slide_id: {"status", "reason", "source"}}``."""
        record = self.root.attrs.get("slides")
        if not isinstance(record, Mapping):
            return {}
        return {str(k): dict(v) for k, v in record.items() if isinstance(v, Mapping)}

    def is_complete(self, slide_id: str) -> bool:
        """Whether ``slide_id`` exists in the store and is marked ``complete``."""
        group = self.root.get(slide_id)
        return isinstance(group, zarr.Group) and group.attrs.get("complete") is True

    # ------------------------------------------------------------------ metadata
    def group(self, slide_id: str) -> zarr.Group:
        """One slide's :class:`zarr.Group` (whatever its state; for writers and bookkeeping)."""
        group = self.root.get(slide_id)
        if not isinstance(group, zarr.Group):
            raise StoreError(f"{self.path}: slide {slide_id!r} is not in the embedding store")
        return group

    def attrs(self, slide_id: str) -> dict[str, Any]:
        """The attributes of one complete slide."""
        return dict(self._complete_group(slide_id).attrs)

    @property
    def embedding_dim(self) -> int:
        """Feature size ``C`` (the same for every usable slide, else :class:`StoreError`)."""
        dims = {int(self.features(sid).shape[1]) for sid in self.slide_ids}
        if len(dims) > 1:
            raise StoreError(f"{self.path}: slides have different embedding sizes {sorted(dims)}; re-encode them")
        if not dims:
            raise StoreError(f"{self.path}: no complete slide in the store")
        return dims.pop()

    def encoder_identity(self) -> dict[str, Any]:
        """``{name, weights_sha256}`` of the encoder that wrote the usable slides (refused when they differ)."""
        seen: dict[tuple[Any, Any], builtins.list[str]] = {}
        for sid in self.slide_ids:
            enc = self.attrs(sid).get("encoder") or {}
            seen.setdefault((enc.get("name"), enc.get("weights_sha256")), []).append(sid)
        if len(seen) > 1:
            detail = "; ".join(f"{name} ({str(sha)[:12]}): {len(ids)} slides" for (name, sha), ids in seen.items())
            raise StoreError(
                f"{self.path}: slides were encoded by different encoders ({detail}); one store holds one encoder's "
                "embeddings: re-encode them into one store"
            )
        name, sha = next(iter(seen)) if seen else (None, None)
        return {"name": name, "weights_sha256": sha}

    def source_attrs(self, slide_id: str) -> dict[str, Any]:
        """The slide's attributes over those of its patch store slide (how it was tiled; {} parts when unreadable)."""
        attrs = self.attrs(slide_id)
        return {**self._patch_store_attrs(attrs, slide_id), **attrs}

    # ------------------------------------------------------------------ arrays
    def load(self, slide_id: str, *, dihedral: bool = False) -> SlideBag:
        """Features, grid cells and grid shape of one usable slide (validated; cached).

        ``dihedral`` also reads the ``(8, N, C)`` views of ``encode --dihedral`` into ``SlideBag.dihedral``
        (a :class:`StoreError` when the slide has none: check :meth:`has_dihedral`).

        Raises
        ------
        StoreError
            The slide is not usable, or its arrays are inconsistent (row counts, cells outside the grid,
            non-finite features).
        """
        cached = self._cache.get(slide_id)
        if cached is not None and (cached.dihedral is not None or not dihedral):
            self._cache.move_to_end(slide_id)
            return cached
        group = self._usable_group(slide_id)
        where = f"{self.path}/{slide_id}"
        features = np.asarray(_array(group, "features", self.path)[...])
        rowcol = np.asarray(_array(group, "rowcol", self.path)[...]).astype(np.int64)
        grid_shape = self._grid_shape(group, where)
        if features.ndim != 2 or rowcol.shape != (features.shape[0], 2):
            raise StoreError(f"{where}: features {features.shape} and rowcol {rowcol.shape} do not align (N, C) / (N, 2)")
        if features.shape[0] and (
            rowcol.min() < 0 or rowcol[:, 0].max() >= grid_shape[0] or rowcol[:, 1].max() >= grid_shape[1]
        ):
            raise StoreError(f"{where}: rowcol has cells outside the grid {grid_shape}")
        _check_finite(features, where)
        if not np.issubdtype(features.dtype, np.floating):
            features = features.astype(np.float32)
        views = None
        if dihedral:
            if "features_dihedral" not in group:
                raise StoreError(f"{where}: was not encoded with --dihedral (no features_dihedral); re-encode with --dihedral")
            views = np.asarray(_array(group, "features_dihedral", self.path)[...])
            if views.shape != (DIHEDRAL_VIEWS, *features.shape):
                raise StoreError(f"{where}: features_dihedral {views.shape} does not align with features {features.shape}")
            _check_finite(views, where)
        bag = SlideBag(slide_id, features, rowcol, grid_shape, views)
        self._remember(bag)
        return bag

    def read(self, slide_id: str) -> EncodedSlide:
        """Every array of one complete slide (usable, or without tiles), read into memory."""
        group = self._complete_group(slide_id)

        def get(name: str) -> npt.NDArray[Any]:
            return np.asarray(_array(group, name, self.path)[...])

        return EncodedSlide(
            slide_id=slide_id,
            features=get("features"),
            coords=get("coords").astype(np.int64),
            rowcol=get("rowcol").astype(np.int32),
            grid=get("grid"),
            mask=get("mask").astype(bool),
            thumbnail=get("thumbnail").astype(np.uint8) if "thumbnail" in group else None,
            attrs=dict(group.attrs),
        )

    def mean(self, slide_id: str) -> npt.NDArray[np.float64]:
        """The slide's pooled vector: the mean of its tile features, in float64 (read in bounded blocks).

        Raises
        ------
        StoreError
            The slide is not usable, or its features hold NaN or infinite values.
        """
        features = _array(self._usable_group(slide_id), "features", self.path)
        total = np.zeros(features.shape[1], dtype=np.float64)
        for _, block in self.iter_feature_rows(slide_id):
            total += block.astype(np.float64).sum(axis=0)
        mean: npt.NDArray[np.float64] = total / features.shape[0]
        _check_finite(mean, f"{self.path}/{slide_id}")
        return mean

    def all_dihedral(self, slide_ids: Sequence[str]) -> bool:
        """Whether every one of ``slide_ids`` holds its 8 dihedral views (and there is at least one)."""
        return bool(slide_ids) and all(self.has_dihedral(s) for s in slide_ids)

    def has_dihedral(self, slide_id: str) -> bool:
        """Whether the slide holds the 8 dihedral views of every tile (``features_dihedral``)."""
        return "features_dihedral" in self.group(slide_id)

    def dihedral_grid(self, slide_id: str, v: int) -> FloatArray:
        """``(C, R', Q')`` NIC grid of dihedral view ``v`` of one usable slide (see :meth:`SlideBag.view`)."""
        return self.load(slide_id, dihedral=True).view(v).grid()

    def features(self, slide_id: str) -> zarr.Array:
        """The ``features`` array of a slide group, unread (sampling rows, streaming; writers use it on
        incomplete slides too, readers call it for usable ones)."""
        return _array(self.group(slide_id), "features", self.path)

    def iter_feature_rows(self, slide_id: str, rows: int = _BLOCK_ROWS) -> Iterator[tuple[int, FloatArray]]:
        """Yield ``(start, features[start:start+rows])`` blocks of a complete slide, so memory stays bounded."""
        features = _array(self._complete_group(slide_id), "features", self.path)
        step = max(1, rows)
        for start in range(0, int(features.shape[0]), step):
            yield start, np.asarray(features[start : start + step])

    def rowcol(self, slide_id: str) -> npt.NDArray[np.int64]:
        """``(N, 2)`` grid cell of each tile of a usable slide."""
        return np.asarray(_array(self._complete_group(slide_id), "rowcol", self.path)[...], dtype=np.int64)

    def coords(self, slide_id: str) -> npt.NDArray[np.int64]:
        """``(N, 2)`` level-0 top-left ``(x, y)`` of each tile of a usable slide."""
        return np.asarray(_array(self._complete_group(slide_id), "coords", self.path)[...], dtype=np.int64)

    def grid_shape(self, slide_id: str) -> tuple[int, int]:
        """``(R, Q)`` of a usable slide's grid."""
        return self._grid_shape(self._complete_group(slide_id), f"{self.path}/{slide_id}")

    def thumbnail(self, slide_id: str) -> npt.NDArray[np.uint8] | None:
        """The slide's RGB thumbnail ``(h, w, 3)`` uint8, or None when the store has none."""
        group = self._complete_group(slide_id)
        if "thumbnail" not in group:
            return None
        return np.asarray(_array(group, "thumbnail", self.path)[...], dtype=np.uint8)

    def stored_grid(self, slide_id: str) -> FloatArray:
        """The ``(C, R, Q)`` grid array exactly as stored."""
        return np.asarray(_array(self._complete_group(slide_id), "grid", self.path)[...])

    def geometry(self, slide_id: str) -> SlideGeometry | None:
        """Placement of the grid on the slide (None when the store lacks coords/stride)."""
        group = self._usable_group(slide_id)
        attrs = dict(group.attrs)
        stride_value = attrs.get("stride_l0") or attrs.get("tile_size_l0")
        if not isinstance(stride_value, (int, float)) or "coords" not in group:
            return None
        stride = float(stride_value)
        bag = self.load(slide_id)
        coords = np.asarray(_array(group, "coords", self.path)[...], dtype=float)
        if coords.shape[0] == 0:
            origin = (0.0, 0.0)
        else:
            origin = (
                float(np.median(coords[:, 0] - bag.rowcol[:, 1] * stride)),
                float(np.median(coords[:, 1] - bag.rowcol[:, 0] * stride)),
            )
        size = _slide_size(attrs, self._patch_store_attrs(attrs, slide_id))
        if size is not None:
            return SlideGeometry(origin, stride, size, estimated=False)
        rows, cols = bag.grid_shape
        extent = (origin[0] + cols * stride, origin[1] + rows * stride)
        thumb = self.thumbnail(slide_id)
        if thumb is not None and thumb.shape[0] and thumb.shape[1]:
            # The thumbnail has the slide's aspect; the grid covers the slide up to one partial step.
            aspect = thumb.shape[1] / thumb.shape[0]
            width = max(extent[0], extent[1] * aspect)
            extent = (width, width / aspect)
        return SlideGeometry(origin, stride, extent, estimated=True)

    def bags(self, slide_ids: Sequence[str] | None = None, *, dihedral: bool = False) -> SlideBags:
        """A lazy sequence of :class:`SlideBag` (default: every usable slide); ``dihedral`` loads their 8 views."""
        return SlideBags(self, self.slide_ids if slide_ids is None else slide_ids, dihedral=dihedral)

    # ------------------------------------------------------------------ writing
    def update_status(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge per-slide status records into the root attrs (one writer: the process driving the run)."""
        if not records:
            return
        slides = self.status()
        for slide_id, record in records.items():
            slides[slide_id] = {"status": record["status"], "reason": record.get("reason"), "source": record.get("source")}
        self.root.attrs.update({"slides": dict(sorted(slides.items()))})
        self._listing = None

    def existing_chunk_tiles(self, slide_id: str) -> int | None:
        """Row-chunk size of an existing slide's ``features`` (so a resumed run keeps its chunking)."""
        group = self.root.get(slide_id)
        if not isinstance(group, zarr.Group):
            return None
        features = group.get("features")
        return int(features.chunks[0]) if isinstance(features, zarr.Array) else None

    def layout(self, slide_id: str) -> SlideLayout:
        """The :class:`SlideLayout` of an existing slide group (read from its arrays)."""
        group = self.group(slide_id)
        features = _array(group, "features", self.path)
        rows, cols = (int(v) for v in _array(group, "mask", self.path).shape)
        return SlideLayout(
            n_tiles=int(features.shape[0]),
            embedding_dim=int(features.shape[1]),
            grid_shape=(rows, cols),
            dtype=str(features.dtype),
            chunk_tiles=int(features.chunks[0]),
            views=DIHEDRAL_VIEWS if "features_dihedral" in group else 1,
        )

    def prepare_slide(
        self,
        slide_id: str,
        layout: SlideLayout,
        *,
        coords: npt.NDArray[np.integer[Any]],
        rowcol: npt.NDArray[np.integer[Any]],
        thumbnail: npt.NDArray[np.uint8] | None,
        attrs: Mapping[str, Any],
    ) -> builtins.list[int]:
        """Create (or reopen for resuming) one slide's group and return the row chunks still to encode.

        An existing incomplete group whose shape, dtype, chunking and encoder (name and weights hash)
        match ``layout``/``attrs`` is resumed: only its unwritten chunks are returned. Anything else
        is replaced by a fresh group. Callers skip complete slides before calling this (or delete them
        first with :meth:`delete_slide` for ``--overwrite``).

        Parameters
        ----------
        slide_id
            Group name.
        layout
            Planned array shapes.
        coords, rowcol
            ``(N, 2)`` level-0 ``(x, y)`` and grid ``(row, col)`` copied from the patch store.
        thumbnail
            The patch store's thumbnail, or None.
        attrs
            Group attributes (must hold ``encoder`` with ``name`` and ``weights_sha256``);
            ``complete`` is set to False here.
        """
        self._listing = None
        old = self.root.get(slide_id)
        if isinstance(old, zarr.Group) and _matches(old, layout, attrs.get("encoder", {})):
            pending = self.pending_chunks(slide_id)
            logger.info("%s: resuming, %d of %d chunks left", slide_id, len(pending), layout.n_chunks)
            old.update_attributes({**attrs, "complete": False})  # one metadata write (attrs.update writes per key)
            return pending
        if old is not None:
            logger.info("%s: replacing an incompatible partial encoding", slide_id)
        group = self.root.create_group(slide_id, overwrite=True)
        n, c = layout.n_tiles, layout.embedding_dim
        group.create_array(
            "features",
            shape=(n, c),
            chunks=(max(1, layout.chunk_tiles), max(1, c)),
            dtype=layout.dtype,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        if layout.views == DIHEDRAL_VIEWS:
            group.create_array(
                "features_dihedral",
                shape=(DIHEDRAL_VIEWS, n, c),
                chunks=(1, max(1, layout.chunk_tiles), max(1, c)),
                dtype=layout.dtype,
                fill_value=0,
                config={"write_empty_chunks": True},
            )
        rows_chunk = (max(1, min(n, 65536)), 2)
        group.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(n, 2), chunks=rows_chunk)
        group.create_array("rowcol", data=np.asarray(rowcol, dtype=np.int32).reshape(n, 2), chunks=rows_chunk)
        rows, cols = layout.grid_shape
        gr, gc = min(max(rows, 1), GRID_CHUNK), min(max(cols, 1), GRID_CHUNK)
        group.create_array("grid", shape=(c, rows, cols), chunks=(max(1, c), gr, gc), dtype=layout.dtype, fill_value=0)
        group.create_array("mask", shape=(rows, cols), chunks=(gr, gc), dtype=bool, fill_value=False)
        if thumbnail is not None:
            thumbnail = np.asarray(thumbnail, dtype=np.uint8)  # one chunk: it is read whole
            group.create_array("thumbnail", data=thumbnail, chunks=thumbnail.shape)
        group.create_array("encoded_chunks", shape=(layout.n_chunks,), chunks=(1,), dtype=bool, fill_value=False)
        group.update_attributes({**attrs, "complete": False})  # one metadata write (attrs.update writes per key)
        return builtins.list(range(layout.n_chunks))

    def delete_slide(self, slide_id: str) -> None:
        """Remove a slide's group (``--overwrite``)."""
        if slide_id in self.root:
            del self.root[slide_id]
        self._cache.pop(slide_id, None)
        self._listing = None

    def write_features_chunk(
        self, slide_id: str, layout: SlideLayout, k: int, features: FloatArray, dihedral: FloatArray | None = None
    ) -> None:
        """Write row chunk ``k`` of ``features`` (and of ``features_dihedral``, ``(8, n, C)``, when the layout has
        the views) and then mark it encoded (in that order, for resuming).

        Raises
        ------
        StoreError
            ``features`` has the wrong shape, or does not fit the store's dtype (float16 overflow).
        """
        group = self.group(slide_id)
        start, stop = layout.chunk_range(k)
        expected = (stop - start, layout.embedding_dim)
        if features.shape != expected:
            raise StoreError(f"{self.path}/{slide_id}: chunk {k} has features of shape {features.shape}, expected {expected}")
        if (dihedral is not None) != (layout.views == DIHEDRAL_VIEWS) or (
            dihedral is not None and dihedral.shape != (DIHEDRAL_VIEWS, *expected)
        ):
            got = None if dihedral is None else dihedral.shape
            raise StoreError(f"{self.path}/{slide_id}: chunk {k} has dihedral views {got}, the layout has {layout.views} view(s)")
        cast = self._fits(slide_id, features, layout.dtype)
        if dihedral is not None:
            _array(group, "features_dihedral", self.path)[:, start:stop] = self._fits(slide_id, dihedral, layout.dtype)
        _array(group, "features", self.path)[start:stop] = cast
        _array(group, "encoded_chunks", self.path)[k] = True

    def _fits(self, slide_id: str, values: FloatArray, dtype: str) -> FloatArray:
        cast: FloatArray = values.astype(dtype)
        if not np.isfinite(cast).all():
            peak = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else float("nan")
            raise StoreError(
                f"{self.path}/{slide_id}: embeddings do not fit {dtype} (largest magnitude {peak:.4g}, or NaN); "
                "re-run with --dtype float32 or check the encoder"
            )
        return cast

    def pending_chunks(self, slide_id: str) -> builtins.list[int]:
        """Row chunks of ``features`` not yet written."""
        done = np.asarray(_array(self.group(slide_id), "encoded_chunks", self.path)[...], dtype=bool)
        return [int(k) for k in np.flatnonzero(~done)]

    def write_grid_band(
        self, slide_id: str, row0: int, grid_band: FloatArray, mask_band: npt.NDArray[np.bool_]
    ) -> None:
        """Write grid rows ``[row0, row0 + band height)`` (all columns) of ``grid`` and ``mask``."""
        group = self.group(slide_id)
        row1 = row0 + mask_band.shape[0]
        grid = _array(group, "grid", self.path)
        grid[:, row0:row1, :] = grid_band.astype(grid.dtype)
        _array(group, "mask", self.path)[row0:row1, :] = mask_band

    def mark_complete(self, slide_id: str) -> None:
        """Set ``complete = True`` on a slide whose features and grid are all written."""
        pending = self.pending_chunks(slide_id)
        if pending:
            raise StoreError(f"{self.path}/{slide_id}: cannot mark complete, chunks {pending} are not encoded")
        self.group(slide_id).attrs.update({"complete": True})
        self._listing = None

    # ------------------------------------------------------------------ helpers
    def _why_not_usable(self, slide_id: str, *, allow_empty: bool = False) -> str | None:
        """Why a slide is not usable (None: it is), by the rules of the module docstring; reads only its group."""
        info = self.status().get(slide_id, {})
        if info.get("status") not in (None, "ok"):
            return f"failed in encode: {info.get('reason') or 'no reason recorded'}"
        if slide_id not in self.root:
            return "listed in the store's root attributes but has no group" if info else "no such slide"
        reason = self._unusable_because(slide_id)
        if allow_empty and reason is not None and reason.startswith("no tissue tiles"):
            return None
        return reason

    def _usable_group(self, slide_id: str, *, allow_empty: bool = False) -> zarr.Group:
        if self._listing is None or slide_id not in self._listing[0]:
            why = self._why_not_usable(slide_id, allow_empty=allow_empty)
            if why is not None:
                raise StoreError(f"{self.path}: slide {slide_id!r} is not usable: {why}")
        return self.group(slide_id)

    def _complete_group(self, slide_id: str) -> zarr.Group:
        """A usable slide, or a complete one without tiles (its arrays are empty but whole)."""
        return self._usable_group(slide_id, allow_empty=True)

    def _grid_shape(self, group: zarr.Group, where: str) -> tuple[int, int]:
        shape: Any = group.attrs.get("grid_shape")
        if shape is None and "mask" in group:
            shape = _array(group, "mask", self.path).shape
        if not isinstance(shape, Sequence) or len(shape) != 2:
            raise StoreError(f"{where}: attribute grid_shape [rows, cols] is missing")
        return (int(shape[0]), int(shape[1]))

    def _patch_store_attrs(self, attrs: Mapping[str, Any], slide_id: str) -> dict[str, Any]:
        patch_store = attrs.get("patch_store")
        if not patch_store:
            return {}
        try:
            group = zarr.open_group(zarr_store(patch_store, read_only=True), path=slide_id, mode="r")
            return dict(group.attrs)
        except Exception:
            logger.debug("patch store %s not readable for %s", patch_store, slide_id, exc_info=True)
            return {}

    def _remember(self, bag: SlideBag) -> None:
        self._cache[bag.slide_id] = bag
        total = sum(b.nbytes for b in self._cache.values())
        while total > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            total -= dropped.nbytes


class SlideBags(Sequence[SlideBag]):
    """A lazy sequence of slides from a store, in a fixed order (what the slide classifiers consume)."""

    def __init__(self, store: EmbeddingStore, slide_ids: Iterable[str], *, dihedral: bool = False) -> None:
        self.store = store
        self.slide_ids = tuple(slide_ids)
        self.dihedral = dihedral

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, index: int) -> SlideBag:  # type: ignore[override]
        return self.store.load(self.slide_ids[index], dihedral=self.dihedral)

    def __iter__(self) -> Iterator[SlideBag]:
        for sid in self.slide_ids:
            yield self.store.load(sid, dihedral=self.dihedral)

    def subset(self, indices: npt.ArrayLike) -> SlideBags:
        """The slides at ``indices`` (positions in this sequence)."""
        return SlideBags(self.store, [self.slide_ids[int(i)] for i in np.asarray(indices).ravel()], dihedral=self.dihedral)


def read_slide(store: str | Path, slide_id: str) -> EncodedSlide:
    """Every array of one usable slide of the store at ``store`` (``EmbeddingStore.open(store).read(slide_id)``)."""
    return EmbeddingStore.open(store).read(slide_id)


# ---------------------------------------------------------------------------------------------- internals
def _array(group: zarr.Group, name: str, store: str | Path) -> zarr.Array:
    node = group.get(name)
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{store}/{group.path}: array {name!r} is missing (not a complete embedding store slide)")
    return node


def _check_finite(values: npt.NDArray[Any], where: str) -> None:
    if not np.all(np.isfinite(values)):
        raise StoreError(f"{where}: features contain NaN or infinite values; re-encode the slide")


def _matches(group: zarr.Group, layout: SlideLayout, identity: Mapping[str, Any]) -> bool:
    features, done = group.get("features"), group.get("encoded_chunks")
    old = group.attrs.get("encoder") or {}
    views = group.get("features_dihedral")
    return (
        (views is None) == (layout.views == 1)
        and isinstance(features, zarr.Array)
        and isinstance(done, zarr.Array)
        and isinstance(old, Mapping)
        and features.shape == (layout.n_tiles, layout.embedding_dim)
        and str(features.dtype) == layout.dtype
        and features.chunks[0] == layout.chunk_tiles
        and done.shape == (layout.n_chunks,)
        and old.get("name") == identity.get("name")
        and old.get("weights_sha256") == identity.get("weights_sha256")
    )


def _slide_size(*attr_sets: Mapping[str, Any]) -> tuple[float, float] | None:
    for attrs in attr_sets:
        width, height = attrs.get("width"), attrs.get("height")
        if width and height:
            return (float(width), float(height))
    return None
