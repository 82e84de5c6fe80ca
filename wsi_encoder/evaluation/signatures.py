"""Sparse embedding signatures: L1-logistic selection, stability selection, cross-fold Jaccard.

A *signature* is the set of embedding dimensions that an L1-penalised logistic regression keeps
(non-zero coefficients) when it predicts the label from a fold's training embeddings. Its size says
how compact the representation of the label is; the Jaccard overlap of the signatures of different
folds says how reproducible it is (Ezuma & Medaiyese 2026, arXiv 2604.25817; research notes §1.4).

Procedure for one fold (:func:`evaluate_fold`):

1. Standardise every dimension with the *training* mean and standard deviation (constant dimensions
   become zero and are never selected).
2. Penalty path: per-sample L1 penalties ``lam`` from ``lam_max`` (the smallest penalty at which every
   coefficient is zero, ``max_j |x_j·(y - ȳ)| / n``) down to ``lam_max * lambda_ratio``, log-spaced.
   scikit-learn's ``C`` is ``1 / (lam * n)`` for a fit on ``n`` samples, so inner folds, the final fit
   and stability subsamples all apply the same per-sample penalty.
3. The penalty is chosen by patient-grouped inner cross-validation (``StratifiedGroupKFold``, a
   ``GroupKFold`` that also balances the classes) on held-out log-loss; with ``one_se`` the largest
   penalty whose mean log-loss is within one standard error of the best (Hastie et al., ESL §7.10).
4. Signature = the non-zero coefficients of the L1 fit on all training samples at that penalty, or with
   ``stability > 0`` (Meinshausen & Bühlmann 2010) the dimensions selected in at least
   ``stability_threshold`` of ``stability`` fits on random halves of the training *patients*.
5. Metrics on the fold's test set, both from an L2 logistic regression (its ``C`` chosen by the same
   inner CV): the *full* model uses every dimension, the *signature* model only the signature's
   (a refit, "relaxed lasso": the L1 fit's own coefficients are shrunk towards zero, which would bias
   the probabilities and so the Brier score and ECE). The L1 model's own AUC is kept as ``auc_lasso``.
   An empty signature predicts the training prevalence (AUC 0.5).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import sklearn
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from wsi_encoder.errors import DatasetError, InvalidParameterError
from wsi_encoder.evaluation.metrics import classification_metrics

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
SOLVERS = ("liblinear", "saga")
# scikit-learn 1.8 replaced ``penalty="l1"`` by ``l1_ratio=1.0`` (and warns on the old spelling).
_SKLEARN_L1_RATIO = tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8)


@dataclass(frozen=True)
class SignatureSpec:
    """How signatures are selected and evaluated.

    Parameters
    ----------
    inner_folds
        Patient-grouped inner CV folds for choosing the penalties (reduced to the number of patients
        of the rarer class when there are fewer; at least 2 are needed).
    inner_repeats
        Repetitions of the inner CV with reshuffled patients; the losses are averaged over all of them
        (less noisy penalty choice, ``inner_repeats`` times the cost).
    n_lambdas
        Number of L1 penalties on the path.
    lambda_ratio
        Smallest / largest per-sample L1 penalty on the path (``0 < lambda_ratio < 1``).
    one_se
        Choose the largest penalty within one standard error of the best CV log-loss (sparser).
    relaxed
        Score each penalty by the held-out log-loss of an L2 refit (``C = relaxed_c``) on the dimensions
        its L1 fit selects ("relaxed lasso", Meinshausen 2007) instead of by the L1 model's own: the
        penalty then only selects, it does not have to shrink, and signatures hold fewer noise dimensions.
    relaxed_c
        Inverse L2 strength of that refit (scikit-learn ``C``; the data are standardised).
    stability
        Number of half-patient subsamples for stability selection; 0 turns it off.
    stability_threshold
        Fraction of the subsamples in which a dimension must be selected to enter the signature.
    stability_fraction
        Fraction of the training patients (per class) in each stability subsample.
    solver
        scikit-learn solver for the L1 fits: ``"liblinear"`` (coordinate descent) or ``"saga"``.
    l2_cs
        Grid of inverse L2 strengths ``C`` for the full and signature probes (chosen by inner CV).
    max_iter
        Iteration cap of every logistic fit.
    bootstrap
        Patient bootstrap resamples of the training set, each re-selected from scratch, behind the
        intervals of the signature size and of the cross-fold Jaccard (0 turns them off).
    seed
        Seed of the inner folds, the subsamples and the solvers.
    """

    inner_folds: int = 5
    inner_repeats: int = 1
    n_lambdas: int = 12
    lambda_ratio: float = 1e-3
    one_se: bool = False
    relaxed: bool = False
    relaxed_c: float = 1.0
    stability: int = 0
    stability_threshold: float = 0.6
    stability_fraction: float = 0.5
    solver: str = "liblinear"
    l2_cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    max_iter: int = 2000
    bootstrap: int = 20
    seed: int = 0

    def validate(self) -> SignatureSpec:
        """Return self, or raise :class:`InvalidParameterError` naming the bad value."""
        checks = [
            (self.inner_folds >= 2, f"inner_folds must be >= 2, got {self.inner_folds!r}"),
            (self.inner_repeats >= 1, f"inner_repeats must be >= 1, got {self.inner_repeats!r}"),
            (self.n_lambdas >= 2, f"n_lambdas must be >= 2, got {self.n_lambdas!r}"),
            (0 < self.lambda_ratio < 1, f"lambda_ratio must be in (0, 1), got {self.lambda_ratio!r}"),
            (self.stability >= 0, f"--stability must be >= 0 subsamples, got {self.stability!r}"),
            (
                0 < self.stability_threshold <= 1,
                f"--stability-threshold must be in (0, 1], got {self.stability_threshold!r}",
            ),
            (0 < self.stability_fraction < 1, f"stability_fraction must be in (0, 1), got {self.stability_fraction!r}"),
            (self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}"),
            (len(self.l2_cs) >= 1 and min(self.l2_cs) > 0, f"l2_cs must be positive values, got {self.l2_cs!r}"),
            (self.relaxed_c > 0, f"relaxed_c must be > 0, got {self.relaxed_c!r}"),
            (self.max_iter >= 1, f"max_iter must be >= 1, got {self.max_iter!r}"),
            (self.bootstrap >= 0, f"--bootstrap must be >= 0 resamples, got {self.bootstrap!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidParameterError(message)
        return self

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy."""
        return {
            "inner_folds": self.inner_folds,
            "inner_repeats": self.inner_repeats,
            "n_lambdas": self.n_lambdas,
            "lambda_ratio": self.lambda_ratio,
            "one_se": self.one_se,
            "relaxed": self.relaxed,
            "relaxed_c": self.relaxed_c,
            "stability": self.stability,
            "stability_threshold": self.stability_threshold,
            "stability_fraction": self.stability_fraction,
            "solver": self.solver,
            "l2_cs": list(self.l2_cs),
            "max_iter": self.max_iter,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class SignatureSelection:
    """The signature of one training set and how it was chosen.

    ``lambdas`` are per-sample L1 penalties (largest first), ``cv_loss``/``cv_se`` the inner-CV mean
    log-loss and its standard error per penalty, ``lam`` the chosen one and ``c`` the scikit-learn
    ``C`` of the final fit on all ``n`` training samples. ``at_path_end`` is true when the chosen
    penalty is the smallest on the path (a longer path might select more). ``frequencies`` (stability
    selection only) holds each dimension's selection frequency over the subsamples.
    """

    indices: tuple[int, ...]
    lam: float
    c: float
    lambdas: tuple[float, ...]
    cv_loss: tuple[float, ...]
    cv_se: tuple[float, ...]
    lasso_indices: tuple[int, ...]
    at_path_end: bool = False
    frequencies: FloatArray | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        """Number of dimensions in the signature."""
        return len(self.indices)


@dataclass(frozen=True)
class FoldEvaluation:
    """A fold's signature and the test metrics of the full, signature and lasso models."""

    selection: SignatureSelection
    metrics_full: dict[str, float]
    metrics_signature: dict[str, float]
    auc_lasso: float
    c_full: float
    c_signature: float
    n_train: int
    n_test: int
    n_train_groups: int
    n_test_groups: int
    n_dims: int
    #: Signature minus full model on the same test patients: ``delta_auc``, ``delta_brier`` and their 95% interval
    #: bounds (``_ci_low`` / ``_ci_high``; paired patient bootstrap, :mod:`~wsi_encoder.evaluation.patient_intervals`).
    vs_full: dict[str, float] = field(default_factory=dict)
    #: The signature re-selected on ``spec.bootstrap`` patient resamples of the training set (None: failed resample).
    boot_indices: tuple[tuple[int, ...] | None, ...] = ()


def bootstrap_signatures(
    x_train: npt.NDArray[np.float64], y_train: npt.NDArray[np.int64], groups_train: npt.ArrayLike, spec: SignatureSpec
) -> tuple[tuple[int, ...] | None, ...]:
    """The signature selected again on each of ``spec.bootstrap`` resamples of the training **patients**.

    Each resample draws the training patients with replacement (every image of a drawn patient comes
    along, a patient drawn twice twice, in one inner fold) and reruns the whole selection, penalty choice
    included. A resample that holds one class, or too few patients for the inner CV, gives None.
    """
    groups = np.asarray(groups_train).astype(str)
    patients = np.unique(groups)
    rows_of = {p: np.flatnonzero(groups == p) for p in patients}
    rng = np.random.default_rng(spec.seed + 7919)
    out: list[tuple[int, ...] | None] = []
    for _ in range(spec.bootstrap):
        drawn = rng.choice(patients, size=len(patients), replace=True)
        rows = np.concatenate([rows_of[p] for p in drawn])
        # copies of one patient keep one group id (so one inner fold); distinct draws stay distinct patients
        g = groups[rows]
        try:
            _check_binary(y_train[rows], "a bootstrap resample")
            splits = inner_splits(y_train[rows], g, spec.inner_folds, spec.seed, spec.inner_repeats)
            out.append(select_signature(x_train[rows], y_train[rows], g, spec, splits=splits).indices)
        except (DatasetError, InvalidParameterError, ValueError):
            out.append(None)
    return tuple(out)


def signature_vs_full(
    y_test: npt.NDArray[np.int64], prob_full: npt.ArrayLike, prob_signature: npt.ArrayLike,
    groups_test: npt.ArrayLike, seed: int = 0, n_boot: int = 1000,
) -> dict[str, float]:
    """Signature minus full model (AUC, Brier) on the same resampled test patients, with 95% intervals."""
    from wsi_encoder.evaluation.patient_intervals import FoldScores, patient_intervals

    fold = FoldScores(y=y_test, patients=np.asarray(groups_test).astype(str),
                      prob={"full": np.asarray(prob_full, float), "signature": np.asarray(prob_signature, float)})
    out: dict[str, float] = {}
    for r in patient_intervals([fold], baseline="full", n_boot=n_boot, seed=seed, metrics=("auc", "brier")):
        if r["arm"] == "signature" and r["metric"].startswith("delta_"):
            out[r["metric"]] = r["estimate"]
            out[f"{r['metric']}_ci_low"], out[f"{r['metric']}_ci_high"] = r["ci_low"], r["ci_high"]
    return out


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """Jaccard index ``|A ∩ B| / |A ∪ B|`` of two index sets; nan when both are empty (nothing to compare)."""
    sa, sb = {int(i) for i in a}, {int(i) for i in b}
    union = sa | sb
    if not union:
        return float("nan")
    return len(sa & sb) / len(union)


def expected_jaccard(size_a: int, size_b: int, n_dims: int) -> float:
    """Expected Jaccard of two independent uniformly random subsets of sizes ``a`` and ``b`` of ``D`` dimensions.

    The overlap ``K`` is hypergeometric (``D`` dimensions, ``a`` marked, ``b`` drawn), so
    ``E[J] = Σ_k P(K = k) · k / (a + b − k)`` exactly. Two random 306-subsets of 512 dimensions
    already give about 0.43. nan when both sets are empty; 0 when exactly one is.
    """
    from scipy.stats import hypergeom

    a, b, d = int(size_a), int(size_b), int(n_dims)
    if min(a, b) < 0 or max(a, b) > d:
        raise InvalidParameterError(f"subset sizes {a}, {b} must lie in [0, D = {d}]")
    if a == 0 and b == 0:
        return float("nan")
    k = np.arange(max(0, a + b - d), min(a, b) + 1)
    pmf = hypergeom.pmf(k, d, a, b)
    return float(np.sum(pmf * k / (a + b - k)))


def corrected_jaccard(value: float, chance: float) -> float:
    """Chance-corrected Jaccard ``(J − E[J]) / (1 − E[J])``: 0 at chance, 1 for identical sets; nan when undefined."""
    if not (np.isfinite(value) and np.isfinite(chance)) or chance >= 1.0:
        return float("nan")
    return float((value - chance) / (1.0 - chance))


def jaccard_matrix(signatures: Sequence[Iterable[int]]) -> FloatArray:
    """Symmetric ``(k, k)`` matrix of pairwise :func:`jaccard` values (diagonal 1, nan for an empty signature)."""
    sets = [set(map(int, s)) for s in signatures]
    k = len(sets)
    out = np.ones((k, k), dtype=float)
    for i in range(k):
        out[i, i] = jaccard(sets[i], sets[i])
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = jaccard(sets[i], sets[j])
    return out


def mean_off_diagonal(matrix: npt.ArrayLike) -> float:
    """Mean of the finite off-diagonal entries of a square matrix; nan when there are none."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise InvalidParameterError(f"expected a square matrix, got shape {m.shape!r}")
    values = m[~np.eye(m.shape[0], dtype=bool)]
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def standardise(x_train: npt.ArrayLike, *others: npt.ArrayLike) -> list[FloatArray]:
    """Centre and scale every column with the training mean and std (constant columns become 0)."""
    xt = np.asarray(x_train, dtype=np.float64)
    mean = xt.mean(axis=0)
    std = xt.std(axis=0)
    scale = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, np.inf)
    return [(np.asarray(x, dtype=np.float64) - mean) / scale for x in (xt, *others)]


def lambda_max(x_std: FloatArray, y: npt.ArrayLike) -> float:
    """Smallest per-sample L1 penalty at which every coefficient is zero (standardised ``x_std``)."""
    yv = np.asarray(y, dtype=np.float64)
    if x_std.shape[1] == 0 or yv.size == 0:
        return 0.0
    return float(np.abs(x_std.T @ (yv - yv.mean())).max() / yv.size)


def _logistic(c: float, *, l1: bool, spec: SignatureSpec) -> LogisticRegression:
    """An L1 (``spec.solver``) or L2 (liblinear: fast, deterministic trust-region Newton) logistic model."""
    extra: dict[str, object] = {}
    if l1:
        extra = {"l1_ratio": 1.0} if _SKLEARN_L1_RATIO else {"penalty": "l1"}
    solver = spec.solver if l1 else "liblinear"
    if solver == "liblinear":
        # liblinear penalises the intercept too; a large constant column makes that penalty negligible.
        extra["intercept_scaling"] = 100.0
    return LogisticRegression(C=c, solver=solver, max_iter=spec.max_iter, random_state=spec.seed, **extra)


def _fit(model: LogisticRegression, x: FloatArray, y: IntArray) -> LogisticRegression:
    """Fit, turning convergence warnings into one log line (they are common far along the L1 path)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.info("logistic fit (C=%.3g, %d samples x %d dims) did not fully converge", model.C, *x.shape)
    return model


def _l1_support(x_std: FloatArray, y: IntArray, lam: float, spec: SignatureSpec) -> tuple[IntArray, LogisticRegression | None]:
    """Indices of the non-zero coefficients of the L1 fit at per-sample penalty ``lam``."""
    if lam <= 0 or not np.isfinite(lam) or x_std.shape[1] == 0:
        return np.zeros(0, dtype=np.int64), None
    model = _fit(_logistic(1.0 / (lam * len(y)), l1=True, spec=spec), x_std, y)
    return np.flatnonzero(model.coef_[0]).astype(np.int64), model


def _check_binary(y: IntArray, where: str) -> None:
    classes = np.unique(y)
    if not np.array_equal(classes, [0, 1]):
        raise DatasetError(
            f"{where} has classes {classes.tolist()!r}; a signature needs both classes 0 and 1 in the training set"
        )


def inner_splits(
    y: npt.ArrayLike, groups: npt.ArrayLike, n_folds: int, seed: int, repeats: int = 1
) -> list[tuple[IntArray, IntArray]]:
    """Patient-grouped, class-stratified inner CV splits (``StratifiedGroupKFold``, shuffled), ``repeats`` times.

    The number of folds is reduced to the number of groups of the rarer class (each fold should see
    both classes in training); raises :class:`DatasetError` when fewer than 2 are possible. Each
    repeat reshuffles the patients (seeds ``seed``, ``seed + 1``, ...).
    """
    yv = np.asarray(y)
    g = np.asarray(groups)
    per_class = [len(np.unique(g[yv == c])) for c in np.unique(yv)]
    k = min(n_folds, min(per_class) if per_class else 0)
    if k < 2:
        raise DatasetError(
            f"the training set has {min(per_class, default=0)} patient(s) in its rarer class; patient-grouped "
            "inner cross-validation needs at least 2 patients of each class"
        )
    out = []
    for r in range(repeats):
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r)
        out += [(tr.astype(np.int64), te.astype(np.int64)) for tr, te in cv.split(np.zeros(len(yv)), yv, g)]
    return out


