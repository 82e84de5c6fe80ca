"""Slide classifiers for the predict tests: a model "trained" on an embedding store, saved as `classify train` saves it.

Training for real needs a labelled cohort; these tests need a model whose provenance is the store's and
whose weights are fixed and non-trivial: an ``abmil`` network with seeded random weights and the
store's feature statistics, or a ``linear`` model fitted on the store's tiles split into two fake slides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsi_encoder.io.embedding_store import EmbeddingStore, SlideBag
from wsi_encoder.models.slide_classifiers import create_slide_classifier
from wsi_encoder.pipelines.classify import save_model, training_provenance

CLASSES = ["normal", "tumour"]


def save_store_model(store: Path, out_dir: Path, name: str = "abmil", seed: int = 0) -> Path:
    """Save a ``name`` model whose provenance is ``store``'s (every slide of it) into ``out_dir``."""
    reader = EmbeddingStore.open(store)
    bags = [reader.load(sid) for sid in reader.slide_ids]
    torch.manual_seed(seed)
    model = create_slide_classifier(name, reader.embedding_dim, len(CLASSES), {}, "cpu")
    if name == "linear":
        halves = []
        for bag in bags:
            order = np.argsort(bag.features[:, 0])
            for part in (order[: len(order) // 2], order[len(order) // 2 :]):
                halves.append(SlideBag(bag.slide_id, bag.features[part], bag.rowcol[part], bag.grid_shape))
        model.fit(halves, np.arange(len(halves)) % 2, seed=seed)
    else:
        model._set_input_stats(bags)
        model.module.eval()
    meta = {
        "classes": CLASSES,
        "class_index": {c: i for i, c in enumerate(CLASSES)},
        "positive_class": CLASSES[1],
        "encoder": reader.encoder_identity(),
        "embedding_store": str(store),
        "provenance": training_provenance(reader, reader.slide_ids),
    }
    save_model(model, out_dir, meta)
    return out_dir
