"""Phase 1 ablation and scoring against a direct computation on the Hugging Face model."""

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from so2lib.data.labels import encode, label
from so2lib.phases.selection import (critical_layers, layer_ablation, mlp_out_means, neuron_scores,
                              select_neurons)
from so2lib.data.tasks import make_problem_set


@pytest.fixture(scope="module")
def setting(tiny_dirs, tiny_models):
    model = tiny_models["gpt2"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]).eval()
    probs = make_problem_set(48, 24, seed=7)
    enc_tr, enc_va = encode(model, probs.train), encode(model, probs.val)
    return model, hf, enc_tr, enc_va


def hf_rows(hf, enc, hooks=()):
    """HF forward on each problem alone (no padding): logits, resid before ln_f and MLP acts at T."""
    out = []
    for i in range(len(enc)):
        x = torch.tensor([enc.prompt_ids[i]])
        store = {}
        hs = [hf.transformer.ln_f.register_forward_pre_hook(lambda m, a: store.__setitem__("resid", a[0]))]
        for l, blk in enumerate(hf.transformer.h):
            hs.append(blk.mlp.act.register_forward_hook(
                lambda m, a, o, l=l: store.__setitem__(("act", l), o)))
            hs.append(blk.mlp.register_forward_hook(lambda m, a, o, l=l: store.__setitem__(("mlp", l), o)))
        hs += [hf.transformer.h[l].mlp.register_forward_hook(fn) for l, fn in hooks]
        with torch.no_grad():
            logits = hf(x).logits[0, -1]
        for h in hs:
            h.remove()
        out.append((logits, store))
    return out


def test_mlp_means_and_ablation_match_hf(setting):
    model, hf, enc_tr, enc_va = setting
    means = mlp_out_means(model, enc_tr, batch_size=5, progress=False)
    # direct: HF MLP outputs over every real position, centred (LayerNorm ignores the mean)
    rows = hf_rows(hf, enc_tr)
    for l in range(model.cfg.n_layers):
        allpos = torch.cat([st[("mlp", l)][0] for _, st in rows])
        hf_mean = allpos.mean(0)
        torch.testing.assert_close(means[l], hf_mean - hf_mean.mean(), atol=1e-5, rtol=1e-4)
    clean = label(model, enc_va, progress=False)
    abl = layer_ablation(model, enc_va, means, clean, batch_size=5, progress=False)
    for l in (0, 2):
        hf_mean = torch.cat([st[("mlp", l)][0] for _, st in rows]).mean(0)
        for kind, val in (("mean", hf_mean), ("zero", torch.zeros_like(hf_mean))):
            res = hf_rows(hf, enc_va, hooks=[(l, lambda m, a, o, v=val: v.expand_as(o))])
            gold = clean.gold_token.values
            correct, ld = [], []
            for i, (lg, _) in enumerate(res):
                correct.append(int(lg.argmax()) == gold[i])
                wrong = lg.clone()
                wrong[gold[i]] = -float("inf")
                ld.append(float(lg[gold[i]] - wrong.max()))
            row = abl[(abl.layer == l) & (abl.kind == kind)].iloc[0]
            assert row.accuracy == pytest.approx(np.mean(correct))
            assert row.mean_logit_diff == pytest.approx(np.mean(ld), abs=1e-4)
            assert row.accuracy_drop == pytest.approx(clean.correct.mean() - np.mean(correct))


def test_neuron_scores_match_hf(setting):
    model, hf, enc_tr, _ = setting
    lab = label(model, enc_tr, progress=False)
    scores = neuron_scores(model, enc_tr, lab, batch_size=6, progress=False)
    rows = hf_rows(hf, enc_tr)
    E = hf.lm_head.weight.detach()  # [V, d]
    g = hf.transformer.ln_f.weight.detach()
    eps = hf.config.layer_norm_epsilon
    for l in (0, 3):
        acts = torch.stack([st[("act", l)][0, -1] for _, st in rows])  # [n, d_mlp]
        W = hf.transformer.h[l].mlp.c_proj.weight.detach()  # [d_mlp, d] (Conv1D)
        Wc = W - W.mean(1, keepdim=True)
        direct = []
        for i, (_, st) in enumerate(rows):
            x = st["resid"][0, -1]
            s = torch.sqrt(x.var(unbiased=False) + eps)
            u = g * (E[lab.gold_token[i]] - E[lab.alt_token[i]])
            direct.append(acts[i] * (Wc @ u) / s)
        direct = torch.stack(direct)
        df = scores[scores.layer == l].sort_values("neuron")
        np.testing.assert_allclose(df.mean_abs_act, acts.abs().mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(df.variance, acts.var(0), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(df.direct_effect, direct.abs().mean(0), rtol=1e-3, atol=1e-6)


def test_selection_and_critical_layers():
    import pandas as pd
    abl = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2, 3, 3], "kind": ["mean", "zero"] * 4,
                        "accuracy_drop": [0.1, 0.5, 0.3, 0.2, 0.05, 0.9, 0.6, 0.7],
                        "logit_diff_drop": [1, 1, 1, 1, 1, 1, 1, 1]})
    assert critical_layers(abl, 2, n_layers=4) == [0, 1]  # layer 3 excluded (no later heads)
    assert critical_layers(abl, 2, exclude_last=False, n_layers=4) == [1, 3]
    sc = pd.DataFrame({"layer": 0, "neuron": range(5), "mean_abs_act": [5, 4, 3, 2, 1],
                       "variance": [1, 2, 3, 4, 5], "direct_effect": [5, 1, 4, 2, 3]})
    assert select_neurons(sc, [0], 2, "mean_abs_act") == {0: [0, 1]}
    assert select_neurons(sc, [0], 2, "variance") == {0: [3, 4]}
    assert select_neurons(sc, [0], 1, "combined") == {0: [0]}  # ranks 1,5,1 -> best mean
    with pytest.raises(ValueError, match="unknown score"):
        select_neurons(sc, [0], 2, "magic")


def test_mean_only_layer_ablation_is_the_mean_half(setting):
    model, _, enc_tr, enc_va = setting
    means = mlp_out_means(model, enc_tr, batch_size=5, progress=False)
    clean = label(model, enc_va, progress=False)
    both = layer_ablation(model, enc_va, means, clean, batch_size=5, progress=False)
    mean_only = layer_ablation(model, enc_va, means, clean, batch_size=5, progress=False, kinds=("mean",))
    assert set(mean_only.kind) == {"mean"}
    pd.testing.assert_frame_equal(mean_only.reset_index(drop=True),
                                  both[both.kind == "mean"].reset_index(drop=True))
    assert critical_layers(mean_only, 2) == critical_layers(both, 2)
    with pytest.raises(ValueError, match="must include 'mean'"):
        layer_ablation(model, enc_va, means, clean, kinds=("zero",))
