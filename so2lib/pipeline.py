"""One function per phase: what the notebooks call, with artifacts cached in a :class:`Run`.

Each function is resumable: a finished step's artifact is loaded instead of recomputed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from .labels import Encoded, accuracy_table, check_classes, encode, label, single_token_subset
from .models import ModelInfo, load_model
from .runs import Run
from .selection import critical_layers, layer_ablation, mlp_out_means, neuron_scores, select_neurons
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
    problems = ProblemSet.from_json(run.step("problems", make_problems, "01"))
    run.record("data", {"n_train": len(problems.train), "n_val": len(problems.val), "seed": seed,
                        "tasks": list(problems.tasks), "heldout_partition": problems.heldout,
                        "single_token_only": single_token_only, "template": dataclasses.asdict(tmpl),
                        "dropped_multi_token": n_train + n_val - len(problems.train) - len(problems.val),
                        "hash": stable_hash(str([p.compact for p in problems.train + problems.val]))})
    enc = {s: encode(model, problems.split(s), tmpl) for s in ("train", "val")}
    labels = {s: run.step(f"labels_{s}", lambda s=s: label(model, enc[s], batch_size, progress), "01")
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


def setup_and_selection(setup: Setup, top_k_layers: int = 2, top_n_neurons: int = 100,
                        select_by: str = "combined", progress: bool = True) -> dict[str, Any]:
    """Phase 1 analysis: layer ablation study, critical layers, neuron scores and selection."""
    run, model, bs = setup.run, setup.model, setup.batch_size
    acc = accuracy(setup)
    run.step("accuracy", lambda: acc, "01")
    means = run.step("mlp_out_means", lambda: mlp_out_means(model, setup.enc["train"], bs, progress), "01")
    ablation = run.step("layer_ablation", lambda: layer_ablation(
        model, setup.enc["val"], means, setup.labels["val"], bs, progress), "01")
    crit = critical_layers(ablation, top_k_layers, n_layers=model.cfg.n_layers)
    scores = run.step("neuron_scores", lambda: neuron_scores(
        model, setup.enc["train"], setup.labels["train"], None, bs, progress), "01")
    selected = select_neurons(scores, crit, top_n_neurons, select_by)
    run.save("selection", {"critical_layers": crit, "neurons": {str(k): v for k, v in selected.items()},
                           "top_n": top_n_neurons, "by": select_by}, "01")
    return {"accuracy": acc, "ablation": ablation, "critical_layers": crit, "scores": scores,
            "selected": selected}


def load_selection(run: Run) -> tuple[list[int], dict[int, list[int]]]:
    s = run.load("selection")
    return s["critical_layers"], {int(k): v for k, v in s["neurons"].items()}


__all__ = ["Setup", "open_run", "accuracy", "setup_and_selection", "load_selection", "load_model"]


# ----------------------------------------------------------------------------- Phase 2


def second_order_phase(setup: Setup, ov_rank: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Phase 2: correctness direction (training split), then projected effects of every neuron
    and full vectors of the selected neurons for both splits, streamed into the run."""
    from .capture import answer_activations
    from .effects import compute_effects, correctness_direction
    from .second_order import SecondOrderEngine

    run, model, bs = setup.run, setup.model, setup.batch_size
    crit, selected = load_selection(run)

    def direction() -> dict[str, Any]:
        acts = answer_activations(model, setup.enc["train"], [], bs, progress)
        return {"d": correctness_direction(acts["final_normed"], setup.labels["train"].correct.values),
                "final_normed_train": acts["final_normed"], "final_resid_train": acts["final_resid"]}
    cd = run.step("correctness_direction", direction, "02")
    engine = SecondOrderEngine(model, correctness_dir=cd["d"], ov_rank=ov_rank)
    for split in ("train", "val"):
        compute_effects(model, setup.enc[split], setup.labels[split], run, split, cd["d"], selected, bs,
                        engine, progress)
    run.record("phase2", {"ov_rank": ov_rank, "critical_layers": crit,
                          "n_selected": {str(l): len(n) for l, n in selected.items()}})
    return {"critical_layers": crit, "selected": selected, "correctness_direction": cd["d"]}


def layer_magnitudes(run: Run, split: str = "val") -> pd.DataFrame:
    """Per layer: mean |effect| per neuron-problem, first vs second order, on both projections."""
    from .effects import load_effects

    rows = []
    for proj in ("ld", "cd"):
        first = np.abs(load_effects(run, split, f"direct_{proj}")).mean((0, 2))
        second = np.abs(load_effects(run, split, f"second_{proj}")).mean((0, 2))
        for l, (f, s) in enumerate(zip(first, second)):
            rows.append({"layer": l, "projection": proj, "first_order": float(f), "second_order": float(s),
                         "second_over_first": float(s / f) if f > 0 else float("nan")})
    return pd.DataFrame(rows)


