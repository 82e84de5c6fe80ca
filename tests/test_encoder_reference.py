"""Every pretrained entry against its OFFICIAL construction, on real tiles, through the real preprocessing.

For each entry the reference is built with random weights exactly as its model card / official code does
(``timm.create_model`` with the card's kwargs; transformers' ``ViTModel`` / ``Dinov2Model`` /
``Dinov2WithRegistersModel`` for the Hugging Face checkpoints; torchvision for the ResNets), its weights are
saved in the file layout the authors ship (``pytorch_model.bin``, ``model.safetensors``, a 2017 torchvision
``.pth`` without BatchNorm counters), that file is loaded through ``build_encoder(name, weights=FILE)`` and the
two embeddings of the same real tiles (256-px crops of the Aperio slide CMU-1-Small-Region.svs, read by the
toolkit's reader) must agree to 1e-5 relative:

- ours: ``tiles_to_tensor`` (the toolkit's one resize, with the entry's ``resize_options``) → ``encoder(x)``;
- official: torchvision v2 ``Resize`` (+ ``CenterCrop``) as the card writes it → ``Normalize(card mean, card
  std)`` → the official forward → the card's output definition (e.g. Virchow2: class token ++ mean of the
  patch tokens after its 4 registers).

The giant ViTs are built with 2 blocks on both sides (``depth=2`` injected into the same
``timm.create_model`` call the toolkit's builder and the card make); everything else about them is as
published. CTransPath's official code (TransPath's timm 0.5.4 fork) is neither on PyPI nor installable beside
timm 1.x: its ``ctranspath()`` is written out here (TransPath's ConvStem and timm 0.5.4's Swin classes, the
deviations listed at the test), and its file goes through the same comparison.

A final test pins each card's values (mean/std, input size, µm/px, interpolation, crop, output) in a literal
table and compares the registry with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from wsi_encoder.compression import tiles_to_tensor
from wsi_encoder.models.encoders import build_encoder, encoder_specs, get_spec, resize_options

torch.set_num_threads(2)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
KAIKO = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

#: The cards, written out: mean/std, input px, µm/px, interpolation, crop (None, or (resize side, crop side)), output.
CARDS: dict[str, dict[str, Any]] = {
    "uni": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": (224, 224), "output": "cls"},
    "uni2-h": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": (224, 224), "output": "cls"},
    "virchow": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bicubic", "crop": (224, 224),
                "output": "cls+mean(patch)"},
    "virchow2": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bicubic", "crop": (224, 224),
                 "output": "cls+mean(patch, registers excluded)"},
    "h-optimus-0": {"norm": HOPTIMUS, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": None, "output": "cls"},
    "h-optimus-1": {"norm": HOPTIMUS, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": None, "output": "cls"},
    "prov-gigapath": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bicubic", "crop": (256, 224),
                      "output": "cls"},
    "gpfm": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bicubic", "crop": None, "output": "cls"},
    "phikon": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": None, "output": "cls"},
    "phikon-v2": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": (224, 224),
                  "output": "cls"},
    "hibou-b": {"norm": HIBOU, "input": 224, "mpp": 0.5, "interp": "bicubic", "crop": None, "output": "pooler"},
    "hibou-l": {"norm": HIBOU, "input": 224, "mpp": 0.5, "interp": "bicubic", "crop": None, "output": "pooler"},
    "lunit-vits8": {"norm": LUNIT, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": None, "output": "cls"},
    "lunit-vits16": {"norm": LUNIT, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": None, "output": "cls"},
    "kaiko-vitb8": {"norm": KAIKO, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": (224, 224),
                    "output": "cls"},
    **{k: {"norm": KAIKO, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": (224, 224), "output": "cls"}
       for k in ("kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitl14")},
    "plip": {"norm": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)), "input": 224,
             "mpp": 0.5, "interp": "bicubic", "crop": (224, 224), "output": "projection (CLIP get_image_features)"},
    "h0-mini": {"norm": HOPTIMUS, "input": 224, "mpp": 0.5, "interp": "bicubic", "crop": (224, 224),
                "output": "cls+mean(patch, registers excluded)"},
    "midnight-12k": {"norm": KAIKO, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": (224, 224),
                     "output": "cls+mean(patch)"},
    "quiltnet-b-32": {"norm": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                      "input": 224, "mpp": 0.5, "interp": "bicubic", "crop": (224, 224),
                      "output": "projection (open_clip encode_image)"},
    "conch-v1_5": {"norm": IMAGENET, "input": 448, "mpp": 0.5, "interp": "bilinear", "crop": (448, 448),
                   "output": "attn-pool (CoCa contrastive query, after ln_contrast)"},
    "ctranspath": {"norm": IMAGENET, "input": 224, "mpp": 1.0, "interp": "bilinear", "crop": None, "output": "gap"},
    "chief-ctranspath": {"norm": IMAGENET, "input": 224, "mpp": 1.0, "interp": "bilinear", "crop": None,
                         "output": "gap"},
    "resnet50-trunc": {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": (224, 224),
                       "output": "gap (after layer3)"},
    **{arch: {"norm": IMAGENET, "input": 224, "mpp": 0.5, "interp": "bilinear", "crop": None, "output": "gap"}
       for arch in ("resnet18", "resnet34", "resnet50")},  # torchvision's ImageNet eval resize, whole tile
    # the NIC code (Tellez et al.): 128-px tiles at 0.5 µm/px, pixels scaled to [-1, 1]; the Keras files are tested
    # against Keras's own output in test_nic_keras.py
    **{k: {"norm": KAIKO, "input": 128, "mpp": 0.5, "interp": "bilinear", "crop": None,
           "output": "dense (flatten of the last conv block → linear 128)"} for k in ("nic-multitask-4", "nic-bigan")},
    "nic-mean-rgb": {"norm": KAIKO, "input": 128, "mpp": 0.5, "interp": "bilinear", "crop": None,
                     "output": "mean over the tile of each channel scaled to [-1, 1]"},
    "nic": {"norm": KAIKO, "input": 128, "mpp": 0.5, "interp": "bilinear", "crop": None,
            "output": "dense (flatten of the last conv block → linear)"},
}

REDUCED_DEPTH = 2


@pytest.fixture(scope="module")
def real_tiles() -> np.ndarray:
    """Four 256-px tiles of the real Aperio slide (0.499 µm/px), read through the toolkit's reader."""
    from tests.conftest import shared_path
    from wsi_encoder.io.slides import get_reader

    reader = get_reader(shared_path("slides", "CMU-1-Small-Region.svs"))
    tiles = [reader.read_region((x, y), 0, (256, 256))[..., :3] for x, y in ((600, 900), (1000, 1400), (1400, 1800), (800, 2200))]
    return np.ascontiguousarray(np.stack(tiles).astype(np.uint8))


