"""Labelled image collections behind every task: lazy, random-access, picklable.

A :class:`TaskData` is what a task loader returns: one entry per image with an integer label (index
into ``classes``), a group (the patient or slide id used for patient-disjoint splits) and the image's
physical resolution in µm/px (``nan`` when unknown). Pixels stay on disk until read; image sources
pickle as paths and re-open their files lazily in each process, so they are safe in DataLoader
workers. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import DatasetError

if TYPE_CHECKING:
    import zarr

    from wsi_encoder.io.patch_store import PatchSlide

_H = TypeVar("_H")

log = logging.getLogger(__name__)

#: How :func:`pixel_digest` fingerprints an image (recorded beside the digests).
PIXEL_DIGEST = "sha256 of the shape and RGB uint8 pixels, first 16 hex digits"

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})


def read_image_file(path: str | Path) -> npt.NDArray[np.uint8]:
    """Read an image file as RGB uint8 ``(h, w, 3)`` (Pillow; tifffile for TIFFs Pillow cannot decode).

    Raises
    ------
    DatasetError
        The file is missing or not a readable RGB/greyscale image.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        raise DatasetError(f"image {str(p)!r} does not exist") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if p.suffix.lower() in {".tif", ".tiff"}:
            try:
                import tifffile

                arr = np.asarray(tifffile.imread(p))
            except Exception as exc2:
                raise DatasetError(f"cannot read image {str(p)!r}: {exc2}") from exc2
            return _to_rgb_uint8(arr, p)
        raise DatasetError(f"cannot read image {str(p)!r}: {exc}") from exc


def _to_rgb_uint8(arr: np.ndarray, where: Path | str) -> npt.NDArray[np.uint8]:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DatasetError(f"image {str(where)!r} has shape {arr.shape}, expected (h, w, 3) RGB")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


class ImageSource:
    """Random access to ``len(self)`` RGB uint8 images; subclasses must pickle cheaply."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, i: int) -> npt.NDArray[np.uint8]:  # pragma: no cover - abstract
        """Image ``i`` as uint8 ``(h, w, 3)``."""
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - abstract
        """Where image ``i`` lives (for messages)."""
        raise NotImplementedError

    def take(self, indices: npt.NDArray[np.int64]) -> ImageSource:  # pragma: no cover - abstract
        """A source holding only ``indices`` (in that order)."""
        raise NotImplementedError


class FileImages(ImageSource):
    """One image file per item (PNG, JPEG, TIFF ...)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> npt.NDArray[np.uint8]:
        return read_image_file(self.paths[i])

    def describe(self, i: int) -> str:
        return self.paths[i]

    def take(self, indices: npt.NDArray[np.int64]) -> FileImages:
        return FileImages([self.paths[int(i)] for i in indices])


class MemoryImages(ImageSource):
    """Decoded images held in memory (see :meth:`TaskData.preload`)."""

    def __init__(self, images: Sequence[npt.NDArray[np.uint8]], names: Sequence[str]) -> None:
        self.images = list(images)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> npt.NDArray[np.uint8]:
        return self.images[i]

    def describe(self, i: int) -> str:
        return self.names[i]

    def take(self, indices: npt.NDArray[np.int64]) -> MemoryImages:
        return MemoryImages([self.images[int(i)] for i in indices], [self.names[int(i)] for i in indices])


class _PerProcessHandles:
    """Opened file handles keyed by path, re-opened after a fork (handles are not fork-safe)."""

    def __init__(self) -> None:
        self.pid = -1
        self.handles: dict[str, Any] = {}

    def get(self, key: str, opener: Callable[[], _H]) -> _H:
        if self.pid != os.getpid():
            self.pid, self.handles = os.getpid(), {}
        if key not in self.handles:
            self.handles[key] = opener()
        return self.handles[key]


_HANDLES = _PerProcessHandles()


class H5Images(ImageSource):
    """Rows of an HDF5 image dataset ``(N, h, w, 3)`` uint8, read lazily with h5py (e.g. PCam)."""

    def __init__(self, path: str | Path, dataset: str, rows: npt.NDArray[np.int64]) -> None:
        self.path = str(path)
        self.dataset = dataset
        self.rows = np.asarray(rows, dtype=np.int64)

    def _array(self) -> Any:
        import h5py

        f = _HANDLES.get(f"h5:{self.path}", lambda: h5py.File(self.path, "r"))
        return f[self.dataset]

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> npt.NDArray[np.uint8]:
        return _to_rgb_uint8(np.asarray(self._array()[int(self.rows[i])]), self.describe(i))

    def describe(self, i: int) -> str:
        return f"{self.path}[{self.dataset}][{int(self.rows[i])}]"

    def take(self, indices: npt.NDArray[np.int64]) -> H5Images:
        return H5Images(self.path, self.dataset, self.rows[np.asarray(indices, dtype=np.int64)])


def _pixels(slide: PatchSlide) -> zarr.Array:
    if slide.tiles is None:
        raise DatasetError(f"slide {slide.slide_id!r} is stored without pixels (--coords-only)")
    return slide.tiles


