"""Patch encoders behind one registry and one interface.

Every encoder built by :func:`build_encoder` (or its keyword form :func:`create_encoder`) is an
:class:`Encoder`: a ``torch.nn.Module`` whose ``forward_features(x)`` maps a float tensor
``(B, 3, H, W)`` with values in [0, 1] (tiles at ``config.input_mpp`` µm/px, ideally
``config.input_size`` px square) to features ``(B, num_features)``. The input normalisation
(``config.mean``/``config.std``) is applied inside the module, so the preprocessing travels with the
weights: callers never normalise themselves.

Entries (``wsienc encoders`` lists them with their sizes, µm/px, sources and licences):

- :mod:`~wsi_encoder.models.encoders.cnn`: ``nic``, the NIC authors' published ``nic-multitask-4``, ``nic-bigan``
  and ``nic-mean-rgb`` (their Keras files ship with the package), ``resnet18/34/50``, ``resnet50-trunc`` (CLAM);
- :mod:`~wsi_encoder.models.encoders.foundation`: ``uni``, ``uni2-h``, ``virchow``, ``virchow2``,
  ``h-optimus-0``, ``h-optimus-1``, ``h0-mini``, ``prov-gigapath``, ``gpfm``, ``phikon``, ``phikon-v2``, ``hibou-b``,
  ``hibou-l``, ``lunit-vits8``, ``lunit-vits16``, ``kaiko-vitb8``, ``kaiko-vits16``, ``kaiko-vits8``, ``kaiko-vitb16``,
  ``kaiko-vitl14``, ``midnight-12k``;
- :mod:`~wsi_encoder.models.encoders.vision_language`: ``plip``, ``quiltnet-b-32``, ``conch-v1_5``;
- :mod:`~wsi_encoder.models.encoders.ctranspath`: ``ctranspath``, ``chief-ctranspath``.

Weights are never downloaded. ``weights=FILE`` loads a local file (``.safetensors``, or ``.bin`` /
``.pth`` through ``torch.load(weights_only=True)``) strictly after the entry's documented key
remapping; its SHA-256 becomes ``encoder.weights_sha256``. Without ``weights``, the conventional file
under ``$WSIENC_WEIGHTS_DIR`` is used when present; a pretrained entry (``requires_weights``) with no
file is refused with a line saying where to obtain it; the other entries get a random
initialisation drawn from ``seed`` (the global RNG is left untouched).

Adding an encoder is one decorated function (see :func:`register_encoder` and ``docs/encoders.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.io.urls import fetched_copy, is_url
from wsi_encoder.models.encoders import cnn as _cnn  # noqa: F401  (registers the entries)
from wsi_encoder.models.encoders import ctranspath as _ctranspath  # noqa: F401
from wsi_encoder.models.encoders import foundation as _foundation  # noqa: F401
from wsi_encoder.models.encoders import vision_language as _vision_language  # noqa: F401
from wsi_encoder.models.encoders.nic_keras import is_keras_h5, keras_state_dict
from wsi_encoder.models.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderConfig,
    EncoderSpec,
    encoder_specs,
    get_builder,
    get_spec,
    list_encoders,
    register_encoder,
    resize_options,
)
from wsi_encoder.models.encoders.weights import (
    WEIGHTS_DIR_ENV,
    file_sha256,
    find_in_weights_dir,
    load_strict,
    read_state_dict,
    state_sha256,
    weights_file_in,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WEIGHTS_DIR_ENV",
    "Encoder",
    "EncoderConfig",
    "EncoderSpec",
    "build_encoder",
    "create_encoder",
    "encoder_specs",
    "file_sha256",
    "find_in_weights_dir",
    "get_spec",
    "list_encoders",
    "load_weights",
    "read_state_dict",
    "register_encoder",
    "resize_options",
    "resolve_weights",
    "set_trainable",
    "state_sha256",
]

log = logging.getLogger(__name__)

_CHECKPOINT_PREFIX = "encoder."


def resolve_weights(name: str, weights: str | Path | None, *, required: bool | None = None) -> Path | None:
    """The local weights file to load for encoder ``name``.

    Parameters
    ----------
    name
        Registered encoder name.
    weights
        A file or an unpacked snapshot folder; ``None`` looks under ``$WSIENC_WEIGHTS_DIR``.
    required
        Refuse when no file is found (default: the entry's ``requires_weights``).

    Raises
    ------
    CheckpointError
        The file does not exist, or a pretrained entry has no weights (the line says where to get them).
    """
    spec = get_spec(name)
    if weights is not None:
        p = fetched_copy(weights) if is_url(weights) else Path(weights).expanduser()  # a URL: fetched once
        if not p.exists():
            raise CheckpointError(f"weights file {str(p)!r} does not exist; pass a .safetensors or .pt file (a path or a URL)")
        return weights_file_in(p)
    found = find_in_weights_dir(name, spec.weights_file)
    if found is not None:
        return found
    if spec.requires_weights if required is None else required:
        where = f"${WEIGHTS_DIR_ENV}/{name}/{spec.weights_file or 'model.safetensors'}"
        raise CheckpointError(
            f"encoder {name!r} is a pretrained model and needs its weights: pass --weights FILE or put the file at "
            f"{where} (obtain it from {spec.source}; licence: {spec.license})"
        )
    return None


def load_weights(encoder: Encoder, path: str | Path, *, assign: bool = False) -> None:
    """Load a local weight file into ``encoder``, strictly.

    Four layouts are recognised: a ``wsienc train-encoder`` model file (keys ``encoder.*``), this
    module's own state dict (keys as ``encoder.state_dict()``), the entry's official layout, which
    is remapped (:attr:`EncoderSpec.remap`) and loaded into the pretrained trunk, and (NIC encoders) the
    authors' Keras 2 HDF5 model file (:mod:`~wsi_encoder.models.encoders.nic_keras`).

    Raises
    ------
    CheckpointError
        When the file is unreadable or its keys/shapes do not fit (one line naming them).
    """
    name = encoder.config.name
    what = f"weights file {str(path)!r} does not fit encoder {name!r}"
    if is_keras_h5(path):  # the NIC authors' Keras 2 files: the whole network, converted layer by layer
        load_strict(encoder, keras_state_dict(encoder, path), what=what)
        return
    state = read_state_dict(path)
    if state and all(k.startswith(_CHECKPOINT_PREFIX) for k in state):
        state = {k[len(_CHECKPOINT_PREFIX) :]: v for k, v in state.items()}
    own = encoder.state_dict()
    trunk = encoder.trunk_module()
    if trunk is encoder or set(state) == set(own):
        load_strict(encoder, state, what=what, assign=assign)
        return
    try:
        remapped = get_spec(name).remap(state)
    except KeyError as exc:
        raise CheckpointError(f"{what}: key {exc} of the official layout is missing") from exc
    load_strict(trunk, remapped, what=what, assign=assign)


def _build_on_meta(builder: Any, embed_dim: int | None, kw: dict[str, Any]) -> Encoder:
    """The architecture on the ``meta`` device (no storage); the input normalisation buffers on the CPU."""
    with torch.device("meta"):
        encoder: Encoder = builder(embed_dim=embed_dim, **kw)
    encoder._mean = torch.tensor(encoder.config.mean).view(1, 3, 1, 1)
    encoder._std = torch.tensor(encoder.config.std).view(1, 3, 1, 1)
    return encoder


def _materialise(encoder: Encoder) -> None:
    """Give every tensor still on the ``meta`` device (modules outside the loaded trunk) real storage."""
    for module in encoder.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                if not isinstance(module, nn.Linear):
                    raise CheckpointError(f"{type(module).__name__}.{pname} of {encoder.config.name!r} is not in the weights file")
                setattr(module, pname, nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad))
                module.reset_parameters()


def build_encoder(
    name_or_dir: str | Path,
    weights: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    embed_dim: int | None = None,
    seed: int = 0,
    require_weights: bool | None = None,
    **kw: Any,
) -> Encoder:
    """The one entry point: a registered encoder (with its local weights) or a train-encoder checkpoint.

    Parameters
    ----------
    name_or_dir
        A registered name (``wsienc encoders``) or a ``wsienc train-encoder`` checkpoint folder.
    weights
        Local weights file (or snapshot folder) for a registered name; default: the conventional
        file under ``$WSIENC_WEIGHTS_DIR`` when there is one.
    device
        Where to put the module (default: stays on the CPU).
    embed_dim
        Width of a linear embedding on top of the trunk (``None``: the entry's native features;
        ``nic`` defaults to 128).
    seed
        Seed of any random initialisation (the global RNG state is restored afterwards).
    require_weights
        Refuse to build without weights (default: the entry's ``requires_weights``); ``False`` builds
        a pretrained architecture randomly initialised (tests; a checkpoint about to be loaded).
    **kw
        Builder options, e.g. ``input_size`` (px) and ``input_mpp`` (µm/px); ``None`` values mean
        the entry's default.

    Returns
    -------
    Encoder
        In training mode for a registered name, eval mode for a checkpoint folder;
        ``.weights_sha256`` and ``.weights_path`` identify the weights.
    """
    p = Path(name_or_dir)
    if p.is_dir():
        from wsi_encoder.models.checkpoint import load_encoder

        if weights is not None:
            raise InvalidParameterError(
                f"--weights {str(weights)!r} cannot be combined with the checkpoint directory {str(p)!r}"
            )
        encoder = load_encoder(p)
    else:
        encoder = create_encoder(
            str(name_or_dir), weights=weights, embed_dim=embed_dim, seed=seed, require_weights=require_weights, **kw
        )
    if device is not None:
        encoder.to(device)
    return encoder


def create_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    embed_dim: int | None = None,
    seed: int = 0,
    require_weights: bool | None = None,
    **kw: Any,
) -> Encoder:
    """Build a registered encoder (see :func:`build_encoder` for the parameters).

    Raises
    ------
    InvalidParameterError
        Unknown name or bad builder options.
    CheckpointError
        A pretrained entry without weights, or a file that does not fit.
    """
    spec = get_spec(name)
    builder = get_builder(name)
    path = resolve_weights(name, weights, required=require_weights)
    kw = {k: v for k, v in kw.items() if v is not None}
    lazy = path is not None and spec.lazy_init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            encoder = _build_on_meta(builder, embed_dim, kw) if lazy else builder(embed_dim=embed_dim, **kw)
        except TypeError as exc:
            raise InvalidParameterError(f"bad options for encoder {name!r}: {exc}") from exc
    if path is not None:
        load_weights(encoder, path, assign=lazy)
        if lazy:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _materialise(encoder)
        encoder.weights_sha256 = file_sha256(path)
        encoder.weights_path = str(weights) if weights is not None and is_url(weights) else str(Path(path).resolve())
        log.info("encoder %s: loaded %s (sha256 %s)", name, path, encoder.weights_sha256[:12])
    else:
        encoder.weights_sha256 = state_sha256(encoder)
    return encoder


def build_skeleton(name: str, *, embed_dim: int | None = None, **kw: Any) -> Encoder:
    """An entry's architecture whose every persistent tensor is about to be loaded from a checkpoint.

    Entries with ``lazy_init`` are built on the ``meta`` device (no random initialisation of up to a
    billion parameters); the caller must then ``load_state_dict(..., strict=True, assign=True)``.
    Other entries are built normally (seed 0).
    """
    spec = get_spec(name)
    builder = get_builder(name)
    kw = {k: v for k, v in kw.items() if v is not None}
    if not spec.lazy_init:  # (never from $WSIENC_WEIGHTS_DIR: the checkpoint holds every tensor)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return builder(embed_dim=embed_dim, **kw)
    return _build_on_meta(builder, embed_dim, kw)


def set_trainable(encoder: Encoder, *, freeze_backbone: bool = False, unfreeze_last: int | None = None) -> dict[str, int]:
    """Freeze the pretrained trunk (all of it, or all but its last ``unfreeze_last`` stages/blocks).

    Frozen parts get ``requires_grad=False`` and are kept in eval mode during training (BatchNorm
    statistics and dropout stay as pretrained); the linear embedding on top, if any, stays trainable.

    Returns
    -------
    dict
        ``{"trainable": n_params, "frozen": n_params}``.
    """
    if freeze_backbone and unfreeze_last is not None:
        raise InvalidParameterError("--freeze-backbone and --unfreeze-last are exclusive")
    if unfreeze_last is not None and unfreeze_last < 0:
        raise InvalidParameterError(f"--unfreeze-last {unfreeze_last!r} must be >= 0")
    frozen: list[nn.Module] = []
    if freeze_backbone or unfreeze_last is not None:
        trunk = encoder.trunk_module()
        blocks = encoder.trunk_blocks()
        keep = set()
        if unfreeze_last:
            for b in blocks[-unfreeze_last:]:
                keep |= {id(p) for p in b.parameters()}
        for p in trunk.parameters():
            p.requires_grad_(id(p) in keep)
        frozen = [m for m in trunk.modules() if not any(p.requires_grad for p in m.parameters(recurse=False))
                  and any(True for _ in m.parameters(recurse=False))]
    encoder.frozen_modules = tuple(frozen)
    n_train = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in encoder.parameters() if not p.requires_grad)
    return {"trainable": n_train, "frozen": n_frozen}
