"""The embedding store: one zarr v3 group per slide holding its tile embeddings and NIC grid.

Layout (the contract every command relies on; plain ``zarr.open_group`` reads it)::

    embeddings.zarr/                       root attrs: kind="embedding_store", slides={id: status}
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

``features`` is chunked by ``chunk_tiles`` rows so that independent tasks (threads, processes or
dask workers) write disjoint chunks; zarr's local store writes every chunk atomically (temp file
then rename), so a killed run leaves each chunk either whole or absent and ``encoded_chunks``
records which are whole. A slide is ``complete`` only once its grid is written.

This module only stores and reads arrays; running encoders and building grids lives in
:mod:`wsi_encoder.compression` and :mod:`wsi_encoder.pipelines.encode_store`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

from wsi_encoder.errors import StoreError
from wsi_encoder.io.urls import check_bucket, describe_error, exists, is_file, is_url, normalize, zarr_store

logger = logging.getLogger(__name__)

KIND = "embedding_store"
FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32")
#: Spatial chunk edge of the ``grid`` and ``mask`` arrays (grid cells).
GRID_CHUNK = 64


@dataclass(frozen=True)
class EncodedSlide:
    """One slide of an embedding store, read into memory.

    Attributes
    ----------
    slide_id
        The slide's group name.
    features
        ``(N, C)`` embeddings, one row per tile.
    coords
        ``(N, 2)`` level-0 top-left ``(x, y)`` of each tile, in pixels.
    rowcol
        ``(N, 2)`` ``(row, col)`` of each tile in :attr:`grid`.
    grid
        ``(C, R, Q)`` NIC grid, zeros where :attr:`mask` is False.
    mask
        ``(R, Q)`` True where a tile was encoded.
    thumbnail
        ``(h, w, 3)`` uint8 slide thumbnail, or None when the patch store had none.
    attrs
        The group's attributes (encoder identity, resolution, provenance, ``complete``).
    """

    slide_id: str
    features: npt.NDArray[np.floating[Any]]
    coords: npt.NDArray[np.int64]
    rowcol: npt.NDArray[np.int32]
    grid: npt.NDArray[np.floating[Any]]
    mask: npt.NDArray[np.bool_]
    thumbnail: npt.NDArray[np.uint8] | None
    attrs: dict[str, Any]


def open_embedding_root(path: str | Path, *, create: bool = False) -> zarr.Group:
    """Open the root group of an embedding store (created when ``create`` and absent).

    Raises
    ------
    StoreError
        The path is missing (and ``create`` is False), is not a zarr group, or is another kind of
        store (e.g. a patch store).
    """
    path = normalize(path)
    if is_url(path):
        check_bucket(str(path))
    if not create and not exists(path):
        raise StoreError(f"{path}: no such embedding store (run `wsienc encode ... --out {path}` first)")
    if is_file(path):
        raise StoreError(f"{path}: is a file, not a zarr store directory; choose another --out")
    try:
        root = zarr.open_group(zarr_store(path, read_only=not create), mode="a" if create else "r")
    except Exception as exc:
        raise StoreError(f"{path}: not a readable zarr v3 group ({describe_error(path, exc)})") from None
    kind = root.attrs.get("kind")
    if kind is None and create and not list(root.keys()):
        root.attrs.update({"kind": KIND, "slides": {}})
    elif kind != KIND:
        raise StoreError(
            f"{path}: is not an embedding store (kind={kind!r}); choose an empty or new --out folder"
        )
    return root


def slide_status(root: zarr.Group) -> dict[str, dict[str, Any]]:
    """The root's ``slides`` record: ``{slide_id: {"status", "reason", "source"}}``."""
    return dict(root.attrs.get("slides", {}))


