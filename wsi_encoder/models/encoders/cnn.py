"""Convolutional entries: the compact NIC CNN, torchvision ResNets, and CLAM's truncated ResNet-50.

``nic``
    A compact CNN in the spirit of the neural-image-compression (NIC) multitask encoder
    (Tellez et al., TPAMI 2019 / MIDL 2020): 128-px input at 0.5 µm/px, average-pooled ×2 to 64 px,
    four valid 3×3 stride-2 convolutions of 128 filters each followed by LeakyReLU(0.2) and
    BatchNorm, flatten (3×3×128) and a dense embedding of ``embed_dim`` (default 128). 595,968
    parameters at the defaults; fast on a CPU. Trained here with ``wsienc train-encoder``; also loads the
    authors' Keras files.
``nic-multitask-4`` / ``nic-bigan`` / ``nic-mean-rgb``
    The NIC authors' published encoders (davidtellez/neural-image-compression, MIT): the MIDL 2020 supervised
    multitask encoder, the TPAMI 2019 BiGAN encoder (both the ``nic`` architecture with 128 features) and the
    mean-RGB baseline (3 features). Their Keras 2 HDF5 files ship with the package and are read with h5py
    (:mod:`~wsi_encoder.models.encoders.nic_keras`); preprocessing as the authors': 128 px at 0.5 µm/px,
    ``x / 255 * 2 - 1``, a 2×2 average pool in front of the 64-px networks.
``resnet18`` / ``resnet34`` / ``resnet50``
    torchvision ResNets (global-average-pooled trunk, 512/512/2048 features) with an optional linear
    embedding of ``embed_dim``. 224-px input at 0.5 µm/px, ImageNet normalisation. Random
    initialisation is allowed (training from scratch); a torchvision state dict loads into the trunk.
``resnet50-trunc``
    CLAM's default tile encoder: ImageNet ResNet-50 up to ``layer3`` followed by global average
    pooling, 1,024 features (Lu et al., Nat. Biomed. Eng. 2021, ``models/resnet_custom.py``
    ``resnet50_baseline``; TRIDENT ``resnet50`` = timm ``resnet50.tv_in1k`` ``out_indices=[3]`` + pool).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.models.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderConfig,
    check_embed_dim,
    register_encoder,
)
from wsi_encoder.models.encoders.weights import torchvision_resnet_trunk


class NICEncoder(Encoder):
    """The NIC / MTL-NIC patch encoder (conv → LeakyReLU(0.2) → BatchNorm, ×4; dense embedding).

    Keras BatchNorm momentum 0.8 corresponds to PyTorch ``momentum=0.2``; ``eps=1e-3``. An adaptive
    average pool to 3×3 before flattening is the identity at the native 128-px input and lets
    smaller or larger tiles (≥ 62 px) go through the same weights.
    """

    min_input_size = 62
    channels_last = True

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

    def trunk_module(self) -> nn.Module:
        return self  # trained here as a whole: there is no separately pretrained trunk

    def trunk_blocks(self) -> list[nn.Module]:
        mods = list(self.trunk)
        return [nn.ModuleList(mods[1 + 3 * i : 4 + 3 * i]) for i in range(4)] + [self.embed]


class MeanRGBEncoder(Encoder):
    """The NIC mean-RGB baseline: the spatial mean of each normalised channel (3 features, no weights)."""

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class ResNetEncoder(Encoder):
    """A torchvision ResNet trunk (optionally cut after ``layer3``), global-average-pooled, with an
    optional linear embedding."""

    channels_last = True

    def __init__(self, config: EncoderConfig, arch: str, trunk_features: int, *, truncate: bool = False) -> None:
        super().__init__(config)
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        net.fc = nn.Identity()
        if truncate:
            net.layer4 = nn.Identity()  # pooled layer3 output: 1,024 features
        self.trunk = net
        self.embed = (
            nn.Linear(trunk_features, config.embed_dim) if config.embed_dim is not None else nn.Identity()
        )

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(x))

    def trunk_blocks(self) -> list[nn.Module]:
        t = self.trunk
        stem = nn.ModuleList([t.conv1, t.bn1])
        return [stem, t.layer1, t.layer2, t.layer3] + ([] if isinstance(t.layer4, nn.Identity) else [t.layer4])


@register_encoder(
    "nic",
    embed_dim=128,
    input_size=128,
    mpp=0.5,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    weights_format="a `wsienc train-encoder` checkpoint folder, this module's state dict, or a NIC Keras file",
    source="trained here (`wsienc train-encoder`)",
    license="yours",
    min_input_size=62,
    output="dense (flatten of the last conv block → linear)",
)
def _nic(*, embed_dim: int | None = None, input_size: int = 128, input_mpp: float = 0.5) -> Encoder:
    """Compact NIC CNN: 128 px @ 0.5 µm/px, 4 strided convs of 128 filters, dense embedding (default 128)."""
    check_embed_dim(embed_dim)
    dim = 128 if embed_dim is None else embed_dim
    cfg = EncoderConfig("nic", int(input_size), float(input_mpp), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), dim, dim)
    return NICEncoder(cfg)


_NIC_SOURCE = "https://github.com/davidtellez/neural-image-compression (models/encoders_patches_pathology/)"
_NIC_LICENSE = "MIT (Diagnostic Image Analysis Group); shipped with wsi_encoder"
_NIC_FORMAT = "Keras 2.0.9 HDF5 model file, read with h5py (layers converted; channels-last Flatten permuted)"


def _published_nic(name: str, embed_dim: int | None, input_size: int, input_mpp: float) -> Encoder:
    check_embed_dim(embed_dim)
    if embed_dim not in (None, 128):
        raise InvalidParameterError(f"{name} has a fixed 128-feature embedding; --embed-dim {embed_dim!r} does not apply")
    cfg = EncoderConfig(name, int(input_size), float(input_mpp), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 128, 128)
    return NICEncoder(cfg)


for _name, _file, _what in (
    ("nic-multitask-4", "encoder_multitask-4.h5", "supervised multitask (4-task) NIC encoder, Tellez et al. MIDL 2020"),
    ("nic-bigan", "encoder_bigan.h5", "BiGAN NIC encoder, Tellez et al. IEEE TPAMI 2019"),
):

    def _build(
        *, embed_dim: int | None = None, input_size: int = 128, input_mpp: float = 0.5, _n: str = _name
    ) -> Encoder:
        return _published_nic(_n, embed_dim, input_size, input_mpp)

    _build.__doc__ = f"The authors' {_what}: 128 px @ 0.5 µm/px, 128 features (weights shipped)."
    register_encoder(
        _name,
        embed_dim=128,
        input_size=128,
        mpp=0.5,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        weights_format=_NIC_FORMAT,
        weights_file=_file,
        source=_NIC_SOURCE,
        license=_NIC_LICENSE,
        requires_weights=True,
        min_input_size=62,
        output="dense (flatten of the last conv block → linear 128)",
    )(_build)


@register_encoder(
    "nic-mean-rgb",
    embed_dim=3,
    input_size=128,
    mpp=0.5,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    weights_format=_NIC_FORMAT + "; the file holds no weights, only the GlobalAveragePooling2D network",
    weights_file="encoder_mean-rgb.h5",
    source=_NIC_SOURCE,
    license=_NIC_LICENSE,
    requires_weights=True,
    output="mean over the tile of each channel scaled to [-1, 1]",
)
def _nic_mean_rgb(*, embed_dim: int | None = None, input_size: int = 128, input_mpp: float = 0.5) -> Encoder:
    """The authors' mean-RGB baseline (TPAMI 2019): 128 px @ 0.5 µm/px, 3 features."""
    if embed_dim not in (None, 3):
        raise InvalidParameterError(f"nic-mean-rgb has 3 features; --embed-dim {embed_dim!r} does not apply")
    cfg = EncoderConfig("nic-mean-rgb", int(input_size), float(input_mpp), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 3, None)
    return MeanRGBEncoder(cfg)


