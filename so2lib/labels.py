"""Tokenizing problems and labelling them correct / incorrect with one teacher-forced pass.

Batches are right-padded: with causal attention no real token ever attends to a pad that
comes after it, so padded rows give exactly the same activations as unpadded ones and no
attention mask is needed. The answer position ``T`` of a row is its last real prompt token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
from .progress import tqdm

from .tasks import Problem, Template


@dataclasses.dataclass
class Encoded:
    """Token ids of prompts (with BOS when the model wants one) and of their gold answers.

    ``prompt_ids[i]`` ends at the answer position ``T_i = len(prompt_ids[i]) - 1``;
    ``answer_ids[i]`` are the gold continuation's tokens (one for single-token answers).
    """

    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def answer_pos(self) -> torch.Tensor:
        """``[n]`` long: the answer position T of every problem."""
        return torch.tensor([len(p) - 1 for p in self.prompt_ids])

    @property
    def gold(self) -> torch.Tensor:
        """``[n]`` long: the first gold answer token of every problem."""
        return torch.tensor([a[0] for a in self.answer_ids])

    def require_single_token(self, what: str = "this mode") -> None:
        multi = [i for i, a in enumerate(self.answer_ids) if len(a) != 1]
        if multi:
            raise ValueError(
                f"{what} needs single-token answers, but {len(multi)} of {len(self)} problems have "
                f"answers of several tokens (first: index {multi[0]}, {len(self.answer_ids[multi[0]])} "
                "tokens). Keep only single-token problems (so2lib.single_token_subset) or use a "
                "model whose tokenizer has one token per number.")

    def subset(self, idx: Sequence[int]) -> "Encoded":
        return Encoded([self.prompt_ids[i] for i in idx], [self.answer_ids[i] for i in idx], self.pad_id)

    def batch(self, idx: Sequence[int], with_answer: bool = False,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``tokens [b, S]`` and ``answer_pos [b]`` for rows ``idx``.

        With ``with_answer`` the gold answer tokens follow each prompt (for teacher forcing).
        """
        seqs = [self.prompt_ids[i] + (self.answer_ids[i] if with_answer else []) for i in idx]
        S = max(map(len, seqs))
        x = torch.full((len(seqs), S), self.pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        T = torch.tensor([len(self.prompt_ids[i]) - 1 for i in idx], dtype=torch.long)
        return x.to(device), T.to(device)

    def batches(self, batch_size: int, with_answer: bool = False, device: str | torch.device = "cpu",
                desc: str | None = None) -> Iterator[tuple[range, torch.Tensor, torch.Tensor]]:
        """Yield ``(row range, tokens, answer_pos)`` in order, with a progress bar when ``desc``."""
        starts = range(0, len(self), batch_size)
        for s in tqdm(starts, desc=desc, disable=desc is None, leave=False):
            rows = range(s, min(s + batch_size, len(self)))
            yield (rows, *self.batch(rows, with_answer, device))


def _pad_id(tok: Any) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if t is not None:
            return int(t)
    return 0


def encode(model: Any, problems: Sequence[Problem], template: Template | None = None) -> Encoded:
    """Tokenize problems for ``model`` with ``template`` (default: compact).

    The answer's tokens are taken from tokenizing prompt + answer together, so BPE merges
    across the boundary are the ones the model would see. Raises ``ValueError`` when a prompt
    with its answer does not fit in the model's context.
    """
    template = template or Template()
    tok = model.tokenizer
    bos = [tok.bos_token_id] if getattr(model.cfg, "default_prepend_bos", True) and tok.bos_token_id is not None else []
    n_ctx = model.cfg.n_ctx
    prompts, answers = [], []
    for i, p in enumerate(problems):
        text = template.render(p)
        ans = template.answer_text(p)
        pid = tok(text, add_special_tokens=False)["input_ids"]
        full = tok(text + ans, add_special_tokens=False)["input_ids"]
        aid = full[len(pid):] if full[: len(pid)] == pid else tok(ans, add_special_tokens=False)["input_ids"]
        if not aid:
            raise ValueError(f"problem {i} ({p.task}): the answer {p.answer!r} tokenizes to nothing")
        if len(bos) + len(pid) + len(aid) > n_ctx:
            raise ValueError(
                f"problem {i} ({p.task}) is {len(bos) + len(pid) + len(aid)} tokens with its answer, "
                f"longer than the model's context of {n_ctx}; use fewer few-shot examples "
                "(Template(n_shots=...)) or drop long problems")
        prompts.append(bos + pid)
        answers.append(aid)
    return Encoded(prompts, answers, _pad_id(tok))


@torch.no_grad()
def label(model: Any, enc: Encoded, batch_size: int = 64, progress: bool = True,
          hooks: Sequence[tuple[str, Any]] = ()) -> pd.DataFrame:
    """Label every problem correct or not with one teacher-forced forward pass per batch.

    A problem is correct iff every gold answer token is the argmax given the prompt and the
    gold tokens before it, which is exactly when greedy decoding produces the gold tokens.

    Returns one row per problem: ``correct``, ``pred_token`` (argmax at T), ``gold_token``
    (first gold token), ``alt_token`` (highest-scoring token other than the gold one at T),
    ``answer_logit``, ``logit_diff`` (gold minus ``alt_token`` logit at T, > 0 iff the first
    token is right), ``answer_pos`` (T) and ``n_answer_tokens``.
    """
    device = next(model.parameters()).device
    rows: list[dict[str, Any]] = []
    for idx, x, T in enc.batches(batch_size, with_answer=True, device=device,
                                 desc="labelling" if progress else None):
        with model.hooks(fwd_hooks=list(hooks)):
            logits = model(x).float()  # [b, S, V]
        ar = torch.arange(len(idx), device=device)
        lt = logits[ar, T]  # [b, V]
        gold = torch.tensor([enc.answer_ids[i][0] for i in idx], device=device)
        g = lt[ar, gold]
        masked = lt.clone()
        masked[ar, gold] = -float("inf")
        alt_logit, alt = masked.max(-1)
        pred = lt.argmax(-1)
        for r, i in enumerate(idx):
            ans = enc.answer_ids[i]
            t = int(T[r])
            steps = logits[r, t : t + len(ans)].argmax(-1).tolist()
            rows.append({"correct": steps == ans, "pred_token": int(pred[r]), "gold_token": ans[0],
                         "alt_token": int(alt[r]), "answer_logit": float(g[r]),
                         "logit_diff": float(g[r] - alt_logit[r]), "answer_pos": t,
                         "n_answer_tokens": len(ans)})
    return pd.DataFrame(rows)


def accuracy_table(labels: pd.DataFrame, problems: Sequence[Problem]) -> pd.DataFrame:
    """Accuracy, counts and mean logit difference per task, with an ``overall`` row."""
    df = labels.assign(task=[p.task for p in problems])
    g = df.groupby("task").agg(n=("correct", "size"), n_correct=("correct", "sum"),
                               accuracy=("correct", "mean"), mean_logit_diff=("logit_diff", "mean"))
    g.loc["overall"] = [len(df), df.correct.sum(), df.correct.mean(), df.logit_diff.mean()]
    g["n"] = g["n"].astype(int)
    g["n_correct"] = g["n_correct"].astype(int)
    return g


def check_classes(correct: Sequence[bool] | torch.Tensor, where: str = "the training split") -> None:
    """Raise a clear error when the correct or the incorrect class is empty."""
    c = torch.as_tensor(list(correct) if not isinstance(correct, torch.Tensor) else correct).bool()
    n_ok, n = int(c.sum()), len(c)
    if n_ok == 0 or n_ok == n:
        empty = "correct" if n_ok == 0 else "incorrect"
        raise ValueError(
            f"the {empty} class is empty on {where} ({n_ok} of {n} problems correct): the "
            "correctness direction and class comparisons need both. Use more or harder/easier "
            "problems (tasks, digit counts) or another model.")


def single_token_subset(enc: Encoded) -> list[int]:
    """Indices of problems whose gold answer is one token."""
    return [i for i, a in enumerate(enc.answer_ids) if len(a) == 1]
