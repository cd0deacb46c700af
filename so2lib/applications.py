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
from .stats import benjamini_hochberg, wilson_interval  # noqa: F401  (re-exported)
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


# ----------------------------------------------------------------------------- the phase, for notebooks


def _by_layer(flat: Sequence[int], n_mlp: int) -> dict[int, list[int]]:
    """Flat ``layer * d_mlp + neuron`` indices grouped as ``{layer: [neurons]}`` (order kept)."""
    out: dict[int, list[int]] = {}
    for j in flat:
        out.setdefault(int(j // n_mlp), []).append(int(j % n_mlp))
    return out


def applications_phase(setup: Setup, q: float = 0.05, poly_threshold: float = 0.15, k_edit: int = 10,
                       factors: Sequence[float] = (0.0, 0.5, 1.5, 2.0, 3.0), n_random_sets: int = 10,
                       k_candidates: int = 8, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Phase 5: error analysis, polysemanticity, adversarial problems and neuron editing, each
    measured on validation problems against its baseline."""
    import random as _random

    run, model = setup.run, setup.model
    crit, selected = load_selection(run)
    lab_tr, lab_va = setup.labels["train"], setup.labels["val"]
    ok_tr, ok_va = lab_tr.correct.values.astype(bool), lab_va.correct.values.astype(bool)
    tasks_tr = [p.task for p in setup.problems.train]
    tasks_va = [p.task for p in setup.problems.val]
    so_tr = np.asarray(load_effects(run, "train", "second_ld"))
    so_va = np.asarray(load_effects(run, "val", "second_ld"))
    fo_va = np.asarray(load_effects(run, "val", "direct_ld"))
    last = model.cfg.n_layers - 1  # no second-order effect: leave it out of the tests
    ea = error_analysis(so_tr[:, :last], ok_tr, so_va[:, :last], ok_va, tasks_tr, tasks_va, q)
    run.save("error_analysis", ea["summary"], "05")
    failures = failure_report(so_va, fo_va, ok_va, setup.problems.val, k=5)
    run.save("failure_report", failures, "05")
    # polysemanticity
    cards = {tuple(map(int, k.split(":"))): pd.DataFrame(v) for k, v in run.load("concept_cards").items()}
    poly = polysemanticity(cards, poly_threshold)
    run.save("polysemanticity", poly.assign(categories=poly.categories.map(", ".join)), "05")
    # adversarial problems from polysemantic neurons' number concepts
    rng = _random.Random(seed)
    poly_keys = [(int(l), int(n)) for l, n in poly[poly.polysemantic][["layer", "neuron"]].values]
    keys = poly_keys or list(cards)

    def numbers(ks: list) -> list[int]:
        return sorted({int(c) for k in ks for c, w in zip(cards[k].concept, cards[k].coefficient)
                       if str(c).isdigit() and abs(w) >= poly_threshold})
    nums = numbers(keys) or numbers(list(cards))
    sources = [p for p, ok in zip(setup.problems.val, ok_va) if ok]
    keep, targeted, randoms = adversarial_variants(sources, nums, rng)
    ft, nt = flip_rate(model, targeted, setup.template, setup.batch_size)
    fr, nr = flip_rate(model, randoms, setup.template, setup.batch_size)
    # neuron-guided: among random candidates of the same budget and class, the one on which the
    # polysemantic neurons push hardest toward the incorrect side of the correctness direction
    engine = SecondOrderEngine(model, layers=crit, correctness_dir=run.load("correctness_direction")["d"])
    poly_neurons: dict[int, list[int]] = {}
    for l, n in keys:
        poly_neurons.setdefault(l, []).append(n)
    cand_lists = [c for c in (random_variants(p, rng, k_candidates) for p in sources) if len(c) >= 2]
    push = neuron_push(model, engine, [c for cs in cand_lists for c in cs], setup.template, poly_neurons,
                         setup.batch_size)
    starts = np.cumsum([0] + [len(cs) for cs in cand_lists])
    guided = [cs[int(np.argmin(push[s:s + len(cs)]))] for cs, s in zip(cand_lists, starts)]
    guided_random = [cs[0] for cs in cand_lists]  # candidates come in random order: the first is a random edit
    fg, ng = flip_rate(model, guided, setup.template, setup.batch_size)
    fgr, ngr = flip_rate(model, guided_random, setup.template, setup.batch_size)

    def arow(edit: str, k: int, n: int) -> dict[str, Any]:
        lo, hi = wilson_interval(k, n)
        return {"edit": edit, "flips": k, "n": n, "rate": k / n if n else np.nan, "ci_low": lo, "ci_high": hi}
    adv = pd.DataFrame([arow("targeted (neuron number concepts)", ft, nt),
                        arow("random (same budget and class)", fr, nr),
                        arow(f"neuron-guided (best of {k_candidates} by polysemantic push)", fg, ng),
                        arow(f"random (one of the same {k_candidates} candidates)", fgr, ngr)])
    adv.attrs["numbers"] = nums
    run.save("adversarial", adv, "05")
    examples = pd.DataFrame([{"source": sources[i].compact, "targeted": t.compact, "random": r.compact}
                             for i, t, r in zip(keep[:10], targeted[:10], randoms[:10])])
    # neuron editing on the systematic error class with the lowest training accuracy
    cls_tr = [(p.task, difficulty(p)) for p in setup.problems.train]
    cls_va = [(p.task, difficulty(p)) for p in setup.problems.val]
    cells = pd.DataFrame({"cls": cls_tr, "ok": ok_tr}).groupby("cls").ok.agg(["mean", "size"])
    cells = cells[(cells["size"] >= 30) & cells.index.map(lambda c: sum(x == c for x in cls_va) >= 10)]
    target = cells["mean"].idxmin()
    in_tr = np.array([c == target for c in cls_tr])
    in_va = np.array([c == target for c in cls_va])
    eff = so_tr[in_tr][:, :last]  # [n_class, L-1, n]
    diff = eff[ok_tr[in_tr]].mean(0) - eff[~ok_tr[in_tr]].mean(0) if ok_tr[in_tr].any() else eff.mean(0)
    order = np.argsort(-diff.ravel())[:k_edit]
    n_mlp = model.cfg.d_mlp
    chosen = _by_layer(order, n_mlp)
    enc_tr_cls = setup.enc["train"].subset(np.flatnonzero(in_tr))
    train_curve = {f: edited_accuracy(model, enc_tr_cls, np.ones(in_tr.sum(), bool), chosen, f, setup.batch_size)[0]
                   for f in factors}
    best = max(train_curve, key=train_curve.get)
    g = np.random.default_rng(seed)
    rand_sets = []
    for _ in range(n_random_sets):
        rand_sets.append(_by_layer(g.choice(last * n_mlp, size=k_edit, replace=False), n_mlp))
    curve = []
    base_cls, base_rest = float(ok_va[in_va].mean()), float(ok_va[~in_va].mean())
    for f in factors:
        c_cls, c_rest = edited_accuracy(model, setup.enc["val"], in_va, chosen, f, setup.batch_size)
        rs = [edited_accuracy(model, setup.enc["val"], in_va, s, f, setup.batch_size) for s in rand_sets]
        curve.append({"factor": f, "chosen_class": c_cls, "chosen_rest": c_rest,
                      "random_class_mean": float(np.mean([r[0] for r in rs])),
                      "random_class_max": float(np.max([r[0] for r in rs])),
                      "random_rest_mean": float(np.mean([r[1] for r in rs]))})
    curve = pd.DataFrame(curve)
    run.save("editing_curve", curve, "05")
    row = curve[curve.factor == best].iloc[0]
    editing = {"error_class": f"{target[0]}, difficulty {target[1]}", "n_val_class": int(in_va.sum()),
               "neurons": {str(k): v for k, v in chosen.items()}, "factor_chosen_on_train": best,
               "val_class_accuracy_before": base_cls, "val_class_accuracy_after": float(row.chosen_class),
               "val_rest_accuracy_before": base_rest, "val_rest_accuracy_after": float(row.chosen_rest),
               "random_sets_class_accuracy_mean": float(row.random_class_mean),
               "random_sets_class_accuracy_max": float(row.random_class_max),
               "random_sets_rest_accuracy_mean": float(row.random_rest_mean)}
    summary = {
        "error_analysis": ea["summary"].to_dict("records"),
        "polysemantic_share": float(poly.polysemantic.mean()) if len(poly) else float("nan"),
        "polysemantic_share_by_layer": {str(k): float(v) for k, v in poly.groupby("layer").polysemantic.mean().items()},
        "adversarial": adv.to_dict("records"),
        "adversarial_ratio": float(adv.rate[0] / adv.rate[1]) if adv.rate[1] else float("nan"),
        "adversarial_ratio_guided": float(adv.rate[2] / adv.rate[3]) if adv.rate[3] else float("nan"),
        "editing": editing,
    }
    run.save("applications_summary", summary, "05")
    return {"error_analysis": ea, "failures": failures, "polysemanticity": poly, "adversarial": adv,
            "adversarial_examples": examples, "editing_curve": curve, "editing": editing, "summary": summary}
