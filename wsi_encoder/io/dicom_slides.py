"""DICOM whole-slide images through wsidicom: a slide is a folder of ``.dcm`` instances (one series).

A folder holding several series names one as ``<folder>#<SeriesInstanceUID>``; without a selection such
a folder is refused in one line listing its series. The folder may be local or a prefix on object
storage (``s3://bucket/case1/``): the instances are opened as fsspec files (with ``--storage-options``)
and handed to wsidicom, which reads frames by byte range. Pixels go through the same
:meth:`~wsi_encoder.io.slides.SlideReader.read_level` as every other backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsi_encoder.errors import SlideNotFoundError, SlideReadError, first_line
from wsi_encoder.io.slide_mpp import valid_mpp
from wsi_encoder.io.slides import RGBArray, SlideReader
from wsi_encoder.io.urls import SLIDE_BLOCK_SIZE, filesystem, is_url

__all__ = ["SERIES_SEPARATOR", "DicomSlideReader", "is_dicom_folder", "split_series"]

#: Separates a DICOM folder from the SeriesInstanceUID it selects (``case1#1.2.826...``).
SERIES_SEPARATOR = "#"
#: SOP class of VL Whole Slide Microscopy Image Storage instances.
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: File names in a folder that are never instances.
_NOT_INSTANCES = ("DICOMDIR",)


def split_series(path: str | Path) -> tuple[str | Path, str | None]:
    """``(folder, series_uid)`` of ``<folder>#<SeriesInstanceUID>``; ``(path, None)`` without a selector."""
    text = str(path)
    head, sep, uid = text.rpartition(SERIES_SEPARATOR)
    if not sep or not uid or not all(c.isdigit() or c == "." for c in uid):
        return path, None
    return (head if is_url(text) else Path(head)), uid


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: str | Path) -> bool:
    """Whether ``path`` (optionally with a ``#<SeriesInstanceUID>`` selector) names a DICOM folder.

    Local: a directory holding a ``.dcm`` file or a file with the DICOM preamble. URL: a selector, or a
    prefix (not an object) holding ``.dcm`` objects.
    """
    folder, uid = split_series(path)
    if is_url(folder):
        from wsi_encoder.io.slide_ids import SLIDE_SUFFIXES

        if uid is None and str(folder).lower().endswith(SLIDE_SUFFIXES):  # a slide file: no request spent
            return False
        fs, inner = filesystem(str(folder))
        try:
            if fs.isfile(inner):
                return False
            return uid is not None or any(str(n).lower().endswith(".dcm") for n in fs.ls(inner, detail=False))
        except Exception:  # unreachable or missing: the TIFF path reports it
            return False
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return any(p.suffix.lower() == ".dcm" for p in files) or any(_has_dicom_magic(p) for p in files[:8])


def _instance_files(folder: str | Path) -> list[str]:
    """The candidate instance files of a DICOM folder, sorted (hidden files and DICOMDIR left out)."""
    if is_url(folder):
        fs, inner = filesystem(str(folder))
        names = [str(n) for n in fs.ls(inner, detail=False) if fs.isfile(n)]
    else:
        names = [str(p) for p in Path(folder).iterdir() if p.is_file()]
    return sorted(n for n in names if not n.rsplit("/", 1)[-1].startswith(".") and n.rsplit("/", 1)[-1] not in _NOT_INSTANCES)


