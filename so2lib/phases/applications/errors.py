"""Error analysis and the correctness direction (Phase 5).

- stratified error analysis (:func:`stratified_error_analysis`): a readout that does not depend on
  the label (each neuron's second-order effect on the correctness direction, cross-fitted on two
  halves of the training split), a Van Elteren rank test within task x difficulty strata, BH across
  neurons, a permutation null (labels permuted within strata) and replication on validation
  p-values; :func:`error_analysis_rows` turns its summary into table rows;
- :func:`separating_neurons`, the unstratified per-neuron test (a naive baseline);
- :func:`failure_report`: per failing problem, the neurons pushing most toward the wrong answer;
- the correctness direction's validation AUROC minus the best label-free baseline (logit margin,
  maximum probability, task only), read at a label-free position (:func:`direction_vs_baselines`,
  :func:`direction_rows`);
- :class:`NotMeasurable`, raised when the data cannot answer a measurement.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from so2lib.data.tasks import Problem
from so2lib.engine.second_order import SecondOrderEngine
from so2lib.stats import auroc, auroc_columns, benjamini_hochberg, not_measurable, validation_row as row


def separating_neurons(effects: np.ndarray, correct: np.ndarray, q: float = 0.05) -> pd.DataFrame:
    """Per neuron (``effects [N, L, n]``): Cohen's d of incorrect vs correct, Mann-Whitney U
    p-value, BH-adjusted p-value across all neurons and whether it is a discovery at ``q``."""
    c = np.asarray(correct, dtype=bool)
    a, b = effects[~c], effects[c]  # incorrect, correct
    L, n = effects.shape[1:]
    sd = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / max(len(a) + len(b) - 2, 1))
    d = (a.mean(0) - b.mean(0)) / np.where(sd > 0, sd, np.nan)
    p = stats.mannwhitneyu(a.reshape(len(a), -1), b.reshape(len(b), -1), axis=0).pvalue.reshape(L, n)
    p = np.where(np.isnan(d), np.nan, p)
    adj = benjamini_hochberg(p.ravel()).reshape(L, n)
    return pd.DataFrame({"layer": np.repeat(np.arange(L), n), "neuron": np.tile(np.arange(n), L),
                         "cohens_d": d.ravel(), "p": p.ravel(), "p_bh": adj.ravel(),
                         "discovery": (adj <= q).ravel()})


def failure_report(second: np.ndarray, direct: np.ndarray, correct: np.ndarray, problems: Sequence[Problem],
                   k: int = 5) -> pd.DataFrame:
    """For each failing problem, the ``k`` (layer, neuron, order) effects pushing most toward
    the wrong answer (most negative on the logit difference gold - best wrong)."""
    rows = []
    L, n = second.shape[1:]
    for i in np.flatnonzero(~np.asarray(correct, dtype=bool)):
        both = np.concatenate([second[i].ravel(), direct[i].ravel()])
        for j in np.argsort(both)[:k]:
            order = "second" if j < L * n else "first"
            jj = j % (L * n)
            rows.append({"problem": int(i), "task": problems[i].task, "prompt": problems[i].compact,
                         "gold": problems[i].answer, "order": order, "layer": int(jj // n),
                         "neuron": int(jj % n), "effect": float(both[j])})
    return pd.DataFrame(rows, columns=["problem", "task", "prompt", "gold", "order", "layer", "neuron", "effect"])


class NotMeasurable(Exception):
    """Raised inside a measurement when the data cannot answer it (the message says why)."""


def _codes(strata: Sequence[Any]) -> np.ndarray:
    """Stratum codes in order of first appearance. Integer codes (an earlier call's, indexed by a
    resample) are re-factorized as they are: the same groups in the same order as their strata."""
    if isinstance(strata, np.ndarray) and strata.dtype.kind in "iu":
        return pd.factorize(strata)[0]
    return pd.factorize(pd.Series([str(s) for s in strata]))[0]


def _stratum_design(y: np.ndarray, codes: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Informative strata (both classes present, >= 2 problems): their row indices, Van Elteren
    weights ``1 / (n_s + 1)`` and the label centred within stratum ``yc [N]`` (0 elsewhere)."""
    y = np.asarray(y, float)
    groups, weights = [], []
    yc = np.zeros(len(y))
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        if len(idx) < 2 or y[idx].min() == y[idx].max():
            continue
        groups.append(idx)
        weights.append(1.0 / (len(idx) + 1))
        yc[idx] = y[idx] - y[idx].mean()
    return groups, np.asarray(weights), yc


