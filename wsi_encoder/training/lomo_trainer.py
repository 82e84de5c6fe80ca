"""Train the LOMO classifiers: one loop for the baseline, GAN-augmented and gradient-reversal arms.

All arms share the backbone, the optimiser (Adam), the batch size, the budget (``epochs`` times
``ceil(n_real / batch_size)`` optimizer steps, whatever the arm) and the initial weights (the caller
loads the same state into every model). They differ only in what the arm adds:

``baseline``
    encoder → label head, binary cross-entropy on the real training images.
``gan``
    the same, but each batch is drawn from the real images plus DCGAN images (their class from the
    generator they came from); a share ``r / (1 + r)`` of the samples is synthetic.
``grl``
    the baseline plus a magnification domain head behind a gradient reversal layer; loss
    ``L_y + L_d`` with the reversal coefficient following the DANN schedule over the steps.

After each epoch the model is scored on the validation patients (AUC, ties broken by log-loss; the
log-loss alone when AUC is undefined) and the best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.models.grl import DomainHead, dann_lambda
from wsi_encoder.training.lomo_data import augment, resize_batch, to_tensor

logger = logging.getLogger(__name__)

ARMS = ("baseline", "gan", "grl")


@dataclass(frozen=True)
class TrainSpec:
    """Classifier training settings, identical for every arm.

    Attributes
    ----------
    epochs : int
        Passes over the real training images (the step budget of every arm).
    batch_size : int
        Images per optimizer step.
    lr : float
        Adam learning rate.
    weight_decay : float
        Adam weight decay.
    grl_weight : float
        Scale of the DANN λ schedule (``grl`` arm).
    domain_hidden : int
        Width of the domain head's two hidden layers (``grl`` arm; 1024 in DANN).
    domain_lr_mult : float
        Learning-rate multiplier of the domain head (``grl`` arm). DANN's reference code trains
        the newly added layers at 10× the base rate; a head that lags the encoder lets the reversed
        gradient flip the magnification information instead of removing it.
    augment : bool
        Random flips and 90° rotations of training images.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    grl_weight: float = 1.0
    domain_hidden: int = 1024
    domain_lr_mult: float = 10.0
    augment: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.domain_hidden < 1:
            raise InvalidParameterError(
                f"bad training settings {self!r}: epochs, batch size, lr must be positive"
            )
        if self.grl_weight < 0 or self.weight_decay < 0 or self.domain_lr_mult <= 0:
            raise InvalidParameterError(f"grl weight {self.grl_weight!r} and weight decay must be >= 0")


