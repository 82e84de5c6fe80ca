"""Tiling slides from and into s3:// on a moto S3 server on 127.0.0.1: same store as a local run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tests import _remote_fixtures as remote
from tests._tile_helpers import small_slide
from wsi_encoder.io.patch_store import open_patch_store
from wsi_encoder.io.urls import exists, zarr_store
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec

s3_server, s3, upload = remote.s3_server, remote.s3, remote.upload  # fixtures of this module
SPEC = TileSpec(target_mpp=0.5, tile_size=128)


def _slides(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "slides"
    folder.mkdir()
    return [small_slide(folder / "a.tiff", seed=1), small_slide(folder / "b.tiff", width=1600, height=1400, seed=2)]


def assert_same_store(local: Path | str, remote: str) -> None:
    """The remote store holds the same slides, attributes and arrays as the local one."""
    a = open_patch_store(local)
    b = open_patch_store(remote)
    assert a.slide_ids == b.slide_ids and a.slide_ids
    for slide_id in a.slide_ids:
        sa, sb = a[slide_id], b[slide_id]
        assert sa.complete and sb.complete
        assert {k: v for k, v in sa.attrs.items() if k != "source"} == {k: v for k, v in sb.attrs.items() if k != "source"}
        for name in ("coords", "grid", "tissue", "thumbnail", "tissue_mask"):
            assert np.array_equal(getattr(sa, name), getattr(sb, name)), (slide_id, name)
        assert sa.tiles is not None and sb.tiles is not None
        assert np.array_equal(np.asarray(sa.tiles[:]), np.asarray(sb.tiles[:])), slide_id


@pytest.mark.parametrize("codec", ["jpeg", "zstd"])
def test_tile_s3_prefix_into_s3_store_equals_local(s3: str, tmp_path: Path, codec: str) -> None:
    slides = _slides(tmp_path)
    for path in slides:
        upload(s3, path, f"cohort/{path.name}")
    local = tmp_path / "local.zarr"
    tile_cohort([tmp_path / "slides"], local, SPEC, codec=codec, chunk_tiles=16, workers=2)
    report = tile_cohort([f"{s3}/cohort/"], f"{s3}/stores/patches.zarr", SPEC, codec=codec, chunk_tiles=16, workers=2)
    assert not report.failed and len(report.ok) == 2
    assert_same_store(local, f"{s3}/stores/patches.zarr")
    # The source recorded is the URL; nothing of the credentials is.
    store = open_patch_store(f"{s3}/stores/patches.zarr")
    assert store.status["a"]["source"] == f"{s3}/cohort/a.tiff"
    root = zarr.open_group(zarr_store(f"{s3}/stores/patches.zarr", read_only=True), mode="r")
    text = str(dict(root.attrs)) + "".join(str(dict(g.attrs)) for _, g in root.groups())
    assert "wsienc-test-secret" not in text and "testing" not in text


def test_remote_tile_resumes_after_interruption(s3: str, tmp_path: Path) -> None:
    slides = _slides(tmp_path)
    for path in slides:
        upload(s3, path, f"cohort/{path.name}")
    out = f"{s3}/patches.zarr"
    tile_cohort([f"{s3}/cohort"], out, SPEC, chunk_tiles=8, workers=1)
    # Interrupt: slide a loses its completion flag and half of its chunk markers (as if killed mid-run).
    root = zarr.open_group(zarr_store(out), mode="r+")
    group = root["a"]
    n_chunks = group["chunks_done"].shape[0]
    assert n_chunks >= 2
    done = np.ones(n_chunks, dtype=bool)
    done[n_chunks // 2 :] = False
    group["chunks_done"][:] = done
    group["tiles"][(n_chunks // 2) * 8 :] = 0
    group.attrs.update({"complete": False})
    # The killed run left its lock object: a dead process on this host, so the next run takes it over.
    import json
    import socket

    from wsi_encoder.io.urls import open_file

    with open_file(f"{out}.lock", "wb") as handle:
        handle.write(json.dumps({"pid": 4_000_000, "host": socket.gethostname(), "started": "then"}).encode())
    report = tile_cohort([f"{s3}/cohort"], out, SPEC, chunk_tiles=8, workers=1)
    assert not report.failed
    assert {o.slide_id: o.status for o in report.outcomes} == {"a": "ok", "b": "skipped"}
    local = tmp_path / "local.zarr"
    tile_cohort([tmp_path / "slides"], local, SPEC, chunk_tiles=8, workers=1)
    assert_same_store(local, out)


def _features(store: Path | str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from wsi_encoder.io.embedding_store import EmbeddingStore

    embeddings = EmbeddingStore.open(store)
    out = {}
    for slide_id in embeddings.slide_ids:
        slide = embeddings.read(slide_id)
        out[slide_id] = (slide.features, slide.coords, slide.mask)
    return out


def assert_same_features(local: Path | str, remote_store: str, exact: bool = True) -> None:
    """Same slides, coords and masks; features equal (``exact``), or to float32 rounding when the
    encoder ran with another number of torch threads (worker processes use one)."""
    a, b = _features(local), _features(remote_store)
    assert sorted(a) == sorted(b) and a
    for slide_id in a:
        (fa, ca, ma), (fb, cb, mb) = a[slide_id], b[slide_id]
        assert np.array_equal(ca, cb) and np.array_equal(ma, mb), slide_id
        if exact:
            assert np.array_equal(fa, fb), slide_id
        else:
            np.testing.assert_allclose(fb, fa, rtol=1e-5, atol=1e-6)


def test_remote_encode_equals_local(s3: str, tmp_path: Path) -> None:
    from wsi_encoder.pipelines.encode_store import encode_store

    slides = _slides(tmp_path)
    for path in slides:
        upload(s3, path, f"cohort/{path.name}")
    tile_cohort([tmp_path / "slides"], tmp_path / "p.zarr", SPEC, chunk_tiles=16, workers=1)
    tile_cohort([f"{s3}/cohort"], f"{s3}/p.zarr", SPEC, chunk_tiles=16, workers=1)
    local = encode_store(tmp_path / "p.zarr", "nic", tmp_path / "e.zarr", chunk_tiles=16, dtype="float32")
    remote_run = encode_store(f"{s3}/p.zarr", "nic", f"{s3}/e.zarr", chunk_tiles=16, dtype="float32")
    assert {k: r.status for k, r in remote_run.slides.items()} == {k: r.status for k, r in local.slides.items()}
    assert_same_features(tmp_path / "e.zarr", f"{s3}/e.zarr")


def test_second_writer_is_refused_on_s3(s3: str, tmp_path: Path) -> None:
    from wsi_encoder.errors import StoreError
    from wsi_encoder.io.store_lock import StoreLock

    upload(s3, small_slide(tmp_path / "a.tiff"), "cohort/a.tiff")
    out = f"{s3}/p.zarr"
    first = StoreLock(out)
    first.acquire()
    try:
        # Another run (here: another host) cannot take the lock, and tiling refuses with one line naming it.
        with pytest.raises(StoreError, match="another wsienc run is writing this store"):
            tile_cohort([f"{s3}/cohort"], out, SPEC, workers=1)
        assert not exists(f"{out}/a")  # nothing was written
    finally:
        first.release()
    assert not exists(f"{out}.lock")
    report = tile_cohort([f"{s3}/cohort"], out, SPEC, workers=1)
    assert len(report.ok) == 1


def test_remote_region_reads_are_few_merged_range_requests(s3: str, tmp_path: Path) -> None:
    """A region's TIFF tiles arrive in one batch of merged ranges (at most one per TIFF tile row), and
    the pixels equal the local direct-decoding path's."""
    from wsi_encoder.io.remote_slides import RemoteTiffSlideReader
    from wsi_encoder.io.slides import open_slide

    local = small_slide(tmp_path / "big.tiff", width=6000, height=5000)
    remote_reader = open_slide(upload(s3, local, "slides/big.tiff"))
    assert isinstance(remote_reader, RemoteTiffSlideReader)
    batches: list[int] = []
    fs = remote_reader._file._fs
    original = fs.cat_ranges
    fs.cat_ranges = lambda paths, starts, ends, **kw: (batches.append(len(paths)), original(paths, starts, ends, **kw))[1]
    try:
        with open_slide(local) as local_reader:
            region = (1000, 1000, 1800, 1700)
            assert np.array_equal(remote_reader.read_level(0, *region), local_reader.read_level(0, *region))
    finally:
        fs.cat_ranges = original
        remote_reader.close()
    tile_rows = -(-1700 // 256) + 1  # the generated slide has 256 px TIFF tiles
    assert len(batches) == 1 and 1 <= batches[0] <= tile_rows


def test_http_slide_is_read_only_and_equals_local(tmp_path: Path) -> None:
    """``http(s)://`` slides are read (range requests) like local ones; writing a store there is refused."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from wsi_encoder.errors import InvalidParameterError
    from wsi_encoder.io.slides import open_slide

    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp")
    slide = small_slide(tmp_path / "a.tiff")
    data = slide.read_bytes()

    class RangeHandler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, body: bool) -> None:
            start, end = 0, len(data) - 1
            header = self.headers.get("Range")
            if header:
                first, _, last = header.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            self.send_response(206 if header else 200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            if header:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(data[start : end + 1])

        def do_HEAD(self) -> None:
            self._send(body=False)

        def do_GET(self) -> None:
            self._send(body=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.tiff"
        with open_slide(url) as remote_reader, open_slide(slide) as local_reader:
            assert remote_reader.backend == "tiffslide"
            assert np.array_equal(remote_reader.read_level(0, 100, 200, 900, 700), local_reader.read_level(0, 100, 200, 900, 700))
        with pytest.raises(InvalidParameterError, match="read-only"):
            tile_cohort([slide], f"http://127.0.0.1:{server.server_address[1]}/p.zarr", SPEC)
    finally:
        server.shutdown()
        server.server_close()


def test_a_real_ndpi_reads_and_tiles_over_s3_as_locally(s3: str, tmp_path: Path, ndpi_slide: Path) -> None:
    """The Hamamatsu NDPI through s3:// (tifffile reads its McuStarts into a numpy buffer: readinto must fill any
    buffer) has the levels, µm/px and pixels of the local file read by the same backend, and tiles to the same store."""
    from wsi_encoder.io.slides import open_slide

    url = upload(s3, ndpi_slide, f"ndpi/{ndpi_slide.name}")
    local, far = open_slide(ndpi_slide, backend="tiffslide"), open_slide(url)
    try:
        assert far.level_dimensions == local.level_dimensions and far.mpp == local.mpp
        for level, xy in ((0, (1000, 1200)), (1, (0, 0)), (far.level_count - 1, (0, 0))):
            assert np.array_equal(far.read_region(xy, level, (300, 200)), local.read_region(xy, level, (300, 200)))
    finally:
        local.close()
        far.close()
    spec = TileSpec(target_mpp=1.0, tile_size=128)
    tile_cohort([ndpi_slide], tmp_path / "local.zarr", spec, backend="tiffslide", tissue_threshold=0.0, workers=1)
    report = tile_cohort([url], f"{s3}/stores/ndpi.zarr", spec, tissue_threshold=0.0, workers=1)
    assert not report.failed, report.failed
    assert_same_store(tmp_path / "local.zarr", f"{s3}/stores/ndpi.zarr")
