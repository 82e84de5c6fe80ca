"""External tissue masks (``wsienc tile --tissue-mask DIR``): per-slide PNG masks or QuPath GeoJSON.

A mask folder holds, per slide, one of ``<name>.png``, ``<name>.geojson`` or ``<name>.json`` where
``<name>`` is the slide id, the slide file's stem or its full file name (QuPath exports
``slide.svs.geojson``). The file is looked up in that order of names, and of suffixes.

* **PNG**: any size, covering the whole slide (it is scaled to it); non-zero pixels are tissue.
* **GeoJSON** (QuPath *Export objects as GeoJSON*): ``Polygon``/``MultiPolygon`` geometries in
  level-0 pixel coordinates; their holes are not tissue. Objects whose classification name starts
  with ``Ignore`` (QuPath's ``Ignore*`` class) are cut out of the tissue. Points and lines are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import SlideReadError

MASK_SUFFIXES: tuple[str, ...] = (".png", ".geojson", ".json")


def find_mask_file(folder: str | Path, slide_id: str, slide_path: str | Path) -> Path:
    """The mask file of a slide in ``folder``; raises :class:`SlideReadError` naming what was looked for."""
    folder, slide_path = Path(folder), Path(slide_path)
    names = list(dict.fromkeys([slide_id, slide_path.stem, slide_path.name]))
    for name in names:
        for suffix in MASK_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise SlideReadError(
        f"{slide_path}: no tissue mask in {folder} (looked for {', '.join(n + '.png|.geojson|.json' for n in names)})"
    )


def load_tissue_mask(path: str | Path, width_l0: int, height_l0: int, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """The mask in ``path`` as an ``(h, w) = shape`` bool array over a ``width_l0 x height_l0`` slide."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return _png_mask(path, shape)
    return _geojson_mask(path, width_l0, height_l0, shape)


def _png_mask(path: Path, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except Exception as exc:
        raise SlideReadError(f"{path}: not a readable PNG mask ({exc})") from exc
    if grey.size != (shape[1], shape[0]):
        grey = grey.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(grey) > 0


def _features(document: Any) -> Iterator[dict[str, Any]]:
    if isinstance(document, list):
        for item in document:
            yield from _features(item)
    elif isinstance(document, dict):
        kind = document.get("type")
        if kind == "FeatureCollection":
            yield from _features(document.get("features") or [])
        elif kind == "Feature":
            yield document
        elif kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            yield {"type": "Feature", "geometry": document, "properties": {}}


def _polygons(geometry: dict[str, Any] | None) -> Iterator[list[Any]]:
    if not geometry:
        return
    kind = geometry.get("type")
    if kind == "Polygon":
        yield geometry.get("coordinates") or []
    elif kind == "MultiPolygon":
        yield from geometry.get("coordinates") or []
    elif kind == "GeometryCollection":
        for part in geometry.get("geometries") or []:
            yield from _polygons(part)


def _is_ignore(properties: dict[str, Any] | None) -> bool:
    classification = (properties or {}).get("classification") or {}
    name = classification.get("name") if isinstance(classification, dict) else classification
    return isinstance(name, str) and name.lower().startswith("ignore")


def _geojson_mask(path: Path, width_l0: int, height_l0: int, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    from skimage.draw import polygon

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SlideReadError(f"{path}: not a readable GeoJSON file ({exc})") from exc
    h, w = shape
    sx, sy = w / width_l0, h / height_l0
    tissue = np.zeros(shape, dtype=bool)
    ignore = np.zeros(shape, dtype=bool)
    n_polygons = 0
    for feature in _features(document):
        target = ignore if _is_ignore(feature.get("properties")) else tissue
        for rings in _polygons(feature.get("geometry")):
            part = np.zeros(shape, dtype=bool)
            for index, ring in enumerate(rings):
                try:
                    xy = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
                except ValueError as exc:
                    raise SlideReadError(f"{path}: a polygon ring is not a list of [x, y] points") from exc
                # Pixel centres of the mask: pixel (r, c) covers level-0 [c / sx, (c + 1) / sx).
                rr, cc = polygon(xy[:, 1] * sy - 0.5, xy[:, 0] * sx - 0.5, shape)
                part[rr, cc] = index == 0  # the exterior ring, then holes
            target |= part
            n_polygons += 1
    if n_polygons == 0:
        raise SlideReadError(f"{path}: no Polygon or MultiPolygon annotation in the GeoJSON file")
    return tissue & ~ignore
