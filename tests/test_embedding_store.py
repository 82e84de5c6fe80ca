"""The one embedding-store module: its rules for every reader, its writer lock, and stores of the current layout."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from _classify_fixtures import write_slide
from _encode_fixtures import random_patch_store
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.errors import StoreError
from wsi_encoder.io.embedding_store import EmbeddingStore
from wsi_encoder.io.h5_export import write_h5_features
from wsi_encoder.io.store_lock import StoreLock
from wsi_encoder.pipelines.encode_store import encode_store
from wsi_encoder.pipelines.signatures import slide_vectors

GRID = (4, 5)
ROWCOL = np.argwhere(np.ones(GRID, bool))


def _store(path: Path, slides: dict[str, dict], *, status: dict[str, dict] | None = None, kind: str | None = "embedding_store") -> Path:
    """A store with one slide per entry of ``slides`` (options of ``write_slide``, plus ``features``)."""
    root = zarr.open_group(str(path), mode="w")
    rng = np.random.default_rng(0)
    for slide_id, opts in slides.items():
        features = opts.pop("features", rng.normal(size=(len(ROWCOL), 8)))
        rowcol = ROWCOL[: len(features)]
        write_slide(root, slide_id, features, rowcol, GRID, **opts)
    records = {sid: {"status": "ok", "reason": None, "source": sid} for sid in slides}
    records.update(status or {})
    attrs = {"slides": records} if kind is None else {"kind": kind, "slides": records}
    root.attrs.update(attrs)
    return path


def test_one_set_of_rules_for_listing_and_reading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nan = np.ones((len(ROWCOL), 8))
    nan[3, 2] = np.nan
    path = _store(
        tmp_path / "e.zarr",
        {"a": {}, "b": {"complete": False}, "c": {}, "empty": {"features": np.zeros((0, 8))}, "nan": {"features": nan}},
        status={"c": {"status": "failed", "reason": "slide unreadable", "source": "c"},
                "gone": {"status": "ok", "reason": None, "source": "gone"}},
    )  # fmt: skip
    del zarr.open_group(str(path), mode="a")["a"].attrs["complete"]  # absent counts as not complete
    zarr.open_group(str(path), mode="a")["b"].attrs["complete"] = False
    with caplog.at_level(logging.WARNING, logger="wsi_encoder"):
        store = EmbeddingStore.open(path)
        assert store.slide_ids == ("nan",)
    skipped = store.skipped
    assert set(skipped) == {"a", "b", "c", "empty", "gone"}
    assert "incomplete" in skipped["a"] and "incomplete" in skipped["b"]
    assert "slide unreadable" in skipped["c"] and "no tissue tiles" in skipped["empty"] and "has no group" in skipped["gone"]
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 5  # one warning per skipped slide
    for slide_id in ("a", "b", "c", "gone"):
        with pytest.raises(StoreError, match=rf"e\.zarr: slide '{slide_id}' is not usable: "):
            store.load(slide_id)
    with pytest.raises(StoreError, match="'b' is not usable: incomplete"):
        store.mean("b")
    # A complete slide without tiles is whole: its arrays read, empty; it is not offered to models.
    empty = store.read("empty")
    assert empty.features.shape == (0, 8) and not empty.mask.any()
    with pytest.raises(StoreError, match="not usable: no tissue tiles"):
        store.load("empty")
    with pytest.raises(StoreError, match="nan: features contain NaN"):
        store.load("nan")
    with pytest.raises(StoreError, match="nan: features contain NaN"):
        store.mean("nan")


def test_mean_and_load_agree_with_the_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(len(ROWCOL), 8)) * 30
    store = EmbeddingStore.open(_store(tmp_path / "e.zarr", {"a": {"features": features}}))
    stored = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")["a"]["features"][...]
    np.testing.assert_allclose(store.mean("a"), stored.astype(np.float64).mean(axis=0), rtol=1e-12)
    bag = store.load("a")
    np.testing.assert_array_equal(bag.grid(np.float16), store.stored_grid("a"))
    assert store.load("a") is bag  # cached


def test_signatures_skip_a_slide_whose_mean_is_not_finite_and_refuse_mixed_encoders(tmp_path: Path) -> None:
    nan = np.ones((len(ROWCOL), 8))
    nan[0, 0] = np.inf
    store = EmbeddingStore.open(_store(tmp_path / "e.zarr", {"a": {}, "b": {}, "bad": {"features": nan}}))
    ids, x, skipped = slide_vectors(store)
    assert ids == ["a", "b"] and x.shape == (2, 8) and "NaN or infinite" in skipped["bad"]
    other = {"name": "other", "config": {}, "weights_sha256": "1" * 64}
    mixed = EmbeddingStore.open(_store(tmp_path / "m.zarr", {"a": {}, "b": {"encoder": other}}))
    with pytest.raises(StoreError, match=r"m\.zarr: slides were encoded by different encoders"):
        slide_vectors(mixed)


def test_a_store_without_kind_is_refused_with_the_way_to_mark_it(tmp_path: Path) -> None:
    path = _store(tmp_path / "foreign.zarr", {"a": {}}, kind=None)
    with pytest.raises(StoreError, match=r"foreign\.zarr: has no root attribute kind") as err:
        EmbeddingStore.open(path)
    assert "\n" not in str(err.value)
    zarr.open_group(str(path), mode="a").attrs["kind"] = "embedding_store"  # the conversion the line gives
    assert EmbeddingStore.open(path).slide_ids == ("a",)
    patches = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
    patches.attrs["kind"] = "patch_store"
    with pytest.raises(StoreError, match="'patch_store' store, not an embedding store"):
        EmbeddingStore.open(tmp_path / "p.zarr", mode="a")


def test_a_store_written_by_encode_reads_the_same_everywhere(tmp_path: Path) -> None:
    patches = random_patch_store(tmp_path / "p.zarr", 9, GRID, slide_ids=("x", "y"))
    encode_store(patches, "nic", tmp_path / "e.zarr", chunk_tiles=4, dtype="float32")
    store = EmbeddingStore.open(tmp_path / "e.zarr")
    assert store.slide_ids == ("x", "y") and store.skipped == {} and store.embedding_dim == 128
    for slide_id in store.slide_ids:
        full, bag = store.read(slide_id), store.load(slide_id)
        np.testing.assert_array_equal(full.features, bag.features)
        np.testing.assert_array_equal(full.grid, bag.grid(np.float32))
        np.testing.assert_array_equal(full.mask, bag.mask)
        np.testing.assert_allclose(store.mean(slide_id), full.features.astype(np.float64).mean(axis=0))
    assert slide_vectors(store)[0] == ["x", "y"]


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process holding ``path``'s writer lock, as a running ``wsienc encode`` would."""
    code = (
        "import sys, time\n"
        "from wsi_encoder.io.store_lock import StoreLock\n"
        "StoreLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(300)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_encode_into_one_store_is_refused_naming_the_holder(tmp_path: Path) -> None:
    patches = random_patch_store(tmp_path / "p.zarr", 6, GRID)
    out = tmp_path / "e.zarr"
    holder = _hold_lock(out)
    try:
        with pytest.raises(StoreError) as err:
            encode_store(patches, "nic", out, chunk_tiles=4)
        message = str(err.value)
        assert "another wsienc run is writing this store" in message and "\n" not in message
        assert f"pid {holder.pid} on {socket.gethostname()} since " in message
        assert not out.exists()  # nothing written
        result = CliRunner().invoke(main, ["encode", str(patches), "--encoder", "nic", "--out", str(out)])
        assert result.exit_code == 1 and f"pid {holder.pid}" in result.output
        assert "Traceback" not in result.output
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock (a dead pid on this host) is taken over.
    assert (tmp_path / "e.zarr.lock").exists()
    result = encode_store(patches, "nic", out, chunk_tiles=4)
    assert result.slides["rand"].status == "ok"
    assert not (tmp_path / "e.zarr.lock").exists()


def test_every_writer_takes_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    with StoreLock(path), pytest.raises(StoreError, match="another wsienc run"):
        with EmbeddingStore.writer(path):
            pass
    with EmbeddingStore.writer(path) as store:
        assert (tmp_path / "e.zarr.lock").exists() and store.slide_ids == ()
    assert not (tmp_path / "e.zarr.lock").exists()


def test_h5_export_is_readable_by_the_group_and_leaves_nothing_behind(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_h5_features(tmp_path / "h5" / "a.h5", np.zeros((3, 4), np.float32), np.zeros((3, 2)), {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (tmp_path / "h5").iterdir()] == ["a.h5"]
    with pytest.raises(StoreError, match="do not align"):
        write_h5_features(tmp_path / "h5" / "b.h5", np.zeros((3, 4)), np.zeros((2, 2)), {})
    assert [p.name for p in (tmp_path / "h5").iterdir()] == ["a.h5"]


def test_a_folder_that_is_not_a_store_is_not_claimed(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for mode in ("r", "a"):
        with pytest.raises(StoreError, match="results: exists and is not a zarr store"):
            EmbeddingStore.open(folder, mode=mode)  # type: ignore[arg-type]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert EmbeddingStore.open(tmp_path / "new.zarr", mode="a").list_slides(usable_only=False) == []
