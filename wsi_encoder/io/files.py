"""The one way to write a file: atomically, beside the target, with normal permissions.

Every file ``wsienc`` writes outside a zarr store goes through this module. A write first goes to a
uniquely named temporary file (or folder) in the target's own folder, then ``os.replace`` puts it in place,
so a reader sees the old file or the new one, never half of one, and two runs writing the same target at
once never share a temporary name. The temporary is created with mode ``0o666`` (``0o777`` for folders)
minus the process umask — ``0644``/``0755`` under the usual umask, as ``open()`` would make them, not the
owner-only ``0600`` of :func:`tempfile.mkstemp` — so results are readable by the rest of a lab on a
shared cluster. On any error the temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_figure",
    "atomic_write_image",
    "atomic_write_json",
    "atomic_write_text",
]


def _temp_name(path: Path) -> Path:
    """A name beside ``path`` that no other writer uses; keeps the suffix so libraries infer the format."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary file path beside ``path``; on success it replaces ``path``.

    For writers that take a file name (``np.save``, ``h5py.File``, ``safetensors.torch.save_file``,
    ``torch.save``): the temporary already exists, empty, with normal permissions, and has the target's
    suffix. On an exception the temporary is removed and ``path`` is untouched.
    """
    target = Path(path)
    tmp = _temp_name(target)
    os.close(_create(tmp))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _create(tmp: Path) -> int:
    """Create the new temporary ``tmp`` for writing (its folders too, when missing) and return its descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        return os.open(tmp, flags, 0o666)
    except FileNotFoundError:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return os.open(tmp, flags, 0o666)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring).

    ``fsync=False`` skips flushing the file to the disk before it is put in place (zarr's own chunk
    writes do not either): for the many chunks of a patch store, whose run records which are done.
    """
    target = Path(path)
    tmp = _temp_name(target)
    fd = _create(tmp)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (sorted keys are not imposed; a trailing newline is added) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_csv(
    path: str | os.PathLike[str], rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None
) -> None:
    """Write ``rows`` (after ``header`` when given) as CSV atomically; values go through ``str``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write_figure(path: str | os.PathLike[str], fig: Figure, **savefig: Any) -> None:
    """Save a matplotlib figure atomically; the format follows the suffix of ``path`` (``.png``, ``.pdf``, ...)."""
    target = Path(path)
    savefig.setdefault("format", target.suffix.lstrip(".") or "png")
    with atomic_path(target) as tmp:
        fig.savefig(tmp, **savefig)


def atomic_write_image(path: str | os.PathLike[str], image: Image.Image) -> None:
    """Save a Pillow image atomically as PNG.

    Encoded by imagecodecs (libpng) at zlib level 1 with no row filter: on a QC picture, a third of the time
    Pillow takes at its fastest level (Pillow tries every row filter) and a smaller file, as the pictures
    are mostly flat colour. Modes other than L, RGB and RGBA are converted to RGB(A) first.
    """
    import imagecodecs
    import numpy as np

    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    data = imagecodecs.png_encode(np.asarray(image), level=1, filter=imagecodecs.PNG.FILTER.NONE)
    atomic_write_bytes(path, data, fsync=False)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it becomes ``path``.

    An existing ``path`` is replaced: it is renamed aside first and removed once the new folder is in
    place, so the target never holds a mix of old and new files. Files in the folder should be written
    with the plain writers of the library that makes them (they are not visible until the folder is).
    On an exception the temporary folder is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        if target.exists():
            old = _temp_name(target)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