def _resnet_builder(arch: str, trunk_features: int, *, truncate: bool = False, name: str | None = None) -> Callable[..., Encoder]:
    def build(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
        check_embed_dim(embed_dim)
        cfg = EncoderConfig(
            name or arch,
            int(input_size),
            float(input_mpp),
            IMAGENET_MEAN,
            IMAGENET_STD,
            trunk_features if embed_dim is None else embed_dim,
            embed_dim,
        )
        return ResNetEncoder(cfg, arch, trunk_features, truncate=truncate)

    build.__doc__ = (
        f"torchvision {arch}: 224 px @ 0.5 µm/px, ImageNet normalisation, {trunk_features} pooled "
        "features or a linear embedding of --embed-dim."
    )
    return build


for _arch, _width in (("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)):
    register_encoder(
        _arch,
        embed_dim=_width,
        input_size=224,
        mpp=0.5,
        weights_format="torchvision state dict (conv1 bn1 layer1..4; fc.* dropped), or this module's state dict",
        weights_file=None,
        source=f"https://pytorch.org/vision/stable/models/{_arch.replace('resnet', 'resnet')}.html (optional)",
        license="BSD-3-Clause (torchvision); ImageNet-1k weights",
        remap=torchvision_resnet_trunk(4),
        output="gap",
    )(_resnet_builder(_arch, _width))


# CLAM models/resnet_custom.py resnet50_baseline (Bottleneck, [3, 4, 6, 3] without layer4, AdaptiveAvgPool2d(1),
# ImageNet weights from torchvision resnet50-19c8e357.pth); TRIDENT trident/patch_encoder_models/load.py
# ResNet50InferenceEncoder: timm "resnet50.tv_in1k", features_only out_indices=[3], AdaptiveAvgPool2d(1), 224 px,
# ImageNet mean/std. CLAM tiles 256 px at 20x (~0.5 µm/px).
_resnet50_trunc = _resnet_builder("resnet50", 1024, truncate=True, name="resnet50-trunc")
_resnet50_trunc.__doc__ = (
    "CLAM's default: ImageNet ResNet-50 to layer3 + average pooling, 1,024 features, 224 px @ 0.5 µm/px."
)
register_encoder(
    "resnet50-trunc",
    embed_dim=1024,
    input_size=224,
    mpp=0.5,
    weights_format=(
        "torchvision ImageNet ResNet-50 state dict (resnet50-19c8e357.pth / resnet50-0676ba61.pth, or timm "
        "resnet50.tv_in1k model.safetensors: same keys); layer4.* and fc.* dropped"
    ),
    weights_file="resnet50.pth",
    source="https://download.pytorch.org/models/resnet50-19c8e357.pth (torchvision IMAGENET1K_V1; CLAM's choice)",
    license="BSD-3-Clause (torchvision); ImageNet-1k weights (research use)",
    requires_weights=True,
    remap=torchvision_resnet_trunk(3),
    interpolation="bilinear",
    crop="center",
    output="gap (after layer3)",
)(_resnet50_trunc)
