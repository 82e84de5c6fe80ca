"""Public pathology foundation tile encoders, built with timm from their published architectures.

Nothing is downloaded: each entry builds the architecture exactly as its model card / official code
configures it (the source is cited above each entry) and loads the user's local weight file strictly
after the documented key remapping (see :mod:`wsi_encoder.models.encoders.weights`). Every entry
needs its weights (``requires_weights``): a foundation model is never silently randomly initialised.

ViTs are built with ``dynamic_img_size=True`` (as TRIDENT does) so that inputs of another multiple
of the patch size interpolate the position embedding; ``wsienc encode`` feeds every tile at the
entry's ``input_size`` anyway.

Hugging Face ``transformers`` checkpoints (Phikon, Phikon-v2, Hibou-B/L, Midnight-12k) are loaded into the
equivalent timm ViT after remapping the HF key layout; ``transformers`` is not needed.
"""

from __future__ import annotations

from functools import partial
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
from wsi_encoder.models.encoders.weights import (
    hf_dinov2_resampled_to_timm,
    hf_dinov2_to_timm,
    hf_vit_to_timm,
    hibou_to_timm,
    timm_layout,
)

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
KAIKO_MEAN = (0.5, 0.5, 0.5)
KAIKO_STD = (0.5, 0.5, 0.5)

_TIMM_FILE = "timm state dict (pytorch_model.bin or model.safetensors), keys as saved by timm; loaded as they are"


if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


class TimmViTEncoder(Encoder):
    """A timm ``VisionTransformer`` trunk; the embedding is the class token (``pool="cls"``), the
    class token concatenated with the mean of the patch tokens (``pool="cls+mean"``, Virchow), both
    taken after the final norm, or the trunk's own head on the class token (``pool="head"``: CLIP's
    image projection), with an optional linear embedding on top."""

    trunk: VisionTransformer

    def __init__(self, config: EncoderConfig, trunk: VisionTransformer, *, pool: str, trunk_features: int) -> None:
        super().__init__(config)
        self.trunk = trunk
        self.pool = pool
        self.embed = nn.Linear(trunk_features, config.embed_dim) if config.embed_dim is not None else nn.Identity()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        if self.pool == "head":
            return self.embed(self.trunk.forward_head(tokens))
        cls = tokens[:, 0]
        if self.pool == "cls+mean":
            patches = tokens[:, int(self.trunk.num_prefix_tokens) :]
            cls = torch.cat([cls, patches.mean(dim=1)], dim=-1)
        return self.embed(cls)

    def trunk_blocks(self) -> list[nn.Module]:
        t = self.trunk
        stem = nn.Module()  # a view: patch embedding and the class/register/position tokens
        stem.patch_embed = t.patch_embed
        stem.norm_pre = t.norm_pre  # (CLIP's pre-norm; an Identity elsewhere)
        for name in ("cls_token", "reg_token", "pos_embed"):
            param = getattr(t, name, None)
            if isinstance(param, nn.Parameter):
                stem.register_parameter(name, param)
        blocks = list(t.blocks)
        blocks[-1] = nn.ModuleList([blocks[-1], t.norm, t.fc_norm, t.head])  # the last block carries the final norm
        return [stem, *blocks]


