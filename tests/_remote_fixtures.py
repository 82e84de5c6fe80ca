"""A moto S3 server on 127.0.0.1 for the remote-storage tests (started and stopped by the fixture)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BUCKET = "cohort"
#: Fake credentials for the loopback server only.
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "wsienc-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never look for credentials anywhere else (no instance-metadata traffic, no user files).
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/wsienc-test-credentials",
    "AWS_CONFIG_FILE": "/nonexistent/wsienc-test-config",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on loopback (module scope: one server per test file)."""
    pytest.importorskip("s3fs", reason="s3fs is needed for the object-storage tests (pip install .[dev])")
    server_mod = pytest.importorskip(
        "moto.server", reason="moto[server] is needed for the object-storage tests"
    )
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket ``s3://cohort-<random>`` on the loopback server, with this test's AWS environment set."""
    import s3fs

    for key in [k for k in os.environ if k.startswith("AWS_") or k == "WSIENC_STORAGE_OPTIONS"]:
        monkeypatch.delenv(key)
    for key, value in _ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    # A new bucket per test: worker processes cache open slides by URL, so URLs are never reused.
    bucket = f"{BUCKET}-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


def upload(s3_url: str, local: Path, key: str) -> str:
    """Copy a local file to ``s3_url/key``; return its URL."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    url = f"{s3_url}/{key}"
    fs.pipe(url, local.read_bytes())  # bytes, not fs.put: put leaves the local file open (a ResourceWarning)
    return url


@pytest.fixture
def faulty_s3(s3: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """``(bucket URL, proxy)``: the bucket of :func:`s3`, reached through a :class:`~tests.faulty_proxy.FaultyProxy`
    on 127.0.0.1 that fails 2% of the requests (seeded) and delays others; ``proxy.enabled = False``
    makes it a plain proxy. Started and stopped here."""
    import s3fs

    from tests.faulty_proxy import FaultyProxy

    proxy = FaultyProxy(s3_server, fault_rate=0.02, seed=23).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield s3, proxy
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
