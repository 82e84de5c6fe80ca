"""Slide ids from file names, and the expansion of command-line inputs into slide files.

A slide id names the slide's group in a store, so it must be a safe zarr node name and unique in
the cohort: ``TCGA-A1-A0SB-01Z-00-DX1.svs`` -> ``TCGA-A1-A0SB-01Z-00-DX1``; characters outside
``[A-Za-z0-9._-]`` become ``_``. Two files mapping to the same id (also when they differ only in
case, which clashes on case-insensitive file systems) are an error that names both.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsi_encoder.errors import InvalidParameterError, SlideNotFoundError
from wsi_encoder.io.urls import check_bucket, exists, is_file, is_url, list_files, normalize

logger = logging.getLogger(__name__)

#: File suffixes scanned for in directories (OpenSlide's formats and plain TIFF).
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".czi",
)
_COMPOUND_SUFFIXES = (".ome.tiff", ".ome.tif")
#: Instances of a DICOM WSI: a folder holding them is one slide (io/dicom_slides.py).
DICOM_SUFFIX = ".dcm"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_ID_LENGTH = 200


@dataclass(frozen=True)
class SlideEntry:
    """A slide file and its id in the cohort."""

    slide_id: str
    #: A local path, or the slide's URL (``s3://...``) as a string.
    path: Path | str


def slide_id_from_path(path: str | Path) -> str:
    """The slide id of a file: its name without the slide suffix, made safe as a zarr group name.

    A DICOM folder keeps its whole name (often a UID such as ``1.2.826.0.1``); a ``#<SeriesInstanceUID>``
    selector is appended as ``_<uid>``.
    """
    from wsi_encoder.io.dicom_slides import split_series

    folder, uid = split_series(path)
    name = str(folder).rstrip("/").rsplit("/", 1)[-1] if is_url(folder) else Path(folder).name
    lower = name.lower()
    for suffix in (*_COMPOUND_SUFFIXES, *SLIDE_SUFFIXES):
        if lower.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    else:
        if uid is None and not Path(name).suffix[1:].isdigit() and not (not is_url(folder) and Path(folder).is_dir()):
            name = Path(name).stem or name
    if uid is not None:
        name = f"{name}_{uid}"
    safe = _UNSAFE.sub("_", name).lstrip(".").rstrip("._")
    if safe.startswith("__"):  # zarr reserves names starting with "__"
        safe = "s" + safe
    return (safe or "slide")[:_MAX_ID_LENGTH]


def is_slide_file(path: Path) -> bool:
    """Whether a directory scan should pick up ``path`` (a known slide suffix, not hidden)."""
    lower = path.name.lower()
    return path.is_file() and not path.name.startswith(".") and lower.endswith(SLIDE_SUFFIXES)


def expand_slide_inputs(inputs: Iterable[str | Path], exclude: Sequence[str | Path] = ()) -> list[Path | str]:
    """Expand files and directories (or URLs of objects and prefixes) into a list of slide files.

    Files are taken as given (any suffix); directories are searched recursively for files with a
    :data:`SLIDE_SUFFIXES` suffix, in sorted order, skipping hidden entries, zarr stores and the
    ``exclude`` paths (e.g. the output store). A file listed twice is kept once. A URL prefix
    (``s3://bucket/cohort/``) is listed in one recursive listing (:func:`wsi_encoder.io.urls.list_files`).

    Raises
    ------
    SlideNotFoundError
        An input does not exist.
    InvalidParameterError
        No slide was found at all.
    """
    excluded = {Path(p).resolve() for p in exclude if not is_url(p)}
    excluded_urls = tuple(f"{normalize(p)}/" for p in exclude if is_url(p))
    found: list[Path | str] = []
    seen: set[Path | str] = set()

    def add(path: Path | str) -> None:
        resolved = normalize(path)
        if resolved not in seen:
            seen.add(resolved)
            found.append(resolved)

    inputs = list(inputs)
    for item in inputs:
        if is_url(item):
            check_bucket(str(item))
            if split_series_of(item) != item or is_file(item):  # a DICOM series selection, or an object
                add(str(item))
            elif exists(item):
                listed = _dicom_folders(
                    [u for u in list_files(str(item), (*SLIDE_SUFFIXES, DICOM_SUFFIX)) if not u.startswith(excluded_urls)]
                )
                if not listed:
                    logger.warning("no slide files (%s) under %s", ", ".join(SLIDE_SUFFIXES), item)
                for url in listed:
                    add(url)
            else:
                raise SlideNotFoundError(f"{item}: no such object or prefix")
            continue
        path = Path(item).expanduser()
        if not path.exists() and not Path(str(split_series_of(path))).is_dir():
            raise SlideNotFoundError(f"{path}: no such file or directory")
        if path.is_dir():
            if path.suffix.lower() == ".zarr":
                raise InvalidParameterError(f"{path}: is a zarr store, not a slide file or a folder of slides")
            before = len(found)
            for child in sorted(_walk(path, excluded)):
                add(child)
            if len(found) == before:
                logger.warning("no slide files (%s) in directory %s", ", ".join(SLIDE_SUFFIXES), path)
        else:
            add(path)
    if not found:
        raise InvalidParameterError(
            f"no slides found in {', '.join(str(i) for i in inputs)} (looked for {', '.join(SLIDE_SUFFIXES)})"
        )
    return found


def split_series_of(path: Path | str) -> Path | str:
    """The folder of a ``<folder>#<SeriesInstanceUID>`` DICOM selection (``path`` itself otherwise)."""
    from wsi_encoder.io.dicom_slides import split_series

    return split_series(path)[0]


def _dicom_folders(urls: list[str]) -> list[str]:
    """Listed objects with every ``.dcm`` replaced by its folder (one DICOM slide), order kept."""
    out: list[str] = []
    for url in urls:
        item = url.rsplit("/", 1)[0] if url.lower().endswith(DICOM_SUFFIX) else url
        if item not in out:
            out.append(item)
    return out


def _walk(root: Path, excluded: set[Path]) -> Iterable[Path]:
    children = [c for c in root.iterdir() if not c.name.startswith(".") and c.resolve() not in excluded]
    if any(c.is_file() and c.name.lower().endswith(DICOM_SUFFIX) for c in children):
        yield root  # a DICOM slide: the folder of its instances
        return
    for child in children:
        if child.is_dir():
            if child.suffix.lower() != ".zarr":
                yield from _walk(child, excluded)
        elif is_slide_file(child):
            yield child


def assign_slide_ids(paths: Sequence[str | Path]) -> list[SlideEntry]:
    """Give every slide its id; refuse clashes, naming both files.

    Raises
    ------
    InvalidParameterError
        Two files would get the same id (compared case-insensitively).
    """
    entries: list[SlideEntry] = []
    owners: dict[str, Path | str] = {}
    for item in paths:
        path = str(item) if is_url(item) else Path(item)
        slide_id = slide_id_from_path(path)
        key = slide_id.lower()
        if key in owners:
            raise InvalidParameterError(
                f"slide id {slide_id!r} would be used by both {owners[key]} and {path}; "
                "slide ids come from file names, so rename one of them (or tile them into different stores)"
            )
        owners[key] = path
        entries.append(SlideEntry(slide_id=slide_id, path=path))
    return entries
