"""The NIC papers' encoder comparison on one cohort: mean-RGB, BiGAN, multitask-4 and a train-encoder encoder.

The shape of TPAMI 2019 Tables 2-3: one cohort tiled once (128 px at 0.5 µm/px, as the authors), encoded with each
encoder, then the same slide-level model cross-validated on each embedding store (patient-grouped folds, pooled
out-of-fold metrics with patient-bootstrap 95% intervals), side by side as a table and a plot.

Usage, on your own slides (a labels CSV ``slide_id,label[,patient_id]`` as for ``wsienc classify train``)::

    python examples/nic_encoder_comparison.py --slides SLIDES_DIR --labels labels.csv --out OUT \\
        [--trained-encoder MY_ENCODER] [--model linear|abmil|gridcnn] [--folds 4]

or on BreaKHis images (each image taken as a one-image "slide" at its magnification's µm/px; patients by case
number)::

    python examples/nic_encoder_comparison.py --breakhis ../shared/data/histo_real/breakhis \\
        ../shared/data/histo_real/breakhis_more --magnification 40 --out OUT

Without ``--trained-encoder``, the train-encoder arm is the encoder ``wsienc demo`` trains (a ``nic`` trained with
supervision on generated lesion/normal tiles, under ``OUT/demo``): the mechanics of the comparison, not a
pathology encoder. Writes ``OUT/comparison.csv``, ``OUT/comparison.md`` and ``OUT/comparison.png``; every step
resumes.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

ENCODERS = ("nic-mean-rgb", "nic-bigan", "nic-multitask-4")
METRICS = ("auc", "balanced_accuracy", "brier")


def breakhis_slides(folders: list[Path], magnification: int, mpp_40x: float, out: Path) -> tuple[list[Path], Path]:
    """Write each BreaKHis PNG of ``magnification`` as a tiled TIFF with its µm/px, and a labels CSV."""
    import tifffile
    from PIL import Image

    from wsi_encoder.io.breakhis import parse_breakhis_name, patient_key

    out.mkdir(parents=True, exist_ok=True)
    mpp = mpp_40x * 40 / magnification
    rows, slides = [], []
    for folder in folders:
        for png in sorted(folder.glob("*.png")):
            image = parse_breakhis_name(png)
            if image is None or image.magnification != magnification:
                continue
            tif = out / f"{png.stem}.tif"
            if not tif.exists():
                with Image.open(png) as im:
                    pixels = np.asarray(im.convert("RGB"))
                ppcm = 1e4 / mpp
                tifffile.imwrite(tif, pixels, tile=(256, 256), compression="zlib", photometric="rgb",
                                 resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")  # fmt: skip
            slides.append(tif)
            rows.append((tif.stem, image.label, patient_key(image)))
    labels = out / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("slide_id", "label", "patient_id"))
        writer.writerows(rows)
    return slides, labels


def demo_encoder(out: Path) -> Path:
    """The encoder `wsienc demo` trains on generated tiles (the demo resumes when already run)."""
    from wsi_encoder.pipelines.demo import DemoConfig, run_demo

    run_demo(out, DemoConfig(n_slides=6, classifier="linear", device="cpu"), say=logging.getLogger("demo").info)
    return out / "encoder"


def compare(slides: list[Path], labels: Path, out: Path, arms: dict[str, str], model: str, folds: int, seed: int,
            n_boot: int, tissue_threshold: float | None) -> list[dict[str, Any]]:  # fmt: skip
    """Tile once, encode with every arm, cross-validate ``model`` on each; one result row per arm."""
    import json

    from wsi_encoder.pipelines.classify import train_classifier
    from wsi_encoder.pipelines.encode_store import encode_store
    from wsi_encoder.pipelines.tile_cohort import tile_cohort
    from wsi_encoder.tiling import TileSpec

    patches = out / "patches.zarr"
    extra = {} if tissue_threshold is None else {"tissue_threshold": tissue_threshold}
    tile_cohort(slides, patches, TileSpec(target_mpp=0.5, tile_size=128), codec="zstd", workers=2, **extra)
    rows = []
    for arm, encoder in arms.items():
        store = out / f"embeddings_{arm}.zarr"
        encode_store(patches, encoder, store, dtype="float32", device="cpu")
        run = out / f"classify_{arm}"
        if not (run / "metrics.json").exists():
            train_classifier(store, labels, model, run, folds, seed, n_boot=n_boot, device="cpu", threads=1)
        metrics = json.loads((run / "metrics.json").read_text())
        row: dict[str, Any] = {"encoder": arm, "spec": encoder, "slides": metrics["n_slides"], "patients": metrics["n_patients"]}
        for name in METRICS:
            low, high = metrics["pooled_ci95"].get(name) or (None, None)
            row.update({name: metrics["pooled"].get(name), f"{name}_low": low, f"{name}_high": high})
        rows.append(row)
    return rows


def _fmt(row: dict[str, Any], name: str) -> str:
    v, lo, hi = row[name], row[f"{name}_low"], row[f"{name}_high"]
    if v is None:
        return "n/a"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{v:.3f} [n/a]"


def write_report(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """comparison.csv, comparison.md (the table) and comparison.png (point estimates with their intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "comparison.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", "| encoder | slides | patients | AUC [95% CI] | balanced accuracy [95% CI] | Brier [95% CI] |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['encoder']} | {r['slides']} | {r['patients']} | " + " | ".join(_fmt(r, m) for m in METRICS) + " |" for r in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), constrained_layout=True)
    for ax, name in zip(axes, METRICS, strict=True):
        y = np.arange(len(rows))
        est = np.array([np.nan if r[name] is None else r[name] for r in rows], dtype=float)
        lo = np.array([np.nan if r[f"{name}_low"] is None else r[f"{name}_low"] for r in rows], dtype=float)
        hi = np.array([np.nan if r[f"{name}_high"] is None else r[f"{name}_high"] for r in rows], dtype=float)
        ax.errorbar(est, y, xerr=[est - lo, hi - est], fmt="o", capsize=3)
        ax.set_yticks(y, [r["encoder"] for r in rows])
        ax.set_xlabel(name.replace("_", " ") + " (pooled, 95% CI)")
        if name == "auc":
            ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--slides", type=Path, nargs="+", help="slide files or folders")
    src.add_argument("--breakhis", type=Path, nargs="+", help="folders of BreaKHis-named PNGs")
    parser.add_argument("--labels", type=Path, help="slide_id,label[,patient_id] (with --slides)")
    parser.add_argument("--magnification", type=int, default=40, choices=(40, 100, 200, 400))
    parser.add_argument("--mpp-40x", type=float, default=0.25, help="µm/px of BreaKHis 40X images (others scale)")
    parser.add_argument("--trained-encoder", type=Path, default=None, help="a `wsienc train-encoder` folder")
    parser.add_argument("--model", default="linear", choices=("linear", "abmil", "gridcnn"))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--tissue-threshold", type=float, default=None,
                        help="tile tissue threshold (default: wsienc tile's; 0 with --breakhis: every image is a field of tissue)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.breakhis:
        slides, labels = breakhis_slides(args.breakhis, args.magnification, args.mpp_40x, out / "slides")
        cohort = f"BreaKHis {args.magnification}X images as slides"
        if args.tissue_threshold is None:
            args.tissue_threshold = 0.0
    else:
        if args.labels is None:
            parser.error("--slides needs --labels")
        slides, labels, cohort = args.slides, args.labels, "slides"
    trained = args.trained_encoder or demo_encoder(out / "demo")
    arms = {name: name for name in ENCODERS} | {"train-encoder": str(trained)}
    rows = compare(slides, labels, out, arms, args.model, args.folds, args.seed, args.n_boot, args.tissue_threshold)
    title = f"{cohort}: {args.model}, {args.folds}-fold patient-grouped CV, 128 px at 0.5 µm/px"
    write_report(rows, out, title)
    print((out / "comparison.md").read_text())


if __name__ == "__main__":
    main()
