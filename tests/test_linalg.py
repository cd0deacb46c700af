"""Batched OMP, span PCA of resamples and the AUROC matrix against independent code paths
(scikit-learn's ``orthogonal_mp``, the per-neuron ``d x d`` PCA, ``stats.auroc`` per pair)."""

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import orthogonal_mp

from so2lib.phases import concepts as K
from so2lib.phases.applications.polysemantic import span_basis
from so2lib.phases.linalg import SpanPCA, omp
from so2lib.stats import auroc


def _unit(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_omp_equals_scikit_learn():
    rng = np.random.default_rng(0)
    D, Y = _unit(rng.normal(size=(300, 64))), rng.normal(size=(120, 64))
    for m in (1, 5, 16):
        got, ref = omp(Y, D, m), orthogonal_mp(D.T, Y.T, n_nonzero_coefs=m).T
        assert ((got != 0) == (ref != 0)).all()
        np.testing.assert_allclose(got, ref, atol=1e-10)


def test_omp_stops_early_as_scikit_learn_on_a_degenerate_dictionary():
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(40, 32)))
    D = np.vstack([base[:5], base[:5], base[5:]])  # duplicated atoms
    Y = rng.normal(size=(30, 3)) @ base[:3]  # exactly 3-sparse
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = orthogonal_mp(D.T, Y.T, n_nonzero_coefs=10).T
    got = omp(Y, D, 10)
    # so2lib stops after the 3 atoms; scikit-learn sometimes adds an atom picked by rounding noise,
    # with a coefficient of rounding size (and a tie between duplicates may break either way)
    assert ((got != 0).sum(1) == 3).all() and ((np.abs(ref) > 1e-12).sum(1) == 3).all()
    np.testing.assert_allclose(got @ D, Y, atol=1e-10)
    np.testing.assert_allclose(ref @ D, Y, atol=1e-10)


def test_omp_differs_from_a_wrong_reference():
    """Planted failure: a different sparsity is not the same code."""
    rng = np.random.default_rng(2)
    D, Y = _unit(rng.normal(size=(100, 32))), rng.normal(size=(10, 32))
    assert not np.allclose(omp(Y, D, 4), orthogonal_mp(D.T, Y.T, n_nonzero_coefs=5).T)
    with pytest.raises(ValueError, match="sparsity"):
        omp(Y, D, 33)


def _low_rank_vectors(rng, n, r, d, J):
    B = rng.normal(size=(r, d))
    return [(rng.normal(size=(n, r)) * rng.uniform(0.1, 3, r)) @ B + rng.normal(size=d) for _ in range(J)]


def test_span_pca_equals_the_per_neuron_pca_of_each_resample():
    rng = np.random.default_rng(3)
    V = _low_rank_vectors(rng, 400, 9, 48, 5) + [rng.normal(size=(400, 48))]  # the last one is full rank
    sp = SpanPCA(V)
    assert sp.rank == 48
    for idx in (None, rng.integers(0, 400, 400)):
        sub = np.arange(400) if idx is None else idx
        P = sp.pc1(idx)
        for j, v in enumerate(V):
            ref = K.pc1_direction(v[sub])
            assert abs(abs(P[j] @ ref) - 1) < 1e-10
        for B, v in zip(sp.bases([6] * 6, idx), V):
            ref = span_basis(v[sub], 6)
            assert B.shape == ref.shape
            np.testing.assert_allclose(np.abs((B * ref).sum(1)), 1, atol=1e-8)


def test_span_pca_keeps_coordinates_small_and_exact():
    rng = np.random.default_rng(4)
    V = _low_rank_vectors(rng, 300, 7, 64, 4)
    sp = SpanPCA(V)
    assert sp.rank == 8  # 7 directions plus the offset
    for j, v in enumerate(V):
        np.testing.assert_allclose(sp.C[j] @ sp.Q[j], v, atol=1e-9)
    # a resample differs from the full set (planted: the bootstrap is not a no-op)
    idx = rng.integers(0, 300, 300)
    assert not np.allclose(sp.scatter(idx), sp.scatter(None))


def test_auroc_matrix_equals_stats_auroc_per_pair():
    rng = np.random.default_rng(5)
    N = 200
    F = np.column_stack([rng.integers(0, 2, N), rng.normal(size=N), rng.integers(0, 4, N),
                         np.ones(N), np.where(rng.random(N) < 0.3, np.nan, rng.normal(size=N))]).astype(float)
    Y = np.column_stack([rng.random(N) < 0.4, F[:, 1] > 0.5, np.zeros(N, bool)])
    A = K.auroc_matrix(F, Y)
    for c in range(F.shape[1]):
        for j in range(Y.shape[1]):
            ok = ~np.isnan(F[:, c])
            f, y = F[ok, c], Y[ok, j]
            ref = np.nan if len(set(y)) < 2 or len(set(f)) < 2 else auroc(f, y)
            if np.isnan(ref):
                assert np.isnan(A[c, j])
            else:
                assert A[c, j] == pytest.approx(ref, abs=1e-12)
    assert A[1, 1] == pytest.approx(1.0)  # a planted perfect predictor


