"""Sparse signatures: Jaccard, recovery of known informative dimensions, pure noise, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from _signatures_fixtures import patient_embeddings

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.evaluation.signature_records import SignatureRecord, arm_jaccards
from wsi_encoder.evaluation.signatures import (
    SignatureSpec,
    corrected_jaccard,
    evaluate_fold,
    expected_jaccard,
    inner_splits,
    jaccard,
    jaccard_matrix,
    lambda_max,
    mean_off_diagonal,
    select_signature,
    standardise,
)

TRUTH = (3, 10, 17, 24, 31)


def _data(seed: int, *, informative=TRUTH, dim: int = 40, n_patients: int = 50, effect: float = 0.6):
    rng = np.random.default_rng(seed)
    return patient_embeddings(rng, n_patients, 4, dim, informative, effect)


# ----------------------------------------------------------------------------- Jaccard


def test_jaccard_edge_cases() -> None:
    assert jaccard([1, 2, 3], [3, 2, 1]) == 1.0
    assert jaccard([1, 2], [3, 4]) == 0.0
    assert np.isnan(jaccard([], []))  # two empty signatures: nothing to compare
    assert jaccard([], [5]) == 0.0
    assert jaccard([1, 2, 3], [2, 3, 4, 5]) == pytest.approx(2 / 5)
    assert jaccard(np.array([1, 1, 2]), (2, 1)) == 1.0  # sets: duplicates do not count


def test_jaccard_matrix_and_mean_off_diagonal() -> None:
    m = jaccard_matrix([[0, 1], [0, 1], [2], []])
    assert m.shape == (4, 4)
    np.testing.assert_array_equal(np.diag(m)[:3], 1.0)
    assert np.isnan(m[3, 3])
    np.testing.assert_array_equal(m, m.T)
    assert m[0, 1] == 1.0 and m[0, 2] == 0.0 and m[2, 3] == 0.0
    # off-diagonal: pairs (0,1)=1, (0,2)=0, (0,3)=0, (1,2)=0, (1,3)=0, (2,3)=0 -> 1/6
    assert mean_off_diagonal(m) == pytest.approx(1 / 6)
    assert np.isnan(mean_off_diagonal(np.ones((1, 1))))
    with pytest.raises(InvalidParameterError, match="square"):
        mean_off_diagonal(np.ones((2, 3)))


def test_arm_jaccards_groups_by_arm_in_order() -> None:
    def rec(arm: str, fold: str, idx: tuple[int, ...]) -> SignatureRecord:
        nan = float("nan")
        metrics = dict.fromkeys(("auc", "f1", "brier", "ece", "balanced_accuracy", "accuracy"), nan)
        return SignatureRecord(arm, fold, idx, idx, 0.1, 1.0, metrics, metrics, nan, nan, 10, 5, 4, 2, 8)

    out = arm_jaccards([rec("a", "40X", (1, 2)), rec("b", "40X", ()), rec("a", "100X", (2, 3)), rec("b", "100X", ())])
    assert [j.arm for j in out] == ["a", "b"]
    assert out[0].folds == ("40X", "100X")
    (pair,) = out[0].pairs()
    assert pair[:3] == ("40X", "100X", pytest.approx(1 / 3))
    chance = expected_jaccard(2, 2, 8)
    assert pair[3] == pytest.approx(chance)
    assert pair[4] == pytest.approx((1 / 3 - chance) / (1 - chance))
    assert out[0].n_dims == 8
    assert np.isnan(out[1].mean_off_diagonal) and np.isnan(out[1].pairs()[0][2])  # both empty: n/a, not 1.0


def _simulated_jaccard(a: int, b: int, d: int, n: int, rng: np.random.Generator) -> tuple[float, float]:
    values = np.empty(n)
    for k in range(n):
        values[k] = jaccard(rng.choice(d, a, replace=False), rng.choice(d, b, replace=False))
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(n))


@pytest.mark.parametrize(("a", "b", "d"), [(306, 306, 512), (10, 40, 64), (1, 1, 5), (30, 3, 2048)])
def test_chance_jaccard_formula_agrees_with_simulation(a: int, b: int, d: int) -> None:
    rng = np.random.default_rng(a * 1000 + b + d)
    mean, se = _simulated_jaccard(a, b, d, 4000, rng)
    expected = expected_jaccard(a, b, d)
    assert abs(expected - mean) < 4 * se + 1e-9, (expected, mean, se)


def test_chance_jaccard_known_values_and_correction() -> None:
    assert expected_jaccard(306, 306, 512) == pytest.approx(0.43, abs=0.01)  # the example
    assert expected_jaccard(5, 5, 5) == 1.0
    assert expected_jaccard(0, 7, 20) == 0.0
    assert np.isnan(expected_jaccard(0, 0, 20))
    assert corrected_jaccard(0.43, 0.43) == 0.0
    assert corrected_jaccard(1.0, 0.43) == 1.0
    assert np.isnan(corrected_jaccard(1.0, 1.0)) and np.isnan(corrected_jaccard(float("nan"), 0.2))
    with pytest.raises(InvalidParameterError):
        expected_jaccard(10, 3, 5)


# ----------------------------------------------------------------------------- selection


def test_lambda_max_is_where_the_l1_path_starts() -> None:
    x, y, _ = _data(0)
    (xs,) = standardise(x)
    lmax = lambda_max(xs, y)
    # Largest |correlation| term: exactly at lambda_max nothing is selected, just below one dimension is.
    assert lmax == pytest.approx(np.abs(xs.T @ (y - y.mean())).max() / len(y))
    from wsi_encoder.evaluation.signatures import _l1_support

    assert _l1_support(xs, y, lmax * 1.01, SignatureSpec())[0].size == 0
    assert _l1_support(xs, y, lmax * 0.9, SignatureSpec())[0].size >= 1


def test_inner_splits_never_split_a_patient() -> None:
    _, y, g = _data(1)
    splits = inner_splits(y, g, 5, seed=0)
    assert len(splits) == 5
    for tr, va in splits:
        assert not set(g[tr]) & set(g[va])
        assert set(y[tr]) == {0, 1}


@pytest.mark.parametrize("repeats", [1, 2])
def test_signature_recovers_the_informative_dimensions(repeats: int) -> None:
    # --relaxed --one-se: the setting documented for recovering the informative set.
    for seed in (0, 1, 2):
        x, y, g = _data(seed)
        sel = select_signature(x, y, g, SignatureSpec(relaxed=True, one_se=True, inner_repeats=repeats, seed=seed))
        assert jaccard(sel.indices, TRUTH) >= 0.8, (seed, sel.indices)


def test_plain_lasso_keeps_every_informative_dimension_and_one_se_is_sparser() -> None:
    x, y, g = _data(2)
    plain = select_signature(x, y, g, SignatureSpec())
    assert set(TRUTH) <= set(plain.indices)
    assert plain.indices == plain.lasso_indices
    assert len(plain.cv_loss) == len(plain.lambdas) == 12
    one_se = select_signature(x, y, g, SignatureSpec(one_se=True))
    assert one_se.lam >= plain.lam
    assert one_se.size <= plain.size


def test_stability_frequencies_are_recorded() -> None:
    x, y, g = _data(3)
    sel = select_signature(x, y, g, SignatureSpec(relaxed=True, stability=10, stability_threshold=0.7))
    assert sel.frequencies is not None and sel.frequencies.shape == (40,)
    assert set(sel.indices) == set(np.flatnonzero(sel.frequencies >= 0.7))
    noise = np.delete(sel.frequencies, list(TRUTH))
    assert sel.frequencies[list(TRUTH)].min() > noise.max()


def test_signature_is_stable_across_folds_of_the_same_signal() -> None:
    spec = SignatureSpec(relaxed=True, one_se=True)
    sigs = [select_signature(*_data(seed), spec).indices for seed in range(4)]
    assert mean_off_diagonal(jaccard_matrix(sigs)) >= 0.8


def test_pure_noise_gives_a_small_signature_and_chance_auc() -> None:
    aucs = []
    for seed in range(3):
        x, y, g = _data(seed, informative=())
        xt, yt, gt = _data(seed + 50, informative=())
        ev = evaluate_fold(x, y, g, xt, yt, SignatureSpec(seed=seed), groups_test=gt)
        assert ev.selection.size <= 3, ev.selection.indices
        aucs.append(ev.metrics_signature["auc"])
        assert 0.3 <= ev.metrics_full["auc"] <= 0.7
    assert abs(np.mean(aucs) - 0.5) <= 0.1


def test_evaluate_fold_metrics_on_signal() -> None:
    x, y, g = _data(4)
    xt, yt, gt = _data(5)
    ev = evaluate_fold(x, y, g, xt, yt, SignatureSpec(relaxed=True, one_se=True), groups_test=gt)
    assert ev.metrics_signature["auc"] > 0.9 and ev.metrics_full["auc"] > 0.85
    assert 0 <= ev.metrics_signature["brier"] < 0.15
    assert 0 <= ev.metrics_signature["ece"] <= 1
    assert (ev.n_train, ev.n_test, ev.n_train_groups, ev.n_test_groups, ev.n_dims) == (200, 200, 50, 50, 40)
    rec = SignatureRecord.from_evaluation("arm", "40X", ev, auc_network=0.7)
    again = SignatureRecord.from_json(rec.to_json())
    assert again == rec
    assert list(rec.row())[:9] == ["arm", "fold", "size", "auc_full", "auc_signature", "f1_full", "f1_signature",
                                   "brier_full", "brier_signature"]


def test_evaluate_fold_rejects_bad_inputs() -> None:
    x, y, g = _data(6)
    with pytest.raises(DatasetError, match="classes"):
        evaluate_fold(x, np.zeros_like(y), g, x, y)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        evaluate_fold(bad, y, g, x, y)
    with pytest.raises(DatasetError, match="same D"):
        evaluate_fold(x, y, g, x[:, :5], y)
    with pytest.raises(DatasetError, match="patient"):
        evaluate_fold(x, y, np.where(y == 1, "p1", "p0"), x, y)  # one patient per class: no grouped inner CV
    with pytest.raises(InvalidParameterError, match="stability-threshold"):
        SignatureSpec(stability_threshold=1.5).validate()


def test_report_shows_empty_pairs_as_na_and_states_d(tmp_path) -> None:
    from wsi_encoder.evaluation.signature_report import ReportContext, write_report

    nan = float("nan")
    metrics = dict.fromkeys(("auc", "f1", "brier", "ece", "balanced_accuracy", "accuracy"), 0.5)
    recs = [
        SignatureRecord("grl", fold, idx, idx, 0.1, 1.0, metrics, metrics, nan, nan, 10, 5, 4, 2, 512)
        for fold, idx in (("100X", ()), ("200X", ()), ("400X", (1, 2)))
    ]
    assert recs[2].size_fraction == pytest.approx(2 / 512)
    write_report(tmp_path, recs, arm_jaccards(recs), ReportContext("src", "lomo", ("benign", "malignant"), "basis"))
    report = (tmp_path / "report.md").read_text()
    assert "| 100X | 200X | n/a | n/a | n/a |" in report
    assert "D = 512 dimensions" in report and "--backbone resnet50" in report


def test_signature_vs_full_is_paired_on_test_patients() -> None:
    from wsi_encoder.evaluation.signatures import signature_vs_full

    x, y, g = _data(4)
    xt, yt, gt = _data(5)
    ev = evaluate_fold(x, y, g, xt, yt, SignatureSpec(), groups_test=gt)
    v = ev.vs_full
    assert v["delta_auc"] == pytest.approx(ev.metrics_signature["auc"] - ev.metrics_full["auc"], abs=1e-9)
    assert v["delta_brier"] == pytest.approx(ev.metrics_signature["brier"] - ev.metrics_full["brier"], abs=1e-9)
    assert v["delta_auc_ci_low"] <= v["delta_auc"] <= v["delta_auc_ci_high"]
    rec = SignatureRecord.from_evaluation("arm", "40X", ev, auc_network=0.5)
    assert rec.row()["signature_delta_auc"] == v["delta_auc"] and SignatureRecord.from_json(rec.to_json()) == rec
    rng = np.random.default_rng(0)
    p = rng.uniform(size=len(yt))
    same = signature_vs_full(yt, p, p.copy(), gt)
    assert same["delta_auc"] == same["delta_auc_ci_low"] == same["delta_auc_ci_high"] == 0  # paired: no noise
    worse = signature_vs_full(yt, np.where(yt == 1, 0.9, 0.1), rng.uniform(size=len(yt)), gt)
    assert worse["delta_auc_ci_high"] < 0  # a useless signature model is detected


def test_size_and_jaccard_intervals_come_from_whole_training_patients(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_encoder.evaluation import signatures as sig_module

    x, y, g = _data(4)
    xt, yt, gt = _data(5)
    seen: list[np.ndarray] = []
    real = sig_module.select_signature

    def spy(x_train, y_train, groups_train, spec, **kw):
        seen.append(np.asarray(groups_train).copy())
        return real(x_train, y_train, groups_train, spec, **kw)

    monkeypatch.setattr(sig_module, "select_signature", spy)
    spec = SignatureSpec(bootstrap=8)
    records = [SignatureRecord.from_evaluation("arm", f, evaluate_fold(x, y, g, xt, yt, spec, groups_test=gt), 0.5)
               for f in ("a", "b")]
    per_patient = {p: int((g == p).sum()) for p in np.unique(g)}
    resamples = [s for s in seen if len(s) != len(g) or not np.array_equal(s, g)]
    assert len(resamples) >= 2 * 8 - 1  # (one may coincide with the original set by chance)
    for groups in resamples:
        counts = {p: int((groups == p).sum()) for p in np.unique(groups)}
        assert all(n % per_patient[p] == 0 for p, n in counts.items())  # whole patients, with all their images
        assert sum(n // per_patient[p] for p, n in counts.items()) == len(per_patient)  # as many draws as patients
    rec = records[0]
    assert len(rec.boot_indices) == 8 and all(b is not None for b in rec.boot_indices)
    lo, hi = rec.size_interval()
    assert 0 <= lo <= hi <= x.shape[1] and rec.row()["size_ci_low"] == lo
    assert SignatureRecord.from_json(rec.to_json()) == rec
    (jac,) = arm_jaccards(records)
    assert len(jac.boot_means) == 8
    j_lo, j_hi = jac.mean_interval()
    assert 0 <= j_lo <= j_hi <= 1
    none = SignatureRecord.from_evaluation("arm", "c", evaluate_fold(x, y, g, xt, yt, SignatureSpec(bootstrap=0),
                                                                     groups_test=gt), 0.5)
    assert none.boot_indices == () and np.isnan(none.size_interval()[0])


def test_standardisation_uses_training_statistics_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every standardisation is fit on training rows: test rows never enter the mean and SD (spy)."""
    import wsi_encoder.evaluation.signatures as sig

    x, y, g = _data(4)
    x = np.asarray(x, dtype=np.float64)
    xt, yt, gt = _data(5)
    xt = xt + 3.0  # a shifted test set: any test statistics in a fit would change the numbers below
    fitted_on: list[np.ndarray] = []
    real = sig.standardise

    def spy(x_train, *others):  # type: ignore[no-untyped-def]
        fitted_on.append(np.asarray(x_train, dtype=np.float64).copy())
        return real(x_train, *others)

    monkeypatch.setattr(sig, "standardise", spy)
    ev = sig.evaluate_fold(x, y, g, xt, yt, SignatureSpec(bootstrap=0), groups_test=gt)
    assert fitted_on
    train_rows = {row.tobytes() for row in x}
    cols = np.asarray(ev.selection.indices, dtype=np.int64)
    train_sig_rows = {row.tobytes() for row in np.ascontiguousarray(x[:, cols])}
    for m in fitted_on:
        allowed = train_rows if m.shape[1] == x.shape[1] else train_sig_rows
        assert all(np.ascontiguousarray(row).tobytes() in allowed for row in m), m.shape
    # the lasso's and the full probe's standardisations saw the whole training set, not a test-shifted one
    full = [m for m in fitted_on if m.shape == x.shape]
    assert full and all(np.allclose(m.mean(axis=0), x.mean(axis=0)) for m in full)


