"""The one on-disk format of trained weights: a folder with ``model.safetensors`` and a JSON config.

Encoder checkpoints (``config.json``), slide classifiers (``model.json``) and DCGAN generators
(``config.json``) are all written this way::

    FOLDER/model.safetensors   the tensors (safetensors: plain arrays, nothing executable)
    FOLDER/<config>.json       what the tensors are (architecture, settings, provenance), plus
                               ``weights: "model.safetensors"`` and ``weights_sha256``

Each file is written atomically (:mod:`wsi_encoder.io.files`), and the config last: it records the
SHA-256 of the weights it belongs to, so a reader never pairs a config with weights from another
write (an interrupted save, a file copied over), and any such mismatch, a missing file or an
unreadable one is one :class:`~wsi_encoder.errors.CheckpointError` line naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from wsi_encoder.errors import CheckpointError
from wsi_encoder.io.files import atomic_path, atomic_write_bytes, atomic_write_json
from wsi_encoder.models.encoders.weights import file_sha256

WEIGHTS_FILE = "model.safetensors"

__all__ = ["WEIGHTS_FILE", "json_ready", "load_folder_weights", "read_folder_config", "save_weights_folder"]


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples as lists (strict JSON)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def save_weights_folder(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    config_name: str,
    metadata: Mapping[str, str] | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> str:
    """Write ``model.safetensors``, then ``extra_files``, then the config (last); return the weights' SHA-256.

    Parameters
    ----------
    folder
        Created when missing; files of an earlier save are replaced one by one (the config last).
    tensors
        Named tensors (moved to the CPU, made contiguous).
    config
        JSON-serialisable description; ``weights`` and ``weights_sha256`` are added.
    config_name
        The config's file name (``config.json``, ``model.json``).
    metadata
        String pairs for the safetensors header.
    extra_files
        ``{name: write(path)}``: other files of the folder (e.g. a resume state), each written by
        ``write`` to a temporary path that then replaces ``FOLDER/name``; written before the config.
    """
    from safetensors.torch import save

    out = Path(folder)
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(out / WEIGHTS_FILE, save(plain, metadata=dict(metadata) if metadata else None))
    sha = file_sha256(out / WEIGHTS_FILE)
    for name, write in (extra_files or {}).items():
        with atomic_path(out / name) as tmp:
            write(tmp)
    atomic_write_json(out / config_name, json_ready({**config, "weights": WEIGHTS_FILE, "weights_sha256": sha}))
    return sha


def read_folder_config(folder: str | os.PathLike[str], config_name: str, *, hint: str) -> dict[str, Any]:
    """The JSON config of a weights folder.

    ``hint`` ends the error line of a missing folder or config (what the user should pass instead).

    Raises
    ------
    CheckpointError
        When the folder or the config is missing, or the config is not a JSON object.
    """
    d = Path(folder)
    path = d / config_name
    if not d.is_dir():
        raise CheckpointError(f"{d}: folder does not exist ({hint})")
    if not path.is_file():
        raise CheckpointError(f"{d}: no {config_name} ({hint})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


def load_folder_weights(
    folder: str | os.PathLike[str], config: Mapping[str, Any], *, config_name: str, hint: str = ""
) -> dict[str, torch.Tensor]:
    """The tensors of a weights folder (on the CPU), checked against the SHA-256 its config records.

    ``hint`` is appended to the error line of a changed file (how to get a good one back).

    Raises
    ------
    CheckpointError
        When the weights file is missing, differs from the recorded SHA-256, or is not safetensors.
    """
    from safetensors.torch import load_file

    d = Path(folder)
    weights = d / str(config.get("weights") or WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file is missing (the folder's {config_name} names it)")
    want = config.get("weights_sha256")
    if want and file_sha256(weights) != want:
        raise CheckpointError(
            f"{weights}: SHA-256 differs from the one {config_name} records (checksum mismatch: the file was "
            f"changed, corrupted or partly written){'; ' + hint if hint else ''}"
        )
    try:
        return load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types on a corrupt header or data
        raise CheckpointError(f"{weights}: cannot read the weights ({exc})") from exc
