"""Benchmark ``wsienc tile`` against the per-tile openslide loop and the decode / decode + encode bounds.

On generated pyramidal JPEG slides (the record set: 20480² and 40960², 0.5 µm/px, 256 px source tiles) the
full grid of 256 px tiles at 0.5 µm/px (``--tissue-threshold 0``: every tile, 6400 on the default
slide) is produced, in one process and interleaved (best of ``--repeat``), by:

1. **wsienc tile, JPEG** and **wsienc tile, zstd** -- the whole command as a subprocess
   (``wsienc -q tile ... --workers 2``: start-up, thumbnail, tissue detection, planning, reading,
   encoding, writing), and the same work in this process (``tile_cohort``; start-up excluded);
2. **per-tile loop** -- ``openslide.OpenSlide.read_region`` one tile at a time into an uncompressed
   ``.npy`` memory map (the common CLAM/NIC-style loop);
3. **bounds on 2 threads** -- with the slide's compressed tiles already in memory: decoding every
   level-0 tile once (*decode*: ``imagecodecs.jpeg_decode`` into a reused buffer, the cheapest decode
   there is); that plus encoding every output tile once as JPEG at the command's quality
   (*decode + JPEG*), or with zstd at the store's level (*decode + zstd*); nothing written.

Every measurement is reported in wall and CPU seconds (user + sys of all threads; the command's from
``wait4``). It prints the ratios the tiler is held to: the command against the loop (target >= 4x)
and against the bounds (target >= 0.8x the decode + encode bound, start-up included), and zstd
against JPEG; on a loaded machine, an idle-machine estimate from CPU time
(start-up and planning on one core, tiles on ``--workers``); then where the command's time goes
(start-up imports, planning, tiles), the store sizes, and the command's peak RSS (``/proc`` VmHWM).
First it times a coordinates-only run of a small slide (target <= 0.35 s) beside a fresh interpreter
importing what any such run needs (numpy, zarr, scipy.ndimage). With ``--big 60000`` it also tiles a 60000 x 60000
slide and reports its peak RSS (target < 1.5 GiB); generating that slide takes a few minutes.

Usage::

    python benchmarks/bench_tile.py [--size 20480,40960] [--workers 2] [--repeat 3] [--dir DIR] [--big 60000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wsi_encoder.io.patch_store import _ZSTD_LEVEL, open_patch_store
from wsi_encoder.pipelines.tile_cohort import ProgressEvent, tile_cohort
from wsi_encoder.synthetic import SyntheticSlideSpec, read_synthetic_spec, write_synthetic_slide
from wsi_encoder.tiling import TileSpec

TILE = 256
JPEG_QUALITY = 90


def generated_slide(directory: Path, size: int, seed: int = 1) -> Path:
    """A cached generated slide of ``size`` x ``size`` at 0.5 µm/px (one large tissue piece)."""
    spec = SyntheticSlideSpec(width=size, height=size, mpp=0.5, seed=seed, pieces=1)
    path = directory / f"bench_{size}.tif"
    if not path.exists() or read_synthetic_spec(path) != spec:
        start = time.perf_counter()
        print(f"generating {path.name} ({size} x {size}) ...", flush=True)
        write_synthetic_slide(path, spec)
        print(f"  generated in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def command(slide: Path, store: Path, workers: int, codec: str) -> list[str]:
    """The ``wsienc tile`` command line measured."""
    wsienc = Path(sys.executable).with_name("wsienc")
    return [
        str(wsienc), "-q", "tile", str(slide), "--out", str(store), "--workers", str(workers), "--codec", codec,
        "--tile-size", str(TILE), "--tissue-threshold", "0", "--jpeg-quality", str(JPEG_QUALITY),
    ]  # fmt: skip


def _clear(store: Path) -> None:
    """Remove the previous run's store and flush the disk's dirty pages (``sync``): the kernel writing back
    the last run's 1.4 GB of zstd chunks must not take CPU from the run being timed."""
    shutil.rmtree(store, ignore_errors=True)
    os.sync()


