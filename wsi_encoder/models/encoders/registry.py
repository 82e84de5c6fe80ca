"""The encoder interface (:class:`Encoder`, :class:`EncoderConfig`) and the registry of named builders.

An entry is one decorated builder function::

    @register_encoder(
        "my-vit",
        embed_dim=768, input_size=224, mpp=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        weights_format="timm state dict (model.safetensors)", weights_file="model.safetensors",
        source="https://huggingface.co/org/my-vit", license="Apache-2.0", requires_weights=True,
    )
    def _my_vit(*, embed_dim=None, input_size=224, input_mpp=0.5) -> Encoder:
        \"\"\"One line shown by `wsienc encoders`.\"\"\"
        ...

The metadata (:class:`EncoderSpec`) is what ``wsienc encoders`` lists and what weight loading uses
(key remapping, the conventional file name under ``WSIENC_WEIGHTS_DIR``, where to obtain the file).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wsi_encoder.errors import InvalidParameterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Resize filters a card may name (``torch.nn.functional.interpolate`` modes, antialiased as torchvision's ``Resize``).
INTERPOLATIONS = ("bilinear", "bicubic")

#: ``remap(state_dict) -> state_dict``: turns a checkpoint's official key layout into the module's.
Remap = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class EncoderConfig:
    """What an encoder expects and produces; saved beside every checkpoint and embedding store.

    Attributes
    ----------
    name : str
        Registered encoder name (``nic``, ``resnet18``, ``uni`` ...).
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
        from a seed; ``None`` until :func:`~wsi_encoder.models.encoders.create_encoder` sets it.
    weights_path : str or None
        The local weights file it was loaded from (``None``: seeded initialisation).
    channels_last : bool
        Whether the trunk is a CNN that runs faster in ``torch.channels_last`` memory format.
    checkpoint_config : dict or None
        The whole ``config.json`` of the ``train-encoder`` checkpoint it was loaded from, else ``None``.
    """

    config: EncoderConfig
    weights_sha256: str | None = None
    weights_path: str | None = None
    channels_last: bool = False
    checkpoint_config: dict[str, Any] | None = None
    #: Modules frozen by :func:`~wsi_encoder.models.encoders.set_trainable` (kept in eval mode).
    frozen_modules: tuple[nn.Module, ...] = ()
    _mean: torch.Tensor
    _std: torch.Tensor

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

    def train(self, mode: bool = True) -> Encoder:
        """As ``nn.Module.train``, but modules frozen by ``set_trainable`` stay in eval mode."""
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    def trunk_module(self) -> nn.Module:
        """The pretrained part (what ``--weights`` loads into); the whole encoder by default."""
        return getattr(self, "trunk", self)

    def trunk_blocks(self) -> list[nn.Module]:
        """The trunk's sequential stages, input to output (used by ``--unfreeze-last N``)."""
        return [self.trunk_module()]


