"""Settings of ``wsienc lomo``: :class:`LomoConfig` is the single source of every default.

The command line reads its defaults from here, the pipeline records ``asdict(config)`` in each run's
``config.json`` (``settings``) and refuses to resume a folder made with other settings. This module
imports neither torch nor click, so the CLI can read the defaults cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.breakhis import PATIENT_KEYS

ARMS = ("baseline", "gan", "grl")
#: Offset added to a fold's training seed for its second-seed encoder (``seed_null``).
SEED_NULL_OFFSET = 1000
#: Sub-folder of a patient split's folder holding the second-seed encoders' runs and embeddings.
SEED_NULL_DIR = "seed_null"
#: Epoch selection rules. ``last`` (the default, for every arm) keeps the final epoch's weights;
#: ``best-val`` (a sensitivity analysis) the best validation epoch among those that end after the
#: grl arm's λ ramp (:func:`wsi_encoder.models.grl.dann_ramp_end`), the same rule for every arm.
SELECT_EPOCH = ("last", "best-val")


@dataclass(frozen=True)
class LomoConfig:
    """Settings of a LOMO run (all arms share them).

    Attributes
    ----------
    backbone : str
        Registered encoder name (``resnet18`` ...) or a ``wsienc train-encoder`` checkpoint folder.
    weights : str or None
        Local weight file for the backbone (e.g. ImageNet ResNet weights); None: seeded random init.
    embed_dim : int or None
        Linear embedding on top of the backbone (None: the backbone's own features).
    image_size : int
        Side in px of the square classifier input (the whole 700×460 image is resized to it).
    epochs, batch_size, lr : int, int, float
        Classifier budget and Adam learning rate (identical for every arm). ``batch_size`` counts
        real images; the gan arm adds its synthetic images on top.
    seed : int
        Seed of the patient split, initial weights, batch order and GANs (repeat ``k`` uses ``seed + k``).
    repeats : int
        Number of patient splits (seeds ``seed`` ... ``seed + repeats - 1``) the whole protocol runs on.
    test_fraction : float
        Share of each class's patients in the test set (ignored with ``patient_folds``).
    patient_folds : int or None
        Number of stratified patient folds (every patient tested once) instead of one split.
    val_fraction : float
        Share of each class's training patients used for validation (logged; best-val selection).
    patient_key : str
        ``number`` (strict: ``14-22549`` groups slides 22549AB, 22549CD, 22549G) or ``token``.
    select_epoch : str
        ``last`` (default) or ``best-val`` (restricted to epochs after the λ ramp), the same rule
        for every arm (``--selection``).
    gan_ratio : float
        Synthetic images added per real image of each batch in the ``gan`` arm.
    gan_epochs, gan_width, gan_batch_size : int
        DCGAN training epochs, base filter count (64 in Radford et al.) and batch size (128).
    grl_weight : float
        Scale of the DANN λ schedule in the ``grl`` arm.
    domain_hidden : int
        Width of the domain head's hidden layers.
    domain_lr_mult : float
        Learning-rate multiplier of the domain head (10 as for DANN's new layers).
    max_images_per_split : int or None
        Keep at most this many images per role and fold (quick runs).
    n_bootstrap : int
        Patient-grouped bootstrap resamples behind every interval (>= 1000 for published figures).
    allow_contaminated_backbone : bool
        Accept a train-encoder checkpoint that was trained on BreaKHis or on the run's data.
    workers : int
        DataLoader processes reading the training batches (speed only: results are the same for any
        value, so a run may resume with another).
    seed_null : bool
        Train every arm × fold a second time with another training seed (batch order, augmentation;
        the same initial weights, images, roles and DCGAN images) into ``seed_null/``: the seed-to-seed
        reference that ``wsienc signatures`` reads beside the cross-magnification Jaccard. It adds
        outputs without changing the others, so a finished run may resume with it to train only the
        second seeds.
    """

    backbone: str = "resnet18"
    weights: str | None = None
    embed_dim: int | None = None
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    repeats: int = 1
    test_fraction: float = 0.3
    patient_folds: int | None = None
    val_fraction: float = 0.2
    patient_key: str = "number"
    select_epoch: str = "last"
    gan_ratio: float = 1.0
    gan_epochs: int = 100
    gan_width: int = 64
    gan_batch_size: int = 128
    grl_weight: float = 1.0
    domain_hidden: int = 1024
    domain_lr_mult: float = 10.0
    max_images_per_split: int | None = None
    n_bootstrap: int = 1000
    allow_contaminated_backbone: bool = False
    workers: int = 0
    seed_null: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.image_size >= 16, f"image size {self.image_size!r} px is too small (use >= 16, e.g. 224)"),
            (self.gan_ratio >= 0, f"--gan-ratio {self.gan_ratio!r} must be >= 0"),
            (
                self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0 and self.domain_hidden >= 1,
                f"epochs {self.epochs!r}, batch size {self.batch_size!r} and lr {self.lr!r} must be positive",
            ),
            (self.grl_weight >= 0 and self.domain_lr_mult > 0, f"--grl-weight {self.grl_weight!r} must be >= 0"),
            (
                self.gan_epochs >= 1 and self.gan_width >= 1 and self.gan_batch_size >= 1,
                "DCGAN epochs, width and batch size must be positive",
            ),
            (self.repeats >= 1, f"--repeats {self.repeats!r} must be at least 1"),
            (self.workers >= 0, f"--workers {self.workers!r} must be >= 0"),
            (self.patient_key in PATIENT_KEYS, f"--patient-key {self.patient_key!r}: choose number or token"),
            (
                self.select_epoch in SELECT_EPOCH,
                f"--selection {self.select_epoch!r}: choose last or best-val",
            ),
            (self.n_bootstrap >= 100, f"--bootstrap {self.n_bootstrap!r}: use at least 100 (1000 or more to publish)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidParameterError(message)

    def selection(self, arm: str) -> str:
        """``last`` or ``best-val``: how ``arm`` picks the epoch whose weights it keeps (one rule for all arms)."""
        if arm not in ARMS:
            raise InvalidParameterError(f"unknown arm {arm!r}: choose from {', '.join(ARMS)}")
        return self.select_epoch

    @classmethod
    def default(cls, name: str) -> Any:
        """The default value of setting ``name`` (the CLI's defaults come from here)."""
        for f in fields(cls):
            if f.name == name:
                return f.default
        raise KeyError(name)
