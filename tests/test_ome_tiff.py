"""OME-TIFF (pyramidal RGB brightfield): µm/px from its OME-XML, the same levels and pixels locally and over s3://;
multi-channel fluorescence OME-TIFF refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from click.testing import CliRunner

from tests import _remote_fixtures as remote
from wsi_encoder.cli import main
from wsi_encoder.io.slide_mpp import ome_mpp
from wsi_encoder.io.slides import open_slide
from wsi_encoder.pipelines.tile_cohort import tile_cohort
from wsi_encoder.tiling import TileSpec

s3_server, s3, upload = remote.s3_server, remote.s3, remote.upload


def write_ome(path: Path, *, size_nm: float = 250.0, resolution_tags: bool = False) -> np.ndarray:
    """A 3-level pyramidal RGB OME-TIFF (JPEG tiles in SubIFDs) whose pixel size is only in the OME-XML (nm)."""
    yy, xx = np.mgrid[0:1536, 0:2048]
    img = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], axis=-1).astype(np.uint8)
    img[:400, :600] = (235, 200, 220)
    md = {"axes": "YXS", "PhysicalSizeX": size_nm, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": size_nm,
          "PhysicalSizeYUnit": "nm"}
    opts = {"photometric": "rgb", "tile": (256, 256), "compression": "jpeg"}
    with tifffile.TiffWriter(path) as tif:
        extra = {"resolution": (1e4 / 0.9, 1e4 / 0.9), "resolutionunit": "CENTIMETER"} if resolution_tags else {}
        tif.write(img, subifds=2, metadata=md, **opts, **extra)
        for k in (2, 4):
            tif.write(img[::k, ::k], subfiletype=1, **opts)
    return img


def test_ome_mpp_reads_units_and_refuses_nonsense() -> None:
    xml = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels '
           'PhysicalSizeX="0.5" PhysicalSizeY="500" PhysicalSizeYUnit="nm" SizeX="1" SizeY="1"/></Image>'
           '<Image ID="Image:1"><Pixels PhysicalSizeX="2" PhysicalSizeXUnit="parsec" PhysicalSizeY="2"/></Image></OME>')
    assert ome_mpp(xml, 0) == (0.5, 0.5)  # µm by default, nm converted
    assert ome_mpp(xml, 1) is None and ome_mpp(xml, 2) is None and ome_mpp("<not xml", 0) is None


def test_ome_tiff_reads_mpp_from_ome_xml_and_tiles(tmp_path: Path) -> None:
    path = tmp_path / "slide.ome.tif"
    img = write_ome(path, resolution_tags=True)  # the OME-XML wins over contradicting resolution tags
    with open_slide(path) as reader:
        assert reader.mpp == (0.25, 0.25)
        assert reader.level_dimensions == ((2048, 1536), (1024, 768), (512, 384))
        region = reader.read_region((700, 500), 0, (300, 200))
        assert np.abs(region.astype(int) - img[500:700, 700:1000]).mean() < 3  # JPEG
    report = tile_cohort([path], tmp_path / "p.zarr", TileSpec(target_mpp=0.5, tile_size=128), workers=1)
    assert not report.failed and len(report.ok) == 1
    info = CliRunner().invoke(main, ["info", "--json", str(path)])
    assert '"mpp_x": 0.25' in info.output


def test_ome_tiff_over_s3_equals_local(s3: str, tmp_path: Path) -> None:
    path = tmp_path / "slide.ome.tif"
    write_ome(path)
    url = upload(s3, path, "ome/slide.ome.tif")
    with open_slide(path, backend="tiffslide") as local, open_slide(url) as far:
        assert far.mpp == local.mpp == (0.25, 0.25) and far.level_dimensions == local.level_dimensions
        for level in range(far.level_count):
            assert np.array_equal(far.read_region((64, 32), level, (200, 150)), local.read_region((64, 32), level, (200, 150)))


def test_fluorescence_ome_tiff_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "fluo.ome.tif"
    data = np.random.default_rng(0).integers(0, 65535, (3, 512, 512)).astype(np.uint16)
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
                     tile=(256, 256), photometric="minisblack")
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "fluorescence" in lines[0]
