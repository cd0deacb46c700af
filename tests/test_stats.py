import numpy as np
import pytest
from scipy import stats as sps

from so2lib import stats as S


def test_bh_and_wilson_known_values():
    adj = S.benjamini_hochberg(np.array([0.01, 0.04, 0.03, np.nan]))
    np.testing.assert_allclose(adj[:3], [0.03, 0.04, 0.04])
    assert np.isnan(adj[3])
    lo, hi = S.wilson_interval(10, 100)
    assert abs(lo - 0.0552) < 1e-3 and abs(hi - 0.1744) < 1e-3


def test_paired_bootstrap_covers_a_planted_change_and_excludes_zero():
    rng = np.random.default_rng(0)
    before = rng.random(2000) < 0.5
    after = before.copy()
    flip = rng.random(2000) < 0.1
    after[flip & before] = False  # 5-point drop
    r = S.paired_bootstrap(before, after)
    assert r["ci_low"] <= r["change"] <= r["ci_high"] < 0
    same = S.paired_bootstrap(before, before)
    assert same["change"] == same["ci_low"] == same["ci_high"] == 0
    with pytest.raises(ValueError):
        S.paired_bootstrap(before, after[:10])


def test_mcnemar_matches_binomtest():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    b = np.array([0, 0, 0, 0, 1, 1, 0, 0], bool)
    r = S.mcnemar_exact(a, b)
    assert (r["gained"], r["lost"]) == (1, 4)
    assert r["p"] == pytest.approx(sps.binomtest(1, 5, 0.5).pvalue)
    assert S.mcnemar_exact(a, a)["p"] == 1.0


def test_top_share_dense_null_fails_and_sparse_passes():
    rng = np.random.default_rng(1)
    dense = (rng.normal(size=(1000, 8)) ** 2).sum(1)
    null = S.top_share_null(1000, 8)
    hi = np.quantile(null, 0.975)
    assert S.top_share(dense) <= hi  # dense effect: not more concentrated than the null
    sparse = dense * 0.01
    sparse[:20] = 100.0  # 2% of problems carry the effect
    assert S.top_share(sparse) > 0.9 > hi


def test_auroc_verdict_and_power():
    assert S.auroc([0, 1, 2, 3], [0, 0, 1, 1]) == 1.0
    assert np.isnan(S.auroc([0, 1], [1, 1]))
    assert S.min_detectable_change(0.5, 5000) < S.min_detectable_change(0.5, 500)
    assert S.permutation_pvalue(9.5, np.arange(10)) == pytest.approx(1 / 11)


def test_three_way_verdict_planted():
    # established: the whole interval beats the target and excludes the control
    assert S.verdict(0.4, 0.6, target=0.3, control=0.1) == "established"
    # an interval that straddles the target is inconclusive, whatever its point estimate
    assert S.verdict(0.25, 0.6, target=0.3) == "inconclusive"
    # excluding the target but not the control: inconclusive
    assert S.verdict(0.4, 0.6, target=0.3, control=0.5) == "inconclusive"
    # wholly on the other side: refuted; within the equivalence margin of the control: refuted
    assert S.verdict(0.1, 0.2, target=0.3) == "refuted"
    assert S.verdict(-0.01, 0.02, target=0.05, control=0.0, margin=0.03) == "refuted"
    assert S.verdict(-0.01, 0.09, target=0.05, control=0.0, margin=0.03) == "inconclusive"
    assert S.verdict(0.1, 0.2, target=0.3, higher_is_better=False) == "established"
    assert S.verdict(float("nan"), 1, 0) == "not testable"


def test_inconclusive_row_prints_its_mde():
    r = S.validation_row("x", 0.02, (-0.03, 0.07), 0.0, 0.0, "how", resampled="problems")
    assert r["verdict"] == "inconclusive"
    assert r["mde"] == pytest.approx(2.8 * 0.1 / 3.92, rel=1e-6)
    assert r["resampled"] == "problems" and r["split"] == "validation"


