"""Phase 1 analysis: which MLP layers matter (mean-ablation) and which neurons to study.

Layer study: in a real forward pass, replace a layer's MLP output at every position by its
mean over all real (non-pad) positions of the training problems (or by zero), and measure
validation accuracy and mean logit difference. Neuron scores at the answer position T:
mean |activation|, variance across problems, and mean |direct effect| on the answer logit
difference (``p_T * w_n . (W_U[:, answer] - W_U[:, alternative]) / s_final``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from so2lib.data.labels import Encoded, answer_rows, continuation_mask, label, label_from_logits
from so2lib.engine import models as M, partial as P
from so2lib.engine.capture import answer_activations, position_means
from so2lib.phases.study import Setup, accuracy
from so2lib.runs.params import SCORES
from so2lib.runs.progress import tqdm
from so2lib.runs.rundir import Run


def mlp_out_means(model: Any, enc: Encoded, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """``[L, d_model]``: each layer's MLP output averaged over every real position <= T."""
    return position_means(model, enc, [M.mlp_out(l) for l in range(model.cfg.n_layers)], batch_size, progress)


def ablation_hook(value: torch.Tensor | None):
    """A hook that replaces an MLP output by ``value [d_model]`` (broadcast) or by zero."""
    def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(x) if value is None else value.to(x.dtype).expand_as(x).clone()
    return hook


def layer_ablation(model: Any, enc: Encoded, means: torch.Tensor, clean: pd.DataFrame,
                   batch_size: int = 64, progress: bool = True,
                   kinds: Sequence[str] = ("mean", "zero")) -> pd.DataFrame:
    """Accuracy and mean logit difference on ``enc`` (pass the training split when the result
    chooses layers) with each MLP layer mean- or zero-ablated.

    Returns one row per (layer, kind) with ``accuracy``, ``mean_logit_diff`` and the drops from
    the clean run ``clean`` (the labels of the same problems). ``kinds``: ``"mean"`` (what
    chooses the critical layers) and/or ``"zero"``; each costs one labelling pass per layer.

    The problems are batched by length (:func:`so2lib.data.labels.length_order`); one clean pass
    per batch keeps the residual after each layer's attention (``hook_resid_mid``): the layer's
    MLP output replaced by ``value`` gives ``resid_mid + value`` after the block, exactly the
    ablated pass's residual, so each ablated pass starts at the next block (both kinds stacked in
    one pass) and the last layer's ablation needs no pass at all. Models without that hook, or
    with parallel attention and MLP, start each ablated pass at the layer itself. Logits at the
    answer positions only.
    """
    from so2lib.data.labels import length_order

    unknown = set(kinds) - {"mean", "zero"}
    if "mean" not in kinds or unknown:
        raise ValueError(f"kinds must include 'mean' and be among ('mean', 'zero'), got {tuple(kinds)}")
    L = model.cfg.n_layers
    device = next(model.parameters()).device
    cont = continuation_mask(model.tokenizer).to(device)
    ks = [k for k in ("mean", "zero") if k in kinds]
    labs: dict[tuple[int, str], list[dict[str, Any]]] = {(l, k): [] for l in range(L) for k in ks}
    mid = not model.cfg.parallel_attn_mlp and all(f"blocks.{l}.hook_resid_mid" in model.hook_dict for l in range(L))
    order = length_order(enc, True)
    for s0 in tqdm(range(0, len(enc), batch_size), desc="layer ablation", disable=not progress):
        idx = [int(i) for i in order[s0:s0 + batch_size]]
        x, _ = enc.batch(idx, with_answer=True, device=device)
        rr, pp, counts = answer_rows(enc, idx)
        rr, pp = rr.to(device), pp.to(device)
        x = x[:, :int(pp.max()) + 1]  # nothing after the last position read
        b = x.shape[0]
        if mid:
            st = P.clean_states(model, x, resid_layers=range(1, L), mid_layers=range(L))
        else:
            st = {"resid": P.resid_pre(model, x, range(L))}
        for l in range(L):
            if mid:
                m = st["mid"][l]
                x_l = torch.cat([m + means[l].to(device, m.dtype) if k == "mean" else m for k in ks])
                r = x_l if l == L - 1 else P.run_from(model, x_l, l + 1)
            else:
                vals = [means[l] if k == "mean" else None for k in ks]
                hooks = [(M.mlp_out(l), _stacked_ablation(vals, b))]
                pre = st["resid"][l]
                r = P.run_from(model, pre.repeat(len(ks), *([1] * (pre.dim() - 1))), l, hooks)
            for j, k in enumerate(ks):
                logits = P.logits_at(model, r[j * b + rr, pp])  # answer positions only
                labs[(l, k)] += label_from_logits(enc, idx, logits, counts, cont)
        del st
    inv = np.argsort(order, kind="stable")
    rows = []
    for l in range(L):
        for kind in ks:
            lab = pd.DataFrame(labs[(l, kind)]).iloc[inv]
            rows.append({"layer": l, "kind": kind, "accuracy": lab.correct.mean(),
                         "mean_logit_diff": lab.logit_diff.mean(),
                         "accuracy_drop": clean.correct.mean() - lab.correct.mean(),
                         "logit_diff_drop": clean.logit_diff.mean() - lab.logit_diff.mean()})
    return pd.DataFrame(rows)


