"""A cohort on a dask.distributed cluster: tile and encode many slides with the same graph as locally.

Usage::

    python examples/cluster_cohort.py SLIDE_OR_DIR... --out OUT [--scheduler tcp://HOST:8786] [--workers 2]

Without ``--scheduler`` a ``distributed.LocalCluster`` with ``--workers`` worker processes is started
(the same code path as a real cluster); with it, the work goes to a running scheduler (``dask scheduler``
on one machine, ``dask worker tcp://HOST:8786`` on each of the others, all seeing the same file system).
Workers open the slides themselves: no pixels travel through the client.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from distributed import Client, LocalCluster

from wsi_encoder.pipelines.encode_store import encode_store
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="slide files or folders of slides")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--scheduler", default=None, help="address of a running dask scheduler")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster")
    parser.add_argument("--encoder", default="nic", help="train-encoder checkpoint folder or registered name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.scheduler:
        client = Client(args.scheduler)
    else:
        client = Client(LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True))
    with client:
        print(f"dask dashboard: {client.dashboard_link}")
        report = tile_cohort(args.inputs, args.out / "patches.zarr", TileSpec(target_mpp=0.5, tile_size=128), client=client)
        for outcome in report.failed:
            print(f"failed: {outcome.slide_id}: {outcome.reason}")
        encoded = encode_store(args.out / "patches.zarr", args.encoder, args.out / "embeddings.zarr", client=client)
        ok = sum(r.status == "ok" for r in encoded.slides.values())
        print(f"{len(report.ok) + len(report.skipped)} slides tiled, {ok} encoded -> {args.out / 'embeddings.zarr'}")


if __name__ == "__main__":
    main()
