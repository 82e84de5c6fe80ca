"""Benchmark ``wsienc train-encoder``: training images/s of the real data pipeline vs in-memory tensors.

Both run in this process, with the same model, batch size, optimiser and device:

* baseline: forward + backward + AdamW step of the multitask model on float tensors already in
  memory (no decoding, no augmentation, no sampling);
* pipeline: :func:`wsi_encoder.training.multitask.train_multitask` on three datasets in their real
  on-disk layouts: the real BreaKHis PNGs from ``../shared/data/histo_real`` (decoded into memory by
  the trainer's cache, as a small dataset would be), a Kather NCT-CRC-HE-100K-layout folder of 224-px TIFFs at 0.5 µm/px (decoded
  from disk every time) and PCam-layout HDF5 files (read lazily with h5py), with task-balanced
  sampling, DataLoader workers, geometric and HED colour augmentation and
  per-task losses. Steps after the warm-up are timed through the progress callback, so validation
  and checkpoint writing are not counted.

The ratio pipeline / baseline says whether the data pipeline keeps the model fed (target ≥ 0.8).
Each side runs ``--repeats`` times, interleaved; the best of each is kept (the machine is shared).

``--workers`` defaults to the trainer's choice (one per spare core, at most 4). On a CPU machine whose
cores are all busy with other jobs, ``--workers 0`` (loading in the training process) can beat a worker
process that has no free core to run on; with a GPU, raise ``--workers``.

Run: ``.venv/bin/python benchmarks/bench_train.py [--backbone nic] [--batch-size 32] [--steps 12]
[--workers N] [--threads 1]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _train_fixtures import make_kather, make_pcam  # noqa: E402

from wsi_encoder.models.encoders import create_encoder  # noqa: E402
from wsi_encoder.models.heads import MultiTaskModel  # noqa: E402
from wsi_encoder.pipelines.train_encoder import prepare_tasks  # noqa: E402
from wsi_encoder.training.multitask import StepInfo, TrainConfig, train_multitask  # noqa: E402

BREAKHIS = ROOT.parent / "shared" / "data" / "histo_real"


def baseline(cfg: TrainConfig, num_classes: dict[str, int], steps: int, warmup: int) -> float:
    """Images/s of forward + backward + step on in-memory tensors."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    enc = create_encoder(cfg.backbone, embed_dim=cfg.embed_dim, input_size=cfg.input_size, seed=cfg.seed)
    model = MultiTaskModel(enc, num_classes).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    size = enc.config.input_size
    x = torch.rand(cfg.batch_size, 3, size, size, device=device)
    tasks = torch.arange(cfg.batch_size, device=device) % len(num_classes)
    labels = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = model(x, tasks, labels)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def loader_only(prepared: list, cfg: TrainConfig, steps: int) -> float:
    """Images/s of the data pipeline alone (DataLoader with the same workers, no model): its headroom."""
    from torch.utils.data import DataLoader

    from wsi_encoder.training.task_sampling import (
        MultiTaskImages,
        PlanBatchSampler,
        TaskBalancedPlan,
        collate,
        worker_init,
    )

    plan = TaskBalancedPlan(tuple(len(p.split.train) for p in prepared), cfg.batch_size, cfg.seed)
    dataset = MultiTaskImages([p.train for p in prepared], cfg.input_size or 128, 0.5, cfg.augment)
    loader = DataLoader(
        dataset,
        batch_sampler=PlanBatchSampler(plan, 0, steps + 1),
        num_workers=cfg.num_workers,
        collate_fn=collate,
        worker_init_fn=worker_init,
    )
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(batch[0]) for batch in it)
    return n / (time.perf_counter() - t0)


def pipeline(prepared: list, cfg: TrainConfig, out: Path, warmup: int) -> float:
    """Images/s of the real training loop, steps ``warmup+1 .. end``."""
    stamps: list[tuple[int, float]] = []

    def on_step(info: StepInfo) -> None:
        stamps.append((info.step, time.perf_counter()))

    train_multitask(prepared, out, cfg, resume=False, on_step=on_step)
    (s0, t0), (s1, t1) = stamps[warmup - 1], stamps[-1]
    return (s1 - s0) * cfg.batch_size / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="nic")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the trainer's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--kather-per-class", type=int, default=40)
    ap.add_argument(
        "--cache-mb",
        type=int,
        default=64,
        help="decoded-image cache: 64 MB holds the small BreaKHis set; Kather and PCam stay on disk",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp_name:
        tmp = Path(tmp_name)
        kather = make_kather(tmp / "NCT-CRC-HE-100K", n_per_class=args.kather_per_class, size=224)
        pcam = make_pcam(tmp / "pcam", {"train": 512, "valid": 64}, meta=True)
        requests = [f"kather-crc={kather}", f"pcam={pcam}"]
        if BREAKHIS.is_dir():
            requests += [f"breakhis-malignancy={BREAKHIS / 'breakhis'}", f"breakhis-malignancy={BREAKHIS / 'breakhis_more'}"]
        else:
            print(f"(real BreaKHis images not found at {BREAKHIS}; benchmarking the generated layouts only)")
        total = args.warmup + args.steps
        cfg = TrainConfig(
            backbone=args.backbone,
            max_steps=total,
            steps_per_epoch=total,
            batch_size=args.batch_size,
            workers=args.workers,
            val_max_images=32,
            checkpoint_every=0,
            cache_mb=args.cache_mb,
        )
        prepared = prepare_tasks(requests, val_fraction=cfg.val_fraction, seed=cfg.seed)
        for p in prepared:  # the trainer's cache, as train_multitask applies it
            if p.name.startswith("breakhis"):
                p.data.preload(args.cache_mb * 2**20)
        num_classes = {p.name: len(p.data.classes) for p in prepared}
        sizes = ", ".join(f"{p.name} {len(p.split.train)}" for p in prepared)
        print(f"backbone {args.backbone}, batch {args.batch_size}, {cfg.num_workers} workers, {args.threads} threads")
        print(f"training images per task: {sizes}")
        base, pipe, data = [], [], []
        for r in range(args.repeats):
            base.append(baseline(cfg, num_classes, args.steps, args.warmup))
            pipe.append(pipeline(prepared, cfg, tmp / f"out{r}", args.warmup))
            data.append(loader_only(prepared, cfg, args.steps))
            print(
                f"  run {r + 1}: in-memory {base[-1]:.1f} img/s, pipeline {pipe[-1]:.1f} img/s, "
                f"data loading alone {data[-1]:.1f} img/s"
            )
        ratios = np.array(pipe) / np.array(base)
        print(f"in-memory forward+backward: best {max(base):.1f} img/s")
        print(f"real data pipeline training: best {max(pipe):.1f} img/s")
        print(f"data pipeline alone (no model): best {max(data):.1f} img/s")
        print(f"ratio pipeline / in-memory, best of each: {max(pipe) / max(base):.2f}")
        print(
            f"ratio pipeline / in-memory, median of paired runs: {np.median(ratios):.2f} "
            f"(runs {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.8)"
        )


if __name__ == "__main__":
    main()
