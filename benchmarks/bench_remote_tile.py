"""Benchmark tiling from and into object storage (a moto S3 server on 127.0.0.1) against local disk.

Generated pyramidal JPEG slides (default 2 of 8192 x 8192 at 0.5 µm/px) are tiled at 0.5 µm/px into
224 px tiles (``--tissue-threshold 0``: the full grid) with a ``distributed.LocalCluster`` of 1 and 2
single-threaded worker processes, once local disk -> local store and once ``s3://`` slides -> ``s3://``
store, interleaved (best of ``--repeat``). It prints tiles/s, the ratio of every run to the
local 1-process run of this same process, the load average, and the slides' and store's sizes.

The loopback server is a single Python process (moto): it measures the request pattern and the
client-side cost of S3 (signing, HTTP, no page cache), not a real S3's bandwidth or latency.

Usage::

    python benchmarks/bench_remote_tile.py [--size 8192] [--slides 2] [--repeat 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    from distributed import Client, LocalCluster
    from moto.server import ThreadedMotoServer

    from wsi_encoder.pipelines.tile_cohort import tile_cohort
    from wsi_encoder.tiling import TileSpec

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-remote-"))
    slides_dir = work / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(args.slides):
        path = slides_dir / f"s{i}.tiff"
        if not path.exists():
            write_synthetic_slide(path, SyntheticSlideSpec(width=args.size, height=args.size, mpp=0.5, seed=i, pieces=1))
        slides.append(path)

    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's access log, one line a request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("bench")
    fs.put(str(slides_dir) + "/", "s3://bench/slides/", recursive=True)
    spec = TileSpec(target_mpp=0.5, tile_size=224)
    results: dict[str, float] = {}
    n_tiles = 0
    try:
        for _ in range(args.repeat):
            for workers in (1, 2):
                for where in ("local", "s3"):
                    if where == "local":
                        src, out = [slides_dir], work / "out.zarr"
                        shutil.rmtree(out, ignore_errors=True)
                    else:
                        src, out = ["s3://bench/slides/"], "s3://bench/out.zarr"
                        if fs.exists("bench/out.zarr"):
                            fs.rm("bench/out.zarr", recursive=True)
                    with (
                        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                     dashboard_address=":0") as cluster,
                        Client(cluster) as client,
                    ):  # fmt: skip
                        t0 = time.perf_counter()
                        report = tile_cohort(src, out, spec, tissue_threshold=0.0, client=client)
                        seconds = time.perf_counter() - t0
                    n_tiles = report.n_tiles
                    key = f"{where}, {workers} worker process(es)"
                    results[key] = min(results.get(key, float("inf")), seconds)
        store_bytes = sum(fs.du("bench/out.zarr", total=False).values())
    finally:
        server.stop()
    base = n_tiles / results["local, 1 worker process(es)"]
    print(f"{args.slides} slide(s) of {args.size}^2 px, {n_tiles} tiles of 224 px, JPEG store; load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for key, seconds in results.items():
        rate = n_tiles / seconds
        print(f"{key:<34} {rate:8.0f} tiles/s   {rate / base:5.2f}x local 1-process")
    slide_bytes = sum(p.stat().st_size for p in slides)
    print(f"slides: {slide_bytes / 1e6:.1f} MB; store: {store_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