def _predictive_reference(significant, flags, codes, concepts, n_random=20, seed=0):
    """The per-pair implementation predictive_auroc replaced (one stats.auroc per concept)."""
    rng = np.random.default_rng(seed)
    data_idx = [i for i, c in enumerate(concepts) if c.kind == "data" and c.name in flags.columns]
    rows = []
    for j in range(significant.shape[1]):
        y = significant[:, j].astype(bool)
        chosen = [i for i in data_idx if codes[j, i] != 0]
        if not chosen or y.all() or not y.any():
            continue
        top = max(chosen, key=lambda i: abs(codes[j, i]))

        def auc(i):
            f = flags[concepts[i].name].values
            ok = ~np.isnan(f)
            if len(set(y[ok])) < 2 or len(set(f[ok])) < 2:
                return np.nan
            return auroc(f[ok], y[ok])
        a = auc(top)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rand = [auc(int(i)) for i in rng.choice(data_idx, size=min(n_random, len(data_idx)), replace=False)]
            rows.append({"neuron_slot": j, "concept": concepts[top].name, "auroc": a,
                         "auroc_random": float(np.nanmean(rand)) if rand else np.nan,
                         "strength": abs(a - 0.5) if a == a else np.nan,
                         "strength_random": float(np.nanmean([abs(r - 0.5) for r in rand])) if rand else np.nan})
    return pd.DataFrame(rows)


def test_predictive_auroc_equals_the_per_pair_reference():
    rng = np.random.default_rng(6)
    N, C, n = 150, 12, 25
    flags = pd.DataFrame({f"f{c}": np.where(rng.random(N) < 0.2, np.nan, rng.integers(0, 2 + c % 3, N))
                          for c in range(C)}).astype(float)
    flags["const"] = 1.0
    concepts = [K.Concept(f"f{c}", "x", "data") for c in range(C)] + [K.Concept("const", "x", "data"),
                                                                      K.Concept("r", "x", "read-out")]
    codes = rng.normal(size=(n, len(concepts))) * (rng.random((n, len(concepts))) < 0.3)
    sig = rng.random((N, n)) < rng.uniform(0.05, 0.6, n)
    sig[:, 0] = True  # never tested: one class
    for seed in (0, 1):
        got = K.predictive_auroc(sig, flags, codes, concepts, n_random=5, seed=seed)
        ref = _predictive_reference(sig, flags, codes, concepts, n_random=5, seed=seed)
        assert len(got) == len(ref) > 10
        pd.testing.assert_frame_equal(got.reset_index(drop=True), ref.reset_index(drop=True), atol=1e-12)


def _flags_reference(codes, categories, threshold=0.15, top=8):
    """The per-row loop polysemantic_flags replaced."""
    from so2lib.phases.applications.polysemantic import category_group
    cats = np.asarray(categories)
    out = np.zeros(len(codes), bool)
    for j, c in enumerate(np.atleast_2d(codes)):
        nz = np.flatnonzero(c)
        nz = nz[np.argsort(-np.abs(c[nz]))][:top]
        strong = nz[np.abs(c[nz]) >= threshold]
        out[j] = len({category_group(k) for k in cats[strong]}) >= 2
    return out


def test_polysemantic_flags_equal_the_per_row_reference():
    from so2lib.phases.applications.polysemantic import RELATED, polysemantic_flags
    rng = np.random.default_rng(7)
    names = sorted(set().union(*RELATED)) + ["unlisted"]
    cats = [names[i % len(names)] for i in range(60)]
    codes = rng.normal(size=(400, 60)) * (rng.random((400, 60)) < 0.2) * rng.uniform(0, 0.6, (400, 1))
    codes[0] = 0  # no concept at all
    for t in (0.05, 0.15, 0.3):
        got = polysemantic_flags(codes, cats, t)
        assert (got == _flags_reference(codes, cats, t)).all()
        assert 0 < got.mean() < 1 and not got[0]


def test_map_replicates_is_independent_of_the_thread_count_and_restores_threads():
    import torch

    from so2lib.phases.linalg import map_replicates, single_threaded

    rng = np.random.default_rng(0)
    V = [rng.normal(size=(60, 6)) @ rng.normal(size=(6, 9)) for _ in range(5)]
    sp = SpanPCA(V)
    seeds = rng.integers(0, 2 ** 63 - 1, size=12)

    def one(b):
        rb = np.random.default_rng(int(seeds[b]))
        return sp.pc1(rb.integers(0, 60, 60)) @ rb.normal(size=9)
    before = torch.get_num_threads()
    a = map_replicates(one, 12, n_workers=1)
    b = map_replicates(one, 12, n_workers=3)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    assert torch.get_num_threads() == before
    with single_threaded():
        assert torch.get_num_threads() == 1
        map_replicates(one, 4, n_workers=2)  # nested: the outer context still holds
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_omp_never_forms_the_atoms_gram():
    """A whole vocabulary as the dictionary (Gemma-3: 262,144 atoms): the K x K Gram would need
    hundreds of GB; OMP must work from the chosen atoms only."""
    rng = np.random.default_rng(0)
    D = rng.normal(size=(150_000, 4))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Y = rng.normal(size=(3, 4))
    codes = omp(Y, D, 2)
    assert codes.shape == (3, 150_000) and ((codes != 0).sum(1) <= 2).all()
