"""A trained slide classifier on disk: a weights folder (:mod:`~wsi_encoder.models.weights_folder`).

``model.safetensors`` holds the model's :meth:`~SlideClassifier.state_arrays` (plain arrays, no
pickle); ``model.json``, written last, the model's name, config and sizes, the classes, the weights'
sha256 and what the caller adds (``classify train`` adds the training cohort and the ``provenance`` of
its embeddings: encoder and tile spec). Kept apart from the training pipeline so that loading a model
for prediction imports neither scikit-learn's model selection nor the plotting stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_encoder import __version__
from wsi_encoder.errors import CheckpointError, WsiEncoderError
from wsi_encoder.models.slide_classifiers import SlideClassifier, create_slide_classifier
from wsi_encoder.models.slide_classifiers.ensemble import FoldEnsemble, split_member_arrays
from wsi_encoder.models.weights_folder import (
    WEIGHTS_FILE,
    load_folder_weights,
    read_folder_config,
    save_weights_folder,
)

MODEL_FORMAT = "wsi_encoder.slide_classifier/1"
MODEL_JSON = "model.json"
MODEL_WEIGHTS = WEIGHTS_FILE
_HINT = "pass the --out folder of `wsienc classify train`"


def save_model(model: SlideClassifier[Any] | FoldEnsemble, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights as plain arrays, no pickle), then ``model.json`` (config + ``meta``).

    A :class:`FoldEnsemble` is one folder too: its members' arrays side by side, ``ensemble`` = their number.
    """
    out = Path(out_dir)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.state_arrays().items()}
    record = {"format": MODEL_FORMAT, **model.describe(), **meta, "wsi_encoder_version": __version__}
    save_weights_folder(
        out, tensors, record, config_name=MODEL_JSON, metadata={"format": MODEL_FORMAT, "model": model.name}
    )
    return out / MODEL_JSON


def load_model(
    model_dir: str | Path, device: str = "auto"
) -> tuple[SlideClassifier[Any] | FoldEnsemble, dict[str, Any]]:
    """Load a model saved by :func:`save_model` (or a ``classify train`` output folder).

    Raises
    ------
    CheckpointError
        When the folder, ``model.json`` or the weights are missing, corrupt or do not match.
    """
    folder = Path(model_dir)
    meta = read_folder_config(folder, MODEL_JSON, hint=_HINT)
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{folder / MODEL_JSON}: format {meta.get('format')!r} is not {MODEL_FORMAT!r}")
    arrays = {k: v.numpy() for k, v in load_folder_weights(folder, meta, config_name=MODEL_JSON).items()}
    try:
        n = int(meta.get("ensemble") or 0)
        parts = split_member_arrays(arrays, n) if n else [arrays]
        members = []
        for part in parts:
            member = create_slide_classifier(
                meta["name"], int(meta["in_dim"]), int(meta["num_classes"]), meta["config"], device
            )
            member.load_state_arrays(part)
            members.append(member)
    except (KeyError, TypeError, ValueError, WsiEncoderError) as exc:
        raise CheckpointError(f"{folder / MODEL_JSON}: cannot rebuild the model ({exc})") from exc
    return (FoldEnsemble(members) if n else members[0]), meta
