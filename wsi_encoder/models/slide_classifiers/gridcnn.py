"""``gridcnn``: a CNN over the ``C × R × Q`` embedding grid (neural image compression, Tellez et al., TPAMI 2019).

A stack of depthwise-separable convolutions with BatchNorm, LeakyReLU and spatial (channel) dropout,
global tissue-masked mean+max pooling and a small dense head. Trained on random crops of the grid with
flips and 90° rotations; predicts on the whole grid, averaging the 8 dihedral views (``tta``).
Heatmap: Grad-CAM on the first (full-resolution) block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.embedding_store import SlideBag
from wsi_encoder.models.slide_classifiers.base import (
    FloatArray,
    check_class_weight,
    register_slide_classifier,
)
from wsi_encoder.models.slide_classifiers.torch_base import Inputs, TorchSlideClassifier
from wsi_encoder.models.slide_networks import GridCNN

GridArray = npt.NDArray[np.float32]


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
        check_class_weight(self.class_weight)


def _dihedral(a: GridArray, k: int, flip: bool) -> GridArray:
    """Rotate the last two axes by ``k`` × 90° and optionally flip them left-right."""
    out = np.rot90(a, k, axes=(-2, -1))
    return np.flip(out, axis=-1) if flip else out


@register_slide_classifier
class GridCNNClassifier(TorchSlideClassifier[GridCNNConfig]):
    """``gridcnn``: neural-image-compression style CNN over the embedding grid."""

    name = "gridcnn"
    Config = GridCNNConfig
    heatmap_kind = "Grad-CAM (first block)"
    min_batch = 2
    module: GridCNN

    def build_module(self) -> GridCNN:
        c = self.config
        return GridCNN(self.in_dim, self.num_classes, c.width, c.depth, c.strided, c.dropout)

    def _crop(self, bag: SlideBag, rng: np.random.Generator) -> tuple[GridArray, GridArray]:
        """A random ``crop``-sided window around a random tile, randomly rotated/flipped: grid and mask."""
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

    def _whole(self, bag: SlideBag) -> tuple[GridArray, GridArray]:
        grid = bag.grid(np.float32).astype(np.float32, copy=False)
        return grid, bag.mask.astype(np.float32)[None]

    def collate(self, bags: Sequence[SlideBag], rng: np.random.Generator | None) -> Inputs:
        """``(B, C, H, W)`` grids and ``(B, 1, H, W)`` masks, zero-padded to the largest in the batch."""
        items = [self._crop(bag, rng) if rng is not None else self._whole(bag) for bag in bags]
        side_h = max(g.shape[1] for g, _ in items)
        side_w = max(g.shape[2] for g, _ in items)
        grids = np.zeros((len(items), self.in_dim, side_h, side_w), dtype=np.float32)
        masks = np.zeros((len(items), 1, side_h, side_w), dtype=np.float32)
        for i, (g, m) in enumerate(items):
            grids[i, :, : g.shape[1], : g.shape[2]] = g
            masks[i, :, : m.shape[1], : m.shape[2]] = m
        return torch.from_numpy(grids).to(self.device), torch.from_numpy(masks).to(self.device)

    def bag_logits(self, bag: SlideBag, *, predict: bool = False) -> torch.Tensor:
        """Logits of the whole grid; to predict with ``tta``, the log of the 8 dihedral views' mean probabilities."""
        grid, mask = self.collate([bag], None)
        if not (predict and self.config.tta):
            return self.logits((grid, mask))[0]
        probs = []
        for k in range(4):
            for flip in (False, True):
                g = torch.rot90(grid, k, dims=(2, 3))
                m = torch.rot90(mask, k, dims=(2, 3))
                if flip:
                    g, m = torch.flip(g, dims=(3,)), torch.flip(m, dims=(3,))
                probs.append(torch.softmax(self.logits((g, m))[0], dim=0))
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """Grad-CAM on block 0: ReLU of the gradient-weighted feature maps of the class score.

        The score is the positive-class log-odds (binary) or the predicted class's logit minus the mean
        logit (multi-class). Scaled to [0, 1]; NaN outside tissue.
        """
        self.module.eval()
        grid, mask = self.collate([bag], None)
        with torch.enable_grad():
            logits, first = self.module.forward_with_first(grid, mask)
            logits = logits[0]
            target = 1 if self.num_classes == 2 else int(logits.argmax())
            score = logits[target] - (logits[0] if self.num_classes == 2 else logits.mean())
            (grad,) = torch.autograd.grad(score, first)
        m = mask[0, 0]
        alpha = (grad[0] * m).sum(dim=(1, 2)) / m.sum().clamp(min=1.0)
        cam: FloatArray = torch.relu((alpha[:, None, None] * first[0]).sum(0)).detach().cpu().numpy().astype(float)
        peak = cam[bag.mask].max() if bag.n_tiles else 0.0
        cam = cam / peak if peak > 0 else cam
        cam[~bag.mask] = np.nan
        return cam
