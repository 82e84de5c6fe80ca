"""Benchmark ``wsienc encode``: tiles/s of the whole pipeline vs the bare model forward, and compression.

Both run in this process, on the same tiles, with the same batch size and device:

* baseline: ``model(x)`` under ``torch.inference_mode`` on float tensors already in memory;
* encode: :func:`wsi_encoder.pipelines.encode_store.encode_store` on a patch store holding those
  tiles (JPEG-coded like ``wsienc tile`` writes by default, or zstd), including tile decoding,
  resampling checks, writing features, assembling the grid and marking slides complete.

The ratio encode / baseline is the pipeline's efficiency (target ≥ 0.9 for ``resnet50-trunc`` and a
ViT-B entry). Both sides run the same prepared model (:class:`wsi_encoder.models.inference.InferenceModel`:
same ``--precision``, ``channels_last`` for CNNs, optional ``--compile``). Each side is timed
``--repeats`` times, interleaved, and the best run of each is kept (the machine is shared). The
compression factor is the bytes of the stored pixels over the bytes of the embeddings.

Pretrained entries need weights: ``--weights FILE`` (one encoder), or by default random weights of
the architecture are written to a temporary file (speed does not depend on the values).

``--null`` measures the feed instead: ``encode_store`` runs with a model that does no work on a JPEG
patch store of 224 px tiles, with 1, 2 and 4 workers, and its tiles/s are printed against the JPEG-decode
bound of the same tiles (every stored JPEG decoded once on as many threads into a buffer each reuses,
bytes already in memory; best of three). Two figures per worker count:

* **CPU device** (on a GPU: the run on the GPU, the only figure): ``--device cpu`` as a user runs it, the
  model the mean of each tile. The CPU then
  also does what a GPU does on the device: converting uint8 tiles to float (``tiles_to_tensor``), and
  the mean itself;
* **host side of a GPU run**: the same run with ``tiles_to_tensor`` replaced by what it does on the
  host for CUDA (the batch copied into a reused staging buffer, as into pinned memory; the conversion
  and any resize run on the GPU), and a model that reads one pixel. That is the rate at which
  ``wsienc encode`` can feed a GPU from these cores: decoding, batching, writing the features.

``--gpu-suite`` is the one GPU command of issue 21: the model forward's tiles/s of ``resnet50-trunc``, ``uni``
(ViT-L/16), ``virchow2`` (ViT-H/14) and ``h-optimus-0`` (ViT-g/14) at fp32 and bf16, eager and with
``--compile`` (the same :class:`~wsi_encoder.models.inference.InferenceModel` ``wsienc encode`` runs), on
device-resident 224-px batches, after printing the device and the library versions. The architectures get
random values on the device (built on ``meta``, no weights file: speed does not depend on the values). Each
configuration is timed for ``--config-seconds`` after its warm-up (which includes compilation); a configuration
is skipped, with a line saying so, once ``--budget-s`` has passed, so the command ends in under 5 minutes on one
GPU. The eager configurations of all four run first. Without CUDA it says so in one line and exits 0
(``--device cpu`` runs it anyway, to check the script, not for figures).

Run: ``.venv/bin/python benchmarks/bench_encode.py [--encoder resnet50-trunc,phikon] [--tiles 512] [--batch-size 64]``
or ``.venv/bin/python benchmarks/bench_encode.py --null [--tiles 8192] [--workers 1,2,4]``
or ``.venv/bin/python benchmarks/bench_encode.py --gpu-suite [--budget-s 270] [--config-seconds 8]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from wsi_encoder.compression import load_encoder_cached
from wsi_encoder.devices import resolve_device
from wsi_encoder.io.slides import open_slide
from wsi_encoder.pipelines.encode_store import encode_store
from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_store(folder: Path, n_tiles: int, tile: int, codec: str) -> Path:
    """A one-slide patch store of ``n_tiles`` real-looking tiles (a synthetic H&E slide, read at level 0)."""
    cols = 16
    rows = -(-n_tiles // cols)
    spec = SyntheticSlideSpec(width=cols * tile, height=rows * tile, mpp=0.5, seed=5, pieces=4)
    slide = write_synthetic_slide(folder / "bench.tif", spec)
    with open_slide(slide) as reader:
        tiles = np.stack(
            [reader.read_region(((i % cols) * tile, (i // cols) * tile), 0, (tile, tile)) for i in range(n_tiles)]
        )
        thumb = reader.get_thumbnail(256)
    grid = np.stack([np.arange(n_tiles) // cols, np.arange(n_tiles) % cols], axis=1).astype(np.int32)
    root = zarr.open_group(str(folder / "patches.zarr"), mode="w")
    group = root.create_group("bench")
    if codec == "jpeg":
        from wsi_encoder.io.jpeg_codec import JpegTileCodec

        group.create_array("tiles", data=tiles, chunks=(64, tile, tile, 3), serializer=JpegTileCodec(quality=90), compressors=None)
    else:
        group.create_array("tiles", data=tiles, chunks=(64, tile, tile, 3))
    group.create_array("coords", data=grid[:, ::-1].astype(np.int64) * tile)
    group.create_array("grid", data=grid)
    group.create_array("thumbnail", data=thumb)
    group.attrs.update(
        {
            "source": str(slide), "backend": "tiffslide", "width": spec.width, "height": spec.height, "slide_mpp": 0.5,
            "target_mpp": 0.5, "actual_mpp": 0.5, "tile_size": tile, "stride": tile, "tile_size_l0": float(tile),
            "stride_l0": float(tile), "level": 0, "resampled": False, "grid_shape": [rows, cols], "codec": codec,
            "coords_only": False, "complete": True,
        }
    )  # fmt: skip
    root.attrs.update({"kind": "patch_store", "slides": {"bench": {"status": "ok", "reason": None, "source": str(slide)}}})
    return folder / "patches.zarr"


def _weights_for(name: str, weights: str | None, work: Path) -> str | None:
    """The user's file, or random weights of a pretrained architecture saved to ``work``."""
    from safetensors.torch import save_file

    from wsi_encoder.models.encoders import create_encoder, get_spec

    if weights is not None or not get_spec(name).requires_weights:
        return weights
    enc = create_encoder(name, require_weights=False)
    path = work / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return str(path)


