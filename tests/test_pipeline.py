"""Phases 1-2 end to end on the embedded model (small problem counts), resume and errors."""

import numpy as np
import pytest

from so2lib.stats import TABLE_COLUMNS, VERDICTS
import torch

from so2lib.phases import characterize, concepts, effects, selection, study
from so2lib.engine.capture import capture_batch
from so2lib.phases.effects import compute_effects, correctness_direction, load_effects
from so2lib.engine.second_order import SecondOrderEngine, second_order_effects


@pytest.fixture(scope="module")
def phase2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    setup = study.open_run(str(run_dir), None, n_train=120, n_val=60, seed=0, device="cpu",
                              batch_size=16, progress=False)
    res1 = selection.setup_and_selection(setup, top_k_layers=2, top_n_neurons=5, progress=False)
    res2 = effects.second_order_phase(setup, progress=False)
    return setup, res1, res2


def test_phase1_outputs(phase2):
    setup, res1, _ = phase2
    acc = res1["accuracy"]
    assert set(acc.split) == {"train", "val"}
    assert len(res1["critical_layers"]) == 2
    assert max(res1["critical_layers"]) < setup.model.cfg.n_layers - 1
    assert all(len(v) == 5 for v in res1["selected"].values())
    m = setup.run.manifest
    for key in ("model", "data", "versions", "timings", "artifacts", "config"):
        assert key in m
    assert m["data"]["n_val"] == 60 and m["config"]["seed"] == 0


