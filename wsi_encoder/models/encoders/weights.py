"""Local weight files: finding them, reading them safely, hashing them, and the key remappings.

Weights are never downloaded. A file is read as ``.safetensors`` (preferred) or, for ``.bin`` /
``.pth`` / ``.pt``, only through ``torch.load(weights_only=True)`` (no pickled code runs). A folder
(an unpacked Hugging Face snapshot) is accepted and its ``model.safetensors`` or
``pytorch_model.bin`` read. ``$WSIENC_WEIGHTS_DIR`` lets a site keep files under conventional names:
``$WSIENC_WEIGHTS_DIR/<name>.safetensors`` (or ``.bin``/``.pth``/``.pt``) or
``$WSIENC_WEIGHTS_DIR/<name>/<official file name>`` (e.g. ``uni/pytorch_model.bin``).

Remappings (official layout → the module's timm/torchvision layout) are plain functions on the
state dict; each registry entry names the one it uses and ``docs/encoders.md`` lists them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.errors import CheckpointError

if TYPE_CHECKING:
    from wsi_encoder.models.encoders.registry import Remap

#: Environment variable naming a folder of weight files under conventional names.
WEIGHTS_DIR_ENV = "WSIENC_WEIGHTS_DIR"
_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_SNAPSHOT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Weights shipped with the package, laid out as ``$WSIENC_WEIGHTS_DIR`` (``<name>/<official file>``).
BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "data" / "weights"


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


def weights_file_in(path: Path) -> Path:
    """The weight file a path designates: the file itself, or a snapshot folder's model file."""
    if path.is_dir():
        for name in _SNAPSHOT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"weights folder {str(path)!r} holds neither {' nor '.join(_SNAPSHOT_FILES)}; pass the weights file itself"
        )
    return path


def find_in_weights_dir(name: str, official_file: str | None) -> Path | None:
    """The conventional file for encoder ``name`` under ``$WSIENC_WEIGHTS_DIR``, else the copy shipped with the
    package (:data:`BUNDLED_WEIGHTS_DIR`, the same layout; the NIC authors' MIT-licensed encoders), or None."""
    roots = [Path(root).expanduser()] if (root := os.environ.get(WEIGHTS_DIR_ENV)) else []
    roots.append(BUNDLED_WEIGHTS_DIR)
    for base in roots:
        candidates = [base / f"{name}{suffix}" for suffix in _SUFFIXES]
        folder = base / name
        if official_file:
            candidates.append(folder / official_file)
        candidates += [folder / f for f in _SNAPSHOT_FILES]
        for c in candidates:
            if c.is_file():
                return c
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict: ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    A folder is read through its ``model.safetensors`` / ``pytorch_model.bin``. A dict holding the
    weights under ``state_dict`` or ``model`` (common training checkpoints) is unwrapped.

    Raises
    ------
    CheckpointError
        Missing, unreadable, or not a dict of tensors (one line naming the file).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"weights file {str(p)!r} does not exist; pass a local .safetensors or .pt file")
    p = weights_file_in(p)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoding failure is a malformed file for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read weights file {str(p)!r}: {first}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {str(p)!r} does not hold a state dict of tensors")
    return dict(state)


def strip_prefix(state: dict[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    """Remove the first of ``prefixes`` that every key starts with (``module.``, ``backbone.`` ...)."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], *, what: str, assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with one line naming missing/unexpected keys and shape clashes.

    The one tolerated difference is a missing BatchNorm ``num_batches_tracked`` counter: files saved
    before PyTorch 0.4.1 (torchvision's 2017 ``resnet50-19c8e357.pth``, the file CLAM uses) have none,
    and PyTorch's own strict load accepts them (``BatchNorm._load_from_state_dict`` fills the counter
    in). The counter only matters to training with ``momentum=None``; the module's own value is kept.
    Any other missing or unexpected key is refused.

    Raises
    ------
    CheckpointError
        Keys or shapes do not match.
    """
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state and not _is_bn_counter(module, k)]
    unexpected = [k for k in state if k not in expected]
    clashes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or clashes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})"
            )
        if clashes:
            parts.append(f"{len(clashes)} shape mismatches ({', '.join(clashes[:3])}{', ...' if len(clashes) > 3 else ''})")
        raise CheckpointError(f"{what}: {'; '.join(parts)}")
    if assign:  # tensors become the module's own: keep float32 whatever the file stored
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    counters = {k: expected[k].detach().clone() for k in expected if k not in state}  # only BN counters remain
    if assign:  # (a meta-device module has no counter value to keep: it starts at 0, as a fresh BatchNorm)
        counters = {k: torch.zeros((), dtype=torch.long) if v.is_meta else v for k, v in counters.items()}
    module.load_state_dict({**state, **counters}, strict=True, assign=assign)