def _official_input(name: str, tiles: np.ndarray) -> torch.Tensor:
    """The card's transforms on the same tiles (torchvision v2 on float tensors, clamped as 8-bit images are)."""
    from torchvision.transforms import InterpolationMode, v2

    card = CARDS[name]
    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[card["interp"]]
    steps: list[Any] = []
    if card["crop"] is None:
        steps.append(v2.Resize((card["input"], card["input"]), mode, antialias=True))
    else:
        steps.append(v2.Resize(card["crop"][0], mode, antialias=True))
    steps.append(v2.Lambda(lambda t: t.clamp(0, 1)))
    if card["crop"] is not None:
        steps.append(v2.CenterCrop(card["crop"][1]))
    steps.append(v2.Normalize(*card["norm"]))
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    return v2.Compose(steps)(x)


def _ours(name: str, path: Path, tiles: np.ndarray) -> torch.Tensor:
    encoder = build_encoder(name, weights=path).eval()
    x = tiles_to_tensor(tiles, torch.device("cpu"), encoder.config.input_size, **resize_options(name))
    with torch.inference_mode():
        return encoder(x)


def _perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere (norm weights and biases too), so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for n, b in module.named_buffers():
            if n.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif n.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return module.eval()


def _assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    rel = float((ours - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, f"relative difference {rel:.3g}"


def _reduce_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    """``timm.create_model`` building ViTs with 2 blocks, for the toolkit's builder and the reference alike."""
    import timm

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda n, *a, **k: original(n, *a, **{**k, "depth": REDUCED_DEPTH}))


# ---- timm cards ----------------------------------------------------------------------------------------

def _swiglu() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


#: name -> (timm architecture, the card's create_model kwargs, output definition on forward_features tokens or None
#: for ``model(x)``, reduced depth).
TIMM_CARDS: dict[str, tuple[str, Callable[[], dict[str, Any]], Callable[[torch.Tensor], torch.Tensor] | None, bool]] = {
    # huggingface.co/MahmoodLab/UNI: timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16,
    # init_values=1e-5, num_classes=0, dynamic_img_size=True); model(x) = class token after the final norm
    "uni": ("vit_large_patch16_224", lambda: {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                              "num_classes": 0, "dynamic_img_size": True}, None, True),
    # huggingface.co/MahmoodLab/UNI2-h timm_kwargs
    "uni2-h": ("vit_giant_patch14_224", lambda: {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                                 "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                                 "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
                                                 "dynamic_img_size": True, **_swiglu()}, None, True),
    # huggingface.co/paige-ai/Virchow: output = cat(class token, mean of the 256 patch tokens)
    "virchow": ("vit_huge_patch14_224", lambda: {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                                                 "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
                                                 **_swiglu()},
                lambda t: torch.cat([t[:, 0], t[:, 1:].mean(1)], dim=-1), True),
    # huggingface.co/paige-ai/Virchow2: tokens 1-4 are registers; mean over the patch tokens from 5 on
    "virchow2": ("vit_huge_patch14_224", lambda: {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                                                  "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
                                                  "reg_tokens": 4, **_swiglu()},
                 lambda t: torch.cat([t[:, 0], t[:, 5:].mean(1)], dim=-1), True),
    # huggingface.co/bioptimus/H-optimus-0 (and -1) config.json
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", lambda: {"img_size": 224, "init_values": 1e-5,
                                                              "num_classes": 0, "global_pool": "token"}, None, True),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", lambda: {"img_size": 224, "init_values": 1e-5,
                                                              "num_classes": 0, "global_pool": "token"}, None, True),
    # huggingface.co/prov-gigapath/prov-gigapath config.json
    "prov-gigapath": ("vit_giant_patch14_dinov2", lambda: {"img_size": 224, "in_chans": 3, "patch_size": 16,
                                                           "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                           "init_values": 1e-5, "mlp_ratio": 5.33334,
                                                           "num_classes": 0}, None, True),
    # TRIDENT GPFMInferenceEncoder (file GPFM.pth)
    "gpfm": ("vit_large_patch14_dinov2", lambda: {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
             None, True),
    # huggingface.co/bioptimus/H0-mini: timm.create_model("hf-hub:bioptimus/H0-mini", mlp_layer=SwiGLUPacked,
    # act_layer=SiLU) with its config.json model_args; output = cat(class token, mean of the tokens after the 4 registers)
    "h0-mini": ("vit_base_patch14_reg4_dinov2", lambda: {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.33334,
                                                         "reg_tokens": 4, "global_pool": "", "num_classes": 0,
                                                         "dynamic_img_size": True, **_swiglu()},
                lambda t: torch.cat([t[:, 0], t[:, 5:].mean(1)], dim=-1), False),
    # huggingface.co/1aurent/vit_small_patch8_224.lunit_dino and ...kaiko_ai_towards_large_pathology_fms (full depth)
    "lunit-vits8": ("vit_small_patch8_224", lambda: {"num_classes": 0}, None, False),
    "lunit-vits16": ("vit_small_patch16_224", lambda: {"num_classes": 0}, None, False),
    "kaiko-vitb8": ("vit_base_patch8_224", lambda: {"num_classes": 0, "img_size": 224, "dynamic_img_size": True},
                    None, False),
    # TRIDENT Kaiko{S16,S8,B16,L14}InferenceEncoder (ViT-L/14 built at 518 px, fed 224: interpolated positions)
    "kaiko-vits16": ("vit_small_patch16_224", lambda: {"num_classes": 0, "img_size": 224, "dynamic_img_size": True},
                     None, False),
    "kaiko-vits8": ("vit_small_patch8_224", lambda: {"num_classes": 0, "img_size": 224, "dynamic_img_size": True},
                    None, False),
    "kaiko-vitb16": ("vit_base_patch16_224", lambda: {"num_classes": 0, "img_size": 224, "dynamic_img_size": True},
                     None, False),
    "kaiko-vitl14": ("vit_large_patch14_reg4_dinov2", lambda: {"num_classes": 0, "img_size": 518,
                                                               "dynamic_img_size": True}, None, True),
}


