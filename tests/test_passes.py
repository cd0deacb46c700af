"""The cheap model passes equal the old ones (issue 20): labelling without autograd and with
logits only at the rows read, batched neuron edits (stacked, started after the edited layer),
the effect budget, the PC1 fits of neuron_structure and the editing / causal follow-up. Each
new path is compared with a slow reference kept here (the old code), and each check has a
planted failure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from so2lib.data.labels import Encoded, continuation_mask, deciding_index, encode, label, label_edits
from so2lib.data.tasks import Template, make_problem_set
from so2lib.engine import models as M
from so2lib.engine import partial as P
from so2lib.phases import characterize as C
from so2lib.phases.applications.editing import edit_labels, edit_labels_many, scaling_hooks

from conftest import ARCHS


# ----------------------------------------------------------------------------- slow references (the old code)

def _old_label_row(enc, i, lt_all, cont, position):
    device = lt_all.device
    p, ans = enc.full(i)
    t0 = len(p) - 1
    lt = lt_all[: len(ans)].float()
    a = torch.tensor(ans, device=device)
    ar = torch.arange(len(ans), device=device)
    g = lt[ar, a]
    masked = lt.clone()
    masked[ar, a] = -float("inf")
    alt_logit, alt = masked.max(-1)
    d = (g - alt_logit).tolist()
    k = enc.prefix(i) if enc.n_prefix is not None else deciding_index(d, position)
    wrong = [j for j, dj in enumerate(d) if dj <= 0]
    if cont is not None:
        nxt = lt_all[len(ans)].float()
        c = torch.zeros(nxt.shape[0], dtype=torch.bool, device=device)
        c[: min(len(cont), len(c))] = cont[: len(c)].to(device)
        ds = float(nxt[~c].max() - nxt[c].max()) if c.any() else float("inf")
    else:
        ds = float("inf")
    return {"correct": not wrong and ds > 0, "stopped": ds > 0, "stop_margin": ds, "pred_token": int(lt[k].argmax()),
            "gold_token": ans[k], "alt_token": int(alt[k]), "answer_logit": float(g[k]), "logit_diff": d[k],
            "answer_pos": t0 + k, "decide_k": k, "prompt_pos": t0, "n_answer_tokens": len(ans), "margin_min": min(d),
            "first_wrong": wrong[0] if wrong else -1, "first_logit_diff": d[0], "first_token": ans[0]}


def _old_label(model, enc, batch_size=7, hooks=(), position="decide", stop=True):
    """The old label(): whole forward pass (logits at every position), autograd on, per-row reads."""
    cont = continuation_mask(model.tokenizer) if stop else None
    rows = []
    for idx, x, T in enc.batches(batch_size, with_answer=True):
        with model.hooks(fwd_hooks=list(hooks)):
            logits = model(x)
        for r, i in enumerate(idx):
            p, ans = enc.full(i)
            t0 = len(p) - 1
            rows.append(_old_label_row(enc, i, logits[r, t0: t0 + len(ans) + (cont is not None)], cont, position))
    return pd.DataFrame(rows)


def _problems(model, n=40, seed=3):
    probs = make_problem_set(n, 0, seed=seed, heldout=False).train
    return encode(model, probs, Template("compact"))


def _multi_token_enc(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [[0] + torch.randint(2, 400, (int(k),), generator=g).tolist() for k in torch.randint(2, 9, (23,), generator=g)]
    answers = [torch.randint(2, 400, (int(k),), generator=g).tolist() for k in torch.randint(1, 4, (23,), generator=g)]
    return Encoded(prompts, answers, pad_id=0)


# ----------------------------------------------------------------------------- label

@pytest.mark.parametrize("arch", ARCHS)
def test_label_equals_the_old_whole_pass_exactly(arch, tiny_models):
    m = tiny_models[arch]
    for enc in (_problems(m), _multi_token_enc(m)):
        for stop in (True, False):
            pd.testing.assert_frame_equal(label(m, enc, 7, False, stop=stop), _old_label(m, enc, 7, stop=stop))
    # an intervention passed as hooks still works, and equals the old hooked pass
    enc = _problems(m)
    hk = [(M.mlp_out(1), lambda t, hook: torch.zeros_like(t))]
    new, old = label(m, enc, 7, False, hooks=hk), _old_label(m, enc, 7, hooks=hk)
    pd.testing.assert_frame_equal(new, old)
    # planted failure: the ablation changes the labels (the hook is not dropped by the partial pass)
    clean = label(m, enc, 7, False)
    assert np.abs(new.logit_diff.values - clean.logit_diff.values).max() > 1e-3


def test_label_builds_no_autograd_graph(tiny_models):
    m = tiny_models["gpt2"]
    enc = _problems(m, 12)
    seen = []

    def spy(t, hook):
        seen.append(t.requires_grad)
    with torch.enable_grad():
        label(m, enc, 5, False, hooks=[(M.mlp_post(0), spy)])
    assert seen and not any(seen)
    # planted failure: the same hook on a plain forward pass with autograd sees a graph
    seen.clear()
    with torch.enable_grad(), m.hooks(fwd_hooks=[(M.mlp_post(0), spy)]):
        m(enc.batch(range(3))[0])
    assert all(seen)


# ----------------------------------------------------------------------------- batched edits

def _edit_hooks(e):
    hooks = []
    for l, (idx, mul, add) in e.items():
        def h(t, hook, idx=idx, mul=mul, add=add):
            t = t.clone()
            t[..., idx] = t[..., idx] * mul + add
            return t
        hooks.append((M.mlp_post(l), h))
    return hooks


EDITS = [{}, P.scale_edit({0: [1, 2, 3]}, 0.0), P.scale_edit({1: [5], 3: [7, 8]}, 2.5),
         P.set_edit(2, [4, 9], torch.tensor([0.3, -1.0])), P.set_edit(3, [10], 0.7), P.scale_edit({0: [1], 2: [6]}, 0.5),
         P.scale_edit({1: [2]}, 1.0)]


@pytest.mark.parametrize("arch", ARCHS)
def test_run_edits_equal_one_hooked_pass_per_edit(arch, tiny_models):
    m = tiny_models[arch]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, m.cfg.d_vocab, (5, 9), generator=g)
    rows = (torch.tensor([0, 1, 2, 3, 4, 4]), torch.tensor([8, 7, 8, 3, 5, 8]))
    ref = [P.final_resid(m, x, _edit_hooks(e))[rows] for e in EDITS]
    assert min(float((r - ref[0]).abs().max()) for r in ref[1:-1]) > 1e-3  # every edit changes the pass
    for max_tokens, skip in ((None, False), (None, True), (10 ** 6, False), (10 ** 6, True), (100, True)):
        got = P.run_edits(m, x, rows, EDITS, max_tokens, skip)
        for a, b in zip(got, ref):
            if skip:
                assert torch.allclose(a, b, atol=1e-5, rtol=0)
            else:  # starting at the edited layer, stacked or not: the very same numbers
                assert torch.equal(a, b)
    # planted failure: an edit read from another copy of the stack is another pass
    got = P.run_edits(m, x, rows, EDITS[:3], 10 ** 6, False)
    assert (got[1] - ref[2]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_label_edits_equal_hooked_labels(arch, tiny_models):
    m = tiny_models[arch]
    for enc in (_problems(m), _multi_token_enc(m)):
        new = label_edits(m, enc, EDITS, 7)
        for e, got in zip(EDITS, new):
            old = _old_label(m, enc, 7, hooks=_edit_hooks(e))
            assert (got.correct.values == old.correct.values).all()
            assert np.abs(got.logit_diff.values - old.logit_diff.values).max() < 1e-4
            assert (got.decide_k.values == old.decide_k.values).all() and (got.pred_token.values == old.pred_token.values).all()
    # planted failure: the edits do change the labels
    assert max(np.abs(o.logit_diff.values - new[0].logit_diff.values).max() for o in new[1:-1]) > 1e-3


def test_edit_labels_equal_the_old_scaling_hooks(tiny_models):
    m = tiny_models["gpt2"]
    enc = _problems(m, 30)
    sets = [{0: [3, 4], 2: [9]}, {1: [0, 63]}, {2: [5]}]
    many = edit_labels_many(m, enc, [(s, f) for s in sets for f in (0.0, 2.0)], 6)
    for (s, f), got in zip([(s, f) for s in sets for f in (0.0, 2.0)], many):
        old = _old_label(m, enc, 6, hooks=scaling_hooks(s, f))
        assert (got.correct.values == old.correct.values).all()
        assert np.abs(got.logit_diff.values - old.logit_diff.values).max() < 1e-4
    one = edit_labels(m, enc, sets[0], 0.0, 6)
    assert np.abs(one.logit_diff.values - many[0].logit_diff.values).max() < 1e-4
    # planted failure: another factor is another result
    assert np.abs(many[0].logit_diff.values - many[1].logit_diff.values).max() > 1e-3


# ----------------------------------------------------------------------------- effect budget

def _old_effect_budget(model, enc_val, labels_val, engine, neurons, mean_act, batch_size):
    """The old effect_budget's total effect: one whole ablated pass per neuron, logits at T."""
    gold = torch.tensor(labels_val.gold_token.values)
    alt = torch.tensor(labels_val.alt_token.values)
    out = {}
    for l, ns in neurons.items():
        for n in ns:
            def hook(t, hook, n=n, l=l):
                t = t.clone()
                t[..., n] = mean_act[l, n]
                return t
            tot = []
            for idx, x, T in enc_val.batches(batch_size):
                ar = torch.arange(len(T))
                g, a = gold[idx.start:idx.stop], alt[idx.start:idx.stop]
                with torch.no_grad():
                    lc = model(x)[ar, T]
                    with model.hooks(fwd_hooks=[(M.mlp_post(l), hook)]):
                        lg = model(x)[ar, T]
                tot.append((lc[ar, g] - lc[ar, a]) - (lg[ar, g] - lg[ar, a]))
            out[(l, n)] = float(torch.cat(tot).abs().mean())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_effect_budget_equals_one_whole_pass_per_neuron(arch, tiny_models):
    from so2lib.engine.second_order import SecondOrderEngine

    m = tiny_models[arch]
    enc0 = _problems(m, 30)
    lab0 = label(m, enc0, 8, False)
    enc = enc0.analysis_view(lab0.decide_k.values)
    eng = SecondOrderEngine(m, correctness_dir=torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0)))
    neurons = {0: [1, 7, 20], 2: [3, 40]}
    mean_act = torch.randn(m.cfg.n_layers, m.cfg.d_mlp, generator=torch.Generator().manual_seed(1)).abs()
    new = C.effect_budget(m, enc, lab0, eng, neurons, mean_act, 8, False)
    old = _old_effect_budget(m, enc, lab0, eng, neurons, mean_act, 8)
    got = {(int(r.layer), int(r.neuron)): r.total for r in new.itertuples()}
    assert max(abs(got[k] - v) for k, v in old.items()) < 1e-5
    assert min(old.values()) > 1e-4
    # planted failure: another mean is another ablation
    moved = C.effect_budget(m, enc, lab0, eng, neurons, mean_act.roll(1, 1), 8, False)
    assert np.abs(moved.total.values - new.total.values).max() > 1e-4


