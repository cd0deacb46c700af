"""Tasks calibrated to the model: pick each synthetic task's difficulty on a calibration split.

A model that solves 10% of a task leaves the correct class nearly empty; one that solves 95%
leaves the incorrect class empty. Before training and validation problems are drawn,
:func:`calibrate` labels ``n`` problems per task at every difficulty level of
:data:`so2lib.data.tasks.LEVELS` (operand digits, formula depth) and, optionally, at several shot
counts, and picks the level whose accuracy lies in ``band`` (default ``[0.35, 0.75]``),
closest to the band's centre (ties: the harder level, then fewer shots). A level whose space
holds fewer than ``n`` calibration problems plus the training and validation problems the run
will draw (one-digit sums under the held-out partition) is never chosen: it could not supply them.

The calibration split is its own seed stream (``seed`` mixed with :data:`CALIBRATION_STREAM`),
and the training and validation problems are then drawn excluding every calibration compact
form, so the three splits are disjoint: nothing measured later is measured on a problem that
chose the difficulty.

A task that no level brings into the band is reported, and either dropped (``policy="drop"``)
or kept at the level closest to the band with a flag (``policy="flag"``). Word-problem tasks
have no levels and are kept as they are (reported as ``"not levelled"``).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from so2lib.data.tasks import LEVELS, Problem, Template, generator, is_heldout, level_name, stable_hash

CALIBRATION_STREAM = "so2lib-calibration"
POLICIES = ("drop", "flag")
DEFAULT_BAND = (0.35, 0.75)

# Problems each class needs on each split for every phase (see ``class_sufficiency``): the
# training split fits selection, the correctness direction and significance; the validation
# split measures every verdict, and a class of fewer than 20 problems cannot resolve a
# difference of a few points between classes.
MIN_PER_CLASS = {"train": 20, "val": 20}
PHASES = {"01 selection": ("train",), "02 second-order effects": ("train",),
          "03 characterization": ("train", "val"), "04 sparse decomposition": ("train", "val"),
          "05 applications": ("val",)}


def calibration_seed(seed: int) -> int:
    """The calibration split's seed: a stream of its own, never the problem set's ``seed``."""
    return stable_hash(f"{CALIBRATION_STREAM}:{seed}") % (2**31)


def calibration_problems(task: str, level: dict[str, int], n: int, seed: int, heldout: bool = True,
                         ) -> list[Problem]:
    """``n`` distinct calibration problems of ``task`` at ``level`` (fewer when the level's space
    of problems is smaller)."""
    rng = random.Random(calibration_seed(seed) + stable_hash(task + level_name(level)) % 10**6)
    gen, seen, out, misses = generator(task, level), set(), [], 0
    while len(out) < n and misses < 5000:
        p = gen(rng)
        if p.compact in seen or (heldout and not is_heldout(p)):
            misses += 1
            continue
        seen.add(p.compact)
        out.append(p)
        misses = 0
    return out


def _check(band: Sequence[float], policy: str, n: int) -> tuple[float, float]:
    if policy not in POLICIES:
        raise ValueError(f"calibration policy {policy!r}: use 'drop' (leave the task out) or 'flag' (keep it, flagged)")
    if len(band) != 2 or not 0 <= band[0] < band[1] <= 1:
        raise ValueError(f"accuracy_band {band!r} must be [low, high] with 0 <= low < high <= 1, e.g. [0.35, 0.75]")
    if not isinstance(n, int) or n < 10:
        raise ValueError(f"calibration_n={n!r} must be an integer >= 10 problems per task and level")
    return float(band[0]), float(band[1])


def calibrate(tasks: Sequence[str], score: Callable[[list[Problem], int | None], Sequence[bool]],
              n: int = 60, band: Sequence[float] = DEFAULT_BAND, seed: int = 0, policy: str = "flag",
              shots: Sequence[int | None] = (None,), heldout: bool = True, search: str = "ladder",
              need: int = 0) -> dict[str, Any]:
    """Pick each task's difficulty level so that the model's accuracy lies in ``band``.

    ``score(problems, n_shots)`` returns whether the model solves each problem (``n_shots=None``:
    the run's own shot count; NaN: the problem cannot be posed to the model, e.g. too long);
    ``search="ladder"`` walks the levels from the easiest and stops after the first level whose
    accuracy (at every shot count) is below the band (harder levels are not tried; levels too
    small to supply ``n`` problems are not labelled), ``"full"`` labels every level; ``need``:
    problems per task the training and validation splits will draw at the chosen level (a level
    whose space holds fewer than ``n + need`` distinct problems is never chosen); ``shots`` the shot counts tried at every level. Returns
    ``{"band", "n", "seed", "policy", "tasks": {task: {...}}}`` where each task records
    ``level`` (the chosen one, ``None`` for unlevelled tasks), ``n_shots``, ``accuracy`` and
    ``n`` at it, ``in_band``, ``action`` (``"kept"``, ``"flagged"``, ``"dropped"`` or
    ``"not levelled"``) and the whole ``curve`` (every level and shot count tried)."""
    lo, hi = _check(band, policy, n)
    if search not in ("ladder", "full"):
        raise ValueError(f"search={search!r}: use 'ladder' or 'full'")
    centre = (lo + hi) / 2
    out: dict[str, Any] = {"band": [lo, hi], "n": n, "seed": seed, "seed_stream": calibration_seed(seed),
                           "policy": policy, "tasks": {}}
    for task in tasks:
        if task not in LEVELS:
            out["tasks"][task] = {"level": None, "n_shots": None, "accuracy": float("nan"), "n": 0,
                                  "in_band": False, "action": "not levelled", "curve": [], "compacts": []}
            continue
        curve, compacts = [], []
        for rank, level in enumerate(LEVELS[task]):
            space = calibration_problems(task, level, n + need, seed, heldout)
            probs = space[:n]  # the same draw as calibration_problems(..., n, ...)
            compacts += [p.compact for p in probs]
            if len(space) < n + need and search == "ladder":  # cannot be chosen: not worth labelling
                curve += [{"level": dict(level), "rank": rank, "n_shots": k, "n": 0, "accuracy": float("nan"),
                           "too_few": True} for k in shots]
                continue
            if search == "ladder" and curve and any(c["n"] > 0 for c in curve):
                last = [c for c in curve if c["rank"] == curve[-1]["rank"] and c["n"] > 0]
                if last and all(c["accuracy"] < lo for c in last):
                    break  # harder levels than one already below the band: not tried
            for k in shots:
                ok = np.asarray(score(probs, k), float)  # 1 correct, 0 incorrect, NaN not scorable
                if len(ok) != len(probs):
                    raise ValueError(f"score returned {len(ok)} results for {len(probs)} problems")
                m = ~np.isnan(ok)
                curve.append({"level": dict(level), "rank": rank, "n_shots": k, "n": int(m.sum()),
                              "accuracy": float(ok[m].mean()) if m.any() else float("nan"),
                              "too_few": len(space) < n + need})
                from so2lib.runs import progress
                progress.log(f"calibration {task} {level_name(level)}"
                             f"{'' if k is None else f' {k} shots'}: accuracy {curve[-1]['accuracy']:.2f} (n {curve[-1]['n']})")
        # a level whose space holds fewer than n distinct problems cannot supply a problem set
        valid = [c for c in curve if c["n"] > 0 and not c["too_few"]]
        if not valid:
            out["tasks"][task] = {"level": None, "n_shots": None, "accuracy": float("nan"), "n": 0,
                                  "in_band": False, "action": "dropped" if policy == "drop" else "flagged",
                                  "curve": curve, "compacts": sorted(set(compacts))}
            continue
        inside = [c for c in valid if lo <= c["accuracy"] <= hi]
        # in the band: closest to its centre; outside: closest to the band; ties -> harder, fewer shots
        dist = (lambda c: abs(c["accuracy"] - centre)) if inside else (
            lambda c: max(lo - c["accuracy"], c["accuracy"] - hi, 0.0))
        best = min(inside or valid, key=lambda c: (round(dist(c), 9), -c["rank"], c["n_shots"] or 0))
        action = "kept" if inside else ("dropped" if policy == "drop" else "flagged")
        out["tasks"][task] = {"level": best["level"], "n_shots": best["n_shots"], "accuracy": best["accuracy"],
                              "n": best["n"], "in_band": bool(inside), "action": action, "curve": curve,
                              "compacts": sorted(set(compacts))}
    return out


def chosen_levels(cal: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{task: level}`` for the tasks the calibration keeps (kept or flagged) at a level."""
    return {t: v["level"] for t, v in cal["tasks"].items() if v["level"] is not None and v["action"] != "dropped"}


def task_shots(cal: dict[str, Any]) -> tuple:
    """``Template.task_shots`` of the calibration (tasks whose chosen shot count is not the run's)."""
    return tuple(sorted((t, int(v["n_shots"])) for t, v in cal["tasks"].items()
                        if v["n_shots"] is not None and v["action"] != "dropped"))


def kept_tasks(tasks: Sequence[str], cal: dict[str, Any]) -> list[str]:
    return [t for t in tasks if cal["tasks"].get(t, {}).get("action") != "dropped"]


def excluded_compacts(cal: dict[str, Any]) -> set[str]:
    """Every calibration problem's compact form (never drawn for training or validation)."""
    return {c for v in cal["tasks"].values() for c in v.get("compacts", [])}


def summary(cal: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records per task: chosen level, shots, calibration accuracy, action."""
    return {"band": cal["band"], "n_per_level": cal["n"], "policy": cal["policy"], "seed_stream": cal["seed_stream"],
            "tasks": {t: {"level": level_name(v["level"]) if v["level"] is not None else None,
                          "n_shots": v["n_shots"], "accuracy": v["accuracy"], "n": v["n"],
                          "in_band": v["in_band"], "action": v["action"]} for t, v in cal["tasks"].items()}}


def table(cal: dict[str, Any]) -> pd.DataFrame:
    """One row per task: the chosen level, its calibration accuracy and what was done."""
    rows = [{"task": t, "level": level_name(v["level"]) if v["level"] is not None else "",
             "n_shots": v["n_shots"], "calibration_accuracy": v["accuracy"], "n": v["n"],
             "in_band": v["in_band"], "action": v["action"],
             "curve": "; ".join(f"{level_name(c['level'])}{'' if c['n_shots'] is None else '/' + str(c['n_shots']) + ' shots'}:"
                                f" {c['accuracy']:.2f}" for c in v["curve"])}
            for t, v in cal["tasks"].items()]
    return pd.DataFrame(rows).set_index("task")


def model_scorer(model: Any, template: Template, batch_size: int = 64) -> Callable[[list[Problem], int | None], np.ndarray]:
    """``score(problems, n_shots)`` for :func:`calibrate`: exact greedy correctness
    (:func:`so2lib.data.labels.label`) of each problem under ``template`` (``n_shots`` replaces the
    template's shot count when given)."""
    import dataclasses

    from so2lib.data.labels import encode, label

    def score(problems: list[Problem], n_shots: int | None) -> np.ndarray:
        out = np.full(len(problems), np.nan)
        tm = template if n_shots is None else dataclasses.replace(template, n_shots=int(n_shots))
        ok = []
        for i, p in enumerate(problems):
            try:
                encode(model, [p], tm)
                ok.append(i)
            except ValueError:  # too long for the context, or an answer the tokenizer cannot write
                pass
        if ok:
            enc = encode(model, [problems[i] for i in ok], tm)
            out[ok] = label(model, enc, batch_size, progress=False).correct.values.astype(float)
        return out
    return score


def class_sufficiency(labels: dict[str, pd.DataFrame], minimum: dict[str, int] | None = None) -> pd.DataFrame:
    """Whether both classes (correct, incorrect) have enough problems for every phase.

    One row per phase and split it reads: the counts of each class and ``enough`` (both at
    least ``minimum[split]``, default :data:`MIN_PER_CLASS`)."""
    minimum = minimum or MIN_PER_CLASS
    rows = []
    for phase, splits in PHASES.items():
        for s in splits:
            c = labels[s].correct.values.astype(bool)
            n_ok, n_bad = int(c.sum()), int((~c).sum())
            rows.append({"phase": phase, "split": s, "correct": n_ok, "incorrect": n_bad, "needs_each": minimum[s],
                         "enough": n_ok >= minimum[s] and n_bad >= minimum[s]})
    return pd.DataFrame(rows)
