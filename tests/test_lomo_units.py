"""LOMO building blocks: metrics and output files, the magnification probe, DCGAN, image cache, trainer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.evaluation.lomo_outputs import (
    EMBEDDING_KEYS,
    RESULTS_COLUMNS,
    fold_metrics,
    load_fold_embeddings,
    read_results_csv,
    save_fold_embeddings,
    write_results_csv,
)
from wsi_encoder.evaluation.lomo_report import magnification_probe
from wsi_encoder.models.dcgan import Discriminator, Generator
from wsi_encoder.models.encoders import create_encoder
from wsi_encoder.training.gan_trainer import (
    DcganSpec,
    generate,
    load_generator,
    random_crops,
    save_generator,
    train_dcgan,
)
from wsi_encoder.training.lomo_arms import GanArm, GrlArm
from wsi_encoder.training.lomo_data import augment, build_image_cache
from wsi_encoder.training.lomo_trainer import (
    TrainData,
    TrainSpec,
    build_classifier,
    embed,
    shared_state,
    train_classifier,
)


def test_fold_metrics_image_and_patient_level() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    prob = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2])
    patients = np.array(["a", "a", "b", "b", "c", "d"])
    m = fold_metrics(y, prob, patients)
    assert m["n_test_images"] == 6 and m["n_test_patients"] == 4
    assert m["brier"] == pytest.approx(np.mean((prob - y) ** 2))
    # patient means: a 0.35 (benign), b 0.6, c 0.9 (malignant), d 0.2 (benign) -> perfectly ranked
    assert m["patient_auc"] == 1.0
    # recognition rate: a 1/2, b 1/2, c 1, d 1
    assert m["patient_recognition_rate"] == pytest.approx(0.75)
    one_class = fold_metrics([1, 1], [0.7, 0.8], ["x", "y"])
    assert math.isnan(one_class["auc"]) and math.isnan(one_class["patient_auc"])


def test_results_csv_round_trip(tmp_path: Path) -> None:
    rows = [
        {
            "arm": "grl",
            "held_out": 200,
            "auc": 0.91,
            "f1": 0.8,
            "balanced_accuracy": 0.75,
            "brier": 0.1,
            "ece": 0.05,
            "n_test_images": 30,
            "n_test_patients": 4,
            "patient_auc": float("nan"),
        },
    ]
    path = write_results_csv(tmp_path / "results.csv", rows)
    assert path.read_text().splitlines()[0] == ",".join(RESULTS_COLUMNS)
    back = read_results_csv(path)
    assert back[0]["held_out"] == 200 and isinstance(back[0]["held_out"], int)
    assert back[0]["auc"] == pytest.approx(0.91) and math.isnan(back[0]["patient_auc"])


def test_embeddings_npz_types_and_no_pickles(tmp_path: Path) -> None:
    arrays = {
        "X_train": np.ones((3, 4)),
        "y_train": [0, 1, 1],
        "patient_train": ["14-1", "14-22549AB", "14-2"],
        "magnification_train": [40, 100, 200],
        "filename_train": ["a.png", "b.png", "c.png"],
        "X_test": np.zeros((0, 4)),
        "y_test": [],
        "patient_test": [],
        "magnification_test": [],
        "filename_test": [],
        "prob_test": [],
    }
    path = save_fold_embeddings(tmp_path / "e" / "heldout_400.npz", arrays)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(EMBEDDING_KEYS)
        assert data["X_train"].dtype == np.float32 and data["X_train"].shape == (3, 4)
        assert data["X_test"].shape == (0, 4)
        assert data["y_train"].dtype == np.int64 and data["magnification_train"].dtype == np.int64
        assert data["patient_train"].dtype.kind == "U" and data["patient_train"][1] == "14-22549AB"
        assert data["prob_test"].dtype == np.float32
    assert load_fold_embeddings(path)["filename_train"].tolist() == ["a.png", "b.png", "c.png"]
    np.savez(tmp_path / "bad.npz", X_train=np.zeros((1, 2)))
    with pytest.raises(DatasetError, match="lacks"):
        load_fold_embeddings(tmp_path / "bad.npz")


def _probe(rows: list[dict], probe: str, split: str) -> float:
    (row,) = [r for r in rows if r["probe"] == probe and r["split"] == split]
    return float(row["balanced_accuracy"])


def test_magnification_probe_reads_linear_magnification_signal() -> None:
    rng = np.random.default_rng(0)
    mags = np.repeat([40, 100, 200], 40)
    patients = np.tile(np.repeat([f"p{i}" for i in range(8)], 5), 3)
    signal = np.eye(3)[np.searchsorted([40, 100, 200], mags)] * 3.0
    x = np.hstack([signal, rng.normal(size=(120, 5))]) + rng.normal(scale=0.3, size=(120, 8))
    xt = np.hstack([signal, rng.normal(size=(120, 5))]) + rng.normal(scale=0.3, size=(120, 8))
    strong = magnification_probe(x, mags, patients, xt, mags)
    assert {(r["probe"], r["split"]) for r in strong} == {
        (p, s) for p in ("linear", "mlp") for s in ("train_cv", "test_patients")
    }
    for row in strong:
        assert row["balanced_accuracy"] > 0.9, row
        assert row["chance"] == pytest.approx(1 / 3)
    noise = magnification_probe(rng.normal(size=(120, 8)), mags, patients, rng.normal(size=(120, 8)), mags)
    assert _probe(noise, "linear", "test_patients") < 0.6 and _probe(noise, "mlp", "test_patients") < 0.6


def test_magnification_probe_is_grouped_by_patient() -> None:
    # Each patient has one magnification and an identity code in the features: ungrouped CV would
    # read magnification off the patient code; grouped CV cannot.
    rng = np.random.default_rng(1)
    n_pat = 12
    patients = np.repeat([f"p{i}" for i in range(n_pat)], 10)
    mags = np.repeat(np.resize([40, 100, 200], n_pat), 10)
    codes = rng.normal(size=(n_pat, 30)) * 5
    x = codes[np.repeat(np.arange(n_pat), 10)] + rng.normal(scale=0.1, size=(120, 30))
    grouped = magnification_probe(x, mags, patients, x[:0], mags[:0], n_splits=4)
    assert _probe(grouped, "linear", "train_cv") < 0.7
    ungrouped = magnification_probe(x, mags, np.arange(120).astype(str), x[:0], mags[:0], n_splits=4)
    assert _probe(ungrouped, "linear", "train_cv") > 0.9


def test_magnification_probe_undefined_cases_are_nan() -> None:
    x = np.zeros((6, 2))
    one_mag = magnification_probe(x, [40] * 6, list("abcabc"), x, [40] * 6)
    one_patient = magnification_probe(x, [40, 100] * 3, ["a"] * 6, x, [40, 100] * 3)
    for rows in (one_mag, one_patient):
        assert all(math.isnan(r["balanced_accuracy"]) for r in rows)


def test_dcgan_architecture_follows_radford() -> None:
    torch.manual_seed(0)
    gen, disc = Generator(width=8), Discriminator(width=8)
    z = torch.randn(3, 100)
    img = gen(z)
    assert img.shape == (3, 3, 64, 64) and img.abs().max() <= 1
    assert disc(img).shape == (3,)
    convs = [m for m in gen.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == 5
    assert not any(
        isinstance(m, torch.nn.Linear | torch.nn.MaxPool2d) for m in [*gen.modules(), *disc.modules()]
    )
    assert torch.cat([c.weight.flatten() for c in convs]).std().item() == pytest.approx(0.02, rel=0.1)
    first = list(disc.net)[:2]
    assert isinstance(first[0], torch.nn.Conv2d) and isinstance(first[1], torch.nn.LeakyReLU)
    assert first[1].negative_slope == 0.2


def test_train_dcgan_generate_and_save(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(100, 200, size=(6, 64, 64, 3), dtype=np.uint8)
    seen = []
    gen = train_dcgan(
        images,
        DcganSpec(epochs=2, batch_size=4, width=4),
        seed=1,
        on_epoch=lambda e, n, s: seen.append((e, n, sorted(s))),
    )
    assert seen == [(1, 2, ["loss_d", "loss_g"]), (2, 2, ["loss_d", "loss_g"])]
    samples = generate(gen, 5, seed=2)
    assert samples.shape == (5, 64, 64, 3) and samples.dtype == np.uint8
    assert np.array_equal(samples, generate(gen, 5, seed=2))
    save_generator(tmp_path / "g", gen, {"class": "benign"})
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["config.json", "model.safetensors"]
    back, meta = load_generator(tmp_path / "g")
    assert meta == {"class": "benign"}
    assert np.array_equal(generate(back, 5, seed=2), samples)
    with pytest.raises(InvalidParameterError):
        train_dcgan(images[:, :32], DcganSpec(epochs=1, width=4))


def _coordinate_images(n: int, size: int) -> np.ndarray:
    """Pixel (r, c) of image i holds (r, c, i): a crop says where it came from, a resize does not."""
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([np.stack([r, c, np.full_like(r, i)], axis=-1) for i in range(n)]).astype(np.uint8)


def test_random_crops_are_native_scale_crops() -> None:
    images = _coordinate_images(5, 96)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    offsets = set()
    for seed in range(3):
        crops = random_crops(x, torch.Generator().manual_seed(seed))
        assert crops.shape == (5, 3, 64, 64)
        for i, crop in enumerate(crops):
            r, q = int(crop[0, 0, 0]), int(crop[1, 0, 0])
            torch.testing.assert_close(crop, x[i, :, r : r + 64, q : q + 64], rtol=0, atol=0)
            offsets.add((r, q))
    assert len(offsets) > 5  # fresh offsets per image and draw
    same = torch.rand(2, 3, 64, 64)
    assert random_crops(same, torch.Generator()) is same


def test_the_dcgan_sees_crops_at_the_classifier_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    forward = Discriminator.forward

    def spy(self: Discriminator, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return forward(self, x)

    monkeypatch.setattr(Discriminator, "forward", spy)
    train_dcgan(_coordinate_images(4, 96), DcganSpec(epochs=1, batch_size=4, width=4), seed=0)
    real = (seen[0] + 1.0) * 255.0 / 2.0  # the first call of a step scores the real batch
    assert real.shape == (4, 3, 64, 64)
    for crop in real.round():
        rows, cols = np.unique(crop[0].numpy()), np.unique(crop[1].numpy())
        # 64 consecutive native rows and columns (flips and 90° turns only reorder them): no resize
        assert len(rows) == len(cols) == 64 and rows[-1] - rows[0] == cols[-1] - cols[0] == 63


def test_gan_arm_builds_classifier_inputs_as_mosaics_of_one_class() -> None:
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(10) % 2
    arm = GanArm(pool, labels, 1.0)
    images, y = arm.extra_samples(7, np.random.default_rng(1), 100)
    assert images.shape == (7, 100, 100, 3) and images.dtype == np.uint8
    for img, c in zip(images, y, strict=True):
        for r0, c0 in ((0, 0), (0, 64), (64, 0), (64, 64)):
            tile = img[r0 : r0 + 64, c0 : c0 + 64]
            match = [j for j in range(10) if np.array_equal(pool[j][: tile.shape[0], : tile.shape[1]], tile)]
            assert match and all(labels[j] == c for j in match)  # unresized crops of the image's class
    small, _ = arm.extra_samples(3, np.random.default_rng(2), 32)
    assert small.shape == (3, 32, 32, 3)  # inputs smaller than a crop: one crop, resized down


def test_image_cache_is_built_once_and_reports_unreadable_files(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((46, 70, 3), 40 * i, np.uint8)).save(p)
        paths.append(p)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths.append(bad)
    arr, failed = build_image_cache(paths, 16, tmp_path / "cache")
    assert arr.shape == (4, 16, 16, 3) and arr[2].mean() == pytest.approx(80, abs=1)
    assert list(failed) == ["broken.png"]
    stamp = (tmp_path / "cache" / "images_16.npy").stat().st_mtime_ns
    again, _ = build_image_cache(paths, 16, tmp_path / "cache")
    assert (tmp_path / "cache" / "images_16.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(again, arr)
    fewer, _ = build_image_cache(paths[:2], 16, tmp_path / "cache")
    assert fewer.shape[0] == 2


def test_augment_only_flips_and_rotates() -> None:
    x = torch.rand(16, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0))
    for a, b in zip(x, out, strict=True):
        candidates = [a, a.flip(-1), a.flip(-2), a.flip(-1).flip(-2)]
        candidates += [c.transpose(-1, -2) for c in candidates]
        assert any(torch.equal(b, c) for c in candidates)


def _toy_data(n: int = 24, size: int = 64) -> TrainData:
    """Class = colour (red-ish vs blue-ish), three domains of brightness."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    images = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        base = np.array([200, 60, 60] if y[i] else [60, 60, 200]) + 20 * (i % 3)
        images[i] = np.clip(base + rng.normal(0, 10, (size, size, 3)), 0, 255)
    rows = np.arange(n, dtype=np.int64)
    return TrainData(images, rows[:18], y[:18], rows[:18] % 3, rows[18:], y[18:])


