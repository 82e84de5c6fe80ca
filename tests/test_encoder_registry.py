"""The foundation-encoder registry: every entry's architecture, official-layout loading, refusals.

Every entry is built, a random state dict is saved in its *official* checkpoint layout (timm,
Hugging Face transformers, TransPath's old Swin, torchvision), loaded back strictly through
``weights=`` and run on the smallest input the architecture allows. Entries above ~100 M parameters
are checked as shapes only (``meta`` tensors through the loader's remap and strict load); one of them
(1.1 B parameters) is also written and read back for real, marked slow.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from wsi_encoder.cli import main
from wsi_encoder.errors import CheckpointError
from wsi_encoder.models import encoders as encoders_module
from wsi_encoder.models.encoders import (
    WEIGHTS_DIR_ENV,
    build_skeleton,
    create_encoder,
    encoder_specs,
    file_sha256,
    get_spec,
    load_weights,
)
from wsi_encoder.models.encoders.registry import get_builder
from wsi_encoder.models.encoders.weights import hf_dinov2_to_timm, hf_vit_to_timm

torch.set_num_threads(2)

#: Parameter counts of the published architectures (trunk without classifier), from the model cards /
#: papers: UNI ViT-L 0.3 B, UNI2-h 681 M, Virchow(2) 632 M, H-optimus 1.1 B, GigaPath 1.13 B,
#: Phikon 86 M, Phikon-v2 0.3 B, Hibou-B 85.7 M, Lunit ViT-S 21.7 M, kaiko ViT-B 85.8 M, CTransPath 27.5 M.
PUBLISHED_PARAMS = {
    "uni": 303.35e6,
    "uni2-h": 681.39e6,
    "virchow": 631.23e6,
    "virchow2": 631.24e6,
    "h-optimus-0": 1134.77e6,
    "h-optimus-1": 1134.77e6,
    "prov-gigapath": 1134.95e6,
    "phikon": 85.80e6,
    "phikon-v2": 303.35e6,
    "hibou-b": 85.73e6,
    "lunit-vits8": 21.67e6,
    "kaiko-vitb8": 85.81e6,
    "ctranspath": 27.52e6,
    "chief-ctranspath": 27.52e6,
    "resnet50-trunc": 8.54e6,
}
BIG = {"uni", "uni2-h", "virchow", "virchow2", "h-optimus-0", "h-optimus-1", "prov-gigapath", "phikon-v2"}
SMALL = sorted(set(PUBLISHED_PARAMS) - BIG)


def _meta_build(name: str) -> nn.Module:
    with torch.device("meta"):
        return get_builder(name)()


def test_every_entry_is_listed_with_its_card_fields() -> None:
    specs = {s.name: s for s in encoder_specs()}
    assert set(PUBLISHED_PARAMS) <= set(specs)
    for name in PUBLISHED_PARAMS:
        s = specs[name]
        assert s.requires_weights, name
        assert s.source.startswith("http") and s.license and s.weights_format and s.mpp > 0, name
    assert specs["virchow"].embed_dim == specs["virchow2"].embed_dim == 2560
    assert specs["resnet50-trunc"].embed_dim == 1024


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_architecture_matches_the_published_size(name: str) -> None:
    """Parameter count and embedding width of the architecture as published (built on ``meta``: no memory)."""
    enc = _meta_build(name)
    spec = get_spec(name)
    n = sum(p.numel() for p in enc.parameters())
    assert abs(n / PUBLISHED_PARAMS[name] - 1) < 0.002, (name, n)
    out = enc._features(torch.empty(1, 3, spec.input_size, spec.input_size, device="meta"))
    assert tuple(out.shape) == (1, spec.embed_dim)


# ---- official layouts, written independently of the loader's remapping ---------------------------


def _random_like(module: nn.Module, seed: int = 0, *, fast: bool = False, meta: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors of a module's state shapes (``fast``: a constant fill, for the billion-parameter models;
    ``meta``: shapes only, no storage)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if meta:
            out[k] = torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")
        elif fast:
            out[k] = torch.full(tuple(v.shape), 0.01, dtype=v.dtype)
        elif k.endswith("running_var"):
            out[k] = 1 + torch.rand(tuple(v.shape), generator=g)
        elif v.is_floating_point():
            out[k] = torch.randn(tuple(v.shape), generator=g) * 0.02
        else:
            out[k] = torch.zeros(tuple(v.shape), dtype=v.dtype)
    return out


def _hf_vit_layout(
    depth: int, dim: int, mlp: int, patch: int, grid: int, *, dinov2: bool, registers: int = 0, swiglu: bool = False,
    meta: bool = False,
) -> dict[str, torch.Tensor]:
    """A Hugging Face ViTModel / Dinov2Model state dict (key names of transformers' modeling files)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=g) * 0.02

    s: dict[str, torch.Tensor] = {
        "embeddings.cls_token": r(1, 1, dim),
        "embeddings.position_embeddings": r(1, 1 + grid * grid, dim),
        "embeddings.patch_embeddings.projection.weight": r(dim, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": r(dim),
        "layernorm.weight": 1 + r(dim),
        "layernorm.bias": r(dim),
    }
    if dinov2:
        s["embeddings.mask_token"] = r(1, dim)
    if registers:
        s["embeddings.register_tokens"] = r(1, registers, dim)
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            s[p + f"attention.attention.{n}.weight"] = r(dim, dim)
            s[p + f"attention.attention.{n}.bias"] = r(dim)
        s[p + "attention.output.dense.weight"] = r(dim, dim)
        s[p + "attention.output.dense.bias"] = r(dim)
        n1, n2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
        fc1, fc2 = ("mlp.fc1", "mlp.fc2") if dinov2 else ("intermediate.dense", "output.dense")
        hidden_in = hidden_out = mlp
        if swiglu:  # transformers Dinov2SwiGLUFFN: hidden = (int(mlp * 2 / 3) + 7) // 8 * 8, weights_in -> 2 x hidden
            fc1, fc2 = "mlp.weights_in", "mlp.weights_out"
            hidden_out = (int(mlp * 2 / 3) + 7) // 8 * 8
            hidden_in = 2 * hidden_out
        for n in (n1, n2):
            s[p + f"{n}.weight"] = 1 + r(dim)
            s[p + f"{n}.bias"] = r(dim)
        s[p + f"{fc1}.weight"] = r(hidden_in, dim)
        s[p + f"{fc1}.bias"] = r(hidden_in)
        s[p + f"{fc2}.weight"] = r(dim, hidden_out)
        s[p + f"{fc2}.bias"] = r(dim)
        if dinov2:
            s[p + "layer_scale1.lambda1"] = 1 + r(dim)
            s[p + "layer_scale2.lambda1"] = 1 + r(dim)
    if not dinov2:
        s["pooler.dense.weight"] = r(dim, dim)
        s["pooler.dense.bias"] = r(dim)
    return s


def _hf_reference_forward(
    s: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, eps: float, dinov2: bool, registers: int = 0
) -> torch.Tensor:
    """The class token of a HF ViT/Dinov2(-with-registers) forward pass, written from transformers' semantics."""
    w = s["embeddings.patch_embeddings.projection.weight"]
    t = F.conv2d(x, w, s["embeddings.patch_embeddings.projection.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([s["embeddings.cls_token"].expand(len(x), -1, -1), t], dim=1) + s["embeddings.position_embeddings"]
    if registers:
        t = torch.cat([t[:, :1], s["embeddings.register_tokens"].expand(len(x), -1, -1), t[:, 1:]], dim=1)
    dim = t.shape[-1]
    depth = len({m.group(1) for k in s if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in range(depth):
        p = f"encoder.layer.{i}."

        def ln(h: torch.Tensor, n: str, p: str = p) -> torch.Tensor:
            return F.layer_norm(h, (dim,), s[p + n + ".weight"], s[p + n + ".bias"], eps)

        def lin(h: torch.Tensor, n: str, p: str = p) -> torch.Tensor:
            return F.linear(h, s[p + n + ".weight"], s[p + n + ".bias"])

        h = ln(t, "norm1" if dinov2 else "layernorm_before")
        q, k, v = (lin(h, f"attention.attention.{n}") for n in ("query", "key", "value"))
        b, n_tok, _ = q.shape
        q, k, v = (z.view(b, n_tok, heads, dim // heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1) @ v
        a = lin(a.transpose(1, 2).reshape(b, n_tok, dim), "attention.output.dense")
        t = t + (a * s[p + "layer_scale1.lambda1"] if dinov2 else a)
        h = ln(t, "norm2" if dinov2 else "layernorm_after")
        if p + "mlp.weights_in.weight" in s:  # SwiGLU FFN: silu(x1) * x2 of the packed projection
            x1, x2 = lin(h, "mlp.weights_in").chunk(2, dim=-1)
            h = lin(F.silu(x1) * x2, "mlp.weights_out")
        else:
            h = lin(F.gelu(lin(h, "mlp.fc1" if dinov2 else "intermediate.dense")), "mlp.fc2" if dinov2 else "output.dense")
        t = t + (h * s[p + "layer_scale2.lambda1"] if dinov2 else h)
    t = F.layer_norm(t, (dim,), s["layernorm.weight"], s["layernorm.bias"], eps)
    return t[:, 0]


@pytest.mark.parametrize(
    ("remap", "timm_kwargs", "dinov2", "registers", "eps"),
    [
        (hf_vit_to_timm, {}, False, 0, 1e-6),
        (hf_dinov2_to_timm, {"init_values": 1e-5}, True, 0, 1e-6),
        (hf_dinov2_to_timm, {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True, "mlp_ratio": 256 / 64,
                             "mlp_layer": "swiglu"}, True, 4, 1e-6),
    ],
    ids=["hf-vit(phikon)", "hf-dinov2(phikon-v2)", "hf-dinov2-registers-swiglu(hibou-b)"],
)
def test_hf_remap_reproduces_the_transformers_forward(remap, timm_kwargs, dinov2, registers, eps) -> None:
    """The remapped weights in the timm model give the HF model's class token (small 2-block ViT)."""
    from functools import partial

    import timm
    from timm.layers import SwiGLUPacked

    dim, heads, patch, grid = 64, 4, 8, 4
    timm_kwargs = dict(timm_kwargs)
    swiglu = timm_kwargs.pop("mlp_layer", None) == "swiglu"
    state = _hf_vit_layout(2, dim, 4 * dim, patch, grid, dinov2=dinov2, registers=registers, swiglu=swiglu)
    if swiglu:  # HF packs 2 x (int(256 * 2 / 3) + 7) // 8 * 8 = 2 x 176 outputs: timm's fc1 width
        timm_kwargs = {**timm_kwargs, "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, "mlp_ratio": 2 * 176 / dim}
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=patch * grid, patch_size=patch,
        embed_dim=dim, depth=2, num_heads=heads, norm_layer=partial(nn.LayerNorm, eps=eps), **timm_kwargs,
    ).eval()
    model.load_state_dict(remap(dict(state)), strict=True)
    x = torch.rand(2, 3, patch * grid, patch * grid)
    with torch.no_grad():
        ours = model.forward_features(x)[:, 0]
        ref = _hf_reference_forward(state, x, heads=heads, eps=eps, dinov2=dinov2, registers=registers)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def _official_state(name: str, *, meta: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """A random state dict in the entry's official checkpoint layout and the file name to save it as
    (``meta``: the giant entries' layouts as shapes only)."""
    if name == "phikon":
        return _hf_vit_layout(12, 768, 3072, 16, 14, dinov2=False), "pytorch_model.bin"
    if name == "phikon-v2":
        return _hf_vit_layout(24, 1024, 4096, 16, 14, dinov2=True, meta=meta), "model.safetensors"
    if name == "hibou-b":
        return _hf_vit_layout(12, 768, 3072, 14, 16, dinov2=True, registers=4, swiglu=True), "model.safetensors"
    if name == "resnet50-trunc":
        import torchvision

        return _random_like(torchvision.models.resnet50(weights=None)), "resnet50-19c8e357.pth"
    if name in ("ctranspath", "chief-ctranspath"):
        trunk = _meta_build(name).trunk
        state = _random_like(trunk)
        old: dict[str, torch.Tensor] = {}
        for k, v in state.items():  # timm 0.5.4 layout: downsample at the end of the previous stage
            old[re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)] = v
        for k in list(old):
            if k.endswith("relative_position_bias_table"):
                old[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(49, 49, dtype=torch.long)
        old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
        return {"model": old}, str(get_spec(name).weights_file)  # type: ignore[dict-item]
    # timm-layout entries: the timm model's own keys are the published layout (.bin and .safetensors alike;
    # the giant ones are written as safetensors, faster to write and read in a test)
    if name in BIG:
        return _random_like(_meta_build(name).trunk, fast=True, meta=meta), "model.safetensors"
    return _random_like(_meta_build(name).trunk), "pytorch_model.bin"


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _roundtrip(name: str, tmp_path: Path) -> None:
    spec = get_spec(name)
    state, filename = _official_state(name)
    need = sum(t.numel() * t.element_size() for t in state.values()) if name in BIG else 0
    free = shutil.disk_usage(tmp_path).free
    if need and free < need + (1 << 30):
        pytest.skip(f"{name}: its checkpoint needs {need / 2**30:.1f} GiB in {tmp_path}, {free / 2**30:.1f} GiB free")
    path = _save(state, tmp_path / filename)
    del state
    try:
        enc = create_encoder(name, weights=path).eval()
        assert enc.weights_sha256 == file_sha256(path)
    finally:
        path.unlink()  # several GiB for the giant entries: gone before the next test writes its own
    assert not any(t.is_meta for t in list(enc.parameters()) + list(enc.buffers()))
    size = max(spec.min_input_size, 32) if name in ("ctranspath", "chief-ctranspath", "resnet50-trunc") else 2 * spec.min_input_size
    with torch.inference_mode():
        out = enc(torch.rand(2, 3, size, size))
    assert out.shape == (2, spec.embed_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL)
def test_official_checkpoint_loads_strictly(name: str, tmp_path: Path) -> None:
    _roundtrip(name, tmp_path)


@pytest.mark.slow
def test_official_checkpoint_of_a_billion_parameters_loads_strictly(tmp_path: Path) -> None:
    """One real multi-GB file (H-optimus-0, 1.1 B parameters) through the lazy meta build and assignment."""
    _roundtrip("h-optimus-0", tmp_path)


@pytest.mark.parametrize("name", sorted(BIG))
def test_official_layout_of_each_giant_fits_strictly(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every giant entry's official layout goes through the loader's remap and strict load, as shapes only.

    The state is made of ``meta`` tensors handed to :func:`load_weights` in place of the file's content
    (no GBs written); reading and assigning real files of each layout is covered by the small entries
    (lunit-vits8, hibou-b) and the billion-parameter round trip above.
    """
    state, filename = _official_state(name, meta=True)
    path = tmp_path / filename
    path.write_bytes(b"stand-in: read_state_dict is replaced")
    monkeypatch.setattr(encoders_module, "read_state_dict", lambda p: dict(state))
    enc = build_skeleton(name)
    load_weights(enc, path, assign=True)
    assert sum(t.numel() for t in enc.trunk_module().parameters()) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.002)
    first = next(iter(state))
    monkeypatch.setattr(encoders_module, "read_state_dict", lambda p: {k: v for k, v in state.items() if k != first})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(build_skeleton(name), path, assign=True)


def test_an_entry_with_an_unknown_resize_is_refused() -> None:
    from wsi_encoder.errors import InvalidParameterError
    from wsi_encoder.models.encoders.registry import register_encoder

    with pytest.raises(InvalidParameterError, match="interpolation 'lanczos'"):
        register_encoder("bad-resize", embed_dim=8, input_size=8, mpp=0.5, interpolation="lanczos")
    with pytest.raises(InvalidParameterError, match=r"crop_fraction 1\.5"):
        register_encoder("bad-crop", embed_dim=8, input_size=8, mpp=0.5, crop="center", crop_fraction=1.5)


def test_ctranspath_entries_name_their_own_files() -> None:
    """TransPath's ctranspath.pth and CHIEF's CHIEF_CTransPath.pth hold different tensors: two entries, two files."""
    a, b = get_spec("ctranspath"), get_spec("chief-ctranspath")
    assert (a.weights_file, b.weights_file) == ("ctranspath.pth", "CHIEF_CTransPath.pth")
    assert "TransPath" in a.source and "CHIEF" not in a.source and "CHIEF_CTransPath.pth" in b.source


def test_hibou_native_layout_gives_the_hf_snapshot_embedding(tmp_path: Path) -> None:
    """HistAI's ``hibou-b.pth`` (Meta's DINOv2 code layout, written here key by key from hibou's
    ``vision_transformer.py`` / ``SwiGLUFFNFused``) and the HF snapshot of the same weights embed alike."""
    hf, _ = _official_state("hibou-b")
    native: dict[str, torch.Tensor] = {
        "cls_token": hf["embeddings.cls_token"], "pos_embed": hf["embeddings.position_embeddings"],
        "register_tokens": hf["embeddings.register_tokens"], "mask_token": hf["embeddings.mask_token"],
        "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"],
    }  # fmt: skip
    for kind in ("weight", "bias"):
        native[f"patch_embed.proj.{kind}"] = hf[f"embeddings.patch_embeddings.projection.{kind}"]
    for i in range(12):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            native[q + f"attn.qkv.{kind}"] = torch.cat([hf[p + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
            native[q + f"attn.proj.{kind}"] = hf[p + f"attention.output.dense.{kind}"]
            native[q + f"norm1.{kind}"], native[q + f"norm2.{kind}"] = hf[p + f"norm1.{kind}"], hf[p + f"norm2.{kind}"]
            native[q + f"mlp.w12.{kind}"], native[q + f"mlp.w3.{kind}"] = hf[p + f"mlp.weights_in.{kind}"], hf[p + f"mlp.weights_out.{kind}"]
        native[q + "ls1.gamma"], native[q + "ls2.gamma"] = hf[p + "layer_scale1.lambda1"], hf[p + "layer_scale2.lambda1"]
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        a = create_encoder("hibou-b", weights=_save(hf, tmp_path / "model.safetensors")).eval()(x)
        b = create_encoder("hibou-b", weights=_save(native, tmp_path / "hibou-b.pth")).eval()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    native.pop("blocks.3.mlp.w3.bias")
    with pytest.raises(CheckpointError, match=r"missing keys \(blocks\.3\.mlp\.fc2\.bias\)"):
        create_encoder("hibou-b", weights=_save(native, tmp_path / "broken.pth"))


def test_timm_checkpoint_keeps_its_values(tmp_path: Path) -> None:
    """A timm-layout file (Lunit) lands in the trunk unchanged; a ``module.`` wrapper is stripped."""
    state, _ = _official_state("lunit-vits8")
    path = _save({f"module.{k}": v for k, v in state.items()}, tmp_path / "lunit.pth")
    enc = create_encoder("lunit-vits8", weights=path)
    for k, v in enc.trunk.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_resnet50_trunc_drops_layer4_and_fc(tmp_path: Path) -> None:
    state, name = _official_state("resnet50-trunc")
    enc = create_encoder("resnet50-trunc", weights=_save(state, tmp_path / name))
    torch.testing.assert_close(enc.trunk.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert not any(k.startswith(("layer4.", "fc.")) for k in enc.trunk.state_dict())


@pytest.mark.parametrize("name", ["resnet50-trunc", "resnet18", "resnet34", "resnet50"])
def test_torchvision_2017_file_without_batchnorm_counters_loads(name: str, tmp_path: Path) -> None:
    """torchvision's 2017 files (``resnet50-19c8e357.pth``, CLAM's) have no ``num_batches_tracked``: accepted,
    as PyTorch's strict load accepts them; any other missing key is still refused."""
    import torchvision

    arch = "resnet50" if name == "resnet50-trunc" else name
    state = {k: v for k, v in _random_like(getattr(torchvision.models, arch)(weights=None)).items()
             if not k.endswith("num_batches_tracked")}
    enc = create_encoder(name, weights=_save(state, tmp_path / f"{arch}-2017.pth"))
    torch.testing.assert_close(enc.trunk.layer1[0].bn1.running_var, state["layer1.0.bn1.running_var"])
    reference = getattr(torchvision.models, arch)(weights=None)
    reference.load_state_dict(state, strict=True)  # what PyTorch itself accepts
    state.pop("layer1.0.bn1.running_var")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(layer1\.0\.bn1\.running_var\)"):
        create_encoder(name, weights=_save(state, tmp_path / f"{arch}-broken.pth"))


def test_wrong_or_truncated_file_is_refused_in_one_line(tmp_path: Path) -> None:
    lunit, _ = _official_state("lunit-vits8")
    wrong = _save(lunit, tmp_path / "lunit.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit encoder 'kaiko-vitb8'.*(missing|shape)") as err:
        create_encoder("kaiko-vitb8", weights=wrong)
    assert "\n" not in str(err.value)
    partial = dict(lunit)
    partial.pop("blocks.3.mlp.fc1.weight")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(blocks\.3\.mlp\.fc1\.weight\)"):
        create_encoder("lunit-vits8", weights=_save(partial, tmp_path / "partial.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(wrong.read_bytes()[: wrong.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        create_encoder("lunit-vits8", weights=cut)
    hf, _ = _official_state("phikon")
    hf.pop("encoder.layer.5.attention.attention.key.weight")
    with pytest.raises(CheckpointError, match="missing"):
        create_encoder("phikon", weights=_save(hf, tmp_path / "phikon.bin"))


def test_foundation_model_without_weights_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    with pytest.raises(CheckpointError, match=r"'uni' is a pretrained model.*--weights.*huggingface\.co/MahmoodLab/UNI.*CC-BY-NC-ND"):
        create_encoder("uni")
    create_encoder("nic")  # trained here: a seeded init is fine


def test_weights_dir_conventional_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, _ = _official_state("lunit-vits8")
    path = _save(state, (tmp_path / "lunit-vits8").mkdir() or tmp_path / "lunit-vits8" / "model.safetensors")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    enc = create_encoder("lunit-vits8")
    assert enc.weights_sha256 == file_sha256(path) and enc.weights_path == str(path.resolve())
    result = CliRunner().invoke(main, ["encoders", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["lunit-vits8"]["weights_found"] == str(path)
    for row in rows.values():
        assert {"name", "embed_dim", "input_size", "mpp", "weights_format", "source", "license", "interpolation",
                "crop", "crop_fraction", "output"} <= set(row)
    giga, v2 = rows["prov-gigapath"], rows["virchow2"]
    assert (giga["interpolation"], giga["crop"], giga["crop_fraction"], giga["output"]) == ("bicubic", "center", 0.875, "cls")
    assert v2["output"] == "cls+mean(patch, registers excluded)" and rows["kaiko-vitb8"]["license"] == "Kaiko Non-Commercial Public License"


def test_encoders_command_table() -> None:
    result = CliRunner().invoke(main, ["encoders"])
    assert result.exit_code == 0, result.output
    for name in ("uni", "virchow2", "ctranspath", "chief-ctranspath", "resnet50-trunc", "CC-BY-NC-ND-4.0"):
        assert name in result.output
    assert "bicubic resize, centre crop 224 of 256; mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); output: cls" in result.output


def test_checkpoint_ignores_the_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A train-encoder checkpoint holds every tensor: an unrelated file under $WSIENC_WEIGHTS_DIR is not read."""
    from wsi_encoder.models.checkpoint import load_encoder, save_checkpoint
    from wsi_encoder.models.heads import MultiTaskModel

    enc = create_encoder("nic", embed_dim=16, input_size=64, seed=3)
    save_checkpoint(tmp_path / "ckpt", MultiTaskModel(enc, {"a": 2}).state_dict(), {"encoder": enc.config.to_dict()})
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "nic.safetensors").write_bytes(b"not weights")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "w"))
    loaded = load_encoder(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.embed.weight, enc.embed.weight)
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        create_encoder("nic")  # a bare name does use the conventional file


def test_linear_embedding_on_a_lazily_built_backbone(tmp_path: Path) -> None:
    """``embed_dim`` adds a seeded linear layer on top of weights assigned from the file."""
    state, _ = _official_state("lunit-vits8")
    path = _save(state, tmp_path / "lunit.safetensors")
    a = create_encoder("lunit-vits8", weights=path, embed_dim=16, seed=1).eval()
    b = create_encoder("lunit-vits8", weights=path, embed_dim=16, seed=1).eval()
    assert not any(t.is_meta for t in [*a.parameters(), *a.buffers()])
    torch.testing.assert_close(a.embed.weight, b.embed.weight)
    with torch.inference_mode():
        assert a(torch.rand(2, 3, 16, 16)).shape == (2, 16)
