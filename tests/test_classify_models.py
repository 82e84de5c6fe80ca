"""The slide classifiers: registry and config, heatmaps, TTA, saving without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _classify_fixtures import FAST, cached_cohort, one_torch_thread  # noqa: F401
from safetensors.numpy import load_file

from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.io.embedding_store import EmbeddingStore, SlideBag, SlideBags
from wsi_encoder.io.labels import read_labels
from wsi_encoder.models.classifier_files import load_model, save_model
from wsi_encoder.models.slide_classifiers import (
    GridCNNConfig,
    create_slide_classifier,
    list_slide_classifiers,
    make_config,
    torch_threads,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODELS = ("linear", "abmil", "gridcnn")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    cohort = cached_cohort(tmp_path_factory, "binary", n_patients=28)
    reader = EmbeddingStore.open(cohort.store)
    table = read_labels(cohort.labels_csv, reader.slide_ids)
    return cohort, SlideBags(reader, table.slide_ids), table.y


@pytest.fixture(scope="module")
def fitted(data) -> dict:
    """Each model fitted once on the whole cohort (no validation set)."""
    cohort, bags, y = data
    models = {}
    with torch_threads(1):
        for name in MODELS:
            model = create_slide_classifier(name, cohort.dim, 2, FAST[name], device="cpu")
            model.fit(bags, y, seed=0)
            models[name] = model
    return models


def test_registry_and_config() -> None:
    assert set(MODELS) <= set(list_slide_classifiers())
    with pytest.raises(InvalidParameterError, match="unknown slide classifier 'svm'"):
        create_slide_classifier("svm", 8, 2)
    config = make_config(GridCNNConfig, {"width": "16", "tta": "false", "lr": "0.001"})
    assert (config.width, config.tta, config.lr) == (16, False, 0.001)
    with pytest.raises(InvalidParameterError, match=r"unknown parameter.*widht.*valid: width"):
        make_config(GridCNNConfig, {"widht": 3})
    with pytest.raises(InvalidParameterError, match="width='wide' is not a valid int"):
        make_config(GridCNNConfig, {"width": "wide"})
    with pytest.raises(InvalidParameterError, match="dropout"):
        make_config(GridCNNConfig, {"dropout": 1.5})
    with pytest.raises(InvalidParameterError, match="class_weight"):
        create_slide_classifier("linear", 8, 2, {"class_weight": "auto"})


@pytest.mark.parametrize("name", MODELS)
def test_heatmap_localises_the_lesion(name: str, data, fitted) -> None:
    cohort, bags, _ = data
    model = fitted[name]
    truth = cohort.by_id()
    hits = []
    for bag in bags:
        slide = truth[bag.slide_id]
        heat = model.heatmap(bag)
        assert heat.shape == bag.grid_shape
        assert np.isnan(heat[~bag.mask]).all() and np.isfinite(heat[bag.mask]).all()
        if slide.label == "lesion":
            hits.append(np.mean(heat[slide.lesion]) > np.mean(heat[~slide.lesion & bag.mask]))
    assert np.mean(hits) >= 0.9, f"{name}: lesion hotter than the rest in only {np.mean(hits):.0%} of lesion slides"


def test_linear_contributions_sum_to_logit(data, fitted) -> None:
    _, bags, _ = data
    model = fitted["linear"]
    for bag in list(bags)[:6]:
        heat = model.heatmap(bag)
        logit = model.decision_function([bag])[0]
        assert np.nansum(heat) == pytest.approx(logit - model.intercept_[0], abs=1e-8)


def test_linear_matches_sklearn_rule(data, fitted) -> None:
    _, bags, _ = data
    model = fitted["linear"]
    prob = model.predict_proba(list(bags)[:5])
    z = (np.stack([model.pool(b) for b in list(bags)[:5]]) - model.mean_) / model.scale_
    expected = 1 / (1 + np.exp(-(z @ model.coef_[0] + model.intercept_[0])))
    np.testing.assert_allclose(prob[:, 1], expected)
    np.testing.assert_allclose(prob.sum(1), 1.0)


def _rotated(bag: SlideBag) -> SlideBag:
    """The same slide turned 90° counter-clockwise (cell (r, c) -> (Q - 1 - c, r))."""
    rows, cols = bag.grid_shape
    rowcol = np.stack([cols - 1 - bag.rowcol[:, 1], bag.rowcol[:, 0]], axis=1)
    return SlideBag(bag.slide_id, bag.features, rowcol, (cols, rows))


def test_gridcnn_tta_is_rotation_invariant(data, fitted) -> None:
    _, bags, _ = data
    model = fitted["gridcnn"]
    some = list(bags)[:4]
    turned = [_rotated(b) for b in some]
    np.testing.assert_allclose(model.predict_proba(some), model.predict_proba(turned), atol=1e-5)
    no_tta = create_slide_classifier("gridcnn", model.in_dim, 2, {**FAST["gridcnn"], "tta": False}, "cpu")
    no_tta.load_state_arrays(model.state_arrays())
    assert not np.allclose(no_tta.predict_proba(some), no_tta.predict_proba(turned), atol=1e-5)


def test_abmil_is_permutation_invariant(data, fitted) -> None:
    _, bags, _ = data
    model = fitted["abmil"]
    bag = bags[0]
    order = np.random.default_rng(0).permutation(bag.n_tiles)
    shuffled = SlideBag(bag.slide_id, bag.features[order], bag.rowcol[order], bag.grid_shape)
    np.testing.assert_allclose(model.predict_proba([bag]), model.predict_proba([shuffled]), atol=1e-6)
    np.testing.assert_allclose(model.heatmap(bag), model.heatmap(shuffled), atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_roundtrip_without_pickle(name: str, tmp_path: Path, data, fitted) -> None:
    _, bags, _ = data
    model = fitted[name]
    save_model(model, tmp_path, {"classes": ["normal", "lesion"]})
    arrays = load_file(str(tmp_path / "model.safetensors"))  # plain tensors, nothing executable
    assert arrays and all(isinstance(v, np.ndarray) for v in arrays.values())
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["name"] == name and meta["classes"] == ["normal", "lesion"]
    loaded, _ = load_model(tmp_path, device="cpu")
    some = list(bags)[:5]
    np.testing.assert_allclose(loaded.predict_proba(some), model.predict_proba(some), atol=1e-7)


def test_load_rejects_tampered_or_missing(tmp_path: Path, fitted) -> None:
    with pytest.raises(CheckpointError, match=r"no model\.json"):
        load_model(tmp_path)
    save_model(fitted["linear"], tmp_path, {"classes": ["a", "b"]})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(tmp_path)
    save_model(fitted["linear"], tmp_path, {"classes": ["a", "b"]})
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["in_dim"] = 99
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path)


def test_linear_multiclass_with_absent_class(data) -> None:
    cohort, bags, y = data
    model = create_slide_classifier("linear", cohort.dim, 3, {}, "cpu")
    model.fit(bags, y, seed=0)  # classes 0 and 1 only
    prob = model.predict_proba(list(bags)[:4])
    assert prob.shape == (4, 3)
    assert prob[:, 2].max() < 1e-6
    np.testing.assert_allclose(prob.sum(1), 1.0)


def test_gridcnn_small_and_odd_grids(fitted) -> None:
    model = fitted["gridcnn"]
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 7), (40, 9)]:
        rowcol = np.argwhere(np.ones(shape, bool))
        bag = SlideBag("x", rng.normal(size=(len(rowcol), model.in_dim)).astype(np.float16), rowcol, shape)
        prob = model.predict_proba([bag])
        assert prob.shape == (1, 2) and np.isfinite(prob).all()
        assert model.heatmap(bag).shape == shape
