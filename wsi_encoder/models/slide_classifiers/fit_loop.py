"""A seeded PyTorch training loop with early stopping on a validation loss (the torch slide classifiers' loop).

The loop knows nothing of models or losses: it is given a module, a function producing one epoch of
batches, a function turning a batch into a scalar loss, and optionally a function computing the
validation loss. AdamW at a constant learning rate by default (Adam with an L2 penalty and a learning rate
reduced on plateau for the ``gridcnn`` ``tellez2019`` preset); the weights of the epoch with the lowest validation
loss are restored at the end (so the epoch count is comparable when a final model is refit on all data
for that many epochs, without a validation set).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_encoder.errors import InvalidParameterError

logger = logging.getLogger(__name__)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: leave torch's setting), then restore it.

    Slide-level models are small: one or two threads are nearly as fast as many, and on a busy machine
    spinning OpenMP threads waste far more CPU than they save.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise InvalidParameterError(f"threads must be >= 1, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class FitHistory:
    """What happened during training.

    ``best_epoch`` is 1-based (the epoch whose weights were kept); ``val_loss`` is empty without a
    validation set.
    """

    best_epoch: int
    epochs_run: int
    train_loss: tuple[float, ...]
    val_loss: tuple[float, ...]
    stopped_early: bool


def fit_module(
    module: nn.Module,
    batches: Callable[[np.random.Generator], Iterable[Any]],
    batch_loss: Callable[[nn.Module, Any], torch.Tensor],
    val_loss: Callable[[nn.Module], float] | None = None,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    patience: int = 10,
    seed: int = 0,
    max_grad_norm: float = 5.0,
    optimizer: str = "adamw",
    lr_plateau: float = 0.0,
    plateau_patience: int = 5,
    min_lr: float = 0.0,
) -> FitHistory:
    """Train ``module`` in place.

    Parameters
    ----------
    module
        Already on its device.
    batches
        ``batches(rng)`` yields one epoch of training batches (any objects ``batch_loss`` understands).
    batch_loss
        Mean loss of one batch, called in train mode.
    val_loss
        Validation loss, called in eval mode under ``torch.no_grad``; None trains for ``epochs`` epochs.
    epochs
        Maximum number of passes over the training data.
    lr, weight_decay
        Learning rate and weight decay.
    optimizer
        ``adamw`` (decoupled weight decay on every parameter), or ``adam`` with ``weight_decay`` as an L2
        penalty on the weight matrices and kernels only (Keras ``kernel_regularizer=l2(weight_decay / 2)``).
    lr_plateau, plateau_patience, min_lr
        With ``lr_plateau`` > 0, the learning rate is multiplied by it after ``plateau_patience`` epochs without
        a lower validation (else training) loss, down to ``min_lr`` (Keras ``ReduceLROnPlateau``).
    patience
        Stop after this many epochs without a lower validation loss.
    seed
        Seeds the batch order (numpy) and torch's generator (dropout).
    max_grad_norm
        Gradients are clipped to this norm.
    """
    if epochs < 1:
        raise InvalidParameterError(f"epochs must be >= 1, got {epochs!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "adam":
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
        opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    else:
        raise InvalidParameterError(f"optimizer must be 'adamw' or 'adam', got {optimizer!r}")
    scheduler = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=lr_plateau, patience=plateau_patience, min_lr=min_lr)
        if lr_plateau > 0
        else None
    )
    train_losses: list[float] = []
    val_losses: list[float] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    stopped = False
    for epoch in range(1, epochs + 1):
        module.train()
        total, count = 0.0, 0
        for batch in batches(rng):
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(module, batch)
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
            opt.step()
            total += float(loss.detach())
            count += 1
        train_losses.append(total / max(count, 1))
        if val_loss is None:
            if scheduler is not None:
                scheduler.step(train_losses[-1])
            continue
        module.eval()
        with torch.no_grad():
            current = float(val_loss(module))
        val_losses.append(current)
        if scheduler is not None:
            scheduler.step(current)
        logger.debug("epoch %d train loss %.4f val loss %.4f", epoch, train_losses[-1], current)
        if current < best_loss - 1e-6:
            best_loss, best_epoch = current, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in module.state_dict().items()})
        elif epoch - best_epoch >= patience:
            stopped = True
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    else:  # no validation set (or no finite validation loss): the last weights are kept
        best_epoch = len(train_losses)
    module.eval()
    return FitHistory(best_epoch, len(train_losses), tuple(train_losses), tuple(val_losses), stopped)
