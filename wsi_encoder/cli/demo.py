"""``wsienc demo``: the main job end to end on a generated demo cohort."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True, help="Output folder.")
@click.option("--slides", "n_slides", type=click.IntRange(min=2), default=8, show_default=True, help="Slides in the cohort.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated cohort and of training.")
def demo(out: Path, n_slides: int, seed: int) -> None:
    """Generate a demo cohort of slides (label: a lesion texture) and run the main job on it."""
    from wsi_encoder.io.slides import open_slide
    from wsi_encoder.synthetic import write_demo_cohort

    click.echo(f"generating {n_slides} demo slides in {out / 'slides'} ...")
    slides = write_demo_cohort(out / "slides", n_slides, seed=seed)
    for s in slides:
        with open_slide(s.path) as reader:
            info = reader.info()
        click.echo(f"{s.slide_id}  {s.label:<7} {info.width} x {info.height} px  {info.mpp_x} µm/px  {info.level_count} levels")
