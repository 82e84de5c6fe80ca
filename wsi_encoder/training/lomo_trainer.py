"""Train the LOMO classifiers: one loop for every arm, the arm's additions come from a strategy.

All arms share the backbone, the optimiser (Adam), the batches of real images and the budget
(``epochs`` passes over the real training images in batches of ``batch_size`` real images, one
seeded permutation per epoch, the same in every arm) and the initial weights (the caller loads the
same state into every model). What an arm adds, synthetic images on top of the real ones or a loss
term, comes from its strategy object (:mod:`wsi_encoder.training.lomo_arms`).

After each epoch the model is scored on the validation patients (AUC, ties broken by log-loss; the
log-loss alone when AUC is undefined). One selection rule holds for every arm: ``selection="last"``
(the default) keeps the final epoch's weights, so no difference between arms is confounded with
early stopping; ``"best-val"`` (a sensitivity analysis) keeps the best validation epoch among the
epochs that end after the grl arm's λ ramp (``select_from``, progress 0.529 by default): during the
ramp the grl arm is not yet the model it is meant to be, and its validation loss is not comparable.

Synthetic images (the gan arm) get a forward pass of their own, after the real batch's, with every
BatchNorm layer in eval mode (:func:`frozen_batchnorm`): they are normalised with the running
statistics of the real images and never update them, so the statistics used on test images are
those of real images only. Their own augmentation generator keeps the real images' augmentation,
and so ``gan_ratio 0``, identical to the baseline's.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.models.encoders import Encoder
from wsi_encoder.models.grl import dann_ramp_end
from wsi_encoder.training.lomo_arms import BaselineArm
from wsi_encoder.training.lomo_data import augment, to_tensor
from wsi_encoder.training.lomo_loader import batch_stream, to_model_input

logger = logging.getLogger(__name__)

SELECTIONS = ("last", "best-val")
#: Progress after which best-val may pick an epoch: the end of the DANN λ ramp (λ at 99 %).
RAMP_END = dann_ramp_end()


@dataclass(frozen=True)
class TrainSpec:
    """Classifier training settings, identical for every arm.

    Attributes
    ----------
    epochs : int
        Passes over the real training images.
    batch_size : int
        Real images per optimizer step (an arm may add synthetic ones on top).
    lr : float
        Adam learning rate.
    weight_decay : float
        Adam weight decay.
    augment : bool
        Random flips and 90° rotations of training images.
    selection : str
        ``last`` (the final epoch) or ``best-val`` (the best validation AUC among the epochs whose
        end progress ``epoch / epochs`` is at least ``select_from``).
    select_from : float
        First training progress at which best-val may keep an epoch (default: the end of the λ ramp).
    workers : int
        DataLoader worker processes reading the training batches (0: the main process); results do not
        depend on it (:mod:`~wsi_encoder.training.lomo_loader`).
    amp : bool
        bfloat16 autocast of the forward passes on CUDA (ignored on the CPU).
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    augment: bool = True
    selection: str = "last"
    select_from: float = RAMP_END
    workers: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise InvalidParameterError(
                f"bad training settings {self!r}: epochs, batch size, lr must be positive"
            )
        if self.selection not in SELECTIONS:
            raise InvalidParameterError(f"epoch selection {self.selection!r}: choose last or best-val")
        if self.workers < 0:
            raise InvalidParameterError(f"workers must be >= 0, got {self.workers!r}")
        if not 0.0 <= self.select_from <= 1.0:
            raise InvalidParameterError(f"select_from {self.select_from!r} must be a progress in [0, 1]")

    def eligible(self, epoch: int) -> bool:
        """Whether the selection rule may keep ``epoch`` (1-based): the last one, or for best-val any after the ramp."""
        if self.selection == "last":
            return epoch == self.epochs
        return epoch == self.epochs or epoch / self.epochs >= self.select_from


