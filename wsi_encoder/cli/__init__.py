"""The ``wsienc`` command line: a thin click layer over the library.

Library errors (:class:`~wsi_encoder.errors.WsiEncoderError`) become one line on stderr and a
non-zero exit; any other exception does too, with the traceback only under ``-v``. ``-q``/``-v``
are accepted before or after the subcommand (``wsienc -q tile ...`` = ``wsienc tile ... -q``), and
third-party warnings reach the terminal only with ``-v``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any

import click

from wsi_encoder import __version__
from wsi_encoder.errors import WsiEncoderError

logger = logging.getLogger("wsi_encoder")

#: Subcommands: name -> "module:function", imported only when used, so ``wsienc --help`` is fast.
COMMANDS: dict[str, str] = {
    "info": "wsi_encoder.cli.info:info",
    "demo": "wsi_encoder.cli.demo:demo",
    "tile": "wsi_encoder.cli.tile:tile",
    "tasks": "wsi_encoder.cli.train:tasks",
    "train-encoder": "wsi_encoder.cli.train:train_encoder",
    "encoders": "wsi_encoder.cli.encoders:encoders",
    "encode": "wsi_encoder.cli.encode:encode",
    "classify": "wsi_encoder.cli.classify:classify",
    "predict": "wsi_encoder.cli.predict:predict",
    "lomo": "wsi_encoder.cli.lomo:lomo",
    "signatures": "wsi_encoder.cli.signatures:signatures",
}


_VERBOSITY_FLAG = re.compile(r"^(-v+|-q|--verbose|--quiet)$")


def hoist_verbosity_flags(args: list[str]) -> list[str]:
    """Move ``-q``/``-v``/``-vv``/``--quiet``/``--verbose`` given anywhere (before ``--``) to the front."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if _VERBOSITY_FLAG.match(a)]
    rest = [a for a in args[:end] if not _VERBOSITY_FLAG.match(a)]
    return flags + rest + args[end:]


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use and whose errors are one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_verbosity_flags(list(args)))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = __import__(module_name, fromlist=[attr])
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        command: click.Command = getattr(module, attr)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except WsiEncoderError as exc:
            logger.debug("error", exc_info=True)
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except BrokenPipeError:  # the reader of our output left (`wsienc encoders | head`): not an error to print
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own advice (signal docs)
            raise click.exceptions.Exit(1) from None
        except Exception as exc:
            if logger.isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(f"{type(exc).__name__}: {exc} (run with -v for the traceback)") from exc


def setup_logging(verbosity: int) -> None:
    """Configure the ``wsi_encoder`` logger for the CLI: WARNING, INFO with -v... (-q: errors only)."""
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    if verbosity < 0:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("wsi_encoder")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Third-party libraries log per-page/per-tile noise (tifffile: an ERROR per page of a truncated file);
    # our own one-line errors say what matters, so theirs show only at -vv.
    for name in ("tifffile", "tiffslide"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.CRITICAL)
    # Third-party warnings (tiffslide's partial NDPI metadata parsing, library deprecations) are not the
    # user's business unless asked for; worker processes inherit the choice through PYTHONWARNINGS.
    if verbosity < 1:
        warnings.simplefilter("ignore")
        os.environ["PYTHONWARNINGS"] = "ignore"
    else:
        warnings.simplefilter("default")
        logging.captureWarnings(True)
        captured = logging.getLogger("py.warnings")
        captured.handlers[:] = [handler]
        captured.propagate = False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsienc")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug with tracebacks).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """wsienc: whole-slide images -> patch stores -> embedding grids -> slide-level models."""
    verbosity = -1 if quiet else verbose
    setup_logging(verbosity)
    ctx.ensure_object(dict)
    ctx.obj["verbosity"] = verbosity
