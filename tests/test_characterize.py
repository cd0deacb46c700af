"""Phase 3 measurements against independent computations."""

import numpy as np
import pytest
import torch

from so2lib.phases import characterize as C
from so2lib.engine import models as M
from so2lib.engine.capture import capture_batch
from so2lib.data.labels import encode, label
from so2lib.engine.second_order import SecondOrderEngine
from so2lib.data.tasks import make_problem_set

from conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_edit_equals_hooked_forward_pass(arch, tiny_models):
    model = tiny_models[arch]
    tokens = torch.randint(2, 300, (3, 8))
    T = torch.tensor([7, 4, 2])
    ar = torch.arange(3)
    rows = capture_batch(model, tokens, T, [])
    delta = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def edit(x, hook):
        x = x.clone()
        x[ar, T] += delta
        return x
    with model.hooks(fwd_hooks=[(M.FINAL_RESID, edit)]):
        ref = model(tokens)[ar, T]
    torch.testing.assert_close(C.final_logits(model, rows.final_resid + delta), ref, atol=1e-4, rtol=1e-4)


def test_answer_metrics():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0]])
    ok, ld = C.answer_metrics(logits, torch.tensor([2, 0]))
    assert ok.tolist() == [False, True]
    assert ld.tolist() == [-1.0, 4.0]


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_sum_is_the_sum_of_all_neuron_vectors(arch, tiny_models):
    model = tiny_models[arch]
    tokens = torch.randint(2, 300, (2, 6))
    T = torch.tensor([5, 3])
    eng = SecondOrderEngine(model)
    rows = capture_batch(model, tokens, T, range(model.cfg.n_layers))
    for l in range(model.cfg.n_layers):
        torch.testing.assert_close(eng.layer_sum(rows, l), eng.vectors(rows, l).sum(1), atol=1e-5, rtol=1e-4)


def test_pc1_variance_equals_direct_svd():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 16)) * np.linspace(3, 0.1, 16)
    X = X - X.mean(0)
    v, var = C.pc1(X)
    s = np.linalg.svd(X, compute_uv=False)
    assert var == pytest.approx(s[0] ** 2 / (s ** 2).sum(), rel=1e-6)
    _, _, Vt = np.linalg.svd(X)
    assert abs(abs(v @ Vt[0]) - 1) < 1e-6


def test_significance_threshold_is_kth_largest():
    rng = np.random.default_rng(1)
    norms = rng.random((500, 3))
    thr = C.significance(norms, 0.02)
    for j in range(3):
        assert thr[j] == sorted(norms[:, j], reverse=True)[9]  # k = 2% of 500 = 10
        assert (norms[:, j] >= thr[j]).sum() == 10


