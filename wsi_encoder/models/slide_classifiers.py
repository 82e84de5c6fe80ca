"""Slide-level classifiers on embedding grids: ``gridcnn``, ``abmil`` and ``linear``, behind one interface.

Every model is a :class:`SlideClassifier`: ``fit`` on bags of tile embeddings
(:class:`~wsi_encoder.io.embedding_store.SlideBag`) with integer labels and an optional inner
validation set, ``predict_proba`` → ``(n, k)`` class probabilities, ``heatmap`` → an ``(R, Q)`` map over
the slide's grid, and ``state_arrays`` / ``load_state_arrays`` (plain arrays, saved as safetensors,
never pickled). Models are made by name from a registry::

    model = create_slide_classifier("abmil", in_dim=128, num_classes=2, config={"epochs": 40})

* ``gridcnn`` — a CNN over the ``C × R × Q`` grid in the spirit of neural image compression (Tellez et
  al., TPAMI 2019): a stack of depthwise-separable convolutions with BatchNorm, LeakyReLU and spatial
  (channel) dropout, global tissue-masked mean+max pooling and a small dense head. Trained on random
  crops of the grid with flips and 90° rotations; predicts on the whole grid, averaging the 8 dihedral
  views (``tta``). Heatmap: Grad-CAM on the first (full-resolution) block.
* ``abmil`` — gated attention multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018) over the
  tile features; the attention weights are the heatmap.
* ``linear`` — mean- and max-pooled features, standardised, into a scikit-learn logistic regression
  whose ``C`` is chosen on the validation set by log-loss. Heatmap: each tile's exact additive share of
  the slide's logit.

The torch models standardise their input with the training tiles' per-feature mean and standard
deviation, stored with the weights.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.devices import resolve_device
from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.io.embedding_store import SlideBag
from wsi_encoder.models.slide_networks import GatedAttentionMIL, GridCNN
from wsi_encoder.training.slide_trainer import FitHistory, fit_module

if TYPE_CHECKING:  # scikit-learn is imported when a linear model is fitted, not to predict (start-up time)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)

Bags = Sequence[SlideBag]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------------- interface
@dataclass(frozen=True)
class FitInfo:
    """Outcome of one ``fit``.

    ``best_epoch`` is the epoch whose weights were kept (torch models; None for ``linear``),
    ``selected`` the hyperparameters chosen on the validation set (``{"C": ...}`` for ``linear``).
    """

    best_epoch: int | None = None
    epochs_run: int | None = None
    stopped_early: bool = False
    selected: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class SlideClassifier(ABC):
    """One interface for every slide-level model.

    Parameters
    ----------
    in_dim
        Feature size ``C`` of the tile embeddings.
    num_classes
        Number of classes ``k`` (2 for binary).
    config
        The model's config dataclass (``Config``) or a dict of overrides of its defaults.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``; ignored by ``linear``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    heatmap_kind: ClassVar[str]
    #: True when heatmap values are signed (drawn with a diverging colour map centred on 0).
    heatmap_signed: ClassVar[bool] = False

    def __init__(self, in_dim: int, num_classes: int, config: Any = None, device: str = "auto") -> None:
        if in_dim < 1 or num_classes < 2:
            raise InvalidParameterError(f"need in_dim >= 1 and num_classes >= 2, got {in_dim!r}, {num_classes!r}")
        self.in_dim = int(in_dim)
        self.num_classes = int(num_classes)
        self.config = config if isinstance(config, self.Config) else make_config(self.Config, config or {})
        self.device_name = str(device)

    @abstractmethod
    def fit(
        self,
        train: Bags,
        y: npt.ArrayLike,
        val: Bags | None = None,
        y_val: npt.ArrayLike | None = None,
        *,
        seed: int = 0,
        refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        """Train on ``train`` (labels ``y``), using ``val`` for early stopping / model selection.

        ``refit`` (from :meth:`refit_params`) fixes what was selected on validation sets, for a final
        model trained without one.
        """

    @abstractmethod
    def predict_proba(self, bags: Bags) -> FloatArray:
        """``(n, k)`` class probabilities, one row per bag."""

    @abstractmethod
    def heatmap(self, bag: SlideBag) -> FloatArray:
        """``(R, Q)`` map of what drove the prediction (``heatmap_kind``); NaN outside tissue."""

    @abstractmethod
    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Everything learned, as named numpy arrays (saved with safetensors)."""

    @abstractmethod
    def load_state_arrays(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        """Restore what :meth:`state_arrays` returned."""

    @classmethod
    @abstractmethod
    def refit_params(cls, infos: Sequence[FitInfo]) -> dict[str, Any]:
        """What a final model trained on all data takes from the cross-validation fits."""

    def describe(self) -> dict[str, Any]:
        """Name, config, sizes (the model's saved config)."""
        return {
            "name": self.name,
            "config": asdict(self.config),
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "heatmap_kind": self.heatmap_kind,
        }


_REGISTRY: dict[str, type[SlideClassifier]] = {}


def register_slide_classifier(cls: type[SlideClassifier]) -> type[SlideClassifier]:
    """Class decorator adding a model to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def list_slide_classifiers() -> list[str]:
    """Names of the registered slide classifiers."""
    return sorted(_REGISTRY)


def slide_classifier_class(name: str) -> type[SlideClassifier]:
    """The class registered as ``name`` (:class:`InvalidParameterError` when unknown)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidParameterError(
            f"unknown slide classifier {name!r}; choose one of {', '.join(list_slide_classifiers())}"
        ) from None


def create_slide_classifier(
    name: str, in_dim: int, num_classes: int, config: dict[str, Any] | None = None, device: str = "auto"
) -> SlideClassifier:
    """Make the model ``name`` with ``config`` overrides of its defaults."""
    return slide_classifier_class(name)(in_dim, num_classes, config, device)


def make_config(config_type: type, overrides: dict[str, Any]) -> Any:
    """``config_type()`` with ``overrides``; strings (from the command line) are converted to the field type.

    Raises
    ------
    InvalidParameterError
        On unknown keys or values of the wrong type.
    """
    defaults = config_type()
    known = {f.name: getattr(defaults, f.name) for f in fields(config_type)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise InvalidParameterError(
            f"unknown parameter(s) {', '.join(unknown)} for {config_type.__name__}; valid: {', '.join(known)}"
        )
    converted = {key: _convert(key, value, known[key]) for key, value in overrides.items() if value is not None}
    config = replace(defaults, **converted)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _convert(key: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(type(default[0])(v) for v in items) if default else tuple(items)
        return str(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"parameter {key}={value!r} is not a valid {type(default).__name__} (default {default!r})"
        ) from None


def class_weights(y: IntArray, num_classes: int, mode: str) -> FloatArray | None:
    """``"balanced"``: ``n / (k * n_c)`` per class (sklearn's rule); ``"none"``: None."""
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=num_classes).astype(float)
    weights = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights


def _check_class_weight(mode: str) -> None:
    if mode not in ("balanced", "none"):
        raise InvalidParameterError(f"class_weight must be 'balanced' or 'none', got {mode!r}")


def feature_stats(bags: Bags) -> tuple[FloatArray, FloatArray]:
    """Per-feature mean and standard deviation over all tiles of ``bags`` (streamed, float64)."""
    total = sq = None
    count = 0
    for bag in bags:
        f = bag.features.astype(np.float64)
        total = f.sum(0) if total is None else total + f.sum(0)
        sq = (f * f).sum(0) if sq is None else sq + (f * f).sum(0)
        count += f.shape[0]
    if total is None or sq is None or count == 0:
        raise InvalidParameterError("no tiles to train on")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
    return mean, np.where(std > 1e-6, std, 1.0)


# ---------------------------------------------------------------------------------------------- torch base
class _TorchClassifier(SlideClassifier):
    """Shared parts of the torch models: device, module (de)serialisation, loss, refit rule."""

    module: nn.Module

    def __init__(self, in_dim: int, num_classes: int, config: Any = None, device: str = "auto") -> None:
        super().__init__(in_dim, num_classes, config, device)
        self.device = resolve_device(device)
        self.module = self.build_module().to(self.device)

    @abstractmethod
    def build_module(self) -> nn.Module:
        """A freshly initialised network."""

    def _set_input_stats(self, train: Bags) -> None:
        mean, std = feature_stats(train)
        self.module.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.module.input_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def _loss_weights(self, y: IntArray) -> torch.Tensor | None:
        w = class_weights(y, self.num_classes, self.config.class_weight)
        return None if w is None else torch.as_tensor(w, dtype=torch.float32, device=self.device)

    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {k: v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}

    def load_state_arrays(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        state = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items()}
        try:
            self.module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"saved {self.name} weights do not fit the model config: {exc}") from exc
        self.module.to(self.device).eval()

    @classmethod
    def refit_params(cls, infos: Sequence[FitInfo]) -> dict[str, Any]:
        epochs = [i.best_epoch for i in infos if i.best_epoch]
        return {"epochs": max(1, round(float(np.median(epochs))))} if epochs else {}

    def _fit(
        self,
        use_val: bool,
        seed: int,
        refit: dict[str, Any] | None,
        batches: Callable[[np.random.Generator], Iterator[Any]],
        batch_loss: Callable[[nn.Module, Any], torch.Tensor],
        val_loss: Callable[[nn.Module], float],
    ) -> FitInfo:
        epochs = int((refit or {}).get("epochs", self.config.epochs))
        history: FitHistory = fit_module(
            self.module,
            batches,
            batch_loss,
            val_loss if (use_val and refit is None) else None,
            epochs=epochs,
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
            patience=self.config.patience,
            seed=seed,
        )
        return FitInfo(best_epoch=history.best_epoch, epochs_run=history.epochs_run, stopped_early=history.stopped_early)


def _batches_of(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[npt.NDArray[np.int64]]:
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


# ---------------------------------------------------------------------------------------------- gridcnn
@dataclass(frozen=True)
class GridCNNConfig:
    """``gridcnn`` settings.

    ``width`` channels per block, ``depth`` blocks of which blocks ``1..strided`` may have stride 2
    (block 0 keeps the grid resolution for Grad-CAM; maps are not reduced below 4 cells), ``dropout`` the
    spatial (feature-map) dropout rate, ``crop`` the training crop side in grid cells, ``tta`` averages
    the 8 flips/rotations at prediction time. The learning rate is the paper's 1e-2 (Adam).
    """

    width: int = 64
    depth: int = 6
    strided: int = 4
    dropout: float = 0.2
    crop: int = 96
    tta: bool = True
    epochs: int = 80
    batch_size: int = 8
    lr: float = 1e-2
    weight_decay: float = 1e-4
    patience: int = 15
    class_weight: str = "balanced"

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on impossible values."""
        if self.width < 1 or self.depth < 1 or self.strided < 0 or self.crop < 1:
            raise InvalidParameterError(f"gridcnn needs width, depth, crop >= 1 and strided >= 0: {self}")
        if not 0 <= self.dropout < 1 or self.batch_size < 1 or self.epochs < 1 or self.lr <= 0:
            raise InvalidParameterError(f"gridcnn needs 0 <= dropout < 1, batch_size, epochs >= 1, lr > 0: {self}")
        _check_class_weight(self.class_weight)


def _dihedral(a: npt.NDArray[Any], k: int, flip: bool) -> npt.NDArray[Any]:
    """Rotate the last two axes by ``k`` × 90° and optionally flip them left-right."""
    out = np.rot90(a, k, axes=(-2, -1))
    return np.flip(out, axis=-1) if flip else out


@register_slide_classifier
class GridCNNClassifier(_TorchClassifier):
    """``gridcnn``: neural-image-compression style CNN over the embedding grid."""

    name = "gridcnn"
    Config = GridCNNConfig
    heatmap_kind = "Grad-CAM (first block)"

    def build_module(self) -> nn.Module:
        c = self.config
        return GridCNN(self.in_dim, self.num_classes, c.width, c.depth, c.strided, c.dropout)

    def _crop(self, bag: SlideBag, rng: np.random.Generator) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        rows, cols = bag.grid_shape
        h, w = min(self.config.crop, rows), min(self.config.crop, cols)
        center = bag.rowcol[rng.integers(bag.n_tiles)]
        r0 = int(np.clip(center[0] - h // 2, 0, rows - h))
        c0 = int(np.clip(center[1] - w // 2, 0, cols - w))
        rc = bag.rowcol
        sel = (rc[:, 0] >= r0) & (rc[:, 0] < r0 + h) & (rc[:, 1] >= c0) & (rc[:, 1] < c0 + w)
        grid = np.zeros((self.in_dim, h, w), dtype=np.float32)
        mask = np.zeros((1, h, w), dtype=np.float32)
        grid[:, rc[sel, 0] - r0, rc[sel, 1] - c0] = bag.features[sel].T
        mask[0, rc[sel, 0] - r0, rc[sel, 1] - c0] = 1.0
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        return _dihedral(grid, k, flip), _dihedral(mask, k, flip)

    def _stack(self, items: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]) -> tuple[torch.Tensor, torch.Tensor]:
        side_h = max(g.shape[1] for g, _ in items)
        side_w = max(g.shape[2] for g, _ in items)
        grids = np.zeros((len(items), self.in_dim, side_h, side_w), dtype=np.float32)
        masks = np.zeros((len(items), 1, side_h, side_w), dtype=np.float32)
        for i, (g, m) in enumerate(items):
            grids[i, :, : g.shape[1], : g.shape[2]] = g
            masks[i, :, : m.shape[1], : m.shape[2]] = m
        return torch.from_numpy(grids).to(self.device), torch.from_numpy(masks).to(self.device)

    def _whole(self, bag: SlideBag) -> tuple[torch.Tensor, torch.Tensor]:
        grid = torch.from_numpy(bag.grid(np.float32))[None].to(self.device)
        mask = torch.from_numpy(bag.mask.astype(np.float32))[None, None].to(self.device)
        return grid, mask

    def _logits(self, bag: SlideBag, tta: bool) -> torch.Tensor:
        grid, mask = self._whole(bag)
        if not tta:
            return self.module(grid, mask)[0]
        probs = []
        for k in range(4):
            for flip in (False, True):
                g = torch.rot90(grid, k, dims=(2, 3))
                m = torch.rot90(mask, k, dims=(2, 3))
                if flip:
                    g, m = torch.flip(g, dims=(3,)), torch.flip(m, dims=(3,))
                probs.append(torch.softmax(self.module(g, m)[0], dim=0))
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))

    def fit(
        self,
        train: Bags,
        y: npt.ArrayLike,
        val: Bags | None = None,
        y_val: npt.ArrayLike | None = None,
        *,
        seed: int = 0,
        refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        torch.manual_seed(seed)
        self.module = self.build_module().to(self.device)
        self._set_input_stats(train)
        y = np.asarray(y, dtype=np.int64)
        weight = self._loss_weights(y)

        def batches(rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            for idx in _batches_of(len(train), self.config.batch_size, rng):
                if len(idx) < 2 and len(train) > 1:
                    continue  # BatchNorm needs two samples; the slide comes again next epoch
                grids, masks = self._stack([self._crop(train[int(i)], rng) for i in idx])
                yield grids, masks, torch.as_tensor(y[idx], device=self.device)

        def batch_loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            grids, masks, target = batch
            return F.cross_entropy(module(grids, masks), target, weight=weight)

        val_bags = list(val) if val is not None and y_val is not None else []
        val_target = torch.as_tensor(np.asarray(y_val if val_bags else [], dtype=np.int64), device=self.device)

        def val_loss(module: nn.Module) -> float:
            logits = torch.stack([self._logits(bag, tta=False) for bag in val_bags])
            return float(F.cross_entropy(logits, val_target, weight=weight))

        return self._fit(bool(val_bags), seed, refit, batches, batch_loss, val_loss)

    def predict_proba(self, bags: Bags) -> FloatArray:
        self.module.eval()
        with torch.no_grad():
            rows = [torch.softmax(self._logits(bag, self.config.tta), dim=0).cpu().numpy() for bag in bags]
        return np.asarray(rows, dtype=float).reshape(len(rows), self.num_classes)

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """Grad-CAM on block 0: ReLU of the gradient-weighted feature maps of the class score.

        The score is the positive-class log-odds (binary) or the predicted class's logit minus the mean
        logit (multi-class). Scaled to [0, 1]; NaN outside tissue.
        """
        self.module.eval()
        grid, mask = self._whole(bag)
        with torch.enable_grad():
            logits, first = self.module(grid, mask, return_first=True)
            logits = logits[0]
            target = 1 if self.num_classes == 2 else int(logits.argmax())
            score = logits[target] - (logits[0] if self.num_classes == 2 else logits.mean())
            (grad,) = torch.autograd.grad(score, first)
        m = mask[0, 0]
        alpha = (grad[0] * m).sum(dim=(1, 2)) / m.sum().clamp(min=1.0)
        cam = torch.relu((alpha[:, None, None] * first[0]).sum(0)).detach().cpu().numpy().astype(float)
        peak = cam[bag.mask].max() if bag.n_tiles else 0.0
        cam = cam / peak if peak > 0 else cam
        cam[~bag.mask] = np.nan
        return cam


# ---------------------------------------------------------------------------------------------- abmil
@dataclass(frozen=True)
class ABMILConfig:
    """``abmil`` settings: tile embedding ``hidden`` size, gated-attention size, dropout, and at most
    ``max_instances`` random tiles per slide per training step (0: all)."""

    hidden: int = 128
    attention_dim: int = 64
    dropout: float = 0.25
    max_instances: int = 4096
    epochs: int = 60
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 12
    class_weight: str = "balanced"

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on impossible values."""
        if self.hidden < 1 or self.attention_dim < 1 or self.max_instances < 0 or not 0 <= self.dropout < 1:
            raise InvalidParameterError(f"abmil needs hidden, attention_dim >= 1, max_instances >= 0, 0 <= dropout < 1: {self}")
        if self.batch_size < 1 or self.epochs < 1 or self.lr <= 0:
            raise InvalidParameterError(f"abmil needs batch_size, epochs >= 1 and lr > 0: {self}")
        _check_class_weight(self.class_weight)


@register_slide_classifier
class ABMILClassifier(_TorchClassifier):
    """``abmil``: gated attention multiple-instance learning over tile embeddings."""

    name = "abmil"
    Config = ABMILConfig
    heatmap_kind = "attention"

    def build_module(self) -> nn.Module:
        c = self.config
        return GatedAttentionMIL(self.in_dim, self.num_classes, c.hidden, c.attention_dim, c.dropout)

    def _pad(self, feats: list[npt.NDArray[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(f.shape[0] for f in feats)
        x = np.zeros((len(feats), n, self.in_dim), dtype=np.float32)
        mask = np.zeros((len(feats), n), dtype=bool)
        for i, f in enumerate(feats):
            x[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = True
        return torch.from_numpy(x).to(self.device), torch.from_numpy(mask).to(self.device)

    def _forward_bag(self, bag: SlideBag) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self._pad([bag.features])
        logits, attention = self.module(x, mask)
        return logits[0], attention[0]

    def fit(
        self,
        train: Bags,
        y: npt.ArrayLike,
        val: Bags | None = None,
        y_val: npt.ArrayLike | None = None,
        *,
        seed: int = 0,
        refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        torch.manual_seed(seed)
        self.module = self.build_module().to(self.device)
        self._set_input_stats(train)
        y = np.asarray(y, dtype=np.int64)
        weight = self._loss_weights(y)
        cap = self.config.max_instances

        def sample(bag: SlideBag, rng: np.random.Generator) -> npt.NDArray[Any]:
            if cap and bag.n_tiles > cap:
                return bag.features[np.sort(rng.choice(bag.n_tiles, cap, replace=False))]
            return bag.features

        def batches(rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            for idx in _batches_of(len(train), self.config.batch_size, rng):
                x, mask = self._pad([sample(train[int(i)], rng) for i in idx])
                yield x, mask, torch.as_tensor(y[idx], device=self.device)

        def batch_loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, mask, target = batch
            return F.cross_entropy(module(x, mask)[0], target, weight=weight)

        val_bags = list(val) if val is not None and y_val is not None else []
        val_target = torch.as_tensor(np.asarray(y_val if val_bags else [], dtype=np.int64), device=self.device)

        def val_loss(module: nn.Module) -> float:
            logits = torch.stack([self._forward_bag(bag)[0] for bag in val_bags])
            return float(F.cross_entropy(logits, val_target, weight=weight))

        return self._fit(bool(val_bags), seed, refit, batches, batch_loss, val_loss)

    def predict_proba(self, bags: Bags) -> FloatArray:
        self.module.eval()
        with torch.no_grad():
            rows = [torch.softmax(self._forward_bag(bag)[0], dim=0).cpu().numpy() for bag in bags]
        return np.asarray(rows, dtype=float).reshape(len(rows), self.num_classes)

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """Attention weight of each tile, scaled to [0, 1] by the slide's maximum; NaN outside tissue."""
        self.module.eval()
        with torch.no_grad():
            attention = self._forward_bag(bag)[1].cpu().numpy().astype(float)
        peak = attention.max()
        return bag.to_grid(attention / peak if peak > 0 else attention)


# ---------------------------------------------------------------------------------------------- linear
@dataclass(frozen=True)
class LinearConfig:
    """``linear`` settings: ``pooling`` (``mean``, ``max`` or ``mean+max``), the inverse regularisation
    ``C`` used without a validation set, the grid ``Cs`` searched on it, class weighting, solver iterations."""

    pooling: str = "mean+max"
    C: float = 1.0
    Cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    class_weight: str = "balanced"
    max_iter: int = 5000

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on impossible values."""
        if self.pooling not in ("mean", "max", "mean+max"):
            raise InvalidParameterError(f"linear pooling must be mean, max or mean+max, got {self.pooling!r}")
        if self.C <= 0 or not self.Cs or min(self.Cs) <= 0 or self.max_iter < 1:
            raise InvalidParameterError(f"linear needs C > 0, positive Cs and max_iter >= 1: {self}")
        _check_class_weight(self.class_weight)


@register_slide_classifier
class LinearPooledClassifier(SlideClassifier):
    """``linear``: pooled features → standardisation → logistic regression (scikit-learn)."""

    name = "linear"
    Config = LinearConfig
    heatmap_kind = "per-tile logit contribution"
    heatmap_signed = True

    def __init__(self, in_dim: int, num_classes: int, config: Any = None, device: str = "auto") -> None:
        super().__init__(in_dim, num_classes, config, device)
        self.mean_: FloatArray | None = None
        self.scale_: FloatArray | None = None
        self.coef_: FloatArray | None = None
        self.intercept_: FloatArray | None = None

    def pool(self, bag: SlideBag) -> FloatArray:
        """The slide's feature vector: mean and/or max over its tiles."""
        f = bag.features.astype(np.float64)
        parts = {"mean": [f.mean(0)], "max": [f.max(0)], "mean+max": [f.mean(0), f.max(0)]}[self.config.pooling]
        return np.concatenate(parts)

    def _matrix(self, bags: Bags) -> FloatArray:
        return np.stack([self.pool(b) for b in bags]) if len(bags) else np.zeros((0, self._n_pooled()))

    def _n_pooled(self) -> int:
        return self.in_dim * (2 if self.config.pooling == "mean+max" else 1)

    def _fit_lr(self, x: FloatArray, y: IntArray, c: float, seed: int) -> tuple[StandardScaler, LogisticRegression]:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        weight = "balanced" if self.config.class_weight == "balanced" else None
        lr = LogisticRegression(C=c, class_weight=weight, max_iter=self.config.max_iter, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            lr.fit(scaler.transform(x), y)
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                logger.warning("logistic regression (C=%g) did not converge in %d iterations", c, self.config.max_iter)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return scaler, lr

    def fit(
        self,
        train: Bags,
        y: npt.ArrayLike,
        val: Bags | None = None,
        y_val: npt.ArrayLike | None = None,
        *,
        seed: int = 0,
        refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        x, y = self._matrix(train), np.asarray(y, dtype=np.int64)
        if len(np.unique(y)) < 2:
            raise InvalidParameterError("the training slides hold a single class")
        c = float((refit or {}).get("C", self.config.C))
        if refit is None and val is not None and len(val) and y_val is not None:
            from sklearn.metrics import log_loss

            xv, yv = self._matrix(val), np.asarray(y_val, dtype=np.int64)
            losses = {}
            for cand in self.config.Cs:
                scaler, lr = self._fit_lr(x, y, cand, seed)
                prob = _expand_proba(lr, scaler.transform(xv), self.num_classes)
                losses[cand] = log_loss(yv, prob, labels=list(range(self.num_classes)))
            c = min(losses, key=lambda k: (losses[k], k))
            x, y = np.concatenate([x, xv]), np.concatenate([y, yv])
        scaler, lr = self._fit_lr(x, y, c, seed)
        self.mean_, self.scale_ = scaler.mean_.astype(float), scaler.scale_.astype(float)
        coef = np.zeros((self.num_classes if self.num_classes > 2 else 1, x.shape[1]))
        intercept = np.zeros(coef.shape[0])
        if self.num_classes == 2:
            coef[:], intercept[:] = lr.coef_, lr.intercept_
        else:  # classes absent from this training set keep zero weights and a very low intercept
            intercept[:] = -30.0
            if len(lr.classes_) == 2:  # sklearn's binary form: logits (0, w.x + b) for (classes_[0], classes_[1])
                coef[lr.classes_[1]], intercept[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
                intercept[lr.classes_[0]] = 0.0
            else:
                coef[lr.classes_], intercept[lr.classes_] = lr.coef_, lr.intercept_
        self.coef_, self.intercept_ = coef, intercept
        return FitInfo(selected={"C": c})

    def _require_fitted(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        if self.mean_ is None or self.scale_ is None or self.coef_ is None or self.intercept_ is None:
            raise InvalidParameterError("the linear model is not fitted")
        return self.mean_, self.scale_, self.coef_, self.intercept_

    def decision_function(self, bags: Bags) -> FloatArray:
        """Logits: ``(n,)`` log-odds of class 1 when binary, else ``(n, k)``."""
        mean, scale, coef, intercept = self._require_fitted()
        z = (self._matrix(bags) - mean) / scale
        logits = z @ coef.T + intercept
        return logits[:, 0] if self.num_classes == 2 else logits

    def predict_proba(self, bags: Bags) -> FloatArray:
        logits = self.decision_function(bags)
        if self.num_classes == 2:
            p1 = 1.0 / (1.0 + np.exp(-logits))
            return np.stack([1.0 - p1, p1], axis=1)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """Each tile's additive share of the slide's logit (they sum to logit − intercept).

        The mean-pooled part splits evenly over tiles; each max-pooled feature's term goes to the tile
        holding the maximum. Binary: the log-odds of class 1; multi-class: the predicted class's logit
        minus the mean logit. Not rescaled (units: logit).
        """
        mean, scale, coef, _ = self._require_fitted()
        f = bag.features.astype(np.float64)
        n, c = f.shape
        if self.num_classes == 2:
            w = coef[0]
        else:
            target = int(self.decision_function([bag])[0].argmax())
            w = coef[target] - coef.mean(axis=0)
        contrib = np.zeros(n)
        offset = 0
        if self.config.pooling in ("mean", "mean+max"):
            wm = w[:c] / scale[:c]
            contrib += ((f - mean[:c]) @ wm) / n
            offset = c
        if self.config.pooling in ("max", "mean+max"):
            wx = w[offset : offset + c] / scale[offset : offset + c]
            top = f.argmax(axis=0)
            np.add.at(contrib, top, wx * (f[top, np.arange(c)] - mean[offset : offset + c]))
        return bag.to_grid(contrib)

    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        mean, scale, coef, intercept = self._require_fitted()
        return {"scaler_mean": mean, "scaler_scale": scale, "coef": coef, "intercept": intercept}

    def load_state_arrays(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        try:
            mean, scale = np.asarray(arrays["scaler_mean"], float), np.asarray(arrays["scaler_scale"], float)
            coef, intercept = np.asarray(arrays["coef"], float), np.asarray(arrays["intercept"], float)
        except KeyError as exc:
            raise CheckpointError(f"saved linear model lacks array {exc.args[0]!r}") from exc
        n_out = self.num_classes if self.num_classes > 2 else 1
        if mean.shape != (self._n_pooled(),) or coef.shape != (n_out, self._n_pooled()) or intercept.shape != (n_out,):
            raise CheckpointError(f"saved linear model arrays have shapes {coef.shape} that do not fit the config")
        self.mean_, self.scale_, self.coef_, self.intercept_ = mean, scale, coef, intercept

    @classmethod
    def refit_params(cls, infos: Sequence[FitInfo]) -> dict[str, Any]:
        chosen = [i.selected["C"] for i in infos if i.selected and "C" in i.selected]
        if not chosen:
            return {}
        counts = Counter(chosen)
        top = max(counts.values())
        # The most often chosen C; ties go to the stronger regularisation (smaller C).
        return {"C": min(c for c, n in counts.items() if n == top)}


def _expand_proba(lr: LogisticRegression, x: FloatArray, num_classes: int) -> FloatArray:
    """sklearn probabilities placed into ``num_classes`` columns (absent classes get ~0)."""
    prob = np.full((x.shape[0], num_classes), 1e-12)
    prob[:, lr.classes_] = lr.predict_proba(x)
    return prob / prob.sum(axis=1, keepdims=True)


__all__ = [
    "ABMILClassifier",
    "ABMILConfig",
    "FitInfo",
    "GatedAttentionMIL",
    "GridCNN",
    "GridCNNClassifier",
    "GridCNNConfig",
    "LinearConfig",
    "LinearPooledClassifier",
    "SlideClassifier",
    "create_slide_classifier",
    "list_slide_classifiers",
    "make_config",
    "register_slide_classifier",
    "slide_classifier_class",
]
