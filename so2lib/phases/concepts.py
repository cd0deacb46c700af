"""Phase 4: math/logic concept directions in effect space and sparse decomposition (OMP).

Two kinds of concept directions, both in the space the effects live in (the residual stream
at the answer position, before the final norm):

- **read-out directions**: for a concept's tokens, the unembedding columns ``W_U[:, t]``,
  centred over ``d_model`` for LayerNorm models (the final norm removes the mean, so this is
  what a direction contributes to the logits up to the frozen scale), averaged over tokens;
- **data directions**: for a metadata flag of the problems (carry, operator, truth value, ...),
  ``mean(final residual | flag) - mean(final residual | not flag)`` at the answer position over
  the training split (centred likewise).

As in the CLIP code, a dictionary is **centred** (its mean entry subtracted from every entry) and
**normalised** (each entry scaled to unit L2 norm) before orthogonal matching pursuit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from so2lib.data.tasks import Problem
from so2lib.engine.models import ModelInfo
from so2lib.phases.effects import load_effects
from so2lib.phases.linalg import SpanPCA, float32_mean, map_replicates, omp, single_threaded
from so2lib.phases.selection import load_selection
from so2lib.phases.study import Setup
from so2lib.stats import (ROWS_VERSION, auroc, bootstrap_ci, interval_row, mean_row, not_measurable, problem_bootstrap,
                          validation_row as row, verdict_table as table)

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                 "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
                 "eighty ninety hundred thousand million").split()

LEXICON: dict[str, list[str]] = {
    "operations": "plus minus times divided add adding added addition subtract subtracting subtraction "
                  "multiply multiplied multiplication divide division sum difference product quotient "
                  "total altogether combined remainder increase decrease double twice half triple "
                  "square root power percent".split(),
    "number properties": "odd even prime composite positive negative integer whole fraction decimal "
                         "multiple factor divisible round exact large small big tiny many few".split(),
    "digits and number words": [str(i) for i in range(0, 100)] + [str(i) for i in (100, 200, 500, 999, 1000)]
                               + list(_NUMBER_WORDS),
    "comparison": "greater less larger smaller bigger biggest largest smallest max min maximum minimum "
                  "equal equals same different more fewer most least than compare above below".split(),
    "algebra": "x y n variable unknown solve solving solution equation expression value isolate "
               "substitute coefficient term both sides".split(),
    "logic connectives and quantifiers": "and or not if then true false all some none every each any "
                                         "either neither nor implies therefore only always never".split(),
    "procedure": "carry carrying borrow borrowing regroup step steps digit digits column ones tens "
                 "hundreds place first second next last intermediate answer result".split(),
    "errors": "wrong mistake error incorrect oops approximately about nearly almost guess off "
              "unsure wait".split(),
    "symbols": list("+-*/=()<>?%"),
}


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    category: str
    kind: str  # "read-out" or "data"


def lexicon_entries() -> list[Concept]:
    seen, out = set(), []
    for cat, words in LEXICON.items():
        for w in words:
            if w not in seen:
                seen.add(w)
                out.append(Concept(w, cat, "read-out"))
    return out


def _centre_d(x: torch.Tensor, layer_norm: bool) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True) if layer_norm else x


def concept_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids of ``" word"`` and ``"word"``, without unknown tokens."""
    unk = tokenizer.unk_token_id
    ids: list[int] = []
    for text in (" " + word, word):
        for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if t != unk and t not in ids:
                ids.append(t)
    return ids


@torch.no_grad()
def readout_directions(model: Any, concepts: Sequence[Concept]) -> tuple[list[Concept], torch.Tensor]:
    """``[n, d_model]`` read-out directions of the concepts the tokenizer knows (others dropped)."""
    from so2lib.engine.models import ModelInfo

    W_U = model.W_U.detach().float().cpu()
    ln = ModelInfo.of(model).norm == "LN"
    kept, dirs = [], []
    for c in concepts:
        ids = concept_token_ids(model.tokenizer, c.name)
        if ids:
            kept.append(c)
            dirs.append(_centre_d(W_U[:, ids].T, ln).mean(0))
    return kept, torch.stack(dirs) if dirs else torch.zeros(0, W_U.shape[0])


@torch.no_grad()
def vocabulary_directions(model: Any) -> torch.Tensor:
    """``[d_vocab, d_model]``: every token's read-out direction (the generic pool)."""
    from so2lib.engine.models import ModelInfo

    return _centre_d(model.W_U.detach().float().cpu().T, ModelInfo.of(model).norm == "LN")


def metadata_flags(problems: Sequence[Problem]) -> pd.DataFrame:
    """Boolean concept flags per problem from metadata (``NaN`` where a flag does not apply)."""
    rows = []
    for p in problems:
        m = p.meta
        r: dict[str, Any] = {f"task={t}": p.task == t for t in
                             ("addition", "subtraction", "multiplication", "comparison", "algebra", "logic")}
        for key in ("carry", "borrow"):
            r[key] = m.get(key, np.nan)
        v = m.get("answer_value")
        if v is not None:
            r["answer even"] = m.get("answer_parity") == "even"
            r["answer < 10"] = v < 10
            r["answer >= 100"] = v >= 100
        md = m.get("max_digits")
        if md is not None:
            r["operands 1 digit"] = md == 1
            r["operands 3 digits"] = md == 3
        if p.task == "comparison":
            r["larger first"] = m["larger_first"]
            r["same digit count"] = m["same_digits"]
        if p.task == "algebra":
            r["algebra x + a"] = m["op"] == "+"
        if p.task == "logic":
            r["truth true"] = m["truth"]
            for c in ("and", "or", "if", "not"):
                r[f"has {c}"] = m[f"has_{c}"]
            r["logic depth 3"] = m["depth"] == 3
        rows.append(r)
    return pd.DataFrame(rows).astype(float)


DATA_CATEGORY = {"carry": "procedure", "borrow": "procedure", "answer even": "number properties",
                 "answer < 10": "number properties", "answer >= 100": "number properties",
                 "operands 1 digit": "digits and number words", "operands 3 digits": "digits and number words",
                 "larger first": "comparison", "same digit count": "comparison", "algebra x + a": "algebra",
                 "truth true": "logic connectives and quantifiers", "logic depth 3": "logic connectives and quantifiers"}


# which lexicon category a ``task=`` data concept belongs to (word problems: several operations)
TASK_CATEGORY = {"addition": "operations", "subtraction": "operations", "multiplication": "operations",
                 "comparison": "comparison", "algebra": "algebra", "logic": "logic connectives and quantifiers",
                 "gsm8k": "procedure", "svamp": "procedure", "mawps": "procedure"}


