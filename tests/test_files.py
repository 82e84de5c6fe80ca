"""io/files.py: atomic writes with normal permissions, unique temporaries, nothing left on failure."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from wsi_encoder.io.files import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_figure,
    atomic_write_json,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_normal_permissions(tmp_path: Path, umask_022: None) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    with atomic_path(tmp_path / "c.npy") as tmp:
        np.save(tmp, np.arange(3))
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("f")
    assert [_mode(tmp_path / n) for n in ("a.bin", "b.json", "c.npy")] == [0o644] * 3
    assert _mode(tmp_path / "d") == 0o755
    assert np.load(tmp_path / "c.npy").tolist() == [0, 1, 2]
    assert json.loads((tmp_path / "b.json").read_text()) == {"k": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "c.npy", "d"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    atomic_write_csv(target, [[1, 2]], header=["a", "b"])

    def write_half() -> None:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_half()
    assert target.read_text() == "a,b\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_failed_folder_write_leaves_the_old_folder(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("old")

    def write_new() -> None:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_new()
    assert (tmp_path / "model" / "config.json").read_text() == "old"
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("w")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_two_writers_never_share_a_temporary(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "x.png") as a, atomic_path(tmp_path / "x.png") as b:
        assert a != b and a.suffix == b.suffix == ".png" and a.parent == b.parent == tmp_path


def test_figures_are_saved_in_the_suffix_format(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    atomic_write_figure(tmp_path / "f.png", fig, dpi=20)
    atomic_write_figure(tmp_path / "f.pdf", fig)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
