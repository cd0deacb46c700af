"""Polysemanticity (Phase 5): a neuron whose strong concepts come from two or more unrelated
category groups (:data:`RELATED`), on concept cards (:func:`polysemanticity`) and on sparse codes
against random directions in each neuron's span, with problems resampled and a sensitivity curve
over the coefficient threshold (:func:`polysemanticity_test`, :func:`polysemanticity_rows`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from so2lib.stats import not_measurable, validation_row as row, wilson_interval

RELATED = [{"digits and number words", "number properties"}, {"operations", "procedure", "symbols"},
           {"comparison"}, {"algebra"}, {"logic connectives and quantifiers"}, {"errors"}, {"vocabulary"}]


def category_group(category: str) -> int:
    for g, cats in enumerate(RELATED):
        if category in cats:
            return g
    return len(RELATED)


def polysemanticity(cards: dict[tuple[int, int], pd.DataFrame], threshold: float = 0.15) -> pd.DataFrame:
    """A neuron is polysemantic when concepts with |coefficient| >= ``threshold`` come from two
    or more unrelated category groups (:data:`RELATED`). One row per neuron."""
    rows = []
    for (l, n), card in cards.items():
        strong = card[card.coefficient.abs() >= threshold]
        groups = sorted({category_group(c) for c in strong.category})
        rows.append({"layer": l, "neuron": n, "n_strong": len(strong), "groups": len(groups),
                     "categories": sorted(set(strong.category)), "polysemantic": len(groups) >= 2})
    return pd.DataFrame(rows)


def polysemantic_flags(codes: np.ndarray, categories: Sequence[str], threshold: float = 0.15,
                       top: int = 8) -> np.ndarray:
    """``[n]`` bool: among each code row's ``top`` largest |coefficients| (as a concept card shows),
    those >= ``threshold`` come from two or more unrelated category groups."""
    C = np.abs(np.atleast_2d(codes))
    groups = np.array([category_group(k) for k in categories])
    order = np.argsort(-C, axis=1, kind="stable")[:, :top]  # each row's largest |coefficients|
    vals = np.take_along_axis(C, order, 1)
    strong = (vals >= threshold) & (vals > 0)
    g = groups[order]
    lo = np.where(strong, g, np.iinfo(np.int64).max).min(1)
    hi = np.where(strong, g, -1).max(1)
    return strong.any(1) & (lo != hi)  # two or more distinct groups among the strong ones


def random_in_span(bases: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One random unit direction in each neuron's span (``bases[j] [r_j, d]`` orthonormal rows)."""
    out = []
    for B in bases:
        v = rng.normal(size=B.shape[0]) @ B
        out.append(v / max(np.linalg.norm(v), 1e-12))
    return np.stack(out)


def span_basis(vectors: np.ndarray, k: int, tol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis ``[r, d]`` (r <= k) of the span of one neuron's effect vectors ``[N, d]``."""
    X = np.asarray(vectors, np.float64)
    X = X - X.mean(0)
    w, V = np.linalg.eigh(X.T @ X)  # ascending; singular values are sqrt(w)
    w, V = w[::-1], V[:, ::-1]
    s = np.sqrt(np.clip(w, 0, None))
    r = max(1, min(k, int((s > tol * max(s[0], 1e-30)).sum())))
    return V[:, :r].T


THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3)


def polysemanticity_test(vectors: Sequence[np.ndarray], ranks: Sequence[int], dictionary: np.ndarray,
                         categories: Sequence[str], m: int, threshold: float = 0.15, n_draws: int = 20,
                         n_boot: int = 100, thresholds: Sequence[float] = THRESHOLDS, seed: int = 0
                         ) -> dict[str, Any]:
    """Are the neurons' PC1 decompositions *more* polysemantic (strong concepts from >= 2 unrelated
    category groups) than random unit directions in each neuron's own effect span?

    ``vectors[j] [N, d]``: neuron ``j``'s training effect vectors; ``ranks[j]`` the span's
    dimension bound (later heads). The share is descriptive (the neurons are all of them, not a
    sample); its null distribution comes from ``n_draws`` random directions per neuron. The
    interval of *share minus null* resamples the **problems**: each replicate refits every PC1
    and span and redraws the random directions. Also a sensitivity curve of both shares over the
    coefficient ``thresholds``. Returns ``flags``, ``share``, ``null`` (draws), ``point``, ``boots``,
    ``curve`` (DataFrame)."""
    from so2lib.phases.linalg import single_threaded

    with single_threaded():  # many small matrices: threads only contend
        return _poly_test(vectors, ranks, dictionary, categories, m, threshold, n_draws, n_boot, thresholds, seed)


