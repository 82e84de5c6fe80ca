"""Pictures of embedding grids: the grid projected to RGB by PCA, next to the slide thumbnail.

The PCA is fit once per cohort (a bounded random sample of tiles from every slide), and the
colour range is fixed from that same sample, so a colour means the same region of embedding space
on every slide of the cohort: similar tissue gets similar colours across slides.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.io.embedding_store import EmbeddingStore
from wsi_encoder.io.files import atomic_write_figure

logger = logging.getLogger(__name__)

#: Percentiles of the cohort sample mapped to the ends of each colour channel.
_COLOUR_RANGE = (1.0, 99.0)
_BLOCK_ROWS = 65536


@dataclass(frozen=True)
class PcaRgb:
    """A cohort-wide projection of embeddings to RGB.

    Attributes
    ----------
    mean
        ``(C,)`` mean of the sample.
    components
        ``(k, C)`` principal axes (k ≤ 3).
    low, high
        ``(k,)`` projected values mapped to 0 and 255.
    n_slides
        Slides the projection was fit on.
    """

    mean: npt.NDArray[np.float64]
    components: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    n_slides: int

    def to_rgb(self, features: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.uint8]:
        """``(N, C)`` embeddings → ``(N, 3)`` uint8 colours (missing components are mid-grey)."""
        proj = (np.asarray(features, dtype=np.float64) - self.mean) @ self.components.T
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        scaled = np.clip((proj - self.low) / span, 0.0, 1.0)
        rgb = np.full((proj.shape[0], 3), 0.5)
        rgb[:, : scaled.shape[1]] = scaled
        return np.round(rgb * 255).astype(np.uint8)


def fit_pca_rgb(samples: Sequence[npt.NDArray[np.floating[Any]]], seed: int = 0) -> PcaRgb:
    """Fit a :class:`PcaRgb` on per-slide samples of embeddings (each ``(n_i, C)``)."""
    from sklearn.decomposition import PCA

    data = np.concatenate([np.asarray(s, dtype=np.float64) for s in samples], axis=0)
    k = int(min(3, data.shape[0], data.shape[1]))
    if k == 0:
        c = data.shape[1]
        return PcaRgb(np.zeros(c), np.zeros((0, c)), np.zeros(0), np.zeros(0), len(samples))
    pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(data)
    proj = pca.transform(data)
    low, high = np.percentile(proj, _COLOUR_RANGE, axis=0)
    return PcaRgb(pca.mean_, pca.components_, np.atleast_1d(low), np.atleast_1d(high), len(samples))


def _sample_rows(store: EmbeddingStore, slide_id: str, max_rows: int, rng: np.random.Generator) -> npt.NDArray[np.floating[Any]]:
    features = store.features(slide_id)
    n = int(features.shape[0])
    if n <= max_rows:
        return np.asarray(features[...])
    index = np.sort(rng.choice(n, size=max_rows, replace=False))
    return np.asarray(features.get_orthogonal_selection((index, slice(None))))


def rgb_grid(store: EmbeddingStore, slide_id: str, projection: PcaRgb) -> npt.NDArray[np.uint8]:
    """``(R, Q, 3)`` RGB picture of one usable slide's grid (white outside tissue)."""
    rows, cols = store.grid_shape(slide_id)
    rowcol = store.rowcol(slide_id)
    image = np.full((rows, cols, 3), 255, dtype=np.uint8)
    for start, block in store.iter_feature_rows(slide_id, _BLOCK_ROWS):
        rc = rowcol[start : start + block.shape[0]]
        image[rc[:, 0], rc[:, 1]] = projection.to_rgb(block)
    return image