# ----------------------------------------------------------------------------- neuron structure

def test_pc1_batch_equals_sklearn_pca():
    g = np.random.default_rng(0)
    base = g.normal(size=(6, 300, 12)).astype(np.float32)
    base[:, :, 0] *= 4.0  # a clear first component
    base[3] -= base[3].mean(0)  # one set centred, the others not (PCA recentres)
    dirs, share = C.pc1_batch(base, chunk=4)
    for j in range(len(base)):
        u, s = C.pc1(base[j])
        assert abs(s - share[j]) < 1e-5
        assert np.abs(u - dirs[j]).max() < 1e-4  # same sign too
    # planted failure: the second component is not the first
    from sklearn.decomposition import PCA
    u2 = PCA(n_components=2, svd_solver="full").fit(base[0]).components_[1]
    assert abs(float(np.dot(u2, dirs[0]))) < 0.5


def test_neuron_structure_equals_per_neuron_pca():
    g = np.random.default_rng(1)
    vt = {0: g.normal(size=(200, 5, 10)).astype(np.float32) * np.linspace(1, 3, 10)}
    vv = {0: g.normal(size=(40, 5, 10)).astype(np.float32)}
    s = C.neuron_structure(vt, vv, 0.05)
    tr = vt[0]
    ctr = tr - tr.mean(0)
    ntr = np.linalg.norm(ctr, axis=-1)
    k = max(2, int(round(0.05 * tr.shape[0])))
    for j in range(5):
        u, va = C.pc1(ctr[:, j])
        _, vtop = C.pc1(ctr[np.argsort(-ntr[:, j])[:k], j])
        row = s["stats"].iloc[j]
        assert abs(row.pc1_var_all - va) < 1e-5 and abs(row.pc1_var_topk - vtop) < 1e-5
        assert np.abs(s["pc1"][0][j] - u).max() < 1e-4
    # planted failure: a neuron with a strong direction has a larger share than an isotropic one
    vt2 = {0: vt[0].copy()}
    vt2[0][:, 0, 0] *= 10
    s2 = C.neuron_structure(vt2, vv, 0.05)
    assert s2["stats"].pc1_var_all.iloc[0] > s["stats"].pc1_var_all.iloc[0] + 0.3


