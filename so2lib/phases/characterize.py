"""Phase 3: characterization of second-order effects, measured on held-out problems.

Every replacement is an edit of the residual stream at the answer position ``T`` before the
final norm; the model's own final norm (recomputed on the edited residual) and unembedding
then produce the answer, exactly as a forward pass with that edit would
(:func:`final_logits`, tested against a hooked forward pass).

Means, significance thresholds and principal components come from the training split;
accuracies are measured on the validation split.
"""

from __future__ import annotations

import dataclasses

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA

from so2lib.data.labels import Encoded
from so2lib.engine import models as M, partial as PA
from so2lib.engine.capture import capture_batch, position_means
from so2lib.engine.readout import answer_metrics, final_logits, readout_params
from so2lib.engine.second_order import SecondOrderEngine
from so2lib.phases import phase3_rows as R, protocol as P
from so2lib.phases.effects import load_effects
from so2lib.phases.selection import load_selection
from so2lib.phases.study import Setup
from so2lib.runs.progress import tqdm
from so2lib.stats import (ROWS_VERSION, not_measurable, validation_row,  # noqa: F401 (validation_row: re-exported)
                          verdict_table)

# ----------------------------------------------------------------------------- pure functions


def significance(train_norms: np.ndarray, share: float = 0.02) -> np.ndarray:
    """Per-neuron threshold ``[n]``: the k-th largest training norm of the centred effect,
    ``k = max(1, round(share * n_train))`` (as in the CLIP code)."""
    k = max(1, int(round(share * train_norms.shape[0])))
    return -np.sort(-train_norms, axis=0)[k - 1]


