"""DataLoader workers feed the LOMO trainer without changing a single weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.test_lomo_protocol import _model, _toy_data
from wsi_encoder.training import lomo_trainer
from wsi_encoder.training.lomo_arms import GrlArm
from wsi_encoder.training.lomo_loader import CachedBatches, batch_stream
from wsi_encoder.training.lomo_trainer import TrainData, TrainSpec


def _on_disk(data: TrainData, tmp_path: Path) -> TrainData:
    np.save(tmp_path / "cache.npy", data.images)
    images = np.load(tmp_path / "cache.npy", mmap_mode="r")
    return TrainData(images, data.train_rows, data.y_train, data.domain_train, data.val_rows, data.y_val)


def test_batches_come_back_in_batch_order_and_the_memmap_is_reopened_not_pickled(tmp_path: Path) -> None:
    data = _on_disk(_toy_data(), tmp_path)
    batches = [np.array([5, 1, 3]), np.array([0, 17, 2, 9])]
    got = list(batch_stream(data.images, batches, workers=2))
    for rows, tensor in zip(batches, got, strict=True):
        assert tensor.dtype == torch.uint8
        np.testing.assert_array_equal(tensor.numpy(), np.asarray(data.images)[rows])
    import pickle

    assert len(pickle.dumps(CachedBatches(data.images, batches))) < 10_000  # a path, not the pixels


def test_any_number_of_workers_trains_the_same_weights(tmp_path: Path) -> None:
    data = _on_disk(_toy_data(), tmp_path)
    states = []
    for workers in (0, 2):
        arm = GrlArm(3, hidden=16)
        model = _model(arm)
        spec = TrainSpec(epochs=2, batch_size=6, lr=1e-3, workers=workers)
        lomo_trainer.train_classifier(model, data, spec, arm, seed=3)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