def bench_one(name: str, args: argparse.Namespace, work: Path) -> float:
    """Measure one encoder; returns encode / bare ratio."""
    weights = _weights_for(name, args.weights, work)
    tiles = args.tiles or (8192 if name == "nic" or resolve_device(args.device).type == "cuda" else 512)
    model, identity = load_encoder_cached(
        name, weights, args.device, precision=args.precision, compile=args.compile
    )
    device = resolve_device(args.device)
    tile = identity.input_size
    folder = work / name
    folder.mkdir()
    store = make_store(folder, tiles, tile, args.codec)
    pixels = np.asarray(zarr.open_array(str(store / "bench" / "tiles"), mode="r")[:])
    batches = [
        torch.from_numpy(pixels[i : i + args.batch_size]).permute(0, 3, 1, 2).float().div(255).to(device)
        for i in range(0, tiles, args.batch_size)
    ]
    with torch.inference_mode():  # warm-up (oneDNN primitives for each batch shape; compilation)
        for x in (batches[0], batches[0], batches[-1]):
            model(x)

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def pipeline(k: int) -> float:
        out = folder / f"emb{k}.zarr"
        t0 = time.perf_counter()
        result = encode_store(store, name, out, weights=weights, batch_size=args.batch_size, device=args.device,
                              dtype=args.dtype, precision=args.precision, compile=args.compile)  # fmt: skip
        elapsed = time.perf_counter() - t0
        if result.failed:
            raise SystemExit(f"encode failed: {result.failed}")
        return elapsed

    base_times, enc_times = [], []
    for k in range(args.repeats):
        base_times.append(bare())
        enc_times.append(pipeline(k))
    base_rate = tiles / min(base_times)
    enc_rate = tiles / min(enc_times)

    features_bytes = _dir_bytes(folder / "emb0.zarr" / "bench" / "features")
    grid_bytes = _dir_bytes(folder / "emb0.zarr" / "bench" / "grid")
    raw_pixels = pixels.nbytes
    stored_pixels = _dir_bytes(store / "bench" / "tiles")
    raw_features = tiles * identity.embedding_dim * np.dtype(args.dtype).itemsize

    print(f"encoder {name} ({identity.embedding_dim}-d, {tile} px), {tiles} tiles, batch {args.batch_size}, "
          f"device {device}, precision {args.precision}{', compiled' if args.compile else ''}, "
          f"torch threads {torch.get_num_threads()}, tiles stored as {args.codec}")  # fmt: skip
    print(f"bare forward (in-memory tensors): {base_rate:9.1f} tiles/s   runs {', '.join(f'{t:.2f}' for t in base_times)} s")
    print(f"wsienc encode (store → store):    {enc_rate:9.1f} tiles/s   runs {', '.join(f'{t:.2f}' for t in enc_times)} s")
    print(f"ratio encode / bare forward:      {enc_rate / base_rate:9.3f}   (target >= 0.9)")
    print(f"compression, raw pixels / raw {args.dtype} features:   {raw_pixels / raw_features:8.1f}x "
          f"({raw_pixels / 1e6:.1f} MB -> {raw_features / 1e6:.3f} MB)")  # fmt: skip
    print(f"compression, stored tiles ({args.codec}) / stored features: {stored_pixels / features_bytes:8.1f}x "
          f"({stored_pixels / 1e6:.2f} MB -> {features_bytes / 1e6:.3f} MB; grid on disk {grid_bytes / 1e6:.3f} MB)")  # fmt: skip
    return enc_rate / base_rate


