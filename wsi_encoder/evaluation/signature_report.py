"""The ``wsienc signatures`` report: ``report.md``, a Jaccard heatmap per arm and a size-vs-AUC plot.

The report says why signature dimensions can be compared across folds at all (the same initial
weights, or one frozen encoder) and repeats every warning about that basis, because the overlap of
raw dimension indices of separately trained networks means nothing (hidden units can be permuted).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_encoder.evaluation.signature_records import ArmJaccard, SeedNullRow, SignatureRecord
from wsi_encoder.io.files import atomic_write_figure, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

#: Ezuma & Medaiyese (2026) abstract, for orientation (their backbone and selection are unknown).
PAPER_REFERENCE = (
    "Ezuma & Medaiyese (2026, arXiv 2604.25817) report, on BreaKHis LOMO, a mean signature size of 306 "
    "dimensions for the domain-general (GRL) model vs 1,074 for the baseline, with AUC 0.967 vs 0.965 and "
    "F1 0.930 vs 0.931, and a cross-fold Jaccard near 0 for the baseline vs 0.99 between the 100X and 200X "
    "folds for the GRL model. Their backbone, embedding size and exact selection procedure are not public."
)


@dataclass(frozen=True)
class ReportContext:
    """What the report says besides the numbers."""

    source: str
    kind: str
    classes: tuple[str, ...]
    basis_note: str
    warnings: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _num(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _mean_sd(values: Sequence[float], digits: int = 3) -> str:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return "n/a"
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f}"


def _save_png(fig: Figure, path: Path) -> None:
    atomic_write_figure(path, fig, dpi=120, bbox_inches="tight", format="png")


def plot_jaccard_heatmap(jac: ArmJaccard, sizes: Mapping[str, int], path: Path) -> Path:
    """Heatmap of an arm's fold-by-fold Jaccard matrix, values written in the cells, sizes on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(jac.folds)
    side = max(3.6, 0.9 * k + 2.2)
    fig, ax = plt.subplots(figsize=(side + 0.9, side))
    im = ax.imshow(jac.matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    labels = [f"{f}\n({sizes.get(f, 0)} dims)" for f in jac.folds]
    ax.set_xticks(range(k), labels, fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    for i in range(k):
        for j in range(k):
            v = jac.matrix[i, j]
            text = "n/a" if math.isnan(v) else f"{v:.2f}\n({jac.chance[i, j]:.2f})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if v > 0.6 else "white")
    mean = jac.mean_off_diagonal
    ax.set_title(
        f"{jac.arm}: signature Jaccard between folds (chance in brackets, D = {jac.n_dims})\n"
        f"mean off-diagonal {_num(mean, 2)}, chance {_num(jac.mean_chance, 2)}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="|A ∩ B| / |A ∪ B|")
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_size_vs_auc(records: Sequence[SignatureRecord], path: Path, embedding_dims: Mapping[str, int]) -> Path:
    """Signature size (x, symlog) vs test AUC (y): filled = signature model, hollow = full model at D dims."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    arms = list(dict.fromkeys(r.arm for r in records))
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for a, arm in enumerate(arms):
        color = colors(a % 10)
        recs = [r for r in records if r.arm == arm]
        dim = embedding_dims.get(arm, 0)
        for r in recs:
            auc_sig, auc_full = r.metrics_signature["auc"], r.metrics_full["auc"]
            if dim and not (math.isnan(auc_sig) or math.isnan(auc_full)):
                ax.plot([r.size, dim], [auc_sig, auc_full], color=color, alpha=0.25, lw=0.8)
            if not math.isnan(auc_full) and dim:
                ax.scatter([dim], [auc_full], facecolors="none", edgecolors=[color], s=36)
            if not math.isnan(auc_sig):
                ax.scatter([r.size], [auc_sig], color=color, s=36)
                ax.annotate(r.fold, (r.size, auc_sig), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
        sizes = [r.size for r in recs if not math.isnan(r.metrics_signature["auc"])]
        aucs = [r.metrics_signature["auc"] for r in recs if not math.isnan(r.metrics_signature["auc"])]
        if sizes:
            ax.scatter([np.mean(sizes)], [np.mean(aucs)], marker="D", s=90, color=color, edgecolors="black", zorder=3)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=-0.2)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("signature size (dimensions; rings at D = all dimensions)")
    ax.set_ylabel("test AUC")
    ax.set_title("Signature size vs test AUC per fold\n(dots: signature model, rings: full model, diamonds: arm mean)", fontsize=9)
    handles = [Line2D([], [], marker="o", ls="", color=colors(a % 10), label=arm) for a, arm in enumerate(arms)]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="lower right")
    if not any(not math.isnan(r.metrics_signature["auc"]) for r in records):
        ax.text(0.5, 0.5, "AUC undefined in every fold\n(single-class test sets)", transform=ax.transAxes,
                ha="center", va="center", color="grey")
    ax.grid(alpha=0.3)
    _save_png(fig, path)
    plt.close(fig)
    return path


def _arm_summary(records: Sequence[SignatureRecord], jaccards: Sequence[ArmJaccard]) -> list[str]:
    lines = [
        "| arm | folds | D | size | size / D | AUC full | AUC signature | F1 full | F1 signature | Brier full "
        "| Brier signature | ECE full | ECE signature | AUC network | mean Jaccard | chance Jaccard "
        "| corrected Jaccard |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for jac in jaccards:
        recs = [r for r in records if r.arm == jac.arm]

        def col(metric: str, which: str, recs: Sequence[SignatureRecord] = recs) -> str:
            src = "metrics_full" if which == "full" else "metrics_signature"
            return _mean_sd([getattr(r, src)[metric] for r in recs])

        lines.append(
            f"| {jac.arm} | {len(recs)} | {jac.n_dims} | {_mean_sd([float(r.size) for r in recs], 1)} "
            f"| {_mean_sd([r.size_fraction for r in recs])} | {col('auc', 'full')} "
            f"| {col('auc', 'sig')} | {col('f1', 'full')} | {col('f1', 'sig')} | {col('brier', 'full')} "
            f"| {col('brier', 'sig')} | {col('ece', 'full')} | {col('ece', 'sig')} "
            f"| {_mean_sd([r.auc_network for r in recs])} | {_num(jac.mean_off_diagonal)} "
            f"| {_num(jac.mean_chance)} | {_num(jac.mean_corrected)} |"
        )
    return lines


def _fold_table(records: Sequence[SignatureRecord]) -> list[str]:
    lines = [
        "| arm | fold | size | L1-fit size | AUC full | AUC signature | AUC lasso | F1 full | F1 signature "
        "| Brier full | Brier signature | ECE full | ECE signature | selection / test samples | selection / test patients |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        f, s = r.metrics_full, r.metrics_signature
        lines.append(
            f"| {r.arm} | {r.fold} | {r.size} | {len(r.lasso_indices)} | {_num(f['auc'])} | {_num(s['auc'])} "
            f"| {_num(r.auc_lasso)} | {_num(f['f1'])} | {_num(s['f1'])} | {_num(f['brier'])} | {_num(s['brier'])} "
            f"| {_num(f['ece'])} | {_num(s['ece'])} | {r.n_train} / {r.n_test} | {r.n_train_patients} / {r.n_test_patients} |"
        )
    return lines


def _jaccard_interval(jac: ArmJaccard) -> str:
    lo, hi = jac.mean_interval()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return " No bootstrap interval (`--bootstrap 0`, or too few resamples that every fold could select on)."
    return (
        f" Over {len(jac.boot_means)} resamples of each fold's selection patients (signatures re-selected from scratch), "
        f"the mean Jaccard's 95% percentile interval is [{_num(lo)}, {_num(hi)}]: how much of the value is the luck of "
        "which patients selected, beside the uniform-random chance level above (a weak null: folds share "
        "patients and the initial weights)."
    )


def _size_ci(record: SignatureRecord) -> str:
    lo, hi = record.size_interval()
    return f"{record.size} [{lo:.0f}, {hi:.0f}]" if np.isfinite(lo) and np.isfinite(hi) else f"{record.size} [n/a]"


def _delta(record: SignatureRecord, key: str) -> str:
    v = record.vs_full
    est, lo, hi = (v.get(k, float("nan")) for k in (key, f"{key}_ci_low", f"{key}_ci_high"))
    if not np.isfinite(est):
        return "n/a"
    ci = f"{lo:+.3f}, {hi:+.3f}" if np.isfinite(lo) and np.isfinite(hi) else "n/a"
    return f"{est:+.3f} [{ci}]"


def _vs_full_table(records: Sequence[SignatureRecord]) -> list[str]:
    lines = [
        "Signature model minus full model on the same test images; 95% intervals resample the fold's test patients "
        "(each with all of its images) for both models at once: AUC by BCa, Brier by BCa. An interval that includes 0 "
        "is no evidence that the signature loses (or gains) anything, not evidence that it does not.",
        "",
        "| arm | fold | size [95% CI, selection-patient bootstrap] | ΔAUC [95% CI] | ΔBrier [95% CI] | test images / patients |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.arm} | {r.fold} | {_size_ci(r)} | {_delta(r, 'delta_auc')} | {_delta(r, 'delta_brier')} | "
        f"{r.n_test} / {r.n_test_patients} |"
        for r in records
    ]
    return lines


def _jaccard_tables(
    jaccards: Sequence[ArmJaccard], heatmaps: Mapping[str, str], sizes: Mapping[tuple[str, str], int]
) -> list[str]:
    lines: list[str] = []
    for jac in jaccards:
        lines += [f"### {jac.arm}", ""]
        lines += ["| | " + " | ".join(jac.folds) + " |", "|---" * (len(jac.folds) + 1) + "|"]
        for i, fold in enumerate(jac.folds):
            lines.append(f"| **{fold}** | " + " | ".join(_num(v, 2) for v in jac.matrix[i]) + " |")
        lines.append("")
        lines.append(
            f"Mean off-diagonal Jaccard: **{_num(jac.mean_off_diagonal)}**; two random signatures of the same sizes "
            f"in D = {jac.n_dims} dimensions would score **{_num(jac.mean_chance)}** on average (exact hypergeometric "
            f"expectation), so the chance-corrected Jaccard (J − E[J]) / (1 − E[J]) is **{_num(jac.mean_corrected)}** "
            "(0 = chance, 1 = identical)."
            + _jaccard_interval(jac)
        )
        lines += ["", "| fold A | fold B | Jaccard | chance | corrected |", "|---|---|---|---|---|"]
        lines += [f"| {a} | {b} | {_num(v)} | {_num(c)} | {_num(k)} |" for a, b, v, c, k in jac.pairs()]
        lines.append("")
        empty = [f for f in jac.folds if sizes[(jac.arm, f)] == 0]
        if len(empty) >= 2:
            lines.append(
                f"{len(empty)} folds ({', '.join(empty)}) have an empty signature; their pairs are n/a (two empty sets "
                "share nothing to compare) and are left out of the means."
            )
        if "100X" in jac.folds and "200X" in jac.folds:
            i, j = jac.folds.index("100X"), jac.folds.index("200X")
            lines.append(
                f"The 100X-held-out vs 200X-held-out pair (the paper's highlighted pair): **{_num(jac.matrix[i, j])}** "
                f"(chance {_num(jac.chance[i, j])}, corrected {_num(jac.corrected[i, j])})."
            )
        lines += ["", f"![Jaccard heatmap of {jac.arm}]({heatmaps[jac.arm]})", ""]
    return lines


def _ci3(v: tuple[float, float, float], sign: bool = False) -> str:
    fmt = "+.3f" if sign else ".3f"
    est, lo, hi = v
    if not np.isfinite(est):
        return "n/a"
    ci = f"{lo:{fmt}}, {hi:{fmt}}" if np.isfinite(lo) and np.isfinite(hi) else "n/a"
    return f"{est:{fmt}} [{ci}]"


def _seed_null_section(records: Sequence[SignatureRecord], rows: Sequence[SeedNullRow], kind: str) -> list[str]:
    """The seed-to-seed reference Jaccard beside the cross-magnification Jaccard, per fold and overall, in words."""
    lines = [
        "How stable would a signature be if nothing but the training seed changed? For each fold the same encoder "
        "(same initial weights, same images, same roles) was trained again with a second seed, and its signature "
        "selected by the same rule on the same selection images. The seed-to-seed Jaccard is the reference a "
        "cross-magnification Jaccard must be read against; the uniform-random chance level is a far weaker null. "
        "*Cross* is the mean Jaccard of the fold's signature with those of the other held-out magnifications of the "
        "same patient split; the difference is cross − seed. Intervals: 95% percentiles over the selection-patient "
        "bootstrap, paired (resample b re-selects both seeds and every fold on the same drawn patients).",
        "",
    ]
    if kind != "lomo":
        return [*lines, "Not computed: an embedding store has one frozen encoder, so there is no training seed to vary.", ""]
    arms = list(dict.fromkeys(r.arm for r in records))
    with_rows = {r.arm for r in rows}
    missing = [a for a in arms if a not in with_rows]
    if not rows:
        return [
            *lines,
            "**The seed null was not computed**: the run has no second seed (no `seed_null/` folder). "
            "`wsienc lomo --seed-null` on the same folder trains only the second seeds (the first ones are reused); "
            "without it, nothing here says whether cross-magnification stability exceeds what the training seed "
            "alone would leave.",
            "",
        ]
    lines += [
        "| arm | fold | seed-to-seed Jaccard [95% CI] | cross-magnification Jaccard [95% CI] | cross − seed [95% CI] | resamples | reading |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.arm} | {'**overall**' if r.fold == 'overall' else r.fold} | {_ci3(r.seed)} | {_ci3(r.cross)} "
        f"| {_ci3(r.difference, sign=True)} | {r.n_bootstrap} | {r.verdict} |"
        for r in rows
    ]
    lines.append("")
    for r in rows:
        if r.fold == "overall":
            lines.append(f"- **{r.arm}**, over its folds: {r.verdict}.")
    if missing:
        lines.append(f"- The seed null was not computed for {', '.join(f'`{a}`' for a in missing)} (no second seed).")
    lines.append("")
    return lines


def _dimension_note(dims: Mapping[str, int]) -> list[str]:
    values = sorted(set(dims.values()))
    text = ", ".join(str(d) for d in values)
    return [
        f"The embeddings have D = {text} dimensions"
        + ("" if len(values) == 1 else f" ({', '.join(f'{a}: {d}' for a, d in dims.items())})")
        + ". Signature sizes are bounded by D, so compare `size / D` (`size_fraction`) across backbones, and read "
        "Jaccard values against their chance level, which grows with size / D (two random 306-dimension subsets "
        "of 512 already overlap with Jaccard ≈ 0.43). The study's mean baseline signature of 1,074 dimensions "
        "implies D ≥ 1,074 (e.g. ResNet-50's 2,048): `wsienc lomo --backbone resnet50` is the paper-scale "
        "setting; a 512-dimensional ResNet-18 is not."
    ]


def _method(ctx: ReportContext) -> list[str]:
    s = ctx.settings
    if s.get("stability"):
        selection = (
            f"stability selection: the dimensions chosen in at least {s.get('stability_threshold')} of "
            f"{s.get('stability')} L1 fits on random halves of the selection patients (per class), at the "
            "cross-validated per-sample penalty"
        )
    else:
        selection = "the non-zero coefficients of the L1 fit on all training samples at the chosen penalty"
    criterion = (
        "the held-out log-loss of an L2 refit on the dimensions each L1 fit selects (relaxed lasso)"
        if s.get("relaxed")
        else "the held-out log-loss of the L1 model"
    )
    positive = ctx.classes[1] if len(ctx.classes) == 2 else "class 1"
    where = {
        "val": "**Selection set: the fold's validation-role patients** (`splits.csv` role `val`): the encoder never "
        "fitted their labels, so their embeddings show what it learned rather than what it memorised of its own "
        "training patients. The signature, the penalty, both probes and the standardisation use only these images "
        "(the per-fold table's *selection* samples and patients count them); test patients are only scored.",
        "train": "**Selection set: every training-side image**"
        + (" (`--select-on train`, a sensitivity analysis: the encoder fitted most of these labels, so a signature "
           "selected on them can reflect memorised training patients)." if ctx.kind == "lomo" else
           " of each fold (one frozen encoder that never saw these labels)."),
    }[str(s.get("select_on", "train"))]
    return [
        "## Method",
        "",
        where,
        "",
        "1. Each dimension is standardised with the selection set's mean and SD.",
        f"2. An L1-penalised logistic regression (scikit-learn, solver `{s.get('solver')}`) is fitted along "
        f"{s.get('n_lambdas')} per-sample penalties from the smallest that keeps every coefficient at zero down "
        f"to {s.get('lambda_ratio')} of it. The penalty is chosen by patient-grouped, class-stratified inner "
        f"cross-validation ({s.get('inner_folds')} folds, never splitting a patient) on {criterion}"
        + (", with the one-standard-error rule (the largest penalty within one SE of the best)." if s.get("one_se") else "."),
        f"3. The signature is {selection}.",
        "4. Test metrics, with "
        f"`{positive}` as the positive class and F1 at threshold 0.5: **full** is an L2 logistic regression on all "
        "dimensions, **signature** the same model refitted on the signature's dimensions only (both with C chosen "
        "by the same inner CV). Using one model family for both isolates the effect of dropping dimensions; a "
        "refit avoids the L1 shrinkage that would bias the probabilities (Brier, ECE). *AUC lasso* is the L1 "
        "model's own AUC; *AUC network* (LOMO input) that of the arm's own classifier head on the same images. "
        "An empty signature predicts the training prevalence (AUC 0.5).",
        "5. Jaccard |A ∩ B| / |A ∪ B| between the signatures of every pair of folds of an arm (n/a when both are "
        "empty). Its chance level is the expected Jaccard of two uniformly random subsets of the same sizes in D "
        "dimensions: the overlap K is hypergeometric, E[J] = Σ_k P(K = k)·k / (a + b − k). The corrected value "
        "(J − E[J]) / (1 − E[J]) is 0 at chance and 1 for identical signatures, so arms with different signature "
        "sizes or backbones of different D can be compared.",
        "",
    ]


def write_report(
    out_dir: str | Path,
    records: Sequence[SignatureRecord],
    jaccards: Sequence[ArmJaccard],
    ctx: ReportContext,
    seed_rows: Sequence[SeedNullRow] = (),
) -> list[Path]:
    """Write ``jaccard_<arm>.png`` per arm, ``size_vs_auc.png`` and ``report.md``; return their paths.

    ``seed_rows`` (:func:`~wsi_encoder.evaluation.signature_records.seed_null_rows`) fill the seed-null
    section; without them it says the seed null was not computed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    heatmaps: dict[str, str] = {}
    for jac in jaccards:
        sizes = {r.fold: r.size for r in records if r.arm == jac.arm}
        name = f"jaccard_{_safe(jac.arm)}.png"
        written.append(plot_jaccard_heatmap(jac, sizes, out / name))
        heatmaps[jac.arm] = name
    dims: dict[str, int] = {}
    for r in records:
        dims[r.arm] = max(dims.get(r.arm, 0), r.n_dims)
    written.append(plot_size_vs_auc(records, out / "size_vs_auc.png", dims))

    lines = [
        "# Sparse embedding signatures",
        "",
        f"Source: `{ctx.source}` ({'a `wsienc lomo` output folder' if ctx.kind == 'lomo' else 'an embedding store'}); "
        f"classes {', '.join(f'`{c}`' for c in ctx.classes)} (positive: `{ctx.classes[-1]}`).",
        "",
        "## Are dimensions comparable across folds?",
        "",
        ctx.basis_note,
        "",
    ]
    for message in ctx.warnings:
        lines += [f"> **Warning:** {message}", ""]
    lines += ["## Embedding size", "", *_dimension_note(dims), ""]
    lines += ["## Summary per arm (mean ± SD over folds)", "", *_arm_summary(records, jaccards), ""]
    lines += ["![Signature size vs AUC](size_vs_auc.png)", ""]
    lines += ["## Per fold", "", *_fold_table(records), ""]
    lines += ["## Does the signature lose anything? (paired, same test patients)", "", *_vs_full_table(records), ""]
    if ctx.failed:
        lines += ["Folds that could not be evaluated:", ""]
        lines += [f"- `{key}`: {reason}" for key, reason in ctx.failed.items()]
        lines.append("")
    lines += ["## Cross-fold reproducibility (Jaccard)", "", *_jaccard_tables(jaccards, heatmaps, {(r.arm, r.fold): r.size for r in records})]
    lines += ["## Seed-to-seed reference Jaccard (the null that matters)", "", *_seed_null_section(records, seed_rows, ctx.kind)]
    lines += _method(ctx)
    lines += ["## For orientation", "", PAPER_REFERENCE, "", "Selected indices per fold: `signatures.json`.", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    written.append(report)
    logger.info("report written to %s", report)
    return written
