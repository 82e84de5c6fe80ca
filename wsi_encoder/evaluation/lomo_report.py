"""The LOMO report: magnification probe, plots (PNG, matplotlib Agg) and ``report.md``.

The magnification probe asks how much magnification information the frozen embeddings of an arm
still carry, measured where the gradient-reversal adversary could not have optimised against it:
the probe is fit on the *training* patients' embeddings (the adversary's own images) and scored on
the *test* patients' images at the training magnifications (role ``probe_test``), which no arm
trained on. Two probes, both at least as strong as the grl arm's domain head needs to be fooled:

``linear``
    standardised multinomial logistic regression, ``C`` chosen by patient-grouped inner CV;
``mlp``
    a small multilayer perceptron (one hidden layer of 128 units, ReLU, L2 ``alpha`` 1e-3, L-BFGS).

``split=test_patients`` is the figure to report; ``split=train_cv`` is the patient-grouped
cross-validated score on the training patients (for the linear probe, the inner CV's best score,
slightly optimistic), which measures invariance on the images the adversary saw. Both are balanced
accuracy; chance is 1 / number of magnifications.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, GroupKFold, cross_val_predict
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from wsi_encoder.evaluation.metrics import reliability_curve
from wsi_encoder.io.files import atomic_write_figure, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

ARM_COLORS = {"baseline": "#4C72B0", "gan": "#DD8452", "grl": "#55A868"}
PROBE_COLUMNS = ("arm", "held_out", "probe", "split", "balanced_accuracy", "chance")
PROBES = ("linear", "mlp")
PROBE_SPLITS = ("train_cv", "test_patients")
LINEAR_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _linear(c: float = 1.0) -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def _mlp(seed: int) -> Any:
    return make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, solver="lbfgs", max_iter=300, random_state=seed),
    )


def magnification_probe(
    x_train: npt.ArrayLike,
    mag_train: npt.ArrayLike,
    patients_train: npt.ArrayLike,
    x_test: npt.ArrayLike,
    mag_test: npt.ArrayLike,
    *,
    n_splits: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Balanced accuracy of linear and MLP magnification probes (see the module docstring).

    Parameters
    ----------
    x_train, mag_train, patients_train
        Training patients' embeddings ``(n, D)``, magnifications and patient keys (the probe's fit;
        inner CV folds never split a patient).
    x_test, mag_test
        Test patients' embeddings at the training magnifications and their magnifications (the
        probe's score); images at a magnification absent from training are left out.
    n_splits
        Patient-grouped CV folds (capped at the number of patients).
    seed
        Seed of the MLP.

    Returns
    -------
    list of dict
        One row per probe × split: ``probe``, ``split``, ``balanced_accuracy``, ``chance``,
        ``n_images``, ``n_patients``; balanced accuracy is nan when it cannot be measured (fewer than
        two magnifications or patients, or no test image).
    """
    x = np.asarray(x_train, dtype=np.float64)
    mags = np.asarray(mag_train)
    groups = np.asarray(patients_train).astype(str)
    xt = np.asarray(x_test, dtype=np.float64).reshape(-1, x.shape[1] if x.ndim == 2 else 0)
    mt = np.asarray(mag_test)
    classes = np.unique(mags)
    chance = 1.0 / len(classes) if len(classes) else math.nan
    n_groups = len(np.unique(groups))
    keep = np.isin(mt, classes)
    xt, mt = xt[keep], mt[keep]
    rows = {
        (p, s): {"probe": p, "split": s, "balanced_accuracy": math.nan, "chance": chance,
                 "n_images": len(x) if s == "train_cv" else len(xt)}
        for p in PROBES
        for s in PROBE_SPLITS
    }
    if len(classes) >= 2 and n_groups >= 2:
        with threadpool_limits(limits=1):  # many small fits: threaded BLAS only adds contention
            _fit_probes(rows, x, np.searchsorted(classes, mags), groups, xt, np.searchsorted(classes, mt),
                        min(n_splits, n_groups), seed)
    return list(rows.values())


