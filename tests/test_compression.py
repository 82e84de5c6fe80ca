"""The science of `wsienc encode`: grid assembly, resampling plans, batched inference with prefetching."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_encoder import compression as nic
from wsi_encoder.errors import InvalidParameterError, StoreError


def _cells(rng: np.random.Generator, n: int, shape: tuple[int, int]) -> np.ndarray:
    flat = rng.choice(shape[0] * shape[1], size=n, replace=False)
    return np.stack([flat // shape[1], flat % shape[1]], axis=1).astype(np.int32)


def test_grid_holds_every_tile_at_its_cell_and_zeros_elsewhere() -> None:
    rng = np.random.default_rng(0)
    shape = (7, 11)
    rowcol = _cells(rng, 30, shape)
    features = rng.normal(size=(30, 5)).astype(np.float32)
    grid, mask = nic.assemble_grid(features, rowcol, shape)
    assert grid.shape == (5, 7, 11)
    for i, (r, c) in enumerate(rowcol):
        np.testing.assert_array_equal(grid[:, r, c], features[i])
    expected = np.zeros(shape, dtype=bool)
    expected[rowcol[:, 0], rowcol[:, 1]] = True
    np.testing.assert_array_equal(mask, expected)
    assert not grid[:, ~mask].any()


def test_grid_bands_equal_the_whole_grid() -> None:
    rng = np.random.default_rng(1)
    shape = (13, 6)
    rowcol = _cells(rng, 40, shape)
    features = rng.normal(size=(40, 3)).astype(np.float32)
    whole, whole_mask = nic.assemble_grid(features, rowcol, shape)
    grid = np.full_like(whole, np.nan)
    mask = np.zeros(shape, dtype=bool)
    for row0, band, band_mask in nic.grid_bands(rowcol, shape, lambda idx: features[idx], band_rows=4):
        grid[:, row0 : row0 + band.shape[1]] = band
        mask[row0 : row0 + band.shape[1]] = band_mask
    np.testing.assert_array_equal(grid, whole)
    np.testing.assert_array_equal(mask, whole_mask)


def test_empty_slide_gives_an_empty_grid() -> None:
    grid, mask = nic.assemble_grid(np.zeros((0, 4), np.float32), np.zeros((0, 2), np.int32), (3, 2))
    assert grid.shape == (4, 3, 2) and not grid.any() and not mask.any()


@pytest.mark.parametrize("rowcol", [[[0, 0], [0, 0]], [[0, 0], [3, 0]], [[0, -1], [1, 1]]])
def test_bad_grid_positions_are_refused(rowcol: list[list[int]]) -> None:
    with pytest.raises(StoreError):
        nic.assemble_grid(np.ones((2, 2), np.float32), np.asarray(rowcol), (3, 3))


def test_resample_plan_matching_tiles_are_used_as_they_are() -> None:
    plan = nic.plan_resample(128, 0.5, 128, 0.5)
    assert not plan.resample and plan.out_size == 128 and plan.describe() is None
    assert nic.plan_resample(128, 0.503, 128, 0.5).describe() is None  # scanner noise within tolerance


def test_resample_plan_other_mpp_goes_to_the_encoder_resolution() -> None:
    plan = nic.plan_resample(256, 0.25, 128, 0.5)
    assert plan.resample and plan.out_size == 128 and plan.out_mpp == pytest.approx(0.5)
    assert plan.describe() is None  # the same field of view: resized to exactly the encoder's resolution
    message = nic.plan_resample(256, 0.5, 128, 0.5).describe()
    assert message is not None
    assert "256 px at 0.5 µm/px" in message and "128 px at 0.5 µm/px" in message


def test_resample_plan_resizes_to_the_input_size_and_warns_on_mpp() -> None:
    plan = nic.plan_resample(256, 0.5, 224, 0.5)  # CLAM's 256-px tiles: resized to 224, seen at 0.571 µm/px
    assert plan.resample and plan.out_size == 224 and plan.out_mpp == pytest.approx(256 * 0.5 / 224)
    message = plan.describe()
    assert message is not None and "256 px at 0.5 µm/px" in message and "224 px" in message
    assert "--tile-size 224" in message and "0.5714" in message
    plan = nic.plan_resample(448, 0.25, 224, 0.5)  # same field of view: exact
    assert plan.resample and plan.out_size == 224 and plan.describe() is None
    assert nic.plan_resample(256, 0.5, 224, 0.5, tolerance=0.2).describe() is None  # within the tile spec's tolerance


def test_tiles_to_tensor_scales_and_resizes() -> None:
    tiles = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    tiles[0, ..., 0] = 255
    x = nic.tiles_to_tensor(tiles, torch.device("cpu"), 8)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert float(x[0, 0].min()) == 1.0 and float(x[0, 1].max()) == 0.0 and float(x[1].max()) == 0.0
    y = nic.tiles_to_tensor(tiles, torch.device("cpu"), 4)
    assert y.shape == (2, 3, 4, 4)
    assert torch.allclose(y[0, 0], torch.ones(4, 4))


@pytest.mark.parametrize(
    ("name", "tile"),
    [("prov-gigapath", 224), ("prov-gigapath", 256), ("virchow2", 256), ("hibou-b", 180), ("kaiko-vitb8", 300),
     ("phikon", 256), ("resnet50-trunc", 512)],
)
def test_tiles_to_tensor_is_the_cards_torchvision_resize(name: str, tile: int) -> None:
    """Each entry's resize (interpolation, centre crop) equals torchvision.transforms.v2 ``Resize`` (+ ``CenterCrop``)
    as its card writes it, on the same tiles (clamped to [0, 1], as 8-bit images are)."""
    from torchvision.transforms import InterpolationMode, v2

    from wsi_encoder.models.encoders import get_spec, resize_options

    spec = get_spec(name)
    card = {  # the cards' transforms, written out (Prov-GigaPath: Resize(256, bicubic) + CenterCrop(224))
        "prov-gigapath": [v2.Resize(256, InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(224)],
        "virchow2": [v2.Resize(224, InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(224)],
        "hibou-b": [v2.Resize((224, 224), InterpolationMode.BICUBIC, antialias=True)],
        "kaiko-vitb8": [v2.Resize(224, InterpolationMode.BILINEAR, antialias=True), v2.CenterCrop(224)],
        "phikon": [v2.Resize((224, 224), InterpolationMode.BILINEAR, antialias=True)],
        "resnet50-trunc": [v2.Resize(224, InterpolationMode.BILINEAR, antialias=True), v2.CenterCrop(224)],
    }[name]
    tiles = np.random.default_rng(0).integers(0, 256, size=(3, tile, tile, 3), dtype=np.uint8)
    ours = nic.tiles_to_tensor(tiles, torch.device("cpu"), spec.input_size, **resize_options(name))
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    ref = v2.Compose([card[0], v2.Lambda(lambda t: t.clamp(0, 1)), *card[1:]])(x)
    assert ours.shape == (3, 3, 224, 224)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_tiles_to_tensor_refuses_an_unknown_filter() -> None:
    with pytest.raises(InvalidParameterError, match="interpolation 'lanczos'"):
        nic.tiles_to_tensor(np.zeros((1, 8, 8, 3), np.uint8), torch.device("cpu"), 4, interpolation="lanczos")


def test_prefetch_keeps_order_and_raises_at_the_failing_item() -> None:
    assert list(nic.prefetch(range(7), depth=3)) == list(range(7))
    producer_threads: set[str] = set()

    def items():
        for i in range(3):
            producer_threads.add(threading.current_thread().name)
            yield i
        raise OSError("disk gone")

    got: list[int] = []
    with pytest.raises(OSError, match="disk gone"):
        got.extend(nic.prefetch(items()))
    assert got == [0, 1, 2]
    assert threading.current_thread().name not in producer_threads


def test_iter_blocks_aligns_reads_to_the_block_grid() -> None:
    calls = []

    def read(a: int, b: int) -> np.ndarray:
        calls.append((a, b))
        return np.zeros((b - a, 1, 1, 3), np.uint8)

    list(nic.iter_blocks(read, 5, 27, 8))
    assert calls == [(5, 8), (8, 16), (16, 24), (24, 27)]


@pytest.fixture(scope="module")
def nic_model() -> tuple[torch.nn.Module, nic.EncoderIdentity]:
    return nic.load_encoder_cached("nic", None, "cpu")


def test_encoder_is_loaded_once_per_process(nic_model: tuple[torch.nn.Module, nic.EncoderIdentity]) -> None:
    loads = nic.encoder_loads()
    again, identity = nic.load_encoder_cached("nic", None, "cpu")
    assert again is nic_model[0] and nic.encoder_loads() == loads
    assert identity.name == "nic" and identity.embedding_dim == 128 and identity.weights_sha256
    assert identity.input_size == 128 and identity.input_mpp == 0.5


def test_encode_tiles_equals_a_direct_forward_pass(nic_model: tuple[torch.nn.Module, nic.EncoderIdentity]) -> None:
    model, identity = nic_model
    rng = np.random.default_rng(2)
    tiles = rng.integers(0, 256, (21, 128, 128, 3), dtype=np.uint8)
    seen = []
    got = nic.encode_tiles(
        model,
        nic.iter_blocks(lambda a, b: tiles[a:b], 0, 21, 8),
        n_tiles=21,
        embedding_dim=identity.embedding_dim,
        batch_size=5,
        out_size=128,
        device=torch.device("cpu"),
        progress=seen.append,
    )
    with torch.inference_mode():
        direct = model(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0).numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-5)
    assert sum(seen) == 21 and max(seen) <= 5


def test_encode_tiles_resamples_to_the_planned_size(nic_model: tuple[torch.nn.Module, nic.EncoderIdentity]) -> None:
    model, identity = nic_model
    tiles = np.random.default_rng(3).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    got = nic.encode_tiles(
        model, [tiles], n_tiles=4, embedding_dim=identity.embedding_dim, batch_size=4, out_size=128, device=torch.device("cpu")
    )
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(128, 128), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    with torch.inference_mode():
        direct = model(x).numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-5)


def test_encode_tiles_checks_the_tile_count(nic_model: tuple[torch.nn.Module, nic.EncoderIdentity]) -> None:
    model, _ = nic_model
    tiles = np.zeros((3, 128, 128, 3), np.uint8)
    with pytest.raises(StoreError, match="expected 5"):
        nic.encode_tiles(model, [tiles], n_tiles=5, embedding_dim=128, batch_size=2, out_size=128, device=torch.device("cpu"))
    with pytest.raises(InvalidParameterError):
        nic.encode_tiles(model, [tiles], n_tiles=3, embedding_dim=128, batch_size=0, out_size=128, device=torch.device("cpu"))


def test_reused_batch_buffers_never_hand_a_batch_the_pixels_of_another() -> None:
    """The CPU feed converts batches into reused buffers while the model runs: a slow model whose output is a
    view of its input (copied out before its buffer is reused) still gets every tile's own pixels."""
    import time

    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (7, 16, 3, 16, 16, 1, 9)]
    seen: list[int] = []

    def viewing_model(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.005)  # the producer threads run ahead into other buffers
        seen.append(x.data_ptr())
        return x[:, :, 0, :2].reshape(x.shape[0], -1)  # a view into the batch's buffer

    got = nic.encode_tiles(viewing_model, blocks, n_tiles=68, embedding_dim=6, batch_size=4, out_size=8,
                           device=torch.device("cpu"))  # fmt: skip
    tiles = np.concatenate(blocks)
    expected = (tiles[:, 0, :2, :].transpose(0, 2, 1).astype(np.float32) / np.float32(255)).reshape(68, 6)
    np.testing.assert_array_equal(got, expected)
    assert len(set(seen)) < len(seen)  # buffers were reused (fewer buffers than batches)


