"""Train DCGANs (Radford et al. 2016 recipe) and sample synthetic images from them.

The recipe: Adam with lr 2e-4 and β1 = 0.5, mini-batches of 128, the non-saturating generator loss,
real images scaled to [-1, 1]. Training images get random flips and 90° rotations (which leave the
class and scale unchanged) so that small classes do not collapse at once.

The DCGAN's output is 64×64, so it learns *crops*: each time an image is drawn, a fresh random
64×64 crop of the classifier-size image (the pixels the classifier sees, at its input scale), so the
synthetic crops have the real images' scale and are never upsampled thumbnails of whole images.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.io.files import atomic_write_json
from wsi_encoder.models.dcgan import IMAGE_SIZE, Discriminator, Generator
from wsi_encoder.models.weights_folder import load_folder_weights, read_folder_config, save_weights_folder
from wsi_encoder.training.lomo_data import augment, resize_batch, to_tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DcganSpec:
    """DCGAN training settings (defaults: Radford et al. 2016).

    Attributes
    ----------
    epochs : int
        Passes over the training images.
    batch_size : int
        Mini-batch size (capped at the number of images).
    lr : float
        Adam learning rate of both networks.
    beta1 : float
        Adam β1.
    nz : int
        Size of the latent vector.
    width : int
        Base number of filters (64 in the paper); smaller is faster and weaker.
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-4
    beta1: float = 0.5
    nz: int = 100
    width: int = 64

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.width < 1 or self.nz < 1 or self.lr <= 0:
            raise InvalidParameterError(
                f"bad DCGAN settings {self!r}: epochs, batch, width, nz and lr must be positive"
            )


