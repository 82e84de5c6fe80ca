"""The ``wsienc signatures`` job: sparse signatures of every arm × fold, their Jaccard, the report.

Two kinds of input:

* a ``wsienc lomo`` output folder: ``config.json`` plus ``embeddings/<arm>/heldout_<m>.npz`` (arrays
  ``X_train, y_train, patient_train, ..., X_test, y_test, patient_test, ..., prob_test``); each file
  is one fold (named ``<m>X``), each arm folder one arm;
* an embedding store (zarr v3, ``<slide_id>/features (N, C)``, attrs ``complete``) plus a labels CSV
  (``slide_id,label[,patient_id]``): a slide's vector is the mean of its tile features, and
  ``n_folds`` patient-grouped, class-stratified folds (``StratifiedGroupKFold``) make the folds of a
  single arm named after the store.

Finished folds are cached in ``DIR/.partial/`` with a fingerprint of their inputs and settings, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from wsi_encoder import __version__
from wsi_encoder.errors import DatasetError, InvalidParameterError, StoreError, WsiEncoderError
from wsi_encoder.evaluation.lomo_outputs import load_fold_embeddings
from wsi_encoder.evaluation.metrics import classification_metrics
from wsi_encoder.evaluation.signature_records import (
    JACCARD_COLUMNS,
    SEED_NULL_COLUMNS,
    SIGNATURE_COLUMNS,
    SeedNullRow,
    SignatureRecord,
    arm_jaccards,
    seed_null_rows,
)
from wsi_encoder.evaluation.signature_report import ReportContext, write_report
from wsi_encoder.evaluation.signatures import (
    SignatureSpec,
    bootstrap_signatures,
    evaluate_fold,
    select_signature,
)
from wsi_encoder.evaluation.splits import read_splits_csv
from wsi_encoder.io.breakhis import patient_key
from wsi_encoder.io.embedding_store import EmbeddingStore
from wsi_encoder.io.files import atomic_write_text
from wsi_encoder.io.labels import read_labels
from wsi_encoder.pipelines.lomo_config import SEED_NULL_DIR

logger = logging.getLogger(__name__)

LOMO_KEYS = ("X_train", "y_train", "patient_train", "X_test", "y_test", "patient_test")
#: Which LOMO images select the signature: ``val`` (default) the validation-role patients of ``splits.csv``,
#: whose embeddings the encoder never fitted; ``train`` (sensitivity) every training-side image, the old rule.
SELECT_ON = ("val", "train")
_HELDOUT_RE = re.compile(r"^heldout_(\d+)\.npz$")


@dataclass(frozen=True)
class FoldData:
    """The arrays of one fold: training and test embeddings, labels in {0, 1}, patient ids."""

    x_train: npt.NDArray[np.floating[Any]]
    y_train: npt.NDArray[np.int64]
    patient_train: npt.NDArray[np.str_]
    x_test: npt.NDArray[np.floating[Any]]
    y_test: npt.NDArray[np.int64]
    patient_test: npt.NDArray[np.str_]
    prob_test: npt.NDArray[np.floating[Any]] | None = None
    filename_train: npt.NDArray[np.str_] | None = None


@dataclass(frozen=True)
class FoldJob:
    """One arm × fold to evaluate: how to load it (its selection set as the training side), a fingerprint
    of its input, and how to load the same fold's second-seed encoder's embeddings (None: no seed null)."""

    arm: str
    fold: str
    load: Callable[[], FoldData] = field(compare=False)
    input_id: str = ""
    load_seed: Callable[[], FoldData] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SignatureInputs:
    """What a source holds: its jobs, and what the report must say about the feature basis."""

    kind: str
    source: Path
    jobs: tuple[FoldJob, ...]
    classes: tuple[str, ...]
    basis_note: str
    warnings: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    #: The images that select each fold's signature (:data:`SELECT_ON`; ``train`` for an embedding store).
    select_on: str = "train"


@dataclass(frozen=True)
class SignatureRun:
    """Result of :func:`run_signatures`: the records, the files written and the folds that failed."""

    out_dir: Path
    records: tuple[SignatureRecord, ...]
    failed: Mapping[str, str]
    files: tuple[Path, ...]
    warnings: tuple[str, ...]


# ----------------------------------------------------------------------------- LOMO folders


def _fold_sort_key(name: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", name)
    return (int(digits) if digits else 1 << 30, name)


def _read_lomo_npz(path: Path, roles: Mapping[str, str] | None = None, splits: Path | None = None) -> FoldData:
    """Load and check one ``heldout_<m>.npz`` (no pickles).

    With ``roles`` (file name -> role in this fold, from ``splits``), the training side is cut to the
    validation-role images: the selection set of ``--select-on val``.
    """
    arrays = load_fold_embeddings(path, required=LOMO_KEYS)
    for side in ("train", "test"):
        x, y, g = arrays[f"X_{side}"], arrays[f"y_{side}"], arrays[f"patient_{side}"]
        if x.ndim != 2 or y.shape != (len(x),) or g.shape != (len(x),):
            raise DatasetError(
                f"{path}: X_{side} {x.shape}, y_{side} {y.shape}, patient_{side} {g.shape} do not line up as (n, D), (n,), (n,)"
            )
        if len(x) == 0:
            raise DatasetError(f"{path}: X_{side} is empty")
        if not np.isin(y, (0, 1)).all():
            raise DatasetError(f"{path}: y_{side} holds {np.unique(y).tolist()}; expected class indices 0 and 1")
    if arrays["X_train"].shape[1] != arrays["X_test"].shape[1]:
        raise DatasetError(f"{path}: X_train has {arrays['X_train'].shape[1]} dims, X_test {arrays['X_test'].shape[1]}")
    prob = arrays.get("prob_test")
    if prob is not None:
        prob = np.asarray(prob, dtype=np.float64)
        prob = prob[:, -1] if prob.ndim == 2 else prob
        if prob.shape != (len(arrays["X_test"]),):
            prob = None
    names = arrays.get("filename_train")
    data = FoldData(
        x_train=arrays["X_train"],
        y_train=arrays["y_train"].astype(np.int64),
        patient_train=_patients(arrays, "train"),
        x_test=arrays["X_test"],
        y_test=arrays["y_test"].astype(np.int64),
        patient_test=_patients(arrays, "test"),
        prob_test=prob,
        filename_train=None if names is None else names.astype(str),
    )
    return data if roles is None else _validation_side(data, roles, path, splits)


def _validation_side(data: FoldData, roles: Mapping[str, str], path: Path, splits: Path | None) -> FoldData:
    """``data`` with its training side cut to the images whose role in ``splits.csv`` is ``val``."""
    names = data.filename_train
    if names is None or len(names) != len(data.y_train):
        raise DatasetError(f"{path}: no filename_train array; --select-on val needs it to find the validation images")
    found = [roles.get(str(n)) for n in names]
    bad = [(str(n), r) for n, r in zip(names, found, strict=True) if r not in ("train", "val")]
    if bad:
        raise DatasetError(
            f"{path}: training-side image {bad[0][0]} has role {bad[0][1]!r} in {splits} for this fold "
            "(expected train or val); the npz and splits.csv are from different runs"
        )
    keep = np.array([r == "val" for r in found], dtype=bool)
    classes = np.unique(data.y_train[keep]).tolist()
    if len(classes) < 2:
        raise DatasetError(
            f"{path}: the fold's validation patients in {splits} (the selection set of --select-on val) hold "
            f"{'no image' if not classes else f'class {classes[0]} only'}; use --select-on train, or a run with a "
            "larger --val-fraction"
        )
    return replace(
        data, x_train=data.x_train[keep], y_train=data.y_train[keep], patient_train=data.patient_train[keep],
        filename_train=names[keep],
    )


def _fold_roles(folder: Path) -> dict[int, dict[str, str]]:
    """``held-out magnification -> {file name: role}`` from a LOMO folder's ``splits.csv``."""
    path = folder / "splits.csv"
    if not path.is_file():
        raise DatasetError(
            f"{path}: missing; --select-on val (the default) reads the validation patients from it "
            "(use --select-on train for a folder without splits.csv)"
        )
    out: dict[int, dict[str, str]] = {}
    for row in read_splits_csv(path):
        out.setdefault(int(row["fold"]), {})[str(row["filename"])] = str(row["role"])
    return out


