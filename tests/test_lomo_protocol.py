"""The LOMO protocol a reviewer would accept: strict patients, a guarded backbone, intervals that cover,
gradient reversal from the first step, the same real-data budget in every arm, a fair probe."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests._lomo_fixtures import write_breakhis_tree
from wsi_encoder.cli import main
from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.evaluation.splits import lomo_folds, split_patients
from wsi_encoder.io.breakhis import scan_breakhis
from wsi_encoder.models import grl as grl_module
from wsi_encoder.models.checkpoint import save_checkpoint
from wsi_encoder.models.encoders import create_encoder
from wsi_encoder.models.grl import dann_lambda
from wsi_encoder.pipelines import lomo as lomo_pipeline
from wsi_encoder.pipelines.lomo_config import LomoConfig
from wsi_encoder.tasks.builtin import breakhis_malignancy
from wsi_encoder.training import lomo_trainer
from wsi_encoder.training.lomo_arms import BaselineArm, GanArm, GrlArm
from wsi_encoder.training.lomo_trainer import (
    TrainData,
    TrainSpec,
    build_classifier,
    embed,
    frozen_batchnorm,
    label_loss,
    shared_state,
    train_classifier,
)


def _number(filename: str) -> str:
    """The case number read straight from a BreaKHis name, independently of the library."""
    match = re.match(r"SOB_[BM]_[A-Z]+-(\d+)-(\d+)", filename)
    assert match, filename
    return f"{match[1]}-{match[2]}"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- strict patients


def test_default_split_of_the_real_images_never_shares_a_patient_number(breakhis_dirs: list[Path]) -> None:
    images = sorted(
        {im.filename: im for d in breakhis_dirs for im in scan_breakhis(d)}.values(), key=lambda im: im.filename
    )
    assert len(images) == 58
    leaks = {"number": 0, "token": 0}
    for key in leaks:
        for seed in range(50):
            split = split_patients(images, seed=seed, key=key)
            for fold in lomo_folds(images, split, key=key):
                test = {_number(images[i].filename) for i in fold.test + fold.probe_test}
                side = {_number(images[i].filename) for i in fold.train + fold.val}
                if test & side:
                    leaks[key] += 1
                    break
    assert leaks["number"] == 0
    assert leaks["token"] > 0  # the old default leaked: the check can fail


def test_train_encoder_breakhis_tasks_group_by_the_same_patient_number(breakhis_dirs: list[Path]) -> None:
    groups = {path.name: group for path, _, group in breakhis_malignancy(breakhis_dirs[1])}
    assert groups["SOB_B_A-14-22549AB-40-011.png"] == groups["SOB_B_A-14-22549CD-40-007.png"] == "14-22549"
    assert groups["SOB_B_A-14-22549G-40-007.png"] == "14-22549"
    assert groups["SOB_B_TA-14-16184-40-034.png"] == groups["SOB_B_TA-14-16184CD-40-015.png"] == "14-16184"


# ----------------------------------------------------------------------------- backbone guard


def _checkpoint(folder: Path, tasks: list[dict]) -> Path:
    encoder = create_encoder("nic", seed=0, input_size=64)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_checkpoint(folder, state, {"encoder": encoder.config.to_dict(), "tasks": tasks})
    return folder


def test_a_contaminated_checkpoint_is_refused(tmp_path: Path) -> None:
    data = write_breakhis_tree(tmp_path / "data", n_benign=2, n_malignant=2, per_magnification=1)
    ckpt = _checkpoint(
        tmp_path / "enc", [{"name": "mag", "task": "breakhis-magnification", "paths": [str(tmp_path / "x")]}]
    )
    result = CliRunner().invoke(main, ["lomo", str(data), "--out", str(tmp_path / "o"), "--backbone", str(ckpt)])
    assert result.exit_code == 1
    assert "breakhis-magnification" in result.output and "--allow-contaminated-backbone" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "cache").exists()  # refused before any work
    # any task whose data overlap DATA is refused too
    other = _checkpoint(tmp_path / "enc2", [{"name": "t", "task": "folder", "paths": [str(data.parent)]}])
    config = LomoConfig(backbone=str(other), image_size=64)
    provenance = lomo_pipeline.backbone_provenance(config, [data])
    assert provenance["source"] == "checkpoint" and provenance["weights_sha256"]
    assert provenance["training_tasks"][0]["task"] == "folder"
    with pytest.raises(InvalidParameterError, match="overlaps DATA"):
        lomo_pipeline.check_backbone(config, provenance)
    allowed = LomoConfig(backbone=str(other), image_size=64, allow_contaminated_backbone=True)
    lines = lomo_pipeline.check_backbone(allowed, provenance)
    assert lines and lines[0].startswith("CONTAMINATED BACKBONE")
    clean = _checkpoint(tmp_path / "enc3", [{"name": "crc", "task": "kather-crc", "paths": [str(tmp_path / "crc")]}])
    assert lomo_pipeline.check_backbone(
        LomoConfig(backbone=str(clean)), lomo_pipeline.backbone_provenance(LomoConfig(backbone=str(clean)), [data])
    ) == []


def test_random_init_is_warned_and_weights_are_identified_by_content(tmp_path: Path) -> None:
    config = LomoConfig(backbone="nic")
    provenance = lomo_pipeline.backbone_provenance(config, [tmp_path])
    assert provenance["source"] == "random_init"
    assert "random initialisation" in lomo_pipeline.check_backbone(config, provenance)[0]
    weights = tmp_path / "w.pt"
    torch.save(create_encoder("nic", seed=1).state_dict(), weights)
    with_file = lomo_pipeline.backbone_provenance(LomoConfig(backbone="nic", weights=str(weights)), [tmp_path])
    import hashlib

    assert with_file["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- intervals


# ----------------------------------------------------------------------------- arms


def _toy_data(n: int = 24, size: int = 64) -> TrainData:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    images = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        base = np.array([200, 60, 60] if y[i] else [60, 60, 200]) + 20 * (i % 3)
        images[i] = np.clip(base + rng.normal(0, 10, (size, size, 3)), 0, 255)
    rows = np.arange(n, dtype=np.int64)
    return TrainData(images, rows[:18], y[:18], rows[:18] % 3, rows[18:], y[18:])


def _model(arm: BaselineArm | None = None) -> lomo_trainer.LomoClassifier:
    init = shared_state(create_encoder("nic", seed=0, input_size=64), seed=0)
    return build_classifier(create_encoder("nic", input_size=64), init, arm)


def test_grl_reverses_the_gradient_from_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[dict[str, object]] = []
    original = grl_module.GradientReversal.forward

    def spy(self: grl_module.GradientReversal, x: torch.Tensor) -> torch.Tensor:
        record: dict[str, object] = {"lambda": self.lambd}
        x_in = x.view_as(x)  # a node of its own: only the reversed gradient reaches it
        x_in.register_hook(lambda g: record.__setitem__("g_in", g.detach().clone()))
        out = original(self, x_in)
        out.register_hook(lambda g: record.__setitem__("g_out", g.detach().clone()))
        captured.append(record)
        return out

    monkeypatch.setattr(grl_module.GradientReversal, "forward", spy)
    arm = GrlArm(3, hidden=16)
    spec = TrainSpec(epochs=2, batch_size=6, lr=1e-3)
    result = train_classifier(_model(arm), _toy_data(), spec, arm, seed=0)
    first = captured[0]
    lam = float(first["lambda"])  # type: ignore[arg-type]
    assert lam == pytest.approx(dann_lambda(1 / result.steps)) and lam > 0
    g_in, g_out = first["g_in"], first["g_out"]
    assert isinstance(g_in, torch.Tensor) and isinstance(g_out, torch.Tensor)
    assert float(g_in.abs().sum()) > 0
    torch.testing.assert_close(g_in, -lam * g_out)
    # the logged λ of an epoch is the one applied at its last step
    per_epoch = result.steps // 2
    assert result.history[0]["lambda"] == pytest.approx(float(captured[per_epoch - 1]["lambda"]))  # type: ignore[arg-type]
    assert result.history[-1]["lambda"] == pytest.approx(dann_lambda(1.0))
    assert result.selection == "last"  # the default rule, for every arm


def test_grl_needs_two_training_magnifications() -> None:
    with pytest.raises(InvalidParameterError, match="at least 2 training magnifications"):
        GrlArm(1)


def test_the_gan_arm_sees_as_many_real_images_per_epoch_as_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: dict[str, list[np.ndarray]] = {"baseline": [], "gan": []}
    current = {"arm": "baseline"}
    stream = lomo_trainer.batch_stream

    def spy(images: np.ndarray, rows: list[np.ndarray], **kw: object):
        batches[current["arm"]].extend(r.copy() for r in rows)  # training rows = image indices in _toy_data
        return stream(images, rows, **kw)

    monkeypatch.setattr(lomo_trainer, "batch_stream", spy)
    data = _toy_data()
    spec = TrainSpec(epochs=2, batch_size=5, lr=1e-3)
    base = train_classifier(_model(), data, spec, BaselineArm(), seed=4)
    current["arm"] = "gan"
    synthetic = np.full((18, 64, 64, 3), 128, np.uint8)
    gan = train_classifier(_model(), data, spec, GanArm(synthetic, np.ones(18, np.int64), 1.0), seed=4)
    assert base.real_seen == gan.real_seen == [18, 18]  # every real image once per epoch, in both arms
    assert gan.extra_seen == [18, 18] and base.extra_seen == [0, 0]  # synthetic images on top (ratio 1)
    assert base.steps == gan.steps
    for a, b in zip(batches["baseline"], batches["gan"], strict=True):
        np.testing.assert_array_equal(a, b)  # the same real images in the same batches
    for epoch in range(2):
        per_epoch = batches["gan"][epoch * 4 : (epoch + 1) * 4]
        assert sorted(np.concatenate(per_epoch).tolist()) == list(range(18))


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def test_gan_ratio_zero_reproduces_the_baseline_exactly() -> None:
    data = _toy_data()
    spec = TrainSpec(epochs=2, batch_size=5, lr=1e-3)
    base_model, gan_model = _model(), _model()
    base = train_classifier(base_model, data, spec, BaselineArm(), seed=3)
    pool = np.random.default_rng(1).integers(0, 256, (18, 64, 64, 3), dtype=np.uint8)
    gan = train_classifier(gan_model, data, spec, GanArm(pool, np.arange(18) % 2, 0.0), seed=3)
    assert gan.extra_seen == [0, 0] and gan.history == base.history
    b_state, g_state = base_model.state_dict(), gan_model.state_dict()
    assert b_state.keys() == g_state.keys()
    for k in b_state:
        assert torch.equal(b_state[k], g_state[k]), k  # the same weights, bit for bit
    rows = np.arange(24)
    for b, g in zip(embed(base_model, data.images, rows), embed(gan_model, data.images, rows), strict=True):
        np.testing.assert_array_equal(b, g)  # the same predictions


def test_the_gan_arm_trains_on_the_baselines_real_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real images go through their own forward pass, augmented exactly as in the baseline."""
    seen: dict[str, list[tuple[bool, torch.Tensor]]] = {"baseline": [], "gan": []}
    current = {"arm": "baseline"}
    forward = lomo_trainer.LomoClassifier.forward

    def spy(self: lomo_trainer.LomoClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = next(m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d))
        if self.training:
            seen[current["arm"]].append((bn.training, x.detach().clone()))
        return forward(self, x)

    monkeypatch.setattr(lomo_trainer.LomoClassifier, "forward", spy)
    data = _toy_data()
    spec = TrainSpec(epochs=1, batch_size=5, lr=1e-3)
    train_classifier(_model(), data, spec, BaselineArm(), seed=2)
    current["arm"] = "gan"
    pool = np.full((18, 64, 64, 3), 255, np.uint8)
    train_classifier(_model(), data, spec, GanArm(pool, np.ones(18, np.int64), 2.0), seed=2)
    real = [x for bn_train, x in seen["gan"] if bn_train]
    synthetic = [x for bn_train, x in seen["gan"] if not bn_train]
    assert len(real) == len(seen["baseline"]) == 4 and len(synthetic) == 4
    for (_, b), g in zip(seen["baseline"], real, strict=True):
        torch.testing.assert_close(b, g, rtol=0, atol=0)  # real-only batches, the baseline's augmentation
    assert [len(x) for x in synthetic] == [2 * len(x) for x in real]  # ratio 2 per real image
    assert all(bool((x == 1.0).all()) for x in synthetic)  # white synthetic images, BatchNorm frozen


