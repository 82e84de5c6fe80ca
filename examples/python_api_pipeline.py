"""The main job through the Python API instead of the CLI: generate -> tile -> train -> encode -> classify.

Usage::

    python examples/python_api_pipeline.py --out OUT [--slides 12]

Each step is one importable function with typed arguments; this is what ``wsienc demo`` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from wsi_encoder.pipelines.classify import train_classifier
from wsi_encoder.pipelines.demo import write_tile_labels
from wsi_encoder.pipelines.encode_store import encode_store
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.pipelines.train_encoder import train_encoder
from wsi_encoder.synthetic import write_demo_cohort
from wsi_encoder.tiling import TileSpec
from wsi_encoder.training.multitask import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--slides", type=int, default=12)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out: Path = args.out

    cohort = write_demo_cohort(out / "slides", args.slides, width=6144, height=4096, mpp=0.5)
    tile_cohort([s.path for s in cohort], out / "patches.zarr", TileSpec(target_mpp=0.5, tile_size=128), workers=2)
    write_tile_labels(out / "patches.zarr", {s.slide_id: s.path for s in cohort}, out / "tile_labels.csv")
    train_encoder(
        [f"patch-store={out / 'patches.zarr'},labels={out / 'tile_labels.csv'}"],
        out / "encoder",
        TrainConfig(backbone="nic", embed_dim=64, max_steps=150, batch_size=64, workers=0),
    )
    encode_store(out / "patches.zarr", out / "encoder", out / "embeddings.zarr", dtype="float32")
    result = train_classifier(
        out / "embeddings.zarr", out / "slides" / "labels.csv", model="linear", out_dir=out / "classify_linear", folds=3
    )
    print(json.dumps({"mean": result.metrics["mean"], "pooled": result.metrics["pooled"]}, indent=2))


if __name__ == "__main__":
    main()