@pytest.mark.parametrize("arch", ARCHS)
def test_effect_budget_prediction_equals_effect_of_p_minus_effect_of_mean(arch, tiny_models):
    """The prediction is one projection of ``p - mean`` on the chosen neurons; the old code
    projected the real run and the constant-mean run over all neurons and took the difference."""
    from so2lib.engine.capture import AnswerRows, capture_batch
    from so2lib.engine.second_order import SecondOrderEngine

    m = tiny_models[arch]
    enc0 = _problems(m, 24)
    lab0 = label(m, enc0, 8, False)
    enc = enc0.analysis_view(lab0.decide_k.values)
    eng = SecondOrderEngine(m)
    neurons = {0: [1, 7, 20], 1: [3]}
    mean_act = torch.randn(m.cfg.n_layers, m.cfg.d_mlp, generator=torch.Generator().manual_seed(4)).abs()
    new = C.effect_budget(m, enc, lab0, eng, neurons, mean_act, 1000, False)  # one batch
    x, T = enc.batch(list(range(len(enc))))
    g, a = torch.tensor(lab0.gold_token.values), torch.tensor(lab0.alt_token.values)
    rows = capture_batch(m, x, T, range(m.cfg.n_layers))
    for l, ns in neurons.items():
        const = AnswerRows({**rows.mlp_post, l: mean_act[l].expand_as(rows.mlp_post[l]).clone()}, rows.pattern,
                           rows.scale, rows.final_scale, rows.final_resid, None, rows.attn_out_scale, rows.mlp_out_scale)
        real, base = eng.projected(rows, T, g, a, layers=[l]), eng.projected(const, T, g, a, layers=[l])
        for n in ns:
            old = (real["direct"] + real["second"] - base["direct"] - base["second"])[:, 0, 0, n]
            r = new[(new.layer == l) & (new.neuron == n)].iloc[0]
            assert r.predicted == pytest.approx(float(old.abs().mean()), rel=1e-4, abs=1e-7)
            assert r.predicted > 1e-4  # planted: a real effect, not zero against zero


def test_float32_mean_is_numpys_mean_of_the_float32_copy_bit_for_bit():
    from so2lib.phases.linalg import float32_mean

    g = np.random.default_rng(5)
    for shape, chunk in (((1000, 7, 9), 256), ((513, 3), 64), ((1, 4), 256)):
        x = (g.normal(size=shape) * 300).astype(np.float16)  # as the effect vectors are stored
        ref = np.asarray(x, np.float32).mean(0)
        got = float32_mean(x, chunk=chunk)
        assert got.dtype == np.float32 and np.array_equal(got, ref)
    # a blockwise sum (sum of chunk sums) is not the same arithmetic: the test can tell them apart
    x = (g.normal(size=(4000, 64)) * 1e3).astype(np.float32)
    blocks = sum(x[i:i + 256].sum(0) for i in range(0, len(x), 256)) / np.float32(len(x))
    assert not np.array_equal(blocks, x.mean(0)) and np.array_equal(float32_mean(x), x.mean(0))
