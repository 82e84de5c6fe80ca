"""The outputs of lomo, signatures, tile QC, synthetic slides and GeoJSON go through io/files.py.

What a user on a shared cluster sees: results readable by the lab (0644 under umask 022), and a write
that fails half-way (a full disk, Ctrl-C) leaves the previous result in place and no temporary beside it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from wsi_encoder.evaluation.lomo_outputs import save_fold_embeddings, write_results_csv
from wsi_encoder.evaluation.lomo_report import plot_metrics_by_fold
from wsi_encoder.evaluation.signature_records import ArmJaccard
from wsi_encoder.evaluation.signature_report import plot_jaccard_heatmap
from wsi_encoder.io.geojson import write_feature_collection
from wsi_encoder.synthetic.slides import SyntheticSlideSpec, write_synthetic_slide
from wsi_encoder.training.lomo_data import build_image_cache


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _left_over(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _embedding_arrays() -> dict[str, list]:
    side = {"X": np.zeros((2, 3)), "y": [0, 1], "patient": ["p1", "p2"], "magnification": [40, 40],
            "filename": ["a.png", "b.png"]}
    arrays: dict[str, list] = {}
    for s in ("train", "test"):
        arrays.update({f"{k}_{s}": v for k, v in side.items()})
    arrays["prob_test"] = [0.2, 0.9]
    return arrays


def test_lomo_and_geojson_outputs_are_readable_by_the_group(tmp_path: Path, umask_022: None) -> None:
    npz = save_fold_embeddings(tmp_path / "emb" / "heldout_40.npz", _embedding_arrays())
    csv = write_results_csv(tmp_path / "results.csv", [{"arm": "baseline", "held_out": 40, "auc": 0.5}])
    geo = write_feature_collection(tmp_path / "a.geojson", [], {"slide": "s"})
    assert [_mode(p) for p in (npz, csv, geo)] == [0o644] * 3
    assert csv.read_text().splitlines()[1].startswith("baseline,40,0.500000")
    assert _left_over(tmp_path, {"emb", "results.csv", "a.geojson"}) == []
    assert _left_over(tmp_path / "emb", {"heldout_40.npz"}) == []


def _failing_savefig(self: Figure, fname: object, **kwargs: object) -> None:
    Path(str(fname)).write_bytes(b"half a png")
    raise OSError("No space left on device")


def test_a_report_figure_that_fails_keeps_the_old_picture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"arm": "baseline", "held_out": 40, "auc": 0.9, "brier": 0.1}]
    lomo_png = plot_metrics_by_fold(rows, tmp_path / "metrics_by_fold.png")
    m = np.array([[1.0, 0.5], [0.5, 1.0]])
    jac = ArmJaccard("baseline", ("40", "100"), m, m / 4, m, 16)
    sig_png = plot_jaccard_heatmap(jac, {"40": 3, "100": 3}, tmp_path / "jaccard_baseline.png")
    before = {p: p.read_bytes() for p in (lomo_png, sig_png)}
    assert all(b.startswith(b"\x89PNG") for b in before.values())
    monkeypatch.setattr(Figure, "savefig", _failing_savefig)
    with pytest.raises(OSError, match="No space"):
        plot_metrics_by_fold(rows, lomo_png)
    with pytest.raises(OSError, match="No space"):
        plot_jaccard_heatmap(jac, {"40": 3, "100": 3}, sig_png)
    assert {p: p.read_bytes() for p in before} == before
    assert _left_over(tmp_path, {lomo_png.name, sig_png.name}) == []


def test_an_interrupted_image_cache_leaves_nothing_and_is_rebuilt(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    cache = tmp_path / "cache"

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_image_cache(paths, 8, cache, on_image=stop)
    assert list(cache.iterdir()) == []
    images, failed = build_image_cache(paths, 8, cache)
    assert images.shape == (3, 8, 8, 3) and failed == {}
    assert int(images[2].mean()) == 80
    assert sorted(p.name for p in cache.iterdir()) == ["images_8.json", "images_8.npy"]


def test_a_synthetic_slide_is_written_whole_or_not_at_all(tmp_path: Path, umask_022: None) -> None:
    spec = SyntheticSlideSpec(width=512, height=384, tile_size=256, seed=1)
    path = write_synthetic_slide(tmp_path / "s.tif", spec)
    assert _mode(path) == 0o644
    good = path.read_bytes()

    def boom(done: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_synthetic_slide(path, SyntheticSlideSpec(width=512, height=384, tile_size=256, seed=2), progress=boom)
    assert path.read_bytes() == good
    assert _left_over(tmp_path, {"s.tif"}) == []
