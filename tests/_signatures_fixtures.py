"""Generated inputs for the signature tests: `wsienc lomo`-style folders and small embedding stores.

Embeddings are Gaussian noise with a per-patient offset (images of one patient are correlated, as in
real data); the label shifts the mean of the ``informative`` dimensions by ``±effect``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr

Informative = Sequence[int] | Callable[[str, int], Sequence[int]]


def patient_embeddings(
    rng: np.random.Generator,
    n_patients: int,
    per_patient: int,
    dim: int,
    informative: Sequence[int],
    effect: float = 0.6,
    patient_sd: float = 0.3,
    prefix: str = "p",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X (n, dim) float32, y (n,) int64, patient (n,) str)``, half the patients of each class."""
    patient_class = rng.permutation(np.arange(n_patients) % 2)
    pat = np.repeat(np.arange(n_patients), per_patient)
    y = patient_class[pat].astype(np.int64)
    x = rng.normal(size=(len(y), dim)) + patient_sd * rng.normal(size=(n_patients, dim))[pat]
    idx = np.asarray(list(informative), dtype=int)
    if idx.size:
        x[:, idx] += effect * (2 * y[:, None] - 1)
    patients = np.array([f"{prefix}{i:03d}" for i in pat])
    return x.astype(np.float32), y, patients


def write_lomo_folder(
    root: Path,
    *,
    arms: Sequence[str] = ("baseline", "grl"),
    held_out: Sequence[int] = (40, 100, 200, 400),
    dim: int = 48,
    informative: Informative = (1, 5, 9, 13, 17),
    effect: float = 0.7,
    n_train_patients: int = 40,
    n_test_patients: int = 12,
    per_patient: int = 4,
    shared_init: bool | None = True,
    single_class: bool = False,
    seed: int = 0,
    val_share: float = 0.5,
    seed_null: Informative | None = None,
    splits: bool = True,
) -> Path:
    """A folder laid out like `wsienc lomo` output: ``config.json``, ``splits.csv`` + ``embeddings/<arm>/heldout_<m>.npz``.

    ``informative`` is a list of dimensions, or ``f(arm, held_out) -> dims`` to make them differ per fold.
    ``shared_init=None`` leaves the key out of config.json. ``single_class`` makes every label 0.
    ``val_share`` of each class's training patients get role ``val`` in ``splits.csv`` (the others ``train``;
    ``splits=False`` writes no splits.csv). ``seed_null`` adds a second-seed encoder's embeddings
    (``seed_null/embeddings/...``: the same images, labels and patients) whose class signal lies in those
    dimensions (a list, or ``f(arm, held_out)``); ``"same"`` copies the first seed's embeddings exactly.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    config: dict[str, object] = {
        "arms": list(arms),
        "held_out": list(held_out),
        "classes": ["benign", "malignant"],
        "backbone": "generated",
        "embedding_dim": dim,
        "seed": seed,
    }
    if shared_init is not None:
        config["shared_init"] = shared_init
    (root / "config.json").write_text(json.dumps(config))
    split_rows: dict[int, list[tuple[object, ...]]] = {}
    for arm in arms:
        for m in held_out:
            dims = informative(arm, m) if callable(informative) else informative
            x_tr, y_tr, p_tr = patient_embeddings(rng, n_train_patients, per_patient, dim, dims, effect, prefix="tr")
            x_te, y_te, p_te = patient_embeddings(rng, n_test_patients, max(1, per_patient - 1), dim, dims, effect, prefix="te")
            if single_class:
                y_tr[:] = 0
                y_te[:] = 0
            others = [v for v in (40, 100, 200, 400) if v != m]
            arrays = {
                "X_train": x_tr,
                "y_train": y_tr,
                "patient_train": p_tr,
                "magnification_train": np.array([others[i % 3] for i in range(len(y_tr))], dtype=np.int64),
                "filename_train": np.array([f"tr_{i}.png" for i in range(len(y_tr))]),
                "X_test": x_te,
                "y_test": y_te,
                "patient_test": p_te,
                "magnification_test": np.full(len(y_te), m, dtype=np.int64),
                "filename_test": np.array([f"te_{i}.png" for i in range(len(y_te))]),
                "prob_test": (1 / (1 + np.exp(-x_te[:, list(dims)].sum(axis=1) if len(dims) else 0 * x_te[:, 0]))).astype(
                    np.float32
                ),
            }
            out = root / "embeddings" / arm / f"heldout_{m}.npz"
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(out, **arrays)
            split_rows[m] = _split_rows(arrays, m, val_share)
            if seed_null is not None:
                second = dict(arrays)
                if seed_null != "same":
                    dims2 = seed_null(arm, m) if callable(seed_null) else seed_null
                    x2 = rng.normal(size=x_tr.shape)
                    x2[:, list(dims2)] += effect * (2 * y_tr[:, None] - 1)
                    second["X_train"] = x2.astype(np.float32)
                path = root / "seed_null" / "embeddings" / arm / f"heldout_{m}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **second)
    if splits:
        with (root / "splits.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["filename", "patient_id", "class", "magnification", "fold", "role"])
            for rows in split_rows.values():
                writer.writerows(rows)
    return root


def _split_rows(arrays: dict[str, np.ndarray], held_out: int, val_share: float) -> list[tuple[object, ...]]:
    """``splits.csv`` rows of one fold: ``val_share`` of each class's training patients are ``val``, the rest ``train``."""
    y, patients = arrays["y_train"], arrays["patient_train"]
    val: set[str] = set()
    for c in (0, 1):
        members = sorted(set(patients[y == c].tolist()))
        val |= set(members[: round(val_share * len(members))])
    classes = ("benign", "malignant")
    rows: list[tuple[object, ...]] = [
        (name, p, classes[int(c)], int(mag), held_out, "val" if p in val else "train")
        for name, p, c, mag in zip(arrays["filename_train"], patients, y, arrays["magnification_train"], strict=True)
    ]
    rows += [
        (name, p, classes[int(c)], held_out, held_out, "test")
        for name, p, c in zip(arrays["filename_test"], arrays["patient_test"], arrays["y_test"], strict=True)
    ]
    return rows


