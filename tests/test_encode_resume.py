"""A killed `wsienc encode` resumes where it stopped and ends equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from _encode_fixtures import random_patch_store

from wsi_encoder.io.embedding_store import read_slide
from wsi_encoder.pipelines.encode_store import encode_store

# Runs the real pipeline in a child process, slowed down per batch so it can be killed mid-slide.
_CHILD = """
import sys, time
from wsi_encoder.pipelines.encode_store import encode_store
encode_store(sys.argv[1], "nic", sys.argv[2], dtype="float32", chunk_tiles=16, batch_size=16,
             progress=lambda n, total: time.sleep(0.15))
"""


def _written_chunks(out: Path, slide_id: str) -> int:
    folder = out / slide_id / "encoded_chunks" / "c"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


@pytest.mark.slow
def test_resume_after_a_killed_run_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    store = random_patch_store(tmp_path / "p.zarr", 96, (12, 12), slide_ids=("s0", "s1"))
    out = tmp_path / "killed.zarr"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(store), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while _written_chunks(out, "s0") + _written_chunks(out, "s1") < 3:
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    root = zarr.open_group(str(out), mode="r")
    flags = {s: np.asarray(root[s]["encoded_chunks"][:]) for s in ("s0", "s1")}
    done_before = sum(int(f.sum()) for f in flags.values())
    assert 3 <= done_before < 12
    assert not all(root[s].attrs["complete"] for s in ("s0", "s1"))
    # Slides already complete are skipped on the re-run, the others resume.
    expected = {s: ("done" if root[s].attrs["complete"] else "ok") for s in ("s0", "s1")}

    totals: list[int] = []
    result = encode_store(
        store, "nic", out, dtype="float32", chunk_tiles=16, batch_size=16, progress=lambda n, t: totals.append(t)
    )
    assert {s: r.status for s, r in result.slides.items()} == expected
    assert set(totals) == {2 * 96 - 16 * done_before}  # only the chunks the killed run had not written

    reference = tmp_path / "reference.zarr"
    encode_store(store, "nic", reference, dtype="float32", chunk_tiles=16, batch_size=16)
    for slide_id in ("s0", "s1"):
        resumed, clean = read_slide(out, slide_id), read_slide(reference, slide_id)
        np.testing.assert_allclose(resumed.features, clean.features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(resumed.grid, clean.grid, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(resumed.mask, clean.mask)
    assert {v["status"] for v in zarr.open_group(str(out), mode="r").attrs["slides"].values()} == {"ok"}
