"""The notebooks' parameters, and their validation before any work starts.

Every numbered notebook declares its parameters in its ``parameters``-tagged cell (read here
with papermill's own inspection). :func:`validate` refuses a name no notebook declares (listing
the valid ones), a value whose type differs from the declared default's (a ``None`` default
accepts any type) and impossible values of known parameters (:data:`CHECKS`).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any, Callable, Iterable


class _Any:
    def __repr__(self) -> str:
        return "<not a literal>"


ANY = _Any()  # a default that is not a literal: any value type

# Counts the analyses need. Training split: neuron selection, the correctness direction and
# significance (the top ``significant_share`` of training problems, at least one problem) are
# fitted on it, with both correct and incorrect problems present. Validation split: critical
# layers and every verdict are measured on it; with fewer than 30 problems one problem moves
# accuracy by more than 3 points and the bootstrap intervals are not meaningful.
MIN_N_TRAIN = 50
MIN_N_VAL = 30
DTYPES = ("float32", "float16", "bfloat16")


class ParameterError(ValueError):
    """A parameter the notebooks do not declare, or a value they cannot use."""


def _literal(src: str) -> Any:
    try:
        return ast.literal_eval(src)
    except (ValueError, SyntaxError):
        return ANY


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """``{name: default}`` of the ``parameters`` cell of one notebook (``ANY`` for non-literals)."""
    import papermill as pm

    return {k: _literal(v["default"]) for k, v in pm.inspect_notebook(str(path)).items()}


def _tasks() -> tuple[str, ...]:
    from so2lib.data import tasks

    return tuple(tasks.TASKS) + tuple(tasks.WORD_TASKS)


def _styles() -> tuple[str, ...]:
    from so2lib.data import tasks

    return tuple(getattr(tasks, "TEMPLATE_STYLES", ("compact", "fewshot")))


#: the neuron scores of phase 1 (:func:`so2lib.phases.selection.select_neurons`), defined here so
#: that the parameter checks need no phase module (which would make an import cycle)
SCORES = ("mean_abs_act", "variance", "direct_effect")


def _scores() -> tuple[str, ...]:
    return SCORES + ("combined",)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int) -> Callable[[Any], bool]:
    return lambda v: _int(v) and v >= lo


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# name -> (check, what a valid value is). Names a notebook does not declare are never checked here.
CHECKS: dict[str, tuple[Callable[[Any], bool], Callable[[], str]]] = {
    "batch_size": (_int_at_least(1), lambda: "an integer >= 1"),
    "n_train": (_int_at_least(MIN_N_TRAIN), lambda: (
        f"an integer >= {MIN_N_TRAIN}: neuron selection, the correctness direction and significance "
        "are fitted on the training split")),
    "n_val": (_int_at_least(MIN_N_VAL), lambda: (
        f"an integer >= {MIN_N_VAL}: critical layers and every verdict are measured on the validation "
        "split, and fewer problems cannot resolve a difference of a few points")),
    "seed": (_int_at_least(0), lambda: "an integer >= 0"),
    "top_k_layers": (_int_at_least(1), lambda: "an integer >= 1"),
    "top_n_neurons": (_int_at_least(1), lambda: "an integer >= 1"),
    "select_by": (lambda v: v in _scores(), lambda: f"one of {list(_scores())}"),
    "significant_share": (lambda v: _num(v) and 0 < v < 1, lambda: "a share in (0, 1), e.g. 0.02"),
    "budget_neurons": (_optional(_int_at_least(1)), lambda: "None or an integer >= 1"),
    "ov_rank": (_optional(_int_at_least(1)), lambda: "None or an integer >= 1"),
    "m": (_int_at_least(1), lambda: "an integer >= 1 (8-128 is the useful range)"),
    "q": (lambda v: _num(v) and 0 < v < 1, lambda: "a false discovery rate in (0, 1), e.g. 0.05"),
    "poly_threshold": (lambda v: _num(v) and v >= 0, lambda: "a number >= 0"),
    "k_edit": (_int_at_least(1), lambda: "an integer >= 1"),
    "n_random_sets": (_int_at_least(1), lambda: "an integer >= 1"),
    "n_shots": (_int_at_least(0), lambda: "an integer >= 0"),
    "tasks": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(t in _tasks() for t in v),
              lambda: f"a non-empty list of task names from {list(_tasks())}"),
    "template": (lambda v: v is None or v in _styles(), lambda: f"None or one of {list(_styles())}"),
    "dtype": (lambda v: v is None or v in DTYPES, lambda: f"None or one of {list(DTYPES)}"),
    "device": (lambda v: v is None or isinstance(v, str), lambda: 'None or a device name such as "cpu" or "cuda"'),
    "chat": (lambda v: v in ("auto", True, False) and not isinstance(v, int) or isinstance(v, bool),
             lambda: '"auto" (the chat template when the tokenizer has one), True or False'),
    "position": (lambda v: v in ("decide", "first"), lambda: '"decide" (the deciding answer token) or "first"'),
    "cot_max_tokens": (_int_at_least(1), lambda: "an integer >= 1"),
    "model_name": (lambda v: v is None or isinstance(v, str), lambda: "None (the embedded model), a hub name or a folder"),
    # calibration of task difficulty (so2lib.phases.calibration)
    "calibrate": (lambda v: isinstance(v, bool), lambda: "true or false"),
    "calibration_n": (_int_at_least(10), lambda: "an integer >= 10 (problems per task and difficulty level)"),
    "accuracy_band": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) for x in v)
                      and 0 <= v[0] < v[1] <= 1, lambda: "[low, high] with 0 <= low < high <= 1, e.g. [0.35, 0.75]"),
    "calibration_policy": (lambda v: v in ("drop", "flag"), lambda: '"drop" or "flag" (tasks no level brings into the band)'),
    "heldout": (lambda v: v == "auto" or isinstance(v, bool),
                lambda: '"auto" (the held-out partition for the embedded model only), true or false'),
    "calibration_shots": (_optional(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_int(x) and x >= 0 for x in v)),
                          lambda: "None (the run's n_shots) or a non-empty list of shot counts >= 0"),
}


MIXED_TYPES = {"chat", "heldout"}  # parameters whose valid values have several types: CHECKS alone decides


def _type_ok(default: Any, value: Any) -> bool:
    if default is ANY or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return _int(value)
    if isinstance(default, float):
        return _num(value)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _type_name(default: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a dict"}.get(type(default), type(default).__name__)


def check_value(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the known parameter ``name`` (``None`` when fine or unknown)."""
    if name not in CHECKS:
        return None
    ok, want = CHECKS[name]
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    return None if good else f"{name}={value!r} is not valid: it must be {want()}"


