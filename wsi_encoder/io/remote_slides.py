"""Slides read by URL (s3://, gs://, http(s)://, ...): tiffslide over fsspec, with merged range requests.

OpenSlide reads local files only, so a remote slide is always a :class:`RemoteTiffSlideReader`: each
region's TIFF tiles are fetched first in a few merged, concurrent range requests, then decoded by
tiffslide. :func:`wsi_encoder.io.slides.open_slide` sends URLs here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from wsi_encoder.errors import InvalidParameterError, SlideNotFoundError, SlideReadError
from wsi_encoder.io.slides import BACKENDS, RGBArray, SlideReader, TiffSlideReader, check_pixel_format
from wsi_encoder.io.urls import SLIDE_BLOCK_SIZE, describe_error, filesystem

__all__ = ["RemoteTiffSlideReader", "open_remote_slide"]


class _PrefetchedFile:
    """A read-only remote file whose reads are served from byte ranges fetched ahead in one batch.

    :meth:`prefetch` fetches a list of ranges concurrently (``fs.cat_ranges``: one request per range)
    and keeps them (the most recent :data:`_PREFETCH_BYTES`); a read inside a kept range costs no
    request, any other read goes to the underlying fsspec file (headers, IFDs: block-cached).
    """

    def __init__(self, url: str) -> None:
        self._fs, self._path = filesystem(url)
        self._fh = self._fs.open(self._path, "rb", block_size=SLIDE_BLOCK_SIZE, cache_type="blockcache",
                                 cache_options={"maxblocks": 4})  # fmt: skip
        self.name = self._path.rsplit("/", 1)[-1]
        self._pos = 0
        self._parts: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch ``[(start, end), ...]`` (merged by the caller) into memory, concurrently."""
        with self._lock:
            todo = [(a, b) for a, b in ranges if a not in self._parts or len(self._parts[a]) < b - a]
        if not todo:
            return
        blobs = self._fs.cat_ranges([self._path] * len(todo), [a for a, _ in todo], [b for _, b in todo])
        with self._lock:
            for (start, _), blob in zip(todo, blobs, strict=True):
                if isinstance(blob, Exception):
                    raise blob
                self._parts[start] = bytes(blob)
            total = sum(len(v) for v in self._parts.values())
            while total > _PREFETCH_BYTES and len(self._parts) > len(todo):
                total -= len(self._parts.popitem(last=False)[1])

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = self._fh.size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        pos = self._pos
        if n is not None and n >= 0:
            with self._lock:
                for start, blob in self._parts.items():
                    if start <= pos and pos + n <= start + len(blob):
                        self._pos = pos + n
                        return blob[pos - start : pos - start + n]
        self._fh.seek(pos)
        data = self._fh.read(n)
        self._pos = pos + len(data)
        return bytes(data)

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` (any writable buffer: bytearray, numpy array ...) with the next bytes; their number."""
        view = memoryview(buffer).cast("B")  # a numpy array's len() counts items, not bytes (NDPI McuStarts)
        data = self.read(view.nbytes)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._fh.close()


#: Bytes of prefetched tile data a remote slide keeps (a few chunks' worth).
_PREFETCH_BYTES = 32 * 1024 * 1024
#: Ranges closer than this are fetched as one request (the gap is read and dropped).
_MERGE_GAP = 256 * 1024


def _tile_ranges(page: Any, x: int, y: int, width: int, height: int) -> list[tuple[int, int]]:
    """Byte ranges of the TIFF tiles of ``page`` under a level region, merged into few large ranges."""
    tw, th = int(page.tilewidth or 0), int(page.tilelength or 0)
    if not tw or not th:
        return []
    cols = -(-int(page.imagewidth) // tw)
    offsets, counts = page.dataoffsets, page.databytecounts
    spans = []
    for row in range(y // th, (y + height - 1) // th + 1):
        for col in range(x // tw, (x + width - 1) // tw + 1):
            index = row * cols + col
            if index < len(offsets) and counts[index]:
                spans.append((int(offsets[index]), int(offsets[index]) + int(counts[index])))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start - merged[-1][1] <= _MERGE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class RemoteTiffSlideReader(TiffSlideReader):
    """A slide read by URL with tiffslide; each region's TIFF tiles are fetched first in a few merged,
    concurrent range requests (about one per tile row of the region), then decoded by tiffslide."""

    def _source(self) -> Any:
        self._file = _PrefetchedFile(str(self.path))
        return self._file

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> RGBArray:
        try:
            series = self._slide.ts_tifffile.series[int(self._props.get("tiffslide.series-index") or 0)]
            page = series.levels[level].keyframe
            ranges = _tile_ranges(page, x, y, width, height)
        except Exception:  # no tile layout to plan with: tiffslide reads as it goes
            ranges = []
        if ranges:
            try:
                self._file.prefetch(ranges)
            except Exception as exc:
                raise SlideReadError(describe_error(self.path, exc)) from None
        return super()._read_level(level, x, y, width, height)

    def close(self) -> None:
        super().close()
        self._file.close()


def open_remote_slide(url: str, backend: str, mpp: float | None) -> SlideReader:
    """Open a slide by URL: tiffslide through fsspec (OpenSlide reads local files only)."""
    if backend not in ("auto", *BACKENDS):
        raise InvalidParameterError(f"unknown slide backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend == "openslide":
        raise SlideReadError(f"{url}: OpenSlide cannot read remote slides; use --backend auto or tiffslide, or copy it locally")
    fs, inner = filesystem(url)
    try:
        if not fs.isfile(inner):
            raise SlideNotFoundError(f"{url}: no such file or object")
    except SlideNotFoundError:
        raise
    except Exception as exc:
        raise SlideReadError(describe_error(url, exc)) from None
    try:
        reader = RemoteTiffSlideReader(url, mpp)
    except SlideReadError as exc:
        raise SlideReadError(
            f"{url}: not a slide tiffslide can read remotely ({str(exc).split(': ', 1)[-1]}); "
            "formats only OpenSlide reads (MRXS, VMS, SCN ...) must be copied to a local disk first"
        ) from None
    check_pixel_format(url, reader._slide.ts_tifffile)
    return reader