@dataclass(frozen=True)
class _InnerFold:
    """One inner CV fold, standardised with its own training statistics."""

    x_train: FloatArray
    y_train: IntArray
    x_val: FloatArray
    y_val: IntArray


def _inner_folds(x: FloatArray, y: IntArray, splits: list[tuple[IntArray, IntArray]]) -> list[_InnerFold]:
    folds = []
    for tr, va in splits:
        if len(np.unique(y[tr])) < 2:
            continue
        xtr, xva = standardise(x[tr], x[va])
        folds.append(_InnerFold(xtr, y[tr], xva, y[va]))
    if not folds:
        raise DatasetError("no inner cross-validation fold had both classes in its training part")
    return folds


def _loss(y: IntArray, prob: FloatArray) -> float:
    """Mean binary log-loss (probabilities clipped to [1e-7, 1 - 1e-7])."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


def _l2_prob(x_train: FloatArray, y_train: IntArray, x_eval: FloatArray, c: float, spec: SignatureSpec) -> FloatArray:
    """P(class 1) of an L2 logistic fit; the training prevalence when there are no columns."""
    if x_train.shape[1] == 0:
        return np.full(len(x_eval), float(np.mean(y_train)))
    return _fit(_logistic(c, l1=False, spec=spec), x_train, y_train).predict_proba(x_eval)[:, 1]


def _l1_fold_loss(fold: _InnerFold, lam: float, spec: SignatureSpec) -> float:
    """Held-out log-loss at penalty ``lam``: of the L1 model, or (relaxed) of an L2 refit on its support."""
    support, model = _l1_support(fold.x_train, fold.y_train, lam, spec)
    if spec.relaxed:
        prob = _l2_prob(fold.x_train[:, support], fold.y_train, fold.x_val[:, support], spec.relaxed_c, spec)
    elif model is None:
        prob = np.full(len(fold.y_val), float(fold.y_train.mean()))
    else:
        prob = model.predict_proba(fold.x_val)[:, 1]
    return _loss(fold.y_val, prob)


def _mean_se(losses: FloatArray, repeats: int = 1) -> tuple[float, float]:
    """Mean and standard error of fold losses; repeated folds are not independent, so the SE counts one repeat."""
    mean = float(losses.mean())
    n_eff = max(1, len(losses) // max(1, repeats))
    se = float(losses.std(ddof=1) / np.sqrt(n_eff)) if len(losses) > 1 else 0.0
    return mean, se


def _l1_path_cv(folds: list[_InnerFold], lambdas: FloatArray, spec: SignatureSpec) -> tuple[FloatArray, FloatArray]:
    """Mean and standard error of the held-out log-loss along the decreasing penalty path.

    The path stops early (remaining entries nan) once the loss has stayed more than two standard
    errors above the best for three penalties in a row: smaller penalties give denser, slower fits
    that only get worse.
    """
    mean = np.full(len(lambdas), np.nan)
    se = np.full(len(lambdas), np.nan)
    worse = 0
    for j, lam in enumerate(lambdas):
        mean[j], se[j] = _mean_se(np.array([_l1_fold_loss(f, float(lam), spec) for f in folds]), spec.inner_repeats)
        best = int(np.nanargmin(mean))
        worse = worse + 1 if mean[j] > mean[best] + 2 * se[best] else 0
        if worse >= 3:
            logger.debug("penalty path stopped early at lambda %.3g (index %d of %d)", lam, j, len(lambdas))
            break
    return mean, se


def select_signature(
    x_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    groups_train: npt.ArrayLike,
    spec: SignatureSpec | None = None,
    splits: list[tuple[IntArray, IntArray]] | None = None,
) -> SignatureSelection:
    """The sparse signature of one training set (see the module docstring for the procedure).

    Parameters
    ----------
    x_train
        ``(n, D)`` embeddings (any units; standardised here with their own statistics).
    y_train
        ``(n,)`` labels in {0, 1}.
    groups_train
        ``(n,)`` patient ids; inner CV folds and stability subsamples never split a patient.
    spec
        Selection settings; defaults to :class:`SignatureSpec`.
    splits
        Precomputed inner CV splits (from :func:`inner_splits`), to share them with the probes.
    """
    spec = (spec or SignatureSpec()).validate()
    x = np.asarray(x_train, dtype=np.float64)
    y = np.asarray(y_train).astype(np.int64)
    g = np.asarray(groups_train)
    _check_binary(y, "the training set")
    splits = splits if splits is not None else inner_splits(y, g, spec.inner_folds, spec.seed, spec.inner_repeats)
    (xs,) = standardise(x)
    lmax = lambda_max(xs, y)
    if lmax <= 0:
        lambdas = np.zeros(1)
    else:
        lambdas = lmax * np.logspace(0, np.log10(spec.lambda_ratio), spec.n_lambdas)
    mean, se = _l1_path_cv(_inner_folds(x, y, splits), lambdas, spec)
    best = int(np.nanargmin(mean))
    if spec.one_se:
        # lambdas are in decreasing order: the first within one SE of the best is the sparsest such model.
        chosen = int(np.flatnonzero(mean <= mean[best] + se[best])[0])
    else:
        chosen = best
    at_path_end = chosen == len(lambdas) - 1 and len(lambdas) > 1
    if at_path_end:
        logger.debug("the chosen L1 penalty is the smallest on the path (lambda_max x %.3g)", spec.lambda_ratio)
    lam = float(lambdas[chosen])
    lasso_idx, _ = _l1_support(xs, y, lam, spec)
    frequencies = None
    indices = lasso_idx
    if spec.stability > 0:
        frequencies = stability_frequencies(xs, y, g, lam, spec)
        indices = np.flatnonzero(frequencies >= spec.stability_threshold - 1e-12).astype(np.int64)
    return SignatureSelection(
        indices=tuple(int(i) for i in indices),
        lam=lam,
        c=1.0 / (lam * len(y)) if lam > 0 else float("nan"),
        lambdas=tuple(float(v) for v in lambdas),
        cv_loss=tuple(float(v) for v in mean),
        cv_se=tuple(float(v) for v in se),
        lasso_indices=tuple(int(i) for i in lasso_idx),
        at_path_end=at_path_end,
        frequencies=frequencies,
    )


def stability_frequencies(
    x_std: FloatArray, y: IntArray, groups: npt.ArrayLike, lam: float, spec: SignatureSpec
) -> FloatArray:
    """Per-dimension selection frequency of the L1 fit at per-sample penalty ``lam`` over
    ``spec.stability`` random subsamples of ``spec.stability_fraction`` of the patients of each class.

    ``x_std`` is the standardised training matrix; the per-sample penalty is kept, so ``C`` grows as
    ``1 / (lam * n_subsample)``. Subsamples that miss a class are redrawn (up to 10 times).
    """
    g = np.asarray(groups)
    rng = np.random.default_rng(spec.seed)
    patients = np.unique(g)
    # A patient's class is its majority label (BreaKHis patients carry a single label).
    patient_class = np.array([np.round(y[g == p].mean()) for p in patients])
    counts = np.zeros(x_std.shape[1], dtype=float)
    done = 0
    for _ in range(spec.stability):
        for _attempt in range(10):
            pick = []
            for c in (0, 1):
                members = patients[patient_class == c]
                k = max(1, round(spec.stability_fraction * len(members)))
                if len(members):
                    pick.extend(rng.choice(members, size=min(k, len(members)), replace=False).tolist())
            rows = np.flatnonzero(np.isin(g, pick))
            if len(np.unique(y[rows])) == 2:
                break
        else:
            continue
        support, _ = _l1_support(x_std[rows], y[rows], lam, spec)
        counts[support] += 1
        done += 1
    if done == 0:
        raise DatasetError("no stability subsample had both classes; use more patients or --stability 0")
    return counts / done


def fit_probe(
    x_train: FloatArray, y_train: IntArray, x_test: FloatArray, splits: list[tuple[IntArray, IntArray]], spec: SignatureSpec
) -> tuple[FloatArray, float]:
    """Test probabilities of an L2 logistic regression whose ``C`` is chosen by inner-CV log-loss.

    With no columns the model predicts the training prevalence (``C`` is then nan).
    """
    if x_train.shape[1] == 0:
        return np.full(len(x_test), float(np.mean(y_train))), float("nan")
    folds = _inner_folds(x_train, y_train, splits)
    losses = [
        np.mean([_loss(f.y_val, _l2_prob(f.x_train, f.y_train, f.x_val, c, spec)) for f in folds]) for c in spec.l2_cs
    ]
    c = float(spec.l2_cs[int(np.argmin(losses))])
    xtr, xte = standardise(x_train, x_test)
    return _l2_prob(xtr, y_train, xte, c, spec), c


def evaluate_fold(
    x_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    groups_train: npt.ArrayLike,
    x_test: npt.ArrayLike,
    y_test: npt.ArrayLike,
    spec: SignatureSpec | None = None,
    groups_test: npt.ArrayLike | None = None,
) -> FoldEvaluation:
    """Signature of the training set plus test metrics of the full, signature and L1 models.

    Metrics (AUC, F1 at 0.5, balanced accuracy, accuracy, Brier, ECE) come from
    :func:`wsi_encoder.evaluation.metrics.classification_metrics` with class 1 as positive; AUC is
    nan when the test set holds one class.
    """
    spec = (spec or SignatureSpec()).validate()
    xtr = np.asarray(x_train, dtype=np.float64)
    xte = np.asarray(x_test, dtype=np.float64)
    ytr = np.asarray(y_train).astype(np.int64)
    yte = np.asarray(y_test).astype(np.int64)
    gtr = np.asarray(groups_train)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise DatasetError(f"train/test embeddings must be (n, D) with the same D, got {xtr.shape} and {xte.shape}")
    if len(yte) == 0:
        raise DatasetError("the test set is empty")
    for name, arr in (("training", xtr), ("test", xte)):
        if not np.isfinite(arr).all():
            raise DatasetError(f"the {name} embeddings contain NaN or infinite values")
    _check_binary(ytr, "the training set")
    splits = inner_splits(ytr, gtr, spec.inner_folds, spec.seed, spec.inner_repeats)
    selection = select_signature(xtr, ytr, gtr, spec, splits=splits)
    prob_full, c_full = fit_probe(xtr, ytr, xte, splits, spec)
    cols = np.asarray(selection.indices, dtype=np.int64)
    prob_sig, c_sig = fit_probe(xtr[:, cols], ytr, xte[:, cols], splits, spec)
    xs_tr, xs_te = standardise(xtr, xte)
    _, lasso = _l1_support(xs_tr, ytr, selection.lam, spec)
    prob_lasso = lasso.predict_proba(xs_te)[:, 1] if lasso is not None else np.full(len(yte), ytr.mean())
    if len(np.unique(yte)) < 2:
        logger.debug("the test set holds only class %d: AUC is undefined (nan)", int(yte[0]))
    return FoldEvaluation(
        selection=selection,
        metrics_full=classification_metrics(yte, prob_full),
        metrics_signature=classification_metrics(yte, prob_sig),
        auc_lasso=classification_metrics(yte, prob_lasso)["auc"],
        c_full=c_full,
        c_signature=c_sig,
        n_train=len(ytr),
        n_test=len(yte),
        n_train_groups=len(np.unique(gtr)),
        n_test_groups=len(np.unique(groups_test)) if groups_test is not None else 0,
        n_dims=xtr.shape[1],
        vs_full=signature_vs_full(
            yte, prob_full, prob_sig, groups_test if groups_test is not None else np.arange(len(yte)), seed=spec.seed
        ),
        boot_indices=bootstrap_signatures(xtr, ytr, gtr, spec),
    )
