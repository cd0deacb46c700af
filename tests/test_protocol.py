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
def test_protocol_edits_match_full_vectors(arch, tiny_models):
    """Every CLIP edit of :func:`protocol._edits` (two full edits, the rest by linearity) equals
    the brute force on each neuron's explicit effect vectors: centred on the training mean's
    vector, the significant ones above the threshold ablated or kept, each rank-1 edit projecting
    on its unit direction (PC1, a random direction in the span, the mean-effect direction)."""
    full, w, c = layer_case(tiny_models[arch])
    G = w.gram()
    mean = c.mean(0) + 0.1
    M = torch.einsum("nm,kmh,khd->nkd", w.W_out, w.W_V, w.W_O)
    F = full - torch.einsum("nkd,kn->nd", M, mean)[None]  # centred effect vectors [b, n, d]
    srt = F.norm(dim=-1).sort(0, descending=True).values
    thr = 0.5 * (srt[0] + srt[1])  # the largest effect of each neuron significant, clear of ties
    v, _ = P.fit_pc1(c - mean, G)
    fit = {"G": G, "mean": mean, "threshold": thr, "v": v, "seed": 3}
    keep = torch.zeros(c.shape[-1], dtype=torch.bool)
    keep[::2] = True  # a scope of some neurons: the others untouched
    edits, sig = P._edits(w, fit, c, keep)
    Fk = F * keep[None, :, None]
    want_sig = (F.norm(dim=-1) > thr) & keep
    assert torch.equal(sig & keep, want_sig) and 0 < int(want_sig.sum()) < int(keep.sum()) * len(c)
    ref = {"mean": -Fk.sum(1), "ablate_significant": -(Fk * want_sig[..., None]).sum(1),
           "ablate_insignificant": -(Fk * ~want_sig[..., None]).sum(1)}
    ctrl = P.control_directions(G, mean, seed=3)
    for name, d in (("rank1", v), ("rank1_random", ctrl["random"]), ("rank1_mean_direction", ctrl["mean_direction"])):
        u = torch.einsum("nkd,kn->nd", M, d)  # unit effect-space directions
        torch.testing.assert_close(u.norm(dim=1), torch.ones(len(u)), rtol=1e-3, atol=1e-3)
        ref[name] = (torch.einsum("bnd,nd->bn", Fk, u)[..., None] * u[None] - Fk).sum(1)
    assert set(edits) == set(ref)
    for name in ref:
        torch.testing.assert_close(edits[name], ref[name], rtol=1e-3, atol=1e-4, msg=name)


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
    G = w.gram()
    torch.testing.assert_close(w.keep_basis(), M)  # the kept basis: directions and gram through it
    torch.testing.assert_close(w.directions(v), torch.einsum("nkd,kn->nd", M, v), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.gram(), G, rtol=1e-5, atol=1e-6)
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


