"""Generated BreaKHis-layout datasets for the LOMO tests (small PNGs in the official folder tree)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

BENIGN_SUBTYPES = (
    ("A", "adenosis"),
    ("F", "fibroadenoma"),
    ("PT", "phyllodes_tumor"),
    ("TA", "tubular_adenoma"),
)
MALIGNANT_SUBTYPES = (
    ("DC", "ductal_carcinoma"),
    ("LC", "lobular_carcinoma"),
    ("MC", "mucinous_carcinoma"),
    ("PC", "papillary_carcinoma"),
)
MAGS = (40, 100, 200, 400)
#: Per-magnification RGB offsets of the nuisance (an additive colour cast that tracks magnification).
NUISANCE = {40: (10.0, 30.0, 40.0), 100: (40.0, 10.0, 30.0), 200: (30.0, 40.0, 10.0), 400: (25.0, 25.0, 25.0)}


def _render(
    rng: np.random.Generator, malignant: bool, mag: int, size: tuple[int, int], nuisance: bool
) -> np.ndarray:
    """An H&E-like picture: pink stroma with purple nuclei.

    Class signal (magnification independent): malignant images have many more, darker nuclei.
    Scale follows magnification (nuclei radius grows with it), as in real images. With
    ``nuisance`` a strong magnification cue is added: the contrast is lowered and a colour cast
    that depends only on the magnification is added, and the nuclei keep one size at every
    magnification (so the colour cast is the only magnification cue).
    """
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (235, 190, 215)
    img += rng.normal(0, 6, (h, w, 1))
    radius = 2.2 if nuisance else {40: 1.2, 100: 1.8, 200: 2.6, 400: 3.6}[mag]
    count = int((90 if malignant else 25) * (1.6 / radius) ** 2) + 3
    colour = np.array((95, 40, 140) if malignant else (160, 110, 185), np.float32)
    for _ in range(count):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = radius * rng.uniform(0.7, 1.3)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[mask] = colour + rng.normal(0, 8, 3)
    if nuisance:
        img = img * 0.7 + np.array(NUISANCE[mag], np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_breakhis_tree(
    root: Path,
    *,
    n_benign: int = 4,
    n_malignant: int = 4,
    per_magnification: int = 3,
    magnifications: tuple[int, ...] = MAGS,
    size: tuple[int, int] = (72, 48),
    nuisance: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``root/BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/<patient>/<mag>X/*.png``.

    Every patient has ``per_magnification`` images at every magnification. Returns the dataset root
    (``root/BreaKHis_v1``).
    """
    rng = np.random.default_rng(seed)
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    patients = [("B", "benign", BENIGN_SUBTYPES[i % 4], 1000 + i) for i in range(n_benign)]
    patients += [("M", "malignant", MALIGNANT_SUBTYPES[i % 4], 2000 + i) for i in range(n_malignant)]
    for code, cls, (sub, subname), number in patients:
        slide = f"{number}AB" if number % 2 else f"{number}"
        folder = base / cls / "SOB" / subname / f"SOB_{code}_{sub}_14-{slide}"
        for mag in magnifications:
            out = folder / f"{mag}X"
            out.mkdir(parents=True, exist_ok=True)
            for seq in range(1, per_magnification + 1):
                pixels = _render(rng, cls == "malignant", mag, size, nuisance)
                Image.fromarray(pixels).save(out / f"SOB_{code}_{sub}-14-{slide}-{mag}-{seq:03d}.png")
    return root / "BreaKHis_v1"
