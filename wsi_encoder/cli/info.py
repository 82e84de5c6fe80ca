"""``wsienc info``: what a slide says about itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from wsi_encoder.cli.common import (
    PATH_OR_URL,
    echo_err,
    imports_first,
    slide_backend_option,
    slide_mpp_option,
    storage_options_option,
)
from wsi_encoder.errors import WsiEncoderError


def _fmt(value: object) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@click.command()
@click.argument("slides", nargs=-1, required=True, type=PATH_OR_URL)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per slide (null when unknown).")
@slide_backend_option
@slide_mpp_option
@storage_options_option
@imports_first("wsi_encoder.io.slides")
def info(slides: tuple[Path | str, ...], as_json: bool, backend: str, slide_mpp: float | None) -> None:
    """Print the properties of each SLIDE (a file, or an s3:// / https:// URL): size, levels, downsamples, µm/px,
    objective, vendor, and the levels another installed backend lists where they differ."""
    from dataclasses import replace

    from wsi_encoder.io.slides import levels_elsewhere, open_slide_with_mpp

    failed = 0
    for path in slides:
        try:
            source = "metadata" if slide_mpp is None else "fallback"
            with open_slide_with_mpp(path, backend, slide_mpp, source, str(path))[0] as reader:
                reader.validate()
                record = reader.info()
            record = replace(record, other_backends=levels_elsewhere(path, record) or None)
        except WsiEncoderError as exc:
            echo_err(f"error: {exc}")
            failed += 1
            continue
        if as_json:
            click.echo(json.dumps(record.to_dict()))
            continue
        rows = [
            ("path", record.path),
            ("backend", record.backend),
            ("vendor", _fmt(record.vendor)),
            ("size (level 0)", f"{record.width} x {record.height} px"),
            ("mpp (x, y)", f"{_fmt(record.mpp_x)}, {_fmt(record.mpp_y)} µm/px"),
            ("objective power", _fmt(record.objective_power)),
            ("levels", str(record.level_count)),
        ]
        for i, ((w, h), ds) in enumerate(zip(record.level_dimensions, record.level_downsamples, strict=True)):
            mpp = "" if record.mpp_x is None else f"  {record.mpp_x * ds:.4g} µm/px"
            rows.append((f"  level {i}", f"{w} x {h} px  downsample {ds:.4g}{mpp}"))
        for other, dims in (record.other_backends or {}).items():
            listed = {tuple(d) for d in record.level_dimensions}
            extra = [f"{w} x {h}" for w, h in dims if (w, h) not in listed]
            rows.append((f"  {other}", f"lists {len(dims)} levels" + (
                f"; not listed by {record.backend}: {', '.join(extra)} px (computed by {other} from a stored level, "
                f"e.g. NDPI JPEG scaling; {record.backend} resamples the nearest stored level instead)" if extra else "")))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            click.echo(f"{key:<{width}}  {value}")
        click.echo("")
    if failed:
        sys.exit(1)
