"""Multi-token answers: the tests of correctness read the model at a label-free position.

The correctness-direction AUROC rows (``applications.phase._direction``) and the error analysis
(``applications.phase._error_analysis``) must read every problem where the first answer token
is predicted (``labels.read_view``, ``T_1``), never at the deciding token ``k*`` of the labels
(the first *wrong* token of an incorrect answer), which depends on the label they are tested
against.

Data: a tiny random GPT-2 with a digit tokenizer, real problems and prompts (``study.open_run``).
Each prompt gets two gold answers of three tokens that share the first token (the model's own
greedy token): ``right`` (the greedy path: correct) and ``wrong`` (its second token changed:
incorrect, ``k* = 1``). Scenario A gives problem ``i`` the right answer where ``(i // 2) % 2 == 0``
and the wrong one elsewhere; scenario B the reverse, so every label is flipped, the gold answers'
later tokens and the deciding views (``Setup.enc``) change, and the first answer token is fixed.
A label-free read gives the same positions and features in A and B; the deciding-token read
(the same harness with ``read_view`` replaced by the deciding view) does not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from so2lib.data import labels as L
from so2lib.data.labels import Encoded, deciding_index, greedy_path, label
from so2lib.engine.capture import answer_activations
from so2lib.phases import effects as E
from so2lib.phases import study
from so2lib.phases.applications import phase as P

from conftest import tiny_config
from test_tokenizers import tiny_tokenizer

N_TRAIN, N_VAL, BS, N_TOK = 32, 16, 8, 3


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = tmp_path_factory.mktemp("lfp")
    tok = tiny_tokenizer("separate")
    torch.manual_seed(1)
    m = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok), n_layers=3))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
    m.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    base = study.open_run(str(root / "run"), str(root / "gpt2"), n_train=N_TRAIN, n_val=N_VAL, min_counts=False,
                          seed=0, tasks=("addition", "multiplication"), device="cpu", batch_size=BS,
                          template="compact", progress=False)
    model, V = base.model, len(base.model.tokenizer)
    out: dict[str, dict] = {"A": {}, "B": {}}
    for s in ("train", "val"):
        pe = base.prompt_enc[s]
        assert pe.n_prefix is None
        path = greedy_path(model, pe, N_TOK, BS)["tokens"].tolist()
        right = [g[:N_TOK] for g in path]
        wrong = [[g[0], (g[1] + 1) % V] + g[2:N_TOK] for g in path]
        first = np.array([(i // 2) % 2 == 0 for i in range(len(pe))])
        for name, pick in (("A", first), ("B", ~first)):
            golds = [r if k else w for r, w, k in zip(right, wrong, pick)]
            enc = Encoded([list(p) for p in pe.prompt_ids], golds, pe.pad_id)
            # stop=False: correct iff the gold tokens are the greedy ones (the random model need not stop)
            lab = label(model, enc, BS, progress=False, stop=False)
            assert (lab.correct.values == pick).all()
            out[name][s] = (enc, lab)
    setups = {}
    for name, d in out.items():
        prompt_enc = {s: d[s][0] for s in d}
        labels = {s: d[s][1] for s in d}
        enc = {s: prompt_enc[s].analysis_view(labels[s].decide_k.values) for s in d}  # as study.open_run
        setups[name] = dataclasses.replace(base, prompt_enc=prompt_enc, enc=enc, labels=labels)
    return setups


def _no_prompt_enc(setup):
    """The setup with only the deciding views (``prompt_enc=None``): the phases then read ``setup.enc``."""
    return dataclasses.replace(setup, prompt_enc=None)


FIXED = {}


def _spy(monkeypatch, log):
    """Record what the phases read: the inputs of every correctness-direction fit (which then returns
    a fixed label-free direction, so that what is tested downstream can be compared across label
    sets), the encodings projected on the direction, the blocks the error analysis tests and the
    scores of the AUROC rows. Phase 2's deciding-token effects must not be read."""
    real_cd, real_proj = E.correctness_direction, P.project_on_direction
    real_sea, real_dvb = P.stratified_error_analysis, P.direction_vs_baselines

    def cd(fn, correct, tasks=None):
        real_cd(fn, correct, tasks)  # both classes present: the phase takes its normal path
        log.setdefault("fit", []).append(fn.clone())
        if fn.shape[1] not in FIXED:
            FIXED[fn.shape[1]] = torch.randn(fn.shape[1], generator=torch.Generator().manual_seed(7))
        return FIXED[fn.shape[1]].to(fn.dtype)

    def proj(model, enc, d, layers, batch_size=64):
        log.setdefault("proj", []).append((enc.prompt_ids, enc.answer_pos.tolist()))
        return real_proj(model, enc, d, layers, batch_size)

    def sea(train_blocks, correct_train, strata_train, val_blocks, *a, **k):
        log.setdefault("blocks", []).append([np.array(b) for b in list(train_blocks) + list(val_blocks)])
        return real_sea(train_blocks, correct_train, strata_train, val_blocks, *a, **k)

    def dvb(score, baselines, correct, *a, **k):
        log.setdefault("scores", []).append([np.array(score)] + [np.array(baselines[b]) for b in sorted(baselines)])
        return real_dvb(score, baselines, correct, *a, **k)

    def no_phase2(*a, **k):
        raise AssertionError(f"read Phase 2's deciding-token effects {a[1:]} for a multi-token test of correctness")

    monkeypatch.setattr(E, "correctness_direction", cd)
    monkeypatch.setattr(P, "project_on_direction", proj)
    monkeypatch.setattr(P, "stratified_error_analysis", sea)
    monkeypatch.setattr(P, "direction_vs_baselines", dvb)
    monkeypatch.setattr(P, "load_effects", no_phase2)


