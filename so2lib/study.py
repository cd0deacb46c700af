"""A study: one run directory, one model, one problem set, its encodings and labels.

:func:`open_run` is the first call of every notebook; the phase functions
(``selection.setup_and_selection``, ``effects.second_order_phase``,
``characterize.characterization_phase``, ``concepts.decomposition_phase``,
``applications.applications_phase``) take the :class:`Setup` it returns.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import pandas as pd
import torch

from .labels import Encoded, accuracy_table, check_classes, encode, label, single_token_subset
from .models import ModelInfo, load_model
from .runs import Run, expect_rows
from .tasks import TASKS, ProblemSet, Template, make_problem_set, stable_hash, template_for


@dataclasses.dataclass
class Setup:
    """What every phase needs: the run, the model, the problems, encodings and labels."""

    run: Run
    model: Any
    problems: ProblemSet
    template: Template
    enc: dict[str, Encoded]
    labels: dict[str, pd.DataFrame]
    batch_size: int


def open_run(run_dir: str, model_name: str | None = None, n_train: int = 5000, n_val: int = 500,
             seed: int = 0, tasks: Sequence[str] = TASKS, device: str | None = None,
             dtype: str | None = None, batch_size: int = 64, template: str | None = None,
             n_shots: int = 3, single_token_only: bool = True, progress: bool = True) -> Setup:
    """Open (or resume) a run: load the model, build or reload the problems, label both splits.

    A run directory belongs to one model and one problem set: reopening it with other
    settings raises instead of mixing results. ``single_token_only`` keeps only problems whose
    gold answer is one token for this model (the second-order analysis needs single-token
    answers); the number dropped is recorded in the manifest.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    torch.manual_seed(seed)
    run = Run(run_dir)
    cfg = {"model": model_name or "embedded", "n_train": n_train, "n_val": n_val, "seed": seed,
           "tasks": list(tasks), "template": template, "n_shots": n_shots}
    old = {k: run.config.get(k) for k in cfg}
    if run.has("problems") and old != cfg:
        raise ValueError(f"run {run_dir} was made with {old}, not {cfg}; use another run directory")
    run.manifest["config"].update(cfg | {"device": device, "dtype": dtype, "batch_size": batch_size})
    model = load_model(model_name, device=device, dtype=dtype)
    run.record("model", {"name": cfg["model"], **dataclasses.asdict(ModelInfo.of(model))})
    tmpl = dataclasses.replace(template_for(model_name), n_shots=n_shots)
    if template:
        tmpl = dataclasses.replace(tmpl, style=template)

    def make_problems() -> dict[str, Any]:
        ps = make_problem_set(n_train, n_val, seed, tasks, heldout=True)
        if single_token_only:  # drop problems whose gold answer is several tokens for this model
            for split in ("train", "val"):
                keep = single_token_subset(encode(model, ps.split(split), tmpl))
                setattr(ps, split, [ps.split(split)[i] for i in keep])
        return ps.to_json()
    problems = ProblemSet.from_json(run.step(
        "problems", make_problems, "01",
        params=cfg | {"dtype": str(dtype), "single_token_only": single_token_only,
                      "template": dataclasses.asdict(tmpl)}))
    run.record("data", {"n_train": len(problems.train), "n_val": len(problems.val), "seed": seed,
                        "tasks": list(problems.tasks), "heldout_partition": problems.heldout,
                        "single_token_only": single_token_only, "template": dataclasses.asdict(tmpl),
                        "dropped_multi_token": n_train + n_val - len(problems.train) - len(problems.val),
                        "hash": stable_hash(str([p.compact for p in problems.train + problems.val]))})
    enc = {s: encode(model, problems.split(s), tmpl) for s in ("train", "val")}
    labels = {s: run.step(f"labels_{s}", lambda s=s: label(model, enc[s], batch_size, progress), "01",
                          deps=["problems"], validate=expect_rows(len(enc[s]), ["correct"]))
              for s in ("train", "val")}
    return Setup(run, model, problems, tmpl, enc, labels, batch_size)


def accuracy(setup: Setup) -> pd.DataFrame:
    """Accuracy table per task on both splits (refuses an empty class on the training split)."""
    check_classes(setup.labels["train"].correct.values, "the training split")
    tabs = [accuracy_table(setup.labels[s], setup.problems.split(s)).assign(split=s) for s in ("train", "val")]
    return pd.concat(tabs)


def error_breakdown(setup: Setup, split: str = "val") -> pd.DataFrame:
    """Accuracy per task and difficulty: largest operand's digit count (arithmetic, comparison,
    algebra) or formula depth (logic)."""
    probs = setup.problems.split(split)
    df = setup.labels[split][["correct"]].assign(
        task=[p.task for p in probs],
        difficulty=[difficulty(p) for p in probs])
    return df.groupby(["task", "difficulty"]).agg(n=("correct", "size"), accuracy=("correct", "mean"))


def difficulty(p: Any) -> Any:
    """Largest operand's digit count (arithmetic, comparison, algebra) or formula depth (logic)."""
    return p.meta.get("max_digits", p.meta.get("depth"))