class DicomSlideReader(SlideReader):
    """Reader backed by wsidicom: the volume pyramid of one DICOM WSI series (default focal plane and optical path)."""

    backend = "wsidicom"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        import pydicom
        from wsidicom import WsiDicom

        folder, wanted = split_series(str(path))
        self._streams: list[Any] = []
        fs = filesystem(str(folder))[0] if is_url(folder) else None
        try:
            names = _instance_files(folder)
        except FileNotFoundError:
            raise SlideNotFoundError(f"{path}: no such DICOM folder") from None
        except NotADirectoryError:
            raise SlideReadError(f"{path}: not a folder of DICOM instances (the wsidicom backend reads DICOM WSI folders)") from None
        except Exception as exc:
            raise SlideReadError(f"{path}: cannot list the DICOM folder ({first_line(exc)})") from None
        series: dict[str, list[Any]] = {}
        for name in names:
            # Kept open: wsidicom reads frames from it (remote: 4 MiB blocks, never a whole multi-GB instance).
            stream = (fs.open(name, "rb", block_size=SLIDE_BLOCK_SIZE, cache_type="blockcache", cache_options={"maxblocks": 8})
                      if fs is not None else open(name, "rb"))  # fmt: skip
            try:
                header = pydicom.dcmread(stream, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"])
                uid = str(header.SeriesInstanceUID) if str(header.get("SOPClassUID", "")) == _WSI_SOP_CLASS else None
            except Exception:  # not a DICOM file: ignored, as wsidicom does
                uid = None
            if uid is None:
                stream.close()
                continue
            stream.seek(0)
            series.setdefault(uid, []).append(stream)
        chosen = wanted if wanted is not None else next(iter(series)) if len(series) == 1 else None
        for uid, streams in series.items():
            (self._streams if uid == chosen else []).extend(streams)
            if uid != chosen:
                for stream in streams:
                    stream.close()
        if not series:
            raise SlideReadError(f"{path}: no DICOM whole-slide image instances in this folder")
        if chosen is None:
            raise SlideReadError(
                f"{path}: the folder holds {len(series)} DICOM series ({', '.join(sorted(series))}); "
                f"name one as {folder}{SERIES_SEPARATOR}<SeriesInstanceUID>"
            )
        if not self._streams:
            raise SlideReadError(f"{path}: no series {wanted} in this folder (it holds {', '.join(sorted(series))})")
        try:
            self._wsi = WsiDicom.open_streams(self._streams)
            self._levels = list(self._wsi.pyramid)
        except Exception as exc:
            self._close_streams()
            raise SlideReadError(f"{path}: not a readable DICOM whole-slide image ({first_line(exc)})") from None
        paths = self._levels[0].optical_paths
        if len(paths) > 1:
            self.close()
            raise SlideReadError(
                f"{path}: {len(paths)} optical paths looks like multi-channel fluorescence; only RGB/greyscale "
                "slides are supported, export an RGB rendering first"
            )
        self._series_uid = chosen

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        base = self._levels[0].pixel_spacing.width
        return tuple(float(lv.pixel_spacing.width / base) for lv in self._levels)

    @property
    def properties(self) -> dict[str, Any]:
        dataset = self._levels[0].datasets[0]
        keys = ("Manufacturer", "ManufacturerModelName", "SeriesInstanceUID", "StudyInstanceUID", "ContainerIdentifier")
        return {f"dicom.{k}": str(dataset.get(k)) for k in keys if dataset.get(k) is not None}

    def _metadata_mpp(self) -> tuple[float, float] | None:
        spacing = self._levels[0].mpp  # µm/px from the level's PixelSpacing (mm)
        mx, my = valid_mpp(spacing.width), valid_mpp(spacing.height)
        return (mx, my) if mx is not None and my is not None else None

    def _vendor(self) -> str | None:
        return "dicom"

    def _objective_power(self) -> float | None:
        try:
            power = self._wsi.metadata.optical_paths[0].objective.objective_power
        except (AttributeError, IndexError, TypeError):
            return None
        return float(power) if power else None

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> RGBArray:
        # wsidicom reads in the level's own pixels (its levels are indexed by their power-of-two scale).
        try:
            image = self._wsi.read_region((x, y), self._levels[level].level, (width, height))
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot decode region ({x}, {y}) of level {level} ({first_line(exc)}); "
                "the instances may be truncated or corrupt"
            ) from exc
        arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        return np.ascontiguousarray(arr[..., :3])

    def _read(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        ds = self.level_downsamples[level]
        x, y = int(location_l0[0] // ds), int(location_l0[1] // ds)
        return self._read_level(level, x, y, size[0], size[1])

    def _close_streams(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams = []

    def close(self) -> None:
        self._wsi.close()
        self._close_streams()
