"""``wsienc predict``'s settings: the encoder and tile spec a run uses, from the classifier's provenance.

The classifier's ``model.json`` says how its training embeddings were made (encoder name, folder and
weights sha256; target µm/px, tile size, stride, tissue settings). :func:`resolve_settings` makes those
the defaults and refuses a different encoder or tile spec unless ``force``; :func:`check_encoder`
compares the encoder actually loaded with the one the model was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.tiling import TileSpec

if TYPE_CHECKING:
    from wsi_encoder.compression import EncoderIdentity

DEFAULT_TISSUE_THRESHOLD = 0.25
DEFAULT_MPP_TOLERANCE = 0.05
DEFAULT_DTYPE = "float16"


@dataclass(frozen=True)
class PredictSettings:
    """The encoder and tile spec a run uses, and the differences from the model's provenance it was forced past."""

    encoder: str
    weights: str | None
    spec: TileSpec
    tissue_threshold: float
    thumbnail_size: int | None
    dtype: str
    forced: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "encoder": self.encoder,
            "weights": self.weights,
            "target_mpp": self.spec.target_mpp,
            "tile_size": self.spec.tile_size,
            "stride": self.spec.stride_px,
            "mpp_tolerance": self.spec.tolerance,
            "tissue_threshold": self.tissue_threshold,
            "thumbnail_size": self.thumbnail_size,
            "dtype": self.dtype,
            "forced": list(self.forced),
        }


_OPTION = {
    "target_mpp": "--mpp", "tile_size": "--tile-size", "stride": "--stride", "mpp_tolerance": "--mpp-tolerance",
    "tissue_threshold": "--tissue-threshold",
}  # fmt: skip


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a != b


def _encoder_available(spec: str) -> bool:
    from wsi_encoder.models.encoders import list_encoders

    return Path(spec).is_dir() or spec in list_encoders()


