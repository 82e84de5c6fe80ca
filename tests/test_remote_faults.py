"""Object-store faults survived, nothing lost: `tile` and `encode` to s3:// through a proxy that fails 2% of requests.

The proxy (:mod:`tests.faulty_proxy`) sits on 127.0.0.1 in front of the moto S3 server and answers a
seeded 2% of requests with 500 InternalError, 503 SlowDown, a connection reset (before or after the
request reached the server) or a body cut in half, and delays others. Runs through it must finish
and leave stores identical, object for object, to a run without faults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import _remote_fixtures as remote
from tests._tile_helpers import small_slide
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec

s3_server, s3, faulty_s3, upload = remote.s3_server, remote.s3, remote.faulty_s3, remote.upload
SPEC = TileSpec(target_mpp=0.5, tile_size=128)
#: Attributes that name a run rather than its result (start times, run ids).
_RUN_ATTRS = ("started", "finished", "created", "run_id", "updated")


def _store_objects(url: str, rename: tuple[str, str] = ("", "")) -> dict[str, Any]:
    """Every object of the store at ``url`` by key: bytes, or for ``zarr.json`` its JSON without run-specific
    attributes (with the store names in ``rename`` swapped, as an embedding store records its patch store)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=_direct_endpoint())
    inner = url.removeprefix("s3://")
    out: dict[str, Any] = {}
    for name in fs.find(inner):
        key = name[len(inner) :].lstrip("/")
        data = fs.cat_file(name)
        if key.endswith("zarr.json"):
            meta = json.loads(data.decode().replace(*rename)) if rename[0] else json.loads(data)
            attrs = meta.get("attributes", {})
            meta["attributes"] = _strip(attrs)
            out[key] = meta
        else:
            out[key] = data
    return out


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _RUN_ATTRS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


_DIRECT: list[str] = []


def _direct_endpoint() -> str:
    return _DIRECT[-1]


def assert_same_objects(clean: str, faulty: str, rename: tuple[str, str] = ("", "")) -> None:
    """Both stores hold the same keys with the same bytes (``zarr.json``: the same metadata and attributes)."""
    a, b = _store_objects(clean), _store_objects(faulty, rename)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key] == b[key], key


def test_tile_and_encode_through_faults_equal_a_clean_run(
    faulty_s3: tuple[str, Any], s3_server: str, tmp_path: Path
) -> None:
    from wsi_encoder.pipelines.encode_store import encode_store

    bucket, proxy = faulty_s3
    _DIRECT.append(s3_server)
    folder = tmp_path / "slides"
    folder.mkdir()
    slides = [
        small_slide(folder / "a.tiff", seed=1),
        small_slide(folder / "b.tiff", width=1600, height=1400, seed=2),
    ]
    proxy.enabled = False
    for path in slides:
        upload(bucket, path, f"cohort/{path.name}")
    tile_cohort([f"{bucket}/cohort"], f"{bucket}/clean.zarr", SPEC, chunk_tiles=8, workers=2)
    encode_store(f"{bucket}/clean.zarr", "nic", f"{bucket}/clean-e.zarr", chunk_tiles=8, dtype="float32")
    before = proxy.counts["requests"]
    proxy.enabled = True
    proxy.fault_rate = 0.04  # about 700 requests: every kind of fault several times
    report = tile_cohort([f"{bucket}/cohort"], f"{bucket}/faulty.zarr", SPEC, chunk_tiles=8, workers=2)
    assert not report.failed, [o.reason for o in report.failed]
    encoded = encode_store(
        f"{bucket}/faulty.zarr", "nic", f"{bucket}/faulty-e.zarr", chunk_tiles=8, dtype="float32"
    )
    assert not encoded.failed, [(s.slide_id, s.reason) for s in encoded.failed]
    proxy.enabled = False
    assert proxy.counts["requests"] - before > 500
    assert all(proxy.counts[kind] >= 2 for kind in proxy.KINDS), dict(proxy.counts)
    assert_same_objects(f"{bucket}/clean.zarr", f"{bucket}/faulty.zarr")
    assert_same_objects(f"{bucket}/clean-e.zarr", f"{bucket}/faulty-e.zarr", ("faulty.zarr", "clean.zarr"))


