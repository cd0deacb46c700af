"""Neuron editing (Phase 5): scale chosen neurons' activations (:func:`scaling_hooks`) to fix a
systematic error class (:func:`error_class`), against random neuron sets of the same size in the
same layers (:func:`random_sets_like`); :func:`editing_rows` turns the result into table rows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from so2lib.data.labels import label_edits
from so2lib.engine import models as M
from so2lib.engine.partial import scale_edit
from so2lib.stats import not_measurable, validation_row as row


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


def edit_labels(model: Any, enc: Any, neurons: dict[int, Sequence[int]], factor: float,
                batch_size: int = 64) -> pd.DataFrame:
    """Labels (``correct``, ``logit_diff`` at the clean run's deciding token) with the chosen
    neurons' activations scaled by ``factor`` (:func:`edit_labels_many` for several at once)."""
    return edit_labels_many(model, enc, [(neurons, factor)], batch_size)[0]


def edit_labels_many(model: Any, enc: Any, edits: Sequence[tuple[dict[int, Sequence[int]], float]],
                     batch_size: int = 64, progress: bool = False, desc: str = "editing") -> list[pd.DataFrame]:
    """:func:`edit_labels` of each ``(neurons, factor)`` of ``edits`` (factor 1: the clean run),
    in one :func:`so2lib.data.labels.label_edits` call: the same problems' passes share their
    batches and clean residual, start after the first edited layer and are stacked."""
    return label_edits(model, enc, [scale_edit(n, f) for n, f in edits], batch_size, progress=progress, desc=desc)


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


def chosen_minus_random(before: np.ndarray, chosen: np.ndarray, random_sets: np.ndarray, n_boot: int = 2000,
                        seed: int = 0) -> dict[str, float]:
    """The chosen set's per-problem change ``chosen - before`` (``[n]``) minus the mean change of
    the random sets (``random_sets [n_sets, n]``, same problems), with a paired bootstrap CI over
    problems, and the rank-based p-value of the chosen set's mean change among the random sets'
    (``(1 + #{random >= chosen}) / (1 + n_sets)``, one-sided: the chosen set helps more)."""
    from so2lib.stats import paired_bootstrap

    b, c, R = np.asarray(before, float), np.asarray(chosen, float), np.atleast_2d(np.asarray(random_sets, float))
    d = (c - b) - (R - b[None]).mean(0)
    pb = paired_bootstrap(np.zeros(len(d)), d, n_boot, seed)
    ch, sets = float((c - b).mean()) if len(b) else float("nan"), (R - b[None]).mean(1)
    return {"change": ch, "minus_random": pb["change"], "ci_low": pb["ci_low"], "ci_high": pb["ci_high"],
            "random_mean": float(sets.mean()), "random_max": float(sets.max()),
            "rank_p": float((1 + (sets >= ch).sum()) / (1 + len(sets)))}


#: how many primary rows the study Holm-adjusts together (docs/measurements.md, "Primary rows")
STUDY_PRIMARY_ROWS = 6

EDIT_MEASURES = ("editing: accuracy change on the error class, chosen minus random sets (validation)",
                 "editing: logit-difference change on the error class, chosen minus random sets (validation)")


def editing_rows(ed: dict[str, Any], curve: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Rows of the editing test: at the factor chosen on training, the chosen set's change on the
    error class **minus** the mean change of the random sets (same size, same layers), per problem,
    paired bootstrap over problems, with the rank-based p-value of the chosen set among the random
    sets (``(1 + #{random >= chosen}) / (1 + n_sets)``; the accuracy row is primary); then the side
    effect (accuracy change on every other problem) of the chosen set at **every** factor of the grid."""
    m1, m2 = EDIT_MEASURES
    m3 = "editing: accuracy change on all other problems (side effect), factor {f:g}"
    how = ("chosen neurons (largest training correct-minus-incorrect second-order effect on the correctness "
           "direction within the class) scaled by the factor chosen on training")
    if ed.get("reason"):
        return [not_measurable(m1, how, ed["reason"], 0.0, primary=True), not_measurable(m2, how, ed["reason"], 0.0),
                not_measurable(m3.format(f=0.0), how, ed["reason"], -0.02)]
    b = ed["at_best"]
    n_sets = ed.get("n_random_sets", "")
    tail = f" [class {ed['error_class']}, n={ed['n_val_class']}, factor {ed['factor_chosen_on_train']:g}]"
    floor = ""
    if isinstance(n_sets, int) and (n_sets + 1) * 0.05 <= STUDY_PRIMARY_ROWS:
        floor = (f"; with {n_sets} random sets the rank p cannot fall below 1/{n_sets + 1}, so under Holm over the "
                 f"study's {STUDY_PRIMARY_ROWS} primary rows this row cannot be established when its p is the smallest"
                 f" (use n_random_sets >= {int(STUDY_PRIMARY_ROWS / 0.05)})")
    rows = [row(m1, b["minus_random_class"], (b["ci_mr_class_low"], b["ci_mr_class_high"]), 0.0, 0.0,
                how + f"; per problem, chosen change minus the mean change of {n_sets} random neuron sets of the "
                f"same size in the same layers; paired bootstrap over problems; p: rank of the chosen set among "
                f"the random sets (chosen {b['class_change']:.3f}, random mean {b['random_class_change_mean']:.3f}, "
                f"max {b['random_class_change_max']:.3f}); McNemar {b['gained']} gained vs {b['lost']} lost, "
                f"p={b['p_mcnemar']:.3g}" + floor + tail, p=b["rank_p_class"], primary=True,
                resampled="problems (validation, error class)"),
            row(m2, b["minus_random_ld"], (b["ci_mr_ld_low"], b["ci_mr_ld_high"]), 0.0, 0.0,
                how + f"; at the clean run's deciding token; chosen minus the mean of {n_sets} random sets, per "
                f"problem; paired bootstrap; p: rank among the random sets (chosen {b['logit_diff_change']:.3f}, "
                f"random mean {b['random_ld_change_mean']:.3f})" + tail, p=b["rank_p_ld"],
                resampled="problems (validation, error class)")]
    grid = curve if curve is not None and len(curve) else pd.DataFrame([b])
    for _, r in grid.iterrows():
        if float(r["factor"]) == 1.0:
            continue
        rows.append(row(m3.format(f=float(r["factor"])), r["rest_change"], (r["ci_rest_low"], r["ci_rest_high"]),
                        -0.02, -0.02, how.replace("the factor chosen on training", f"factor {float(r['factor']):g}")
                        + "; paired bootstrap over the problems outside the class; established = no drop beyond 2 "
                        "points" + (" (the factor chosen on training)" if float(r["factor"]) ==
                                    float(ed["factor_chosen_on_train"]) else "") + tail,
                        resampled="problems (validation, outside the error class)"))
    return rows