def validate(params: dict[str, Any], declared: dict[str, dict[str, Any]],
             reserved: Iterable[str] = ()) -> dict[str, Any]:
    """Check ``params`` against the notebooks' declared parameters ``{notebook: {name: default}}``.

    Raises :class:`ParameterError` listing every problem: unknown names (with the valid ones),
    ``reserved`` names (set by the runner itself), wrong types and impossible values, including
    the combination ``n_train * significant_share >= 1``. Returns ``params`` unchanged."""
    defaults: dict[str, Any] = {}
    for nb in declared.values():
        for k, v in nb.items():
            defaults.setdefault(k, v)
    problems = []
    for k, v in params.items():
        if k in reserved:
            problems.append(f"{k!r} is set by the runner (use its own option, e.g. --run-dir / --model)")
        elif k not in defaults:
            problems.append(f"unknown parameter {k!r}: the notebooks run here ({', '.join(sorted(declared))}) "
                            f"declare {', '.join(sorted(x for x in defaults if x not in reserved))}")
        elif k not in MIXED_TYPES and not _type_ok(defaults[k], v):
            problems.append(f"{k}={v!r} has the wrong type: it must be {_type_name(defaults[k])} "
                            f"(the notebook's default is {defaults[k]!r})")
        else:
            bad = check_value(k, v)
            if bad:
                problems.append(bad)
    effective = {k: v for k, v in defaults.items() if v is not ANY} | params
    share, n_train = effective.get("significant_share"), effective.get("n_train")
    if _num(share) and _int(n_train) and 0 < share < 1 and n_train * share < 1 and not problems:
        need = math.ceil(1 / share)
        problems.append(f"n_train={n_train} with significant_share={share} leaves no significant training "
                        f"problem: n_train must be >= {need} (or raise significant_share)")
    if problems:
        raise ParameterError("invalid parameters:\n  - " + "\n  - ".join(problems))
    return params


def check_call(values: dict[str, Any], min_counts: bool = True) -> None:
    """Check the values a notebook passes to a phase function as the runner checks ``-p`` values
    (:data:`CHECKS`; ``None`` means "the default / the run's recorded value" and is not checked),
    so that a notebook run by hand (plain ``papermill ... -p n_val 1``) refuses what the runner
    refuses. ``min_counts=False`` lifts only the minimum split sizes. Raises :class:`ParameterError`."""
    problems = []
    for k, v in values.items():
        if v is None or k not in CHECKS:
            continue
        if not min_counts and k in ("n_train", "n_val"):
            bad = None if _int_at_least(1)(v) else f"{k}={v!r} is not valid: it must be an integer >= 1"
        else:
            bad = check_value(k, v)
        if bad:
            problems.append(bad)
    if problems:
        raise ParameterError("invalid parameters:\n  - " + "\n  - ".join(problems))


def check_notebook_globals(namespace: dict[str, Any]) -> None:
    """Check a notebook's parameters where they live, in its namespace (the caller of
    :func:`so2lib.phases.study.open_run` when that is a notebook or script, ``__name__ == "__main__"``):
    every name of :data:`CHECKS` found there, and ``n_train * significant_share >= 1``, as the
    runner checks ``-p`` values. Library callers (other modules) are not checked here."""
    if namespace.get("__name__") != "__main__":
        return
    values = {k: namespace[k] for k in CHECKS if k in namespace and not callable(namespace[k])}
    check_call(values)
    share, n_train = values.get("significant_share"), values.get("n_train")
    if _num(share) and _int(n_train) and 0 < share < 1 and n_train * share < 1:
        raise ParameterError(f"invalid parameters:\n  - n_train={n_train} with significant_share={share} leaves no "
                             f"significant training problem: n_train must be >= {math.ceil(1 / share)}")