def test_retry_count_is_settable_and_reaches_both_retry_layers(
    s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_encoder.errors import InvalidParameterError
    from wsi_encoder.io.urls import DEFAULT_RETRIES, filesystem, storage_options, zarr_store

    monkeypatch.delenv("WSIENC_RETRIES", raising=False)
    assert storage_options(s3)["config_kwargs"]["retries"] == {
        "max_attempts": DEFAULT_RETRIES,
        "mode": "standard",
    }
    monkeypatch.setenv("WSIENC_RETRIES", "2")
    assert storage_options(s3)["config_kwargs"]["retries"] == {"max_attempts": 2, "mode": "standard"}
    assert filesystem(f"{s3}/x")[0].retries == 3
    assert zarr_store(f"{s3}/x.zarr").fs.retries == 3
    monkeypatch.setenv(
        "WSIENC_STORAGE_OPTIONS", json.dumps({"config_kwargs": {"retries": {"max_attempts": 9}}})
    )
    assert storage_options(s3)["config_kwargs"]["retries"] == {"max_attempts": 9}  # the user's own wins
    monkeypatch.setenv("WSIENC_RETRIES", "many")
    with pytest.raises(InvalidParameterError, match="WSIENC_RETRIES='many'"):
        storage_options(s3)


def test_without_retries_faults_fail_and_with_them_reads_succeed(
    faulty_s3: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    from wsi_encoder.io.urls import filesystem

    bucket, proxy = faulty_s3
    proxy.enabled = False
    fs, inner = filesystem(bucket)
    for i in range(12):
        fs.pipe_file(f"{inner}/o{i}", bytes([i]) * 1000)
    proxy.fault_rate = 0.3
    proxy.enabled = True

    def read_all() -> list[bytes]:
        s3fs.S3FileSystem.clear_instance_cache()
        fs, inner = filesystem(bucket)
        return [fs.cat_file(f"{inner}/o{i}") for i in range(12)]

    monkeypatch.setenv("WSIENC_RETRIES", "0")
    with pytest.raises(OSError):  # noqa: PT011 (s3fs raises OSError subclasses, with the server's message)
        read_all()
    monkeypatch.setenv("WSIENC_RETRIES", "8")
    assert read_all() == [bytes([i]) * 1000 for i in range(12)]
    assert proxy.faults() > 3


def test_a_lock_whose_create_answer_was_lost_is_ours(s3: str) -> None:
    """A conditional PUT that took effect but whose answer was reset is retried and refused (412): the lock
    holds our token, so the run goes on instead of refusing itself."""
    from wsi_encoder.io.store_lock import StoreLock

    class LostAnswer(StoreLock):
        def _create(self, record: dict[str, Any]) -> None:
            super()._create(record)
            raise FileExistsError(str(self.path))

    lock = LostAnswer(f"{s3}/p.zarr")
    lock.acquire()
    other = StoreLock(f"{s3}/p.zarr")
    other_record_refused = pytest.raises(Exception, match="another wsienc run is writing this store")
    import socket
    from unittest import mock

    with other_record_refused, mock.patch("wsi_encoder.io.store_lock.socket.gethostname", return_value="elsewhere"):
        other.acquire()
    assert socket.gethostname() != "elsewhere"
    lock.release()


KEY_ID, SECRET = "AKIAWSIENCLEAKCHECK7", "wsiencLeakCheckSecret/do-not-print+Q9"


def test_credentials_never_reach_stores_logs_or_error_lines(s3: str, s3_server: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import logging

    import s3fs
    from click.testing import CliRunner

    from wsi_encoder.cli import main
    from wsi_encoder.io.urls import describe_error

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
    _DIRECT.append(s3_server)
    folder = tmp_path / "slides"
    folder.mkdir()
    upload(s3, small_slide(folder / "a.tiff", seed=1), "cohort/a.tiff")
    texts: list[str] = []
    runner = CliRunner()  # -vv: every log line wsienc writes (DEBUG, tracebacks) is in the output
    try:
        for args in (
            ["-vv", "tile", f"{s3}/cohort/", "--out", f"{s3}/p.zarr", "--qc-dir", str(tmp_path / "qc"), "--workers", "1"],
            ["-vv", "encode", f"{s3}/p.zarr", "--encoder", "nic", "--out", f"{s3}/e.zarr", "--h5-dir", str(tmp_path / "h5")],
            ["-vv", "tile", f"{s3}/cohort/missing.tiff", "--out", f"{s3}/q.zarr"],  # a failure line
            ["info", f"s3://{KEY_ID}:{SECRET}@nosuchbucket-x/a.svs"],  # credentials in a URL
        ):
            result = runner.invoke(main, args)
            texts.append(result.output + str(result.exception or ""))
        assert "1 slide(s) tiled" in texts[0], texts[0]
    finally:
        logging.getLogger("wsi_encoder").handlers.clear()
    texts.append(describe_error(f"https://{KEY_ID}:{SECRET}@host/a.svs?X-Amz-Signature={SECRET}", OSError("boom")))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    assert (tmp_path / "qc" / "a.png").is_file() and (tmp_path / "h5" / "a.h5").is_file()
    assert "DEBUG" in texts[0] and "Error:" in texts[3]
    for url in (f"{s3}/p.zarr", f"{s3}/e.zarr"):
        texts.extend(repr(v) for v in _store_objects(url).values())
    assert len(texts) > 20
    for text in texts:
        for secret in (KEY_ID, SECRET, SECRET.split("/")[0]):
            assert secret not in text


def test_a_tile_run_killed_midway_resumes_to_an_identical_store(faulty_s3: tuple[str, Any], s3_server: str, tmp_path: Path) -> None:
    """A tile run in a subprocess, killed (SIGKILL) once some chunks are in; the re-run takes over the dead
    run's lock, redoes only what is missing and leaves the store identical to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import s3fs

    bucket, proxy = faulty_s3
    _DIRECT.append(s3_server)
    folder = tmp_path / "slides"
    folder.mkdir()
    proxy.enabled = False
    upload(bucket, small_slide(folder / "a.tiff", width=2400, height=2000, seed=3), "cohort/a.tiff")
    tile_cohort([f"{bucket}/cohort"], f"{bucket}/clean.zarr", SPEC, chunk_tiles=8, workers=1)
    proxy.enabled = True
    proxy.fault_rate, proxy.delay_rate, proxy.max_delay_s = 0.0, 1.0, 0.06  # slow, so the kill lands mid-run
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    script = (
        "from wsi_encoder.pipelines.tile_cohort import tile_cohort; from wsi_encoder.tiling import TileSpec; "
        f"tile_cohort([{bucket + '/cohort'!r}], {bucket + '/k.zarr'!r}, TileSpec(0.5, 128), chunk_tiles=8, workers=1)"
    )
    command = [sys.executable, "-c", script]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    marker_prefix = f"{bucket.removeprefix('s3://')}/k.zarr/a/chunks_done/c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(fs.find(marker_prefix)) >= 2:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    fs.invalidate_cache()
    assert fs.exists(f"{bucket.removeprefix('s3://')}/k.zarr.lock")  # the killed run left its lock
    n_before = len(fs.find(marker_prefix))
    n_chunks = len(fs.find(f"{bucket.removeprefix('s3://')}/clean.zarr/a/chunks_done/c"))
    assert 2 <= n_before < n_chunks  # killed mid-way: some chunks in, not all
    proxy.delay_rate, proxy.fault_rate = 0.1, 0.02
    report = tile_cohort([f"{bucket}/cohort"], f"{bucket}/k.zarr", SPEC, chunk_tiles=8, workers=1)
    assert not report.failed and [o.status for o in report.outcomes] == ["ok"]
    proxy.enabled = False
    assert_same_objects(f"{bucket}/clean.zarr", f"{bucket}/k.zarr")