def test_all_arms_start_from_the_same_weights() -> None:
    init = shared_state(create_encoder("nic", seed=5, input_size=64), seed=5)
    base = build_classifier(create_encoder("nic", seed=99, input_size=64), init)
    grl = build_classifier(create_encoder("nic", seed=98, input_size=64), init, GrlArm(3, hidden=16))
    grl_state = grl.state_dict()
    for key, value in base.state_dict().items():
        assert torch.equal(value, grl_state[key]), key
    assert any(k.startswith("aux.") for k in grl_state)
    assert shared_state(create_encoder("nic", seed=5, input_size=64), seed=5).keys() == init.keys()


def test_train_classifier_learns_and_keeps_the_best_epoch() -> None:
    torch.set_num_threads(2)
    data = _toy_data()
    init = shared_state(create_encoder("nic", seed=0, input_size=64), seed=0)
    arm = GrlArm(3, hidden=16)
    model = build_classifier(create_encoder("nic", input_size=64), init, arm)
    epochs = []
    result = train_classifier(
        model,
        data,
        TrainSpec(epochs=3, batch_size=6, lr=1e-3, selection="best-val"),
        arm,
        seed=0,
        on_epoch=lambda e, n, s: epochs.append(s),
    )
    assert result.steps == 9 and len(result.history) == 3 and 1 <= result.selected_epoch <= 3
    assert {"loss", "loss_label", "loss_extra", "lambda", "val_auc", "val_loss"} <= set(epochs[0])
    assert epochs[-1]["lambda"] > epochs[0]["lambda"] > 0
    assert not model.training
    feats, prob = embed(model, data.images, np.arange(24))
    assert feats.shape == (24, 128) and feats.dtype == np.float32
    assert prob.shape == (24,) and ((prob >= 0) & (prob <= 1)).all()
    y = np.arange(24) % 2
    assert prob[y == 1].mean() > prob[y == 0].mean()


def test_train_classifier_needs_two_images() -> None:
    data = _toy_data()
    data.train_rows, data.y_train, data.domain_train = (
        data.train_rows[:1],
        data.y_train[:1],
        data.domain_train[:1],
    )
    model = build_classifier(
        create_encoder("nic", input_size=64), shared_state(create_encoder("nic", input_size=64), 0)
    )
    with pytest.raises(DatasetError, match="at least 2"):
        train_classifier(model, data, TrainSpec(epochs=1))
