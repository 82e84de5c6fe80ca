"""One slide-reader interface with openslide semantics over two backends (openslide, tiffslide).

Frames, as everywhere in this package:

* ``location_l0`` is an ``(x, y)`` position in level-0 pixels;
* ``size`` is ``(width, height)`` in pixels of the level being read;
* ``mpp`` is µm per pixel, ``(mpp_x, mpp_y)`` at level 0, or ``None`` when the slide does not say.

Readers are cheap to re-open and are never shipped between processes: pickling a reader pickles its
path, backend and mpp override, and unpickling opens the file again (see :func:`get_reader` for the
per-process cache dask workers use).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from wsi_encoder.errors import (
    InvalidParameterError,
    MissingMppError,
    SlideNotFoundError,
    SlideReadError,
    first_line,
)
from wsi_encoder.io.slide_mpp import RESOLUTION_UNIT_UM, ome_mpp, valid_mpp
from wsi_encoder.io.tiff_regions import TiffTileDecoder, cached_decoder
from wsi_encoder.io.urls import is_url, normalize

logger = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tiffslide", "wsidicom"]
#: ``wsidicom`` reads DICOM WSI folders only (io/dicom_slides.py); ``auto`` sends those folders to it.
BACKENDS: tuple[str, ...] = ("openslide", "tiffslide", "wsidicom")
RGBArray = npt.NDArray[np.uint8]

#: Largest number of level pixels read at once when building a thumbnail from a large level.
_STRIP_PIXELS = 8192 * 1024


@dataclass(frozen=True)
class SlideInfo:
    """What a slide says about itself (the ``wsienc info --json`` record)."""

    path: str
    backend: str
    vendor: str | None
    width: int
    height: int
    level_count: int
    level_dimensions: list[list[int]]
    level_downsamples: list[float]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    #: Levels another installed backend lists for the same file where they differ (``{backend: [[w, h], ...]}``).
    other_backends: dict[str, list[list[int]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level to read for a target resolution, and the resampling it needs.

    ``scale`` is the factor from read-level pixels to target pixels (``level_mpp / target_mpp``):
    1.0 means the level is used as it is, below 1.0 the read is downsampled.
    """

    level: int
    level_mpp: float
    target_mpp: float
    scale: float

    @property
    def resample(self) -> bool:
        """Whether pixels read at :attr:`level` must be resampled to reach the target."""
        return self.scale != 1.0


