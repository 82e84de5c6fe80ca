"""Read an embedding store (zarr v3, written by ``wsienc encode``) for slide-level models.

Only the layout of the store contract is assumed, so any store with that layout works, whoever wrote
it::

    embeddings.zarr/                root attrs: kind="embedding_store", slides={id: {status, reason, source}}
      <slide_id>/                   attrs: complete, grid_shape [R, Q], tile_size_l0, stride_l0, encoder, ...
        features  (N, C) float      one row per tile
        coords    (N, 2) int64      tile top-left (x, y) in level-0 pixels
        rowcol    (N, 2) int32      (row, col) of the tile in the R x Q grid
        grid      (C, R, Q) float   the same features scattered onto the grid, zeros outside tissue
        mask      (R, Q) bool       tissue cells
        thumbnail (h, w, 3) uint8   small picture of the slide

Models read ``features`` and ``rowcol`` and scatter them onto the grid themselves (bit-identical to the
stored ``grid`` by the contract): a cohort of bags stays as small as its tissue, whatever the slide size.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

from wsi_encoder.errors import StoreError
from wsi_encoder.io.urls import exists, normalize, zarr_store

logger = logging.getLogger(__name__)

STORE_KIND = "embedding_store"


@dataclass(frozen=True)
class SlideBag:
    """The tiles of one slide: features, their grid cells and the grid size.

    Attributes
    ----------
    slide_id
        Name of the slide group in the store.
    features
        ``(N, C)`` tile embeddings, stored dtype (float16 or float32).
    rowcol
        ``(N, 2)`` int grid cell (row, col) of each tile.
    grid_shape
        ``(R, Q)`` rows and columns of the slide's grid.
    """

    slide_id: str
    features: npt.NDArray[np.floating]
    rowcol: npt.NDArray[np.integer]
    grid_shape: tuple[int, int]

    @property
    def n_tiles(self) -> int:
        """Number of tissue tiles ``N``."""
        return int(self.features.shape[0])

    @property
    def mask(self) -> npt.NDArray[np.bool_]:
        """``(R, Q)`` bool, True where a tile exists."""
        mask = np.zeros(self.grid_shape, dtype=bool)
        mask[self.rowcol[:, 0], self.rowcol[:, 1]] = True
        return mask

    def grid(self, dtype: npt.DTypeLike = np.float32) -> npt.NDArray[np.floating]:
        """``(C, R, Q)`` grid of features, zeros outside tissue (the NIC compressed slide)."""
        out = np.zeros((self.features.shape[1], *self.grid_shape), dtype=dtype)
        out[:, self.rowcol[:, 0], self.rowcol[:, 1]] = self.features.T
        return out

    def to_grid(self, values: npt.ArrayLike, fill: float = np.nan) -> npt.NDArray[np.float64]:
        """Place per-tile ``values`` ``(N,)`` onto an ``(R, Q)`` map (``fill`` outside tissue)."""
        out = np.full(self.grid_shape, fill, dtype=float)
        out[self.rowcol[:, 0], self.rowcol[:, 1]] = np.asarray(values, dtype=float)
        return out

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays, in bytes."""
        return int(self.features.nbytes + self.rowcol.nbytes)


@dataclass(frozen=True)
class SlideGeometry:
    """Where the grid lies on the slide and on its thumbnail (for heatmaps).

    ``origin_l0`` is the level-0 (x, y) of grid cell (0, 0)'s top-left corner, ``stride_l0`` the level-0
    size of one grid step, ``size_l0`` the slide's level-0 (width, height) (``estimated`` when the store
    does not record it and it was inferred from the thumbnail and the grid).
    """

    origin_l0: tuple[float, float]
    stride_l0: float
    size_l0: tuple[float, float]
    estimated: bool