def data_category(col: str) -> str:
    """The category of a data concept (metadata flag): its own for ``task=...`` flags (comparison,
    algebra and logic are not "operations"), :data:`DATA_CATEGORY` otherwise."""
    if col.startswith("task="):
        return TASK_CATEGORY.get(col.split("=", 1)[1], "other")
    if col.startswith("has "):
        return "logic connectives and quantifiers"
    return DATA_CATEGORY.get(col, "other")


def data_directions(final_resid: torch.Tensor, flags: pd.DataFrame, layer_norm: bool = True,
                    min_count: int = 5) -> tuple[list[Concept], torch.Tensor]:
    """``[n, d_model]``: ``mean(resid | flag) - mean(resid | not flag)`` for every flag with at
    least ``min_count`` problems on each side, among the problems where the flag applies."""
    kept, dirs = [], []
    R = _centre_d(final_resid.float(), layer_norm)
    for col in flags.columns:
        f = flags[col].values
        has = ~np.isnan(f)
        pos, neg = has & (f == 1), has & (f == 0)
        if pos.sum() >= min_count and neg.sum() >= min_count:
            cat = data_category(col)
            kept.append(Concept(col, cat, "data"))
            dirs.append(R[torch.as_tensor(pos)].mean(0) - R[torch.as_tensor(neg)].mean(0))
    return kept, torch.stack(dirs) if dirs else torch.zeros(0, final_resid.shape[1])


def prepare_dictionary(D: torch.Tensor | np.ndarray) -> np.ndarray:
    """Centre (subtract the mean entry) and normalise (unit L2 norm per entry), as the CLIP code does."""
    D = np.asarray(D, dtype=np.float64)
    D = D - D.mean(0, keepdims=True)
    return D / np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-12)


def sparse_codes(directions: np.ndarray, dictionary: np.ndarray, m: int = 16) -> np.ndarray:
    """OMP codes ``[n_directions, n_atoms]`` with at most ``m`` non-zeros each, batched over
    directions (:func:`so2lib.phases.linalg.omp`: scikit-learn's ``orthogonal_mp`` algorithm, one
    batched solve per step; tested against it). ``dictionary`` rows are atoms (already prepared)."""
    return omp(np.atleast_2d(np.asarray(directions, dtype=np.float64)), dictionary, m)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def random_dictionary(n_atoms: int, d: int, seed: int = 0) -> np.ndarray:
    return prepare_dictionary(np.random.default_rng(seed).normal(size=(n_atoms, d)))


def occurring_tokens(encs: Sequence[Any]) -> set[int]:
    """Token ids that occur in any prompt or gold answer of the encodings ``encs``."""
    out: set[int] = set()
    for enc in encs:
        for i in range(len(enc)):
            p, a = enc.full(i)
            out.update(int(t) for t in p)
            out.update(int(t) for t in a)
    return out


def keep_occurring(model: Any, concepts: Sequence[Concept], dirs: torch.Tensor, tokens: set[int]
                   ) -> tuple[list[Concept], torch.Tensor]:
    """Read-out concepts none of whose tokens ever occurs in the model's prompts or answers are
    dropped (a direction the model never reads or writes here); data concepts are kept."""
    keep = [i for i, c in enumerate(concepts)
            if c.kind != "read-out" or set(concept_token_ids(model.tokenizer, c.name)) & tokens]
    return [concepts[i] for i in keep], dirs[keep] if len(keep) else dirs[:0]


def merge_atoms(dictionary: np.ndarray, concepts: Sequence[Concept], threshold: float = 0.95
                ) -> tuple[np.ndarray, list[Concept], dict[str, list[str]]]:
    """Greedy de-duplication of a prepared dictionary: an atom whose cosine with an atom already
    kept exceeds ``threshold`` is merged into it (dropped; its name recorded). Returns the kept
    atoms, their concepts and ``{kept name: [merged names]}``."""
    D = np.asarray(dictionary, np.float64)
    U = D / np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-12)
    kept: list[int] = []
    merged: dict[str, list[str]] = {}
    for i in range(len(U)):
        if kept:
            c = U[kept] @ U[i]
            j = int(np.argmax(c))
            if c[j] > threshold:
                merged.setdefault(concepts[kept[j]].name, []).append(concepts[i].name)
                continue
        kept.append(i)
    return D[kept], [concepts[i] for i in kept], merged


def effective_rank(dictionary: np.ndarray) -> float:
    """Effective rank (Roy & Vetterli): ``exp`` of the entropy of the normalised singular values."""
    s = np.linalg.svd(np.asarray(dictionary, np.float64), compute_uv=False)
    s = s[s > 0]
    if not len(s):
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def pc1_direction(centred: np.ndarray) -> np.ndarray:
    """The first principal direction of ``centred [m, d]`` (re-centred on its own mean; unit; sign
    irrelevant to OMP cosines): the top eigenvector of the ``d x d`` scatter matrix (much cheaper
    than an SVD of the data inside a bootstrap)."""
    X = np.asarray(centred, np.float64)
    X = X - X.mean(0)
    return np.linalg.eigh(X.T @ X)[1][:, -1]


def omp_vs_vocabulary_subsets(vectors: Sequence[np.ndarray], dictionary: np.ndarray, vocabulary: np.ndarray,
                              m: int, n_subsets: int = 20, n_boot: int = 200, seed: int = 0,
                              tol: float | None = None) -> dict[str, Any]:
    """Does the math/logic dictionary reconstruct the neurons' PC1 better than **size-matched random
    subsets of the model's own vocabulary** (read-out directions, prepared the same way)?

    ``vectors[j] [N, d]``: neuron ``j``'s effect vectors on the training problems (the same PC1 as
    ``neuron_directions``: PC1 of all training problems' centred effects). Estimate: mean over
    neurons of the OMP reconstruction cosine with ``dictionary`` minus the same with a random
    vocabulary subset, averaged over ``n_subsets`` subsets. Interval: problems resampled, every PC1
    **refitted** on the resample, and one random subset drawn per replicate, so that both the
    problems' variability and the null's spread are in the interval. ``tol``: the vectors' rounding
    (:class:`so2lib.phases.linalg.SpanPCA`; default from their dtype: pass the stored dtype's
    epsilon when they were upcast)."""
    rng = np.random.default_rng(seed)
    n_atoms = len(dictionary)
    subsets = [prepare_dictionary(vocabulary[rng.choice(len(vocabulary), n_atoms, replace=False)])
               for _ in range(n_subsets)]
    spans = SpanPCA(vectors, tol)  # each resample's PC1 from its counts, in the neuron's row space
    N = spans.N

    def cosines(idx: np.ndarray, dicts: Sequence[np.ndarray]) -> list[float]:
        P = spans.pc1(idx)
        return [float(cosine(P, sparse_codes(P, D, m) @ D).mean()) for D in dicts]
    with single_threaded():  # many small matrices: threads only contend
        return _omp_boot(cosines, np.arange(N), dictionary, subsets, n_subsets, n_boot, rng, len(vectors), N)


