"""CTransPath (TransPath's and CHIEF's weights): timm's Swin-T with CTransPath's convolutional stem.

TransPath's own code runs on a timm 0.5.4 fork that cannot be installed beside timm 1.x; the architecture is built
here with timm 1.x and the checkpoints' old Swin layout is remapped (:func:`~wsi_encoder.models.encoders.weights.
swin_v0_to_timm`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wsi_encoder.models.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderConfig,
    check_embed_dim,
    register_encoder,
)
from wsi_encoder.models.encoders.weights import swin_v0_to_timm

if TYPE_CHECKING:
    from timm.models.swin_transformer import SwinTransformer


class SwinEncoder(Encoder):
    """A timm Swin trunk, average-pooled after the final norm, with an optional linear embedding."""

    trunk: SwinTransformer

    def __init__(self, config: EncoderConfig, trunk: SwinTransformer, *, trunk_features: int) -> None:
        super().__init__(config)
        self.trunk = trunk
        self.embed = nn.Linear(trunk_features, config.embed_dim) if config.embed_dim is not None else nn.Identity()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(x))

    def trunk_blocks(self) -> list[nn.Module]:
        t = self.trunk
        blocks: list[nn.Module] = [t.patch_embed]
        for stage in t.layers.children():
            blocks.append(stage.get_submodule("downsample"))
            blocks.extend(stage.get_submodule("blocks").children())
        blocks[-1] = nn.ModuleList([blocks[-1], t.norm])
        return blocks
# ---- CTransPath -------------------------------------------------------------------------------------------
class ConvStem(nn.Module):
    """CTransPath's patch embedding: two 3×3 stride-2 conv-BN-ReLU and a 1×1 conv to ``embed_dim``.

    TransPath ``ctran.py`` / TRIDENT ``model_zoo/ctranspath/ctran.py``: channels ``embed_dim/8`` then
    ``embed_dim/4``, no bias in the 3×3 convs, then an optional norm. Written for timm 1.x Swin, which
    calls the patch embedding with ``output_fmt="NHWC"``: the output is ``(B, H/4, W/4, C)``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if patch != (4, 4) or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        self.img_size = size
        self.patch_size = patch
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        stem: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _i in range(2):
            stem += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        stem.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // 4, img_size[1] // 4


# Wang et al., Med. Image Anal. 2022 (TransPath / CTransPath), github.com/Xiyue-Wang/TransPath ctran.py and TRIDENT
# CTransPathInferenceEncoder: swin_tiny_patch4_window7_224 (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7)
# with embed_layer=ConvStem, head removed; ImageNet mean/std, Resize(224, bilinear, antialias); average-pooled
# 768 features after the final norm. Two weight files exist, with the same keys but different tensors:
# TransPath's own ctranspath.pth (its README's Google Drive link) and CHIEF's CTransPath (Wang et al., Nature
# 2024), CHIEF_CTransPath.pth (MahmoodLab/hest-bench fm_v1/ctranspath, the file TRIDENT loads). Both are
# torch.save {"model": state_dict} in the timm 0.5.4 Swin layout; TRIDENT takes their "model" entry and drops the
# attn_mask keys; here they are read as tensors only (weights.read_state_dict: torch.load with weights_only=True).
# TRIDENT's README runs CTransPath(-CHIEF) at --mag 10 (1 µm/px), --patch_size 256.
_CTRANSPATH_FORMAT = (
    "torch.save {'model': state_dict} in the timm 0.5.4 Swin layout; layers.i.downsample -> layers.(i+1).downsample, "
    "relative_position_index/attn_mask/head dropped"
)


def _ctranspath_encoder(name: str, embed_dim: int | None, input_size: int, input_mpp: float) -> Encoder:
    import timm
    from timm.models.swin_transformer import SwinTransformer

    check_embed_dim(embed_dim)
    trunk = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem, img_size=224,
        strict_img_size=False,
    )
    if not isinstance(trunk, SwinTransformer):
        raise TypeError(f"timm swin_tiny_patch4_window7_224 is a {type(trunk).__name__}, not a SwinTransformer")
    cfg = EncoderConfig(name, int(input_size), float(input_mpp), IMAGENET_MEAN, IMAGENET_STD,
                        768 if embed_dim is None else embed_dim, embed_dim)
    return SwinEncoder(cfg, trunk, trunk_features=768)


@register_encoder(
    "ctranspath",
    embed_dim=768,
    input_size=224,
    mpp=1.0,
    weights_format=_CTRANSPATH_FORMAT,
    weights_file="ctranspath.pth",
    source="https://github.com/Xiyue-Wang/TransPath (ctranspath.pth, Google Drive link in its README)",
    license="GPL-3.0 (TransPath repository); weights for research use",
    requires_weights=True,
    remap=swin_v0_to_timm,
    min_input_size=32,
    interpolation="bilinear",
    output="gap",
)
def _ctranspath(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 1.0) -> Encoder:
    """CTransPath (Wang et al., MedIA 2022), TransPath's weights: Swin-T with a conv stem, 768-d, 224 px @ 1 µm/px."""
    return _ctranspath_encoder("ctranspath", embed_dim, input_size, input_mpp)


@register_encoder(
    "chief-ctranspath",
    embed_dim=768,
    input_size=224,
    mpp=1.0,
    weights_format=_CTRANSPATH_FORMAT,
    weights_file="CHIEF_CTransPath.pth",
    source="https://huggingface.co/datasets/MahmoodLab/hest-bench fm_v1/ctranspath/CHIEF_CTransPath.pth (gated); "
    "github.com/hms-dbmi/CHIEF",
    license="gated (hest-bench access conditions); CHIEF's terms at github.com/hms-dbmi/CHIEF: check before use",
    requires_weights=True,
    remap=swin_v0_to_timm,
    min_input_size=32,
    interpolation="bilinear",
    output="gap",
)
def _chief_ctranspath(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 1.0) -> Encoder:
    """CHIEF's CTransPath (Wang et al., Nature 2024): the CTransPath architecture, CHIEF's weights, 768-d @ 1 µm/px."""
    return _ctranspath_encoder("chief-ctranspath", embed_dim, input_size, input_mpp)
