"""Chain-of-thought mode: generation equals Hugging Face greedy `generate`, labels follow it,
and cached generations resume after an interruption."""

import pytest
import torch
import transformers

from so2lib.data import cot
from so2lib.data.labels import encode
from so2lib.runs.rundir import Run
from so2lib.data.tasks import Problem, Template, make_problem_set


def test_extract_and_compare():
    assert cot.extract_answer("3 + 4 = 7, so 7 * 2 = 14. The answer is 14.") == "14"
    assert cot.extract_answer("The answer is $1,200.") == "1200"
    assert cot.extract_answer("it is true. The answer is true.") == "true"
    assert cot.extract_answer("we get 12 then 15") == "15"
    assert cot.extract_answer("no idea") is None
    assert cot.same_answer("57.0", "57") and not cot.same_answer("58", "57") and not cot.same_answer(None, "1")


def test_cot_labels_equal_real_generation(tiny_dirs, tiny_models):
    model = tiny_models["gpt2"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]).eval()
    tok = model.tokenizer
    tmpl = Template("compact")
    probs = make_problem_set(16, 0, seed=3, tasks=("addition", "algebra")).train
    enc = encode(model, probs, tmpl)
    m = 8
    ours = cot.greedy_generate(model, enc.prompt_ids, m, eos_id=tok.eos_token_id, batch_size=5, pad_id=enc.pad_id)
    theirs = []
    for p in enc.prompt_ids:
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=m, do_sample=False, pad_token_id=0, eos_token_id=tok.eos_token_id)
        g = out[0, len(p):].tolist()
        theirs.append(g[: g.index(tok.eos_token_id) + 1] if tok.eos_token_id in g else g)
    assert ours == theirs
    # gold answers: the model's own final answer for half the problems, so both classes occur
    hf_answers = [cot.extract_answer(tok.decode(g)) for g in theirs]
    golds = [a if (i % 2 == 0 and a is not None) else "98765" for i, a in enumerate(hf_answers)]
    probs = [Problem(p.task, p.compact, p.question, g, p.meta) for p, g in zip(probs, golds)]
    lab, renc = cot.cot_labels(model, probs, tmpl, ours, batch_size=4)
    expect = [cot.same_answer(a, g) for a, g in zip(hf_answers, golds)]
    assert lab.correct.tolist() == expect and 0 < sum(expect) < len(expect)
    # the analysis position comes after the model's own reasoning and "The answer is"
    for i in range(len(probs)):
        text = tok.decode(renc.prompt_ids[i])
        assert text.rstrip().endswith("The answer is")
        assert len(renc.prompt_ids[i]) > len(enc.prompt_ids[i])


def test_cached_generations_resume(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["gpt2"]
    enc = encode(model, make_problem_set(10, 0, seed=4).train, Template("compact"))
    run = Run(tmp_path / "r")
    full = cot.generate_cached(run, "gen", model, enc, 4, batch_size=3, progress=False)
    run2 = Run(tmp_path / "r2")
    real, calls = cot.greedy_generate, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(cot, "greedy_generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        cot.generate_cached(run2, "gen", model, enc, 4, batch_size=3, progress=False)
    calls.clear()
    again = cot.generate_cached(run2, "gen", model, enc, 4, batch_size=3, progress=False)
    assert again == full and len(calls) == 2  # only the two unfinished batches ran
    calls.clear()
    assert cot.generate_cached(run2, "gen", model, enc, 4, batch_size=3, progress=False) == full and not calls
