"""The 8 dihedral views of a tile (4 quarter turns × with and without a mirror), for rotation-true compression.

An encoder is not rotation-equivariant, so the NIC authors compress a slide in each of its 8 orientations by
encoding every tile in that orientation and permuting the grid positions the same way (Tellez et al., TPAMI
2019). :class:`DihedralEncoder` embeds each tile in all 8 views; the grid permutation is
:func:`wsi_encoder.io.embedding_store.dihedral_cells`. The order, shared by both: ``v = 0..3`` is
``np.rot90(tile, v)`` and ``v = 4..7`` is ``np.rot90(np.fliplr(tile), v - 4)`` (on the tile's (height, width) axes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wsi_encoder.io.slide_records import DIHEDRAL_VIEWS


def dihedral_view(x: torch.Tensor, v: int) -> torch.Tensor:
    """View ``v`` of a ``(B, C, H, W)`` batch: ``np.rot90(tile, v)`` or ``np.rot90(np.fliplr(tile), v - 4)``."""
    if v >= 4:
        x = torch.flip(x, dims=(3,))
    return torch.rot90(x, v % 4, dims=(2, 3)).contiguous()


class DihedralEncoder(nn.Module):
    """``(B, 3, S, S)`` → ``(B, 8 · C)``: the wrapped model's embedding of each of the 8 views, view-major per tile.

    Reshape the output to ``(B, 8, C)``; view 0 is the model's plain embedding.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(dihedral_view(x, v)) for v in range(DIHEDRAL_VIEWS)], dim=1)
