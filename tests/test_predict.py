"""`wsienc predict`: provenance defaults and refusals, bad slides in a folder, GeoJSON overlays, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.compression import load_encoder_cached
from wsi_encoder.models.classifier_files import load_model, save_model
from wsi_encoder.models.slide_classifiers import create_slide_classifier
from wsi_encoder.overlays import tissue_polygons
from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide

TILING = {"target_mpp": 1.0, "tile_size": 64, "stride": 64, "mpp_tolerance": 0.05, "tissue_threshold": 0.25,
          "thumbnail_size": None, "tissue_method": "skimage-otsu-saturation-v2", "codec": "jpeg", "jpeg_quality": 90, "edge": "pad"}  # fmt: skip


def _model(out: Path, *, tiling: dict | None = TILING, encoder: dict | None = None, provenance: bool = True,
           classes: tuple[str, ...] = ("normal", "tumour")) -> Path:  # fmt: skip
    """An abmil model on nic embeddings (seeded weights), saved with the provenance ``classify train`` records."""
    _, identity = load_encoder_cached("nic", None, "cpu")
    torch.manual_seed(0)
    model = create_slide_classifier("abmil", identity.embedding_dim, len(classes), {}, "cpu")
    recorded = encoder or {"name": "nic", "spec": "nic", "weights_sha256": identity.weights_sha256, "dtype": "float16"}
    meta = {"classes": list(classes), "encoder": {k: recorded[k] for k in ("name", "weights_sha256")}}
    if provenance:
        meta["provenance"] = {"format": 1, "encoder": recorded, "tiling": tiling, "tiling_note": None}
    save_model(model, out, meta)
    return out


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small generated slides and a broken one (a truncated TIFF named .svs)."""
    folder = tmp_path_factory.mktemp("predict_slides")
    for i in range(2):
        write_synthetic_slide(folder / f"s{i}.tif", SyntheticSlideSpec(width=1536, height=1024, mpp=0.5, seed=i, pieces=1))
    (folder / "broken.svs").write_bytes((folder / "s0.tif").read_bytes()[:3000])
    return folder


def _run(args: list[str], code: int = 0) -> CliRunner:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    return result


