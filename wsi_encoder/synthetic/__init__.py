"""Generated slides and cohorts (demo, tests, benchmarks)."""

from wsi_encoder.synthetic.cohort import CohortSlide, write_demo_cohort
from wsi_encoder.synthetic.slides import (
    SlideLayout,
    SlideRenderer,
    SyntheticSlideSpec,
    read_synthetic_spec,
    write_synthetic_slide,
)

__all__ = [
    "CohortSlide",
    "SlideLayout",
    "SlideRenderer",
    "SyntheticSlideSpec",
    "read_synthetic_spec",
    "write_demo_cohort",
    "write_synthetic_slide",
]
