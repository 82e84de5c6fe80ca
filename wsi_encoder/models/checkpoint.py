"""Encoder checkpoints: write atomically, load back as a ready-to-use ``nn.Module``.

A checkpoint directory written by ``wsienc train-encoder --out DIR`` holds::

    DIR/model.safetensors   encoder weights (keys ``encoder.*``) and task heads (``heads.<task>.*``)
    DIR/config.json         encoder config (architecture, embed dim, normalisation, input µm/px),
                            tasks and classes, per-task validation metrics, versions, weights SHA-256
    DIR/train_state.pt      optimiser/scaler state and position, for ``--resume`` (tensors only)

``model.safetensors`` also carries the training record (tasks, their data paths and the pixel
digests of every training image) in its metadata, so that a copy of the weights file alone still
says what it was trained on (:func:`training_record`).

The folder is a weights folder (:mod:`wsi_encoder.models.weights_folder`): ``config.json`` is written
last and records the SHA-256 of ``model.safetensors``, so a reader never pairs a config with weights
from another step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.models.encoders import (
    Encoder,
    EncoderConfig,
    build_encoder,
    build_skeleton,
    create_encoder,
    file_sha256,
    list_encoders,
)
from wsi_encoder.models.weights_folder import (
    WEIGHTS_FILE,
    load_folder_weights,
    read_folder_config,
    save_weights_folder,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = WEIGHTS_FILE
STATE_NAME = "train_state.pt"
CHECKPOINT_FORMAT = "wsi_encoder.encoder_checkpoint"
#: The safetensors metadata key holding the training record (the config's TRAINING_RECORD_KEYS).
TRAINING_RECORD_META = "wsi_encoder.training_record"
TRAINING_RECORD_KEYS = ("format", "architecture", "tasks", "training_content")
ENCODER_PREFIX = "encoder."


def save_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    train_state: Mapping[str, Any] | None = None,
) -> str:
    """Write weights, optional resume state, then the config (last), each atomically (a weights folder).

    Parameters
    ----------
    out_dir : path
        Checkpoint directory (created).
    state_dict : mapping
        Model tensors; encoder tensors under ``encoder.``.
    config : mapping
        JSON-serialisable config; must contain ``encoder`` (an :meth:`EncoderConfig.to_dict`).
        ``format``, ``weights`` and ``weights_sha256`` are filled in.
    train_state : mapping, optional
        Tensors/plain values for resuming (saved with ``torch.save``, read with ``weights_only=True``).

    Returns
    -------
    str
        SHA-256 of the weights file.
    """
    extra: dict[str, Callable[[Path], None]] = {}
    if train_state is not None:
        state = dict(train_state)
        extra[STATE_NAME] = lambda tmp: torch.save(state, tmp)
    cfg = {"format": CHECKPOINT_FORMAT, "format_version": 1, **config}
    record = {k: cfg[k] for k in TRAINING_RECORD_KEYS if k in cfg}
    return save_weights_folder(
        out_dir,
        state_dict,
        cfg,
        config_name=CONFIG_NAME,
        extra_files=extra,
        metadata={TRAINING_RECORD_META: json.dumps(record)},
    )


def training_record(weights_file: str | Path) -> dict[str, Any] | None:
    """What a ``wsienc train-encoder`` model was trained on (``format``, ``tasks``, ``training_content``).

    Read from the weights file itself (its safetensors metadata travel with any copy of the file),
    else from the checkpoint ``config.json`` beside it; ``None`` for weights that are not a
    train-encoder model.
    """
    p = Path(weights_file)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as fh:
                text = (fh.metadata() or {}).get(TRAINING_RECORD_META)
        except Exception as exc:  # not a safetensors file after all
            raise CheckpointError(f"{p}: unreadable safetensors file ({exc})") from exc
        if text:
            record = json.loads(text)
            if isinstance(record, dict):
                return record
    if (p.parent / CONFIG_NAME).is_file():
        try:
            return read_checkpoint_config(p.parent)
        except CheckpointError:
            return None
    return None


def read_checkpoint_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """Read and check ``DIR/config.json`` of a train-encoder checkpoint."""
    cfg = read_folder_config(ckpt_dir, CONFIG_NAME, hint="not an encoder checkpoint; write one with wsienc train-encoder")
    if cfg.get("format") != CHECKPOINT_FORMAT or "encoder" not in cfg:
        raise CheckpointError(f"{Path(ckpt_dir) / CONFIG_NAME}: not a wsi_encoder encoder checkpoint config")
    return cfg


def read_train_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The resume state saved beside a checkpoint, or ``None`` when there is none."""
    p = Path(ckpt_dir) / STATE_NAME
    if not p.is_file():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated/corrupt file
        raise CheckpointError(f"cannot read resume state {str(p)!r}: {exc}") from exc


