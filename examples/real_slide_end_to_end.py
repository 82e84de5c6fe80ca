"""A real slide end to end: tile -> encode -> predict with a trained slide classifier, pictures written.

Usage::

    python examples/real_slide_end_to_end.py SLIDE --encoder ENCODER --classifier MODEL_DIR --out OUT

``ENCODER`` is a ``wsienc train-encoder`` checkpoint folder (or a registered name such as ``nic``) and
``MODEL_DIR`` the folder written by ``wsienc classify train`` on embeddings of the same encoder (for
example ``demo_out/encoder`` and ``demo_out/classify_abmil`` after ``make demo``). Writes the patch
store, the embedding store, ``predictions.csv``, a QC picture, an embedding preview and a heatmap.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from wsi_encoder.pipelines.classify import predict
from wsi_encoder.pipelines.encode_store import encode_store
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", type=Path)
    parser.add_argument("--encoder", required=True, help="train-encoder checkpoint folder or registered encoder name")
    parser.add_argument("--classifier", required=True, type=Path, help="folder written by wsienc classify train")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--mpp", type=float, default=0.5, help="tile resolution in µm/px (the encoder's)")
    parser.add_argument("--tile-size", type=int, default=128, help="tile edge in px (the encoder's input size)")
    parser.add_argument("--slide-mpp", type=float, default=None, help="level-0 µm/px if the slide records none")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out: Path = args.out
    report = tile_cohort(
        [args.slide],
        out / "patches.zarr",
        TileSpec(target_mpp=args.mpp, tile_size=args.tile_size),
        slide_mpp=args.slide_mpp,
        qc_dir=out / "qc",
    )
    if report.failed:
        raise SystemExit(f"tiling failed: {report.failed[0].reason}")
    encode_store(out / "patches.zarr", args.encoder, out / "embeddings.zarr", preview_dir=out / "previews", h5_dir=out / "h5")
    result = predict(out / "embeddings.zarr", args.classifier, out / "predictions.csv", heatmap_dir=out / "heatmaps")
    print((out / "predictions.csv").read_text())
    print(f"QC: {out / 'qc'}  previews: {out / 'previews'}  heatmaps: {out / 'heatmaps'}  ({len(result.heatmaps)} drawn)")


if __name__ == "__main__":
    main()
