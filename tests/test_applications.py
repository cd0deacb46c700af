"""Phase 5 applications on tiny models against direct computations."""

import random

import numpy as np
import pandas as pd
import pytest
import torch

from so2lib.phases import applications as A
from so2lib.data.tasks import gen_addition, make_problem_set


def test_bh_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 0.002, 10), rng.uniform(0, 1, 90)])
    adj = A.benjamini_hochberg(p)
    # direct: adjusted p_(i) = min_{j >= i} p_(j) * m / j, capped at 1
    m = len(p)
    order = np.argsort(p)
    direct = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        direct[i] = running
    np.testing.assert_allclose(adj, direct, rtol=1e-12)
    # rejections at q equal the classic step-up rule
    q = 0.05
    k = max([r for r in range(1, m + 1) if np.sort(p)[r - 1] <= q * r / m], default=0)
    assert (adj <= q).sum() == k


def test_wilson_interval_known_value():
    lo, hi = A.wilson_interval(10, 100)
    assert lo == pytest.approx(0.0552, abs=1e-3) and hi == pytest.approx(0.1744, abs=1e-3)


def test_separating_neurons_finds_the_planted_neuron():
    rng = np.random.default_rng(1)
    N, L, n = 400, 2, 30
    correct = rng.random(N) < 0.5
    eff = rng.normal(size=(N, L, n))
    eff[~correct, 1, 7] += 1.0  # larger on failures
    df = A.separating_neurons(eff, correct, q=0.05)
    hit = df[(df.layer == 1) & (df.neuron == 7)].iloc[0]
    assert hit.discovery and hit.cohens_d > 0.7
    assert df.discovery.sum() <= 3  # few false discoveries among 59 nulls


def test_failure_report_picks_the_most_negative_effects():
    second = np.zeros((3, 2, 4))
    direct = np.zeros((3, 2, 4))
    second[1, 0, 2] = -5
    direct[1, 1, 3] = -3
    probs = make_problem_set(3, 0, seed=0).train
    rep = A.failure_report(second, direct, np.array([True, False, True]), probs, k=2)
    assert rep.problem.unique().tolist() == [1]
    assert rep[["order", "layer", "neuron", "effect"]].values.tolist() == [["second", 0, 2, -5.0], ["first", 1, 3, -3.0]]


def test_polysemanticity_uses_unrelated_groups():
    cards = {(0, 1): pd.DataFrame({"concept": ["21", "even"], "category": ["digits and number words", "number properties"],
                                   "coefficient": [0.5, 0.3]}),
             (0, 2): pd.DataFrame({"concept": ["21", "truth true"], "category": ["digits and number words",
                                                                                 "logic connectives and quantifiers"],
                                   "coefficient": [0.5, -0.3]}),
             (1, 3): pd.DataFrame({"concept": ["21", "and"], "category": ["digits and number words",
                                                                          "logic connectives and quantifiers"],
                                   "coefficient": [0.5, 0.05]})}
    poly = A.polysemanticity(cards, threshold=0.15).set_index(["layer", "neuron"])
    assert not poly.loc[(0, 1), "polysemantic"]  # related categories
    assert poly.loc[(0, 2), "polysemantic"]
    assert not poly.loc[(1, 3), "polysemantic"]  # second concept below the threshold


def test_adversarial_variants_keep_task_digits_and_carry_class():
    rng = random.Random(0)
    src = [gen_addition(random.Random(i)) for i in range(60)]
    keep, tgt, rnd = A.adversarial_variants(src, [21, 36, 70, 5, 123], rng)
    assert keep
    for i, t, r in zip(keep, tgt, rnd):
        p = src[i]
        for v in (t, r):
            assert v.task == p.task and v.compact != p.compact
            assert (v.meta["digits_a"], v.meta["digits_b"]) == (p.meta["digits_a"], p.meta["digits_b"])
            assert v.meta["carry"] == p.meta["carry"]
            assert int(v.answer) == v.meta["a"] + v.meta["b"]
        assert {t.meta["a"], t.meta["b"]} & {21, 36, 70, 5, 123}


def test_scaling_hook_changes_exactly_the_intended_activations(tiny_models):
    model = tiny_models["gpt2"]
    x = torch.randint(2, 300, (2, 7))
    _, clean = model.run_with_cache(x)
    hooks = A.scaling_hooks({1: [3, 10]}, 2.5)
    name = "blocks.1.mlp.hook_post"
    captured = []

    def after(t, hook):
        captured.append(t.detach().clone())
    with model.hooks(fwd_hooks=hooks + [(name, after)]):
        model(x)
    got = captured[0]
    want = clean[name].clone()
    want[..., [3, 10]] *= 2.5
    torch.testing.assert_close(got, want)
    changed = (got != clean[name]).any(dim=(0, 1))
    assert set(torch.nonzero(changed).flatten().tolist()) <= {3, 10}
    # other layers untouched
    with model.hooks(fwd_hooks=hooks):
        _, edited = model.run_with_cache(x)
    torch.testing.assert_close(edited["blocks.0.mlp.hook_post"], clean["blocks.0.mlp.hook_post"])


def test_random_variants_and_neuron_push(tiny_models):
    from so2lib.engine.capture import capture_batch
    from so2lib.data.labels import encode
    from so2lib.engine.second_order import SecondOrderEngine
    from so2lib.data.tasks import Template

    model = tiny_models["gpt2"]
    p = gen_addition(random.Random(5))
    vs = A.random_variants(p, random.Random(0), 6)
    assert 2 <= len(vs) <= 6 and len({v.compact for v in vs}) == len(vs)
    assert all(v.meta["carry"] == p.meta["carry"] for v in vs)
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    eng = SecondOrderEngine(model, correctness_dir=d)
    push = A.neuron_push(model, eng, vs, Template(), {0: [1, 4], 2: [7]}, batch_size=4)
    # independent: full vectors projected on the centred direction, divided by the final scale
    enc = encode(model, vs)
    x, T = enc.batch(range(len(vs)))
    rows = capture_batch(model, x, T, [0, 2])
    u = d - d.mean()
    want = (eng.vectors(rows, 0, torch.tensor([1, 4])).sum(1) + eng.vectors(rows, 2, torch.tensor([7])).sum(1)) @ u
    np.testing.assert_allclose(push, (want / rows.final_scale).numpy(), rtol=1e-4, atol=1e-6)