def _identity(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state


@dataclass(frozen=True)
class EncoderSpec:
    """Registry metadata of one encoder (what ``wsienc encoders`` lists).

    Attributes
    ----------
    name, description
        Registered name and one-line description (the builder's docstring's first line).
    embed_dim, input_size, mpp
        Embedding size at the defaults, input side (px) and µm/px it was trained at.
    mean, std
        Input normalisation (applied inside the module).
    weights_format
        The official checkpoint format and key layout, and what is stripped or renamed.
    weights_file
        The official file name (also looked up under ``$WSIENC_WEIGHTS_DIR/<name>/``).
    source
        Where the official weights are published.
    license
        Licence terms of the weights (gated / non-commercial is said here).
    requires_weights
        A pretrained model: refused without a weights file (no silent random initialisation).
    remap
        Official key layout → module layout (applied before strict loading).
    lazy_init
        The trunk may be built on the ``meta`` device and its weights assigned from the file (no
        random initialisation of a billion parameters only to overwrite it).
    min_input_size
        Smallest input side (px) the architecture accepts.
    interpolation
        How a tile of another size is resized to ``input_size`` (``bilinear`` or ``bicubic``), as the card says.
    crop
        ``None`` (resize the whole tile to ``input_size``) or ``"center"`` (torchvision ``Resize`` of the short side
        to ``input_size / crop_fraction``, then ``CenterCrop(input_size)``), as the card says.
    crop_fraction
        With ``crop="center"``: the side kept by the crop over the resized side (Prov-GigaPath: 224 / 256;
        1 elsewhere, where a square tile is only resized).
    output
        What the embedding is: ``cls``, ``cls+mean(patch)``, ``mean(patch)``, ``pooler``, ``gap`` (global average
        pool of a CNN), ``attn-pool`` ...
    """

    name: str
    description: str
    embed_dim: int
    input_size: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_format: str
    weights_file: str | None
    source: str
    license: str
    requires_weights: bool
    remap: Remap = _identity
    lazy_init: bool = False
    min_input_size: int = 1
    interpolation: str = "bilinear"
    crop: str | None = None
    crop_fraction: float = 1.0
    output: str = "gap"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable listing (``wsienc encoders --json``)."""
        return {
            "name": self.name,
            "embed_dim": self.embed_dim,
            "input_size": self.input_size,
            "mpp": self.mpp,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights_format": self.weights_format,
            "weights_file": self.weights_file,
            "source": self.source,
            "license": self.license,
            "requires_weights": self.requires_weights,
            "interpolation": self.interpolation,
            "crop": self.crop,
            "crop_fraction": self.crop_fraction,
            "output": self.output,
            "description": self.description,
        }


_BUILDERS: dict[str, Callable[..., Encoder]] = {}
_SPECS: dict[str, EncoderSpec] = {}


def register_encoder(
    name: str,
    *,
    embed_dim: int,
    input_size: int,
    mpp: float,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    weights_format: str = "state dict of the module (.safetensors or .pt)",
    weights_file: str | None = None,
    source: str = "",
    license: str = "",
    requires_weights: bool = False,
    remap: Remap | None = None,
    lazy_init: bool = False,
    min_input_size: int = 1,
    interpolation: str = "bilinear",
    crop: str | None = None,
    crop_fraction: float = 1.0,
    output: str = "gap",
) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Register a builder ``fn(*, embed_dim=None, input_size=..., input_mpp=...) -> Encoder`` under ``name``.

    The keyword arguments are the entry's :class:`EncoderSpec`; the first line of the builder's
    docstring is its description.
    """

    if interpolation not in INTERPOLATIONS or crop not in (None, "center") or not 0 < crop_fraction <= 1:
        raise InvalidParameterError(
            f"encoder {name!r}: interpolation {interpolation!r} (one of {', '.join(INTERPOLATIONS)}), crop {crop!r} "
            f"(None or 'center') or crop_fraction {crop_fraction!r} (in (0, 1]) is not supported"
        )

    def deco(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _BUILDERS:
            raise InvalidParameterError(f"encoder {name!r} is already registered")
        description = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _BUILDERS[name] = fn
        _SPECS[name] = EncoderSpec(
            name=name,
            description=description,
            embed_dim=int(embed_dim),
            input_size=int(input_size),
            mpp=float(mpp),
            mean=tuple(mean),  # type: ignore[arg-type]
            std=tuple(std),  # type: ignore[arg-type]
            weights_format=weights_format,
            weights_file=weights_file,
            source=source,
            license=license,
            requires_weights=requires_weights,
            remap=remap or _identity,
            lazy_init=lazy_init,
            min_input_size=int(min_input_size),
            interpolation=interpolation,
            crop=crop,
            crop_fraction=float(crop_fraction),
            output=output,
        )
        return fn

    return deco


def list_encoders(with_descriptions: bool = False) -> list[str] | dict[str, str]:
    """Registered encoder names (sorted), or ``{name: description}`` when asked."""
    if with_descriptions:
        return {k: _SPECS[k].description for k in sorted(_SPECS)}
    return sorted(_SPECS)


def encoder_specs() -> list[EncoderSpec]:
    """Every registered entry's metadata, sorted by name."""
    return [_SPECS[k] for k in sorted(_SPECS)]


def get_spec(name: str) -> EncoderSpec:
    """The metadata of a registered encoder.

    Raises
    ------
    InvalidParameterError
        ``name`` is not registered.
    """
    spec = _SPECS.get(name)
    if spec is None:
        raise InvalidParameterError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(_SPECS))}")
    return spec


def get_builder(name: str) -> Callable[..., Encoder]:
    """The builder function of a registered encoder."""
    get_spec(name)
    return _BUILDERS[name]


def resize_options(name: str) -> dict[str, Any]:
    """The resize a registered encoder's card prescribes, as keyword arguments of
    :func:`wsi_encoder.compression.tiles_to_tensor` (``interpolation``, ``crop``, ``crop_fraction``);
    an unregistered name gets the defaults (bilinear, no crop)."""
    spec = _SPECS.get(name)
    if spec is None:
        return {}
    return {"interpolation": spec.interpolation, "crop": spec.crop, "crop_fraction": spec.crop_fraction}


def check_embed_dim(embed_dim: int | None) -> None:
    """Refuse a non-positive ``embed_dim``."""
    if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim < 1):
        raise InvalidParameterError(f"embed_dim must be a positive integer, got {embed_dim!r}")