def pc1(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """First principal direction ``[d]`` of centred vectors ``[m, d]`` and its share of variance
    (scikit-learn PCA; the data are already centred on the training mean). The sign is fixed by
    majority, as CLIP does: most of the vectors project positively on the direction (scikit-learn's
    own sign is arbitrary), so a positive concept coefficient means the neuron writes toward it."""
    p = PCA(n_components=1, svd_solver="full").fit(centred)
    u = p.components_[0]
    proj = np.asarray(centred) @ u
    if (proj > 0).sum() < (proj < 0).sum():
        u = -u
    return u, float(p.explained_variance_ratio_[0])


def pc1_batch(vectors: np.ndarray | torch.Tensor, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pc1` of many sets at once: ``vectors [n, m, d]`` (``n`` sets of ``m`` vectors; numpy
    or torch) -> directions ``[n, d]`` (float32) and shares of variance ``[n]``. Each set is centred
    on its own mean (as PCA does); the first eigenvector of its scatter matrix (float64, a batched
    torch product) is PCA's first component, signed as scikit-learn signs it (largest-magnitude
    entry positive) and then by :func:`pc1`'s majority rule; the share is the top eigenvalue over
    the trace."""
    V = torch.as_tensor(vectors)
    n, m, d = V.shape
    dirs, share = np.zeros((n, d), np.float32), np.zeros(n)
    for c in range(0, n, chunk):
        X32 = V[c:c + chunk].float().contiguous()
        Xc = X32.double()
        Xc -= Xc.mean(1, keepdim=True)
        C = torch.bmm(Xc.transpose(1, 2), Xc).numpy()  # [k, d, d]
        del Xc
        w, E = np.linalg.eigh(C)
        u = E[:, :, -1]  # [k, d]
        big = np.abs(u).argmax(1)
        u = u * np.sign(u[np.arange(len(u)), big])[:, None]
        u32 = u.astype(np.float32)
        proj = torch.bmm(X32, torch.from_numpy(u32)[:, :, None])[..., 0].numpy()  # [k, m]
        flip = (proj > 0).sum(1) < (proj < 0).sum(1)
        u32[flip] = -u32[flip]
        tr = np.trace(C, axis1=1, axis2=2)
        dirs[c:c + chunk] = u32
        share[c:c + chunk] = np.where(tr > 0, w[:, -1] / np.where(tr > 0, tr, 1.0), np.nan)
    return dirs, share


# ----------------------------------------------------------------------------- collection


@torch.no_grad()
def collect(model: Any, enc: Encoded, engine: SecondOrderEngine, batch_size: int = 64,
            progress: bool = True) -> dict[str, torch.Tensor]:
    """Per problem, on CPU: residual at T before the final norm ``resid [N, dm]``, and per MLP
    layer the sum over all its neurons of the second-order vectors ``second [N, L, dm]`` and of
    the direct writes ``p_T @ W_out`` (MLP output at T without bias) ``direct [N, L, dm]``."""
    L = model.cfg.n_layers
    dev = engine.device
    out: dict[str, list[torch.Tensor]] = {"resid": [], "second": [], "direct": []}
    for _, x, T in enc.batches(batch_size, device=dev, desc="layer sums" if progress else None):
        rows = capture_batch(model, x, T, range(L))
        ar = torch.arange(len(T), device=dev)
        out["resid"].append(rows.final_resid.cpu())
        out["second"].append(torch.stack([engine.layer_sum(rows, l) for l in range(L)], 1).cpu())
        out["direct"].append(torch.stack([rows.mlp_post[l][ar, T] @ engine.W_out[l] for l in range(L)], 1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _eval(model: Any, resid: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    ok, ld = answer_metrics(final_logits(model, resid), gold)
    return float(ok.float().mean()), float(ld.mean())


# ----------------------------------------------------------------------------- measurements


def output_space_ablation(model: Any, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor],
                          gold_val: torch.Tensor, total: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per layer: validation accuracy and mean logit difference when the layer's summed
    second-order effects (or its direct effects) are replaced by their training means, as an
    edit of the residual at T. ``total``: Phase 1's forward-pass mean-ablation, joined in (it is
    measured on the training split, where the critical layers are chosen: column ``split``)."""
    acc0, ld0 = _eval(model, val["resid"], gold_val)
    rows = []
    for l in range(model.cfg.n_layers):
        for what in ("second", "direct"):
            edited = val["resid"] - val[what][:, l] + train[what][:, l].mean(0)
            acc, ld = _eval(model, edited, gold_val)
            rows.append({"layer": l, "ablation": f"{what}_order" if what == "second" else "direct",
                         "split": "val", "accuracy": acc, "mean_logit_diff": ld, "accuracy_drop": acc0 - acc,
                         "logit_diff_drop": ld0 - ld})
        if total is not None:
            t = total[(total.layer == l) & (total.kind == "mean")].iloc[0]
            rows.append({"layer": l, "ablation": "total (forward pass, training split)", "split": "train",
                         "accuracy": t.accuracy,
                         "mean_logit_diff": t.mean_logit_diff, "accuracy_drop": t.accuracy_drop,
                         "logit_diff_drop": t.logit_diff_drop})
    df = pd.DataFrame(rows)
    df.attrs["clean_accuracy"], df.attrs["clean_logit_diff"] = acc0, ld0
    return df


def second_order_outcomes(model: Any, train: dict[str, torch.Tensor], split: dict[str, torch.Tensor],
                          gold: torch.Tensor) -> dict[str, np.ndarray]:
    """Per problem of ``split`` (layer sums of :func:`collect`): ``clean [N]`` correctness and
    ``ablated [N, L]``: correctness with each layer's summed second-order effect replaced by its
    TRAINING mean (the edit of :func:`output_space_ablation`, kept per problem)."""
    ok0, _ = answer_metrics(final_logits(model, split["resid"]), gold)
    abl = []
    for l in range(model.cfg.n_layers):
        ok, _ = answer_metrics(final_logits(model, split["resid"] - split["second"][:, l]
                                            + train["second"][:, l].mean(0)), gold)
        abl.append(ok.numpy())
    return {"clean": ok0.numpy(), "ablated": np.stack(abl, 1)}


def layer_concentration(second_abs_by_layer: np.ndarray, ablation: pd.DataFrame,
                        critical: Sequence[int]) -> pd.DataFrame:
    """Share of the total second-order magnitude (``[L]``: summed |projected effect|) and of
    the second-order ablation accuracy drop (negative drops count as zero) per layer."""
    mag = second_abs_by_layer / second_abs_by_layer.sum()
    drops = ablation[ablation.ablation == "second_order"].sort_values("layer").accuracy_drop.clip(lower=0).values
    drop_share = drops / drops.sum() if drops.sum() > 0 else np.full_like(drops, np.nan)
    df = pd.DataFrame({"layer": range(len(mag)), "magnitude_share": mag, "ablation_drop_share": drop_share})
    df["critical"] = df.layer.isin(list(critical))
    return df


def projection_edit(centred: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """``[N, d]``: the residual edit that replaces each neuron's centred effect ``[N, n, d]`` by
    its projection on the neuron's direction ``dirs [n, d]`` (normalised here), summed over neurons."""
    u = dirs / np.maximum(np.linalg.norm(dirs, axis=-1, keepdims=True), 1e-12)
    proj = np.einsum("Nn,nd->Nnd", np.einsum("Nnd,nd->Nn", centred, u), u)
    return (proj - centred).sum(1)


def neuron_structure(vec_train: dict[int, np.ndarray], vec_val: dict[int, np.ndarray],
                     share: float = 0.02) -> dict[str, Any]:
    """Significance, sparsity and rank-1 structure of selected neurons' full effect vectors.

    ``vec_*[l]``: ``[problems, n_selected, d_model]``. Returns per-neuron ``stats``
    (DataFrame); per layer ``pc1 [n, d]``, ``significant [N_val, n]``, ``centred_val
    [N_val, n, d]`` (validation effects minus the training mean); and ``edits``: residual edits
    ``[N_val, d_model]`` summed over the layer's selected neurons, for mean replacement, rank-1
    replacement (mean + PC1 projection), ablating only significant and only insignificant effects.
    """
    stats, edits, pcs, sigs, cvals = [], {}, {}, {}, {}
    for l in vec_train:
        # torch, in place: one float32 copy of the training effects (they are float16 memory maps)
        ctr = torch.from_numpy(np.array(vec_train[l], dtype=np.float32))  # a copy: centred in place below
        mean = ctr.mean(0)  # [n, d]
        ctr -= mean
        cva_t = torch.from_numpy(np.asarray(vec_val[l], dtype=np.float32)) - mean
        ntr = torch.linalg.vector_norm(ctr, dim=-1).numpy()  # [N, n]
        nva = torch.linalg.vector_norm(cva_t, dim=-1).numpy()
        cva = cva_t.numpy()
        thr = significance(ntr, share)
        sig = nva > thr  # [N_val, n]
        k = max(2, int(round(share * ctr.shape[0])))
        per = ctr.transpose(0, 1)  # [n, N, d] (a view; pc1_batch copies one chunk of neurons at a time)
        pc, var_all = pc1_batch(per)
        top = torch.from_numpy(np.argsort(-ntr, axis=0)[:k].T.copy())  # [n, k]: each neuron's k largest training norms
        _, var_top = pc1_batch(torch.gather(per, 1, top[:, :, None].expand(-1, -1, per.shape[2])))
        del per, ctr
        for j in range(cva.shape[1]):
            stats.append({"layer": l, "slot": j, "significant_share_val": float(sig[:, j].mean()),
                          "threshold": float(thr[j]), "pc1_var_all": float(var_all[j]),
                          "pc1_var_topk": float(var_top[j]), "mean_norm_val": float(nva[:, j].mean())})
        pcs[l], sigs[l], cvals[l] = pc, sig, cva
        edits[l] = {"mean": -cva.sum(1), "rank1": projection_edit(cva, pc),
                    "ablate_significant": -(cva * sig[..., None]).sum(1),
                    "ablate_insignificant": -(cva * ~sig[..., None]).sum(1)}
    return {"stats": pd.DataFrame(stats), "edits": edits, "pc1": pcs, "significant": sigs, "centred_val": cvals}


def replacement_accuracy(model: Any, resid_val: torch.Tensor, gold_val: torch.Tensor,
                         edits: dict[int, dict[str, np.ndarray]]) -> pd.DataFrame:
    """Validation accuracy with each kind of edit applied to all selected neurons at once
    (all critical layers together) and per layer."""
    acc0, ld0 = _eval(model, resid_val, gold_val)
    rows = [{"scope": "none", "replacement": "clean", "accuracy": acc0, "mean_logit_diff": ld0}]
    kinds = next(iter(edits.values())).keys() if edits else []
    for kind in kinds:
        for scope, ls in [("all selected", list(edits))] + [(f"layer {l}", [l]) for l in edits]:
            delta = sum(torch.as_tensor(edits[l][kind]) for l in ls)
            acc, ld = _eval(model, resid_val + delta, gold_val)
            rows.append({"scope": scope, "replacement": kind, "accuracy": acc, "mean_logit_diff": ld})
    df = pd.DataFrame(rows)
    df["accuracy_drop_points"] = 100 * (acc0 - df.accuracy)
    return df


#: version of :func:`neuron_structure`'s algorithm, part of the keys of the steps built on it
#: (2: all principal components at once, :func:`pc1_batch`; 3: torch, in place: the same values
#: to float rounding)
STRUCTURE_VERSION = 3

#: version of :func:`effect_budget`'s algorithm, part of its step key (3: batches by length, the
#: ablated passes stacked and started after the neuron's own layer; 4: the prediction is one
#: projection of ``p - mean`` on the selected neurons, with the run's own norm scales; 5: logits of
#: the gold and alternative tokens only, not the whole vocabulary: the same values to float rounding)
EFFECT_BUDGET_VERSION = 5
#: 2: the random rank-1 control drawn through a Cholesky factor (same distribution, other draws);
#: 3: two full edits per batch, the other four by linearity, all read in one product (same
#: numbers to float rounding), and the critical layers' refits (``clip_refits``); 4: the refits'
#: energies centred on a reference mean (no float32 cancellation where the mean is large)
PROTOCOL_VERSION = 4

#: refits of the critical layers' training fit (mean, threshold, PC1, controls) on bootstrap
#: resamples of the training problems, for the CLIP sparsity and rank-1 rows' intervals
#: (replicate ``b`` reads refit ``b mod PROTOCOL_REFITS``; as STRUCTURE_REFITS for PC1 structure)
PROTOCOL_REFITS = 20
#: training refits behind the PC1-structure rows' intervals (phase3_rows.structure_refits): each
#: bootstrap replicate resamples the validation problems and uses one of these refits of the
#: training fits (mean, top-k, PC1 and controls), so the interval carries both sources of variability
STRUCTURE_REFITS = 20


@torch.no_grad()
def effect_budget(model: Any, enc_val: Encoded, labels_val: pd.DataFrame, engine: SecondOrderEngine,
                  neurons: dict[int, list[int]], mean_act: torch.Tensor, batch_size: int = 256,
                  progress: bool = True) -> pd.DataFrame:
    """Per selected neuron: the total effect of a real forward-pass mean-ablation (activation
    replaced by its training mean ``mean_act [L, d_mlp]`` at every position) on the logit
    difference (gold minus the clean run's alternative token), against the change predicted by
    its direct + second-order effects (both linear in the activation, so the predicted change is
    effect(p) - effect(mean)).

    Returns per neuron ``total`` and ``predicted`` (mean |change|, logit units), ``r2`` (share of
    the total change explained around zero: ``1 - sum (total - pred)^2 / sum total^2``) and the
    same for the direct effect alone.

    The problems are batched by length (``batch_size // 4`` per batch, little padding), each
    cut after its answer position; the ablated passes (:func:`so2lib.engine.partial.run_edits`)
    start from the clean residual after the neuron's layer (plus the ablation's change of that
    layer's MLP output, where it writes linearly), several neurons stacked per pass of at most
    ``batch_size`` x the longest prompt rows x positions, logits at T only.
    """
    dev = engine.device
    gold = torch.tensor(labels_val.gold_token.values)
    alt = torch.tensor(labels_val.alt_token.values)
    L = model.cfg.n_layers
    pairs = [(l, n) for l, ns in neurons.items() for n in ns]
    edits = [PA.set_edit(l, [n], mean_act[l, n:n + 1]) for l, n in pairs]
    Tall = enc_val.answer_pos
    order = np.argsort(Tall.numpy(), kind="stable")
    budget = batch_size * (int(Tall.max()) + 1 if len(Tall) else 1)
    rows_per = max(1, batch_size // 4)
    total: dict[tuple[int, int], list[torch.Tensor]] = {p: [] for p in pairs}
    pred: dict[tuple[int, int], list[torch.Tensor]] = {p: [] for p in pairs}
    pred_direct: dict[tuple[int, int], list[torch.Tensor]] = {p: [] for p in pairs}
    starts = range(0, len(enc_val), rows_per)
    for s0 in tqdm(starts, desc="effect budget" if progress else None, disable=not progress, leave=False):
        sel = [int(i) for i in order[s0:s0 + rows_per]]
        x, T = enc_val.batch(sel, device=dev)
        g, a = gold[sel].to(dev), alt[sel].to(dev)
        ar = torch.arange(len(T), device=dev)
        x = x[:, :int(T.max()) + 1]  # stop at the last answer position (causal: nothing after it matters)
        rows = capture_batch(model, x, T, range(L))
        ga = torch.stack([g, a], -1)  # only the gold and alternative tokens' logits are read
        lc = PA.logits_at_tokens(model, rows.final_resid, ga)  # [b, 2] at T only
        clean = lc[:, 0] - lc[:, 1]
        for l, ns in neurons.items():
            idx = torch.tensor(ns, device=dev)
            # both effects are linear in the activation (patterns and norm scales frozen), so
            # effect(p) - effect(mean) is the effect of p - mean: one projection, selected neurons only
            # (the old baseline run dropped the post-attention and post-MLP norm scales: wrong on
            # sandwich-norm families, the same elsewhere)
            delta = dataclasses.replace(rows, mlp_post={l: rows.mlp_post[l] - mean_act[l].to(dev)})
            eff = engine.project(delta, T, engine.directions(g, a)[:, :1], layers=[l], neurons=idx)
            d = eff["direct"][:, 0, 0].cpu()
            s2 = eff["second"][:, 0, 0].cpu()
            for j, n in enumerate(ns):
                pred[(l, n)].append(d[:, j] + s2[:, j])
                pred_direct[(l, n)].append(d[:, j])
        del rows
        res = PA.run_edits(model, x, (ar, T), edits, budget)
        for (l, n), r in zip(pairs, res):
            lg = PA.logits_at_tokens(model, r, ga)  # at T, gold and alternative only
            total[(l, n)].append((clean - (lg[:, 0] - lg[:, 1])).cpu())
    inv = np.argsort(order, kind="stable")
    out = []
    for l, n in pairs:
        t, p, pd_ = (torch.cat(v[(l, n)]).numpy()[inv] for v in (total, pred, pred_direct))
        out.append({"layer": l, "neuron": n, "total": float(np.abs(t).mean()), "predicted": float(np.abs(p).mean()),
                    "direct_only": float(np.abs(pd_).mean()), "r2": _r2(t, p), "r2_direct_only": _r2(t, pd_)})
    return pd.DataFrame(out)


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    den = float((y ** 2).sum())
    return float("nan") if den == 0 else 1.0 - float(((y - yhat) ** 2).sum()) / den


# ----------------------------------------------------------------------------- the phase, for notebooks


def characterization_phase(setup: Setup, share: float = 0.02, budget_neurons: int | None = 20,
                           progress: bool = True, n_boot: int = 2000,
                           max_structure_neurons: int = 512) -> dict[str, Any]:
    """Phase 3: output-space ablations, the CLIP protocol for all neurons of each layer (and the
    selected ones), sparsity and rank-1 structure against their controls, layer concentration,
    effect budget and the validation table (:func:`validation_table`). Fitted on the training
    split, measured on validation. ``max_structure_neurons``: neurons per critical layer (a fixed
    random subset when there are more) whose coefficients the PC1-structure rows keep."""
    run, model, bs = setup.run, setup.model, setup.batch_size
    crit, selected = load_selection(run)
    cd = run.load("correctness_direction")
    engine = SecondOrderEngine(model, correctness_dir=cd["d"])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    rp = readout_params(model)  # names the final softcap where the model has one (keys unchanged otherwise)
    sums = {s: run.step(f"layer_sums_{s}", lambda s=s: collect(model, setup.enc[s], engine, bs, progress), "03",
                        deps=["correctness_direction", f"labels_{s}"]) for s in ("train", "val")}
    gold_val = torch.tensor(setup.labels["val"].gold_token.values)
    abl = run.step("output_space_ablation", lambda: output_space_ablation(
        model, sums["train"], sums["val"], gold_val, run.load("layer_ablation")), "03", params=rp,
        deps=["layer_sums_train", "layer_sums_val", "layer_ablation"])
    mags = np.abs(load_effects(run, "val", "second_ld")).sum((0, 2))
    conc = run.step("layer_concentration", lambda: layer_concentration(mags, abl, crit), "03",
                    deps=["val_second_ld", "output_space_ablation", "selection"])
    vt = {l: load_effects(run, "train", f"vectors_L{l}") for l in crit}
    vv = {l: load_effects(run, "val", f"vectors_L{l}") for l in crit}
    vec_deps = [f"{s}_vectors_L{l}" for s in ("train", "val") for l in crit]
    cache: dict[str, Any] = {}

    def struct() -> dict[str, Any]:
        if "s" not in cache:
            cache["s"] = neuron_structure(vt, vv, share)
        return cache["s"]
    stats = run.step("neuron_structure", lambda: struct()["stats"].assign(
        neuron=[selected[l][j] for l, j in zip(struct()["stats"].layer, struct()["stats"].slot)]), "03",
        params={"share": share, "version": STRUCTURE_VERSION}, deps=vec_deps + ["selection"])
    run.step("neuron_directions", lambda: {
        "pc1": {str(l): torch.from_numpy(v) for l, v in struct()["pc1"].items()},
        "significant": {str(l): torch.from_numpy(v) for l, v in struct()["significant"].items()}}, "03",
        params={"share": share, "version": STRUCTURE_VERSION}, deps=vec_deps)
    repl = run.step("replacement_accuracy", lambda: replacement_accuracy(
        model, sums["val"]["resid"], gold_val, struct()["edits"]), "03",
        params={"share": share, "version": STRUCTURE_VERSION, **rp}, deps=vec_deps + ["layer_sums_val"])
    mean_act = run.step("mean_activations", lambda: _mean_activations(setup, progress), "03", deps=["problems"])
    budget_sel = {l: ns[:budget_neurons] for l, ns in selected.items()} if budget_neurons else selected
    budget = run.step("effect_budget", lambda: effect_budget(
        model, setup.enc["val"], setup.labels["val"], engine, budget_sel, mean_act, max(bs, 256), progress), "03",
        params={"budget_neurons": budget_neurons, "version": EFFECT_BUDGET_VERSION}, deps=["mean_activations", "selection", "labels_val"])

    # the CLIP protocol, every layer with later heads: all neurons, and the selected ones
    layers = list(range(L - 1))
    done: dict[str, Any] = {}

    seed = setup.run.config.get("seed", 0)
    d_mlp = model.cfg.d_mlp
    gen = np.random.default_rng(seed)
    keep = {l: torch.as_tensor(np.sort(gen.choice(d_mlp, max_structure_neurons, replace=False))
                               if d_mlp > max_structure_neurons else np.arange(d_mlp)) for l in crit if l < L - 1}

    def protocol() -> dict[str, Any]:  # one grouped pass computes the artifacts below
        if not done:
            scopes = {l: {"all": None, **({"selected": torch.tensor(selected[l])} if l in selected else {})}
                      for l in layers}
            per, st = P.run_protocol(model, setup.enc["train"], setup.enc["val"], gold_val, layers, scopes,
                                     share, bs, seed=seed, progress=progress, keep=keep,
                                     refit={l: PROTOCOL_REFITS for l in keep})
            done["refits"] = pd.concat([pd.DataFrame({"layer": l, "refit": r, "problem": np.arange(len(pp["mean_correct"])),
                                                      **{k: v for k, v in pp.items() if k.endswith("_correct")}})
                                        for l in keep for r, pp in enumerate(st[l].pop("refits"))], ignore_index=True) \
                if keep else pd.DataFrame(columns=["layer", "refit", "problem"])
            done["per_problem"] = pd.concat([pd.DataFrame({"layer": l, "neurons": scope, "problem": np.arange(
                len(pp["clean_correct"])), **{k: v for k, v in pp.items()}}) for (l, scope), pp in per.items()],
                ignore_index=True)
            done["fits"] = {str(l): st[l].pop("fit") for l in keep}
            arrays = {l: R.structure_arrays(st[l].pop("structure"), share, seed, STRUCTURE_REFITS) for l in keep}
            srows = []
            for l, a in arrays.items():
                srows += [dict(r, layer=str(l)) for r in R.structure_rows([a], f"layer {l}", seed=seed)]
            if len(arrays) > 1:
                srows += [dict(r, layer="critical") for r in R.structure_rows(
                    list(arrays.values()), "critical layers", seed=seed)]
            done["structure"] = pd.DataFrame(srows)
            frames = []
            for (l, scope), pp in per.items():
                f = P.protocol_table(pp, l, scope, n_boot)
                f["pc1_share_topk_mean"] = float(st[l]["pc1_share"].mean())
                f["pc1_share_shuffled_mean"] = float(st[l]["pc1_share_shuffled"].mean())
                f["K"], f["n_fit"] = int(st[l]["K"]), int(st[l]["n_fit"])
                frames.append(f)
            done["clip"] = pd.concat(frames, ignore_index=True)
            done["pc1"] = pd.concat([pd.DataFrame({
                "layer": l, "neuron": np.arange(len(st[l]["pc1_share"])), "pc1_share_topk": st[l]["pc1_share"],
                "pc1_share_shuffled": st[l]["pc1_share_shuffled"], "K": st[l]["K"]}) for l in layers],
                ignore_index=True)
        return done
    clip = run.step("clip_protocol", lambda: protocol()["clip"], "03",
                    params={"share": share, "n_boot": n_boot, "version": PROTOCOL_VERSION, **rp}, deps=["labels_train", "labels_val", "selection"])
    pc1 = run.step("pc1_by_neuron", lambda: protocol()["pc1"], "03", params={"share": share}, deps=["labels_train"])
    per_problem = run.step("clip_per_problem", lambda: protocol()["per_problem"], "03",
                           params={"share": share, "version": PROTOCOL_VERSION, **rp}, deps=["labels_train", "labels_val", "selection"])
    refits = run.step("clip_refits", lambda: protocol()["refits"], "03",
                      params={"share": share, "version": PROTOCOL_VERSION, "n_refit": PROTOCOL_REFITS, **rp},
                      deps=["labels_train", "labels_val", "selection"])
    structure = run.step("pc1_structure", lambda: protocol()["structure"], "03",
                         params={"share": share, "max_structure_neurons": max_structure_neurons, "rows": 3,
                                 "n_refit": STRUCTURE_REFITS, **rp},
                         deps=["labels_train", "labels_val", "selection"])
    run.step("clip_fits", lambda: protocol()["fits"], "03", params={"share": share, "version": PROTOCOL_VERSION},
             deps=["labels_train", "selection"])  # every neuron's PC1 and mean of the critical layers (for 04)
    gold_train = torch.tensor(setup.labels["train"].gold_token.values)
    outcomes = {"train": second_order_outcomes(model, sums["train"], sums["train"], gold_train),
                "val": second_order_outcomes(model, sums["train"], sums["val"], gold_val)}
    sparsity = run.step("clip_sparsity", lambda: clip_sparsity_table(per_problem, crit, L, n_boot, seed, refits), "03",
                        params={"n_boot": n_boot, "n_refit": PROTOCOL_REFITS}, deps=["clip_per_problem", "clip_refits",
                                                                                   "selection"])
    table = run.step("validation_table", lambda: validation_table(
        per_problem, structure, outcomes, vt, vv, crit, L, H, share, n_boot, seed, refits), "03",
        params={"share": share, "n_boot": n_boot, "n_refit": PROTOCOL_REFITS, "rows": ROWS_VERSION, **rp},
        deps=["clip_per_problem", "clip_refits", "pc1_structure", "layer_sums_train", "layer_sums_val",
              "selection"] + vec_deps)
    return {"ablation": abl, "concentration": conc, "stats": stats, "replacement": repl, "budget": budget,
            "clip_protocol": clip, "pc1": pc1, "clip_sparsity": sparsity, "pc1_structure": structure,
            "validation": table, "critical_layers": crit}


def _per(per_problem: pd.DataFrame, layer: int, scope: str = "all") -> dict[str, np.ndarray]:
    f = per_problem[(per_problem.layer == layer) & (per_problem.neurons == scope)].sort_values("problem")
    return {c: f[c].to_numpy() for c in f.columns if c not in ("layer", "neurons", "problem")}


def _refits(refits: pd.DataFrame | None, layer: int) -> list[dict[str, np.ndarray]]:
    """The per-problem readouts of each refit of ``layer``'s training fit (``clip_refits``), in
    refit order; empty where the layer has none."""
    if refits is None or not len(refits):
        return []
    f = refits[refits.layer == layer]
    return [{c: g.sort_values("problem")[c].to_numpy() for c in g.columns if c not in ("layer", "refit", "problem")}
            for _, g in f.groupby("refit", sort=True)]


#: the pre-registered primary rows of phase 3 (docs/measurements.md), Holm-corrected together
PRIMARY = ("critical layers: drop(ablate significant) / drop(mean)",
           "critical layers: drop(ablate insignificant) / drop(mean)",
           "critical layers: rank-1 recovered share, PC1 minus random direction in span")


def clip_sparsity_table(per_problem: pd.DataFrame, crit: Sequence[int], L: int, n_boot: int = 2000,
                        seed: int = 0, refits: pd.DataFrame | None = None) -> pd.DataFrame:
    """CLIP's sparsity rows (:func:`phase3_rows.clip_sparsity_rows`) for every layer with later heads,
    all neurons, and pooled over the critical layers (column ``layer``). Layers with ``refits``
    (the critical ones, ``clip_refits``) have intervals that refit the training fit; the others
    hold it fixed (descriptive rows, not in the verdict table)."""
    rows = []
    for l in range(L - 1):
        if ((per_problem.layer == l) & (per_problem.neurons == "all")).any():
            rows += [dict(r, layer=str(l)) for r in R.clip_sparsity_rows(
                [_per(per_problem, l)], f"layer {l}", n_boot, seed, refits=[_refits(refits, l)])]
    cl = [l for l in crit if l < L - 1]
    if cl:
        rows += [dict(r, layer="critical") for r in R.clip_sparsity_rows(
            [_per(per_problem, l) for l in cl], "critical layers", n_boot, seed, primary=True,
            refits=[_refits(refits, l) for l in cl])]
    return pd.DataFrame(rows)


def validation_table(per_problem: pd.DataFrame, structure: pd.DataFrame, outcomes: dict[str, dict[str, np.ndarray]],
                     vt: dict, vv: dict, crit: Sequence[int], L: int, H: int, share: float = 0.02,
                     n_boot: int = 2000, seed: int = 0, refits: pd.DataFrame | None = None) -> pd.DataFrame:
    """Phase 3's verdict table (:func:`stats.verdict_table`, columns ``stats.TABLE_COLUMNS``):
    CLIP's sparsity rows and rank-1 beyond its controls for the critical layers (each, and pooled:
    the primary rows :data:`PRIMARY`), the PC1-structure rows pooled over the critical layers, the
    energy share as a description, and layer concentration of the second-order ablation drop.
    Every interval resamples validation problems; the CLIP sparsity, rank-1 and PC1-structure
    rows' intervals also refit the training fits (``refits``: the ``clip_refits`` artifact)."""
    cl = [l for l in crit if l < L - 1]
    sp = clip_sparsity_table(per_problem, crit, L, n_boot, seed, refits)
    rows = [r for r in sp.to_dict("records") if r["layer"] in [str(l) for l in cl] + ["critical"]]
    for l in cl:
        rows += R.rank1_rows([_per(per_problem, l)], f"layer {l}", n_boot, seed, margin=0.05,
                             refits=[_refits(refits, l)])
    if cl:
        rows += R.rank1_rows([_per(per_problem, l) for l in cl], "critical layers", n_boot, seed,
                             primary=("random",), margin=0.05, refits=[_refits(refits, l) for l in cl])
    if len(structure):
        pooled = "critical" if (structure.layer == "critical").any() else None
        st = structure[structure.layer == (pooled or structure.layer.iloc[0])]
        rows += st.to_dict("records")
    rows.append(R.energy_share_row(vt, vv, share, 1000, seed))
    conc, _ = R.concentration_row(outcomes["train"], outcomes["val"], L, H, len(crit), n_boot, seed)
    rows.append(conc)
    df = verdict_table(rows)
    missing = [m for m in PRIMARY if m not in set(df.measure)]
    if missing:  # a primary row is always present (not testable when it cannot be computed)
        df = verdict_table(rows + [not_measurable(m, "pre-registered primary row", "no critical layer with later "
                                                  "heads", 0.0, resampled=R.PROBLEMS, primary=True)
                                   for m in missing])
    return df


def _mean_activations(setup: Setup, progress: bool = True) -> torch.Tensor:
    """``[L, d_mlp]`` mean MLP post-activation over every real position of the training split."""
    names = [M.mlp_post(l) for l in range(setup.model.cfg.n_layers)]
    return position_means(setup.model, setup.enc["train"], names, setup.batch_size, progress).cpu()