def _reads(setup, monkeypatch):
    """Everything the direction rows and the error analysis read on ``setup`` (real phase functions)."""
    log: dict = {"features": {s: P.read_features(setup, s) for s in ("train", "val")}}
    with monkeypatch.context() as mp:
        _spy(mp, log)
        direction = P._direction(setup, n_boot=20, seed=0)
        ea = P._error_analysis(setup, q=0.05, n_perm=10, seed=0)
    log["direction"], log["ea"] = direction, ea
    return log


def _assert_same_reads(a, b):
    """The positions and features read are the same for two label sets (bit for bit: same prompts, batches)."""
    for s in ("train", "val"):
        for k in ("final_normed", "margin", "max_prob"):
            fa, fb = a["features"][s][k], b["features"][s][k]
            assert np.array_equal(np.asarray(fa), np.asarray(fb)), f"read_features[{s}][{k}] depends on the labels"
    assert len(a["fit"]) == len(b["fit"]) and len(a["proj"]) == len(b["proj"]) == 2
    for x, y in zip(a["fit"], b["fit"]):
        assert torch.equal(x, y), "the correctness direction is fitted on label-dependent reads"
    for (pa, ta), (pb, tb) in zip(a["proj"], b["proj"]):
        assert pa == pb and ta == tb, "the error analysis projects at label-dependent positions"
    for x, y in zip(a["scores"], b["scores"]):
        for u, v in zip(x, y):
            assert np.array_equal(u, v), "the direction AUROC scores label-dependent reads"
    assert len(a["blocks"]) == len(b["blocks"]) >= 1
    for x, y in zip(a["blocks"], b["blocks"]):
        for u, v in zip(x, y):
            assert np.array_equal(u, v), "the error analysis tests label-dependent features"


def test_the_scenarios_flip_labels_and_move_the_deciding_token(scenarios):
    A, B = scenarios["A"], scenarios["B"]
    for s in ("train", "val"):
        la, lb = A.labels[s], B.labels[s]
        assert (la.correct.values == ~lb.correct.values).all() and 0 < la.correct.mean() < 1
        assert (la.n_answer_tokens == N_TOK).all() and L.is_multi_token(A.enc[s])
        assert (la.first_token.values == lb.first_token.values).all()  # first answer token fixed
        assert [a[1:] for a in A.prompt_enc[s].answer_ids] != [b[1:] for b in B.prompt_enc[s].answer_ids]
        # the deciding token (deciding_index on each problem's margins) depends on the label:
        # every wrong answer is decided at its first wrong token k = 1, a right one at its smallest margin
        assert ((la.decide_k.values == 1) | la.correct.values).all()
        assert (la.decide_k.values != lb.decide_k.values).mean() > 0.25
        assert (A.enc[s].answer_pos != B.enc[s].answer_pos).any()
        # ... while the label-free view is T_1 in both
        assert L.read_view(A.enc[s]).prompt_ids == L.read_view(B.enc[s]).prompt_ids == A.prompt_enc[s].prompt_ids
        assert (L.read_view(A.enc[s]).answer_pos == A.prompt_enc[s].answer_pos).all()


