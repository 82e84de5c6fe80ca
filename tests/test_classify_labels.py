"""Labels CSV checks and the embedding-store reader used by `wsienc classify`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import zarr
from _classify_fixtures import cached_cohort, write_labels, write_slide
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.errors import DatasetError, InvalidParameterError, StoreError
from wsi_encoder.evaluation.crossval import patient_folds
from wsi_encoder.io.embedding_store import EmbeddingStore
from wsi_encoder.io.labels import order_classes, read_labels


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return cached_cohort(tmp_path_factory, "binary", n_patients=28)


@pytest.fixture(scope="module")
def reader(cohort) -> EmbeddingStore:
    return EmbeddingStore.open(cohort.store)


def _rows(cohort, n: int | None = None) -> list[tuple[str, str, str]]:
    return [(s.slide_id, s.label, s.patient_id) for s in cohort.slides[:n]]


# ---------------------------------------------------------------------------------------------- good input
def test_labels_match_store_and_map_classes(cohort, reader) -> None:
    table = read_labels(cohort.labels_csv, reader.slide_ids)
    assert table.classes == ("normal", "lesion")  # the negative-sounding class first: lesion is positive
    assert table.class_index == {"normal": 0, "lesion": 1}
    assert set(table.slide_ids) == set(reader.slide_ids)
    assert table.patient_id_given
    y = table.y
    assert [table.classes[i] for i in y] == list(table.labels)
    assert table.to_json()["positive_class"] == "lesion"


@pytest.mark.parametrize(
    ("labels", "positive", "expected"),
    [
        (["b", "a"], None, ("a", "b")),
        (["10", "2", "1"], None, ("1", "2", "10")),
        (["tumor", "normal"], None, ("normal", "tumor")),
        (["Benign", "malignant"], None, ("Benign", "malignant")),
        (["x", "y"], "x", ("y", "x")),
    ],
)
def test_class_order(labels: list[str], positive: str | None, expected: tuple[str, ...]) -> None:
    assert order_classes(labels, positive) == expected


def test_missing_patient_id_each_slide_own_patient(tmp_path: Path, cohort, reader, caplog) -> None:
    csv = write_labels(tmp_path / "l.csv", [(s, lab) for s, lab, _ in _rows(cohort)], ("slide_id", "label"))
    with caplog.at_level(logging.WARNING, logger="wsi_encoder"):
        table = read_labels(csv, reader.slide_ids)
    assert table.patient_ids == table.slide_ids
    assert not table.patient_id_given
    assert "no patient_id column" in caplog.text


def test_bom_whitespace_and_split_column(tmp_path: Path, cohort, reader) -> None:
    rows = _rows(cohort)
    test_patients = {rows[0][2], rows[1][2]}
    lines = ["\ufeffslide_id , label , patient_id , split"]
    lines += [f" {s} , {lab} , {p} , {'TEST' if p in test_patients else ''}" for s, lab, p in rows]
    csv = tmp_path / "l.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = read_labels(csv, reader.slide_ids)
    assert set(table.select("test").patient_ids) == test_patients
    assert len(table.select("train").slide_ids) + len(table.select("test").slide_ids) == len(rows)


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="labels file not found"):
        read_labels(tmp_path / "nope.csv")


def test_missing_columns_and_semicolon_hint(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing column\(s\) label"):
        read_labels(write_labels(tmp_path / "a.csv", [("s1", "x")], ("slide_id", "class")))
    (tmp_path / "b.csv").write_text("slide_id;label\ns1;a\n")
    with pytest.raises(DatasetError, match="use commas"):
        read_labels(tmp_path / "b.csv")


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no rows"):
        read_labels(write_labels(tmp_path / "a.csv", []))


def test_empty_cells_listed(tmp_path: Path) -> None:
    csv = write_labels(tmp_path / "a.csv", [("s1", "a", "p1"), ("s2", "", "p2"), ("s3", "b", "")])
    with pytest.raises(DatasetError, match=r"line 3 \(label\).*line 4 \(patient_id\)"):
        read_labels(csv)


def test_duplicate_slide_ids(tmp_path: Path) -> None:
    csv = write_labels(tmp_path / "a.csv", [("s1", "a", "p1"), ("s1", "b", "p2"), ("s2", "b", "p3")])
    with pytest.raises(DatasetError, match="more than once: s1"):
        read_labels(csv)


def test_bad_split_value(tmp_path: Path) -> None:
    csv = write_labels(tmp_path / "a.csv", [("s1", "a", "p1", "valid"), ("s2", "b", "p2", "")],
                       ("slide_id", "label", "patient_id", "split"))
    with pytest.raises(DatasetError, match=r"split must be one of train, test.*'valid'"):
        read_labels(csv)


def test_patient_in_both_splits(tmp_path: Path) -> None:
    csv = write_labels(tmp_path / "a.csv", [("s1", "a", "p1", "train"), ("s2", "b", "p1", "test"), ("s3", "b", "p3", "")],
                       ("slide_id", "label", "patient_id", "split"))
    with pytest.raises(DatasetError, match=r"both the train and test split.*p1"):
        read_labels(csv)


def test_test_label_unseen_in_training(tmp_path: Path) -> None:
    csv = write_labels(tmp_path / "a.csv", [("s1", "a", "p1", ""), ("s2", "b", "p2", ""), ("s3", "c", "p3", "test")],
                       ("slide_id", "label", "patient_id", "split"))
    with pytest.raises(DatasetError, match=r"test-split labels \['c'\]"):
        read_labels(csv)


def test_single_class(tmp_path: Path, cohort, reader) -> None:
    rows = [(s, "normal", p) for s, _, p in _rows(cohort)]
    with pytest.raises(DatasetError, match="single class"):
        read_labels(write_labels(tmp_path / "a.csv", rows), reader.slide_ids)


def test_single_class_after_allow_missing(tmp_path: Path, cohort, reader) -> None:
    rows = [r for r in _rows(cohort) if r[1] == "normal"] + [("ghost", "lesion", "px")]
    with pytest.raises(DatasetError, match="single class"):
        read_labels(write_labels(tmp_path / "a.csv", rows), reader.slide_ids, allow_missing=True)


def test_slides_not_in_store_listed(tmp_path: Path, cohort, reader) -> None:
    rows = [*_rows(cohort), ("ghost_1", "lesion", "px"), ("ghost_2", "normal", "py")]
    csv = write_labels(tmp_path / "a.csv", rows)
    with pytest.raises(DatasetError, match=r"2 slide\(s\) of .* not usable in .*ghost_1, ghost_2.*--allow-missing"):
        read_labels(csv, reader.slide_ids)


def test_slides_not_in_csv_listed(tmp_path: Path, cohort, reader) -> None:
    rows = _rows(cohort)
    csv = write_labels(tmp_path / "a.csv", rows[3:])
    expected = ", ".join(sorted(r[0] for r in rows[:3]))
    with pytest.raises(DatasetError, match=rf"3 slide\(s\) of .* have no label in .*{expected}"):
        read_labels(csv, reader.slide_ids)


def test_allow_missing_warns_and_skips(tmp_path: Path, cohort, reader, caplog) -> None:
    rows = [*_rows(cohort)[2:], ("ghost", "lesion", "px")]
    csv = write_labels(tmp_path / "a.csv", rows)
    with caplog.at_level(logging.WARNING, logger="wsi_encoder"):
        table = read_labels(csv, reader.slide_ids, allow_missing=True)
    assert "ghost" not in table.slide_ids
    assert table.dropped_not_in_store == ("ghost",)
    assert len(table.ignored_not_in_csv) == 2
    assert "ghost" in caplog.text and "--allow-missing" in caplog.text


def test_positive_class_errors(tmp_path: Path) -> None:
    csv = write_labels(tmp_path / "a.csv", [("s1", "a", "p1"), ("s2", "b", "p2"), ("s3", "c", "p3")])
    with pytest.raises(DatasetError, match="two classes only"):
        read_labels(csv, positive_class="a")
    csv2 = write_labels(tmp_path / "b.csv", [("s1", "a", "p1"), ("s2", "b", "p2")])
    with pytest.raises(DatasetError, match="positive class 'z' is not a label"):
        read_labels(csv2, positive_class="z")


def test_too_few_patients_for_folds() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    groups = np.array(["a", "b", "c", "d", "e", "e", "f", "f"])
    with pytest.raises(InvalidParameterError, match="only 2 patient"):
        patient_folds(y, groups, folds=3, seed=0)


def test_cli_bad_labels_one_line_error(tmp_path: Path, cohort) -> None:
    csv = write_labels(tmp_path / "a.csv", [*_rows(cohort), ("ghost", "lesion", "px")])
    result = CliRunner().invoke(
        main, ["classify", "train", str(cohort.store), "--labels", str(csv), "--model", "linear", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "Error:" in result.output and "ghost" in result.output and "--allow-missing" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- store reader
def test_reader_grid_matches_stored_grid(cohort, reader) -> None:
    for sid in reader.slide_ids[:3]:
        bag = reader.load(sid)
        np.testing.assert_array_equal(bag.grid(np.float32), reader.stored_grid(sid).astype(np.float32))
        root = zarr.open_group(str(cohort.store), mode="r")
        np.testing.assert_array_equal(bag.mask, root[sid]["mask"][...])
    assert reader.embedding_dim == cohort.dim
    assert reader.encoder_identity()["name"] == "fixture-encoder"


def _tiny_store(path: Path, slides: dict[str, dict]) -> Path:
    root = zarr.open_group(str(path), mode="w")
    rng = np.random.default_rng(0)
    rowcol = np.argwhere(np.ones((4, 5), bool))
    status = {}
    for sid, opts in slides.items():
        write_slide(root, sid, rng.normal(size=(len(rowcol), opts.pop("dim", 8))), rowcol, (4, 5), **opts)
        status[sid] = {"status": "ok", "reason": None, "source": sid}
    status["broken"] = {"status": "failed", "reason": "unreadable slide", "source": "x"}
    root.attrs.update({"kind": "embedding_store", "slides": status})
    return path


def test_reader_skips_incomplete_and_failed(tmp_path: Path, caplog) -> None:
    store = _tiny_store(tmp_path / "e.zarr", {"a": {}, "b": {"complete": False}})
    with caplog.at_level(logging.WARNING, logger="wsi_encoder"):
        reader = EmbeddingStore.open(store)
    assert reader.slide_ids == ("a",)
    assert "incomplete" in reader.skipped["b"] and "unreadable slide" in reader.skipped["broken"]
    csv = write_labels(tmp_path / "l.csv", [("a", "x", "p1"), ("b", "y", "p2")])
    with pytest.raises(DatasetError, match=r"b \(incomplete"):
        read_labels(csv, reader.slide_ids, store_skipped=reader.skipped)
    with pytest.raises(StoreError, match="'b' is not usable: incomplete"):
        reader.load("b")


def test_reader_rejects_mixed_encoders_and_dims(tmp_path: Path) -> None:
    other = {"name": "other", "config": {}, "weights_sha256": "0" * 64}
    reader = EmbeddingStore.open(_tiny_store(tmp_path / "e.zarr", {"a": {}, "b": {"encoder": other}}))
    with pytest.raises(StoreError, match="different encoders"):
        reader.encoder_identity()
    reader = EmbeddingStore.open(_tiny_store(tmp_path / "f.zarr", {"a": {}, "b": {"dim": 4}}))
    with pytest.raises(StoreError, match="different embedding sizes"):
        _ = reader.embedding_dim


def test_reader_rejects_other_stores(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such embedding store"):
        EmbeddingStore.open(tmp_path / "missing.zarr")
    root = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
    root.attrs.update({"kind": "patch_store"})
    with pytest.raises(StoreError, match="'patch_store' store, not an embedding store"):
        EmbeddingStore.open(tmp_path / "p.zarr")


def test_geometry_recorded_and_estimated(tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "e.zarr", {"a": {}, "b": {"record_size": False}})
    reader = EmbeddingStore.open(store)
    exact, estimated = reader.geometry("a"), reader.geometry("b")
    assert exact is not None and estimated is not None
    assert exact.origin_l0 == (100.0, 60.0) and exact.stride_l0 == 448.0 and not exact.estimated
    assert estimated.estimated and estimated.origin_l0 == exact.origin_l0
    # the estimate is within one grid step of the recorded size
    assert np.allclose(estimated.size_l0, exact.size_l0, atol=448.0)