def test_a_folder_with_a_broken_slide_finishes_the_others_and_resumes(slide_dir: Path, tmp_path: Path) -> None:
    model = _model(tmp_path / "clf")
    out = tmp_path / "pred"
    result = _run(["predict", str(slide_dir), "--model", str(model), "--out", str(out), "--threads", "1"], code=1)
    assert "broken.svs" in result.output and "failed" in result.output
    with (out / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == ["s0", "s1"]
    assert list(rows[0]) == ["slide_id", "prob", "pred", "n_tiles", "seconds"]
    assert all(0 <= float(r["prob"]) <= 1 and int(r["n_tiles"]) > 0 for r in rows)
    for sid in ("s0", "s1"):
        assert (out / "heatmaps" / f"{sid}.png").stat().st_size > 5000
        heat = np.load(out / "heatmaps" / f"{sid}.npy")
        assert np.isfinite(heat).sum() == int(next(r for r in rows if r["slide_id"] == sid)["n_tiles"])
    run = json.loads((out / "run.json").read_text())
    failed = [s for s in run["slides"] if s["status"] == "failed"]
    assert len(failed) == 1 and "broken.svs" in failed[0]["reason"]
    assert run["settings"]["tile_size"] == 64 and run["settings"]["target_mpp"] == 1.0  # from the provenance

    again = _run(["predict", str(slide_dir), "--model", str(model), "--out", str(out), "--threads", "1"], code=1)
    assert again.output.count("(earlier run)") == 2  # the good slides are not redone; the broken one is retried
    with (out / "predictions.csv").open() as fh:
        assert [r["prob"] for r in csv.DictReader(fh)] == [r["prob"] for r in rows]


def test_an_encoder_or_tile_spec_other_than_the_models_is_refused(slide_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from wsi_encoder.models.encoders import create_encoder

    model = _model(tmp_path / "clf")
    other = create_encoder("nic", seed=5).eval()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    slide = str(slide_dir / "s0.tif")
    base = ["predict", slide, "--model", str(model), "--threads", "1"]

    refused = _run([*base, "--out", str(tmp_path / "a"), "--weights", str(tmp_path / "other.safetensors")], code=1)
    assert "encoder weights sha256" in refused.output and "--force" in refused.output
    assert not (tmp_path / "a" / "predictions.csv").exists()
    refused = _run([*base, "--out", str(tmp_path / "b"), "--tile-size", "128"], code=1)
    assert "--tile-size 128" in refused.output and "64" in refused.output
    refused = _run([*base, "--out", str(tmp_path / "c"), "--encoder", "resnet18"], code=1)
    assert "128-d" in refused.output or "embeddings" in refused.output

    forced = _run([*base, "--out", str(tmp_path / "d"), "--tile-size", "96", "--force"])
    assert "forced past" in forced.output
    assert json.loads((tmp_path / "d" / "run.json").read_text())["settings"]["forced"]


def test_a_model_without_provenance_needs_explicit_flags(slide_dir: Path, tmp_path: Path) -> None:
    old = _model(tmp_path / "old", provenance=False)
    slide = str(slide_dir / "s1.tif")
    refused = _run(["predict", slide, "--model", str(old), "--out", str(tmp_path / "a")], code=1)
    assert "does not record which encoder" in refused.output and "--encoder" in refused.output
    refused = _run(["predict", slide, "--model", str(old), "--out", str(tmp_path / "a"), "--encoder", "nic"], code=1)
    assert "tile spec" in refused.output and "--mpp" in refused.output and "--tile-size" in refused.output
    ok = _run(["predict", slide, "--model", str(old), "--out", str(tmp_path / "a"), "--encoder", "nic", "--mpp", "1",
               "--tile-size", "64", "--no-heatmaps", "--no-geojson", "--threads", "1"])  # fmt: skip
    assert "1 slide(s) predicted" in ok.output
    assert not (tmp_path / "a" / "heatmaps").exists() and not (tmp_path / "a" / "geojson").exists()


def test_tissue_polygons_trace_pieces_and_holes_in_level0_pixels() -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:25, 10:40] = True
    mask[12:18, 20:28] = False  # a hole
    mask[30:36, 50:58] = True  # a second piece
    polygons = tissue_polygons(mask, (600.0, 400.0), tolerance=0)
    assert len(polygons) == 2
    big = max(polygons, key=lambda p: len(p[0]))
    assert len(big) == 2  # exterior + one hole
    exterior = np.asarray(big[0])
    # The exterior follows the mask's edge (pixels 10..40 x 5..25) within half a pixel, times 10 (level 0).
    assert exterior[:, 0].min() == pytest.approx(100, abs=6) and exterior[:, 0].max() == pytest.approx(400, abs=6)
    assert exterior[:, 1].min() == pytest.approx(50, abs=6) and exterior[:, 1].max() == pytest.approx(250, abs=6)
    for rings in polygons:
        for ring in rings:
            assert ring[0] == ring[-1] and len(ring) >= 4
            pts = np.asarray(ring)
            assert pts.min() >= 0 and pts[:, 0].max() <= 600 and pts[:, 1].max() <= 400
    assert tissue_polygons(np.zeros((8, 8), dtype=bool), (80.0, 80.0)) == []


def test_tissue_pieces_are_scikit_image_labels_and_regions() -> None:
    """The outlines' pieces, holes and filled pieces equal scikit-image's ``label`` (connectivity 2 and 1) and
    ``regionprops`` (``bbox``, ``image``, ``image_filled``), which overlays.py no longer imports."""
    from scipy import ndimage
    from skimage import measure

    from wsi_encoder.overlays import _EIGHT, _pieces

    rng = np.random.default_rng(3)
    for trial in range(60):
        mask = rng.random(tuple(rng.integers(2, 50, 2))) < rng.uniform(0.2, 0.8)
        if trial % 2:
            mask = ndimage.median_filter(mask, 3)
        for structure, connectivity in ((_EIGHT, 2), (None, 1)):
            labels = ndimage.label(mask, structure)[0]
            assert np.array_equal(labels, measure.label(mask, connectivity=connectivity))
            regions = measure.regionprops(labels)
            pieces = _pieces(labels)
            assert len(pieces) == len(regions)
            for (corner, piece), region in zip(pieces, regions, strict=True):
                assert corner == region.bbox[:2] and np.array_equal(piece, region.image)
                assert np.array_equal(ndimage.binary_fill_holes(piece, _EIGHT), region.image_filled)


def test_saved_models_load_back_with_their_provenance(tmp_path: Path) -> None:
    model, meta = load_model(_model(tmp_path / "clf"), device="cpu")
    assert meta["provenance"]["tiling"] == TILING and meta["provenance"]["encoder"]["name"] == "nic"
    assert model.name == "abmil"


def test_classify_train_records_the_encoder_and_tile_spec(tmp_path: Path) -> None:
    import zarr
    from _classify_fixtures import ENCODER, write_cohort

    from wsi_encoder.pipelines.classify import train_classifier

    cohort = write_cohort(tmp_path / "cohort", n_patients=8, slides_per_patient=(1,), dim=8, grid=(8, 8))
    root = zarr.open_group(str(cohort.store), mode="r+")
    tiling = {**TILING, "target_mpp": 0.5, "tile_size": 224, "stride": 224}
    for slide in cohort.slides:
        root[slide.slide_id].attrs.update({**tiling, "dtype": "float16"})
    result = train_classifier(cohort.store, cohort.labels_csv, "linear", tmp_path / "clf", folds=2, n_boot=0)
    provenance = json.loads(result.files["model"].read_text())["provenance"]
    assert provenance["tiling"] == tiling and provenance["tiling_note"] is None
    assert provenance["encoder"]["name"] == ENCODER["name"]
    assert provenance["encoder"]["weights_sha256"] == ENCODER["weights_sha256"]
    assert provenance["encoder"]["embedding_dim"] == 8 and provenance["encoder"]["dtype"] == "float16"

    # Slides tiled differently: no tile spec is recorded, and predict asks for one.
    root[cohort.slides[0].slide_id].attrs["tile_size"] = 256
    result = train_classifier(cohort.store, cohort.labels_csv, "linear", tmp_path / "clf2", folds=2, n_boot=0)
    provenance = json.loads(result.files["model"].read_text())["provenance"]
    assert provenance["tiling"] is None and "tiled differently" in provenance["tiling_note"]


def test_multi_class_predictions_have_one_column_per_class(slide_dir: Path, tmp_path: Path) -> None:
    model = _model(tmp_path / "clf", classes=("a", "b", "c"))
    _run(["predict", str(slide_dir / "s0.tif"), "--model", str(model), "--out", str(tmp_path / "p"), "--threads", "1",
          "--no-heatmaps"])  # fmt: skip
    with (tmp_path / "p" / "predictions.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    probs = [float(row[f"prob_{c}"]) for c in "abc"]
    assert sum(probs) == pytest.approx(1, abs=1e-5) and float(row["prob"]) == pytest.approx(max(probs), abs=1e-6)
    assert row["pred"] == "abc"[int(np.argmax(probs))]
    collection = json.loads((tmp_path / "p" / "geojson" / "s0.geojson").read_text())
    assert set(collection["properties"]["prediction"]["probabilities"]) == {"a", "b", "c"}


def test_the_prediction_path_does_not_import_scikit_learn() -> None:
    """Start-up is most of a one-slide prediction: what predict imports must stay lean (no scikit-learn, no SciPy
    stats, no SciPy spatial or scikit-image's morphology, which regionprops and label load)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import wsi_encoder.cli.predict, wsi_encoder.pipelines.predict, wsi_encoder.models.classifier_files\n"
        "import wsi_encoder.evaluation.plots, wsi_encoder.overlays, wsi_encoder.compression, wsi_encoder.tiling\n"
        "from wsi_encoder.overlays import tissue_polygons\n"
        "import numpy as np\n"
        "m = np.zeros((20, 20), bool); m[5:15, 5:15] = True; tissue_polygons(m, (200.0, 200.0))\n"
        "print(','.join(m for m in ('sklearn', 'scipy.stats', 'scipy.spatial', 'skimage.morphology', 'dask', 'distributed') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"the prediction path imports {out}"


def test_keep_stores_locks_both_stores_for_the_whole_run(slide_dir: Path, tmp_path: Path) -> None:
    """--keep-stores writes a patch store and an embedding store classify reads; a second writer of either is
    refused before any slide is predicted, with one line naming the lock."""
    from wsi_encoder.io.embedding_store import EmbeddingStore
    from wsi_encoder.io.store_lock import StoreLock

    model = _model(tmp_path / "clf")
    out = tmp_path / "pred"
    args = ["predict", str(slide_dir / "s0.tif"), str(slide_dir / "s1.tif"), "--model", str(model), "--out", str(out),
            "--threads", "1", "--keep-stores", "--no-heatmaps", "--no-geojson"]  # fmt: skip
    _run(args)
    assert EmbeddingStore.open(out / "embeddings.zarr").slide_ids == ("s0", "s1")
    assert not (out / "embeddings.zarr.lock").exists() and not (out / "patches.zarr.lock").exists()
    for store in ("embeddings.zarr", "patches.zarr"):
        with StoreLock(out / store):
            refused = _run([*args, "--overwrite"], code=1)
        assert f"{store}.lock" in refused.output and "predicted" not in refused.output
        assert len([line for line in refused.output.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize(("target", "model_name"), [("survival", "gridcnn"), ("regression", "abmil")])
def test_regression_and_survival_models_predict_slides(slide_dir: Path, tmp_path: Path, target: str,
                                                       model_name: str) -> None:
    from wsi_encoder.models.outcome_files import load_outcome_model, save_outcome_model
    from wsi_encoder.models.slide_classifiers.regressors import TorchRegressor
    from wsi_encoder.models.slide_classifiers.survival import TorchCox

    _, identity = load_encoder_cached("nic", None, "cpu")
    torch.manual_seed(0)
    if target == "survival":
        model: TorchCox | TorchRegressor = TorchCox(model_name, identity.embedding_dim, {}, "cpu", loss="nll", time_bins=3)
        model.edges = np.array([2.0, 5.0])
    else:
        model = TorchRegressor(model_name, identity.embedding_dim, {}, "mse", "cpu")
        model.y_mean, model.y_std = 10.0, 2.0
    model.net.module.eval()
    recorded = {"name": "nic", "spec": "nic", "weights_sha256": identity.weights_sha256, "dtype": "float16"}
    meta = {"encoder": {k: recorded[k] for k in ("name", "weights_sha256")},
            "provenance": {"format": 1, "encoder": recorded, "tiling": TILING, "tiling_note": None},
            "horizons": [1.0, 4.0, 7.0] if target == "survival" else []}  # one horizon in each nll bin
    save_outcome_model(model, target, tmp_path / "m", meta)
    loaded, _ = load_outcome_model(tmp_path / "m", "cpu")
    result = _run(["predict", str(slide_dir / "s0.tif"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "p"),
                   "--threads", "1"])  # fmt: skip
    column = "risk" if target == "survival" else "prediction"
    with (tmp_path / "p" / "predictions.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    at = ["survival_at_1", "survival_at_4", "survival_at_7"] if target == "survival" else []
    assert list(row) == ["slide_id", column, *at, "n_tiles", "seconds"] and f"s0: {float(row[column]):.4g}" in result.output
    if target == "survival":
        assert -3 <= float(row[column]) <= 0  # minus the expected number of the 3 bins survived
        s1, s4, s7 = (float(row[k]) for k in at)  # S before bin 0 ends, S_0, S_1: the risk is -(S_0 + S_1 + S_2)
        assert s1 == 1.0 and 1 > s4 > s7 > 0 and s4 + s7 < -float(row[column]) < s4 + 2 * s7  # 0 < S_2 < S_1
    collection = json.loads((tmp_path / "p" / "geojson" / "s0.geojson").read_text())
    assert collection["properties"]["prediction"] == {"target": target, column: pytest.approx(float(row[column]), rel=1e-5)}
    tissue = [f for f in collection["features"] if f["properties"].get("classification", {}).get("name") == "Tissue"
              or column in f["properties"].get("measurements", {})]
    assert any(column in f["properties"]["measurements"] for f in tissue)
    heat = np.load(tmp_path / "p" / "heatmaps" / "s0.npy")
    assert np.nanmax(heat) <= 1 and (tmp_path / "p" / "heatmaps" / "s0.png").exists()
    assert loaded.heatmap_kind == ("Grad-CAM of the risk (first block; bright = pushes it up)" if target == "survival"
                                   else "attention")
