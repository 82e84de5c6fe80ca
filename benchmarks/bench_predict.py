"""Benchmark ``wsienc predict`` (file -> prediction in one process) against the three-command route.

For each slide -- the real CMU-1-Small-Region.svs from ``../shared/data/histo_real`` (2220 x 2967 px at
0.499 µm/px) and a generated biopsy-sized slide (default 40000 x 40000 px at 0.25 µm/px: 1 cm², with
``--pieces`` generated tissue pieces covering part of it; the tiled tissue area is printed) -- tiled at
0.5 µm/px in 128 px tiles with the ``nic`` encoder:

1. **three commands** -- ``wsienc tile`` (defaults: JPEG store), ``wsienc encode``, ``wsienc classify
   predict --heatmap-dir``, each a fresh process as a user runs them; the wall time of each and the sum;
2. **wsienc predict** -- one fresh process (heatmap PNG and QuPath GeoJSON included), its wall time and
   its breakdown from ``run.json``: start-up (interpreter, CLI, imports, classifier and encoder loads),
   open, tissue (thumbnail + mask + grid), read/decode (summed over the read threads, overlapping encode),
   encode (wall, including the reads it waited for), classify, writing (heatmap, GeoJSON).

The classifier is an ``abmil`` model with seeded random weights whose provenance is the three-command
route's embedding store (what ``classify train`` records), so both routes run the same model.
Targets (issues 16 and 22): predict <= 0.35x the three commands on CMU-1-Small-Region; the biopsy-sized slide
in under 30 s on 2 CPU cores. The two routes run back to back on the same machine state; run it on an
idle machine for figures (``--repeat`` takes the best of N).

Usage::

    python benchmarks/bench_predict.py [--size 40000] [--pieces 1] [--repeat 1] [--threads N] [--read-threads N] [--dir DIR] [--skip-biopsy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
CMU = Path(os.environ.get("WSIENC_SHARED_DATA", REPO.parent / "shared" / "data" / "histo_real")) / "slides" / "CMU-1-Small-Region.svs"


def _wsienc(args: list[str]) -> float:
    """Run ``wsienc ARGS`` in a fresh process; its wall time in seconds."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", "from wsi_encoder.cli import main; main()", "-q", *args], check=True, env=env)
    return time.perf_counter() - t


