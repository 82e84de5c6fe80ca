"""Patient-disjoint splits and leave-one-magnification-out folds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.evaluation.splits import (
    SPLITS_COLUMNS,
    PatientSplit,
    cap_fold,
    check_patient_disjoint,
    fold_roles,
    lomo_folds,
    patient_folds,
    patient_key,
    patient_labels,
    read_splits_csv,
    split_patients,
    write_splits_csv,
)
from wsi_encoder.io.breakhis import BreakhisImage, parse_breakhis_name, scan_breakhis

MAGS = (40, 100, 200, 400)


def _images(
    n_benign: int = 6, n_malignant: int = 10, per_mag: int = 2, drop: set[tuple[str, int]] | None = None
) -> list[BreakhisImage]:
    """BreaKHis-named images (names only) for patients with images at every magnification."""
    drop = drop or set()
    names = []
    for i in range(n_benign + n_malignant):
        cls, sub = ("B", "F") if i < n_benign else ("M", "DC")
        # pairs of slide ids share a patient number: 3000AB / 3000CD, 3001AB / 3001CD ...
        slide = f"{3000 + i // 2}{'AB' if i % 2 == 0 else 'CD'}"
        for m in MAGS:
            if (slide, m) in drop:
                continue
            for seq in range(1, per_mag + 1):
                names.append(f"SOB_{cls}_{sub}-14-{slide}-{m}-{seq:03d}.png")
    images = [parse_breakhis_name(Path(n)) for n in names]
    assert all(images)
    return images  # type: ignore[return-value]


def test_split_is_patient_disjoint_stratified_and_seeded() -> None:
    images = _images()
    split = split_patients(images, test_fraction=0.3, val_fraction=0.25, seed=3)
    check_patient_disjoint(split)
    labels = patient_labels(images)
    assert set(split.train) | set(split.val) | set(split.test) == set(labels)
    test_classes = Counter(labels[p] for p in split.test)
    assert test_classes == {"benign": 1, "malignant": 2}  # round(0.3 * 3), round(0.3 * 5): case numbers
    assert {labels[p] for p in split.val} == {"benign", "malignant"}
    assert split_patients(images, test_fraction=0.3, val_fraction=0.25, seed=3) == split
    others = {split_patients(images, test_fraction=0.3, seed=s).test for s in range(5)}
    assert len(others) > 1


def test_strict_patients_keep_slides_of_one_patient_together() -> None:
    images = _images()
    for seed in range(5):
        split = split_patients(images, seed=seed)  # the default key is the strict case number
        sides = {}
        for im in images:
            key = patient_key(im)
            side = "test" if key in split.test else "val" if key in split.val else "train"
            sides.setdefault(im.patient_id[:-2], set()).add(side)  # 14-3000AB and 14-3000CD -> 14-3000
        assert all(len(s) == 1 for s in sides.values())
    assert len(patient_labels(images)) == 8
    assert len(patient_labels(images, key="token")) == 16


def test_lomo_folds_hold_one_magnification_in_test_and_never_share_patients() -> None:
    images = _images()
    split = split_patients(images, seed=0)
    folds = lomo_folds(images, split)
    assert [f.held_out for f in folds] == list(MAGS)
    for fold in folds:
        assert fold.skipped is None
        test_patients = {patient_key(images[i]) for i in fold.test}
        side_patients = {patient_key(images[i]) for i in fold.train + fold.val}
        assert not test_patients & side_patients
        assert {images[i].magnification for i in fold.test} == {fold.held_out}
        assert fold.held_out not in {images[i].magnification for i in fold.train + fold.val}
        assert test_patients == set(split.test)
        assert {patient_key(images[i]) for i in fold.train} == set(split.train)
        assert {patient_key(images[i]) for i in fold.val} == set(split.val)
        # probe_test: the test patients at the training magnifications (never trained on)
        assert {patient_key(images[i]) for i in fold.probe_test} == set(split.test)
        assert fold.held_out not in {images[i].magnification for i in fold.probe_test}
        # everything else is unused: training patients at the held-out magnification
        roles = fold_roles(len(images), fold)
        for im, role in zip(images, roles, strict=True):
            if role == "unused":
                assert patient_key(im) not in split.test and im.magnification == fold.held_out


def test_a_magnification_without_test_images_is_reported_not_crashed_on() -> None:
    images = _images()
    split = split_patients(images, seed=0)
    drop = {(p, 400) for p in split.test}
    reduced = [im for im in images if (patient_key(im), im.magnification) not in drop]
    folds = {f.held_out: f for f in lomo_folds(reduced, split)}
    assert folds[400].skipped == "no test-patient images at 400X"
    assert folds[400].test == ()
    assert all(folds[m].skipped is None for m in (40, 100, 200))


def test_patient_folds_test_every_patient_once() -> None:
    images = _images()
    splits = patient_folds(images, 3, seed=1)
    tested = [p for s in splits for p in s.test]
    assert sorted(tested) == sorted(patient_labels(images))
    for s in splits:
        check_patient_disjoint(s)
    with pytest.raises(InvalidParameterError, match="smallest class has 3"):
        patient_folds(images, 7)


def test_bad_parameters_and_leaks_are_refused() -> None:
    images = _images()
    with pytest.raises(InvalidParameterError, match="test fraction"):
        split_patients(images, test_fraction=1.0)
    with pytest.raises(InvalidParameterError, match="validation fraction"):
        split_patients(images, val_fraction=-0.1)
    with pytest.raises(DatasetError, match="both train and test"):
        check_patient_disjoint(PatientSplit(train=("a", "b"), val=(), test=("b",)))
    one_patient = [im for im in images if patient_key(im) == "14-3000"]
    with pytest.raises(DatasetError, match="at least 2"):
        split_patients(one_patient)


def test_splits_csv_round_trip(tmp_path: Path) -> None:
    images = _images(per_mag=1)
    folds = lomo_folds(images, split_patients(images, seed=0))
    path = write_splits_csv(tmp_path / "splits.csv", images, folds)
    assert path.read_text().splitlines()[0] == ",".join(SPLITS_COLUMNS)
    rows = read_splits_csv(path)
    assert len(rows) == len(images) * 4
    assert {r["role"] for r in rows} == {"train", "val", "test", "probe_test", "unused"}
    for fold in folds:
        test_names = {images[i].filename for i in fold.test}
        assert {
            r["filename"] for r in rows if r["fold"] == fold.held_out and r["role"] == "test"
        } == test_names


def test_cap_fold_keeps_a_seeded_subset() -> None:
    images = _images(per_mag=3)
    fold = lomo_folds(images, split_patients(images, seed=0))[0]
    capped = cap_fold(fold, 5, seed=0)
    assert len(capped.train) == 5 and set(capped.train) <= set(fold.train)
    assert len(capped.test) == 5 and set(capped.test) <= set(fold.test)
    assert cap_fold(fold, 5, seed=0) == capped
    assert cap_fold(fold, None) is fold
    with pytest.raises(InvalidParameterError):
        cap_fold(fold, 0)


def test_real_breakhis_images_split_without_leaks(breakhis_dirs: list[Path]) -> None:
    images = sorted(
        scan_breakhis(breakhis_dirs[0]) + scan_breakhis(breakhis_dirs[1]), key=lambda im: im.filename
    )
    assert len(images) == 58
    assert len(patient_labels(images)) == 15
    for key in ("number", "token"):
        split = split_patients(images, seed=0, key=key)
        for fold in lomo_folds(images, split, key=key):
            test = {patient_key(images[i], key) for i in fold.test + fold.probe_test}
            side = {patient_key(images[i], key) for i in fold.train + fold.val}
            assert not test & side
            assert {images[i].magnification for i in fold.test} <= {fold.held_out}