def neuron_effect_table(run: Run, labels: pd.DataFrame, split: str = "val", proj: str = "ld") -> pd.DataFrame:
    """Per neuron: mean |second-order effect| overall and on correct / incorrect problems, and
    mean signed effect, with the direct effect alongside."""
    from .effects import load_effects

    so = np.asarray(load_effects(run, split, f"second_{proj}"))  # [N, L, n]
    fo = np.asarray(load_effects(run, split, f"direct_{proj}"))
    ok = labels.correct.values.astype(bool)
    L, n = so.shape[1:]
    df = pd.DataFrame({
        "layer": np.repeat(np.arange(L), n), "neuron": np.tile(np.arange(n), L),
        "mean_abs": np.abs(so).mean(0).ravel(),
        "mean_abs_correct": np.abs(so[ok]).mean(0).ravel() if ok.any() else np.nan,
        "mean_abs_incorrect": np.abs(so[~ok]).mean(0).ravel() if (~ok).any() else np.nan,
        "mean_signed": so.mean(0).ravel(),
        "direct_mean_abs": np.abs(fo).mean(0).ravel(),
    })
    return df


def effect_distribution(run: Run, split: str = "val", proj: str = "ld") -> pd.DataFrame:
    """Long table of per-neuron mean |effect| per layer (first and second order) for plotting."""
    from .effects import load_effects

    frames = []
    for order, kind in (("first", "direct"), ("second", "second")):
        m = np.abs(load_effects(run, split, f"{kind}_{proj}")).mean(0)  # [L, n]
        L, n = m.shape
        frames.append(pd.DataFrame({"layer": np.repeat(np.arange(L), n), "order": order, "value": m.ravel()}))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- Phase 3

TARGETS = {
    "share of problems per neuron": ("<", 0.05, "median over selected neurons of the share of validation problems on which the neuron is significant"),
    "critical layers' share of the effect": (">", 0.80, "share of total |second-order effect| on the logit difference (validation) carried by the critical layers"),
    "PC1 variance": (">", 0.35, "mean over selected neurons of the variance share of PC1 of the centred effect vectors (training, all problems)"),
    "accuracy drop with rank-1 replacement (points)": ("<", 1.0, "validation accuracy drop, in points, when every selected neuron's effect is replaced by mean + PC1 projection"),
}


def validate_results(measured: dict[str, float]) -> pd.DataFrame:
    """The plan's targets against measured values: a table with pass/fail. Reports, never raises."""
    rows = []
    for name, (op, target, how) in TARGETS.items():
        v = measured.get(name, float("nan"))
        ok = (v < target) if op == "<" else (v > target)
        rows.append({"measure": name, "measured": v, "target": f"{op} {target:g}",
                     "pass": bool(ok) if v == v else None, "how measured": how})
    return pd.DataFrame(rows)


def characterization_phase(setup: Setup, share: float = 0.02, budget_neurons: int | None = None,
                           progress: bool = True) -> dict[str, Any]:
    """Phase 3: output-space ablations, significance/sparsity, layer concentration, rank-1
    structure, effect budget and the validation table (all measured on the validation split)."""
    from . import characterize as C
    from .effects import load_effects
    from .second_order import SecondOrderEngine

    run, model, bs = setup.run, setup.model, setup.batch_size
    crit, selected = load_selection(run)
    cd = run.load("correctness_direction")
    engine = SecondOrderEngine(model, correctness_dir=cd["d"])
    sums = {s: run.step(f"layer_sums_{s}", lambda s=s: C.collect(model, setup.enc[s], engine, bs, progress), "03")
            for s in ("train", "val")}
    gold_val = torch.tensor(setup.labels["val"].gold_token.values)
    abl = C.output_space_ablation(model, sums["train"], sums["val"], gold_val, run.load("layer_ablation"))
    run.save("output_space_ablation", abl, "03")
    mags = np.abs(load_effects(run, "val", "second_ld")).sum((0, 2))
    conc = C.layer_concentration(mags, abl, crit)
    run.save("layer_concentration", conc, "03")
    vt = {l: load_effects(run, "train", f"vectors_L{l}") for l in crit}
    vv = {l: load_effects(run, "val", f"vectors_L{l}") for l in crit}
    struct = C.neuron_structure(vt, vv, share)
    stats = struct["stats"].assign(neuron=[selected[l][j] for l, j in zip(struct["stats"].layer, struct["stats"].slot)])
    run.save("neuron_structure", stats, "03")
    run.save("neuron_directions", {"pc1": {str(l): torch.from_numpy(v) for l, v in struct["pc1"].items()},
                                   "significant": {str(l): torch.from_numpy(v) for l, v in struct["significant"].items()}},
             "03")
    repl = C.replacement_accuracy(model, sums["val"]["resid"], gold_val, struct["edits"])
    run.save("replacement_accuracy", repl, "03")
    mean_act = run.step("mean_activations", lambda: _mean_activations(setup, progress), "03")
    budget_sel = {l: ns[:budget_neurons] for l, ns in selected.items()} if budget_neurons else selected
    budget = run.step("effect_budget", lambda: C.effect_budget(
        model, setup.enc["val"], setup.labels["val"], engine, budget_sel, mean_act, max(bs, 256), progress), "03")
    r1 = repl[(repl.scope == "all selected") & (repl.replacement == "rank1")].accuracy_drop_points.iloc[0]
    measured = {
        "share of problems per neuron": float(stats.significant_share_val.median()),
        "critical layers' share of the effect": float(conc[conc.critical].magnitude_share.sum()),
        "PC1 variance": float(stats.pc1_var_all.mean()),
        "accuracy drop with rank-1 replacement (points)": float(r1),
    }
    table = validate_results(measured)
    run.save("validation_table", table, "03")
    return {"ablation": abl, "concentration": conc, "stats": stats, "replacement": repl,
            "budget": budget, "validation": table, "critical_layers": crit}