def run_command(slide: Path, store: Path, workers: int, codec: str) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + sys, all threads) and peak RSS (GiB, sampled every 20 ms) of the
    whole ``wsienc tile`` command (a subprocess)."""
    _clear(store)
    start = time.perf_counter()
    process = subprocess.Popen(command(slide, store, workers, codec), stdout=subprocess.DEVNULL)
    peak_kib = 0
    # Peak RSS from /proc (VmHWM): a child's ru_maxrss inherits this (large) process's high-water mark.
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        try:
            status_lines = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            peak_kib = max([peak_kib, *(int(line.split()[1]) for line in status_lines if line.startswith("VmHWM:"))])
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command(slide, store, workers, codec))} failed")
    return seconds, usage.ru_utime + usage.ru_stime, peak_kib / 2**20


def run_in_process(slide: Path, store: Path, workers: int, codec: str) -> tuple[float, float, float, float, int]:
    """``tile_cohort`` in this process (no start-up): wall seconds, wall seconds until the slide was
    planned, the same two in CPU seconds (this process, all threads), and the number of tiles."""
    _clear(store)
    planned: list[tuple[float, float]] = []

    def progress(event: ProgressEvent) -> None:
        if event.kind == "tiles_planned":
            planned.append((time.perf_counter(), time.process_time()))

    start, cpu = time.perf_counter(), time.process_time()
    report = tile_cohort(
        [slide], store, TileSpec(0.5, TILE), tissue_threshold=0.0, codec=codec, jpeg_quality=JPEG_QUALITY,
        workers=workers, progress=progress,
    )  # fmt: skip
    end, end_cpu = time.perf_counter(), time.process_time()
    assert [o.status for o in report.outcomes] == ["ok"], report.outcomes
    return end - start, planned[0][0] - start, end_cpu - cpu, planned[0][1] - cpu, report.n_tiles


def startup_seconds() -> tuple[float, float]:
    """Wall and CPU seconds for a fresh interpreter to import what ``wsienc tile`` imports before it
    starts working (tissue detection's SciPy / scikit-image included: every default run needs them)."""
    return fresh_interpreter_seconds(
        "import wsi_encoder.cli.tile, wsi_encoder.pipelines.tile_cohort, dask.threaded, openslide, tiffslide;"
        "from wsi_encoder.tissue import detect_tissue; import numpy; detect_tissue(numpy.full((64, 64, 3), 240, 'u1'))"
    )


def fresh_interpreter_seconds(code: str) -> tuple[float, float]:
    """Wall and CPU seconds of ``python -c code`` in a fresh interpreter."""
    return timed_process([sys.executable, "-c", code])


def timed_process(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + sys) of a subprocess, its output discarded."""
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def report_coords_only(work: Path, repeat: int) -> None:
    """The whole ``wsienc tile --coords-only`` command on a small (4096²) slide against what any such run
    must pay: an interpreter, and one importing numpy, zarr (the store) and scipy.ndimage (tissue detection)."""
    slide = generated_slide(work, 4096)
    store = work / "coords.zarr"
    wsienc = str(Path(sys.executable).with_name("wsienc"))
    runs: dict[str, list[tuple[float, float]]] = {"command": [], "floor": [], "paused": [], "python": []}
    for _ in range(repeat + 2):  # interleaved, so load changes hit each alike
        shutil.rmtree(store, ignore_errors=True)
        runs["command"].append(timed_process([wsienc, "-q", "tile", str(slide), "--out", str(store), "--coords-only",
                                              "--workers", "2"]))  # fmt: skip
        runs["floor"].append(fresh_interpreter_seconds("import numpy, zarr, scipy.ndimage"))
        runs["paused"].append(fresh_interpreter_seconds(  # as wsienc imports (cli/common.import_frozen)
            "import gc; gc.disable(); import numpy, zarr, scipy.ndimage; gc.freeze()"))
        runs["python"].append(fresh_interpreter_seconds("pass"))
    shutil.rmtree(store, ignore_errors=True)
    best = {name: min(times) for name, times in runs.items()}
    print(f"coordinates-only run of a 4096^2 slide (best of {repeat + 2}; wall / CPU):")
    print(f"  wsienc -q tile --coords-only --workers 2        {best['command'][0]:5.2f} s / {best['command'][1]:5.2f} s "
          "(target <= 0.35)")
    print(f"  python -c 'import numpy, zarr, scipy.ndimage'   {best['floor'][0]:5.2f} s / {best['floor'][1]:5.2f} s "
          "(what any such run imports)")
    print(f"  the same, garbage collector paused as wsienc does {best['paused'][0]:5.2f} s / {best['paused'][1]:5.2f} s")
    print(f"  python -c pass                                  {best['python'][0]:5.2f} s / {best['python'][1]:5.2f} s")


def run_per_tile_loop(slide: Path, coords: np.ndarray, target: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the per-tile OpenSlide loop writing into an uncompressed memory-mapped array."""
    import openslide

    target.unlink(missing_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    handle = openslide.OpenSlide(str(slide))
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(coords), TILE, TILE, 3))
    for i, (x, y) in enumerate(coords):
        out[i] = np.asarray(handle.read_region((int(x), int(y)), 0, (TILE, TILE)))[..., :3]
    out.flush()
    del out
    handle.close()
    return time.perf_counter() - start, time.process_time() - cpu