class LomoClassifier(nn.Module):
    """Encoder → label head (one logit, P(malignant)), with an optional domain head behind a GRL."""

    def __init__(self, encoder: nn.Module, domain_head: DomainHead | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.num_features), 1)
        self.domain_head = domain_head

    @property
    def num_features(self) -> int:
        """Embedding width."""
        return int(self.encoder.num_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(features (B, D), label logit (B,), domain logits (B, k) or None)`` for images in [0, 1]."""
        feats = self.encoder.forward_features(x)
        logit = self.head(feats).squeeze(1)
        dom = self.domain_head(feats) if self.domain_head is not None else None
        return feats, logit, dom


def shared_state(encoder: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The initial encoder + label-head state every arm and fold starts from (label head drawn from ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LomoClassifier(encoder)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def build_classifier(
    encoder: nn.Module,
    init_state: dict[str, torch.Tensor],
    *,
    n_domains: int = 0,
    domain_hidden: int = 1024,
    seed: int = 0,
) -> LomoClassifier:
    """A classifier loaded with ``init_state``; with ``n_domains >= 2`` a seeded domain head is added."""
    domain = None
    if n_domains >= 2:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            domain = DomainHead(int(encoder.num_features), n_domains, hidden=domain_hidden)
    model = LomoClassifier(encoder, domain)
    missing, unexpected = model.load_state_dict(init_state, strict=False)
    bad = [k for k in missing if not k.startswith("domain_head.")] + list(unexpected)
    if bad:
        raise InvalidParameterError(f"initial state does not fit the classifier: {bad[:5]}")
    return model


@dataclass
class TrainData:
    """What one (arm, fold) trains on; image rows index ``images``.

    Attributes
    ----------
    images
        ``(N, S, S, 3)`` uint8 decoded images (the cache memmap).
    train_rows, y_train, domain_train
        Real training images, their class (0/1) and domain index (-1: none).
    val_rows, y_val
        Validation images and classes (may be empty).
    synthetic, y_synthetic
        ``(M, s, s, 3)`` uint8 generated images (resized to S on the fly) and their classes, or None.
    """

    images: npt.NDArray[np.uint8]
    train_rows: npt.NDArray[np.int64]
    y_train: npt.NDArray[np.int64]
    domain_train: npt.NDArray[np.int64]
    val_rows: npt.NDArray[np.int64]
    y_val: npt.NDArray[np.int64]
    synthetic: npt.NDArray[np.uint8] | None = None
    y_synthetic: npt.NDArray[np.int64] | None = None


@dataclass
class TrainResult:
    """Per-epoch history and the epoch whose weights were kept (1-based)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    steps: int = 0


def _batch(data: TrainData, pool: npt.NDArray[np.int64], device: torch.device) -> torch.Tensor:
    """Images of pool items (>= 0: real row index into train_rows; < 0: synthetic ~item) as a batch."""
    size = data.images.shape[1]
    real = pool[pool >= 0]
    parts = []
    if len(real):
        rows = data.train_rows[real]
        order = np.argsort(rows)
        x = to_tensor(data.images[rows[order]], device)
        parts.append(x[torch.from_numpy(np.argsort(order)).to(device)])
    syn = ~pool[pool < 0]
    if len(syn):
        assert data.synthetic is not None
        parts.append(resize_batch(to_tensor(data.synthetic[syn], device), size))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _labels(
    data: TrainData, pool: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    real = pool[pool >= 0]
    syn = ~pool[pool < 0]
    y = np.concatenate([data.y_train[real], data.y_synthetic[syn] if len(syn) else np.zeros(0, np.int64)])
    dom = np.concatenate([data.domain_train[real], np.full(len(syn), -1, np.int64)])
    return y, dom


def train_classifier(
    model: LomoClassifier,
    data: TrainData,
    spec: TrainSpec,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``; leaves it in eval mode with the best epoch's weights.

    The pool of a step is real images (and synthetic ones when ``data.synthetic`` is set), drawn
    without replacement in a seeded order, ``batch_size`` at a time; there are
    ``epochs · ceil(n_real / batch_size)`` steps. With a domain head the loss adds the domain
    cross-entropy of the real images, reversed into the encoder with ``λ = dann_lambda(step / steps)``.
    """
    device = torch.device(device)
    n_real = len(data.train_rows)
    if n_real < 2:
        raise DatasetError(f"{n_real} training image(s): at least 2 are needed to train a classifier")
    n_syn = 0 if data.synthetic is None else len(data.synthetic)
    pool = np.concatenate([np.arange(n_real, dtype=np.int64), ~np.arange(n_syn, dtype=np.int64)])
    batch = min(spec.batch_size, len(pool))
    steps_per_epoch = math.ceil(n_real / batch)
    model.to(device)
    domain_params = [] if model.domain_head is None else list(model.domain_head.parameters())
    ids = {id(p) for p in domain_params}
    groups: list[dict[str, object]] = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids], "lr": spec.lr}
    ]
    if domain_params:
        groups.append({"params": domain_params, "lr": spec.lr * spec.domain_lr_mult})
    opt = torch.optim.Adam(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train_loop(model, data, spec, pool, batch, steps_per_epoch, seed, device, opt, on_epoch)


def _train_loop(
    model: LomoClassifier,
    data: TrainData,
    spec: TrainSpec,
    pool: npt.NDArray[np.int64],
    batch: int,
    steps_per_epoch: int,
    seed: int,
    device: torch.device,
    opt: torch.optim.Optimizer,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None,
) -> TrainResult:
    total = spec.epochs * steps_per_epoch
    rng = np.random.default_rng(seed)
    aug_rng = torch.Generator().manual_seed(seed)
    order = rng.permutation(pool)
    cursor = 0
    result = TrainResult(steps=total)
    best_key: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    step = 0
    for epoch in range(1, spec.epochs + 1):
        model.train()
        sums = {"loss": 0.0, "loss_label": 0.0}
        if model.domain_head is not None:
            sums["loss_domain"] = 0.0
        for _ in range(steps_per_epoch):
            if cursor + batch > len(order):
                order = np.concatenate([order[cursor:], rng.permutation(pool)])
                cursor = 0
            items = order[cursor : cursor + batch]
            cursor += batch
            x = _batch(data, items, device)
            if spec.augment:
                x = augment(x, aug_rng)
            y_np, dom_np = _labels(data, items)
            y = torch.from_numpy(y_np).to(device).float()
            _, logit, dom_logits = model(x)
            loss_label = F.binary_cross_entropy_with_logits(logit, y)
            loss = loss_label
            if dom_logits is not None and model.domain_head is not None:
                model.domain_head.lambd = dann_lambda(step / max(total, 1), weight=spec.grl_weight)
                dom = torch.from_numpy(dom_np).to(device)
                keep = dom >= 0
                if bool(keep.any()):
                    loss_domain = F.cross_entropy(dom_logits[keep], dom[keep])
                    loss = loss + loss_domain
                    sums["loss_domain"] += float(loss_domain.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += float(loss.detach())
            sums["loss_label"] += float(loss_label.detach())
            step += 1
        stats = {k: v / steps_per_epoch for k, v in sums.items()}
        if model.domain_head is not None:
            stats["lambda"] = model.domain_head.lambd
        stats.update(_validate(model, data, spec.batch_size, device))
        stats["epoch"] = float(epoch)
        result.history.append(stats)
        key = _selection_key(stats)
        if best_key is None or key > best_key:
            best_key = key
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            result.best_epoch = epoch
        logger.info("epoch %d/%d %s", epoch, spec.epochs, {k: round(v, 4) for k, v in stats.items()})
        if on_epoch is not None:
            on_epoch(epoch, spec.epochs, stats)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def _selection_key(stats: dict[str, float]) -> tuple[float, float]:
    """Higher is better: (val AUC, -val log-loss); without validation, later epochs win."""
    auc = stats.get("val_auc", float("nan"))
    loss = stats.get("val_loss", float("nan"))
    if math.isnan(loss):
        return (stats["epoch"], 0.0)
    return (auc if not math.isnan(auc) else -math.inf, -loss)


@torch.no_grad()
def _validate(
    model: LomoClassifier, data: TrainData, batch_size: int, device: torch.device
) -> dict[str, float]:
    if len(data.val_rows) == 0:
        return {}
    from sklearn.metrics import roc_auc_score

    _, prob = embed(model, data.images, data.val_rows, batch_size=batch_size, device=device)
    y = data.y_val
    p = np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return {"val_loss": loss, "val_auc": auc}


@torch.no_grad()
def embed(
    model: LomoClassifier,
    images: npt.NDArray[np.uint8],
    rows: npt.NDArray[np.int64],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Frozen embeddings ``(n, D)`` float32 and P(malignant) ``(n,)`` float32 of ``images[rows]`` (eval mode)."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    feats = np.zeros((len(rows), model.num_features), dtype=np.float32)
    probs = np.zeros(len(rows), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        sel = np.asarray(rows[start : start + batch_size])
        order = np.argsort(sel)
        x = to_tensor(images[sel[order]], device)
        f, logit, _ = model(x)
        inv = np.argsort(order)
        feats[start : start + len(sel)] = f.float().cpu().numpy()[inv]
        probs[start : start + len(sel)] = torch.sigmoid(logit).float().cpu().numpy()[inv]
    model.train(was_training)
    return feats, probs