def _mean_activations(setup: Setup, progress: bool = True) -> torch.Tensor:
    """``[L, d_mlp]`` mean MLP post-activation over every real position of the training split."""
    from . import models as M
    from .capture import position_means

    names = [M.mlp_post(l) for l in range(setup.model.cfg.n_layers)]
    return position_means(setup.model, setup.enc["train"], names, setup.batch_size, progress).cpu()


# ----------------------------------------------------------------------------- Phase 4


def decomposition_phase(setup: Setup, m: int = 16, progress: bool = True) -> dict[str, Any]:
    """Phase 4: each selected neuron's principal direction (PC1 of its centred effects, training
    split) decomposed by OMP over math/logic concept directions, compared with the model's
    vocabulary as a generic pool and with random dictionaries; replacement accuracy against
    rank-1; and whether the top data concept predicts where the neuron is significant."""
    from . import characterize as C
    from . import concepts as K
    from .effects import load_effects

    run, model = setup.run, setup.model
    crit, selected = load_selection(run)
    ln = ModelInfo.of(model).norm == "LN"
    nd = run.load("neuron_directions")  # PC1 and significance from Phase 3
    pc1 = {l: nd["pc1"][str(l)].numpy() for l in crit}
    centred_val = {l: np.asarray(load_effects(run, "val", f"vectors_L{l}"), dtype=np.float32)
                   - np.asarray(load_effects(run, "train", f"vectors_L{l}"), dtype=np.float32).mean(0) for l in crit}
    dirs = np.concatenate([pc1[l] for l in crit]).astype(np.float64)  # [n_sel_total, d]
    owners = [(l, n) for l in crit for n in selected[l]]
    resid_train = run.load("correctness_direction")["final_resid_train"]  # written by Phase 2
    flags = {s: K.metadata_flags(setup.problems.split(s)) for s in ("train", "val")}
    lex_c, lex_d = K.readout_directions(model, K.lexicon_entries())
    dat_c, dat_d = K.data_directions(resid_train, flags["train"], ln)
    dictionaries = {
        "read-out (lexicon)": (lex_c, lex_d),
        "data (metadata)": (dat_c, dat_d),
        "read-out + data": (lex_c + dat_c, torch.cat([lex_d, dat_d])),
    }
    voc = K.vocabulary_directions(model)
    toks = model.tokenizer.convert_ids_to_tokens(list(range(voc.shape[0])))
    dictionaries["vocabulary (generic pool)"] = ([K.Concept(str(t), "vocabulary", "read-out") for t in toks], voc)
    quality, decs = [], {}
    for name, (cs, D) in dictionaries.items():
        if len(cs) < m:
            continue
        dec = K.decompose(dirs, K.prepare_dictionary(D), cs, m)
        decs[name] = dec
        for (l, n), c, cr in zip(owners, dec["cosine"], dec["cosine_random"]):
            quality.append({"dictionary": name, "atoms": len(cs), "layer": l, "neuron": n,
                            "cosine": float(c), "cosine_random": float(cr)})
    quality = pd.DataFrame(quality)
    run.save("decomposition_quality", quality, "04")
    main = decs["read-out + data"]
    # replacement accuracy: mean + projection on the sparse reconstruction vs on PC1
    offs = np.cumsum([0] + [len(selected[l]) for l in crit])
    edits = {l: {"rank1": C.projection_edit(centred_val[l], pc1[l]),
                 "sparse": C.projection_edit(centred_val[l], main["recon"][offs[i]:offs[i + 1]])}
             for i, l in enumerate(crit)}
    resid_val = run.load("layer_sums_val")["resid"]  # written by Phase 3
    gold_val = torch.tensor(setup.labels["val"].gold_token.values)
    repl = C.replacement_accuracy(model, resid_val, gold_val, edits)
    run.save("decomposition_replacement", repl, "04")
    sig = np.concatenate([nd["significant"][str(l)].numpy() for l in crit], axis=1)
    pred = K.predictive_auroc(sig, flags["val"], main["codes"], main["concepts"])
    if len(pred):
        pred["layer"] = [owners[j][0] for j in pred.neuron_slot]
        pred["neuron"] = [owners[j][1] for j in pred.neuron_slot]
    run.save("predictive_check", pred, "04")
    cards = {owners[j]: K.concept_card(main["codes"][j], main["concepts"]) for j in range(len(owners))}
    run.save("concept_cards", {f"{l}:{n}": c.to_dict("records") for (l, n), c in cards.items()}, "04")
    run.record("phase4", {"m": m, "dictionary_sizes": {k: len(v[0]) for k, v in dictionaries.items()}})
    return {"quality": quality, "replacement": repl, "predictive": pred, "cards": cards,
            "decompositions": decs, "owners": owners, "critical_layers": crit}