#: over ~20 s on two shared CPU cores (ViT-B/8: 785 tokens through 12 full blocks)
SLOW = {"kaiko-vitb8"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(TIMM_CARDS)])
def test_timm_entry_equals_its_card(name: str, real_tiles: np.ndarray, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    arch, kwargs, output, reduce = TIMM_CARDS[name]
    if reduce:
        _reduce_depth(monkeypatch)
    torch.manual_seed(0)
    ref = _perturb(timm.create_model(arch, pretrained=False, **kwargs()))
    path = tmp_path / str(get_spec(name).weights_file)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save(ref.state_dict(), path)
    with torch.inference_mode():
        x = _official_input(name, real_tiles)
        expected = ref(x) if output is None else output(ref(x))
    _assert_same(_ours(name, path, real_tiles), expected)


# ---- Hugging Face transformers cards ---------------------------------------------------------------------

def _hf_phikon() -> nn.Module:
    # huggingface.co/owkin/phikon config.json (layer_norm_eps 1e-6, as Owkin confirmed)
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu")
    return ViTModel(cfg)  # with its pooler: the shipped file has pooler.* (dropped by the toolkit)


def _hf_phikon_v2() -> nn.Module:
    # huggingface.co/owkin/phikon-v2 config.json (24 layers on the card; 2 here, on both sides)
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=REDUCED_DEPTH, num_attention_heads=16, mlp_ratio=4,
                       image_size=224, patch_size=16, layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True)
    return Dinov2Model(cfg)


def _hf_hibou_b() -> nn.Module:
    # huggingface.co/histai/hibou-b config.json (Dinov2 with 4 registers, SwiGLU FFN)
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                    image_size=224, patch_size=14, num_register_tokens=4, use_swiglu_ffn=True,
                                    layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True)
    return Dinov2WithRegistersModel(cfg)


def _hf_hibou_l() -> nn.Module:
    # huggingface.co/histai/hibou-L and hibou's cellvit.HibouEncoder: ViT-L/14, 4 registers, SwiGLU (24 layers; 2 here)
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=1024, num_hidden_layers=REDUCED_DEPTH, num_attention_heads=16,
                                    mlp_ratio=4, image_size=224, patch_size=14, num_register_tokens=4,
                                    use_swiglu_ffn=True, layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True)
    return Dinov2WithRegistersModel(cfg)


