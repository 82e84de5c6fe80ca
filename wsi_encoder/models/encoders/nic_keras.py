"""The NIC authors' published Keras 2 encoders, read from their HDF5 files with h5py (no TensorFlow, no Keras).

Tellez et al. ship their patch encoders (``davidtellez/neural-image-compression``, MIT licence) as Keras 2.0.9
HDF5 model files: ``encoder_multitask-4.h5`` (the MIDL 2020 supervised multitask encoder), ``encoder_bigan.h5``
(the TPAMI 2019 BiGAN encoder) and ``encoder_mean-rgb.h5`` (the mean-RGB baseline). Two config styles occur:
a functional ``Model`` whose layers are the network itself (multitask-4, mean-rgb), and a functional ``Model``
wrapping a nested ``Sequential`` whose config is the Keras 2.0.9 bare list of layers (bigan; Keras 3 cannot
deserialise that one). :func:`read_keras_layers` flattens both into one chain of :class:`KerasLayer`.

:func:`keras_state_dict` turns that chain into the state dict of :class:`~wsi_encoder.models.encoders.cnn.NICEncoder`
(or checks it is the weightless mean-RGB network) and refuses, in one line, anything that is not exactly the
published architecture: every weight is used, every shape checked, the BatchNorm moving statistics are loaded and
its epsilon and the LeakyReLU slope are carried over into the module. Keras kernels are ``(kh, kw, in, out)`` and
the Flatten before the dense layer is channels-last ``(h, w, c)``; PyTorch flattens ``(c, h, w)``, so the dense
kernel's rows are permuted accordingly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from wsi_encoder.errors import CheckpointError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CONTAINERS = ("Model", "Functional", "Sequential")
_SKIPPED = ("InputLayer",)


@dataclass(frozen=True)
class KerasLayer:
    """One layer of a Keras model file: its class, name, config and weights (``kernel``, ``bias``, ...)."""

    class_name: str
    name: str
    config: dict[str, Any]
    weights: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)


def is_keras_h5(path: str | Path) -> bool:
    """True when ``path`` is an HDF5 file holding a Keras ``model_config`` (a saved Keras model)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        if fh.read(8) != HDF5_SIGNATURE:
            return False
    import h5py

    try:
        with h5py.File(p, "r") as f:
            return "model_config" in f.attrs
    except OSError:
        return False


def _inner_layers(config: Any) -> list[dict[str, Any]]:
    """A container's layer list: Keras 2.0.9 Sequential configs are a bare list, later ones ``{"layers": [...]}``."""
    if isinstance(config, list):
        return config
    if isinstance(config, dict) and isinstance(config.get("layers"), list):
        return list(config["layers"])
    raise ValueError("a model config without a layer list")


def _inbound_names(layer: dict[str, Any]) -> list[str]:
    nodes = layer.get("inbound_nodes") or []
    names: list[str] = []
    for node in nodes:
        for item in node if isinstance(node, list) else []:
            if isinstance(item, list) and item:
                names.append(str(item[0]))
    return names


def _layer_name(layer: dict[str, Any]) -> str:
    return str(layer.get("name") or layer.get("config", {}).get("name", ""))


def _weights_of(group: Any, layer_name: str) -> dict[str, npt.NDArray[np.float32]]:
    """``{"kernel": ..., "bias": ...}`` of layer ``layer_name`` inside an h5 group of the model's weights."""
    if layer_name not in group:
        return {}
    out: dict[str, npt.NDArray[np.float32]] = {}

    def visit(name: str, obj: Any) -> None:
        if hasattr(obj, "shape"):
            out[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj[()], dtype=np.float32)

    group[layer_name].visititems(visit)
    return out


