"""The task library: registry, built-in loaders on real BreaKHis images and generated public layouts."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from _train_fixtures import KATHER, make_kather, make_patch_store, make_pcam, write_csv
from PIL import Image

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.tasks import get_task, list_tasks, load_task, register_task
from wsi_encoder.tasks import registry as registry_module
from wsi_encoder.tasks.data import H5Images, concat_task_data

BUILTIN = {
    "breakhis-malignancy",
    "breakhis-subtype",
    "breakhis-magnification",
    "kather-crc",
    "pcam",
    "imagefolder",
    "csv",
    "patch-store",
}


def test_builtin_tasks_registered_with_layouts() -> None:
    specs = {s.name: s for s in list_tasks()}
    assert set(specs) >= BUILTIN
    assert all(specs[n].description and specs[n].layout for n in BUILTIN)
    assert specs["kather-crc"].classes == KATHER
    assert specs["pcam"].kind == "binary"
    assert specs["patch-store"].options == ("labels",)


def test_unknown_task_lists_known() -> None:
    with pytest.raises(InvalidParameterError, match=r"unknown task 'nope'.*kather-crc"):
        get_task("nope")


def test_register_task_is_one_decorated_function(tmp_path: Path) -> None:
    for i, cls in enumerate(["a", "b", "a", "b"]):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"p{i // 2}_{cls}_{i}.png")

    @register_task("test-my-task", description="demo", layout="ROOT/<patient>_<class>_<i>.png", classes=("a", "b"))
    def my_task(root: Path):
        for p in sorted(root.glob("*.png")):
            patient, cls, _ = p.stem.split("_")
            yield p, cls, patient

    try:
        data = load_task("test-my-task", tmp_path)
        assert data.classes == ("a", "b")
        assert data.class_counts() == {"a": 2, "b": 2}
        assert sorted(set(data.groups)) == ["p0", "p1"]
        image, label, group = data[3]
        assert image.shape == (8, 8, 3) and label == 1 and group == "p1"
        assert len(list(data)) == 4
    finally:
        registry_module._TASKS.pop("test-my-task")


def test_breakhis_tasks_on_real_images(breakhis_dirs: list[Path]) -> None:
    parts = [load_task("breakhis-malignancy", d) for d in breakhis_dirs]
    data = concat_task_data(parts)
    assert len(data) == 58
    assert data.classes == ("benign", "malignant")
    assert len(set(data.groups)) == 15
    assert all(g.startswith(("14-", "15-")) for g in data.groups)
    image, _, _ = data[0]
    assert image.shape == (460, 700, 3) and image.dtype == np.uint8
    mag = load_task("breakhis-magnification", breakhis_dirs[1])
    assert mag.classes == ("40X", "100X", "200X", "400X")
    assert all(c > 0 for c in mag.class_counts().values())
    sub = load_task("breakhis-subtype", breakhis_dirs[0])
    assert len(sub.classes) == 8 and sum(v > 0 for v in sub.class_counts().values()) >= 6
    # BreaKHis pixel size is not calibrated: images are used at native pixels.
    assert np.isnan(data.mpp).all()


def test_kather_layout_and_official_validation_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_kather(tmp_path / "NCT-CRC-HE-100K", n_per_class=2, size=32)
    with caplog.at_level(logging.WARNING):
        data = load_task("kather-crc", root)
    assert data.classes == KATHER and len(data) == 18 and data.split is None
    assert np.allclose(data.mpp, 0.5)
    assert "no patient id" in caplog.text
    make_kather(tmp_path / "CRC-VAL-HE-7K", n_per_class=1, size=32, seed=1)
    both = load_task("kather-crc", tmp_path)
    assert len(both) == 27
    assert (both.split == "val").sum() == 9 and (both.split == "train").sum() == 18


def test_pcam_lazy_h5_and_groups(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_pcam(tmp_path / "pcam", {"train": 12})
    with caplog.at_level(logging.WARNING):
        data = load_task("pcam", root)
    assert isinstance(data.source, H5Images)
    assert data.class_counts() == {"normal": 6, "tumor": 6}
    assert set(data.groups) == {"train:block00000"}
    assert "not slide-disjoint" in caplog.text
    image, label, _ = data[5]
    assert image.shape == (96, 96, 3) and label == 1
    clone = pickle.loads(pickle.dumps(data.subset([5])))  # picklable for DataLoader workers
    assert np.array_equal(clone[0][0], image)

    meta_root = make_pcam(tmp_path / "pcam_meta", {"train": 8, "valid": 4, "test": 4}, meta=True)
    full = load_task("pcam", meta_root)
    assert sorted(set(full.split)) == ["test", "train", "val"]
    assert set(full.groups[full.split == "train"]) == {f"train_slide_{i}" for i in range(4)}
    assert np.array_equal(full[9][0], pickle.loads(pickle.dumps(full))[9][0])


def test_pcam_compressed_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "camelyonpatch_level_2_split_train_x.h5.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetError, match="gunzip"):
        load_task("pcam", tmp_path)


def test_imagefolder_nested_patient_groups(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("tumor", "normal"):
        for patient in ("P1", "P2"):
            d = tmp_path / cls / patient
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    data = load_task("imagefolder", tmp_path)
    assert data.classes == ("normal", "tumor")
    assert sorted(set(data.groups)) == ["P1", "P2"]
    assert len(data) == 8


def test_csv_task_relative_paths_groups_and_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        rows.append([f"img/{i}.jpg", "pos" if i % 2 else "neg", f"pat{i // 2}", "0.25"])
    rows.append(["img/missing.jpg", "pos", "pat9", ""])
    table = write_csv(tmp_path / "list.csv", ["path", "label", "group", "mpp"], rows)
    with caplog.at_level(logging.WARNING):
        data = load_task("csv", table)
    assert "1 listed images are missing" in caplog.text
    assert len(data) == 4 and data.classes == ("neg", "pos")
    assert list(data.groups) == ["pat0", "pat0", "pat1", "pat1"]
    assert np.allclose(data.mpp, 0.25)
    bad = write_csv(tmp_path / "bad.csv", ["file_name", "class"], [["a.png", "x"]])
    with pytest.raises(DatasetError, match="path and label"):
        load_task("csv", bad)


def test_patch_store_per_slide_labels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = make_patch_store(
        tmp_path / "p.zarr",
        {"s1": [0] * 5, "s2": [1] * 3, "s3": [1] * 2, "s4": [0] * 2},
        incomplete=("s3",),
        failed={"s5": "unreadable"},
    )
    labels = write_csv(
        tmp_path / "labels.csv",
        ["slide_id", "label", "patient_id"],
        [["s1", "normal", "A"], ["s2", "lesion", "B"], ["s3", "lesion", "C"], ["s5", "normal", "D"], ["s4", "", "E"]],
    )
    with caplog.at_level(logging.WARNING):
        data = load_task("patch-store", store, labels=str(labels))
    assert "s3 skipped: incomplete" in caplog.text and "s5 skipped: tiling failed" in caplog.text
    assert data.classes == ("normal", "lesion")  # the negative class first: "lesion" is positive
    assert data.class_counts() == {"normal": 5, "lesion": 3}
    assert sorted(set(data.groups)) == ["A", "B"]
    assert np.allclose(data.mpp, 0.5)
    image, label, group = data[6]
    assert image.shape == (64, 64, 3) and data.classes[label] == "lesion" and group == "B"


def test_patch_store_per_tile_labels_by_index_and_xy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = make_patch_store(tmp_path / "p.zarr", {"s1": [0, 1, 0, 1], "s2": [1, 0]})
    import zarr

    coords = np.asarray(zarr.open_group(str(store), mode="r")["s2"]["coords"][...])
    by_index = write_csv(
        tmp_path / "idx.csv",
        ["slide_id", "tile_index", "label"],
        [["s1", 0, "a"], ["s1", 1, "b"], ["s1", 3, "b"], ["s1", 99, "a"], ["s2", 1, "a"]],
    )
    with caplog.at_level(logging.WARNING):
        data = load_task("patch-store", store, labels=str(by_index))
    assert "1 label rows" in caplog.text
    assert len(data) == 4 and list(data.groups) == ["s1", "s1", "s1", "s2"]
    direct = np.asarray(zarr.open_group(str(store), mode="r")["s1"]["tiles"][3])
    assert np.array_equal(data[2][0], direct)
    by_xy = write_csv(
        tmp_path / "xy.csv",
        ["slide_id", "x", "y", "label"],
        [["s2", int(coords[0, 0]), int(coords[0, 1]), "b"], ["s2", int(coords[1, 0]), int(coords[1, 1]), "a"]],
    )
    xy = load_task("patch-store", store, labels=str(by_xy))
    assert [xy.classes[k] for k in xy.labels] == ["b", "a"]
    assert np.array_equal(xy[1][0], np.asarray(zarr.open_group(str(store), mode="r")["s2"]["tiles"][1]))


def test_patch_store_bad_inputs(tmp_path: Path) -> None:
    store = make_patch_store(tmp_path / "p.zarr", {"s1": [0, 1], "s2": [0, 1]}, coords_only=("s1", "s2"))
    labels = write_csv(tmp_path / "l.csv", ["slide_id", "label"], [["s1", "a"], ["s2", "b"]])
    with pytest.raises(DatasetError, match="needs a labels CSV"):
        load_task("patch-store", store)
    with pytest.raises(DatasetError, match="coords-only"):
        load_task("patch-store", store, labels=str(labels))
    with pytest.raises(DatasetError, match="does not exist"):
        load_task("patch-store", store, labels=str(tmp_path / "none.csv"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="no such patch store"):
        load_task("patch-store", tmp_path / "plain", labels=str(labels))
    nolabel = write_csv(tmp_path / "n.csv", ["slide", "class"], [["s1", "a"]])
    with pytest.raises(DatasetError, match="slide_id and label"):
        load_task("patch-store", store, labels=str(nolabel))


def test_load_task_checks(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_task("kather-crc", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        load_task("kather-crc", tmp_path / "empty")
    one = make_kather(tmp_path / "one", n_per_class=3, size=16, classes=("TUM",))
    with pytest.raises(DatasetError, match="single class 'TUM'"):
        load_task("kather-crc", one)
    with pytest.raises(InvalidParameterError, match="no option"):
        load_task("kather-crc", one, labels="x.csv")


def test_concat_unions_classes(tmp_path: Path) -> None:
    a = load_task("kather-crc", make_kather(tmp_path / "a", n_per_class=1, size=16, classes=("ADI", "TUM")))
    b = load_task("imagefolder", make_kather(tmp_path / "b", n_per_class=1, size=16, classes=("LYM", "TUM")))
    both = concat_task_data([a, b])
    assert len(both) == 4
    names = [both.classes[k] for k in both.labels]
    assert names == ["ADI", "TUM", "LYM", "TUM"]
    assert np.array_equal(both[2][0], b[0][0])
