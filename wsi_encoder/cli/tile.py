"""``wsienc tile``: slides -> a zarr patch store (tissue detection, tile grid at a target µm/px, dask)."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import click

from wsi_encoder.cli.common import (
    PATH_OR_URL,
    Progress,
    echo_err,
    imports_first,
    slide_backend_option,
    slide_mpp_option,
    storage_options_option,
)
from wsi_encoder.io.urls import local_copy, local_output

if TYPE_CHECKING:
    from wsi_encoder.pipelines.tile_cohort import ProgressEvent


class TileProgress(Progress):
    """Tiles done of a total that grows as slides are planned; slide counts in the postfix."""

    def __init__(self) -> None:
        super().__init__("tiling", unit="tile", total=0)
        self.slides = 0
        self.counts = {"ok": 0, "empty": 0, "failed": 0, "skipped": 0}

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "slides":
            self.slides = event.count
        elif event.kind == "tiles_planned":
            self.add_total(event.count)
        elif event.kind == "tiles":
            self.update(event.count)
        elif event.kind == "slide" and event.outcome is not None:
            self.counts[event.outcome.status] = self.counts.get(event.outcome.status, 0) + 1
        c = self.counts
        self.postfix(
            f"slides {sum(c.values())}/{self.slides} (ok {c['ok']}, empty {c['empty']}, "
            f"skipped {c['skipped']}, failed {c['failed']})"
        )


@click.command()
@click.argument("slides", nargs=-1, required=True, type=PATH_OR_URL)
@click.option("--out", "-o", required=True, type=PATH_OR_URL, help="The patch store to write (a .zarr directory or an s3:// URL); resumed if it exists.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True, help="Target resolution of the tiles in µm/px (0.5 ≈ 20x, 0.25 ≈ 40x).")
@click.option("--tile-size", type=click.IntRange(8, 8192), default=224, show_default=True, help="Tile edge in pixels at the target resolution.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Step between tiles in pixels at the target resolution [default: the tile size].")
@click.option("--mpp-tolerance", type=click.FloatRange(0, 0.5, max_open=True), default=0.05, show_default=True, help="A pyramid level within this relative distance of --mpp is read as it is, without resampling.")
@click.option("--edge", type=click.Choice(["pad", "drop"]), default="pad", show_default=True, help="pad: the grid covers the whole slide, tiles crossing the right/bottom edge are kept and padded with the background; drop: only whole tiles.")
@slide_mpp_option
@click.option("--force-slide-mpp", is_flag=True, help="Use --slide-mpp for every slide, replacing recorded values (each replacement is reported).")
@click.option("--slide-mpp-csv", type=PATH_OR_URL, default=None, help="CSV (a path or URL) with per-slide level-0 µm/px: header slide_id,mpp or path,mpp; wins over --slide-mpp and metadata.")
@click.option("--tissue-threshold", type=click.FloatRange(0, 1), default=0.25, show_default=True, help="Keep tiles whose tissue fraction is at least this; 0 keeps every tile (e.g. fluorescence).")
@click.option("--tissue-mask", type=str, default=None, help="Folder (a path or a URL, fetched once per worker process) of per-slide masks used instead of tissue detection: <slide>.png (non-zero = tissue) or QuPath GeoJSON <slide>.geojson.")
@click.option("--codec", type=click.Choice(["jpeg", "zstd"]), default="jpeg", show_default=True, help="jpeg: lossy, near the slide's size; zstd: lossless.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality of the stored tiles.")
@click.option("--coords-only", is_flag=True, help="Store coordinates, grid, tissue, thumbnail and mask, but no pixels.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Parallel workers on this machine [default: number of CPUs].")
@click.option(
    "--scheduler",
    default=None,
    metavar="threads|processes|tcp://HOST:PORT",
    help="threads (default): dask's local threaded scheduler; processes: a local cluster of --workers processes; "
    "tcp://HOST:PORT: a running dask.distributed scheduler (see docs/tile.md, 'Cluster runs').",
)
@click.option("--overwrite", is_flag=True, help="Re-tile slides that are already complete in the store.")
@click.option("--qc-dir", type=PATH_OR_URL, default=None, help="Write one QC PNG per slide here (thumbnail, tissue outline, kept tiles); a URL is staged locally and uploaded at the end.")
@slide_backend_option
@storage_options_option
@imports_first("wsi_encoder.pipelines.tile_cohort", "dask")
def tile(
    slides: tuple[Path | str, ...],
    out: Path | str,
    mpp: float,
    tile_size: int,
    stride: int | None,
    mpp_tolerance: float,
    edge: str,
    slide_mpp: float | None,
    force_slide_mpp: bool,
    slide_mpp_csv: Path | str | None,
    tissue_threshold: float,
    tissue_mask: str | None,
    codec: str,
    jpeg_quality: int,
    coords_only: bool,
    workers: int | None,
    scheduler: str | None,
    overwrite: bool,
    qc_dir: Path | str | None,
    backend: str,
) -> None:
    """Cut SLIDES (files or folders of slides, local or s3:// URLs) into tiles at --mpp and store them in --out.

    Finds tissue on a thumbnail, lays a grid of --tile-size tiles at --mpp µm/px, keeps the tiles
    with enough tissue and writes them (or only their coordinates) to a zarr patch store, one group
    per slide. The grid covers the whole slide (edge tiles padded, see --edge). Interrupted runs
    resume; slides already complete are skipped. A slide with no tissue is recorded as empty and
    named in a warning. Exits with status 1 when any slide failed (each failure is listed and
    recorded in the store).

    \b
    Example:
      wsienc tile slides/ --out cohort.zarr --mpp 0.5 --tile-size 224 --qc-dir qc/
      wsienc tile s3://bucket/cohort/ --out s3://bucket/stores/cohort.zarr
    """
    from wsi_encoder.pipelines.tile_cohort import tile_cohort
    from wsi_encoder.tiling import TileSpec

    spec = TileSpec(target_mpp=mpp, tile_size=tile_size, stride=stride, tolerance=mpp_tolerance, edge=edge)
    ctx = click.get_current_context()
    verbosity = int((ctx.find_root().obj or {}).get("verbosity", 0))
    if verbosity < 2:  # a truncated TIFF makes tifffile log per page; the per-slide failure line says it once
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    bar = TileProgress()
    with ExitStack() as stack:
        csv_file = None if slide_mpp_csv is None else stack.enter_context(local_copy(slide_mpp_csv))
        qc_folder = None if qc_dir is None else stack.enter_context(local_output(qc_dir))
        stack.callback(bar.close)
        report = tile_cohort(
            slides,
            out,
            spec,
            tissue_threshold=tissue_threshold,
            codec=codec,
            jpeg_quality=jpeg_quality,
            coords_only=coords_only,
            backend=backend,
            slide_mpp=slide_mpp,
            force_slide_mpp=force_slide_mpp,
            slide_mpp_csv=csv_file,
            tissue_mask=tissue_mask,
            overwrite=overwrite,
            qc_dir=qc_folder,
            workers=workers,
            scheduler=scheduler,
            progress=bar,
        )
    for outcome in report.failed:
        reason = outcome.reason or "unknown error"
        echo_err(f"failed: {reason}" if outcome.source in reason else f"failed: {outcome.source}: {reason}")
    parts = [f"{len(report.ok)} slide(s) tiled"]
    if report.empty:
        parts.append(f"{len(report.empty)} empty (no tissue found)")
    if report.skipped:
        parts.append(f"{len(report.skipped)} already complete")
    if report.failed:
        parts.append(f"{len(report.failed)} failed")
    what = "coordinates of " if coords_only else ""
    click.echo(f"{', '.join(parts)}; {what}{report.n_tiles} tiles in {report.store}")
    if qc_dir is not None:
        click.echo(f"QC pictures in {qc_dir}")
    if report.failed:
        sys.exit(1)
