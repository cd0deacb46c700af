"""Word problems (GSM8K, SVAMP, MAWPS) through phase 1's problem set and labels."""

import pytest
import torch
import transformers

from so2lib.phases import study
from so2lib.data.tasks import WORD_TASKS, default_data_dir
from so2lib.data.tokenizer import build_tokenizer

HAVE_DATA = all((default_data_dir() / t).is_dir() for t in WORD_TASKS)
pytestmark = pytest.mark.skipif(not HAVE_DATA, reason="shared word-problem data absent")


def test_a_task_that_loses_every_problem_is_an_error_that_says_why(tmp_path):
    # the embedded model's context (64 tokens) is shorter than any few-shot GSM8K prompt
    with pytest.raises(ValueError, match=r"gsm8k.*kept no problem.*too_long"):
        study.open_run(str(tmp_path / "r"), None, n_train=6, n_val=3, min_counts=False, tasks=("addition", "gsm8k"),
                       template="fewshot", n_shots=1, device="cpu", progress=False)


def test_word_tasks_open_run(tmp_path):
    tok = build_tokenizer()
    tok.model_max_length = 1024
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                  n_positions=1024, bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "m"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    setup = study.open_run(str(tmp_path / "r"), str(folder), n_train=6, n_val=3, min_counts=False, tasks=WORD_TASKS,
                           template="fewshot", n_shots=1, device="cpu", batch_size=3, progress=False)
    per = setup.run.manifest["data"]["per_task"]
    assert set(per) == set(WORD_TASKS) and all(v["kept"] == v["generated"] == 3 for v in per.values())
    assert len(setup.labels["train"]) == 6 and len(setup.labels["val"]) == 3
    tab = study.per_task_table(setup)
    assert list(tab.index) == list(WORD_TASKS) and (tab.kept_share == 1).all()