def _record(fold: str, indices, boot, seed=None, seed_boot=()) -> SignatureRecord:
    metrics = {k: 0.5 for k in ("auc", "f1", "brier", "ece", "balanced_accuracy")}
    return SignatureRecord("grl", fold, tuple(indices), tuple(indices), 0.1, 1.0, metrics, metrics, 0.5, 0.5,
                           10, 5, 4, 2, 8, boot_indices=tuple(boot), seed_indices=seed, seed_boot_indices=tuple(seed_boot))


def test_seed_null_rows_pair_the_resamples_and_word_the_difference() -> None:
    """Hand-computed: the difference cross − seed per resample b uses resample b of both seeds and every fold."""
    from wsi_encoder.evaluation.signature_records import seed_null_rows, seed_null_verdict

    boot_a = [(0, 1), (0, 1), (0, 1), (0, 1)]
    seed_a = [(0, 1), (5,), (0, 1), (5,)]  # per-resample seed Jaccard 1, 0, 1, 0
    boot_b = [(0, 1), (0, 1), (0, 1), (0, 1)]  # per-resample cross Jaccard 1
    recs = [_record("40X", (0, 1), boot_a, (0, 1), seed_a), _record("100X", (0, 2), boot_b),
            _record("patient_fold_1/40X", (7,), boot_b, (7,), boot_b)]  # another split: not a peer of 40X
    rows = {(r.arm, r.fold): r for r in seed_null_rows(recs)}
    a = rows[("grl", "40X")]
    assert a.seed[0] == 1.0 and a.cross[0] == pytest.approx(1 / 3)  # J({0,1},{0,2}); the other split is left out
    assert a.difference[0] == pytest.approx(1 / 3 - 1)
    assert a.difference[1:] == pytest.approx(tuple(np.quantile([0, 1, 0, 1], [0.025, 0.975])))
    assert a.verdict.startswith("no evidence that cross-magnification stability exceeds")
    lone = rows[("grl", "patient_fold_1/40X")]
    assert np.isnan(lone.cross[0]) and lone.verdict.startswith("not estimable")
    assert ("grl", "100X") not in rows
    overall = rows[("grl", "overall")]  # the mean over the folds where both Jaccards are defined (40X only)
    assert overall.difference == pytest.approx(a.difference) and overall.verdict == a.verdict
    assert seed_null_verdict((0.2, 0.1, 0.3)).startswith("cross-magnification stability exceeds")
    assert seed_null_verdict((-0.2, -0.3, -0.1)).startswith("cross-magnification stability is below")
    assert seed_null_verdict((0.2, float("nan"), float("nan"))).startswith("no interval")
    assert seed_null_rows([_record("40X", (0,), boot_a)]) == []
    rec = recs[0]
    assert SignatureRecord.from_json(rec.to_json()) == rec