def _stacked_ablation(values: Sequence[torch.Tensor | None], b: int):
    """A ``hook_mlp_out`` hook for ``len(values)`` stacked copies of a ``b``-row batch: copy ``j``'s
    MLP output replaced by ``values[j]`` (``[d_model]``, broadcast) or by zero (``None``)."""
    def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
        parts = [torch.zeros_like(x[j * b:(j + 1) * b]) if v is None
                 else v.to(x.dtype).expand_as(x[j * b:(j + 1) * b]).clone() for j, v in enumerate(values)]
        return torch.cat(parts)
    return hook


#: version of :func:`layer_ablation`'s algorithm, part of its step key (2: partial passes from
#: the cached residual, logits at the answer positions only; 3: batches by length, each ablated
#: pass from the block after the layer, both kinds stacked)
LAYER_ABLATION_VERSION = 3


def critical_layers(ablation: pd.DataFrame, k: int = 2, exclude_last: bool = True,
                    n_layers: int | None = None) -> list[int]:
    """The ``k`` layers whose mean-ablation drops accuracy most (ties: larger logit-diff drop).

    ``exclude_last``: the last MLP layer has no later attention heads, hence no second-order
    effect, so it is left out by default.
    """
    df = ablation[ablation.kind == "mean"]
    if exclude_last:
        df = df[df.layer < (n_layers if n_layers is not None else df.layer.max() + 1) - 1]
    df = df.sort_values(["accuracy_drop", "logit_diff_drop"], ascending=False)
    return sorted(int(l) for l in df.layer.head(k))


