"""Pictures of the regression and survival targets: predicted vs true, Kaplan-Meier curves by risk group.

Risk groups are formed per **patient** (a patient's slides share one outcome; the patient's risk is the
mean of their slides' out-of-fold risks) and **within each fold**: the fold models' risks are on
different scales, so a patient's group is the quantile of their risk among that fold's test patients
(median split, or tertiles with ``n_groups=3``). The log-rank test (scikit-survival
``compare_survival``) and the Kaplan-Meier curves (``kaplan_meier_estimator``) are over those patients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.ticker import MaxNLocator

from wsi_encoder.evaluation.plots import save_figure

GROUP_NAMES = {2: ("low risk", "high risk"), 3: ("low risk", "intermediate risk", "high risk")}
GROUP_COLOURS = ("#2b8cbe", "#fdae61", "#d7191c")


@dataclass(frozen=True)
class RiskGroups:
    """Patients, their outcome, mean out-of-fold risk and risk group (0 = lowest), and the log-rank test."""

    patients: npt.NDArray[np.str_]
    time: npt.NDArray[np.float64]
    event: npt.NDArray[np.bool_]
    risk: npt.NDArray[np.float64]
    group: npt.NDArray[np.int64]
    n_groups: int
    chi2: float
    p_value: float

    def to_json(self) -> dict[str, Any]:
        """The ``risk_groups`` entry of ``metrics.json``."""
        names = GROUP_NAMES[self.n_groups]
        return {
            "n_groups": self.n_groups,
            "unit": "patient",
            "split": "quantiles of the mean out-of-fold risk within each fold",
            "logrank_chi2": self.chi2,
            "logrank_p": self.p_value,
            "groups": {names[k]: {"n_patients": int((self.group == k).sum()),
                                  "n_events": int(self.event[self.group == k].sum())} for k in range(self.n_groups)},
        }


def risk_groups(
    time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike, groups: npt.ArrayLike, fold_of: npt.ArrayLike,
    n_groups: int = 2,
) -> RiskGroups:
    """Patient risk groups by per-fold quantile of the mean out-of-fold risk, with the log-rank test across them."""
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    if n_groups not in GROUP_NAMES:
        raise ValueError(f"risk groups must be 2 or 3, got {n_groups!r}")
    t, e, r = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)
    g, f = np.asarray(groups).astype(str), np.asarray(fold_of).astype(str)
    patients, first, inv = np.unique(g, return_index=True, return_inverse=True)
    p_risk = np.bincount(inv, weights=r) / np.bincount(inv)
    p_time, p_event, p_fold = t[first], e[first], f[first]
    group = np.zeros(len(patients), dtype=np.int64)
    for fold in np.unique(p_fold):
        sel = np.flatnonzero(p_fold == fold)
        rank = np.empty(len(sel), dtype=np.int64)
        rank[np.argsort(p_risk[sel], kind="stable")] = np.arange(len(sel))
        group[sel] = rank * n_groups // len(sel)
    chi2, p_value = float("nan"), float("nan")
    if len(np.unique(group)) > 1 and p_event.any():
        chi2, p_value = (float(v) for v in compare_survival(Surv.from_arrays(p_event, p_time), group)[:2])
    return RiskGroups(patients, p_time, p_event, p_risk, group, n_groups, chi2, p_value)


def plot_kaplan_meier(groups: RiskGroups, path: str | Path, *, title: str = "") -> Path:
    """Kaplan-Meier curve of each risk group (censoring ticks), the log-rank p-value, and the number at risk below."""
    from sksurv.nonparametric import kaplan_meier_estimator

    fig, (ax, table) = plt.subplots(2, 1, figsize=(6.0, 5.4), sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    names = GROUP_NAMES[groups.n_groups]
    top = float(groups.time.max())
    ticks = np.array([v for v in MaxNLocator(6).tick_values(0.0, top) if 0.0 <= v <= top])
    for k, name in enumerate(names):
        sel = groups.group == k
        if not sel.any():
            continue
        x, s = kaplan_meier_estimator(groups.event[sel], groups.time[sel])
        colour = GROUP_COLOURS[k if groups.n_groups == 3 else 2 * k]
        ax.step(np.r_[0.0, x], np.r_[1.0, s], where="post", color=colour,
                label=f"{name} ({int(sel.sum())} patients, {int(groups.event[sel].sum())} events)")
        censored = groups.time[sel & ~groups.event]
        ax.plot(censored, np.interp(censored, x, s, left=1.0), "|", color=colour, ms=7)
        at_risk = [int((groups.time[sel] >= tick).sum()) for tick in ticks]
        for tick, n in zip(ticks, at_risk, strict=True):
            table.text(tick, groups.n_groups - 1 - k, str(n), ha="center", va="center", color=colour, fontsize=9)
    p = groups.p_value
    ax.set_title((title + "\n" if title else "") + ("log-rank p = n/a" if not np.isfinite(p) else f"log-rank p = {p:.2g}"),
                 fontsize=10)
    ax.set_ylabel("survival probability")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    table.set_yticks(range(groups.n_groups), [names[groups.n_groups - 1 - i] for i in range(groups.n_groups)], fontsize=8)
    table.set_ylim(-0.6, groups.n_groups - 0.4)
    table.set_xticks(ticks)
    table.set_xlabel("time")
    table.set_title("number at risk", fontsize=9, loc="left")
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
    table.tick_params(axis="y", length=0)
    return save_figure(fig, path)


def plot_predicted_vs_true(
    target: npt.ArrayLike, prediction: npt.ArrayLike, path: str | Path, *, title: str = "", spearman: float | None = None
) -> Path:
    """Scatter of out-of-fold predictions against the true target, with the identity line (perfect prediction)."""
    y, p = np.asarray(target, float), np.asarray(prediction, float)
    low, high = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    pad = 0.05 * (high - low or 1.0)
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot([low - pad, high + pad], [low - pad, high + pad], ls="--", color="0.5", lw=1, label="identity (y = x)")
    ax.scatter(y, p, s=14, alpha=0.7, color="#08519c", label=f"{len(y)} slides (out-of-fold)")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("true target")
    ax.set_ylabel("predicted")
    rho = "" if spearman is None or not np.isfinite(spearman) else f" (Spearman {spearman:.3f})"
    ax.set_title((title or "predicted vs true") + rho, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return save_figure(fig, path)