def read_model_state(ckpt_dir: str | Path, cfg: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``DIR/model.safetensors``, checked against the config's SHA-256."""
    cfg = read_checkpoint_config(ckpt_dir) if cfg is None else cfg
    return load_folder_weights(
        ckpt_dir, cfg, config_name=CONFIG_NAME, hint="re-run wsienc train-encoder with --resume"
    )


def load_encoder(ckpt_dir: str | Path) -> Encoder:
    """Load the encoder of a ``wsienc train-encoder`` checkpoint.

    Parameters
    ----------
    ckpt_dir : path
        Directory with ``config.json`` and ``model.safetensors``.

    Returns
    -------
    Encoder
        In eval mode, on the CPU. It maps a float ``(B, 3, H, W)`` tensor in [0, 1] (tiles at
        ``.config.input_mpp`` µm/px) to embeddings ``(B, D)``, applying its own normalisation.
        ``.config`` (:class:`EncoderConfig`), ``.embedding_dim`` and ``.weights_sha256`` identify it;
        ``.checkpoint_config`` holds the whole ``config.json`` (tasks, classes, metrics).
    """
    cfg = read_checkpoint_config(ckpt_dir)
    try:
        enc_cfg = EncoderConfig.from_dict(cfg["encoder"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"bad encoder section in {str(Path(ckpt_dir) / CONFIG_NAME)!r}: {exc}") from exc
    if enc_cfg.name not in list_encoders():
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} uses encoder {enc_cfg.name!r}, which is not registered here"
        )
    backbone = cfg.get("backbone") or {}
    partial = backbone.get("stored") == "trainable"
    size: dict[str, Any] = {"embed_dim": enc_cfg.embed_dim, "input_size": enc_cfg.input_size, "input_mpp": enc_cfg.input_mpp}
    if partial:  # the pretrained backbone file, then the trained tensors on top
        encoder = create_encoder(enc_cfg.name, weights=_backbone_file(ckpt_dir, backbone), require_weights=False, **size)
    else:  # every tensor comes from the checkpoint
        encoder = build_skeleton(enc_cfg.name, **size)
    if encoder.config != enc_cfg:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} config {enc_cfg} does not match the registered encoder {encoder.config}"
        )
    state = read_model_state(ckpt_dir, cfg)
    enc_state = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    try:
        load_model_state(encoder, enc_state, partial=partial, assign=not partial)
    except CheckpointError as exc:
        raise CheckpointError(f"weights in {str(ckpt_dir)!r} do not fit {enc_cfg.name!r}: {exc}") from exc
    encoder.weights_sha256 = cfg["weights_sha256"]
    encoder.checkpoint_config = cfg
    encoder.eval()
    return encoder


def _backbone_file(ckpt_dir: str | Path, backbone: Mapping[str, Any]) -> str:
    """The pretrained backbone file a partial checkpoint was trained on, checked by its SHA-256.

    It is looked for where training read it, then under ``$WSIENC_WEIGHTS_DIR``.
    """
    from wsi_encoder.models.encoders import find_in_weights_dir, get_spec

    name = str(backbone.get("name"))
    want = str(backbone.get("weights_sha256"))
    path = backbone.get("weights")
    candidates = [Path(path)] if path else []
    spec = get_spec(name)
    found = find_in_weights_dir(name, spec.weights_file)
    if found is not None:
        candidates.append(found)
    for c in candidates:
        if c.is_file() and file_sha256(c) == want:
            return str(c)
    raise CheckpointError(
        f"checkpoint {str(ckpt_dir)!r} stores only the layers it trained on top of the {name!r} weights "
        f"{path!r} (sha256 {want[:12]}); that file is missing or changed: put it back (or under "
        f"$WSIENC_WEIGHTS_DIR/{name}/) to use this checkpoint"
    )


def load_model_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, partial: bool = False, assign: bool = False
) -> None:
    """Load a checkpoint's tensors into ``module``: strictly, or (``partial``) the trained subset.

    A partial checkpoint (frozen pretrained backbone) holds only the tensors training changed; every
    key it has must exist in ``module`` with the same shape, the rest keep the backbone's weights.
    ``assign`` makes the checkpoint's tensors the module's own (a skeleton built on the ``meta`` device).

    Raises
    ------
    CheckpointError
        Unexpected or missing keys, or shapes that differ.
    """
    own = module.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [] if partial else [k for k in own if k not in state]
    clashes = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if unexpected or missing or clashes:
        raise CheckpointError(
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(clashes)} shape mismatches {clashes[:3]}"
        )
    if assign:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(dict(state), strict=not partial, assign=assign)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise CheckpointError("some tensors of the module are not in the checkpoint")


def resolve_encoder(spec: str | Path, weights: str | Path | None = None) -> Encoder:
    """An encoder from a checkpoint directory or a registered name, in eval mode.

    Parameters
    ----------
    spec : str or path
        A ``wsienc train-encoder`` output directory, or a registered encoder name (``nic``, ``resnet18``...).
    weights : path, optional
        A local weights file for a registered name (not allowed with a checkpoint directory);
        default: ``$WSIENC_WEIGHTS_DIR``. Without one, a pretrained entry is refused and an untrained
        built-in (``nic``, ResNets) is a fixed-seed random initialisation, with a warning.

    Returns
    -------
    Encoder
        With ``.config``, ``.embedding_dim`` and ``.weights_sha256``.
    """
    if Path(spec).is_dir():
        return build_encoder(spec, weights)
    name = str(spec)
    if name not in list_encoders():
        raise InvalidParameterError(
            f"encoder {name!r} is neither a checkpoint directory nor a registered encoder; "
            f"known encoders: {', '.join(list_encoders())}"
        )
    encoder = build_encoder(name, weights)
    if encoder.weights_path is None:
        log.warning(
            "encoder %r has no weights: using a fixed-seed random initialisation (untrained); "
            "pass a checkpoint from `wsienc train-encoder` or --weights FILE",
            name,
        )
    encoder.eval()
    return encoder
