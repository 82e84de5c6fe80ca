"""``wsienc predict``: slide files -> prediction, heatmap and QuPath overlay in one command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from wsi_encoder.cli.common import (
    PATH_OR_URL,
    Progress,
    device_option,
    echo_err,
    imports_first,
    is_quiet,
    slide_backend_option,
    slide_mpp_option,
    storage_options_option,
)
from wsi_encoder.io.urls import join, local_copy, local_output

if TYPE_CHECKING:
    from wsi_encoder.pipelines.predict import SlidePrediction


@click.command()
@click.argument("slides", nargs=-1, required=True, type=PATH_OR_URL)
@click.option("--model", "model_dir", required=True, type=PATH_OR_URL,
              help="The --out folder of `wsienc classify train` (local or an s3:// URL).")
@click.option("--out", "-o", required=True, type=PATH_OR_URL,
              help="Output folder: predictions.csv, heatmaps/, geojson/, run.json (a re-run skips finished slides); "
              "an s3:// URL is written locally and uploaded at the end.")
@click.option("--encoder", default=None,
              help="Encoder checkpoint folder or registered name [default: the one the model's training embeddings came from].")
@click.option("--weights", type=str, default=None,
              help="Weights for a registered encoder name, a path or a URL (as given to `wsienc encode`).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Tile resolution in µm/px [default: the model's training tiles'].")
@click.option("--tile-size", type=click.IntRange(8, 8192), default=None, help="Tile edge in px [default: the model's].")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Tile step in px [default: the model's].")
@click.option("--mpp-tolerance", type=click.FloatRange(0, 0.5, max_open=True), default=None,
              help="Read a pyramid level as it is when within this of --mpp [default: the model's].")
@click.option("--tissue-threshold", type=click.FloatRange(0, 1), default=None,
              help="Keep tiles with at least this tissue fraction [default: the model's].")
@click.option("--force", is_flag=True,
              help="Predict even if the encoder or tile spec differs from the model's training embeddings.")
@click.option("--keep-stores", is_flag=True, help="Also write OUT/patches.zarr (coords-only) and OUT/embeddings.zarr (for `classify train/predict`).")
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True,
              help="Write OUT/heatmaps/<slide_id>.png (+ .npy) over the thumbnail.")
@click.option("--geojson/--no-geojson", default=True, show_default=True,
              help="Write OUT/geojson/<slide_id>.geojson: tiles with scores and tissue outlines, for QuPath.")
@slide_mpp_option
@slide_backend_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Tiles per forward pass.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads [default: torch's choice].")
@click.option("--read-threads", type=click.IntRange(min=1), default=None,
              help="Threads decoding tiles ahead of the encoder [default: the CPU count, at most 4].")
@click.option("--overwrite", is_flag=True, help="Predict every slide again, ignoring earlier results in OUT.")
@storage_options_option
@imports_first("torch", "wsi_encoder.pipelines.predict")
def predict(
    slides: tuple[Path | str, ...],
    model_dir: Path | str,
    out: Path | str,
    encoder: str | None,
    weights: str | None,
    mpp: float | None,
    tile_size: int | None,
    stride: int | None,
    mpp_tolerance: float | None,
    tissue_threshold: float | None,
    force: bool,
    keep_stores: bool,
    heatmaps: bool,
    geojson: bool,
    slide_mpp: float | None,
    backend: str,
    device: str,
    batch_size: int,
    threads: int | None,
    read_threads: int | None,
    overwrite: bool,
) -> None:
    """Predict SLIDES (files or folders of slides) with a trained slide classifier, in one process.

    Tiles each slide as `wsienc tile` would, encodes the tiles as `wsienc encode` would and applies
    the classifier, streaming (no patch or embedding store unless --keep-stores). The encoder and
    tile spec default to those the model's training embeddings were made with (recorded by
    `classify train`); a different one is refused unless --force. A slide that fails is reported
    and skipped; the exit status is 1 when any failed.

    \b
    Example:
      wsienc predict new_slides/ --model runs/abmil --out predictions/
    """
    from wsi_encoder.pipelines.predict import predict_slides

    quiet = is_quiet()
    bar = Progress("predicting", unit="tile", leave=False)

    def on_slide(slide: SlidePrediction) -> None:
        bar.close()
        if slide.status == "failed":
            echo_err(f"failed: {slide.reason}")
        elif not quiet:
            note = " (earlier run)" if slide.status == "done" else ""
            if slide.value is not None:  # a regression / survival model
                verdict = f"{slide.value:.4g}"
            else:
                verdict = f"{slide.pred} (" + ", ".join(f"{c} {p:.3f}" for c, p in slide.probabilities.items()) + ")"
            echo_err(f"{slide.slide_id}: {verdict}, {slide.n_tiles} tiles, {slide.seconds:.1f} s{note}")

    try:
        with local_copy(model_dir) as model_folder, local_output(out) as out_folder:
            report = predict_slides(
                slides, model_folder, out_folder, encoder=encoder, weights=weights, mpp=mpp, tile_size=tile_size, stride=stride,
            mpp_tolerance=mpp_tolerance, tissue_threshold=tissue_threshold, force=force, keep_stores=keep_stores,
                heatmaps=heatmaps, geojson=geojson, slide_mpp=slide_mpp, backend=backend, device=device,
                batch_size=batch_size, threads=threads, read_threads=read_threads, overwrite=overwrite, on_slide=on_slide,
                progress=bar.update, model_source=str(model_dir),
            )  # fmt: skip
    finally:
        bar.close()
    s = report.settings
    if s.forced:
        echo_err("warning: forced past " + "; ".join(s.forced))
    click.echo(
        f"{len(report.predicted)} slide(s) predicted, {len(report.failed)} failed; encoder {s.encoder}, "
        f"{s.spec.tile_size} px tiles at {s.spec.target_mpp:g} µm/px (stride {s.spec.stride_px})"
    )
    click.echo(f"predictions  {join(out, Path(report.files['predictions']).name)}")
    if heatmaps:
        click.echo(f"heatmaps     {join(out, 'heatmaps')}/<slide_id>.png")
    if geojson:
        click.echo(f"geojson      {join(out, 'geojson')}/<slide_id>.geojson (QuPath: File > Import objects from file)")
    if keep_stores:
        click.echo(f"stores       {join(out, 'patches.zarr')} (coords-only), {join(out, 'embeddings.zarr')}")
    if report.failed:
        sys.exit(1)