def _patients(arrays: Mapping[str, np.ndarray], side: str) -> npt.NDArray[np.str_]:
    """Patients of one side: the strict BreaKHis patient of each file name when the names are BreaKHis
    names (so the inner CV never splits a case, even for a run made with ``--patient-key token``),
    else the stored ``patient_<side>`` ids."""
    names = arrays.get(f"filename_{side}")
    if names is not None and len(names) == len(arrays[f"patient_{side}"]):
        try:
            return np.array([patient_key(str(n)) for n in names], dtype=str)
        except DatasetError:
            pass
    return arrays[f"patient_{side}"].astype(str)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _lomo_jobs(
    folder: Path, config: Mapping[str, Any], prefix: str = "", arm_suffix: str = "", select_on: str = "val"
) -> tuple[list[FoldJob], list[str]]:
    """Fold jobs of one LOMO folder (arms in config order, then any other arm folder found).

    A fold whose second-seed embeddings exist (``seed_null/embeddings/<arm>/heldout_<m>.npz``) gets a
    ``load_seed``, cut to the same selection set.
    """
    emb_root = folder / "embeddings"
    has_files = emb_root.is_dir() and any(emb_root.glob("*/heldout_*.npz"))
    roles = _fold_roles(folder) if select_on == "val" and has_files else None
    listed_arms = [str(a) for a in config.get("arms", [])]
    found_arms = sorted(p.name for p in emb_root.iterdir() if p.is_dir()) if emb_root.is_dir() else []
    held_out = [int(m) for m in config.get("held_out", [])]
    jobs: list[FoldJob] = []
    notes: list[str] = []
    for arm in listed_arms + [a for a in found_arms if a not in listed_arms]:
        arm_dir = emb_root / arm
        files: dict[int, Path] = {}
        for p in arm_dir.iterdir() if arm_dir.is_dir() else []:
            match = _HELDOUT_RE.match(p.name)
            if match:
                files[int(match.group(1))] = p
        for mag in held_out:
            if mag not in files:
                notes.append(f"arm {arm!r}: {arm_dir / f'heldout_{mag}.npz'} is missing; that fold is left out")
        for mag in [m for m in held_out if m in files] + sorted(m for m in files if m not in held_out):
            path = files[mag]
            fold_roles = None if roles is None else roles.get(mag, {})
            load = functools.partial(_read_lomo_npz, path, fold_roles, folder / "splits.csv")
            seed_path = folder / SEED_NULL_DIR / "embeddings" / arm / path.name
            load_seed = None
            if seed_path.is_file():
                load_seed = functools.partial(_read_lomo_npz, seed_path, fold_roles, folder / "splits.csv")
            input_id = ":".join([_file_id(path), select_on, _file_id(seed_path) if load_seed else "no-seed-null"])
            jobs.append(FoldJob(f"{arm}{arm_suffix}", f"{prefix}{mag}X", load, input_id, load_seed))
    for m, reason in dict(config.get("skipped_held_out") or {}).items():
        notes.append(f"{folder}: `wsienc lomo` did not run the {m}X-held-out fold ({reason})")
    return jobs, notes


