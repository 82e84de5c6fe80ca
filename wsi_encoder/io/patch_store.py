"""The patch store: one zarr v3 group per slide with its tiles, coordinates, grid and tissue.

Layout (the contract other commands read; see ``docs/tile.md``)::

    patches.zarr/                      attrs: kind="patch_store", format, slides={id: {status, reason, source}}
      <slide_id>/                      attrs: source, backend, ..., target_mpp, actual_mpp, complete
        tiles        (N, T, T, 3) uint8   chunks of `chunk_tiles` neighbouring tiles (absent when coords-only)
        coords       (N, 2) int64         level-0 top-left (x, y)
        grid         (N, 2) int32         (row, col) in the slide's tile grid
        tissue       (N,)   float32       tissue fraction of each tile (of its part inside the slide)
        inside       (N,)   float32       fraction of each tile inside the slide (< 1: an edge tile, padded)
        thumbnail    (h, w, 3) uint8      the picture the tissue mask was computed on
        tissue_mask  (h, w) bool
        chunks_done  (n_chunks,) bool     which chunks of `tiles` are written (resume bookkeeping)

Tiles are ordered block by block (square blocks of ``block_size`` x ``block_size`` grid cells in
raster order, raster order inside a block), so every chunk of ``tiles`` holds neighbouring tiles;
use ``grid`` for positions. With ``codec="jpeg"`` each chunk holds one JPEG per tile
(:mod:`wsi_encoder.io.jpeg_codec`); with ``codec="zstd"`` the chunks are shards of single-tile,
zstd-compressed inner chunks (lossless).

Writers hold :class:`~wsi_encoder.io.store_lock.StoreLock` (a ``<store>.lock`` file or object beside the store) so two runs
cannot write one store at once. A store may live on object storage (``s3://...``, a zarr v3
``FsspecStore``): every chunk is one whole-object PUT, so there are no partial files to clean, and a
chunk is marked in ``chunks_done`` only after its PUT returned. :func:`open_patch_store` gives the read API (:class:`PatchStore`,
:class:`PatchSlide`) used by ``wsienc encode`` and the training tasks.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.chunk_key_encodings import ChunkKeyEncodingParams
from zarr.storage import LocalStore

from wsi_encoder.errors import StoreError
from wsi_encoder.io.files import atomic_write_bytes
from wsi_encoder.io.jpeg_codec import JpegTileCodec, encode_jpeg_chunk, read_jpeg_chunk_file_into
from wsi_encoder.io.urls import (
    check_bucket,
    describe_error,
    filesystem,
    is_url,
    join,
    normalize,
    zarr_store,
)

logger = logging.getLogger(__name__)

PATCH_STORE_KIND = "patch_store"
STORE_FORMAT = 1
CODECS: tuple[str, ...] = ("jpeg", "zstd")
#: zstd level of new lossless stores. Level 1 takes about half the CPU time of level 3 on H&E tiles for
#: the same size (within 0-10 %; noisy decoded pixels leave zstd little to find beyond its entropy
#: coder). The level is recorded in each array's codec metadata (and the slide's ``zstd_level``
#: attribute); readers do not need it, and a resumed slide keeps the level it was started with.
_ZSTD_LEVEL = 1
#: Chunk keys of the tiles array as files beside each other (`c.<i>.0.0.0`), not nested folders (`c/<i>/0/0/0`):
#: each new folder of the nested layout cost a mkdir per chunk (a fifth of the tiles' CPU beyond the decode
#: and encode). zarr reads either from the array's metadata; object stores see only the key names change.
_FLAT_KEYS: ChunkKeyEncodingParams = {"name": "default", "separator": "."}
_WRITE_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


# ---- writing ---------------------------------------------------------------------------------
def create_patch_store(path: str | Path) -> zarr.Group:
    """Open the patch store at ``path`` for writing, creating it when missing.

    Raises
    ------
    StoreError
        ``path`` exists but is not a patch store (another zarr store, or a plain file/folder).
    """
    if is_url(path):
        url = str(normalize(path))
        check_bucket(url)
        fs, inner = filesystem(url)
        if fs.isfile(inner) or (fs.exists(inner) and not fs.isfile(f"{inner}/zarr.json")):
            raise StoreError(f"{url}: exists and is not a zarr store; choose another --out")
        try:
            root = zarr.open_group(zarr_store(url), mode="a", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{url}: cannot open as a zarr v3 group ({describe_error(url, exc)}); choose another --out") from None
        return _claim_root(root, url)
    path = Path(path)
    empty_dir = path.is_dir() and not any(path.iterdir())
    if path.exists() and not (path / "zarr.json").exists() and not empty_dir:
        raise StoreError(f"{path}: exists and is not a zarr store; choose another --out")
    try:
        root = zarr.open_group(str(path), mode="a", zarr_format=3)
    except Exception as exc:
        raise StoreError(f"{path}: cannot open as a zarr v3 group ({exc}); choose another --out") from exc
    _remove_partial_files(path, recursive=False)
    return _claim_root(root, path)


def _claim_root(root: zarr.Group, path: str | Path) -> zarr.Group:
    kind = root.attrs.get("kind")
    if kind is None:
        root.update_attributes({"kind": PATCH_STORE_KIND, "format": STORE_FORMAT, "slides": {}})
    elif kind != PATCH_STORE_KIND:
        raise StoreError(f"{path}: is a {kind!r} store, not a patch store; choose another --out")
    return root


def _remove_partial_files(directory: Path, recursive: bool) -> None:
    """Delete temporary files a killed write left behind: zarr's (``*.partial``) and those of
    :func:`wsi_encoder.io.files.atomic_path` (``.<name>.<random>.tmp``) for whole-chunk writes."""
    prefix = "**/" if recursive else ""
    for pattern in ("*.partial", ".*.tmp*"):
        for leftover in directory.glob(prefix + pattern):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)


def _status_record(root: zarr.Group) -> dict[str, dict[str, Any]]:
    """The root's ``slides`` attribute as a plain dict (empty when absent or malformed)."""
    record = root.attrs.get("slides")
    if not isinstance(record, Mapping):
        return {}
    return {str(k): dict(v) for k, v in record.items() if isinstance(v, Mapping)}