class PatchStoreTiles(ImageSource):
    """Tiles of a ``wsienc tile`` patch store: ``<store>/<slide_id>/tiles[row]``, read lazily (:func:`~wsi_encoder.io.patch_store.read_tile_rows`)."""

    def __init__(self, store: str | Path, slide_ids: Sequence[str], rows: npt.NDArray[np.int64]) -> None:
        self.store = str(store)
        self.slide_ids = np.asarray(list(slide_ids), dtype=str)
        self.rows = np.asarray(rows, dtype=np.int64)

    def _tiles(self, slide_id: str) -> zarr.Array:
        from wsi_encoder.io.patch_store import open_patch_store

        store = _HANDLES.get(f"zarr:{self.store}", lambda: open_patch_store(self.store))
        return _HANDLES.get(f"zarr:{self.store}:{slide_id}", lambda: _pixels(store[slide_id]))

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> npt.NDArray[np.uint8]:
        from wsi_encoder.io.patch_store import read_tile_rows

        row = int(self.rows[i])
        return _to_rgb_uint8(read_tile_rows(self._tiles(str(self.slide_ids[i])), row, row + 1)[0], self.describe(i))

    def describe(self, i: int) -> str:
        return f"{self.store}/{self.slide_ids[i]}/tiles[{int(self.rows[i])}]"

    def take(self, indices: npt.NDArray[np.int64]) -> PatchStoreTiles:
        idx = np.asarray(indices, dtype=np.int64)
        return PatchStoreTiles(self.store, list(self.slide_ids[idx]), self.rows[idx])


class ConcatImages(ImageSource):
    """Several sources seen as one (items of ``parts[k]`` at rows ``row_of`` where ``part_of == k``)."""

    def __init__(
        self,
        parts: Sequence[ImageSource],
        part_of: npt.NDArray[np.int64] | None = None,
        row_of: npt.NDArray[np.int64] | None = None,
    ) -> None:
        self.parts = list(parts)
        if part_of is None or row_of is None:
            part_of = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(self.parts)])
            row_of = np.concatenate([np.arange(len(p), dtype=np.int64) for p in self.parts])
        self.part_of = np.asarray(part_of, dtype=np.int64)
        self.row_of = np.asarray(row_of, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row_of)

    def read(self, i: int) -> npt.NDArray[np.uint8]:
        return self.parts[int(self.part_of[i])].read(int(self.row_of[i]))

    def describe(self, i: int) -> str:
        return self.parts[int(self.part_of[i])].describe(int(self.row_of[i]))

    def take(self, indices: npt.NDArray[np.int64]) -> ImageSource:
        idx = np.asarray(indices, dtype=np.int64)
        used = np.unique(self.part_of[idx])
        if len(used) == 1:
            return self.parts[int(used[0])].take(self.row_of[idx])
        return ConcatImages(self.parts, self.part_of[idx], self.row_of[idx])