def read_keras_layers(path: str | Path) -> list[KerasLayer]:
    """The layers of a Keras HDF5 model file, nested containers flattened, in order from input to output.

    Raises
    ------
    CheckpointError
        Not a Keras model file, or a model that is not one chain of layers (one line naming the file).
    """
    import h5py

    p = Path(path)
    what = f"Keras model file {str(p)!r}"
    try:
        with h5py.File(p, "r") as f:
            if "model_config" not in f.attrs:
                raise CheckpointError(f"{what} has no model_config (a weights-only file is not supported)")
            raw = f.attrs["model_config"]
            model = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            weights_root = f["model_weights"] if "model_weights" in f else f
            return _flatten(model, weights_root, what)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {what}: {exc}") from exc


def _flatten(model: dict[str, Any], weights_root: Any, what: str) -> list[KerasLayer]:
    if model.get("class_name") not in _CONTAINERS:
        raise CheckpointError(f"{what}: top-level class {model.get('class_name')!r} is not a Keras model")
    layers: list[KerasLayer] = []
    previous: str | None = None
    for layer in _inner_layers(model.get("config")):
        cls = str(layer.get("class_name"))
        name = _layer_name(layer)
        inbound = _inbound_names(layer)
        if inbound and (len(inbound) != 1 or (previous is not None and inbound[0] != previous)):
            raise CheckpointError(f"{what}: layer {name!r} is not fed by the layer before it (not a plain chain)")
        previous = name
        if cls in _SKIPPED:
            continue
        if cls in _CONTAINERS:
            group = weights_root[name] if name in weights_root else weights_root
            for inner in _inner_layers(layer.get("config")):
                inner_name = _layer_name(inner)
                if str(inner.get("class_name")) in _CONTAINERS:
                    raise CheckpointError(f"{what}: containers nested twice ({name!r} > {inner_name!r}) are not supported")
                layers.append(
                    KerasLayer(str(inner.get("class_name")), inner_name, dict(inner.get("config", {})), _weights_of(group, inner_name))
                )
            continue
        group = weights_root[name] if name in weights_root else None
        layers.append(KerasLayer(cls, name, dict(layer.get("config", {})), _weights_of(group, name) if group is not None else {}))
    return layers


def _expect(ok: bool, what: str, message: str) -> None:
    if not ok:
        raise CheckpointError(f"{what}: {message}")


