"""Patch encoders behind one registry and one interface.

Every encoder built by :func:`create_encoder` is an :class:`Encoder`: a ``torch.nn.Module`` whose
``forward_features(x)`` maps a float tensor ``(B, 3, H, W)`` with values in [0, 1] (tiles at
``config.input_mpp`` µm/px, ideally ``config.input_size`` px square) to features ``(B, num_features)``.
The input normalisation (``config.mean``/``config.std``) is applied inside the module, so the
preprocessing travels with the weights: callers never normalise themselves.

Built-ins
---------
``nic``
    A compact CNN in the spirit of the neural-image-compression (NIC) multitask encoder
    (Tellez et al., TPAMI 2019 / MIDL 2020): 128-px input at 0.5 µm/px, average-pooled ×2 to 64 px,
    four valid 3×3 stride-2 convolutions of 128 filters each followed by LeakyReLU(0.2) and
    BatchNorm, flatten (3×3×128) and a dense embedding of ``embed_dim`` (default 128). 595,968
    parameters at the defaults; fast on a CPU.
``resnet18`` / ``resnet34`` / ``resnet50``
    torchvision ResNets (global-average-pooled trunk, 512/512/2048 features) with an optional linear
    embedding of ``embed_dim``. 224-px input at 0.5 µm/px, ImageNet normalisation.

Weights are never downloaded: ``weights=None`` gives a random initialisation drawn from ``seed``
(the global RNG is left untouched), ``weights=FILE`` loads a local state dict (``.safetensors`` or a
``torch.save`` file read with ``weights_only=True``). A torchvision ResNet state dict (keys
``conv1.weight`` ..., ``fc.*`` ignored) loads into the trunk of a ResNet encoder.

Adding an encoder is one decorated function::

    @register_encoder("tiny")
    def _tiny(*, embed_dim=None, input_size=64, input_mpp=1.0):
        return MyEncoder(...)           # an Encoder subclass
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_encoder.errors import CheckpointError, InvalidParameterError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderConfig:
    """What an encoder expects and produces; saved beside every checkpoint and embedding store.

    Attributes
    ----------
    name : str
        Registered encoder name (``nic``, ``resnet18``, ...).
    input_size : int
        Tile side in pixels the encoder was built for.
    input_mpp : float
        Physical resolution of the input tiles in µm/px.
    mean, std : tuple of float
        Per-channel normalisation applied inside the module to inputs in [0, 1].
    num_features : int
        Width of ``forward_features`` output (the embedding dimension).
    embed_dim : int or None
        Size of the linear embedding layer on top of the trunk, ``None`` when the trunk's pooled
        features are returned as they are.
    """

    name: str
    input_size: int
    input_mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    embed_dim: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderConfig:
        """Build a config from :meth:`to_dict` output (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["mean"] = tuple(float(v) for v in kw["mean"])
        kw["std"] = tuple(float(v) for v in kw["std"])
        kw["input_size"] = int(kw["input_size"])
        kw["input_mpp"] = float(kw["input_mpp"])
        kw["num_features"] = int(kw["num_features"])
        kw["embed_dim"] = None if kw.get("embed_dim") is None else int(kw["embed_dim"])
        return cls(**kw)


class Encoder(nn.Module):
    """Base class: input normalisation, ``forward_features``, identity attributes.

    Subclasses implement :meth:`_features` on normalised input and set ``self.config``.

    Attributes
    ----------
    config : EncoderConfig
    num_features : int
        Output width of :meth:`forward_features`.
    embedding_dim : int
        Same as ``num_features`` (name used by embedding stores).
    weights_sha256 : str or None
        SHA-256 of the weight file the encoder was loaded from, or of its initial state when built
        from a seed; ``None`` until :func:`create_encoder` sets it.
    """

    config: EncoderConfig
    weights_sha256: str | None = None

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_features(self) -> int:
        return self.config.num_features

    @property
    def embedding_dim(self) -> int:
        return self.config.num_features

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs in [0, 1] to the encoder's normalised range."""
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embed tiles.

        Parameters
        ----------
        x : torch.Tensor
            Float ``(B, 3, H, W)`` with values in [0, 1], tiles at ``config.input_mpp`` µm/px.

        Returns
        -------
        torch.Tensor
            ``(B, num_features)``.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise InvalidParameterError(
                f"encoder {self.config.name!r} expects a (B, 3, H, W) tensor, got shape {tuple(x.shape)}"
            )
        return self._features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class NICEncoder(Encoder):
    """The NIC / MTL-NIC patch encoder (conv → LeakyReLU(0.2) → BatchNorm, ×4; dense embedding).

    Keras BatchNorm momentum 0.8 corresponds to PyTorch ``momentum=0.2``; ``eps=1e-3``. An adaptive
    average pool to 3×3 before flattening is the identity at the native 128-px input and lets
    smaller or larger tiles (≥ 62 px) go through the same weights.
    """

    min_input_size = 62

    def __init__(self, config: EncoderConfig, *, width: int = 128) -> None:
        super().__init__(config)
        layers: list[nn.Module] = [nn.AvgPool2d(2)]
        in_ch = 3
        for _ in range(4):
            layers += [
                nn.Conv2d(in_ch, width, kernel_size=3, stride=2, padding=0),
                nn.LeakyReLU(0.2),
                nn.BatchNorm2d(width, eps=1e-3, momentum=0.2),
            ]
            in_ch = width
        layers += [nn.AdaptiveAvgPool2d(3), nn.Flatten()]
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(width * 9, config.num_features)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise InvalidParameterError(
                f"the nic encoder needs tiles of at least {self.min_input_size} px, got {tuple(x.shape[-2:])}"
            )
        return self.embed(self.trunk(x))


class ResNetEncoder(Encoder):
    """A torchvision ResNet trunk, global-average-pooled, with an optional linear embedding."""

    def __init__(self, config: EncoderConfig, arch: str, trunk_features: int) -> None:
        super().__init__(config)
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        net.fc = nn.Identity()
        self.trunk = net
        self.embed = (
            nn.Linear(trunk_features, config.embed_dim) if config.embed_dim is not None else nn.Identity()
        )

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(x))