def _is_bn_counter(module: nn.Module, key: str) -> bool:
    """Whether ``key`` is the ``num_batches_tracked`` buffer of a BatchNorm layer of ``module``."""
    owner, _, leaf = key.rpartition(".")
    if leaf != "num_batches_tracked":
        return False
    try:
        sub = module.get_submodule(owner) if owner else module
    except AttributeError:
        return False
    return isinstance(sub, nn.modules.batchnorm._BatchNorm)


# ---- remappings: official layout -> module layout ---------------------------------------------------


def torchvision_resnet_trunk(depth_layers: int) -> Any:
    """torchvision ResNet (``conv1 bn1 layer1..4 fc``) → a trunk keeping ``layer1..depth_layers``.

    ``layer{k}.*`` for ``k > depth_layers`` and ``fc.*`` are dropped (the truncated network has no
    use for them); a ``module.`` prefix is stripped.
    """

    def remap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = strip_prefix(state, "module.")
        drop = (*tuple(f"layer{k}." for k in range(depth_layers + 1, 5)), "fc.")
        return {k: v for k, v in state.items() if not k.startswith(drop)}

    return remap


def timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm checkpoint: loaded as it is (a ``module.`` / ``model.`` wrapper prefix is stripped)."""
    return strip_prefix(state, "module.", "model.")


def _hf_attention(out: dict[str, torch.Tensor], state: dict[str, torch.Tensor], src: str, dst: str) -> None:
    for kind in ("weight", "bias"):
        parts = [state.pop(f"{src}.attention.attention.{n}.{kind}") for n in ("query", "key", "value")]
        out[f"{dst}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)


def hf_vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``ViTModel`` (e.g. owkin/phikon) → timm ``VisionTransformer``.

    ``embeddings.cls_token``/``position_embeddings``/``patch_embeddings.projection`` → ``cls_token``/
    ``pos_embed``/``patch_embed.proj``; per layer ``layernorm_before/after`` → ``norm1/norm2``,
    ``attention.attention.{query,key,value}`` concatenated (q, k, v) → ``attn.qkv``,
    ``attention.output.dense`` → ``attn.proj``, ``intermediate.dense``/``output.dense`` →
    ``mlp.fc1``/``mlp.fc2``; ``layernorm`` → ``norm``. ``pooler.*`` is dropped (the embedding is the
    class token of the last hidden state, as TRIDENT uses Phikon); a ``vit.`` prefix is stripped.
    """
    state = strip_prefix(dict(state), "vit.")
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    out: dict[str, torch.Tensor] = {}
    out["cls_token"] = state.pop("embeddings.cls_token")
    out["pos_embed"] = state.pop("embeddings.position_embeddings")
    out["patch_embed.proj.weight"] = state.pop("embeddings.patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = state.pop("embeddings.patch_embeddings.projection.bias")
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layer.{i}", f"blocks.{i}"
        _hf_attention(out, state, src, dst)
        for kind in ("weight", "bias"):
            out[f"{dst}.norm1.{kind}"] = state.pop(f"{src}.layernorm_before.{kind}")
            out[f"{dst}.norm2.{kind}"] = state.pop(f"{src}.layernorm_after.{kind}")
            out[f"{dst}.attn.proj.{kind}"] = state.pop(f"{src}.attention.output.dense.{kind}")
            out[f"{dst}.mlp.fc1.{kind}"] = state.pop(f"{src}.intermediate.dense.{kind}")
            out[f"{dst}.mlp.fc2.{kind}"] = state.pop(f"{src}.output.dense.{kind}")
    for kind in ("weight", "bias"):
        out[f"norm.{kind}"] = state.pop(f"layernorm.{kind}")
    out.update(state)  # anything left over is reported as unexpected by the strict load
    return out


def _class_and_positions(
    out: dict[str, torch.Tensor], cls: torch.Tensor, pos: torch.Tensor, registers: torch.Tensor | None
) -> None:
    """timm's class token, position embedding and registers from a DINOv2 checkpoint's.

    With registers the timm model has no position embedding for the class token (``no_embed_class``): the
    class token's position embedding is added into ``cls_token`` and removed from ``pos_embed``, as timm
    converts DINOv2-reg checkpoints; the forward pass is unchanged.
    """
    if registers is None:
        out["cls_token"], out["pos_embed"] = cls, pos
        return
    out["reg_token"] = registers
    out["cls_token"] = cls + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]