def _array_of(group: zarr.Group, name: str) -> zarr.Array:
    node = group.get(name)
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{group.store_path}: array {name!r} is missing (not a patch store slide)")
    return node


def update_slide_status(root: zarr.Group, updates: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge per-slide status records (``{"status", "reason", "source"}``) into the root attrs."""
    if not updates:
        return
    slides = _status_record(root)
    for slide_id, record in updates.items():
        slides[slide_id] = {"status": record["status"], "reason": record.get("reason"), "source": record.get("source")}
    root.attrs.update({"slides": dict(sorted(slides.items()))})


def store_directory(root: zarr.Group) -> Path:
    """The directory of a group in a local (or shared-file-system) store."""
    store = root.store
    if not isinstance(store, LocalStore):
        raise StoreError(f"patch stores live on a file system; {type(store).__name__} is not supported")
    return Path(store.root) / root.path


def delete_slide_group(root: zarr.Group, slide_id: str) -> None:
    """Remove a slide's group directory (tiles and all, and any half-deleted leftovers)."""
    if not isinstance(root.store, LocalStore):  # object storage: delete every key under the group's prefix
        from zarr.core.sync import sync

        sync(root.store.delete_dir(f"{root.path}/{slide_id}".strip("/")))
        return
    directory = store_directory(root) / slide_id
    if directory.exists():
        shutil.rmtree(directory)


def create_slide_group(
    root: zarr.Group,
    slide_id: str,
    attrs: Mapping[str, Any],
    *,
    coords: npt.NDArray[np.int64],
    grid: npt.NDArray[np.int32],
    tissue: npt.NDArray[np.float32],
    thumbnail: npt.NDArray[np.uint8],
    tissue_mask: npt.NDArray[np.bool_],
    tile_size: int,
    chunk_tiles: int,
    codec: str | None,
    jpeg_quality: int,
    inside: npt.NDArray[np.float32] | None = None,
) -> zarr.Group:
    """(Re)create a slide's group with its small arrays and an empty ``tiles`` array.

    ``attrs`` must hold the tiling parameters; ``complete`` is set False and ``planned`` True once
    every array exists, so a reader of a half-written group can tell.
    """
    delete_slide_group(root, slide_id)
    n = len(coords)
    extra = {"zstd_level": _ZSTD_LEVEL} if codec == "zstd" else {}
    group = root.create_group(slide_id, attributes={**attrs, **extra, "complete": False, "planned": False})
    arrays: dict[str, dict[str, Any]] = {
        "coords": {"data": np.asarray(coords, dtype=np.int64).reshape(n, 2), "chunks": (max(n, 1), 2)},
        "grid": {"data": np.asarray(grid, dtype=np.int32).reshape(n, 2), "chunks": (max(n, 1), 2)},
        "tissue": {"data": np.asarray(tissue, dtype=np.float32).reshape(n), "chunks": (max(n, 1),)},
        # one chunk each (both are read whole): zarr's automatic chunks cut a 1280² thumbnail into 16
        "thumbnail": {"data": np.ascontiguousarray(thumbnail, dtype=np.uint8), "chunks": np.shape(thumbnail)},
        "tissue_mask": {"data": np.ascontiguousarray(tissue_mask, dtype=bool), "chunks": np.shape(tissue_mask)},
    }
    if inside is not None:
        arrays["inside"] = {"data": np.asarray(inside, dtype=np.float32).reshape(n), "chunks": (max(n, 1),)}
    if codec is not None:
        arrays.update(_tile_arrays(n, tile_size, chunk_tiles, codec, jpeg_quality))
    for name, kwargs in arrays.items():
        group.create_array(name, **kwargs)
    group.attrs.update({"planned": True})
    return group


def _tile_arrays(n: int, tile_size: int, chunk_tiles: int, codec: str, jpeg_quality: int) -> dict[str, dict[str, Any]]:
    """The empty ``tiles`` array of ``codec``'s layout and its ``chunks_done`` flags, as ``create_array`` arguments."""
    shape = (n, tile_size, tile_size, 3)
    chunk = (chunk_tiles, tile_size, tile_size, 3)
    common = {"shape": shape, "dtype": np.uint8, "fill_value": 0, "dimension_names": ("tile", "y", "x", "channel"),
              "chunk_key_encoding": _FLAT_KEYS}  # fmt: skip
    if codec == "jpeg":
        tiles = {**common, "chunks": chunk, "serializer": JpegTileCodec(quality=jpeg_quality), "compressors": None}
    elif codec == "zstd":
        tiles = {**common, "shards": chunk, "chunks": (1, tile_size, tile_size, 3), "compressors": ZstdCodec(level=_ZSTD_LEVEL)}
    else:
        raise StoreError(f"unknown tile codec {codec!r}; choose one of {', '.join(CODECS)}")
    done = {"shape": (-(-n // chunk_tiles),), "dtype": bool, "chunks": (1,), "fill_value": False, "compressors": None}
    return {"tiles": tiles, "chunks_done": done}


def open_slide_arrays_for_writing(store_path: str | Path, slide_id: str) -> tuple[zarr.Array, zarr.Array]:
    """The ``tiles`` and ``chunks_done`` arrays of a slide, opened for writing whole chunks."""
    base = join(normalize(store_path), slide_id)
    try:
        store = zarr_store(store_path)
        tiles = zarr.open_array(store, path=f"{slide_id}/tiles", mode="r+", zarr_format=3)
        done = zarr.open_array(store, path=f"{slide_id}/chunks_done", mode="r+", zarr_format=3)
    except Exception as exc:
        raise StoreError(f"{base}: cannot open the tile arrays for writing ({exc})") from exc
    return tiles.with_config(_WRITE_CONFIG), done.with_config(_WRITE_CONFIG)


def _little_endian(codec: object) -> bool:
    from zarr.codecs import BytesCodec

    return isinstance(codec, BytesCodec) and codec.endian is not None and codec.endian.value == "little"


def _direct_shard_level(tiles: zarr.Array) -> int | None:
    """The zstd level when ``tiles`` is the zstd layout this module creates (one zstd-compressed tile per
    inner chunk of a shard, index at the end with crc32c) on a local store; else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    codecs = tiles.metadata.codecs if isinstance(tiles.metadata, zarr.core.metadata.ArrayV3Metadata) else ()
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or not isinstance(tiles.store, LocalStore):
        return None
    sharding = codecs[0]
    inner = sharding.codecs
    if (
        tuple(sharding.chunk_shape) != (1, *tiles.shape[1:])
        or len(inner) != 2
        or not isinstance(inner[0], BytesCodec)
        or not isinstance(inner[1], ZstdCodec)
        or inner[1].checksum
        or sharding.index_location != ShardingCodecIndexLocation.end
        or [type(c) for c in sharding.index_codecs] != [BytesCodec, Crc32cCodec]
        or not _little_endian(sharding.index_codecs[0])
        or tiles.dtype != np.uint8
    ):
        return None
    return int(inner[1].level)


def _direct_jpeg_quality(tiles: zarr.Array) -> int | None:
    """The JPEG quality when ``tiles`` is the JPEG layout this module creates (chunks of whole tiles,
    :class:`~wsi_encoder.io.jpeg_codec.JpegTileCodec` alone) on a local store; else None."""
    codecs = tiles.metadata.codecs if isinstance(tiles.metadata, zarr.core.metadata.ArrayV3Metadata) else ()
    if (
        len(codecs) != 1
        or not isinstance(codecs[0], JpegTileCodec)
        or not isinstance(tiles.store, LocalStore)
        or tuple(tiles.chunks[1:]) != tuple(tiles.shape[1:])
        or tiles.dtype != np.uint8
        or tiles.fill_value != 0
    ):
        return None
    return int(codecs[0].quality)


def write_tile_chunk(tiles: zarr.Array, index: int, data: npt.NDArray[np.uint8]) -> None:
    """Write chunk (or shard) ``index`` of a slide's ``tiles`` array: the rows from ``index * k`` on.

    For the layouts this module creates the chunk's bytes are assembled here and written atomically,
    byte for byte what zarr writes (checked by the tests) without its per-chunk machinery (buffer
    copies, an event-loop hop per chunk, and for zstd a codec pipeline per tile): JPEG chunks are
    :func:`~wsi_encoder.io.jpeg_codec.encode_jpeg_chunk`; zstd shards hold each tile as one zstd
    frame, then the ``(k, 2)`` little-endian offset/size index and its crc32c. Any other layout is
    written through zarr.
    """
    rows = int(tiles.shards[0] if tiles.shards is not None else tiles.chunks[0])
    start = index * rows
    if tiles.shards is None:
        quality = _direct_jpeg_quality(tiles)
        if quality is None:
            tiles[start : start + len(data)] = data
            return
        _write_chunk_bytes(tiles, index, encode_jpeg_chunk(data, quality, n_tiles=rows))
        return
    level = _direct_shard_level(tiles)
    if level is None:
        tiles[start : start + len(data)] = data
        return
    import google_crc32c
    from numcodecs.zstd import Zstd

    codec = Zstd(level=level)
    frames = [bytes(codec.encode(np.ascontiguousarray(tile))) for tile in data]
    table = np.full((rows, 2), np.iinfo(np.uint64).max, dtype="<u8")  # absent inner chunks
    sizes = np.array([len(f) for f in frames], dtype="<u8")
    table[: len(frames), 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(frames) else []
    table[: len(frames), 1] = sizes
    index_bytes = table.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
    _write_chunk_bytes(tiles, index, b"".join([*frames, index_bytes, crc]))


def read_tile_rows(tiles: zarr.Array, start: int, stop: int) -> npt.NDArray[np.uint8]:
    """``tiles[start:stop]`` of a slide's ``tiles`` array as ``(stop - start, T, T, 3)`` uint8.

    For the JPEG layout :func:`create_slide_group` makes on a local store, the chunk files are read (their
    index and the wanted tiles' bytes) and decoded here, each tile straight into the result: the pixels
    zarr gives, without its event-loop hop per read (which waits for the GIL behind busy decoding
    threads) or its copy of each chunk. A chunk never written reads as zarr's fill value. Any other
    layout or store is read through zarr.
    """
    n = int(tiles.shape[0])
    if not 0 <= start <= stop <= n:
        raise StoreError(f"{tiles.path}: rows {start}..{stop} asked of {n} tiles")
    if _direct_jpeg_quality(tiles) is None or tiles.shards is not None:
        return np.asarray(tiles[start:stop])
    rows = int(tiles.chunks[0])
    out = np.empty((stop - start, *tiles.shape[1:]), dtype=np.uint8)
    folder = Path(tiles.store.root) / tiles.path  # type: ignore[attr-defined]
    for index in range(start // rows, -(-stop // rows)):
        a, b = max(start, index * rows), min(stop, (index + 1) * rows)
        path = folder / tiles.metadata.encode_chunk_key((index,) + (0,) * (tiles.ndim - 1))
        try:
            read_jpeg_chunk_file_into(path, rows, a - index * rows, out[a - start : b - start])
        except FileNotFoundError:
            out[a - start : b - start] = tiles.fill_value
    return out


def mark_chunk_done(done: zarr.Array, index: int) -> None:
    """Set ``chunks_done[index]``: written directly (its chunk is the single byte ``0x01``) for the
    layout :func:`create_slide_group` makes on a local store, else through zarr.

    Through zarr this costs little CPU but waits for zarr's event-loop thread, which queues behind
    the busy workers for the GIL (about 8 ms a chunk on two busy cores).
    """
    codecs = done.metadata.codecs if isinstance(done.metadata, zarr.core.metadata.ArrayV3Metadata) else ()
    direct = (
        isinstance(done.store, LocalStore)
        and done.dtype == np.bool_
        and tuple(done.chunks) == (1,)
        and done.shards is None
        and [type(c).__name__ for c in codecs] == ["BytesCodec"]
    )
    if not direct:
        done[index] = True
        return
    _write_chunk_bytes(done, index, b"\x01")


def _write_chunk_bytes(array: zarr.Array, index: int, payload: bytes) -> None:
    """Write one chunk's (or shard's) encoded bytes atomically under its zarr key in a local store."""
    key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
    store = array.store
    if not isinstance(store, LocalStore):
        raise StoreError(f"{array.path}: whole-chunk writes need a local store, not {type(store).__name__}")
    atomic_write_bytes(Path(store.root) / array.path / key, payload, fsync=False)


def mark_slide_complete(root: zarr.Group, slide_id: str) -> None:
    """Set ``complete = True`` on a slide whose every chunk is written (checked)."""
    group = root[slide_id]
    if not isinstance(group, zarr.Group):
        raise StoreError(f"{slide_id}: not a slide group")
    if "chunks_done" in group:
        done = np.asarray(_array_of(group, "chunks_done")[...])
        if not done.all():
            missing = int((~done).sum())
            raise StoreError(f"{slide_id}: {missing} chunk(s) of tiles are not written yet")
    group.attrs.update({"complete": True})


def clean_slide_leftovers(store_path: str | Path, slide_id: str) -> None:
    """Remove temporary files a killed run left inside a slide's group (before resuming it).

    Object stores have none: an object is written whole or not at all.
    """
    if is_url(store_path):
        return
    directory = Path(store_path) / slide_id
    if directory.exists():
        _remove_partial_files(directory, recursive=True)


# ---- reading ---------------------------------------------------------------------------------
class PatchSlide:
    """One slide of a patch store (read-only view; arrays are loaded on first use).

    ``tiles`` is the zarr array (index it: ``slide.tiles[i]``, ``slide.tiles[a:b]``) or None in
    coords-only stores; ``coords``, ``grid``, ``tissue``, ``thumbnail`` and ``tissue_mask`` are numpy
    arrays; ``attrs`` is the group's attribute dict (see the module docstring).
    """

    def __init__(self, group: zarr.Group, slide_id: str) -> None:
        self.group = group
        self.slide_id = slide_id

    def __repr__(self) -> str:
        return f"PatchSlide({self.slide_id!r}, n_tiles={self.n_tiles}, complete={self.complete})"

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """The slide's attributes."""
        return dict(self.group.attrs.asdict())

    @property
    def complete(self) -> bool:
        """Whether every tile was written."""
        return bool(self.attrs.get("complete", False))

    @property
    def n_tiles(self) -> int:
        """Number of tiles N."""
        return int(_array_of(self.group, "coords").shape[0])

    @property
    def tile_size(self) -> int:
        """Tile edge T in pixels (at ``actual_mpp``)."""
        return int(self.attrs["tile_size"])

    @property
    def tiles(self) -> zarr.Array | None:
        """``(N, T, T, 3)`` uint8 zarr array, or None when the store holds coordinates only."""
        if "tiles" not in self.group:
            return None
        array = self.group["tiles"]
        assert isinstance(array, zarr.Array)
        return array

    def _array(self, name: str) -> npt.NDArray[Any]:
        return np.asarray(_array_of(self.group, name)[...])

    @cached_property
    def coords(self) -> npt.NDArray[np.int64]:
        """``(N, 2)`` level-0 top-left (x, y) of every tile."""
        return self._array("coords").reshape(-1, 2).astype(np.int64, copy=False)

    @cached_property
    def grid(self) -> npt.NDArray[np.int32]:
        """``(N, 2)`` (row, col) of every tile in the slide's grid."""
        return self._array("grid").reshape(-1, 2).astype(np.int32, copy=False)

    @cached_property
    def tissue(self) -> npt.NDArray[np.float32]:
        """``(N,)`` tissue fraction of every tile."""
        return self._array("tissue").astype(np.float32, copy=False)

    @cached_property
    def inside(self) -> npt.NDArray[np.float32]:
        """``(N,)`` fraction of every tile inside the slide (all 1 in stores written before edge tiles)."""
        if "inside" not in self.group:
            return np.ones(self.n_tiles, dtype=np.float32)
        return self._array("inside").astype(np.float32, copy=False)

    @cached_property
    def thumbnail(self) -> npt.NDArray[np.uint8]:
        """``(h, w, 3)`` thumbnail of the whole slide."""
        return self._array("thumbnail")

    @cached_property
    def tissue_mask(self) -> npt.NDArray[np.bool_]:
        """``(h, w)`` tissue mask at the thumbnail's resolution."""
        return self._array("tissue_mask").astype(bool, copy=False)

    def tile_batches(self, batch_size: int | None = None) -> Iterator[tuple[int, int, npt.NDArray[np.uint8]]]:
        """Yield ``(start, stop, tiles[start:stop])`` over all tiles.

        The default batch is one chunk of the ``tiles`` array (the fastest read).
        """
        tiles = self.tiles
        if tiles is None:
            raise StoreError(f"{self.slide_id}: the store holds coordinates only (tiled with --coords-only)")
        step = int(batch_size or tiles.chunks[0])
        if tiles.shards is not None:
            step = int(batch_size or tiles.shards[0])
        for start in range(0, self.n_tiles, step):
            stop = min(start + step, self.n_tiles)
            yield start, stop, read_tile_rows(tiles, start, stop)


class PatchStore:
    """A patch store opened for reading: ``store[slide_id]`` gives a :class:`PatchSlide`."""

    def __init__(self, path: str | Path, root: zarr.Group) -> None:
        self.path = normalize(path)
        self.root = root

    def __repr__(self) -> str:
        return f"PatchStore({str(self.path)!r}, slides={len(self)})"

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (``kind``, ``format``, ``slides``)."""
        return dict(self.root.attrs.asdict())

    @property
    def status(self) -> dict[str, dict[str, Any]]:
        """Per-slide status record: ``{slide_id: {"status": "ok"|"empty"|"failed", "reason", "source"}}``."""
        return _status_record(self.root)

    @cached_property
    def slide_ids(self) -> list[str]:
        """Ids of the slide groups present (complete or not), sorted."""
        return sorted(name for name, _ in self.root.groups())

    def complete_slide_ids(self) -> list[str]:
        """Ids of the slides whose tiling finished."""
        return [sid for sid in self.slide_ids if self[sid].complete]

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self.slide_ids

    def __iter__(self) -> Iterator[PatchSlide]:
        for slide_id in self.slide_ids:
            yield self[slide_id]

    def __getitem__(self, slide_id: str) -> PatchSlide:
        if slide_id not in self.slide_ids:
            raise KeyError(f"{self.path}: no slide {slide_id!r} (slides: {', '.join(self.slide_ids[:10]) or 'none'})")
        group = self.root[slide_id]
        assert isinstance(group, zarr.Group)
        return PatchSlide(group, slide_id)


def _has_zarr_json(path: str | Path) -> bool:
    """Whether ``path`` (a directory or a URL prefix) holds a zarr root; missing buckets and
    credentials raise :class:`StoreError` with one clear line."""
    if not is_url(path):
        return (Path(path) / "zarr.json").exists()
    check_bucket(str(path))
    fs, inner = filesystem(path)
    try:
        return bool(fs.isfile(f"{inner}/zarr.json"))
    except Exception as exc:
        raise StoreError(describe_error(path, exc)) from None


def open_patch_store(path: str | Path) -> PatchStore:
    """Open a patch store written by ``wsienc tile`` for reading.

    Raises
    ------
    StoreError
        ``path`` is missing or not a patch store.
    """
    path = normalize(path)
    if not _has_zarr_json(path):
        raise StoreError(f"{path}: no such patch store (run `wsienc tile ... --out {path}` first)")
    try:
        root = zarr.open_group(zarr_store(path, read_only=True), mode="r", zarr_format=3)
    except Exception as exc:
        raise StoreError(f"{path}: cannot open as a zarr v3 group ({exc})") from exc
    kind = root.attrs.get("kind")
    if kind != PATCH_STORE_KIND:
        raise StoreError(f"{path}: is not a patch store (kind={kind!r}); expected the output of `wsienc tile`")
    return PatchStore(path, root)
