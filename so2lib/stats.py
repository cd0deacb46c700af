"""Small, pure statistics used by phases 3-5: multiple testing, intervals, paired tests,
concentration measures and their nulls. Inputs are numpy arrays; nothing here touches a model."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (scipy's ``false_discovery_control``); NaN stays NaN; reject where ``<= q``."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k / n``, clipped to [0, 1] against rounding (NaNs
    when ``n == 0``)."""
    if n == 0:
        return (float("nan"), float("nan"))
    ph = k / n
    den = 1 + z * z / n
    centre = (ph + z * z / (2 * n)) / den
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(before: np.ndarray, after: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean change ``after - before`` over paired problems ``[n]`` with a percentile bootstrap CI
    (problems resampled with replacement, the pair kept together). Works for accuracies (0/1)
    and logit differences alike."""
    a, b = np.asarray(before, float), np.asarray(after, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two 1-d arrays of the same length, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        return {"change": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    d = b - a
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boots = d[idx].mean(1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"change": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": n}


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """Exact McNemar test of paired binary outcomes ``[n]``: among discordant pairs, a two-sided
    binomial test (scipy ``binomtest``) of 0->1 flips against 1->0 flips at p = 1/2."""
    a, b = np.asarray(before, bool), np.asarray(after, bool)
    gained, lost = int((~a & b).sum()), int((a & ~b).sum())
    p = stats.binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"gained": gained, "lost": lost, "p": float(p)}


def min_detectable_change(p: float, n: int, discordance: float | None = None, z: float = 1.96,
                          power_z: float = 0.84) -> float:
    """Smallest paired accuracy change (fraction) resolvable at 5% / 80% power with ``n`` problems.

    ``discordance``: expected share of problems whose outcome flips (default: ``2 p (1 - p)``, the
    independent-pairs worst case); the paired SE of the change is ``sqrt(discordance / n)``."""
    if n <= 0:
        return float("inf")
    disc = 2 * p * (1 - p) if discordance is None else discordance
    return (z + power_z) * math.sqrt(max(disc, 1e-12) / n)


def top_share(energy: np.ndarray, frac: float = 0.02) -> np.ndarray:
    """Share of the total of ``energy [N, ...]`` (non-negative, e.g. squared centred-effect norms)
    held by the top ``frac`` of problems, per trailing index. Threshold-free: a dense effect gives
    about ``frac``-ish (its null is :func:`top_share_null`), a sparse one close to 1."""
    e = np.asarray(energy, float)
    k = max(1, int(math.ceil(frac * e.shape[0])))
    tot = e.sum(0)
    top = np.partition(e, e.shape[0] - k, axis=0)[e.shape[0] - k:].sum(0)  # the k largest, unordered
    return np.where(tot > 0, top / np.where(tot > 0, tot, 1), np.nan)


def top_share_null(n: int, dim: int, frac: float = 0.02, n_draws: int = 200, seed: int = 0) -> np.ndarray:
    """Dense null of :func:`top_share`: ``n`` problems with i.i.d. Gaussian effects in ``dim``
    dimensions (energy ~ chi^2_dim). Returns ``n_draws`` values; compare a measured share with
    its upper quantile."""
    rng = np.random.default_rng(seed)
    e = rng.chisquare(max(dim, 1), size=(n, n_draws))
    return top_share(e, frac)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive``: the rank form of Mann-Whitney U,
    ``(R_1 - n1 (n1 + 1) / 2) / (n1 n0)`` with ties averaged (equal to scikit-learn's
    ``roc_auc_score``; one ``rankdata``, cheap enough for bootstraps); NaN when a class is empty."""
    s, y = np.asarray(score, float), np.asarray(positive, bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = stats.rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc_columns(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """:func:`auroc` of every column of ``scores [N, C]`` for the same labels ``positive [N]``, with
    one ``rankdata`` call (exact: ranks are integers or halves). ``[C]``, NaN when a class is empty."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return np.full(s.shape[1], np.nan)
    r = stats.rankdata(s, axis=0)
    return (r[y].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def permutation_pvalue(observed: float, null: np.ndarray, greater: bool = True) -> float:
    """One-sided permutation p-value with the +1 correction: ``(1 + #{null >= obs}) / (1 + draws)``."""
    null = np.asarray(null, float)
    k = int((null >= observed).sum() if greater else (null <= observed).sum())
    return (1 + k) / (1 + len(null))


#: a row's verdict; ``description`` marks a row that describes (an estimate and its interval
#: beside a null) and tests nothing: it counts for no claim (:func:`describe`)
VERDICTS = ("established", "refuted", "inconclusive", "not testable", "description")

#: version of the verdict rows' definitions, part of the keys of the three verdict tables' steps, so
#: that a resumed run rebuilds its tables rather than keep rows of an older definition (2: every row
#: names its resampled unit, the energy share is a ``description``, phase 4's PC1 row against the
#: mean-effect direction)
ROWS_VERSION = 2

#: columns of every verdict table (phases 3-5): the estimate (usually *estimate minus control*,
#: paired over problems), its 95% interval, the control's own value, the target, the three-way
#: verdict, the minimum detectable effect, the unit resampled for the interval, the split the
#: estimate is measured on, whether the row is a pre-registered primary row, its p-value (and
#: Holm-adjusted p for primary rows), and how it is computed.
TABLE_COLUMNS = ["measure", "measured", "ci_low", "ci_high", "control", "target", "verdict", "mde",
                 "resampled", "split", "primary", "p", "p_holm", "how"]


def _nan(*vals: Any) -> bool:
    return any(v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)) for v in vals)


def min_detectable_effect(ci_low: float, ci_high: float, z: float = 1.96, power_z: float = 0.84) -> float:
    """Minimum detectable effect at 5% (two-sided) / 80% power implied by a 95% interval: the
    interval's half-width is ``z * SE``, so MDE = ``(z + power_z) * SE``. Same units as the estimate."""
    if _nan(ci_low, ci_high):
        return float("nan")
    se = (float(ci_high) - float(ci_low)) / (2 * 1.96)
    return (z + power_z) * se


def verdict(ci_low: float, ci_high: float, target: float, control: float = float("nan"),
            higher_is_better: bool = True, margin: float = float("nan")) -> str:
    """Three-way verdict of an interval ``[ci_low, ci_high]`` against a ``target`` and a ``control``.

    - ``established``: the whole interval lies on the target's side of ``target`` (``> target``
      when ``higher_is_better``) **and** excludes ``control`` (when given);
    - ``refuted``: the whole interval lies on the other side of ``target``, or (when ``margin`` is
      given) wholly within ``control +- margin`` (equivalent to the control);
    - ``inconclusive``: otherwise (print the row's minimum detectable effect beside it);
    - ``not testable``: the interval or the target is NaN (nothing to measure).

    A point estimate plays no part: an interval that reaches the other side is never established."""
    if _nan(ci_low, ci_high, target):
        return "not testable"
    lo, hi, t = float(ci_low), float(ci_high), float(target)
    has_control = not _nan(control)
    if higher_is_better:
        beats = lo > t and (not has_control or lo > float(control))
        other = hi < t
    else:
        beats = hi < t and (not has_control or hi < float(control))
        other = lo > t
    if beats:
        return "established"
    if other:
        return "refuted"
    if has_control and not _nan(margin) and float(control) - margin <= lo and hi <= float(control) + margin:
        return "refuted"
    return "inconclusive"


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok) == 0:
        return out
    order = ok[np.argsort(p[ok])]
    m = len(order)
    adj = np.maximum.accumulate([(m - i) * p[j] for i, j in enumerate(order)])
    out[order] = np.minimum(adj, 1.0)
    return out


def bootstrap_p(boots: np.ndarray, target: float, higher_is_better: bool = True) -> float:
    """Two-sided bootstrap p-value of "the estimate is on the target's side": twice the share of
    bootstrap replicates on the wrong side of ``target`` (with the +1 correction), capped at 1."""
    b = np.asarray(boots, float)
    b = b[np.isfinite(b)]
    if len(b) == 0 or _nan(target):
        return float("nan")
    wrong = int((b <= target).sum() if higher_is_better else (b >= target).sum())
    return float(min(1.0, 2 * (1 + wrong) / (1 + len(b))))


# ----------------------------------------------------------------------------- verdict tables


def bootstrap_ci(values: np.ndarray, stat: Any = np.mean, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of ``stat(values[idx])`` over the first axis (the problems);
    non-finite rows of a 1-d ``values`` are dropped; NaNs when fewer than 2 values remain."""
    values = np.asarray(values)
    if values.ndim == 1 and values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    b = [stat(values[rng.integers(0, len(values), len(values))]) for _ in range(n_boot)]
    lo, hi = np.nanquantile(np.asarray(b, float), [0.025, 0.975])
    return float(lo), float(hi)


def validation_row(measure: str, measured: float, ci: tuple[float, float], null: float, target: float,
                   how: str, higher_is_better: bool = True, reason: str = "", *,
                   resampled: str, split: str = "validation", primary: bool = False,
                   margin: float = float("nan"), p: float = float("nan"),
                   mde: float | None = None) -> dict[str, Any]:
    """One row of a verdict table (:data:`TABLE_COLUMNS`), verdict by :func:`verdict`.

    ``null`` is the control's value (``control`` column): the strongest alternative explanation's
    estimate; a row that already tests *estimate minus control* passes ``null=0``. ``resampled``
    (required: no default that would label an interval's unit for it) names the unit the interval
    resamples (``"problems"``, ``"problems (cluster: neuron)"``, ...);
    ``split`` the split the estimate is measured on (``"training"`` rows are flagged in the
    report). ``mde`` defaults to :func:`min_detectable_effect` of the interval. NaNs (nothing to
    measure) give ``not testable`` with ``reason`` appended to ``how``."""
    measured, lo, hi, null = float(measured), float(ci[0]), float(ci[1]), float(null)
    v = verdict(lo, hi, float(target), null, higher_is_better, margin)
    if _nan(measured) and v != "not testable":
        v = "not testable"
    op = ">" if higher_is_better else "<"
    return {"measure": measure, "measured": measured, "ci_low": lo, "ci_high": hi, "control": null,
            "target": f"{op} {float(target):g}", "verdict": v,
            "mde": min_detectable_effect(lo, hi) if mde is None else float(mde),
            "resampled": resampled, "split": split, "primary": bool(primary), "p": float(p),
            "p_holm": float("nan"),
            "how": how + (f" [{reason}]" if reason and v == "not testable" else "")}


def describe(r: dict[str, Any]) -> dict[str, Any]:
    """A row (of :func:`validation_row`) turned into a description: its estimate, interval and
    control stay; the verdict reads ``description`` (unless nothing was measurable) and the row
    is never primary."""
    if r["verdict"] != "not testable":
        r["verdict"] = "description"
    r["primary"] = False
    return r


def problem_bootstrap(fn: Any, n: int, n_boot: int = 1000, seed: int = 0) -> tuple[float, np.ndarray]:
    """Bootstrap over problems, refitting what is fitted: ``fn(idx)`` gets an index array into the
    ``n`` problems (with repeats) and returns a float (e.g. *estimate minus control*, both
    recomputed on ``idx``). Returns ``(fn(arange(n)), replicates [n_boot])``."""
    rng = np.random.default_rng(seed)
    point = float(fn(np.arange(n)))
    boots = np.array([float(fn(rng.integers(0, n, n))) for _ in range(n_boot)]) if n > 1 else np.array([])
    return point, boots


def interval_row(measure: str, point: float, boots: np.ndarray, control: float, target: float, how: str,
                 higher_is_better: bool = True, reason: str = "", **kw: Any) -> dict[str, Any]:
    """A :func:`validation_row` from a point estimate and its bootstrap replicates: percentile 95%
    interval, :func:`bootstrap_p` against ``target``; ``not testable`` with ``reason`` when fewer
    than 2 finite replicates."""
    b = np.asarray(boots, float)
    b = b[np.isfinite(b)]
    if len(b) < 2 or _nan(point):
        return not_measurable(measure, how, reason or "fewer than 2 finite bootstrap replicates", target,
                              higher_is_better, **kw)
    lo, hi = np.quantile(b, [0.025, 0.975])
    kw.setdefault("p", bootstrap_p(b, target, higher_is_better))
    return validation_row(measure, point, (float(lo), float(hi)), control, target, how, higher_is_better, **kw)


#: the ``resampled`` entry of a row that has no interval (:func:`not_measurable`)
NOT_RESAMPLED = "nothing (not measured)"


def not_measurable(measure: str, how: str, reason: str, target: float = float("nan"),
                   higher_is_better: bool = True, **kw: Any) -> dict[str, Any]:
    """A row for something the data cannot measure: verdict ``not testable``, the reason in ``how``."""
    nan = float("nan")
    kw.setdefault("resampled", NOT_RESAMPLED)
    return validation_row(measure, nan, (nan, nan), nan, 0.0 if target != target else target, how,
                          higher_is_better, reason=f"not measurable: {reason}", **kw)


def mean_row(measure: str, values: np.ndarray, null: float, target: float, how: str, reason: str,
             higher_is_better: bool = True, **kw: Any) -> dict[str, Any]:
    """A :func:`validation_row` for the mean of per-problem ``values [n]`` with a bootstrap CI over
    the problems; :func:`not_measurable` with ``reason`` when fewer than 2 are finite. Pass
    per-problem values (paired differences for estimate-minus-control rows), never per-neuron
    ones: a fully enumerated set of neurons is not a sample."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return not_measurable(measure, how, reason, target, higher_is_better, **kw)
    return validation_row(measure, float(v.mean()), bootstrap_ci(v), null, target, how, higher_is_better, **kw)


def study_holm(tables: Sequence[pd.DataFrame]) -> list[pd.DataFrame]:
    """The primary rows of several verdict tables (a study's phases) Holm-adjusted **together**:
    copies of ``tables`` whose primary rows carry the study-wide ``p_holm`` and, where a row was
    established but its study-wide ``p_holm`` is not below 0.05, the verdict ``inconclusive``
    (:func:`verdict_table` adjusts within one table; adding hypotheses never lowers a Holm
    p-value, so this only demotes). Non-primary rows are unchanged."""
    out = [t.copy() for t in tables]
    for t in out:
        if "primary" in t.columns and "p_holm" not in t.columns:
            t["p_holm"] = np.nan
    keys = [(i, j) for i, t in enumerate(out) if "primary" in t.columns and "p" in t.columns
            for j in np.flatnonzero(t["primary"].fillna(False).astype(bool).to_numpy())]
    if not keys:
        return out
    adj = holm([float(out[i]["p"].iloc[j]) for i, j in keys])
    for (i, j), a in zip(keys, adj):
        t = out[i]
        t.iloc[j, t.columns.get_loc("p_holm")] = a
        if t["verdict"].iloc[j] == "established" and not a < 0.05:
            t.iloc[j, t.columns.get_loc("verdict")] = "inconclusive"
    return out


def verdict_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows of :func:`validation_row` as a table with :data:`TABLE_COLUMNS`. The p-values of the
    rows marked ``primary`` are Holm-adjusted together (``p_holm``); a primary row is
    ``established`` only when its adjusted p is below 0.05 (else ``inconclusive``)."""
    df = pd.DataFrame(list(rows), columns=TABLE_COLUMNS)
    prim = df["primary"].fillna(False).astype(bool).to_numpy()
    if prim.any():
        adj = holm(df.loc[prim, "p"].to_numpy(float))
        df.loc[prim, "p_holm"] = adj
        weak = prim & (df["verdict"] == "established").to_numpy() & ~(df["p_holm"].to_numpy(float) < 0.05)
        df.loc[weak, "verdict"] = "inconclusive"
    return df
