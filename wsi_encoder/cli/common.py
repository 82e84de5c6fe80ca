"""Options and helpers shared by the ``wsienc`` commands."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from wsi_encoder.errors import WsiEncoderError
from wsi_encoder.io.urls import as_local, check_bucket, is_url, set_storage_options

T = TypeVar("T")


def progress(iterable: Iterable[T], *, label: str, length: int | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar on stderr (hidden when quiet or not a terminal)."""
    ctx = click.get_current_context(silent=True)
    quiet = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("verbosity", 0) < 0)
    if quiet:
        yield from iterable
        return
    with click.progressbar(iterable, label=label, length=length, file=click.get_text_stream("stderr")) as bar:
        yield from bar


def echo_err(message: str, **kwargs: Any) -> None:
    """Print one line on stderr."""
    click.echo(message, err=True, **kwargs)


slide_backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "openslide", "tiffslide"]),
    default="auto",
    show_default=True,
    help="Slide reader: openslide, tiffslide, or auto (tiffslide with direct tile decoding for SVS, generic TIFF "
    "and NDPI, OpenSlide for the other formats; the other backend when the first cannot read a file).",
)

slide_mpp_option = click.option(
    "--slide-mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Level-0 µm/px for slides whose metadata records none (a fallback; slides that record one keep theirs).",
)


class PathOrURL(click.ParamType):
    """A local path (a :class:`~pathlib.Path`) or an fsspec URL kept as a string (``s3://...``).

    A URL is checked at once (its scheme, its bucket, the credentials: one HEAD request), so a bad
    URL, a missing bucket or missing credentials is one line before any work starts.
    """

    name = "path|url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        if not is_url(value):
            return as_local(value)
        try:
            check_bucket(str(value))
        except WsiEncoderError as exc:
            raise click.ClickException(str(exc)) from None
        return str(value)


#: Type of every path argument that may live on object storage.
PATH_OR_URL = PathOrURL()


def _set_storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        try:
            set_storage_options(value)
        except WsiEncoderError as exc:
            raise click.BadParameter(str(exc).removeprefix("--storage-options "), ctx=ctx, param=param) from None


storage_options_option = click.option(
    "--storage-options",
    metavar="JSON",
    default=None,
    expose_value=False,
    is_eager=True,
    callback=_set_storage_options,
    help="fsspec options for s3://, gs://, az:// paths as a JSON object, e.g. '{\"endpoint_url\": "
    "\"https://minio.example:9000\"}' or '{\"anon\": true}'. Credentials come best from the standard environment "
    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL); see docs/cluster.md.",
)
