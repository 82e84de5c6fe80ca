"""Generated pyramidal whole-slide images for the demo cohort, tests and benchmarks.

A slide is a tiled, JPEG-compressed, pyramidal TIFF (levels as successive main-chain pages, the
layout both OpenSlide's generic-TIFF driver and tiffslide read). Its content comes from a
:class:`SlideLayout`: low-resolution fields for tissue, an optional 'lesion' region (the slide-level
label in the demo) and pen marks, which are upsampled and filled with periodic H&E-like textures tile
by tile, so slides of any size (60k x 60k and more) are written in bounded memory. Everything is
deterministic from the spec's seed, and the spec is stored as JSON in the TIFF's ImageDescription so
the ground truth (where tissue and lesion are) can be recomputed from the file alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.files import atomic_path
from wsi_encoder.synthetic.textures import background_texture, downsample_texture, tissue_texture

logger = logging.getLogger(__name__)

SPEC_TAG = "wsi_encoder-synthetic-slide"
_LAYOUT_MAX_PX = 512
_PEN_COLOURS = np.array([[35, 70, 170], [30, 130, 60], [30, 30, 35]], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """What to generate.

    Parameters
    ----------
    width, height
        Level-0 size in pixels.
    mpp
        Level-0 µm/px written to the TIFF resolution tags; ``None`` writes a slide without a
        physical resolution (resolution unit NONE).
    seed
        Everything random derives from it.
    pieces
        Number of tissue fragments on the glass.
    lesion
        Whether a region of the tissue carries the dense 'lesion' texture (the demo's label).
    pen_marks
        Whether to draw marker strokes beside the tissue.
    tile_size
        TIFF tile edge in pixels.
    jpeg_quality
        JPEG quality of the tiles (1-100).
    texture_mpp
        The µm/px the textures are drawn for; defaults to ``mpp`` (0.5 when ``mpp`` is None).
    """

    width: int = 8192
    height: int = 6144
    mpp: float | None = 0.5
    seed: int = 0
    pieces: int = 3
    lesion: bool = False
    pen_marks: bool = False
    tile_size: int = 256
    jpeg_quality: int = 85
    texture_mpp: float | None = None
    level_downsamples: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 64:
            raise InvalidParameterError(f"slide size {self.width}x{self.height} is too small (at least 64x64)")
        if self.mpp is not None and not self.mpp > 0:
            raise InvalidParameterError(f"mpp {self.mpp!r} must be positive")
        if self.tile_size % 16:
            raise InvalidParameterError(f"tile size {self.tile_size!r} must be a multiple of 16")
        if not self.level_downsamples:
            downsamples = [1]
            while max(self.width, self.height) / downsamples[-1] > 2048:
                downsamples.append(downsamples[-1] * 4)
            object.__setattr__(self, "level_downsamples", tuple(downsamples))

    @property
    def render_mpp(self) -> float:
        """µm/px that textures are drawn at."""
        return self.texture_mpp or self.mpp or 0.5

    def to_json(self) -> str:
        """The spec as the JSON stored in the slide's ImageDescription."""
        return json.dumps({SPEC_TAG: asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> SyntheticSlideSpec:
        """Parse :meth:`to_json` output."""
        data = json.loads(text)[SPEC_TAG]
        data["level_downsamples"] = tuple(data["level_downsamples"])
        return cls(**data)


class SlideLayout:
    """Low-resolution fields of a synthetic slide: tissue, lesion and pen coverage in [0, 1].

    ``step`` level-0 pixels make one layout pixel; :meth:`sample` upsamples any field to any region.
    """

    def __init__(self, spec: SyntheticSlideSpec) -> None:
        self.spec = spec
        self.step = max(spec.width, spec.height) / _LAYOUT_MAX_PX
        self.shape = (max(2, int(np.ceil(spec.height / self.step))), max(2, int(np.ceil(spec.width / self.step))))
        rng = np.random.default_rng([spec.seed, 1])
        self.tissue, centres = self._tissue(rng)
        self.lesion = self._lesion(rng, centres) if spec.lesion else np.zeros(self.shape, np.float32)
        self.pen, self.pen_colour = self._pen(rng) if spec.pen_marks else (np.zeros(self.shape, np.float32), 0)

    def _tissue(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.float32], list[tuple[float, float, float]]]:
        rows, cols = self.shape
        yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
        field_ = np.full(self.shape, -10.0, np.float32)
        centres: list[tuple[float, float, float]] = []
        n = max(1, self.spec.pieces)
        for i in range(n):
            # Pieces sit side by side along the longer axis, as sections on a glass slide.
            along = (i + 0.5) / n
            if cols >= rows:
                cx, cy = along * cols, rows * rng.uniform(0.4, 0.6)
                radius = min(rows * 0.32, cols / n * 0.38)
            else:
                cx, cy = cols * rng.uniform(0.4, 0.6), along * rows
                radius = min(cols * 0.32, rows / n * 0.38)
            ry, rx = radius * rng.uniform(0.7, 1.0), radius * rng.uniform(0.7, 1.0)
            theta = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
            v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
            field_ = np.maximum(field_, 1.0 - np.sqrt((u / rx) ** 2 + (v / ry) ** 2))
            centres.append((cy, cx, min(rx, ry)))
        wobble = ndimage.gaussian_filter(rng.standard_normal(self.shape), sigma=max(rows, cols) / 40)
        wobble /= np.abs(wobble).max() + 1e-8
        tissue = (field_ + 0.18 * wobble > 0.0).astype(np.float32)
        tissue = ndimage.binary_opening(tissue > 0, iterations=2).astype(np.float32)
        return ndimage.gaussian_filter(tissue, sigma=0.8).astype(np.float32), centres

    def _lesion(self, rng: np.random.Generator, centres: list[tuple[float, float, float]]) -> npt.NDArray[np.float32]:
        rows, cols = self.shape
        yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
        cy, cx, radius = centres[int(rng.integers(len(centres)))]
        offset = rng.uniform(-0.3, 0.3, size=2) * radius
        r = radius * rng.uniform(0.35, 0.5)
        blob = 1.0 - np.hypot(yy - cy - offset[0], xx - cx - offset[1]) / r
        wobble = ndimage.gaussian_filter(rng.standard_normal(self.shape), sigma=max(2.0, r / 3))
        wobble /= np.abs(wobble).max() + 1e-8
        lesion = ((blob + 0.25 * wobble) > 0).astype(np.float32) * (self.tissue > 0.5)
        return ndimage.gaussian_filter(lesion, sigma=0.8).astype(np.float32)

    def _pen(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.float32], int]:
        rows, cols = self.shape
        pen = np.zeros(self.shape, bool)
        y = rng.uniform(0.08, 0.15) * rows
        x0, x1 = rng.uniform(0.1, 0.3) * cols, rng.uniform(0.6, 0.9) * cols
        xs = np.linspace(x0, x1, 400)
        ys = y + 0.03 * rows * np.sin(np.linspace(0, rng.uniform(2, 6), 400))
        pen[np.clip(ys.astype(int), 0, rows - 1), np.clip(xs.astype(int), 0, cols - 1)] = True
        pen = ndimage.binary_dilation(pen, iterations=max(1, round(min(rows, cols) / 120)))
        return ndimage.gaussian_filter(pen.astype(np.float32), sigma=0.7).astype(np.float32), int(rng.integers(3))

    def sample(self, name: str, x0_l0: float, y0_l0: float, width: int, height: int, downsample: float) -> npt.NDArray[np.float32]:
        """Bilinearly upsample field ``name`` to a region of ``width`` x ``height`` pixels of a level.

        ``(x0_l0, y0_l0)`` is the region's top-left in level-0 pixels; ``downsample`` the level's factor.
        """
        grid = getattr(self, name)
        ys = ((y0_l0 + (np.arange(height) + 0.5) * downsample) / self.step - 0.5).astype(np.float32)
        xs = ((x0_l0 + (np.arange(width) + 0.5) * downsample) / self.step - 0.5).astype(np.float32)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return ndimage.map_coordinates(grid, [yy, xx], order=1, mode="nearest").astype(np.float32)

    def covers(self, name: str, x0_l0: float, y0_l0: float, width_l0: float, height_l0: float) -> bool:
        """Whether field ``name`` is non-zero anywhere in (or next to) a level-0 region."""
        grid = getattr(self, name)
        r0 = max(0, int(y0_l0 / self.step) - 1)
        c0 = max(0, int(x0_l0 / self.step) - 1)
        r1 = int((y0_l0 + height_l0) / self.step) + 2
        c1 = int((x0_l0 + width_l0) / self.step) + 2
        return bool(np.any(grid[r0:r1, c0:c1] > 1e-3))

    def fraction(self, name: str, x0_l0: float, y0_l0: float, width_l0: float, height_l0: float) -> float:
        """Mean of field ``name`` over a level-0 rectangle (e.g. the lesion fraction of a tile)."""
        samples = 16
        ds = max(width_l0, height_l0) / samples
        values = self.sample(name, x0_l0, y0_l0, round(width_l0 / ds), round(height_l0 / ds), ds)
        return float(values.mean())


class SlideRenderer:
    """Renders any region of any level of a synthetic slide as RGB uint8."""

    def __init__(self, spec: SyntheticSlideSpec) -> None:
        self.spec = spec
        self.layout = SlideLayout(spec)

    @cached_property
    def _textures(self) -> dict[str, npt.NDArray[np.uint8]]:
        rng = np.random.default_rng([self.spec.seed, 2])
        mpp = self.spec.render_mpp
        period = 1024 if mpp >= 0.4 else 2048
        return {
            "normal": tissue_texture(period, mpp, rng, lesion=False),
            "lesion": tissue_texture(period, mpp, rng, lesion=True),
            "glass": background_texture(256, rng),
        }

    def _level_texture(self, name: str, downsample: float) -> npt.NDArray[np.uint8]:
        key = f"{name}@{downsample}"
        cache = self.__dict__.setdefault("_level_cache", {})
        if key not in cache:
            cache[key] = downsample_texture(self._textures[name], downsample)
        return cache[key]

    def _tile_of(self, name: str, x0: int, y0: int, width: int, height: int, downsample: float) -> npt.NDArray[np.float32]:
        tex = self._level_texture(name, downsample)
        period = tex.shape[0]
        rows = (np.arange(y0, y0 + height)) % period
        cols = (np.arange(x0, x0 + width)) % period
        return tex[np.ix_(rows, cols)].astype(np.float32)

    def render(self, x0: int, y0: int, width: int, height: int, downsample: float) -> npt.NDArray[np.uint8]:
        """Pixels of the level with factor ``downsample``; ``(x0, y0)`` in that level's pixels."""
        lay = self.layout
        x0_l0, y0_l0 = x0 * downsample, y0 * downsample
        w_l0, h_l0 = width * downsample, height * downsample
        out = self._tile_of("glass", x0, y0, width, height, 1.0)
        if lay.covers("tissue", x0_l0, y0_l0, w_l0, h_l0):
            tissue = lay.sample("tissue", x0_l0, y0_l0, width, height, downsample)[..., None]
            texture = self._tile_of("normal", x0, y0, width, height, downsample)
            if self.spec.lesion and lay.covers("lesion", x0_l0, y0_l0, w_l0, h_l0):
                lesion = lay.sample("lesion", x0_l0, y0_l0, width, height, downsample)[..., None]
                texture = texture * (1 - lesion) + self._tile_of("lesion", x0, y0, width, height, downsample) * lesion
            out = out * (1 - tissue) + texture * tissue
        if self.spec.pen_marks and lay.covers("pen", x0_l0, y0_l0, w_l0, h_l0):
            pen = lay.sample("pen", x0_l0, y0_l0, width, height, downsample)[..., None] * 0.85
            out = out * (1 - pen) + _PEN_COLOURS[lay.pen_colour] * pen
        return np.clip(out, 0, 255).astype(np.uint8)


def _level_tiles(renderer: SlideRenderer, level_shape: tuple[int, int], downsample: float) -> Iterator[npt.NDArray[np.uint8]]:
    tile = renderer.spec.tile_size
    height, width = level_shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield renderer.render(x, y, tile, tile, downsample)


def write_synthetic_slide(
    path: str | Path, spec: SyntheticSlideSpec, progress: Callable[[int], None] | None = None
) -> Path:
    """Write ``spec`` as a pyramidal tiled JPEG TIFF at ``path`` (readable by OpenSlide and tiffslide).

    ``progress`` (optional) is called with the number of tiles written after each level.
    """
    import tifffile

    path = Path(path)
    renderer = SlideRenderer(spec)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=spec.width * spec.height > 2**28) as tif:
        for index, downsample in enumerate(spec.level_downsamples):
            shape = (int(np.ceil(spec.height / downsample)), int(np.ceil(spec.width / downsample)))
            if spec.mpp is not None:
                pixels_per_cm = 1e4 / (spec.mpp * downsample)
                resolution, unit = (pixels_per_cm, pixels_per_cm), "CENTIMETER"
            else:
                resolution, unit = (1.0, 1.0), "NONE"
            tif.write(
                _level_tiles(renderer, shape, downsample),
                shape=(*shape, 3),
                dtype=np.uint8,
                tile=(spec.tile_size, spec.tile_size),
                compression="jpeg",
                compressionargs={"level": spec.jpeg_quality},
                photometric="rgb",
                subfiletype=1 if index else 0,
                description=spec.to_json() if index == 0 else None,
                metadata=None,
                software="wsi_encoder",
                resolution=resolution,
                resolutionunit=unit,
            )
            if progress is not None:
                tiles = -(-shape[0] // spec.tile_size) * -(-shape[1] // spec.tile_size)
                progress(tiles)
    logger.info("wrote synthetic slide %s (%dx%d, mpp=%s)", path, spec.width, spec.height, spec.mpp)
    return path


def read_synthetic_spec(path: str | Path) -> SyntheticSlideSpec | None:
    """The spec stored in a generated slide's ImageDescription, or None for any other file."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            description = tif.pages.first.description
    except (OSError, IndexError, tifffile.TiffFileError):
        return None
    if SPEC_TAG not in description:
        return None
    return SyntheticSlideSpec.from_json(description)
