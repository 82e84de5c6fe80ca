"""A generated demo cohort: slides whose label is the presence of a lesion texture."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.files import atomic_write_csv
from wsi_encoder.synthetic.slides import SyntheticSlideSpec, write_synthetic_slide

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortSlide:
    """One generated slide of a cohort and its label."""

    slide_id: str
    path: Path
    label: str
    patient_id: str
    spec: SyntheticSlideSpec


def write_demo_cohort(
    out_dir: str | Path,
    n_slides: int = 8,
    *,
    width: int = 6144,
    height: int = 4096,
    mpp: float = 0.5,
    seed: int = 0,
    slides_per_patient: int = 1,
) -> list[CohortSlide]:
    """Write ``n_slides`` synthetic slides and ``labels.csv`` (``slide_id,label,patient_id``) to ``out_dir``.

    Half the slides (alternating) carry a lesion (label ``lesion``), the others are ``normal``; every
    third slide has pen marks. Existing slides with the same spec are kept, so re-running is cheap.
    """
    if n_slides < 2:
        raise InvalidParameterError(f"a cohort needs at least 2 slides (one per class), got {n_slides!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slides: list[CohortSlide] = []
    for i in range(n_slides):
        lesion = i % 2 == 1
        spec = SyntheticSlideSpec(
            width=width,
            height=height,
            mpp=mpp,
            seed=seed * 10_000 + i,
            pieces=1 + (i * 7 + seed) % 3,
            lesion=lesion,
            pen_marks=i % 3 == 0,
        )
        slide_id = f"demo_{i:03d}"
        path = out / f"{slide_id}.tif"
        if not path.exists():
            write_synthetic_slide(path, spec)
        slides.append(
            CohortSlide(slide_id, path, "lesion" if lesion else "normal", f"patient_{i // slides_per_patient:03d}", spec)
        )
    atomic_write_csv(
        out / "labels.csv", [(s.slide_id, s.label, s.patient_id) for s in slides], header=("slide_id", "label", "patient_id")
    )
    logger.info("demo cohort of %d slides in %s", n_slides, out)
    return slides