def resolve_settings(
    meta: Mapping[str, Any],
    model_dir: str | Path,
    *,
    encoder: str | None = None,
    weights: str | Path | None = None,
    mpp: float | None = None,
    tile_size: int | None = None,
    stride: int | None = None,
    mpp_tolerance: float | None = None,
    tissue_threshold: float | None = None,
    thumbnail_size: int | None = None,
    force: bool = False,
) -> PredictSettings:
    """Combine the model's provenance with what the user asked for (the encoder itself is checked on load).

    Raises
    ------
    InvalidParameterError
        The model records no provenance and the needed options are missing, or an option differs
        from the model's provenance and ``force`` is off.
    """
    provenance = meta.get("provenance") or {}
    recorded_encoder = provenance.get("encoder") or {}
    tiling = provenance.get("tiling")
    if encoder is None:
        spec = recorded_encoder.get("spec")
        if not spec:
            raise InvalidParameterError(
                f"{model_dir}: the model does not record which encoder made its training embeddings (trained before "
                "`classify train` recorded it); pass --encoder NAME_OR_DIR (and --weights FILE) as given to `wsienc encode`"
            )
        folder = recorded_encoder.get("folder")
        if not _encoder_available(str(spec)) and folder and Path(folder).is_dir():
            spec = folder
        if not _encoder_available(str(spec)):
            raise InvalidParameterError(
                f"{model_dir}: the model was trained on embeddings of encoder {spec!r}, which is not a folder here nor a "
                "registered encoder; pass --encoder with that checkpoint folder"
            )
        encoder = str(spec)
    requested = {"target_mpp": mpp, "tile_size": tile_size, "stride": stride, "mpp_tolerance": mpp_tolerance,
                 "tissue_threshold": tissue_threshold}  # fmt: skip
    forced: list[str] = []
    if tiling is None:
        if mpp is None or tile_size is None:
            why = provenance.get("tiling_note") or "trained before `classify train` recorded it"
            raise InvalidParameterError(
                f"{model_dir}: the model does not record the tile spec of its training embeddings ({why}); pass --mpp "
                "and --tile-size (and --stride, --tissue-threshold, --mpp-tolerance when not the defaults) as given to "
                "`wsienc tile`"
            )
        values = {
            "target_mpp": mpp, "tile_size": tile_size, "stride": stride or tile_size,
            "mpp_tolerance": DEFAULT_MPP_TOLERANCE if mpp_tolerance is None else mpp_tolerance,
            "tissue_threshold": DEFAULT_TISSUE_THRESHOLD if tissue_threshold is None else tissue_threshold,
        }  # fmt: skip
        thumb = thumbnail_size
        edge = "pad"
    else:
        values = {}
        for key, asked in requested.items():
            recorded = tiling.get(key)
            if recorded is None:
                recorded = {"mpp_tolerance": DEFAULT_MPP_TOLERANCE, "tissue_threshold": DEFAULT_TISSUE_THRESHOLD,
                            "stride": tiling.get("tile_size")}.get(key)  # fmt: skip
            if asked is not None and recorded is not None and _differs(asked, recorded):
                forced.append(f"{_OPTION[key]} {asked} (the model's training tiles: {recorded})")
            values[key] = asked if asked is not None else recorded
        recorded_thumb = tiling.get("thumbnail_size")
        thumb = thumbnail_size if thumbnail_size is not None else recorded_thumb
        edge = str(tiling.get("edge") or "drop")  # stores written before edge tiles kept whole tiles only
    if forced and not force:
        raise InvalidParameterError(
            f"{model_dir}: {'; '.join(forced)} differ(s) from how the model's training embeddings were tiled; "
            "predictions would not mean what the model learnt (pass --force to predict anyway)"
        )
    spec = TileSpec(
        target_mpp=float(values["target_mpp"]), tile_size=int(values["tile_size"]),
        stride=int(values["stride"]) if values["stride"] is not None else None, tolerance=float(values["mpp_tolerance"]),
        edge=edge,
    )  # fmt: skip
    threshold = float(values["tissue_threshold"])
    if not 0 <= threshold <= 1:
        raise InvalidParameterError(f"--tissue-threshold {threshold!r} must be a fraction in [0, 1]")
    return PredictSettings(
        encoder=encoder,
        weights=None if weights is None else str(weights),  # recorded as given (a path or URL), never absolutised
        spec=spec,
        tissue_threshold=threshold,
        thumbnail_size=None if thumb is None else int(thumb),
        dtype=str(recorded_encoder.get("dtype") or DEFAULT_DTYPE),
        forced=tuple(forced),
    )


def check_encoder(identity: EncoderIdentity, meta: Mapping[str, Any], model_dir: str | Path, in_dim: int, force: bool) -> list[str]:
    """Refuse an encoder other than the one the model's training embeddings came from (unless ``force``).

    Returns the differences that ``force`` let through. The embedding size must match in any case.
    """
    if identity.embedding_dim != in_dim:
        raise InvalidParameterError(
            f"encoder {identity.spec!r} gives {identity.embedding_dim}-d embeddings but the model in {model_dir} was "
            f"trained on {in_dim}-d ones; pass the encoder its training embeddings came from"
        )
    recorded = (meta.get("provenance") or {}).get("encoder") or meta.get("encoder") or {}
    problems = []
    if recorded.get("name") and recorded["name"] != identity.name:
        problems.append(f"encoder {identity.name!r} (the model's training embeddings: {recorded['name']!r})")
    sha = recorded.get("weights_sha256")
    if sha and identity.weights_sha256 and sha != identity.weights_sha256:
        problems.append(
            f"encoder weights sha256 {str(identity.weights_sha256)[:12]}… (the model's training embeddings: {str(sha)[:12]}…)"
        )
    if problems and not force:
        raise InvalidParameterError(
            f"{model_dir}: {'; '.join(problems)}; pass the encoder (and --weights) given to `wsienc encode` for the "
            "training slides (or --force to predict anyway)"
        )
    return problems


# ---------------------------------------------------------------------------------------------- one slide
