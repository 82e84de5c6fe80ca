"""CLAM / TRIDENT-style ``.h5`` feature files, so embeddings go to the MIL tools people already use.

One ``<slide_id>.h5`` per slide::

    features   (N, C) float32|float16    one row per tile
    coords     (N, 2) int64              level-0 top-left (x, y) of each tile, in pixels

The frame of ``coords`` is written as attributes on the ``coords`` dataset (where CLAM's
``Whole_Slide_Bag_FP`` and TRIDENT's ``read_coords`` look) and mirrored on the file root:

``patch_size``
    tile side in pixels at the stored resolution (``mpp``);
``patch_level``
    pyramid level the pixels were read from (CLAM reads ``patch_size`` px at this level; the two
    agree whenever the tiles were not resampled, ``resampled == False``);
``level0_patch_size`` / ``patch_size_level0``
    tile side in level-0 pixels (the first name as asked for here, the second as TRIDENT spells it);
``mpp``
    µm/px of the tiles; ``level0_mpp`` the slide's level-0 µm/px;
``level0_magnification`` / ``target_magnification``
    TRIDENT's magnifications (objective power when known, else 10 / µm/px);
``level0_width`` / ``level0_height``, ``overlap`` (px at ``mpp``), ``name`` (the slide id),
``resampled``, ``encoder``, ``embedding_dim``.

Files are written with :func:`wsi_encoder.io.files.atomic_path` (a unique temporary beside the target, normal
permissions, moved into place), so a reader never sees half a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import StoreError
from wsi_encoder.io.files import atomic_path


@dataclass(frozen=True)
class H5Features:
    """A feature file read back: arrays and the ``coords`` attributes."""

    features: npt.NDArray[np.floating[Any]]
    coords: npt.NDArray[np.int64]
    attrs: dict[str, Any]


def _attr_value(value: Any) -> Any:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def coords_attrs(slide_id: str, slide_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``coords`` attributes of a slide from its patch/embedding store attributes.

    Parameters
    ----------
    slide_id
        Slide name.
    slide_attrs
        Attributes holding ``tile_size``, ``tile_size_l0``, ``stride_l0``, ``level``,
        ``actual_mpp`` (or ``target_mpp``), ``slide_mpp``, ``objective_power``, ``width``,
        ``height``, ``resampled``.
    """
    tile_size = int(slide_attrs["tile_size"])
    tile_l0 = float(slide_attrs.get("tile_size_l0") or tile_size)
    stride_l0 = float(slide_attrs.get("stride_l0") or tile_l0)
    mpp = slide_attrs.get("actual_mpp") or slide_attrs.get("target_mpp")
    l0_mpp = slide_attrs.get("slide_mpp")
    power = slide_attrs.get("objective_power")
    l0_mag = float(power) if power else (10.0 / float(l0_mpp) if l0_mpp else None)
    target_mag = l0_mag * float(l0_mpp) / float(mpp) if (l0_mag and l0_mpp and mpp) else None
    overlap = round((tile_l0 - stride_l0) * tile_size / tile_l0) if tile_l0 else 0
    return {
        "patch_size": tile_size,
        "patch_level": int(slide_attrs.get("level") or 0),
        "level0_patch_size": round(tile_l0),
        "patch_size_level0": round(tile_l0),
        "mpp": None if mpp is None else float(mpp),
        "level0_mpp": None if l0_mpp is None else float(l0_mpp),
        "level0_magnification": l0_mag,
        "target_magnification": target_mag,
        "level0_width": slide_attrs.get("width"),
        "level0_height": slide_attrs.get("height"),
        "overlap": max(0, overlap),
        "resampled": bool(slide_attrs.get("resampled", False)),
        "name": slide_id,
    }


def write_h5_features(
    path: str | Path,
    features: npt.NDArray[np.floating[Any]],
    coords: npt.NDArray[np.integer[Any]],
    attrs: Mapping[str, Any],
    *,
    feature_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide's ``features`` and ``coords`` to ``path`` atomically.

    Parameters
    ----------
    path
        Output ``.h5`` file (its folder is created).
    features
        ``(N, C)`` embeddings.
    coords
        ``(N, 2)`` level-0 ``(x, y)`` tile positions.
    attrs
        Attributes of ``coords`` (and of the file root), see :func:`coords_attrs`.
    feature_attrs
        Attributes of ``features`` (e.g. the encoder identity).

    Raises
    ------
    StoreError
        ``features`` and ``coords`` do not align.
    """
    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise StoreError(f"{path}: features {features.shape} and coords {coords.shape} do not align")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        fset = fh.create_dataset("features", data=features)
        cset = fh.create_dataset("coords", data=coords)
        for key, value in attrs.items():
            cset.attrs[key] = _attr_value(value)
            fh.attrs[key] = _attr_value(value)
        for key, value in (feature_attrs or {}).items():
            fset.attrs[key] = _attr_value(value)
    return path


def read_h5_features(path: str | Path) -> H5Features:
    """Read a feature file written by :func:`write_h5_features` (or by CLAM / TRIDENT).

    Raises
    ------
    StoreError
        The file is unreadable or lacks ``features``/``coords``.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            features = np.asarray(fh["features"][:])
            coords = np.asarray(fh["coords"][:], dtype=np.int64)
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fh["coords"].attrs.items()}
    except (OSError, KeyError) as exc:
        raise StoreError(f"{path}: not a features/coords .h5 file ({exc})") from exc
    return H5Features(features=features, coords=coords, attrs=attrs)
