"""DCGAN generator and discriminator for 64×64 RGB images (Radford, Metz & Chintala, ICLR 2016).

The architecture guidelines of the paper: no pooling (strided convolutions in the discriminator,
fractionally strided convolutions in the generator), BatchNorm in both networks except the
generator's output and the discriminator's input layer, ReLU in the generator with a tanh output,
LeakyReLU(0.2) in the discriminator, no fully connected hidden layers, weights drawn from
N(0, 0.02). Images are in [-1, 1]; ``z`` is ``(B, nz)`` standard normal (nz = 100).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 64
Z_DIM = 100


def dcgan_init(module: nn.Module) -> None:
    """Radford et al. initialisation: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """``z (B, nz) → image (B, 3, 64, 64)`` in [-1, 1].

    ``nz → 4×4×8w → 8×8×4w → 16×16×2w → 32×32×w → 64×64×3`` with ``w = width`` (64 in the paper).
    """

    def __init__(self, nz: int = Z_DIM, width: int = 64) -> None:
        super().__init__()
        self.nz = nz
        self.width = width
        w = width
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, w * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(w * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(w * 8, w * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(w * 4, w * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(w * 2, w, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(True),
            nn.ConvTranspose2d(w, 3, 4, 2, 1, bias=False),
            nn.Tanh(),
        )
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """``image (B, 3, 64, 64) → logit (B,)`` (real vs generated; use ``BCEWithLogitsLoss``).

    ``64×64×3 → 32×32×w → 16×16×2w → 8×8×4w → 4×4×8w → 1`` with ``w = width``; no BatchNorm on the
    input layer.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, w * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w * 2, w * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w * 4, w * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w * 8, 1, 4, 1, 0, bias=False),
        )
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)