_REGISTRY: dict[str, Callable[..., Encoder]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_encoder(name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Register a builder ``fn(*, embed_dim=None, **kw) -> Encoder`` under ``name``.

    The first line of the builder's docstring is the description shown by :func:`list_encoders`.
    """

    def deco(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _REGISTRY:
            raise InvalidParameterError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return fn

    return deco


def list_encoders(with_descriptions: bool = False) -> list[str] | dict[str, str]:
    """Registered encoder names (sorted), or ``{name: description}`` when asked."""
    if with_descriptions:
        return {k: _DESCRIPTIONS[k] for k in sorted(_REGISTRY)}
    return sorted(_REGISTRY)


def _check_dim(embed_dim: int | None) -> None:
    if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim < 1):
        raise InvalidParameterError(f"embed_dim must be a positive integer, got {embed_dim!r}")


@register_encoder("nic")
def _nic(*, embed_dim: int | None = None, input_size: int = 128, input_mpp: float = 0.5) -> Encoder:
    """Compact NIC CNN: 128 px @ 0.5 µm/px, 4 strided convs of 128 filters, dense embedding (default 128)."""
    _check_dim(embed_dim)
    dim = 128 if embed_dim is None else embed_dim
    cfg = EncoderConfig("nic", int(input_size), float(input_mpp), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), dim, dim)
    return NICEncoder(cfg)


def _resnet_builder(arch: str, trunk_features: int) -> Callable[..., Encoder]:
    def build(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
        _check_dim(embed_dim)
        cfg = EncoderConfig(
            arch,
            int(input_size),
            float(input_mpp),
            IMAGENET_MEAN,
            IMAGENET_STD,
            trunk_features if embed_dim is None else embed_dim,
            embed_dim,
        )
        return ResNetEncoder(cfg, arch, trunk_features)

    build.__doc__ = (
        f"torchvision {arch}: 224 px @ 0.5 µm/px, ImageNet normalisation, {trunk_features} pooled "
        "features or a linear embedding of --embed-dim."
    )
    return build


for _arch, _width in (("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)):
    register_encoder(_arch)(_resnet_builder(_arch, _width))


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict: ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    A dict holding the weights under ``state_dict`` or ``model`` (common training checkpoints) is
    unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file {str(p)!r} does not exist; pass a local .safetensors or .pt file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoding failure is a malformed file for the user
        raise CheckpointError(f"cannot read weights file {str(p)!r}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {str(p)!r} does not hold a state dict of tensors")
    return state


def load_weights(encoder: Encoder, path: str | Path) -> None:
    """Load a local state dict into ``encoder`` (whole encoder, or a torchvision trunk for ResNets).

    Raises
    ------
    CheckpointError
        When the file is unreadable or its keys/shapes do not fit the encoder.
    """
    state = read_state_dict(path)
    prefix = "encoder."
    if state and all(k.startswith(prefix) for k in state):  # a train-encoder model file
        state = {k[len(prefix) :]: v for k, v in state.items()}
    target: nn.Module = encoder
    if isinstance(encoder, ResNetEncoder) and not any(k.startswith("trunk.") for k in state):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        target = encoder.trunk
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"weights file {str(path)!r} does not fit encoder {encoder.config.name!r}: {first}"
        ) from exc


def create_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    embed_dim: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> Encoder:
    """Build a registered encoder.

    Parameters
    ----------
    name : str
        Registered name, see :func:`list_encoders`.
    weights : path, optional
        Local ``.safetensors`` / ``torch.save`` state dict; ``None`` keeps the seeded random init.
    embed_dim : int, optional
        Width of the linear embedding on top of the trunk (``nic`` defaults to 128; ResNets return
        their pooled trunk features when ``None``).
    seed : int
        Seed of the random initialisation (the global RNG state is restored afterwards).
    **kw
        Builder options, e.g. ``input_size`` (px) and ``input_mpp`` (µm/px); ``None`` values mean
        the encoder's default.

    Returns
    -------
    Encoder
        In training mode, on the CPU; ``forward_features(x)`` gives ``(B, num_features)``.
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        raise InvalidParameterError(f"unknown encoder {name!r}; known encoders: {', '.join(list_encoders())}")
    kw = {k: v for k, v in kw.items() if v is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            encoder = builder(embed_dim=embed_dim, **kw)
        except TypeError as exc:
            raise InvalidParameterError(f"bad options for encoder {name!r}: {exc}") from exc
    if weights is not None:
        load_weights(encoder, weights)
        encoder.weights_sha256 = file_sha256(weights)
    else:
        encoder.weights_sha256 = state_sha256(encoder)
    return encoder