def hf_dinov2_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` (owkin/phikon-v2; histai/hibou-b with registers) → timm ViT.

    As :func:`hf_vit_to_timm` for embeddings and attention, with per layer ``norm1``/``norm2`` kept,
    ``mlp.fc1``/``mlp.fc2`` kept (a SwiGLU FFN's ``mlp.weights_in``/``weights_out`` → ``mlp.fc1``/``fc2``
    of timm's ``SwiGLUPacked``, same packing), ``layer_scale{1,2}.lambda1`` → ``ls{1,2}.gamma``; ``layernorm`` →
    ``norm``; ``embeddings.mask_token`` (masked-image pretraining only) is dropped. With registers
    (``embeddings.register_tokens`` → ``reg_token``) the timm model has no position embedding for the
    class token (``no_embed_class``), so the class token's position embedding is added into
    ``cls_token`` and removed from ``pos_embed`` — the same conversion timm applies to DINOv2-reg
    checkpoints; the forward pass is unchanged.
    """
    state = strip_prefix(dict(state), "dinov2.", "model.")
    state.pop("embeddings.mask_token", None)
    out: dict[str, torch.Tensor] = {}
    _class_and_positions(
        out, state.pop("embeddings.cls_token"), state.pop("embeddings.position_embeddings"),
        state.pop("embeddings.register_tokens", None),
    )
    out["patch_embed.proj.weight"] = state.pop("embeddings.patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = state.pop("embeddings.patch_embeddings.projection.bias")
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layer.{i}", f"blocks.{i}"
        _hf_attention(out, state, src, dst)
        for kind in ("weight", "bias"):
            out[f"{dst}.norm1.{kind}"] = state.pop(f"{src}.norm1.{kind}")
            out[f"{dst}.norm2.{kind}"] = state.pop(f"{src}.norm2.{kind}")
            out[f"{dst}.attn.proj.{kind}"] = state.pop(f"{src}.attention.output.dense.{kind}")
            swiglu = f"{src}.mlp.weights_in.{kind}" in state  # use_swiglu_ffn: packed (x1, x2) gate, silu(x1) * x2
            out[f"{dst}.mlp.fc1.{kind}"] = state.pop(f"{src}.mlp.{'weights_in' if swiglu else 'fc1'}.{kind}")
            out[f"{dst}.mlp.fc2.{kind}"] = state.pop(f"{src}.mlp.{'weights_out' if swiglu else 'fc2'}.{kind}")
        out[f"{dst}.ls1.gamma"] = state.pop(f"{src}.layer_scale1.lambda1")
        out[f"{dst}.ls2.gamma"] = state.pop(f"{src}.layer_scale2.lambda1")
    for kind in ("weight", "bias"):
        out[f"norm.{kind}"] = state.pop(f"layernorm.{kind}")
    out.update(state)
    return out


def dinov2_native_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 code layout (HistAI's ``hibou-b.pth``, loaded by ``hibou.build_model``) → timm ViT.

    The keys are timm's but for the register tokens (``register_tokens`` → ``reg_token``) and the fused
    SwiGLU FFN (``mlp.w12``/``mlp.w3`` → ``mlp.fc1``/``mlp.fc2``, same (x1, x2) packing, ``silu(x1) * x2``);
    ``mask_token`` (masked-image pretraining only) is dropped. DINOv2 adds the position embedding to
    the class and patch tokens and inserts the registers afterwards, so, as in :func:`hf_dinov2_to_timm`,
    the class token's position embedding is folded into ``cls_token`` for timm's ``no_embed_class``.
    """
    state = strip_prefix(dict(state), "module.", "backbone.")
    state.pop("mask_token", None)
    out: dict[str, torch.Tensor] = {}
    _class_and_positions(out, state.pop("cls_token"), state.pop("pos_embed"), state.pop("register_tokens", None))
    for k, v in state.items():
        out[re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k))] = v
    return out


def hibou_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hibou in either official layout → timm ViT: the Hugging Face snapshot (``model.safetensors``,
    :func:`hf_dinov2_to_timm`) or HistAI's own ``hibou-b.pth`` (:func:`dinov2_native_to_timm`)."""
    hf = any(k.startswith(("embeddings.", "dinov2.embeddings.", "model.embeddings.")) for k in state)
    return hf_dinov2_to_timm(state) if hf else dinov2_native_to_timm(state)


def hf_clip_vision_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``CLIPModel`` (e.g. vinid/plip) → the image tower as a timm CLIP ViT with a projection head.

    ``vision_model.embeddings.{class_embedding,position_embedding.weight,patch_embedding.weight}`` →
    ``cls_token`` (reshaped to ``(1, 1, D)``), ``pos_embed`` (``(1, N, D)``), ``patch_embed.proj.weight`` (no
    bias); ``pre_layrnorm`` → ``norm_pre``; per layer ``layer_norm1/2`` → ``norm1/2``, ``self_attn.{q,k,v}_proj``
    concatenated → ``attn.qkv``, ``self_attn.out_proj`` → ``attn.proj``, ``mlp.fc1/fc2`` kept; ``post_layernorm``
    → ``norm``; ``visual_projection.weight`` → ``head.weight`` with a zero ``head.bias`` (CLIP's projection has
    none). The text tower, ``text_projection``, ``logit_scale`` and ``position_ids`` are dropped.
    """
    v = {k[len("vision_model.") :]: t for k, t in state.items() if k.startswith("vision_model.")}
    v.pop("embeddings.position_ids", None)
    out: dict[str, torch.Tensor] = {}
    cls = v.pop("embeddings.class_embedding")
    out["cls_token"] = cls.reshape(1, 1, -1)
    out["pos_embed"] = v.pop("embeddings.position_embedding.weight").unsqueeze(0)
    out["patch_embed.proj.weight"] = v.pop("embeddings.patch_embedding.weight")
    layers = sorted({int(m.group(1)) for k in v if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.qkv.{kind}"] = torch.cat([v.pop(f"{src}.self_attn.{n}_proj.{kind}") for n in ("q", "k", "v")])
            out[f"{dst}.attn.proj.{kind}"] = v.pop(f"{src}.self_attn.out_proj.{kind}")
            out[f"{dst}.norm1.{kind}"] = v.pop(f"{src}.layer_norm1.{kind}")
            out[f"{dst}.norm2.{kind}"] = v.pop(f"{src}.layer_norm2.{kind}")
            out[f"{dst}.mlp.fc1.{kind}"] = v.pop(f"{src}.mlp.fc1.{kind}")
            out[f"{dst}.mlp.fc2.{kind}"] = v.pop(f"{src}.mlp.fc2.{kind}")
    for kind in ("weight", "bias"):
        out[f"norm_pre.{kind}"] = v.pop(f"pre_layrnorm.{kind}")
        out[f"norm.{kind}"] = v.pop(f"post_layernorm.{kind}")
    proj = state["visual_projection.weight"]
    out["head.weight"] = proj
    out["head.bias"] = torch.zeros(proj.shape[0], dtype=proj.dtype, device=proj.device)
    out.update(v)  # anything left over is reported as unexpected by the strict load
    return out


def hf_dinov2_resampled_to_timm(grid: int) -> Remap:
    """:func:`hf_dinov2_to_timm` for a model fed ``grid`` × ``grid`` patches (kaiko-ai/midnight at 224 px: 16).

    A checkpoint whose position embedding was built for another grid (DINOv2's 518 px, 37 × 37) has it resampled
    to ``grid`` × ``grid`` exactly as transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` does at that input
    size (bicubic, ``align_corners=False``, in float32), so the timm model's embedding at the native size is the
    Hugging Face model's; a checkpoint already at ``grid`` is left as it is.
    """

    def remap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = hf_dinov2_to_timm(state)
        pos = out["pos_embed"]
        side = math.isqrt(pos.shape[1] - 1)
        if side != grid:
            patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
            patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False).to(pos.dtype)
            out["pos_embed"] = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
        return out

    return remap


def open_clip_vision_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP checkpoint (``open_clip_pytorch_model.bin``, e.g. wisdomik/QuiltNet-B-32) → its image
    tower as a timm CLIP ViT with a projection head.

    ``visual.class_embedding`` → ``cls_token`` (``(1, 1, D)``), ``visual.positional_embedding`` → ``pos_embed``
    (``(1, N, D)``), ``visual.conv1`` → ``patch_embed.proj`` (no bias), ``visual.ln_pre`` → ``norm_pre``; per block
    ``ln_1/ln_2`` → ``norm1/norm2``, ``attn.in_proj_{weight,bias}`` (q, k, v stacked as timm's) → ``attn.qkv``,
    ``attn.out_proj`` → ``attn.proj``, ``mlp.c_fc/c_proj`` → ``mlp.fc1/fc2``; ``visual.ln_post`` → ``norm``;
    ``visual.proj`` (``x @ proj``) → ``head.weight = proj.T`` with a zero ``head.bias``. The text tower,
    ``text_projection`` and ``logit_scale`` are dropped.
    """
    state = strip_prefix(dict(state), "module.")
    v = {k[len("visual.") :]: t for k, t in state.items() if k.startswith("visual.")}
    out: dict[str, torch.Tensor] = {
        "cls_token": v.pop("class_embedding").reshape(1, 1, -1),
        "pos_embed": v.pop("positional_embedding").unsqueeze(0),
        "patch_embed.proj.weight": v.pop("conv1.weight"),
    }
    layers = sorted({int(m.group(1)) for k in v if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in layers:
        src, dst = f"transformer.resblocks.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.qkv.{kind}"] = v.pop(f"{src}.attn.in_proj_{kind}")
            for a, b in names.items():
                out[f"{dst}.{b}.{kind}"] = v.pop(f"{src}.{a}.{kind}")
    for kind in ("weight", "bias"):
        out[f"norm_pre.{kind}"] = v.pop(f"ln_pre.{kind}")
        out[f"norm.{kind}"] = v.pop(f"ln_post.{kind}")
    proj = v.pop("proj")
    out["head.weight"] = proj.t().contiguous()
    out["head.bias"] = torch.zeros(proj.shape[1], dtype=proj.dtype, device=proj.device)
    out.update(v)  # anything left over is reported as unexpected by the strict load
    return out


def swin_v0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTransPath's checkpoint (TransPath's ``timm==0.5.4`` Swin, ``{"model": state_dict}``) → timm 1.x Swin.

    Old Swin stages end with their ``downsample`` (``layers.i.downsample``), timm 1.x stages begin
    with it: ``layers.i.downsample`` → ``layers.(i+1).downsample``. ``relative_position_index`` and
    ``attn_mask`` (recomputed buffers) and ``head.*`` (the unused classifier) are dropped — the same
    filtering TRIDENT and timm's own ``checkpoint_filter_fn`` apply.
    """
    state = strip_prefix(dict(state), "module.")
    old = any(re.match(r"layers\.0\.downsample\.", k) for k in state)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if "relative_position_index" in k or "attn_mask" in k or k.startswith("head."):
            continue
        if old:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        out[k] = v
    return out
