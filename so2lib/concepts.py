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
from sklearn.linear_model import orthogonal_mp
from sklearn.metrics import roc_auc_score

from .effects import load_effects
from .models import ModelInfo
from .selection import load_selection
from .stats import bootstrap_ci, mean_row, not_measurable, validation_row as row, verdict_table as table
from .study import Setup
from .tasks import Problem

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
    from .models import ModelInfo

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
    from .models import ModelInfo

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
    """OMP codes ``[n_directions, n_atoms]`` with ``m`` non-zeros each, batched over directions
    (scikit-learn's ``orthogonal_mp``). ``dictionary`` rows are atoms (already prepared)."""
    if not 1 <= m <= min(dictionary.shape):
        raise ValueError(f"sparsity m={m} must be between 1 and min(atoms, d_model) = {min(dictionary.shape)}")
    coef = orthogonal_mp(dictionary.T, np.asarray(directions, dtype=np.float64).T, n_nonzero_coefs=m)
    return np.atleast_2d(coef.T) if coef.ndim == 2 else coef[None]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def random_dictionary(n_atoms: int, d: int, seed: int = 0) -> np.ndarray:
    return prepare_dictionary(np.random.default_rng(seed).normal(size=(n_atoms, d)))


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


def predictive_auroc(significant: np.ndarray, flags: pd.DataFrame, codes: np.ndarray,
                     concepts: Sequence[Concept], n_random: int = 20, seed: int = 0) -> pd.DataFrame:
    """Do a neuron's top data concepts predict where it is significant?

    For each neuron (column of ``significant [N_val, n]``), its data concept with the largest
    |coefficient| is used as a score for the neuron's significance on validation problems
    (AUROC, where the flag applies); the baseline is the mean AUROC of ``n_random`` random data
    concepts for the same neuron. Both are reported as ``|AUROC - 0.5|`` too (direction-free).
    """
    rng = np.random.default_rng(seed)
    data_idx = [i for i, c in enumerate(concepts) if c.kind == "data" and c.name in flags.columns]
    rows = []
    for j in range(significant.shape[1]):
        y = significant[:, j].astype(bool)
        chosen = [i for i in data_idx if codes[j, i] != 0]
        if not chosen or y.all() or not y.any():
            continue
        top = max(chosen, key=lambda i: abs(codes[j, i]))

        def auc(i: int) -> float:
            f = flags[concepts[i].name].values
            ok = ~np.isnan(f)
            if len(set(y[ok])) < 2 or len(set(f[ok])) < 2:
                return np.nan
            return float(roc_auc_score(y[ok], f[ok]))
        a = auc(top)
        rand = [auc(int(i)) for i in rng.choice(data_idx, size=min(n_random, len(data_idx)), replace=False)]
        rows.append({"neuron_slot": j, "concept": concepts[top].name, "auroc": a,
                     "auroc_random": float(np.nanmean(rand)) if rand else np.nan,
                     "strength": abs(a - 0.5) if a == a else np.nan,
                     "strength_random": float(np.nanmean([abs(r - 0.5) for r in rand])) if rand else np.nan})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- phase 4 checks against nulls


