"""The all-neuron CLIP protocol's coefficient-space path against the engine's full vectors."""

import numpy as np
import pytest
import torch

from so2lib.phases import protocol as P
from so2lib.engine.capture import capture_batch
from so2lib.engine.second_order import SecondOrderEngine

from conftest import ARCHS


def batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 500, (3, 8), generator=g)
    tokens[:, 0] = 0
    T = torch.tensor([7, 5, 6])
    for r, t in enumerate(T):
        tokens[r, t + 1:] = 0
    return tokens, T


def layer_case(model, layer: int = 1):
    """One batch at ``layer``: full effect vectors ``[b, n, d]``, the layer's weights and the
    coefficients, from one capture."""
    tokens, T = batch()
    rows = capture_batch(model, tokens, T, [layer])
    eng = SecondOrderEngine(model, layers=[layer])
    return eng.vectors(rows, layer).float().cpu(), P.LayerWeights(model, layer, eng), P.coefficients(eng, rows, layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_gram_and_edit_match_full_vectors(arch, tiny_models):
    full, w, c = layer_case(tiny_models[arch])
    torch.testing.assert_close(P.quad(c, w.gram(chunk=7)), full.pow(2).sum(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.edit(c), full.sum(1), rtol=1e-4, atol=1e-5)
    mask = torch.zeros(c.shape[-1], dtype=torch.bool)
    mask[[3, 10]] = True
    torch.testing.assert_close(w.edit(c * mask), full[:, mask].sum(1), rtol=1e-4, atol=1e-5)


def test_planted_rank1_passes_and_isotropic_fails():
    torch.manual_seed(0)
    K, n, k = 6, 5, 40
    G = torch.eye(K).expand(n, K, K).clone()
    direction = torch.randn(K, n)
    scale = torch.rand(k, 1, n) + 0.5  # mostly positive along the planted direction
    planted = scale * direction[None] + 1e-3 * torch.randn(k, K, n)
    v, share = P.fit_pc1(planted, G)
    assert (share > 0.99).all()
    cos = (v * direction).sum(0) / direction.norm(dim=0)
    assert torch.allclose(cos, torch.ones(n), atol=1e-3)  # sign fixed by majority: positive
    torch.testing.assert_close(torch.einsum("kn,nkj,jn->n", v, G, v), torch.ones(n))
    iso = torch.randn(2000, K, n)
    _, share_iso = P.fit_pc1(iso, G)
    assert (share_iso < 2.0 / K).all()  # close to the 1/K null


def test_recovered_share_not_testable_without_a_drop():
    clean = np.ones(200, bool)
    r = P.recovered_share(clean, clean, clean)
    assert np.isnan(r["share"]) and r["note"].startswith("not testable")
    mean = clean.copy()
    mean[:100] = False
    rank1 = mean.copy()
    rank1[:50] = True
    r = P.recovered_share(clean, mean, rank1)
    assert r["share"] == pytest.approx(0.5) and r["ci_low"] < 0.5 < r["ci_high"]


def test_grouped_protocol_equals_one_layer_at_a_time(tiny_models):
    """run_protocol (layers grouped, one forward pass per batch and group) gives the per-layer
    path's numbers exactly, whatever the memory budget's grouping."""
    from so2lib.data.labels import Encoded
    model = tiny_models["llama"]
    g = torch.Generator().manual_seed(4)
    prompts = [[0] + torch.randint(2, 400, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (40,), generator=g)]
    enc = Encoded(prompts, [[int(t)] for t in torch.randint(2, 400, (40,), generator=g)], pad_id=0)
    tr, va = enc.subset(range(24)), enc.subset(range(24, 40))
    gold = va.gold
    layers = [0, 1, 2]
    scopes = {l: {"all": None, "some": torch.tensor([1, 5, 9])} for l in layers}
    ref = {}
    for l in layers:
        f = P.fit_layer(model, tr, l, 0.1, 7)
        for sc, ns in scopes[l].items():
            ref[(l, sc)] = P.layer_protocol(model, va, gold, l, f, 5, ns)
    for budget in (1, 10**9):  # one layer per group, and all layers in one group
        per, st = P.run_protocol(model, tr, va, gold, layers, scopes, 0.1, 7, budget=budget, progress=False)
        assert set(per) == set(ref)
        for k in ref:
            for name in ref[k]:
                np.testing.assert_allclose(per[k][name], ref[k][name], rtol=1e-5, atol=1e-6, err_msg=str((k, name)))
        assert st[0]["K"] == 3 * model.cfg.n_heads and st[0]["n_fit"] == 24
    assert P.layer_groups([0, 1, 2], 24, {0: 12, 1: 8, 2: 4}, 64, 1) == [[0], [1], [2]]


@pytest.mark.parametrize("arch", ARCHS)
def test_rank1_control_edits_match_full_vectors(arch, tiny_models):
    """The rank-1 edits onto the control directions (coefficient space, metric G) equal projecting
    each neuron's full effect vector on the control's unit effect-space direction and summing."""
    full, w, c = layer_case(tiny_models[arch])
    G = w.gram()
    ctrl = P.control_directions(G, c.mean(0) + 0.1, seed=3)
    M = torch.einsum("nm,kmh,khd->nkd", w.W_out, w.W_V, w.W_O)
    for key in ("random", "mean_direction"):
        u = torch.einsum("nkd,kn->nd", M, ctrl[key])  # unit effect-space directions
        torch.testing.assert_close(u.norm(dim=1), torch.ones(len(u)), rtol=1e-3, atol=1e-3)
        ref = (torch.einsum("bnd,nd->bn", full, u)[..., None] * u[None] - full).sum(1)
        torch.testing.assert_close(P._rank1(w, c, G, ctrl[key]), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_direction_maps_match_full_vectors(arch, tiny_models):
    """``directions`` (coefficients -> effect space) and ``coefficients_of`` (its adjoint) against
    the neurons' explicit ``M_n``."""
    full, w, c = layer_case(tiny_models[arch])
    M = torch.einsum("nm,kmh,khd->nkd", w.W_out, w.W_V, w.W_O)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(w.K, M.shape[0], generator=g)
    U = torch.randn(M.shape[0], M.shape[2], generator=g)
    torch.testing.assert_close(w.directions(v), torch.einsum("nkd,kn->nd", M, v), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.coefficients_of(U), torch.einsum("nkd,nd->kn", M, U), rtol=1e-4, atol=1e-5)
    # an effect's projection on u_n, from its coefficients: c_n . g_n = (M_n^T c_n) . u_n
    a = torch.einsum("bkn,kn->bn", c, w.coefficients_of(U))
    torch.testing.assert_close(a, torch.einsum("bnd,nd->bn", full, U), rtol=1e-3, atol=1e-4)


def test_evaluate_replacements_with_pc1_equals_the_protocol_rank1(tiny_models):
    """CLIP's --evaluate path (directions given in effect space) with each neuron's own PC1
    reproduces the protocol's rank-1 and mean replacements of all neurons of a layer: two code
    paths, one answer; another direction (planted) gives other readouts."""
    from so2lib.data.labels import Encoded
    model = tiny_models["llama"]
    g = torch.Generator().manual_seed(4)
    prompts = [[0] + torch.randint(2, 400, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (40,), generator=g)]
    enc = Encoded(prompts, [[int(t)] for t in torch.randint(2, 400, (40,), generator=g)], pad_id=0)
    tr, va = enc.subset(range(24)), enc.subset(range(24, 40))
    per, st = P.run_protocol(model, tr, va, va.gold, [1], {1: {"all": None}}, 0.1, 7, progress=False,
                             keep={1: torch.arange(4)})
    fit = st[1]["fit"]
    w = P.LayerWeights(model, 1)
    u = w.directions(fit["v"])
    torch.testing.assert_close(u.norm(dim=1), torch.ones(len(u)), rtol=1e-3, atol=1e-3)
    other = torch.nn.functional.normalize(torch.randn(u.shape, generator=g), dim=1)
    ev = P.evaluate_replacements(model, va, va.gold, {1: fit}, {"pc1": {1: u}, "other": {1: other}}, 5)
    ref = per[(1, "all")]
    for a, b in (("clean", "clean"), ("mean", "mean"), ("pc1", "rank1")):
        np.testing.assert_allclose(ev[f"{a}_logit_diff"], ref[f"{b}_logit_diff"], rtol=1e-4, atol=1e-4)
    assert not np.allclose(ev["other_logit_diff"], ref["rank1_logit_diff"], atol=1e-3)
    r = P.recovered_difference(ev["clean_correct"], ev["mean_correct"], ev["pc1_correct"], ev["other_correct"], 200)
    assert set(r) == {"point", "boots", "note"}
