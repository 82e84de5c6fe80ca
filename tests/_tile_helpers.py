"""Helpers for the tile tests: comparing patch stores, truncated slides, small generated slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide

#: Attributes allowed to differ between two runs that must give "the same store".
RUN_DEPENDENT_ATTRS = ("backend",)
SLIDE_ARRAYS = ("tiles", "coords", "grid", "tissue", "thumbnail", "tissue_mask", "chunks_done")


def assert_stores_equal(a: Path, b: Path, ignore_attrs: tuple[str, ...] = RUN_DEPENDENT_ATTRS) -> None:
    """Two patch stores hold the same slides, attributes (but ``ignore_attrs``) and array values."""
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert dict(ra.attrs)["kind"] == dict(rb.attrs)["kind"] == "patch_store"
    assert dict(ra.attrs)["slides"] == dict(rb.attrs)["slides"]
    ids_a, ids_b = sorted(k for k, _ in ra.groups()), sorted(k for k, _ in rb.groups())
    assert ids_a == ids_b
    for slide_id in ids_a:
        ga, gb = ra[slide_id], rb[slide_id]
        attrs_a = {k: v for k, v in dict(ga.attrs).items() if k not in ignore_attrs}
        attrs_b = {k: v for k, v in dict(gb.attrs).items() if k not in ignore_attrs}
        assert attrs_a == attrs_b, slide_id
        for name in SLIDE_ARRAYS:
            assert (name in ga) == (name in gb), (slide_id, name)
            if name in ga:
                va, vb = np.asarray(ga[name][...]), np.asarray(gb[name][...])
                assert va.shape == vb.shape, (slide_id, name)
                assert np.array_equal(va, vb), (slide_id, name)


def truncated_copy(source: Path, target: Path, fraction: float = 0.6) -> Path:
    """A copy of ``source`` cut to ``fraction`` of its bytes (a corrupt slide)."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def small_slide(path: Path, width: int = 2400, height: int = 1800, mpp: float | None = 0.5, seed: int = 5, **kw: object) -> Path:
    """A small generated slide (fast to write and tile; textures drawn at 0.5 µm/px, the cheap ones)."""
    kw.setdefault("texture_mpp", 0.5)
    kw.setdefault("pieces", 2)
    return write_synthetic_slide(path, SyntheticSlideSpec(width=width, height=height, mpp=mpp, seed=seed, **kw))  # type: ignore[arg-type]
