"""A zarr v3 serializer whose chunks hold one baseline JPEG per tile (coded with imagecodecs).

zarr v3 ships no JPEG codec. :class:`JpegTileCodec` is an ``ArrayBytesCodec`` (it turns a chunk of
pixels into bytes, in the place of zarr's ``bytes`` serializer) for uint8 arrays of tiles such as
``tiles (N, T, T, 3)``: the image axes are the last two (greyscale) or three (``C`` = 1 or 3), every
axis before them counts tiles, and a chunk of ``k`` tiles is stored as ``k`` independent JPEG files
behind a small index, so reading one tile fetches and decodes only that tile (the codec supports
zarr's partial decoding). A patch store chunked by blocks of neighbouring tiles thus keeps one file
per block and stays near the size of the source slide.

Chunk byte layout (little endian)::

    b"WSIJPEG1"                 8-byte magic
    uint64 offsets[k + 1]       start of each JPEG relative to the end of the index; offsets[k] = total
    JPEG 0, JPEG 1, ... JPEG k-1

In array metadata the codec is ``{"name": "wsi_encoder.jpeg", "configuration": {"quality": Q}}``.
zarr finds the class through the ``zarr.codecs`` entry point this package declares
(``wsi_encoder.jpeg = wsi_encoder.io.jpeg_codec:JpegTileCodec``), so a plain ``zarr.open_group`` in
any process where wsi_encoder is installed decodes the tiles; importing this module also registers
it, for environments without installed entry points.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from zarr.abc.codec import ArrayBytesCodec, ArrayBytesCodecPartialDecodeMixin
from zarr.abc.store import RangeByteRequest
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

from wsi_encoder.errors import InvalidParameterError, StoreError

if TYPE_CHECKING:
    from typing import Self

    from zarr.abc.store import ByteGetter
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer
    from zarr.core.chunk_grids import ChunkGrid
    from zarr.core.dtype.wrapper import TBaseDType, TBaseScalar, ZDType
    from zarr.core.indexing import SelectorTuple

#: Name of the codec in zarr array metadata (and of its ``zarr.codecs`` entry point).
CODEC_NAME = "wsi_encoder.jpeg"
DEFAULT_QUALITY = 90
_MAGIC = b"WSIJPEG1"
_JPEG_MAX_SIDE = 65500


def _parse_quality(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 1 <= int(value) <= 100:
        raise InvalidParameterError(f"JPEG quality {value!r} must be an integer in 1..100")
    return int(value)


def split_tile_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split a chunk shape into (tile axes, image axes): ``(k, T, T, 3)`` -> ``((k,), (T, T, 3))``."""
    if len(shape) >= 3 and shape[-1] in (1, 3):
        lead, image = shape[:-3], shape[-3:]
    elif len(shape) >= 2:
        lead, image = shape[:-2], shape[-2:]
    else:
        raise InvalidParameterError(f"JPEG tiles need at least 2 axes (height, width), got shape {shape}")
    if image[0] > _JPEG_MAX_SIDE or image[1] > _JPEG_MAX_SIDE:
        raise InvalidParameterError(f"tiles of shape {image} are larger than a JPEG can be ({_JPEG_MAX_SIDE} px)")
    return tuple(lead), tuple(image)


def _index_size(n_tiles: int) -> int:
    return len(_MAGIC) + 8 * (n_tiles + 1)


def _parse_index(data: bytes | memoryview, n_tiles: int, where: str) -> npt.NDArray[np.uint64]:
    size = _index_size(n_tiles)
    if len(data) < size or bytes(data[: len(_MAGIC)]) != _MAGIC:
        raise StoreError(f"{where}: not a wsi_encoder JPEG tile chunk (bad or truncated index); re-run the tiling")
    return np.frombuffer(data, dtype="<u8", count=n_tiles + 1, offset=len(_MAGIC))


