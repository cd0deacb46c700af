"""Phase 3: characterization of second-order effects, measured on held-out problems.

Every replacement is an edit of the residual stream at the answer position ``T`` before the
final norm; the model's own final norm (recomputed on the edited residual) and unembedding
then produce the answer, exactly as a forward pass with that edit would
(:func:`final_logits`, tested against a hooked forward pass).

Means, significance thresholds and principal components come from the training split;
accuracies are measured on the validation split.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from .progress import tqdm

from . import models as M
from .capture import AnswerRows, capture_batch, position_means
from .labels import Encoded
from .second_order import SecondOrderEngine
from .effects import load_effects
from .selection import load_selection
from . import protocol as P
from .stats import bootstrap_ci as _boot, min_detectable_change, top_share, top_share_null, validation_row
from . import partial as PA
from .study import Setup

# ----------------------------------------------------------------------------- pure functions


def final_logits(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, V]`` from residuals ``[b, d_model]`` at T: the model's final norm (centering
    for LayerNorm, scale recomputed with its epsilon; folded weights) then ``W_U`` and ``b_U``."""
    x = resid.float()
    if M.ModelInfo.of(model).norm == "LN":
        x = x - x.mean(-1, keepdim=True)
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.eps)
    W_U = model.W_U.detach().float().to(x.device)
    return x @ W_U + M.unembed_bias(model).detach().float().to(x.device)