def train_dcgan(
    images: npt.NDArray[np.uint8],
    spec: DcganSpec,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> Generator:
    """Train one DCGAN on ``images`` and return its generator (eval mode, on the CPU).

    Parameters
    ----------
    images
        ``(N, S, S, 3)`` uint8 training images (N ≥ 1). Each draw of an image is a random crop of
        side ``min(S, 64)`` (resized to 64 only when ``S < 64``); ``S = 64`` trains on whole images.
    spec
        Training settings.
    seed
        Seed of the initialisation, batch order, augmentation and noise.
    device
        Torch device to train on.
    on_epoch
        Called as ``on_epoch(epoch, epochs, {"loss_d": ..., "loss_g": ...})`` after each epoch.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3 or len(images) == 0:
        raise InvalidParameterError(f"DCGAN training images must be (N >= 1, S, S, 3) uint8, got {images.shape}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = Generator(spec.nz, spec.width).to(device)
        disc = Discriminator(spec.width).to(device)
    cpu_rng = torch.Generator().manual_seed(seed)
    dev_rng = torch.Generator(device=device).manual_seed(seed + 1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=spec.lr, betas=(spec.beta1, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=spec.lr, betas=(spec.beta1, 0.999))
    bce = nn.BCEWithLogitsLoss()
    n = len(images)
    batch = min(spec.batch_size, n)
    steps = math.ceil(n / batch)
    gen.train()
    disc.train()
    for epoch in range(spec.epochs):
        order = torch.randperm(n, generator=cpu_rng).numpy()
        sums = {"loss_d": 0.0, "loss_g": 0.0}
        for s in range(steps):
            idx = np.sort(order[s * batch : (s + 1) * batch])
            real = augment(random_crops(to_tensor(images[idx], device), cpu_rng), cpu_rng) * 2.0 - 1.0
            b = real.shape[0]
            z = torch.randn(b, spec.nz, device=device, generator=dev_rng)
            fake = gen(z)
            ones = torch.ones(b, device=device)
            zeros = torch.zeros(b, device=device)
            opt_d.zero_grad(set_to_none=True)
            loss_d = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            loss_g = bce(disc(fake), ones)
            loss_g.backward()
            opt_g.step()
            sums["loss_d"] += float(loss_d.detach())
            sums["loss_g"] += float(loss_g.detach())
        stats = {k: v / steps for k, v in sums.items()}
        logger.debug("DCGAN epoch %d/%d: %s", epoch + 1, spec.epochs, stats)
        if on_epoch is not None:
            on_epoch(epoch + 1, spec.epochs, stats)
    return gen.cpu().eval()


def random_crops(x: torch.Tensor, generator: torch.Generator, side: int = IMAGE_SIZE) -> torch.Tensor:
    """One random ``min(S, side)`` crop per image of a ``(B, C, S, S)`` batch, resized to ``side`` if smaller.

    Offsets are drawn from ``generator``; with ``S == side`` the batch is returned unchanged.
    """
    size = x.shape[-1]
    if size == side:
        return x
    c = min(size, side)
    offs = torch.randint(0, size - c + 1, (x.shape[0], 2), generator=generator).tolist()
    crops = torch.stack([x[i, :, r : r + c, q : q + c] for i, (r, q) in enumerate(offs)])
    return resize_batch(crops, side)


@torch.no_grad()
def generate(
    generator: Generator, n: int, *, seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 256
) -> npt.NDArray[np.uint8]:
    """``n`` images ``(n, 64, 64, 3)`` uint8 from a trained generator (seeded noise, eval mode)."""
    device = torch.device(device)
    generator = generator.to(device).eval()
    rng = torch.Generator(device=device).manual_seed(seed)
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn(b, generator.nz, device=device, generator=rng)
        img = (generator(z).clamp(-1, 1) + 1.0) * 127.5
        out[start : start + b] = img.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    generator.cpu()
    return out


GENERATOR_FORMAT = "wsi_encoder.dcgan_generator/1"
GENERATOR_CONFIG = "config.json"


def save_generator(folder: str | Path, generator: Generator, metadata: dict[str, Any]) -> None:
    """Write the generator as a weights folder: ``model.safetensors``, then ``config.json`` (nz, width, ``metadata``)."""
    config = {"format": GENERATOR_FORMAT, "nz": generator.nz, "width": generator.width, "info": metadata}
    save_weights_folder(folder, generator.state_dict(), config, config_name=GENERATOR_CONFIG)


def load_generator(path: str | Path) -> tuple[Generator, dict[str, Any]]:
    """Read a generator written by :func:`save_generator`; returns it (eval mode) and its metadata.

    ``path`` is the generator's folder, or a single ``<class>.safetensors`` file as wsienc wrote them
    before generators were weights folders (settings in the safetensors header).

    Raises
    ------
    CheckpointError
        One line naming the file: missing, changed since it was written, or not a DCGAN generator.
    """
    path = Path(path)
    if path.is_file():
        return _load_generator_file(path)
    config = read_folder_config(path, GENERATOR_CONFIG, hint="delete it to retrain the DCGAN")
    if config.get("format") != GENERATOR_FORMAT:
        raise CheckpointError(f"{path / GENERATOR_CONFIG}: not a DCGAN generator config; delete the folder to retrain")
    state = load_folder_weights(path, config, config_name=GENERATOR_CONFIG, hint="delete the folder to retrain")
    try:
        gen = Generator(int(config["nz"]), int(config["width"]))
        gen.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit a DCGAN generator ({exc}); delete the folder to retrain") from exc
    info = config.get("info")
    return gen.eval(), dict(info) if isinstance(info, dict) else {}


def _load_generator_file(path: Path) -> tuple[Generator, dict[str, Any]]:
    """A generator in the single-file layout of earlier versions (settings in the safetensors metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        gen = Generator(int(meta["nz"]), int(meta["width"]))
        gen.load_state_dict(load_file(str(path)))
        info = json.loads(meta.get("info", "{}"))
    except Exception as exc:  # any decoding failure (SafetensorError, missing keys, shapes) is a bad file
        raise CheckpointError(f"{path}: not a DCGAN generator file ({exc}); delete it to retrain") from exc
    return gen.eval(), info if isinstance(info, dict) else {}


def spec_dict(spec: DcganSpec) -> dict[str, Any]:
    """The spec as a JSON-serialisable dict."""
    return asdict(spec)


@dataclass
class FoldSynthetic:
    """The synthetic images of one fold and what a person should look at to judge them.

    ``images``/``labels`` are ``(M, 64, 64, 3)`` uint8 crops (at the classifier's input scale) and
    ``(M,)`` class indices; ``real_grid``/``fake_grid`` hold a few real and generated crops per class; ``notes`` say how
    many images and steps each class's DCGAN had.
    """

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    real_grid: dict[str, npt.NDArray[np.uint8]]
    fake_grid: dict[str, npt.NDArray[np.uint8]]
    notes: list[str]


def sample_crops(
    images: npt.NDArray[np.uint8], n: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> npt.NDArray[np.uint8]:
    """``n`` random 64-px crops (as :func:`random_crops`) of the first ``n`` of ``images``, as uint8."""
    x = random_crops(to_tensor(images[:n], device), torch.Generator().manual_seed(seed))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


#: What the DCGANs are trained on (a generator trained on another input is not reused).
GAN_INPUT = "random 64-px crops at the classifier's input scale"


def fold_synthetic_images(
    class_images: dict[str, tuple[npt.NDArray[np.uint8], list[str]]],
    classes: tuple[str, ...],
    gan_dir: str | Path,
    spec: DcganSpec,
    ratio: float,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> FoldSynthetic:
    """One DCGAN per class trained on crops of that class's training images of a fold; ``round(ratio · n)`` crops each.

    Parameters
    ----------
    class_images
        ``{class: (images (n, S, S, 3) uint8, file names)}``: the fold's *training-role* images only.
    classes
        All class names, in label-index order.
    gan_dir
        Where the generators (weights folders ``<class>/``) and ``trained_on.json`` (the exact files
        each DCGAN saw, and the settings) are kept; a generator whose record matches is reused (also a
        ``<class>.safetensors`` file written by an earlier version).
    spec, ratio, seed, device
        DCGAN settings, synthetic images per real image, seed, torch device.
    on_epoch
        Progress: ``on_epoch(class, epoch, epochs, stats)``.
    """
    gan_dir = Path(gan_dir)
    record_path = gan_dir / "trained_on.json"
    record: dict[str, Any] = {}
    if record_path.is_file():
        try:
            loaded = json.loads(record_path.read_text())
        except ValueError as exc:
            loaded = None
            logger.warning("%s: unreadable (%s); its DCGANs are trained again", record_path, exc)
        record = loaded if isinstance(loaded, dict) else {}
    fakes, labels, real_grid, fake_grid, notes = [], [], {}, {}, []
    for c, cls in enumerate(classes):
        if cls not in class_images or len(class_images[cls][1]) == 0:
            continue
        pixels, names = class_images[cls]
        weights = gan_dir / cls
        earlier = gan_dir / f"{cls}.safetensors"  # the single-file layout of earlier versions
        saved = weights if (weights / GENERATOR_CONFIG).is_file() else earlier if earlier.is_file() else None
        gen = None
        current = record.get("spec") == asdict(spec) and record.get("input") == [GAN_INPUT, pixels.shape[1]]
        if saved is not None and record.get(cls) == names and current:
            try:
                gen, _ = load_generator(saved)
            except CheckpointError as exc:
                logger.warning("%s; the DCGAN is trained again", exc)
        if gen is None:
            cb = None if on_epoch is None else (lambda e, n, st, cls=cls: on_epoch(cls, e, n, st))
            gen = train_dcgan(pixels, spec, seed=seed + c, device=device, on_epoch=cb)
            save_generator(weights, gen, {"class": cls, "n_images": len(names), "input": GAN_INPUT})
            record[cls] = names
            record["spec"] = asdict(spec)
            record["input"] = [GAN_INPUT, int(pixels.shape[1])]
            atomic_write_json(record_path, record)
        n = round(ratio * len(names))
        fakes.append(generate(gen, n, seed=seed + 1000 + c, device=device))
        labels.append(np.full(n, c, dtype=np.int64))
        real_grid[cls] = sample_crops(pixels, 8, seed=seed + 3000 + c, device=device)
        fake_grid[cls] = generate(gen, 16, seed=seed + 2000 + c, device=device)
        steps = spec.epochs * math.ceil(len(names) / min(spec.batch_size, len(names)))
        notes.append(f"{cls}: {len(names)} images, {steps} steps")
    if not fakes:
        empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        return FoldSynthetic(empty, np.zeros(0, np.int64), real_grid, fake_grid, notes)
    return FoldSynthetic(np.concatenate(fakes), np.concatenate(labels), real_grid, fake_grid, notes)
