"""Periodic H&E-like textures rendered in optical density, for generated demo and test slides.

Colours come from the Beer-Lambert model with Ruifrok & Johnston's H&E stain vectors: a pixel is
``255 * 10 ** -(c_H * OD_H + c_E * OD_E)`` for haematoxylin and eosin concentrations ``c_H``, ``c_E``.
Every texture is periodic (it tiles seamlessly), so a slide of any size is rendered by indexing it
modulo its period, tile by tile, without holding the slide in memory.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: Optical density of unit stain for haematoxylin and eosin (Ruifrok & Johnston 2001), R, G, B.
OD_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)
OD_EOSIN = np.array([0.07, 0.99, 0.11], dtype=np.float32)
BACKGROUND_RGB = np.array([243.0, 242.0, 240.0], dtype=np.float32)


def periodic_noise(shape: tuple[int, int], sigma_px: float, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Smooth, seamlessly tiling noise with unit standard deviation (Gaussian low-pass in Fourier space)."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    smooth = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=shape)
    smooth -= smooth.mean()
    return (smooth / (smooth.std() + 1e-8)).astype(np.float32)


def _stamp_nuclei(
    conc: npt.NDArray[np.float32],
    rng: np.random.Generator,
    count: int,
    radius_px: tuple[float, float],
    elongation: tuple[float, float],
    density: tuple[float, float],
) -> None:
    """Draw ``count`` elliptic nuclei into ``conc`` (haematoxylin concentration), wrapping at the edges."""
    size_y, size_x = conc.shape
    for _ in range(count):
        cy, cx = rng.uniform(0, size_y), rng.uniform(0, size_x)
        r = rng.uniform(*radius_px)
        e = rng.uniform(*elongation)
        a, b = r * e, r / e
        theta = rng.uniform(0, np.pi)
        value = rng.uniform(*density)
        half = int(np.ceil(max(a, b))) + 1
        ys = np.arange(int(cy) - half, int(cy) + half + 1)
        xs = np.arange(int(cx) - half, int(cx) + half + 1)
        dy, dx = np.meshgrid(ys - cy, xs - cx, indexing="ij")
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        block = np.ix_(ys % size_y, xs % size_x)
        conc[block] = np.maximum(conc[block], np.where(inside, value, 0.0))


def render_stains(c_h: npt.NDArray[np.float32], c_e: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Turn haematoxylin/eosin concentration maps into RGB uint8 by Beer-Lambert."""
    od = c_h[..., None] * OD_HAEMATOXYLIN + c_e[..., None] * OD_EOSIN
    return np.clip(255.0 * np.power(10.0, -od), 0, 255).astype(np.uint8)


def tissue_texture(period_px: int, mpp: float, rng: np.random.Generator, *, lesion: bool) -> npt.NDArray[np.uint8]:
    """A periodic ``(period_px, period_px, 3)`` texture of normal tissue or of a dense 'lesion'.

    Normal tissue: pink stroma with fibres and sparse small, elongated nuclei. Lesion: crowded,
    large, round, dark nuclei over paler, purpler stroma (a carcinoma-like pattern). Sizes are in µm
    and converted with ``mpp`` so textures look alike at any scan resolution.
    """
    shape = (period_px, period_px)
    um = 1.0 / mpp
    fibres = periodic_noise(shape, 1.5 * um, rng) * 0.6 + periodic_noise((period_px, period_px), 6 * um, rng)
    lowfreq = periodic_noise(shape, 40 * um, rng)
    c_h = np.zeros(shape, dtype=np.float32)
    area_um2 = (period_px * mpp) ** 2
    if lesion:
        c_e = 0.12 + 0.03 * lowfreq + 0.02 * fibres
        _stamp_nuclei(c_h, rng, int(area_um2 / 90), (3.5 * um, 6.0 * um), (1.0, 1.3), (0.75, 1.25))
        c_h += 0.1
    else:
        c_e = 0.2 + 0.05 * lowfreq + 0.07 * np.abs(fibres)
        _stamp_nuclei(c_h, rng, int(area_um2 / 700), (2.0 * um, 3.0 * um), (1.3, 2.2), (0.55, 0.85))
        c_h += 0.04
    c_h = ndimage.gaussian_filter(c_h, sigma=0.6 * um, mode="wrap").astype(np.float32)
    return render_stains(c_h, np.clip(c_e, 0.02, None).astype(np.float32))


def background_texture(period_px: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Near-white glass with faint noise, periodic."""
    noise = periodic_noise((period_px, period_px), 2.0, rng)[..., None]
    return np.clip(BACKGROUND_RGB + 1.5 * noise, 0, 255).astype(np.uint8)


def downsample_texture(texture: npt.NDArray[np.uint8], factor: float) -> npt.NDArray[np.uint8]:
    """Area-average a periodic texture by an integer ``factor`` (keeps periodicity)."""
    f = round(factor)
    if f <= 1:
        return texture
    period = texture.shape[0]
    if f >= period or period % f:
        mean = texture.reshape(-1, 3).mean(axis=0)
        return np.broadcast_to(mean.astype(np.uint8), (1, 1, 3)).copy()
    n = period // f
    return texture.reshape(n, f, n, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)
