"""The networks of the torch slide classifiers: a grid CNN and gated attention MIL (pure ``nn.Module`` s).

:mod:`wsi_encoder.models.slide_classifiers` (``gridcnn``, ``abmil``) wraps them into the slide-classifier interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeparableConvBlock(nn.Module):
    """Depthwise 3×3 (stride 1 or 2) → pointwise 1×1 → BatchNorm → LeakyReLU → spatial dropout.

    The stride is chosen per call (the weights do not depend on it).
    """

    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(0.2)
        self.drop = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        x = F.conv2d(x, self.depthwise.weight, stride=stride, padding=1, groups=self.depthwise.groups)
        return self.drop(self.act(self.norm(self.pointwise(x))))


class GridCNN(nn.Module):
    """CNN over a ``(B, C, H, W)`` embedding grid with a ``(B, 1, H, W)`` tissue mask → ``(B, k)`` logits.

    Block 0 keeps the resolution; blocks ``1..strided`` halve it while the feature map is at least
    ``2 * min_map`` cells on its shorter side (so small grids are not pooled away to one cell).
    Global pooling is tissue-masked mean and max.
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(
        self, in_channels: int, num_classes: int, width: int, depth: int, strided: int, dropout: float, min_map: int = 4
    ) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))
        self.strided = strided
        self.min_map = min_map
        blocks = [SeparableConvBlock(in_channels, width, dropout)]
        blocks += [SeparableConvBlock(width, width, dropout) for _ in range(1, depth)]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.LeakyReLU(0.2), nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, k)`` logits."""
        return self.forward_with_first(grid, mask)[0]

    def forward_with_first(self, grid: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the masked ``(B, width, H, W)`` output of block 0 (full resolution, for Grad-CAM)."""
        x = (grid - self.input_mean[:, None, None]) / self.input_std[:, None, None] * mask
        first = x
        m = mask
        for i, block in enumerate(self.blocks):
            stride = 2 if 1 <= i <= self.strided and min(x.shape[-2:]) >= 2 * self.min_map else 1
            x = block(x, stride)
            if stride > 1:
                m = F.max_pool2d(m, 3, stride=stride, padding=1)
            x = x * m
            if i == 0:
                first = x
        count = m.sum(dim=(2, 3)).clamp(min=1.0)
        mean = x.sum(dim=(2, 3)) / count
        peak = x.masked_fill(m < 0.5, -1e4).amax(dim=(2, 3))
        logits = self.head(torch.cat([mean, peak], dim=1))
        return logits, first


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018): ``(B, N, C)`` bags with ``(B, N)`` masks → logits, attention."""

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, in_dim: int, num_classes: int, hidden: int, attention_dim: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention_dim)
        self.attention_u = nn.Linear(hidden, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed((x - self.input_mean) / self.input_std)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        attention = torch.softmax(scores.masked_fill(~mask, -torch.inf), dim=1)
        pooled = torch.einsum("bn,bnh->bh", attention, h)
        return self.classifier(pooled), attention


class TellezGridCNN(nn.Module):
    """The grid CNN of Tellez et al. (TPAMI 2019, appendix): ``(B, C, H, W)`` grid + ``(B, 1, H, W)`` mask → logits.

    8 depthwise-separable 3×3 convolutions of ``width`` (128) filters, each with BatchNorm, LeakyReLU(0.2) and
    feature-wise (spatial) dropout; stride 2 except the last two ("same" padding: a 400-cell crop goes
    400 → 200 → 100 → 50 → 25 → 13 → 7 → 7 → 7); then dense ``width`` with BatchNorm and LeakyReLU, and the
    output layer. The paper does not say what joins the last convolution to the dense layer; a tissue-masked
    global average pool is used here, so the same weights score a crop of any size and the whole grid (Grad-CAM).
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor
    #: Stride of each of the 8 layers.
    strides = (2, 2, 2, 2, 2, 2, 1, 1)

    def __init__(self, in_channels: int, num_classes: int, width: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))
        chans = [in_channels] + [width] * len(self.strides)
        self.blocks = nn.ModuleList(SeparableConvBlock(chans[i], chans[i + 1], dropout) for i in range(len(self.strides)))
        self.dense = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2))
        self.out = nn.Linear(width, num_classes)

    def forward(self, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, k)`` logits."""
        return self.forward_with_first(grid, mask)[0]

    def forward_with_first(self, grid: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the masked output of the first layer (half the grid's resolution; the paper's Grad-CAM layer)."""
        x = (grid - self.input_mean[:, None, None]) / self.input_std[:, None, None] * mask
        m = mask
        first = x
        for i, (block, stride) in enumerate(zip(self.blocks, self.strides, strict=True)):
            x = block(x, stride)
            if stride > 1:
                m = F.max_pool2d(m, 3, stride=stride, padding=1)
            x = x * m
            if i == 0:
                first = x
        pooled = x.sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1.0)
        return self.out(self.dense(pooled)), first