@dataclass
class EmbeddingStoreReader:
    """An opened embedding store: which slides are usable, and their arrays.

    Parameters
    ----------
    path
        The ``embeddings.zarr`` folder.
    cache_bytes
        Loaded slides are kept in memory up to this many bytes (least recently used are dropped).

    Raises
    ------
    StoreError
        When the folder is missing, not a zarr group, or not an embedding store.
    """

    path: Path | str
    cache_bytes: int = 2 * 1024**3
    slide_ids: tuple[str, ...] = field(init=False)
    skipped: dict[str, str] = field(init=False)
    _root: Any = field(init=False, repr=False)
    _cache: OrderedDict[str, SlideBag] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = normalize(self.path)
        if not exists(self.path):
            raise StoreError(f"{self.path}: embedding store not found (create it with `wsienc encode`)")
        try:
            self._root = zarr.open_group(zarr_store(self.path, read_only=True), mode="r")
        except Exception as exc:
            raise StoreError(f"{self.path}: not a zarr group ({type(exc).__name__}: {exc})") from exc
        kind = self._root.attrs.get("kind")
        if kind != STORE_KIND:
            raise StoreError(
                f"{self.path}: not an embedding store (root attribute kind={kind!r}, expected {STORE_KIND!r}); "
                "pass the output of `wsienc encode`"
            )
        status = dict(self._root.attrs.get("slides", {}) or {})
        present = sorted(name for name, _ in self._root.groups())
        usable, skipped = [], {}
        for slide_id, info in status.items():
            if isinstance(info, dict) and info.get("status") not in (None, "ok"):
                skipped[slide_id] = f"failed in encode: {info.get('reason') or 'no reason recorded'}"
        for slide_id in present:
            if slide_id in skipped:
                continue
            group = self._root[slide_id]
            if not group.attrs.get("complete", False):
                skipped[slide_id] = "incomplete (interrupted encode; rerun `wsienc encode` to finish it)"
                continue
            missing = [name for name in ("features", "rowcol") if name not in group]
            if missing:
                skipped[slide_id] = f"array(s) {', '.join(missing)} missing"
                continue
            if group["features"].shape[0] == 0:
                skipped[slide_id] = "no tissue tiles"
                continue
            usable.append(slide_id)
        for slide_id in status:
            if slide_id not in present and slide_id not in skipped:
                skipped[slide_id] = "listed in the store's root attributes but has no group"
        self.slide_ids = tuple(usable)
        self.skipped = dict(sorted(skipped.items()))
        self._cache = OrderedDict()
        for slide_id, reason in self.skipped.items():
            logger.warning("%s: slide %s skipped: %s", self.path, slide_id, reason)

    # ------------------------------------------------------------------ metadata
    def attrs(self, slide_id: str) -> dict[str, Any]:
        """The attributes of one slide group."""
        self._check_id(slide_id)
        return dict(self._root[slide_id].attrs)

    @property
    def embedding_dim(self) -> int:
        """Feature size ``C`` (the same for every usable slide, else :class:`StoreError`)."""
        dims = {sid: int(self._root[sid]["features"].shape[1]) for sid in self.slide_ids}
        values = set(dims.values())
        if len(values) > 1:
            raise StoreError(f"{self.path}: slides have different embedding sizes {sorted(values)}; re-encode them")
        if not values:
            raise StoreError(f"{self.path}: no complete slide in the store")
        return values.pop()

    def encoder_identity(self) -> dict[str, Any]:
        """``{name, weights_sha256}`` of the encoder that wrote the store (checked consistent across slides)."""
        seen: dict[tuple[Any, Any], list[str]] = {}
        for sid in self.slide_ids:
            enc = self._root[sid].attrs.get("encoder") or {}
            key = (enc.get("name"), enc.get("weights_sha256"))
            seen.setdefault(key, []).append(sid)
        if len(seen) > 1:
            detail = "; ".join(f"{name} ({str(sha)[:12]}): {len(ids)} slides" for (name, sha), ids in seen.items())
            raise StoreError(f"{self.path}: slides were encoded by different encoders ({detail}); re-encode them")
        (name, sha) = next(iter(seen)) if seen else (None, None)
        return {"name": name, "weights_sha256": sha}

    def source_attrs(self, slide_id: str) -> dict[str, Any]:
        """The slide's attributes over those of its patch store slide (how it was tiled; {} parts when unreadable)."""
        attrs = self.attrs(slide_id)
        return {**self._patch_store_attrs(attrs, slide_id), **attrs}

    # ------------------------------------------------------------------ arrays
    def load(self, slide_id: str) -> SlideBag:
        """Features, grid cells and grid shape of one slide (validated; cached).

        Raises
        ------
        StoreError
            When the arrays are missing or inconsistent (row counts, cells outside the grid, non-finite
            features).
        """
        cached = self._cache.get(slide_id)
        if cached is not None:
            self._cache.move_to_end(slide_id)
            return cached
        self._check_id(slide_id)
        group = self._root[slide_id]
        where = f"{self.path}/{slide_id}"
        try:
            features = np.asarray(group["features"][...])
            rowcol = np.asarray(group["rowcol"][...]).astype(np.int64)
        except KeyError as exc:
            raise StoreError(f"{where}: array {exc.args[0]!r} is missing (not a complete embedding store slide)") from exc
        shape = group.attrs.get("grid_shape")
        if shape is None and "mask" in group:
            shape = group["mask"].shape
        if shape is None or len(shape) != 2:
            raise StoreError(f"{where}: attribute grid_shape [rows, cols] is missing")
        grid_shape = (int(shape[0]), int(shape[1]))
        if features.ndim != 2 or rowcol.shape != (features.shape[0], 2):
            raise StoreError(f"{where}: features {features.shape} and rowcol {rowcol.shape} do not align (N, C) / (N, 2)")
        if features.shape[0] and (
            rowcol.min() < 0 or rowcol[:, 0].max() >= grid_shape[0] or rowcol[:, 1].max() >= grid_shape[1]
        ):
            raise StoreError(f"{where}: rowcol has cells outside the grid {grid_shape}")
        if not np.all(np.isfinite(features)):
            raise StoreError(f"{where}: features contain NaN or infinite values; re-encode the slide")
        if not np.issubdtype(features.dtype, np.floating):
            features = features.astype(np.float32)
        bag = SlideBag(slide_id, features, rowcol, grid_shape)
        self._remember(bag)
        return bag

    def thumbnail(self, slide_id: str) -> npt.NDArray[np.uint8] | None:
        """The slide's RGB thumbnail ``(h, w, 3)`` uint8, or None when the store has none."""
        self._check_id(slide_id)
        group = self._root[slide_id]
        if "thumbnail" not in group:
            return None
        return np.asarray(group["thumbnail"][...], dtype=np.uint8)

    def stored_grid(self, slide_id: str) -> npt.NDArray[np.floating]:
        """The ``(C, R, Q)`` grid array exactly as stored."""
        self._check_id(slide_id)
        return np.asarray(self._root[slide_id]["grid"][...])

    def geometry(self, slide_id: str) -> SlideGeometry | None:
        """Placement of the grid on the slide (None when the store lacks coords/stride)."""
        self._check_id(slide_id)
        group = self._root[slide_id]
        attrs = group.attrs
        stride = attrs.get("stride_l0") or attrs.get("tile_size_l0")
        if stride is None or "coords" not in group:
            return None
        stride = float(stride)
        bag = self.load(slide_id)
        coords = np.asarray(group["coords"][...], dtype=float)
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

    # ------------------------------------------------------------------ helpers
    def _patch_store_attrs(self, attrs: dict[str, Any] | Any, slide_id: str) -> dict[str, Any]:
        patch_store = attrs.get("patch_store")
        if not patch_store:
            return {}
        try:
            return dict(zarr.open_group(zarr_store(patch_store, read_only=True), mode="r")[slide_id].attrs)
        except Exception:
            logger.debug("patch store %s not readable for %s", patch_store, slide_id, exc_info=True)
            return {}

    def _check_id(self, slide_id: str) -> None:
        if slide_id not in self.slide_ids:
            why = self.skipped.get(slide_id, "no such slide")
            raise StoreError(f"{self.path}: slide {slide_id!r} is not usable: {why}")

    def _remember(self, bag: SlideBag) -> None:
        self._cache[bag.slide_id] = bag
        total = sum(b.nbytes for b in self._cache.values())
        while total > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            total -= dropped.nbytes


def _slide_size(*attr_sets: dict[str, Any] | Any) -> tuple[float, float] | None:
    for attrs in attr_sets:
        width, height = attrs.get("width"), attrs.get("height")
        if width and height:
            return (float(width), float(height))
    return None


class SlideBags(Sequence[SlideBag]):
    """A lazy sequence of slides from a store, in a fixed order (what the slide classifiers consume)."""

    def __init__(self, reader: EmbeddingStoreReader, slide_ids: Sequence[str]) -> None:
        self.reader = reader
        self.slide_ids = tuple(slide_ids)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, index: int) -> SlideBag:  # type: ignore[override]
        return self.reader.load(self.slide_ids[index])

    def __iter__(self) -> Iterator[SlideBag]:
        for sid in self.slide_ids:
            yield self.reader.load(sid)

    def subset(self, indices: npt.ArrayLike) -> SlideBags:
        """The slides at ``indices`` (positions in this sequence)."""
        return SlideBags(self.reader, [self.slide_ids[int(i)] for i in np.asarray(indices).ravel()])
