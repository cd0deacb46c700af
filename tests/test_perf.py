"""The rebuilt hot steps equal the old ones; the peer equals the engine; the FPE accounting."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from so2lib.engine import models as M
from so2lib.engine import partial as P
from so2lib.phases import selection as S
from so2lib.engine.capture import capture_batch
from so2lib.data.labels import encode, label
from so2lib.engine.peer import attribution_patching
from so2lib.engine.second_order import SecondOrderEngine
from so2lib.data.tasks import Template, make_problem_set

ARCHS = ("gpt2", "neox", "llama")


def _tokens(model, b=3, s=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.d_vocab, (b, s), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_partial_passes_equal_the_whole_pass(arch, tiny_models):
    m = tiny_models[arch]
    x = _tokens(m)
    with torch.no_grad():
        full = m(x).float()
    r = P.final_resid(m, x)
    assert torch.equal(P.logits_at(m, r), full)
    pre = P.resid_pre(m, x, range(m.cfg.n_layers))
    for l in range(m.cfg.n_layers):
        assert torch.allclose(P.run_from(m, pre[l], l), r, atol=1e-6, rtol=0)
    hk = [(M.mlp_out(1), lambda t, hook: torch.zeros_like(t))]
    with torch.no_grad(), m.hooks(fwd_hooks=hk):
        want = m(x).float()
    got = P.logits_at(m, P.run_from(m, pre[1], 1, hk))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # planted failure: starting layer 2 from the residual entering layer 1 is a different pass
    wrong = P.logits_at(m, P.run_from(m, pre[1], 2))
    assert (wrong - full).abs().max() > 1e-3
    # the skipped blocks are restored afterwards
    with torch.no_grad():
        assert torch.equal(m(x).float(), full)


def _old_layer_ablation(model, enc, means, kinds=("mean", "zero"), batch_size=5):
    rows = []
    for l in range(model.cfg.n_layers):
        for kind, value in [(k, v) for k, v in (("mean", means[l]), ("zero", None)) if k in kinds]:
            lab = label(model, enc, batch_size, progress=False, hooks=[(M.mlp_out(l), S.ablation_hook(value))])
            rows.append({"layer": l, "kind": kind, "accuracy": lab.correct.mean(),
                         "mean_logit_diff": lab.logit_diff.mean()})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_ablation_equals_whole_labelling_passes(arch, tiny_models):
    m = tiny_models[arch]
    probs = make_problem_set(40, 0, seed=3, heldout=False).train
    enc0 = encode(m, probs, Template("compact"))
    clean = label(m, enc0, 7, progress=False)
    enc = enc0.analysis_view(clean.decide_k.values)
    means = S.mlp_out_means(m, enc, 7, False)
    old = _old_layer_ablation(m, enc, means, batch_size=7)
    new = S.layer_ablation(m, enc, means, clean, 7, False)
    assert (old.accuracy.values == new.accuracy.values).all()
    assert abs(old.mean_logit_diff.values - new.mean_logit_diff.values).max() < 1e-5
    # planted failure: ablating another layer's mean must show up
    shifted = S.layer_ablation(m, enc, means.roll(1, 0), clean, 7, False)
    assert abs(shifted.mean_logit_diff.values - old.mean_logit_diff.values).max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_peer_and_factored_projection_equal_the_engine(arch, tiny_models):
    m = tiny_models[arch]
    x = _tokens(m, b=6, s=10, seed=1)
    T = torch.tensor([9, 8, 9, 5, 7, 9])
    eng = SecondOrderEngine(m, correctness_dir=torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0)))
    gold = torch.tensor([5, 6, 5, 7, 5, 6])
    alt = torch.tensor([8, 8, 9, 8, 6, 5])
    rows = capture_batch(m, x, T, range(m.cfg.n_layers))
    ref = eng.project(rows, T, eng.directions(gold, alt))
    fac = eng.project_factored(rows, T, *eng._token_basis(gold, alt))
    peer = attribution_patching(m, x, T, eng.directions(gold, alt))
    scale = float(ref["second"].abs().max())
    assert scale > 1e-3
    for k in ("second", "direct"):
        assert (fac[k] - ref[k]).abs().max() <= 1e-5 * max(1.0, float(ref[k].abs().max()))
        assert (peer[k] - ref[k]).abs().max() <= 1e-5 * max(1.0, float(ref[k].abs().max()))
    # planted failure: the peer without detached attention outputs (head-to-head composition) differs
    bad = attribution_patching(m, x, T, eng.directions(gold, alt), detach_attention=False)
    assert (bad["second"] - ref["second"]).abs().max() > 1e-3 * scale


def test_fpe_table_shares_and_budget():
    from so2lib.bench import fpe_table

    df = fpe_table({"a": 10.0, "b": 30.0, "c": 60.0}, forward_s=2.0, n_layers=4)
    assert list(df.step) == ["c", "b", "a"]
    assert df.fpe.tolist() == [30.0, 15.0, 5.0]
    assert abs(df.share.sum() - 1) < 1e-12
    assert df.attrs["total_fpe"] == 50.0 and df.attrs["budget_fpe"] == 34 and not df.attrs["within_budget"]
    ok = fpe_table({"a": 10.0}, forward_s=2.0, n_layers=4)
    assert ok.attrs["within_budget"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_at_tokens_are_those_columns_of_logits_at(arch, tiny_models):
    m = tiny_models[arch]
    r = P.final_resid(m, _tokens(m, b=4))[:, -3:]  # [4, 3, d]
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, m.cfg.d_vocab, (4, 3, 2), generator=g)
    full = P.logits_at(m, r)
    got = P.logits_at_tokens(m, r, tok)
    assert got.shape == (4, 3, 2)
    assert torch.allclose(got, full.gather(-1, tok), atol=1e-5, rtol=1e-6)
    # planted failure: other tokens' columns differ
    assert not torch.allclose(P.logits_at_tokens(m, r, (tok + 1) % m.cfg.d_vocab), full.gather(-1, tok), atol=1e-3)
