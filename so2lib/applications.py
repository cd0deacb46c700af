"""Phase 5 applications, each a row of ``applications_table`` (the columns of ``validation_table``:
measure, measured, ci_low, ci_high, null, target, verdict, how), measured against a null.

- error analysis (:func:`stratified_error_analysis`): a readout that does not depend on the label
  (each neuron's second-order effect on the correctness direction, cross-fitted on two halves of
  the training split), a Van Elteren rank test within task x difficulty strata, BH across
  neurons, a permutation null (labels permuted within strata) and replication on validation
  p-values; per failing problem, the neurons pushing most toward the wrong answer (description);
- the correctness direction's validation AUROC against a task-only baseline (:func:`direction_auroc`);
- polysemanticity against random directions in each neuron's span and random dictionaries
  (:func:`polysemanticity_nulls`);
- adversarial problems as CLIP builds them (:func:`clip_adversarial_pairs`): a neuron's input
  trigger F inserted into problems whose gold answer is not its output concept X, against
  difficulty-matched random edits of the same source problems (McNemar, paired bootstrap);
- neuron editing: scale chosen neurons (factor grid with 1.0) to fix a systematic error class,
  against random neuron sets of the same size in the same layers, with paired CIs.

Whatever the data cannot measure is a ``not testable`` row whose ``how`` starts the reason with
"not measurable", never an exception.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from . import models as M
from .effects import load_effects
from .labels import encode, label
from .second_order import SecondOrderEngine
from .selection import load_selection
from .stats import TABLE_COLUMNS, benjamini_hochberg, not_measurable, validation_row as row, wilson_interval  # noqa: F401
from .stats import verdict_table as table
from .study import Setup, difficulty
from .tasks import Problem, Template, arithmetic_problem

# ----------------------------------------------------------------------------- statistics


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


def error_analysis(second_train: np.ndarray, correct_train: np.ndarray, second_val: np.ndarray,
                   correct_val: np.ndarray, tasks_train: Sequence[str], tasks_val: Sequence[str],
                   q: float = 0.05) -> dict[str, pd.DataFrame]:
    """Discoveries on the training split (overall and per task) and their held-out check: the
    share of discoveries whose validation effect size has the same sign (chance: 50%)."""
    rows, tables = [], {}
    tt, tv = np.asarray(tasks_train), np.asarray(tasks_val)
    for scope in ["overall"] + sorted(set(tt)):
        mt = np.ones(len(tt), bool) if scope == "overall" else tt == scope
        mv = np.ones(len(tv), bool) if scope == "overall" else tv == scope
        ct, cv = np.asarray(correct_train)[mt], np.asarray(correct_val)[mv]
        if ct.all() or not ct.any() or cv.all() or not cv.any():
            rows.append({"scope": scope, "discoveries": 0, "replicated_sign": np.nan, "n_val": int(mv.sum())})
            continue
        tr = separating_neurons(second_train[mt], ct, q)
        va = separating_neurons(second_val[mv], cv, q)
        tr["cohens_d_val"] = va.cohens_d.values
        tables[scope] = tr
        disc = tr[tr.discovery]
        same = np.sign(disc.cohens_d) == np.sign(disc.cohens_d_val)
        k, n = int(same.sum()), len(disc)
        lo, hi = wilson_interval(k, n)
        rows.append({"scope": scope, "discoveries": n, "replicated_sign": k / n if n else np.nan,
                     "ci_low": lo, "ci_high": hi, "n_val": int(mv.sum())})
    return {"summary": pd.DataFrame(rows), "tables": tables}


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


# ----------------------------------------------------------------------------- polysemanticity

RELATED = [{"digits and number words", "number properties"}, {"operations", "procedure", "symbols"},
           {"comparison"}, {"algebra"}, {"logic connectives and quantifiers"}, {"errors"}, {"vocabulary"}]


def category_group(category: str) -> int:
    for g, cats in enumerate(RELATED):
        if category in cats:
            return g
    return len(RELATED)


def polysemanticity(cards: dict[tuple[int, int], pd.DataFrame], threshold: float = 0.15) -> pd.DataFrame:
    """A neuron is polysemantic when concepts with |coefficient| >= ``threshold`` come from two
    or more unrelated category groups (:data:`RELATED`). One row per neuron."""
    rows = []
    for (l, n), card in cards.items():
        strong = card[card.coefficient.abs() >= threshold]
        groups = sorted({category_group(c) for c in strong.category})
        rows.append({"layer": l, "neuron": n, "n_strong": len(strong), "groups": len(groups),
                     "categories": sorted(set(strong.category)), "polysemantic": len(groups) >= 2})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- adversarial problems


def _carry_class(p: Problem) -> Any:
    return p.meta.get("carry", p.meta.get("borrow"))


def rebuild(p: Problem, a: int, b: int) -> Problem | None:
    """The same task with new operands, or ``None`` when that would change the difficulty class
    (digit counts, carry/borrow presence, which operand is larger) or leave the valid range."""
    m = p.meta
    if len(str(a)) != len(str(m["a"])) or len(str(b)) != len(str(m["b"])):
        return None
    if (p.task == "subtraction" and a < b) or (p.task == "comparison" and (a == b or (a > b) != m["larger_first"])):
        return None
    q = arithmetic_problem(p.task, a, b)
    if int(q.answer) > 1999 or _carry_class(q) != _carry_class(p):
        return None
    return q


ARITHMETIC = ("addition", "subtraction", "multiplication", "comparison")


def _edit(p: Problem, propose: Callable[[], tuple[bool, int]], tries: int) -> tuple[Problem | None, bool]:
    """Try ``propose() -> (replace_first_operand, value)`` until :func:`rebuild` accepts a new
    problem; returns it (or ``None``) and the side of the last proposal."""
    first = False
    for _ in range(tries):
        first, c = propose()
        v = rebuild(p, c, p.meta["b"]) if first else rebuild(p, p.meta["a"], c)
        if v is not None and v.compact != p.compact:
            return v, first
    return None, first


def _random_operand(p: Problem, first: bool, rng: random.Random) -> int:
    nd = len(str(p.meta["a"] if first else p.meta["b"]))
    return rng.randint(0 if nd == 1 else 10 ** (nd - 1), 10 ** nd - 1)


def adversarial_variants(sources: Sequence[Problem], numbers: Sequence[int], rng: random.Random,
                         tries: int = 50) -> tuple[list[int], list[Problem], list[Problem]]:
    """For each source problem, a **targeted** variant with one operand replaced by one of the
    ``numbers`` (a neuron's number concepts) and a **random** variant with the same operand
    replaced by a random number of the same digit count; both keep the task, the digit counts
    and the carry/borrow class (edit budget: one operand). Returns the indices of the sources
    for which both exist, and the two variant lists."""
    keep, targeted, randoms = [], [], []
    numbers = list(numbers)
    for i, p in enumerate(sources):
        if p.task not in ARITHMETIC:
            continue

        def concept() -> tuple[bool, int]:
            c = rng.choice(numbers)
            return rng.random() < 0.5, c
        t, first = _edit(p, concept, tries)
        if t is None:
            continue
        r, _ = _edit(p, lambda: (first, _random_operand(p, first, rng)), tries)
        if r is None:
            continue
        keep.append(i)
        targeted.append(t)
        randoms.append(r)
    return keep, targeted, randoms


def random_variants(p: Problem, rng: random.Random, k: int, tries: int = 400) -> list[Problem]:
    """Up to ``k`` distinct variants of ``p`` with one operand replaced by a random number of the
    same digit count, keeping the difficulty class (the random edit of :func:`adversarial_variants`)."""
    if p.task not in ARITHMETIC:
        return []

    def propose() -> tuple[bool, int]:
        first = rng.random() < 0.5
        return first, _random_operand(p, first, rng)
    out: dict[str, Problem] = {}
    for _ in range(tries):
        if len(out) == k:
            break
        v, _ = _edit(p, propose, 1)
        if v is not None:
            out.setdefault(v.compact, v)
    return list(out.values())


@torch.no_grad()
def neuron_push(model: Any, engine: Any, problems: Sequence[Problem], template: Template,
                neurons: dict[int, Sequence[int]], batch_size: int = 128) -> np.ndarray:
    """``[n]``: the summed second-order effect of ``neurons`` on the correctness direction for
    each problem (negative = pushing toward the incorrect side). Uses no answer information."""
    from .capture import capture_batch

    if not problems or not neurons:
        return np.zeros(len(problems), np.float32)
    enc = encode(model, problems, template)
    layers = sorted(neurons)
    idx = {l: torch.tensor(list(neurons[l]), device=engine.device) for l in layers}
    out = []
    for _, x, T in enc.batches(batch_size, device=engine.device):
        rows = capture_batch(model, x, T, layers)
        g = torch.zeros(len(T), dtype=torch.long)  # the logit-difference row is unused here
        proj = engine.projected(rows, T, g, g, layers=layers)["second"][:, 1]  # [b, len(layers), n]
        out.append(sum(proj[:, j, idx[l]].sum(-1) for j, l in enumerate(layers)).cpu())
    return torch.cat(out).numpy()


def flip_rate(model: Any, problems: Sequence[Problem], template: Template, batch_size: int = 128) -> tuple[int, int]:
    """(number of problems the model gets wrong, number of problems)."""
    if not problems:
        return 0, 0
    lab = label(model, encode(model, problems, template), batch_size, progress=False)
    return int((~lab.correct).sum()), len(lab)


# ----------------------------------------------------------------------------- neuron editing


def scaling_hooks(neurons: dict[int, Sequence[int]], factor: float) -> list[tuple[str, Callable]]:
    """Forward hooks that multiply the chosen neurons' activations by ``factor`` (all positions)."""
    hooks = []
    for l, ns in neurons.items():
        idx = torch.tensor(list(ns), dtype=torch.long)

        def hook(t: torch.Tensor, hook: Any, idx: torch.Tensor = idx) -> torch.Tensor:
            t = t.clone()
            t[..., idx.to(t.device)] *= factor
            return t
        hooks.append((M.mlp_post(l), hook))
    return hooks


def edited_accuracy(model: Any, enc: Any, in_class: np.ndarray, neurons: dict[int, Sequence[int]],
                    factor: float, batch_size: int = 128) -> tuple[float, float]:
    """(accuracy on the error class, accuracy on everything else) with the edit applied."""
    lab = label(model, enc, batch_size, progress=False, hooks=scaling_hooks(neurons, factor))
    ok = lab.correct.values
    return float(ok[in_class].mean()), float(ok[~in_class].mean()) if (~in_class).any() else float("nan")


# ----------------------------------------------------------------------------- not measurable


def _guard(measure: str, how: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows from ``fn()``; a failure that means "nothing to measure" becomes one not-measurable row."""
    try:
        return fn()
    except NotMeasurable as e:
        return [not_measurable(measure, how, str(e))]


class NotMeasurable(Exception):
    """Raised inside a measurement when the data cannot answer it (the message says why)."""


# ----------------------------------------------------------------------------- error analysis, stratified


def _codes(strata: Sequence[Any]) -> np.ndarray:
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
                    n_perm: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """Per column (neuron) of ``blocks`` (``[N, p_k]`` each, concatenated): a stratified rank test
    (Van Elteren) of the readout between correct and incorrect problems within each stratum
    (e.g. task x difficulty), so that a neuron whose effect merely tracks the stratum is not
    a discovery.

    Returns ``z [P]`` (> 0: larger on correct problems), two-sided ``p [P]`` from the exact
    permutation mean and variance of the statistic (normal approximation), ``z_perm
    [n_perm, P]`` the same statistic under ``n_perm`` label permutations within strata (the
    permutation null), ``p_perm [P]`` Monte-Carlo permutation p-values (``(1 + #) / (1 + n_perm)``)
    and ``diff [P]`` the mean within-stratum difference correct - incorrect (weighted by stratum size).
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
        d = np.zeros(B.shape[1])
        for idx, n in zip(groups, sizes):
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


def stratified_error_analysis(train_blocks: Sequence[np.ndarray], correct_train: np.ndarray,
                              strata_train: Sequence[Any], val_blocks: Sequence[np.ndarray],
                              correct_val: np.ndarray, strata_val: Sequence[Any], q: float = 0.05,
                              n_perm: int = 200, seed: int = 0, names: pd.DataFrame | None = None
                              ) -> dict[str, Any]:
    """Discoveries on the training split (stratified rank test, BH at ``q``), their permutation
    null (discoveries when labels are permuted within strata) and their replication on validation:
    a discovery replicates when its validation p-value, BH-adjusted among the discoveries, is
    ``<= q`` with the same sign.

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
    if len(disc):
        cols = _columns(val_blocks, disc)
        va = stratified_scan([cols], correct_val, strata_val, 0, seed)
        df.loc[disc, "z_val"], df.loc[disc, "p_val"] = va["z"], va["p"]
        df.loc[disc, "p_val_bh"] = benjamini_hochberg(va["p"])
        df.loc[disc, "replicated"] = ((df.loc[disc, "p_val_bh"] <= q)
                                      & (np.sign(df.loc[disc, "z_val"]) == np.sign(df.loc[disc, "z"]))).values
    k = int(df.replicated.sum())
    summary = {"tests": int(np.isfinite(tr["z"]).sum()), "informative_strata": int(tr["informative"]),
               "discoveries": int(len(disc)), "null_mean": float(nulls.mean()) if len(nulls) else float("nan"),
               "null_q95": float(np.quantile(nulls, 0.95)) if len(nulls) else float("nan"),
               "n_perm": int(len(nulls)), "replicated": k,
               "replicated_share": k / len(disc) if len(disc) else float("nan")}
    return {"neurons": df, "summary": summary}


def _columns(blocks: Sequence[np.ndarray], cols: np.ndarray) -> np.ndarray:
    """``[N, len(cols)]``: the global columns ``cols`` of column blocks."""
    offs = np.cumsum([0] + [b.shape[1] for b in blocks])
    out = []
    for c in cols:
        k = int(np.searchsorted(offs, c, side="right") - 1)
        out.append(np.asarray(blocks[k][:, c - offs[k]], np.float64))
    return np.stack(out, 1)


def error_analysis_rows(summary: dict[str, Any], q: float, scope: str = "task x difficulty") -> list[dict[str, Any]]:
    how = (f"second-order effect of every neuron on the correctness direction (a fixed readout, not W_U[gold] - "
           f"W_U[alt]), cross-fitted: direction from the even training problems, test on the odd ones; Van "
           f"Elteren rank test within {scope} strata, BH at q={q:g}")
    if not summary["tests"] or not summary["informative_strata"]:
        return [not_measurable("error analysis: training discoveries vs permutation null", how,
                               "no stratum has both correct and incorrect training problems", 1)]
    n = summary["discoveries"]
    rows = [row("error analysis: training discoveries vs permutation null", n, (n, n), summary["null_q95"], 1,
                how + f"; null: 95% quantile of discoveries with labels permuted within strata "
                f"({summary['n_perm']} permutations, mean {summary['null_mean']:.2f}); a count has no sampling CI")]
    m = "error analysis: discoveries replicated on validation"
    how_r = ("share of training discoveries whose validation p-value (same test, BH among the discoveries) is "
             f"<= {q:g} with the same sign; Wilson CI; null: q/2 (p uniform, sign at chance)")
    if n == 0:
        rows.append(not_measurable(m, how_r, "no training discovery to replicate", 0.5))
    else:
        lo, hi = wilson_interval(summary["replicated"], n)
        rows.append(row(m, summary["replicated_share"], (lo, hi), q / 2, 0.5, how_r))
    return rows


# ----------------------------------------------------------------------------- correctness direction


def final_normalized(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """The model's final norm (folded weights) applied to residuals ``[N, d_model]`` at T."""
    x = resid.float()
    if M.ModelInfo.of(model).norm == "LN":
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.eps)


def direction_auroc(score: np.ndarray, correct: np.ndarray, tasks: Sequence[str], task_accuracy: dict[str, float],
                    n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Validation AUROC of a correctness score against the task-only baseline (each problem scored by
    its task's training accuracy), with a paired bootstrap CI of the difference; and the mean
    within-task AUROC (tasks with both classes, weighted by size) with a bootstrap CI."""
    def auroc(a: np.ndarray, lab: np.ndarray) -> float:  # rank form of Mann-Whitney U (ties averaged)
        n1 = int(lab.sum())
        n0 = len(lab) - n1
        if n1 == 0 or n0 == 0:
            return float("nan")
        r = stats.rankdata(a)
        return float((r[lab].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

    s, y, t = np.asarray(score, float), np.asarray(correct, bool), np.asarray(tasks)
    base = np.array([task_accuracy.get(x, np.nan) for x in t])
    ok = np.isfinite(base)
    s, y, t, base = s[ok], y[ok], t[ok], base[ok]
    if y.all() or not y.any():
        raise NotMeasurable("the validation split has one class only")

    def within(idx: np.ndarray) -> float:
        num, den = 0.0, 0
        for name in np.unique(t[idx]):
            j = idx[t[idx] == name]
            a = auroc(s[j], y[j])
            if a == a:
                num, den = num + a * len(j), den + len(j)
        return num / den if den else float("nan")
    rng = np.random.default_rng(seed)
    idx0 = np.arange(len(y))
    diffs, wins = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        diffs.append(auroc(s[i], y[i]) - auroc(base[i], y[i]))
        wins.append(within(i))
    a, b = auroc(s, y), auroc(base, y)
    q = lambda v: tuple(np.nanquantile(np.asarray(v, float), [0.025, 0.975]))  # noqa: E731
    return {"auroc": a, "auroc_task": b, "diff": a - b, "diff_ci": q(diffs), "within": within(idx0),
            "within_ci": q(wins), "n": int(len(y))}


def direction_rows(res: dict[str, Any] | None, reason: str = "") -> list[dict[str, Any]]:
    m1, m2 = "correctness direction: validation AUROC minus task-only baseline", \
        "correctness direction: within-task validation AUROC"
    how1 = ("AUROC of the final normalized residual at T projected on the training-split direction (centred "
            "within task) minus the AUROC of the task-only baseline (task's training accuracy); paired bootstrap")
    how2 = "AUROC within each task, weighted by task size (tasks with both classes); bootstrap over problems"
    if res is None:
        return [not_measurable(m1, how1, reason, 0.0), not_measurable(m2, how2, reason, 0.55)]
    return [row(m1, res["diff"], res["diff_ci"], 0.0, 0.0, how1 + f" (direction {res['auroc']:.3f}, task "
                f"{res['auroc_task']:.3f}, n={res['n']})"),
            row(m2, res["within"], res["within_ci"], 0.5, 0.55, how2)]


# ----------------------------------------------------------------------------- polysemanticity nulls


def polysemantic_flags(codes: np.ndarray, categories: Sequence[str], threshold: float = 0.15,
                       top: int = 8) -> np.ndarray:
    """``[n]`` bool: among each code row's ``top`` largest |coefficients| (as a concept card shows),
    those >= ``threshold`` come from two or more unrelated category groups."""
    cats = np.asarray(categories)
    out = np.zeros(len(codes), bool)
    for j, c in enumerate(np.atleast_2d(codes)):
        nz = np.flatnonzero(c)
        nz = nz[np.argsort(-np.abs(c[nz]))][:top]
        strong = nz[np.abs(c[nz]) >= threshold]
        out[j] = len({category_group(k) for k in cats[strong]}) >= 2
    return out


def random_in_span(bases: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One random unit direction in each neuron's span (``bases[j] [r_j, d]`` orthonormal rows)."""
    out = []
    for B in bases:
        v = rng.normal(size=B.shape[0]) @ B
        out.append(v / max(np.linalg.norm(v), 1e-12))
    return np.stack(out)


def span_basis(vectors: np.ndarray, k: int, tol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis ``[r, d]`` (r <= k) of the span of one neuron's effect vectors ``[N, d]``."""
    X = np.asarray(vectors, np.float64)
    X = X - X.mean(0)
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    r = max(1, min(k, int((s > tol * max(s[0], 1e-30)).sum())))
    return Vt[:r]


def polysemanticity_nulls(directions: np.ndarray, bases: Sequence[np.ndarray], dictionary: np.ndarray,
                          categories: Sequence[str], m: int, threshold: float = 0.15, n_draws: int = 20,
                          seed: int = 0) -> dict[str, Any]:
    """Polysemantic share of the neurons' directions (``[n, d]``, OMP with ``m`` atoms over the
    prepared ``dictionary``) against (a) random directions in each neuron's span, same dictionary,
    and (b) random Gaussian dictionaries of the same size whose atoms keep the real categories."""
    from .concepts import random_dictionary, sparse_codes

    rng = np.random.default_rng(seed)
    real = polysemantic_flags(sparse_codes(directions, dictionary, m), categories, threshold)
    span, rdict = [], []
    for k in range(n_draws):
        span.append(polysemantic_flags(sparse_codes(random_in_span(bases, rng), dictionary, m), categories,
                                       threshold).mean())
        D = random_dictionary(*dictionary.shape, seed=seed + 1000 + k)
        rdict.append(polysemantic_flags(sparse_codes(directions, D, m), categories, threshold).mean())
    return {"flags": real, "share": float(real.mean()), "null_span": np.asarray(span),
            "null_dictionary": np.asarray(rdict)}


def polysemanticity_rows(res: dict[str, Any] | None, reason: str = "") -> list[dict[str, Any]]:
    m1 = "polysemanticity: share of neurons vs random directions in their span"
    m2 = "polysemanticity: share of neurons vs random dictionaries"
    how = ("share of selected neurons whose PC1 decomposition (OMP, read-out + data concepts) has strong "
           "concepts from >= 2 unrelated category groups; Wilson CI over neurons; ")
    if res is None:
        return [not_measurable(m1, how, reason, 0.0, False), not_measurable(m2, how, reason, 0.0, False)]
    n = len(res["flags"])
    lo, hi = wilson_interval(int(res["flags"].sum()), n)
    ns, nd = float(res["null_span"].mean()), float(res["null_dictionary"].mean())
    # the claim: the category structure of a decomposition says something about the neuron, i.e. a
    # neuron mixes unrelated groups LESS often than a random direction of its span / a random dictionary
    return [row(m1, res["share"], (lo, hi), ns, ns, how + f"null: mean share for random unit directions in each "
                f"neuron's effect span ({len(res['null_span'])} draws); pass = fewer polysemantic than the null",
                higher_is_better=False),
            row(m2, res["share"], (lo, hi), nd, nd, how + f"null: mean share with random Gaussian dictionaries "
                f"carrying the real atoms' categories ({len(res['null_dictionary'])} draws)", higher_is_better=False)]


# ----------------------------------------------------------------------------- adversarial problems, as CLIP runs them


def output_concept(card: pd.DataFrame) -> int | None:
    """The neuron's output concept X: its number read-out concept with the largest positive
    coefficient (what its effect writes toward), or ``None``."""
    if card is None or not len(card):
        return None
    c = card[(card.kind == "read-out") & card.concept.astype(str).str.fullmatch(r"\d+") & (card.coefficient > 0)]
    if not len(c):
        return None
    return int(c.sort_values("coefficient", ascending=False).concept.iloc[0])


def input_trigger(norms: np.ndarray, problems: Sequence[Problem], min_count: int = 3) -> tuple[int, float] | None:
    """The neuron's input trigger F: the operand value whose training problems have the largest
    mean centred-effect norm (``norms [N_train]``), among values seen at least ``min_count`` times."""
    acc: dict[int, list[float]] = {}
    for v, p in zip(norms, problems):
        if p.task in ARITHMETIC:
            for k in ("a", "b"):
                acc.setdefault(int(p.meta[k]), []).append(float(v))
    best = [(np.mean(v), k) for k, v in acc.items() if len(v) >= min_count]
    if not best:
        return None
    m, k = max(best)
    return int(k), float(m)


def clip_adversarial_pairs(sources: Sequence[Problem], trigger: int, concept: int, rng: random.Random,
                           tries: int = 60) -> list[tuple[int, Problem, Problem]]:
    """For each source problem, a **targeted** edit (one operand becomes the trigger ``F``) and a
    **random** edit of the same operand (a random number of the same digit count, not ``F``), both
    keeping task, digit counts and carry/borrow class (:func:`rebuild`) and both with a gold answer
    other than the concept ``X``. Returns ``(source index, targeted, random)`` where both exist."""
    out = []
    for i, p in enumerate(sources):
        if p.task not in ARITHMETIC:
            continue
        sides = [True, False]
        rng.shuffle(sides)
        for first in sides:
            t = rebuild(p, trigger, p.meta["b"]) if first else rebuild(p, p.meta["a"], trigger)
            if t is None or t.compact == p.compact or t.answer == str(concept):
                continue

            def propose(first: bool = first) -> tuple[bool, int]:
                return first, _random_operand(p, first, rng)
            r = None
            for _ in range(tries):
                cand, _ = _edit(p, propose, 1)
                if cand is not None and cand.answer != str(concept) and \
                        trigger not in (cand.meta["a"], cand.meta["b"]):
                    r = cand
                    break
            if r is not None:
                out.append((i, t, r))
                break
    return out


def answers_value(model: Any, problems: Sequence[Problem], values: Sequence[Any], template: Template,
                  batch_size: int = 64) -> np.ndarray:
    """``[n]`` bool: whether greedy decoding writes ``values[i]`` as the answer to problem ``i``
    (teacher forcing over its tokens, as :func:`so2lib.labels.label` checks a gold answer)."""
    import dataclasses

    if not problems:
        return np.zeros(0, bool)
    alt = [dataclasses.replace(p, answer=str(v)) for p, v in zip(problems, values)]
    return label(model, encode(model, alt, template), batch_size, progress=False).correct.values.astype(bool)


def solved(model: Any, problems: Sequence[Problem], template: Template, batch_size: int = 64) -> np.ndarray:
    if not problems:
        return np.zeros(0, bool)
    return label(model, encode(model, problems, template), batch_size, progress=False).correct.values.astype(bool)


def paired_rows(measure: str, before: np.ndarray, after: np.ndarray, how: str, target: float,
                null: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """A row for a paired binary comparison: mean change ``after - before`` with a paired bootstrap
    CI, the exact McNemar test in ``how``."""
    from .stats import mcnemar_exact, paired_bootstrap

    if len(before) == 0:
        return not_measurable(measure, how, "no pair of problems", target)
    b = paired_bootstrap(before.astype(float), after.astype(float), seed=seed)
    mc = mcnemar_exact(before, after)
    return row(measure, b["change"], (b["ci_low"], b["ci_high"]), null, target,
               how + f"; n={b['n']} pairs, McNemar exact: {mc['gained']} gained vs {mc['lost']} lost, "
               f"p={mc['p']:.3g}")


# ----------------------------------------------------------------------------- neuron editing


def edit_labels(model: Any, enc: Any, neurons: dict[int, Sequence[int]], factor: float,
                batch_size: int = 64) -> pd.DataFrame:
    """Labels (``correct``, ``logit_diff`` at the clean run's deciding token) with the chosen
    neurons' activations scaled by ``factor``."""
    hooks = [] if factor == 1.0 else scaling_hooks(neurons, factor)
    return label(model, enc, batch_size, progress=False, hooks=hooks)


def random_sets_like(chosen: dict[int, Sequence[int]], d_mlp: int, n_sets: int, seed: int = 0
                     ) -> list[dict[int, list[int]]]:
    """Random neuron sets with as many neurons per layer as ``chosen`` (same layers), excluding them."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n_sets):
        s = {}
        for l, ns in chosen.items():
            pool = np.setdiff1d(np.arange(d_mlp), np.asarray(ns))
            s[l] = sorted(g.choice(pool, size=len(ns), replace=False).tolist())
        out.append(s)
    return out


def error_class(classes_train: Sequence[Any], ok_train: np.ndarray, classes_val: Sequence[Any],
                min_train: int = 30, min_val: int = 10, min_each: int = 3) -> tuple[Any, str]:
    """The systematic error class (task, difficulty) with the lowest training accuracy among those
    with >= ``min_train`` training problems (>= ``min_each`` correct and incorrect) and >= ``min_val``
    validation problems; ``(None, reason)`` when there is none."""
    if not len(classes_train):
        return None, "no training problems"
    df = pd.DataFrame({"cls": [str(c) for c in classes_train], "ok": np.asarray(ok_train, bool)})
    key = {str(c): c for c in classes_train}
    cells = df.groupby("cls").ok.agg(["mean", "size", "sum"])
    nval = pd.Series([str(c) for c in classes_val]).value_counts() if len(classes_val) else pd.Series(dtype=int)
    cells["n_val"] = [int(nval.get(c, 0)) for c in cells.index]
    ok = cells[(cells["size"] >= min_train) & (cells["n_val"] >= min_val) & (cells["sum"] >= min_each)
               & (cells["size"] - cells["sum"] >= min_each)]
    if ok.empty:
        return None, (f"no task x difficulty class has >= {min_train} training problems with >= {min_each} "
                      f"correct and >= {min_each} incorrect, and >= {min_val} validation problems "
                      f"(largest class: {int(cells['size'].max()) if len(cells) else 0} training problems)")
    return key[ok["mean"].idxmin()], ""


# ----------------------------------------------------------------------------- the phase, for notebooks


def _by_layer(flat: Sequence[int], n_mlp: int) -> dict[int, list[int]]:
    """Flat ``layer * d_mlp + neuron`` indices grouped as ``{layer: [neurons]}`` (order kept)."""
    out: dict[int, list[int]] = {}
    for j in flat:
        out.setdefault(int(j // n_mlp), []).append(int(j % n_mlp))
    return out


def _cards(run: Any) -> dict[tuple[int, int], pd.DataFrame]:
    if not run.has("concept_cards"):
        return {}
    return {tuple(map(int, k.split(":"))): pd.DataFrame(v) for k, v in run.load("concept_cards").items()}


@torch.no_grad()
def project_on_direction(model: Any, enc: Any, d: torch.Tensor, layers: Sequence[int],
                         batch_size: int = 64) -> np.ndarray:
    """``[N, len(layers), d_mlp]``: every neuron's second-order effect projected on the direction
    ``d`` of the final normalized residual (in logit units, as Phase 2's ``second_cd``)."""
    from .capture import capture_batch

    layers = list(layers)
    engine = SecondOrderEngine(model, layers=layers, correctness_dir=d, check=False)
    out = [np.zeros((0, len(layers), model.cfg.d_mlp), np.float32)]
    for _, x, T in enc.batches(batch_size, device=engine.device):
        rows = capture_batch(model, x, T, layers)
        g = torch.zeros(len(T), dtype=torch.long)
        out.append(engine.projected(rows, T, g, g, layers=layers)["second"][:, 1].cpu().numpy())
    return np.concatenate(out)


def _error_analysis(setup: Setup, q: float, n_perm: int, seed: int) -> dict[str, Any]:
    """Cross-fitted: the correctness direction is refitted on the even-indexed training problems
    (fold A) and the discoveries are made on the odd-indexed ones (fold B), so that the readout
    was not fitted on the labels it is tested against; validation uses Phase 2's direction (all
    training problems), fitted without any validation label."""
    from .effects import correctness_direction

    run, model = setup.run, setup.model
    ok_all = setup.labels["train"].correct.values.astype(bool)
    ok_va = setup.labels["val"].correct.values.astype(bool)
    last = model.cfg.n_layers - 1  # the last layer has no second-order effect
    n = model.cfg.d_mlp
    names = pd.DataFrame({"layer": np.repeat(np.arange(last), n), "neuron": np.tile(np.arange(n), last)})
    fold_a = np.arange(len(ok_all)) % 2 == 0
    fold_b = np.flatnonzero(~fold_a)
    tasks_all = np.array([p.task for p in setup.problems.train])
    try:
        fn = run.load("correctness_direction")["final_normed_train"]
        d_a = correctness_direction(fn[torch.as_tensor(fold_a)], ok_all[fold_a], tasks_all[fold_a])
    except ValueError:
        d_a = None
    if d_a is None or last < 1 or not len(fold_b):
        so_tr = np.zeros((0, max(last, 0), n), np.float32)
        fold_b = fold_b[:0]
    else:
        so_tr = project_on_direction(model, setup.enc["train"].subset(fold_b), d_a, range(last), setup.batch_size)
    so_va = load_effects(run, "val", "second_cd")
    ok_tr = ok_all[fold_b]
    ptr, pva = [setup.problems.train[i] for i in fold_b], setup.problems.val
    scopes, out = [], {}
    tasks_tr, tasks_va = np.array([p.task for p in ptr], dtype=object), np.array([p.task for p in pva])
    for scope in ["overall"] + sorted(set(tasks_all)):
        mt = np.ones(len(ptr), bool) if scope == "overall" else tasks_tr == scope
        mv = np.ones(len(pva), bool) if scope == "overall" else tasks_va == scope
        it, iv = np.flatnonzero(mt), np.flatnonzero(mv)
        st = [(p.task, difficulty(p)) for p in (ptr[i] for i in it)]
        sv = [(p.task, difficulty(p)) for p in (pva[i] for i in iv)]
        if last < 1 or not len(it):
            summ = {"tests": 0, "informative_strata": 0, "discoveries": 0, "null_mean": np.nan, "null_q95": np.nan,
                    "n_perm": 0, "replicated": 0, "replicated_share": np.nan}
        else:
            res = stratified_error_analysis([np.asarray(so_tr[it, l]) for l in range(last)], ok_tr[it], st,
                                            [np.asarray(so_va[iv, l]) for l in range(last)], ok_va[iv], sv, q,
                                            n_perm if scope == "overall" else min(n_perm, 100), seed, names)
            summ = res["summary"]
            if scope == "overall":
                out["neurons"] = res["neurons"]
        scopes.append({"scope": scope, "strata": "task x difficulty" if scope == "overall" else "difficulty",
                       "fold": "B (odd training problems; direction from fold A)",
                       "n_train": int(len(it)), "n_val": int(len(iv)), **summ})
    out["summary"] = pd.DataFrame(scopes)
    out.setdefault("neurons", names.assign(z=np.nan, p=np.nan, p_bh=np.nan, discovery=False))
    return out


def _direction(setup: Setup) -> dict[str, Any]:
    run, model = setup.run, setup.model
    if not run.has("layer_sums_val"):
        return {"reason": "no validation residuals (run notebook 03)"}
    d = run.load("correctness_direction")["d"].float()
    score = (final_normalized(model, run.load("layer_sums_val")["resid"]) @ d).numpy()
    tasks_tr = [p.task for p in setup.problems.train]
    acc = pd.Series(setup.labels["train"].correct.values.astype(float)).groupby(tasks_tr).mean().to_dict()
    try:
        res = direction_auroc(score, setup.labels["val"].correct.values, [p.task for p in setup.problems.val], acc)
    except NotMeasurable as e:
        return {"reason": str(e)}
    return {k: (list(map(float, v)) if isinstance(v, tuple) else v) for k, v in res.items()}


def _poly_null(setup: Setup, threshold: float, n_draws: int, seed: int) -> dict[str, Any]:
    run, model = setup.run, setup.model
    if not run.has("concept_dictionary") or not run.has("neuron_directions"):
        return {"reason": "no concept dictionary or neuron directions (run notebooks 03 and 04)"}
    crit, selected = load_selection(run)
    cd = run.load("concept_dictionary")
    nd = run.load("neuron_directions")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    dirs, bases = [], []
    for l in crit:
        vt = load_effects(run, "train", f"vectors_L{l}")
        pc = nd["pc1"][str(l)].numpy()
        for j in range(len(selected[l])):
            dirs.append(pc[j])
            bases.append(span_basis(np.asarray(vt[:, j], np.float64), (L - 1 - l) * H))
    if not dirs:
        return {"reason": "no selected neurons"}
    atoms = cd["atoms"].numpy().astype(np.float64)
    m = int(cd["m"])
    if atoms.shape[0] < m:
        return {"reason": f"dictionary has {atoms.shape[0]} atoms < m={m}"}
    res = polysemanticity_nulls(np.asarray(dirs, np.float64), bases, atoms, cd["categories"], m, threshold,
                                n_draws, seed)
    return {"flags": res["flags"].tolist(), "share": res["share"], "null_span": res["null_span"].tolist(),
            "null_dictionary": res["null_dictionary"].tolist()}


def _adversarial_clip(setup: Setup, cards: dict, max_sources: int, max_neurons: int, seed: int) -> pd.DataFrame:
    run, model = setup.run, setup.model
    crit, selected = load_selection(run)
    ok_va = setup.labels["val"].correct.values.astype(bool)
    sources = [p for p, ok in zip(setup.problems.val, ok_va) if ok and p.task in ARITHMETIC]
    rng = random.Random(seed)
    recs, reasons = [], {"no number output concept": 0, "no trigger operand": 0, "no source admits the edit": 0}
    used = 0
    for l in crit:
        if used >= max_neurons:
            break
        vt = np.asarray(load_effects(run, "train", f"vectors_L{l}"), np.float32)
        norms = np.linalg.norm(vt - vt.mean(0), axis=-1)  # [N, n_sel]
        for j, n in enumerate(selected[l]):
            if used >= max_neurons:
                break
            X = output_concept(cards.get((l, n)))
            if X is None:
                reasons["no number output concept"] += 1
                continue
            trig = input_trigger(norms[:, j], setup.problems.train)
            if trig is None:
                reasons["no trigger operand"] += 1
                continue
            F = trig[0]
            pairs = clip_adversarial_pairs(sources, F, X, rng)[:max_sources]
            if not pairs:
                reasons["no source admits the edit"] += 1
                continue
            used += 1
            for i, t, r in pairs:
                recs.append({"layer": l, "neuron": n, "concept_X": X, "trigger_F": F, "source": sources[i].compact,
                             "targeted": t.compact, "random": r.compact, "_t": t, "_r": r})
    cols = ["layer", "neuron", "concept_X", "trigger_F", "source", "targeted", "random", "targeted_answers_X",
            "random_answers_X", "targeted_wrong", "random_wrong"]
    if not recs:  # one row that says why (a saved table keeps no attributes)
        return pd.DataFrame([{**{c: None for c in cols}, "reason": (
            "no selected neuron has both a number output concept X and an input trigger F admitting a "
            f"difficulty-preserving edit ({reasons}; {len(sources)} correct arithmetic validation sources)")}])
    t, r = [x["_t"] for x in recs], [x["_r"] for x in recs]
    Xs = [x["concept_X"] for x in recs]
    bs = setup.batch_size
    df = pd.DataFrame([{k: v for k, v in x.items() if not k.startswith("_")} for x in recs])
    df["targeted_answers_X"] = answers_value(model, t, Xs, setup.template, bs)
    df["random_answers_X"] = answers_value(model, r, Xs, setup.template, bs)
    df["targeted_wrong"] = ~solved(model, t, setup.template, bs)
    df["random_wrong"] = ~solved(model, r, setup.template, bs)
    df["reason"] = ""
    return df[cols + ["reason"]]


def _adversarial_guided(setup: Setup, cards: dict, poly: pd.DataFrame, k_candidates: int, seed: int) -> pd.DataFrame:
    run, model = setup.run, setup.model
    crit, _ = load_selection(run)
    cols = ["source", "guided", "random", "guided_wrong", "random_wrong"]
    keys = [(int(l), int(n)) for l, n in poly[poly.polysemantic][["layer", "neuron"]].values] if len(poly) else []
    keys = keys or list(cards)
    if not keys:
        return pd.DataFrame(columns=cols)
    rng = random.Random(seed + 1)
    ok_va = setup.labels["val"].correct.values.astype(bool)
    sources = [p for p, ok in zip(setup.problems.val, ok_va) if ok]
    cand = [(p, c) for p, c in ((p, random_variants(p, rng, k_candidates)) for p in sources) if len(c) >= 2]
    if not cand:
        return pd.DataFrame(columns=cols)
    neurons: dict[int, list[int]] = {}
    for l, n in keys:
        neurons.setdefault(l, []).append(n)
    engine = SecondOrderEngine(model, layers=sorted(neurons), correctness_dir=run.load("correctness_direction")["d"])
    flat = [c for _, cs in cand for c in cs]
    push = neuron_push(model, engine, flat, setup.template, neurons, setup.batch_size)
    starts = np.cumsum([0] + [len(cs) for _, cs in cand])
    g, r = [], []
    for (p, cs), s in zip(cand, starts):
        k = int(np.argmin(push[s:s + len(cs)]))
        others = [j for j in range(len(cs)) if j != k]
        g.append(cs[k])
        r.append(cs[rng.choice(others)])
    df = pd.DataFrame({"source": [p.compact for p, _ in cand], "guided": [x.compact for x in g],
                       "random": [x.compact for x in r]})
    df["guided_wrong"] = ~solved(model, g, setup.template, setup.batch_size)
    df["random_wrong"] = ~solved(model, r, setup.template, setup.batch_size)
    return df


def _editing(setup: Setup, k_edit: int, factors: Sequence[float], n_random_sets: int, seed: int
             ) -> dict[str, Any]:
    from .stats import mcnemar_exact, paired_bootstrap

    run, model = setup.run, setup.model
    ok_tr = setup.labels["train"].correct.values.astype(bool)
    cls_tr = [(p.task, difficulty(p)) for p in setup.problems.train]
    cls_va = [(p.task, difficulty(p)) for p in setup.problems.val]
    target, reason = error_class(cls_tr, ok_tr, cls_va)
    last = model.cfg.n_layers - 1
    if target is None or last < 1:
        return {"reason": reason or "the model has no layer with a second-order effect", "curve": pd.DataFrame()}
    in_tr = np.array([c == target for c in cls_tr])
    in_va = np.array([c == target for c in cls_va])
    eff = np.asarray(load_effects(run, "train", "second_cd")[np.flatnonzero(in_tr)][:, :last])  # [n, L-1, d_mlp]
    ok_c = ok_tr[in_tr]
    diff = eff[ok_c].mean(0) - eff[~ok_c].mean(0)  # pushes toward the correct side more when correct
    n_mlp = model.cfg.d_mlp
    chosen = _by_layer(np.argsort(-diff.ravel())[:k_edit], n_mlp)
    bs = setup.batch_size
    enc_tr = setup.enc["train"].subset(np.flatnonzero(in_tr))
    train_acc = {float(f): float(edit_labels(model, enc_tr, chosen, f, bs).correct.mean()) for f in factors}
    moving = {f: a for f, a in train_acc.items() if f != 1.0} or train_acc
    best = max(moving, key=lambda f: (moving[f], -abs(f - 1.0)))
    rand_sets = random_sets_like(chosen, n_mlp, n_random_sets, seed)
    enc_va = setup.enc["val"]
    clean = edit_labels(model, enc_va, chosen, 1.0, bs)
    ok0, ld0 = clean.correct.values.astype(bool), clean.logit_diff.values.astype(float)
    curve, at_best = [], {}
    for f in factors:
        ch = edit_labels(model, enc_va, chosen, f, bs)
        ok1, ld1 = ch.correct.values.astype(bool), ch.logit_diff.values.astype(float)
        acc = paired_bootstrap(ok0[in_va].astype(float), ok1[in_va].astype(float), seed=seed)
        ldb = paired_bootstrap(ld0[in_va], ld1[in_va], seed=seed)
        rest = paired_bootstrap(ok0[~in_va].astype(float), ok1[~in_va].astype(float), seed=seed)
        mc = mcnemar_exact(ok0[in_va], ok1[in_va])
        rc, rl, rr = [], [], []
        for s in rand_sets:
            rs = edit_labels(model, enc_va, s, f, bs)
            rok, rld = rs.correct.values.astype(bool), rs.logit_diff.values.astype(float)
            rc.append(float(rok[in_va].mean() - ok0[in_va].mean()))
            rl.append(float((rld[in_va] - ld0[in_va]).mean()))
            rr.append(float(rok[~in_va].mean() - ok0[~in_va].mean()) if (~in_va).any() else np.nan)
        rec = {"factor": float(f), "train_class_accuracy": train_acc[float(f)],
               "chosen_class": float(ok1[in_va].mean()), "chosen_rest": float(ok1[~in_va].mean()) if (~in_va).any() else np.nan,
               "random_class_mean": float(ok0[in_va].mean() + np.mean(rc)) if rc else np.nan,
               "random_class_max": float(ok0[in_va].mean() + np.max(rc)) if rc else np.nan,
               "random_rest_mean": float(ok0[~in_va].mean() + np.nanmean(rr)) if rr and (~in_va).any() else np.nan,
               "class_change": acc["change"], "ci_class_low": acc["ci_low"], "ci_class_high": acc["ci_high"],
               "logit_diff_change": ldb["change"], "ci_ld_low": ldb["ci_low"], "ci_ld_high": ldb["ci_high"],
               "rest_change": rest["change"], "ci_rest_low": rest["ci_low"], "ci_rest_high": rest["ci_high"],
               "random_class_change_mean": float(np.mean(rc)) if rc else np.nan,
               "random_class_change_max": float(np.max(rc)) if rc else np.nan,
               "random_ld_change_mean": float(np.mean(rl)) if rl else np.nan,
               "random_rest_change_mean": float(np.nanmean(rr)) if rr and (~in_va).any() else np.nan,
               "gained": mc["gained"], "lost": mc["lost"], "p_mcnemar": mc["p"]}
        curve.append(rec)
        if float(f) == best:
            at_best = rec
    return {"reason": "", "curve": pd.DataFrame(curve), "error_class": f"{target[0]}, difficulty {target[1]}",
            "n_val_class": int(in_va.sum()), "n_val_rest": int((~in_va).sum()),
            "neurons": {str(k): v for k, v in chosen.items()}, "factor_chosen_on_train": best,
            "val_class_accuracy_before": float(ok0[in_va].mean()), "n_random_sets": int(n_random_sets),
            "at_best": at_best}


def editing_rows(ed: dict[str, Any]) -> list[dict[str, Any]]:
    m1 = "editing: accuracy change on the error class (validation)"
    m2 = "editing: logit-difference change on the error class (validation)"
    m3 = "editing: accuracy change on all other problems (side effect)"
    how = ("chosen neurons (largest training correct-minus-incorrect second-order effect on the correctness "
           "direction within the class) scaled by the factor chosen on training; paired bootstrap over problems")
    if ed.get("reason"):
        return [not_measurable(m, how, ed["reason"], t) for m, t in ((m1, 0.02), (m2, 0.0), (m3, -0.02))]
    b = ed["at_best"]
    tail = f" [class {ed['error_class']}, n={ed['n_val_class']}, factor {ed['factor_chosen_on_train']:g}]"
    return [row(m1, b["class_change"], (b["ci_class_low"], b["ci_class_high"]), b["random_class_change_mean"], 0.02,
                how + f"; null: mean change of {ed.get('n_random_sets', '')} random neuron sets of the same size in the "
                f"same layers (max {b['random_class_change_max']:.3f}); McNemar {b['gained']} gained vs {b['lost']} "
                f"lost, p={b['p_mcnemar']:.3g}" + tail),
            row(m2, b["logit_diff_change"], (b["ci_ld_low"], b["ci_ld_high"]), b["random_ld_change_mean"], 0.0,
                how + "; at the clean run's deciding token; null: mean change for the random sets" + tail),
            row(m3, b["rest_change"], (b["ci_rest_low"], b["ci_rest_high"]), -0.02, -0.02,
                how + f"; pass = no drop beyond 2 points (random sets: {b['random_rest_change_mean']:.3f})" + tail)]


def applications_phase(setup: Setup, q: float = 0.05, poly_threshold: float = 0.15, k_edit: int = 10,
                       factors: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), n_random_sets: int = 10,
                       k_candidates: int = 8, n_perm: int = 200, n_draws: int = 20, max_sources: int = 40,
                       max_adv_neurons: int = 10, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Phase 5: error analysis, correctness-direction AUROC, polysemanticity, adversarial problems
    and neuron editing, each measured on validation problems against its null, with every claim
    a row of ``applications_table`` (columns of ``validation_table``). What the data cannot
    measure is a ``not testable`` row whose ``how`` says why, never an exception."""
    run, model = setup.run, setup.model
    factors = sorted({float(f) for f in factors} | {1.0})
    base = ["labels_train", "labels_val", "selection"]
    cache: dict[str, Any] = {}

    def ea() -> dict[str, Any]:
        if "ea" not in cache:
            cache["ea"] = _error_analysis(setup, q, n_perm, seed)
        return cache["ea"]
    ea_deps = base + ["correctness_direction", "val_second_cd"]
    ea_params = {"q": q, "n_perm": n_perm, "seed": seed, "readout": "second_cd, cross-fitted",
                 "strata": "task x difficulty"}
    ea_sum = run.step("error_analysis", lambda: ea()["summary"], "05", params=ea_params, deps=ea_deps)
    ea_neurons = run.step("error_analysis_neurons", lambda: ea()["neurons"], "05", params=ea_params, deps=ea_deps)
    failures = run.step("failure_report", lambda: failure_report(
        load_effects(run, "val", "second_ld"), load_effects(run, "val", "direct_ld"),
        setup.labels["val"].correct.values, setup.problems.val, k=5), "05", deps=base + ["val_second_ld"])
    direction = run.step("correctness_direction_auroc", lambda: _direction(setup), "05",
                         deps=base + ["correctness_direction", "layer_sums_val"])
    cards = _cards(run)
    poly = run.step("polysemanticity", lambda: polysemanticity(cards, poly_threshold).assign(
        categories=lambda d: d.categories.map(", ".join)) if cards else pd.DataFrame(
        columns=["layer", "neuron", "n_strong", "groups", "categories", "polysemantic"]), "05",
        params={"threshold": poly_threshold}, deps=["concept_cards"] if run.has("concept_cards") else [])
    pnull = run.step("polysemanticity_null", lambda: _poly_null(setup, poly_threshold, n_draws, seed), "05",
                     params={"threshold": poly_threshold, "n_draws": n_draws, "seed": seed},
                     deps=[d for d in ("concept_dictionary", "neuron_directions") if run.has(d)])
    adv = run.step("adversarial", lambda: _adversarial_clip(setup, cards, max_sources, max_adv_neurons, seed),
                   "05", params={"max_sources": max_sources, "max_neurons": max_adv_neurons, "seed": seed},
                   deps=base + (["concept_cards"] if run.has("concept_cards") else []))
    adv_why = "; ".join(sorted({str(x) for x in adv.reason if x})) if "reason" in adv else ""
    adv = adv[adv.reason == ""].reset_index(drop=True) if "reason" in adv else adv
    guided = run.step("adversarial_guided", lambda: _adversarial_guided(setup, cards, poly, k_candidates, seed),
                      "05", params={"k_candidates": k_candidates, "seed": seed},
                      deps=base + ["polysemanticity", "correctness_direction"])
    ed_cache: dict[str, Any] = {}

    def ed() -> dict[str, Any]:
        if "e" not in ed_cache:
            ed_cache["e"] = _editing(setup, k_edit, factors, n_random_sets, seed)
        return ed_cache["e"]
    ed_params = {"k_edit": k_edit, "factors": factors, "n_random_sets": n_random_sets, "seed": seed}
    curve = run.step("editing_curve", lambda: ed()["curve"], "05", params=ed_params, deps=base + ["train_second_cd"])
    editing = run.step("editing", lambda: {k: v for k, v in ed().items() if k != "curve"}, "05", params=ed_params,
                       deps=base + ["train_second_cd"])

    def build_table() -> pd.DataFrame:
        rows = error_analysis_rows(ea_sum[ea_sum.scope == "overall"].iloc[0].to_dict(), q)
        rows += direction_rows(None if "reason" in direction else
                               {**direction, "diff_ci": tuple(direction["diff_ci"]),
                                "within_ci": tuple(direction["within_ci"])}, direction.get("reason", ""))
        rows += polysemanticity_rows(None if "reason" in pnull else
                                     {"flags": np.asarray(pnull["flags"], bool), "share": pnull["share"],
                                      "null_span": np.asarray(pnull["null_span"]),
                                      "null_dictionary": np.asarray(pnull["null_dictionary"])},
                                     pnull.get("reason", ""))
        how_x = ("for neurons whose concept card has a number read-out concept X (largest positive coefficient) "
                 "and an input trigger F (the operand value with the largest mean training centred-effect norm): "
                 "correct validation problems with one operand set to F (gold answer != X) vs the same operand set "
                 "to a random number of the same digit count (same task, digit counts and carry class); share of "
                 "problems on which the model answers X, targeted minus random")
        how_w = how_x.replace("share of problems on which the model answers X", "error rate")
        if len(adv):
            rows.append(paired_rows("adversarial (CLIP): answers the output concept X, trigger F vs random edit",
                                    adv.random_answers_X.values.astype(bool), adv.targeted_answers_X.values.astype(bool),
                                    how_x + f" ({adv.groupby(['layer', 'neuron']).ngroups} neurons)", 0.02))
            rows.append(paired_rows("adversarial (CLIP): error rate, trigger F vs random edit",
                                    adv.random_wrong.values.astype(bool), adv.targeted_wrong.values.astype(bool),
                                    how_w, 0.02))
        else:
            why = adv_why or "no selected neuron has a number output concept X and an input trigger F"
            rows += [not_measurable("adversarial (CLIP): answers the output concept X, trigger F vs random edit",
                                    how_x, why, 0.02),
                     not_measurable("adversarial (CLIP): error rate, trigger F vs random edit", how_w, why, 0.02)]
        how_g = (f"correct validation problems; of {k_candidates} random one-operand edits (same class), the one on "
                 "which the polysemantic neurons' second-order effects push most toward the incorrect side of the "
                 "correctness direction vs another of the same candidates; error rate, guided minus random")
        if len(guided):
            rows.append(paired_rows("adversarial (neuron-guided): error rate vs random candidate",
                                    guided.random_wrong.values.astype(bool), guided.guided_wrong.values.astype(bool),
                                    how_g, 0.02))
        else:
            rows.append(not_measurable("adversarial (neuron-guided): error rate vs random candidate", how_g,
                                       "no neuron with a concept card, or no source problem with two candidate edits",
                                       0.02))
        rows += editing_rows({**editing, "at_best": editing.get("at_best", {})})
        return table(rows)
    tab = run.step("applications_table", build_table, "05",
                   params={"q": q, "threshold": poly_threshold, **ed_params},
                   deps=["error_analysis", "correctness_direction_auroc", "polysemanticity_null", "adversarial",
                         "adversarial_guided", "editing"])
    summary = run.step("applications_summary", lambda: {
        "verdicts": {str(k): int(v) for k, v in tab.verdict.value_counts().items()},
        "error_analysis_discoveries": int(ea_sum[ea_sum.scope == "overall"].discoveries.iloc[0]),
        "polysemantic_share": float(poly.polysemantic.mean()) if len(poly) else float("nan"),
        "adversarial_pairs": int(len(adv)), "editing_error_class": editing.get("error_class", editing.get("reason")),
        "editing_factor": editing.get("factor_chosen_on_train", float("nan")),
    }, "05", deps=["applications_table", "polysemanticity"])
    examples = adv[["layer", "neuron", "concept_X", "trigger_F", "source", "targeted", "random"]].head(10) \
        if len(adv) else pd.DataFrame()
    return {"table": tab, "error_analysis": {"summary": ea_sum, "neurons": ea_neurons}, "failures": failures,
            "direction": direction, "polysemanticity": poly, "polysemanticity_null": pnull, "adversarial": adv,
            "adversarial_examples": examples, "adversarial_guided": guided, "editing_curve": curve,
            "editing": editing, "summary": summary}
