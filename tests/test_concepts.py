"""Phase 4: OMP on planted codes, concept directions against direct computations."""

import numpy as np
import pandas as pd
import pytest
import torch

from so2lib.phases import concepts as K
from so2lib.engine.capture import capture_batch
from so2lib.data.labels import encode
from so2lib.data.tasks import make_problem_set


def test_lexicon_is_large_and_categorised():
    entries = K.lexicon_entries()
    assert len(entries) >= 200
    cats = {e.category for e in entries}
    for c in ("operations", "number properties", "digits and number words", "comparison", "algebra",
              "logic connectives and quantifiers", "procedure", "errors"):
        assert c in cats
    assert len({e.name for e in entries}) == len(entries)


def test_omp_recovers_a_planted_sparse_code():
    rng = np.random.default_rng(123)
    n_atoms, d, m, n = 300, 64, 5, 12
    D = K.prepare_dictionary(rng.normal(size=(n_atoms, d)))
    codes = np.zeros((n, n_atoms))
    for j in range(n):
        idx = rng.choice(n_atoms, m, replace=False)
        codes[j, idx] = rng.uniform(1, 2, m) * rng.choice([-1, 1], m)
    Y = codes @ D
    got = K.sparse_codes(Y, D, m)
    for j in range(n):
        assert set(np.flatnonzero(got[j])) == set(np.flatnonzero(codes[j]))
    np.testing.assert_allclose(got, codes, atol=1e-8)
    dec = K.decompose(Y, D, [K.Concept(str(i), "x", "data") for i in range(n_atoms)], m)
    assert np.allclose(dec["cosine"], 1.0)
    assert (dec["cosine_random"] < 0.9).all()  # a random dictionary does not reproduce it


def test_prepare_dictionary_centres_and_normalises():
    D = K.prepare_dictionary(np.random.default_rng(1).normal(size=(20, 6)) + 5)
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0)
    raw = np.random.default_rng(1).normal(size=(20, 6)) + 5
    c = raw - raw.mean(0)
    np.testing.assert_allclose(D, c / np.linalg.norm(c, axis=1, keepdims=True))


def test_bad_sparsity():
    with pytest.raises(ValueError, match="sparsity"):
        K.sparse_codes(np.ones((1, 4)), np.eye(4), 9)


def test_readout_directions_are_centred_unembedding_columns(tiny_models):
    model = tiny_models["gpt2"]
    cs = [K.Concept("carry", "procedure", "read-out"), K.Concept("57", "digits", "read-out"),
          K.Concept("zzzunknownzzz", "errors", "read-out")]
    kept, D = K.readout_directions(model, cs)
    assert [c.name for c in kept] == ["carry", "57"]  # unknown words are dropped
    tok = model.tokenizer
    for c, row in zip(kept, D):
        t = tok(" " + c.name, add_special_tokens=False)["input_ids"][0]
        col = model.W_U[:, t].detach()
        torch.testing.assert_close(row, col - col.mean())
    llama = tiny_models["llama"]
    _, llama_D = K.readout_directions(llama, cs)
    t = tok(" carry", add_special_tokens=False)["input_ids"][0]
    torch.testing.assert_close(llama_D[0], llama.W_U[:, t].detach())  # RMSNorm: no centring


def test_data_directions_are_mean_differences_of_final_residuals(tiny_models):
    model = tiny_models["neox"]
    probs = make_problem_set(60, 0, seed=4).train
    flags = K.metadata_flags(probs)
    assert {"carry", "borrow", "truth true", "task=logic"} <= set(flags.columns)
    enc = encode(model, probs)
    x, T = enc.batch(range(len(probs)))
    resid = capture_batch(model, x, T, []).final_resid
    kept, D = K.data_directions(resid, flags, layer_norm=True, min_count=3)
    names = [c.name for c in kept]
    assert "task=logic" in names
    i = names.index("task=logic")
    is_logic = np.array([p.task == "logic" for p in probs])
    R = resid - resid.mean(-1, keepdim=True)
    expect = R[torch.as_tensor(is_logic)].mean(0) - R[torch.as_tensor(~is_logic)].mean(0)
    torch.testing.assert_close(D[i], expect)
    # carry applies only to addition/multiplication problems: the others are left out
    if "carry" in names:
        f = flags["carry"].values
        pos, neg = f == 1, f == 0
        expect = R[torch.as_tensor(pos)].mean(0) - R[torch.as_tensor(neg)].mean(0)
        torch.testing.assert_close(D[names.index("carry")], expect)


def test_predictive_auroc_finds_a_planted_predictor():
    rng = np.random.default_rng(3)
    N = 300
    flags = pd.DataFrame({"a": rng.integers(0, 2, N).astype(float), "b": rng.integers(0, 2, N).astype(float),
                          "c": rng.integers(0, 2, N).astype(float)})
    sig = np.stack([flags["a"].values.astype(bool) & (rng.random(N) < 0.8)], 1)
    concepts = [K.Concept(n, "x", "data") for n in ("a", "b", "c")]
    codes = np.array([[0.9, 0.0, 0.1]])
    out = K.predictive_auroc(sig, flags, codes, concepts, n_random=3)
    assert out.concept.iloc[0] == "a"
    assert out.auroc.iloc[0] > 0.8
    assert out.strength.iloc[0] > out.strength_random.iloc[0]
