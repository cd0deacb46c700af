"""Polysemanticity (Phase 5): a neuron whose strong concepts come from two or more unrelated
category groups (:data:`RELATED`), on concept cards (:func:`polysemanticity`) and on sparse codes
against random directions in each neuron's span and random dictionaries
(:func:`polysemanticity_nulls`, :func:`polysemanticity_rows`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..stats import not_measurable, validation_row as row, wilson_interval
from ..progress import tqdm


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
    cats = np.asarray(categories)
    out = np.zeros(len(codes), bool)
    for j, c in enumerate(np.atleast_2d(codes)):
        nz = np.flatnonzero(c)
        nz = nz[np.argsort(-np.abs(c[nz]))][:top]
        strong = nz[np.abs(c[nz]) >= threshold]
        out[j] = len({category_group(k) for k in cats[strong]}) >= 2
    return out


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
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    r = max(1, min(k, int((s > tol * max(s[0], 1e-30)).sum())))
    return Vt[:r]


def polysemanticity_nulls(directions: np.ndarray, bases: Sequence[np.ndarray], dictionary: np.ndarray,
                          categories: Sequence[str], m: int, threshold: float = 0.15, n_draws: int = 5,
                          seed: int = 0) -> dict[str, Any]:
    """Polysemantic share of the neurons' directions (``[n, d]``, OMP with ``m`` atoms over the
    prepared ``dictionary``) against (a) random directions in each neuron's span, same dictionary,
    and (b) random Gaussian dictionaries of the same size whose atoms keep the real categories."""
    from ..concepts import random_dictionary, sparse_codes

    rng = np.random.default_rng(seed)
    real = polysemantic_flags(sparse_codes(directions, dictionary, m), categories, threshold)
    span, rdict = [], []
    for k in tqdm(range(n_draws), desc="polysemanticity nulls (draws)"):
        span.append(polysemantic_flags(sparse_codes(random_in_span(bases, rng), dictionary, m), categories,
                                       threshold).mean())
        D = random_dictionary(*dictionary.shape, seed=seed + 1000 + k)
        rdict.append(polysemantic_flags(sparse_codes(directions, D, m), categories, threshold).mean())
    return {"flags": real, "share": float(real.mean()), "null_span": np.asarray(span),
            "null_dictionary": np.asarray(rdict)}


def polysemanticity_rows(res: dict[str, Any] | None, reason: str = "") -> list[dict[str, Any]]:
    m1 = "polysemanticity: share of neurons vs random directions in their span"
    m2 = "polysemanticity: share of neurons vs random dictionaries"
    how = ("share of selected neurons whose PC1 decomposition (OMP, read-out + data concepts) has strong "
           "concepts from >= 2 unrelated category groups; Wilson CI over neurons; ")
    if res is None:
        return [not_measurable(m1, how, reason, 0.0, False), not_measurable(m2, how, reason, 0.0, False)]
    n = len(res["flags"])
    lo, hi = wilson_interval(int(res["flags"].sum()), n)
    ns, nd = float(res["null_span"].mean()), float(res["null_dictionary"].mean())
    # the claim: the category structure of a decomposition says something about the neuron, i.e. a
    # neuron mixes unrelated groups LESS often than a random direction of its span / a random dictionary
    return [row(m1, res["share"], (lo, hi), ns, ns, how + f"null: mean share for random unit directions in each "
                f"neuron's effect span ({len(res['null_span'])} draws); pass = fewer polysemantic than the null",
                higher_is_better=False),
            row(m2, res["share"], (lo, hi), nd, nd, how + f"null: mean share with random Gaussian dictionaries "
                f"carrying the real atoms' categories ({len(res['null_dictionary'])} draws)", higher_is_better=False)]
