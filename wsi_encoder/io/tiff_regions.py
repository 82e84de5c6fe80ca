"""Direct decoding of a tiled TIFF pyramid's own tiles: the private fast path of the tiffslide reader.

Going through a backend's ``read_region`` costs more than decoding: OpenSlide composites through
cairo (about 10x the JPEG decode time) and tiffslide decodes inside zarr's single event-loop thread,
so several worker threads of one process queue behind each other. :class:`TiffTileDecoder` instead
reads the TIFF tiles (or strips) a region touches with ``os.pread`` and decodes each with tifffile's
own decoder for the page (imagecodecs; the GIL is released while decoding), which gives exactly the
pixels tiffslide returns -- and, for the Aperio and generic TIFF files we test, exactly OpenSlide's.
A region that is exactly one JPEG tile of the file, asked for into a contiguous buffer (a grid tile
on a grid that lines up with the file's tiles), is decoded straight into that buffer: no second copy.

Only :class:`wsi_encoder.io.slides.TiffSlideReader` uses it (through :func:`cached_decoder`), inside
:meth:`~wsi_encoder.io.slides.SlideReader.read_level`; nothing else reads tiles this way.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import InvalidParameterError, SlideReadError

if TYPE_CHECKING:
    from tifffile import TiffPage

logger = logging.getLogger(__name__)

RGBArray = npt.NDArray[np.uint8]


class _Level:
    """Geometry and decoder of one pyramid level (a TIFF page)."""

    def __init__(self, page: TiffPage, keyframe: TiffPage) -> None:
        self.height, self.width = int(page.shape[0]), int(page.shape[1])
        self.chunk_h, self.chunk_w = int(page.chunks[0]), int(page.chunks[1])
        self.rows, self.cols = int(page.chunked[0]), int(page.chunked[1])
        self.samples = int(page.samplesperpixel)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.decode = keyframe.decode
        self.decodeargs: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            self.decodeargs["jpegtables"] = page.jpegtables
        if getattr(keyframe, "jpegheader", None) is not None:
            self.decodeargs["jpegheader"] = keyframe.jpegheader
        #: imagecodecs.jpeg_decode's arguments for one whole tile, as tifffile's own JPEG decoder passes
        #: them (its colour spaces for the page), or None when the level is not 8-bit RGB JPEG.
        self.jpeg: dict[str, Any] | None = None
        #: Whether decoding into a buffer gave tifffile's pixels (checked on the level's first such tile).
        self.jpeg_checked = False
        if page.compression == 7 and self.samples == 3 and page.bitspersample == 8:
            from tifffile.tifffile import jpeg_decode_colorspace

            colorspace, outcolorspace = jpeg_decode_colorspace(
                page.photometric, page.planarconfig, page.extrasamples, page.is_jfif
            )
            self.jpeg = {
                "tables": page.jpegtables,
                "header": getattr(keyframe, "jpegheader", None),
                "colorspace": colorspace,
                "outcolorspace": outcolorspace,
                "shape": (self.chunk_h, self.chunk_w),
                "bitspersample": 8,
            }


class TiffTileDecoder:
    """Region reader over the levels of one tiled TIFF series.

    Parameters
    ----------
    path
        The TIFF-based slide file.
    series_index
        The image series holding the pyramid (tiffslide's ``tiffslide.series-index``).
    level_dimensions
        ``(width, height)`` per level as the slide reader reports them; a mismatch with the TIFF
        pages raises :class:`~wsi_encoder.errors.SlideReadError` (use the reader instead).
    cache_bytes
        Decoded tiles kept (least recently used first out), so neighbouring regions read one after
        the other do not decode the tiles they share twice.
    """

    def __init__(
        self,
        path: str | Path,
        series_index: int,
        level_dimensions: tuple[tuple[int, int], ...],
        cache_bytes: int = 64 * 2**20,
    ) -> None:
        import tifffile

        self.path = Path(path)
        self._fd = -1  # set before anything can fail, so that close() (and __del__) always work
        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[series_index]
                if len(series.levels) != len(level_dimensions):
                    raise SlideReadError(f"{self.path}: TIFF series has {len(series.levels)} levels, reader {len(level_dimensions)}")
                self._levels = []
                for index, level in enumerate(series.levels):
                    page = level.pages[0]
                    if page is None or not hasattr(page, "dataoffsets"):
                        raise SlideReadError(f"{self.path}: level {index} has no readable page")
                    page = page.aspage()
                    if not page.is_tiled and page.chunked[1] != 1:
                        raise SlideReadError(f"{self.path}: level {index} is neither tiled nor striped")
                    if page.dtype != np.uint8 or page.planarconfig != 1 or page.samplesperpixel not in (1, 3):
                        raise SlideReadError(f"{self.path}: level {index} is not 8-bit interleaved RGB/greyscale")
                    if (page.shape[1], page.shape[0]) != tuple(level_dimensions[index]):
                        raise SlideReadError(f"{self.path}: level {index} size differs from the reader's")
                    self._levels.append(_Level(page, level.keyframe))
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cannot index the TIFF tiles ({exc})") from exc
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int], RGBArray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def read(self, level: int, x: int, y: int, width: int, height: int, out: RGBArray | None = None) -> RGBArray:
        """Pixels ``[y, y + height) x [x, x + width)`` of ``level`` (level pixels) as RGB uint8.

        Parts outside the level are white, as with :meth:`SlideReader.read_region`. ``out`` (a
        ``(height, width, 3)`` uint8 buffer, e.g. one tile of a chunk) receives the pixels: each
        decoded TIFF tile is copied once, straight into it.
        """
        if not 0 <= level < len(self._levels):
            raise InvalidParameterError(f"{self.path}: level {level!r} out of range 0..{len(self._levels) - 1}")
        if width <= 0 or height <= 0:
            raise InvalidParameterError(f"region size {(width, height)!r} must be positive (width, height)")
        lv = self._levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        inside = (x0, y0, x1, y1) == (x, y, x + width, y + height)
        if out is None:
            out = np.empty((height, width, 3), dtype=np.uint8)
        elif (
            inside
            and lv.jpeg is not None
            and (width, height) == (lv.chunk_w, lv.chunk_h)
            and x % lv.chunk_w == 0
            and y % lv.chunk_h == 0
            and out.flags.c_contiguous
            and self._decode_jpeg_into(lv, (y // lv.chunk_h) * lv.cols + x // lv.chunk_w, out)
        ):
            return out
        if not inside:
            out[...] = 255
        if x1 <= x0 or y1 <= y0:
            return out
        for row in range(y0 // lv.chunk_h, (y1 - 1) // lv.chunk_h + 1):
            for col in range(x0 // lv.chunk_w, (x1 - 1) // lv.chunk_w + 1):
                tile = self._tile(level, row * lv.cols + col)
                ty, tx = row * lv.chunk_h, col * lv.chunk_w
                ys, ye = max(ty, y0), min(ty + lv.chunk_h, y1)
                xs, xe = max(tx, x0), min(tx + lv.chunk_w, x1)
                out[ys - y : ye - y, xs - x : xe - x] = tile[ys - ty : ye - ty, xs - tx : xe - tx]
        return out

    def _tile(self, level: int, index: int) -> RGBArray:
        key = (level, index)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        tile = self._decode(self._levels[level], index)
        tile.flags.writeable = False
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cache_bytes += tile.nbytes
                while self._cache_bytes > self._cache_limit and self._cache:
                    self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _decode_jpeg_into(self, lv: _Level, index: int, out: RGBArray) -> bool:
        """Decode JPEG tile ``index`` of ``lv`` straight into ``out``; False when it cannot be (a sparse tile,
        a JPEG that is not the tile's size, a decode that fails) or the level's first such decode differed
        from tifffile's: the caller then takes the copying path, which reports a corrupt tile."""
        assert lv.jpeg is not None
        count = int(lv.counts[index])
        if count == 0:
            return False
        data = os.pread(self._fd, count, int(lv.offsets[index]))
        import imagecodecs

        try:
            imagecodecs.jpeg_decode(data, out=out, **lv.jpeg)
        except Exception:
            return False
        if not lv.jpeg_checked:
            if not np.array_equal(out, self._decode(lv, index)):
                logger.debug("%s: decoding JPEG tiles into the output differs from tifffile's; copying instead", self.path)
                lv.jpeg = None
                return False
            lv.jpeg_checked = True
        return True

    def _decode(self, lv: _Level, index: int) -> RGBArray:
        count = int(lv.counts[index])
        if count == 0:  # a sparse tile: the TIFF has no data there (background)
            return np.full((lv.chunk_h, lv.chunk_w, 3), 255, dtype=np.uint8)
        data = os.pread(self._fd, count, int(lv.offsets[index]))
        if len(data) != count:
            raise SlideReadError(f"{self.path}: tile {index} is cut short; the file may be truncated or corrupt")
        try:
            decoded = lv.decode(data, index, **lv.decodeargs)[0]
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cannot decode tile {index} ({exc}); the file may be corrupt") from exc
        if decoded is None:
            raise SlideReadError(f"{self.path}: tile {index} decodes to nothing; the file may be corrupt")
        tile = np.asarray(decoded).reshape(lv.chunk_h, lv.chunk_w, lv.samples)
        if lv.samples == 1:
            tile = np.repeat(tile, 3, axis=2)
        return tile


_CACHE: OrderedDict[tuple[str, int], TiffTileDecoder | None] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8


def cached_decoder(
    path: str | Path, series_index: int, level_dimensions: tuple[tuple[int, int], ...]
) -> TiffTileDecoder | None:
    """A per-process cached :class:`TiffTileDecoder` for the file, or None when its layout is not served."""
    key = (str(Path(path).resolve()), int(series_index))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    try:
        decoder: TiffTileDecoder | None = TiffTileDecoder(path, series_index, level_dimensions)
    except SlideReadError as exc:
        logger.debug("direct TIFF decoding unavailable for %s: %s", path, exc)
        decoder = None
    with _CACHE_LOCK:
        _CACHE[key] = decoder
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return decoder