def _vit(
    name: str,
    arch: str,
    *,
    out_dim: int | None,
    input_size: int,
    input_mpp: float,
    native_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    features: int,
    pool: str = "cls",
    **timm_kwargs: Any,
) -> Encoder:
    """Build ``arch`` with timm (no pretrained download) and wrap it.

    The position embedding is always built for the published ``native_size`` (so the official file
    loads strictly); other ``input_size`` values are served by ``dynamic_img_size`` interpolation.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    check_embed_dim(out_dim)
    timm_kwargs.setdefault("num_classes", 0)
    trunk = timm.create_model(arch, pretrained=False, img_size=native_size, dynamic_img_size=True, **timm_kwargs)
    if not isinstance(trunk, VisionTransformer):
        raise TypeError(f"timm {arch!r} is a {type(trunk).__name__}, not a VisionTransformer")
    cfg = EncoderConfig(name, int(input_size), float(input_mpp), mean, std, features if out_dim is None else out_dim, out_dim)
    return TimmViTEncoder(cfg, trunk, pool=pool, trunk_features=features)


def _swiglu() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


# ---- UNI / UNI2-h (Mahmood lab) ---------------------------------------------------------------------
# Model card https://huggingface.co/MahmoodLab/UNI and TRIDENT UNIInferenceEncoder:
# timm "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
# dynamic_img_size=True; ImageNet mean/std; embedding = class token (1,024). Tiles 224 px at 20x (0.5 µm/px).
@register_encoder(
    "uni",
    embed_dim=1024,
    input_size=224,
    mpp=0.5,
    weights_format=_TIMM_FILE,
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/MahmoodLab/UNI (gated)",
    license="CC-BY-NC-ND-4.0, gated: academic non-commercial research use only",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bilinear",
    crop="center",
    output="cls",
    min_input_size=16,
)
def _uni(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """UNI (Chen et al., Nat. Med. 2024): ViT-L/16 DINOv2, 1,024-d class token, 224 px @ 0.5 µm/px."""
    return _vit("uni", "vit_large_patch16_224", out_dim=embed_dim, input_size=input_size, input_mpp=input_mpp,
                native_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=1024, patch_size=16, init_values=1e-5)


# Model card https://huggingface.co/MahmoodLab/UNI2-h and TRIDENT UNIv2InferenceEncoder:
# timm "vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
# embed_dim=1536, mlp_ratio=2.66667*2, num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked,
# act_layer=SiLU, reg_tokens=8, dynamic_img_size=True; ImageNet mean/std; class token (1,536).
@register_encoder(
    "uni2-h",
    embed_dim=1536,
    input_size=224,
    mpp=0.5,
    weights_format=_TIMM_FILE,
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/MahmoodLab/UNI2-h (gated)",
    license="CC-BY-NC-ND-4.0, gated: academic non-commercial research use only",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bilinear",
    crop="center",
    output="cls",
    min_input_size=14,
)
def _uni2h(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """UNI2-h: ViT-H/14 (24 blocks, 1,536 wide, SwiGLU, 8 registers), 1,536-d class token, 224 px @ 0.5 µm/px."""
    return _vit("uni2-h", "vit_giant_patch14_224", out_dim=embed_dim, input_size=input_size, input_mpp=input_mpp,
                native_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=1536, patch_size=14, depth=24,
                num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True,
                reg_tokens=8, **_swiglu())


# ---- Virchow / Virchow2 (Paige) -----------------------------------------------------------------------
# Model card https://huggingface.co/paige-ai/Virchow (config.json) and TRIDENT VirchowInferenceEncoder:
# timm "vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
# global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=SiLU; ImageNet mean/std;
# embedding = concat(class token, mean of the 256 patch tokens) = 2,560. Trained at 20x (0.5 µm/px).
@register_encoder(
    "virchow",
    embed_dim=2560,
    input_size=224,
    mpp=0.5,
    weights_format=_TIMM_FILE,
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/paige-ai/Virchow (gated)",
    license="Apache-2.0, gated (accept Paige's access conditions on the card)",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bicubic",
    crop="center",
    output="cls+mean(patch)",
    min_input_size=14,
)
def _virchow(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Virchow (Vorontsov et al., Nat. Med. 2024): ViT-H/14 SwiGLU, class token ++ mean patch token = 2,560-d."""
    return _vit("virchow", "vit_huge_patch14_224", out_dim=embed_dim, input_size=input_size, input_mpp=input_mpp,
                native_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=2560, pool="cls+mean",
                init_values=1e-5, mlp_ratio=5.3375, global_pool="", **_swiglu())


