"""`wsienc encode` on a dask.distributed cluster equals the in-process run; workers load the model once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _encode_fixtures import random_patch_store
from distributed import Client, LocalCluster

from wsi_encoder.compression import encoder_loads
from wsi_encoder.io.embedding_store import read_slide
from wsi_encoder.pipelines.encode_store import encode_store


@pytest.mark.slow
def test_two_worker_cluster_equals_a_local_run(tmp_path: Path) -> None:
    store = random_patch_store(tmp_path / "p.zarr", 48, (8, 9), slide_ids=("s0", "s1", "s2"))
    options = {"dtype": "float32", "chunk_tiles": 16, "batch_size": 8, "h5_dir": None}
    local = encode_store(store, "nic", tmp_path / "local.zarr", **options)
    assert all(r.status == "ok" for r in local.slides.values())

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        ticks: list[int] = []
        remote = encode_store(
            store, "nic", tmp_path / "cluster.zarr", scheduler=cluster.scheduler_address,
            progress=lambda n, total: ticks.append(n), **options,
        )  # fmt: skip
        loads = client.run(encoder_loads)
    assert {s: r.status for s, r in remote.slides.items()} == {"s0": "ok", "s1": "ok", "s2": "ok"}
    assert sum(ticks) == 3 * 48
    # 9 chunk tasks ran on 2 workers; each worker built the encoder at most once.
    assert len(loads) == 2 and all(n <= 1 for n in loads.values()) and sum(loads.values()) >= 1
    for slide_id in ("s0", "s1", "s2"):
        a, b = read_slide(tmp_path / "local.zarr", slide_id), read_slide(tmp_path / "cluster.zarr", slide_id)
        np.testing.assert_allclose(b.features, a.features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.grid, a.grid, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(b.mask, a.mask)



def test_storage_options_travel_to_workers_started_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers of an existing cluster did not inherit the client's --storage-options and --retries: each task carries them."""
    import os

    from wsi_encoder.io.urls import RETRIES_ENV, STORAGE_OPTIONS_ENV, set_storage_options
    from wsi_encoder.pipelines.cluster import get_runner

    monkeypatch.delenv(STORAGE_OPTIONS_ENV, raising=False)
    monkeypatch.delenv(RETRIES_ENV, raising=False)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        set_storage_options('{"anon": true, "endpoint_url": "http://127.0.0.1:9"}')  # after the worker started
        monkeypatch.setenv(RETRIES_ENV, "7")  # --retries 7 on the client, after the worker started
        try:
            runner = get_runner(client=client)
            seen = dict(runner.map_unordered(lambda _: (os.environ.get(STORAGE_OPTIONS_ENV), os.environ.get(RETRIES_ENV)), [0, 1]))
        finally:
            set_storage_options(None)
    assert seen == {0: ('{"anon": true, "endpoint_url": "http://127.0.0.1:9"}', "7"), 1: seen[0]}