# ----------------------------------------------------------------------------- Phase 5


def difficulty(p: Any) -> Any:
    """Largest operand's digit count (arithmetic, comparison, algebra) or formula depth (logic)."""
    return p.meta.get("max_digits", p.meta.get("depth"))


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

    from . import applications as A
    from .effects import load_effects

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
    ea = A.error_analysis(so_tr[:, :last], ok_tr, so_va[:, :last], ok_va, tasks_tr, tasks_va, q)
    run.save("error_analysis", ea["summary"], "05")
    failures = A.failure_report(so_va, fo_va, ok_va, setup.problems.val, k=5)
    run.save("failure_report", failures, "05")
    # polysemanticity
    cards = {tuple(map(int, k.split(":"))): pd.DataFrame(v) for k, v in run.load("concept_cards").items()}
    poly = A.polysemanticity(cards, poly_threshold)
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
    keep, targeted, randoms = A.adversarial_variants(sources, nums, rng)
    ft, nt = A.flip_rate(model, targeted, setup.template, setup.batch_size)
    fr, nr = A.flip_rate(model, randoms, setup.template, setup.batch_size)
    # neuron-guided: among random candidates of the same budget and class, the one on which the
    # polysemantic neurons push hardest toward the incorrect side of the correctness direction
    from .second_order import SecondOrderEngine

    engine = SecondOrderEngine(model, layers=crit, correctness_dir=run.load("correctness_direction")["d"])
    poly_neurons: dict[int, list[int]] = {}
    for l, n in keys:
        poly_neurons.setdefault(l, []).append(n)
    cand_lists = [c for c in (A.random_variants(p, rng, k_candidates) for p in sources) if len(c) >= 2]
    push = A.neuron_push(model, engine, [c for cs in cand_lists for c in cs], setup.template, poly_neurons,
                         setup.batch_size)
    starts = np.cumsum([0] + [len(cs) for cs in cand_lists])
    guided = [cs[int(np.argmin(push[s:s + len(cs)]))] for cs, s in zip(cand_lists, starts)]
    guided_random = [cs[0] for cs in cand_lists]  # candidates come in random order: the first is a random edit
    fg, ng = A.flip_rate(model, guided, setup.template, setup.batch_size)
    fgr, ngr = A.flip_rate(model, guided_random, setup.template, setup.batch_size)

    def arow(edit: str, k: int, n: int) -> dict[str, Any]:
        lo, hi = A.wilson_interval(k, n)
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
    train_curve = {f: A.edited_accuracy(model, enc_tr_cls, np.ones(in_tr.sum(), bool), chosen, f, setup.batch_size)[0]
                   for f in factors}
    best = max(train_curve, key=train_curve.get)
    g = np.random.default_rng(seed)
    rand_sets = []
    for _ in range(n_random_sets):
        rand_sets.append(_by_layer(g.choice(last * n_mlp, size=k_edit, replace=False), n_mlp))
    curve = []
    base_cls, base_rest = float(ok_va[in_va].mean()), float(ok_va[~in_va].mean())
    for f in factors:
        c_cls, c_rest = A.edited_accuracy(model, setup.enc["val"], in_va, chosen, f, setup.batch_size)
        rs = [A.edited_accuracy(model, setup.enc["val"], in_va, s, f, setup.batch_size) for s in rand_sets]
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