def _file_id(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _lomo_leaves(
    folder: Path, config: Mapping[str, Any], prefix: str = "", suffix: str = ""
) -> list[tuple[Path, Mapping[str, Any], str, str]]:
    """The folders holding ``embeddings/`` under a LOMO output folder, with fold-name prefix and arm suffix."""
    if (folder / "embeddings").is_dir() or not (config.get("fold_dirs") or config.get("repeat_dirs")):
        return [(folder, config, prefix, suffix)]
    out = []
    for d in config.get("repeat_dirs", []):
        sub = folder / str(d)
        out += _lomo_leaves(sub, _read_config(sub), prefix, f"{suffix}@{d}")
    for d in config.get("fold_dirs", []):
        sub = folder / str(d)
        out += _lomo_leaves(sub, _read_config(sub), f"{prefix}{d}/", suffix)
    return out


def load_lomo_inputs(src: str | Path, select_on: str = "val") -> SignatureInputs:
    """The folds of a ``wsienc lomo`` output folder (``config.json`` + ``embeddings/<arm>/heldout_<m>.npz``).

    ``select_on="val"`` (default) gives each fold's validation-role images (``splits.csv``) as its
    selection set; ``"train"`` every training-side image of the npz (fitting and validation patients).

    A run with patient folds (``config.json`` lists ``fold_dirs``) contributes the folds of every
    patient-fold folder, named ``<fold_dir>/<m>X``. A run with repeats (``repeat_dirs``) contributes
    each repeat's arms as ``<arm>@repeat_<k>``: repeats start from different initial weights, so their
    dimensions are compared only within a repeat.
    """
    src = Path(src)
    config = _read_config(src)
    config_path = src / "config.json"
    warnings: list[str] = []
    jobs: list[FoldJob] = []
    inits: set[str] = set()
    shared = config.get("shared_init") is True
    leaves = _lomo_leaves(src, config)
    if leaves[0][0] != src:
        for sub, sub_config, prefix, suffix in leaves:
            sub_jobs, notes = _lomo_jobs(sub, sub_config, prefix=prefix, arm_suffix=suffix, select_on=select_on)
            jobs += sub_jobs
            warnings += notes
            shared = shared and sub_config.get("shared_init") is True
            if not suffix:
                inits.add(str(sub_config.get("init_sha256")))
    else:
        jobs, warnings = _lomo_jobs(src, config, select_on=select_on)
    if not jobs:
        raise DatasetError(
            f"{src}: no embeddings/<arm>/heldout_<m>.npz files; run `wsienc lomo` (it saves them) or pass an "
            "embedding store with --labels"
        )
    classes = tuple(str(c) for c in config.get("classes", ("class0", "class1")))
    if len(classes) != 2:
        raise DatasetError(f"{config_path}: classes {list(classes)!r}; signatures need exactly two classes")
    if shared:
        details = [f"backbone `{config['backbone']}`" if "backbone" in config else "", f"seed {config['seed']}" if "seed" in config else ""]
        if config.get("init_sha256"):
            details.append(f"initial weights sha256 `{str(config['init_sha256'])[:12]}…`")
        basis = (
            "Each fold's encoder was trained separately (on that fold's training magnifications), but every "
            "fold started from the same initial weights (`config.json`: `shared_init: true`"
            + "".join(f", {d}" for d in details if d)
            + "). Dimension *i* is therefore the same initial unit in every fold, and the cross-fold Jaccard "
            "measures how much of a signature survives each fold's training. This is the only reason the "
            "dimensions are comparable across folds: hidden units of separately trained networks can be "
            "permuted freely, so without a shared start the overlap of raw indices would mean nothing."
        )
        if len(inits) > 1:
            warnings.insert(0, f"{src}: the patient folds started from {len(inits)} different initial weights; "
                            "Jaccard between folds of different patient folds compares unaligned dimensions")
    else:
        basis = (
            "Each fold's encoder was trained separately. Dimensions are comparable across folds only when every "
            "fold starts from the same initial weights; hidden units of separately trained networks can be "
            "permuted freely, so overlap of raw indices between such folds means nothing."
        )
        warnings.insert(
            0,
            f"{config_path if config else src}: "
            + ("no config.json" if not config else "config.json does not record `shared_init: true`")
            + "; the folds' encoders may not share their initial weights, so the cross-fold Jaccard of raw "
            "dimension indices may be meaningless (near 0 by permutation symmetry alone)",
        )
    return SignatureInputs("lomo", src, tuple(jobs), classes, basis, tuple(warnings), config, select_on)


# ----------------------------------------------------------------------------- embedding stores


def _given(data: FoldData) -> FoldData:
    return data


def slide_vectors(store: EmbeddingStore) -> tuple[list[str], npt.NDArray[np.float64], dict[str, str]]:
    """Mean tile feature of every usable slide of an embedding store (:meth:`EmbeddingStore.mean`).

    Returns ``(slide_ids, X (n, C), skipped {slide_id: reason})``: the store's skipped slides (incomplete,
    failed, without tiles) and those whose features are unreadable or not finite, each reported once.

    Raises
    ------
    StoreError
        No slide is usable, or the usable slides come from different encoders or embedding sizes.
    """
    skipped = store.skipped
    ids: list[str] = []
    vectors: list[npt.NDArray[np.float64]] = []
    for slide_id in store.slide_ids:
        try:
            vectors.append(store.mean(slide_id))
        except StoreError as exc:  # one bad slide of a cohort is reported and skipped
            logger.warning("%s: slide %s skipped: %s", store.path, slide_id, exc)
            skipped[slide_id] = str(exc)
            continue
        ids.append(slide_id)
    if not ids:
        detail = f" ({len(skipped)} skipped: {next(iter(skipped.items()))})" if skipped else ""
        raise StoreError(f"{store.path}: no usable slide with tile features{detail}")
    store.encoder_identity()  # one encoder per store, or one clear line
    store.embedding_dim  # noqa: B018 - one embedding size, or one clear line
    return ids, np.stack(vectors), dict(sorted(skipped.items()))


def load_store_inputs(
    store: str | Path,
    labels: str | Path,
    n_folds: int = 5,
    *,
    seed: int = 0,
    positive_class: str | None = None,
    allow_missing: bool = False,
) -> SignatureInputs:
    """Folds of an embedding store: slide vectors (mean of tile features), patient-grouped stratified folds."""
    store = Path(store)
    if n_folds < 2:
        raise InvalidParameterError(f"--folds must be >= 2, got {n_folds!r}")
    ids, x_all, skipped = slide_vectors(EmbeddingStore.open(store))
    table = read_labels(
        labels, ids, store_name=str(store), allow_missing=allow_missing, positive_class=positive_class, store_skipped=skipped
    )
    if table.n_classes != 2:
        raise DatasetError(f"{labels}: {table.n_classes} classes {list(table.classes)}; signatures need exactly two")
    if "test" in table.splits:
        logger.info("%s: %d slide(s) of the test split are left out", labels, table.splits.count("test"))
        table = table.select("train")
    row = {sid: i for i, sid in enumerate(ids)}
    x = x_all[[row[s] for s in table.slide_ids]]
    y = table.y
    patients = np.array(table.patient_ids, dtype=str)
    n_patients = len(np.unique(patients))
    if n_folds > n_patients:
        raise InvalidParameterError(f"--folds {n_folds} is more than the {n_patients} patients of {labels}")
    if len(np.unique(y)) < 2:
        raise DatasetError(f"{labels}: every slide has label {table.classes[int(y[0])]!r}; signatures need two classes")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    arm = store.name.removesuffix(".zarr") or "embeddings"
    data_hash = hashlib.sha256(np.ascontiguousarray(x).tobytes() + y.tobytes()).hexdigest()[:16]
    jobs = []
    for k, (tr, te) in enumerate(splitter.split(x, y, patients), start=1):
        fold_data = FoldData(x[tr], y[tr], patients[tr], x[te], y[te], patients[te])
        members = hashlib.sha256(",".join(map(str, te)).encode()).hexdigest()[:12]
        load_fold = functools.partial(_given, fold_data)
        jobs.append(FoldJob(arm, f"fold{k}", load_fold, f"{store.resolve()}:{data_hash}:{n_folds}:{seed}:{members}"))
    warnings: list[str] = []
    basis = (
        "All folds use the same frozen encoder (the one that wrote the embedding store), so dimension *i* is "
        "the same feature in every fold; the cross-fold Jaccard measures only how stable the selection is "
        "when the patients change. (Comparing signatures of *separately trained* encoders is meaningful only "
        "when they start from the same initial weights.)"
    )
    config = {"store": str(store), "labels": str(labels), "folds": n_folds, "classes": list(table.classes),
              "n_slides": len(y), "n_patients": n_patients}
    return SignatureInputs("store", store, tuple(jobs), table.classes, basis, tuple(warnings), config)


def load_inputs(
    src: str | Path,
    labels: str | Path | None = None,
    n_folds: int | None = None,
    *,
    seed: int = 0,
    positive_class: str | None = None,
    allow_missing: bool = False,
    select_on: str | None = None,
) -> SignatureInputs:
    """Recognise ``src`` (LOMO folder or embedding store) and list its folds.

    ``select_on`` (LOMO input only; default ``val``): see :data:`SELECT_ON`. An embedding store's folds
    select on their training slides: its frozen encoder never fitted their labels.
    """
    src = Path(src)
    if select_on is not None and select_on not in SELECT_ON:
        raise InvalidParameterError(f"--select-on {select_on!r}: choose {' or '.join(SELECT_ON)}")
    if not src.exists():
        raise StoreError(f"{src}: no such folder (expected a `wsienc lomo` output folder or an embedding store)")
    is_zarr = (src / "zarr.json").is_file()
    if is_zarr:
        if labels is None:
            raise InvalidParameterError(f"{src} is an embedding store: pass --labels CSV (slide_id,label,patient_id)")
        if select_on == "val":
            raise InvalidParameterError(
                f"--select-on val applies to `wsienc lomo` folders; {src} is an embedding store (its folds select "
                "on their training slides, which its frozen encoder never fitted)"
            )
        return load_store_inputs(
            src, labels, 5 if n_folds is None else n_folds, seed=seed, positive_class=positive_class, allow_missing=allow_missing
        )
    if labels is not None or n_folds is not None:
        raise InvalidParameterError(f"--labels/--folds apply to embedding stores; {src} is not a zarr store")
    if not src.is_dir() or not ((src / "config.json").is_file() or (src / "embeddings").is_dir()):
        raise StoreError(
            f"{src}: neither a `wsienc lomo` output folder (config.json, embeddings/) nor a zarr embedding store"
        )
    return load_lomo_inputs(src, select_on or "val")


# ----------------------------------------------------------------------------- the job


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _rounded_or_none(values: npt.NDArray[np.floating[Any]]) -> Any:
    """Nested lists of ``values`` rounded to 6 decimals, NaN as None (JSON null)."""
    array = np.asarray(values, dtype=np.float64)
    out = array.round(6).astype(object)
    out[np.isnan(array)] = None
    return out.tolist()


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_fmt(v) for v in r] for r in rows])
    return buf.getvalue()


