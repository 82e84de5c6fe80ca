"""Fixed-seed fits give the predictions recorded before ``models/slide_classifiers`` became a package.

The numbers below were produced by the single-module implementation (commit f58e5ca) on the bags this
file builds; the refactored models must reproduce them (CPU, one torch thread, float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_encoder.io.embedding_reader import SlideBag
from wsi_encoder.models.slide_classifiers import create_slide_classifier

CONFIGS = {
    "linear": {"Cs": (0.01, 1.0)},
    "abmil": {"epochs": 25, "batch_size": 3, "hidden": 8, "attention_dim": 4, "max_instances": 20, "patience": 4, "lr": 1e-2},
    "gridcnn": {"epochs": 15, "batch_size": 3, "width": 8, "depth": 3, "strided": 2, "crop": 6, "patience": 4},
}


def _bags(seed: int, n: int) -> tuple[list[SlideBag], np.ndarray]:
    """``n`` small slides (grids 7-12 cells a side, 6 features); class 1 carries a shifted blob of tiles."""
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for i in range(n):
        rows, cols = int(rng.integers(7, 13)), int(rng.integers(7, 13))
        cells = np.argwhere(rng.random((rows, cols)) < 0.6)
        feats = rng.normal(size=(len(cells), 6)).astype(np.float32)
        label = i % 2
        if label:
            hot = (np.abs(cells[:, 0] - rows // 2) <= 1) & (np.abs(cells[:, 1] - cols // 2) <= 1)
            feats[hot, :2] += 2.0
        bags.append(SlideBag(f"s{seed}_{i}", feats, cells.astype(np.int64), (rows, cols)))
        labels.append(label)
    return bags, np.asarray(labels, dtype=np.int64)


def _predictions(name: str, use_val: bool) -> tuple[np.ndarray, int | None, float]:
    """P(class 1) of the test bags, the kept epoch, and the sum of the first test bag's heatmap."""
    train, y = _bags(0, 10)
    val, y_val = _bags(1, 4)
    test, _ = _bags(2, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = create_slide_classifier(name, 6, 2, CONFIGS[name], device="cpu")
        info = model.fit(train, y, val if use_val else None, y_val if use_val else None, seed=3)
        return model.predict_proba(test)[:, 1], info.best_epoch, float(np.nansum(model.heatmap(test[0])))
    finally:
        torch.set_num_threads(before)


# (P(class 1) of the 4 test bags, kept epoch, heatmap sum), recorded on the single-module code.
EXPECTED = {
    ('linear', False): ([0.17739226, 0.62025523, 0.04639321, 0.94302323], None, -1.647748683460104),
    ('linear', True): ([0.14919817, 0.86000712, 0.11491573, 0.97331319], None, -2.001117156575302),
    ('abmil', False): ([0.51099652, 0.47933230, 0.50348777, 0.45721075], 25, 51.10328735025611),
    ('abmil', True): ([0.48586833, 0.47456935, 0.49267468, 0.47562239], 8, 54.52484249499866),
    ('gridcnn', False): ([0.51075470, 0.56093460, 0.49150071, 0.59009153], 15, 12.634077035217622),
    ('gridcnn', True): ([0.51075470, 0.56093460, 0.49150071, 0.59009153], 15, 12.634077035217622),
}


@pytest.mark.parametrize(("name", "use_val"), list(EXPECTED), ids=[f"{n}-{'val' if v else 'noval'}" for n, v in EXPECTED])
def test_fixed_seed_fit_gives_the_recorded_predictions(name: str, use_val: bool) -> None:
    prob, best_epoch, heat = _predictions(name, use_val)
    want_prob, want_epoch, want_heat = EXPECTED[(name, use_val)]
    np.testing.assert_allclose(prob, want_prob, rtol=0, atol=1e-5)
    assert best_epoch == want_epoch
    assert heat == pytest.approx(want_heat, rel=1e-4, abs=1e-5)
