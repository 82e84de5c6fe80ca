"""``wsienc signatures`` end to end on generated LOMO folders and embedding stores, and bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _signatures_fixtures import write_embedding_store, write_lomo_folder
from click.testing import CliRunner
from PIL import Image

from wsi_encoder.cli import main
from wsi_encoder.evaluation.signature_records import SIGNATURE_COLUMNS
from wsi_encoder.evaluation.signatures import expected_jaccard, jaccard

CONTRACT = ["arm", "fold", "size", "auc_full", "auc_signature", "f1_full", "f1_signature", "brier_full", "brier_signature"]
GRL_DIMS = (1, 5, 9, 13, 17)


def _baseline_dims(arm: str, m: int) -> tuple[int, ...]:
    """The baseline arm's informative dimensions move between folds; the GRL arm's stay put."""
    if arm == "grl":
        return GRL_DIMS
    start = {40: 0, 100: 5, 200: 10, 400: 15}[m]
    return tuple(range(start, start + 5))


def _invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def lomo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sig_lomo")
    # half of the 120 training patients are validation patients: the selection set (--select-on val, the default)
    src = write_lomo_folder(root / "lomo", informative=_baseline_dims, n_train_patients=120)
    code, out, err = _invoke("signatures", src, "--out", root / "out", "--relaxed", "--one-se")
    assert code == 0, err
    assert "grl: signature sizes 40X" in out
    return root / "out"


def test_lomo_outputs_follow_the_contract(lomo_run: Path) -> None:
    rows = _rows(lomo_run / "signatures.csv")
    assert list(rows[0])[:9] == CONTRACT
    assert list(rows[0]) == list(SIGNATURE_COLUMNS)
    assert [(r["arm"], r["fold"]) for r in rows] == [(a, f"{m}X") for a in ("baseline", "grl") for m in (40, 100, 200, 400)]
    jac = _rows(lomo_run / "jaccard.csv")
    assert list(jac[0]) == ["arm", "fold_a", "fold_b", "jaccard", "jaccard_chance", "jaccard_corrected"]
    assert len(jac) == 12  # 6 pairs per arm
    data = json.loads((lomo_run / "signatures.json").read_text())
    sizes = {(r["arm"], r["fold"]): int(r["size"]) for r in rows}
    for r in jac:
        chance = expected_jaccard(sizes[(r["arm"], r["fold_a"])], sizes[(r["arm"], r["fold_b"])], 48)
        assert float(r["jaccard_chance"]) == pytest.approx(chance, abs=1e-5)
        j = float(r["jaccard"])
        assert float(r["jaccard_corrected"]) == pytest.approx((j - chance) / (1 - chance), abs=1e-5)
    for r in rows:
        fold = data["arms"][r["arm"]]["folds"][r["fold"]]
        assert len(fold["indices"]) == int(r["size"]) == fold["size"]
        assert int(r["n_dims"]) == 48 and float(r["size_fraction"]) == pytest.approx(int(r["size"]) / 48, abs=1e-5)
        assert all(0 <= i < 48 for i in fold["indices"])
    for name in ("jaccard_baseline.png", "jaccard_grl.png", "size_vs_auc.png"):
        with Image.open(lomo_run / name) as im:
            assert im.format == "PNG" and min(im.size) > 200
    assert not list((lomo_run).glob(".*.tmp"))


def test_lomo_signatures_recover_the_truth_and_their_reproducibility(lomo_run: Path) -> None:
    data = json.loads((lomo_run / "signatures.json").read_text())
    for m in (40, 100, 200, 400):
        assert jaccard(data["arms"]["grl"]["folds"][f"{m}X"]["indices"], GRL_DIMS) >= 0.8
        assert jaccard(data["arms"]["baseline"]["folds"][f"{m}X"]["indices"], _baseline_dims("baseline", m)) >= 0.8
    assert data["arms"]["grl"]["jaccard"]["mean_off_diagonal"] >= 0.8
    assert data["arms"]["baseline"]["jaccard"]["mean_off_diagonal"] <= 0.2  # disjoint truths per fold
    pairs = {(r["arm"], r["fold_a"], r["fold_b"]): float(r["jaccard"]) for r in _rows(lomo_run / "jaccard.csv")}
    assert pairs[("grl", "100X", "200X")] >= 0.6  # each fold may be off by one dimension
    assert pairs[("baseline", "100X", "200X")] <= 0.2
    rows = _rows(lomo_run / "signatures.csv")
    for r in rows:
        assert float(r["auc_signature"]) > 0.8
        assert float(r["auc_network"]) > 0.5  # the generated prob_test follows the signal


def test_lomo_report_states_the_shared_initialisation(lomo_run: Path) -> None:
    report = (lomo_run / "report.md").read_text()
    assert "same initial weights" in report and "shared_init: true" in report
    assert "Warning" not in report
    assert "![Jaccard heatmap of grl](jaccard_grl.png)" in report
    assert "100X-held-out vs 200X-held-out" in report
    assert "D = 48 dimensions" in report and "--backbone resnet50" in report and "chance" in report


def test_report_warns_without_shared_init(tmp_path: Path) -> None:
    src = write_lomo_folder(tmp_path / "lomo", arms=("baseline",), held_out=(100, 200), shared_init=None, n_train_patients=20)
    code, _, err = _invoke("signatures", src, "--out", tmp_path / "out", "--one-se")
    assert code == 0, err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**Warning:**" in report and "shared_init: true" in report
    assert "shared_init" in err  # also logged


def test_stability_selection_and_resume(tmp_path: Path) -> None:
    src = write_lomo_folder(tmp_path / "lomo", arms=("grl",), held_out=(40, 100), n_train_patients=24)
    out = tmp_path / "out"
    code, _, err = _invoke("signatures", src, "--out", out, "--stability", "6", "--relaxed")
    assert code == 0, err
    fold = json.loads((out / "signatures.json").read_text())["arms"]["grl"]["folds"]["40X"]
    freq = {int(k): v for k, v in fold["stability_frequencies"].items()}
    assert set(fold["indices"]) == {k for k, v in freq.items() if v >= 0.6}
    assert json.loads((out / "signatures.json").read_text())["settings"]["stability"] == 6

    # A finished fold is reused when inputs and settings are unchanged (mark the cache to see it)...
    partial = out / ".partial" / "grl__40X.json"
    cached = json.loads(partial.read_text())
    cached["record"]["auc_lasso"] = 0.123
    partial.write_text(json.dumps(cached))
    assert _invoke("signatures", src, "--out", out, "--stability", "6", "--relaxed")[0] == 0
    assert _rows(out / "signatures.csv")[0]["auc_lasso"] == "0.123"
    # ...and recomputed when a setting changes.
    assert _invoke("signatures", src, "--out", out, "--stability", "6", "--relaxed", "--seed", "1")[0] == 0
    assert _rows(out / "signatures.csv")[0]["auc_lasso"] != "0.123"


def test_embedding_store_input(tmp_path: Path) -> None:
    store, labels = write_embedding_store(tmp_path, incomplete=("s000_1",))
    out = tmp_path / "out"
    code, _, err = _invoke(
        "signatures", store, "--labels", labels, "--folds", "3", "--out", out, "--relaxed", "--one-se", "--allow-missing"
    )
    assert code == 0, err
    assert "s000_1" in err  # the incomplete slide is reported and skipped
    rows = _rows(out / "signatures.csv")
    assert [(r["arm"], r["fold"]) for r in rows] == [("embeddings", f"fold{k}") for k in (1, 2, 3)]
    assert sum(int(r["n_test"]) for r in rows) == 95  # 96 slides minus the incomplete one, each tested once
    data = json.loads((out / "signatures.json").read_text())
    assert data["kind"] == "store" and data["classes"] == ["normal", "lesion"]
    for fold in data["arms"]["embeddings"]["folds"].values():
        assert jaccard(fold["indices"], (2, 7, 11, 15, 18)) >= 0.8
    assert all(float(r["auc_signature"]) > 0.8 for r in rows)
    assert np.isnan(float(rows[0]["auc_network"]))
    report = (out / "report.md").read_text()
    assert "same frozen encoder" in report
    assert (out / "jaccard_embeddings.png").is_file()


def _single_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    # (the progress bar's lines on stderr, "signatures: 100%|...", are not error lines)
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("signatures:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_give_one_clear_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # missing folder
    _single_line_error(*_invoke("signatures", tmp_path / "nope", "--out", out)[::2], "nope", "no such folder")
    # a folder that is neither a LOMO output nor a store
    (tmp_path / "empty").mkdir()
    _single_line_error(*_invoke("signatures", tmp_path / "empty", "--out", out)[::2], "empty", "wsienc lomo")
    # a LOMO folder without embeddings
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"arms": ["grl"], "held_out": [40], "shared_init": True}))
    _single_line_error(*_invoke("signatures", bare, "--out", out)[::2], "bare", "heldout_<m>.npz")
    # an npz without the expected arrays
    broken = tmp_path / "broken"
    (broken / "embeddings" / "grl").mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"arms": ["grl"], "held_out": [40], "shared_init": True}))
    np.savez(broken / "embeddings" / "grl" / "heldout_40.npz", X_train=np.zeros((3, 2)))
    _single_line_error(*_invoke("signatures", broken, "--out", out, "--select-on", "train")[::2], "heldout_40.npz", "lacks")
    # --select-on val (the default) needs splits.csv to find the validation patients
    _single_line_error(*_invoke("signatures", broken, "--out", out)[::2], "splits.csv", "--select-on train")
    # single class
    single = write_lomo_folder(tmp_path / "single", arms=("grl",), held_out=(40,), single_class=True, n_train_patients=8)
    _single_line_error(*_invoke("signatures", single, "--out", out)[::2], "grl/40X", "class 0 only", "--select-on train")
    _single_line_error(*_invoke("signatures", single, "--out", out, "--select-on", "train")[::2], "grl/40X", "classes [0]")


def test_bad_store_inputs_give_one_clear_line(tmp_path: Path) -> None:
    store, labels = write_embedding_store(tmp_path, n_patients=8)
    out = tmp_path / "out"
    _single_line_error(*_invoke("signatures", store, "--out", out)[::2], "--labels")
    # labels that do not match the store
    text = labels.read_text().splitlines()
    mismatch = tmp_path / "mismatch.csv"
    mismatch.write_text("\n".join([*text, "ghost_slide,lesion,patient999"]) + "\n")
    _single_line_error(*_invoke("signatures", store, "--labels", mismatch, "--out", out)[::2], "ghost_slide", "--allow-missing")
    # a single class
    single = tmp_path / "single.csv"
    single.write_text("\n".join([text[0], *[",".join([*r.split(",")[:1], "lesion", r.split(",")[2]]) for r in text[1:]]]) + "\n")
    _single_line_error(*_invoke("signatures", store, "--labels", single, "--out", out)[::2], "single.csv")
    # more folds than patients
    _single_line_error(*_invoke("signatures", store, "--labels", labels, "--folds", "9", "--out", out)[::2], "--folds 9")
    # --labels on a LOMO folder
    lomo = write_lomo_folder(tmp_path / "lomo", arms=("grl",), held_out=(40,), n_train_patients=8)
    _single_line_error(*_invoke("signatures", lomo, "--labels", labels, "--out", out)[::2], "--labels")


def _split_roles(path: Path) -> dict[tuple[int, str], str]:
    return {(int(r["fold"]), r["filename"]): r["role"] for r in _rows(path)}


def test_signatures_select_on_the_validation_patients_by_splits_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spy: every selection (and every probe fit) sees exactly the fold's validation-role images of splits.csv,
    never a test patient's and never a fitting patient's; ``--select-on train`` (the sensitivity option)
    sees every training-side image; config/provenance record the rule."""
    from wsi_encoder.evaluation.lomo_outputs import load_fold_embeddings
    from wsi_encoder.pipelines import signatures as pipeline

    src = write_lomo_folder(tmp_path / "lomo", arms=("grl",), held_out=(40, 100), n_train_patients=24)
    roles = _split_roles(src / "splits.csv")
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = pipeline.evaluate_fold

    def spy(x_train, y_train, groups_train, x_test, y_test, spec, **kw):  # type: ignore[no-untyped-def]
        seen.append((np.asarray(x_train).copy(), np.asarray(groups_train).astype(str).copy()))
        return real(x_train, y_train, groups_train, x_test, y_test, spec, **kw)

    monkeypatch.setattr(pipeline, "evaluate_fold", spy)
    for select_on, wanted in (("val", {"val"}), ("train", {"train", "val"})):
        seen.clear()
        out = tmp_path / f"out_{select_on}"
        code, _, err = _invoke("signatures", src, "--out", out, "--select-on", select_on, "--bootstrap", "0")
        assert code == 0, err
        assert len(seen) == 2
        for (x_sel, groups), m in zip(seen, (40, 100), strict=True):
            arrays = load_fold_embeddings(src / "embeddings" / "grl" / f"heldout_{m}.npz")
            names = arrays["filename_train"].astype(str)
            keep = np.array([roles[(m, n)] in wanted for n in names])
            assert keep.sum() < len(names) or select_on == "train"
            np.testing.assert_array_equal(x_sel, arrays["X_train"][keep])  # exactly those images, in order
            np.testing.assert_array_equal(groups, arrays["patient_train"][keep].astype(str))
            test_patients = {p for (f, _), r in roles.items() if f == m and r == "test" for p in arrays["patient_test"]}
            assert not set(groups) & test_patients
            # and no test embedding row is among the selection rows
            test_rows = {row.tobytes() for row in np.ascontiguousarray(arrays["X_test"])}
            assert not any(np.ascontiguousarray(row).tobytes() in test_rows for row in x_sel)
        data = json.loads((out / "signatures.json").read_text())
        assert data["select_on"] == select_on and data["settings"]["select_on"] == select_on
        fold = data["arms"]["grl"]["folds"]["40X"]
        by_role = {r["patient_id"] for r in _rows(src / "splits.csv") if r["fold"] == "40" and r["role"] in wanted}
        assert set(fold["selection_patients"]) == by_role and len(by_role) == fold["n_train_patients"]
        report = (out / "report.md").read_text()
        assert ("validation-role patients" in report) == (select_on == "val")
    # the store input refuses --select-on val in one line
    store, labels = write_embedding_store(tmp_path / "store", n_patients=8)
    _single_line_error(*_invoke("signatures", store, "--labels", labels, "--out", tmp_path / "s", "--select-on", "val")[::2],
                       "--select-on val")