def render_preview(
    path: str | Path,
    image: npt.NDArray[np.uint8],
    *,
    thumbnail: npt.NDArray[np.uint8] | None,
    grid_extent_l0: tuple[float, float, float, float],
    slide_size_l0: tuple[float, float],
    title: str,
    caption: str,
) -> Path:
    """Draw the thumbnail and the RGB grid side by side in the level-0 frame and save a PNG.

    Parameters
    ----------
    path
        Output PNG.
    image
        ``(R, Q, 3)`` RGB grid.
    thumbnail
        Slide thumbnail or None (only the grid is drawn).
    grid_extent_l0
        ``(left, right, bottom, top)`` of the grid in level-0 pixels (matplotlib ``extent``).
    slide_size_l0
        ``(width, height)`` of the slide at level 0.
    title, caption
        Figure title and the note under it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = slide_size_l0
    panels = 2 if thumbnail is not None else 1
    aspect = height / max(width, 1.0)
    fig_w = 5.0 * panels
    fig, axes = plt.subplots(1, panels, figsize=(fig_w, min(12.0, 5.0 * aspect + 1.0)), squeeze=False)
    ax_list = list(axes[0])
    if thumbnail is not None:
        ax = ax_list.pop(0)
        ax.imshow(thumbnail, extent=(0, width, height, 0), interpolation="antialiased")
        ax.set_title("slide thumbnail", fontsize=9)
    ax = ax_list[0]
    ax.imshow(np.full((2, 2, 3), 255, dtype=np.uint8), extent=(0, width, height, 0))
    ax.imshow(image, extent=grid_extent_l0, interpolation="nearest")
    ax.set_title("embedding grid (PCA → RGB)", fontsize=9)
    for axis in axes[0]:
        axis.set_xlim(0, width)
        axis.set_ylim(height, 0)
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    path = Path(path)
    try:
        atomic_write_figure(path, fig, dpi=110)
    finally:
        plt.close(fig)
    return path


def _grid_extent(store: EmbeddingStore, slide_id: str, attrs: dict[str, Any]) -> tuple[float, float, float, float]:
    rows, cols = store.grid_shape(slide_id)
    stride = float(attrs.get("stride_l0") or attrs.get("tile_size_l0") or 1.0)
    coords = store.coords(slide_id).astype(np.float64)
    rowcol = store.rowcol(slide_id).astype(np.float64)
    if coords.shape[0]:
        ox = float(np.median(coords[:, 0] - rowcol[:, 1] * stride))
        oy = float(np.median(coords[:, 1] - rowcol[:, 0] * stride))
    else:
        ox = oy = 0.0
    return (ox, ox + cols * stride, oy + rows * stride, oy)


def write_previews(
    store: str | Path,
    out_dir: str | Path,
    *,
    slide_ids: Sequence[str] | None = None,
    max_tiles_per_slide: int = 2000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``<out_dir>/<slide_id>.png`` for the usable slides of an embedding store.

    The PCA is fit on up to ``max_tiles_per_slide`` random tiles of every usable slide of the
    store (the cohort), whichever slides are drawn, so colours are comparable across slides and
    across runs on the same store. Slides the store skips (incomplete, failed, without tiles) are
    not drawn.

    Returns
    -------
    dict
        ``{slide_id: png path}``.
    """
    embeddings = EmbeddingStore.open(store)
    cohort = embeddings.slide_ids
    wanted = cohort if slide_ids is None else [s for s in slide_ids if s in cohort]
    if not wanted:
        return {}
    rng = np.random.default_rng(seed)
    samples = [_sample_rows(embeddings, s, max_tiles_per_slide, rng) for s in cohort]
    projection = fit_pca_rgb(samples, seed=seed)
    out: dict[str, Path] = {}
    for slide_id in wanted:
        attrs = embeddings.attrs(slide_id)
        image = rgb_grid(embeddings, slide_id, projection)
        thumbnail = embeddings.thumbnail(slide_id)
        rows, cols = image.shape[:2]
        width = float(attrs.get("width") or 0)
        height = float(attrs.get("height") or 0)
        extent = _grid_extent(embeddings, slide_id, attrs)
        if not width or not height:
            width, height = extent[1], extent[2]
        encoder = (attrs.get("encoder") or {}).get("name", "?")
        title = (
            f"{slide_id}: {embeddings.features(slide_id).shape[0]} tiles → grid {attrs.get('embedding_dim')} × {rows} × {cols} "
            f"({encoder}, {attrs.get('target_mpp')} µm/px)"
        )
        caption = f"colours: PCA of the embeddings fit on the whole cohort ({projection.n_slides} slides); white = no tissue tile"
        out[slide_id] = render_preview(
            Path(out_dir) / f"{slide_id}.png",
            image,
            thumbnail=thumbnail,
            grid_extent_l0=extent,
            slide_size_l0=(width, height),
            title=title,
            caption=caption,
        )
        logger.info("wrote preview %s", out[slide_id])
    return out
