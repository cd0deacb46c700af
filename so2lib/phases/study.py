"""A study: one run directory, one model, one problem set, its encodings and labels.

:func:`open_run` is the first call of every notebook; the phase functions
(``selection.setup_and_selection``, ``effects.second_order_phase``,
``characterize.characterization_phase``, ``concepts.decomposition_phase``,
``applications.applications_phase``) take the :class:`Setup` it returns.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from so2lib.data.embedded import EMBEDDED_DIR
from so2lib.data.labels import (POSITIONS, Encoded, accuracy_table, bos_ids, check_classes, encode,
                                has_chat_template, label)
from so2lib.data.tasks import (TASKS, Problem, ProblemSet, Template, make_problem_set, stable_hash,
                               template_for)
from so2lib.engine.models import ModelInfo, load_model, resolve_model_path
from so2lib.runs.rundir import Run, expect_rows


@dataclasses.dataclass
class Setup:
    """What every phase needs: the run, the model, the problems, encodings and labels.

    ``enc[split]`` is the *analysis view* (:meth:`Encoded.analysis_view`): each prompt ends at
    the deciding position ``T_k*`` and ``answer_ids[i][0]`` is the deciding token, so every
    ``enc.batch`` of phases 2-5 is read where the problem is decided. ``prompt_enc[split]`` holds
    the plain prompts (``T = T_1``) and the whole gold answers.
    """

    run: Run
    model: Any
    problems: ProblemSet
    template: Template
    enc: dict[str, Encoded]
    labels: dict[str, pd.DataFrame]
    batch_size: int
    prompt_enc: dict[str, Encoded] | None = None


# Phase-1 options: a run remembers them, so notebooks 02-05 need not repeat them.
PHASE1_DEFAULTS: dict[str, Any] = {
    "tasks": list(TASKS), "template": None, "n_shots": 3, "chat": "auto", "position": "decide",
    "single_token_only": False, "bos": "auto", "space": "auto", "cot": False, "cot_max_tokens": 96,
    "data_dir": None, "calibrate": False, "calibration_n": 60, "accuracy_band": [0.35, 0.75],
    "calibration_policy": "flag", "calibration_shots": None, "heldout": "auto",
}


def _filter(model: Any, problems: list[Problem], tmpl: Template, single_token_only: bool
            ) -> tuple[list[Problem], dict[str, dict[str, int]]]:
    """Problems that can be studied, and per task the count dropped for each reason."""
    kept, why = [], {}
    for p in problems:
        reason = None
        try:
            e = encode(model, [p], tmpl)
            if single_token_only and len(e.answer_ids[0]) != 1:
                reason = "multi_token_answer"
        except ValueError as err:
            reason = "too_long" if "context" in str(err) else "untokenizable_answer"
        if reason is None:
            kept.append(p)
        else:
            d = why.setdefault(p.task, {})
            d[reason] = d.get(reason, 0) + 1
    return kept, why


def open_run(run_dir: str, model_name: str | None = None, n_train: int = 5000, n_val: int = 500,
             seed: int = 0, tasks: Sequence[str] | None = None, device: str | None = None,
             dtype: str | None = None, batch_size: int = 64, template: str | None = None,
             n_shots: int | None = None, single_token_only: bool | None = None, progress: bool = True,
             chat: str | bool | None = None, position: str | None = None, bos: str | bool | None = None,
             space: str | None = None, cot: bool | None = None, cot_max_tokens: int | None = None,
             data_dir: str | None = None, calibrate: bool | None = None, calibration_n: int | None = None,
             accuracy_band: Sequence[float] | None = None, calibration_policy: str | None = None,
             calibration_shots: Sequence[int] | None = None, heldout: str | bool | None = None,
             min_counts: bool = True) -> Setup:
    """Open (or resume) a run: load the model, build or reload the problems, label both splits.

    A run directory belongs to one model and one problem set: reopening it with other
    settings raises instead of mixing results. Phase-1 options left at ``None`` take the run's
    recorded value (else :data:`PHASE1_DEFAULTS`), so later notebooks need not repeat them:

    - ``tasks``: synthetic tasks (:data:`TASKS`) and/or word problems (``"gsm8k"``, ``"svamp"``,
      ``"mawps"``, read from ``data_dir``, default ``../shared/data``);
    - ``template``: ``"compact"``, ``"fewshot"`` (default for pretrained models) or ``"cot"``;
      ``n_shots`` solved examples;
    - ``chat``: ``"auto"`` wraps prompts in the tokenizer's chat template when it has one;
    - ``position``: ``"decide"`` reads every per-problem quantity at the deciding answer token
      ``k*`` (first token where greedy decoding leaves the gold answer, else the smallest
      margin); ``"first"`` at the first answer token (see ``docs/deciding_token.md``);
    - ``single_token_only``: keep only problems whose gold answer is one token (off by default;
      nothing needs it);
    - ``bos``, ``space``: see :class:`Template`;
    - ``cot``: chain-of-thought (:mod:`so2lib.data.cot`): greedy generation of at most
      ``cot_max_tokens`` tokens, correctness from the extracted final answer.

    - ``calibrate``: pick each synthetic task's difficulty level (and, with
      ``calibration_shots=[...]``, its shot count) on a calibration split of ``calibration_n``
      problems per level, disjoint from training and validation, so that the model's accuracy
      lies in ``accuracy_band``; tasks no level brings into the band are dropped or flagged
      (``calibration_policy``). See :mod:`so2lib.phases.calibration`; the manifest's ``calibration``
      records each task's level and calibration accuracy.

    - ``heldout``: draw problems (and calibration problems) only from the held-out partition the
      embedded model never saw (:func:`so2lib.data.tasks.is_heldout`, a fifth of every task's
      space). ``"auto"``: for the embedded model only; a pretrained model saw none of these
      problems, and the whole space keeps small levels (one-digit sums: 100 problems, not about
      20) within reach.

    The manifest's ``data.per_task`` records ``{"generated", "kept", "dropped"}`` per task; a
    task that keeps no problem raises a ``ValueError`` that says why, and nothing is saved (the
    directory stays free for other settings).

    Every value is checked as the runner checks it (:func:`so2lib.runs.params.check_call`), so a
    notebook run by hand refuses what ``python -m so2lib.runs.runner`` refuses; ``min_counts=False``
    lifts only the minimum split sizes (``n_train >= 50``, ``n_val >= 30``), for tests and quick
    looks whose verdicts cannot mean anything.

    The run is keyed by the model's weights (:func:`so2lib.data.sources.weights_fingerprint`): a
    directory made with other weights under the same name or folder is refused. ``batch_size``
    is part of every step's input key: reopening with another batch size recomputes what
    depends on it instead of mixing batchings.
    """
    from so2lib.data.sources import weights_fingerprint
    from so2lib.runs.params import check_call, check_notebook_globals

    check_notebook_globals(sys._getframe(1).f_globals)  # a notebook's other parameters (top_k_layers, m, q, ...)
    check_call({"model_name": model_name, "n_train": n_train, "n_val": n_val, "seed": seed, "tasks": tasks,
                "device": device, "dtype": dtype, "batch_size": batch_size, "template": template,
                "n_shots": n_shots, "chat": chat, "position": position, "cot_max_tokens": cot_max_tokens,
                "calibrate": calibrate, "calibration_n": calibration_n, "accuracy_band": accuracy_band,
                "calibration_policy": calibration_policy, "calibration_shots": calibration_shots,
                "heldout": heldout}, min_counts=min_counts)
    torch.manual_seed(seed)
    run = Run(run_dir)
    run.batch_size = batch_size
    given = {"tasks": None if tasks is None else list(tasks), "template": template, "n_shots": n_shots,
             "chat": chat, "position": position, "single_token_only": single_token_only, "bos": bos,
             "space": space, "cot": cot, "cot_max_tokens": cot_max_tokens, "data_dir": data_dir,
             "calibrate": calibrate, "calibration_n": calibration_n,
             "accuracy_band": None if accuracy_band is None else [float(x) for x in accuracy_band],
             "calibration_policy": calibration_policy,
             "calibration_shots": None if calibration_shots is None else [int(x) for x in calibration_shots],
             "heldout": heldout}
    recorded = run.config.get("phase1", {}) if run.has("problems") else {}
    if run.has("problems") and "heldout" not in recorded:  # made before the option: always the partition
        recorded = recorded | {"heldout": True}
    opts = {k: (v if v is not None else recorded.get(k, PHASE1_DEFAULTS[k])) for k, v in given.items()}
    if opts["position"] not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, not {opts['position']!r}")
    cfg = {"model": model_name or "embedded", "n_train": n_train, "n_val": n_val, "seed": seed,
           "tasks": list(opts["tasks"]), "template": opts["template"], "n_shots": opts["n_shots"]}
    old = {k: run.config.get(k) for k in cfg}
    if run.has("problems") and (old != cfg or any(recorded.get(k, PHASE1_DEFAULTS[k]) != opts[k] for k in opts)):
        raise ValueError(f"run {run_dir} was made with {old | recorded}, not {cfg | opts}; "
                         "use another run directory")
    path = resolve_model_path(model_name)
    weights = weights_fingerprint(path)
    _check_weights(run, run_dir, cfg["model"], path, weights)
    model = load_model(model_name, device=device, dtype=dtype)
    if weights is None:  # a hub model fetched just now is in the local cache
        weights = weights_fingerprint(path)
        _check_weights(run, run_dir, cfg["model"], path, weights)
    has_chat = has_chat_template(model.tokenizer)
    use_chat = has_chat if opts["chat"] == "auto" else bool(opts["chat"])
    style = opts["template"] or ("cot" if opts["cot"] else template_for(model_name).style)
    if opts["cot"] and style != "cot":
        raise ValueError(f"cot=True needs the 'cot' template (worked examples), not {style!r}")
    tmpl = Template(style, n_shots=opts["n_shots"], chat=use_chat, space=opts["space"], bos=opts["bos"])
    # batch_size is not recorded here: each artifact's params record the one it was computed with
    if "batch_size" in run.config:  # written by an older version
        run.manifest["config"].pop("batch_size")
        run._update(lambda m: m["config"].pop("batch_size", None))
    run.manifest["config"].update(cfg | {"device": device, "dtype": dtype, "phase1": opts, "weights": weights})
    run.record("model", {"name": cfg["model"], **dataclasses.asdict(ModelInfo.of(model)),
                         "bos_prepended": model.tokenizer.convert_ids_to_tokens(bos_ids(model, opts["bos"])),
                         "has_chat_template": has_chat, "chat_template_used": use_chat})
    levels, exclude, run_tasks = None, set(), list(opts["tasks"])
    use_heldout = ((cfg["model"] == "embedded" or Path(path).resolve() == EMBEDDED_DIR.resolve())
                   if opts["heldout"] == "auto" else bool(opts["heldout"]))
    # keys of runs made before the option existed (always the partition) stay as they were
    hkey = {} if use_heldout else {"heldout": False}
    if opts["calibrate"]:
        from so2lib.phases import calibration as CAL

        cparams = {k: opts[k] for k in ("tasks", "calibration_n", "accuracy_band", "calibration_policy",
                                        "calibration_shots")} | {"model": cfg["model"], "seed": seed,
                                                                 "template": dataclasses.asdict(tmpl)} | hkey
        cal = run.step("calibration", lambda: CAL.calibrate(
            opts["tasks"], CAL.model_scorer(model, tmpl, batch_size), n=int(opts["calibration_n"]),
            band=opts["accuracy_band"], seed=seed, policy=opts["calibration_policy"],
            shots=opts["calibration_shots"] or [None], heldout=use_heldout,
            need=-(-(n_train + n_val) // max(len(opts["tasks"]), 1)) + 1), "01", params=cparams | {"need_of": [n_train, n_val]})
        run.record("calibration", CAL.summary(cal))
        levels, exclude = CAL.chosen_levels(cal), CAL.excluded_compacts(cal)
        run_tasks = CAL.kept_tasks(opts["tasks"], cal)
        if not run_tasks:
            raise ValueError(f"calibration dropped every task (none reached accuracy {opts['accuracy_band']} "
                             f"for model {cfg['model']!r}): {CAL.summary(cal)['tasks']}; use "
                             "calibration_policy='flag' to keep them flagged")
        tmpl = dataclasses.replace(tmpl, task_shots=CAL.task_shots(cal))
    tparams = dataclasses.asdict(tmpl)
    if not tparams["task_shots"]:
        tparams.pop("task_shots")  # runs made before calibration existed keep their keys

    def make_problems() -> dict[str, Any]:
        ps = make_problem_set(n_train, n_val, seed, run_tasks, heldout=use_heldout, data_dir=opts["data_dir"],
                              levels=levels, exclude=exclude)
        dropped: dict[str, dict[str, int]] = {}
        for split in ("train", "val"):
            kept, why = _filter(model, ps.split(split), tmpl, bool(opts["single_token_only"]))
            setattr(ps, split, kept)
            for t, d in why.items():
                for r, n in d.items():
                    dropped.setdefault(t, {})[r] = dropped.setdefault(t, {}).get(r, 0) + n
        generated = {t: 0 for t in ps.tasks}
        for t in ps.tasks:
            generated[t] = sum(p.task == t for p in ps.train + ps.val) + sum(dropped.get(t, {}).values())
        return ps.to_json() | {"per_task": {t: {"generated": generated[t],
                                                "kept": generated[t] - sum(dropped.get(t, {}).values()),
                                                "dropped": dropped.get(t, {})} for t in ps.tasks}}
    pparams = cfg | {"dtype": str(dtype), "single_token_only": opts["single_token_only"],
                     "template": tparams, "data_dir": opts["data_dir"], "weights": weights} | hkey
    if levels is not None:
        pparams |= {"levels": levels, "run_tasks": run_tasks}
    try:
        pj = run.step("problems", make_problems, "01", params=pparams,
                      validate=lambda pj: _check_kept(pj.get("per_task", {}), cfg["model"], opts),
                      **({"deps": ["calibration"]} if levels is not None else {}))
    except ValueError:
        if run.has("problems"):  # saved by an older version although unusable: do not bind the directory
            run.forget("problems")
        raise
    problems = ProblemSet.from_json(pj)
    per_task = pj.get("per_task", {})
    run.record("data", {"n_train": len(problems.train), "n_val": len(problems.val), "seed": seed,
                        "tasks": list(problems.tasks), "heldout_partition": problems.heldout,
                        "single_token_only": opts["single_token_only"], "template": tparams,
                        "position": opts["position"], "cot": opts["cot"], "per_task": per_task,
                        "dropped": n_train + n_val - len(problems.train) - len(problems.val),
                        "hash": stable_hash(str([p.compact for p in problems.train + problems.val]))})
    prompt_enc = {s: encode(model, problems.split(s), tmpl) for s in ("train", "val")}
    lparams = {"position": opts["position"], "cot": opts["cot"], "cot_max_tokens": opts["cot_max_tokens"],
               "stop": True}  # correct = gold tokens and the answer ends there (labels.label)
    if opts["cot"]:
        from so2lib.data import cot as C

        gen_tmpl = dataclasses.replace(tmpl, space="keep")
        labels, enc = {}, {}
        for s in ("train", "val"):
            gens = C.generate_cached(run, f"cot_generations_{s}", model, encode(model, problems.split(s), gen_tmpl),
                                     int(opts["cot_max_tokens"]), min(batch_size, 16), progress,
                                     params={"cot_max_tokens": opts["cot_max_tokens"]}, deps=["problems"])

            def lab_cot(s: str = s, gens: list = gens) -> pd.DataFrame:
                return C.cot_labels(model, problems.split(s), tmpl, gens, batch_size, opts["position"], progress)[0]
            labels[s] = run.step(f"labels_{s}", lab_cot, "01", params=lparams, deps=[f"cot_generations_{s}"],
                                 validate=expect_rows(len(problems.split(s)), ["correct"]))
            prompt_enc[s] = C.reasoning_encoded(model, problems.split(s), tmpl, gens)[0]
            enc[s] = prompt_enc[s].analysis_view(labels[s].decide_k.values)
    else:
        labels = {s: run.step(f"labels_{s}", lambda s=s: label(model, prompt_enc[s], batch_size, progress,
                                                               position=opts["position"]),
                              "01", params=lparams, deps=["problems"],
                              validate=expect_rows(len(prompt_enc[s]), ["correct"]))
                  for s in ("train", "val")}
        enc = {s: prompt_enc[s].analysis_view(labels[s].decide_k.values) for s in ("train", "val")}
    return Setup(run, model, problems, tmpl, enc, labels, batch_size, prompt_enc)


def _check_weights(run: Run, run_dir: str, model: str, path: str, weights: str | None) -> None:
    """Refuse a run directory made with other weights under the same model name or folder."""
    was = run.config.get("weights")
    if run.has("problems") and was is not None and weights is not None and was != weights:
        raise ValueError(
            f"the weights of model {model!r} ({path}) changed since run {run_dir} was made (weights "
            f"fingerprint {was}, now {weights}): its labels, layers, selection and effects belong to the old "
            "weights, so it is not resumed with the new ones. Use another run directory for the new weights "
            f"(or delete {run_dir} to recompute everything with them; `make clean-run` for the default run)")


def _check_kept(per_task: dict[str, Any], model: str, opts: dict[str, Any]) -> None:
    """Refuse a problem set in which a task kept no problem (before it is saved, so that the run
    directory is not bound to settings that cannot work)."""
    empty = {t: v for t, v in per_task.items() if v["kept"] == 0}
    if not empty:
        return
    reasons = {r for v in empty.values() for r in v.get("dropped", {})}
    what = []
    if "too_long" in reasons:
        what.append(f"too_long: the prompts are longer than the model's context; use fewer solved examples "
                    f"(n_shots=0, or 1; with the runner `-p n_shots 0`; now {opts.get('n_shots')!r}) or the "
                    "short template (template='compact', `-p template compact`)")
    if "multi_token_answer" in reasons:
        what.append("multi_token_answer: single_token_only=True drops answers of several tokens; set it to False")
    if "untokenizable_answer" in reasons:
        what.append("untokenizable_answer: the tokenizer cannot write the answer; leave the task out")
    raise ValueError(
        f"task(s) {sorted(empty)} kept no problem for model {model!r}: {empty}. "
        + "; ".join(what) + f". Or leave the task out (tasks=[...], `-p tasks '[...]'`). Nothing was saved: "
        "run again in the same run directory with other settings.")


def per_task_table(setup: Setup) -> pd.DataFrame:
    """Per task: problems generated, kept (and why others were dropped), validation accuracy."""
    per = setup.run.manifest.get("data", {}).get("per_task", {})
    cal = (setup.run.manifest.get("calibration") or {}).get("tasks", {})
    acc = accuracy_table(setup.labels["val"], setup.problems.val)
    rows = []
    for t, v in per.items():
        rows.append({"task": t, "generated": v["generated"], "kept": v["kept"],
                     "kept_share": v["kept"] / max(v["generated"], 1),
                     "dropped": ", ".join(f"{k}: {n}" for k, n in v.get("dropped", {}).items()) or "",
                     "val_accuracy": acc.loc[t, "accuracy"] if t in acc.index else float("nan")})
        if cal:  # calibrated run: the chosen level and its accuracy on the calibration split
            c = cal.get(t, {})
            rows[-1] |= {"level": c.get("level"), "calibration_accuracy": c.get("accuracy"),
                         "calibration": c.get("action")}
    return pd.DataFrame(rows).set_index("task")


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
    """Largest operand's digit count (arithmetic, comparison, algebra), formula depth (logic) or
    number of operations of the reference solution (word problems)."""
    return p.meta.get("max_digits", p.meta.get("depth", p.meta.get("n_steps")))