def _omp_boot(cosines: Any, full: np.ndarray, dictionary: np.ndarray, subsets: list[np.ndarray], n_subsets: int,
              n_boot: int, rng: np.random.Generator, n_neurons: int, N: int) -> dict[str, Any]:
    c_all = cosines(full, [dictionary] + subsets)
    point = c_all[0] - float(np.mean(c_all[1:]))
    draws = [(rng.integers(0, N, N), int(rng.integers(0, n_subsets))) for _ in range(n_boot)]  # in order

    def one(i: int) -> float:
        idx, s = draws[i]
        a, b = cosines(idx, [dictionary, subsets[s]])
        return a - b
    boots = map_replicates(one, n_boot)
    return {"point": point, "boots": np.asarray(boots), "cosine": c_all[0], "null": c_all[1:],
            "n_neurons": n_neurons, "n_problems": N}


def decompose(directions: np.ndarray, dictionary: np.ndarray, concepts: Sequence[Concept], m: int = 16,
              baseline_seed: int = 0) -> dict[str, Any]:
    """OMP-decompose neuron directions ``[n, d]``: codes, reconstructions, cosines, and the
    cosine of a random dictionary of the same size with the same ``m`` (the baseline)."""
    codes = sparse_codes(directions, dictionary, m)
    recon = codes @ dictionary
    rand = random_dictionary(*dictionary.shape, seed=baseline_seed)
    rand_recon = sparse_codes(directions, rand, m) @ rand
    return {"codes": codes, "recon": recon, "cosine": cosine(directions, recon),
            "cosine_random": cosine(directions, rand_recon), "concepts": list(concepts)}


def concept_card(codes_row: np.ndarray, concepts: Sequence[Concept], top: int = 8) -> pd.DataFrame:
    """The non-zero concepts of one neuron, largest |coefficient| first."""
    nz = np.flatnonzero(codes_row)
    nz = nz[np.argsort(-np.abs(codes_row[nz]))][:top]
    return pd.DataFrame({"concept": [concepts[i].name for i in nz], "category": [concepts[i].category for i in nz],
                         "kind": [concepts[i].kind for i in nz], "coefficient": codes_row[nz]})


