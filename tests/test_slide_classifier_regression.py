"""Fixed-seed fits give the predictions recorded before ``models/slide_classifiers`` became a package.

The numbers below were produced by the single-module implementation (main at commit f58e5ca) on the bags
this file builds; the refactored models must reproduce them (CPU, one torch thread, float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_encoder.io.embedding_store import SlideBag
from wsi_encoder.models.slide_classifiers import create_slide_classifier

CONFIGS = {
    "linear": {"Cs": (0.01, 1.0)},
    "abmil": {"epochs": 25, "batch_size": 3, "hidden": 8, "attention_dim": 4, "max_instances": 20, "patience": 4, "lr": 1e-2},
    "gridcnn": {"epochs": 15, "batch_size": 3, "width": 8, "depth": 3, "strided": 2, "crop": 6, "patience": 4},
}


def _bags(seed: int, n: int, classes: int = 2) -> tuple[list[SlideBag], np.ndarray]:
    """``n`` small slides (grids 7-12 cells a side, 6 features); class c > 0 shifts features 2c-2, 2c-1 of a blob."""
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for i in range(n):
        rows, cols = int(rng.integers(7, 13)), int(rng.integers(7, 13))
        cells = np.argwhere(rng.random((rows, cols)) < 0.6)
        feats = rng.normal(size=(len(cells), 6)).astype(np.float32)
        label = i % classes
        if label:
            hot = (np.abs(cells[:, 0] - rows // 2) <= 1) & (np.abs(cells[:, 1] - cols // 2) <= 1)
            feats[np.ix_(hot, [2 * label - 2, 2 * label - 1])] += 2.0
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


def _refit_or_multiclass(name: str, mode: str) -> tuple[np.ndarray, int | None, float]:
    """``refit``: a final fit with the refit setting (validation bags given but unused); ``3class``: three classes."""
    classes = 3 if mode == "3class" else 2
    train, y = _bags(0, 12, classes)
    val, y_val = _bags(1, 6, classes)
    test, _ = _bags(2, 4, classes)
    refit = ({"C": 0.1} if name == "linear" else {"epochs": 4}) if mode == "refit" else None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = create_slide_classifier(name, 6, classes, CONFIGS[name], device="cpu")
        info = model.fit(train, y, val, y_val, seed=5, refit=refit)
        heat = model.heatmap(test[1])
        return model.predict_proba(test), info.best_epoch, float(np.nansum(heat))
    finally:
        torch.set_num_threads(before)


# (class probabilities of the 4 test bags, kept epoch, heatmap sum), recorded on the single-module code.
EXPECTED_MORE: dict[tuple[str, str], tuple[list[list[float]], int | None, float]] = {
    ('linear', 'refit'): ([[0.62327433, 0.37672567], [0.38065862, 0.61934138], [0.70997277, 0.29002723], [0.27406925, 0.72593075]], None, 0.47461978930658255),
    ('linear', '3class'): ([[0.42720228, 0.28117562, 0.29162210], [0.31609784, 0.39477212, 0.28913004], [0.33100482, 0.28065879, 0.38833639], [0.37011546, 0.31932372, 0.31056082]], None, 0.17991031026228493),
    ('abmil', 'refit'): ([[0.51467133, 0.48532876], [0.49070770, 0.50929230], [0.50067776, 0.49932215], [0.48279688, 0.51720309]], 4, 52.51027526989878),
    ('abmil', '3class'): ([[0.57710469, 0.14577961, 0.27711564], [0.23835535, 0.39639643, 0.36524820], [0.44292641, 0.23927705, 0.31779656], [0.32175612, 0.34134537, 0.33689851]], 25, 19.659234711177774),
    ('gridcnn', 'refit'): ([[0.45836502, 0.54163504], [0.46008256, 0.53991741], [0.46026739, 0.53973264], [0.46041083, 0.53958917]], 4, 12.0692317541787),
    ('gridcnn', '3class'): ([[0.32046938, 0.34245524, 0.33707544], [0.32059437, 0.34164774, 0.33775789], [0.31190377, 0.34227082, 0.34582534], [0.32919672, 0.33962542, 0.33117786]], 13, 7.764863487409417),
}


@pytest.mark.parametrize(("name", "mode"), list(EXPECTED_MORE), ids=[f"{n}-{m}" for n, m in EXPECTED_MORE])
def test_refit_and_multiclass_give_the_recorded_predictions(name: str, mode: str) -> None:
    prob, best_epoch, heat = _refit_or_multiclass(name, mode)
    want_prob, want_epoch, want_heat = EXPECTED_MORE[(name, mode)]
    np.testing.assert_allclose(prob, want_prob, rtol=0, atol=1e-5)
    assert best_epoch == want_epoch
    assert heat == pytest.approx(want_heat, rel=1e-4, abs=1e-5)