def _seed_rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["arm"], r["fold"]): r for r in _rows(out / "seed_null.csv")}


@pytest.mark.parametrize("second", ["differ", "same"])
def test_seed_null_reading_follows_a_planted_second_seed(tmp_path: Path, second: str) -> None:
    """Planted: the second seed's class signal lies in other dimensions (seed-to-seed Jaccard about 0, while the
    folds agree: cross-magnification stability exceeds it), or the second seed's embeddings equal the first's
    (seed-to-seed Jaccard exactly 1 in every paired resample: no evidence that cross-magnification exceeds it)."""
    seed_null = (20, 24, 28, 32, 36) if second == "differ" else "same"
    src = write_lomo_folder(tmp_path / "lomo", arms=("grl",), held_out=(40, 100, 200), n_train_patients=60,
                            effect=1.0, seed_null=seed_null)
    out = tmp_path / "out"
    code, _, err = _invoke("signatures", src, "--out", out, "--bootstrap", "10", "--relaxed", "--one-se")
    assert code == 0, err
    rows = _seed_rows(out)
    assert list(next(iter(rows.values()))) == ["arm", "fold", "jaccard_seed", "jaccard_seed_ci_low", "jaccard_seed_ci_high",
                                              "jaccard_cross", "jaccard_cross_ci_low", "jaccard_cross_ci_high", "difference",
                                              "difference_ci_low", "difference_ci_high", "n_bootstrap", "verdict"]
    assert set(rows) == {("grl", f) for f in ("40X", "100X", "200X", "overall")}
    data = json.loads((out / "signatures.json").read_text())
    for fold in ("40X", "100X", "200X"):
        rec = data["arms"]["grl"]["folds"][fold]
        assert jaccard(rec["indices"], rec["seed_null_indices"]) == pytest.approx(float(rows[("grl", fold)]["jaccard_seed"]), abs=1e-5)
        assert float(rows[("grl", fold)]["jaccard_cross"]) >= 0.6
    report = (out / "report.md").read_text()
    for key, row in rows.items():
        seed, lo, hi = (float(row[k]) for k in ("jaccard_seed", "jaccard_seed_ci_low", "jaccard_seed_ci_high"))
        d_lo, d_hi = float(row["difference_ci_low"]), float(row["difference_ci_high"])
        assert int(row["n_bootstrap"]) == 10
        if second == "same":
            assert seed == lo == hi == 1.0  # same embeddings, same resampled patients: identical signatures
            assert d_hi <= 0 and not row["verdict"].startswith("cross-magnification stability exceeds")
            assert row["verdict"].startswith(("no evidence that", "cross-magnification stability is below"))
        else:
            assert seed <= 0.2 and hi <= 0.3
            assert d_lo > 0 and row["verdict"].startswith("cross-magnification stability exceeds seed-to-seed"), key
        assert row["verdict"] in report
    assert "Seed-to-seed reference Jaccard" in report and "not computed" not in report


