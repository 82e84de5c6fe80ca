"""``wsienc encode``: compress every slide of a patch store into an embedding grid."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import click

from wsi_encoder.cli.common import (
    PATH_OR_URL,
    Progress,
    device_option,
    echo_err,
    imports_first,
    storage_options_option,
)
from wsi_encoder.io.urls import is_url, local_output


class EncodeProgress(Progress):
    """Tiles encoded; the total is known at the first report."""

    def __init__(self) -> None:
        super().__init__("encoding", unit="tile")

    def __call__(self, n: int, total: int) -> None:
        if self.total != total:
            self.set_total(total)
        self.update(n)


@click.command()
@click.argument("patch_store", type=PATH_OR_URL)
@click.option("--encoder", required=True, help="A `wsienc train-encoder` checkpoint folder or a registered encoder name (see `wsienc encoders`: uni, virchow2, resnet50-trunc, ...).")
@click.option("--weights", type=str, default=None, help="Weights of a registered encoder: a path or a URL (s3://...; fetched once per worker process) of a .safetensors (preferred; .bin/.pth read with weights_only) file or snapshot folder. Default: $WSIENC_WEIGHTS_DIR/<name>/<file>. Never downloaded from a model hub.")
@click.option("--out", type=PATH_OR_URL, required=True, help="Embedding store to write (zarr v3, a folder or an s3:// URL; resumed when it exists).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True, help="Storage type of features and grid.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Tiles per forward pass.")
@click.option("--chunk-tiles", type=click.IntRange(min=1), default=1024, show_default=True, help="Tiles per task (and per stored chunk).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Parallel tasks: threads here (default 1, torch uses every core), or worker processes with --scheduler processes.")
@click.option("--scheduler", default=None, metavar="threads|processes|tcp://HOST:PORT", help="Where tasks run: this process (threads, default), a local dask cluster of --workers processes, or a running dask scheduler.")
@click.option("--h5-dir", type=PATH_OR_URL, default=None, help="Also write <slide_id>.h5 (features, coords; CLAM/TRIDENT layout) here (a URL: staged locally, uploaded at the end; local or --scheduler processes workers only).")
@click.option("--preview-dir", type=PATH_OR_URL, default=None, help="Also write a PNG per slide: PCA-RGB grid beside the thumbnail (a path or URL, as --h5-dir).")
@click.option("--overwrite", is_flag=True, help="Re-encode slides that are already complete.")
@device_option
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True, help="Forward pass precision (autocast): bf16 on CUDA or recent CPUs, fp16 on CUDA. Features are stored as --dtype.")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the encoder (slower start, faster on long runs).")
@click.option("--slide", "slide_ids", multiple=True, help="Only this slide id (repeatable).")
@click.option("--dihedral", is_flag=True, help="Also encode every tile in its 8 rotations/flips (features_dihedral, rotation-true NIC augmentation; 8x the time). gridcnn then trains and predicts on true views.")
@storage_options_option
@imports_first("torch", "wsi_encoder.pipelines.encode_store")
def encode(
    patch_store: Path | str,
    encoder: str,
    weights: str | None,
    out: Path | str,
    dtype: str,
    batch_size: int,
    chunk_tiles: int,
    workers: int | None,
    scheduler: str | None,
    h5_dir: Path | str | None,
    preview_dir: Path | str | None,
    overwrite: bool,
    device: str,
    precision: str,
    compile_model: bool,
    slide_ids: tuple[str, ...],
    dihedral: bool,
) -> None:
    """Encode every tile of PATCH_STORE and lay the embeddings out as each slide's grid (C x R x Q).

    Finished slides are skipped (unless --overwrite) and interrupted ones resume where they stopped.
    A slide that fails is reported and skipped; the exit status is 1 when any failed.

    Example:

    \b
      wsienc encode patches.zarr --encoder nic --out embeddings.zarr --h5-dir h5/ --preview-dir previews/
      wsienc encode patches.zarr --encoder uni --weights UNI/pytorch_model.bin --out uni.zarr --precision bf16
    """
    from wsi_encoder.pipelines.encode_store import encode_store

    staged = [folder for folder in (h5_dir, preview_dir) if folder is not None and is_url(folder)]
    if staged and scheduler not in (None, "threads", "synchronous", "processes"):
        raise click.ClickException("--h5-dir/--preview-dir URLs are staged on this machine: use local workers, or a path the cluster shares")
    bar = EncodeProgress()
    with ExitStack() as stack:
        h5_folder = None if h5_dir is None else stack.enter_context(local_output(h5_dir))
        preview_folder = None if preview_dir is None else stack.enter_context(local_output(preview_dir))
        stack.callback(bar.close)
        result = encode_store(
            patch_store,
            encoder,
            out,
            weights=weights,
            dtype=dtype,
            batch_size=batch_size,
            chunk_tiles=chunk_tiles,
            workers=workers,
            scheduler=scheduler,
            h5_dir=h5_folder,
            preview_dir=preview_folder,
            overwrite=overwrite,
            device=device,
            slides=list(slide_ids) or None,
            progress=bar,
            precision=precision,
            compile=compile_model,
            dihedral=dihedral,
        )
    for slide in result.slides.values():
        if slide.status == "failed":
            echo_err(f"error: slide {slide.slide_id}: {slide.reason}")
        elif slide.status == "skipped":
            echo_err(f"skipped: slide {slide.slide_id}: {slide.reason}")
    click.echo(
        f"{out}: {result.count('ok')} slides encoded, {result.count('done')} already complete, "
        f"{len(result.failed)} failed, {result.count('skipped')} skipped"
    )
    if h5_dir is not None and result.h5_files:
        click.echo(f"h5 features: {h5_dir}/<slide_id>.h5 ({len(result.h5_files)} files)")
    if preview_dir is not None and result.previews:
        click.echo(f"previews: {preview_dir}/<slide_id>.png ({len(result.previews)} files)")
    if result.failed:
        sys.exit(1)