def auroc_matrix(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """``[C, J]`` AUROC of every score column ``scores [N, C]`` (NaN: the score does not apply to
    that problem) for every label column ``positive [N, J]``, each over the problems where the
    score applies: :func:`so2lib.stats.auroc` for all pairs at once (ranks with ties averaged,
    two matrix products). NaN where a class is empty or the score is constant there."""
    from scipy.stats import rankdata

    F = np.asarray(scores, np.float64)
    Y = np.asarray(positive, bool).astype(np.float64)
    ok = ~np.isnan(F)
    R = np.where(ok, rankdata(np.where(ok, F, np.inf), axis=0), 0.0)  # inapplicable rows rank last
    okf = ok.astype(np.float64)
    n1, n0 = okf.T @ Y, okf.T @ (1 - Y)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (R.T @ Y - n1 * (n1 + 1) / 2) / (n1 * n0)
        lo, hi = np.where(ok, F, np.inf).min(0), np.where(ok, F, -np.inf).max(0)
    auc[(n1 == 0) | (n0 == 0) | ~(hi > lo)[:, None]] = np.nan
    return auc


def predictive_auroc(significant: np.ndarray, flags: pd.DataFrame, codes: np.ndarray,
                     concepts: Sequence[Concept], n_random: int = 20, seed: int = 0) -> pd.DataFrame:
    """Do a neuron's top data concepts predict where it is significant?

    For each neuron (column of ``significant [N_val, n]``), its data concept with the largest
    |coefficient| is used as a score for the neuron's significance on validation problems
    (AUROC, where the flag applies); the baseline is the mean AUROC of ``n_random`` random data
    concepts for the same neuron (drawn in neuron order, for the neurons that are tested). Both
    are reported as ``|AUROC - 0.5|`` too (direction-free). All AUROCs come from one
    :func:`auroc_matrix`, so a bootstrap can afford it.
    """
    rng = np.random.default_rng(seed)
    data_idx = [i for i, c in enumerate(concepts) if c.kind == "data" and c.name in flags.columns]
    y = np.asarray(significant).astype(bool)
    tested = []
    for j in range(y.shape[1]):
        chosen = [i for i in data_idx if codes[j, i] != 0]
        if chosen and y[:, j].any() and not y[:, j].all():
            tested.append((j, max(chosen, key=lambda i: abs(codes[j, i]))))
    if not tested:
        return pd.DataFrame(columns=["neuron_slot", "concept", "auroc", "auroc_random", "strength", "strength_random"])
    cols = {i: c for c, i in enumerate(data_idx)}
    A = auroc_matrix(flags[[concepts[i].name for i in data_idx]].to_numpy(np.float64), y)  # [C, n]
    rows = []
    for j, top in tested:
        a = float(A[cols[top], j])
        draw = rng.choice(data_idx, size=min(n_random, len(data_idx)), replace=False)
        rand = A[[cols[int(i)] for i in draw], j]
        fin = rand[np.isfinite(rand)]
        rows.append({"neuron_slot": j, "concept": concepts[top].name, "auroc": a,
                     "auroc_random": float(fin.mean()) if len(fin) else np.nan,
                     "strength": abs(a - 0.5) if a == a else np.nan,
                     "strength_random": float(np.abs(fin - 0.5).mean()) if len(fin) else np.nan})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- phase 4 checks against nulls


def pc1_validation(vec_train: np.ndarray, vec_val: np.ndarray, pc: np.ndarray,
                   chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron (``vec_* [N, n, d]``, ``pc [n, d]`` fitted on training): share of the variance of
    the centred effects (training mean) explained by the training PC1, on training and on validation.
    Float64, ``chunk`` neurons at a time (the effects are stored in float16: a whole-array upcast
    would be ``N n d`` doubles several times over)."""
    u = pc / np.maximum(np.linalg.norm(pc, axis=-1, keepdims=True), 1e-12)
    n = u.shape[0]
    out = np.full((2, n), np.nan)
    for c0 in range(0, n, chunk):
        sl = slice(c0, c0 + chunk)
        tr = np.asarray(vec_train[:, sl], np.float64)
        mean = tr.mean(0)
        for i, V in enumerate((tr, vec_val[:, sl])):
            X = np.asarray(V, np.float64) - mean
            num = (np.einsum("Nnd,nd->Nn", X, u[sl]) ** 2).sum(0)
            den = np.einsum("Nnd,Nnd->n", X, X)
            out[i, sl] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return out[0], out[1]


def _val_shares(vec_val: np.ndarray, mean: np.ndarray, u: np.ndarray, chunk: int = 8
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per validation problem and neuron ``[N_val, n]``: squared projections of the centred effects
    (``vec_val - mean``) on the unit directions ``u [n, d]`` and on the unit mean directions, and
    their squared norms."""
    n = u.shape[0]
    num_p = np.zeros((len(vec_val), n))
    num_m, den = np.zeros_like(num_p), np.zeros_like(num_p)
    for c0 in range(0, n, chunk):
        sl = slice(c0, c0 + chunk)
        m = mean[sl] / np.maximum(np.linalg.norm(mean[sl], axis=-1, keepdims=True), 1e-30)
        X = np.asarray(vec_val[:, sl], np.float64) - mean[sl]
        num_p[:, sl] = np.einsum("Nnd,nd->Nn", X, u[sl]) ** 2
        num_m[:, sl] = np.einsum("Nnd,nd->Nn", X, m) ** 2
        den[:, sl] = np.einsum("Nnd,Nnd->Nn", X, X)
    return num_p, num_m, den


def pc1_beyond_mean(vec_train: np.ndarray, vec_val: np.ndarray, pc: np.ndarray, n_boot: int = 500,
                    seed: int = 0, chunk: int = 8, n_refit: int = 0, tol: float | None = None) -> dict[str, Any]:
    """Validation share of each neuron's centred effect energy (about the training mean) along its
    training PC1 **minus** the same along its training mean-effect direction (the control: an effect
    that is activation times a fixed vector has its PC1 on that direction), mean over neurons, with
    a bootstrap over validation problems.

    ``vec_train [N_tr, n, d]``, ``vec_val [N_val, n, d]`` (any float dtype), ``pc [n, d]``.
    Neurons whose validation energy is 0 are excluded. ``n_refit > 0``: replicate ``b`` also refits
    the training mean, PC1 and mean-effect direction on bootstrap resample ``b mod n_refit`` of the
    training problems (:class:`so2lib.phases.linalg.SpanPCA`, ``tol`` its rounding; the point keeps
    the full-sample fits). Returns ``point``, ``boots [n_boot]``, ``pc1`` and ``mean_direction``
    (the two shares), ``n_neurons``, ``n_refit``."""
    u = pc / np.maximum(np.linalg.norm(pc, axis=-1, keepdims=True), 1e-12)
    n = u.shape[0]
    mean = np.stack([np.asarray(vec_train[:, j:j + 1], np.float64).mean(0)[0] for j in range(n)])  # [n, d]
    num_p, num_m, den = _val_shares(vec_val, mean, u, chunk)
    keep = den.sum(0) > 0
    if not keep.any():
        return {"reason": "every selected neuron has zero validation variance"}
    fits = [(num_p[:, keep], num_m[:, keep], den[:, keep])]
    if n_refit > 0:
        spans = SpanPCA([vec_train[:, j] for j in range(n)], tol)
        C, Q, Ntr = spans.C, spans.Q, spans.N
        for ix in np.random.default_rng(seed + 7).integers(0, Ntr, size=(n_refit, Ntr)):
            w = spans.counts(ix)
            mean_r = np.einsum("jr,jrd->jd", np.einsum("N,jNr->jr", w, C) / w.sum(), Q)  # the resample's mean
            a, b, c = _val_shares(vec_val, mean_r, spans.pc1(ix), chunk)
            fits.append((a[:, keep], b[:, keep], c[:, keep]))

    def shares(idx: np.ndarray, f: int = 0) -> tuple[float, float]:
        p_, m_, d_ = (x[idx].sum(0) for x in fits[f])
        return float((p_ / d_).mean()), float((m_ / d_).mean())

    Nv = len(den)
    pc1_share, mean_share = shares(np.arange(Nv))
    rng = np.random.default_rng(seed)
    boots = np.array([np.subtract(*shares(rng.integers(0, Nv, Nv), 0 if n_refit == 0 else 1 + b % n_refit))
                      for b in range(n_boot)]) if Nv > 1 else np.array([])
    return {"point": pc1_share - mean_share, "boots": boots.tolist(), "pc1": pc1_share, "mean_direction": mean_share,
            "n_neurons": int(keep.sum()), "n_refit": int(n_refit)}


def _vocabulary_control_row(m: str, how: str, per: dict[str, Any], shown: Sequence[str],
                            detail: Any) -> dict[str, Any]:
    """A sparse-replacement row from per-problem outcomes ``per`` (``{name}_correct [N_val]`` for
    ``clean``, ``mean``, ``sparse``, ``vocabulary`` and any of ``shown``): ``(acc(sparse) -
    acc(vocabulary)) / (acc(clean) - acc(mean))`` with paired bootstrap replicates over problems,
    margin 0.05; ``detail(shares)`` (the recovered share of each of ``shown``) is appended to ``how``.
    Not testable when the mean-ablation drop's interval includes 0."""
    from so2lib.phases.protocol import recovered_difference, recovered_share
    c, mn = np.asarray(per["clean_correct"], float), np.asarray(per["mean_correct"], float)
    voc = per.get("vocabulary_correct_subsets", per["vocabulary_correct"])  # [S, N]: the null's spread in the interval
    r = recovered_difference(c, mn, per["sparse_correct"], voc)
    text = how + detail({k: recovered_share(c, mn, per[f"{k}_correct"])["share"] for k in shown})
    if len(r["boots"]) > 1:
        return interval_row(m, r["point"], r["boots"], 0.0, 0.0, text, margin=0.05, resampled="problems (validation)")
    return not_measurable(m, text, r["note"] + ": nothing to recover", 0.0)


def decomposition_rows(quality: pd.DataFrame, pred: pd.DataFrame, pc1v: pd.DataFrame, recovered: dict[str, Any],
                       attribution: pd.DataFrame, *, omp: dict[str, Any] | None = None,
                       pc1_boot: dict[str, Any] | None = None, pred_boot: dict[str, Any] | None = None,
                       dictionary: pd.DataFrame | None = None,
                       evaluated: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rows of ``decomposition_table``. Every interval resamples problems (refitting what is
    fitted); rows measured on the training split say so in ``split``."""
    rows = []
    m = "sparse decomposition: cosine, math/logic concepts minus random vocabulary subsets"
    how = ("per selected neuron, cosine of its PC1 (all training problems' centred effects, as stored by phase 3 "
           "and used by the rank-1 replacement) with its m-sparse OMP reconstruction over the read-out + data "
           "concepts (tokens that never occur in the prompts or answers dropped, atoms with cosine > 0.95 merged), "
           "minus the same with size-matched random subsets of the model's own vocabulary (20 subsets); mean over "
           "neurons; bootstrap over training problems with every PC1 refitted and one random subset drawn per "
           "replicate (the null's spread is in the interval)")
    if dictionary is not None and len(dictionary):
        dd = dictionary[dictionary.dictionary == "read-out + data"]
        if len(dd):
            r0 = dd.iloc[0]
            how += (f"; dictionary: {int(r0.atoms)} atoms ({int(r0.merged)} merged), effective rank "
                    f"{r0.effective_rank:.1f} of d_model {int(r0.d_model)}")
    if omp and "boots" in omp:
        null = np.asarray(omp["null"], float)
        rows.append(interval_row(m, omp["point"], np.asarray(omp["boots"]), 0.0, 0.0,
                                 how + f" (concepts {omp['cosine']:.3f}; random subsets mean {null.mean():.3f}, "
                                 f"range {null.min():.3f}-{null.max():.3f}; {omp['n_neurons']} neurons)",
                                 resampled="problems (PC1 refitted, null subset redrawn)", split="training",
                                 margin=0.02))
    else:
        rows.append(not_measurable(m, how, (omp or {}).get("reason", "no decomposition"), 0.0, split="training"))
    m = ("sparse replacement (selected neurons): recovered share, concepts minus a size-matched vocabulary "
         "subset")
    how = ("validation accuracy when every selected neuron's effect is replaced by its training mean plus its "
           "projection on the m-sparse OMP reconstruction of its PC1 over the read-out + data concepts, minus the "
           "same with random subsets of the model's vocabulary of the dictionary's size (20 seeded subsets, "
           "the same as the --evaluate row's; point: their mean), over the mean-ablation drop: "
           "(acc(concepts) - acc(vocabulary)) / (acc(clean) - acc(mean)); paired bootstrap over validation problems, "
           "each replicate drawing one subset (the null's spread is in the interval); "
           "all neurons of the layers: the --evaluate row below")
    if "clean_correct" in recovered:
        rows.append(_vocabulary_control_row(m, how, recovered, ("sparse", "vocabulary"), lambda sh: (
            f" (recovered share: concepts {sh['sparse']:.3f}, vocabulary {sh['vocabulary']:.3f}; "
            f"{recovered['n_neurons']} neurons, {recovered['n_subsets']} subsets)")))
    else:
        rows.append(not_measurable(m, how, recovered.get("note", "nothing to recover").removeprefix("not testable: "),
                                   0.0))
    m = ("sparse replacement, all neurons of the critical layers (CLIP's --evaluate): recovered share, concepts "
         "minus a size-matched vocabulary subset")
    how = ("validation accuracy when every neuron of the critical layers has its effect replaced by its training "
           "mean plus its projection on the m-sparse OMP reconstruction of its PC1 (the CLIP protocol's top-k PC1, "
           "fitted on training) over the read-out + data concepts, minus the same with random subsets of the "
           "model's vocabulary of the dictionary's size (20 seeded subsets; point: their mean), over the "
           "mean-ablation drop: (acc(concepts) - acc(vocabulary)) / (acc(clean) - acc(mean)); paired bootstrap over "
           "validation problems, each replicate drawing one subset (the null's spread is in the interval)")
    ev = evaluated or {}
    if "clean_correct" in ev:
        rows.append(_vocabulary_control_row(m, how, ev, ("pc1", "sparse", "vocabulary"), lambda sh: (
            f" (layers {ev['layers']}, {ev['n_neurons']} neurons; recovered share: PC1 rank-1 "
            f"{sh['pc1']:.3f}, concepts {sh['sparse']:.3f}, vocabulary {sh['vocabulary']:.3f}; mean "
            f"cosine of the reconstruction with the PC1: concepts {ev['cosine_sparse']:.3f}, vocabulary "
            f"{ev['cosine_vocabulary']:.3f})")))
    else:
        rows.append(not_measurable(m, how, ev.get("reason", "not computed"), 0.0))
    m = "predictive check: top data concept predicts significance, minus random concepts"
    how = ("per selected neuron, |AUROC - 0.5| of its top data concept's flag for the validation problems on "
           "which it is significant, minus the mean for random data concepts; mean over neurons; bootstrap over "
           "validation problems (concepts fixed by the training PC1's code)")
    if pred_boot and "boots" in pred_boot:
        rows.append(interval_row(m, pred_boot["point"], np.asarray(pred_boot["boots"]), 0.0, 0.05, how,
                                 resampled="problems (validation)"))
    else:
        rows.append(not_measurable(m, how, "fewer than 2 neurons with a data concept and both significance classes",
                                   0.05))
    m = "PC1: validation variance explained by the training PC1 minus the mean-effect direction (selected neurons)"
    how = ("share of the variance of each selected neuron's validation centred effects (training mean) along its "
           "training PC1 (pooled over validation problems), minus the same share along its training mean-effect "
           "direction (the control: an effect that is activation times a fixed vector has its PC1 there); mean over "
           "neurons; paired bootstrap over validation problems; established beyond 0.02")
    nr = int((pc1_boot or {}).get("n_refit", 0))
    how += (f"; each replicate also refits the training mean, PC1 and mean-effect direction on one of {nr} bootstrap "
            "resamples of the training problems" if nr else "; training fits held fixed")
    K = f"; 1/K for a random direction of the span {float((1 / pc1v.K.astype(float)).mean()):.3f}" if len(pc1v) else ""
    train = f"; training PC1 share {pc1v.train_share.mean():.3f}" if len(pc1v) else ""
    if pc1_boot and "boots" in pc1_boot:
        rows.append(interval_row(m, pc1_boot["point"], np.asarray(pc1_boot["boots"]), 0.0, 0.02,
                                 how + f" (PC1 {pc1_boot['pc1']:.3f}, mean-effect direction "
                                 f"{pc1_boot['mean_direction']:.3f}; {pc1_boot['n_neurons']} neurons)" + train + K,
                                 resampled=f"problems (validation; training fits refitted on {nr} resamples)" if nr
                                 else "problems (validation)", margin=0.02))
    else:
        rows.append(not_measurable(m, how, (pc1_boot or {}).get("reason", "no selected neuron"), 0.02))
    rows.append(attribution_row(attribution))
    rows.append(carry_attribution_row(attribution))
    return rows


def attribution_row(attribution: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The neuron's excess share on the operand tokens over the attention-only share: per problem,
    the share of |per-position attribution| on the operand tokens minus the same share with the
    neuron's activation held at its per-problem mean over positions (``null``: where attention
    alone puts the weight); mean over problems, bootstrap over problems."""
    m = "token attribution: operand share, neuron minus attention-only (activation held at its mean)"
    how = ("per validation arithmetic problem, the share of |per-position second-order attribution| (logit "
           "difference) of the selected neurons on the final question's operand tokens, averaged over neurons, "
           "minus the same share with each neuron's activation held at its per-problem mean over positions "
           "(the attention-only share); bootstrap over problems")
    if len(attribution) and attribution.problem.nunique() >= 2:
        per = attribution.groupby("problem")[["share", "null"]].mean()
        d = (per.share - per.null).values
        return row(m, float(d.mean()), bootstrap_ci(d), 0.0, 0.0,
                   how + f" (neuron {per.share.mean():.3f}, attention-only {per.null.mean():.3f}; n={len(per)} problems)",
                   resampled="problems (validation)")
    return not_measurable(m, how, "no validation arithmetic problem whose operand tokens could be located", 0.0)


def carry_attribution_row(attribution: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Exploratory: does the neuron's excess operand share (over the attention-only share) differ
    between carry (or borrow) and no-carry problems **within** task x digit-count strata? The
    within-stratum difference of means, weighted by stratum size (strata with >= 2 problems of each
    kind), bootstrap over problems within strata; control 0."""
    m = "token attribution (exploratory): excess operand share, carry minus no-carry within task x digits"
    how = ("per validation arithmetic problem, the operand share of the selected neurons' attribution minus its "
           "attention-only share; within each task x digit-count stratum, mean over carry/borrow problems minus "
           "mean over the others, weighted by stratum size; bootstrap over problems within strata; exploratory "
           "(not pre-registered)")
    if not len(attribution) or "carry" not in attribution:
        return not_measurable(m, how, "no attribution table", 0.0)
    keys = ["task"] + (["digits"] if "digits" in attribution else [])
    per = attribution.dropna(subset=["carry"]).groupby("problem").agg(
        carry=("carry", "first"), excess=("share", "mean"), null=("null", "mean"),
        **{k: (k, "first") for k in keys})
    per["excess"] -= per["null"]
    per["carry"] = per.carry.astype(bool)
    strata = [(g.excess[g.carry].values, g.excess[~g.carry].values) for _, g in per.groupby(keys, dropna=False)]
    strata = [(a, b) for a, b in strata if len(a) >= 2 and len(b) >= 2]
    na, nb = sum(len(a) for a, _ in strata), sum(len(b) for _, b in strata)
    if na < 5 or nb < 5:
        return not_measurable(m, how, f"{na} carry and {nb} no-carry problems in strata with both (need 5 of each)",
                              0.0)
    w = np.array([len(a) + len(b) for a, b in strata], float)
    w /= w.sum()
    rng = np.random.default_rng(seed)
    point = float(sum(wi * (a.mean() - b.mean()) for wi, (a, b) in zip(w, strata)))
    boots = [sum(wi * (a[rng.integers(0, len(a), len(a))].mean() - b[rng.integers(0, len(b), len(b))].mean())
                 for wi, (a, b) in zip(w, strata)) for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return row(m, point, (lo, hi), 0.0, 0.0, how + f" (n={na} carry, {nb} no-carry, {len(strata)} strata)",
               resampled="problems (validation, within task x digit-count strata)")


# ----------------------------------------------------------------------------- the phase, for notebooks


#: training refits behind the phase-4 PC1 row's interval (mean, PC1 and mean-effect direction)
PC1_REFITS = 20

#: random vocabulary subsets of the --evaluate row's control (each costs one OMP and one readout per batch)
EVALUATE_SUBSETS = 20


def vocabulary_subsets(vocabulary: torch.Tensor | np.ndarray, n_atoms: int, seed: int,
                       n_subsets: int = EVALUATE_SUBSETS) -> dict[str, np.ndarray]:
    """``n_subsets`` prepared dictionaries of ``n_atoms`` rows drawn without replacement from the
    model's vocabulary directions ``[V, d_model]`` (the size-matched control of the sparse
    replacement rows), ``{"vocabulary_0": [n_atoms, d_model], ...}``; seeded, so every row that
    uses them sees the same subsets."""
    V = np.asarray(vocabulary)
    rng = np.random.default_rng(seed)
    return {f"vocabulary_{i}": prepare_dictionary(V[rng.choice(len(V), n_atoms, replace=False)])
            for i in range(n_subsets)}


def decomposition_phase(setup: Setup, m: int = 16, progress: bool = True, max_attribution_problems: int = 200
                        ) -> dict[str, Any]:
    """Phase 4: each selected neuron's principal direction (PC1 of its centred effects, training
    split) decomposed by OMP over math/logic concept directions, compared with the model's
    vocabulary as a generic pool and with random dictionaries; replacement accuracy against
    rank-1; whether the top data concept predicts where the neuron is significant; validation
    variance of the training PC1; token-level attribution against operand positions. Every claim
    is a row of ``decomposition_table`` (the columns of ``validation_table``)."""
    from so2lib.engine import attribution as At
    from so2lib.phases import characterize as C
    run, model = setup.run, setup.model
    crit, selected = load_selection(run)
    ln = ModelInfo.of(model).norm == "LN"
    L, H = model.cfg.n_layers, model.cfg.n_heads
    nd = run.load("neuron_directions")  # PC1 and significance from Phase 3
    pc1 = {l: nd["pc1"][str(l)].numpy() for l in crit}
    vec_deps = [f"{s}_vectors_L{l}" for s in ("train", "val") for l in crit]
    # the training vectors stay memory maps in their stored dtype (every reader upcasts exactly what
    # it reads); the validation ones are small
    vt = {l: load_effects(run, "train", f"vectors_L{l}") for l in crit}
    stored_dtype = vt[crit[0]].dtype if crit else np.float32
    vv = {l: np.asarray(load_effects(run, "val", f"vectors_L{l}"), dtype=np.float32) for l in crit}
    centred_val = {l: vv[l] - float32_mean(vt[l]) for l in crit}  # = vv - vt.astype(float32).mean(0), bit for bit
    dirs = (np.concatenate([pc1[l] for l in crit]).astype(np.float64) if crit
            else np.zeros((0, model.cfg.d_model)))  # [n_sel_total, d]
    owners = [(l, n) for l in crit for n in selected[l]]
    resid_train = run.load("correctness_direction")["final_resid_train"]  # written by Phase 2
    flags = {s: metadata_flags(setup.problems.split(s)) for s in ("train", "val")}
    encs = setup.prompt_enc or setup.enc
    tokens = occurring_tokens([encs["train"], encs["val"]])
    lex_c, lex_d = keep_occurring(model, *readout_directions(model, lexicon_entries()), tokens)
    dat_c, dat_d = data_directions(resid_train, flags["train"], ln)
    dictionaries = {
        "read-out (lexicon)": (lex_c, lex_d),
        "data (metadata)": (dat_c, dat_d),
        "read-out + data": (lex_c + dat_c, torch.cat([lex_d, dat_d])),
    }
    voc = vocabulary_directions(model)
    toks = model.tokenizer.convert_ids_to_tokens(list(range(voc.shape[0])))
    dictionaries["vocabulary (generic pool)"] = ([Concept(str(t), "vocabulary", "read-out") for t in toks], voc)
    deps = ["selection", "neuron_directions", "correctness_direction"] + vec_deps
    decs: dict[str, Any] = {}
    # prepared (centred, normalised) dictionaries with near-duplicate atoms (cosine > 0.95) merged;
    # the vocabulary pool is too large to merge and is kept as it is
    prepared: dict[str, tuple[list[Concept], np.ndarray]] = {}
    merges: dict[str, Any] = {}
    for name, (cs, D) in dictionaries.items():
        Dp = prepare_dictionary(D)
        if name != "vocabulary (generic pool)" and len(cs):
            Dp, cs, mg = merge_atoms(Dp, cs, 0.95)
            merges[name] = mg
        prepared[name] = (list(cs), Dp)
    dict_summary = run.step("dictionary_summary", lambda: pd.DataFrame([
        {"dictionary": k, "atoms_before_merge": len(dictionaries[k][0]), "atoms": len(cs),
         "merged": int(sum(len(v) for v in merges.get(k, {}).values())),
         "effective_rank": effective_rank(Dp) if len(cs) and k != "vocabulary (generic pool)" else float("nan"),
         "d_model": int(model.cfg.d_model)} for k, (cs, Dp) in prepared.items()]), "04",
        params={"merge_cosine": 0.95, "occurring_tokens_only": True}, deps=deps)

    def decompose_all() -> pd.DataFrame:
        quality = []
        for name, (cs, Dp) in prepared.items():
            if len(cs) < m or not len(dirs):
                continue
            dec = decompose(dirs, Dp, cs, m)
            decs[name] = dec
            for (l, n), c, cr in zip(owners, dec["cosine"], dec["cosine_random"]):
                quality.append({"dictionary": name, "atoms": len(cs), "layer": l, "neuron": n,
                                "cosine": float(c), "cosine_random": float(cr)})
        return pd.DataFrame(quality, columns=["dictionary", "atoms", "layer", "neuron", "cosine", "cosine_random"])
    quality = decompose_all()  # the codes are needed below; the table is the step's artifact
    run.step("decomposition_quality", lambda: quality, "04", params={"m": m}, deps=deps)
    main = decs.get("read-out + data")
    main_c, main_Dp = prepared["read-out + data"]
    run.step("concept_dictionary", lambda: {
        "atoms": torch.from_numpy(main_Dp).float(), "names": [c.name for c in main_c],
        "categories": [c.category for c in main_c], "kinds": [c.kind for c in main_c], "m": m}, "04",
        params={"m": m}, deps=["correctness_direction"])
    # replacement accuracy: mean + projection on the sparse reconstruction vs on PC1
    offs = np.cumsum([0] + [len(selected[l]) for l in crit])
    resid_val = run.load("layer_sums_val")["resid"]  # written by Phase 3
    gold_val = torch.tensor(setup.labels["val"].gold_token.values)
    edits = {l: {"mean": -centred_val[l].sum(1), "rank1": C.projection_edit(centred_val[l], pc1[l]),
                 **({"sparse": C.projection_edit(centred_val[l], main["recon"][offs[i]:offs[i + 1]])} if main else {})}
             for i, l in enumerate(crit)}
    repl = run.step("decomposition_replacement", lambda: C.replacement_accuracy(model, resid_val, gold_val, edits),
                    "04", params={"m": m}, deps=deps + ["layer_sums_val"])

    seed = int(run.config.get("seed", 0))

    def recovered() -> dict[str, Any]:
        """Per validation problem: correct under clean, mean, the sparse replacement of every selected
        neuron, and (the control) the same over random vocabulary subsets (mean over the subsets)."""
        if not main or not crit:
            return {"note": "no sparse reconstruction (too few concepts or neurons)"}
        clean = C.answer_metrics(C.final_logits(model, resid_val), gold_val)[0].numpy()

        def correct(kind_edits: dict[int, np.ndarray]) -> np.ndarray:
            delta = sum(torch.as_tensor(kind_edits[l]) for l in crit)
            return C.answer_metrics(C.final_logits(model, resid_val + delta), gold_val)[0].numpy().astype(float)
        out = {"clean_correct": clean.astype(float), "mean_correct": correct({l: edits[l]["mean"] for l in crit}),
               "sparse_correct": correct({l: edits[l]["sparse"] for l in crit})}
        voc_ok = []
        for D in vocabulary_subsets(voc, len(main_Dp), seed).values():
            recon = sparse_codes(dirs, D, m) @ D
            voc_ok.append(correct({l: C.projection_edit(centred_val[l], recon[offs[i]:offs[i + 1]])
                                   for i, l in enumerate(crit)}))
        out["vocabulary_correct"] = np.mean(voc_ok, axis=0)
        out["vocabulary_correct_subsets"] = np.asarray(voc_ok)  # [S, N_val]: one subset per bootstrap replicate
        return {k: v.tolist() for k, v in out.items()} | {"n_neurons": int(offs[-1]), "n_subsets": len(voc_ok)}
    rec = run.step("sparse_recovered_share", recovered, "04",
                   params={"m": m, "n_subsets": EVALUATE_SUBSETS, "version": 3}, deps=deps + ["layer_sums_val"])

    def evaluate() -> dict[str, Any]:  # CLIP's --evaluate: every neuron of the critical layers
        from so2lib.phases import protocol as P
        if not run.has("clip_fits"):
            return {"reason": "no clip_fits artifact (run notebook 03 with this version of so2lib)"}
        if len(main_c) < m:
            return {"reason": f"the math/logic dictionary has {len(main_c)} atoms < m={m}"}
        fits = {int(l): f for l, f in run.load("clip_fits").items() if int(l) in crit}
        if not fits:
            return {"reason": "no critical layer with later heads"}
        subs = vocabulary_subsets(voc, len(main_Dp), seed)
        dicts = {"sparse": main_Dp, **subs}
        dirs: dict[str, dict[int, torch.Tensor]] = {"pc1": {}, **{k: {} for k in dicts}}
        cos: dict[str, list[np.ndarray]] = {k: [] for k in dicts}
        for l, f in fits.items():
            u = P.LayerWeights(model, l).directions(f["v"]).double().numpy()  # [d_mlp, d_model], unit (0: no effect)
            dirs["pc1"][l] = torch.from_numpy(u)
            for name, D in dicts.items():
                r = sparse_codes(u, D, m) @ D
                cos[name].append(cosine(u, r)[np.linalg.norm(u, axis=1) > 0])
                dirs[name][l] = torch.from_numpy(r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12))
        ev = P.evaluate_replacements(model, setup.enc["val"], gold_val, fits, dirs, setup.batch_size)
        voc_each = np.asarray([ev.pop(f"{k}_correct") for k in subs], float)  # [S, N_val]
        voc_ld = np.mean([ev.pop(f"{k}_logit_diff") for k in subs], axis=0)
        return {k: v.tolist() for k, v in ev.items()} | {
            "vocabulary_correct": voc_each.mean(0).tolist(), "vocabulary_correct_subsets": voc_each.tolist(),
            "vocabulary_logit_diff": voc_ld.tolist(),
            "layers": sorted(fits), "n_neurons": int(sum(len(f["v"].T) for f in fits.values())),
            "n_subsets": EVALUATE_SUBSETS, "cosine_sparse": float(np.concatenate(cos["sparse"]).mean()),
            "cosine_vocabulary": float(np.mean([np.concatenate(cos[k]).mean() for k in subs]))}
    ev_deps = deps + (["clip_fits"] if run.has("clip_fits") else [])
    evaluated = run.step("sparse_evaluate", evaluate, "04", params={"m": m, "n_subsets": EVALUATE_SUBSETS, "version": 2},
                         deps=ev_deps)
    sig = np.concatenate([nd["significant"][str(l)].numpy() for l in crit], axis=1) if crit else np.zeros((0, 0))
    pred = run.step("predictive_check", lambda: _predictive(sig, flags["val"], main, owners), "04",
                    params={"m": m}, deps=deps)
    cards = {owners[j]: concept_card(main["codes"][j], main["concepts"]) for j in range(len(owners))} if main else {}
    run.step("concept_cards", lambda: {f"{l}:{n}": c.to_dict("records") for (l, n), c in cards.items()}, "04",
             params={"m": m}, deps=deps)

    def pc1_table() -> pd.DataFrame:
        rows = []
        for l in crit:
            tr, va = pc1_validation(vt[l], vv[l], pc1[l])
            K = min((L - 1 - l) * H, model.cfg.d_model)
            for j, n in enumerate(selected[l]):
                rows.append({"layer": l, "neuron": n, "train_share": float(tr[j]), "val_share": float(va[j]), "K": K})
        return pd.DataFrame(rows, columns=["layer", "neuron", "train_share", "val_share", "K"])
    pc1v = run.step("pc1_validation", pc1_table, "04", deps=deps)

    def omp_null() -> dict[str, Any]:
        if len(main_c) < m or not owners:
            return {"reason": f"the math/logic dictionary has {len(main_c)} atoms < m={m}, or no selected neuron"}
        vecs = [vt[l][:, j] for l in crit for j in range(len(selected[l]))]
        r = omp_vs_vocabulary_subsets(vecs, main_Dp, voc.numpy(), m, n_subsets=20, n_boot=100,
                                      tol=float(np.finfo(stored_dtype).eps))  # float16 on disk: its rounding
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
    omp = run.step("omp_vs_vocabulary_subsets", omp_null, "04",
                   params={"m": m, "n_subsets": 20, "n_boot": 100, "version": 2}, deps=deps)

    def pc1_boot() -> dict[str, Any]:
        if not owners:
            return {"reason": "no selected neuron"}
        return pc1_beyond_mean(np.concatenate([vt[l] for l in crit], axis=1), np.concatenate([vv[l] for l in crit], axis=1),
                               dirs, n_boot=500, n_refit=PC1_REFITS, tol=float(np.finfo(stored_dtype).eps))
    pc1b = run.step("pc1_validation_bootstrap", pc1_boot, "04",
                    params={"control": "mean_direction", "version": 3, "n_refit": PC1_REFITS},
                    deps=deps)
    pred_boot = run.step("predictive_check_bootstrap", lambda: _predictive_boot(sig, flags["val"], main, owners),
                         "04", params={"m": m, "n_boot": 100, "version": 2}, deps=deps)
    attr = run.step("token_attribution", lambda: At.operand_share_check(
        setup, selected, max_attribution_problems, setup.batch_size), "04",
        params={"max_problems": max_attribution_problems}, deps=["selection", "labels_val"])
    tab = run.step("decomposition_table", lambda: table(decomposition_rows(
        quality, pred, pc1v, rec, attr, omp=omp, pc1_boot=pc1b, pred_boot=pred_boot, dictionary=dict_summary,
        evaluated=evaluated)), "04",
        params={"m": m, "rows": ROWS_VERSION}, deps=["decomposition_quality", "predictive_check", "pc1_validation", "sparse_recovered_share",
                               "sparse_evaluate",
                               "token_attribution", "omp_vs_vocabulary_subsets", "pc1_validation_bootstrap",
                               "predictive_check_bootstrap", "dictionary_summary"])
    run.record("phase4", {"m": m, "dictionary_sizes": {k: len(v[0]) for k, v in dictionaries.items()}})
    return {"quality": quality, "replacement": repl, "predictive": pred, "cards": cards, "decompositions": decs,
            "owners": owners, "critical_layers": crit, "table": tab, "pc1_validation": pc1v,
            "attribution": attr, "recovered": rec, "omp_vs_vocabulary": omp, "dictionary_summary": dict_summary}


def _predictive(sig: np.ndarray, flags: pd.DataFrame, main: dict[str, Any] | None,
                owners: Sequence[tuple[int, int]]) -> pd.DataFrame:
    cols = ["neuron_slot", "concept", "auroc", "auroc_random", "strength", "strength_random", "layer", "neuron"]
    if not main or not sig.size:
        return pd.DataFrame(columns=cols)
    pred = predictive_auroc(sig, flags, main["codes"], main["concepts"])
    if not len(pred):
        return pd.DataFrame(columns=cols)
    pred["layer"] = [owners[j][0] for j in pred.neuron_slot]
    pred["neuron"] = [owners[j][1] for j in pred.neuron_slot]
    return pred


def _predictive_boot(sig: np.ndarray, flags: pd.DataFrame, main: dict[str, Any] | None,
                     owners: Sequence[tuple[int, int]], n_boot: int = 100, seed: int = 0) -> dict[str, Any]:
    """The predictive check's mean ``strength - strength_random`` with the validation problems
    resampled (each neuron's top concept stays the one its training PC1's code chose)."""
    if not main or not sig.size:
        return {"reason": "no sparse code or no significance"}

    def stat(idx: np.ndarray) -> float:
        pr = predictive_auroc(sig[idx], flags.iloc[idx].reset_index(drop=True), main["codes"], main["concepts"],
                              seed=seed)
        return float((pr.strength - pr.strength_random).mean()) if len(pr) else float("nan")
    point, boots = problem_bootstrap(stat, len(sig), n_boot, seed)
    return {"point": point, "boots": boots.tolist()}
