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


def image_slide(path: Path, image: np.ndarray, mpp: float | None = 0.5, tile: int = 128) -> Path:
    """A tiled, losslessly compressed (deflate) TIFF slide of ``image`` with a half-size second level."""
    import tifffile
    from PIL import Image

    levels = [image, np.asarray(Image.fromarray(image).resize((image.shape[1] // 2, image.shape[0] // 2)))]
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            kwargs: dict[str, object] = {"resolution": (1, 1), "resolutionunit": "NONE"}
            if mpp is not None:
                ppcm = 1e4 / (mpp * 2**index)
                kwargs = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), compression="zlib", photometric="rgb", subfiletype=1 if index else 0, metadata=None, **kwargs)
    return path


def scene(kind: str, width: int, height: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A slide picture and its true tissue mask.

    ``kind``: ``edge`` (H&E-like tissue running into the right and bottom edges), ``ihc`` (a fragment
    of blue-grey haematoxylin counterstain with darker nuclei and brown DAB, low saturation),
    ``darkfield`` (dim fluorescent tissue on black), ``tma`` (12 small cores), ``faint`` (grey,
    nearly unstained tissue), ``empty`` (glass only).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    if kind == "darkfield":
        img = np.full((height, width, 3), (6, 6, 9), np.float32)
    else:
        img = np.full((height, width, 3), (236, 236, 239), np.float32)
    if kind == "edge":
        truth = (xx >= width * 0.55) & (yy >= height * 0.55)
        img[truth] = (214, 140, 190)
        img[truth & (rng.random((height, width)) < 0.15)] = (120, 60, 150)  # nuclei
    elif kind == "ihc":
        truth = ((yy - height * 0.5) / (height * 0.22)) ** 2 + ((xx - width * 0.45) / (width * 0.2)) ** 2 <= 1
        img[truth] = (138, 152, 200)
        img[truth & (rng.random((height, width)) < 0.3)] = (88, 100, 168)
        img[truth & (rng.random((height, width)) < 0.04)] = (150, 105, 70)
    elif kind == "darkfield":
        truth = ((yy - height * 0.55) / (height * 0.3)) ** 2 + ((xx - width * 0.5) / (width * 0.3)) ** 2 <= 1
        img[truth] = (18, 45, 65)
        img[truth & (rng.random((height, width)) < 0.1)] = (30, 80, 150)
    elif kind == "tma":  # a grid of small round cores
        truth = np.zeros((height, width), bool)
        for cy in np.linspace(height * 0.2, height * 0.8, 3):
            for cx in np.linspace(width * 0.15, width * 0.85, 4):
                truth |= (yy - cy) ** 2 + (xx - cx) ** 2 <= (min(height, width) * 0.09) ** 2
        img[truth] = (200, 170, 200)
    elif kind == "faint":  # nearly unstained, grey tissue: darker than the glass, hardly coloured
        truth = ((yy - height * 0.5) / (height * 0.3)) ** 2 + ((xx - width * 0.5) / (width * 0.25)) ** 2 <= 1
        img[truth] = (200, 200, 205)
    elif kind == "empty":
        truth = np.zeros((height, width), bool)
    else:
        raise ValueError(kind)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), truth