@dataclass
class TaskData:
    """The labelled images of one task instance.

    Attributes
    ----------
    task : str
        Registered task name (``kather-crc`` ...).
    root : Path
        Where the data came from.
    classes : tuple of str
        Class names; ``labels`` index into them.
    source : ImageSource
        The pixels.
    labels : ndarray of int64, shape (n,)
    groups : ndarray of str, shape (n,)
        Patient / slide id of each image; validation splits never cut a group.
    mpp : ndarray of float64, shape (n,)
        µm/px of each image, ``nan`` when unknown (images are then used at their native pixels).
    split : ndarray of str, shape (n,), optional
        A predefined split from the dataset itself (``"train"``, ``"val"``; other values are left out
        of training), used instead of a computed split when it has both parts.
    notes : list of str
        Caveats worth telling the user (e.g. "no patient ids: one group per image").
    """

    task: str
    root: Path
    classes: tuple[str, ...]
    source: ImageSource
    labels: npt.NDArray[np.int64]
    groups: npt.NDArray[np.str_]
    mpp: npt.NDArray[np.float64]
    split: npt.NDArray[np.str_] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.source)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.groups = np.asarray(self.groups, dtype=str).reshape(-1)
        self.mpp = np.broadcast_to(np.asarray(self.mpp, dtype=np.float64), (n,)).copy()
        if self.split is not None:
            self.split = np.asarray(self.split, dtype=str).reshape(-1)
        for name, arr in (("labels", self.labels), ("groups", self.groups), ("split", self.split)):
            if arr is not None and len(arr) != n:
                raise DatasetError(f"task {self.task!r}: {name} has {len(arr)} entries for {n} images")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DatasetError(f"task {self.task!r}: label index out of range for classes {self.classes}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[npt.NDArray[np.uint8], int, str]:
        """``(image uint8 (h, w, 3), label index, group)`` of item ``i``."""
        return self.source.read(i), int(self.labels[i]), str(self.groups[i])

    def __iter__(self) -> Iterator[tuple[npt.NDArray[np.uint8], int, str]]:
        for i in range(len(self)):
            yield self[i]

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name (all classes, zeros included)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts, strict=True)}

    def subset(self, indices: npt.ArrayLike) -> TaskData:
        """The items at ``indices`` (a new TaskData sharing the files)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            source=self.source.take(idx),
            labels=self.labels[idx],
            groups=self.groups[idx],
            mpp=self.mpp[idx],
            split=None if self.split is None else self.split[idx],
            notes=list(self.notes),
        )

    def with_mpp(self, mpp: float) -> TaskData:
        """The same items declared at ``mpp`` µm/px."""
        return replace(self, mpp=np.full(len(self), float(mpp)))

    def preload(self, max_bytes: int, workers: int = 4, on_image: Callable[[int, int], None] | None = None) -> bool:
        """Decode every image into memory when the total fits in ``max_bytes``.

        The estimate uses the first image's size. Returns whether the images were loaded; DataLoader
        workers forked afterwards share the decoded pixels. ``on_image(done, total)`` is called as
        images are decoded (progress).
        """
        if isinstance(self.source, MemoryImages) or len(self) == 0 or max_bytes <= 0:
            return isinstance(self.source, MemoryImages)
        first = self.source.read(0)
        if first.nbytes * len(self) > max_bytes:
            return False
        images = []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for done, image in enumerate(pool.map(self.source.read, range(len(self))), start=1):
                images.append(image)
                if on_image is not None:
                    on_image(done, len(self))
        self.source = MemoryImages(images, [self.source.describe(i) for i in range(len(self))])
        return True


#: Labels that name the negative class; with two classes read from the data, it comes first so that
#: binary metrics (AUC, F1) score the other class as positive.
NEGATIVE_LABELS = frozenset({"0", "normal", "benign", "negative", "neg", "healthy", "no", "false", "background"})


def labels_to_indices(
    labels: Sequence[str], classes: Sequence[str] | None, *, task: str, root: Path
) -> tuple[tuple[str, ...], npt.NDArray[np.int64]]:
    """Map label strings to indices of ``classes``.

    When ``classes`` is None they are the sorted unique labels, except that with exactly two labels
    one of :data:`NEGATIVE_LABELS` (``normal``, ``benign``, ``0`` ...) is put first, making the other
    the positive class of binary metrics.

    Raises
    ------
    DatasetError
        A label is not one of the task's classes.
    """
    if classes is None:
        classes = sorted(set(labels))
        if len(classes) == 2 and classes[1].lower() in NEGATIVE_LABELS and classes[0].lower() not in NEGATIVE_LABELS:
            classes = classes[::-1]
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(lookup))
    if unknown:
        raise DatasetError(
            f"{str(root)!r}: labels {unknown[:5]!r} are not classes of task {task!r} (known: {list(classes)})"
        )
    return tuple(classes), np.fromiter((lookup[s] for s in labels), dtype=np.int64, count=len(labels))


def list_image_files(folder: Path) -> list[Path]:
    """Image files (by suffix) directly inside ``folder``, sorted by name; hidden files skipped."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def concat_task_data(parts: Sequence[TaskData]) -> TaskData:
    """Pool several datasets of the same task into one (classes: the union, in first-seen order).

    Predefined splits are kept when every part has one; otherwise dropped.
    """
    if len(parts) == 1:
        return parts[0]
    classes: list[str] = []
    for d in parts:
        classes += [c for c in d.classes if c not in classes]
    labels = [np.asarray([classes.index(d.classes[k]) for k in d.labels], dtype=np.int64) for d in parts]
    keep_split = all(d.split is not None for d in parts)
    notes: list[str] = []
    for d in parts:
        notes += [n for n in d.notes if n not in notes]
    return TaskData(
        parts[0].task,
        parts[0].root,
        tuple(classes),
        ConcatImages([d.source for d in parts]),
        np.concatenate(labels),
        np.concatenate([d.groups for d in parts]),
        np.concatenate([d.mpp for d in parts]),
        split=np.concatenate([d.split for d in parts if d.split is not None]) if keep_split else None,
        notes=notes,
    )


def pixel_digest(pixels: npt.NDArray[np.uint8]) -> str:
    """A fingerprint of an image's content (:data:`PIXEL_DIGEST`): the same for a copy under any name or
    path, or re-saved losslessly (PNG/TIFF), different for other pixels."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    h = hashlib.sha256(repr(tuple(a.shape)).encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def content_digests(
    source: ImageSource, *, workers: int = 1, on_image: Callable[[int, int], None] | None = None
) -> list[str]:
    """The sorted distinct :func:`pixel_digest` of every image of ``source`` (read ``workers`` at a time).

    ``on_image(done, total)`` reports progress.
    """
    n = len(source)
    found: set[str] = set()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, digest in enumerate(pool.map(lambda i: pixel_digest(source.read(i)), range(n)), start=1):
            found.add(digest)
            if on_image is not None:
                on_image(done, n)
    return sorted(found)