def _python(code: str) -> float:
    """Wall time of ``python -c CODE`` in a fresh interpreter."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t


def _model(store: Path, out: Path) -> Path:
    """An abmil model (seeded weights, the store's feature statistics) saved with the store's provenance."""
    import torch

    from wsi_encoder.io.embedding_store import EmbeddingStore
    from wsi_encoder.models.classifier_files import save_model
    from wsi_encoder.models.slide_classifiers import create_slide_classifier
    from wsi_encoder.pipelines.classify import training_provenance

    reader = EmbeddingStore.open(store)
    torch.manual_seed(0)
    model = create_slide_classifier("abmil", reader.embedding_dim, 2, {}, "cpu")
    model._set_input_stats([reader.load(s) for s in reader.slide_ids])
    meta = {"classes": ["normal", "tumour"], "encoder": reader.encoder_identity(),
            "provenance": training_provenance(reader, reader.slide_ids)}  # fmt: skip
    save_model(model, out, meta)
    return out


def bench_slide(name: str, slide: Path, work: Path, repeat: int, threads: list[str], read: list[str]) -> dict[str, float]:
    """Both routes on one slide; prints and returns the figures (best of ``repeat``)."""
    work.mkdir(parents=True, exist_ok=True)
    three: dict[str, float] = {}
    for r in range(repeat):
        for sub in ("patches.zarr", "emb.zarr", "three.csv", "heat"):
            subprocess.run(["rm", "-rf", str(work / sub)], check=True)
        times = {
            "tile": _wsienc(["tile", str(slide), "--out", str(work / "patches.zarr"), "--mpp", "0.5", "--tile-size", "128"]),
            "encode": _wsienc(["encode", str(work / "patches.zarr"), "--encoder", "nic", "--out", str(work / "emb.zarr")]),
        }
        if r == 0:
            _model(work / "emb.zarr", work / "clf")
        times["classify predict"] = _wsienc(["classify", "predict", str(work / "emb.zarr"), "--model", str(work / "clf"),
                                              "--out", str(work / "three.csv"), "--heatmap-dir", str(work / "heat"),
                                              *threads])  # fmt: skip
        if not three or sum(times.values()) < sum(three.values()):
            three = times
    best: dict[str, float] = {}
    run: dict = {}
    for _ in range(repeat):
        subprocess.run(["rm", "-rf", str(work / "pred")], check=True)
        wall = _wsienc(["predict", str(slide), "--model", str(work / "clf"), "--out", str(work / "pred"), *threads, *read])
        if not best or wall < best["wall"]:
            best = {"wall": wall}
            run = json.loads((work / "pred" / "run.json").read_text())
    torch_alone = min(_python("import gc; gc.disable(); import torch; gc.freeze()") for _ in range(repeat))
    slide_run = run["slides"][0]
    t = slide_run["timings"]
    breakdown = {
        "start-up": best["wall"] - slide_run["seconds"],
        "  of which predict_slides' imports": run["startup_seconds"]["imports"],
        "  of which model loads": run["startup_seconds"]["classifier"] + run["startup_seconds"]["encoder"],
        "open": t.get("open", 0.0),
        "tissue": t.get("tissue", 0.0),
        "read/decode (sum over read threads)": t.get("read", 0.0),
        "encode (incl. waiting for reads)": t.get("encode", 0.0),
        "classify": t.get("classify", 0.0),
        "writing (heatmap, GeoJSON)": t.get("write", 0.0),
    }
    total3 = sum(three.values())
    p3 = np.genfromtxt(work / "three.csv", delimiter=",", names=True, dtype=None, encoding=None)
    p1 = np.genfromtxt(work / "pred" / "predictions.csv", delimiter=",", names=True, dtype=None, encoding=None)
    tissue_mm2 = slide_run["n_tiles"] * (128 * 0.5) ** 2 / 1e6
    print(f"\n== {name}: {slide.name}, {slide_run['n_tiles']} tiles of 128 px at 0.5 µm/px "
          f"({tissue_mm2:.1f} mm² of tiled tissue), encoder nic")  # fmt: skip
    for step, sec in three.items():
        print(f"  three commands: {step:<18} {sec:7.2f} s")
    print(f"  three commands: {'total':<18} {total3:7.2f} s")
    print(f"  wsienc predict: {'total':<18} {best['wall']:7.2f} s   ratio {best['wall'] / total3:.2f}x the three commands")
    for step, sec in breakdown.items():
        print(f"    {step:<34} {sec:7.2f} s")
    print(f"    (for scale: a fresh interpreter importing torch as wsienc does, before predict_slides: {torch_alone:.2f} s)")
    print(f"  P(tumour): three commands {float(p3['prob']):.6f} (JPEG store), predict {float(p1['prob']):.6f}")
    return {"three": total3, "predict": best["wall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40000, help="side of the generated biopsy-sized slide (px at 0.25 µm/px)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs of each route")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for classify predict and predict")
    parser.add_argument("--read-threads", type=int, default=None, help="predict's --read-threads (default: its own)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--pieces", type=int, default=1, help="tissue pieces on the generated slide (1: one large piece)")
    parser.add_argument("--skip-biopsy", action="store_true", help="only CMU-1-Small-Region")
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    read = ["--read-threads", str(args.read_threads)] if args.read_threads else []
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_predict_"))
    print(f"work folder {work}; {os.cpu_count()} CPU(s) visible")
    results = {}
    if CMU.exists():
        results["cmu"] = bench_slide("CMU-1-Small-Region", CMU, work / "cmu", args.repeat, threads, read)
    else:
        print(f"skipping CMU-1-Small-Region: {CMU} is missing")
    if not args.skip_biopsy:
        slide = work / f"biopsy_{args.size}_{args.pieces}.tif"
        if not slide.exists():
            t = time.perf_counter()
            spec = SyntheticSlideSpec(width=args.size, height=args.size, mpp=0.25, seed=1, pieces=args.pieces,
                                      level_downsamples=(1, 4, 16, 64))  # fmt: skip
            write_synthetic_slide(slide, spec)
            print(f"generated {slide.name} ({args.size} x {args.size} at 0.25 µm/px) in {time.perf_counter() - t:.0f} s")
        results["biopsy"] = bench_slide("biopsy-sized slide", slide, work / "biopsy", args.repeat, threads, read)
    print("\nsummary (targets: CMU <= 0.35x the three commands; biopsy-sized < 30 s)")
    for key, r in results.items():
        print(f"  {key:<7} predict {r['predict']:7.2f} s, three commands {r['three']:7.2f} s, ratio {r['predict'] / r['three']:.2f}x")


if __name__ == "__main__":
    main()
