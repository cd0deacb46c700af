"""Neuron editing (Phase 5): scale chosen neurons' activations (:func:`scaling_hooks`) to fix a
systematic error class (:func:`error_class`), against random neuron sets of the same size in the
same layers (:func:`random_sets_like`); :func:`editing_rows` turns the result into table rows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .. import models as M
from ..labels import label
from ..stats import not_measurable, validation_row as row


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