def test_a_synthetic_forward_leaves_batchnorm_statistics_unchanged() -> None:
    model = _model().train()
    before = _bn_buffers(model)
    x = torch.rand(6, 3, 64, 64)
    with frozen_batchnorm(model):
        _, logit = model(x)
        logit.sum().backward()
    after = _bn_buffers(model)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(m.training for m in model.modules())  # every mode restored
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.encoder.parameters())
    model(x)  # a normal training forward does update them (the check above can fail)
    assert not torch.equal(before[next(k for k in before if "running_mean" in k)], _bn_buffers(model)[
        next(k for k in before if "running_mean" in k)
    ])


def test_the_gan_arms_batchnorm_statistics_come_from_real_images_only() -> None:
    """At a negligible learning rate the weights stay put: the running statistics must then match the
    baseline's, however far the synthetic images are from the real ones."""
    data = _toy_data()
    spec = TrainSpec(epochs=2, batch_size=5, lr=1e-12)
    base_model, gan_model = _model(), _model()
    train_classifier(base_model, data, spec, BaselineArm(), seed=1)
    pool = np.full((18, 64, 64, 3), 255, np.uint8)
    train_classifier(gan_model, data, spec, GanArm(pool, np.ones(18, np.int64), 1.0), seed=1)
    base, gan = _bn_buffers(base_model), _bn_buffers(gan_model)
    for k in base:
        torch.testing.assert_close(gan[k], base[k], rtol=1e-4, atol=1e-5, msg=k)