def run_bound(slide: Path, n_tiles: int, threads: int, encode: str | None) -> tuple[float, float]:
    """Wall and CPU seconds to decode every level-0 JPEG tile once and (``encode``: ``jpeg`` or ``zstd``) encode
    ``n_tiles`` output tiles once, on ``threads`` threads; compressed bytes read beforehand (not timed).

    The decode is the cheapest there is: ``imagecodecs.jpeg_decode`` with the page's tables and colour
    spaces into a buffer each thread reuses (no allocation, no copy, no tifffile call per tile).
    """
    import threading

    import imagecodecs
    import tifffile
    from tifffile.tifffile import jpeg_decode_colorspace

    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        fh = tif.filehandle
        data = []
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(offset)
            data.append(fh.read(count))
        th, tw = page.tilelength, page.tilewidth
        colorspace, outcolorspace = jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
        args = {"tables": page.jpegtables, "colorspace": colorspace, "outcolorspace": outcolorspace, "shape": (th, tw)}
    local = threading.local()

    def work(k: int) -> None:
        if not hasattr(local, "tile"):
            local.tile = np.empty((th, tw, 3), dtype=np.uint8)
        tile = imagecodecs.jpeg_decode(data[k], out=local.tile, **args)
        # one output tile per source tile here (256 px grid on 256 px source tiles), extra ones cycle
        for _ in range(k, n_tiles, len(data)):
            crop = tile if (th, tw) == (TILE, TILE) else np.ascontiguousarray(tile[:TILE, :TILE])
            if encode == "jpeg":
                imagecodecs.jpeg8_encode(crop, level=JPEG_QUALITY)
            elif encode == "zstd":
                imagecodecs.zstd_encode(crop, level=_ZSTD_LEVEL)

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(len(data))))
    return time.perf_counter() - start, time.process_time() - cpu


def directory_size(path: Path) -> int:
    """Bytes under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="20480,40960",
                        help="edges of the generated slides, comma-separated (the record set: 20480 and 40960)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timing; the best is kept")
    parser.add_argument("--dir", type=Path, default=None, help="where slides and stores go (default: a temp dir)")
    parser.add_argument("--big", type=int, default=0, help="also measure peak RSS on a BIG x BIG slide (e.g. 60000)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_tile_"))
    work.mkdir(parents=True, exist_ok=True)
    report_coords_only(work, args.repeat)
    for size in (int(s) for s in str(args.size).split(",")):
        run_size(size, args, work)
    if args.big:
        big = generated_slide(work, args.big)
        seconds, _, peak = run_command(big, work / "big.zarr", args.workers, "jpeg")
        print(f"peak RSS of `wsienc tile` on {args.big}^2: {peak:.2f} GiB (target < 1.5), {seconds:.0f} s")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


def qc_seconds(store: Path, slide_id: str, out: Path) -> float:
    """Seconds to draw and write the slide's QC picture (best of 3)."""
    from wsi_encoder.qc import save_tile_qc

    slide = open_patch_store(store)[slide_id]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        save_tile_qc(slide, out)
        times.append(time.perf_counter() - start)
    return min(times)


