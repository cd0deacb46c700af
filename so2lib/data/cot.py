"""Chain-of-thought mode: the model reasons first, then writes its final answer.

1. Bounded greedy generation from each prompt (``Template(style="cot")``: worked examples
   ending in ``The answer is N.``), ``max_new_tokens`` at most, stopping at the end of the
   answer block (a blank line, the next ``Q:``, or the end-of-sequence token).
2. The final answer is extracted from the generation (the number or word after the last
   ``The answer is``; else the last number). The problem is correct iff it equals the gold
   answer (numbers compared as numbers): binary correctness from real generation.
3. The analysis position is the deciding token of the final answer written after the model's
   own reasoning: the prompt becomes prompt + the model's reasoning up to ``The answer is``,
   the answer the gold one, and :func:`so2lib.data.labels.label` finds ``k*`` there.

Generations are cached in the run (:func:`generate_cached`) and resumable: finished batches
are kept in a progress file, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from so2lib.data.labels import Encoded, encode, label, prompt_text
from so2lib.data.tasks import Problem, Template
from so2lib.runs.rundir import Run, atomic_write

MARKER = "The answer is"
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@torch.no_grad()
def greedy_generate(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                    stop_texts: Sequence[str] = ("\n\n", "\nQ:"), eos_id: int | None = None,
                    batch_size: int = 16, pad_id: int = 0, progress: bool = False) -> list[list[int]]:
    """Greedy continuation tokens of every prompt (full forward pass per step, right-padded
    rows: exact for causal models). A row stops after ``max_new_tokens``, at ``eos_id``, or once
    its decoded continuation contains one of ``stop_texts`` (the stop text is kept)."""
    tok = model.tokenizer
    device = next(model.parameters()).device
    out: list[list[int]] = []
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc="generating", disable=not progress, leave=False):
        rows = [list(p) for p in prompts[s:s + batch_size]]
        gen: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))
        for _ in range(max_new_tokens):
            if not live:
                break
            seqs = [rows[r] + gen[r] for r in live]
            S = max(map(len, seqs))
            x = torch.full((len(seqs), S), pad_id, dtype=torch.long)
            for j, q in enumerate(seqs):
                x[j, : len(q)] = torch.tensor(q)
            last = torch.tensor([len(q) - 1 for q in seqs])
            logits = model(x.to(device))
            nxt = logits[torch.arange(len(seqs), device=device), last.to(device)].argmax(-1).tolist()
            still = []
            for r, t in zip(live, nxt):
                gen[r].append(int(t))
                text = tok.decode(gen[r])
                if (eos_id is not None and t == eos_id) or any(st in text for st in stop_texts):
                    continue
                still.append(r)
            live = still
        out += gen
    return out


def extract_answer(text: str) -> str | None:
    """The final answer in a generation: after the last ``The answer is``, else the last number."""
    i = text.rfind(MARKER)
    if i >= 0:
        tail = text[i + len(MARKER):].strip()
        m = _NUM.match(tail.lstrip(":$ "))
        if m:
            return m.group(0).replace(",", "")
        w = re.match(r"[A-Za-z]+", tail)
        return w.group(0).lower() if w else None
    nums = _NUM.findall(text)
    return nums[-1].replace(",", "") if nums else None


def same_answer(pred: str | None, gold: str) -> bool:
    """Exact match, numbers compared as numbers (``"57.0"`` equals ``"57"``)."""
    if pred is None:
        return False
    try:
        return abs(float(pred) - float(gold)) < 1e-9
    except ValueError:
        return pred.strip().lower() == gold.strip().lower()


def generate_cached(run: Run, name: str, model: Any, enc: Encoded, max_new_tokens: int,
                    batch_size: int = 16, progress: bool = True, params: dict | None = None,
                    deps: Sequence[str] = ()) -> list[list[int]]:
    """Greedy generations of every prompt of ``enc``, as run artifact ``name`` (a list of token
    lists). Finished batches are saved in ``{name}_progress.json`` so that an interrupted call
    resumes; the partial file is only trusted when it was written with the same input key."""
    key = run.key_for(name, params, deps)

    def compute() -> list[list[int]]:
        prog = run.file(f"{name}_progress.json")
        state = json.loads(prog.read_text()) if prog.exists() else {}
        if state.get("key") != key:
            state = {"key": key, "done": {}}
        tok = model.tokenizer
        for s in tqdm(range(0, len(enc), batch_size), desc=f"CoT {name}", disable=not progress, leave=False):
            if str(s) in state["done"]:
                continue
            prompts = [enc.prompt_ids[i] for i in range(s, min(s + batch_size, len(enc)))]
            state["done"][str(s)] = greedy_generate(model, prompts, max_new_tokens, eos_id=tok.eos_token_id,
                                                    batch_size=batch_size, pad_id=enc.pad_id)
            atomic_write(prog, lambda p: p.write_text(json.dumps(state)))
        return [g for s in sorted(state["done"], key=int) for g in state["done"][s]]
    return run.step(name, compute, "01", params=params, deps=deps)


def reasoning_problems(model: Any, problems: Sequence[Problem], template: Template,
                       generations: Sequence[Sequence[int]]) -> tuple[list[str], list[str | None]]:
    """For each problem: the prompt text extended by the model's own reasoning up to and
    including ``The answer is`` (appended when the model never wrote it), and the extracted
    final answer."""
    tok = model.tokenizer
    texts, answers = [], []
    for p, g in zip(problems, generations):
        gen = tok.decode(g)
        for st in ("\n\n", "\nQ:"):
            if st in gen:
                gen = gen[: gen.index(st)]
        answers.append(extract_answer(gen))
        i = gen.rfind(MARKER)
        reasoning = gen[: i + len(MARKER)] if i >= 0 else gen.rstrip() + " " + MARKER
        texts.append(prompt_text(model, p, template) + reasoning)
    return texts, answers


def reasoning_encoded(model: Any, problems: Sequence[Problem], template: Template,
                      generations: Sequence[Sequence[int]]) -> tuple[Encoded, list[str | None]]:
    """Encodings of prompt + the model's reasoning up to ``The answer is`` followed by the gold
    answer (:func:`reasoning_problems`), and the extracted final answers."""
    texts, answers = reasoning_problems(model, problems, template, generations)
    plain = Template("compact", space=template.space, bos=template.bos)
    shim = [Problem(p.task, t, p.question, p.answer, p.meta) for p, t in zip(problems, texts)]
    return encode(model, shim, plain), answers


def cot_labels(model: Any, problems: Sequence[Problem], template: Template,
               generations: Sequence[Sequence[int]], batch_size: int = 16, position: str = "decide",
               progress: bool = False) -> tuple[pd.DataFrame, Encoded]:
    """Labels from generation (``correct``: the extracted final answer equals the gold one) and
    the encodings after the model's own reasoning, where the teacher-forced columns (deciding
    token, margins, ``logit_diff``) are taken. Extra columns: ``generated_answer``,
    ``forced_correct`` (teacher-forced correctness of the gold answer after the reasoning)."""
    enc, answers = reasoning_encoded(model, problems, template, generations)
    lab = label(model, enc, batch_size, progress, position=position)
    lab["forced_correct"] = lab["correct"]
    lab["generated_answer"] = answers
    lab["correct"] = [same_answer(a, p.answer) for a, p in zip(answers, problems)]
    return lab, enc