def test_label_loss_keeps_the_real_share_of_the_baseline() -> None:
    gen = torch.Generator().manual_seed(0)
    lr, yr = torch.randn(8, generator=gen), (torch.rand(8, generator=gen) > 0.5).long()
    ls, ys = torch.randn(16, generator=gen), (torch.rand(16, generator=gen) > 0.5).long()
    real_only, none = label_loss(lr, yr)
    real, syn = label_loss(lr, yr, ls, ys)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert none is None and syn is not None
    torch.testing.assert_close(real_only, bce(lr, yr.float()))  # the baseline's loss
    torch.testing.assert_close(real, real_only)  # not diluted by the synthetic images
    torch.testing.assert_close(syn, 2.0 * bce(ls, ys.float()))  # ratio 2: each synthetic image weighs 1/n_real


# ----------------------------------------------------------------------------- epoch selection


def _snapshots(model: torch.nn.Module, store: dict[int, dict[str, torch.Tensor]]):  # type: ignore[no-untyped-def]
    def on_epoch(epoch: int, epochs: int, stats: dict[str, float]) -> None:
        store[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    return on_epoch


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_last_keeps_the_final_epochs_weights() -> None:
    model, store = _model(), {}
    result = train_classifier(
        model, _toy_data(), TrainSpec(epochs=3, batch_size=6, lr=1e-2), seed=0, on_epoch=_snapshots(model, store)
    )
    assert result.selection == "last" and result.selected_epoch == 3
    final = model.state_dict()
    assert _same(final, store[3]) and not _same(final, store[1]) and not _same(final, store[2])


@pytest.mark.parametrize("arm_name", ["baseline", "grl"])
def test_best_val_never_keeps_an_epoch_in_the_lambda_ramp(monkeypatch: pytest.MonkeyPatch, arm_name: str) -> None:
    """Validation AUC falls every epoch, so an unrestricted best-val would keep epoch 1."""
    calls = {"n": 0}

    def falling(*args: object, **kwargs: object) -> dict[str, float]:
        calls["n"] += 1
        return {"val_auc": 1.0 - 0.1 * calls["n"], "val_loss": 0.1 * calls["n"]}

    monkeypatch.setattr(lomo_trainer, "_validate", falling)
    arm = GrlArm(3, hidden=16) if arm_name == "grl" else BaselineArm()
    model, store = _model(arm), {}
    spec = TrainSpec(epochs=4, batch_size=6, lr=1e-2, selection="best-val")
    result = train_classifier(model, _toy_data(), spec, arm, seed=0, on_epoch=_snapshots(model, store))
    ramp_end = grl_module.dann_ramp_end()
    assert dann_lambda(ramp_end) == pytest.approx(0.99)
    assert result.selected_epoch / 4 >= ramp_end  # epochs 1 and 2 end inside the ramp (progress < 0.529)
    assert result.selected_epoch == 3 and _same(model.state_dict(), store[3])
    calls["n"] = 0
    unrestricted = TrainSpec(epochs=4, batch_size=6, lr=1e-2, selection="best-val", select_from=0.0)
    assert train_classifier(_model(arm), _toy_data(), unrestricted, arm, seed=0).selected_epoch == 1


def test_cli_selection_option_sets_one_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import click

    seen: dict[str, LomoConfig] = {}

    def fake(data: object, out_dir: object, config: LomoConfig, **kwargs: object) -> None:
        seen["config"] = config
        raise click.ClickException("stopped")

    monkeypatch.setattr(lomo_pipeline, "run_lomo", fake)
    CliRunner().invoke(main, ["lomo", str(tmp_path), "--out", str(tmp_path / "o"), "--selection", "best-val"])
    assert {seen["config"].selection(a) for a in ("baseline", "gan", "grl")} == {"best-val"}
    CliRunner().invoke(main, ["lomo", str(tmp_path), "--out", str(tmp_path / "o")])
    assert seen["config"].select_epoch == "last"


# ----------------------------------------------------------------------------- a small run end to end


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("lomo_protocol")
    data = write_breakhis_tree(root, n_benign=4, n_malignant=4, per_magnification=1, seed=2)
    captured: list[dict] = []
    probe = lomo_pipeline.lomo_report.magnification_probe

    def spy(x_train, mag_train, patients_train, x_test, mag_test, **kw):
        captured.append({"patients_train": list(patients_train), "n_test": len(x_test)})
        return probe(x_train, mag_train, patients_train, x_test, mag_test, **kw)

    config = LomoConfig(backbone="nic", image_size=64, epochs=2, batch_size=8, lr=1e-3, domain_hidden=32,
                        n_bootstrap=200)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lomo_pipeline.lomo_report, "magnification_probe", spy)
        lomo_pipeline.run_lomo([data], root / "out", config, arms=["baseline", "grl"], device="cpu")
    return root / "out", captured