def _poly_test(vectors: Sequence[np.ndarray], ranks: Sequence[int], dictionary: np.ndarray,
               categories: Sequence[str], m: int, threshold: float, n_draws: int, n_boot: int,
               thresholds: Sequence[float], seed: int) -> dict[str, Any]:
    from so2lib.phases.concepts import sparse_codes
    from so2lib.phases.linalg import SpanPCA, map_replicates

    rng = np.random.default_rng(seed)
    spans = SpanPCA(vectors)  # PC1 and span of each resample from its counts (exact, r x r)
    N = spans.N

    def fit(idx: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        comps = spans.components(idx)
        return comps[1][:, 0], spans.bases(ranks, components=comps)
    P, bases = fit(np.arange(N))
    codes = sparse_codes(P, dictionary, m)
    flags = polysemantic_flags(codes, categories, threshold)
    J = len(P)
    draws = np.concatenate([random_in_span(bases, rng) for _ in range(n_draws)])  # one OMP for all draws
    rcodes = list(sparse_codes(draws, dictionary, m).reshape(n_draws, J, -1))
    null = np.array([polysemantic_flags(c, categories, threshold).mean() for c in rcodes])
    curve = pd.DataFrame([{"threshold": t, "share": float(polysemantic_flags(codes, categories, t).mean()),
                           "null_mean": float(np.mean([polysemantic_flags(c, categories, t).mean() for c in rcodes])),
                           "null_q95": float(np.quantile([polysemantic_flags(c, categories, t).mean()
                                                          for c in rcodes], 0.95))} for t in thresholds])
    seeds = rng.integers(0, 2 ** 63 - 1, size=n_boot)  # one generator per replicate: any thread count

    def one(b: int) -> float:
        rb = np.random.default_rng(int(seeds[b]))
        Pb, Bb = fit(rb.integers(0, N, N))
        f = polysemantic_flags(sparse_codes(np.concatenate([Pb, random_in_span(Bb, rb)]), dictionary, m),
                               categories, threshold)
        return float(f[:J].mean() - f[J:].mean())
    boots = map_replicates(one, n_boot, desc="polysemanticity (problem bootstrap)")
    return {"flags": flags, "share": float(flags.mean()), "null": null, "point": float(flags.mean() - null.mean()),
            "boots": np.asarray(boots), "curve": curve}


def polysemanticity_rows(res: dict[str, Any] | None, reason: str = "") -> list[dict[str, Any]]:
    """One row: polysemantic share of the neurons minus random directions of their span (the claim:
    neurons mix unrelated concept groups *more* than chance; higher is better), interval over
    problems; the share itself and the null's spread are in ``how``."""
    from so2lib.stats import interval_row

    m1 = "polysemanticity: share of neurons minus random directions in their span"
    how = ("share of selected neurons whose PC1 decomposition (OMP over the merged read-out + data dictionary) has "
           "strong concepts (|coef| >= threshold among the top 8) from >= 2 unrelated category groups, minus the "
           "share for random unit directions in each neuron's effect span; bootstrap over training problems with "
           "every PC1 and span refitted and the random directions redrawn; descriptive share and null in brackets; "
           "sensitivity over the threshold in polysemanticity_null.curve")
    if res is None:
        return [not_measurable(m1, how, reason, 0.0, split="training")]
    null = np.asarray(res["null"], float)
    return [interval_row(m1, res["point"], np.asarray(res["boots"]), 0.0, 0.0,
                         how + f" (neurons {res['share']:.3f} of {len(res['flags'])}; random directions mean "
                         f"{null.mean():.3f}, 95% range {np.quantile(null, 0.025):.3f}-{np.quantile(null, 0.975):.3f})",
                         split="training", margin=0.05, resampled="problems (training; every PC1 and span refitted)")]


