"""``wsienc encoders``: the registered tile encoders, their sizes, resolution, weights and licences."""

from __future__ import annotations

import json
import os

import click

from wsi_encoder.cli.common import imports_first


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry as a JSON list.")
@imports_first("wsi_encoder.models.encoders")
def encoders(as_json: bool) -> None:
    """List every registered encoder: embedding size, input size, µm/px, resize, output, weights format, source, licence.

    Pretrained encoders are loaded from a local file only (`--weights FILE`, or the conventional file
    under $WSIENC_WEIGHTS_DIR); nothing is downloaded. Several are gated or non-commercial: read the
    licence column before publishing.
    """
    from wsi_encoder.models.encoders import WEIGHTS_DIR_ENV, encoder_specs, find_in_weights_dir

    specs = encoder_specs()
    if as_json:
        rows = []
        for s in specs:
            row = s.to_dict()
            found = find_in_weights_dir(s.name, s.weights_file)
            row["weights_found"] = None if found is None else str(found)
            rows.append(row)
        click.echo(json.dumps(rows, indent=2))
        return
    header = f"{'name':<15} {'dim':>5} {'input':>5} {'µm/px':>5}  {'weights':<8} licence"
    click.echo(header)
    click.echo("-" * len(header))
    for s in specs:
        need = "required" if s.requires_weights else "optional"
        click.echo(f"{s.name:<15} {s.embed_dim:>5} {s.input_size:>5} {s.mpp:>5.2g}  {need:<8} {s.license}")
        click.echo(f"{'':<15} {s.description}")
        click.echo(f"{'':<15} source:  {s.source}")
        click.echo(f"{'':<15} format:  {s.weights_format}")
        crop = "" if s.crop is None else (
            f", centre crop {s.input_size} of {round(s.input_size / s.crop_fraction)}" if s.crop_fraction < 1 else ", centre crop"
        )
        mean = ", ".join(f"{v:g}" for v in s.mean)
        std = ", ".join(f"{v:g}" for v in s.std)
        click.echo(f"{'':<15} input:   {s.interpolation} resize{crop}; mean ({mean}), std ({std}); output: {s.output}")
        found = find_in_weights_dir(s.name, s.weights_file)
        if found is not None:
            click.echo(f"{'':<15} found:   {found}")
    where = os.environ.get(WEIGHTS_DIR_ENV)
    click.echo("")
    click.echo(
        f"Weights: --weights FILE, or ${WEIGHTS_DIR_ENV}/<name>/<official file>"
        + (f" (now {where})" if where else " (not set)")
        + ". Use: wsienc encode PATCHES --encoder NAME --weights FILE --out EMB"
    )
