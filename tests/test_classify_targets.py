"""Regression / survival label files: parsing and the one-line errors naming file, row and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_encoder.errors import DatasetError
from wsi_encoder.io.labels import read_targets


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_regression_labels_parse_with_patients(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,target,patient_id\na,1.5,p1\nb,-2,p1\nc,3e1,p2\n")
    table = read_targets(path, "regression", ["a", "b", "c"])
    assert table.slide_ids == ("a", "b", "c")
    assert table.values == (1.5, -2.0, 30.0)
    assert table.patient_ids == ("p1", "p1", "p2")
    assert table.events == ()


def test_survival_labels_parse(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,time,event\na,10,1\nb,0,0\nc,7.5,1\n")
    table = read_targets(path, "survival", ["a", "b", "c"])
    assert table.values == (10.0, 0.0, 7.5)
    assert table.events == (1, 0, 1)
    assert table.patient_ids == table.slide_ids
    assert table.to_json()["n_events"] == 2


@pytest.mark.parametrize(
    ("target", "text", "message"),
    [
        ("regression", "slide_id,target\na,1\nb,high\n", "row 3: target 'high' is not a number"),
        ("regression", "slide_id,target\na,1\nb,nan\n", "row 3: target 'nan' is not a finite number"),
        ("regression", "slide_id,target\na,1\nb,\n", "row 3: empty target"),
        ("regression", "slide_id,label\na,1\n", "missing column(s) target for --target regression"),
        ("regression", "slide_id,target\na,1\na,2\n", "row 3: slide 'a' already listed on row 2"),
        ("regression", "slide_id,target\na,1\nb,1\n", "constant"),
        ("survival", "slide_id,time,event\na,5,1\nb,-1,0\n", "row 3: time '-1' is negative"),
        ("survival", "slide_id,time,event\na,5,1\nb,4,2\n", "row 3: event must be 1 (death) or 0 (censored), got '2'"),
        ("survival", "slide_id,time,event\na,5,1\nb,x,0\n", "row 3: time 'x' is not a number"),
        ("survival", "slide_id,time,event\na,5,0\nb,4,0\n", "no training slide has an event"),
        ("survival", "slide_id,time\na,5\n", "missing column(s) event"),
    ],
)
def test_bad_target_files_fail_in_one_line(tmp_path: Path, target: str, text: str, message: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(DatasetError) as err:
        read_targets(path, target, ["a", "b"])
    text_of_error = str(err.value)
    assert message in text_of_error
    assert str(path) in text_of_error
    assert "\n" not in text_of_error


def test_unmatched_slides_are_listed_or_skipped(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,target\na,1\nb,2\nz,3\n")
    with pytest.raises(DatasetError, match="not usable in the embedding store: z"):
        read_targets(path, "regression", ["a", "b"])
    table = read_targets(path, "regression", ["a", "b"], allow_missing=True)
    assert table.slide_ids == ("a", "b")
    assert table.dropped_not_in_store == ("z",)