def test_tiles_to_tensor_values_are_torchvisions_to_tensor_bit_for_bit() -> None:
    from torchvision.transforms.functional import to_tensor

    tiles = np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3).astype(np.uint8)  # every value 0..255
    ours = nic.tiles_to_tensor(tiles, torch.device("cpu"), 16)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 16, 16)
    assert torch.equal(ours[0], to_tensor(tiles[0]))


def test_resample_plan_honours_the_cards_centre_crop() -> None:
    """Prov-GigaPath's Resize(256) + CenterCrop(224): its card's 256-px tiles at 0.5 µm/px reach the encoder at
    0.5 µm/px (the crop keeps pixels, it does not rescale them); 224-px tiles are enlarged to 256 first."""
    from wsi_encoder.models.encoders import resize_options

    crop = resize_options("prov-gigapath")["crop_fraction"]
    plan = nic.plan_resample(256, 0.5, 224, 0.5, crop_fraction=crop)
    assert plan.out_size == 224 and plan.resize_size == 256 and plan.out_mpp == pytest.approx(0.5)
    assert plan.describe() is None
    plan = nic.plan_resample(224, 0.5, 224, 0.5, crop_fraction=crop)
    assert plan.out_mpp == pytest.approx(224 * 0.5 / 256)
    message = plan.describe()
    assert message is not None and "resized to 256 px and centre-cropped to 224 px" in message
    assert "--tile-size 256" in message
    assert nic.plan_resample(224, 0.5, 224, 0.5, crop_fraction=resize_options("kaiko-vitb8")["crop_fraction"]).describe() is None
    with pytest.raises(InvalidParameterError, match="crop_fraction"):
        nic.plan_resample(256, 0.5, 224, 0.5, crop_fraction=0.0)


def test_encode_plans_with_the_entrys_crop() -> None:
    """The plan `wsienc encode` makes for a slide's tiles takes the encoder's crop from the registry."""
    from wsi_encoder.pipelines.encode_store import _plan

    def identity(name: str) -> nic.EncoderIdentity:
        return nic.EncoderIdentity(name=name, spec=name, config={}, weights_sha256=None, embedding_dim=1,
                                   input_size=224, input_mpp=0.5)

    attrs = {"tile_size": 256, "actual_mpp": 0.5}
    assert _plan(attrs, identity("prov-gigapath")).out_mpp == pytest.approx(0.5)
    assert _plan(attrs, identity("uni")).out_mpp == pytest.approx(256 * 0.5 / 224)