def update_slide_status(root: zarr.Group, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge per-slide status records into the root attrs (one writer: the process driving the run)."""
    slides = slide_status(root)
    for slide_id, record in records.items():
        slides[slide_id] = {"status": record["status"], "reason": record.get("reason"), "source": record.get("source")}
    root.attrs.update({"slides": dict(sorted(slides.items()))})


def is_complete(root: zarr.Group, slide_id: str) -> bool:
    """Whether ``slide_id`` exists in the store and is marked ``complete``."""
    if slide_id not in root:
        return False
    group = root[slide_id]
    return isinstance(group, zarr.Group) and bool(group.attrs.get("complete", False))


def complete_slides(root: zarr.Group) -> list[str]:
    """Ids of the slides whose encoding is complete, sorted."""
    return sorted(name for name in root.group_keys() if is_complete(root, name))


@dataclass(frozen=True)
class SlideLayout:
    """Shape of one slide's embedding arrays, as planned before encoding.

    ``chunk_tiles`` is the number of tiles per row chunk of ``features`` (one encoding task).
    """

    n_tiles: int
    embedding_dim: int
    grid_shape: tuple[int, int]
    dtype: str
    chunk_tiles: int

    @property
    def n_chunks(self) -> int:
        """Number of row chunks of ``features``."""
        return -(-self.n_tiles // self.chunk_tiles)

    def chunk_range(self, k: int) -> tuple[int, int]:
        """Tile index range ``[start, stop)`` of row chunk ``k``."""
        start = k * self.chunk_tiles
        return start, min(start + self.chunk_tiles, self.n_tiles)


def layout_of(group: zarr.Group) -> SlideLayout:
    """The :class:`SlideLayout` of an existing slide group (read from its arrays)."""
    try:
        features = group["features"]
        mask = group["mask"]
    except KeyError as exc:
        raise StoreError(f"{group.path}: not an embedding store slide (array {exc.args[0]!r} missing)") from exc
    rows, cols = (int(v) for v in mask.shape)
    return SlideLayout(
        n_tiles=int(features.shape[0]),
        embedding_dim=int(features.shape[1]),
        grid_shape=(rows, cols),
        dtype=str(features.dtype),
        chunk_tiles=int(features.chunks[0]),
    )


def _matches(group: zarr.Group, layout: SlideLayout, identity: Mapping[str, Any]) -> bool:
    try:
        features = group["features"]
        done = group["encoded_chunks"]
    except KeyError:
        return False
    old = group.attrs.get("encoder", {})
    return (
        isinstance(features, zarr.Array)
        and isinstance(done, zarr.Array)
        and features.shape == (layout.n_tiles, layout.embedding_dim)
        and str(features.dtype) == layout.dtype
        and features.chunks[0] == layout.chunk_tiles
        and done.shape == (layout.n_chunks,)
        and old.get("name") == identity.get("name")
        and old.get("weights_sha256") == identity.get("weights_sha256")
    )


def existing_chunk_tiles(root: zarr.Group, slide_id: str) -> int | None:
    """Row-chunk size of an existing, incomplete slide (so a resumed run keeps its chunking)."""
    if slide_id not in root:
        return None
    group = root[slide_id]
    if not isinstance(group, zarr.Group) or "features" not in group:
        return None
    features = group["features"]
    return int(features.chunks[0]) if isinstance(features, zarr.Array) else None


def prepare_slide(
    root: zarr.Group,
    slide_id: str,
    layout: SlideLayout,
    *,
    coords: npt.NDArray[np.integer[Any]],
    rowcol: npt.NDArray[np.integer[Any]],
    thumbnail: npt.NDArray[np.uint8] | None,
    attrs: Mapping[str, Any],
) -> list[int]:
    """Create (or reopen for resuming) one slide's group and return the row chunks still to encode.

    An existing incomplete group whose shape, dtype, chunking and encoder (name and weights hash)
    match ``layout``/``attrs`` is resumed: only its unwritten chunks are returned. Anything else
    is replaced by a fresh group. Callers skip complete slides before calling this (or pass
    ``--overwrite`` semantics by deleting them first with :func:`delete_slide`).

    Parameters
    ----------
    root
        The embedding store's root group (writable).
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
    if slide_id in root:
        group = root[slide_id]
        if isinstance(group, zarr.Group) and _matches(group, layout, attrs.get("encoder", {})):
            done = np.asarray(group["encoded_chunks"][:], dtype=bool)
            pending = [int(k) for k in np.flatnonzero(~done)]
            logger.info("%s: resuming, %d of %d chunks left", slide_id, len(pending), layout.n_chunks)
            group.attrs.update({**attrs, "complete": False})
            return pending
        logger.info("%s: replacing an incompatible partial encoding", slide_id)
    group = root.create_group(slide_id, overwrite=True)
    n, c = layout.n_tiles, layout.embedding_dim
    group.create_array(
        "features",
        shape=(n, c),
        chunks=(max(1, layout.chunk_tiles), max(1, c)),
        dtype=layout.dtype,
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    group.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(n, 2), chunks=(max(1, min(n, 65536)), 2))
    group.create_array("rowcol", data=np.asarray(rowcol, dtype=np.int32).reshape(n, 2), chunks=(max(1, min(n, 65536)), 2))
    rows, cols = layout.grid_shape
    gr, gc = min(max(rows, 1), GRID_CHUNK), min(max(cols, 1), GRID_CHUNK)
    group.create_array("grid", shape=(c, rows, cols), chunks=(max(1, c), gr, gc), dtype=layout.dtype, fill_value=0)
    group.create_array("mask", shape=(rows, cols), chunks=(gr, gc), dtype=bool, fill_value=False)
    if thumbnail is not None:
        group.create_array("thumbnail", data=np.asarray(thumbnail, dtype=np.uint8))
    group.create_array("encoded_chunks", shape=(layout.n_chunks,), chunks=(1,), dtype=bool, fill_value=False)
    group.attrs.update({**attrs, "complete": False})
    return list(range(layout.n_chunks))


def delete_slide(root: zarr.Group, slide_id: str) -> None:
    """Remove a slide's group (``--overwrite``)."""
    if slide_id in root:
        del root[slide_id]


def slide_group(store: str | Path, slide_id: str, *, mode: str = "r") -> zarr.Group:
    """Open one slide's group of the embedding store at ``store``."""
    try:
        group = zarr.open_group(zarr_store(store, read_only=mode == "r"), path=slide_id, mode=mode)  # type: ignore[arg-type]
    except Exception as exc:
        raise StoreError(f"{store}: slide {slide_id!r} is not in the embedding store ({exc})") from exc
    return group


def write_features_chunk(group: zarr.Group, layout: SlideLayout, k: int, features: npt.NDArray[np.floating[Any]]) -> None:
    """Write row chunk ``k`` of ``features`` and then mark it encoded (in that order, for resuming).

    Raises
    ------
    StoreError
        ``features`` has the wrong shape, or does not fit the store's dtype (float16 overflow).
    """
    start, stop = layout.chunk_range(k)
    expected = (stop - start, layout.embedding_dim)
    if features.shape != expected:
        raise StoreError(f"chunk {k} of {group.path!r}: features have shape {features.shape}, expected {expected}")
    cast = features.astype(layout.dtype)
    if not np.isfinite(cast).all():
        peak = float(np.nanmax(np.abs(features))) if np.isfinite(features).any() else float("nan")
        raise StoreError(
            f"{group.path}: embeddings do not fit {layout.dtype} (largest magnitude {peak:.4g}, or NaN); "
            "re-run with --dtype float32 or check the encoder"
        )
    group["features"][start:stop] = cast
    group["encoded_chunks"][k] = True


def pending_chunks(group: zarr.Group) -> list[int]:
    """Row chunks of ``features`` not yet written."""
    done = np.asarray(group["encoded_chunks"][:], dtype=bool)
    return [int(k) for k in np.flatnonzero(~done)]


def iter_feature_rows(group: zarr.Group, rows: int) -> Iterable[tuple[int, npt.NDArray[np.floating[Any]]]]:
    """Yield ``(start, features[start:start+rows])`` blocks, so memory stays bounded."""
    features = group["features"]
    n = features.shape[0]
    for start in range(0, n, max(1, rows)):
        yield start, np.asarray(features[start : start + rows])


def write_grid_band(
    group: zarr.Group,
    row0: int,
    grid_band: npt.NDArray[np.floating[Any]],
    mask_band: npt.NDArray[np.bool_],
) -> None:
    """Write grid rows ``[row0, row0 + band height)`` (all columns) of ``grid`` and ``mask``."""
    row1 = row0 + mask_band.shape[0]
    group["grid"][:, row0:row1, :] = grid_band.astype(group["grid"].dtype)
    group["mask"][row0:row1, :] = mask_band


def mark_complete(group: zarr.Group) -> None:
    """Set ``complete = True`` on a slide whose features and grid are all written."""
    if pending_chunks(group):
        raise StoreError(f"{group.path}: cannot mark complete, chunks {pending_chunks(group)} are not encoded")
    group.attrs.update({"complete": True})


def read_slide(store: str | Path, slide_id: str, *, require_complete: bool = True) -> EncodedSlide:
    """Read one slide of the embedding store at ``store`` into memory.

    Raises
    ------
    StoreError
        The slide is missing, or incomplete while ``require_complete``.
    """
    group = slide_group(store, slide_id)
    attrs = dict(group.attrs)
    if require_complete and not attrs.get("complete", False):
        raise StoreError(
            f"{store}: slide {slide_id!r} is not completely encoded; re-run `wsienc encode` to finish it"
        )
    thumbnail = np.asarray(group["thumbnail"][:]) if "thumbnail" in group else None
    return EncodedSlide(
        slide_id=slide_id,
        features=np.asarray(group["features"][:]),
        coords=np.asarray(group["coords"][:], dtype=np.int64),
        rowcol=np.asarray(group["rowcol"][:], dtype=np.int32),
        grid=np.asarray(group["grid"][:]),
        mask=np.asarray(group["mask"][:], dtype=bool),
        thumbnail=thumbnail,
        attrs=attrs,
    )
