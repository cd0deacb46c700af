"""Runs sized by power: ``n_val`` (and ``n_train``) from a target minimum detectable accuracy change.

    python -m so2lib.runs.runner --run-dir outputs/runs/x --model smollm2-135m -p target_mde 0.03

The paired accuracy change of an intervention (ablating a layer, editing neurons) measured on
``n`` validation problems has standard error ``sqrt(d / n)``, ``d`` the share of problems whose
outcome flips (:func:`so2lib.stats.min_detectable_change`; default ``d = 2 p (1 - p)``, the
worst case for independent outcomes at accuracy ``p``). At 5% (two-sided) and 80% power the
smallest change resolved is ``2.80 * sqrt(d / n)``; :func:`size_by_power` inverts that.
"""

from __future__ import annotations

import math
from typing import Any

from so2lib.runs.params import MIN_N_TRAIN, MIN_N_VAL, ParameterError
from so2lib.stats import min_detectable_change

Z, POWER_Z = 1.96, 0.84
# runner-level options (not notebook parameters): consumed by :func:`apply`
OPTIONS = ("target_mde", "power_accuracy", "power_discordance", "train_ratio")


def size_by_power(target_mde: float, accuracy: float = 0.55, discordance: float | None = None,
                  train_ratio: float = 2.0, n_tasks: int = 6) -> dict[str, Any]:
    """The smallest ``n_val`` whose minimum detectable paired accuracy change is at most
    ``target_mde`` (a fraction: 0.03 = 3 points), ``n_train = ceil(train_ratio * n_val)`` (at
    least the notebooks' minima), and the sensitivity reached: overall and per task (when the
    ``n_val`` problems are split evenly over ``n_tasks`` tasks)."""
    if not (isinstance(target_mde, (int, float)) and 0 < target_mde < 1):
        raise ParameterError(f"target_mde={target_mde!r} must be an accuracy change in (0, 1), e.g. 0.03 (3 points)")
    if not 0 < accuracy < 1:
        raise ParameterError(f"power_accuracy={accuracy!r} must be in (0, 1)")
    if discordance is not None and not 0 < discordance <= 1:
        raise ParameterError(f"power_discordance={discordance!r} must be in (0, 1]")
    if train_ratio <= 0:
        raise ParameterError(f"train_ratio={train_ratio!r} must be > 0")
    d = 2 * accuracy * (1 - accuracy) if discordance is None else discordance
    n_val = max(MIN_N_VAL, math.ceil((Z + POWER_Z) ** 2 * d / target_mde ** 2))
    while min_detectable_change(accuracy, n_val, d) > target_mde:  # guard against rounding
        n_val += 1
    n_train = max(MIN_N_TRAIN, math.ceil(train_ratio * n_val))
    return {"n_val": n_val, "n_train": n_train, "target_mde": float(target_mde), "accuracy": accuracy,
            "discordance": d, "mde": min_detectable_change(accuracy, n_val, d),
            "mde_per_task": min_detectable_change(accuracy, n_val // max(n_tasks, 1), d), "n_tasks": n_tasks}


def apply(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Consume the power options of runner parameters: with ``target_mde``, set ``n_val`` and
    ``n_train`` (refused when either is also given). Returns ``(params, sizing or None)``."""
    params = dict(params)
    opts = {k: params.pop(k) for k in OPTIONS if k in params}
    if "target_mde" not in opts:
        if opts:
            raise ParameterError(f"{sorted(opts)} only apply with -p target_mde VALUE")
        return params, None
    both = [k for k in ("n_val", "n_train") if k in params]
    if both:
        raise ParameterError(f"pass either target_mde (which sizes n_val and n_train) or {both}, not both")
    tasks = params.get("tasks")
    s = size_by_power(opts["target_mde"], opts.get("power_accuracy", 0.55), opts.get("power_discordance"),
                      opts.get("train_ratio", 2.0), len(tasks) if isinstance(tasks, list) and tasks else 6)
    params["n_val"], params["n_train"] = s["n_val"], s["n_train"]
    return params, s


def describe(s: dict[str, Any]) -> str:
    return (f"sized by power: n_val={s['n_val']}, n_train={s['n_train']}; minimum detectable paired accuracy "
            f"change {s['mde']:.4f} (target {s['target_mde']:g}; accuracy {s['accuracy']:g}, discordance "
            f"{s['discordance']:.3f}, 5% two-sided, 80% power); per task ({s['n_tasks']} tasks, "
            f"{s['n_val'] // max(s['n_tasks'], 1)} problems each): {s['mde_per_task']:.4f}")
