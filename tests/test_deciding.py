"""Answers of several tokens: the deciding token, the analysis view, and effects there.

Tiny random GPT-2 / GPT-NeoX / Llama models with a digit-by-digit tokenizer that writes the
answer's space as a token of its own (like SmolLM2 and Llama), so every numeric answer has
several tokens.
"""

import numpy as np
import pytest
import torch
import transformers

from so2lib.phases import study
from so2lib.engine.bruteforce import brute_force_second_order
from so2lib.phases.effects import compute_effects, load_effects
from so2lib.data.labels import Encoded, label
from so2lib.engine.models import load_model
from so2lib.engine.second_order import second_order_effects

from conftest import ARCHS, tiny_config
from test_tokenizers import tiny_tokenizer


@pytest.fixture(scope="module")
def digit_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("digit_models")
    tok = tiny_tokenizer("separate")
    out = {}
    for arch in ARCHS:
        torch.manual_seed(1)
        m = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), n_layers=3))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                    p.mul_(4.0)
        m.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_open_run_multi_token_answers(arch, digit_models, tmp_path):
    setup = study.open_run(str(tmp_path / "r"), str(digit_models[arch]), n_train=12, n_val=6, min_counts=False, seed=0,
                           tasks=("addition", "multiplication", "comparison"), device="cpu", batch_size=5,
                           template="compact", progress=False)
    tok = setup.model.tokenizer
    per = setup.run.manifest["data"]["per_task"]
    assert all(v["kept"] == v["generated"] for v in per.values())
    assert setup.run.manifest["data"]["position"] == "decide"
    assert setup.run.manifest["model"]["chat_template_used"] is False
    for s in ("train", "val"):
        lab, base, view = setup.labels[s], setup.prompt_enc[s], setup.enc[s]
        assert (lab.n_answer_tokens > 1).any()
        # the first answer token is never the space
        assert all(tok.decode([a[0]]).strip() for a in base.answer_ids)
        assert all(tok.decode([int(t)]).strip() for t in lab.gold_token)
        # the analysis view is read at T_k* with the deciding token
        assert (view.answer_pos.numpy() == lab.answer_pos.values).all()
        assert (view.gold.numpy() == lab.gold_token.values).all()
        assert (view.prompt_pos.numpy() == base.answer_pos.numpy()).all()
        # labelling the view again gives the same reading (k* fixed by the view)
        again = label(setup.model, view, 4, progress=False)
        assert (again.decide_k == lab.decide_k).all() and (again.correct == lab.correct).all()
        np.testing.assert_allclose(again.logit_diff, lab.logit_diff, atol=1e-4)
    # reopening without phase-1 options reuses the recorded ones; other options are refused
    study.open_run(str(tmp_path / "r"), str(digit_models[arch]), n_train=12, n_val=6, min_counts=False, device="cpu",
                   batch_size=5, progress=False)
    with pytest.raises(ValueError, match="another run directory"):
        study.open_run(str(tmp_path / "r"), str(digit_models[arch]), n_train=12, n_val=6, min_counts=False, device="cpu",
                       position="first", progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_effects_at_the_deciding_token_equal_brute_force(arch, digit_models, tmp_path):
    setup = study.open_run(str(tmp_path / "r"), str(digit_models[arch]), n_train=8, n_val=4, min_counts=False, seed=2,
                           tasks=("addition", "multiplication"), device="cpu", batch_size=4,
                           template="compact", progress=False)
    model, base = setup.model, setup.prompt_enc["train"]
    # read every problem at its last answer token, so that T_k* != T_1 on every row
    k = [len(a) - 1 for a in base.answer_ids]
    assert max(k) > 0
    view = base.analysis_view(k)
    lab = label(model, view, 4, progress=False)
    assert (lab.decide_k.values == k).all()
    layer, neurons = 0, [3, 20]
    run = setup.run
    compute_effects(model, view, lab, run, "train", torch.randn(model.cfg.d_model), {layer: neurons}, 4,
                    progress=False)
    stored = np.asarray(load_effects(run, "train", f"vectors_L{layer}"), dtype=np.float32)
    x, T = view.batch(range(len(view)))
    assert (T != base.answer_pos).any()
    eff = second_order_effects(model, x, T, layer, neurons)
    for j, n in enumerate(neurons):
        bf = brute_force_second_order(model, x, T, layer, n)
        assert bf.norm() > 1e-4
        assert float((eff[:, j] - bf).norm() / bf.norm()) < 2e-5
        np.testing.assert_allclose(stored[:, j], bf.numpy(), rtol=2e-2, atol=2e-3 * float(bf.abs().max()))


def test_analysis_view_roundtrip():
    enc = Encoded([[0, 5, 6], [0, 7]], [[8, 9, 10], [11]], 0)
    view = enc.analysis_view([2, 0])
    assert view.prompt_ids == [[0, 5, 6, 8, 9], [0, 7]] and view.answer_ids == [[10], [11]]
    assert view.answer_pos.tolist() == [4, 1] and view.prompt_pos.tolist() == [2, 1]
    assert view.full(0) == ([0, 5, 6], [8, 9, 10])
    assert view.base().prompt_ids == enc.prompt_ids
    assert view.subset([1]).n_prefix == [0]
    again = view.analysis_view([1, 0])
    assert again.prompt_ids[0] == [0, 5, 6, 8] and again.answer_ids[0] == [9, 10]
    x, T = view.batch([0, 1], with_answer=True)
    assert x[0].tolist() == [0, 5, 6, 8, 9, 10] and T.tolist() == [4, 1]
    with pytest.raises(ValueError, match="out of range"):
        enc.analysis_view([3, 0])


@pytest.mark.parametrize("arch", ARCHS)
def test_correct_needs_the_answer_to_stop(arch, digit_models):
    """Greedy generation one token past the gold answer (digit tokenizer): correct iff the gold
    tokens come out and the next token does not glue onto them (``57`` then ``8`` is ``578``)."""
    from so2lib.data.labels import continuation_mask
    model = load_model(str(digit_models[arch]), device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(digit_models[arch]).eval()
    tok = model.tokenizer
    cont = continuation_mask(tok)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert cont[digits].all() and not cont[tok.convert_tokens_to_ids(" ")]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, len(tok), (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (60,), generator=g)]
    golds, nexts = [], []
    for p in prompts:
        seq = list(p)
        with torch.no_grad():  # plain greedy decoding on the Hugging Face weights (no EOS stop)
            for _ in range(3):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        out = seq[len(p):]
        golds.append(out[:2])
        nexts.append(out[2])
    enc = Encoded(prompts, golds, pad_id=0)
    lab = label(model, enc, batch_size=8, progress=False)
    expect = [not bool(cont[t]) for t in nexts]
    assert lab.correct.tolist() == expect and lab.stopped.tolist() == expect
    assert 0 < sum(expect) < len(expect), "the stop check must be able to go both ways on this sample"
    assert label(model, enc, batch_size=8, progress=False, stop=False).correct.all()


def test_the_label_free_read_position_does_not_depend_on_the_label(digit_models):
    """Tests of correctness read a position picked without the label: the same prompt with a gold
    answer the model writes (correct) and one it leaves at the second token (wrong) is read at
    the same position by ``read_view`` and gets the same greedy path, while the deciding token
    (``position="decide"``) moves with the label."""
    from so2lib.data.labels import LABEL_FREE_POSITIONS, greedy_path, is_multi_token, read_view
    model = load_model(str(digit_models["gpt2"]), device="cpu")
    tok = model.tokenizer
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, len(tok), (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (20,), generator=g)]
    path = greedy_path(model, Encoded(prompts, [[1]] * len(prompts), 0), 3, batch_size=6)
    greedy = path["tokens"].tolist()
    right = Encoded(prompts, [gp[:3] for gp in greedy], 0)
    wrong = Encoded(prompts, [[gp[0], (gp[1] + 1) % len(tok), gp[2]] for gp in greedy], 0)
    lab_r = label(model, right, 6, progress=False, stop=False)
    lab_w = label(model, wrong, 6, progress=False, stop=False)
    assert lab_r.correct.all() and not lab_w.correct.any()
    # the deciding token depends on the label: it is where the wrong answer fails (k = 1) ...
    assert (lab_w.decide_k == 1).all() and (lab_r.decide_k != lab_w.decide_k).any()
    # ... the label-free read view is T_1 for both answers, and the greedy path is the same
    assert is_multi_token(right) and "decide" not in LABEL_FREE_POSITIONS
    for a, b in ((right, wrong), (right.analysis_view(lab_r.decide_k.values), wrong.analysis_view(lab_w.decide_k.values))):
        assert (read_view(a).answer_pos == read_view(b).answer_pos).all()
        assert read_view(a).prompt_ids == read_view(b).prompt_ids == prompts
    for k, v in greedy_path(model, wrong, 3, batch_size=7).items():
        torch.testing.assert_close(v, path[k])
    # the greedy path's margins are the label-free margins at T_1 of the first step
    assert (path["margin"] >= 0).all() and ((path["max_prob"] > 0) & (path["max_prob"] <= 1)).all()
