"""Benchmark ``classify train --target survival``: cross-validated fit time on a generated 1,000-slide cohort.

The cohort is built in memory (no store reads are timed): ``--slides`` slides of ``--patients`` patients,
each a ``--grid`` x ``--grid`` grid of tiles with ``--dim``-d standard-normal embeddings; a disk of lesion
tiles whose radius is the patient's latent carries a feature shift, and the patient's death time is
exponential with hazard ``exp(0.15 * lesion tiles / mean)``, censored uniformly (about a quarter censored).
Each requested model (``linear``; ``abmil`` and ``gridcnn`` with ``--loss cox`` or ``nll``) runs
:func:`wsi_encoder.evaluation.survival_cv.cross_validate_survival` (``--folds`` folds, early stopping on
the inner split for the torch models, the inner 5-fold alpha search for linear), timed once per model
(the lead runs benchmarks; one run on a busy machine is a rough figure). Printed: seconds in all, per
fold, per slide and epoch run, and the out-of-fold Harrell C over pairs within a fold (the headline
``c_index``) as a sanity check (it should be well above 0.5).

Run: ``.venv/bin/python benchmarks/bench_survival_fit.py [--slides 1000] [--models linear,abmil:cox,abmil:nll]
[--epochs 20] [--device auto] [--threads 2]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from wsi_encoder.evaluation.survival_cv import cross_validate_survival
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.slide_classifiers import torch_threads


def make_cohort(
    n_slides: int, n_patients: int, grid: int, dim: int, seed: int = 0
) -> tuple[list[SlideBag], np.ndarray, np.ndarray, np.ndarray]:
    """Bags, times, events and patients of the generated cohort (patients own 1 or more slides, one outcome each)."""
    rng = np.random.default_rng(seed)
    patient_of = np.sort(np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, n_slides - n_patients)]))
    radius = rng.uniform(0, grid / 3, n_patients)
    cells = np.argwhere(np.ones((grid, grid), dtype=bool))
    bags, lesion = [], np.zeros(n_patients)
    for i, p in enumerate(patient_of):
        features = rng.normal(0, 1, (len(cells), dim)).astype(np.float32)
        near = np.hypot(*(cells - rng.integers(grid // 4, 3 * grid // 4, 2)).T) <= radius[p]
        features[near, :4] += 2.0
        lesion[p] += near.sum()
        bags.append(SlideBag(f"S{i:05d}", features, cells.astype(np.int64), (grid, grid)))
    lesion /= np.bincount(patient_of, minlength=n_patients)
    death = rng.exponential(10.0 * np.exp(-1.5 * lesion / lesion.mean()))
    censor = rng.uniform(0, np.quantile(death, 0.9) * 1.6, n_patients)
    time_p, event_p = np.minimum(death, censor), death <= censor
    return bags, time_p[patient_of], event_p[patient_of], np.array([f"P{p:05d}" for p in patient_of])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--patients", type=int, default=700)
    parser.add_argument("--grid", type=int, default=16, help="tiles per side of each slide's grid")
    parser.add_argument("--dim", type=int, default=64, help="embedding size")
    parser.add_argument("--models", default="linear,abmil:cox,abmil:nll", help="model[:loss], comma-separated")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="torch models (Cox risk sets are the batch)")
    parser.add_argument("--time-bins", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    t = time.perf_counter()
    bags, time_, event, patients = make_cohort(args.slides, args.patients, args.grid, args.dim)
    print(f"cohort: {len(bags)} slides, {len(set(patients))} patients, {int(event.sum())} events "
          f"({100 * (1 - event.mean()):.0f}% censored), {args.grid}x{args.grid} tiles x {args.dim}-d, "
          f"built in {time.perf_counter() - t:.1f} s")
    print(f"{'model':<14} {'seconds':>8} {'s/fold':>7} {'ms/slide/epoch':>15} {'epochs':>7} {'C (in folds)':>12}")
    for item in args.models.split(","):
        model, _, loss = item.strip().partition(":")
        config = {} if model == "linear" else {"epochs": args.epochs, "batch_size": args.batch_size}
        t = time.perf_counter()
        with torch_threads(args.threads):
            cv = cross_validate_survival(
                bags, time_, event, patients, model, config=config, folds=args.folds, device=args.device, n_boot=0,
                loss=loss or "cox", time_bins=args.time_bins,
            )
        seconds = time.perf_counter() - t
        epochs = [f["fit"].get("epochs_run") or 0 for f in cv.per_fold]
        train = sum(f["n_train"] + f["n_val"] for f in cv.per_fold)
        per = 1000 * seconds / max(1, sum(e * (f["n_train"] + f["n_val"]) for e, f in zip(epochs, cv.per_fold, strict=True)))
        shown = f"{per:15.2f}" if sum(epochs) else f"{'-':>15}"
        print(f"{item:<14} {seconds:8.1f} {seconds / args.folds:7.1f} {shown} {sum(epochs) / args.folds:7.1f} "
              f"{cv.pooled['c_index']:12.3f}   ({train // args.folds} training slides per fold)")


if __name__ == "__main__":
    main()
