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


def test_tile_and_encode_path_options_take_urls(s3: str, tmp_path: Path) -> None:
    """--slide-mpp-csv read from s3://, --qc-dir, --h5-dir and --preview-dir written to s3://: the same files as local paths."""
    from click.testing import CliRunner

    from tests._tile_helpers import small_slide
    from wsi_encoder.cli import main

    folder = tmp_path / "slides"
    folder.mkdir()
    slide = small_slide(folder / "a.tiff", seed=1)
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\na,0.25\n")
    fs, inner = filesystem(s3)
    fs.put(str(slide), f"{inner}/cohort/a.tiff")
    fs.put(str(table), f"{inner}/tables/mpp.csv")
    runner = CliRunner()

    def run(args: list[str]) -> None:
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output

    run(["tile", str(folder), "--out", str(tmp_path / "p.zarr"), "--slide-mpp-csv", str(table), "--qc-dir", str(tmp_path / "qc"), "--workers", "1"])
    run(["tile", f"{s3}/cohort/", "--out", f"{s3}/p.zarr", "--slide-mpp-csv", f"{s3}/tables/mpp.csv", "--qc-dir", f"{s3}/qc", "--workers", "1"])
    run(["encode", str(tmp_path / "p.zarr"), "--encoder", "nic", "--out", str(tmp_path / "e.zarr"),
         "--h5-dir", str(tmp_path / "h5"), "--preview-dir", str(tmp_path / "pv")])  # fmt: skip
    run(["encode", f"{s3}/p.zarr", "--encoder", "nic", "--out", f"{s3}/e.zarr", "--h5-dir", f"{s3}/h5", "--preview-dir", f"{s3}/pv"])
    from wsi_encoder.io.patch_store import open_patch_store

    assert open_patch_store(f"{s3}/p.zarr")["a"].attrs["mpp_source"] == "csv"
    assert fs.cat_file(f"{inner}/qc/a.png") == (tmp_path / "qc" / "a.png").read_bytes()
    assert fs.isfile(f"{inner}/h5/a.h5") and fs.isfile(f"{inner}/pv/a.png")
    assert fs.cat_file(f"{inner}/pv/a.png") == (tmp_path / "pv" / "a.png").read_bytes()


def test_weights_from_a_url_give_the_local_files_embeddings(s3: str, tmp_path: Path) -> None:
    """encode --weights s3://...: fetched once per process, the same features as the local file, the URL recorded."""
    import numpy as np
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from tests._tile_helpers import small_slide
    from wsi_encoder.cli import main
    from wsi_encoder.io.embedding_store import EmbeddingStore
    from wsi_encoder.models.encoders import create_encoder
    from wsi_encoder.models.encoders.weights import file_sha256

    folder = tmp_path / "slides"
    folder.mkdir()
    small_slide(folder / "a.tiff", seed=2)
    weights = tmp_path / "nic.safetensors"
    encoder = create_encoder("nic", require_weights=False, seed=7)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(weights))
    fs, inner = filesystem(s3)
    fs.put(str(weights), f"{inner}/weights/nic.safetensors")
    runner = CliRunner()
    store = tmp_path / "p.zarr"
    assert runner.invoke(main, ["tile", str(folder), "--out", str(store), "--slide-mpp", "0.25"]).exit_code == 0
    features = {}
    for name, given in (("local", str(weights)), ("url", f"{s3}/weights/nic.safetensors")):
        out = tmp_path / f"{name}.zarr"
        result = runner.invoke(main, ["encode", str(store), "--encoder", "nic", "--weights", given, "--out", str(out)])
        assert result.exit_code == 0, result.output
        emb = EmbeddingStore.open(out)
        features[name] = emb.load("a").features
        assert emb.encoder_identity()["weights_sha256"] == file_sha256(weights)  # the file's, fetched or not
    np.testing.assert_array_equal(features["local"], features["url"])
    missing = runner.invoke(main, ["encode", str(store), "--encoder", "nic", "--weights", f"{s3}/weights/none.safetensors",
                                   "--out", str(tmp_path / "m.zarr")])  # fmt: skip
    assert missing.exit_code != 0 and "none.safetensors" in missing.output


def test_tissue_masks_from_a_url_replace_detection_as_local_ones(s3: str, tmp_path: Path) -> None:
    """tile --tissue-mask s3://...: the same tiles as the local folder; the mask file recorded as its URL."""
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from tests._tile_helpers import small_slide
    from wsi_encoder.cli import main
    from wsi_encoder.io.patch_store import open_patch_store

    folder, masks = tmp_path / "slides", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    small_slide(folder / "a.tiff", seed=3)
    mask = np.zeros((60, 80), np.uint8)
    mask[:, 40:] = 255  # the right half is tissue
    Image.fromarray(mask).save(masks / "a.png")
    fs, inner = filesystem(s3)
    fs.put(str(masks / "a.png"), f"{inner}/masks/a.png")
    runner = CliRunner()
    for name, given in (("local", str(masks)), ("url", f"{s3}/masks")):
        result = runner.invoke(main, ["tile", str(folder), "--out", str(tmp_path / f"{name}.zarr"), "--slide-mpp", "0.25",
                                      "--tissue-mask", given, "--coords-only", "--workers", "1"])  # fmt: skip
        assert result.exit_code == 0, result.output
    local, url = open_patch_store(tmp_path / "local.zarr")["a"], open_patch_store(tmp_path / "url.zarr")["a"]
    assert url.attrs["tissue_method"] == "external-png" and len(url.grid)
    np.testing.assert_array_equal(local.grid, url.grid)
    np.testing.assert_array_equal(local.tissue, url.tissue)
    assert url.attrs["tissue_mask_file"] == f"{s3}/masks/a.png"
    bad = runner.invoke(main, ["tile", str(folder), "--out", str(tmp_path / "b.zarr"), "--tissue-mask", f"{s3}/nothing"])
    assert bad.exit_code != 0 and "not a folder" in bad.output