def test_phase2_arrays_match_the_public_function(phase2):
    setup, _, res2 = phase2
    model, run = setup.model, setup.run
    crit, selected = selection.load_selection(run)
    l = crit[0]
    vec = load_effects(run, "val", f"vectors_L{l}")
    x, T = setup.enc["val"].batch(range(10))
    ref = second_order_effects(model, x, T, l, selected[l])
    np.testing.assert_allclose(vec[:10].astype(np.float32), ref.numpy(), rtol=2e-2, atol=2e-3)  # float16 storage
    # projected arrays against the vectors projected by hand
    lab = setup.labels["val"]
    eng = SecondOrderEngine(model, correctness_dir=res2["correctness_direction"])
    rows = capture_batch(model, x, T, [l])
    U = eng.directions(torch.as_tensor(lab.gold_token.values[:10]), torch.as_tensor(lab.alt_token.values[:10]))
    U = U / rows.final_scale[:, None, None]
    full = eng.vectors(rows, l)
    ld = torch.einsum("bnm,bm->bn", full, U[:, 0]).numpy()
    cd = torch.einsum("bnm,bm->bn", full, U[:, 1]).numpy()
    np.testing.assert_allclose(load_effects(run, "val", "second_ld")[:10, l], ld, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(load_effects(run, "val", "second_cd")[:10, l], cd, rtol=1e-4, atol=1e-5)
    last = model.cfg.n_layers - 1
    assert np.abs(load_effects(run, "val", "second_ld")[:, last]).max() == 0


def test_correctness_direction_from_training_split(phase2):
    setup, _, res2 = phase2
    cd = setup.run.load("correctness_direction")
    ok = setup.labels["train"].correct.values
    normed = cd["final_normed_train"]
    tasks = np.array([p.task for p in setup.problems.train])
    centred = normed.clone()
    for t in np.unique(tasks):  # within-task centring, written out independently
        m = torch.as_tensor(tasks == t)
        centred[m] -= centred[m].mean(0)
    expect = centred[torch.as_tensor(ok)].mean(0) - centred[torch.as_tensor(~ok)].mean(0)
    torch.testing.assert_close(res2["correctness_direction"], expect)
    with pytest.raises(ValueError, match="incorrect class is empty"):
        correctness_direction(normed[:3], np.ones(3, bool))


def test_interrupted_effects_resume_to_the_same_result(phase2, tmp_path, monkeypatch):
    setup, _, res2 = phase2
    model = setup.model
    from so2lib.runs.rundir import Run
    crit, selected = selection.load_selection(setup.run)
    run = Run(tmp_path / "resume")
    eng = SecondOrderEngine(model, correctness_dir=res2["correctness_direction"])
    real = eng.projected
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(eng, "projected", flaky)
    args = (model, setup.enc["val"], setup.labels["val"], run, "val", res2["correctness_direction"], selected, 16)
    with pytest.raises(KeyboardInterrupt):
        compute_effects(*args, engine=eng, progress=False)
    compute_effects(*args, engine=eng, progress=False)
    assert calls["n"] == 5  # 4 batches of 16 for 60 problems: 2 done, 1 failed, 2 left on resume
    for k in ("second_ld", "direct_cd", f"vectors_L{crit[0]}"):
        np.testing.assert_array_equal(load_effects(run, "val", k), load_effects(setup.run, "val", k))


def test_reopening_a_run_with_other_settings_is_refused(phase2):
    setup, _, _ = phase2
    with pytest.raises(ValueError, match="another run directory"):
        study.open_run(str(setup.run.path), None, n_train=999, n_val=60, device="cpu", progress=False)


def test_phases_3_and_4_run_and_report(phase2):
    setup, _, _ = phase2
    res3 = characterize.characterization_phase(setup, share=0.05, progress=False)
    table = res3["validation"]
    assert list(table.columns) == TABLE_COLUMNS
    assert set(table.verdict) <= set(VERDICTS) and len(table) >= 3
    assert table.resampled.str.startswith("problems").all() and table.primary.sum() == len(characterize.PRIMARY)
    assert res3["concentration"].magnitude_share.sum() == pytest.approx(1.0)
    res4 = concepts.decomposition_phase(setup, m=8, progress=False)
    q = res4["quality"]
    assert set(q.dictionary) >= {"read-out (lexicon)", "data (metadata)", "read-out + data",
                                 "vocabulary (generic pool)"}
    assert q.cosine.between(-1, 1.000001).all()
    assert len(res4["cards"]) == 10
    assert set(res4["replacement"].replacement) >= {"clean", "rank1", "sparse"}


def test_phase4_and_phase5_tables_never_crash(phase2):
    """Small data: most phase-5 checks cannot be measured here; each must be a row that says why."""
    from so2lib.phases import applications

    setup, _, _ = phase2
    if not setup.run.has("validation_table"):
        characterize.characterization_phase(setup, share=0.05, progress=False)
    cols = TABLE_COLUMNS
    res4 = concepts.decomposition_phase(setup, m=8, progress=False)
    assert list(res4["table"].columns) == cols and len(res4["table"]) == 7
    assert list(setup.run.load("decomposition_table").columns) == cols
    res5 = applications.applications_phase(setup, k_edit=2, n_random_sets=2, n_perm=50, n_draws=3, progress=False)
    t = res5["table"]
    assert list(t.columns) == cols and len(t) >= 10
    assert set(t.verdict) <= set(VERDICTS)
    assert all("not measurable" in h for h, v in zip(t.how, t.verdict) if v == "not testable")
    # no interval of the phase 4/5 tables resamples a fully enumerated set of neurons alone
    for tab in (res4["table"], t):
        assert applications.neuron_only_rows(tab) == [], tab[["measure", "resampled"]]
    planted = t.copy()
    planted.loc[0, ["ci_low", "ci_high", "resampled"]] = [0.1, 0.2, "neurons"]
    assert applications.neuron_only_rows(planted) == [planted.measure[0]]
    # the primary rows of phase 5 are named in the table (Holm-adjusted together)
    prim = set(t.measure[t.primary.astype(bool)])
    assert {"correctness direction: within-task AUROC minus best label-free baseline",
            "editing: accuracy change on the error class, chosen minus random sets (validation)"} <= prim
    assert "split" in t and (t.split == "training").any()
    assert setup.run.has("applications_table")
    for tab in (res4["table"], t, setup.run.load("validation_table")):  # an estimate lies in its own interval
        ok = tab.dropna(subset=["measured", "ci_low", "ci_high"])
        assert ((ok.ci_low <= ok.measured + 1e-9) & (ok.measured <= ok.ci_high + 1e-9)).all(), ok[["measure", "measured", "ci_low", "ci_high"]]
    assert res5["editing"].get("reason") or 1.0 in set(res5["editing_curve"].factor)


def test_explorer_static_and_interactive(phase2, monkeypatch):
    from so2lib.views import explorer

    setup, res1, _ = phase2
    l = res1["critical_layers"][0]
    n = res1["selected"][l][0]
    v = explorer.neuron_view(setup, l, n)
    assert "span" in v["top_html"] and v["magnitudes"]["mean |second-order|"] >= 0
    monkeypatch.setenv("SO2LIB_HEADLESS", "1")
    assert explorer.explorer(setup, None, default=(l, n)) is None  # static output, no widgets
    box = explorer.explorer(setup, None, default=(l, n), interactive=True)
    assert box is not None and len(box.children) == 2


def test_editing_random_sets_rest_sample_matches_one_set_at_a_time(phase2, monkeypatch):
    """The random sets run on the error class all, and on the rest sample only the first
    RANDOM_REST_SETS: their class change and rest change equal each set edited on its own."""
    from so2lib.phases.applications import phase as ap
    from so2lib.phases.applications.editing import edit_labels, random_sets_like

    setup, _, _ = phase2
    monkeypatch.setattr(ap, "RANDOM_REST_SETS", 1)
    monkeypatch.setattr(ap, "RANDOM_REST", 6)
    # the small run has no class large enough for error_class's power floors: take the largest one
    from collections import Counter

    def largest(cls_tr, ok_tr, cls_va):
        return Counter(cls_va).most_common(1)[0][0], ""
    monkeypatch.setattr(ap, "error_class", largest)
    ed = ap._editing(setup, k_edit=2, factors=(0.0, 1.0), n_random_sets=3, seed=0)
    assert not ed["reason"], ed["reason"]
    assert ed["n_random_sets_on_rest"] == 1 and ed["n_rest_sample"] == 6
    b = ed["at_best"]
    chosen = {int(k): v for k, v in ed["neurons"].items()}
    sets = random_sets_like(chosen, setup.model.cfg.d_mlp, 3, 0)
    cls_tr = [(p.task, study.difficulty(p)) for p in setup.problems.train]
    cls_va = [(p.task, study.difficulty(p)) for p in setup.problems.val]
    target, _ = largest(cls_tr, None, cls_va)
    in_va = np.array([c == target for c in cls_va])
    enc = setup.enc["val"]
    rest = np.flatnonzero(~in_va)
    rest = np.sort(np.random.default_rng(0).choice(rest, 6, replace=False))
    f = ed["factor_chosen_on_train"]
    cls = np.flatnonzero(in_va)
    clean_c = edit_labels(setup.model, enc.subset(cls), chosen, 1.0).correct.values.astype(float)
    ch = [edit_labels(setup.model, enc.subset(cls), s, f).correct.values.astype(float) - clean_c for s in sets]
    assert b["random_class_change_mean"] == pytest.approx(float(np.mean(ch)), abs=1e-9)
    clean_r = edit_labels(setup.model, enc.subset(rest), chosen, 1.0).correct.values.astype(float)
    one = edit_labels(setup.model, enc.subset(rest), sets[0], f).correct.values.astype(float) - clean_r
    assert b["random_rest_change_mean"] == pytest.approx(float(one.mean()), abs=1e-9)


def test_bench_protocol_times_the_protocol_with_and_without_refits(phase2, tmp_path):
    import shutil
    from so2lib import bench

    setup, _, _ = phase2
    d = tmp_path / "copy"
    shutil.copytree(setup.run.path, d, ignore=shutil.ignore_patterns(".lock", ".manifest.lock"))
    r = bench.bench_protocol(str(d), None, 20, 10, [0], n_refit=2, batch_size=8)
    assert r["plain_s"] > 0 and r["refit_s"] > 0 and r["refit_over_plain"] > 0 and r["layers"] == [0]