def pc1_validation(vec_train: np.ndarray, vec_val: np.ndarray, pc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron (``vec_* [N, n, d]``, ``pc [n, d]`` fitted on training): share of the variance of
    the centred effects (training mean) explained by the training PC1, on training and on validation."""
    tr = np.asarray(vec_train, np.float64)
    va = np.asarray(vec_val, np.float64)
    mean = tr.mean(0)
    u = pc / np.maximum(np.linalg.norm(pc, axis=-1, keepdims=True), 1e-12)
    out = []
    for X in (tr - mean, va - mean):
        num = (np.einsum("Nnd,nd->Nn", X, u) ** 2).sum(0)
        den = (X ** 2).sum((0, 2))
        out.append(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan))
    return out[0], out[1]


def decomposition_rows(quality: pd.DataFrame, pred: pd.DataFrame, pc1v: pd.DataFrame, recovered: dict[str, Any],
                       attribution: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``decomposition_table`` (columns of ``validation_table``)."""

    rows = []
    m = "sparse decomposition: cosine minus random dictionary (read-out + data)"
    how = ("per selected neuron, cosine of PC1 with its m-sparse OMP reconstruction over read-out + data concepts "
           "minus the same with a random Gaussian dictionary of as many atoms; mean over neurons, bootstrap CI")
    q = quality[quality.dictionary == "read-out + data"] if len(quality) else quality
    d = (q.cosine - q.cosine_random).values if len(q) else []
    rows.append(mean_row(m, d, 0.0, 0.05, how, "fewer than 2 selected neurons or too few concepts for m"))
    m = "sparse decomposition: math/logic concepts minus vocabulary pool"
    how = ("per selected neuron, reconstruction cosine with read-out + data concepts minus with the model's whole "
           "vocabulary (generic pool, many more atoms); mean over neurons, bootstrap CI")
    if len(quality) and {"read-out + data", "vocabulary (generic pool)"} <= set(quality.dictionary):
        a = quality[quality.dictionary == "read-out + data"].set_index(["layer", "neuron"]).cosine
        b = quality[quality.dictionary == "vocabulary (generic pool)"].set_index(["layer", "neuron"]).cosine
        rows.append(mean_row(m, (a - b.reindex(a.index)).values, 0.0, 0.0, how, "fewer than 2 neurons"))
    else:
        rows.append(not_measurable(m, how, "a dictionary has fewer atoms than m", 0.0))
    m = "sparse replacement: share of the mean-ablation drop recovered (selected neurons)"
    how = ("validation accuracy when every selected neuron's effect is replaced by its training mean plus its "
           "projection on the sparse reconstruction: (acc(sparse) - acc(mean)) / (acc(clean) - acc(mean)); "
           "paired bootstrap")
    if recovered.get("share") == recovered.get("share"):
        rows.append(row(m, recovered["share"], (recovered["ci_low"], recovered["ci_high"]), 0.0, 0.8, how))
    else:
        rows.append(not_measurable(m, how, recovered.get("note", "nothing to recover").removeprefix("not testable: "),
                                   0.8))
    m = "predictive check: top data concept predicts significance, minus random concepts"
    how = ("per selected neuron, |AUROC - 0.5| of its top data concept's flag for the validation problems on "
           "which it is significant, minus the mean for random data concepts; mean over neurons, bootstrap CI")
    d = (pred.strength - pred.strength_random).values if len(pred) else []
    rows.append(mean_row(m, d, 0.0, 0.05, how,
                         "fewer than 2 neurons with a data concept and both significance classes"))
    m = "PC1: validation variance explained by the training PC1 (selected neurons)"
    how = ("share of the variance of each selected neuron's validation centred effects (training mean) along its "
           "training PC1; mean over neurons, bootstrap CI; null: mean 1/K (a random direction in the K-dim span "
           "of later heads)")
    null = float((1 / pc1v.K.astype(float)).mean()) if len(pc1v) else float("nan")
    train = f"; training share {pc1v.train_share.mean():.3f}" if len(pc1v) else ""
    rows.append(mean_row(m, pc1v.val_share.values, null, 0.35, how + train, "fewer than 2 selected neurons"))
    m = "token attribution: share on the question's operand tokens"
    how = ("per validation arithmetic problem, the share of |per-position second-order attribution| (logit "
           "difference) of the selected neurons on the final question's operand tokens, averaged over neurons; "
           "null: operand tokens / positions up to T (position count); bootstrap over problems")
    if len(attribution) and attribution.problem.nunique() >= 2:
        per = attribution.groupby("problem")[["share", "null"]].mean()
        rows.append(row(m, per.share.mean(), bootstrap_ci(per.share.values), float(per.null.mean()),
                        float(per.null.mean()), how + f" (n={len(per)} problems)"))
    else:
        rows.append(not_measurable(m, how, "no validation arithmetic problem whose operand tokens could be located",
                                   0.0))
    rows.append(carry_attribution_row(attribution))
    return rows


def carry_attribution_row(attribution: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Token attribution against carry positions: does the effect draw more on the operand tokens
    when the problem needs a carry (or borrow), where the answer digit depends on both operands'
    lower digits? Mean operand share (in excess of its position-count null) on carry problems minus
    on no-carry problems, two-sample bootstrap over problems, null 0."""
    m = "token attribution: operand share, carry minus no-carry problems"
    how = ("per validation addition/subtraction/multiplication problem, the operand share of the selected "
           "neurons' attribution minus its position-count null; mean over carry problems minus mean over "
           "no-carry problems; two-sample bootstrap over problems; null: 0 (carries change nothing)")
    if not len(attribution) or "carry" not in attribution:
        return not_measurable(m, how, "no attribution table", 0.0)
    per = attribution.dropna(subset=["carry"]).groupby("problem").agg(
        carry=("carry", "first"), excess=("share", "mean"), null=("null", "mean"))
    per["excess"] -= per["null"]
    a = per.excess[per.carry.astype(bool)].values
    b = per.excess[~per.carry.astype(bool)].values
    if len(a) < 5 or len(b) < 5:
        return not_measurable(m, how, f"{len(a)} carry and {len(b)} no-carry problems (need 5 of each)", 0.0)
    rng = np.random.default_rng(seed)
    boots = [a[rng.integers(0, len(a), len(a))].mean() - b[rng.integers(0, len(b), len(b))].mean()
             for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return row(m, a.mean() - b.mean(), (lo, hi), 0.0, 0.0, how + f" (n={len(a)} carry, {len(b)} no-carry)")


# ----------------------------------------------------------------------------- the phase, for notebooks


def decomposition_phase(setup: Setup, m: int = 16, progress: bool = True, max_attribution_problems: int = 200
                        ) -> dict[str, Any]:
    """Phase 4: each selected neuron's principal direction (PC1 of its centred effects, training
    split) decomposed by OMP over math/logic concept directions, compared with the model's
    vocabulary as a generic pool and with random dictionaries; replacement accuracy against
    rank-1; whether the top data concept predicts where the neuron is significant; validation
    variance of the training PC1; token-level attribution against operand positions. Every claim
    is a row of ``decomposition_table`` (the columns of ``validation_table``)."""
    from . import characterize as C
    from . import attribution as At
    from .protocol import recovered_share
    run, model = setup.run, setup.model
    crit, selected = load_selection(run)
    ln = ModelInfo.of(model).norm == "LN"
    L, H = model.cfg.n_layers, model.cfg.n_heads
    nd = run.load("neuron_directions")  # PC1 and significance from Phase 3
    pc1 = {l: nd["pc1"][str(l)].numpy() for l in crit}
    vec_deps = [f"{s}_vectors_L{l}" for s in ("train", "val") for l in crit]
    vt = {l: np.asarray(load_effects(run, "train", f"vectors_L{l}"), dtype=np.float32) for l in crit}
    vv = {l: np.asarray(load_effects(run, "val", f"vectors_L{l}"), dtype=np.float32) for l in crit}
    centred_val = {l: vv[l] - vt[l].mean(0) for l in crit}
    dirs = (np.concatenate([pc1[l] for l in crit]).astype(np.float64) if crit
            else np.zeros((0, model.cfg.d_model)))  # [n_sel_total, d]
    owners = [(l, n) for l in crit for n in selected[l]]
    resid_train = run.load("correctness_direction")["final_resid_train"]  # written by Phase 2
    flags = {s: metadata_flags(setup.problems.split(s)) for s in ("train", "val")}
    lex_c, lex_d = readout_directions(model, lexicon_entries())
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

    def decompose_all() -> pd.DataFrame:
        quality = []
        for name, (cs, D) in dictionaries.items():
            if len(cs) < m or not len(dirs):
                continue
            dec = decompose(dirs, prepare_dictionary(D), cs, m)
            decs[name] = dec
            for (l, n), c, cr in zip(owners, dec["cosine"], dec["cosine_random"]):
                quality.append({"dictionary": name, "atoms": len(cs), "layer": l, "neuron": n,
                                "cosine": float(c), "cosine_random": float(cr)})
        return pd.DataFrame(quality, columns=["dictionary", "atoms", "layer", "neuron", "cosine", "cosine_random"])
    quality = decompose_all()  # the codes are needed below; the table is the step's artifact
    run.step("decomposition_quality", lambda: quality, "04", params={"m": m}, deps=deps)
    main = decs.get("read-out + data")
    main_c, main_D = dictionaries["read-out + data"]
    run.step("concept_dictionary", lambda: {
        "atoms": torch.from_numpy(prepare_dictionary(main_D)).float(), "names": [c.name for c in main_c],
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

    def recovered() -> dict[str, Any]:
        if not main or not crit:
            return {"share": float("nan"), "note": "no sparse reconstruction (too few concepts or neurons)"}
        per = {}
        for kind in ("mean", "sparse"):
            delta = sum(torch.as_tensor(edits[l][kind]) for l in crit)
            per[kind] = C.answer_metrics(C.final_logits(model, resid_val + delta), gold_val)[0].numpy()
        clean = C.answer_metrics(C.final_logits(model, resid_val), gold_val)[0].numpy()
        r = recovered_share(clean, per["mean"], per["sparse"])
        return {k: (float(v) if not isinstance(v, str) else v) for k, v in r.items()}
    rec = run.step("sparse_recovered_share", recovered, "04", params={"m": m}, deps=deps + ["layer_sums_val"])
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
    attr = run.step("token_attribution", lambda: At.operand_share_check(
        setup, selected, max_attribution_problems, setup.batch_size), "04",
        params={"max_problems": max_attribution_problems}, deps=["selection", "labels_val"])
    tab = run.step("decomposition_table", lambda: table(decomposition_rows(quality, pred, pc1v, rec, attr)), "04",
                   params={"m": m}, deps=["decomposition_quality", "predictive_check", "pc1_validation",
                                          "sparse_recovered_share", "token_attribution"])
    run.record("phase4", {"m": m, "dictionary_sizes": {k: len(v[0]) for k, v in dictionaries.items()}})
    return {"quality": quality, "replacement": repl, "predictive": pred, "cards": cards, "decompositions": decs,
            "owners": owners, "critical_layers": crit, "table": tab, "pc1_validation": pc1v,
            "attribution": attr, "recovered": rec}


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