class _NullModel:
    """A model that does no work: the mean of each tile per channel, ``(B, 3)``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _decode_bound(store: Path, threads: int) -> float:
    """Seconds to decode every stored JPEG of the store's ``bench`` slide once on ``threads`` threads, each
    into a buffer its thread reuses (the cheapest decode there is: no allocation, no copy)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs

    from wsi_encoder.io.jpeg_codec import _index_size, _parse_index

    tiles = zarr.open_array(str(store / "bench" / "tiles"), mode="r")
    rows = int(tiles.chunks[0])
    jpegs: list[bytes] = []
    for index in range(-(-tiles.shape[0] // rows)):
        data = (store / "bench" / "tiles" / tiles.metadata.encode_chunk_key((index, 0, 0, 0))).read_bytes()
        offsets = _parse_index(data, rows, "bench")
        body = memoryview(data)[_index_size(rows) :]
        jpegs += [bytes(body[int(offsets[k]) : int(offsets[k + 1])]) for k in range(rows) if offsets[k + 1] > offsets[k]]
    local = threading.local()
    shape = tuple(int(n) for n in tiles.shape[1:])

    def decode(jpeg: bytes) -> None:
        if not hasattr(local, "tile"):
            local.tile = np.empty(shape, dtype=np.uint8)
        imagecodecs.jpeg8_decode(jpeg, out=local.tile)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, jpegs, chunksize=64))
    return time.perf_counter() - start


