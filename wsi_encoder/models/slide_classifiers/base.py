"""The slide-classifier interface, the registry of model names, and the config rules every model shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.slide_records import SlideBag

Bags = Sequence[SlideBag]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class FitInfo:
    """Outcome of one ``fit``.

    ``best_epoch`` is the epoch whose weights were kept (torch models; None for ``linear``),
    ``selected`` the hyperparameters chosen on the validation set (``{"C": ...}`` for ``linear``).
    """

    best_epoch: int | None = None
    epochs_run: int | None = None
    stopped_early: bool = False
    selected: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class SlideClassifier(ABC, Generic[ConfigT]):
    """One interface for every slide-level model.

    Parameters
    ----------
    in_dim
        Feature size ``C`` of the tile embeddings.
    num_classes
        Number of classes ``k`` (2 for binary).
    config
        The model's config dataclass (``Config``) or a dict of overrides of its defaults.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``; ignored by ``linear``.
    """

    name: ClassVar[str]
    #: The config dataclass (its defaults are the model's defaults).
    Config: ClassVar[type[Any]]
    heatmap_kind: ClassVar[str]
    #: True when heatmap values are signed (drawn with a diverging colour map centred on 0).
    heatmap_signed: ClassVar[bool] = False
    #: True when the model uses the 8 dihedral views of ``encode --dihedral`` (``SlideBag.dihedral``) when present.
    uses_dihedral: ClassVar[bool] = False
    #: Named sets of config overrides (``classify train --preset NAME``).
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    config: ConfigT

    def __init__(
        self, in_dim: int, num_classes: int, config: ConfigT | dict[str, Any] | None = None, device: str = "auto"
    ) -> None:
        if in_dim < 1 or num_classes < 2:
            raise InvalidParameterError(f"need in_dim >= 1 and num_classes >= 2, got {in_dim!r}, {num_classes!r}")
        self.in_dim = int(in_dim)
        self.num_classes = int(num_classes)
        if isinstance(config, self.Config):
            self.config = config
        elif config is None or isinstance(config, dict):
            self.config = make_config(self.Config, config or {})
        else:
            raise InvalidParameterError(
                f"{self.name} config must be a {self.Config.__name__} or a dict, got {type(config).__name__}"
            )
        self.device_name = str(device)

    @abstractmethod
    def fit(
        self,
        train: Bags,
        y: npt.ArrayLike,
        val: Bags | None = None,
        y_val: npt.ArrayLike | None = None,
        *,
        seed: int = 0,
        refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        """Train on ``train`` (labels ``y``), using ``val`` for early stopping / model selection.

        ``refit`` (from :meth:`refit_params`) fixes what was selected on validation sets, for a final
        model trained without one.
        """

    @abstractmethod
    def predict_proba(self, bags: Bags) -> FloatArray:
        """``(n, k)`` class probabilities, one row per bag."""

    @abstractmethod
    def heatmap(self, bag: SlideBag) -> FloatArray:
        """``(R, Q)`` map of what drove the prediction (``heatmap_kind``); NaN outside tissue."""

    @abstractmethod
    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Everything learned, as named numpy arrays (saved with safetensors)."""

    @abstractmethod
    def load_state_arrays(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        """Restore what :meth:`state_arrays` returned."""

    @classmethod
    @abstractmethod
    def refit_params(cls, infos: Sequence[FitInfo]) -> dict[str, Any]:
        """What a final model trained on all data takes from the cross-validation fits."""

    def describe(self) -> dict[str, Any]:
        """Name, config, sizes (the model's saved config)."""
        return {
            "name": self.name,
            "config": config_dict(self.config),
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "heatmap_kind": self.heatmap_kind,
        }


_REGISTRY: dict[str, type[SlideClassifier[Any]]] = {}
ClassifierT = TypeVar("ClassifierT", bound=type[SlideClassifier[Any]])


def register_slide_classifier(cls: ClassifierT) -> ClassifierT:
    """Class decorator adding a model to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def list_slide_classifiers() -> list[str]:
    """Names of the registered slide classifiers."""
    return sorted(_REGISTRY)


def slide_classifier_class(name: str) -> type[SlideClassifier[Any]]:
    """The class registered as ``name`` (:class:`InvalidParameterError` when unknown)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidParameterError(
            f"unknown slide classifier {name!r}; choose one of {', '.join(list_slide_classifiers())}"
        ) from None


def create_slide_classifier(
    name: str, in_dim: int, num_classes: int, config: dict[str, Any] | None = None, device: str = "auto"
) -> SlideClassifier[Any]:
    """Make the model ``name`` with ``config`` overrides of its defaults."""
    return slide_classifier_class(name)(in_dim, num_classes, config, device)


def model_preset(name: str, preset: str | None) -> dict[str, Any]:
    """The config overrides of ``preset`` of model ``name`` (``{}`` for None).

    Raises
    ------
    InvalidParameterError
        The model has no preset of that name.
    """
    if preset is None:
        return {}
    presets = slide_classifier_class(name).presets
    if preset not in presets:
        have = ", ".join(presets) or "none"
        raise InvalidParameterError(f"model {name!r} has no preset {preset!r} (presets: {have})")
    return dict(presets[preset])


def config_fields(config_type: type[Any]) -> list[str]:
    """The parameter names of a model's config dataclass."""
    return [f.name for f in fields(config_type)]


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict."""
    if not is_dataclass(config) or isinstance(config, type):
        raise InvalidParameterError(f"a model config must be a dataclass instance, got {config!r}")
    return asdict(config)


def make_config(config_type: type[Any], overrides: dict[str, Any]) -> Any:
    """``config_type()`` with ``overrides``; strings (from the command line) are converted to the field type.

    Raises
    ------
    InvalidParameterError
        On unknown keys or values of the wrong type.
    """
    defaults = config_type()
    known = {name: getattr(defaults, name) for name in config_fields(config_type)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise InvalidParameterError(
            f"unknown parameter(s) {', '.join(unknown)} for {config_type.__name__}; valid: {', '.join(known)}"
        )
    converted = {key: _convert(key, value, known[key]) for key, value in overrides.items() if value is not None}
    config = replace(defaults, **converted)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _convert(key: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(type(default[0])(v) for v in items) if default else tuple(items)
        return str(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"parameter {key}={value!r} is not a valid {type(default).__name__} (default {default!r})"
        ) from None


def class_weights(y: IntArray, num_classes: int, mode: str) -> FloatArray | None:
    """``"balanced"``: ``n / (k * n_c)`` per class (sklearn's rule); ``"none"``: None."""
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=num_classes).astype(float)
    weights: FloatArray = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights


def check_class_weight(mode: str) -> None:
    """Raise :class:`InvalidParameterError` unless ``mode`` is ``balanced`` or ``none``."""
    if mode not in ("balanced", "none"):
        raise InvalidParameterError(f"class_weight must be 'balanced' or 'none', got {mode!r}")


def feature_stats(bags: Bags) -> tuple[FloatArray, FloatArray]:
    """Per-feature mean and standard deviation over all tiles of ``bags`` (streamed, float64)."""
    total: FloatArray | None = None
    sq: FloatArray | None = None
    count = 0
    for bag in bags:
        f = bag.features.astype(np.float64)
        total = f.sum(0) if total is None else total + f.sum(0)
        sq = (f * f).sum(0) if sq is None else sq + (f * f).sum(0)
        count += f.shape[0]
    if total is None or sq is None or count == 0:
        raise InvalidParameterError("no tiles to train on")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
    return mean, np.where(std > 1e-6, std, 1.0)