def test_neuron_structure_on_planted_rank1_effects():
    rng = np.random.default_rng(2)
    d, n = 8, 3
    mean = rng.normal(size=(n, d))
    dirs = rng.normal(size=(n, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    def make(N):
        a = rng.normal(size=(N, n))
        return (mean + a[..., None] * dirs).astype(np.float32)
    tr, va = make(400), make(100)
    out = C.neuron_structure({1: tr}, {1: va}, share=0.05)
    st = out["stats"]
    assert np.allclose(st.pc1_var_all, 1.0, atol=1e-4)
    assert np.abs(out["edits"][1]["rank1"]).max() < 1e-3  # rank-1 replacement changes nothing
    # mean replacement removes exactly the centred effects
    np.testing.assert_allclose(out["edits"][1]["mean"], -(va - tr.mean(0)).sum(1), atol=1e-4)
    # significant + insignificant ablations add up to the mean replacement
    e = out["edits"][1]
    np.testing.assert_allclose(e["ablate_significant"] + e["ablate_insignificant"], e["mean"], atol=1e-4)
    # about share of validation problems are significant
    assert 0.0 <= st.significant_share_val.mean() < 0.2


def test_output_space_ablation_uses_training_means(tiny_models):
    model = tiny_models["gpt2"]
    L, dm = model.cfg.n_layers, model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    train = {"resid": torch.randn(10, dm, generator=g), "second": torch.randn(10, L, dm, generator=g),
             "direct": torch.randn(10, L, dm, generator=g)}
    val = {k: torch.randn(6, *v.shape[1:], generator=g) for k, v in train.items()}
    gold = torch.arange(6) + 5
    df = C.output_space_ablation(model, train, val, gold)
    edited = val["resid"] - val["second"][:, 2] + train["second"][:, 2].mean(0)
    ok, ld = C.answer_metrics(C.final_logits(model, edited), gold)
    row = df[(df.layer == 2) & (df.ablation == "second_order")].iloc[0]
    assert row.accuracy == pytest.approx(float(ok.float().mean()))
    assert row.mean_logit_diff == pytest.approx(float(ld.mean()), rel=1e-5)


def test_effect_budget_total_and_direct_parts(tiny_models):
    model = tiny_models["gpt2"]
    probs = make_problem_set(12, 0, seed=3).train
    enc = encode(model, probs)
    lab = label(model, enc, progress=False)
    eng = SecondOrderEngine(model)
    mean_act = torch.rand(model.cfg.n_layers, model.cfg.d_mlp)
    l, n = 1, 5
    df = C.effect_budget(model, enc, lab, eng, {l: [n]}, mean_act, batch_size=5, progress=False)
    # independent: forward passes with the neuron replaced, logit diff gold - clean alternative
    x, T = enc.batch(range(len(enc)))
    ar = torch.arange(len(T))
    gold, alt = torch.tensor(lab.gold_token.values), torch.tensor(lab.alt_token.values)
    clean = model(x)[ar, T]

    def hook(t, hook):
        t = t.clone()
        t[..., n] = mean_act[l, n]
        return t
    with model.hooks(fwd_hooks=[(M.mlp_post(l), hook)]):
        abl = model(x)[ar, T]
    total = (clean[ar, gold] - clean[ar, alt]) - (abl[ar, gold] - abl[ar, alt])
    assert df.total.iloc[0] == pytest.approx(float(total.abs().mean()), rel=1e-4)
    # direct part: (p_T - mean) * w_n . (W_U[gold] - W_U[alt]) (centred) / final scale
    rows = capture_batch(model, x, T, [l])
    u = (model.W_U[:, gold] - model.W_U[:, alt]).T.detach()
    u = u - u.mean(-1, keepdim=True)
    d = (rows.mlp_post[l][ar, T, n] - mean_act[l, n]) * (u @ model.W_out[l, n].detach()) / rows.final_scale
    assert df.direct_only.iloc[0] == pytest.approx(float(d.abs().mean()), rel=1e-4)
    assert df.r2.iloc[0] <= 1.0


def test_validation_row_verdicts():
    assert C.validation_row("m", 0.5, (0.4, 0.6), 0.1, 0.3, "h", resampled="problems")["verdict"] == "established"
    assert C.validation_row("m", 0.5, (0.05, 0.6), 0.1, 0.3, "h", resampled="problems")["verdict"] == "inconclusive"
    assert C.validation_row("m", 0.1, (0.05, 0.2), 0.1, 0.3, "h", resampled="problems")["verdict"] == "refuted"
    r = C.validation_row("m", float("nan"), (float("nan"),) * 2, 0.0, 0.8, "h", resampled="problems", reason="no drop")
    assert r["verdict"] == "not testable" and "no drop" in r["how"]


def test_pc1_sign_is_fixed_by_majority():
    rng = np.random.default_rng(3)
    d = rng.normal(size=16)
    X = np.abs(rng.normal(size=(200, 1))) * d + 0.01 * rng.normal(size=(200, 16))  # mostly along +d
    for M in (X, X[:, ::-1].copy()):
        u, share = C.pc1(M)
        assert ((M @ u) > 0).mean() > 0.5 and share > 0.9
    u1, _ = C.pc1(X)
    u2, _ = C.pc1(-X)
    np.testing.assert_allclose(u1, -u2, atol=1e-8)
