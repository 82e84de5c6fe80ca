"""A shared encoder with one classification head per task (hard parameter sharing).

Each sample's loss counts only for its own task: a head sees only the embeddings of its task's
samples, so it never receives gradient from another task's samples. The encoder (and its embedding
layer) receives the sum of the per-task losses, each scaled by its task's loss weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.models.encoders import Encoder


class MultiTaskModel(nn.Module):
    """``encoder`` + ``heads[task]`` (linear, ``num_features → n_classes``).

    Parameters
    ----------
    encoder : Encoder
        Shared trunk and embedding; its ``forward_features`` takes [0, 1] input.
    num_classes : mapping
        Task name → number of classes, in task-index order.
    seed : int
        Seed of the heads' initialisation (the global RNG is left untouched).
    """

    def __init__(self, encoder: Encoder, num_classes: Mapping[str, int], seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.task_names = list(num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.heads = nn.ModuleDict({t: nn.Linear(encoder.num_features, int(k)) for t, k in num_classes.items()})

    def forward(
        self,
        x: torch.Tensor,
        tasks: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_weights: Mapping[str, float] | None = None,
    ) -> dict[str, object]:
        """Embed ``x`` and apply each sample's own task head.

        Parameters
        ----------
        x : torch.Tensor
            Float ``(B, 3, H, W)`` in [0, 1].
        tasks : torch.Tensor
            ``(B,)`` task indices (into ``task_names``).
        labels : torch.Tensor, optional
            ``(B,)`` class indices; when given, losses are computed.
        loss_weights : mapping, optional
            Task name → loss weight (default 1).

        Returns
        -------
        dict
            ``features`` (B, D); ``logits`` {task: (n_t, k_t)} and ``index`` {task: positions in the
            batch}; with labels also ``losses`` {task: mean cross-entropy} and ``loss`` (weighted sum).
        """
        features = self.encoder.forward_features(x)
        logits: dict[str, torch.Tensor] = {}
        index: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        for t, name in enumerate(self.task_names):
            pos = torch.nonzero(tasks == t, as_tuple=True)[0]
            if pos.numel() == 0:
                continue
            index[name] = pos
            logits[name] = self.heads[name](features[pos])
            if labels is not None:
                losses[name] = F.cross_entropy(logits[name].float(), labels[pos])
        out: dict[str, object] = {"features": features, "logits": logits, "index": index}
        if labels is not None:
            weights = loss_weights or {}
            total = sum((weights.get(n, 1.0) * v for n, v in losses.items()), features.new_zeros((), dtype=torch.float32))
            out["losses"] = losses
            out["loss"] = total
        return out
