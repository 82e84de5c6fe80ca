"""``gridcnn``: a CNN over the ``C × R × Q`` embedding grid (neural image compression, Tellez et al., TPAMI 2019).

Two architectures behind one model:

* ``arch="light"`` (the default, for small cohorts and CPUs): depthwise-separable convolutions with BatchNorm,
  LeakyReLU and spatial dropout, global tissue-masked mean+max pooling and a small dense head.
* ``arch="tellez2019"`` (:data:`PRESETS` ``tellez2019``, ``classify train --preset tellez2019``): the paper's
  network (:class:`~wsi_encoder.models.slide_networks.TellezGridCNN`) and protocol: crops of R = 400 cells
  whose centres are drawn by distance to background, Adam at batch 16 with an L2 penalty of 1e-5 and a learning
  rate of 1e-2 reduced ×0.1 on plateau down to 1e-5, and T = 10 test crops × 8 views averaged.

Orientation. When the embedding store holds the 8 dihedral views of every tile (``wsienc encode --dihedral``),
training draws a random *true* view per crop and prediction averages the 8 true views, as the authors do.
Without them the grid of embeddings of unrotated tiles is rotated/flipped instead, an approximation (an encoder
is not rotation-equivariant), said once per run in a warning. Heatmap: Grad-CAM on the first layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.slide_records import DIHEDRAL_VIEWS, SlideBag, dihedral_cells
from wsi_encoder.models.slide_classifiers.base import (
    FloatArray,
    check_class_weight,
    register_slide_classifier,
)
from wsi_encoder.models.slide_classifiers.torch_base import Inputs, TorchSlideClassifier
from wsi_encoder.models.slide_networks import GridCNN, TellezGridCNN

GridArray = npt.NDArray[np.float32]
logger = logging.getLogger(__name__)
_APPROXIMATION_SAID: set[str] = set()


@dataclass(frozen=True)
class GridCNNConfig:
    """``gridcnn`` settings.

    ``arch`` is ``light`` or ``tellez2019``. For ``light``: ``width`` channels per block, ``depth`` blocks of
    which blocks ``1..strided`` may have stride 2 (block 0 keeps the grid resolution for Grad-CAM; maps are not
    reduced below 4 cells); ``tellez2019`` is the paper's fixed 8-layer network of ``width`` filters.
    ``dropout`` is the spatial (feature-map) dropout rate, ``crop`` the training (and test) crop side in grid
    cells, ``crop_sampling`` how crop centres are drawn (``tile``: a random tissue cell; ``distance``: the
    authors' distance-to-background map, squared and normalised), ``test_crops`` the number T of crops scored
    per view at prediction time (0: the whole grid), ``tta`` averages the 8 views at prediction time.
    ``optimizer`` ``adamw`` (decoupled ``weight_decay``) or ``adam`` (``weight_decay`` as an L2 penalty on the
    kernels); ``lr_plateau`` > 0 multiplies the learning rate by it after ``plateau_patience`` epochs without
    a lower validation loss, down to ``min_lr``.
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
    arch: str = "light"
    crop_sampling: str = "tile"
    test_crops: int = 0
    optimizer: str = "adamw"
    lr_plateau: float = 0.0
    plateau_patience: int = 5
    min_lr: float = 0.0

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on impossible values."""
        if self.arch not in ("light", "tellez2019"):
            raise InvalidParameterError(f"gridcnn arch must be 'light' or 'tellez2019', got {self.arch!r}")
        if self.width < 1 or self.depth < 1 or self.strided < 0 or self.crop < 1 or self.test_crops < 0:
            raise InvalidParameterError(f"gridcnn needs width, depth, crop >= 1 and strided, test_crops >= 0: {self}")
        if not 0 <= self.dropout < 1 or self.batch_size < 1 or self.epochs < 1 or self.lr <= 0:
            raise InvalidParameterError(f"gridcnn needs 0 <= dropout < 1, batch_size, epochs >= 1, lr > 0: {self}")
        if self.crop_sampling not in ("tile", "distance"):
            raise InvalidParameterError(f"gridcnn crop_sampling must be 'tile' or 'distance', got {self.crop_sampling!r}")
        if self.optimizer not in ("adamw", "adam") or not 0 <= self.lr_plateau < 1 or self.min_lr < 0:
            raise InvalidParameterError(f"gridcnn needs optimizer adamw|adam, 0 <= lr_plateau < 1, min_lr >= 0: {self}")
        check_class_weight(self.class_weight)


#: Named settings of ``gridcnn`` (``classify train --preset NAME``; ``--param`` still overrides each).
#: ``tellez2019``: every setting of Tellez et al., TPAMI 2019 (appendix; ../shared/research/papers.md §2a). L2 1e-5
#: on the kernels (Keras ``l2(1e-5)`` adds 1e-5·Σw² to the loss) is Adam's coupled weight decay 2e-5 on them.
PRESETS: dict[str, dict[str, Any]] = {
    "light": {},
    "tellez2019": {
        "arch": "tellez2019", "width": 128, "depth": 8, "strided": 6, "dropout": 0.2, "crop": 400,
        "crop_sampling": "distance", "test_crops": 10, "tta": True, "batch_size": 16, "lr": 1e-2,
        "weight_decay": 2e-5, "optimizer": "adam", "lr_plateau": 0.1, "plateau_patience": 5, "min_lr": 1e-5,
        "epochs": 200, "patience": 25,
    },
}  # fmt: skip


def distance_map(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """The authors' crop-centre distribution: Euclidean distance to background, / max, squared, / sum.

    Cells outside the grid count as background. A grid with tissue but no positive distance (impossible) or no
    tissue gives a uniform map over tissue (or over the grid).
    """
    d = distance_transform_edt(np.pad(mask.astype(bool), 1))[1:-1, 1:-1]
    peak = float(d.max()) if d.size else 0.0
    if peak <= 0:
        base = mask.astype(float) if mask.any() else np.ones(mask.shape)
        return base / base.sum()
    p = (d / peak) ** 2
    return p / p.sum()


def _dihedral(a: GridArray, k: int, flip: bool) -> GridArray:
    """Rotate the last two axes by ``k`` × 90° and optionally flip them left-right."""
    out = np.rot90(a, k, axes=(-2, -1))
    return np.flip(out, axis=-1) if flip else out


def _window(bag: SlideBag, center: npt.NDArray[np.integer[Any]], side: int, in_dim: int) -> tuple[GridArray, GridArray]:
    """The ``side``-sided window (clipped to the grid) around grid cell ``center``: grid and mask."""
    rows, cols = bag.grid_shape
    h, w = min(side, rows), min(side, cols)
    r0 = int(np.clip(center[0] - h // 2, 0, rows - h))
    c0 = int(np.clip(center[1] - w // 2, 0, cols - w))
    rc = bag.rowcol
    sel = (rc[:, 0] >= r0) & (rc[:, 0] < r0 + h) & (rc[:, 1] >= c0) & (rc[:, 1] < c0 + w)
    grid = np.zeros((in_dim, h, w), dtype=np.float32)
    mask = np.zeros((1, h, w), dtype=np.float32)
    grid[:, rc[sel, 0] - r0, rc[sel, 1] - c0] = bag.features[sel].T
    mask[0, rc[sel, 0] - r0, rc[sel, 1] - c0] = 1.0
    return grid, mask


def _grid_view(bag: SlideBag, v: int) -> SlideBag:
    """View ``v`` of the slide: its true view when the store has them, else its grid of unrotated tiles moved."""
    if bag.dihedral is not None:
        return bag.view(v)
    rowcol, shape = dihedral_cells(bag.rowcol, bag.grid_shape, v)
    return SlideBag(bag.slide_id, bag.features, rowcol, shape)


@register_slide_classifier
class GridCNNClassifier(TorchSlideClassifier[GridCNNConfig]):
    """``gridcnn``: neural-image-compression style CNN over the embedding grid."""

    name = "gridcnn"
    Config = GridCNNConfig
    heatmap_kind = "Grad-CAM (first block)"
    min_batch = 2
    uses_dihedral = True
    presets = PRESETS
    module: GridCNN | TellezGridCNN

    def build_module(self) -> nn.Module:
        c = self.config
        if c.arch == "tellez2019":
            return TellezGridCNN(self.in_dim, self.num_classes, c.width, c.dropout)
        return GridCNN(self.in_dim, self.num_classes, c.width, c.depth, c.strided, c.dropout)

    def _center(self, bag: SlideBag, rng: np.random.Generator) -> npt.NDArray[np.integer[Any]]:
        """A crop centre: a random tissue cell, or a cell drawn from the distance-to-background map."""
        if self.config.crop_sampling == "distance":
            p = distance_map(bag.mask).ravel()
            cell = int(rng.choice(p.size, p=p))
            return np.array(divmod(cell, bag.grid_shape[1]))
        return bag.rowcol[rng.integers(bag.n_tiles)]

    def _say_approximation(self, bag: SlideBag) -> None:
        if bag.dihedral is None and "gridcnn" not in _APPROXIMATION_SAID:
            _APPROXIMATION_SAID.add("gridcnn")
            logger.warning(
                "gridcnn: the embedding store has no dihedral views (encode --dihedral), so rotations and flips "
                "move the embeddings of unrotated tiles: an approximation of rotating the slide"
            )

    def _crop(self, bag: SlideBag, rng: np.random.Generator) -> tuple[GridArray, GridArray]:
        """A training crop: a random true view (when the store has the views) or a random grid rotation/flip."""
        self._say_approximation(bag)
        if bag.dihedral is not None:
            view = bag.view(int(rng.integers(DIHEDRAL_VIEWS)))
            return _window(view, self._center(view, rng), self.config.crop, self.in_dim)
        grid, mask = _window(bag, self._center(bag, rng), self.config.crop, self.in_dim)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        return _dihedral(grid, k, flip), _dihedral(mask, k, flip)

    def _whole(self, bag: SlideBag) -> tuple[GridArray, GridArray]:
        grid = bag.grid(np.float32).astype(np.float32, copy=False)
        return grid, bag.mask.astype(np.float32)[None]

    def collate(self, bags: Sequence[SlideBag], rng: np.random.Generator | None) -> Inputs:
        """``(B, C, H, W)`` grids and ``(B, 1, H, W)`` masks, zero-padded to the largest in the batch."""
        items = [self._crop(bag, rng) if rng is not None else self._whole(bag) for bag in bags]
        return self._stack(items)

    def _stack(self, items: Sequence[tuple[GridArray, GridArray]]) -> Inputs:
        side_h = max(g.shape[1] for g, _ in items)
        side_w = max(g.shape[2] for g, _ in items)
        grids = np.zeros((len(items), self.in_dim, side_h, side_w), dtype=np.float32)
        masks = np.zeros((len(items), 1, side_h, side_w), dtype=np.float32)
        for i, (g, m) in enumerate(items):
            grids[i, :, : g.shape[1], : g.shape[2]] = g
            masks[i, :, : m.shape[1], : m.shape[2]] = m
        return torch.from_numpy(grids).to(self.device), torch.from_numpy(masks).to(self.device)

    def _test_items(self, bag: SlideBag) -> list[tuple[GridArray, GridArray]]:
        """The inputs scored for one view: the whole grid, or ``test_crops`` crops centred where there is tissue."""
        rows, cols = bag.grid_shape
        if self.config.test_crops == 0 or (rows <= self.config.crop and cols <= self.config.crop):
            return [self._whole(bag)]
        seed = int.from_bytes(bag.slide_id.encode()[:8].ljust(8, b"\0"), "little") % (2**32)
        rng = np.random.default_rng(seed)  # the same crops whenever this slide is scored
        return [_window(bag, self._center(bag, rng), self.config.crop, self.in_dim) for _ in range(self.config.test_crops)]

    def bag_logits(self, bag: SlideBag, *, predict: bool = False) -> torch.Tensor:
        """Logits of the whole grid; to predict with ``tta`` (and test crops), the log of the mean probability
        over the 8 views (true views when the store has them) and the ``test_crops`` crops of each."""
        if not predict:
            return self.logits(self.collate([bag], None))[0]
        self._say_approximation(bag)
        if bag.dihedral is None and self.config.test_crops == 0:  # rotate the collated grid itself (cheaper)
            return self._rotated_logits(bag)
        views = range(DIHEDRAL_VIEWS) if self.config.tta else range(1)
        probs = [
            torch.softmax(self.logits(self._stack([item])), dim=1)[0]
            for v in views
            for item in self._test_items(_grid_view(bag, v))
        ]
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))

    def _rotated_logits(self, bag: SlideBag) -> torch.Tensor:
        grid, mask = self.collate([bag], None)
        if not self.config.tta:
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

    def heatmap(self, bag: SlideBag, score_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FloatArray:
        """Grad-CAM on the first layer (upsampled to the grid when strided): ReLU of the gradient-weighted feature maps of the class score.

        The score is the positive-class log-odds (binary) or the predicted class's logit minus the mean
        logit (multi-class), or ``score_of(logits)`` when given (the risk or the prediction of the survival and
        regression targets: the map then shows where the features push that score up). Scaled to [0, 1];
        NaN outside tissue.
        """
        self.module.eval()
        grid, mask = self.collate([bag], None)
        with torch.enable_grad():
            logits, first = self.module.forward_with_first(grid, mask)
            logits = logits[0]
            if score_of is not None:
                score = score_of(logits)
            else:
                target = 1 if self.num_classes == 2 else int(logits.argmax())
                score = logits[target] - (logits[0] if self.num_classes == 2 else logits.mean())
            (grad,) = torch.autograd.grad(score, first)
        m = mask[0, 0]
        if first.shape[-2:] != m.shape:  # the paper's first layer is strided: its map is brought back to the grid
            up = tuple(-(-a // b) for a, b in zip(m.shape, first.shape[-2:], strict=True))
            first = F.interpolate(first, scale_factor=up, mode="nearest")[..., : m.shape[0], : m.shape[1]]
            grad = F.interpolate(grad, scale_factor=up, mode="nearest")[..., : m.shape[0], : m.shape[1]]
        alpha = (grad[0] * m).sum(dim=(1, 2)) / m.sum().clamp(min=1.0)
        cam: FloatArray = torch.relu((alpha[:, None, None] * first[0]).sum(0)).detach().cpu().numpy().astype(float)
        peak = cam[bag.mask].max() if bag.n_tiles else 0.0
        cam = cam / peak if peak > 0 else cam
        cam[~bag.mask] = np.nan
        return cam