def run_size(size: int, args: argparse.Namespace, work: Path) -> None:
    """Every measurement on one generated ``size`` x ``size`` slide, printed as one block."""
    slide = generated_slide(work, size)
    stores = {codec: work / f"bench_{codec}.zarr" for codec in ("jpeg", "zstd")}
    best: dict[str, float] = {}  # wall seconds, best of the repeats
    cpu: dict[str, float] = {}  # CPU seconds (user + sys, all threads), best of the repeats

    def keep(name: str, seconds: tuple[float, float]) -> None:
        best[name] = min(best.get(name, float("inf")), seconds[0])
        cpu[name] = min(cpu.get(name, float("inf")), seconds[1])

    rss: dict[str, float] = {}
    n_tiles = 0
    coords = np.zeros((0, 2), dtype=np.int64)
    load = os.getloadavg()[0]
    # Interleaved, so load changes on a shared machine hit every measurement alike.
    for _ in range(args.repeat):
        keep("startup", startup_seconds())
        for codec, store in stores.items():
            seconds, cpu_seconds, rss[codec] = run_command(slide, store, args.workers, codec)
            keep(f"cmd_{codec}", (seconds, cpu_seconds))
            total, plan, total_cpu, plan_cpu, n_tiles = run_in_process(slide, store, args.workers, codec)
            keep(f"lib_{codec}", (total, total_cpu))
            keep(f"plan_{codec}", (plan, plan_cpu))
        if not len(coords):
            coords = open_patch_store(stores["jpeg"])[slide.stem].coords
        if "loop" not in best or size <= 20480:  # the slow baseline: once on the larger slides
            keep("loop", run_per_tile_loop(slide, coords, work / "loop.npy"))
        keep("decode", run_bound(slide, n_tiles, args.workers, None))
        keep("decode_jpeg", run_bound(slide, n_tiles, args.workers, "jpeg"))
        keep("decode_zstd", run_bound(slide, n_tiles, args.workers, "zstd"))
    (work / "loop.npy").unlink(missing_ok=True)

    w = args.workers
    print(f"\nslide {slide.name}: {size} x {size} px, 0.5 µm/px, {slide.stat().st_size / 2**20:.0f} MiB; "
          f"full grid of {n_tiles} tiles of {TILE} px; {w} workers / threads; best of {args.repeat}; "
          f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end on {os.cpu_count()} CPUs")
    rows = [
        ("wsienc tile --codec jpeg (whole command)", "cmd_jpeg"),
        (f"wsienc tile --codec zstd (whole command, level {_ZSTD_LEVEL})", "cmd_zstd"),
        ("tile_cohort jpeg (in process, no start-up)", "lib_jpeg"),
        ("tile_cohort zstd (in process, no start-up)", "lib_zstd"),
        ("per-tile openslide loop -> .npy", "loop"),
        (f"bound: decode ({w} threads)", "decode"),
        (f"bound: decode + JPEG encode ({w} threads)", "decode_jpeg"),
        (f"bound: decode + zstd encode ({w} threads)", "decode_zstd"),
    ]
    print(f"  {'':52s} {'wall':>8s} {'tiles/s':>8s} {'CPU':>8s} {'CPU ms/tile':>11s}")
    for name, key in rows:
        print(f"  {name:52s} {best[key]:7.2f}s {n_tiles / best[key]:8.0f} {cpu[key]:7.2f}s {cpu[key] / n_tiles * 1e3:11.3f}")
    print("ratios, wall (> 1: wsienc faster; the whole command, start-up included):")
    for codec in ("jpeg", "zstd"):
        cmd = best[f"cmd_{codec}"]
        print(f"  {codec}: {best['loop'] / cmd:5.2f}x the per-tile loop (target >= 4), "
              f"{best['decode'] / cmd:5.2f}x the decode bound, "
              f"{best[f'decode_{codec}'] / cmd:5.2f}x the decode + {codec} bound (target >= 0.8)")
    print(f"  zstd / jpeg time: {best['cmd_zstd'] / best['cmd_jpeg']:.2f} (a zstd encode costs ~3.7x a JPEG encode)")
    # On a loaded machine wall time measures the neighbours; CPU time does not. Idle-machine estimate:
    # start-up and planning run on one core, the tiles on `w` (the loop is single-threaded).
    print(f"idle-machine estimate from CPU time (start-up and planning serial, tiles on {w} cores):")
    for codec in ("jpeg", "zstd"):
        serial = cpu["startup"] + cpu[f"plan_{codec}"]
        estimate = serial + (cpu[f"lib_{codec}"] - cpu[f"plan_{codec}"]) / w
        print(f"  {codec}: ~{estimate:.2f} s: {cpu['loop'] / estimate:5.2f}x the loop, "
              f"{cpu[f'decode_{codec}'] / w / estimate:5.2f}x the decode + {codec} bound; "
              f"tiles alone {cpu[f'decode_{codec}'] / (cpu[f'lib_{codec}'] - cpu[f'plan_{codec}']):.2f}x the bound's CPU")
    print("where the command's time goes (jpeg; wall / CPU):")
    startup = best["startup"]
    print(f"  start-up (interpreter + imports)  {startup:6.2f} s / {cpu['startup']:5.2f} s")
    print(f"  planning (thumbnail, tissue, grid) {best['plan_jpeg']:6.2f} s / {cpu['plan_jpeg']:5.2f} s")
    print(f"  tiles (read, encode, write)        {best['lib_jpeg'] - best['plan_jpeg']:6.2f} s / "
          f"{cpu['lib_jpeg'] - cpu['plan_jpeg']:5.2f} s")
    print(f"  rest (scheduler, exit; noise)      {max(0.0, best['cmd_jpeg'] - startup - best['lib_jpeg']):6.2f} s / "
          f"{max(0.0, cpu['cmd_jpeg'] - cpu['startup'] - cpu['lib_jpeg']):5.2f} s")
    for codec, store in stores.items():
        print(f"store {codec}: {directory_size(store) / 2**20:7.1f} MiB (raw pixels {n_tiles * TILE * TILE * 3 / 2**20:.0f} MiB), "
              f"peak RSS {rss[codec]:.2f} GiB")
    print(f"QC picture (--qc-dir) of this slide: {qc_seconds(stores['jpeg'], slide.stem, work / 'qc.png'):.3f} s (target <= 0.1)")


if __name__ == "__main__":
    main()