def test_holm_and_primary_rows():
    adj = S.holm([0.01, 0.04, 0.03, float("nan")])
    assert np.allclose(adj[:3], [0.03, 0.06, 0.06]) and np.isnan(adj[3])
    rows = [S.validation_row("a", 1, (0.5, 1.5), 0, 0, "", resampled="problems", primary=True, p=0.01),
            S.validation_row("b", 1, (0.5, 1.5), 0, 0, "", resampled="problems", primary=True, p=0.06),
            S.validation_row("c", 1, (0.5, 1.5), 0, 0, "", resampled="problems", primary=False, p=0.04)]
    t = S.verdict_table(rows)
    assert list(t.verdict) == ["established", "inconclusive", "established"]
    assert t.p_holm[0] == pytest.approx(0.02) and np.isnan(t.p_holm[2])


def test_problem_bootstrap_row_refits_and_can_fail():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, 400)  # a real effect: established
    point, boots = S.problem_bootstrap(lambda i: x[i].mean(), len(x), n_boot=400)
    assert S.interval_row("m", point, boots, 0.0, 0.0, "", resampled="problems")["verdict"] == "established"
    y = rng.normal(0.0, 1.0, 400)  # no effect: not established
    point, boots = S.problem_bootstrap(lambda i: y[i].mean(), len(y), n_boot=400)
    assert S.interval_row("m", point, boots, 0.0, 0.0, "", resampled="problems")["verdict"] in ("inconclusive", "refuted")
    assert S.interval_row("m", 1.0, np.array([1.0]), 0.0, 0.0, "", resampled="problems")["verdict"] == "not testable"


def test_auroc_columns_equal_auroc_per_column():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    F = np.column_stack([y + rng.normal(size=200), np.round(rng.random(200), 1), -y.astype(float)])
    got = S.auroc_columns(F, y)
    np.testing.assert_array_equal(got, [S.auroc(F[:, i], y) for i in range(3)])
    assert got[2] == 0.0 and np.isnan(S.auroc_columns(F, np.ones(200, bool))).all()


def test_study_holm_adjusts_primary_rows_across_tables_and_only_demotes():
    def table(ps, verdicts, primary):
        return S.verdict_table([S.validation_row(f"m{i}", 1.0, (0.5, 1.5), 0.0, 0.0, "how", resampled="problems", p=p, primary=pr)
                                for i, (p, pr) in enumerate(zip(ps, primary))]).assign(verdict=verdicts)
    a = table([0.01, 0.02, 0.5], ["established", "established", "established"], [True, True, False])
    b = table([0.011, 0.3], ["established", "inconclusive"], [True, True])
    sa, sb = S.study_holm([a, b])
    p_all = S.holm([0.01, 0.02, 0.011, 0.3])
    np.testing.assert_allclose(list(sa.p_holm[:2]) + list(sb.p_holm), p_all)
    # 0.01 * 4 = 0.04 stays established; 0.02 -> 0.04 (step-down: max(0.033, 0.02 * 2)) ... recomputed here
    for df, i, adj in ((sa, 0, p_all[0]), (sa, 1, p_all[1]), (sb, 0, p_all[2])):
        assert df.verdict[i] == ("established" if adj < 0.05 else "inconclusive")
    assert sa.verdict[2] == "established" and sb.verdict[1] == "inconclusive"  # not primary; never promoted
    # planted: four primaries each at p = 0.02 pass alone (per table of one) but not together
    t4 = [table([0.02], ["established"], [True]) for _ in range(4)]
    assert all(t.verdict[0] == "established" for t in t4)
    assert all(t.verdict[0] == "inconclusive" for t in S.study_holm(t4))


def test_a_row_must_name_the_unit_its_interval_resamples():
    # no default label: a row that bootstrapped neurons cannot be labelled "problems" by omission
    with pytest.raises(TypeError, match="resampled"):
        S.validation_row("m", 0.5, (0.4, 0.6), 0.0, 0.0, "how")
    with pytest.raises(TypeError, match="resampled"):
        S.interval_row("m", 0.5, np.array([0.4, 0.5, 0.6]), 0.0, 0.0, "how")
    r = S.not_measurable("m", "how", "nothing")  # no interval: nothing resampled
    assert r["resampled"] == S.NOT_RESAMPLED and r["verdict"] == "not testable"


def test_a_description_row_tests_nothing():
    r = S.describe(S.validation_row("m", 0.5, (0.4, 0.6), 0.0, 0.0, "how", resampled="problems", primary=True))
    assert r["verdict"] == "description" and not r["primary"] and r["ci_low"] == 0.4
    nt = S.describe(S.not_measurable("m", "how", "nothing"))
    assert nt["verdict"] == "not testable"
