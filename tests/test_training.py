"""Multitask training: splits, balanced sampling, augmentation, gradient isolation, learning, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _train_fixtures import make_kather, make_pcam
from safetensors.torch import load_file
from skimage.color import combine_stains, hed_from_rgb, rgb2hed, rgb_from_hed

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.models.checkpoint import WEIGHTS_NAME, load_encoder, read_checkpoint_config
from wsi_encoder.models.encoders import create_encoder
from wsi_encoder.models.heads import MultiTaskModel
from wsi_encoder.pipelines.train_encoder import parse_task_argument, prepare_tasks, train_encoder
from wsi_encoder.tasks import load_task
from wsi_encoder.tasks.data import concat_task_data
from wsi_encoder.training.augment import NO_AUGMENT, AugmentConfig, colour_augment, hed_mix, sample_view
from wsi_encoder.training.multitask import TrainConfig
from wsi_encoder.training.task_sampling import TaskBalancedPlan
from wsi_encoder.training.task_splits import split_task

torch.set_num_threads(2)

TINY = {"input_size": 64, "embed_dim": 16, "workers": 0, "batch_size": 12, "cache_mb": 256, "plots": False}


def _breakhis(breakhis_dirs: list[Path], task: str = "breakhis-malignancy"):
    return concat_task_data([load_task(task, d) for d in breakhis_dirs])


@pytest.mark.parametrize("task", ["breakhis-malignancy", "breakhis-subtype", "breakhis-magnification"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_groups_never_cross_the_split(breakhis_dirs: list[Path], task: str, seed: int) -> None:
    data = _breakhis(breakhis_dirs, task)
    split = split_task(data, 0.2, seed)
    train_groups, val_groups = set(data.groups[split.train]), set(data.groups[split.val])
    assert train_groups and val_groups
    assert not train_groups & val_groups
    assert len(split.train) + len(split.val) == len(data)


def test_split_uses_the_datasets_own_split_and_handles_edge_cases(tmp_path: Path) -> None:
    data = load_task("pcam", make_pcam(tmp_path / "p", {"train": 8, "valid": 4, "test": 4}))
    split = split_task(data, 0.2, 0)
    assert set(data.split[split.train]) == {"train"} and set(data.split[split.val]) == {"val"}
    assert split.method == "dataset's own split"
    only_train = load_task("pcam", make_pcam(tmp_path / "q", {"train": 8}, meta=True, wsis_per_split=4))
    s2 = split_task(only_train, 0.25, 0)
    assert not set(only_train.groups[s2.train]) & set(only_train.groups[s2.val]) and len(s2.val)
    assert len(split_task(only_train, 0.0, 0).val) == 0
    with pytest.raises(InvalidParameterError):
        split_task(only_train, 1.0, 0)


def test_plan_is_task_balanced_deterministic_and_covers_each_task() -> None:
    plan = TaskBalancedPlan((1000, 7), batch_size=9, seed=3)
    per_task = np.zeros(2, int)
    seen_small: list[int] = []
    for step in range(14):
        batch = plan.batch(step)
        tasks = np.array([t for t, _, _ in batch])
        counts = np.bincount(tasks, minlength=2)
        assert counts.min() >= 4  # a big task does not drown a small one
        per_task += counts
        seen_small += [i for t, i, _ in batch if t == 1]
        assert batch == TaskBalancedPlan((1000, 7), 9, 3).batch(step)  # pure function of (seed, step)
    assert abs(per_task[0] - per_task[1]) <= 1
    # without replacement: every image of the small task once per pass over it
    for k in range(len(seen_small) // 7):
        assert sorted(seen_small[7 * k : 7 * k + 7]) == list(range(7))
    assert plan.batch(5) != TaskBalancedPlan((1000, 7), 9, 4).batch(5)
    with pytest.raises(InvalidParameterError, match="smaller than the number of tasks"):
        TaskBalancedPlan((5, 5, 5), batch_size=2, seed=0)


def test_sample_view_field_of_view_and_geometry() -> None:
    image = np.zeros((400, 400, 3), np.uint8)
    image[:, :200] = 255  # left half white
    # 0.25 µm/px source, 0.5 µm/px encoder: a 64-px view covers 128 source px
    centred = sample_view(image, input_size=64, input_mpp=0.5, src_mpp=0.25, rng=None)
    assert centred.shape == (64, 64, 3) and centred.flags.writeable
    assert centred[:, :30].mean() > 250 and centred[:, 34:].mean() < 5  # edge at the centre
    native = sample_view(image, input_size=64, input_mpp=0.5, src_mpp=float("nan"), rng=None)
    assert np.array_equal(native, image[168:232, 168:232])
    small = sample_view(image[:50, :50], input_size=64, input_mpp=0.5, src_mpp=0.5, rng=None)
    assert small.shape == (64, 64, 3)
    cfg = AugmentConfig()
    a = sample_view(image, input_size=64, input_mpp=0.5, src_mpp=0.25, rng=np.random.default_rng(7), config=cfg)
    b = sample_view(image, input_size=64, input_mpp=0.5, src_mpp=0.25, rng=np.random.default_rng(7), config=cfg)
    assert np.array_equal(a, b)
    views = {
        sample_view(image, input_size=64, input_mpp=0.5, src_mpp=0.25, rng=np.random.default_rng(s), config=cfg).tobytes()
        for s in range(8)
    }
    assert len(views) > 1


def test_hed_jitter_matches_skimage_colour_deconvolution() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.2, 1.0, (8, 8, 3))
    alpha, beta = np.array([1.05, 0.97, 1.02]), np.array([0.01, -0.02, 0.0])
    # reference: scikit-image's deconvolution (rgb2hed without the clipping), jitter, combine_stains
    stains = (np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)) @ hed_from_rgb
    expected = combine_stains(stains * alpha + beta / -np.log(1e-6), rgb_from_hed)  # beta in OD units
    mix, offset = hed_mix(alpha, beta)
    got = np.clip(np.exp(np.log(rgb) @ mix + offset), 0, 1)
    assert np.allclose(got, expected, atol=1e-5)
    assert np.allclose(np.clip(np.exp(np.log(rgb) @ hed_mix(np.ones(3), np.zeros(3))[0]), 0, 1), rgb, atol=1e-5)
    assert np.allclose(rgb2hed(rgb), np.maximum(stains, 0))  # same matrices as skimage.rgb2hed


def test_colour_augment_is_seeded_and_bounded() -> None:
    view = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    assert colour_augment(view, np.random.default_rng(0), NO_AUGMENT) is view
    a = colour_augment(view, np.random.default_rng(3), AugmentConfig())
    b = colour_augment(view, np.random.default_rng(3), AugmentConfig())
    assert a.dtype == np.uint8 and a.shape == view.shape and np.array_equal(a, b)
    assert not np.array_equal(a, view)
    assert np.abs(a.astype(int) - view.astype(int)).mean() < 40  # a jitter, not a new image


def test_a_head_gets_no_gradient_from_other_tasks_samples() -> None:
    enc = create_encoder("nic", embed_dim=8, input_size=64)
    model = MultiTaskModel(enc, {"a": 2, "b": 3})
    x = torch.rand(6, 3, 64, 64)
    tasks = torch.tensor([0, 1, 0, 1, 1, 0])
    labels = torch.tensor([1, 2, 0, 0, 1, 1])
    out = model(x, tasks, labels)
    head_a = list(model.heads["a"].parameters())
    grads = torch.autograd.grad(out["losses"]["b"], head_a, retain_graph=True, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    # and the total loss gives head "a" exactly the gradient of task a's own loss
    total = torch.autograd.grad(out["loss"], head_a, retain_graph=True)
    own = torch.autograd.grad(out["losses"]["a"], head_a, retain_graph=True)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(total, own, strict=True))
    # changing task b's labels leaves head a's gradient unchanged
    out2 = model(x, tasks, torch.tensor([1, 0, 0, 2, 2, 1]))
    total2 = torch.autograd.grad(out2["loss"], head_a)
    assert all(torch.allclose(g1, g2) for g1, g2 in zip(total, total2, strict=True))
    # per-task loss weights scale each task's share
    weighted = model(x, tasks, labels, {"a": 0.0, "b": 2.0})
    assert torch.allclose(weighted["loss"], 2.0 * weighted["losses"]["b"])


def _train_set_losses(model: MultiTaskModel, prepared) -> dict[str, float]:
    """Per-task loss over every training image (centred views, eval mode)."""
    from wsi_encoder.training.task_sampling import MultiTaskImages, collate

    ds = MultiTaskImages([p.train for p in prepared], 64, 0.5)
    keys = [(t, i) for t, p in enumerate(prepared) for i in range(len(p.split.train))]
    images, tasks, labels = collate([ds[k] for k in keys])
    model.eval()
    with torch.no_grad():
        out = model(images.float() / 255, tasks, labels)
    return {k: float(v) for k, v in out["losses"].items()}


@pytest.mark.slow
def test_training_lowers_the_loss_on_real_and_generated_layouts(breakhis_dirs: list[Path], tmp_path: Path) -> None:
    kather = make_kather(tmp_path / "NCT-CRC-HE-100K", n_per_class=4, size=80)
    pcam = make_pcam(tmp_path / "pcam", {"train": 24}, meta=True)
    requests = [
        f"breakhis-malignancy={breakhis_dirs[0]}",
        f"breakhis-malignancy={breakhis_dirs[1]}",
        f"kather-crc={kather}",
        f"pcam={pcam}",
    ]
    cfg = TrainConfig(max_steps=24, steps_per_epoch=12, lr=3e-3, seed=0, **TINY)
    prepared = prepare_tasks(requests, val_fraction=cfg.val_fraction, seed=cfg.seed)
    assert [p.name for p in prepared] == ["breakhis-malignancy", "kather-crc", "pcam"]
    assert len(prepared[0].data) == 58
    init = MultiTaskModel(
        create_encoder("nic", embed_dim=16, input_size=64, seed=0), {p.name: len(p.data.classes) for p in prepared}
    )
    before = _train_set_losses(init, prepared)
    steps = []
    result = train_encoder(requests, tmp_path / "out", cfg, on_step=steps.append)
    assert result.step == 24 and len(steps) == 24
    assert set(steps[-1].task_losses) == {"breakhis-malignancy", "kather-crc", "pcam"}
    trained = MultiTaskModel(
        create_encoder("nic", embed_dim=16, input_size=64), {p.name: len(p.data.classes) for p in prepared}
    )
    trained.load_state_dict(load_file(str(tmp_path / "out" / WEIGHTS_NAME)))
    after = _train_set_losses(trained, prepared)
    assert sum(after.values()) < 0.8 * sum(before.values())
    assert all(after[k] < before[k] for k in before), (before, after)
    cfg_json = read_checkpoint_config(tmp_path / "out")
    assert cfg_json["complete"] is True and len(cfg_json["history"]) == 2
    assert set(cfg_json["validation"]) == {"breakhis-malignancy", "kather-crc", "pcam"}
    assert {"accuracy", "auc", "f1"} <= set(cfg_json["validation"]["kather-crc"])
    assert cfg_json["tasks"][1]["classes"] == list(load_task("kather-crc", kather).classes)
    assert cfg_json["encoder"]["input_mpp"] == 0.5 and cfg_json["versions"]["torch"] == torch.__version__
    enc = load_encoder(tmp_path / "out")
    assert enc(torch.rand(2, 3, 64, 64)).shape == (2, 16)


@pytest.mark.slow
def test_resume_reaches_the_same_weights_and_workers_do_not_matter(tmp_path: Path) -> None:
    kather = make_kather(tmp_path / "k", n_per_class=3, size=64, classes=("ADI", "LYM", "TUM"))
    requests = [f"kather-crc={kather}", f"imagefolder={kather},name=folder,weight=0.5"]
    common = {**TINY, "batch_size": 6, "steps_per_epoch": 2, "seed": 5}
    straight = train_encoder(requests, tmp_path / "a", TrainConfig(max_steps=4, **common))
    assert straight.step == 4 and straight.resumed_from == 0

    def interrupt(info) -> None:
        if info.step == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_encoder(requests, tmp_path / "b", TrainConfig(max_steps=4, **common), on_step=interrupt)
    assert read_checkpoint_config(tmp_path / "b")["step"] == 2
    second = train_encoder(requests, tmp_path / "b", TrainConfig(max_steps=4, **{**common, "workers": 1}))
    assert second.resumed_from == 2 and second.step == 4
    a = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "b" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = train_encoder(requests, tmp_path / "b", TrainConfig(max_steps=4, **common))
    assert again.already_complete
    with pytest.raises(InvalidParameterError, match=r"different run \(differs in: lr\)"):
        train_encoder(requests, tmp_path / "b", TrainConfig(max_steps=4, **{**common, "lr": 0.1}))
    fresh = train_encoder(requests, tmp_path / "b", TrainConfig(max_steps=1, **{**common, "lr": 0.1}), resume=False)
    assert fresh.step == 1 and fresh.resumed_from == 0


def test_parse_task_argument() -> None:
    r = parse_task_argument("patch-store=/data/p.zarr,labels=/data/l.csv,weight=2,name=tiles,mpp=0.5")
    assert (r.task, str(r.path), r.name, r.weight, r.mpp, r.options) == (
        "patch-store",
        "/data/p.zarr",
        "tiles",
        2.0,
        0.5,
        {"labels": "/data/l.csv"},
    )
    for bad, msg in [
        ("kather-crc", "NAME=PATH"),
        ("kather=/x", "unknown task 'kather'"),
        ("kather-crc=", "no path"),
        ("kather-crc=/x,labels=y", "unknown option 'labels'"),
        ("kather-crc=/x,weight=heavy", "must be numbers"),
        ("kather-crc=/x,oops", "key=value"),
    ]:
        with pytest.raises(InvalidParameterError, match=msg):
            parse_task_argument(bad)
