"""Image towers of pathology vision-language models: PLIP and QuiltNet (CLIP), CONCH v1.5 (CoCa, TITAN's patch encoder).

The CLIP towers are timm CLIP ViTs whose head holds the image projection; the image embedding is CLIP's
``encode_image`` / ``get_image_features`` (the projected class token). CONCH v1.5 is a ViT-L/16 with CoCa's
attention-pooling head, written here from its published code (see :class:`ConchV15Encoder`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.models.encoders.foundation import _vit
from wsi_encoder.models.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderConfig,
    check_embed_dim,
    register_encoder,
)
from wsi_encoder.models.encoders.weights import hf_clip_vision_to_timm, open_clip_vision_to_timm, timm_layout

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- PLIP (Huang et al., Nat. Med. 2023) -------------------------------------------------------------------
# huggingface.co/vinid/plip: a transformers CLIPModel (ViT-B/32 image tower, quick_gelu, LayerNorm eps 1e-5,
# projection_dim 512); its CLIPProcessor resizes the short side to 224 (bicubic), centre-crops 224 and normalises
# with CLIP's mean/std; the image embedding is CLIPModel.get_image_features = visual_projection(post_layernorm(
# class token)), 512-d. The image tower is timm's "vit_base_patch32_clip_quickgelu_224" (pre-norm, no patch bias)
# with a 512-wide head holding the projection. PLIP's images (Twitter) have no stated magnification: 0.5 µm/px here.
@register_encoder(
    "plip",
    embed_dim=512,
    input_size=224,
    mpp=0.5,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    weights_format="Hugging Face transformers CLIPModel (pytorch_model.bin / model.safetensors); the vision tower and visual_projection remapped to timm, the text tower dropped",
    weights_file="pytorch_model.bin",
    source="https://huggingface.co/vinid/plip",
    license="see the card (vinid/plip): research use",
    requires_weights=True,
    remap=hf_clip_vision_to_timm,
    lazy_init=True,
    interpolation="bicubic",
    crop="center",
    output="projection (CLIP get_image_features)",
    min_input_size=32,
)
def _plip(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """PLIP (Huang et al., Nat. Med. 2023): CLIP ViT-B/32 image tower, 512-d projected image embedding."""
    return _vit("plip", "vit_base_patch32_clip_quickgelu_224", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=CLIP_MEAN, std=CLIP_STD, features=512, pool="head",
                num_classes=512)


# ---- QuiltNet-B-32 (Ikezogwo et al., NeurIPS 2023 "Quilt-1M") ------------------------------------------------------
# huggingface.co/wisdomik/QuiltNet-B-32 (MIT): open_clip.create_model_and_transforms("hf-hub:wisdomik/QuiltNet-B-32");
# open_clip_config.json: embed_dim 512, vision ViT-B/32 (224 px, 12 layers, 768 wide), no quick_gelu (GELU), CLIP
# mean/std; open_clip's eval transform resizes the short side to 224 (bicubic) and centre-crops 224. The image
# embedding is model.encode_image = ln_post(class token) @ visual.proj, 512-d. The tower is timm's
# "vit_base_patch32_clip_224" (pre-norm, no patch bias, GELU) with a 512-wide head holding the projection. Quilt-1M's
# YouTube frames have no single magnification: 0.5 µm/px here.
@register_encoder(
    "quiltnet-b-32",
    embed_dim=512,
    input_size=224,
    mpp=0.5,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    weights_format="open_clip CLIP state dict (open_clip_pytorch_model.bin); the visual tower and its projection "
    "remapped to timm, the text tower dropped",
    weights_file="open_clip_pytorch_model.bin",
    source="https://huggingface.co/wisdomik/QuiltNet-B-32",
    license="MIT",
    requires_weights=True,
    remap=open_clip_vision_to_timm,
    lazy_init=True,
    interpolation="bicubic",
    crop="center",
    output="projection (open_clip encode_image)",
    min_input_size=32,
)
def _quiltnet(*, embed_dim: int | None = None, input_size: int = 224, input_mpp: float = 0.5) -> Encoder:
    """QuiltNet-B-32 (Ikezogwo et al., NeurIPS 2023): CLIP ViT-B/32 tuned on Quilt-1M, 512-d projected image embedding."""
    return _vit("quiltnet-b-32", "vit_base_patch32_clip_224", out_dim=embed_dim, input_size=input_size,
                input_mpp=input_mpp, native_size=224, mean=CLIP_MEAN, std=CLIP_STD, features=512, pool="head",
                num_classes=512)


# ---- CONCH v1.5 (Mahmood lab; the patch encoder of TITAN, Ding et al. 2024) ------------------------------------------
class AttentionalPooler(nn.Module):
    """CoCa's attention pooling: ``n_queries`` learned queries attend over the trunk's tokens (``n_head`` heads).

    As CONCH's ``AttentionalPooler``: ``ln_k`` on the tokens, ``ln_q`` on the queries (LayerNorm, eps 1e-5),
    bias-free ``to_q`` / ``to_kv`` (keys and values stacked) / ``to_out``, softmax attention with scale
    ``head_dim ** -0.5``. Input ``(B, N, context_dim)``, output ``(B, n_queries, d_model)``.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q = self.to_q(self.ln_q(self.query)).expand(x.shape[0], -1, -1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


def ibot_position_embedding(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The position embedding of a ``grid_h`` × ``grid_w`` patch grid, interpolated as iBOT's / CONCH's ViT does.

    CONCH v1.5's ``VisionTransformer.interpolate_pos_encoding`` (from iBOT and DINO): the stored square grid is
    resized bicubically with ``scale_factor = (grid + 0.1) / side`` (DINO's offset against rounding), not to a
    target size as timm does; the class token's entry is kept. The stored grid is returned as it is when it
    already fits.
    """
    n = pos_embed.shape[1] - 1
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    side = int(math.sqrt(n))
    patches = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)


class ConchTower(nn.Module):
    """CONCH v1.5's vision tower, named as in its ``pytorch_model_vision.bin``: ``trunk`` (ViT-L/16),
    ``attn_pool_contrast`` (one query) and ``ln_contrast``."""

    def __init__(self, trunk: VisionTransformer) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)


class ConchV15Encoder(Encoder):
    """CONCH v1.5: the trunk's tokens after its final norm, attention-pooled by one query, then ``ln_contrast``.

    The trunk is timm's ViT-L/16 (the same blocks as CONCH's iBOT-derived ``VisionTransformer``); the forward
    pass is written out here only to add the position embedding the official way
    (:func:`ibot_position_embedding`: the file's 14 × 14 grid interpolated to the 28 × 28 of a 448-px input).
    """

    tower: ConchTower

    def __init__(self, config: EncoderConfig, tower: ConchTower) -> None:
        super().__init__(config)
        self.tower = tower
        self.embed = nn.Linear(768, config.embed_dim) if config.embed_dim is not None else nn.Identity()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tower.trunk
        tokens = t.patch_embed(x)  # (B, H/16, W/16, C): built with dynamic_img_size
        b, h, w, c = tokens.shape
        cls, pos = cast(torch.Tensor, t.cls_token), cast(torch.Tensor, t.pos_embed)  # (the builder makes both)
        pos = ibot_position_embedding(pos, h, w).to(tokens.dtype)
        tokens = torch.cat([cls.expand(b, -1, -1).to(tokens.dtype), tokens.reshape(b, h * w, c)], dim=1) + pos
        tokens = t.norm(t.blocks(t.norm_pre(t.patch_drop(t.pos_drop(tokens)))))
        pooled = self.tower.attn_pool_contrast(tokens)[:, 0]
        return self.embed(self.tower.ln_contrast(pooled))

    def trunk_module(self) -> nn.Module:
        return self.tower

    def trunk_blocks(self) -> list[nn.Module]:
        t = self.tower.trunk
        stem = nn.Module()  # a view: patch embedding, class token and position embedding
        stem.patch_embed = t.patch_embed
        stem.register_parameter("cls_token", t.cls_token)
        stem.register_parameter("pos_embed", t.pos_embed)
        blocks = list(t.blocks)
        blocks[-1] = nn.ModuleList([blocks[-1], t.norm, self.tower.attn_pool_contrast, self.tower.ln_contrast])
        return [stem, *blocks]


# CONCH v1.5 (huggingface.co/MahmoodLab/conchv1_5, gated; TITAN's patch encoder, huggingface.co/MahmoodLab/TITAN
# conch_v1_5.py, and TRIDENT's model_zoo/conchv1_5/conchv1_5.py): VisionTransformer(patch 16, 1,024 wide, 24 blocks,
# 16 heads, mlp_ratio 4, qkv_bias, init_values 1.0, LayerNorm eps 1e-6, img_size 224: a 14 x 14 position grid)
# + AttentionalPooler(d_model 768, context_dim 1024, 8 heads, 1 query) + LayerNorm(768); forward = ln_contrast(
# attn_pool_contrast(trunk.forward_features(x))[:, 0]), 768-d. TRIDENT's transform: Resize(448, bilinear) +
# CenterCrop(448), ImageNet mean/std; TRIDENT runs it at --mag 20 (0.5 µm/px) on 512-px tiles resized to 448.
# The official code is not on PyPI (TRIDENT installs from GitHub; the TITAN code is Hugging Face remote code), so
# the tower is re-implemented here; its file, pytorch_model_vision.bin, loads strictly in its own key layout.
@register_encoder(
    "conch-v1_5",
    embed_dim=768,
    input_size=448,
    mpp=0.5,
    weights_format="torch.save state dict of the vision tower (pytorch_model_vision.bin): trunk.* (ViT-L/16, "
    "224-px position grid), attn_pool_contrast.*, ln_contrast.*; loaded as it is",
    weights_file="pytorch_model_vision.bin",
    source="https://huggingface.co/MahmoodLab/conchv1_5 (gated; also inside MahmoodLab/TITAN)",
    license="CC-BY-NC-ND-4.0, gated: academic non-commercial research use only",
    requires_weights=True,
    remap=timm_layout,
    lazy_init=True,
    interpolation="bilinear",
    crop="center",
    output="attn-pool (CoCa contrastive query, after ln_contrast)",
    min_input_size=16,
)
def _conch_v15(*, embed_dim: int | None = None, input_size: int = 448, input_mpp: float = 0.5) -> Encoder:
    """CONCH v1.5 (TITAN's patch encoder, Ding et al. 2024): ViT-L/16 with attention pooling, 768-d, 448 px."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    check_embed_dim(embed_dim)
    trunk = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, img_size=224,
                              init_values=1.0, dynamic_img_size=True)
    if not isinstance(trunk, VisionTransformer):
        raise TypeError(f"timm vit_large_patch16_224 is a {type(trunk).__name__}, not a VisionTransformer")
    cfg = EncoderConfig("conch-v1_5", int(input_size), float(input_mpp), IMAGENET_MEAN, IMAGENET_STD,
                        768 if embed_dim is None else embed_dim, embed_dim)
    return ConchV15Encoder(cfg, ConchTower(trunk))
