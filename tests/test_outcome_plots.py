"""Kaplan-Meier risk groups (per-fold patient quantiles, log-rank against lifelines) and predicted-vs-true plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_encoder.evaluation.outcome_plots import plot_kaplan_meier, plot_predicted_vs_true, risk_groups


def _cohort(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n)
    death = rng.exponential(10 * np.exp(-latent))
    censor = rng.uniform(0, 25, n)
    return np.minimum(death, censor), death <= censor, latent


@pytest.mark.parametrize("n_groups", [2, 3])
def test_logrank_equals_lifelines_on_the_same_groups(n_groups: int, tmp_path: Path) -> None:
    from lifelines.statistics import multivariate_logrank_test

    time, event, latent = _cohort(90, n_groups)
    patients = np.array([f"P{i // 2}" for i in range(90)])  # two slides per patient share an outcome
    time, event, latent = time[::2].repeat(2), event[::2].repeat(2), latent[::2].repeat(2)
    risk = latent + np.random.default_rng(1).normal(0, 0.1, 90)
    fold = np.array([i // 2 % 3 for i in range(90)])
    groups = risk_groups(time, event, risk, patients, fold, n_groups)
    assert len(groups.patients) == 45 and sorted(np.unique(groups.group)) == list(range(n_groups))
    # quantiles within each fold: every fold contributes (about) equally to every group
    p_fold = np.array([int(p[1:]) % 3 for p in groups.patients])
    for f in range(3):
        counts = np.bincount(groups.group[p_fold == f], minlength=n_groups)
        assert counts.max() - counts.min() <= 1
    reference = multivariate_logrank_test(groups.time, groups.group, groups.event)
    assert groups.chi2 == pytest.approx(reference.test_statistic, rel=1e-6)
    assert groups.p_value == pytest.approx(reference.p_value, rel=1e-6)
    assert groups.p_value < 0.01  # the planted latent separates the groups
    high = groups.group == n_groups - 1
    assert groups.event[high].mean() > groups.event[groups.group == 0].mean()  # high risk dies more
    flipped = risk_groups(time, event, -risk, patients, fold, n_groups)
    # the sign decides which group is high (the middle patient of an odd fold goes to the lower group either way)
    assert (flipped.group != n_groups - 1 - groups.group).sum() <= 3
    path = plot_kaplan_meier(groups, tmp_path / "km.png", title="test")
    assert Image.open(path).size[0] > 300
    summary = groups.to_json()
    assert sum(g["n_patients"] for g in summary["groups"].values()) == 45 and summary["unit"] == "patient"


def test_predicted_vs_true_plot(tmp_path: Path) -> None:
    y = np.arange(20.0)
    path = plot_predicted_vs_true(y, y + np.random.default_rng(0).normal(0, 1, 20), tmp_path / "s.png", spearman=0.9)
    assert Image.open(path).size[0] > 300
