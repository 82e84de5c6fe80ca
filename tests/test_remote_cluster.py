"""A dask LocalCluster of 2 worker processes tiles two slides from s3:// into s3:// and encodes the store;
the stores equal a local run's. The client only plans and records: workers open slides and stores by URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import _remote_fixtures as remote
from tests.test_remote_tile import SPEC, _slides, assert_same_features, assert_same_store
from wsi_encoder.pipelines.encode_store import encode_store
from wsi_encoder.pipelines.tile_cohort import tile_cohort

s3_server, s3, upload = remote.s3_server, remote.s3, remote.upload  # fixtures of this module


@pytest.mark.slow
def test_local_cluster_tiles_and_encodes_from_s3_like_a_local_run(s3: str, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    slides = _slides(tmp_path)
    for path in slides:
        upload(s3, path, f"cohort/{path.name}")
    tile_cohort([tmp_path / "slides"], tmp_path / "p.zarr", SPEC, chunk_tiles=16, workers=1)
    encode_store(tmp_path / "p.zarr", "nic", tmp_path / "e.zarr", chunk_tiles=16, dtype="float32")

    # Worker processes start after the test set AWS_* (fake credentials, the loopback endpoint): they inherit it.
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        report = tile_cohort([f"{s3}/cohort/"], f"{s3}/p.zarr", SPEC, chunk_tiles=16, client=client)
        assert not report.failed and len(report.ok) == 2
        result = encode_store(f"{s3}/p.zarr", "nic", f"{s3}/e.zarr", chunk_tiles=16, dtype="float32", client=client)
        assert all(r.status == "ok" for r in result.slides.values())
        # Both workers did work (the tasks ran on the cluster, not in the client).
        assert len(client.scheduler_info()["workers"]) == 2
    assert_same_store(tmp_path / "p.zarr", f"{s3}/p.zarr")
    assert_same_features(tmp_path / "e.zarr", f"{s3}/e.zarr", exact=False)
