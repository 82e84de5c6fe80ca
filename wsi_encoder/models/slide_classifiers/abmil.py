"""``abmil``: gated attention multiple-instance learning over the tile features (Ilse, Tomczak & Welling, ICML 2018).

The attention weights are the heatmap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.slide_classifiers.base import (
    FloatArray,
    check_class_weight,
    register_slide_classifier,
)
from wsi_encoder.models.slide_classifiers.torch_base import Inputs, TorchSlideClassifier
from wsi_encoder.models.slide_networks import GatedAttentionMIL


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
        check_class_weight(self.class_weight)


@register_slide_classifier
class ABMILClassifier(TorchSlideClassifier[ABMILConfig]):
    """``abmil``: gated attention multiple-instance learning over tile embeddings."""

    name = "abmil"
    Config = ABMILConfig
    heatmap_kind = "attention"
    module: GatedAttentionMIL

    def build_module(self) -> GatedAttentionMIL:
        c = self.config
        return GatedAttentionMIL(self.in_dim, self.num_classes, c.hidden, c.attention_dim, c.dropout)

    def _sample(self, bag: SlideBag, rng: np.random.Generator) -> npt.NDArray[np.floating]:
        """At most ``max_instances`` random tiles of the bag (in their stored order)."""
        cap = self.config.max_instances
        if cap and bag.n_tiles > cap:
            return bag.features[np.sort(rng.choice(bag.n_tiles, cap, replace=False))]
        return bag.features

    def collate(self, bags: Sequence[SlideBag], rng: np.random.Generator | None) -> Inputs:
        """``(B, N, C)`` tile features zero-padded to the largest bag and the ``(B, N)`` mask of real tiles."""
        feats = [self._sample(bag, rng) if rng is not None else bag.features for bag in bags]
        n = max(f.shape[0] for f in feats)
        x = np.zeros((len(feats), n, self.in_dim), dtype=np.float32)
        mask = np.zeros((len(feats), n), dtype=bool)
        for i, f in enumerate(feats):
            x[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = True
        return torch.from_numpy(x).to(self.device), torch.from_numpy(mask).to(self.device)

    def logits(self, inputs: Inputs) -> torch.Tensor:
        x, mask = inputs
        return self.module(x, mask)[0]

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """Attention weight of each tile, scaled to [0, 1] by the slide's maximum; NaN outside tissue."""
        self.module.eval()
        with torch.no_grad():
            x, mask = self.collate([bag], None)
            attention = self.module(x, mask)[1][0].cpu().numpy().astype(float)
        peak = attention.max()
        return bag.to_grid(attention / peak if peak > 0 else attention)
