"""The same tile graph on a distributed LocalCluster and on `dask scheduler` / `dask worker` processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _tile_helpers import assert_stores_equal

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.pipelines.cluster import LocalRunner, TaskFailure, get_runner
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec

SPEC = TileSpec(0.5, 224)


@pytest.fixture(scope="module")
def local_store(synthetic_slide: Path, cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "local.zarr"
    report = tile_cohort([synthetic_slide, cmu_svs], out, SPEC, workers=2)
    assert sorted(o.status for o in report.outcomes) == ["ok", "ok"]
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
    for process in reversed(processes):
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.fixture
def dask_cluster_address() -> Iterator[str]:
    """A `dask scheduler` and one `dask worker` (2 threads) on loopback, always stopped afterwards."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            **quiet,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert processes[0].poll() is None, "dask scheduler exited"
            time.sleep(0.2)
        worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "2"]
        processes.append(subprocess.Popen([*worker, "--no-dashboard", "--host", "127.0.0.1"], **quiet))
        yield address
    finally:
        _stop(processes)


@pytest.mark.slow
def test_local_cluster_with_two_worker_processes(local_store: Path, synthetic_slide: Path, cmu_svs: Path, tmp_path: Path) -> None:
    out = tmp_path / "processes.zarr"
    report = tile_cohort([synthetic_slide, cmu_svs], out, SPEC, workers=2, scheduler="processes")
    assert "dask.distributed" in report.runner and "2 worker(s)" in report.runner
    assert sorted(o.status for o in report.outcomes) == ["ok", "ok"]
    assert_stores_equal(local_store, out)


@pytest.mark.slow
def test_dask_scheduler_and_worker_processes(
    local_store: Path, synthetic_slide: Path, cmu_svs: Path, tmp_path: Path, dask_cluster_address: str
) -> None:
    out = tmp_path / "remote.zarr"
    report = tile_cohort([synthetic_slide, cmu_svs], out, SPEC, scheduler=dask_cluster_address)
    assert dask_cluster_address in report.runner
    assert sorted(o.status for o in report.outcomes) == ["ok", "ok"]
    assert_stores_equal(local_store, out)


def _double_or_fail(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    time.sleep(0.002)
    return 2 * x


def test_local_runner_yields_every_result_and_reports_failures() -> None:
    results = dict(LocalRunner(2).map_unordered(_double_or_fail, list(range(20))))
    assert sorted(results) == list(range(20))
    assert isinstance(results[3], TaskFailure) and "three" in results[3].error
    assert all(results[i] == 2 * i for i in range(20) if i != 3)


def test_local_runner_stops_early_when_the_caller_does() -> None:
    calls: list[int] = []

    def slow(x: int) -> int:
        calls.append(x)
        time.sleep(0.01)
        return x

    results = LocalRunner(2).map_unordered(slow, list(range(300)))
    next(results)
    results.close()  # what a for-loop does on an exception
    ran = len(calls)
    time.sleep(0.1)
    assert ran == len(calls) < 300


def test_scheduler_values_are_checked() -> None:
    for bad in ("bogus", "tcp://host", "http://host:80", "tcp://a b:1"):
        with pytest.raises(InvalidParameterError, match="--scheduler"):
            get_runner(None, bad)
    with pytest.raises(InvalidParameterError, match="--workers"):
        get_runner(0)
    assert isinstance(get_runner(3, "threads"), LocalRunner)