@pytest.mark.parametrize("plain_prompts", [True, False], ids=["prompt_enc", "deciding_views_only"])
def test_direction_and_error_analysis_read_label_free_positions(scenarios, monkeypatch, plain_prompts):
    """``read_features`` (the AUROC rows' score and baselines, and the direction fit of both phases),
    ``_direction`` and ``_error_analysis`` read the same positions and features when every label is
    flipped and the gold answers' later tokens change; whether the setup carries the plain prompts
    or only the deciding views."""
    A, B = (scenarios[k] if plain_prompts else _no_prompt_enc(scenarios[k]) for k in ("A", "B"))
    ra, rb = _reads(A, monkeypatch), _reads(B, monkeypatch)
    _assert_same_reads(ra, rb)
    # the read position is T_1, the last prompt token, for every problem
    T1 = {s: scenarios["A"].prompt_enc[s].answer_pos.tolist() for s in ("train", "val")}
    fold_b = np.flatnonzero(np.arange(N_TRAIN) % 2 == 1)
    assert ra["proj"][0][1] == [T1["train"][i] for i in fold_b] and ra["proj"][1][1] == T1["val"]
    assert ra["direction"].get("position") == "first answer token", ra["direction"]
    # the features are the model's at T_1 of the plain prompts
    plain = answer_activations(A.model, scenarios["A"].prompt_enc["val"], [], BS, progress=False)
    assert torch.equal(ra["features"]["val"]["final_normed"], plain["final_normed"])
    # the labels did reach the tests (what is tested against flipped, not what is read): same scores,
    # flipped labels, so the AUROC is mirrored and every neuron's stratified z changes sign
    assert ra["direction"]["auroc"] == pytest.approx(1 - rb["direction"]["auroc"])
    za, zb = ra["ea"]["neurons"].z.values, rb["ea"]["neurons"].z.values
    assert np.isfinite(za).any()
    np.testing.assert_allclose(za, -zb, atol=1e-9)


def test_the_check_bites_on_the_deciding_token(scenarios, monkeypatch):
    """The same assertion fails on a label-dependent position: with ``read_view`` replaced by the
    deciding view (``k*`` from :func:`labels.deciding_index`, the first wrong token of a wrong answer),
    the phases' reads of A and B differ."""
    A, B = _no_prompt_enc(scenarios["A"]), _no_prompt_enc(scenarios["B"])
    # the helper the labels use picks the position with the label
    # (a wrong answer is decided at its first wrong token, a right one at its smallest margin)
    assert deciding_index([0.5, -0.1, 0.2]) == 1 and deciding_index([0.5, 0.3, 0.2]) == 2
    with monkeypatch.context() as mp:
        mp.setattr(L, "read_view", lambda enc: enc)  # read where the labels decided each problem
        ra, rb = _reads(A, mp), _reads(B, mp)
    with pytest.raises(AssertionError, match="depends on the labels|label-dependent"):
        _assert_same_reads(ra, rb)
    # each read that the real phases keep fixed moves with the labels here
    fa, fb = ra["features"]["val"]["final_normed"], rb["features"]["val"]["final_normed"]
    assert not torch.equal(fa, fb)
    assert ra["proj"][1][1] != rb["proj"][1][1]
    assert any(not np.array_equal(u, v) for u, v in zip(ra["blocks"][0], rb["blocks"][0]))
    # and the deciding views themselves give other features than T_1 on the same data
    dec = answer_activations(A.model, A.enc["val"], [], BS, progress=False)["final_normed"]
    assert torch.equal(dec, fa)
    assert not torch.equal(dec, P.read_features(A, "val")["final_normed"])