def resize_rgb(image: RGBArray, size: tuple[int, int]) -> RGBArray:
    """Resample an RGB array to ``size = (width, height)`` with antialiasing (Pillow Lanczos)."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    resized = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=None)
    return np.asarray(resized)


class SlideReader(ABC):
    """A whole-slide image with openslide semantics.

    Parameters
    ----------
    path
        The slide file, or its URL (``s3://...``, ``https://...``; tiffslide only).
    mpp
        Override of the level-0 resolution in µm/px (``--slide-mpp``); used when the metadata is
        missing or wrong.
    """

    backend: str = ""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path: Path | str = str(path) if is_url(path) else Path(path)
        self._mpp_override = None if mpp is None else float(mpp)
        if self._mpp_override is not None and valid_mpp(self._mpp_override) is None:
            raise InvalidParameterError(f"slide mpp override {mpp!r} is not a resolution in µm/px")

    # ---- backend hooks -------------------------------------------------------------------------
    #: The backend's slide object (openslide.OpenSlide / tiffslide.TiffSlide, same level API).
    _slide: Any

    @cached_property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level, level 0 first."""
        return tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)

    @cached_property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0."""
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    @abstractmethod
    def properties(self) -> dict[str, Any]:
        """The backend's raw property map."""

    @abstractmethod
    def _metadata_mpp(self) -> tuple[float, float] | None:
        """Level-0 µm/px from vendor metadata or real TIFF resolution tags, else None."""

    @abstractmethod
    def _vendor(self) -> str | None: ...

    @abstractmethod
    def _objective_power(self) -> float | None: ...

    @abstractmethod
    def _read(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        """Read an in-bounds region as RGB uint8 ``(height, width, 3)``."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    # ---- shared behaviour ----------------------------------------------------------------------
    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (open_slide, (str(self.path), self.backend, self._mpp_override))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str | None:
        """Scanner vendor as the backend reports it (``aperio``, ``hamamatsu``, ``generic-tiff`` ...)."""
        return self._vendor()

    @property
    def objective_power(self) -> float | None:
        """Nominal objective magnification, or None when unknown."""
        return self._objective_power()

    @property
    def metadata_mpp(self) -> float | None:
        """Level-0 µm/px the file records (mean of x and y), ignoring any override; None when it does not say."""
        mpp = self._metadata_mpp()
        return None if mpp is None else (mpp[0] + mpp[1]) / 2.0

    def override_mpp(self, mpp: float | None) -> None:
        """Set (or with None, clear) the level-0 µm/px used instead of the metadata."""
        if mpp is not None and valid_mpp(mpp) is None:
            raise InvalidParameterError(f"{self.path}: slide mpp {mpp!r} is not a resolution in µm/px")
        self._mpp_override = None if mpp is None else float(mpp)

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 ``(mpp_x, mpp_y)`` in µm/px: the override if given, else metadata, else None."""
        if self._mpp_override is not None:
            return (self._mpp_override, self._mpp_override)
        return self._metadata_mpp()

    def require_mpp(self) -> float:
        """Return the level-0 µm/px (mean of x and y), or raise a clear error when unknown."""
        mpp = self.mpp
        if mpp is None:
            raise MissingMppError(
                f"{self.path}: the slide does not record its resolution (µm/px); "
                "pass --slide-mpp with the scanner's value (e.g. --slide-mpp 0.25 for a 40x scan)"
            )
        return (mpp[0] + mpp[1]) / 2.0

    def info(self) -> SlideInfo:
        """Collect the slide's properties into a :class:`SlideInfo`."""
        mpp = self.mpp
        width, height = self.dimensions
        return SlideInfo(
            path=str(self.path),
            backend=self.backend,
            vendor=self.vendor,
            width=int(width),
            height=int(height),
            level_count=self.level_count,
            level_dimensions=[[int(w), int(h)] for w, h in self.level_dimensions],
            level_downsamples=[float(d) for d in self.level_downsamples],
            mpp_x=None if mpp is None else mpp[0],
            mpp_y=None if mpp is None else mpp[1],
            objective_power=self.objective_power,
        )

    def level_mpp(self, level: int) -> float:
        """µm/px of ``level`` (needs a known level-0 mpp)."""
        return self.require_mpp() * self._level_scale(level)

    def _level_scale(self, level: int) -> float:
        # Effective downsample from the level's real size (rounded pyramids make the nominal one inexact).
        w0, h0 = self.dimensions
        w, h = self.level_dimensions[level]
        return (w0 / w + h0 / h) / 2.0

    def level_for_mpp(self, target_mpp: float, tolerance: float = 0.05) -> LevelChoice:
        """Choose the level to read for ``target_mpp`` µm/px.

        The chosen level is the coarsest one whose resolution is not coarser than the target
        (beyond ``tolerance``, a relative slack for scanners that report 0.2465 or 0.263 for a
        nominal 0.25). A level within the tolerance is read as it is (``scale == 1``).
        """
        if not target_mpp > 0:
            raise InvalidParameterError(f"target mpp {target_mpp!r} must be positive (µm/px)")
        if not 0 <= tolerance < 1:
            raise InvalidParameterError(f"mpp tolerance {tolerance!r} must be in [0, 1)")
        base = self.require_mpp()
        best = 0
        for level in range(self.level_count):
            if base * self._level_scale(level) <= target_mpp * (1 + tolerance):
                best = level
        level_mpp = base * self._level_scale(best)
        scale = level_mpp / target_mpp
        if abs(scale - 1.0) <= tolerance:
            scale = 1.0
        return LevelChoice(level=best, level_mpp=level_mpp, target_mpp=target_mpp, scale=scale)

    def read_level(self, level: int, x: int, y: int, width: int, height: int, fill: int = 255) -> RGBArray:
        """Read pixels ``[x, x + width) x [y, y + height)`` of pyramid ``level``, in that level's pixels.

        The one region read every consumer builds on (tiles, thumbnails, heatmaps). Returns RGB
        uint8 ``(height, width, 3)``; parts outside the level are ``fill`` (255: white glass of a
        bright-field slide, 0: the dark background of a fluorescence slide). Backends that can decode
        the file's own TIFF tiles do so here (a private fast path, same pixels).
        """
        if not 0 <= level < self.level_count:
            raise InvalidParameterError(f"{self.path}: level {level!r} out of range 0..{self.level_count - 1}")
        x, y, width, height = int(x), int(y), int(width), int(height)
        if width <= 0 or height <= 0:
            raise InvalidParameterError(f"region size {(width, height)!r} must be positive (width, height)")
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lw), min(y + height, lh)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return self._read_level(level, x, y, width, height)
        out = np.full((height, width, 3), fill, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_level_into(self, level: int, x: int, y: int, out: RGBArray, fill: int = 255) -> None:
        """Read the ``out.shape[:2]`` = ``(height, width)`` pixels of ``level`` at ``(x, y)`` into ``out``.

        The same pixels as :meth:`read_level` (parts outside the level are ``fill``), written into a
        caller's buffer, such as one tile of a chunk: readers that decode the file's own tiles copy
        each decoded tile straight into it (:attr:`reads_into`); the others read the region and copy it.
        """
        height, width = int(out.shape[0]), int(out.shape[1])
        if not 0 <= level < self.level_count:
            raise InvalidParameterError(f"{self.path}: level {level!r} out of range 0..{self.level_count - 1}")
        if width <= 0 or height <= 0 or out.shape[2:] != (3,) or out.dtype != np.uint8:
            raise InvalidParameterError(f"output buffer {out.shape} {out.dtype} must be (height, width, 3) uint8")
        x, y = int(x), int(y)
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lw), min(y + height, lh)
        if (x0, y0, x1, y1) != (x, y, x + width, y + height):
            out[...] = fill
            if x1 <= x0 or y1 <= y0:
                return
            out = out[y0 - y : y1 - y, x0 - x : x1 - x]
        self._read_level_into(level, x0, y0, out)

    @property
    def reads_into(self) -> bool:
        """Whether :meth:`read_level_into` decodes into the buffer (cheap per tile) rather than reading a region."""
        return False

    def _read_level_into(self, level: int, x: int, y: int, out: RGBArray) -> None:
        """Read an in-bounds region of ``level`` into ``out`` (default: a region read and one copy)."""
        out[...] = self._read_level(level, x, y, int(out.shape[1]), int(out.shape[0]))

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> RGBArray:
        """Read an in-bounds region of ``level`` (level pixels) through the backend's ``_read``."""
        ds = self.level_downsamples[level]
        # ceil(x * ds) / ds lies in [x, x + 1/ds), so the backend's floor(location / ds) gives back x (ds >= 1).
        return self._read((math.ceil(x * ds), math.ceil(y * ds)), level, (width, height))

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        """Read ``size = (width, height)`` pixels of ``level`` whose top-left is ``location_l0`` (openslide API).

        Returns RGB uint8 ``(height, width, 3)``. Parts outside the slide are white, as are
        transparent pixels (openslide's alpha is composited over white). Library code reads through
        :meth:`read_level`; this is the familiar entry point for users.
        """
        if not 0 <= level < self.level_count:
            raise InvalidParameterError(f"{self.path}: level {level!r} out of range 0..{self.level_count - 1}")
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise InvalidParameterError(f"region size {size!r} must be positive (width, height)")
        ds = self.level_downsamples[level]
        return self.read_level(level, math.floor(location_l0[0] / ds), math.floor(location_l0[1] / ds), width, height)

    def get_thumbnail(self, max_size: int = 1024) -> RGBArray:
        """An RGB thumbnail whose longer side is at most ``max_size`` pixels.

        Built from the coarsest level that still has enough pixels, strip by strip, so memory stays
        bounded even for single-level gigapixel files.
        """
        w0, h0 = self.dimensions
        factor = max(w0, h0) / max_size
        if factor <= 1:
            return self.read_level(0, 0, 0, w0, h0)
        tw, th = max(1, round(w0 / factor)), max(1, round(h0 / factor))
        level = 0
        for candidate in range(self.level_count):
            cw, ch = self.level_dimensions[candidate]
            if cw >= tw and ch >= th:
                level = candidate
        lw, lh = self.level_dimensions[level]
        rows_per_strip = max(1, int(_STRIP_PIXELS // max(lw, 1) / (lh / th)))
        strips = []
        for ty in range(0, th, rows_per_strip):
            ty1 = min(th, ty + rows_per_strip)
            ly0, ly1 = round(ty * lh / th), round(ty1 * lh / th)
            strip = self.read_level(level, 0, ly0, lw, max(1, ly1 - ly0))
            strips.append(resize_rgb(strip, (tw, ty1 - ty)))
        return np.concatenate(strips, axis=0)

    def validate(self) -> None:
        """Decode a little of the coarsest level, so a truncated or corrupt file fails here, clearly."""
        level = self.level_count - 1
        lw, lh = self.level_dimensions[level]
        try:
            self.read_level(level, 0, 0, min(lw, 512), min(lh, 512))
            self.read_level(level, lw - min(lw, 512), lh - min(lh, 512), min(lw, 512), min(lh, 512))
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cannot decode the slide's pixels ({first_line(exc)}); the file may be truncated or corrupt") from exc


class OpenSlideReader(SlideReader):
    """Reader backed by openslide-python (C OpenSlide from openslide-bin)."""

    backend = "openslide"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideReadError(f"{self.path}: not a format OpenSlide can read") from exc
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{self.path}: OpenSlide cannot open it ({first_line(exc)})") from exc

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self._slide.properties)

    def _metadata_mpp(self) -> tuple[float, float] | None:
        props = self._slide.properties
        mx, my = valid_mpp(props.get("openslide.mpp-x")), valid_mpp(props.get("openslide.mpp-y"))
        if mx is not None and my is not None:
            return (mx, my)
        unit = RESOLUTION_UNIT_UM.get(str(props.get("tiff.ResolutionUnit", "")).lower())
        if unit is None:
            return None
        try:
            rx, ry = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
        except (KeyError, ValueError):
            return None
        mx, my = valid_mpp(unit / rx) if rx > 0 else None, valid_mpp(unit / ry) if ry > 0 else None
        return (mx, my) if mx is not None and my is not None else None

    def _vendor(self) -> str | None:
        return self._slide.properties.get("openslide.vendor")

    def _objective_power(self) -> float | None:
        value = self._slide.properties.get("openslide.objective-power")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def _read(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        import openslide

        try:
            rgba = np.asarray(self._slide.read_region(location_l0, level, size))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: cannot decode region at {location_l0} level {level} ({first_line(exc)}); "
                "the file may be truncated or corrupt"
            ) from exc
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        a = alpha[..., None].astype(np.float32) / 255.0
        return np.round(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


class TiffSlideReader(SlideReader):
    """Reader backed by tiffslide (pure Python: tifffile + imagecodecs); also reads plain TIFFs."""

    backend = "tiffslide"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        import tiffslide

        try:
            with warnings.catch_warnings():
                # tiffslide warns that its NDPI metadata parsing is partial; mpp/objective are still read.
                warnings.filterwarnings("ignore", message=".*metadata parsing only partially implemented.*")
                self._slide = tiffslide.TiffSlide(self._source())
                self._props = dict(self._slide.properties)
        except Exception as exc:
            raise SlideReadError(f"{self.path}: not a readable slide ({first_line(exc)})") from exc

    def _source(self) -> Any:
        """What tiffslide opens: the local path (a remote reader gives a prefetching file object)."""
        return str(self.path)

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self._props)

    def _metadata_mpp(self) -> tuple[float, float] | None:
        props = self._props
        if props.get("tiffslide.vendor") is not None:
            mx, my = valid_mpp(props.get("tiffslide.mpp-x")), valid_mpp(props.get("tiffslide.mpp-y"))
            if mx is not None and my is not None:
                return (mx, my)
        tif = self._slide.ts_tifffile
        if tif.is_ome and tif.ome_metadata:
            found = ome_mpp(tif.ome_metadata, int(props.get("tiffslide.series-index") or 0))
            if found is not None:
                return found
        # Generic TIFF: trust the resolution tags only when their unit is a real length.
        page = tif.pages[0]
        tags = page.tags
        unit_tag = tags.get("ResolutionUnit")
        unit = RESOLUTION_UNIT_UM.get(int(unit_tag.value)) if unit_tag is not None else None
        xres, yres = tags.get("XResolution"), tags.get("YResolution")
        if unit is None or xres is None or yres is None:
            return None
        rx = xres.value[0] / xres.value[1] if xres.value[1] else 0.0
        ry = yres.value[0] / yres.value[1] if yres.value[1] else 0.0
        mx, my = valid_mpp(unit / rx) if rx > 0 else None, valid_mpp(unit / ry) if ry > 0 else None
        return (mx, my) if mx is not None and my is not None else None

    def _vendor(self) -> str | None:
        return self._props.get("tiffslide.vendor") or "generic-tiff"

    def _objective_power(self) -> float | None:
        value = self._props.get("tiffslide.objective-power")
        return float(value) if value is not None else None

    def fast_decoder(self) -> TiffTileDecoder | None:
        """The direct TIFF tile decoder for this file (per-process cache), or None when it cannot serve it."""
        return self._fast_decoder

    @cached_property
    def _fast_decoder(self) -> TiffTileDecoder | None:
        if is_url(self.path):  # remote slides are read through tiffslide (io/remote_slides.py)
            return None
        series_index = int(self._props.get("tiffslide.series-index") or 0)
        return cached_decoder(self.path, series_index, self.level_dimensions)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> RGBArray:
        # Private fast path: decode the file's own tiles (exactly tiffslide's pixels, several times faster).
        decoder = self.fast_decoder()
        if decoder is not None:
            return decoder.read(level, x, y, width, height)
        return super()._read_level(level, x, y, width, height)

    @property
    def reads_into(self) -> bool:
        return self.fast_decoder() is not None

    def _read_level_into(self, level: int, x: int, y: int, out: RGBArray) -> None:
        decoder = self.fast_decoder()
        if decoder is None:
            super()._read_level_into(level, x, y, out)
        else:
            decoder.read(level, x, y, int(out.shape[1]), int(out.shape[0]), out=out)

    def _read(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        try:
            arr = self._slide.read_region(location_l0, level, size, as_array=True)
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot decode region at {location_l0} level {level} ({first_line(exc)}); "
                "the file may be truncated or corrupt"
            ) from exc
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[-1] == 4:
            a = arr[..., 3:4].astype(np.float32) / 255.0
            arr = np.round(arr[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])

    def close(self) -> None:
        self._slide.close()

    def __del__(self) -> None:
        # A reader dropped from get_reader's cache is not closed there (another thread may still read it):
        # its file closes when the last reference goes, not at interpreter exit with a ResourceWarning.
        with contextlib.suppress(Exception):
            self.close()


def check_pixel_format(path: Path | str, tif: Any = None) -> None:
    """Refuse TIFF-based files whose pixels are not 8-bit RGB/greyscale (e.g. multi-channel fluorescence)."""
    import tifffile

    try:
        if tif is not None:
            series = tif.series[0]
        else:
            with tifffile.TiffFile(path) as handle:
                series = handle.series[0]
        axes, shape, dtype = series.axes, series.shape, np.dtype(series.dtype)
    except Exception:  # not a TIFF (MRXS, ...) or unparsable: the backends decide
        return
    samples = shape[axes.index("S")] if "S" in axes else 1
    channels = shape[axes.index("C")] if "C" in axes else 1
    if dtype != np.uint8 or samples not in (1, 3, 4) or channels > 1:
        raise SlideReadError(
            f"{path}: {max(samples, channels)}-channel {dtype} image (axes {axes}) looks like multi-channel "
            "fluorescence or raw data; only 8-bit RGB/greyscale slides are supported, export an RGB rendering first"
        )


_READERS: dict[str, type[SlideReader]] = {"openslide": OpenSlideReader, "tiffslide": TiffSlideReader}


#: OpenSlide format names (``OpenSlide.detect_format``) whose pyramid levels are plain TIFF pages.
_TIFF_PYRAMID_FORMATS = frozenset({"aperio", "generic-tiff", "hamamatsu"})


def auto_backend_order(path: str | Path) -> list[str]:
    """The backends ``auto`` tries for ``path``, in order (the one ``auto`` rule of the package).

    Files OpenSlide identifies as Aperio SVS, generic pyramidal TIFF or Hamamatsu NDPI go to tiffslide
    first (their levels are TIFF pages, decoded directly: same pixels as OpenSlide, several times
    faster); every other file goes to OpenSlide first. The other backend is the fallback.
    """
    path = Path(path)
    fmt = None
    if path.is_file():
        try:
            import openslide

            fmt = openslide.OpenSlide.detect_format(str(path))
        except Exception as exc:  # detection is a hint only; opening reports real problems
            logger.debug("format detection failed for %s: %s", path, exc)
    if fmt in _TIFF_PYRAMID_FORMATS and (fmt != "hamamatsu" or path.suffix.lower() == ".ndpi"):
        return ["tiffslide", "openslide"]
    return ["openslide", "tiffslide"]


def open_slide(path: str | Path, backend: Backend | str = "auto", mpp: float | None = None) -> SlideReader:
    """Open a slide with ``backend`` (``auto``: the order of :func:`auto_backend_order`).

    With ``auto``, a file opened by tiffslide is kept only when its tiles can be decoded directly;
    otherwise OpenSlide reads it.

    Raises
    ------
    SlideNotFoundError
        The path does not exist.
    SlideReadError
        The path is a directory, or no backend can read the file (the first backend's reason is given).
    """
    if backend not in ("auto", *BACKENDS):
        raise InvalidParameterError(f"unknown slide backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    from wsi_encoder.io.dicom_slides import DicomSlideReader, is_dicom_folder

    if backend == "wsidicom" or (backend == "auto" and is_dicom_folder(path)):
        return DicomSlideReader(path, mpp)
    if is_url(path):
        from wsi_encoder.io.remote_slides import open_remote_slide

        return open_remote_slide(str(path), backend, mpp)
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(f"{path}: no such file")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        if is_dicom_folder(path):
            raise SlideReadError(f"{path}: a DICOM folder is read with wsidicom (--backend auto or wsidicom), not {backend}")
        raise SlideReadError(f"{path}: is a directory, not a slide file (nor a folder of DICOM instances)")
    if path.stat().st_size == 0:
        raise SlideReadError(f"{path}: empty file, not a slide")
    check_pixel_format(path)
    order = auto_backend_order(path) if backend == "auto" else [backend]
    first: SlideReadError | None = None
    set_aside: str | None = None
    for i, name in enumerate(order):
        try:
            reader = _READERS[name](path, mpp)
        except SlideReadError as exc:
            logger.debug("%s cannot open %s: %s", name, path, exc)
            first = first or exc
            continue
        if backend == "auto" and isinstance(reader, TiffSlideReader) and i < len(order) - 1 and reader.fast_decoder() is None:
            logger.debug("%s: no direct tile decoding; trying %s", path, order[i + 1])
            reader.close()
            set_aside = name
            continue
        return reader
    if set_aside is not None:  # the fallback refused the file: tiffslide reads it after all
        return _READERS[set_aside](path, mpp)
    assert first is not None
    if backend == "auto":
        raise SlideReadError(f"{path}: not a readable slide (openslide and tiffslide both refuse it: {first})") from first
    raise first


_CACHE: OrderedDict[tuple[str, str, float | None], SlideReader] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8


def get_reader(path: str | Path, backend: str = "auto", mpp: float | None = None) -> SlideReader:
    """A per-process cached reader, for workers that read many regions of the same slides.

    At most a few handles are kept (the least recently used are dropped), which bounds OpenSlide's
    per-handle tile caches.
    """
    key = (str(normalize(path)), backend, mpp)
    with _CACHE_LOCK:
        reader = _CACHE.get(key)
        if reader is not None:
            _CACHE.move_to_end(key)
            return reader
    reader = open_slide(path, backend, mpp)
    with _CACHE_LOCK:
        _CACHE[key] = reader
        while len(_CACHE) > _CACHE_SIZE:
            # Dropped, not closed: another thread may still be reading; the handle is freed with it.
            _CACHE.popitem(last=False)
    return reader


def open_slide_with_mpp(
    path: str | Path, backend: Backend | str, requested: float | None, source: str, label: str
) -> tuple[SlideReader, str, str | None]:
    """Open a slide and settle its µm/px by the one rule every command uses.

    ``source`` says what ``requested`` is: ``metadata`` (nothing requested), ``fallback`` (``--slide-mpp``:
    used only when the slide records no resolution), ``forced`` (``--force-slide-mpp``) or ``csv``
    (``--slide-mpp-csv``); the last two replace a recorded value. Returns ``(reader, mpp_source,
    note)``: where the slide's µm/px came from, and a line for the user when a recorded value was replaced.
    """
    reader = open_slide(path, backend)
    recorded = reader.metadata_mpp
    if source == "metadata" or requested is None or (source == "fallback" and recorded is not None):
        return reader, "metadata", None
    reader.override_mpp(requested)
    note = None
    if recorded is not None and not np.isclose(recorded, requested, rtol=1e-6):
        flag = "--slide-mpp-csv" if source == "csv" else "--force-slide-mpp"
        note = f"{label}: {flag} sets {requested:g} µm/px instead of the recorded {recorded:.4g}"
    return reader, source, note


def levels_elsewhere(path: str | Path, info: SlideInfo) -> dict[str, list[list[int]]]:
    """The levels the other backends list for a local ``path``, where they differ from ``info``'s.

    OpenSlide, for example, lists 7 levels for an NDPI whose file stores 4: it adds levels it decodes
    at reduced JPEG scale, which tiffslide does not list (its 4 are every level stored in the file).
    Backends that cannot open the file are left out.
    """
    if is_url(str(path)):
        return {}
    out: dict[str, list[list[int]]] = {}
    for backend in BACKENDS:
        if backend == info.backend:
            continue
        try:
            with open_slide(path, backend=backend) as other:
                dims = [[int(w), int(h)] for w, h in other.level_dimensions]
        except Exception:  # not readable by that backend: nothing to compare
            continue
        if dims != info.level_dimensions:
            out[backend] = dims
    return out


#: OME ``UnitsLength`` symbols in µm (PhysicalSize defaults to µm when no unit is given).
