"""The three LOMO arms as small strategies: what each adds to the shared training loop.

Every arm trains the same classifier (encoder → label head) from the same initial weights with the
same optimiser, batches of real images and step budget (:func:`wsi_encoder.training.lomo_trainer.train_classifier`).
An arm only says what it adds:

:class:`BaselineArm`
    nothing: binary cross-entropy on the real images.
:class:`GanArm`
    extra *samples*: each step's batch of real images gets ``round(ratio · n_real)`` synthetic
    images (with the class of the DCGAN that made them) on top, so every arm sees the same real
    images, in the same order, as often. The DCGANs make 64-px crops at the classifier's input
    scale; a synthetic classifier input is a mosaic of such crops of one class (no upsampling).
:class:`GrlArm`
    an extra *loss*: a magnification domain head behind a gradient reversal layer; λ of a step is
    set before that step's forward pass, from the progress at the end of the step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.models.grl import DomainHead, dann_lambda
from wsi_encoder.training.lomo_data import resize_batch, to_tensor


class BaselineArm:
    """The supervised baseline: adds nothing."""

    name = "baseline"

    def head(self, in_features: int) -> nn.Module | None:
        """An extra module trained with the classifier (None: none)."""
        return None

    def head_lr_mult(self) -> float:
        """Learning-rate multiplier of :meth:`head`'s parameters."""
        return 1.0

    def n_extra(self, n_real: int) -> int:
        """Synthetic images to add to a batch of ``n_real`` real images."""
        return 0

    def extra_samples(
        self, n: int, rng: np.random.Generator, size: int
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """``n`` extra images ``(n, size, size, 3)`` uint8 and their classes."""
        raise NotImplementedError(f"the {self.name} arm adds no samples")

    def before_step(self, model: nn.Module, progress: float) -> dict[str, float]:
        """Set up the step ending at training progress ``progress`` (in (0, 1]); returns values to log."""
        return {}

    def extra_loss(
        self, model: nn.Module, features: torch.Tensor, domains: torch.Tensor
    ) -> torch.Tensor | None:
        """The arm's loss term on the real images' features (None: none)."""
        return None


class GanArm(BaselineArm):
    """Adds DCGAN images on top of every batch of real images (``ratio`` synthetic per real image).

    Parameters
    ----------
    images, labels
        ``(M, c, c, 3)`` uint8 synthetic *crops* at the classifier's input scale (DCGAN output, see
        :func:`wsi_encoder.training.gan_trainer.fold_synthetic_images`) and their classes.
    ratio
        Synthetic images per real image of a batch.

    A synthetic classifier input of side ``S`` is a mosaic of ``ceil(S / t)²`` crops of one class,
    cut to ``S``, with tile side ``t = min(S, crop_size)``: the first crop comes from a seeded
    shuffled stream of the pool (without replacement, reshuffled when used up, so the classes keep
    the pool's proportions), the others are drawn from the same class's crops. Crops are resized to
    ``t`` only when the classifier input is smaller than a crop.
    """

    name = "gan"

    def __init__(
        self,
        images: npt.NDArray[np.uint8],
        labels: npt.NDArray[np.int64],
        ratio: float,
        *,
        crop_size: int = 64,
    ) -> None:
        if ratio < 0:
            raise InvalidParameterError(f"--gan-ratio {ratio!r} must be >= 0")
        if len(images) != len(labels):
            raise InvalidParameterError(f"{len(images)} synthetic images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ratio = float(ratio)
        self.crop_size = int(crop_size)
        self._order = np.zeros(0, dtype=np.int64)
        self._by_class = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}

    def n_extra(self, n_real: int) -> int:
        """``round(ratio · n_real)`` (0 when there are no synthetic images)."""
        return 0 if len(self.images) == 0 else round(self.ratio * n_real)

    def extra_samples(
        self, n: int, rng: np.random.Generator, size: int
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """``n`` mosaics ``(n, size, size, 3)`` of synthetic crops, one class each, and their classes."""
        while len(self._order) < n:
            self._order = np.concatenate([self._order, rng.permutation(len(self.images))])
        first, self._order = self._order[:n], self._order[n:]
        tile = min(size, self.crop_size)
        k = -(-size // tile)
        out = np.empty((n, k * tile, k * tile, 3), dtype=np.uint8)
        for i, j in enumerate(first):
            same = self._by_class[int(self.labels[j])]
            picks = np.concatenate([[j], rng.choice(same, size=k * k - 1)]) if k > 1 else np.asarray([j])
            crops = _to_side(np.asarray(self.images[np.sort(picks)]), tile)
            out[i] = crops.reshape(k, k, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(k * tile, k * tile, 3)
        return out[:, :size, :size], self.labels[first]


def _to_side(crops: npt.NDArray[np.uint8], side: int) -> npt.NDArray[np.uint8]:
    """``(B, c, c, 3)`` uint8 crops resized to ``side`` (unchanged when ``c == side``)."""
    if crops.shape[1] == side:
        return crops
    x = resize_batch(to_tensor(crops), side)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class GrlArm(BaselineArm):
    """Gradient reversal on magnification (DANN): a domain head behind a GRL, loss ``L_y + L_d``.

    Parameters
    ----------
    n_domains
        Training magnifications of the fold (at least 2).
    hidden
        Width of the domain head's hidden layers (1024 in DANN).
    lr_mult
        Learning-rate multiplier of the domain head.
    seed
        Seed of the domain head's initial weights.
    schedule
        λ as a function of progress in (0, 1] (default: DANN's, scaled by ``weight``).
    weight
        Scale of the default schedule (``--grl-weight``).
    """

    name = "grl"

    def __init__(
        self,
        n_domains: int,
        *,
        hidden: int = 1024,
        lr_mult: float = 10.0,
        seed: int = 0,
        weight: float = 1.0,
        schedule: Callable[[float], float] | None = None,
    ) -> None:
        if n_domains < 2:
            raise InvalidParameterError(
                f"the grl arm needs at least 2 training magnifications, this fold has {n_domains}"
            )
        self.n_domains = n_domains
        self.hidden = hidden
        self.lr_mult = lr_mult
        self.seed = seed
        self.schedule = schedule or (lambda p: dann_lambda(p, weight=weight))

    def head(self, in_features: int) -> nn.Module:
        """A seeded :class:`DomainHead` (its GRL starts at λ = 0)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 7919)
            return DomainHead(in_features, self.n_domains, hidden=self.hidden)

    def head_lr_mult(self) -> float:
        """The domain head learns at ``lr_mult`` times the base rate."""
        return self.lr_mult

    def before_step(self, model: nn.Module, progress: float) -> dict[str, float]:
        """Set λ = schedule(progress) on the domain head before the step's forward pass."""
        head = _head(model)
        head.lambd = float(self.schedule(progress))
        return {"lambda": head.lambd}

    def extra_loss(
        self, model: nn.Module, features: torch.Tensor, domains: torch.Tensor
    ) -> torch.Tensor | None:
        """Cross-entropy of the domain head on the real images (domain index >= 0)."""
        keep = domains >= 0
        if not bool(keep.any()):
            return None
        return F.cross_entropy(_head(model)(features[keep]), domains[keep])


def _head(model: nn.Module) -> DomainHead:
    head = getattr(model, "aux", None)
    if not isinstance(head, DomainHead):
        raise InvalidParameterError("the grl arm's model has no domain head (build it with the arm's head())")
    return head