def _fit_probes(
    rows: dict[tuple[str, str], dict[str, Any]],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    groups: npt.NDArray[np.str_],
    xt: npt.NDArray[np.float64],
    yt: npt.NDArray[np.int64],
    n_splits: int,
    seed: int,
) -> None:
    """Fill the balanced accuracies of ``rows`` (see :func:`magnification_probe`)."""
    cv = list(GroupKFold(n_splits=n_splits).split(x, y, groups))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # sklearn: a class absent from a small CV fold
        search = GridSearchCV(
            _linear(), {"logisticregression__C": list(LINEAR_CS)}, scoring="balanced_accuracy", cv=cv
        )
        search.fit(x, y)
        rows[("linear", "train_cv")]["balanced_accuracy"] = float(search.best_score_)
        rows[("linear", "train_cv")]["C"] = float(search.best_params_["logisticregression__C"])
        oof = cross_val_predict(_mlp(seed), x, y, cv=cv)
        rows[("mlp", "train_cv")]["balanced_accuracy"] = float(balanced_accuracy_score(y, oof))
        if len(xt):
            linear = search.best_estimator_
            rows[("linear", "test_patients")]["balanced_accuracy"] = float(
                balanced_accuracy_score(yt, linear.predict(xt))
            )
            mlp = _mlp(seed).fit(x, y)
            rows[("mlp", "test_patients")]["balanced_accuracy"] = float(
                balanced_accuracy_score(yt, mlp.predict(xt))
            )


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, float | int) and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics_by_fold(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bars of AUC and Brier per held-out magnification, one colour per arm, 95 % patient-bootstrap error bars."""
    plt = _plt()
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    folds = sorted({int(r["held_out"]) for r in rows})
    labels = [f"{m}X" for m in folds]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(arms), 1)
    for ax, metric, title in zip(
        axes, ("auc", "brier"), ("AUC (higher is better)", "Brier score (lower is better)"), strict=True
    ):
        for i, arm in enumerate(arms):
            by_fold = {int(r["held_out"]): r for r in rows if r["arm"] == arm}
            vals = np.array([_num(by_fold.get(m, {}).get(metric)) for m in folds])
            lo = np.array([_num(by_fold.get(m, {}).get(f"{metric}_ci_low")) for m in folds])
            hi = np.array([_num(by_fold.get(m, {}).get(f"{metric}_ci_high")) for m in folds])
            xs = np.arange(len(labels)) + (i - (len(arms) - 1) / 2) * width
            ax.bar(xs, np.nan_to_num(vals, nan=0.0), width, label=arm, color=ARM_COLORS.get(arm))
            ok = np.isfinite(vals) & np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                err = np.vstack([vals[ok] - lo[ok], hi[ok] - vals[ok]])
                ax.errorbar(xs[ok], vals[ok], yerr=np.clip(err, 0, None), fmt="none", ecolor="black", lw=0.8, capsize=2)
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, 0 if math.isnan(v) else v, "n/a" if math.isnan(v) else f"{v:.2f}",
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(np.arange(len(labels)), labels)
        ax.set_xlabel("held-out magnification (bars: 95% patient-bootstrap interval)")
        ax.set_title(title)
        if metric == "auc":
            ax.set_ylim(0, 1.05)
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def plot_reliability(
    predictions: Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]], path: str | Path, n_bins: int = 10
) -> Path:
    """Reliability diagrams, one panel per arm, one curve per held-out fold (marker size ∝ bin count)."""
    plt = _plt()
    arms = list(predictions)
    fig, axes = plt.subplots(1, max(len(arms), 1), figsize=(4 * max(len(arms), 1), 4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, arm in zip(axes[0], arms, strict=False):
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        folds = sorted(predictions[arm])
        for j, m in enumerate(folds):
            y, p = predictions[arm][m]
            conf, freq, count = reliability_curve(y, p, n_bins)
            ok = count > 0
            color = cmap(j / max(len(folds) - 1, 1))
            ax.plot(conf[ok], freq[ok], "-", color=color, lw=1, label=f"{m}X held out (n={len(y)})")
            ax.scatter(conf[ok], freq[ok], s=10 + 60 * count[ok] / max(count.max(), 1), color=color)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted P(malignant)")
        ax.set_ylabel("observed share malignant")
        ax.set_title(f"{arm}: reliability")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def plot_probe(probe_rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Balanced accuracy of the magnification probes on the test patients, per fold and arm, with chance."""
    plt = _plt()
    rows = [r for r in probe_rows if r["split"] == "test_patients"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    folds = sorted({int(r["held_out"]) for r in rows})
    fig, axes = plt.subplots(1, len(PROBES), figsize=(5.5 * len(PROBES), 4), squeeze=False)
    width = 0.8 / max(len(arms), 1)
    for ax, probe in zip(axes[0], PROBES, strict=True):
        for i, arm in enumerate(arms):
            by_fold = {
                int(r["held_out"]): float(r["balanced_accuracy"]) for r in rows if r["arm"] == arm and r["probe"] == probe
            }
            vals = [by_fold.get(m, math.nan) for m in folds]
            xs = np.arange(len(folds)) + (i - (len(arms) - 1) / 2) * width
            ax.bar(xs, np.nan_to_num(vals, nan=0.0), width, label=arm, color=ARM_COLORS.get(arm))
        chance = _mean([float(r["chance"]) for r in rows])
        if not math.isnan(chance):
            ax.axhline(chance, color="grey", ls=":", lw=1, label=f"chance ({chance:.2f})")
        ax.set_xticks(np.arange(len(folds)), [f"{m}X" for m in folds])
        ax.set_xlabel("held-out magnification")
        ax.set_ylabel("balanced accuracy on the test patients")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{probe} magnification probe (lower = more invariant)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_gan_samples(
    real: Mapping[str, np.ndarray],
    fake: Mapping[str, np.ndarray],
    path: str | Path,
    title: str,
    per_row: int = 8,
) -> Path:
    """A grid per class: one row of real training images, two rows of DCGAN samples (64×64 uint8 RGB)."""
    plt = _plt()
    classes = list(fake)
    rows: list[tuple[str, np.ndarray]] = []
    for cls in classes:
        rows.append((f"{cls}\nreal", real.get(cls, np.zeros((0, 64, 64, 3), np.uint8))[:per_row]))
        samples = fake[cls]
        rows.append((f"{cls}\nDCGAN", samples[:per_row]))
        rows.append((f"{cls}\nDCGAN", samples[per_row : 2 * per_row]))
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 1.1, len(rows) * 1.15), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(imgs):
                ax.imshow(imgs[c])
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    try:
        atomic_write_figure(path, fig, dpi=110)
    finally:
        _plt().close(fig)
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _ci(row: Mapping[str, Any], metric: str) -> str:
    v, lo, hi = (_num(row.get(k)) for k in (metric, f"{metric}_ci_low", f"{metric}_ci_high"))
    if math.isnan(v):
        return "n/a"
    if math.isnan(lo) or math.isnan(hi):
        return f"{v:.3f} [n/a]"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _delta_ci(row: Mapping[str, Any], metric: str) -> str:
    v, lo, hi = (_num(row.get(k)) for k in (f"delta_{metric}", f"delta_{metric}_ci_low", f"delta_{metric}_ci_high"))
    if math.isnan(v):
        return "n/a"
    if math.isnan(lo) or math.isnan(hi):
        return f"{v:+.3f} [n/a]"
    return f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def difference_sentence(arm: str, held_out: Any, row: Mapping[str, Any], metric: str) -> str:
    """One sentence on a paired difference to the baseline, saying so when its interval spans zero."""
    better = "higher" if metric == "auc" else "lower"
    name = "AUC" if metric == "auc" else "Brier score"
    v, lo, hi = (_num(row.get(k)) for k in (f"delta_{metric}", f"delta_{metric}_ci_low", f"delta_{metric}_ci_high"))
    where = f"{arm} vs baseline, {held_out}X held out"
    if math.isnan(v) or math.isnan(lo) or math.isnan(hi):
        return f"{where}: {name} difference undefined (single-class test set or too few patients)."
    text = f"{where}: {name} difference {v:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}); "
    if lo <= 0 <= hi:
        return text + "the interval spans zero, so these data show no difference between the arms."
    direction = "higher" if v > 0 else "lower"
    verdict = "better" if direction == better else "worse"
    return text + f"the interval excludes zero: {arm}'s {name} is {direction} ({verdict}) than the baseline's."


def render_report(
    *,
    title: str,
    config: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    extra: Mapping[tuple[str, int], Mapping[str, Any]],
    probe: Sequence[Mapping[str, Any]],
    skipped: Mapping[int, str],
    split_summary: Sequence[str],
    plots: Mapping[str, str],
    gan_grids: Mapping[int, str],
    notes: Sequence[str] = (),
    overall: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The text of ``report.md`` (plots referenced by path relative to the report)."""
    lines = [f"# {title}", ""]
    for warning in config.get("report_warnings", []):
        lines += [f"> **Warning:** {warning}", ""]
    key = config.get("patient_key", "number")
    prov = config.get("backbone_provenance") or {}
    sha = prov.get("weights_sha256")
    lines += [
        f"Backbone `{config.get('backbone')}` ({prov.get('source', 'unknown source')}"
        + (f", weights SHA-256 `{str(sha)[:16]}`" if sha else "")
        + f"; embedding {config.get('embedding_dim')}-d), image size {config.get('image_size')} px, seed "
        f"{config.get('seed')}; every arm and fold started from the same initial weights (SHA-256 "
        f"`{str(config.get('init_sha256', ''))[:16]}`).",
        "",
        _contamination_line(prov),
        "",
        "Patients: "
        + (
            "grouped by case number (`patient_key: number`; slides 14-22549AB, 14-22549CD and 14-22549G are one "
            "patient), so no patient is on both sides of a split."
            if key == "number"
            else "grouped by slide token (`patient_key: token`): slides of one case (14-22549AB, 14-22549CD) "
            "count as different patients and can be on both sides of a split; this is NOT patient-disjoint."
        ),
        "",
    ]
    selection = config.get("selection") or {}
    if selection:
        lines += [
            "Epoch kept per arm: "
            + ", ".join(f"{a} {v}" for a, v in selection.items())
            + ". Intervals (95%) resample test patients, every image of a drawn patient coming along: AUC by a "
            "t interval on the logit scale from the grouped jackknife, everything else and every difference by "
            f"the BCa bootstrap ({config.get('n_bootstrap', 'n/a')} seeded resamples); differences to the "
            "baseline are paired (the same resampled patients for both arms). Their coverage was measured by "
            "simulation at BreaKHis' size (docs/lomo.md).",
            "",
        ]
    settings = config.get("settings", {})
    if settings:
        keys = ("epochs", "batch_size", "lr", "test_fraction", "patient_folds", "val_fraction", "gan_ratio",
                "gan_epochs", "gan_width", "grl_weight", "max_images_per_split", "repeats")
        lines += ["Settings: " + ", ".join(f"{k}={settings.get(k)}" for k in keys if k in settings), ""]
    if split_summary:
        lines += ["## Patients", "", *split_summary, ""]
    lines += overall_lines(overall)
    lines += ["## Results per held-out magnification (secondary)", ""]
    if results:
        header = ["arm", "held out", "AUC [95% CI]", "Brier [95% CI]", "F1", "bal. acc.", "ECE", "test images",
                  "test patients", "patient AUC", "patient RR", "epoch kept", "λ at kept epoch"]
        body = []
        for r in results:
            e = extra.get((r["arm"], int(r["held_out"])), {})
            body.append([
                r["arm"], f"{r['held_out']}X", _ci(r, "auc"), _ci(r, "brier"),
                *(_fmt(_num(r.get(k))) for k in ("f1", "balanced_accuracy", "ece")),
                str(r["n_test_images"]), str(r["n_test_patients"]), _fmt(_num(r.get("patient_auc"))),
                _fmt(_num(e.get("patient_recognition_rate"))),
                "" if r.get("selected_epoch") is None else str(r["selected_epoch"]),
                "" if r.get("grl_lambda") is None else f"{float(r['grl_lambda']):.3f}",
            ])
        lines += _table(header, body)
        few = sorted({f"{r['held_out']}X" for r in results if int(r["n_test_patients"]) < 10})
        if few:
            lines += ["", f"Fewer than 10 test patients in {', '.join(few)}: intervals from so few patients are "
                      "rough; AUC intervals are n/a unless each class has at least 2 test patients."]
        deltas = [r for r in results if r.get("delta_auc") is not None]
        if deltas:
            lines += ["", "## Differences to the baseline (paired, same test patients)", ""]
            lines += _table(
                ["arm", "held out", "ΔAUC [95% CI]", "ΔBrier [95% CI]"],
                [[r["arm"], f"{r['held_out']}X", _delta_ci(r, "auc"), _delta_ci(r, "brier")] for r in deltas],
            )
            lines += [""]
            for r in deltas:
                lines += [f"- {difference_sentence(r['arm'], r['held_out'], r, 'auc')}",
                          f"- {difference_sentence(r['arm'], r['held_out'], r, 'brier')}"]
    else:
        lines += ["No fold has finished."]
    if skipped:
        lines += ["", "Held-out magnifications that could not run:", ""]
        lines += [f"- {m}X: {reason}" for m, reason in sorted(skipped.items())]
    refused = config.get("refused") or {}
    if refused:
        lines += ["", "Arms refused in a fold:", ""]
        lines += [f"- {k}: {reason}" for k, reason in sorted(refused.items())]
    lines += ["", f"![AUC and Brier per fold]({plots.get('metrics', 'plots/auc_brier_by_fold.png')})", ""]
    if "reliability" in plots:
        lines += ["## Calibration", "", f"![reliability diagrams]({plots['reliability']})", ""]
    lines += ["## Magnification probe", ""]
    if probe:
        lines += [
            "How much magnification information is left in each arm's frozen embedding. The probes are fit on "
            "the training patients' embeddings and scored on the **test patients'** images at the training "
            "magnifications (`probe_test` in `splits.csv`), which no arm trained on and the grl adversary never "
            "saw. Balanced accuracy; lower = more invariant; chance = 1 / number of magnifications. The linear "
            "probe's C is chosen by patient-grouped inner CV; the MLP has one hidden layer of 128 units.",
            "",
        ]
        cell = {(r["arm"], int(r["held_out"]), r["probe"], r["split"]): float(r["balanced_accuracy"]) for r in probe}
        arm_folds = list(dict.fromkeys((str(r["arm"]), int(r["held_out"])) for r in probe))
        chance = {(r["arm"], int(r["held_out"])): float(r["chance"]) for r in probe}
        body = [[a, f"{m}X", *(_fmt(cell.get((a, m, p, s), math.nan)) for s in ("test_patients", "train_cv")
                              for p in PROBES), _fmt(chance[(a, m)])] for a, m in arm_folds]
        lines += _table(["arm", "held out", "linear, test patients", "MLP, test patients",
                         "linear, train CV", "MLP, train CV", "chance"], body)
        lines += ["", *_probe_verdict(probe), ""]
        if "probe" in plots:
            lines += [f"![magnification probe]({plots['probe']})", ""]
    else:
        lines += ["No embeddings to probe.", ""]
    if gan_grids:
        lines += ["## DCGAN samples", "", "Each grid: per class, a row of real training images of the fold (64×64) "
                  "and two rows of generated ones.", ""]
        for m, rel in sorted(gan_grids.items()):
            lines += [f"{m}X held out:", "", f"![DCGAN samples, {m}X held out]({rel})", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += [
        "## For scale",
        "",
        "Ezuma & Medaiyese (2026, BreaKHis, strict patient-disjoint LOMO) report the gradient-reversal model "
        "with the best discrimination (clearest gain with 200X held out) and Brier 0.063 vs 0.089 for the "
        "baseline, and GAN augmentation inconsistent (hurting at 400X). Their backbone, budget and seeds are "
        "not published; compare directions, not values.",
        "",
    ]
    return "\n".join(lines)


def _probe_verdict(probe: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per arm and probe: in how many folds the test-patient probe is below the baseline's."""
    out = []
    for p in PROBES:
        rows = [r for r in probe if r["split"] == "test_patients" and r["probe"] == p]
        base = {int(r["held_out"]): float(r["balanced_accuracy"]) for r in rows if r["arm"] == "baseline"}
        for arm in ("gan", "grl"):
            mine = {int(r["held_out"]): float(r["balanced_accuracy"]) for r in rows if r["arm"] == arm}
            pairs = [(mine[m], base[m]) for m in sorted(mine) if m in base and not math.isnan(mine[m] + base[m])]
            if not pairs:
                continue
            lower = sum(1 for a, b in pairs if a < b)
            diff = float(np.mean([a - b for a, b in pairs]))
            out.append(
                f"- {arm} vs baseline ({p} probe, test patients): probe balanced accuracy lower in {lower} of "
                f"{len(pairs)} folds (mean difference {diff:+.3f})."
            )
    return out


def write_report(path: str | Path, text: str) -> Path:
    """Write ``report.md`` atomically."""
    path = Path(path)
    atomic_write_text(path, text)
    return path


def render_repeats(
    config: Mapping[str, Any],
    summary: Sequence[Mapping[str, Any]],
    n_repeats: int,
    overall: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The top-level ``report.md`` of a ``--repeats`` run: the pooled primary endpoint and overall estimates (one
    interval each, resampling repeats and patients), then mean ± sd over repeats per held-out magnification."""
    lines = [f"# Leave-one-magnification-out (BreaKHis), {n_repeats} repeats", ""]
    for warning in config.get("report_warnings", []):
        lines += [f"> **Warning:** {warning}", ""]
    dirs = config.get("repeat_dirs", [])
    lines += [
        f"The whole protocol ran {n_repeats} times, each on its own seeded patient split, initial weights and "
        f"batch order (seeds {config.get('seed')} to {int(config.get('seed', 0)) + n_repeats - 1}; folders "
        + ", ".join(f"`{d}`" for d in dirs)
        + "). Patient key: `" + str(config.get("patient_key")) + "`. Each repeat's report gives its per-fold "
        "95% patient-bootstrap intervals; here, mean ± sd over the repeats (sd: sample standard deviation, "
        "the spread a new split would show).",
        "",
        *overall_lines(overall),
        "The pooled estimates above average every repeat and resample the repeats and the patients (a hierarchical "
        "bootstrap; patients are drawn once for all repeats, as they are the same people). Per held-out "
        "magnification, over the repeats (secondary):",
        "",
    ]

    def ms(row: Mapping[str, Any], metric: str, signed: bool = False) -> str:
        m, sd = _num(row.get(f"{metric}_mean")), _num(row.get(f"{metric}_sd"))
        if math.isnan(m):
            return "n/a"
        fmt = "+.3f" if signed else ".3f"
        return f"{m:{fmt}} ± {sd:.3f}" if not math.isnan(sd) else f"{m:{fmt}}"

    body = [
        [r["arm"], f"{r['held_out']}X", str(r["n_repeats"]), ms(r, "auc"), ms(r, "brier"),
         "" if r["arm"] == "baseline" else ms(r, "delta_auc", True),
         "" if r["arm"] == "baseline" else ms(r, "delta_brier", True)]
        for r in summary
    ]
    lines += _table(["arm", "held out", "repeats", "AUC", "Brier", "ΔAUC vs baseline", "ΔBrier vs baseline"], body)
    lines += ["", "`repeats.csv` holds these numbers, `results_overall.csv` the pooled ones; each `repeat_<k>/` is a "
              "complete LOMO output folder.", ""]
    return "\n".join(lines)


def _contamination_line(prov: Mapping[str, Any]) -> str:
    """What the backbone guard could check (see ``backbone_provenance``)."""
    if prov.get("source") == "random_init":
        return "Contamination: none possible (random initialisation)."
    if prov.get("content_checked"):
        return (
            "Contamination: the backbone's training record was checked against DATA by task, by path and by "
            "the pixel content of every image; "
            + ("; ".join(prov.get("contamination", [])) or "no overlap found.")
        )
    if prov.get("training_tasks"):
        return (
            "Contamination: checked by the backbone's training tasks and paths only (its record holds no image "
            "digests: trained before wsienc recorded them)."
        )
    return (
        "Contamination: the weights carry no wsienc training record, so what they were trained on cannot be "
        "checked here; the user vouches that they never saw these images."
    )


#: The pre-specified primary endpoint of a LOMO study: the mean over held-out magnifications of grl's AUC minus the baseline's.
PRIMARY_ENDPOINT = ("grl", "delta_auc")


def _est_ci(row: Mapping[str, Any] | None, signed: bool = False) -> str:
    if row is None or math.isnan(_num(row.get("estimate"))):
        return "n/a"
    f = "+.3f" if signed else ".3f"
    lo, hi = _num(row.get("ci_low")), _num(row.get("ci_high"))
    ci = "n/a" if math.isnan(lo) or math.isnan(hi) else f"{lo:{f}}, {hi:{f}}"
    return f"{_num(row['estimate']):{f}} [{ci}]"


def primary_sentence(overall: Sequence[Mapping[str, Any]]) -> str:
    """The primary endpoint in words: estimate, interval, and what the interval allows one to say."""
    row = next((r for r in overall if (r["arm"], r["metric"]) == PRIMARY_ENDPOINT), None)
    if row is None:
        return ("Primary endpoint (mean ΔAUC of grl over baseline across the held-out magnifications): not estimable "
                "in this run (it needs both the baseline and grl arms).")
    text = (f"Primary endpoint, pre-specified: the mean over the {row['n_folds']} held-out magnification(s) of the AUC "
            f"difference grl − baseline = {_est_ci(row, signed=True)} (95% CI, {row['method']}, "
            f"{row['n_patients']} test patients resampled jointly across folds). ")
    lo, hi = _num(row.get("ci_low")), _num(row.get("ci_high"))
    if math.isnan(lo) or math.isnan(hi):
        return text + "No interval could be formed: no claim can be made."
    if lo <= 0 <= hi:
        return text + "The interval includes 0: no evidence of a difference (which is not evidence of no difference)."
    side = "higher" if lo > 0 else "lower"
    return text + f"The interval excludes 0: grl's mean AUC across held-out magnifications is {side} than the baseline's."


def overall_lines(overall: Sequence[Mapping[str, Any]]) -> list[str]:
    """The primary endpoint and the secondary overall table (``results_overall.csv``) of a report."""
    if not overall:
        return []
    by = {(r["arm"], r["metric"]): r for r in overall}
    arms = list(dict.fromkeys(r["arm"] for r in overall))
    body = [
        [arm, _est_ci(by.get((arm, "auc"))), _est_ci(by.get((arm, "brier"))), _est_ci(by.get((arm, "f1"))),
         _est_ci(by.get((arm, "balanced_accuracy"))), _est_ci(by.get((arm, "delta_auc")), True),
         _est_ci(by.get((arm, "delta_brier")), True)]
        for arm in arms
    ]
    first = overall[0]
    return [
        "## Primary endpoint", "", primary_sentence(overall), "",
        f"## Overall: mean over the held-out magnifications ({first['held_out']}; secondary)", "",
        *_table(["arm", "AUC", "Brier", "F1", "bal. acc.", "ΔAUC vs baseline", "ΔBrier vs baseline"], body),
        "",
        "One interval per number, from one resampling of the test patients shared by all folds (and all repeats): "
        "`results_overall.csv`. Everything but the primary endpoint is secondary: read the rest as description, "
        "not as further tests.",
        "",
    ]
