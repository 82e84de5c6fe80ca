"""Shared fixtures: the real data beside the checkout and generated slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSIENC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data" / "histo_real"))

# Tests run on the CPU with few threads: two cores are shared by the test process and dask workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def shared_path(*parts: str) -> Path:
    """A path under ``../shared/data/histo_real``; skips the test (naming it) when missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data {path} is missing (expected ../shared/data/histo_real beside the checkout)")
    return path


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """The real Aperio slide CMU-1-Small-Region.svs (2220 x 2967, 0.499 µm/px)."""
    return shared_path("slides", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def ndpi_slide() -> Path:
    """The real Hamamatsu NDPI (3968 x 4864, 0.228 µm/px, fluorescence TRITC)."""
    return shared_path("slides", "test3-TRITC-2-560.ndpi")


@pytest.fixture(scope="session")
def breakhis_dirs() -> list[Path]:
    """The two folders of real BreaKHis images (58 images, 15 patients, all four magnifications)."""
    return [shared_path("breakhis"), shared_path("breakhis_more")]


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 4096 x 3072 pyramidal JPEG TIFF at 0.5 µm/px with a lesion and pen marks."""
    path = tmp_path_factory.mktemp("slides") / "synthetic.tif"
    return write_synthetic_slide(
        path, SyntheticSlideSpec(width=4096, height=3072, mpp=0.5, seed=7, pieces=2, lesion=True, pen_marks=True)
    )


@pytest.fixture(scope="session")
def synthetic_slide_40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 6000 x 5000 slide at 0.2465 µm/px (a real 40x scanner's value), levels 1/4/16."""
    path = tmp_path_factory.mktemp("slides") / "synthetic_40x.tif"
    spec = SyntheticSlideSpec(width=6000, height=5000, mpp=0.2465, seed=11, pieces=3, level_downsamples=(1, 4, 16))
    return write_synthetic_slide(path, spec)


@pytest.fixture(scope="session")
def synthetic_slide_no_mpp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated slide whose TIFF carries no physical resolution."""
    path = tmp_path_factory.mktemp("slides") / "no_mpp.tif"
    return write_synthetic_slide(path, SyntheticSlideSpec(width=2048, height=1536, mpp=None, seed=3))
