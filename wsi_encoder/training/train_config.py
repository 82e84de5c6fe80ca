"""Settings of ``wsienc train-encoder``: :class:`TrainConfig` is the single source of every default.

The command line reads its defaults from here, :func:`~wsi_encoder.training.multitask.train_multitask`
records ``asdict(config)`` in the checkpoint. This module imports neither torch nor the augmentation
code at import time, so ``wsienc --help`` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from wsi_encoder.errors import InvalidParameterError

if TYPE_CHECKING:
    from wsi_encoder.training.augment import AugmentConfig


def _default_augment() -> AugmentConfig:
    from wsi_encoder.training.augment import AugmentConfig

    return AugmentConfig()


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a train-encoder run (units in the names: px, µm/px, MB).

    ``max_steps`` (when set) overrides ``epochs``; an epoch is ``steps_per_epoch`` steps, by default
    enough batches to show every training image once on average.
    """

    backbone: str = "nic"
    embed_dim: int | None = 128
    input_size: int | None = None
    input_mpp: float | None = None
    epochs: int = 10
    max_steps: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    seed: int = 0
    val_fraction: float = 0.2
    val_max_images: int | None = None
    workers: int | None = None
    device: str | None = None
    amp: bool | None = None
    weights: str | None = None
    freeze_backbone: bool = False
    unfreeze_last: int | None = None
    cache_mb: int = 1024
    checkpoint_every: int = 500
    augment: AugmentConfig = field(default_factory=_default_augment)
    plots: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InvalidParameterError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidParameterError(f"max_steps must be at least 1, got {self.max_steps!r}")
        if not self.lr > 0:
            raise InvalidParameterError(f"lr must be positive, got {self.lr!r}")
        if self.freeze_backbone and self.unfreeze_last is not None:
            raise InvalidParameterError("--freeze-backbone and --unfreeze-last N are exclusive")
        if self.unfreeze_last is not None and self.unfreeze_last < 0:
            raise InvalidParameterError(f"unfreeze_last must be >= 0, got {self.unfreeze_last!r}")
        if self.workers is not None and self.workers < 0:
            raise InvalidParameterError(f"workers must be >= 0, got {self.workers!r}")

    @property
    def num_workers(self) -> int:
        """DataLoader workers: ``workers``, or by default one per spare CPU core (at most 4)."""
        if self.workers is not None:
            return self.workers
        return min(4, max(0, (os.cpu_count() or 1) - 1))

    @classmethod
    def default(cls, name: str) -> Any:
        """The default value of setting ``name`` (the CLI's defaults come from here)."""
        for f in fields(cls):
            if f.name == name:
                return f.default
        raise KeyError(name)
