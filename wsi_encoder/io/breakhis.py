"""BreaKHis file names: class, subtype, patient and magnification of each image.

BreaKHis v1 (Spanhol et al., IEEE TBME 2016) names every image
``SOB_<B|M>_<subtype>-<YY>-<slideID>-<mag>-<seq>.png``, e.g. ``SOB_B_A-14-22549AB-40-001.png``, and
stores it under ``BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/<patient>/<mag>X/``.

A patient is the case number ``<YY>-<number>`` (``14-22549``): the letters after the number name
slides or blocks of one case, so ``14-22549AB``, ``14-22549CD`` and ``14-22549G`` are one patient and
``14-16184`` and ``14-16184CD`` another. :func:`patient_key` is the one place this is decided (LOMO
splits, signatures and the train-encoder BreaKHis tasks all use it); ``key="token"`` groups by the
whole slide token instead (``14-22549AB``), which puts one patient on both sides of a split and is
only for reproducing work that did so.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from wsi_encoder.errors import DatasetError, InvalidParameterError

logger = logging.getLogger(__name__)

NAME_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<subtype>[A-Z]+)-(?P<year>\d+)-(?P<slide>[0-9A-Za-z]+)-(?P<mag>\d+)-(?P<seq>\d+)\.png$",
    re.IGNORECASE,
)
SUBTYPES = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
CLASSES = ("benign", "malignant")
MAGNIFICATIONS = (40, 100, 200, 400)
PATIENT_KEYS = ("number", "token")


@dataclass(frozen=True)
class BreakhisImage:
    """One BreaKHis image and what its name says."""

    path: Path
    label: str
    subtype: str
    patient_id: str
    strict_patient_id: str
    magnification: int

    @property
    def filename(self) -> str:
        """The image's file name."""
        return self.path.name


def patient_key(image: BreakhisImage | str | Path, key: str = "number") -> str:
    """The patient of a BreaKHis image: ``14-22549`` (``key="number"``, strict) or ``14-22549AB`` (``"token"``).

    ``image`` is a parsed image or a BreaKHis file name / path.

    Raises
    ------
    InvalidParameterError
        ``key`` is neither ``number`` nor ``token``.
    DatasetError
        A name that is not a BreaKHis file name.
    """
    if key not in PATIENT_KEYS:
        raise InvalidParameterError(f"patient key {key!r}: choose number (strict, default) or token")
    if not isinstance(image, BreakhisImage):
        parsed = parse_breakhis_name(image)
        if parsed is None:
            raise DatasetError(f"{image}: not a BreaKHis file name (expected SOB_B_A-14-22549AB-40-001.png)")
        image = parsed
    return image.strict_patient_id if key == "number" else image.patient_id


def parse_breakhis_name(path: str | Path) -> BreakhisImage | None:
    """Parse a BreaKHis file name; None when the name does not follow the convention."""
    path = Path(path)
    match = NAME_RE.match(path.name)
    if match is None:
        return None
    subtype = match["subtype"].upper()
    if subtype not in SUBTYPES:
        return None
    digits = re.match(r"\d+", match["slide"])
    number = digits.group(0) if digits else match["slide"]
    return BreakhisImage(
        path=path,
        label="benign" if match["cls"].upper() == "B" else "malignant",
        subtype=SUBTYPES[subtype],
        patient_id=f"{match['year']}-{match['slide']}",
        strict_patient_id=f"{match['year']}-{number}",
        magnification=int(match["mag"]),
    )


def scan_breakhis(root: str | Path) -> list[BreakhisImage]:
    """All BreaKHis-named PNGs under ``root`` (the official tree or any folder), sorted by name.

    Raises
    ------
    DatasetError
        ``root`` does not exist or holds no BreaKHis-named image.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such BreaKHis folder")
    candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png")
    images = []
    for path in candidates:
        parsed = parse_breakhis_name(path)
        if parsed is None:
            logger.debug("not a BreaKHis name, skipped: %s", path)
            continue
        images.append(parsed)
    if not images:
        raise DatasetError(
            f"{root}: no BreaKHis images found (expected PNGs named like SOB_B_A-14-22549AB-40-001.png)"
        )
    images.sort(key=lambda im: im.path.name)
    return images
