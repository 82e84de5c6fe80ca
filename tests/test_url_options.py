"""Path options that take URLs: output folders staged per run, recorded as given."""

from __future__ import annotations

from pathlib import Path

from tests import _remote_fixtures as remote
from wsi_encoder.io.urls import filesystem, local_output

s3_server, s3 = remote.s3_server, remote.s3


def test_two_runs_writing_one_url_stage_in_separate_folders(s3: str) -> None:
    out = f"{s3}/reports"
    with local_output(out) as first, local_output(out) as second:
        assert first.parent != second.parent  # not one fixed staging folder per URL
        first.mkdir()
        (first / "a.txt").write_text("first run")
        second.mkdir()
        (second / "b.txt").write_text("second run")
        assert (first / "a.txt").read_text() == "first run"  # the second run did not clear the first's
    fs, inner = filesystem(out)
    assert sorted(Path(p).name for p in fs.find(inner)) == ["a.txt", "b.txt"]
    assert not first.parent.exists() and not second.parent.exists()  # staging removed after upload
    with local_output(out) as third:  # a later run starts from what both uploaded
        assert sorted(p.name for p in third.iterdir()) == ["a.txt", "b.txt"]
