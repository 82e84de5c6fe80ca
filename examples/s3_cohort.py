"""A cohort on object storage: tile and encode slides from ``s3://`` into ``s3://`` stores on a dask cluster.

Usage::

    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...   # or AWS_PROFILE, or an instance role
    export AWS_ENDPOINT_URL=https://minio.lab:9000            # only for MinIO / Ceph / other S3-compatible stores
    python examples/s3_cohort.py s3://bucket/slides/ --out s3://bucket/stores [--workers 2]
    python examples/s3_cohort.py s3://bucket/slides/ --out s3://bucket/stores --scheduler tcp://HOST:8786

Without ``--scheduler`` a ``distributed.LocalCluster`` of ``--workers`` processes is started (they
inherit this environment); with it, the work goes to a running scheduler whose workers have the
credentials in their own environment (docs/cluster.md). Workers read the slides and write the stores
by URL themselves: no pixels travel through this process. Run it again to resume.
"""

from __future__ import annotations

import argparse
import logging

from distributed import Client, LocalCluster

from wsi_encoder.io.urls import join
from wsi_encoder.pipelines.encode_store import encode_store
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="slide URLs or prefixes (s3://bucket/slides/), or local paths")
    parser.add_argument("--out", required=True, help="prefix for patches.zarr and embeddings.zarr (s3://bucket/stores)")
    parser.add_argument("--scheduler", default=None, help="address of a running dask scheduler")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster")
    parser.add_argument("--encoder", default="nic", help="registered encoder name or train-encoder checkpoint folder")
    parser.add_argument("--weights", default=None, help="local weights of a registered foundation encoder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    patches, embeddings = join(args.out, "patches.zarr"), join(args.out, "embeddings.zarr")
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        client = Client(LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None))
    with client:
        report = tile_cohort(args.inputs, patches, TileSpec(target_mpp=0.5, tile_size=224), client=client)
        for outcome in report.failed:
            print(f"failed: {outcome.slide_id}: {outcome.reason}")
        encoded = encode_store(patches, args.encoder, embeddings, weights=args.weights, client=client)
        ok = sum(r.status == "ok" for r in encoded.slides.values())
        print(f"{len(report.ok) + len(report.skipped)} slides tiled into {patches}, {ok} encoded into {embeddings}")


if __name__ == "__main__":
    main()
