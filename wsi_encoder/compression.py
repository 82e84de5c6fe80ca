"""Neural image compression: run a patch encoder over a slide's tiles and lay the embeddings out as a grid.

A slide cut into a grid of tiles (stride S, ``R × Q`` grid cells) becomes, after every tile goes
through an encoder E with C outputs, a ``(C, R, Q)`` array: the embedding of the tile at grid cell
``(row, col)`` sits at ``grid[:, row, col]`` and cells without tissue stay zero (Tellez et al.,
"Neural Image Compression for Gigapixel Histopathology Image Analysis", TPAMI 2019). Slide-level
models then train on these small grids instead of gigapixels.

This module is the science part: encoder loading (cached once per process, so a dask worker loads
its model once), the resampling of tiles to the encoder's µm/px, batched inference with the next
batch decoded while the current one runs, and grid assembly. Reading and writing stores is left to
:mod:`wsi_encoder.io.embedding_store` and :mod:`wsi_encoder.pipelines.encode_store`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from wsi_encoder.devices import resolve_device
from wsi_encoder.errors import InvalidParameterError, StoreError

if TYPE_CHECKING:
    from wsi_encoder.models.encoders.registry import Encoder

logger = logging.getLogger(__name__)

T = TypeVar("T")
TileBatch = npt.NDArray[np.uint8]
#: Relative difference of µm/px below which tiles are used at their resolution as they are.
MPP_TOLERANCE = 0.05


# ---- devices and encoders ---------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderIdentity:
    """What identifies an encoder in an embedding store (``attrs["encoder"]``).

    Attributes
    ----------
    name
        Registered architecture name (``nic``, ``resnet18`` ...).
    spec
        What the user passed: a checkpoint directory or a registered name.
    config
        The encoder's config as a JSON-serialisable dict (input size, input µm/px, normalisation ...).
    weights_sha256
        SHA-256 of the weights file, or of the seeded initial state for an untrained encoder.
    embedding_dim
        Embedding size C.
    input_size
        Tile side in px the encoder was built for.
    input_mpp
        µm/px the encoder expects its tiles at.
    """

    name: str
    spec: str
    config: dict[str, Any]
    weights_sha256: str | None
    embedding_dim: int
    input_size: int
    input_mpp: float

    def to_attrs(self) -> dict[str, Any]:
        """The ``encoder`` attribute of an embedding store slide group."""
        return {"name": self.name, "spec": self.spec, "config": self.config, "weights_sha256": self.weights_sha256}


_MODELS: dict[tuple[str, str | None, str], tuple[Encoder, EncoderIdentity]] = {}
_RUNNERS: dict[tuple[str, str | None, str, str, bool], Any] = {}
_MODELS_LOCK = threading.Lock()
_LOADS: list[tuple[str, str | None, str]] = []


def load_encoder_cached(
    spec: str, weights: str | None = None, device: str = "auto", *, precision: str = "fp32", compile: bool = False
) -> tuple[Any, EncoderIdentity]:
    """Load an encoder once per process and return it ready for inference, with its identity.

    Parameters
    ----------
    spec
        A ``wsienc train-encoder`` checkpoint directory or a registered encoder name.
    weights
        Local weights file for a registered name (default: ``$WSIENC_WEIGHTS_DIR``; an untrained
        built-in gets a fixed-seed initialisation, with a warning; a pretrained one is refused).
    device
        ``auto``, ``cpu`` or ``cuda[:i]``.
    precision, compile
        See :class:`wsi_encoder.models.inference.InferenceModel`.

    Returns
    -------
    model, identity
        ``model(x)`` (an :class:`~wsi_encoder.models.inference.InferenceModel`) maps float
        ``(B, 3, S, S)`` in [0, 1] on ``device`` to float32 ``(B, C)``.

    Notes
    -----
    The module is cached by ``(spec, weights, device)`` and shared by the threads of a process, so
    every dask worker process loads each encoder once, however many tasks it runs.
    """
    from wsi_encoder.models.checkpoint import resolve_encoder
    from wsi_encoder.models.inference import InferenceModel

    dev = resolve_device(device)
    key = (str(spec), None if weights is None else str(weights), str(dev))
    with _MODELS_LOCK:
        cached = _MODELS.get(key)
        if cached is None:
            module = resolve_encoder(spec, weights)
            module.eval().to(dev)
            config = module.config
            identity = EncoderIdentity(
                name=str(config.name),
                spec=str(spec),
                config=config.to_dict(),
                weights_sha256=module.weights_sha256,
                embedding_dim=int(module.embedding_dim),
                input_size=int(config.input_size),
                input_mpp=float(config.input_mpp),
            )
            cached = _MODELS[key] = (module, identity)
            _LOADS.append(key)
            logger.info("loaded encoder %s (%s) on %s", identity.name, spec, dev)
        module, identity = cached
        rkey = (*key, precision, bool(compile))
        runner = _RUNNERS.get(rkey)
        if runner is None:
            runner = _RUNNERS[rkey] = InferenceModel(module, dev, precision=precision, compile=compile)
        return runner, identity


def encoder_loads() -> int:
    """How many times this process has built an encoder (the cache's misses)."""
    return len(_LOADS)


# ---- resampling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResamplePlan:
    """How stored tiles are brought to the encoder's input.

    Every tile is resized to the encoder's ``input_size`` (as CLAM and TRIDENT do): the tile keeps its
    field of view, so the encoder sees ``out_mpp = tile_size * tile_mpp / input_size`` µm/px, which is
    compared with the encoder's ``input_mpp``. An entry whose card centre-crops (``crop_fraction < 1``,
    Prov-GigaPath's ``Resize(256)`` + ``CenterCrop(224)``) resizes the tile to ``input_size / crop_fraction``
    and keeps its centre: the encoder then sees ``tile_size * tile_mpp / (input_size / crop_fraction)`` µm/px
    and the central ``crop_fraction`` of the tile's field of view.

    Attributes
    ----------
    tile_size, tile_mpp
        Stored tiles: side in px and µm/px.
    out_size, out_mpp
        What the encoder receives: side in px (= ``input_size``) and µm/px.
    input_size, input_mpp
        What the encoder was built for.
    tolerance
        Relative µm/px difference accepted without a warning (the tile spec's ``mpp_tolerance``).
    crop_fraction
        The side the card's centre crop keeps over the side it resizes to (1: no crop, the whole tile).
    """

    tile_size: int
    tile_mpp: float
    out_size: int
    out_mpp: float
    input_size: int
    input_mpp: float
    tolerance: float = MPP_TOLERANCE
    crop_fraction: float = 1.0

    @property
    def resize_size(self) -> int:
        """Side in px the tile is resized to before the centre crop (``out_size`` without a crop)."""
        return round(self.out_size / self.crop_fraction)

    @property
    def resample(self) -> bool:
        """Whether tiles are resized or cropped before the encoder."""
        return self.out_size != self.tile_size

    @property
    def mpp_mismatch(self) -> bool:
        """The encoder sees tiles at a µm/px further than ``tolerance`` from the one it was trained at."""
        return abs(self.out_mpp / self.input_mpp - 1.0) > self.tolerance

    def describe(self) -> str | None:
        """A warning stating the stored and expected size/µm/px, or None when the resolutions agree."""
        if not self.mpp_mismatch:
            return None
        stored = f"{self.tile_size} px at {self.tile_mpp:.4g} µm/px ({self.tile_size * self.tile_mpp:.4g} µm)"
        expected = f"{self.input_size} px at {self.input_mpp:.4g} µm/px ({self.input_size * self.input_mpp:.4g} µm)"
        side = self.resize_size
        resize = f"resized to {side} px" + (f" and centre-cropped to {self.out_size} px" if side != self.out_size else "")
        return (
            f"tiles are {stored} but the encoder expects {expected}; every tile is {resize}, "
            f"so the encoder sees {self.out_mpp:.4g} µm/px instead of {self.input_mpp:.4g} (more than "
            f"{self.tolerance:.0%} off): re-tile with --mpp {self.input_mpp:g} --tile-size {side} to match"
        )


def plan_resample(
    tile_size: int,
    tile_mpp: float | None,
    input_size: int,
    input_mpp: float,
    tolerance: float = MPP_TOLERANCE,
    *,
    crop_fraction: float = 1.0,
) -> ResamplePlan:
    """Decide how ``tile_size`` px tiles at ``tile_mpp`` µm/px are fed to an encoder.

    Parameters
    ----------
    tile_size
        Stored tile side (px).
    tile_mpp
        µm/px of the stored pixels (None: unknown, the tiles are taken to be at ``input_mpp``).
    input_size, input_mpp
        The encoder's expected tile side (px) and µm/px.
    tolerance
        Relative µm/px difference accepted without a warning.
    crop_fraction
        The entry's centre crop (``resize_options(name)["crop_fraction"]``; 1: none): the tile is resized to
        ``round(input_size / crop_fraction)`` px, as :func:`tiles_to_tensor` does, and the µm/px the encoder
        sees is computed from that side.
    """
    if tile_size < 1:
        raise InvalidParameterError(f"tile size {tile_size!r} must be positive")
    if not 0 < crop_fraction <= 1:
        raise InvalidParameterError(f"crop_fraction {crop_fraction!r} must be in (0, 1]")
    mpp = input_mpp if tile_mpp is None else float(tile_mpp)
    out_mpp = tile_size * mpp / round(input_size / crop_fraction)
    return ResamplePlan(
        tile_size, mpp, int(input_size), out_mpp, int(input_size), float(input_mpp), float(tolerance),
        float(crop_fraction),
    )  # fmt: skip


def tiles_to_tensor(
    tiles: TileBatch,
    device: torch.device,
    out_size: int,
    *,
    interpolation: str = "bilinear",
    crop: str | None = None,
    crop_fraction: float = 1.0,
    host_buffer: npt.NDArray[np.float32] | None = None,
) -> torch.Tensor:
    """uint8 ``(B, T, T, 3)`` tiles → float ``(B, 3, S, S)`` in [0, 1] on ``device``, S = ``out_size``.

    The one resize of the toolkit, done on ``device`` after the (4× smaller) uint8 transfer, as the
    encoder's card prescribes (:func:`wsi_encoder.models.encoders.registry.resize_options`):

    - ``crop=None``: the tile is resized to ``S × S`` (when it is not that size already);
    - ``crop="center"``: torchvision's ``Resize(round(S / crop_fraction))`` (short side) then
      ``CenterCrop(S)`` — Prov-GigaPath's ``Resize(256)`` + ``CenterCrop(224)`` is ``crop_fraction = 224/256``.

    Resizing is ``torch.nn.functional.interpolate`` with ``interpolation`` (``bilinear`` or ``bicubic``)
    and antialiasing, which is what torchvision's ``Resize`` does on float tensors; the result is
    clamped to [0, 1], as a resize of 8-bit images (PIL, which the cards' transforms use) is.

    ``host_buffer`` (CPU only): a float32 array of the tiles' shape that receives the converted pixels
    (the result may be a view of it). A batch of 64 tiles of 224 px is 38 MB of float32: above glibc's
    largest mmap threshold, so a fresh array is mapped and zero-filled by the kernel every batch, which
    costs as much as the conversion itself.
    """
    if interpolation not in ("bilinear", "bicubic"):
        raise InvalidParameterError(f"interpolation {interpolation!r} must be 'bilinear' or 'bicubic'")
    if crop not in (None, "center") or not 0 < crop_fraction <= 1:
        raise InvalidParameterError(f"crop {crop!r} (None or 'center') or crop_fraction {crop_fraction!r} is not supported")
    if device.type == "cuda":  # the uint8 tiles cross (4x fewer bytes), pinned; the GPU converts them
        x = torch.from_numpy(np.ascontiguousarray(tiles)).pin_memory().to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
    else:  # numpy's one-pass uint8 -> float32 division: the same values as torch's, 3x cheaper on the CPU
        scaled = np.divide(tiles, np.float32(255.0), dtype=np.float32, out=host_buffer)
        x = torch.from_numpy(scaled).permute(0, 3, 1, 2).to(device)
    h, w = x.shape[-2:]
    if crop is None:
        size = (out_size, out_size)
    else:  # torchvision Resize(int): the short side to `side`, the long one int(side * long / short)
        side = round(out_size / crop_fraction)
        size = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode=interpolation, antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    if crop is not None and tuple(x.shape[-2:]) != (out_size, out_size):  # torchvision CenterCrop offsets
        top = round((x.shape[-2] - out_size) / 2.0)
        left = round((x.shape[-1] - out_size) / 2.0)
        x = x[..., top : top + out_size, left : left + out_size]
    return x


# ---- batched inference --------------------------------------------------------------------------

_END = object()


def prefetch(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``iterable`` with up to ``depth`` items produced ahead in a background thread.

    Used to decode the next tiles (zarr/JPEG decoding and slide reads release the GIL) while the
    encoder runs on the current ones. Exceptions of the producer are raised at the item's turn.
    """
    it = iter(iterable)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsienc-prefetch") as pool:
        pending = deque(pool.submit(next, it, _END) for _ in range(max(1, depth)))
        while pending:
            item = pending.popleft().result()
            if item is _END:
                break
            pending.append(pool.submit(next, it, _END))
            yield item  # type: ignore[misc]


def iter_blocks(read: Callable[[int, int], TileBatch], start: int, stop: int, block: int) -> Iterator[TileBatch]:
    """Read ``[start, stop)`` through ``read(a, b)`` in blocks of ``block`` tiles aligned to multiples of ``block``."""
    a = start
    while a < stop:
        b = min(stop, (a // block + 1) * block)
        tiles = read(a, b)
        if tiles.shape[0] != b - a:
            raise StoreError(f"tile reader returned {tiles.shape[0]} tiles for range [{a}, {b})")
        yield tiles
        a = b


def encode_tiles(
    model: Callable[[torch.Tensor], torch.Tensor],
    blocks: Iterable[TileBatch],
    *,
    n_tiles: int,
    embedding_dim: int,
    batch_size: int,
    out_size: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    interpolation: str = "bilinear",
    crop: str | None = None,
    crop_fraction: float = 1.0,
) -> npt.NDArray[np.float32]:
    """Embed tiles with ``model``; the next tiles are decoded, and converted, in two background threads.

    Parameters
    ----------
    model
        Maps float ``(B, 3, S, S)`` in [0, 1] to ``(B, C)`` (the encoder normalises itself).
    blocks
        uint8 ``(b, T, T, 3)`` tile blocks, in order, ``n_tiles`` tiles in all (read lazily).
    n_tiles, embedding_dim
        Expected total tiles N and embedding size C.
    batch_size
        Tiles per forward pass.
    out_size
        Side in px the tiles are resized to (see :func:`plan_resample`).
    device
        Where the model lives.
    progress
        Called with the number of tiles of each finished batch.
    interpolation, crop, crop_fraction
        The encoder's resize (:func:`tiles_to_tensor`; ``**resize_options(name)`` gives the card's).

    Returns
    -------
    numpy.ndarray
        ``(N, C)`` float32 features in the order of the tiles.
    """
    if batch_size < 1:
        raise InvalidParameterError(f"batch size {batch_size!r} must be at least 1")
    out = np.empty((n_tiles, embedding_dim), dtype=np.float32)
    # On the CPU, converted batches go into reused float32 buffers (see tiles_to_tensor's host_buffer):
    # the caller hands each back once the model's output is copied out; one is made whenever none is free.
    free: queue.SimpleQueue[npt.NDArray[np.float32]] = queue.SimpleQueue()

    def host_buffer(tiles: TileBatch) -> npt.NDArray[np.float32] | None:
        if device.type != "cpu":
            return None
        shape = (batch_size, *tiles.shape[1:])
        try:
            buffer = free.get_nowait()
        except queue.Empty:
            buffer = np.empty(shape, dtype=np.float32)
        if buffer.shape != shape:  # another tile size: a buffer of its own
            buffer = np.empty(shape, dtype=np.float32)
        return buffer

    def batches() -> Iterator[tuple[torch.Tensor, npt.NDArray[np.float32] | None]]:
        # A three-stage pipeline: one thread decodes the next blocks, a second turns them into model
        # input (on CUDA: pinned, copied non_blocking, converted on the device), the caller runs the model.
        for block in prefetch(blocks):
            for a in range(0, block.shape[0], batch_size):
                tiles = block[a : a + batch_size]
                buffer = host_buffer(tiles)
                x = tiles_to_tensor(
                    tiles, device, out_size, interpolation=interpolation, crop=crop, crop_fraction=crop_fraction,
                    host_buffer=None if buffer is None else buffer[: tiles.shape[0]],
                )  # fmt: skip
                yield x, buffer

    pos = 0
    with torch.inference_mode():
        for x, buffer in prefetch(batches()):
            feats = model(x)
            if feats.ndim != 2 or feats.shape[1] != embedding_dim:
                raise StoreError(f"encoder returned shape {tuple(feats.shape)}, expected (batch, {embedding_dim})")
            b = pos + x.shape[0]
            if b > n_tiles:
                raise StoreError(f"more tiles than the {n_tiles} expected")
            out[pos:b] = feats.float().cpu().numpy()
            del x, feats  # nothing of this batch is referenced now: its buffer may take the next one
            if buffer is not None:
                free.put(buffer)
            if progress is not None:
                progress(b - pos)
            pos = b
    if pos != n_tiles:
        raise StoreError(f"read {pos} tiles, expected {n_tiles}")
    return out


# ---- the NIC grid ---------------------------------------------------------------------------------


def check_rowcol(rowcol: npt.NDArray[np.integer[Any]], grid_shape: tuple[int, int]) -> None:
    """Check that grid positions are inside ``grid_shape`` and unique.

    Raises
    ------
    StoreError
        A position is outside the grid or two tiles share a cell.
    """
    rowcol = np.asarray(rowcol).reshape(-1, 2)
    rows, cols = grid_shape
    if rowcol.size and (rowcol.min() < 0 or rowcol[:, 0].max() >= rows or rowcol[:, 1].max() >= cols):
        raise StoreError(f"tile grid positions fall outside the grid shape {list(grid_shape)}")
    flat = rowcol[:, 0].astype(np.int64) * cols + rowcol[:, 1]
    if np.unique(flat).size != flat.size:
        raise StoreError("two tiles share one grid cell; the patch store's grid positions are not unique")


def assemble_grid(
    features: npt.NDArray[np.floating[Any]],
    rowcol: npt.NDArray[np.integer[Any]],
    grid_shape: tuple[int, int],
    *,
    row_offset: int = 0,
    dtype: npt.DTypeLike = np.float32,
) -> tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.bool_]]:
    """Place tile embeddings at their grid cells: the NIC grid.

    Parameters
    ----------
    features
        ``(N, C)`` embeddings.
    rowcol
        ``(N, 2)`` ``(row, col)`` of each tile; rows are relative to ``row_offset``.
    grid_shape
        ``(R, Q)`` of the (partial) grid to build.
    row_offset
        Grid row of the first row of the output (to build a grid band by band).
    dtype
        dtype of the grid.

    Returns
    -------
    grid, mask
        ``(C, R, Q)`` with ``grid[:, row_i, col_i] == features[i]`` and zeros elsewhere, and the
        ``(R, Q)`` boolean mask of cells holding a tile.
    """
    features = np.asarray(features)
    rowcol = np.asarray(rowcol).reshape(-1, 2)
    if features.ndim != 2 or features.shape[0] != rowcol.shape[0]:
        raise StoreError(f"features {features.shape} and grid positions {rowcol.shape} do not align")
    rows, cols = grid_shape
    local = rowcol.astype(np.int64) - np.array([row_offset, 0])
    check_rowcol(local, grid_shape)
    grid = np.zeros((features.shape[1], rows, cols), dtype=dtype)
    mask = np.zeros((rows, cols), dtype=bool)
    grid[:, local[:, 0], local[:, 1]] = features.T
    mask[local[:, 0], local[:, 1]] = True
    return grid, mask


def grid_bands(
    rowcol: npt.NDArray[np.integer[Any]],
    grid_shape: tuple[int, int],
    read_features: Callable[[npt.NDArray[np.intp]], npt.NDArray[np.floating[Any]]],
    *,
    band_rows: int,
    dtype: npt.DTypeLike = np.float32,
) -> Iterator[tuple[int, npt.NDArray[np.floating[Any]], npt.NDArray[np.bool_]]]:
    """Build the grid band by band (``band_rows`` grid rows at a time), so memory stays bounded.

    ``read_features(index)`` returns the ``(len(index), C)`` features of the given tile indices
    (sorted ascending). Yields ``(row0, grid_band (C, h, Q), mask_band (h, Q))``.
    """
    rowcol = np.asarray(rowcol).reshape(-1, 2)
    rows, cols = grid_shape
    check_rowcol(rowcol, grid_shape)
    order = np.argsort(rowcol[:, 0], kind="stable")
    sorted_rows = rowcol[order, 0]
    for row0 in range(0, rows, max(1, band_rows)):
        row1 = min(rows, row0 + band_rows)
        lo, hi = np.searchsorted(sorted_rows, [row0, row1])
        index = np.sort(order[lo:hi])
        feats = read_features(index)
        band, band_mask = assemble_grid(feats, rowcol[index], (row1 - row0, cols), row_offset=row0, dtype=dtype)
        yield row0, band, band_mask