def answer_metrics(logits: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``correct [b]`` (argmax is the gold token) and ``logit_diff [b]`` (gold minus best other)."""
    ar = torch.arange(len(gold))
    g = logits[ar, gold]
    other = logits.clone()
    other[ar, gold] = -float("inf")
    return logits.argmax(-1) == gold, g - other.max(-1).values


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
        tr = np.asarray(vec_train[l], dtype=np.float32)
        va = np.asarray(vec_val[l], dtype=np.float32)
        mean = tr.mean(0)  # [n, d]
        ctr, cva = tr - mean, va - mean
        ntr, nva = np.linalg.norm(ctr, axis=-1), np.linalg.norm(cva, axis=-1)  # [N, n]
        thr = significance(ntr, share)
        sig = nva > thr  # [N_val, n]
        k = max(2, int(round(share * tr.shape[0])))
        pc = np.zeros(mean.shape, dtype=np.float32)
        for j in range(tr.shape[1]):
            pc[j], var_all = pc1(ctr[:, j])
            _, var_top = pc1(ctr[np.argsort(-ntr[:, j])[:k], j])
            stats.append({"layer": l, "slot": j, "significant_share_val": float(sig[:, j].mean()),
                          "threshold": float(thr[j]), "pc1_var_all": var_all, "pc1_var_topk": var_top,
                          "mean_norm_val": float(nva[:, j].mean())})
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
    """
    dev = engine.device
    gold = torch.tensor(labels_val.gold_token.values)
    alt = torch.tensor(labels_val.alt_token.values)
    L = model.cfg.n_layers
    pairs = [(l, n) for l, ns in neurons.items() for n in ns]
    total: dict[tuple[int, int], list[torch.Tensor]] = {p: [] for p in pairs}
    pred: dict[tuple[int, int], list[torch.Tensor]] = {p: [] for p in pairs}
    pred_direct: dict[tuple[int, int], list[torch.Tensor]] = {p: [] for p in pairs}
    for rows_idx, x, T in enc_val.batches(batch_size, device=dev, desc="effect budget" if progress else None):
        g, a = gold[rows_idx.start:rows_idx.stop].to(dev), alt[rows_idx.start:rows_idx.stop].to(dev)
        ar = torch.arange(len(T), device=dev)
        x = x[:, :int(T.max()) + 1]  # stop at the last answer position (causal: nothing after it matters)
        rows = capture_batch(model, x, T, range(L))
        lc = PA.logits_at(model, rows.final_resid)  # [b, V] at T only
        clean = lc[ar, g] - lc[ar, a]
        for l, ns in neurons.items():
            idx = torch.tensor(ns, device=dev)
            const = AnswerRows({**rows.mlp_post, l: mean_act[l].to(dev).expand_as(rows.mlp_post[l]).clone()},
                               rows.pattern, rows.scale, rows.final_scale, rows.final_resid, None)
            real = engine.projected(rows, T, g, a, layers=[l])
            base = engine.projected(const, T, g, a, layers=[l])
            d = (real["direct"] - base["direct"])[:, 0, 0, idx].cpu()
            s2 = (real["second"] - base["second"])[:, 0, 0, idx].cpu()
            for j, n in enumerate(ns):
                pred[(l, n)].append(d[:, j] + s2[:, j])
                pred_direct[(l, n)].append(d[:, j])
        pre = PA.resid_pre(model, x, sorted(neurons))  # each ablated pass starts at its neuron's layer
        for l, n in tqdm(pairs, desc="neuron ablations", leave=False, disable=not progress):
            def hook(t: torch.Tensor, hook: Any, n: int = n, l: int = l) -> torch.Tensor:
                t = t.clone()
                t[..., n] = mean_act[l, n]
                return t
            r = PA.run_from(model, pre[l], l, [(M.mlp_post(l), hook)])
            lg = PA.logits_at(model, r[ar, T])  # logits at T only
            total[(l, n)].append((clean - (lg[ar, g] - lg[ar, a])).cpu())
        del pre
    out = []
    for l, n in pairs:
        t, p, pd_ = (torch.cat(v[(l, n)]).numpy() for v in (total, pred, pred_direct))
        out.append({"layer": l, "neuron": n, "total": float(np.abs(t).mean()), "predicted": float(np.abs(p).mean()),
                    "direct_only": float(np.abs(pd_).mean()), "r2": _r2(t, p), "r2_direct_only": _r2(t, pd_)})
    return pd.DataFrame(out)


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    den = float((y ** 2).sum())
    return float("nan") if den == 0 else 1.0 - float(((y - yhat) ** 2).sum()) / den


# ----------------------------------------------------------------------------- the phase, for notebooks


def sparsity_check(vec_train: dict[int, np.ndarray], vec_val: dict[int, np.ndarray], heads: dict[int, int],
                   frac: float = 0.02) -> dict[str, Any]:
    """Threshold-free sparsity of the selected neurons' validation effects: the median over
    neurons of the share of centred-effect energy (squared norm about the TRAINING mean) held by
    the top ``frac`` of problems, with a CI from a bootstrap over neurons (resampling problems
    would bias a top-k share), against a dense null: the 97.5% quantile of the same share for
    Gaussian effects on every problem along one direction (energy ~ chi^2_1, the most
    concentrated dense Gaussian; a spread over more of the neuron's ``K``-dim span only lowers
    the null, so a pass means sparser than any dense Gaussian effect). ``heads`` is kept for the
    record (``null_isotropic``: the same with chi^2_K)."""
    shares, nulls, iso = [], [], []
    for l in vec_train:
        mean = np.asarray(vec_train[l], np.float32).mean(0)
        e = (np.square(np.asarray(vec_val[l], np.float32) - mean)).sum(-1)  # [N, n]
        shares.append(top_share(e, frac))
        nulls.append(np.quantile(top_share_null(e.shape[0], 1, frac), 0.975))
        iso.append(np.quantile(top_share_null(e.shape[0], heads[l], frac), 0.975))
    if not shares:
        return {"measured": float("nan"), "ci": (float("nan"),) * 2, "null": float("nan")}
    per_neuron = np.concatenate(shares)
    return {"measured": float(np.nanmedian(per_neuron)), "ci": _boot(per_neuron, np.nanmedian, 1000),
            "null": float(np.max(nulls)), "null_isotropic": float(np.max(iso))}


def characterization_phase(setup: Setup, share: float = 0.02, budget_neurons: int | None = None,
                           progress: bool = True, n_boot: int = 2000) -> dict[str, Any]:
    """Phase 3: output-space ablations, the CLIP protocol for all neurons of each layer (and the
    selected ones), sparsity and rank-1 structure against nulls, layer concentration, effect
    budget and the validation table. Fitted on the training split, measured on validation."""
    run, model, bs = setup.run, setup.model, setup.batch_size
    crit, selected = load_selection(run)
    cd = run.load("correctness_direction")
    engine = SecondOrderEngine(model, correctness_dir=cd["d"])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sums = {s: run.step(f"layer_sums_{s}", lambda s=s: collect(model, setup.enc[s], engine, bs, progress), "03",
                        deps=["correctness_direction", f"labels_{s}"]) for s in ("train", "val")}
    gold_val = torch.tensor(setup.labels["val"].gold_token.values)
    abl = run.step("output_space_ablation", lambda: output_space_ablation(
        model, sums["train"], sums["val"], gold_val, run.load("layer_ablation")), "03",
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
        params={"share": share}, deps=vec_deps + ["selection"])
    run.step("neuron_directions", lambda: {
        "pc1": {str(l): torch.from_numpy(v) for l, v in struct()["pc1"].items()},
        "significant": {str(l): torch.from_numpy(v) for l, v in struct()["significant"].items()}}, "03",
        params={"share": share}, deps=vec_deps)
    repl = run.step("replacement_accuracy", lambda: replacement_accuracy(
        model, sums["val"]["resid"], gold_val, struct()["edits"]), "03",
        params={"share": share}, deps=vec_deps + ["layer_sums_val"])
    mean_act = run.step("mean_activations", lambda: _mean_activations(setup, progress), "03", deps=["problems"])
    budget_sel = {l: ns[:budget_neurons] for l, ns in selected.items()} if budget_neurons else selected
    budget = run.step("effect_budget", lambda: effect_budget(
        model, setup.enc["val"], setup.labels["val"], engine, budget_sel, mean_act, max(bs, 256), progress), "03",
        params={"budget_neurons": budget_neurons, "version": 2}, deps=["mean_activations", "selection", "labels_val"])

    # the CLIP protocol, every layer with later heads: all neurons, and the selected ones
    layers = list(range(L - 1))
    done: dict[str, Any] = {}

    def protocol() -> dict[str, Any]:  # one grouped pass computes both artifacts below
        if not done:
            scopes = {l: {"all": None, **({"selected": torch.tensor(selected[l])} if l in selected else {})}
                      for l in layers}
            per, st = P.run_protocol(model, setup.enc["train"], setup.enc["val"], gold_val, layers, scopes,
                                     share, bs, seed=setup.run.config.get("seed", 0), progress=progress)
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
                    params={"share": share, "n_boot": n_boot}, deps=["labels_train", "labels_val", "selection"])
    pc1 = run.step("pc1_by_neuron", lambda: protocol()["pc1"], "03", params={"share": share}, deps=["labels_train"])

    table = run.step("validation_table", lambda: _validation_table(
        setup, crit, vt, vv, pc1, clip, H, L, share, mags), "03",
        params={"share": share}, deps=["clip_protocol", "pc1_by_neuron", "val_second_ld"] + vec_deps)
    return {"ablation": abl, "concentration": conc, "stats": stats, "replacement": repl, "budget": budget,
            "clip_protocol": clip, "pc1": pc1, "validation": table, "critical_layers": crit}


