"""A trained slide classifier on disk: ``model.safetensors`` (plain arrays, no pickle) and ``model.json``.

``model.json`` holds the model's name, config and sizes, the classes, the weights' sha256 and what the
caller adds (``classify train`` adds the training cohort and the ``provenance`` of its embeddings:
encoder and tile spec). Kept apart from the training pipeline so that loading a model for prediction
imports neither scikit-learn's model selection nor the plotting stack.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as save_safetensors

from wsi_encoder import __version__
from wsi_encoder.errors import CheckpointError, WsiEncoderError
from wsi_encoder.models.slide_classifiers import SlideClassifier, create_slide_classifier

MODEL_FORMAT = "wsi_encoder.slide_classifier/1"
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_with(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # plain open: the umask applies
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def save_model(model: SlideClassifier, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights as plain arrays, no pickle) and ``model.json`` (config + ``meta``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: v if v.flags.c_contiguous else np.ascontiguousarray(v) for k, v in model.state_arrays().items()}
    _replace_with(out / MODEL_WEIGHTS, save_safetensors(arrays, metadata={"format": MODEL_FORMAT, "model": model.name}))
    record = {
        "format": MODEL_FORMAT,
        **model.describe(),
        **meta,
        "weights": MODEL_WEIGHTS,
        "weights_sha256": _sha256(out / MODEL_WEIGHTS),
        "wsi_encoder_version": __version__,
    }
    _replace_with(out / MODEL_JSON, json.dumps(_json_ready(record), indent=2).encode())
    return out / MODEL_JSON


def load_model(model_dir: str | Path, device: str = "auto") -> tuple[SlideClassifier, dict[str, Any]]:
    """Load a model saved by :func:`save_model` (or a ``classify train`` output folder).

    Raises
    ------
    CheckpointError
        When the folder, ``model.json`` or the weights are missing, corrupt or do not match.
    """
    folder = Path(model_dir)
    meta_path = folder / MODEL_JSON
    if not meta_path.is_file():
        raise CheckpointError(f"{folder}: no {MODEL_JSON} (pass the --out folder of `wsienc classify train`)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from exc
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {MODEL_FORMAT!r}")
    weights = folder / str(meta.get("weights", MODEL_WEIGHTS))
    if not weights.is_file():
        raise CheckpointError(f"{weights}: model weights are missing")
    if meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: checksum differs from {MODEL_JSON} (file changed or corrupt)")
    try:
        arrays = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from exc
    try:
        model = create_slide_classifier(meta["name"], int(meta["in_dim"]), int(meta["num_classes"]), meta["config"], device)
    except (KeyError, WsiEncoderError) as exc:
        raise CheckpointError(f"{meta_path}: cannot rebuild the model ({exc})") from exc
    model.load_state_arrays(arrays)
    return model, meta