class _OnePixel:
    """A model that does no work at all: the first pixel of each uint8 ``(B, T, T, 3)`` tile, ``(B, 3)``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :].float()


def _host_stage() -> object:
    """``tiles_to_tensor`` as it runs on the host for CUDA: the uint8 batch copied into a staging buffer
    (pinned memory there; a ring of reused buffers per thread here), nothing converted."""
    import threading

    local = threading.local()

    def stage(tiles: np.ndarray, device: torch.device, out_size: int, **_: object) -> torch.Tensor:
        ring = getattr(local, "ring", None)
        if ring is None or ring[0].shape[1:] != tiles.shape[1:]:
            ring = local.ring = [np.empty((64, *tiles.shape[1:]), dtype=np.uint8) for _ in range(6)]
            local.next = 0
        buffer = ring[local.next % len(ring)]
        local.next += 1
        if len(buffer) < len(tiles):
            buffer = np.empty(tiles.shape, dtype=np.uint8)
        np.copyto(buffer[: len(tiles)], tiles)
        return torch.from_numpy(buffer[: len(tiles)])

    return stage


def bench_null(args: argparse.Namespace, work: Path) -> None:
    """The feed rate of ``wsienc encode`` with a do-nothing model, against the JPEG-decode bound."""
    from unittest import mock

    import wsi_encoder.compression as compression_module
    import wsi_encoder.pipelines.encode_store as encode_module
    from wsi_encoder.compression import EncoderIdentity

    tiles = args.tiles or 8192
    device = resolve_device(args.device)
    weights = _weights_for("resnet50-trunc", None, work)  # its identity: 224 px at 0.5 µm/px
    _, identity = load_encoder_cached("resnet50-trunc", weights, args.device)
    null = EncoderIdentity(**{**identity.__dict__, "embedding_dim": 3})
    store = make_store(work, tiles, identity.input_size, "jpeg")
    workers = [int(w) for w in args.workers.split(",")]
    print(f"null feed: {tiles} JPEG tiles of {identity.input_size} px (quality 90), batch {args.batch_size}, "
          f"device {device}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    on_cpu = device.type == "cpu"  # on a GPU the real run is the GPU feed: no host-side stand-in
    first = "CPU device" if on_cpu else f"encode, {device.type}"
    print(f"  {'workers':>7s} {'decode bound':>13s} {first:>11s} {'ratio':>6s}"
          + (f" {'host of a GPU run':>18s} {'ratio':>6s}" if on_cpu else "") + "  (tiles/s)")  # fmt: skip

    def run(n: int, k: int, model: object, host: bool) -> float:
        patches = [mock.patch.object(encode_module, "load_encoder_cached", return_value=(model, null))]
        if host:
            patches.append(mock.patch.object(compression_module, "tiles_to_tensor", _host_stage()))
        out = work / f"null{n}_{k}.zarr"
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            t0 = time.perf_counter()
            result = encode_store(store, "resnet50-trunc", out, weights=weights, batch_size=args.batch_size,
                                  device=args.device, workers=n)  # fmt: skip
            seconds = time.perf_counter() - t0
        if result.failed:
            raise SystemExit(f"encode failed: {result.failed}")
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    for n in workers:
        bound, cpu_device, host = [], [], []
        for k in range(args.repeats):  # interleaved: load changes hit all three alike
            bound.append(min(_decode_bound(store, n) for _ in range(3)))
            cpu_device.append(run(n, k, _NullModel(), host=False))
            if on_cpu:
                host.append(run(n, k, _OnePixel(), host=True))
        rate = {name: tiles / min(times) for name, times in (("bound", bound), ("cpu", cpu_device), ("host", host)) if times}
        line = f"  {n:7d} {rate['bound']:13.0f} {rate['cpu']:11.0f} {rate['cpu'] / rate['bound']:6.2f}"
        if on_cpu:
            line += f" {rate['host']:18.0f} {rate['host'] / rate['bound']:6.2f}"
        print(line)
    print("  (target: ratio >= 0.8 on 2 cores; a ViT-L/16 consumes 954 tiles/s of 224 px on an RTX 4090 and 1,604 on an\n"
          "   RTX PRO 6000 Max-Q (timm's published benchmarks), ~2,000-3,000 estimated on one H100 at bf16)")


#: The encoders of issue 21's GPU figure: CLAM's CNN and the three ViT sizes users run most.
GPU_SUITE = ("resnet50-trunc", "uni", "virchow2", "h-optimus-0")
#: (precision, compile) in the order they run: every eager configuration before any compiled one.
SUITE_CONFIGS = (("fp32", False), ("bf16", False), ("bf16", True), ("fp32", True))


def _versions(device: torch.device) -> str:
    """The device and the library versions, one line (to compare figures with other machines)."""
    import platform

    import timm
    import transformers

    where = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                 f"cuDNN {torch.backends.cudnn.version()}")  # fmt: skip
    return (f"device {where}; torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, "
            f"numpy {np.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs")  # fmt: skip


def _random_encoder(name: str, device: torch.device) -> torch.nn.Module:
    """The entry's architecture with random values on ``device`` (giants built on ``meta``, filled in place)."""
    from wsi_encoder.models.encoders import build_skeleton

    enc = build_skeleton(name)
    if not any(p.is_meta for p in enc.parameters()):
        return enc.eval().to(device)
    mean, std = enc._mean.clone(), enc._std.clone()
    enc = enc.to_empty(device=device)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0.0, 0.02)
        enc._mean.copy_(mean)
        enc._std.copy_(std)
    return enc.eval()


