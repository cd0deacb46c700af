"""Adversarial problems (Phase 5): one-operand edits that keep the difficulty class
(:func:`rebuild`), targeted vs random variants, CLIP-style pairs (:func:`clip_adversarial_pairs`:
a neuron's input trigger F inserted into problems whose gold answer is not its output concept X,
against difficulty-matched random edits of the same source problems), the neuron-guided push
(:func:`neuron_push`), and :func:`paired_rows` for the paired comparison (McNemar, paired bootstrap).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from so2lib.data.labels import encode, label
from so2lib.data.tasks import Problem, Template, arithmetic_problem
from so2lib.stats import not_measurable, validation_row as row

ARITHMETIC = ("addition", "subtraction", "multiplication", "comparison")


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
    from so2lib.engine.capture import capture_batch

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
    mean centred-effect norm (``norms [N_train]``), among values seen at least ``min_count`` times
    (ties: the larger value)."""
    return input_triggers(np.asarray(norms)[:, None], problems, min_count)[0]


def input_triggers(norms: np.ndarray, problems: Sequence[Problem], min_count: int = 3) -> list[tuple[int, float] | None]:
    """:func:`input_trigger` of every column of ``norms [N_train, n]`` at once: the operands of the
    arithmetic problems are indexed once, and each value's mean norm is one weighted count."""
    vals, pidx = [], []
    for i, p in enumerate(problems):
        if p.task in ARITHMETIC:
            vals += [int(p.meta["a"]), int(p.meta["b"])]
            pidx += [i, i]
    if not vals:
        return [None] * norms.shape[1]
    uniq, inv = np.unique(np.asarray(vals), return_inverse=True)
    counts = np.bincount(inv, minlength=len(uniq))
    ok = counts >= min_count
    if not ok.any():
        return [None] * norms.shape[1]
    X = np.asarray(norms, np.float64)[np.asarray(pidx)]  # [pairs, n]
    out: list[tuple[int, float] | None] = []
    for j in range(X.shape[1]):
        mean = np.bincount(inv, weights=X[:, j], minlength=len(uniq)) / np.maximum(counts, 1)
        mean = np.where(ok, mean, -np.inf)
        k = len(uniq) - 1 - int(np.argmax(mean[::-1]))  # the largest mean; on ties the larger value
        out.append((int(uniq[k]), float(mean[k])))
    return out


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
    (teacher forcing over its tokens, as :func:`so2lib.data.labels.label` checks a gold answer)."""
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
    from so2lib.stats import mcnemar_exact, paired_bootstrap

    if len(before) == 0:
        return not_measurable(measure, how, "no pair of problems", target)
    from so2lib.stats import wilson_interval

    b = paired_bootstrap(before.astype(float), after.astype(float), seed=seed)
    mc = mcnemar_exact(before, after)
    if mc["gained"] + mc["lost"] == 0:  # no discordant pair: the bootstrap's [0, 0] would be overconfident
        u = wilson_interval(0, b["n"])[1]  # upper bound of the discordance rate at this n
        b["ci_low"], b["ci_high"] = -u, u
    return row(measure, b["change"], (b["ci_low"], b["ci_high"]), null, target,
               how + f"; n={b['n']} pairs, McNemar exact: {mc['gained']} gained vs {mc['lost']} lost, "
               f"p={mc['p']:.3g}", resampled="problem pairs (a problem and its variant)")


def hardest_operand(problems: Sequence[Problem], correct: np.ndarray, min_count: int = 3) -> int | None:
    """The neuron-agnostic baseline trigger: the operand value with the highest **training** error
    rate among arithmetic problems (values seen at least ``min_count`` times; ties: the most seen)."""
    acc: dict[int, list[bool]] = {}
    for ok, p in zip(np.asarray(correct, bool), problems):
        if p.task in ARITHMETIC:
            for k in ("a", "b"):
                acc.setdefault(int(p.meta[k]), []).append(bool(ok))
    best = [(1 - np.mean(v), len(v), k) for k, v in acc.items() if len(v) >= min_count]
    return int(max(best)[2]) if best else None


def _rate(k: float, n: float) -> float:
    """Error rate with a continuity correction, so that a ratio stays finite when an arm has 0 errors."""
    return (k + 0.5) / (n + 1.0)


def cluster_bootstrap(arms: Sequence[tuple[np.ndarray, np.ndarray]], stat: str = "ratio", n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, np.ndarray]:
    """Two-stage cluster bootstrap over neurons: ``arms[j] = (a_j, b_j)`` are the binary outcomes
    (e.g. wrong) of neuron ``j``'s problems in two arms (targeted, baseline; paired or not). Each
    replicate resamples the neurons with replacement, then each chosen neuron's problems with
    replacement within each arm; the statistic pools the resampled problems: ``"ratio"`` of the
    error rates ``rate(a) / rate(b)`` (continuity-corrected, :func:`_rate`) or ``"diff"``
    ``mean(a) - mean(b)``. Returns ``(point, replicates)``; ``nan`` and no replicates without arms."""
    arms = [(np.asarray(a, float), np.asarray(b, float)) for a, b in arms if len(a) and len(b)]
    if not arms:
        return float("nan"), np.array([])

    def value(ka: float, na: float, kb: float, nb: float) -> float:
        return _rate(ka, na) / _rate(kb, nb) if stat == "ratio" else ka / na - kb / nb
    point = value(sum(a.sum() for a, _ in arms), sum(len(a) for a, _ in arms),
                  sum(b.sum() for _, b in arms), sum(len(b) for _, b in arms))
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    J = len(arms)
    for r in range(n_boot):
        ka = na = kb = nb = 0.0
        for j in rng.integers(0, J, J):
            a, b = arms[j]
            ka += a[rng.integers(0, len(a), len(a))].sum()
            kb += b[rng.integers(0, len(b), len(b))].sum()
            na, nb = na + len(a), nb + len(b)
        boots[r] = value(ka, na, kb, nb)
    return float(point), boots


def adversarial_rows(adv: pd.DataFrame, how: str, why: str = "", n_boot: int = 2000, seed: int = 0
                     ) -> list[dict[str, Any]]:
    """Rows of the CLIP-style adversarial test from its per-pair table (one row per source problem
    and neuron, columns ``layer, neuron, targeted_wrong, random_wrong, targeted_answers_X,
    random_answers_X`` and, where the baselines exist, ``randneuron_wrong`` / ``hard_wrong``): the
    ratio targeted / random error rate against the plan's "more than 3x random" (primary row), and
    targeted minus each neuron-agnostic baseline; cluster bootstrap over neurons (problems resampled
    within neuron)."""
    from so2lib.stats import interval_row

    m0 = "adversarial (CLIP): error-rate ratio, trigger F / random edit (plan: > 3x)"
    m1 = "adversarial (CLIP): answers the output concept X, trigger F minus random edit"
    m2 = "adversarial (CLIP): error rate, trigger F minus the trigger of another neuron"
    m3 = "adversarial (CLIP): error rate, trigger F minus the hardest operand value (training error rate)"
    res = "problems within neurons (cluster bootstrap over neurons)"
    spec = [(m0, "targeted_wrong", "random_wrong", "ratio", 1.0, 3.0, True,
             "; ratio of continuity-corrected error rates (k + 0.5) / (n + 1); control 1 = no better than random"),
            (m1, "targeted_answers_X", "random_answers_X", "diff", 0.0, 0.0, False, ""),
            (m2, "targeted_wrong", "randneuron_wrong", "diff", 0.0, 0.0, False,
             "; baseline: the same sources edited with the trigger F of another (random) selected neuron"),
            (m3, "targeted_wrong", "hard_wrong", "diff", 0.0, 0.0, False,
             "; baseline: the same sources edited with the operand value of highest training error rate")]
    rows = []
    for m, a, b, st, ctrl, tgt, prim, extra in spec:
        if not len(adv) or a not in adv or b not in adv:
            rows.append(not_measurable(m, how + extra, why or "no adversarial pair", tgt, primary=prim,
                                       resampled=res))
            continue
        arms = []
        for _, g in adv.groupby(["layer", "neuron"]):
            ga, gb = g[a].dropna(), g[b].dropna()
            arms.append((ga.values.astype(bool), gb.values.astype(bool)))
        if not any(x.any() or y.any() for x, y in arms):  # 0 / 0: nothing to compare
            rows.append(not_measurable(m, how + extra, "no edit made any answer wrong in either arm", tgt,
                                       primary=prim, resampled=res))
            continue
        point, boots = cluster_bootstrap(arms, st, n_boot, seed)
        n_arm = sum(1 for x, y in arms if len(x) and len(y))
        rows.append(interval_row(m, point, boots, ctrl, tgt, how + extra + f" ({n_arm} neurons, "
                                 f"{int(sum(len(x) for x, _ in arms))} targeted problems)",
                                 reason=why or "no neuron with both arms", primary=prim, resampled=res))
    return rows
