"""Phase 5 applications, each ending in a measured result on held-out problems against a baseline.

- error analysis: neurons whose second-order effects separate incorrect from correct problems
  (Mann-Whitney U per neuron, Benjamini-Hochberg FDR across neurons), discovered on the
  training split and checked on validation; per failing problem, the neurons pushing most
  toward the wrong answer;
- polysemanticity from the concept decompositions;
- adversarial problems built from polysemantic neurons' number concepts, against random edits
  of the same budget;
- neuron editing: scale chosen neurons' activations with hooks to fix a systematic error
  class, against random neuron sets of the same size.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from . import models as M
from .labels import encode, label
from .tasks import Problem, Template, arithmetic_problem

# ----------------------------------------------------------------------------- statistics


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (scipy's ``false_discovery_control``); reject where ``<= q``."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    ph = k / n
    den = 1 + z * z / n
    centre = (ph + z * z / (2 * n)) / den
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return (centre - half, centre + half)


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
    return pd.DataFrame(rows)


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