def write_embedding_store(
    root: Path,
    *,
    n_patients: int = 48,
    slides_per_patient: int = 2,
    tiles: int = 6,
    dim: int = 40,
    informative: Sequence[int] = (2, 7, 11, 15, 18),
    effect: float = 1.0,
    labels: tuple[str, str] = ("normal", "lesion"),
    incomplete: Sequence[str] = (),
    seed: int = 0,
) -> tuple[Path, Path]:
    """An embedding store (zarr v3, the project's contract) and its ``labels.csv``; returns both paths.

    Each slide has ``tiles`` tile features whose mean carries the class signal in ``informative``.
    Slide ids are ``s<patient>_<k>``; ``incomplete`` slide ids get ``complete: false``.
    """
    rng = np.random.default_rng(seed)
    store = root / "embeddings.zarr"
    group = zarr.open_group(str(store), mode="w")
    patient_class = rng.permutation(np.arange(n_patients) % 2)
    status = {}
    rows = []
    for p in range(n_patients):
        offset = 0.3 * rng.normal(size=dim)
        for k in range(slides_per_patient):
            sid = f"s{p:03d}_{k}"
            c = int(patient_class[p])
            feats = rng.normal(size=(tiles, dim)) * 1.5 + offset
            feats[:, list(informative)] += effect * (2 * c - 1)
            g = group.create_group(sid)
            g.create_array("features", data=feats.astype(np.float16), chunks=(4, dim))
            g.create_array("coords", data=np.stack([np.arange(tiles) * 224, np.zeros(tiles)], axis=1).astype(np.int64))
            g.attrs.update(
                {
                    "encoder": {"name": "generated", "config": {}, "weights_sha256": "0" * 64},
                    "embedding_dim": dim,
                    "complete": sid not in incomplete,
                }
            )
            status[sid] = {"status": "ok", "reason": None, "source": f"/slides/{sid}.svs"}
            rows.append((sid, labels[c], f"patient{p:03d}"))
    group.attrs.update({"kind": "embedding_store", "slides": status})
    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label", "patient_id"])
        writer.writerows(rows)
    return store, labels_csv