def test_without_a_second_seed_the_report_says_the_seed_null_was_not_computed(lomo_run: Path) -> None:
    assert _rows(lomo_run / "seed_null.csv") == []
    assert (lomo_run / "seed_null.csv").read_text().startswith("arm,fold,jaccard_seed,")
    report = (lomo_run / "report.md").read_text()
    assert "**The seed null was not computed**" in report and "wsienc lomo --seed-null" in report
    assert json.loads((lomo_run / "signatures.json").read_text())["seed_null"] == {}


def test_a_second_seed_on_other_images_is_refused(tmp_path: Path) -> None:
    src = write_lomo_folder(tmp_path / "lomo", arms=("grl",), held_out=(40, 100), n_train_patients=24, seed_null="same")
    path = src / "seed_null" / "embeddings" / "grl" / "heldout_40.npz"
    with np.load(path) as fh:
        arrays = {k: fh[k] for k in fh.files}
    arrays["y_train"] = 1 - arrays["y_train"]
    np.savez(path, **arrays)
    code, _, err = _invoke("signatures", src, "--out", tmp_path / "out", "--bootstrap", "0")
    assert code == 0, err
    failed = json.loads((tmp_path / "out" / "signatures.json").read_text())["failed"]
    assert list(failed) == ["grl/40X"] and "only the seed differing" in failed["grl/40X"]