def _partial_path(out_dir: Path, job: FoldJob) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{job.arm}__{job.fold}")
    return out_dir / ".partial" / f"{safe}.json"


def _fingerprint(job: FoldJob, spec: SignatureSpec) -> str:
    text = json.dumps({"input": job.input_id, "spec": spec.to_dict(), "arm": job.arm, "fold": job.fold}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _seed_null(job: FoldJob, data: FoldData, spec: SignatureSpec) -> tuple[tuple[int, ...], tuple[tuple[int, ...] | None, ...]]:
    """The signature of the fold's second-seed encoder, selected by the same rule on the same selection images,
    and its bootstrap signatures (the same patient resamples as the first seed's: same patients, same seed)."""
    assert job.load_seed is not None
    other = job.load_seed()
    same = (
        other.filename_train is not None and data.filename_train is not None
        and np.array_equal(other.filename_train, data.filename_train)
        and np.array_equal(other.patient_train, data.patient_train) and np.array_equal(other.y_train, data.y_train)
    )
    if not same:
        raise DatasetError(
            f"{job.arm} / {job.fold}: the second-seed embeddings ({SEED_NULL_DIR}/) hold other selection images than "
            "the first seed's; a seed null needs the same data and roles, only the seed differing"
        )
    selection = select_signature(other.x_train, other.y_train, other.patient_train, spec)
    return selection.indices, bootstrap_signatures(np.asarray(other.x_train, dtype=np.float64), other.y_train, other.patient_train, spec)


def _evaluate_job(job: FoldJob, spec: SignatureSpec) -> SignatureRecord:
    data = job.load()
    ev = evaluate_fold(data.x_train, data.y_train, data.patient_train, data.x_test, data.y_test, spec, groups_test=data.patient_test)
    where = f"{job.arm} / {job.fold}"
    seed_indices: tuple[int, ...] | None = None
    seed_boot: tuple[tuple[int, ...] | None, ...] = ()
    if job.load_seed is not None:
        seed_indices, seed_boot = _seed_null(job, data, spec)
    if len(np.unique(data.y_test)) < 2:
        logger.warning("%s: the test set holds one class only (%d images); AUC is undefined there", where, len(data.y_test))
    if ev.selection.at_path_end:
        logger.warning(
            "%s: the chosen L1 penalty is the smallest on the path (lambda_max x %.3g); a longer path might "
            "select more dimensions", where, spec.lambda_ratio,
        )
    auc_network = float("nan")
    if data.prob_test is not None:
        auc_network = classification_metrics(data.y_test, data.prob_test)["auc"]
    record = SignatureRecord.from_evaluation(job.arm, job.fold, ev, auc_network)
    return replace(
        record,
        selection_patients=tuple(sorted(set(data.patient_train.tolist()))),
        seed_indices=seed_indices,
        seed_boot_indices=seed_boot,
    )


def run_signatures(
    src: str | Path,
    out_dir: str | Path,
    *,
    labels: str | Path | None = None,
    n_folds: int | None = None,
    spec: SignatureSpec | None = None,
    positive_class: str | None = None,
    allow_missing: bool = False,
    select_on: str | None = None,
    iterate: Callable[[Sequence[FoldJob]], Iterable[FoldJob]] = iter,
) -> SignatureRun:
    """Signatures of every arm × fold of ``src``; writes the CSVs, JSON, PNGs and ``report.md`` in ``out_dir``.

    Parameters
    ----------
    src
        A ``wsienc lomo`` output folder, or an embedding store (then ``labels`` is required).
    out_dir
        Output folder (created). Finished folds are cached in ``out_dir/.partial`` and reused.
    labels, n_folds
        Labels CSV and number of patient-grouped folds (default 5) for an embedding store.
    spec
        Selection settings (its ``seed`` also seeds the store folds).
    positive_class, allow_missing
        For store input: the class taken as positive, and whether to skip slides missing from either side.
    select_on
        LOMO input: ``val`` (default; the validation-role patients of ``splits.csv``) or ``train`` (every
        training-side image, a sensitivity analysis): the images whose embeddings select the signature
        and fit the full and signature probes. Store input: always its training folds.
    iterate
        Wraps the list of fold jobs (the CLI passes a progress bar).

    Raises
    ------
    WsiEncoderError
        On unusable input, or when no fold at all could be evaluated (a failing fold is otherwise
        reported in the log, the report and ``signatures.json``, and skipped).
    """
    spec = (spec or SignatureSpec()).validate()
    out = Path(out_dir)
    inputs = load_inputs(
        src, labels, n_folds, seed=spec.seed, positive_class=positive_class, allow_missing=allow_missing, select_on=select_on
    )
    for message in inputs.warnings:
        logger.warning("%s", message)
    out.mkdir(parents=True, exist_ok=True)
    records: list[SignatureRecord] = []
    failed: dict[str, str] = {}
    for job in iterate(list(inputs.jobs)):
        partial = _partial_path(out, job)
        fingerprint = _fingerprint(job, spec)
        if partial.is_file():
            try:
                cached = json.loads(partial.read_text())
                if cached.get("fingerprint") == fingerprint:
                    records.append(SignatureRecord.from_json(cached["record"]))
                    logger.info("%s / %s: reusing the finished fold in %s", job.arm, job.fold, partial)
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                logger.info("%s: unreadable cache, recomputing", partial)
        try:
            record = _evaluate_job(job, spec)
        except WsiEncoderError as exc:
            failed[f"{job.arm}/{job.fold}"] = str(exc)
            logger.info("%s / %s skipped: %s", job.arm, job.fold, exc)
            continue
        records.append(record)
        atomic_write_text(partial, json.dumps({"fingerprint": fingerprint, "record": record.to_json()}))
        logger.info("%s / %s: signature of %d dims", job.arm, job.fold, record.size)
    if not records:
        first = next(iter(failed.items()))
        raise DatasetError(f"no fold could be evaluated; {first[0]}: {first[1]}")
    return _write_outputs(out, inputs, records, failed, spec)


def _seed_null_json(rows: Sequence[SeedNullRow]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{arm: {fold: {column: value}}}`` of the seed-null rows (nan as null)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        values = r.row()[2:]
        out.setdefault(r.arm, {})[r.fold] = {
            k: None if isinstance(v, float) and math.isnan(v) else v for k, v in zip(SEED_NULL_COLUMNS[2:], values, strict=True)
        }
    return out


def _write_outputs(
    out: Path, inputs: SignatureInputs, records: list[SignatureRecord], failed: dict[str, str], spec: SignatureSpec
) -> SignatureRun:
    jaccards = arm_jaccards(records)
    seed_rows = seed_null_rows(records)
    files = [out / "signatures.csv", out / "jaccard.csv", out / "seed_null.csv", out / "signatures.json"]
    atomic_write_text(files[0], _csv(SIGNATURE_COLUMNS, [list(r.row().values()) for r in records]))
    atomic_write_text(files[1], _csv(JACCARD_COLUMNS, [[j.arm, *pair] for j in jaccards for pair in j.pairs()]))
    atomic_write_text(files[2], _csv(SEED_NULL_COLUMNS, [r.row() for r in seed_rows]))
    settings = {**spec.to_dict(), "select_on": inputs.select_on}
    payload = {
        "source": str(inputs.source.resolve()),
        "kind": inputs.kind,
        "classes": list(inputs.classes),
        "settings": settings,
        "select_on": inputs.select_on,
        "seed_null": _seed_null_json(seed_rows),
        "wsi_encoder_version": __version__,
        "basis": inputs.basis_note,
        "warnings": list(inputs.warnings),
        "failed": failed,
        "input_config": dict(inputs.config),
        "arms": {
            j.arm: {
                "folds": {r.fold: r.to_json() for r in records if r.arm == j.arm},
                "jaccard": {
                    "folds": list(j.folds),
                    "matrix": _rounded_or_none(j.matrix),
                    "mean_off_diagonal": None if math.isnan(j.mean_off_diagonal) else j.mean_off_diagonal,
                    "chance": _rounded_or_none(j.chance),
                    "corrected": _rounded_or_none(j.corrected),
                    "mean_chance": None if math.isnan(j.mean_chance) else j.mean_chance,
                    "mean_corrected": None if math.isnan(j.mean_corrected) else j.mean_corrected,
                    "mean_bootstrap_interval": _rounded_or_none(np.array(j.mean_interval())),
                    "n_bootstrap": len(j.boot_means),
                    "n_dims": j.n_dims,
                },
            }
            for j in jaccards
        },
    }
    atomic_write_text(files[3], json.dumps(payload, indent=1))
    context = ReportContext(
        source=str(inputs.source),
        kind=inputs.kind,
        classes=inputs.classes,
        basis_note=inputs.basis_note,
        warnings=inputs.warnings,
        failed=dict(failed),
        settings=settings,
    )
    files += write_report(out, records, jaccards, context, seed_rows)
    return SignatureRun(out, tuple(records), failed, tuple(files), inputs.warnings)
