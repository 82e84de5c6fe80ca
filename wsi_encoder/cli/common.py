"""Options and helpers shared by the ``wsienc`` commands."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import click

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
    help="Override the slides' level-0 resolution in µm/px (for files without, or with wrong, metadata).",
)