def _hf_plip() -> nn.Module:
    # huggingface.co/vinid/plip config.json: CLIPModel, vision ViT-B/32 (768 wide, 12 layers, quick_gelu), projection 512;
    # the text tower is made small here (it is dropped by the toolkit; only its keys' presence matters)
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "patch_size": 32, "image_size": 224, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=512,
    )
    return CLIPModel(cfg)


def _clip_image_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


HF_CARDS: dict[str, tuple[Callable[[], nn.Module], Callable[[Any], torch.Tensor] | None, bool]] = {
    # TRIDENT PhikonInferenceEncoder / Phikonv2InferenceEncoder: last_hidden_state[:, 0] (after the final layernorm)
    "phikon": (_hf_phikon, lambda out: out.last_hidden_state[:, 0], False),
    "phikon-v2": (_hf_phikon_v2, lambda out: out.last_hidden_state[:, 0], True),
    # the Hibou card: outputs.pooler_output (the class token after the final layernorm)
    "hibou-b": (_hf_hibou_b, lambda out: out.pooler_output, False),
    "hibou-l": (_hf_hibou_l, lambda out: out.pooler_output, True),
    # the PLIP card: model.get_image_features(**processor(images=...)), the projected 512-d embedding
    "plip": (_hf_plip, None, False),
}


@pytest.mark.parametrize("name", sorted(HF_CARDS))
def test_transformers_entry_equals_its_card(name: str, real_tiles: np.ndarray, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    build, output, reduce = HF_CARDS[name]
    if reduce:  # the card's config is built with 2 layers: the toolkit's timm model too
        _reduce_depth(monkeypatch)
    torch.manual_seed(0)
    ref = _perturb(build())
    folder = tmp_path / "snapshot"
    ref.save_pretrained(folder)  # the snapshot as the hub holds it: config.json + model.safetensors
    path = folder / str(get_spec(name).weights_file)
    if path.name == "pytorch_model.bin":  # owkin/phikon ships the torch.save of the same (on-disk) key layout
        from safetensors.torch import load_file

        torch.save(load_file(str(folder / "model.safetensors")), path)
        (folder / "model.safetensors").unlink()
    with torch.inference_mode():
        x = _official_input(name, real_tiles)
        expected = _clip_image_features(ref, x) if output is None else output(ref(pixel_values=x))
    _assert_same(_ours(name, path, real_tiles), expected)


# ---- Midnight-12k: transformers Dinov2Model (ViT-g/14, SwiGLU), class token ++ mean patch token ----------------

def _hf_midnight(image_size: int, depth: int = REDUCED_DEPTH) -> nn.Module:
    # the card: AutoModel.from_pretrained("kaiko-ai/midnight"), Meta's dinov2_vitg14 as a transformers Dinov2Model
    # (1,536 wide, 40 layers on the card, 24 heads, SwiGLU FFN, layer scale, no registers)
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=1536, num_hidden_layers=depth, num_attention_heads=24, mlp_ratio=4,
                       image_size=image_size, patch_size=14, use_swiglu_ffn=True, layerscale_value=1e-5,
                       layer_norm_eps=1e-6, qkv_bias=True)
    return Dinov2Model(cfg)


@pytest.mark.parametrize("image_size", [224, 518], ids=["grid16", "dinov2-grid37"])
def test_midnight_equals_its_card(image_size: int, real_tiles: np.ndarray, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 224-px position grid loads as it is; DINOv2's 518-px grid is resampled as transformers does at 224 px."""
    _reduce_depth(monkeypatch)
    torch.manual_seed(0)
    ref = _perturb(_hf_midnight(image_size))
    ref.save_pretrained(tmp_path)
    with torch.inference_mode():
        tokens = ref(pixel_values=_official_input("midnight-12k", real_tiles)).last_hidden_state
        expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)  # the card's extract_classification_embedding
    _assert_same(_ours("midnight-12k", tmp_path / "model.safetensors", real_tiles), expected)


def test_midnight_full_config_fits_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The card's whole ViT-g/14 (40 layers) as shapes only: transformers' layout through the remap and strict load."""
    from wsi_encoder.models import encoders as encoders_module
    from wsi_encoder.models.encoders import build_skeleton, load_weights

    with torch.device("meta"):
        model = _hf_midnight(224, depth=40)
    try:  # transformers 5 holds q/k/v and the SwiGLU halves apart in memory: the layout save_pretrained writes
        from transformers.core_model_loading import revert_weight_conversion

        state = dict(revert_weight_conversion(model, model.state_dict()))
    except ImportError:  # transformers 4: the in-memory layout is the on-disk one
        state = dict(model.state_dict())
    monkeypatch.setattr(encoders_module, "read_state_dict", lambda p: dict(state))
    enc = build_skeleton("midnight-12k")
    load_weights(enc, "model.safetensors", assign=True)
    assert sum(t.numel() for t in enc.trunk_module().parameters()) == pytest.approx(1.1348e9, rel=1e-3)  # ViT-g/14


# ---- QuiltNet-B-32: open_clip ViT-B-32, encode_image -----------------------------------------------------------

def test_quiltnet_equals_open_clip(real_tiles: np.ndarray, tmp_path: Path) -> None:
    """huggingface.co/wisdomik/QuiltNet-B-32: open_clip_config.json is open_clip's ViT-B-32 (GELU); the file is the
    whole CLIP state dict as open_clip saves it; the embedding is encode_image (the projected class token)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"  # not the -quickgelu variant
    _perturb(model)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    preprocess = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    assert "bicubic" in repr(preprocess).lower() and "CenterCrop" in repr(preprocess)
    with torch.inference_mode():
        expected = model.encode_image(_official_input("quiltnet-b-32", real_tiles))
    _assert_same(_ours("quiltnet-b-32", path, real_tiles), expected)


