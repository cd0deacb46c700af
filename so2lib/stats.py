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
    """95% Wilson score interval of a proportion ``k / n`` (NaNs when ``n == 0``)."""
    if n == 0:
        return (float("nan"), float("nan"))
    ph = k / n
    den = 1 + z * z / n
    centre = (ph + z * z / (2 * n)) / den
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return (centre - half, centre + half)


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
    top = -np.sort(-e, axis=0)[:k].sum(0)
    return np.where(tot > 0, top / np.where(tot > 0, tot, 1), np.nan)


def top_share_null(n: int, dim: int, frac: float = 0.02, n_draws: int = 200, seed: int = 0) -> np.ndarray:
    """Dense null of :func:`top_share`: ``n`` problems with i.i.d. Gaussian effects in ``dim``
    dimensions (energy ~ chi^2_dim). Returns ``n_draws`` values; compare a measured share with
    its upper quantile."""
    rng = np.random.default_rng(seed)
    e = rng.chisquare(max(dim, 1), size=(n, n_draws))
    return top_share(e, frac)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (Mann-Whitney U / n1 n0); NaN when a class is empty."""
    s, y = np.asarray(score, float), np.asarray(positive, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float(stats.mannwhitneyu(s[y], s[~y]).statistic / (n1 * n0))


def permutation_pvalue(observed: float, null: np.ndarray, greater: bool = True) -> float:
    """One-sided permutation p-value with the +1 correction: ``(1 + #{null >= obs}) / (1 + draws)``."""
    null = np.asarray(null, float)
    k = int((null >= observed).sum() if greater else (null <= observed).sum())
    return (1 + k) / (1 + len(null))


def verdict(measured: float, ci_low: float, ci_high: float, null: float, target: float,
            higher_is_better: bool = True) -> str:
    """``pass`` when the CI excludes the null AND the point estimate meets the target; ``fail``
    otherwise; ``not testable`` when any input is NaN (nothing to measure, or no interval)."""
    if any(isinstance(v, float) and math.isnan(v) for v in (measured, ci_low, ci_high, null, target)):
        return "not testable"
    if higher_is_better:
        ok = ci_low > null and measured >= target
    else:
        ok = ci_high < null and measured <= target
    return "pass" if ok else "fail"


# ----------------------------------------------------------------------------- verdict tables

TABLE_COLUMNS = ["measure", "measured", "ci_low", "ci_high", "null", "target", "verdict", "how"]


def bootstrap_ci(values: np.ndarray, stat: Any = np.mean, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of ``stat(values[idx])`` over the first axis; non-finite rows
    of a 1-d ``values`` are dropped; NaNs when fewer than 2 values remain."""
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
                   how: str, higher_is_better: bool = True, reason: str = "") -> dict[str, Any]:
    """One row of a verdict table (:data:`TABLE_COLUMNS`). ``pass`` needs the CI to exclude
    ``null`` AND the point estimate to meet ``target`` (:func:`verdict`); NaNs (nothing to
    measure) give ``not testable`` with ``reason`` appended to ``how``."""
    measured, lo, hi, null = float(measured), float(ci[0]), float(ci[1]), float(null)
    v = verdict(measured, lo, hi, null, float(target), higher_is_better)
    op = ">=" if higher_is_better else "<="
    return {"measure": measure, "measured": measured, "ci_low": lo, "ci_high": hi, "null": null,
            "target": f"{op} {float(target):g}", "verdict": v,
            "how": how + (f" [{reason}]" if reason and v == "not testable" else "")}


def not_measurable(measure: str, how: str, reason: str, target: float = float("nan"),
                   higher_is_better: bool = True) -> dict[str, Any]:
    """A row for something the data cannot measure: verdict ``not testable``, the reason in ``how``."""
    nan = float("nan")
    return validation_row(measure, nan, (nan, nan), nan, 0.0 if target != target else target, how,
                          higher_is_better, reason=f"not measurable: {reason}")


def mean_row(measure: str, values: np.ndarray, null: float, target: float, how: str, reason: str,
             higher_is_better: bool = True) -> dict[str, Any]:
    """A :func:`validation_row` for the mean of per-unit ``values`` (e.g. one per neuron) with a
    bootstrap CI over them; :func:`not_measurable` with ``reason`` when fewer than 2 are finite."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return not_measurable(measure, how, reason, target, higher_is_better)
    return validation_row(measure, float(v.mean()), bootstrap_ci(v), null, target, how, higher_is_better)


def verdict_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows of :func:`validation_row` as a table with :data:`TABLE_COLUMNS`."""
    return pd.DataFrame(list(rows), columns=TABLE_COLUMNS)