@torch.no_grad()
def neuron_scores(model: Any, enc: Encoded, labels: pd.DataFrame, layers: Sequence[int] | None = None,
                  batch_size: int = 64, progress: bool = True) -> pd.DataFrame:
    """Scores of every neuron of ``layers`` over the problems of ``enc`` (at T).

    Columns: ``layer``, ``neuron``, ``mean_abs_act``, ``variance`` and ``direct_effect``
    (mean |direct effect| on the logit difference, logit units).
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    acts = answer_activations(model, enc, layers, batch_size, progress)
    p = acts["mlp_post_T"]  # [n, len(layers), d_mlp]
    W_U = model.W_U.detach().float().cpu()
    u = (W_U[:, torch.tensor(labels.gold_token.values)] - W_U[:, torch.tensor(labels.alt_token.values)]).T
    if M.ModelInfo.of(model).norm == "LN":
        u = u - u.mean(-1, keepdim=True)
    u = u / acts["final_scale"][:, None]  # [n, dm]
    W_out = model.W_out.detach().float().cpu()[layers]  # [len(layers), d_mlp, dm]
    direct = p * torch.einsum("lnd,bd->bln", W_out, u)  # [n, len(layers), d_mlp]
    frames = []
    for j, l in enumerate(layers):
        frames.append(pd.DataFrame({
            "layer": l, "neuron": range(p.shape[-1]),
            "mean_abs_act": p[:, j].abs().mean(0).numpy(),
            "variance": p[:, j].var(0).numpy(),
            "direct_effect": direct[:, j].abs().mean(0).numpy(),
        }))
    return pd.concat(frames, ignore_index=True)




def select_neurons(scores: pd.DataFrame, layers: Sequence[int], top_n: int = 100,
                   by: str = "combined") -> dict[int, list[int]]:
    """Top ``top_n`` neurons per layer by one score, or by ``"combined"``: the mean of the
    three scores' within-layer ranks (each score equally weighted). Returns ``{layer: [neurons]}``."""
    if by not in SCORES + ("combined",):
        raise ValueError(f"unknown score {by!r}; use one of {SCORES + ('combined',)}")
    out = {}
    for l in layers:
        df = scores[scores.layer == l]
        if df.empty:
            raise ValueError(f"no scores for layer {l}; score that layer first")
        key = (sum(df[s].rank(ascending=False) for s in SCORES) / len(SCORES)) if by == "combined" \
            else df[by].rank(ascending=False)
        out[int(l)] = sorted(int(n) for n in df.neuron.values[key.values.argsort(kind="stable")[:top_n]])
    return out


# ----------------------------------------------------------------------------- the phase, for notebooks


def setup_and_selection(setup: Setup, top_k_layers: int = 2, top_n_neurons: int = 100,
                        select_by: str = "combined", progress: bool = True,
                        zero_ablation: bool = True) -> dict[str, Any]:
    """Phase 1 analysis: layer ablation study, critical layers, neuron scores and selection.
    ``zero_ablation=False`` skips the zero-ablation half of the layer study (the critical layers
    come from mean-ablation either way): half the cost on deep models."""
    run, model, bs = setup.run, setup.model, setup.batch_size
    acc = run.step("accuracy", lambda: accuracy(setup), "01", deps=["labels_train", "labels_val"])
    means = run.step("mlp_out_means", lambda: mlp_out_means(model, setup.enc["train"], bs, progress), "01",
                     deps=["problems"])
    # critical layers are chosen on the training split (no leakage into the validation claims)
    kinds = ("mean", "zero") if zero_ablation else ("mean",)
    ablation = run.step("layer_ablation", lambda: layer_ablation(
        model, setup.enc["train"], means, setup.labels["train"], bs, progress, kinds), "01",
        params={"split": "train", "kinds": list(kinds), "version": LAYER_ABLATION_VERSION}, deps=["mlp_out_means", "labels_train"])
    crit = critical_layers(ablation, top_k_layers, n_layers=model.cfg.n_layers)
    scores = run.step("neuron_scores", lambda: neuron_scores(
        model, setup.enc["train"], setup.labels["train"], None, bs, progress), "01", deps=["labels_train"])
    selected = select_neurons(scores, crit, top_n_neurons, select_by)
    run.step("selection", lambda: {"critical_layers": crit, "neurons": {str(k): v for k, v in selected.items()},
                                   "top_n": top_n_neurons, "by": select_by}, "01",
             params={"top_k_layers": top_k_layers, "top_n_neurons": top_n_neurons, "select_by": select_by},
             deps=["layer_ablation", "neuron_scores"])
    return {"accuracy": acc, "ablation": ablation, "critical_layers": crit, "scores": scores,
            "selected": selected}


def load_selection(run: Run) -> tuple[list[int], dict[int, list[int]]]:
    s = run.load("selection")
    return s["critical_layers"], {int(k): v for k, v in s["neurons"].items()}
