"""The torch slide classifiers' common part: ``fit`` and ``predict_proba`` written once over two hooks.

A torch model only says how to build its network (:meth:`TorchSlideClassifier.build_module`) and how
to turn bags into network inputs (:meth:`TorchSlideClassifier.collate`: random crops or tile samples
for training, the whole bags to evaluate). Standardisation by the training tiles' feature statistics
(buffers ``input_mean``/``input_std`` of the network), class-weighted cross-entropy, early stopping on
the validation loss, weights as plain arrays and the refit rule are shared.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.devices import resolve_device
from wsi_encoder.errors import CheckpointError
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.slide_classifiers.base import (
    Bags,
    FitInfo,
    FloatArray,
    IntArray,
    SlideClassifier,
    class_weights,
    feature_stats,
)
from wsi_encoder.models.slide_classifiers.fit_loop import fit_module

Inputs = tuple[torch.Tensor, ...]


class TorchFitConfig(Protocol):
    """The settings every torch model's config has (its training loop reads them)."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def patience(self) -> int: ...
    @property
    def class_weight(self) -> str: ...


TorchConfigT = TypeVar("TorchConfigT", bound=TorchFitConfig)


def batches_of(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[npt.NDArray[np.int64]]:
    """A random order of ``range(n)`` cut into batches of ``batch_size`` (the last one may be shorter)."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


class TorchSlideClassifier(SlideClassifier[TorchConfigT]):
    """A slide classifier whose network is a torch module taking ``collate``'s tensors.

    Subclasses implement :meth:`build_module` and :meth:`collate` (and :meth:`heatmap`); they may
    override :meth:`logits` when their network returns more than the logits, and :meth:`bag_logits`
    for test-time augmentation.
    """

    #: Training batches smaller than this are skipped (BatchNorm needs two samples); the slides come
    #: again next epoch.
    min_batch: ClassVar[int] = 1
    module: nn.Module

    def __init__(
        self, in_dim: int, num_classes: int, config: TorchConfigT | dict[str, Any] | None = None, device: str = "auto"
    ) -> None:
        super().__init__(in_dim, num_classes, config, device)
        self.device = resolve_device(device)
        self.module = self.build_module().to(self.device)

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def build_module(self) -> nn.Module:
        """A freshly initialised network with ``input_mean``/``input_std`` buffers of size ``in_dim``."""

    @abstractmethod
    def collate(self, bags: Sequence[SlideBag], rng: np.random.Generator | None) -> Inputs:
        """Network inputs for a batch of bags, on the device.

        With ``rng``: the training view (random crops, tile samples, flips...); without: the whole bags.
        """

    def logits(self, inputs: Inputs) -> torch.Tensor:
        """``(B, k)`` logits of collated inputs."""
        out: torch.Tensor = self.module(*inputs)
        return out

    def bag_logits(self, bag: SlideBag, *, predict: bool = False) -> torch.Tensor:
        """``(k,)`` logits of one whole bag; ``predict`` selects the prediction-time view (e.g. TTA)."""
        return self.logits(self.collate([bag], None))[0]

    # ------------------------------------------------------------------ fit / predict
    def _set_input_stats(self, train: Bags) -> None:
        mean, std = feature_stats(train)
        stats = {"input_mean": mean, "input_std": std}
        for name, buffer in self.module.named_buffers():
            if name in stats:
                buffer.copy_(torch.as_tensor(stats[name], dtype=torch.float32))

    def _loss_weights(self, y: IntArray) -> torch.Tensor | None:
        w = class_weights(y, self.num_classes, self.config.class_weight)
        return None if w is None else torch.as_tensor(w, dtype=torch.float32, device=self.device)

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
        labels: IntArray = np.asarray(y, dtype=np.int64)
        weight = self._loss_weights(labels)

        def batches(rng: np.random.Generator) -> Iterator[tuple[Inputs, torch.Tensor]]:
            for idx in batches_of(len(train), self.config.batch_size, rng):
                if len(idx) < self.min_batch <= len(train):
                    continue
                inputs = self.collate([train[int(i)] for i in idx], rng)
                yield inputs, torch.as_tensor(labels[idx], device=self.device)

        def batch_loss(module: nn.Module, batch: tuple[Inputs, torch.Tensor]) -> torch.Tensor:
            inputs, target = batch
            return F.cross_entropy(self.logits(inputs), target, weight=weight)

        val_bags = list(val) if val is not None and y_val is not None else []
        val_target = torch.as_tensor(np.asarray(y_val if val_bags else [], dtype=np.int64), device=self.device)

        def val_loss(module: nn.Module) -> float:
            logits = torch.stack([self.bag_logits(bag) for bag in val_bags])
            return float(F.cross_entropy(logits, val_target, weight=weight))

        epochs = int((refit or {}).get("epochs", self.config.epochs))
        history = fit_module(
            self.module,
            batches,
            batch_loss,
            val_loss if (val_bags and refit is None) else None,
            epochs=epochs,
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
            patience=self.config.patience,
            seed=seed,
            optimizer=getattr(self.config, "optimizer", "adamw"),
            lr_plateau=getattr(self.config, "lr_plateau", 0.0),
            plateau_patience=getattr(self.config, "plateau_patience", 5),
            min_lr=getattr(self.config, "min_lr", 0.0),
        )
        return FitInfo(best_epoch=history.best_epoch, epochs_run=history.epochs_run, stopped_early=history.stopped_early)

    def predict_proba(self, bags: Bags) -> FloatArray:
        self.module.eval()
        with torch.no_grad():
            rows = [torch.softmax(self.bag_logits(bag, predict=True), dim=0).cpu().numpy() for bag in bags]
        return np.asarray(rows, dtype=float).reshape(len(rows), self.num_classes)

    # ------------------------------------------------------------------ weights
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
