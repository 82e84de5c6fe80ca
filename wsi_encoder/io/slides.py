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

import logging
import math
import threading
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from wsi_encoder.errors import InvalidParameterError, MissingMppError, SlideNotFoundError, SlideReadError

logger = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tiffslide"]
BACKENDS: tuple[str, ...] = ("openslide", "tiffslide")
RGBArray = npt.NDArray[np.uint8]

#: Largest number of level pixels read at once when building a thumbnail from a large level.
_STRIP_PIXELS = 8192 * 1024
#: Mpp values outside this range (µm/px) are metadata noise, not a resolution.
_MPP_RANGE = (0.01, 1000.0)
_RESOLUTION_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0, 3: 1e4, 2: 25400.0}


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


def _valid_mpp(value: Any) -> float | None:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(mpp) or not _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
        return None
    return mpp


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
        The slide file.
    mpp
        Override of the level-0 resolution in µm/px (``--slide-mpp``); used when the metadata is
        missing or wrong.
    """

    backend: str = ""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self._mpp_override = None if mpp is None else float(mpp)
        if self._mpp_override is not None and _valid_mpp(self._mpp_override) is None:
            raise InvalidParameterError(f"slide mpp override {mpp!r} is not a resolution in µm/px")

    # ---- backend hooks -------------------------------------------------------------------------
    #: The backend's slide object (openslide.OpenSlide / tiffslide.TiffSlide, same level API).
    _slide: Any

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level, level 0 first."""
        return tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)

    @property
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

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        """Read ``size = (width, height)`` pixels of ``level`` whose top-left is ``location_l0``.

        Returns RGB uint8 ``(height, width, 3)``. Parts outside the slide are white, as are
        transparent pixels (openslide's alpha is composited over white).
        """
        if not 0 <= level < self.level_count:
            raise InvalidParameterError(f"{self.path}: level {level!r} out of range 0..{self.level_count - 1}")
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise InvalidParameterError(f"region size {size!r} must be positive (width, height)")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx = math.floor(location_l0[0] / ds)
        ly = math.floor(location_l0[1] / ds)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lw), min(ly + height, lh)
        if x0 == lx and y0 == ly and x1 == lx + width and y1 == ly + height:
            return self._read((int(location_l0[0]), int(location_l0[1])), level, (width, height))
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            # ceil: a fractional downsample must not start the read one level pixel early.
            loc = (math.ceil(x0 * ds), math.ceil(y0 * ds))
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read(loc, level, (x1 - x0, y1 - y0))
        return out

    def read_region_mpp(
        self,
        location_l0: tuple[int, int],
        size: tuple[int, int],
        target_mpp: float,
        tolerance: float = 0.05,
    ) -> RGBArray:
        """Read ``size = (width, height)`` pixels at ``target_mpp`` µm/px from ``location_l0``.

        Reads the level chosen by :meth:`level_for_mpp` and resamples (antialiased) only when that
        level's resolution differs from the target beyond ``tolerance``.
        """
        choice = self.level_for_mpp(target_mpp, tolerance)
        if not choice.resample:
            return self.read_region(location_l0, choice.level, size)
        read_w = max(1, round(size[0] / choice.scale))
        read_h = max(1, round(size[1] / choice.scale))
        region = self.read_region(location_l0, choice.level, (read_w, read_h))
        return resize_rgb(region, (int(size[0]), int(size[1])))

    def get_thumbnail(self, max_size: int = 1024) -> RGBArray:
        """An RGB thumbnail whose longer side is at most ``max_size`` pixels.

        Built from the coarsest level that still has enough pixels, strip by strip, so memory stays
        bounded even for single-level gigapixel files.
        """
        w0, h0 = self.dimensions
        factor = max(w0, h0) / max_size
        if factor <= 1:
            return self.read_region((0, 0), 0, (w0, h0))
        tw, th = max(1, round(w0 / factor)), max(1, round(h0 / factor))
        level = 0
        for candidate in range(self.level_count):
            cw, ch = self.level_dimensions[candidate]
            if cw >= tw and ch >= th:
                level = candidate
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        rows_per_strip = max(1, int(_STRIP_PIXELS // max(lw, 1) / (lh / th)))
        strips = []
        for ty in range(0, th, rows_per_strip):
            ty1 = min(th, ty + rows_per_strip)
            ly0, ly1 = round(ty * lh / th), round(ty1 * lh / th)
            strip = self.read_region((0, round(ly0 * ds)), level, (lw, max(1, ly1 - ly0)))
            strips.append(resize_rgb(strip, (tw, ty1 - ty)))
        return np.concatenate(strips, axis=0)

    def validate(self) -> None:
        """Decode a little of the coarsest level, so a truncated or corrupt file fails here, clearly."""
        level = self.level_count - 1
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        try:
            self.read_region((0, 0), level, (min(lw, 512), min(lh, 512)))
            self.read_region(
                (int((lw - min(lw, 512)) * ds), int((lh - min(lh, 512)) * ds)), level, (min(lw, 512), min(lh, 512))
            )
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cannot decode the slide's pixels ({_reason(exc)}); the file may be truncated or corrupt") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


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
            raise SlideReadError(f"{self.path}: OpenSlide cannot open it ({_reason(exc)})") from exc

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self._slide.properties)

    def _metadata_mpp(self) -> tuple[float, float] | None:
        props = self._slide.properties
        mx, my = _valid_mpp(props.get("openslide.mpp-x")), _valid_mpp(props.get("openslide.mpp-y"))
        if mx is not None and my is not None:
            return (mx, my)
        unit = _RESOLUTION_UNIT_UM.get(str(props.get("tiff.ResolutionUnit", "")).lower())
        if unit is None:
            return None
        try:
            rx, ry = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
        except (KeyError, ValueError):
            return None
        mx, my = _valid_mpp(unit / rx) if rx > 0 else None, _valid_mpp(unit / ry) if ry > 0 else None
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
                f"{self.path}: cannot decode region at {location_l0} level {level} ({_reason(exc)}); "
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
                self._slide = tiffslide.TiffSlide(str(self.path))
                self._props = dict(self._slide.properties)
        except Exception as exc:
            raise SlideReadError(f"{self.path}: not a readable slide ({_reason(exc)})") from exc

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self._props)

    def _metadata_mpp(self) -> tuple[float, float] | None:
        props = self._props
        if props.get("tiffslide.vendor") is not None:
            mx, my = _valid_mpp(props.get("tiffslide.mpp-x")), _valid_mpp(props.get("tiffslide.mpp-y"))
            if mx is not None and my is not None:
                return (mx, my)
        # Generic TIFF: trust the resolution tags only when their unit is a real length.
        page = self._slide.ts_tifffile.pages[0]
        tags = page.tags  # type: ignore[union-attr]
        unit_tag = tags.get("ResolutionUnit")
        unit = _RESOLUTION_UNIT_UM.get(int(unit_tag.value)) if unit_tag is not None else None
        xres, yres = tags.get("XResolution"), tags.get("YResolution")
        if unit is None or xres is None or yres is None:
            return None
        rx = xres.value[0] / xres.value[1] if xres.value[1] else 0.0
        ry = yres.value[0] / yres.value[1] if yres.value[1] else 0.0
        mx, my = _valid_mpp(unit / rx) if rx > 0 else None, _valid_mpp(unit / ry) if ry > 0 else None
        return (mx, my) if mx is not None and my is not None else None

    def _vendor(self) -> str | None:
        return self._props.get("tiffslide.vendor") or "generic-tiff"

    def _objective_power(self) -> float | None:
        value = self._props.get("tiffslide.objective-power")
        return float(value) if value is not None else None

    def _read(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        try:
            arr = self._slide.read_region(location_l0, level, size, as_array=True)
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot decode region at {location_l0} level {level} ({_reason(exc)}); "
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


def _check_pixel_format(path: Path) -> None:
    """Refuse TIFF-based files whose pixels are not 8-bit RGB/greyscale (e.g. multi-channel fluorescence)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
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


def open_slide(path: str | Path, backend: Backend | str = "auto", mpp: float | None = None) -> SlideReader:
    """Open a slide with ``backend`` (``auto``: openslide, falling back to tiffslide).

    Raises
    ------
    SlideNotFoundError
        The path does not exist.
    SlideReadError
        The path is a directory, or no backend can read the file (the first backend's reason is given).
    """
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(f"{path}: no such file")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        raise SlideReadError(f"{path}: is a directory, not a slide file")
    if path.stat().st_size == 0:
        raise SlideReadError(f"{path}: empty file, not a slide")
    if backend not in ("auto", *BACKENDS):
        raise InvalidParameterError(f"unknown slide backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    _check_pixel_format(path)
    order = list(BACKENDS) if backend == "auto" else [backend]
    first: SlideReadError | None = None
    for name in order:
        try:
            reader = _READERS[name](path, mpp)
        except SlideReadError as exc:
            logger.debug("%s cannot open %s: %s", name, path, exc)
            first = first or exc
            continue
        if name != order[0]:
            logger.debug("opened %s with %s after %s failed", path, name, order[0])
        return reader
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
    key = (str(Path(path).resolve()), backend, mpp)
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