def keras_state_dict(encoder: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of ``encoder`` (a NIC encoder or the mean-RGB one) from the authors' Keras file.

    The BatchNorm epsilon and the LeakyReLU slope of the file are set on ``encoder``'s modules (they are not
    tensors). A 128-px file without the 64-px architecture's pooling is accepted: the 2×2 average pool the
    authors prepend (``add_downsample_to_encoder``) is part of the module.

    Raises
    ------
    CheckpointError
        The file is not exactly the architecture of ``encoder`` (one line saying what differs).
    """
    from wsi_encoder.models.encoders.cnn import MeanRGBEncoder, NICEncoder

    what = f"Keras model file {str(path)!r} does not fit encoder {getattr(getattr(encoder, 'config', None), 'name', '?')!r}"
    layers = read_keras_layers(path)
    if isinstance(encoder, MeanRGBEncoder):
        kinds = [layer.class_name for layer in layers]
        _expect(kinds == ["GlobalAveragePooling2D"], what, f"the mean-RGB baseline is one GlobalAveragePooling2D, the file has {kinds}")
        _expect(layers[0].config.get("data_format", "channels_last") == "channels_last", what, "data_format is not channels_last")
        return {}
    if not isinstance(encoder, NICEncoder):
        raise CheckpointError(f"{what}: a Keras NIC file fits only the nic encoders (nic, nic-multitask-4, nic-bigan)")
    return _nic_state(encoder, layers, what)


def _nic_state(encoder: Any, layers: list[KerasLayer], what: str) -> dict[str, torch.Tensor]:
    kinds = [layer.class_name for layer in layers]
    if kinds and kinds[0] == "AveragePooling2D":
        _expect(tuple(layers[0].config.get("pool_size", ())) == (2, 2), what, "the leading average pool is not 2×2")
        layers, kinds = layers[1:], kinds[1:]
    expected = ["Conv2D", "LeakyReLU", "BatchNormalization"] * 4 + ["Flatten", "Dense"]
    _expect(kinds == expected, what, f"expected 4 × (Conv2D, LeakyReLU, BatchNormalization), Flatten, Dense; found {kinds}")
    convs = [m for m in encoder.trunk if isinstance(m, nn.Conv2d)]
    acts = [m for m in encoder.trunk if isinstance(m, nn.LeakyReLU)]
    norms = [m for m in encoder.trunk if isinstance(m, nn.BatchNorm2d)]
    own = encoder.state_dict()
    names = {id(m): n for n, m in encoder.named_modules()}
    state: dict[str, torch.Tensor] = {}
    for i in range(4):
        conv, act, bn = layers[3 * i : 3 * i + 3]
        c = conv.config
        _expect(c.get("padding") == "valid" and tuple(c.get("strides", ())) == (2, 2), what, f"{conv.name} is not a valid stride-2 convolution")
        _expect(c.get("activation", "linear") == "linear" and c.get("use_bias", True), what, f"{conv.name} is not linear with a bias")
        _expect(c.get("data_format", "channels_last") == "channels_last", what, f"{conv.name} is not channels_last")
        _expect(tuple(c.get("dilation_rate", (1, 1))) == (1, 1), what, f"{conv.name} is dilated")
        _expect(set(conv.weights) == {"kernel", "bias"}, what, f"{conv.name} holds {sorted(conv.weights)}, not kernel and bias")
        kernel = conv.weights["kernel"]  # (kh, kw, in, out)
        prefix = names[id(convs[i])]
        w = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"{prefix}.weight"] = w
        state[f"{prefix}.bias"] = torch.from_numpy(conv.weights["bias"])
        alpha = act.config.get("alpha", act.config.get("negative_slope"))
        if alpha is None:
            raise CheckpointError(f"{what}: {act.name} has no slope")
        acts[i].negative_slope = float(alpha)
        b = bn.config
        _expect(b.get("axis", -1) in (-1, 3, [3], [-1]), what, f"{bn.name} does not normalise the channel axis")
        _expect(b.get("center", True) and b.get("scale", True), what, f"{bn.name} lacks beta or gamma")
        _expect(set(bn.weights) == {"gamma", "beta", "moving_mean", "moving_variance"}, what, f"{bn.name} holds {sorted(bn.weights)}")
        bprefix = names[id(norms[i])]
        state[f"{bprefix}.weight"] = torch.from_numpy(bn.weights["gamma"])
        state[f"{bprefix}.bias"] = torch.from_numpy(bn.weights["beta"])
        state[f"{bprefix}.running_mean"] = torch.from_numpy(bn.weights["moving_mean"])
        state[f"{bprefix}.running_var"] = torch.from_numpy(bn.weights["moving_variance"])
        state[f"{bprefix}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        norms[i].eps = float(b.get("epsilon", 1e-3))
        norms[i].momentum = 1.0 - float(b.get("momentum", 0.99))  # Keras keeps 'momentum' of the old value
    dense = layers[-1]
    _expect(dense.config.get("activation", "linear") == "linear", what, f"{dense.name} is not linear")
    _expect(set(dense.weights) == {"kernel", "bias"}, what, f"{dense.name} holds {sorted(dense.weights)}")
    kernel = dense.weights["kernel"]  # (h * w * c, out), rows in channels-last order
    width = convs[-1].out_channels
    side = round((kernel.shape[0] / width) ** 0.5)
    _expect(side * side * width == kernel.shape[0], what, f"dense input {kernel.shape[0]} is not a square × {width} channels")
    out = kernel.shape[1]
    torch_rows = kernel.reshape(side, side, width, out).transpose(2, 0, 1, 3).reshape(side * side * width, out)
    state["embed.weight"] = torch.from_numpy(np.ascontiguousarray(torch_rows.T))
    state["embed.bias"] = torch.from_numpy(dense.weights["bias"])
    for key, value in state.items():  # shapes checked here so the line names the Keras layer, not a torch key
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{what}: {key} has shape {tuple(value.shape)} in the file, {tuple(own[key].shape)} in the encoder")
    return state