# Model card https://huggingface.co/paige-ai/Virchow2 and TRIDENT Virchow2InferenceEncoder: as Virchow with
# reg_tokens=4; embedding = concat(class token, mean of the patch tokens after the 4 registers) = 2,560.
# Trained on mixed magnifications (5x-40x); 20x (0.5 µm/px) is its reference scale.
@register_encoder(
    "virchow2",
    embed_dim=2560,
    input_size=224,
    mpp=0.5,
    weights_format=_TIMM_FILE,
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/paige-ai/Virchow2 (gated)",
    license="CC-BY-NC-ND-4.0, gated: non-commercial research use only",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bicubic",
    crop="center",
    output="cls+mean(patch, registers excluded)",
    min_input_size=14,
)
def _virchow2(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Virchow2 (Zimmermann et al. 2024): ViT-H/14 SwiGLU, 4 registers, class ++ mean patch token = 2,560-d."""
    return _vit("virchow2", "vit_huge_patch14_224", out_dim=embed_dim, input_size=input_size, input_mpp=input_mpp,
                native_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=2560, pool="cls+mean",
                init_values=1e-5, mlp_ratio=5.3375, global_pool="", reg_tokens=4, **_swiglu())


# ---- H-optimus-0 / H-optimus-1 (Bioptimus) -------------------------------------------------------------
# Model cards https://huggingface.co/bioptimus/H-optimus-0 and .../H-optimus-1 (timm config.json) and TRIDENT
# HOptimus{0,1}InferenceEncoder: timm "vit_giant_patch14_reg4_dinov2" (ViT-g/14: 40 blocks, 1,536 wide,
# SwiGLU, 4 registers, no_embed_class), img_size=224, init_values=1e-5, num_classes=0, global_pool="token";
# mean (0.707223, 0.578729, 0.703617), std (0.211883, 0.230117, 0.177517); class token (1,536); 0.5 µm/px.
def _hoptimus(name: str, embed_dim: int | None, input_size: int, input_mpp: float) -> Encoder:
    return _vit(name, "vit_giant_patch14_reg4_dinov2", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, features=1536,
                init_values=1e-5, global_pool="token")


@register_encoder(
    "h-optimus-0",
    embed_dim=1536,
    input_size=224,
    mpp=0.5,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    weights_format=_TIMM_FILE,
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/bioptimus/H-optimus-0",
    license="Apache-2.0",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bilinear",
    output="cls",
    min_input_size=14,
)
def _hoptimus0(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """H-optimus-0 (Bioptimus 2024): ViT-g/14 with 4 registers, 1.1 B parameters, 1,536-d class token."""
    return _hoptimus("h-optimus-0", embed_dim, input_size, input_mpp)


@register_encoder(
    "h-optimus-1",
    embed_dim=1536,
    input_size=224,
    mpp=0.5,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    weights_format=_TIMM_FILE,
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/bioptimus/H-optimus-1 (gated)",
    license="gated (access on request); Bioptimus licence terms on the card: check them before any commercial use",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bilinear",
    output="cls",
    min_input_size=14,
)
def _hoptimus1(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """H-optimus-1 (Bioptimus 2025): ViT-g/14 with 4 registers (as H-optimus-0), 1,536-d class token."""
    return _hoptimus("h-optimus-1", embed_dim, input_size, input_mpp)


# ---- Prov-GigaPath tile encoder (Microsoft / Providence) ----------------------------------------------
# Model card https://huggingface.co/prov-gigapath/prov-gigapath (timm config.json) and TRIDENT
# GigaPathInferenceEncoder: timm "vit_giant_patch14_dinov2" with img_size=224, patch_size=16, embed_dim=1536,
# depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0; ImageNet mean/std; class
# token (1,536). Tiles 256 px at 20x resized/cropped to 224 (0.5 µm/px).
@register_encoder(
    "prov-gigapath",
    embed_dim=1536,
    input_size=224,
    mpp=0.5,
    weights_format=_TIMM_FILE,
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/prov-gigapath/prov-gigapath (gated)",
    license="Apache-2.0, gated (research use; see the card's conditions)",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bicubic",
    crop="center",
    crop_fraction=224 / 256,
    output="cls",
    min_input_size=16,
)
def _gigapath(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Prov-GigaPath tile encoder (Xu et al., Nature 2024): ViT-g/16 DINOv2, 1.1 B parameters, 1,536-d."""
    return _vit("prov-gigapath", "vit_giant_patch14_dinov2", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=1536,
                patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334)


# ---- GPFM (Ma et al. 2024, "Towards a generalizable pathology foundation model via unified knowledge distillation")
# TRIDENT GPFMInferenceEncoder: timm "vit_large_patch14_dinov2" (.lvd142m), pretrained=False, img_size=224,
# init_values=1e-5, dynamic_img_size=True, strict load of GPFM.pth (the state dict, or under "state_dict");
# ImageNet mean/std, Resize(224, bicubic); model(x) = the class token after the final norm (1,024).
@register_encoder(
    "gpfm",
    embed_dim=1024,
    input_size=224,
    mpp=0.5,
    weights_format="timm state dict (GPFM.pth, or {'state_dict': ...}); loaded as it is",
    weights_file="GPFM.pth",
    source="https://huggingface.co/majiabo/GPFM",
    license="see the card (majiabo/GPFM); research use",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bicubic",
    output="cls",
    min_input_size=14,
)
def _gpfm(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """GPFM (Ma et al. 2024): ViT-L/14 distilled from several foundation models, 1,024-d class token, 224 px."""
    return _vit("gpfm", "vit_large_patch14_dinov2", out_dim=embed_dim, input_size=input_size, input_mpp=input_mpp,
                native_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=1024, init_values=1e-5)


# ---- Phikon / Phikon-v2 (Owkin) ------------------------------------------------------------------------
# Model card https://huggingface.co/owkin/phikon (config.json: ViTModel, hidden 768, 12 layers, 12 heads,
# patch 16, image 224, qkv_bias, layer_norm_eps 1e-6 (as iBOT; the card's config first said 1e-12 and Owkin
# corrected it), gelu) and TRIDENT PhikonInferenceEncoder
# (ViTModel add_pooling_layer=False, last_hidden_state[:, 0]); ImageNet mean/std; 20x (0.5 µm/px).
@register_encoder(
    "phikon",
    embed_dim=768,
    input_size=224,
    mpp=0.5,
    weights_format="Hugging Face transformers ViTModel (pytorch_model.bin / model.safetensors); HF ViT keys remapped to timm, pooler.* dropped",
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/owkin/phikon",
    license="Owkin non-commercial licence (see the card)",
    requires_weights=True,
    remap=hf_vit_to_timm,
    lazy_init=True,
    interpolation="bilinear",
    output="cls",
    min_input_size=16,
)
def _phikon(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Phikon (Filiot et al. 2023): ViT-B/16 iBOT on TCGA, 768-d class token, 224 px @ 0.5 µm/px."""
    return _vit("phikon", "vit_base_patch16_224", out_dim=embed_dim, input_size=input_size, input_mpp=input_mpp,
                native_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=768,
                norm_layer=partial(nn.LayerNorm, eps=1e-6))


# Model card https://huggingface.co/owkin/phikon-v2 (config.json: Dinov2Model, hidden 1024, 24 layers, 16
# heads, patch 16, image 224, layerscale 1e-5, layer_norm_eps 1e-6, mlp_ratio 4, no registers) and TRIDENT
# Phikonv2InferenceEncoder (last_hidden_state[:, 0]); ImageNet mean/std; 20x (0.5 µm/px).
@register_encoder(
    "phikon-v2",
    embed_dim=1024,
    input_size=224,
    mpp=0.5,
    weights_format="Hugging Face transformers Dinov2Model (model.safetensors); HF DINOv2 keys remapped to timm, mask_token dropped",
    weights_file="model.safetensors",
    source="https://huggingface.co/owkin/phikon-v2",
    license="Owkin non-commercial licence (see the card)",
    requires_weights=True,
    remap=hf_dinov2_to_timm,
    lazy_init=True,
    interpolation="bilinear",
    crop="center",
    output="cls",
    min_input_size=16,
)
def _phikon2(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Phikon-v2 (Filiot et al. 2024): ViT-L/16 DINOv2 on PANCAN-XL, 1,024-d class token, 224 px @ 0.5 µm/px."""
    return _vit("phikon-v2", "vit_large_patch16_224", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=1024,
                init_values=1e-5)


# ---- Hibou-B (HistAI) ----------------------------------------------------------------------------------
# Model card https://huggingface.co/histai/hibou-b, config.json (custom Dinov2ModelWithRegisters: hidden 768,
# 12 layers, 12 heads, patch 14, image_size 224, num_register_tokens 4, mlp_ratio 4, use_swiglu_ffn true, qkv_bias,
# layer_norm_eps 1e-6, apply_layernorm) and TRIDENT HibouLInferenceEncoder (pooler_output = class token after the
# final layernorm); mean (0.7068, 0.5755, 0.722), std (0.195, 0.2316, 0.1816); 0.5 µm/px.
# HF's SwiGLU FFN has hidden = (int(768 * 4 * 2 / 3) + 7) // 8 * 8 = 2048: weights_in 768 -> 2 x 2048 (x1, x2),
# silu(x1) * x2, weights_out 2048 -> 768 = timm's SwiGLUPacked (gate first) with mlp_ratio 4096 / 768.
# HistAI's own hibou-b.pth (github.com/HistAI/hibou, hibou.build_model: Meta's DINOv2 DinoVisionTransformer,
# vit_base, patch 14, layerscale 1e-5, ffn_layer "swiglufused" (w12/w3, same hidden 2048), 4 registers) is
# accepted too (weights.dinov2_native_to_timm). The card's processor resizes bicubic to 224.
@register_encoder(
    "hibou-b",
    embed_dim=768,
    input_size=224,
    mpp=0.5,
    mean=HIBOU_MEAN,
    std=HIBOU_STD,
    weights_format="Hugging Face DINOv2-with-registers (model.safetensors; HF keys remapped to timm, mlp.weights_in/out -> mlp.fc1/fc2) or HistAI's hibou-b.pth (DINOv2 code layout; register_tokens -> reg_token, mlp.w12/w3 -> mlp.fc1/fc2); class-token position folded into cls_token",
    weights_file="model.safetensors",
    source="https://huggingface.co/histai/hibou-b (or hibou-b.pth: github.com/HistAI/hibou README, Google Drive)",
    license="Apache-2.0",
    requires_weights=True,
    remap=hibou_to_timm,
    lazy_init=True,
    interpolation="bicubic",
    output="pooler",
    min_input_size=14,
)
def _hibou_b(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Hibou-B (Nechaev et al. 2024): ViT-B/14 DINOv2, SwiGLU, 4 registers, 768-d class token, 224 px @ 0.5 µm/px."""
    return _vit("hibou-b", "vit_base_patch14_reg4_dinov2", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=HIBOU_MEAN, std=HIBOU_STD, features=768,
                init_values=1e-5, mlp_ratio=4096 / 768, **_swiglu())


# Hibou-L: huggingface.co/histai/hibou-L (the same remote-code DINOv2-with-registers layout as Hibou-B) and HistAI's
# own code (github.com/HistAI/hibou, cellvit.HibouEncoder: build_model(arch="vit_large", patch_size=14,
# layerscale=1e-5, ffn_layer="swiglufused", num_register_tokens=4, img_size=224); vit_large = 1,024 wide, 24
# blocks, 16 heads, mlp_ratio 4, so the fused SwiGLU hidden is (int(4096 * 2 / 3) + 7) // 8 * 8 = 2736 and
# timm's SwiGLUPacked fc1 is 2 x 2736 wide); TRIDENT HibouLInferenceEncoder: Hibou constants, Resize(224,
# bicubic); the class token after the final layernorm (pooler_output), 1,024-d.
@register_encoder(
    "hibou-l",
    embed_dim=1024,
    input_size=224,
    mpp=0.5,
    mean=HIBOU_MEAN,
    std=HIBOU_STD,
    weights_format="Hugging Face DINOv2-with-registers (model.safetensors), as hibou-b, or the DINOv2 code layout; class-token position folded into cls_token",
    weights_file="model.safetensors",
    source="https://huggingface.co/histai/hibou-L",
    license="Apache-2.0",
    requires_weights=True,
    remap=hibou_to_timm,
    lazy_init=True,
    interpolation="bicubic",
    output="pooler",
    min_input_size=14,
)
def _hibou_l(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Hibou-L (Nechaev et al. 2024): ViT-L/14 DINOv2, SwiGLU, 4 registers, 1,024-d class token, 224 px @ 0.5 µm/px."""
    return _vit("hibou-l", "vit_large_patch14_reg4_dinov2", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=HIBOU_MEAN, std=HIBOU_STD, features=1024,
                init_values=1e-5, mlp_ratio=2 * 2736 / 1024, **_swiglu())


# ---- Lunit DINO ViT-S/8 ---------------------------------------------------------------------------------
# Kang et al., CVPR 2023 "Benchmarking self-supervised learning on diverse pathology datasets"; timm port
# https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino (config.json: vit_small_patch8_224,
# num_classes 0, mean (0.70322989, 0.53606487, 0.66096631), std (0.21716536, 0.26081574, 0.20723464)) and
# TRIDENT LunitS8InferenceEncoder; class token (384). Trained on 20x and 40x tiles; 0.5 µm/px here.
@register_encoder(
    "lunit-vits8",
    embed_dim=384,
    input_size=224,
    mpp=0.5,
    mean=LUNIT_MEAN,
    std=LUNIT_STD,
    weights_format=_TIMM_FILE,
    weights_file="model.safetensors",
    source="https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino (original: github.com/lunit-io/benchmark-ssl)",
    license="Lunit's terms (non-commercial research use; see the card)",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bilinear",
    output="cls",
    min_input_size=8,
)
def _lunit(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Lunit DINO ViT-S/8 (Kang et al., CVPR 2023): 384-d class token, 224 px @ 0.5 µm/px."""
    return _vit("lunit-vits8", "vit_small_patch8_224", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=LUNIT_MEAN, std=LUNIT_STD, features=384)


# ---- Lunit DINO ViT-S/16 ----------------------------------------------------------------------------------
# The same study's ViT-S/16; timm port https://huggingface.co/1aurent/vit_small_patch16_224.lunit_dino
# (vit_small_patch16_224, num_classes 0, Lunit's mean/std as above); class token (384); 0.5 µm/px here.
@register_encoder(
    "lunit-vits16",
    embed_dim=384,
    input_size=224,
    mpp=0.5,
    mean=LUNIT_MEAN,
    std=LUNIT_STD,
    weights_format=_TIMM_FILE,
    weights_file="model.safetensors",
    source="https://huggingface.co/1aurent/vit_small_patch16_224.lunit_dino (original: github.com/lunit-io/benchmark-ssl)",
    license="Lunit's terms (non-commercial research use; see the card)",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bilinear",
    output="cls",
    min_input_size=16,
)
def _lunit16(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Lunit DINO ViT-S/16 (Kang et al., CVPR 2023): 384-d class token, 224 px @ 0.5 µm/px."""
    return _vit("lunit-vits16", "vit_small_patch16_224", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=LUNIT_MEAN, std=LUNIT_STD, features=384)


# ---- kaiko.ai ViT-B/8 -------------------------------------------------------------------------------------
# Aben et al. 2024 "Towards large-scale training of pathology foundation models" (kaiko-ai/towards_large_pathology_fms);
# timm port https://huggingface.co/1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms and TRIDENT
# KaikoB8InferenceEncoder: timm "vit_base_patch8_224", num_classes=0, img_size=224, dynamic_img_size=True;
# mean = std = (0.5, 0.5, 0.5); class token (768). Trained on several magnifications; 0.5 µm/px here.
@register_encoder(
    "kaiko-vitb8",
    embed_dim=768,
    input_size=224,
    mpp=0.5,
    mean=KAIKO_MEAN,
    std=KAIKO_STD,
    weights_format=_TIMM_FILE,
    weights_file="model.safetensors",
    source="https://huggingface.co/1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms (kaiko-ai/towards_large_pathology_fms)",
    license="Kaiko Non-Commercial Public License",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bilinear",
    crop="center",
    output="cls",
    min_input_size=8,
)
def _kaiko_b8(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """kaiko.ai ViT-B/8 DINO (Aben et al. 2024): 768-d class token, 224 px @ 0.5 µm/px."""
    return _vit("kaiko-vitb8", "vit_base_patch8_224", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=KAIKO_MEAN, std=KAIKO_STD, features=768)


# The other kaiko.ai checkpoints, as TRIDENT's Kaiko{S16,S8,B16,L14}InferenceEncoder build them: timm
# "<arch>" with num_classes=0, img_size=<native>, dynamic_img_size=True (ViT-L/14: vit_large_patch14_reg4_dinov2 built
# at 518 px and fed 224 px, its position embedding interpolated), Resize(224, bilinear) + CenterCrop(224),
# mean = std = 0.5; class token. Files: huggingface.co/1aurent/<arch>.kaiko_ai_towards_large_pathology_fms.
_KAIKO_MORE = (
    ("kaiko-vits16", "vit_small_patch16_224", 384, 224, 16, "ViT-S/16"),
    ("kaiko-vits8", "vit_small_patch8_224", 384, 224, 8, "ViT-S/8"),
    ("kaiko-vitb16", "vit_base_patch16_224", 768, 224, 16, "ViT-B/16"),
    ("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 1024, 518, 14, "ViT-L/14 with 4 registers"),
)
for _kname, _karch, _kdim, _knative, _kpatch, _kwhat in _KAIKO_MORE:

    def _kaiko_build(
        *, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5,
        _n: str = _kname, _a: str = _karch, _d: int = _kdim, _s: int = _knative,
    ) -> Encoder:
        return _vit(_n, _a, out_dim=embed_dim, input_size=input_size, input_mpp=input_mpp, native_size=_s,
                    mean=KAIKO_MEAN, std=KAIKO_STD, features=_d)

    _kaiko_build.__doc__ = f"kaiko.ai {_kwhat} DINO (Aben et al. 2024): {_kdim}-d class token, 224 px @ 0.5 µm/px."
    register_encoder(
        _kname,
        embed_dim=_kdim,
        input_size=224,
        mpp=0.5,
        mean=KAIKO_MEAN,
        std=KAIKO_STD,
        weights_format=_TIMM_FILE,
        weights_file="model.safetensors",
        source=f"https://huggingface.co/1aurent/{_karch}.kaiko_ai_towards_large_pathology_fms (kaiko-ai/towards_large_pathology_fms)",
        license="Kaiko Non-Commercial Public License",
        requires_weights=True,
        remap=timm_layout,
        lazy_init=True,
        interpolation="bilinear",
        crop="center",
        output="cls",
        min_input_size=_kpatch,
    )(_kaiko_build)


# ---- H0-mini (Bioptimus) ------------------------------------------------------------------------------------
# Filiot et al. 2025, "Distilling foundation models for robust and efficient models in digital pathology" (ViT-B/14
# distilled from H-optimus-0). Model card https://huggingface.co/bioptimus/H0-mini: timm.create_model(
# "hf-hub:bioptimus/H0-mini", mlp_layer=SwiGLUPacked, act_layer=SiLU); its config.json is timm
# "vit_base_patch14_reg4_dinov2" with img_size=224, init_values=1e-5, mlp_ratio=5.33334, reg_tokens=4,
# global_pool="", num_classes=0 (85.74 M parameters, the 342,974,184-byte model.safetensors); the card's transform is
# timm's create_transform of its pretrained_cfg: H-optimus mean/std, bicubic Resize(224) + CenterCrop(224). Output,
# as the card recommends and Bioptimus's SDK declares it (output_type "cls+patch_mean", 1,536-d): the class token
# concatenated with the mean of the 256 patch tokens after the 4 registers. 224 px @ 0.5 µm/px.
@register_encoder(
    "h0-mini",
    embed_dim=1536,
    input_size=224,
    mpp=0.5,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    weights_format=_TIMM_FILE,
    weights_file="model.safetensors",
    source="https://huggingface.co/bioptimus/H0-mini (gated)",
    license="CC-BY-NC-ND-4.0, gated (access on request): non-commercial research use only",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bicubic",
    crop="center",
    output="cls+mean(patch, registers excluded)",
    min_input_size=14,
)
def _h0_mini(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """H0-mini (Filiot et al. 2025): ViT-B/14 distilled from H-optimus-0, class ++ mean patch token = 1,536-d."""
    return _vit("h0-mini", "vit_base_patch14_reg4_dinov2", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, features=1536,
                pool="cls+mean", init_values=1e-5, mlp_ratio=5.33334, reg_tokens=4, global_pool="", **_swiglu())


# ---- Midnight-12k (kaiko.ai) ---------------------------------------------------------------------------------
# Karasikov et al. 2025, "Training state-of-the-art pathology foundation models with orders of magnitude less data";
# github.com/kaiko-ai/Midnight README and the card https://huggingface.co/kaiko-ai/midnight (MIT): a transformers
# Dinov2Model (AutoModel.from_pretrained("kaiko-ai/midnight")) trained from Meta's dinov2_vitg14 (ViT-g/14: 1,536
# wide, 40 layers, 24 heads, SwiGLU FFN with hidden (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096, layer scale, no
# registers); transform Resize(224) + CenterCrop(224) (torchvision's default bilinear), mean = std = (0.5, 0.5, 0.5);
# classification embedding = cat(last_hidden_state[:, 0], last_hidden_state[:, 1:].mean(1)) = 3,072-d. The card's
# config.json is read here as the ViT-g/14 above; a position embedding built for another grid (DINOv2's 518 px) is
# resampled at load time as transformers does for a 224-px input. TCGA tiles at 0.5 µm/px.
@register_encoder(
    "midnight-12k",
    embed_dim=3072,
    input_size=224,
    mpp=0.5,
    mean=KAIKO_MEAN,
    std=KAIKO_STD,
    weights_format="Hugging Face transformers Dinov2Model (model.safetensors); HF DINOv2 keys remapped to timm, "
    "mlp.weights_in/out -> mlp.fc1/fc2, the position embedding resampled to 16 x 16 as transformers does at 224 px",
    weights_file="model.safetensors",
    source="https://huggingface.co/kaiko-ai/midnight (github.com/kaiko-ai/Midnight)",
    license="MIT",
    requires_weights=True,
    remap=hf_dinov2_resampled_to_timm(16),
    lazy_init=True,
    interpolation="bilinear",
    crop="center",
    output="cls+mean(patch)",
    min_input_size=14,
)
def _midnight(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """Midnight-12k (Karasikov et al. 2025): ViT-g/14 DINOv2 on TCGA, class ++ mean patch token = 3,072-d."""
    return _vit("midnight-12k", "vit_giant_patch14_dinov2", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=KAIKO_MEAN, std=KAIKO_STD, features=3072,
                pool="cls+mean", init_values=1e-5, mlp_ratio=2 * 4096 / 1536)
