"""Benchmark ``wsienc lomo``: training images/s of each arm vs a bare training loop, and DCGAN images/s.

All in this process, with the same model, batch size, optimiser and device:

* baseline: forward + backward + Adam step of the LOMO classifier (encoder + label head) on float
  tensors already in memory (no cache reads, no augmentation, no validation);
* arms: :func:`wsi_encoder.training.lomo_trainer.train_classifier` with the strategies of
  :mod:`wsi_encoder.training.lomo_arms`: ``baseline``, ``grl`` (domain head behind the GRL) and ``gan``
  (as many synthetic images as real ones added on top of each batch, upsampled on the fly), reading
  the decoded-image memmap, augmenting, and validating on 10 % extra images after every epoch. Rates
  count every image that goes through the network (real and synthetic);
* DataLoader: the baseline arm again with ``--workers`` DataLoader processes (default 0, 1, 2;
  :mod:`wsi_encoder.training.lomo_loader`), each reading the memmap ahead of the step; images/s per count;
* DCGAN: :func:`wsi_encoder.training.gan_trainer.train_dcgan` vs a bare loop of the same G/D steps
  on tensors in memory.

The ratios arm / baseline say how much the data path, augmentation and validation cost (target
≥ 0.8). The images/s also give the time of a full run: the script prints the estimated time per arm
for the public BreaKHis (7,909 images) with the given settings, from the measured rates (see
``docs/lomo.md``).

Run: ``.venv/bin/python benchmarks/bench_lomo.py [--backbone resnet18] [--image-size 224] [--images 96]
[--batch-size 32] [--gan-width 64] [--repeats 2] [--workers 0,1,2] [--device auto]``. ``--quick`` (64 px,
32 images, batch 8, 1 repeat, 32 DCGAN images) only checks that the script runs; its figures mean nothing.
On CUDA the trainer's bf16 autocast and pinned memory are in the timed path.

Timed runs include each arm's validation pass after the epoch, so the arm rates are slightly pessimistic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_encoder.devices import resolve_device
from wsi_encoder.models.dcgan import Discriminator, Generator
from wsi_encoder.models.encoders import create_encoder
from wsi_encoder.training.gan_trainer import DcganSpec, train_dcgan
from wsi_encoder.training.lomo_arms import BaselineArm, GanArm, GrlArm
from wsi_encoder.training.lomo_trainer import (
    TrainData,
    TrainSpec,
    build_classifier,
    embed,
    shared_state,
    train_classifier,
)

BREAKHIS_IMAGES = 7909


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_classifier_rate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, device: torch.device
) -> float:
    """Images/s of forward + backward + Adam on in-memory tensors already on ``device``."""
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    start = time.perf_counter()
    for s in range(steps):
        sel = slice((s * batch) % len(x), (s * batch) % len(x) + batch)
        _, logit = model(x[sel])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def bare_dcgan_rate(images: torch.Tensor, width: int, steps: int, batch: int) -> float:
    """Images/s of the DCGAN D and G steps on in-memory tensors."""
    gen, disc = Generator(width=width), Discriminator(width=width)
    og = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    for s in range(steps):
        real = images[(s * batch) % len(images) :][:batch]
        fake = gen(torch.randn(len(real), 100))
        od.zero_grad()
        (bce(disc(real), torch.ones(len(real))) + bce(disc(fake.detach()), torch.zeros(len(real)))).backward()
        od.step()
        og.zero_grad()
        bce(disc(fake), torch.ones(len(real))).backward()
        og.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=128, help="training images per timed run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gan-width", type=int, default=64)
    parser.add_argument("--gan-images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10, help="for the full-run estimate")
    parser.add_argument("--gan-epochs", type=int, default=100, help="for the full-run estimate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts to time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.images, args.batch_size, args.repeats, args.gan_images = 64, 32, 8, 1, 32
    device = resolve_device(args.device)
    worker_counts = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(args.threads)
    size, n, batch = args.image_size, args.images, args.batch_size
    rng = np.random.default_rng(0)
    n_val = max(2, n // 10)
    pixels = rng.integers(0, 256, size=(n + n_val, size, size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.npy"
        np.save(path, pixels)
        cache = np.load(path, mmap_mode="r")
        y = np.arange(n + n_val) % 2
        rows = np.arange(n + n_val, dtype=np.int64)
        enc = create_encoder(args.backbone, input_size=size)
        init = shared_state(enc, 0)
        x = (torch.from_numpy(pixels[:n]).permute(0, 3, 1, 2).float() / 255).to(device)
        yt = torch.from_numpy(y[:n]).float().to(device)
        bare_classifier_rate(build_classifier(enc, init), x, yt, 1, batch, device)  # warm-up
        bare, rates = 0.0, dict.fromkeys(("baseline", "grl", "gan"), 0.0)
        loader_rates = dict.fromkeys(worker_counts, 0.0)
        for _ in range(args.repeats):  # interleaved, best of each (the machine is shared)
            bare = max(bare, bare_classifier_rate(build_classifier(enc, init), x, yt, n // batch, batch, device))
            for arm in rates:
                data = TrainData(cache, rows[:n], y[:n], rows[:n] % 3, rows[n:], y[n:])
                strategy = BaselineArm()
                if arm == "gan":
                    synthetic = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
                    strategy = GanArm(synthetic, np.arange(n) % 2, 1.0)
                elif arm == "grl":
                    strategy = GrlArm(3)
                model = build_classifier(create_encoder(args.backbone, input_size=size), init, strategy)
                start = time.perf_counter()
                result = train_classifier(model, data, TrainSpec(epochs=1, batch_size=batch), strategy, seed=0,
                                          device=device)
                _sync(device)
                seen = sum(result.real_seen) + sum(result.extra_seen)
                rates[arm] = max(rates[arm], seen / (time.perf_counter() - start))
            for w in worker_counts:
                data = TrainData(cache, rows[:n], y[:n], rows[:n] % 3, rows[n:], y[n:])
                model = build_classifier(create_encoder(args.backbone, input_size=size), init, BaselineArm())
                start = time.perf_counter()
                result = train_classifier(model, data, TrainSpec(epochs=1, batch_size=batch, workers=w),
                                          BaselineArm(), seed=0, device=device)
                _sync(device)
                loader_rates[w] = max(loader_rates[w], sum(result.real_seen) / (time.perf_counter() - start))
        start = time.perf_counter()
        embed(model, cache, rows, batch_size=batch, device=device)
        _sync(device)
        infer = len(rows) / (time.perf_counter() - start)
        del cache
    print(f"{args.backbone} @ {size} px, batch {batch}, {args.threads} threads, device {device}")
    print(f"  bare loop (in-memory tensors)   {bare:8.1f} images/s")
    for arm, rate in rates.items():
        print(f"  train_classifier {arm:<9}      {rate:8.1f} images/s   ratio {rate / bare:.2f}")
    for w, rate in loader_rates.items():
        print(f"  baseline, DataLoader workers {w}  {rate:8.1f} images/s   ratio {rate / bare:.2f}")
    print(f"  embedding (inference)           {infer:8.1f} images/s")

    gan_images = rng.integers(0, 256, size=(args.gan_images, 64, 64, 3), dtype=np.uint8)
    gan_batch = min(128, args.gan_images)
    t_bare = bare_dcgan_rate(
        torch.from_numpy(gan_images).permute(0, 3, 1, 2).float() / 127.5 - 1,
        args.gan_width,
        max(1, args.gan_images // gan_batch),
        gan_batch,
    )
    start = time.perf_counter()
    train_dcgan(gan_images, DcganSpec(epochs=1, batch_size=gan_batch, width=args.gan_width), seed=0)
    t_gan = args.gan_images / (time.perf_counter() - start)
    print(
        f"DCGAN width {args.gan_width}: bare {t_bare:.1f} images/s, train_dcgan {t_gan:.1f} images/s, "
        f"ratio {t_gan / t_bare:.2f}"
    )

    # Full BreaKHis, --test-fraction 0.3, --val-fraction 0.2: per fold ~ 0.7*0.8*3/4 of the images fit,
    # 0.7*0.2*3/4 validate (every epoch), all training-side and test images are embedded once.
    fit = BREAKHIS_IMAGES * 0.7 * 0.8 * 0.75
    val = BREAKHIS_IMAGES * 0.7 * 0.2 * 0.75
    test = BREAKHIS_IMAGES * 0.3 * 0.25
    infer_images = args.epochs * val + fit + val + test
    print(f"estimated full BreaKHis run ({args.epochs} epochs, 4 folds), this machine:")
    for arm, rate in rates.items():
        per_epoch = fit * (2 if arm == "gan" else 1)  # --gan-ratio 1: synthetic images on top of the real
        seconds = 4 * (args.epochs * per_epoch / rate + infer_images / infer)
        if arm == "gan":
            seconds += 4 * args.gan_epochs * fit / t_gan
        print(f"  {arm:<9} {seconds / 3600:6.1f} h")
    print("  (+ decoding the 7,909 PNGs once into the cache)")


if __name__ == "__main__":
    main()
