"""Images for the LOMO protocol: a decoded, resized on-disk cache and augmented torch batches.

BreaKHis images are 700×460 PNGs. Decoding a PNG costs far more than a training step on a small
batch, and every image is used by 3 arms × 3 folds × many epochs, so each image is decoded once and
resized (whole image, Lanczos, aspect ratio not kept: every image is squeezed the same way) to
``size × size`` into a memory-mapped ``.npy`` of shape ``(N, size, size, 3)`` uint8. The cache is
keyed by the file list and size and is rebuilt when either changes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_encoder.io.files import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

CACHE_FORMAT = "wsi_encoder.lomo_image_cache"


def _load_rgb(path: Path, size: int) -> npt.NDArray[np.uint8]:
    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def build_image_cache(
    paths: Sequence[Path],
    size: int,
    cache_dir: str | Path,
    *,
    on_image: Callable[[int, int], None] | None = None,
) -> tuple[np.memmap, dict[str, str]]:
    """Decode and resize every image once into ``cache_dir/images_<size>.npy`` (reused when current).

    Parameters
    ----------
    paths
        Image files, in the order of the returned rows.
    size
        Side of the cached square images in pixels.
    cache_dir
        Folder of the cache (created).
    on_image
        Called as ``on_image(done, total)`` after each decoded image (progress).

    Returns
    -------
    images, failed
        A read-only memmap ``(N, size, size, 3)`` uint8 (rows of unreadable files are black) and
        ``{filename: reason}`` of the files that could not be read.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    npy = cache_dir / f"images_{size}.npy"
    meta_path = cache_dir / f"images_{size}.json"
    names = [str(Path(p).resolve()) for p in paths]
    if npy.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("format") == CACHE_FORMAT and meta.get("files") == names and meta.get("size") == size:
            arr = np.load(npy, mmap_mode="r")
            if arr.shape == (len(names), size, size, 3):
                logger.info("image cache %s is current (%d images)", npy, len(names))
                return arr, dict(meta.get("failed", {}))
    logger.info("decoding %d images to %d px into %s", len(names), size, npy)
    failed: dict[str, str] = {}
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(names), size, size, 3))
        for i, path in enumerate(paths):
            try:
                out[i] = _load_rgb(Path(path), size)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                logger.warning("%s: cannot read the image (%s); it is skipped", path, exc)
                failed[Path(path).name] = str(exc)
                out[i] = 0
            if on_image is not None:
                on_image(i + 1, len(names))
        out.flush()
        del out
    atomic_write_json(meta_path, {"format": CACHE_FORMAT, "size": size, "files": names, "failed": failed}, indent=None)
    return np.load(npy, mmap_mode="r"), failed


def to_tensor(images: npt.NDArray[np.uint8], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 → float ``(B, 3, H, W)`` in [0, 1] on ``device``."""
    arr = np.ascontiguousarray(images)
    if not arr.flags.writeable:  # a read-only memmap view: torch wants writable memory
        arr = arr.copy()
    t = torch.from_numpy(arr).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a float ``(B, C, H, W)`` batch to ``size × size`` (bilinear, antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and 90° rotations per image of a square ``(B, C, S, S)`` batch.

    These keep the pixel statistics and the scale of the image (no magnification cue is added).
    """
    draws = torch.randint(0, 8, (x.shape[0],), generator=generator).to(x.device)
    out = x.clone()
    for bit, op in ((1, lambda t: t.flip(-1)), (2, lambda t: t.flip(-2)), (4, lambda t: t.transpose(-1, -2))):
        sel = (draws & bit).bool()
        if bool(sel.any()):
            out[sel] = op(out[sel])
    return out
