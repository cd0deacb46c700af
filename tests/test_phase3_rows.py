"""Phase 3's verdict rows on planted data: each control bites (planted data that must pass, and
data that must fail), and every interval resamples problems."""

import numpy as np
import pandas as pd
import pytest
import torch

from so2lib.phases import characterize as C
from so2lib.phases import phase3_rows as R
from so2lib.phases import protocol as P
from so2lib.stats import TABLE_COLUMNS, VERDICTS

# ----------------------------------------------------------------------------- a synthetic readout
# Each problem relies on the neurons' effects: its logit margin is 0.3 + 0.5 eps - (sum of the
# effects' contributions) + (sum of the contributions after the edit); an edit that removes what
# the problem needed makes it wrong. ``contrib [N, n]`` are the clean contributions.


def outcomes(contrib: np.ndarray, edited: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    eps = np.random.default_rng(seed + 99).normal(size=len(contrib))
    base = 0.3 + 0.5 * eps - contrib.sum(1)
    out = {"clean_correct": base + contrib.sum(1) > 0}
    for name, e in edited.items():
        out[f"{name}_correct"] = base + e.sum(1) > 0
    return out


def sparsity_outcomes(train: np.ndarray, val: np.ndarray, share: float = 0.02) -> dict[str, np.ndarray]:
    """CLIP's edits on scalar per-neuron contributions (the effect along the readout)."""
    mean = train.mean(0)
    thr = C.significance(np.abs(train - mean), share)
    sig = np.abs(val - mean) > thr
    out = outcomes(val, {"mean": np.broadcast_to(mean, val.shape), "ablate_significant": np.where(sig, mean, val),
                         "ablate_insignificant": np.where(sig, val, mean)})
    out["significant_share"] = sig.mean(1)
    return out


def test_clip_sparsity_dense_laplace_fails_planted_sparse_passes():
    rng = np.random.default_rng(0)
    N, n = 2000, 50
    dense = sparsity_outcomes(rng.laplace(0.1, 0.1, (N, n)), rng.laplace(0.1, 0.1, (N, n)))

    def sparse_effects():
        e = np.zeros((N, n))
        on = rng.random((N, n)) < 0.015
        e[on] = rng.uniform(3, 6, on.sum())
        return e
    sparse = sparsity_outcomes(sparse_effects(), sparse_effects())
    d = {r["measure"]: r for r in R.clip_sparsity_rows([dense], "L", 500)}
    s = {r["measure"]: r for r in R.clip_sparsity_rows([sparse], "L", 500)}
    sig, insig = "L: drop(ablate significant) / drop(mean)", "L: drop(ablate insignificant) / drop(mean)"
    # dense and heavy-tailed: the insignificant 98% carry most of the drop (refuted); the significant
    # 2% are heavy enough that their own row is not established either (accuracy is not linear in the effect)
    assert d[insig]["verdict"] == "refuted" and d[sig]["verdict"] != "established", (d[sig], d[insig])
    assert s[sig]["verdict"] == "established" and s[insig]["verdict"] == "established", (s[sig], s[insig])
    assert s[sig]["target"] == "> 0.5" and s[insig]["target"] == "< 0.25"
    for r in list(d.values()) + list(s.values()):
        assert r["resampled"].startswith("problems") and r["split"] == "validation"
    # pooled over two layers: the same verdicts
    pooled = {r["measure"]: r["verdict"] for r in R.clip_sparsity_rows([sparse, sparse], "L", 300)}
    assert pooled[sig] == "established"


def test_clip_sparsity_not_testable_without_a_drop():
    N = 300
    ok = np.ones(N, bool)
    per = {k: ok for k in ("clean_correct", "mean_correct", "ablate_significant_correct",
                           "ablate_insignificant_correct")}
    per["significant_share"] = np.full(N, 0.02)
    rows = R.clip_sparsity_rows([per], "L", 200)
    assert all(r["verdict"] == "not testable" and "includes 0" in r["how"] for r in rows)


def test_drop_ratio_matches_direct_computation():
    rng = np.random.default_rng(1)
    c, m, a = (rng.random((100, 2)) < p for p in (0.9, 0.5, 0.7))
    r = R.drop_ratio(c, a, c, m, 50)
    assert r["point"] == pytest.approx(((c.astype(float) - a).mean(0).sum()) / ((c.astype(float) - m).mean(0).sum()))


def test_drop_ratio_refits_carry_the_fit_variability():
    """Refits equal to the fit leave the replicates unchanged; refits whose edits vary (a fit that
    moves with the training sample) widen the interval, and the point stays the fit's."""
    rng = np.random.default_rng(2)
    N = 400
    c = rng.random((N, 1)) < 0.9
    m = c & (rng.random((N, 1)) < 0.6)
    a = np.where(rng.random((N, 1)) < 0.5, c, m)
    fixed = R.drop_ratio(c, a, c, m, 400, seed=3)
    same = R.drop_ratio(c, a, c, m, 400, seed=3, refits=[(c, a, m)] * 5)
    np.testing.assert_array_equal(fixed["boots"], same["boots"])
    moved = []
    for r in range(20):  # the edit's readout under refit r: another random half of the drop recovered
        g = np.random.default_rng(100 + r)
        moved.append((c, np.where(g.random((N, 1)) < g.uniform(0.2, 0.8), c, m), m))
    wide = R.drop_ratio(c, a, c, m, 400, seed=3, refits=moved)
    assert wide["point"] == fixed["point"]
    width = lambda b: np.subtract(*np.nanquantile(b, [0.975, 0.025]))
    assert width(wide["boots"]) > 1.5 * width(fixed["boots"])
    # the rows say which intervals refit
    per = sparsity_outcomes(rng.laplace(size=(500, 20)), rng.laplace(size=(N, 20)))
    rows = R.clip_sparsity_rows([per], "L", 100, refits=[[per] * 3])
    assert all("refits the training fit" in r["how"] for r in rows)
    assert all("held fixed" in r["how"] for r in R.clip_sparsity_rows([per], "L", 100))


# ----------------------------------------------------------------------------- rank-1 beyond its controls


def rank1_outcomes(kind: str, seed: int = 0, pc1_random: bool = False) -> dict[str, np.ndarray]:
    """Coefficient-space effects of ``n`` neurons (G = I, readout vectors ``q``), CLIP's rank-1
    edits with the protocol's own fit and controls. ``kind``: ``rank1`` (centred effects along one
    direction per neuron) or ``isotropic``. ``pc1_random``: replace the fitted PC1 by a random
    direction (what a useless PC1 would do)."""
    g = torch.Generator().manual_seed(seed)
    N, K, n = 2000, 6, 10
    G = torch.eye(K).expand(n, K, K).clone()
    direction = torch.nn.functional.normalize(torch.randn(K, n, generator=g), dim=0)
    mean_dir = torch.nn.functional.normalize(torch.randn(K, n, generator=g), dim=0)
    q = torch.randn(K, n, generator=g)

    def coefs():
        if kind == "rank1":
            dc = torch.randn(N, 1, n, generator=g) * direction[None] + 0.01 * torch.randn(N, K, n, generator=g)
        else:
            dc = torch.randn(N, K, n, generator=g)
        return dc + 0.5 * mean_dir[None]
    fit = P.fit_from_coefficients(coefs(), G, 0.02)
    ctrl = P.control_directions(G, fit["mean"], seed)
    v = ctrl["random"].roll(1, dims=1) if pc1_random else fit["v"]
    cv = coefs()
    dc = cv - fit["mean"]

    def contrib(x):
        return torch.einsum("bkn,kn->bn", x, q).numpy()

    def rank1(u):
        a = torch.einsum("bkn,kn->bn", dc, u)
        return contrib(a[:, None] * u[None])
    return outcomes(contrib(dc), {"mean": np.zeros((N, n)), "rank1": rank1(v), "rank1_random": rank1(ctrl["random"]),
                                  "rank1_mean_direction": rank1(ctrl["mean_direction"])})


def test_rank1_planted_passes_random_direction_fails():
    name = "L: rank-1 recovered share, PC1 minus random direction in span"
    mean_name = "L: rank-1 recovered share, PC1 minus mean-effect direction"
    planted = {r["measure"]: r for r in R.rank1_rows([rank1_outcomes("rank1")], "L", 500, margin=0.05)}
    assert planted[name]["verdict"] == "established" and planted[mean_name]["verdict"] == "established"
    for kind, pc1_random in (("rank1", True), ("isotropic", False)):
        rows = {r["measure"]: r for r in R.rank1_rows([rank1_outcomes(kind, 1, pc1_random)], "L", 500, margin=0.05)}
        assert rows[name]["verdict"] in ("refuted", "inconclusive"), (kind, rows[name])
        assert rows[name]["mde"] > 0 and rows[name]["resampled"].startswith("problems")
    prim = R.rank1_rows([rank1_outcomes("rank1")], "L", 100, primary=("random",))
    assert [r["primary"] for r in prim] == [True, False]


def test_control_directions_are_unit_and_in_span():
    g = torch.Generator().manual_seed(2)
    K, n, dm = 5, 4, 3  # rank-deficient span: K > d_model
    M = torch.randn(n, K, dm, generator=g)
    G = M @ M.transpose(1, 2)
    mean = torch.randn(K, n, generator=g)
    c = P.control_directions(G, mean, 0)
    for key in ("random", "mean_direction"):
        torch.testing.assert_close(torch.einsum("kn,nkj,jn->n", c[key], G, c[key]), torch.ones(n), atol=1e-4, rtol=1e-4)
    u_mean = torch.einsum("nkd,kn->nd", M, c["mean_direction"])
    u_true = torch.nn.functional.normalize(torch.einsum("nkd,kn->nd", M, mean), dim=1)
    torch.testing.assert_close(u_mean, u_true, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(c["random"], P.control_directions(G, mean, 1)["random"])


def test_random_control_is_uniform_in_the_span():
    """Full-rank spans take the Cholesky path: over many draws the effect-space direction
    ``u = M^T v`` has second moment ``P / r`` (``P`` the projector on the span, ``r`` its rank), as a
    uniform direction on the span's sphere does; the naive ``z / sqrt(z^T G z)`` is not uniform."""
    g = torch.Generator().manual_seed(5)
    K, dm, n = 4, 7, 4000
    M1 = torch.randn(K, dm, generator=g, dtype=torch.float64) * torch.tensor([4.0, 1.0, 0.5, 0.2])[:, None].double()
    M = M1.expand(n, K, dm)
    G = (M @ M.transpose(1, 2)).float()
    c = P.control_directions(G, torch.ones(K, n), 0)
    u = torch.einsum("nkd,kn->nd", M.float(), c["random"])
    torch.testing.assert_close(u.norm(dim=1), torch.ones(n), atol=1e-4, rtol=1e-4)
    Q = torch.linalg.qr(M1.T.float())[0]  # [dm, K] orthonormal basis of the span
    target = Q @ Q.T / K
    assert (u.T @ u / n - target).abs().max() < 0.03
    z = torch.randn(n, K, generator=g)
    naive = z / torch.einsum("nk,nkj,nj->n", z, G, z).sqrt()[:, None]
    un = torch.einsum("nkd,nk->nd", M.float(), naive)
    assert (un.T @ un / n - target).abs().max() > 0.05  # planted: a non-uniform draw fails


# ----------------------------------------------------------------------------- PC1 structure


def structure(kind: str, seed: int = 0, N: int = 3000, K: int = 6, s: int = 12, dm: int = 16):
    """``stats[layer]["structure"]`` for planted coefficients. ``fixed``: activation times a fixed
    vector; ``two``: a fixed mean along one direction, the varying part along another; ``topk``:
    isotropic small effects, the top problems large along one direction."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(s, K, dm, generator=g)
    G = M @ M.transpose(1, 2)
    f = torch.randn(K, s, generator=g)
    h = torch.randn(K, s, generator=g)

    def coefs(n):
        if kind == "fixed":
            a = 1 + torch.rand(n, 1, s, generator=g).exp()
            return a * f[None] + 1e-3 * torch.randn(n, K, s, generator=g)
        if kind == "two":
            return 3 * f[None] + torch.randn(n, 1, s, generator=g) * h[None] + 0.05 * torch.randn(n, K, s, generator=g)
        c = 0.1 * torch.randn(n, K, s, generator=g)
        big = torch.rand(n, 1, s, generator=g) < 0.03
        return c + big * (2 + torch.rand(n, 1, s, generator=g)) * h[None]
    ct, cv = coefs(N), coefs(1000)
    fit = P.fit_from_coefficients(ct, G, 0.02)
    return {"coef_train": ct, "coef_val": cv, "G": G, "mean": fit["mean"], "v": fit["v"], "M": M}


def test_pc1_beyond_mean_fixed_vector_fails_two_directions_pass():
    mean_row = "L: PC1 share minus mean-effect direction"
    null_row = "L: PC1 share minus activation-only null's PC1"
    fixed = {r["measure"]: r for r in R.structure_rows([R.structure_arrays(structure("fixed"))], "L", 300, 30)}
    two = {r["measure"]: r for r in R.structure_rows([R.structure_arrays(structure("two"))], "L", 300, 30)}
    topk = {r["measure"]: r for r in R.structure_rows([R.structure_arrays(structure("topk"))], "L", 300, 30)}
    assert fixed[mean_row]["verdict"] == "refuted", fixed[mean_row]  # within the equivalence margin of 0
    assert fixed[null_row]["verdict"] == "refuted", fixed[null_row]
    assert two[mean_row]["verdict"] == "established", two[mean_row]
    assert topk[null_row]["verdict"] == "established", topk[null_row]
    # the ceiling ratio: a rank-1 effect reaches the validation set's own PC1
    ceil = "L: training PC1 share / validation's own PC1 share"
    assert fixed[ceil]["measured"] == pytest.approx(1.0, abs=1e-3) and fixed[ceil]["verdict"] == "established"
    for rows in (fixed, two, topk):
        assert all(r["resampled"].startswith("problems") for r in rows.values())


def test_structure_refits_equal_the_fixed_fit_on_the_full_sample_and_widen_the_interval(monkeypatch):
    st = structure("two")
    a = R.structure_arrays(st, n_refit=0)
    assert "boot" not in a
    # a refit on the full training sample (no resampling) and unit validation weights is the fit itself
    orig = R._boot_idx
    monkeypatch.setattr(R, "_boot_idx", lambda n, b, seed: np.tile(np.arange(n), (b, 1)))
    bt = R.structure_refits(st, 0.02, 0, n_refit=1, n_boot=1)
    monkeypatch.setattr(R, "_boot_idx", orig)
    for key in ("pc1", "mean_direction", "other", "null_pc1"):
        np.testing.assert_allclose(bt[key][0], a[key].sum(0) / a["energy"].sum(0), rtol=1e-4, atol=1e-6)
    # with resampling: refitted replicates, the same for any thread count, and a wider interval than
    # the one that holds the training fits fixed
    r1 = R.structure_refits(st, 0.02, 0, n_refit=8, n_boot=200)
    from so2lib.phases import linalg
    monkeypatch.setenv("SO2LIB_WORKERS", "1")
    r2 = R.structure_refits(st, 0.02, 0, n_refit=8, n_boot=200)
    assert all(np.array_equal(r1[k], r2[k]) for k in ("pc1", "other")) and linalg.workers() == 1
    b = R.structure_arrays(st, n_refit=8, n_boot=200)
    name = "L: PC1 share minus mean-effect direction"
    fixed = next(r for r in R.structure_rows([a], "L", 200, 10) if r["measure"] == name)
    refit = next(r for r in R.structure_rows([b], "L", 200, 10) if r["measure"] == name)
    assert refit["measured"] == pytest.approx(fixed["measured"])
    assert "refitted" in refit["resampled"] and "fixed" in fixed["how"]
    assert refit["ci_high"] - refit["ci_low"] >= 0.9 * (fixed["ci_high"] - fixed["ci_low"])


def test_pc1_structure_needs_enough_top_problems_and_excludes_dead_neurons():
    few = R.structure_arrays(structure("two", N=1000))  # k = 20 < 50
    rows = R.structure_rows([few], "L", 50, 10)
    assert all(r["verdict"] == "not testable" and "too few top problems" in r["how"] for r in rows)
    st = structure("two")
    for key in ("coef_train", "coef_val"):
        st[key][..., 0] = 0.0  # a dead neuron: no variance at all
    st["mean"][:, 0] = 0.0
    a = R.structure_arrays(st)
    assert not a["keep"][0] and a["keep"][1:].all()


def test_activation_only_null_keeps_energies():
    st = structure("topk")
    dc = st["coef_train"] - st["mean"]
    null = R.activation_only(dc, st["G"], 0)
    torch.testing.assert_close(R._quad(null, st["G"]), R._quad(dc, st["G"]), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- energy share, concentration


def test_energy_share_dense_laplace_fails_sparse_passes():
    rng = np.random.default_rng(3)
    N, n, d = 500, 10, 8
    u = rng.normal(size=(n, d))
    tr = rng.laplace(size=(N, n, 1)) * u
    dense = rng.laplace(size=(N, n, 1)) * u
    r = R.energy_share_row({0: tr}, {0: dense}, n_boot=300)
    # a description: no verdict either way, but its interval still tells dense from sparse
    assert r["verdict"] == "description" and not r["primary"] and not r["ci_low"] > 0, r
    sparse = 0.01 * dense
    sparse[:10] += 20 * rng.normal(size=(10, n, d))
    r = R.energy_share_row({0: tr * 0.01}, {0: sparse}, n_boot=300)
    assert r["verdict"] == "description" and r["ci_low"] > 0 and r["resampled"].startswith("problems"), r


def test_concentration_row_not_testable_passes_and_fails():
    rng = np.random.default_rng(4)
    N, L, H = 1000, 7, 2

    def split(drops):
        clean = np.ones(N, bool)
        return {"clean": clean, "ablated": np.stack([rng.random(N) > d for d in drops], 1)}
    conc = [0.3, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0]
    r, chosen = R.concentration_row(split(conc), split(conc), L, H, 2, 500)
    assert chosen == [0, 3] and r["verdict"] == "established", r
    spread = [0.1] * 7
    r, _ = R.concentration_row(split(conc), split(spread), L, H, 2, 500)
    assert r["verdict"] == "refuted", r
    r, _ = R.concentration_row(split(conc), split(conc), 4, H, 2, 100)  # 2 of 3 layers: more than half
    assert r["verdict"] == "not testable" and "more than half" in r["how"]


# ----------------------------------------------------------------------------- the whole table


def test_validation_table_rows_resample_problems_and_name_primaries():
    rng = np.random.default_rng(5)
    L, H, N = 4, 2, 400
    frames = []
    for l in range(L - 1):
        tr, va = rng.laplace(0.1, 0.3, (N, 8)), rng.laplace(0.1, 0.3, (N, 8))
        pp = sparsity_outcomes(tr, va)
        pp.update({k: v for k, v in rank1_outcomes("rank1", l).items() if k.startswith("rank1")})
        pp = {k: np.asarray(v)[:N] for k, v in pp.items()}
        frames.append(pd.DataFrame({"layer": l, "neurons": "all", "problem": np.arange(N), **pp}))
    per = pd.concat(frames, ignore_index=True)
    structure_df = pd.DataFrame([dict(r, layer="critical") for r in R.structure_rows(
        [R.structure_arrays(structure("two"))], "critical layers", 100, 10)])
    out = {s: {"clean": np.ones(N, bool), "ablated": rng.random((N, L)) > 0.1} for s in ("train", "val")}
    vt = {0: rng.normal(size=(N, 3, 8))}
    vv = {0: rng.normal(size=(N, 3, 8))}
    df = C.validation_table(per, structure_df, out, vt, vv, [0, 2], L, H, n_boot=200)
    assert list(df.columns) == TABLE_COLUMNS
    assert df.resampled.str.startswith("problems").all(), df[["measure", "resampled"]]
    assert (df.split == "validation").all()
    assert set(df.measure[df.primary]) == set(C.PRIMARY)
    assert df.p_holm[df.primary].notna().all()
    assert set(df.verdict) <= set(VERDICTS)
