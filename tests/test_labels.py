import pytest
import torch
import transformers

from so2lib.data.labels import Encoded, accuracy_table, check_classes, encode, label
from so2lib.data.tasks import Problem, make_problem_set

from conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forced_labels_equal_greedy_generation(arch, tiny_dirs, tiny_models):
    """Independent path: Hugging Face `generate` (greedy, KV cache) on the original weights."""
    model = tiny_models[arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [[0] + torch.randint(2, 400, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 9, (24,), generator=g)]
    k = 3  # three-token answers exercise the teacher-forced chain
    generated = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=k, do_sample=False, pad_token_id=0)
        generated.append(out[0, len(p):].tolist())
    golds = []
    for i, gen in enumerate(generated):
        gold = list(gen)
        if i % 3 == 1:
            gold[2] = (gold[2] + 1) % 400 + 2  # wrong only at the last step
        elif i % 3 == 2:
            gold[0] = (gold[0] + 1) % 400 + 2  # wrong from the first step
        golds.append(gold)
    enc = Encoded(prompts, golds, pad_id=0)
    lab = label(model, enc, batch_size=7, progress=False, stop=False)  # padded batches
    expect = [gen == gold for gen, gold in zip(generated, golds)]
    assert lab.correct.tolist() == expect
    assert sum(expect) == 8
    # the deciding token is where generation leaves the gold answer (or, when correct, the
    # smallest margin), and its fields agree with generation
    first_diff = [next((k for k, (a, b) in enumerate(zip(gen, gold)) if a != b), None)
                  for gen, gold in zip(generated, golds)]
    for r, (gen, fd) in enumerate(zip(generated, first_diff)):
        if fd is not None:
            assert lab.decide_k[r] == fd and lab.first_wrong[r] == fd
        assert lab.pred_token[r] == gen[lab.decide_k[r]]
        assert lab.gold_token[r] == golds[r][lab.decide_k[r]]
        assert lab.answer_pos[r] == len(prompts[r]) - 1 + lab.decide_k[r]
    assert ((lab.logit_diff > 0) == (lab.pred_token == lab.gold_token)).all()
    assert (lab.logit_diff >= lab.margin_min).all()
    # "first" keeps today's first-token reading
    first = label(model, enc, batch_size=7, progress=False, position="first", stop=False)
    assert (first.pred_token.values == [g[0] for g in generated]).all()
    assert (first.correct == lab.correct).all() and (first.decide_k == 0).all()


def test_padding_does_not_change_labels(tiny_models):
    model = tiny_models["gpt2"]
    probs = make_problem_set(30, 0, seed=5).train
    enc = encode(model, probs)
    one = label(model, enc, batch_size=1, progress=False)
    many = label(model, enc, batch_size=16, progress=False)
    assert (one.correct == many.correct).all()
    torch.testing.assert_close(torch.tensor(one.logit_diff.values), torch.tensor(many.logit_diff.values),
                               atol=1e-4, rtol=1e-4)
    assert (one.answer_pos.values == enc.answer_pos.numpy()).all()


def test_encode_bos_positions_and_answers(tiny_models):
    model = tiny_models["gpt2"]
    p = Problem("addition", "12 + 7 =", "What is 12 + 7?", "19")
    enc = encode(model, [p])
    tok = model.tokenizer
    assert enc.prompt_ids[0] == [tok.bos_token_id] + tok("12 + 7 =", add_special_tokens=False)["input_ids"]
    assert enc.answer_ids[0] == tok(" 19", add_special_tokens=False)["input_ids"]
    assert int(enc.answer_pos[0]) == 4


def test_prompt_longer_than_context_is_refused(tiny_models):
    model = tiny_models["gpt2"]
    long = Problem("addition", " ".join(["1 +"] * 40) + " 1 =", "q", "41")
    with pytest.raises(ValueError, match="longer than the model's context"):
        encode(model, [long])


def test_multi_token_answers_refused_where_single_tokens_needed():
    enc = Encoded([[0, 5], [0, 6]], [[7], [8, 9]], 0)
    with pytest.raises(ValueError, match="single-token answers"):
        enc.require_single_token("second-order effects")


def test_empty_class_refused():
    with pytest.raises(ValueError, match="correct class is empty"):
        check_classes([False, False])
    with pytest.raises(ValueError, match="incorrect class is empty"):
        check_classes(torch.tensor([True, True]))
    check_classes([True, False])


def test_accuracy_table_counts(tiny_models):
    model = tiny_models["gpt2"]
    probs = make_problem_set(24, 0, seed=1).train
    lab = label(model, encode(model, probs), progress=False)
    lab.loc[:5, "correct"] = True
    tab = accuracy_table(lab, probs)
    assert tab.loc["overall", "n"] == 24
    assert tab.loc["overall", "n_correct"] == int(lab.correct.sum())
    for t in tab.index.drop("overall"):
        rows = [i for i, p in enumerate(probs) if p.task == t]
        assert tab.loc[t, "accuracy"] == pytest.approx(lab.correct.values[rows].mean())
