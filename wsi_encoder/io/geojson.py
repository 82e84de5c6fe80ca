"""GeoJSON ``FeatureCollection`` files in the form QuPath imports (File → Import objects from file).

QuPath (v0.4 and later; ``qupath.lib.io.PathObjectTypeAdapters``) reads a ``FeatureCollection`` whose
``features`` are GeoJSON ``Feature`` objects with a ``geometry`` (``Polygon``, coordinates in pixels of
the full-resolution image, origin at its top-left corner) and ``properties`` holding QuPath's own keys:

* ``objectType``: ``"annotation"`` (a region, editable) or ``"detection"`` (an object, e.g. a scored tile);
* ``classification``: ``{"name": str, "color": [r, g, b]}``;
* ``name`` and ``color`` (``[r, g, b]``) of the object;
* ``measurements``: ``{name: number}`` (shown in QuPath's measurement table and usable in
  *Measure → Show measurement maps*);
* ``metadata``: ``{key: string}``.

Other keys are kept in the file (for other readers) and ignored by QuPath, as are the collection's own
``properties``. JSON has no NaN: non-finite numbers are written as ``null`` and measurements that are
not finite are left out (QuPath reads measurement values as numbers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.files import atomic_write_text

Ring = list[list[float]]

OBJECT_TYPES = ("annotation", "detection", "tile")


def square_ring(x0: float, y0: float, x1: float, y1: float) -> Ring:
    """The closed ring of the rectangle ``[x0, x1] x [y0, y1]`` (counter-clockwise in x-right, y-up axes)."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _clean(value.item())
    return value


def qupath_feature(
    rings: Sequence[Ring],
    object_type: str,
    *,
    name: str | None = None,
    classification: str | None = None,
    class_color: Sequence[int] | None = None,
    color: Sequence[int] | None = None,
    measurements: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One GeoJSON ``Feature`` (a ``Polygon``: exterior ring first, then holes) with QuPath properties.

    Parameters
    ----------
    rings
        Closed rings in level-0 pixel coordinates ``[[x, y], ...]``.
    object_type
        ``annotation``, ``detection`` or ``tile``.
    name, color
        The object's name and display colour ``(r, g, b)``.
    classification, class_color
        QuPath class name and its colour.
    measurements
        Numeric measurements; non-finite values are dropped.
    extra
        Further properties (ignored by QuPath, kept for other readers).
    """
    if object_type not in OBJECT_TYPES:
        raise InvalidParameterError(f"objectType {object_type!r} must be one of {', '.join(OBJECT_TYPES)}")
    if not rings or any(len(r) < 4 or r[0] != r[-1] for r in rings):
        raise InvalidParameterError("a polygon needs closed rings of at least 4 positions (first == last)")
    properties: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    if color is not None:
        properties["color"] = [int(c) for c in color]
    if classification is not None:
        cls: dict[str, Any] = {"name": classification}
        if class_color is not None:
            cls["color"] = [int(c) for c in class_color]
        properties["classification"] = cls
    if measurements:
        kept = {str(k): float(v) for k, v in measurements.items() if v is not None and math.isfinite(float(v))}
        if kept:
            properties["measurements"] = kept
    if extra:
        properties.update(_clean(dict(extra)))
    coordinates = [[[float(x), float(y)] for x, y in ring] for ring in rings]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coordinates}, "properties": properties}


def write_feature_collection(
    path: str | Path, features: Sequence[Mapping[str, Any]], properties: Mapping[str, Any] | None = None
) -> Path:
    """Write a ``FeatureCollection`` to ``path`` atomically (temporary file, then rename).

    ``properties`` go on the collection (not standard GeoJSON members but allowed as foreign members;
    QuPath ignores them).
    """
    path = Path(path)
    collection: dict[str, Any] = {"type": "FeatureCollection"}
    if properties:
        collection["properties"] = _clean(dict(properties))
    collection["features"] = list(features)
    atomic_write_text(path, json.dumps(collection, allow_nan=False, separators=(",", ":")))
    return path