def _rank_block(X: np.ndarray, groups: list[np.ndarray], weights: np.ndarray, yc: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted within-stratum centred ranks ``[N, p]`` (0 outside informative strata) and the
    exact permutation variance ``[p]`` of ``yc @ ranks`` under within-stratum permutations."""
    X = np.asarray(X, np.float64)
    R = np.zeros_like(X)
    V = np.zeros(X.shape[1])
    for idx, w in zip(groups, weights):
        r = stats.rankdata(X[idx], axis=0)
        r = r - r.mean(0)
        R[idx] = w * r
        n = len(idx)
        V += w * w * (r * r).sum(0) * (yc[idx] ** 2).sum() / (n - 1)
    return R, V


def _within_strata_permutations(codes: np.ndarray, groups: list[np.ndarray], n_perm: int,
                                seed: int) -> np.ndarray:
    """``[n_perm, N]`` index permutations that shuffle rows only within informative strata."""
    rng = np.random.default_rng(seed)
    perms = np.tile(np.arange(len(codes)), (n_perm, 1))
    for idx in groups:
        perms[:, idx] = idx[rng.permuted(np.tile(np.arange(len(idx)), (n_perm, 1)), axis=1)]
    return perms


def stratified_scan(blocks: Sequence[np.ndarray], correct: np.ndarray, strata: Sequence[Any],
                    n_perm: int = 200, seed: int = 0, with_diff: bool = True) -> dict[str, np.ndarray]:
    """Per column (neuron) of ``blocks`` (``[N, p_k]`` each, concatenated): a stratified rank test
    (Van Elteren) of the readout between correct and incorrect problems within each stratum
    (e.g. task x difficulty), so that a neuron whose effect merely tracks the stratum is not
    a discovery.

    Returns ``z [P]`` (> 0: larger on correct problems), two-sided ``p [P]`` from the exact
    permutation mean and variance of the statistic (normal approximation), ``z_perm
    [n_perm, P]`` the same statistic under ``n_perm`` label permutations within strata (the
    permutation null), ``p_perm [P]`` Monte-Carlo permutation p-values (``(1 + #) / (1 + n_perm)``)
    and ``diff [P]`` the mean within-stratum difference correct - incorrect (weighted by stratum size;
    NaN with ``with_diff=False``). ``strata`` may be integer codes (:func:`_codes`).
    """
    y = np.asarray(correct, bool)
    codes = _codes(strata)
    groups, weights, yc = _stratum_design(y, codes)
    P = sum(b.shape[1] for b in blocks)
    if not groups:
        nan = np.full(P, np.nan)
        return {"z": nan, "p": nan, "z_perm": np.full((n_perm, P), np.nan), "p_perm": nan, "diff": nan,
                "informative": 0}
    perms = _within_strata_permutations(codes, groups, n_perm, seed)
    Yp = yc[perms]  # [n_perm, N]
    z, zp, diff = [], [], []
    sizes = np.array([len(g) for g in groups], float)
    for B in blocks:
        B = np.asarray(B, np.float64)
        R, V = _rank_block(B, groups, weights, yc)
        sd = np.sqrt(np.where(V > 0, V, np.nan))
        z.append((yc @ R) / sd)
        zp.append((Yp @ R) / sd)
        d = np.zeros(B.shape[1]) if with_diff else np.full(B.shape[1], np.nan)
        for idx, n in zip(groups, sizes) if with_diff else ():
            d += n * (B[idx][y[idx]].mean(0) - B[idx][~y[idx]].mean(0))
        diff.append(d / sizes.sum())
    z, zp, diff = np.concatenate(z), np.concatenate(zp, 1), np.concatenate(diff)
    p = 2 * stats.norm.sf(np.abs(z))
    p_perm = (1 + (np.abs(zp) >= np.abs(z)[None]).sum(0)) / (1 + n_perm)
    p_perm = np.where(np.isnan(z), np.nan, p_perm)
    return {"z": z, "p": p, "z_perm": zp, "p_perm": p_perm, "diff": diff, "informative": len(groups)}


def null_discoveries(z_perm: np.ndarray, q: float = 0.05) -> np.ndarray:
    """Number of BH discoveries at ``q`` in each permutation of the labels (``[n_perm]``)."""
    p = 2 * stats.norm.sf(np.abs(z_perm))
    return np.array([int((benjamini_hochberg(r) <= q).sum()) for r in p])


#: the sign-concordance entries of an error-analysis summary when there is nothing to replicate
NO_CONCORDANCE = {"concordance": float("nan"), "concordance_lo": float("nan"), "concordance_hi": float("nan"),
                  "concordance_other": float("nan"), "n_boot": 0}


def stratified_error_analysis(train_blocks: Sequence[np.ndarray], correct_train: np.ndarray,
                              strata_train: Sequence[Any], val_blocks: Sequence[np.ndarray],
                              correct_val: np.ndarray, strata_val: Sequence[Any], q: float = 0.05,
                              n_perm: int = 200, seed: int = 0, names: pd.DataFrame | None = None,
                              n_boot: int = 200) -> dict[str, Any]:
    """Discoveries on the training split (stratified rank test, BH at ``q``), their permutation
    null (discoveries when labels are permuted within strata) and their replication on validation:
    a discovery replicates when its validation p-value, BH-adjusted among the discoveries, is
    ``<= q`` with the same sign (strict, and underpowered when validation is much smaller than
    training), and the discoveries' **sign concordance** (:func:`sign_concordance`) is the share
    whose validation statistic has the training sign, with a bootstrap over validation problems
    (``concordance_other``: the same share for the non-discoveries, a description).

    Returns ``neurons`` (one row per column: ``z, p, p_bh, discovery, p_perm, diff, z_val, p_val,
    p_val_bh, replicated``; with ``names``' columns first) and ``summary`` (a dict)."""
    tr = stratified_scan(train_blocks, correct_train, strata_train, n_perm, seed)
    P = len(tr["z"])
    df = names.reset_index(drop=True).copy() if names is not None else pd.DataFrame({"column": np.arange(P)})
    df["z"], df["p"], df["p_perm"], df["diff"] = tr["z"], tr["p"], tr["p_perm"], tr["diff"]
    df["p_bh"] = benjamini_hochberg(tr["p"])
    df["discovery"] = (df.p_bh <= q).fillna(False).astype(bool)
    nulls = null_discoveries(tr["z_perm"], q) if tr["informative"] else np.array([])
    disc = np.flatnonzero(df.discovery.values)
    df["z_val"], df["p_val"], df["p_val_bh"] = np.nan, np.nan, np.nan
    df["replicated"] = False
    conc = dict(NO_CONCORDANCE)
    if len(disc):
        cols = _columns(val_blocks, disc)
        va = stratified_scan([cols], correct_val, strata_val, 0, seed)
        df.loc[disc, "z_val"], df.loc[disc, "p_val"] = va["z"], va["p"]
        df.loc[disc, "p_val_bh"] = benjamini_hochberg(va["p"])
        df.loc[disc, "replicated"] = ((df.loc[disc, "p_val_bh"] <= q)
                                      & (np.sign(df.loc[disc, "z_val"]) == np.sign(df.loc[disc, "z"]))).values
        conc = sign_concordance(cols, correct_val, strata_val, df.z.values[disc], n_boot, seed)
        rest = np.flatnonzero(~df.discovery.values & np.isfinite(df.z.values))
        if len(rest):
            zr = stratified_scan([_columns(val_blocks, rest)], correct_val, strata_val, 0, seed)["z"]
            ok = np.isfinite(zr)
            conc["concordance_other"] = float((np.sign(zr[ok]) == np.sign(df.z.values[rest][ok])).mean()) \
                if ok.any() else float("nan")
    k = int(df.replicated.sum())
    summary = {"tests": int(np.isfinite(tr["z"]).sum()), "informative_strata": int(tr["informative"]),
               "discoveries": int(len(disc)), "null_mean": float(nulls.mean()) if len(nulls) else float("nan"),
               "null_q95": float(np.quantile(nulls, 0.95)) if len(nulls) else float("nan"),
               "n_perm": int(len(nulls)), "replicated": k,
               "replicated_share": k / len(disc) if len(disc) else float("nan"), **conc}
    return {"neurons": df, "summary": summary}


def sign_concordance(cols: np.ndarray, correct: np.ndarray, strata: Sequence[Any], z_train: np.ndarray,
                     n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Share of discoveries (columns of ``cols [N_val, D]``) whose stratified validation statistic
    has the sign of their training ``z_train [D]`` (0.5 when there is no association at all: the
    validation sign is then a coin flip whatever the training one), with a 95% interval from
    ``n_boot`` bootstrap resamples of the validation problems (the statistic recomputed on each;
    the discoveries are fixed: they are what is tested). Discoveries whose validation statistic is
    undefined (no informative stratum) are left out of that replicate.

    The estimand is the share a validation set of this size gives in expectation (0.5 under no
    association at any size). The interval is the resamples' 2.5-97.5% spread **recentred on the
    point** (``point + q - median``, clipped to [0, 1]), not their plain percentiles: resampling
    adds a second layer of noise to each validation statistic, which pulls every replicate's share
    toward 0.5, so the plain percentile interval sits below the estimate (SmolLM2, 1,000 + 500:
    point 0.969, percentiles [0.878, 0.964]). Coverage of that estimand, 60 planted validation sets
    of 400 problems and 40 discoveries each (``tests/test_applications_stats.py``): recentred 0.90,
    0.95, 0.93 against percentile 0.92, 0.82, 0.98 for weak, medium and mostly strong effects."""
    y, st = np.asarray(correct, bool), list(strata)
    sign = np.sign(np.asarray(z_train, float))

    def share(z: np.ndarray) -> float:
        ok = np.isfinite(z) & (z != 0)
        return float((np.sign(z[ok]) == sign[ok]).mean()) if ok.any() else float("nan")
    codes = _codes(st)  # once: each resample's strata are these codes, indexed
    point = share(stratified_scan([cols], y, codes, 0, seed, with_diff=False)["z"])
    rng = np.random.default_rng(seed + 1)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        boots.append(share(stratified_scan([cols[i]], y[i], codes[i], 0, seed, with_diff=False)["z"]))
    b = np.asarray(boots)
    b = b[np.isfinite(b)]
    lo = hi = np.nan
    if len(b) >= 2 and np.isfinite(point):
        q_lo, med, q_hi = np.quantile(b, [0.025, 0.5, 0.975])
        lo, hi = max(0.0, point + q_lo - med), min(1.0, point + q_hi - med)
    return {"concordance": point, "concordance_lo": float(lo), "concordance_hi": float(hi), "n_boot": int(len(b))}


def _columns(blocks: Sequence[np.ndarray], cols: np.ndarray) -> np.ndarray:
    """``[N, len(cols)]``: the global columns ``cols`` of column blocks."""
    offs = np.cumsum([0] + [b.shape[1] for b in blocks])
    out = []
    for c in cols:
        k = int(np.searchsorted(offs, c, side="right") - 1)
        out.append(np.asarray(blocks[k][:, c - offs[k]], np.float64))
    return np.stack(out, 1)


def error_stratum(p: Problem) -> tuple[Any, ...]:
    """The error-analysis stratum of a problem: task, difficulty (largest operand's digit count,
    logic depth, ...), the smaller operand's digit count and whether it needs a carry or borrow
    (the embedded and SmolLM2 models' main error drivers), so that a neuron tracking operand size
    or carries is not a discovery."""
    m = p.meta
    carry = m.get("carry", m.get("borrow"))
    small = min(m["digits_a"], m["digits_b"]) if "digits_a" in m and "digits_b" in m else None
    return (p.task, m.get("max_digits", m.get("depth", m.get("n_steps"))), small,
            None if carry is None else bool(carry))


def discovery_power(blocks: Sequence[np.ndarray], correct: np.ndarray, strata: Sequence[Any], p: np.ndarray,
                    effect: float = 0.5, q: float = 0.05, n_sim: int = 50, seed: int = 0) -> float:
    """Power simulation at this n: plant an effect of ``effect`` standard deviations (larger on
    correct problems) in one random column of the real readout, recompute that column's stratified
    p-value (the others keep their real ``p``) and count how often BH at ``q`` discovers it. A
    "0 discoveries" result is a finding only where this power is high (>= 0.8)."""
    from so2lib.stats import benjamini_hochberg as bh

    y = np.asarray(correct, bool)
    X = np.concatenate([np.asarray(b, np.float64) for b in blocks], 1)
    ok = np.flatnonzero(np.isfinite(p))
    if not len(ok) or y.all() or not y.any():
        return float("nan")
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_sim):
        j = int(rng.choice(ok))
        sd = float(X[:, j].std()) or 1.0
        x = X[:, j] + effect * sd * y
        pj = stratified_scan([x[:, None]], y, strata, 0, seed)["p"][0]
        pp = np.asarray(p, float).copy()
        pp[j] = pj
        hits += bool(bh(pp)[j] <= q)
    return hits / n_sim


def error_analysis_rows(summary: dict[str, Any], q: float, scope: str = "task x digits x carry",
                        causal: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of the error analysis. Its discoveries are **correlates of failure**; only the causal
    follow-up (the discovered neurons intervened on validation problems against random neurons of
    the same layers) can confirm them. "0 discoveries" is a finding only where the power simulation
    (a planted effect at this n) says the scan would have found one."""
    how = (f"second-order effect of every neuron on the correctness direction (a fixed readout, not W_U[gold] - "
           f"W_U[alt]), cross-fitted: direction from the even training problems, test on the odd ones; Van "
           f"Elteren rank test within {scope} strata, BH at q={q:g}; correlates of failure, not causes")
    m0 = "error analysis (correlates of failure): training discoveries vs permutation null"
    if not summary["tests"] or not summary["informative_strata"]:
        return [not_measurable(m0, how, "no stratum has both correct and incorrect training problems", 1,
                               split="training", resampled="labels permuted within strata")]
    n = summary["discoveries"]
    power = summary.get("power", float("nan"))
    pw = f"; power to discover a planted 0.5-SD neuron at this n: {power:.2f}" if power == power else ""
    how0 = how + f"; null: 95% quantile of discoveries with labels permuted within strata ({summary['n_perm']} " \
        f"permutations, mean {summary['null_mean']:.2f}); a count has no sampling CI" + pw
    if n == 0 and not (power >= 0.8):
        rows = [not_measurable(m0, how0, f"0 discoveries, but the power simulation finds a planted 0.5-SD effect "
                               f"only {power:.0%} of the time: 0 is not a finding at this n", 1,
                               split="training", resampled="labels permuted within strata")]
    else:
        rows = [row(m0, n, (n, n), summary["null_q95"], 1, how0, split="training",
                    resampled="labels permuted within strata")]
    m = "error analysis (correlates of failure): discoveries' sign replicated on validation"
    how_r = ("share of training discoveries whose validation statistic (the same stratified test on the validation "
             "problems, the same readout) has the training sign; 95% interval from a bootstrap over validation "
             "problems (the statistic recomputed per resample; the resamples' spread recentred on the point, "
             "since resampling pulls each replicate toward 0.5); control 0.5: with no association the validation "
             "sign is a coin flip; refuted within 0.05 of it")
    if n == 0:
        rows.append(not_measurable(m, how_r, "no training discovery to replicate", 0.5))
    elif "concordance" in summary and summary["concordance"] == summary["concordance"]:
        other = summary.get("concordance_other", float("nan"))
        det = (f" ({n} discoveries; strict replication, validation p BH-adjusted among the discoveries <= {q:g} "
               f"with the same sign: {summary['replicated']} of {n}"
               + (f"; the non-discoveries' sign concordance {other:.3f}" if other == other else "")
               + f"; {int(summary.get('n_boot', 0))} resamples)")
        rows.append(row(m, summary["concordance"], (summary["concordance_lo"], summary["concordance_hi"]), 0.5, 0.5,
                        how_r + det, resampled="problems (validation)", margin=0.05))
    else:
        rows.append(not_measurable(m, how_r, "the discoveries' validation statistic is undefined (no validation "
                                   "stratum has both correct and incorrect problems)", 0.5))
    m = "error analysis: causal follow-up, accuracy change ablating discoveries minus random neurons"
    how_c = ("the discovered neurons (up to 10, largest |z|) zero-ablated in a forward pass on validation problems; "
             "per-problem accuracy change minus the mean change of random neuron sets of the same size in the "
             "same layers; paired bootstrap over problems; p: rank among the random sets; established = the "
             "discoveries matter more than random neurons (a more negative change), which would make them causes")
    if not causal or causal.get("reason"):
        rows.append(not_measurable(m, how_c, (causal or {}).get("reason", "no discovery to intervene on"), 0.0,
                                   higher_is_better=False))
    else:
        rows.append(row(m, causal["minus_random"], (causal["ci_low"], causal["ci_high"]), 0.0, 0.0,
                        how_c + f" ({causal['n_neurons']} neurons, {causal['n_sets']} random sets; ablated "
                        f"{causal['change']:.3f}, random mean {causal['random_mean']:.3f})", higher_is_better=False, resampled="problems (validation)",
                        p=causal["rank_p"]))
    return rows


@torch.no_grad()
def project_on_direction(model: Any, enc: Any, d: torch.Tensor, layers: Sequence[int],
                         batch_size: int = 64) -> np.ndarray:
    """``[N, len(layers), d_mlp]``: every neuron's second-order effect projected on the direction
    ``d`` of the final normalized residual (in logit units, as Phase 2's ``second_cd``)."""
    from so2lib.engine.capture import capture_batch

    layers = list(layers)
    engine = SecondOrderEngine(model, layers=layers, correctness_dir=d, check=False)
    out = [np.zeros((0, len(layers), model.cfg.d_mlp), np.float32)]
    for _, x, T in enc.batches(batch_size, device=engine.device):
        rows = capture_batch(model, x, T, layers)
        g = torch.zeros(len(T), dtype=torch.long)
        out.append(engine.projected(rows, T, g, g, layers=layers)["second"][:, 1].cpu().numpy())
    return np.concatenate(out)


def direction_vs_baselines(score: np.ndarray, baselines: dict[str, np.ndarray], correct: np.ndarray,
                           tasks: Sequence[str], task_accuracy: dict[str, float] | None = None,
                           n_boot: int = 1000, seed: int = 0, score_refits: np.ndarray | None = None
                           ) -> dict[str, Any]:
    """The correctness direction's validation AUROC **minus the best label-free baseline**, overall
    and within task, paired over problems.

    ``score [n]``: the direction's projection; ``baselines``: label-free scores of the same
    problems at the same read position (e.g. the logit margin top-1 minus top-2 and the maximum
    probability; higher = more likely correct, a fixed sign). Overall, the task-only baseline (each
    problem scored by its task's training accuracy, ``task_accuracy``) joins them. Within task,
    the AUROC is computed per task and weighted by task size. In each bootstrap replicate
    (problems resampled) every AUROC is recomputed and the **best** baseline of that replicate is
    subtracted, so the choice of the best baseline is inside the interval. ``score_refits [R, n]``:
    the same problems scored by the direction refitted on ``R`` bootstrap resamples of the training
    problems; replicate ``b`` scores with refit ``b mod R`` (the fit's own variability is then in
    the interval; the point keeps ``score``).

    Returns points ``diff`` / ``within_diff``, replicates ``diff_boot`` / ``within_boot``, every
    AUROC (``auroc``, ``baselines``, ``within``, ``within_baselines``) and ``n``."""
    s, y, t = np.asarray(score, float), np.asarray(correct, bool), np.asarray(tasks)
    base = {k: np.asarray(v, float) for k, v in baselines.items()}
    over = dict(base)
    if task_accuracy is not None:
        over["task only"] = np.array([task_accuracy.get(x, np.nan) for x in t])
    ok = np.isfinite(s) & np.all([np.isfinite(v) for v in over.values()], axis=0) if over else np.isfinite(s)
    s, y, t = s[ok], y[ok], t[ok]
    refits = None if score_refits is None else np.asarray(score_refits, float)[:, ok]
    base = {k: v[ok] for k, v in base.items()}
    over = {k: v[ok] for k, v in over.items()}
    if y.all() or not y.any():
        raise NotMeasurable("the validation split has one class only")

    # every score as one column: the direction, then the within-task baselines, then the overall-only ones
    names_w = list(base)
    names_o = [k for k in over if k not in base]
    F = np.column_stack([s] + [base[k] for k in names_w] + [over[k] for k in names_o])
    n_w = 1 + len(names_w)
    codes = np.unique(t, return_inverse=True)[1]

    def stat(idx: np.ndarray, refit: int | None = None
             ) -> tuple[float, float, dict[str, float], dict[str, float], float, float]:
        Fi, yi, ci = F[idx], y[idx], codes[idx]
        if refit is not None:
            Fi[:, 0] = refits[refit][idx]
        A = auroc_columns(Fi, yi)  # [C]: overall AUROC of every score
        num, den = np.zeros(n_w), 0
        for c in np.unique(ci):  # within task: weighted by task size, tasks with both classes
            j = ci == c
            aw = auroc_columns(Fi[j, :n_w], yi[j])
            if aw[0] == aw[0]:
                num, den = num + aw * int(j.sum()), den + int(j.sum())
        W = num / den if den else np.full(n_w, np.nan)
        a, w = float(A[0]), float(W[0])
        b = {k: float(A[1 + i]) for i, k in enumerate(names_w)}
        b.update({k: float(A[n_w + i]) for i, k in enumerate(names_o)})
        b = {k: b[k] for k in over}  # the caller's order
        wb = {k: float(W[1 + i]) for i, k in enumerate(names_w)}
        best = np.nanmax(list(b.values())) if b else np.nan
        wbest = np.nanmax(list(wb.values())) if wb else np.nan
        return a, w, b, wb, a - best, w - wbest

    a, w, b, wb, d, wd = stat(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    db, wdb = [], []
    for j in range(n_boot):
        r = stat(rng.integers(0, len(y), len(y)), None if refits is None else j % len(refits))
        db.append(r[4])
        wdb.append(r[5])
    return {"auroc": a, "baselines": b, "within": w, "within_baselines": wb, "diff": d, "within_diff": wd,
            "diff_boot": np.asarray(db, float), "within_boot": np.asarray(wdb, float), "n": int(len(y)),
            "n_refit": 0 if refits is None else int(len(refits))}


#: equivalence margin of the direction-minus-baseline rows: within 0.02 AUROC of the best baseline
#: on both sides is "no better than the baseline" (refuted)
DIRECTION_MARGIN = 0.02


def direction_rows(res: dict[str, Any] | None, reason: str = "", position: str = "first answer token",
                   primary: bool = True) -> list[dict[str, Any]]:
    """Two rows: direction AUROC minus the best label-free baseline, overall and within task (the
    within-task row is a primary row); established when the paired interval lies above 0,
    refuted when it lies below 0 or within :data:`DIRECTION_MARGIN` of 0."""
    from so2lib.stats import interval_row

    m1 = "correctness direction: AUROC minus best label-free baseline (overall)"
    m2 = "correctness direction: within-task AUROC minus best label-free baseline"
    how = (f"read at the {position} (label-free); score: the final normalized residual projected on the "
           "direction fitted on training (centred within task, same read position); baselines at the same "
           "position: logit margin (top-1 minus top-2) and maximum probability")
    how1 = how + ", and the task-only baseline (task's training accuracy); paired bootstrap over problems, "         "best baseline re-chosen in each replicate"
    how2 = how + "; AUROC within each task weighted by task size; paired bootstrap over problems, best baseline "         "re-chosen in each replicate"
    if res is None:
        return [not_measurable(m1, how1, reason, 0.0), not_measurable(m2, how2, reason, 0.0, primary=primary)]

    def names(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in d.items())
    unit = (f"problems (validation; direction refitted on {res['n_refit']} training resamples)"
            if res.get("n_refit") else "problems (validation)")
    return [interval_row(m1, res["diff"], res["diff_boot"], 0.0, 0.0, how1 + f" (direction {res['auroc']:.3f}; "
                         f"{names(res['baselines'])}; n={res['n']})", margin=DIRECTION_MARGIN, resampled=unit),
            interval_row(m2, res["within_diff"], res["within_boot"], 0.0, 0.0, how2 + f" (direction "
                         f"{res['within']:.3f}; {names(res['within_baselines'])}; n={res['n']})",
                         margin=DIRECTION_MARGIN, primary=primary, resampled=unit)]
