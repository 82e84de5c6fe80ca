"""wsi_encoder: whole-slide images to patch stores, embedding grids and slide-level models.

``import wsi_encoder`` stays light: it imports neither torch, dask nor openslide. Heavy entry
points are loaded on first use through module ``__getattr__``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "open_slide": "wsi_encoder.io.slides",
    "SlideReader": "wsi_encoder.io.slides",
    "load_encoder": "wsi_encoder.models.checkpoint",
    "build_encoder": "wsi_encoder.models.encoders",
    "create_encoder": "wsi_encoder.models.encoders",
    "list_encoders": "wsi_encoder.models.encoders",
    "tile_cohort": "wsi_encoder.pipelines.tile_cohort",
    "encode_store": "wsi_encoder.pipelines.encode_store",
    "train_encoder": "wsi_encoder.pipelines.train_encoder",
    "train_classifier": "wsi_encoder.pipelines.classify",
    "predict": "wsi_encoder.pipelines.classify",
    "run_lomo": "wsi_encoder.pipelines.lomo",
    "run_demo": "wsi_encoder.pipelines.demo",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_encoder' has no attribute {name!r}")
    return getattr(import_module(module), name)
