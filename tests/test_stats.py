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
    assert S.verdict(0.5, 0.4, 0.6, 0.1, 0.3) == "pass"
    assert S.verdict(0.5, 0.05, 0.6, 0.1, 0.3) == "fail"  # CI does not exclude the null
    assert S.verdict(0.2, 0.15, 0.25, 0.1, 0.3) == "fail"  # misses the target
    assert S.verdict(float("nan"), 0, 1, 0, 0) == "not testable"
    assert S.min_detectable_change(0.5, 5000) < S.min_detectable_change(0.5, 500)
    assert S.permutation_pvalue(9.5, np.arange(10)) == pytest.approx(1 / 11)