def test_protocol_refits_equal_the_fit_on_the_unresampled_sample(tiny_models, monkeypatch):
    """Refits of the training fit (for intervals that refit what is fitted): on bootstrap resamples
    they move the edits' readouts; on the training sample itself they reproduce the fit's
    readouts exactly (a second path through the same protocol)."""
    from so2lib.data.labels import Encoded
    model = tiny_models["llama"]
    g = torch.Generator().manual_seed(4)
    prompts = [[0] + torch.randint(2, 400, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (40,), generator=g)]
    enc = Encoded(prompts, [[int(t)] for t in torch.randint(2, 400, (40,), generator=g)], pad_id=0)
    tr, va = enc.subset(range(24)), enc.subset(range(24, 40))
    scopes = {1: {"all": None}, 2: {"all": None}}
    per, st = P.run_protocol(model, tr, va, va.gold, [1, 2], scopes, 0.1, 7, progress=False, refit={1: 3})
    assert len(st[1]["refits"]) == 3 and "refits" not in st[2]
    r0 = st[1]["refits"][0]
    assert "clean_correct" not in r0 and set(r0) == set(per[(1, "all")]) - {"clean_correct", "clean_logit_diff"}
    assert any(not np.allclose(r["mean_logit_diff"], per[(1, "all")]["mean_logit_diff"]) for r in st[1]["refits"])
    monkeypatch.setattr(P, "refit_indices", lambda n, R, seed=0: [np.arange(n)] * R)
    per2, st2 = P.run_protocol(model, tr, va, va.gold, [1, 2], scopes, 0.1, 7, progress=False, refit={1: 2})
    for r in st2[1]["refits"]:
        for k, v in r.items():
            np.testing.assert_allclose(v, per2[(1, "all")][k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("offset", [0.3, 1000.0])
def test_refit_path_equals_the_fit_on_the_unresampled_sample(offset, monkeypatch):
    """Also where the mean is 1,000 times the spread (a steady attention offset): the refit path
    centres once, so its float32 energies do not cancel."""
    g = torch.Generator().manual_seed(5)
    N, K, n = 300, 6, 9
    A = torch.randn(n, K, K, generator=g)
    G = A @ A.transpose(1, 2) + 0.1 * torch.eye(K)
    c = torch.randn(N, K, n, generator=g) * torch.rand(1, K, n, generator=g) + offset
    fit = P.fit_from_coefficients(c, G, 0.05)
    monkeypatch.setattr(P, "refit_indices", lambda n_, R, seed=0: [np.arange(n_)] * R)
    (r,) = P.refit_from_coefficients(c, G, 0.05, n_refit=1)
    torch.testing.assert_close(r["mean"], fit["mean"], rtol=1e-5, atol=1e-4 * max(1.0, offset) * 1e-2)
    for k in ("threshold", "v"):
        torch.testing.assert_close(r[k], fit[k], rtol=1e-4, atol=1e-5, msg=k)
    monkeypatch.undo()
    boots = P.refit_from_coefficients(c, G, 0.05, n_refit=2)
    assert not torch.allclose(boots[0]["mean"], fit["mean"]) and not torch.allclose(boots[0]["mean"], boots[1]["mean"])


def test_pc1_from_the_span_side_equals_fit_pc1():
    g = torch.Generator().manual_seed(6)
    n, k, K = 7, 31, 5  # k odd: no tie in the majority sign rule
    A = torch.randn(n, K, K, generator=g)
    G = A @ A.transpose(1, 2) + 0.1 * torch.eye(K)
    top = torch.randn(n, k, K, generator=g) * torch.rand(n, 1, K, generator=g)
    v, share = P.fit_pc1(top.permute(1, 2, 0), G)
    v2, share2 = P._pc1_in_span(top, G, torch.linalg.cholesky(G))
    torch.testing.assert_close(share2, share, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(v2, v, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 500.0])
def test_refit_branch_of_edits_equals_the_direct_one(offset, tiny_models, monkeypatch):
    """_edits' refit branch (energies from the reference-centred batch, every projection in one
    pass) against its direct branch on the same refit, with and without a large common offset."""
    full, w, c = layer_case(tiny_models["llama"])
    c = c + offset
    G = w.gram()
    g = torch.Generator().manual_seed(0)
    train = torch.cat([c + 0.1 * torch.randn(c.shape, generator=g) for _ in range(2)])  # 6 rows, none of them c's
    monkeypatch.setattr(P, "refit_indices", lambda n_, R, seed=0: [np.array([0, 1, 1, 3, 4, 5])] * R)
    (f,) = P.refit_from_coefficients(train, G, 0.3, n_refit=1)
    main = {"G": G, "mean": train.mean(0), "v": f["v"], "threshold": f["threshold"], "seed": 0}
    P._prepare_refit(w, f, P.control_directions(G, main["mean"], 0)["random"], P._unit_directions(w, main)["rank1_random"])
    every = torch.ones(c.shape[-1], dtype=torch.bool)
    direct, sig = P._edits(w, dict(f), c, every)
    cp0 = c.permute(2, 0, 1).contiguous() - f["m0"].T[:, None]
    q0 = (torch.bmm(cp0, G) * cp0).sum(-1).T
    fast, sig2 = P._edits(w, dict(f), c, every, cp=cp0, q0=q0)
    assert torch.equal(sig, sig2)
    for k in direct:
        torch.testing.assert_close(fast[k], direct[k], rtol=1e-3, atol=1e-3 * max(1.0, offset) * 1e-2, msg=k)
    with pytest.raises(ValueError, match="every neuron"):
        P._edits(w, dict(f), c, ~every, cp=cp0, q0=q0)


def test_recovered_difference_carries_the_spread_of_the_random_control():
    rng = np.random.default_rng(0)
    n = 400
    clean, mean = np.ones(n), (rng.random(n) < 0.5).astype(float)
    wrong = np.flatnonzero(mean == 0)
    # 20 random subsets: each recovers a different share of the drop (0 to 95%)
    subsets = np.stack([np.where(np.isin(np.arange(n), wrong[: int(f * len(wrong))]), 1.0, mean)
                        for f in np.linspace(0, 0.95, 20)])
    sparse = subsets.mean(0)  # as good as the average subset
    one = P.recovered_difference(clean, mean, sparse, subsets.mean(0))
    each = P.recovered_difference(clean, mean, sparse, subsets)
    assert one["point"] == pytest.approx(each["point"], abs=1e-12)
    w = lambda r: np.subtract(*np.quantile(r["boots"], [0.975, 0.025]))  # noqa: E731
    assert w(each) > 5 * w(one)  # the null's spread is in the interval, not averaged away