def gpu_suite(args: argparse.Namespace, names: list[str]) -> None:
    """tiles/s of the model forward for every GPU_SUITE encoder and SUITE_CONFIGS configuration, within the budget."""
    from wsi_encoder.models.inference import InferenceModel

    if args.device != "cpu" and not torch.cuda.is_available():
        print("bench_encode --gpu-suite: no CUDA device here (torch.cuda.is_available() is False); nothing to measure")
        return
    device = resolve_device(args.device)
    configs = [c for c in SUITE_CONFIGS if f"{c[0]}{'+compile' if c[1] else ''}" in args.suite_configs.split(",")]
    print(_versions(device))
    print(f"batch {args.batch_size} x 3 x 224 x 224 already on the device; each configuration timed "
          f"{args.config_seconds:g} s after its warm-up; budget {args.budget_s:g} s")  # fmt: skip
    start = time.perf_counter()
    rows: list[str] = []
    for precision, compiled in configs:
        for name in names:
            label = f"{name:<15} {precision:<5} {'compiled' if compiled else 'eager':<8}"
            if time.perf_counter() - start > args.budget_s:
                rows.append(f"{label} skipped (the {args.budget_s:g} s budget has passed)")
                print(rows[-1], flush=True)
                continue
            t0 = time.perf_counter()
            model = InferenceModel(_random_encoder(name, device), device, precision=precision, compile=compiled)
            x = torch.rand(args.batch_size, 3, 224, 224, device=device)
            with torch.inference_mode():
                for _ in range(3):  # compilation, cuDNN/cuBLAS autotuning, allocator warm-up
                    model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                n, t1 = 0, time.perf_counter()
                while n < 3 or time.perf_counter() - t1 < args.config_seconds:
                    model(x)
                    n += 1
                    if device.type == "cuda" and n % 4 == 0:
                        torch.cuda.synchronize()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t1
            rows.append(f"{label} {n * args.batch_size / elapsed:10.1f} tiles/s   ({n} batches in {elapsed:.1f} s; "
                        f"build + warm-up {warm:.1f} s)")  # fmt: skip
            print(rows[-1], flush=True)
            del model, x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"gpu suite done in {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None,
                        help="comma-separated registered encoders (default resnet50-trunc,phikon; with --gpu-suite its four)")
    parser.add_argument("--weights", default=None, help="weights file (one encoder only); default: random weights")
    parser.add_argument("--tiles", type=int, default=None,
                        help="tiles in the store (default 8192 for nic or on CUDA, 512 for the big CPU encoders; "
                             "small stores measure start-up overhead, not throughput)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=None, help="default 64; 128 with --gpu-suite")
    parser.add_argument("--codec", choices=["jpeg", "zstd"], default="jpeg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both sides (default: torch's)")
    parser.add_argument("--null", action="store_true", help="measure the feed: a do-nothing model vs the JPEG-decode bound")
    parser.add_argument("--workers", default="1,2,4", help="with --null: the worker counts to run")
    parser.add_argument("--gpu-suite", action="store_true",
                        help=f"tiles/s of {', '.join(GPU_SUITE)} at fp32/bf16, eager and compiled (one command, < 5 min)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="with --gpu-suite: configurations starting after this many seconds are skipped")
    parser.add_argument("--config-seconds", type=float, default=8.0,
                        help="with --gpu-suite: seconds each configuration is timed after its warm-up")
    parser.add_argument("--suite-configs", default="fp32,bf16,bf16+compile,fp32+compile",
                        help="with --gpu-suite: the configurations to run")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (128 if args.gpu_suite else 64)
    args.encoder = args.encoder or (",".join(GPU_SUITE) if args.gpu_suite else "resnet50-trunc,phikon")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.encoder.split(",") if n.strip()]
    if args.weights is not None and len(names) != 1:
        raise SystemExit("--weights goes with a single --encoder")
    if args.gpu_suite:
        gpu_suite(args, names)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    if args.null:
        try:
            bench_null(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        ratios = {name: bench_one(name, args, work) for name in names}
        print("summary: " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