def _validation_table(setup: Setup, crit: Sequence[int], vt: dict, vv: dict, pc1: pd.DataFrame,
                      clip: pd.DataFrame, H: int, L: int, share: float, mags: np.ndarray) -> pd.DataFrame:
    rows = []
    n_val = len(setup.labels["val"])
    acc = float(setup.labels["val"].correct.mean())
    mdc = 100 * min_detectable_change(acc, n_val)
    heads = {l: (L - 1 - l) * H for l in crit}
    sp = sparsity_check(vt, vv, heads, share)
    rows.append(validation_row(
        "sparsity: top-2% energy share", sp["measured"], sp["ci"], sp["null"], 0.2,
        "median over selected neurons of the share of validation centred-effect energy in the top 2% of "
        "problems (training mean); CI: bootstrap over neurons; null: 97.5% quantile for a dense Gaussian "
        "effect along one direction (chi^2_1; isotropic in the K-dim span it would be "
        f"{sp.get('null_isotropic', float('nan')):.3f})",
        reason="no selected neurons"))
    crit_pc = pc1[pc1.layer.isin(list(crit))]
    if len(crit_pc):
        m = float(crit_pc.pc1_share_topk.mean())
        null = float(max((1.0 / crit_pc.K).mean(), crit_pc.pc1_share_shuffled.mean()))
        ci = _boot(crit_pc.pc1_share_topk.values, np.mean)
    else:
        m, null, ci = float("nan"), float("nan"), (float("nan"),) * 2
    rows.append(validation_row(
        "PC1 variance (top-k, all neurons of critical layers)", m, ci, null, 0.35,
        "mean over neurons of PC1's share of the top-2% centred effects (training); null: max(1/K, the "
        "same with each head's coefficients shuffled across problems); CI: bootstrap over neurons"))
    # layer concentration against the head-count null
    per_prob = np.abs(np.asarray(load_effects(setup.run, "val", "second_ld"))).sum(2)  # [N, L]
    crit_share = lambda x: float(x[:, list(crit)].sum() / x.sum()) if x.sum() > 0 else float("nan")  # noqa: E731
    Ks = np.array([(L - 1 - l) * H for l in range(L)], float)
    rows.append(validation_row(
        "critical layers' share of the effect", crit_share(per_prob), _boot(per_prob, crit_share, 300),
        float(Ks[list(crit)].sum() / Ks.sum()), 0.8,
        "share of total |second-order effect| on the logit difference (validation) in the critical layers; "
        "null: their share of later heads (head-count null); CI: bootstrap over problems",
        reason="no second-order effect at all"))
    for l in crit:
        r = clip[(clip.layer == l) & (clip.neurons == "all") & (clip.edit == "rank1")]
        mean = clip[(clip.layer == l) & (clip.neurons == "all") & (clip.edit == "mean")]
        if r.empty:
            continue
        r, mean = r.iloc[0], mean.iloc[0]
        rows.append(validation_row(
            f"layer {l}: share of mean-ablation drop recovered by rank-1 (all neurons)", float(r.recovered_share),
            (float(r.recovered_ci_low), float(r.recovered_ci_high)), 0.0, 0.8,
            f"(acc(rank-1) - acc(mean)) / (acc(clean) - acc(mean)) on validation; mean-ablation change "
            f"{mean.accuracy_change_points:.2f} points [{mean.ci_low_points:.2f}, {mean.ci_high_points:.2f}]; "
            f"a 1-point change is resolvable only with ~{mdc:.1f}-point sensitivity at n={n_val}",
            reason=str(r.recovered_note)))
    return pd.DataFrame(rows)


def _mean_activations(setup: Setup, progress: bool = True) -> torch.Tensor:
    """``[L, d_mlp]`` mean MLP post-activation over every real position of the training split."""
    names = [M.mlp_post(l) for l in range(setup.model.cfg.n_layers)]
    return position_means(setup.model, setup.enc["train"], names, setup.batch_size, progress).cpu()
