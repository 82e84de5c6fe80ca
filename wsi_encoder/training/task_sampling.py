"""Task-balanced batch plans and the torch datasets that turn them into tensors.

Every batch gives each task an equal share of its slots (``batch_size // n_tasks``, the remainder
rotating over the tasks step by step), so a 100,000-image dataset does not drown a 60-image one.
Within a task, images are drawn without replacement from a permutation that is reshuffled each time
the task's images are used up. Everything is a pure function of ``(seed, step)``: training resumes at
any step exactly, and the number of DataLoader workers does not change the result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, Sampler

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.tasks.data import TaskData
from wsi_encoder.training.augment import NO_AUGMENT, AugmentConfig, colour_augment, sample_view

log = logging.getLogger(__name__)

#: One sample of a batch plan: (task index, item index within the task's training set, augmentation seed).
PlanItem = tuple[int, int, int]


@dataclass(frozen=True)
class TaskBalancedPlan:
    """The deterministic sequence of batches of a multitask training run.

    Parameters
    ----------
    sizes : sequence of int
        Number of training items of each task.
    batch_size : int
        Samples per batch (at least the number of tasks).
    seed : int
    """

    sizes: tuple[int, ...]
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise InvalidParameterError(f"every task needs training images, got sizes {self.sizes}")
        if self.batch_size < len(self.sizes):
            raise InvalidParameterError(
                f"batch size {self.batch_size} is smaller than the number of tasks ({len(self.sizes)}): "
                "every batch must hold every task"
            )

    def _draws_before(self, step: int) -> npt.NDArray[np.int64]:
        """How many items each task drew in steps ``0 .. step-1``."""
        t = len(self.sizes)
        base, rem = divmod(self.batch_size, t)
        consumed = step * rem
        extra = np.array([(consumed - k + t - 1) // t if consumed > k else 0 for k in range(t)], dtype=np.int64)
        return step * base + extra

    def slots(self, step: int) -> npt.NDArray[np.int64]:
        """Task index of each slot of batch ``step`` (grouped by task)."""
        t = len(self.sizes)
        base, rem = divmod(self.batch_size, t)
        counts = np.full(t, base, dtype=np.int64)
        for m in range(step * rem, (step + 1) * rem):
            counts[m % t] += 1
        return np.repeat(np.arange(t, dtype=np.int64), counts)

    def batch(self, step: int) -> list[PlanItem]:
        """The ``(task, item, augmentation seed)`` triples of batch ``step``."""
        tasks = self.slots(step)
        counter = self._draws_before(step)
        items: list[PlanItem] = []
        for slot, t in enumerate(tasks):
            c = int(counter[t])
            counter[t] += 1
            n = self.sizes[t]
            perm = _permutation(self.seed, int(t), c // n, n)
            aug_seed = int(np.random.SeedSequence([self.seed, step, slot]).generate_state(1)[0])
            items.append((int(t), int(perm[c % n]), aug_seed))
        return items


@lru_cache(maxsize=64)
def _permutation(seed: int, task: int, epoch: int, n: int) -> npt.NDArray[np.int64]:
    return np.random.default_rng([seed, task, epoch]).permutation(n)


class PlanBatchSampler(Sampler[list[PlanItem]]):
    """Yields the planned batches of steps ``start .. stop-1``."""

    def __init__(self, plan: TaskBalancedPlan, start: int, stop: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[PlanItem]]:
        for step in range(self.start, self.stop):
            yield self.plan.batch(step)


class MultiTaskImages(Dataset):
    """Maps plan items (or ``(task, item)`` pairs for evaluation) to uint8 views and labels.

    Parameters
    ----------
    tasks : sequence of TaskData
        One per task, holding only the items of this split.
    input_size, input_mpp : int, float
        Tile side (px) and µm/px of the encoder's input.
    augment : AugmentConfig
        Geometric and colour augmentation of training items; evaluation items (no seed) get the
        centred, unaltered view.
    """

    def __init__(
        self,
        tasks: Sequence[TaskData],
        input_size: int,
        input_mpp: float,
        augment: AugmentConfig = NO_AUGMENT,
    ) -> None:
        self.tasks = list(tasks)
        self.input_size = int(input_size)
        self.input_mpp = float(input_mpp)
        self.augment = augment

    def __len__(self) -> int:
        return sum(len(t) for t in self.tasks)

    def _read(self, task: int, item: int) -> tuple[np.ndarray, int]:
        data = self.tasks[task]
        n = len(data)
        for attempt in range(min(n, 8)):
            k = (item + attempt) % n
            try:
                return data.source.read(k), k
            except DatasetError as exc:
                log.warning("skipping unreadable image of task %s: %s", data.task, exc)
        raise DatasetError(f"task {data.task!r}: {min(n, 8)} consecutive images are unreadable, e.g. item {item}")

    def __getitem__(self, key: tuple[int, ...]) -> tuple[torch.Tensor, int, int]:
        task, item = int(key[0]), int(key[1])
        rng = np.random.default_rng(key[2]) if len(key) > 2 else None
        image, k = self._read(task, item)
        view = sample_view(
            image,
            input_size=self.input_size,
            input_mpp=self.input_mpp,
            src_mpp=float(self.tasks[task].mpp[k]),
            rng=rng,
            config=self.augment,
        )
        if rng is not None:
            view = colour_augment(view, rng, self.augment)
        return torch.from_numpy(view), task, int(self.tasks[task].labels[k])


def collate(batch: Sequence[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack views into uint8 ``(B, 3, S, S)`` and task / label index tensors."""
    images = torch.stack([b[0] for b in batch]).permute(0, 3, 1, 2).contiguous()
    tasks = torch.tensor([b[1] for b in batch], dtype=torch.long)
    labels = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, tasks, labels


def worker_init(_: int) -> None:
    """DataLoader workers decode images; one torch thread each leaves the cores to the model."""
    torch.set_num_threads(1)
