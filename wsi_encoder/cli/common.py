"""Options and helpers shared by the ``wsienc`` commands."""

from __future__ import annotations

import functools
import gc
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import click

from wsi_encoder.errors import WsiEncoderError
from wsi_encoder.io.urls import (
    DEFAULT_RETRIES,
    as_local,
    check_bucket,
    is_url,
    set_retries,
    set_storage_options,
)

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")


F = TypeVar("F", bound=Callable[..., Any])


def import_frozen(*modules: str) -> None:
    """Import ``modules`` with the garbage collector paused, then freeze what exists (``gc.freeze``).

    A command's start-up is mostly imports; PyTorch alone creates about a million objects that live until
    exit. With the collector running, CPython traverses them again and again while they are created, then in
    every later full collection, and once more at shutdown: 0.5-0.7 s of a short command on the development
    machine (see docs/predict.md). Frozen, they sit in a generation that no collection visits; reference
    counting still frees them. Garbage from before is collected first, so none of it is frozen; the imports'
    own cyclic garbage is (for torch and the predict pipeline: 7,655 objects, about 1 MiB, kept until exit).
    Modules already imported are left alone (nothing is frozen then).
    """
    missing = [name for name in modules if name not in sys.modules]
    if not missing:
        return
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for name in missing:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def imports_first(*modules: str) -> Callable[[F], F]:
    """Decorate a command's function: :func:`import_frozen` its heavy ``modules`` before it runs.

    Its arguments are parsed first, so ``--help`` and a bad option stay as fast as before.
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            import_frozen(*modules)
            return command(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


def is_quiet() -> bool:
    """True under ``wsienc -q`` (the root command's verbosity is negative)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return bool(isinstance(obj, dict) and obj.get("verbosity", 0) < 0)


class Progress:
    """The one progress bar of the command line: a tqdm bar on stderr, drawn from the first report.

    The bar is created lazily (nothing is drawn for work that never starts), hidden under ``-q``,
    and its total may grow while the work is planned (:meth:`add_total`). On a terminal it redraws
    ten times a second; into a log file (a cluster job's stderr) once every 30 s. Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(
        self, desc: str, *, unit: str = "it", total: int | None = None, initial: int = 0, leave: bool = True
    ) -> None:
        self.desc = desc
        self.unit = unit
        self.total = total
        self.initial = initial
        self.leave = leave
        self.done = initial
        self.quiet = is_quiet()
        self._bar: tqdm[Any] | None = None

    def _get(self) -> tqdm[Any]:
        if self._bar is None:
            from tqdm import tqdm

            stream = sys.stderr
            self._bar = tqdm(
                total=self.total,
                initial=self.initial,
                desc=self.desc,
                unit=self.unit,
                file=stream,
                leave=self.leave,
                dynamic_ncols=True,
                mininterval=0.1 if stream.isatty() else 30.0,
                disable=self.quiet,
            )
        return self._bar

    def set_total(self, total: int) -> None:
        """Set the number of units the work is known to have."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def add_total(self, count: int) -> None:
        """Grow the total by ``count`` units (work discovered while running)."""
        if self.quiet:  # no bar under -q (nor tqdm's import)
            self.total = (self.total or 0) + count
            return
        bar = self._get()
        bar.total = (bar.total or 0) + count
        self.total = bar.total
        bar.refresh()

    def update(self, count: int = 1) -> None:
        """``count`` more units are done."""
        self.done += count
        if not self.quiet:
            self._get().update(count)

    def postfix(self, text: str) -> None:
        """Show ``text`` after the bar (running losses, slide counts ...)."""
        if not self.quiet:
            self._get().set_postfix_str(text, refresh=False)

    def write(self, message: str) -> None:
        """Print ``message`` on stderr above the bar (nothing under ``-q``)."""
        if self.quiet:
            return
        if self._bar is None:
            echo_err(message)
        else:
            self._bar.write(message, file=sys.stderr)

    def iterate(self, iterable: Iterable[T], total: int | None = None) -> Iterator[T]:
        """Yield from ``iterable``, one unit per item."""
        if total is not None:
            self.set_total(total)
        elif self.total is None and isinstance(iterable, Sized):
            self.set_total(len(iterable))
        for item in iterable:
            yield item
            self.update()

    def close(self) -> None:
        """Remove (or keep, with ``leave``) the bar; a later report draws a new one."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo_err(message: str, **kwargs: Any) -> None:
    """Print one line on stderr."""
    click.echo(message, err=True, **kwargs)


slide_backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "openslide", "tiffslide", "wsidicom"]),
    default="auto",
    show_default=True,
    help="Slide reader: openslide, tiffslide, or auto (tiffslide with direct tile decoding for SVS, generic TIFF "
    "and NDPI, OpenSlide for the other formats; the other backend when the first cannot read a file; wsidicom for "
    "folders of DICOM instances).",
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


def _set_retries(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value is not None:
        set_retries(value)


_retries_option = click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=None,
    expose_value=False,
    is_eager=True,
    callback=_set_retries,
    help=f"Retries of a failed object-store request (5xx, throttling, resets, cut bodies) with exponential "
    f"backoff [default: $WSIENC_RETRIES or {DEFAULT_RETRIES}]; see docs/scale.md.",
)

_storage_options_option = click.option(
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


def storage_options_option(command: Any) -> Any:
    """``--storage-options JSON`` and ``--retries N``, for every command that may reach object storage."""
    return _storage_options_option(_retries_option(command))


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    import_frozen("wsi_encoder.devices")  # torch: the start-up of every command with --device begins here
    from wsi_encoder.devices import resolve_device

    resolve_device(value)  # a bad name or a missing device: one line (WsiEncoderError), before any work
    return value


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_check_device,
    metavar="DEVICE",
    # the names of wsi_encoder.devices.DEVICE_CHOICES, written out so that --help does not import torch
    help="Torch device: auto, cpu, cuda, cuda:N, mps. auto: CUDA when present, then Apple MPS, else CPU.",
)