class LomoClassifier(nn.Module):
    """Encoder → label head (one logit, P(malignant)), plus an arm's extra module ``aux`` (or None)."""

    def __init__(self, encoder: Encoder, aux: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, 1)
        self.aux = aux

    @property
    def num_features(self) -> int:
        """Embedding width."""
        return self.encoder.num_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, D), label logit (B,))`` for images in [0, 1]."""
        feats = self.encoder.forward_features(x)
        return feats, self.head(feats).squeeze(1)


def shared_state(encoder: Encoder, seed: int) -> dict[str, torch.Tensor]:
    """The initial encoder + label-head state every arm and fold starts from (label head drawn from ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LomoClassifier(encoder)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def build_classifier(
    encoder: Encoder, init_state: dict[str, torch.Tensor], arm: BaselineArm | None = None
) -> LomoClassifier:
    """A classifier loaded with ``init_state``, carrying ``arm``'s extra module (if any)."""
    aux = None if arm is None else arm.head(encoder.num_features)
    model = LomoClassifier(encoder, aux)
    missing, unexpected = model.load_state_dict(init_state, strict=False)
    bad = [k for k in missing if not k.startswith("aux.")] + list(unexpected)
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
    """

    images: npt.NDArray[np.uint8]
    train_rows: npt.NDArray[np.int64]
    y_train: npt.NDArray[np.int64]
    domain_train: npt.NDArray[np.int64]
    val_rows: npt.NDArray[np.int64]
    y_val: npt.NDArray[np.int64]


@dataclass
class TrainResult:
    """Per-epoch history, the epoch whose weights were kept (1-based) and what was seen.

    ``real_seen`` counts real training images per epoch, ``extra_seen`` the arm's added images.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    selected_epoch: int = 0
    selection: str = "last"
    steps: int = 0
    real_seen: list[int] = field(default_factory=list)
    extra_seen: list[int] = field(default_factory=list)


def epoch_batches(n_real: int, batch_size: int, rng: np.random.Generator) -> list[npt.NDArray[np.int64]]:
    """One epoch of real-image batches: a seeded permutation cut into ``batch_size`` chunks.

    Every real image is in exactly one batch; a last chunk of a single image joins the one before
    (BatchNorm cannot train on one image).
    """
    order = rng.permutation(n_real).astype(np.int64)
    chunks = [order[i : i + batch_size] for i in range(0, n_real, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = np.concatenate([chunks[-2], chunks.pop()])
    return chunks


def steps_per_epoch(n_real: int, batch_size: int) -> int:
    """Optimizer steps per epoch (the same in every arm)."""
    return len(epoch_batches(n_real, batch_size, np.random.default_rng(0)))


def _autocast(spec: TrainSpec, device: torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA when ``spec.amp`` (no loss scaling needed), a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.amp and device.type == "cuda")


@contextmanager
def frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm layer of ``model`` in eval mode inside the block (running statistics used, not updated).

    Gradients still flow; the other layers keep their mode. Restores each layer's mode on exit.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.eval()
        yield
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.train(mode)


def label_loss(
    logit_real: torch.Tensor,
    y_real: torch.Tensor,
    logit_syn: torch.Tensor | None = None,
    y_syn: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(real term, synthetic term)`` of the label loss of one step; the step's label loss is their sum.

    The real term is the mean binary cross-entropy over the real batch, exactly the baseline's. The
    synthetic term is the *sum* over the synthetic images divided by the number of real images:
    each synthetic image weighs as much as one real image and, at ``ratio`` synthetic per real, the
    term is ``ratio`` times their mean, added on top of (never diluting) the real term.
    """
    real = F.binary_cross_entropy_with_logits(logit_real, y_real.float())
    if logit_syn is None or y_syn is None or logit_syn.numel() == 0:
        return real, None
    syn = F.binary_cross_entropy_with_logits(logit_syn, y_syn.float(), reduction="sum") / logit_real.numel()
    return real, syn


def train_classifier(
    model: LomoClassifier,
    data: TrainData,
    spec: TrainSpec,
    arm: BaselineArm | None = None,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``; leaves it in eval mode with the selected epoch's weights.

    Each epoch is one seeded permutation of the real images cut into batches of ``batch_size``
    (:func:`epoch_batches`; the same batches in every arm for one seed). ``arm`` may add synthetic
    images on top of each batch and a loss term (see :mod:`wsi_encoder.training.lomo_arms`); its
    :meth:`~wsi_encoder.training.lomo_arms.BaselineArm.before_step` runs before the forward pass of
    the step, with the progress ``(step + 1) / steps`` reached at the end of that step.
    """
    arm = arm or BaselineArm()
    device = torch.device(device)
    n_real = len(data.train_rows)
    if n_real < 2:
        raise DatasetError(f"{n_real} training image(s): at least 2 are needed to train a classifier")
    model.to(device)
    aux_params = [] if model.aux is None else list(model.aux.parameters())
    ids = {id(p) for p in aux_params}
    groups: list[dict[str, object]] = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids], "lr": spec.lr}
    ]
    if aux_params:
        groups.append({"params": aux_params, "lr": spec.lr * arm.head_lr_mult()})
    opt = torch.optim.Adam(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    devices = [device.index or 0] if device.type == "cuda" else []
    if device.type == "cuda":  # seeds promise reproducible runs: deterministic cuDNN kernels
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train_loop(model, data, spec, arm, seed, device, opt, on_epoch)


def _train_loop(
    model: LomoClassifier,
    data: TrainData,
    spec: TrainSpec,
    arm: BaselineArm,
    seed: int,
    device: torch.device,
    opt: torch.optim.Optimizer,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None,
) -> TrainResult:
    n_real = len(data.train_rows)
    per_epoch = steps_per_epoch(n_real, spec.batch_size)
    total = spec.epochs * per_epoch
    rng = np.random.default_rng(seed)
    extra_rng = np.random.default_rng([seed, 1])
    aug_rng = torch.Generator().manual_seed(seed)
    syn_aug_rng = torch.Generator().manual_seed(seed + 104729)
    size = data.images.shape[1]
    result = TrainResult(steps=total, selection=spec.selection)
    best_key: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    step = 0
    for epoch in range(1, spec.epochs + 1):
        model.train()
        sums: dict[str, float] = {"loss": 0.0, "loss_label": 0.0}
        logged: dict[str, float] = {}
        seen_real = seen_extra = 0
        batches = epoch_batches(n_real, spec.batch_size, rng)
        stream = batch_stream(data.images, [data.train_rows[b] for b in batches], workers=spec.workers, device=device)
        for items, pixels in zip(batches, stream, strict=True):
            x = to_model_input(pixels, device)
            y = torch.from_numpy(data.y_train[items]).to(device)
            if spec.augment:
                x = augment(x, aug_rng)
            n_extra = arm.n_extra(len(items))
            logged = arm.before_step(model, (step + 1) / total)
            with _autocast(spec, device):
                feats, logit = model(x)
            loss_label, loss_syn = label_loss(logit, y)
            if n_extra:
                x_syn_np, y_syn_np = arm.extra_samples(n_extra, extra_rng, size)
                x_syn = to_tensor(x_syn_np, device)
                if spec.augment:
                    x_syn = augment(x_syn, syn_aug_rng)
                with frozen_batchnorm(model), _autocast(spec, device):
                    _, logit_syn = model(x_syn)
                _, loss_syn = label_loss(logit, y, logit_syn, torch.from_numpy(y_syn_np).to(device))
            loss = loss_label if loss_syn is None else loss_label + loss_syn
            if loss_syn is not None:
                sums["loss_synthetic"] = sums.get("loss_synthetic", 0.0) + float(loss_syn.detach())
            with _autocast(spec, device):
                extra = arm.extra_loss(model, feats, torch.from_numpy(data.domain_train[items]).to(device))
            if extra is not None:
                loss = loss + extra
                sums["loss_extra"] = sums.get("loss_extra", 0.0) + float(extra.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += float(loss.detach())
            sums["loss_label"] += float(loss_label.detach())
            seen_real += len(items)
            seen_extra += n_extra
            step += 1
        result.real_seen.append(seen_real)
        result.extra_seen.append(seen_extra)
        stats = {k: v / per_epoch for k, v in sums.items()}
        stats.update(logged)
        stats.update(_validate(model, data, spec.batch_size, device))
        stats["epoch"] = float(epoch)
        result.history.append(stats)
        key = _selection_key(stats) if spec.selection == "best-val" else (float(epoch), 0.0)
        if spec.eligible(epoch) and (best_key is None or key > best_key):
            best_key = key
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            result.selected_epoch = epoch
        logger.info("epoch %d/%d %s", epoch, spec.epochs, {k: round(v, 4) for k, v in stats.items()})
        if on_epoch is not None:
            on_epoch(epoch, spec.epochs, stats)
    if best_state is not None and result.selected_epoch != spec.epochs:
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
        f, logit = model(x)
        inv = np.argsort(order)
        feats[start : start + len(sel)] = f.float().cpu().numpy()[inv]
        probs[start : start + len(sel)] = torch.sigmoid(logit).float().cpu().numpy()[inv]
    model.train(was_training)
    return feats, probs
