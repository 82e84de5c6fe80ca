"""``wsienc info`` on real and generated slides, and every bad input as a user meets it."""

from __future__ import annotations

import json
from pathlib import Path

import openslide
import pytest
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.synthetic import SyntheticSlideSpec, write_synthetic_slide

KEYS = {
    "path", "backend", "vendor", "width", "height", "level_count", "level_dimensions",
    "level_downsamples", "mpp_x", "mpp_y", "objective_power",
}


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "test3-TRITC-2-560.ndpi"])
def test_info_json_agrees_with_openslide(name: str) -> None:
    from tests.conftest import shared_path

    path = shared_path("slides", name)
    code, out, _ = _run("info", "--json", str(path))
    assert code == 0
    record = json.loads(out)
    assert set(record) >= KEYS
    ref = openslide.OpenSlide(str(path))
    assert (record["width"], record["height"]) == ref.dimensions
    # auto reads SVS and NDPI with tiffslide (direct tile decoding): its levels are the file's TIFF pages,
    # which OpenSlide has too (for NDPI it adds levels it synthesises from JPEG restart markers).
    assert record["backend"] == "tiffslide"
    levels = [tuple(d) for d in record["level_dimensions"]]
    assert record["level_count"] == len(levels) and levels[0] == ref.dimensions
    for dims, downsample in zip(levels, record["level_downsamples"], strict=True):
        index = list(ref.level_dimensions).index(dims)
        assert downsample == pytest.approx(ref.level_downsamples[index], rel=1e-3)
    assert record["mpp_x"] == pytest.approx(float(ref.properties["openslide.mpp-x"]))
    assert record["mpp_y"] == pytest.approx(float(ref.properties["openslide.mpp-y"]))
    assert record["objective_power"] == pytest.approx(float(ref.properties["openslide.objective-power"]))
    assert record["vendor"] == ref.properties["openslide.vendor"]


def test_info_table_and_no_mpp(synthetic_slide: Path, synthetic_slide_no_mpp: Path) -> None:
    code, out, _ = _run("info", str(synthetic_slide), str(synthetic_slide_no_mpp))
    assert code == 0
    assert "4096 x 3072 px" in out and "0.5, 0.5 µm/px" in out
    assert "unknown, unknown µm/px" in out
    code, out, _ = _run("info", "--json", str(synthetic_slide_no_mpp))
    assert json.loads(out)["mpp_x"] is None
    code, out, _ = _run("info", "--json", "--slide-mpp", "0.25", str(synthetic_slide_no_mpp))
    assert json.loads(out)["mpp_x"] == 0.25
    # --slide-mpp is a fallback, as in `tile`: a slide that records its resolution keeps it.
    code, out, _ = _run("info", "--json", "--slide-mpp", "0.25", str(synthetic_slide))
    assert code == 0 and json.loads(out)["mpp_x"] == 0.5


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    import numpy as np
    import tifffile

    text = tmp / "notes.svs"
    text.write_text("not a slide\n")
    folder = tmp / "folder"
    folder.mkdir()
    good = write_synthetic_slide(tmp / "good.tif", SyntheticSlideSpec(width=2048, height=2048, seed=2))
    truncated = tmp / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    fluo = tmp / "fluo.tif"
    tifffile.imwrite(fluo, np.zeros((4, 128, 128), np.uint16), tile=(64, 64), metadata={"axes": "CYX"})
    return {
        "missing": (tmp / "missing.svs", "no such file"),
        "directory": (folder, "is a directory"),
        "not a slide": (text, "not a readable slide"),
        "truncated": (truncated, "truncated or corrupt"),
        "fluorescence": (fluo, "multi-channel"),
    }


def test_bad_inputs_one_line_nonzero(tmp_path: Path) -> None:
    for case, (path, phrase) in _bad_inputs(tmp_path).items():
        code, out, err = _run("info", str(path))
        assert code != 0, case
        lines = [line for line in err.strip().splitlines() if line]
        assert len(lines) == 1, f"{case}: {err!r}"
        assert str(path) in lines[0] and phrase in lines[0], f"{case}: {lines[0]!r}"
        assert "Traceback" not in err + out


def test_one_bad_slide_does_not_hide_the_good_ones(tmp_path: Path, synthetic_slide: Path) -> None:
    code, out, err = _run("info", "--json", str(tmp_path / "missing.svs"), str(synthetic_slide))
    assert code == 1
    assert json.loads(out)["width"] == 4096
    assert "missing.svs" in err


def test_info_says_which_levels_another_backend_lists(ndpi_slide) -> None:
    """OpenSlide lists 7 levels for the real NDPI, tiffslide the 4 the file stores: info shows both."""
    import json

    from click.testing import CliRunner

    from wsi_encoder.cli import main

    record = json.loads(CliRunner().invoke(main, ["info", "--json", "--backend", "tiffslide", str(ndpi_slide)]).output)
    assert record["level_count"] == 4 and len(record["other_backends"]["openslide"]) == 7
    assert record["other_backends"]["openslide"][:4] == record["level_dimensions"]
    text = CliRunner().invoke(main, ["info", "--backend", "tiffslide", str(ndpi_slide)]).output
    assert "lists 7 levels; not listed by tiffslide: 248 x 304, 124 x 152, 62 x 76 px" in text
    same = json.loads(CliRunner().invoke(main, ["info", "--json", "--backend", "openslide", str(ndpi_slide)]).output)
    assert same["level_count"] == 7 and same["other_backends"] == {"tiffslide": record["level_dimensions"]}