# ---- CONCH v1.5: written from its published code (not on PyPI) ---------------------------------------------------

def _conch_v15_reference(s: dict[str, torch.Tensor], x: torch.Tensor, depth: int) -> torch.Tensor:
    """CONCH v1.5's forward written out in plain torch from the TITAN / TRIDENT ``conchv1_5.py`` (whose package is
    not on PyPI): iBOT ViT-L/16 (pre-norm blocks with layer scale, LayerNorm eps 1e-6, 16 heads) whose 14 x 14
    position grid is interpolated with ``scale_factor = (grid + 0.1) / 14`` (bicubic), final norm, then
    ``AttentionalPooler`` (8 heads, one query; ln_k/ln_q eps 1e-5; scores minus their max, softmax) and
    ``ln_contrast``; output ``[:, 0]``, 768-d."""
    def ln(h: torch.Tensor, n: str, eps: float) -> torch.Tensor:
        return F.layer_norm(h, (h.shape[-1],), s[f"{n}.weight"], s[f"{n}.bias"], eps)

    def lin(h: torch.Tensor, n: str) -> torch.Tensor:
        return F.linear(h, s[f"{n}.weight"], s.get(f"{n}.bias"))

    w = s["trunk.patch_embed.proj.weight"]
    t = F.conv2d(x, w, s["trunk.patch_embed.proj.bias"], stride=16)
    gh, gw = t.shape[-2:]
    t = torch.cat([s["trunk.cls_token"].expand(len(x), -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    pos = s["trunk.pos_embed"]
    side = int(math.sqrt(pos.shape[1] - 1))
    grid = F.interpolate(pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
                         scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
    t = t + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
    heads, dim = 16, t.shape[-1]
    for i in range(depth):
        p = f"trunk.blocks.{i}"
        q, k, v = lin(ln(t, f"{p}.norm1", 1e-6), f"{p}.attn.qkv").chunk(3, dim=-1)
        q, k, v = (z.reshape(len(x), -1, heads, dim // heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1) @ v
        t = t + lin(a.transpose(1, 2).reshape(len(x), -1, dim), f"{p}.attn.proj") * s[f"{p}.ls1.gamma"]
        h = lin(F.gelu(lin(ln(t, f"{p}.norm2", 1e-6), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
        t = t + h * s[f"{p}.ls2.gamma"]
    t = ln(t, "trunk.norm", 1e-6)
    ap = "attn_pool_contrast"
    kv = F.linear(ln(t, f"{ap}.ln_k", 1e-5), s[f"{ap}.to_kv.weight"])
    kk, vv = kv.chunk(2, dim=-1)
    qq = F.linear(ln(s[f"{ap}.query"].expand(len(x), -1, -1), f"{ap}.ln_q", 1e-5), s[f"{ap}.to_q.weight"])
    qq, kk, vv = (z.reshape(len(x), z.shape[1], 8, -1).transpose(1, 2) for z in (qq, kk, vv))
    sim = qq * (qq.shape[-1] ** -0.5) @ kk.transpose(-1, -2)
    out = torch.softmax(sim - sim.amax(dim=-1, keepdim=True), dim=-1) @ vv
    out = F.linear(out.transpose(1, 2).reshape(len(x), -1, 768), s[f"{ap}.to_out.weight"])
    return ln(out[:, 0], "ln_contrast", 1e-5)


def _conch_v15_file(depth: int, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """A random ``pytorch_model_vision.bin`` with the key names and shapes of CONCH v1.5's (``depth`` blocks)."""
    g = torch.Generator().manual_seed(3)

    def r(*shape: int, one: bool = False) -> torch.Tensor:
        if meta:
            return torch.empty(shape, device="meta")
        return (1.0 if one else 0.0) + torch.randn(shape, generator=g) * (0.1 if one else 0.05)

    d, hidden = 1024, 4096
    s = {"trunk.cls_token": r(1, 1, d), "trunk.pos_embed": r(1, 197, d), "trunk.patch_embed.proj.weight": r(d, 3, 16, 16),
         "trunk.patch_embed.proj.bias": r(d), "trunk.norm.weight": r(d, one=True), "trunk.norm.bias": r(d)}
    for i in range(depth):
        p = f"trunk.blocks.{i}"
        shapes = {"norm1": (d,), "attn.qkv": (3 * d, d), "attn.proj": (d, d), "norm2": (d,), "mlp.fc1": (hidden, d),
                  "mlp.fc2": (d, hidden)}
        for n, shape in shapes.items():
            s[f"{p}.{n}.weight"] = r(*shape, one=n.startswith("norm"))
            s[f"{p}.{n}.bias"] = r(shape[0])
        s[f"{p}.ls1.gamma"] = r(d, one=True)
        s[f"{p}.ls2.gamma"] = r(d, one=True)
    ap = "attn_pool_contrast"
    s |= {f"{ap}.query": r(1, 768), f"{ap}.ln_k.weight": r(d, one=True), f"{ap}.ln_k.bias": r(d),
          f"{ap}.ln_q.weight": r(768, one=True), f"{ap}.ln_q.bias": r(768), f"{ap}.to_q.weight": r(768, 768),
          f"{ap}.to_kv.weight": r(1536, d), f"{ap}.to_out.weight": r(768, 768), "ln_contrast.weight": r(768, one=True),
          "ln_contrast.bias": r(768)}
    return s


def test_conch_v15_equals_its_published_forward(real_tiles: np.ndarray, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The official key layout loads strictly and gives the published forward on real tiles at 448 px
    (Resize(448, bilinear) + CenterCrop(448), ImageNet mean/std), the 14 x 14 grid interpolated to 28 x 28."""
    _reduce_depth(monkeypatch)
    state = _conch_v15_file(REDUCED_DEPTH)
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(state, path)
    with torch.inference_mode():
        expected = _conch_v15_reference(state, _official_input("conch-v1_5", real_tiles), REDUCED_DEPTH)
    _assert_same(_ours("conch-v1_5", path, real_tiles), expected)
    with torch.inference_mode():  # another input size: the official interpolation again (16 x 16 from 14 x 14)
        x = torch.rand(1, 3, 256, 256)
        enc = build_encoder("conch-v1_5", weights=path).eval()
        _assert_same(enc._features(x), _conch_v15_reference(state, x, REDUCED_DEPTH))


def test_conch_v15_full_layout_fits_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole tower (24 blocks) as shapes only; a file missing a key of the official layout is refused."""
    from wsi_encoder.errors import CheckpointError
    from wsi_encoder.models import encoders as encoders_module
    from wsi_encoder.models.encoders import build_skeleton, load_weights

    state = _conch_v15_file(24, meta=True)
    monkeypatch.setattr(encoders_module, "read_state_dict", lambda p: dict(state))
    enc = build_skeleton("conch-v1_5")
    load_weights(enc, "pytorch_model_vision.bin", assign=True)
    assert sum(t.numel() for t in enc.trunk_module().parameters()) == sum(t.numel() for t in state.values())
    monkeypatch.setattr(encoders_module, "read_state_dict",
                        lambda p: {k: v for k, v in state.items() if k != "attn_pool_contrast.query"})
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(build_skeleton("conch-v1_5"), "pytorch_model_vision.bin", assign=True)


# ---- torchvision ResNets (CLAM's truncated ResNet-50, torchvision's 2017 file) ---------------------------

@pytest.mark.parametrize("name", ["resnet50-trunc", "resnet18", "resnet34", "resnet50"])
def test_resnet_entry_equals_torchvision(name: str, real_tiles: np.ndarray, tmp_path: Path) -> None:
    """CLAM resnet50_baseline: conv1 bn1 relu maxpool layer1-3, AdaptiveAvgPool2d(1); the full ResNets pool after
    layer4. The file is the 2017 layout (no num_batches_tracked), as resnet50-19c8e357.pth."""
    import torchvision

    arch = "resnet50" if name == "resnet50-trunc" else name
    torch.manual_seed(0)
    net = _perturb(getattr(torchvision.models, arch)(weights=None))
    path = tmp_path / f"{arch}-2017.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
    if name != "resnet50-trunc":
        stages.append(net.layer4)
    trunk = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.inference_mode():
        expected = trunk(_official_input(name, real_tiles))
    _assert_same(_ours(name, path, real_tiles), expected)


# ---- CTransPath: TransPath's ctranspath() on its timm 0.5.4 fork, written out (not on PyPI) -------------------
#
# The official construction (github.com/Xiyue-Wang/TransPath ctran.py, get_features_CTransPath.py):
#     model = timm.create_model('swin_tiny_patch4_window7_224', embed_layer=ConvStem, pretrained=False)
#     model.head = nn.Identity(); model.load_state_dict(<ctranspath.pth>['model'], strict=True)
#     (their script calls torch.load on the file; the test writes and reads it with weights_only=True)
# on TransPath's timm 0.5.4 fork (a tarball in the repository; 0.5.4's SwinTransformer with an `embed_layer`
# argument), which is neither on PyPI nor installable beside timm 1.x. Below: ConvStem as TransPath wrote it and
# timm 0.5.4's WindowAttention / SwinTransformerBlock / PatchMerging / BasicLayer / SwinTransformer as 0.5.4 wrote
# them, with swin_tiny's kwargs (patch 4, window 7, embed 96, depths 2-2-6-2, heads 3-6-12-24, mlp_ratio 4,
# qkv_bias, LayerNorm, patch_norm=True so ConvStem gets a LayerNorm, ape=False). Deviations, none of which changes
# the eval-mode function: no dropout / DropPath modules (0.5.4's drop_path_rate=0.1 and its dropouts are identities
# in eval mode); no weight initialisation (every tensor is overwritten with random values by _perturb); no
# gradient checkpointing or flops helpers. The module and buffer names are 0.5.4's, so its state_dict is the
# official file layout: stages end with their PatchMerging (layers.i.downsample), relative_position_index and
# attn_mask buffers are saved, no head (model.head = nn.Identity() before the strict load).

class _ConvStem(nn.Module):
    """TransPath ctran.py ConvStem, as written (flatten to B, N, C, then the norm)."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer: Any = None, flatten: bool = True) -> None:
        super().__init__()
        assert patch_size == 4 and embed_dim % 8 == 0
        self.img_size = (img_size, img_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        stem: list[nn.Module] = []
        input_dim, output_dim = 3, embed_dim // 8
        for _ in range(2):
            stem.append(nn.Conv2d(input_dim, output_dim, kernel_size=3, stride=2, padding=1, bias=False))
            stem.append(nn.BatchNorm2d(output_dim))
            stem.append(nn.ReLU(inplace=True))
            input_dim = output_dim
            output_dim *= 2
        stem.append(nn.Conv2d(input_dim, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[-2:]) == self.img_size
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def _window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, num_heads: int) -> None:
        super().__init__()
        self.ws, self.num_heads = ws, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) * (2 * ws - 1), num_heads))
        coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
        flat = torch.flatten(coords, 1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        index = self.relative_position_index
        assert isinstance(index, torch.Tensor)
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, ws: int, shift: int) -> None:
        super().__init__()
        self.resolution, self.ws, self.shift = resolution, ws, shift
        if min(resolution) <= ws:  # 0.5.4: a window at least the feature map: no partition, no shift
            self.shift, self.ws = 0, min(resolution)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, self.ws, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, 4 * dim)
        attn_mask = None
        if self.shift > 0:
            h, w = resolution
            img_mask = torch.zeros((1, h, w, 1))
            slices = (slice(0, -self.ws), slice(-self.ws, -self.shift), slice(-self.shift, None))
            cnt = 0
            for hs in slices:
                for wsl in slices:
                    img_mask[:, hs, wsl, :] = cnt
                    cnt += 1
            mw = _window_partition(img_mask, self.ws).view(-1, self.ws * self.ws)
            attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = _window_partition(x, self.ws).view(-1, self.ws * self.ws, c)
        mask = self.attn_mask
        windows = self.attn(windows, mask if isinstance(mask, torch.Tensor) else None).view(-1, self.ws, self.ws, c)
        x = _window_reverse(windows, self.ws, h, w)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.view(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    def __init__(self, resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class _BasicLayer(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, ws: int,
                 downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [_SwinBlock(dim, resolution, num_heads, ws, 0 if i % 2 == 0 else ws // 2) for i in range(depth)]
        )
        self.downsample = _PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class _CTransPath054(nn.Module):
    """timm 0.5.4 ``swin_tiny_patch4_window7_224(embed_layer=ConvStem)`` with ``head = nn.Identity()``."""

    def __init__(self, img_size: int = 224, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7) -> None:
        super().__init__()
        self.patch_embed = _ConvStem(img_size=img_size, patch_size=4, in_chans=3, embed_dim=embed_dim,
                                     norm_layer=nn.LayerNorm)
        grid = self.patch_embed.grid_size
        self.layers = nn.Sequential(*[
            _BasicLayer(embed_dim * 2**i, (grid[0] // 2**i, grid[1] // 2**i), depths[i], num_heads[i], window_size,
                        downsample=i < len(depths) - 1)
            for i in range(len(depths))
        ])
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.patch_embed(x)))  # ape=False, pos_drop identity
        return self.head(torch.flatten(self.avgpool(x.transpose(1, 2)), 1))


@pytest.mark.parametrize("name", ["ctranspath", "chief-ctranspath"])
def test_ctranspath_equals_transpath_official_forward(name: str, real_tiles: np.ndarray, tmp_path: Path) -> None:
    """TransPath's ctranspath() (timm 0.5.4 Swin-T + ConvStem, head Identity) with random weights, saved as its
    .pth ({'model': state_dict}, 0.5.4 layout with the buffers), read by build_encoder: the same 768-d embedding of
    real tiles (Resize(224) bilinear as get_features_CTransPath.py, ImageNet mean/std)."""
    torch.manual_seed(0)
    ref = _perturb(_CTransPath054())
    state = ref.state_dict()
    assert "layers.0.downsample.reduction.weight" in state and "layers.0.blocks.1.attn_mask" in state
    assert "layers.3.downsample.reduction.weight" not in state and not any(k.startswith("head") for k in state)
    fresh = _CTransPath054()  # the official strict load of the file (model.head = nn.Identity() first)
    path = tmp_path / str(get_spec(name).weights_file)
    torch.save({"model": state}, path)
    fresh.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    with torch.inference_mode():
        expected = fresh.eval()(_official_input(name, real_tiles))
    assert expected.shape == (len(real_tiles), 768)
    _assert_same(_ours(name, path, real_tiles), expected)


# ---- the resize each card prescribes: pixels, and the µm/px the encoder sees -----------------------------------

def _card_steps(name: str) -> list[Any]:
    """The card's resize as torchvision writes it (the pinned CARDS values, not the registry's)."""
    from torchvision import transforms as T

    card = CARDS[name]
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[card["interp"]]
    if card["crop"] is None:
        return [T.Resize((card["input"], card["input"]), mode, antialias=True)]
    return [T.Resize(card["crop"][0], mode, antialias=True), T.CenterCrop(card["crop"][1])]


@pytest.fixture(scope="module")
def real_tiles_of_sizes() -> dict[int, np.ndarray]:
    """Real tiles of CMU-1-Small-Region.svs at four sides: smaller than, equal to, and larger than the cards' sides."""
    from tests.conftest import shared_path
    from wsi_encoder.io.slides import get_reader

    reader = get_reader(shared_path("slides", "CMU-1-Small-Region.svs"))
    return {size: np.stack([reader.read_region((x, y), 0, (size, size))[..., :3] for x, y in ((600, 900), (1000, 1400))])
            .astype(np.uint8) for size in (224, 256, 300, 512)}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_resize_gives_the_cards_torchvision_pixels(name: str, real_tiles_of_sizes: dict[int, np.ndarray]) -> None:
    """``tiles_to_tensor`` with the entry's ``resize_options`` against torchvision's ``Compose([Resize, CenterCrop])``
    of the card, on real tiles of 224, 256, 300 and 512 px.

    On float tensors (what the embedding tests feed) the pixels are the same. On PIL images (what the cards' code
    feeds) a bilinear resize agrees within one grey level: PIL rounds to 8 bits, here the values stay float. A
    bicubic resize agrees within one grey level at >= 99 % of the pixels: PIL resizes in two 8-bit passes
    (horizontal, then vertical) and clips the intermediate image to 0..255, so where bicubic overshoots at a sharp
    edge its second pass starts from clipped values (up to ~10 grey levels at those few pixels; mean < 0.3).
    Where no resize happens (Prov-GigaPath's 256-px tile, only centre-cropped) the pixels are identical."""
    from PIL import Image
    from torchvision import transforms as T

    card = CARDS[name]
    steps = _card_steps(name)
    for size, tiles in real_tiles_of_sizes.items():
        ours = tiles_to_tensor(tiles, torch.device("cpu"), card["input"], **resize_options(name))
        assert ours.shape == (len(tiles), 3, card["input"], card["input"]), (name, size)
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
        expected = T.Compose([steps[0], T.Lambda(lambda t: t.clamp(0, 1)), *steps[1:]])(x)
        assert float((ours - expected).abs().max()) <= 1e-6, (name, size)
        pil = np.stack([np.asarray(T.Compose(steps)(Image.fromarray(t))) for t in tiles]).astype(np.float64)
        diff = np.abs(ours.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255 - pil)
        resized = size != (card["input"] if card["crop"] is None else card["crop"][0])
        if not resized:
            assert diff.max() <= 1e-3, (name, size)
        elif card["interp"] == "bilinear":
            assert diff.max() <= 1.01, (name, size, diff.max())
        else:
            assert (diff <= 1.01).mean() >= 0.99 and diff.mean() < 0.3, (name, size, (diff > 1.01).mean(), diff.mean())


def test_encoders_json_matches_the_pinned_cards() -> None:
    """``wsienc encoders --json`` lists each card's mean/std, input, µm/px, interpolation, crop and output."""
    from click.testing import CliRunner

    from wsi_encoder.cli import main

    result = CliRunner().invoke(main, ["encoders", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    for name, card in CARDS.items():
        r = rows[name]
        crop = None if r["crop"] is None else (round(r["input_size"] / r["crop_fraction"]), r["input_size"])
        got = {"norm": (tuple(r["mean"]), tuple(r["std"])), "input": r["input_size"], "mpp": r["mpp"],
               "interp": r["interpolation"], "crop": crop, "output": r["output"]}
        assert got == card, name


# ---- the pinned card table ---------------------------------------------------------------------------

def test_registry_matches_the_pinned_cards() -> None:
    specs = {s.name: s for s in encoder_specs()}
    for name, card in CARDS.items():
        s = specs[name]
        crop = None if s.crop is None else (round(s.input_size / s.crop_fraction), s.input_size)
        got = {"norm": (s.mean, s.std), "input": s.input_size, "mpp": s.mpp, "interp": s.interpolation, "crop": crop,
               "output": s.output}
        assert got == card, name
    assert set(CARDS) == {s.name for s in encoder_specs()}

