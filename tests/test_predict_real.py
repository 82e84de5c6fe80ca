"""`wsienc predict` on a real slide equals `tile` + `encode` + `classify predict` (same tiles, same probabilities).

CMU-1-Small-Region.svs (Aperio, 0.499 µm/px), 128 px tiles at 0.5 µm/px; the patch store is lossless
(``--codec zstd``) so both routes see the slide's own pixels. The GeoJSON is checked against what
QuPath's importer reads (``qupath.lib.io.PathObjectTypeAdapters``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from _predict_fixtures import save_store_model
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.io.embedding_store import read_slide

SLIDE_ID = "CMU-1-Small-Region"


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


@pytest.mark.slow
@pytest.mark.integration
def test_predict_equals_the_three_commands_on_a_real_slide(cmu_svs: Path, tmp_path: Path) -> None:
    _run(["tile", str(cmu_svs), "--out", str(tmp_path / "patches.zarr"), "--mpp", "0.5", "--tile-size", "128",
          "--codec", "zstd", "--workers", "1"])  # fmt: skip
    _run(["encode", str(tmp_path / "patches.zarr"), "--encoder", "nic", "--out", str(tmp_path / "emb.zarr")])
    patch = zarr.open_group(str(tmp_path / "patches.zarr" / SLIDE_ID), mode="r")
    coords, rowcol = np.asarray(patch["coords"][:]), np.asarray(patch["grid"][:])
    width, height = int(patch.attrs["width"]), int(patch.attrs["height"])

    for name in ("abmil", "linear"):
        model = save_store_model(tmp_path / "emb.zarr", tmp_path / f"clf_{name}", name)
        meta = json.loads((model / "model.json").read_text())
        assert meta["provenance"]["tiling"]["tile_size"] == 128 and meta["provenance"]["encoder"]["spec"] == "nic"
        _run(["classify", "predict", str(tmp_path / "emb.zarr"), "--model", str(model), "--out",
              str(tmp_path / f"three_{name}.csv")])  # fmt: skip
        out = tmp_path / f"pred_{name}"
        _run(["predict", str(cmu_svs), "--model", str(model), "--out", str(out), "--keep-stores", "--threads", "2"])

        three, one = _csv(tmp_path / f"three_{name}.csv")[SLIDE_ID], _csv(out / "predictions.csv")[SLIDE_ID]
        assert abs(float(three["prob"]) - float(one["prob"])) <= 1e-5 and three["pred"] == one["pred"]
        assert int(one["n_tiles"]) == len(coords)
        kept = read_slide(out / "embeddings.zarr", SLIDE_ID)  # the same tile set, in the same order
        np.testing.assert_array_equal(kept.coords, coords)
        np.testing.assert_array_equal(kept.rowcol, rowcol)
        kept_patch = zarr.open_group(str(out / "patches.zarr" / SLIDE_ID), mode="r")
        assert kept_patch.attrs["complete"] and kept_patch.attrs["coords_only"] and "tiles" not in kept_patch
        np.testing.assert_array_equal(kept_patch["coords"][:], coords)
        np.testing.assert_array_equal(kept_patch["tissue_mask"][:], patch["tissue_mask"][:])
        np.testing.assert_allclose(
            kept.features.astype(np.float32), read_slide(tmp_path / "emb.zarr", SLIDE_ID).features.astype(np.float32),
            rtol=1e-3, atol=1e-3,
        )  # fmt: skip
        _check_geojson(out / "geojson" / f"{SLIDE_ID}.geojson", coords, (width, height), float(one["prob"]), name)


def _check_geojson(path: Path, coords: np.ndarray, size: tuple[int, int], prob: float, model: str) -> None:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    assert collection["properties"]["prediction"]["prob"] == pytest.approx(prob, abs=1e-6)
    tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "detection"]
    tissue = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(tiles) == len(coords) and 1 <= len(tissue) < 50
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        for ring in feature["geometry"]["coordinates"]:
            pts = np.asarray(ring, dtype=float)
            assert len(pts) >= 4 and (pts[0] == pts[-1]).all()
            assert pts.min() >= 0 and pts[:, 0].max() <= size[0] and pts[:, 1].max() <= size[1]
        measurements = feature["properties"].get("measurements", {})
        assert all(isinstance(v, float) for v in measurements.values())  # QuPath reads numbers
    # Tile squares sit at the stored level-0 coords; each carries its heatmap score.
    corners = np.array([t["geometry"]["coordinates"][0][0] for t in tiles])
    assert {tuple(c) for c in np.round(corners).astype(int)} == {tuple(c) for c in coords}
    kind = "attention" if model == "abmil" else "per-tile logit contribution"
    assert all(kind in t["properties"]["measurements"] for t in tiles)
    assert tissue[0]["properties"]["classification"]["name"] == "Tissue"
    assert any(k.startswith("P(") for k in tissue[0]["properties"]["measurements"])