@dataclass(frozen=True)
class JpegTileCodec(ArrayBytesCodecPartialDecodeMixin, ArrayBytesCodec):
    """Lossy JPEG serializer for uint8 chunks of tiles, one JPEG per tile.

    Parameters
    ----------
    quality
        JPEG quality, 1-100 (recorded in the array metadata).
    """

    is_fixed_size = False

    quality: int = DEFAULT_QUALITY

    def __init__(self, *, quality: int = DEFAULT_QUALITY) -> None:
        object.__setattr__(self, "quality", _parse_quality(quality))

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        """Build the codec from its array-metadata JSON."""
        _, configuration = parse_named_configuration(data, CODEC_NAME, require_configuration=False)
        return cls(**(configuration or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        """The codec's array-metadata JSON."""
        return {"name": CODEC_NAME, "configuration": {"quality": self.quality}}

    def validate(
        self,
        *,
        shape: tuple[int, ...],
        dtype: ZDType[TBaseDType, TBaseScalar],
        chunk_grid: ChunkGrid,
    ) -> None:
        """Refuse dtypes and shapes a JPEG cannot hold, with the fix in the message."""
        if dtype.to_native_dtype() != np.dtype(np.uint8):
            raise InvalidParameterError(
                f"the JPEG codec stores uint8 pixels, not {dtype.to_native_dtype()}; use zstd for other dtypes"
            )
        split_tile_shape(tuple(shape))

    # ---- whole chunks ---------------------------------------------------------------------------
    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        array = np.asarray(chunk_array.as_numpy_array(), dtype=np.uint8)
        return chunk_spec.prototype.buffer.from_bytes(encode_jpeg_chunk(array, self.quality))

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        data = chunk_bytes.as_numpy_array().tobytes()
        lead, _ = split_tile_shape(chunk_spec.shape)
        n_tiles = int(np.prod(lead, dtype=np.int64))
        out = np.empty(chunk_spec.shape, dtype=np.uint8)
        decode_jpeg_chunk_into(data, n_tiles, 0, out.reshape((n_tiles, *out.shape[len(lead) :])), "chunk")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    # ---- one or a few tiles of a chunk ----------------------------------------------------------
    async def _decode_partial_single(
        self, byte_getter: ByteGetter, selection: SelectorTuple, chunk_spec: ArraySpec
    ) -> NDBuffer | None:
        lead, image = split_tile_shape(chunk_spec.shape)
        n_tiles = int(np.prod(lead, dtype=np.int64))
        wanted = _selected_tiles(lead, len(image), selection)
        prototype = chunk_spec.prototype
        if len(wanted) == 0:
            empty = np.zeros(chunk_spec.shape, dtype=np.uint8)[selection]
            return prototype.nd_buffer.from_numpy_array(empty)
        if len(wanted) == n_tiles:
            whole = await byte_getter.get(prototype=prototype)
            if whole is None:
                return None
            decoded = await self._decode_single(whole, chunk_spec)
            return decoded[selection]
        index = await byte_getter.get(prototype=prototype, byte_range=RangeByteRequest(0, _index_size(n_tiles)))
        if index is None:
            return None
        offsets = _parse_index(index.as_numpy_array().tobytes(), n_tiles, "chunk")
        start = _index_size(n_tiles) + int(offsets[wanted[0]])
        stop = _index_size(n_tiles) + int(offsets[wanted[-1] + 1])
        span = await byte_getter.get(prototype=prototype, byte_range=RangeByteRequest(start, stop))
        if span is None:
            return None
        body = span.as_numpy_array().tobytes()

        def decode() -> npt.NDArray[np.uint8]:
            out = np.zeros(chunk_spec.shape, dtype=np.uint8)
            flat = out.reshape((n_tiles, *image))
            _decode_into(flat, wanted, memoryview(body), offsets, int(offsets[wanted[0]]))
            return out

        out = await asyncio.to_thread(decode)
        return prototype.nd_buffer.from_numpy_array(out[selection])

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        """JPEG output size is data dependent."""
        raise NotImplementedError


def encode_jpeg_chunk(array: npt.NDArray[np.uint8], quality: int, n_tiles: int | None = None) -> bytes:
    """The bytes of one chunk (layout in the module docstring) holding ``array``'s tiles as JPEGs.

    ``n_tiles`` (default: the tiles of ``array``) is the chunk's length: missing tiles at the end
    are stored as tiles of zeros (zarr's fill value), as zarr does for a partial last chunk.
    """
    import imagecodecs

    _, image = split_tile_shape(array.shape)
    tiles = array.reshape((-1, *image))
    encoded = [imagecodecs.jpeg8_encode(np.ascontiguousarray(tile), level=quality) for tile in tiles]
    if n_tiles is not None and n_tiles > len(encoded):
        blank = imagecodecs.jpeg8_encode(np.zeros(image, dtype=np.uint8), level=quality)
        encoded += [blank] * (n_tiles - len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype="<u8")
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return b"".join([_MAGIC, offsets.tobytes(), *encoded])


def decode_jpeg_chunk_into(
    data: bytes | memoryview, n_tiles: int, first: int, out: npt.NDArray[np.uint8], where: str
) -> None:
    """Decode tiles ``first, first + 1, ...`` of a chunk's bytes (the layout in the module docstring, ``n_tiles``
    JPEGs) into ``out``, one tile per row of ``out``.

    Raises
    ------
    StoreError
        ``data`` is not such a chunk, or holds fewer tiles.
    """
    offsets = _parse_index(data, n_tiles, where)
    _check_rows(first, len(out), n_tiles, where)
    body = memoryview(data)[_index_size(n_tiles) :]
    _decode_into(out, range(first, first + len(out)), body, offsets, 0, first)


def read_jpeg_chunk_file_into(path: str | Path, n_tiles: int, first: int, out: npt.NDArray[np.uint8]) -> None:
    """:func:`decode_jpeg_chunk_into` for a chunk stored as a file: only its index and the wanted tiles' bytes are read."""
    size = _index_size(n_tiles)
    with open(path, "rb") as f:
        offsets = _parse_index(f.read(size), n_tiles, str(path))
        _check_rows(first, len(out), n_tiles, str(path))
        if not len(out):
            return
        begin, end = int(offsets[first]), int(offsets[first + len(out)])
        f.seek(size + begin)
        body = f.read(end - begin)
    if len(body) != end - begin:
        raise StoreError(f"{path}: the JPEG tile chunk is cut short; re-run the tiling")
    _decode_into(out, range(first, first + len(out)), memoryview(body), offsets, begin, first)


def _check_rows(first: int, count: int, n_tiles: int, where: str) -> None:
    if first < 0 or first + count > n_tiles:
        raise StoreError(f"{where}: tiles {first}..{first + count - 1} asked of a chunk of {n_tiles}")


def _decode_into(
    flat: npt.NDArray[np.uint8],
    wanted: Iterable[int],
    body: memoryview,
    offsets: npt.NDArray[np.uint64],
    base: int,
    first: int = 0,
) -> None:
    """Decode the ``wanted`` tiles of a chunk into ``flat[i - first]``: RGB tiles straight into their place (a
    fresh array per tile would be mapped and zero-filled by the kernel: larger than glibc's mmap threshold)."""
    import imagecodecs

    rgb = flat.ndim == 4 and flat.shape[-1] == 3 and flat.flags.c_contiguous
    for i in wanted:
        start, stop = int(offsets[i]) - base, int(offsets[i + 1]) - base
        tile = body[start:stop]  # a view, not a copy: imagecodecs takes any buffer (its stub says bytes)
        if rgb:
            try:
                imagecodecs.jpeg8_decode(tile, out=flat[i - first])  # type: ignore[arg-type]
                continue
            except Exception:  # not this tile's shape or colours: decode it on its own, as below
                pass
        flat[i - first] = np.asarray(imagecodecs.jpeg8_decode(tile)).reshape(flat.shape[1:])  # type: ignore[arg-type]


def _selected_tiles(lead: tuple[int, ...], image_ndim: int, selection: SelectorTuple) -> npt.NDArray[np.intp]:
    """Flat indices of the tiles a chunk selection touches (sorted, unique)."""
    if not lead:
        return np.array([0], dtype=np.intp)
    if not isinstance(selection, tuple):
        selection = (selection,)
    grid = np.arange(int(np.prod(lead)), dtype=np.intp).reshape(lead + (1,) * image_ndim)
    # Keep the tile axes of the selection; collapse the image axes to their first element.
    collapsed: list[Any] = []
    for axis, sel in enumerate(selection):
        if axis < len(lead):
            collapsed.append(sel)
        elif isinstance(sel, slice):
            collapsed.append(slice(0, 1))
        elif isinstance(sel, np.ndarray):
            collapsed.append(np.zeros_like(sel))
        else:
            collapsed.append(0)
    return np.unique(np.asarray(grid[tuple(collapsed)]))


register_codec(CODEC_NAME, JpegTileCodec)
