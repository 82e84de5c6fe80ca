"""`gridcnn --preset tellez2019` (the TPAMI 2019 grid CNN and protocol) and gridcnn's use of true dihedral views."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _classify_fixtures import one_torch_thread, write_cohort  # noqa: F401
from click.testing import CliRunner
from scipy.ndimage import distance_transform_edt

from wsi_encoder.cli import main
from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.slide_records import SlideBag, dihedral_cells
from wsi_encoder.models.slide_classifiers import create_slide_classifier, model_preset
from wsi_encoder.models.slide_classifiers import gridcnn as gridcnn_module
from wsi_encoder.models.slide_classifiers.gridcnn import PRESETS, distance_map
from wsi_encoder.models.slide_networks import TellezGridCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The paper's settings (TPAMI 2019 appendix; ../shared/research/papers.md §2a), pinned.
PAPER = {
    "arch": "tellez2019", "width": 128, "dropout": 0.2, "crop": 400, "crop_sampling": "distance", "test_crops": 10,
    "tta": True, "batch_size": 16, "lr": 1e-2, "optimizer": "adam", "weight_decay": 2e-5, "lr_plateau": 0.1, "min_lr": 1e-5,
}  # fmt: skip


def test_the_preset_is_the_paper() -> None:
    assert {k: PRESETS["tellez2019"][k] for k in PAPER} == PAPER
    assert model_preset("gridcnn", "tellez2019") == PRESETS["tellez2019"]
    with pytest.raises(InvalidParameterError, match="no preset 'tellez2019'"):
        model_preset("abmil", "tellez2019")


def test_network_shape_chain_and_layers() -> None:
    net = TellezGridCNN(128, 2).eval()
    x = torch.zeros(1, 128, 400, 400)
    sides = []
    for block, stride in zip(net.blocks, net.strides, strict=True):
        x = block(x, stride)
        sides.append(x.shape[-1])
    assert sides == [200, 100, 50, 25, 13, 7, 7, 7]
    assert len(net.blocks) == 8 and all(b.pointwise.out_channels == 128 for b in net.blocks)
    assert all(b.depthwise.groups == b.depthwise.in_channels for b in net.blocks)  # depthwise-separable
    assert all(isinstance(b.drop, torch.nn.Dropout2d) and b.drop.p == 0.2 for b in net.blocks)  # spatial dropout
    assert [type(layer).__name__ for layer in net.dense] == ["Linear", "BatchNorm1d", "LeakyReLU"]
    assert net.dense[0].out_features == 128
    with torch.no_grad():
        logits, first = net.forward_with_first(torch.randn(2, 128, 40, 30), torch.ones(2, 1, 40, 30))
    assert logits.shape == (2, 2) and first.shape[-2:] == (20, 15)


def test_distance_map_follows_the_recipe() -> None:
    mask = np.zeros((9, 12), dtype=bool)
    mask[1:8, 2:11] = True
    mask[4, 6] = False
    p = distance_map(mask)
    d = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    want = (d / d.max()) ** 2
    np.testing.assert_allclose(p, want / want.sum())
    assert p.sum() == pytest.approx(1.0) and (p[~mask] == 0).all() and p.argmax() != np.ravel_multi_index((4, 6), mask.shape)


def _bag(rows: int = 14, cols: int = 11, dim: int = 4, seed: int = 0, views: bool = True) -> SlideBag:
    rng = np.random.default_rng(seed)
    rowcol = np.argwhere(rng.random((rows, cols)) < 0.7)
    features = rng.normal(size=(len(rowcol), dim)).astype(np.float32)
    dihedral = None
    if views:  # view v's features are the constant v: which view a crop came from can be read off it
        dihedral = np.stack([np.full_like(features, float(v)) for v in range(8)])
        dihedral[0] = features
    return SlideBag(f"s{seed}", features, rowcol, (rows, cols), dihedral)


def test_training_crops_are_true_views_and_distance_sampled() -> None:
    model = create_slide_classifier("gridcnn", 4, 2, {"crop": 5, "crop_sampling": "distance"}, device="cpu")
    bag = _bag()
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        grid, mask = model._crop(bag, rng)
        values = np.unique(grid[:, mask[0] > 0])
        if len(values) == 1:
            seen.add(int(values[0]))
    assert seen == {1, 2, 3, 4, 5, 6, 7}  # every non-identity true view (view 0 is the noisy features)
    centres = np.array([model._center(bag, rng) for _ in range(3000)])
    p = distance_map(bag.mask)
    freq = np.zeros(bag.grid_shape)
    np.add.at(freq, (centres[:, 0], centres[:, 1]), 1)
    assert (freq[p == 0] == 0).all()
    assert np.corrcoef(freq.ravel(), p.ravel())[0, 1] > 0.9


def test_prediction_averages_the_eight_true_views_and_the_test_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_slide_classifier("gridcnn", 4, 2, {"crop": 6, "test_crops": 3}, device="cpu")
    bag = _bag(rows=20, cols=15)
    shapes: list[tuple[int, ...]] = []
    original = model.logits

    def spy(inputs):
        shapes.append(tuple(inputs[0].shape))
        values.append(set(np.unique(inputs[0][inputs[1].expand_as(inputs[0]) > 0].numpy()).round(4)))
        return original(inputs)

    values: list[set] = []
    monkeypatch.setattr(model, "logits", spy)
    model.predict_proba([bag])
    assert len(shapes) == 8 * 3 and all(s[-2:] == (6, 6) for s in shapes)
    assert [next(iter(v)) for v in values[3:] if len(v) == 1] == sorted(float(v) for v in range(1, 8) for _ in range(3))
    shapes.clear()
    values.clear()
    whole = create_slide_classifier("gridcnn", 4, 2, {"crop": 40, "test_crops": 3}, device="cpu")
    monkeypatch.setattr(whole, "logits", lambda inputs: (shapes.append(tuple(inputs[0].shape)), original(inputs))[1])
    whole.predict_proba([bag])  # a grid smaller than the crop is scored whole, once per view
    assert len(shapes) == 8
    assert {s[-2:] for s in shapes} == {(20, 15), (15, 20)}


def test_without_views_flips_are_said_to_be_an_approximation(caplog: pytest.LogCaptureFixture) -> None:
    gridcnn_module._APPROXIMATION_SAID.clear()
    model = create_slide_classifier("gridcnn", 4, 2, {"crop": 5}, device="cpu")
    bags = [_bag(seed=s, views=False) for s in range(4)]
    with caplog.at_level(logging.WARNING):
        model.fit(bags, [0, 1, 0, 1], seed=0, refit={"epochs": 1})
        model.predict_proba(bags)
    said = [r for r in caplog.records if "approximation" in r.getMessage()]
    assert len(said) == 1


def test_the_view_of_a_store_without_views_moves_cells_as_the_true_view_would() -> None:
    bag = _bag(views=False)
    for v in range(8):
        rowcol, shape = dihedral_cells(bag.rowcol, bag.grid_shape, v)
        flipped = gridcnn_module._grid_view(bag, v)
        np.testing.assert_array_equal(flipped.rowcol, rowcol)
        assert flipped.grid_shape == shape


def _add_views(store: Path) -> None:
    """Give every slide of a fixture store 8 'views' (rolled features) in the `encode --dihedral` layout."""
    root = zarr.open_group(str(store), mode="r+")
    for slide_id in root.group_keys():
        feats = np.asarray(root[slide_id]["features"][...])
        views = np.stack([np.roll(feats, v, axis=1) for v in range(8)])
        root[slide_id].create_array("features_dihedral", data=views)


@pytest.mark.slow
def test_classify_train_with_the_preset_on_a_store_with_views(tmp_path: Path) -> None:
    cohort = write_cohort(tmp_path / "c", n_patients=12, dim=8, grid=(12, 12))
    _add_views(cohort.store)
    out = tmp_path / "clf"
    args = ["classify", "train", str(cohort.store), "--labels", str(cohort.labels_csv), "--model", "gridcnn",
            "--preset", "tellez2019", "--param", "width=16", "--param", "epochs=3", "--param", "crop=8",
            "--param", "test_crops=2", "--folds", "3", "--n-boot", "20", "--device", "cpu", "--threads", "1",
            "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == "tellez2019" and metrics["dihedral_views"] is True
    assert metrics["config"]["arch"] == "tellez2019" and metrics["config"]["optimizer"] == "adam"
    assert metrics["config"]["width"] == 16 and metrics["config"]["lr_plateau"] == 0.1
    bad = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "x"), "--preset", "nope"])
    assert bad.exit_code != 0 and "no preset 'nope'" in bad.output
