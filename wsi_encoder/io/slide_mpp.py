"""A slide's µm/px from what records it: the ``--slide-mpp-csv`` table, OME-XML, plausibility.

The slide readers (:mod:`wsi_encoder.io.slides`, :mod:`wsi_encoder.io.dicom_slides`) read their
metadata's µm/px through :func:`valid_mpp`; ``wsienc tile --slide-mpp-csv`` through
:func:`read_slide_mpp_csv`; OME-TIFFs through :func:`ome_mpp`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from wsi_encoder.errors import InvalidParameterError, first_line
from wsi_encoder.io.urls import is_url, normalize

#: Mpp values outside this range (µm/px) are metadata noise, not a resolution.
MPP_RANGE = (0.01, 1000.0)
#: µm per TIFF ResolutionUnit (its names in OpenSlide's properties, its codes in the tag).
RESOLUTION_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0, 3: 1e4, 2: 25400.0}


def valid_mpp(value: Any) -> float | None:
    """``value`` as µm/px when it is a plausible resolution (within :data:`MPP_RANGE`), else None."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        return None
    return mpp


def read_slide_mpp_csv(path: str | Path) -> dict[str, float]:
    """Per-slide level-0 µm/px from a CSV with a header ``slide_id,mpp`` or ``path,mpp``.

    Returns ``{key: mpp}`` where a key is a slide id, or a slide path resolved against the CSV's
    folder (absolute). Raises :class:`~wsi_encoder.errors.InvalidParameterError` naming the file and
    line of the first bad row.
    """
    import csv

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InvalidParameterError(f"{path}: cannot read the slide mpp CSV ({first_line(exc)})") from exc
    rows = list(csv.reader(text.splitlines()))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    key = "slide_id" if "slide_id" in header else "path" if "path" in header else None
    if key is None or "mpp" not in header:
        raise InvalidParameterError(f"{path}: the slide mpp CSV needs a header 'slide_id,mpp' or 'path,mpp' (got {','.join(header) or 'nothing'})")
    ki, mi = header.index(key), header.index("mpp")
    table: dict[str, float] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(ki, mi):
            raise InvalidParameterError(f"{path}:{line}: expected {key} and mpp, got {row!r}")
        mpp = valid_mpp(row[mi].strip())
        if mpp is None:
            raise InvalidParameterError(f"{path}:{line}: mpp {row[mi]!r} is not a resolution in µm/px")
        name = row[ki].strip()
        if key == "path":  # a slide URL is kept as it is; a local path is resolved against the CSV's folder
            name = str(normalize(name)) if is_url(name) else str((path.parent / Path(name).expanduser()).resolve())
        table[name] = mpp
    return table


_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6}


def ome_mpp(xml: str, image_index: int = 0) -> tuple[float, float] | None:
    """``(mpp_x, mpp_y)`` of OME-XML ``Image`` ``image_index`` from its ``Pixels`` PhysicalSizeX/Y (and units), or None.

    The OME-XML is the authority on an OME-TIFF's pixel size; an unknown unit or a missing or implausible
    value gives None (the caller falls back to the TIFF resolution tags, then to ``--slide-mpp``).
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not 0 <= image_index < len(images):
        return None
    pixels = next((el for el in images[image_index] if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    values = []
    for axis in ("X", "Y"):
        size, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        scale = _OME_UNITS_UM.get(unit)
        try:
            value = valid_mpp(float(size) * scale) if size is not None and scale is not None else None
        except ValueError:
            value = None
        if value is None:
            return None
        values.append(value)
    return (values[0], values[1])
