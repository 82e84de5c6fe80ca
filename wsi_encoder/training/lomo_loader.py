"""Feeding the LOMO trainer: batches of cached images read by DataLoader workers, pinned for the GPU.

The image cache is a ``.npy`` memmap (:func:`~wsi_encoder.training.lomo_data.build_image_cache`). Each
worker reopens it by path (nothing large is pickled), reads a batch's rows in file order, and returns it
as one uint8 ``(B, H, W, 3)`` tensor, pinned when the model is on CUDA so that the copy is
``non_blocking``. The batches themselves are fixed before the epoch by the trainer's seeded permutation,
and augmentation stays in the main process with its own generators, so any number of workers gives the
same batches in the same order: ``workers`` changes speed, never results (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset


class CachedBatches(Dataset[torch.Tensor]):
    """Item ``b`` is the uint8 tensor of ``images[batches[b]]`` (rows read in file order, returned in batch order)."""

    def __init__(self, images: npt.NDArray[np.uint8], batches: Sequence[npt.NDArray[np.int64]]) -> None:
        filename = getattr(images, "filename", None)
        self._path = None if filename is None else Path(filename)
        self._images: npt.NDArray[np.uint8] | None = None if self._path is not None else images
        self._batches = [np.asarray(b, dtype=np.int64) for b in batches]

    def __len__(self) -> int:
        return len(self._batches)

    def _array(self) -> npt.NDArray[np.uint8]:
        if self._images is None:
            assert self._path is not None
            self._images = np.load(self._path, mmap_mode="r")  # reopened in each worker process
        return self._images

    def __getitem__(self, b: int) -> torch.Tensor:
        rows = self._batches[b]
        order = np.argsort(rows)
        block = np.array(self._array()[rows[order]])  # one pass through the file, a writable copy
        out = np.empty_like(block)
        out[order] = block
        return torch.from_numpy(out)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._path is not None:
            state["_images"] = None  # workers reopen the memmap; never pickle the pixels
        return state


def batch_stream(
    images: npt.NDArray[np.uint8],
    batches: Sequence[npt.NDArray[np.int64]],
    *,
    workers: int = 0,
    device: torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """The uint8 image tensors of ``batches`` in order, read ahead by ``workers`` processes (0: in this one)."""
    pin = device is not None and device.type == "cuda"
    loader = DataLoader(
        CachedBatches(images, batches),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=2 if workers else None,
    )
    yield from loader


def to_model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 ``(B, H, W, 3)`` batch → float ``(B, 3, H, W)`` in [0, 1] on ``device`` (non-blocking when pinned)."""
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