def test_results_carry_intervals_paired_deltas_and_the_kept_epoch(small_run: tuple[Path, list[dict]]) -> None:
    out, _ = small_run
    rows = _rows(out / "results.csv")
    assert {"auc_ci_low", "brier_ci_high", "delta_auc", "delta_brier_ci_low", "selected_epoch", "grl_lambda"} <= set(
        rows[0]
    )
    for r in rows:
        assert float(r["brier_ci_low"]) <= float(r["brier"]) <= float(r["brier_ci_high"])
        for metric in ("f1", "ece", "patient_auc"):  # each fold's own intervals, beside AUC and Brier's
            if r[metric] not in ("", "nan") and r[f"{metric}_ci_low"] not in ("", "nan"):  # nan: one class of patients
                assert float(r[f"{metric}_ci_low"]) <= float(r[metric]) + 1e-9 <= float(r[f"{metric}_ci_high"]) + 2e-9, (metric, r)
        assert r["f1_ci_low"] != "" and r["ece_ci_high"] != ""
        if r["arm"] == "baseline":
            assert r["delta_auc"] == "" and r["grl_lambda"] == ""
        else:
            assert r["delta_brier"] != "" and r["selected_epoch"] == "2"  # grl keeps its last epoch
            assert float(r["grl_lambda"]) == pytest.approx(dann_lambda(1.0), abs=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["patient_key"] == "number" and config["selection"] == {"baseline": "last", "grl": "last"}  # one rule per arm, recorded
    assert config["backbone_provenance"]["source"] == "random_init"
    report = (out / "report.md").read_text()
    assert report.index("random initialisation") < report.index("## Results")
    assert "grouped by case number" in report
    assert "the interval spans zero" in report or "the interval excludes zero" in report
    # one overall estimate per arm and metric, one joint interval each, and the pre-specified primary endpoint
    overall = _rows(out / "results_overall.csv")
    assert list(overall[0])[:6] == ["arm", "metric", "estimate", "ci_low", "ci_high", "method"]
    pairs = {(r["arm"], r["metric"]) for r in overall}
    assert {("baseline", m) for m in ("auc", "brier", "f1", "balanced_accuracy")} <= pairs
    assert {("grl", "delta_auc"), ("grl", "delta_brier")} <= pairs and ("baseline", "delta_auc") not in pairs
    folds = [r for r in rows if r["arm"] == "baseline"]
    auc = next(r for r in overall if (r["arm"], r["metric"]) == ("baseline", "auc"))
    assert float(auc["estimate"]) == pytest.approx(np.nanmean([float(r["auc"]) for r in folds]), abs=1e-6)
    assert int(auc["n_folds"]) == len(folds)
    assert report.index("## Primary endpoint") < report.index("## Results per held-out")
    assert "mean over the" in report and "grl − baseline" in report


def test_the_probe_is_scored_on_test_patients_only(small_run: tuple[Path, list[dict]]) -> None:
    out, captured = small_run
    splits = _rows(out / "splits.csv")
    probe = _rows(out / "probe.csv")
    assert list(probe[0]) == ["arm", "held_out", "probe", "split", "balanced_accuracy", "chance"]
    assert {(r["probe"], r["split"]) for r in probe} == {
        (p, s) for p in ("linear", "mlp") for s in ("train_cv", "test_patients")
    }
    for arm in ("baseline", "grl"):
        for m in (40, 100, 200, 400):
            with np.load(out / "embeddings" / arm / f"heldout_{m}.npz", allow_pickle=False) as npz:
                names, patients = npz["filename_probe"].tolist(), set(npz["patient_probe"].tolist())
                train_patients = set(npz["patient_train"].tolist())
            fold = {r["filename"]: r for r in splits if int(r["fold"]) == m}
            test_patients = {r["patient_id"] for r in fold.values() if r["role"] == "test"}
            assert names and {fold[n]["role"] for n in names} == {"probe_test"}
            assert patients == test_patients and not patients & train_patients
    assert captured and all(c["n_test"] > 0 for c in captured)
    report = (out / "report.md").read_text()
    section = report[report.index("## Magnification probe") :]
    assert section.index("test patients") < section.index("train CV")


def test_grl_is_refused_with_one_training_magnification(tmp_path: Path) -> None:
    data = write_breakhis_tree(tmp_path, n_benign=2, n_malignant=2, per_magnification=2, magnifications=(40, 100))
    result = CliRunner().invoke(
        main,
        ["lomo", str(data), "--out", str(tmp_path / "o"), "--arms", "grl", "--backbone", "nic", "--image-size", "64"],
    )
    assert result.exit_code == 0, result.output
    assert "grl/40: refused" in result.output and "gradient reversal needs at least 2" in result.output
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert set(config["refused"]) == {"grl/40", "grl/100"} and config["arms"] == []
    assert "Arms refused in a fold" in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.slow
def test_repeats_summarise_mean_and_sd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_breakhis_tree(tmp_path, n_benign=3, n_malignant=3, per_magnification=1, seed=5)
    config = LomoConfig(backbone="nic", image_size=64, epochs=1, batch_size=8, repeats=2, n_bootstrap=100)
    probe = lomo_pipeline.lomo_report.magnification_probe
    # The repeat summary holds no probe numbers: the probes (most of this test's time) score nothing here.
    monkeypatch.setattr(
        lomo_pipeline.lomo_report, "magnification_probe",
        lambda x_train, mag_train, patients_train, x_test, mag_test, **kw: probe(
            x_train, np.zeros(len(x_train)), patients_train, x_test, mag_test, **kw
        ),
    )
    run = lomo_pipeline.run_lomo([data], tmp_path / "o", config, arms=["baseline", "grl"], device="cpu")
    top = json.loads((tmp_path / "o" / "config.json").read_text())
    assert top["repeat_dirs"] == ["repeat_0", "repeat_1"]
    assert [json.loads((tmp_path / "o" / d / "config.json").read_text())["seed"] for d in top["repeat_dirs"]] == [0, 1]
    rows = _rows(tmp_path / "o" / "repeats.csv")
    assert rows and all(r["n_repeats"] == "2" for r in rows)
    report = (tmp_path / "o" / "report.md").read_text()
    assert run.summary and "± " in report and "## Primary endpoint" in report
    overall = _rows(tmp_path / "o" / "results_overall.csv")
    per_repeat = [_rows(tmp_path / "o" / d / "results_overall.csv") for d in top["repeat_dirs"]]
    pooled = next(r for r in overall if (r["arm"], r["metric"]) == ("grl", "delta_auc"))
    assert int(pooled["n_folds"]) == sum(int(p[0]["n_folds"]) for p in per_repeat)  # every repeat's folds pooled
    mean = np.mean([float(next(r for r in p if (r["arm"], r["metric"]) == ("grl", "delta_auc"))["estimate"])
                    for p in per_repeat])
    assert float(pooled["estimate"]) == pytest.approx(mean, abs=1e-6)
