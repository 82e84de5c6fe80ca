"""Histology augmentation, split where it is cheapest.

Per sample, in DataLoader workers (numpy/Pillow), so that it runs beside the model:

* geometry (:func:`sample_view`): take the field of view the encoder expects (``input_size ×
  input_mpp`` µm, converted to source pixels with the image's µm/px), with a small random scale
  jitter and a random position, resize it to ``input_size`` px, then random flips and 90° rotations;
* colour (:func:`colour_augment`): jitter in the haematoxylin-eosin-DAB space (Ruifrok & Johnston
  colour deconvolution with scikit-image's ``hed_from_rgb``/``rgb_from_hed`` matrices, per-stain
  scale and shift as in Tellez et al. 2018), then contrast and brightness jitter.

Randomness comes from a per-sample seed given by the caller, so a training step is reproducible
whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image
from skimage.color import hed_from_rgb, rgb_from_hed


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (0 disables a component).

    Attributes
    ----------
    flips, rot90 : bool
        Random horizontal/vertical flips and 90° rotations.
    scale_jitter : float
        Relative field-of-view jitter: the crop side is scaled by ``exp(U(-s, s))``.
    hed_scale, hed_shift : float
        Per-stain multiplicative ``U(1-a, 1+a)`` and additive ``U(-b, b)`` jitter of the HED stain
        concentrations; the shift is in optical-density units (natural log), as in Tellez et al. 2018.
    brightness, contrast : float
        Additive brightness ``U(-b, b)`` and contrast factor ``U(1-c, 1+c)`` on [0, 1] pixels.
    """

    flips: bool = True
    rot90: bool = True
    scale_jitter: float = 0.1
    hed_scale: float = 0.05
    hed_shift: float = 0.02
    brightness: float = 0.05
    contrast: float = 0.1


NO_AUGMENT = AugmentConfig(False, False, 0.0, 0.0, 0.0, 0.0, 0.0)


def field_of_view_px(src_mpp: float, input_size: int, input_mpp: float) -> float:
    """Source pixels covering ``input_size`` px at ``input_mpp`` µm/px (``input_size`` when mpp unknown)."""
    if not np.isfinite(src_mpp) or src_mpp <= 0:
        return float(input_size)
    return input_size * input_mpp / src_mpp


def sample_view(
    image: npt.NDArray[np.uint8],
    *,
    input_size: int,
    input_mpp: float,
    src_mpp: float,
    rng: np.random.Generator | None,
    config: AugmentConfig = NO_AUGMENT,
) -> npt.NDArray[np.uint8]:
    """Crop the encoder's field of view from ``image`` and resize it to ``input_size`` px.

    Parameters
    ----------
    image : ndarray
        RGB uint8 ``(h, w, 3)`` at ``src_mpp`` µm/px (``nan``: native pixels are used as they are).
    input_size : int
        Output side in px.
    input_mpp : float
        µm/px the encoder expects.
    src_mpp : float
        µm/px of ``image``.
    rng : numpy Generator or None
        None gives the deterministic evaluation view: centred crop, no jitter, no flips.
    config : AugmentConfig

    Returns
    -------
    ndarray
        uint8 ``(input_size, input_size, 3)``. When the image is smaller than the field of view, the
        largest centred (or random) square is used and resized.
    """
    h, w = image.shape[:2]
    fov = field_of_view_px(src_mpp, input_size, input_mpp)
    if rng is not None and config.scale_jitter > 0:
        fov *= float(np.exp(rng.uniform(-config.scale_jitter, config.scale_jitter)))
    side = max(1, min(round(fov), h, w))
    if rng is None:
        y0, x0 = (h - side) // 2, (w - side) // 2
    else:
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
    crop = image[y0 : y0 + side, x0 : x0 + side]
    if side != input_size:
        crop = np.asarray(Image.fromarray(crop).resize((input_size, input_size), Image.Resampling.BILINEAR))
    if rng is not None:
        if config.flips and rng.random() < 0.5:
            crop = crop[:, ::-1]
        if config.rot90:
            crop = np.rot90(crop, int(rng.integers(0, 4)))
    return np.array(crop, dtype=np.uint8, order="C", copy=True)


_HED_FROM_RGB = np.asarray(hed_from_rgb, dtype=np.float32)
_RGB_FROM_HED = np.asarray(rgb_from_hed, dtype=np.float32)


def hed_mix(alpha: npt.ArrayLike, beta: npt.ArrayLike) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The RGB-log-space map of a HED jitter: ``log(rgb') = log(rgb) @ mix + offset``.

    Deconvolving optical densities ``-log(rgb)`` into stain concentrations with ``A = hed_from_rgb``
    (``skimage.color.separate_stains`` up to its constant ``-log(1e-6)`` scale, without clipping),
    scaling each stain by ``alpha``, shifting it by ``beta`` (optical-density units) and recombining with
    ``B = rgb_from_hed = A⁻¹`` (``skimage.color.combine_stains``) is linear in ``log(rgb)``:
    ``mix = A diag(alpha) B`` and ``offset = -beta B``. ``alpha = 1, beta = 0`` is the identity.
    """
    a = np.asarray(alpha, dtype=np.float32).reshape(3)
    b = np.asarray(beta, dtype=np.float32).reshape(3)
    mix = (_HED_FROM_RGB * a[None, :]) @ _RGB_FROM_HED
    return mix.astype(np.float32), (-(b @ _RGB_FROM_HED)).astype(np.float32)


_UNIT_U8 = (np.arange(256) / 255.0).astype(np.float32)
_LOG_U8 = np.log(np.maximum(_UNIT_U8, 1e-6)).astype(np.float32)  # log(rgb) of every uint8 value


def colour_augment(
    view: npt.NDArray[np.uint8], rng: np.random.Generator, config: AugmentConfig
) -> npt.NDArray[np.uint8]:
    """HED stain jitter, then contrast and brightness jitter, of one RGB uint8 view.

    Parameters
    ----------
    view : ndarray
        RGB uint8 ``(h, w, 3)``.
    rng : numpy Generator
    config : AugmentConfig

    Returns
    -------
    ndarray
        RGB uint8 of the same shape.
    """
    if not (config.hed_scale or config.hed_shift or config.contrast or config.brightness):
        return view
    if config.hed_scale > 0 or config.hed_shift > 0:
        alpha = rng.uniform(1 - config.hed_scale, 1 + config.hed_scale, 3)
        beta = rng.uniform(-config.hed_shift, config.hed_shift, 3)
        mix, offset = hed_mix(alpha, beta)
        rgb = np.exp(np.take(_LOG_U8, view) @ mix + offset)
    else:
        rgb = np.take(_UNIT_U8, view)
    if config.contrast > 0:
        mean = rgb.mean()
        rgb = (rgb - mean) * rng.uniform(1 - config.contrast, 1 + config.contrast) + mean
    if config.brightness > 0:
        rgb = rgb + rng.uniform(-config.brightness, config.brightness)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
