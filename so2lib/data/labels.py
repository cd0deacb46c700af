"""Tokenizing problems and labelling them correct / incorrect with one teacher-forced pass.

Batches are right-padded: with causal attention no real token ever attends to a pad that
comes after it, so padded rows give exactly the same activations as unpadded ones and no
attention mask is needed. The answer position ``T`` of a row is its last real prompt token.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from so2lib.data.tasks import Problem, Template
from so2lib.runs.progress import tqdm


@dataclasses.dataclass
class Encoded:
    """Token ids of prompts (with BOS when the model wants one) and of their gold answers.

    ``prompt_ids[i]`` ends at the answer position ``T_i = len(prompt_ids[i]) - 1``;
    ``answer_ids[i]`` are the gold continuation's tokens (one for single-token answers).

    ``n_prefix[i]`` (``None`` = all zero) says how many gold answer tokens end ``prompt_ids[i]``:
    an *analysis view* (:meth:`analysis_view`) moves the gold tokens before the deciding token
    ``k*`` into the prompt, so that ``T_i`` is the deciding position ``T_{k*}`` and
    ``answer_ids[i][0]`` the deciding token, while prompt + answer is still the whole problem.
    """

    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    pad_id: int
    n_prefix: list[int] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def prefix(self, i: int) -> int:
        """Number of gold answer tokens already in ``prompt_ids[i]`` (``k*`` of an analysis view)."""
        return 0 if self.n_prefix is None else int(self.n_prefix[i])

    def full(self, i: int) -> tuple[list[int], list[int]]:
        """``(prompt without any answer tokens, whole gold answer)`` of problem ``i``."""
        k = self.prefix(i)
        cut = len(self.prompt_ids[i]) - k
        return self.prompt_ids[i][:cut], self.prompt_ids[i][cut:] + self.answer_ids[i]

    @property
    def answer_pos(self) -> torch.Tensor:
        """``[n]`` long: the answer position T of every problem (``T_{k*}`` in an analysis view)."""
        return torch.tensor([len(p) - 1 for p in self.prompt_ids])

    @property
    def prompt_pos(self) -> torch.Tensor:
        """``[n]`` long: the last prompt token ``T_1``, where the first answer token is predicted."""
        return torch.tensor([len(p) - 1 - self.prefix(i) for i, p in enumerate(self.prompt_ids)])

    @property
    def gold(self) -> torch.Tensor:
        """``[n]`` long: the gold answer token predicted at ``T`` (the deciding token in a view)."""
        return torch.tensor([a[0] for a in self.answer_ids])

    def base(self) -> "Encoded":
        """The problems with no answer token in the prompts (``T = T_1``)."""
        if self.n_prefix is None:
            return self
        parts = [self.full(i) for i in range(len(self))]
        return Encoded([p for p, _ in parts], [a for _, a in parts], self.pad_id)

    def analysis_view(self, k: Sequence[int]) -> "Encoded":
        """The view at answer token ``k[i]`` (0-based) of every problem: prompt + gold answer
        tokens before it, answer position ``T_{k}``; ``answer_ids[i][0]`` is token ``k[i]``."""
        if len(k) != len(self):
            raise ValueError(f"need one answer-token index per problem ({len(self)}), got {len(k)}")
        prompts, answers = [], []
        for i, ki in enumerate(k):
            p, a = self.full(i)
            ki = int(ki)
            if not 0 <= ki < len(a):
                raise ValueError(f"problem {i}: answer token {ki} out of range (answer has {len(a)} tokens)")
            prompts.append(p + a[:ki])
            answers.append(a[ki:])
        return Encoded(prompts, answers, self.pad_id, [int(x) for x in k])

    def require_single_token(self, what: str = "this mode") -> None:
        multi = [i for i, a in enumerate(self.answer_ids) if len(a) != 1]
        if multi:
            raise ValueError(
                f"{what} needs single-token answers, but {len(multi)} of {len(self)} problems have "
                f"answers of several tokens (first: index {multi[0]}, {len(self.answer_ids[multi[0]])} "
                "tokens). Keep only single-token problems (so2lib.single_token_subset) or use a "
                "model whose tokenizer has one token per number.")

    def subset(self, idx: Sequence[int]) -> "Encoded":
        return Encoded([self.prompt_ids[i] for i in idx], [self.answer_ids[i] for i in idx], self.pad_id,
                       None if self.n_prefix is None else [self.n_prefix[i] for i in idx])

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
        batch_size = check_batch_size(batch_size)
        starts = range(0, len(self), batch_size)
        for s in tqdm(starts, desc=desc, disable=desc is None, leave=False):
            rows = range(s, min(s + batch_size, len(self)))
            yield (rows, *self.batch(rows, with_answer, device))


def _pad_id(tok: Any) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if t is not None:
            return int(t)
    return 0


# Tokens that open a chat turn, never a document start (ChatML, Llama-3, Gemma, Mistral, Phi).
_CHAT_ROLE = re.compile(r"im_start|start_header|start_of_turn|<\|(user|system|assistant)\|>|\[INST\]", re.I)


def bos_ids(model: Any, mode: str | bool = "auto") -> list[int]:
    """The document-start token to prepend (``[]`` or ``[id]``).

    ``mode="auto"``: the tokenizer's ``bos_token`` when it is a document-start token the model
    was trained with: the tokenizer inserts it itself (Llama, Mistral, Gemma), or the
    architecture's convention says so (TransformerLens's ``default_prepend_bos``, e.g. GPT-2's
    ``<|endoftext|>``). Never a chat-role token such as ChatML's ``<|im_start|>`` (SmolLM2, Qwen).
    ``True``/``False`` force it (``True`` still refuses a chat-role token).
    """
    tok = model.tokenizer
    b = tok.bos_token_id
    if mode is False or mode == "none" or b is None:
        return []
    if _CHAT_ROLE.search(str(tok.bos_token or "")):
        if mode is True:
            raise ValueError(f"the tokenizer's bos_token {tok.bos_token!r} is a chat-role token, not a "
                             "document start; use bos='auto' or False")
        return []
    if mode is True:
        return [int(b)]
    if mode != "auto":
        raise ValueError(f"bos must be 'auto', True or False, not {mode!r}")
    added = tok("1")["input_ids"]
    if added and added[0] == b:
        return [int(b)]
    return [int(b)] if getattr(model.cfg, "default_prepend_bos", True) else []


def has_chat_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _is_space(tok: Any, t: int) -> bool:
    return tok.decode([t]).strip() == ""


def prompt_text(model: Any, p: Problem, template: Template) -> str:
    """The prompt string (before tokenization): ``template.render`` or, with ``template.chat``,
    the user turn of the tokenizer's chat template followed by the assistant's answer prefix."""
    if not template.chat:
        return template.render(p)
    tok = model.tokenizer
    if not has_chat_template(tok):
        raise ValueError("chat=True but the tokenizer has no chat template; use chat=False or 'auto'")
    user, prefix = template.chat_parts(p)
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                   add_generation_prompt=True)
    return text + prefix


def encode(model: Any, problems: Sequence[Problem], template: Template | None = None) -> Encoded:
    """Tokenize problems for ``model`` with ``template`` (default: compact).

    The answer's tokens are taken from tokenizing prompt + answer together, so BPE merges
    across the boundary are the ones the model would see. When the tokenizer writes the
    answer's leading space as a token of its own (SmolLM2, Llama: `` 57`` -> `` ``, ``5``,
    ``7``), that whitespace token goes to the end of the prompt (``template.space="auto"``), so
    the first answer token carries information. BOS: :func:`bos_ids` (``template.bos``); a chat
    template that writes its own BOS is not given a second one. Raises ``ValueError`` when a
    prompt with its answer does not fit in the model's context.
    """
    template = template or Template()
    tok = model.tokenizer
    bos = bos_ids(model, template.bos)
    n_ctx = model.cfg.n_ctx
    prompts, answers = [], []
    for i, p in enumerate(problems):
        text = prompt_text(model, p, template)
        ans = template.answer_text(p)
        pid = tok(text, add_special_tokens=False)["input_ids"]
        full = tok(text + ans, add_special_tokens=False)["input_ids"]
        aid = full[len(pid):] if full[: len(pid)] == pid else tok(ans, add_special_tokens=False)["input_ids"]
        if template.space == "auto":
            while len(aid) > 1 and _is_space(tok, aid[0]):
                pid = pid + [aid[0]]
                aid = aid[1:]
        if not aid or all(_is_space(tok, t) for t in aid):
            raise ValueError(f"problem {i} ({p.task}): the answer {p.answer!r} tokenizes to nothing but whitespace")
        b = [] if (pid and bos and pid[0] == bos[0]) else bos
        if len(b) + len(pid) + len(aid) > n_ctx:
            raise ValueError(
                f"problem {i} ({p.task}) is {len(b) + len(pid) + len(aid)} tokens with its answer, "
                f"longer than the model's context of {n_ctx}; use fewer few-shot examples "
                "(Template(n_shots=...)) or drop long problems")
        prompts.append(b + pid)
        answers.append(aid)
    return Encoded(prompts, answers, _pad_id(tok))


POSITIONS = ("decide", "first")

_CONTINUATION: dict[int, torch.Tensor] = {}


def continuation_mask(tok: Any) -> torch.Tensor:
    """``[V]`` bool: tokens that would extend an answer they follow (``57`` + ``8`` reads ``578``).

    Each token ``t`` is decoded after a probe digit ``1``: it continues the answer when the text
    it adds starts with a letter or digit, or with ``.``/``,`` followed by a digit (``57`` +
    ``.5``). A token that adds whitespace, a newline or other punctuation first ends the answer,
    and so do special tokens; a word-level tokenizer whose decoder puts spaces between tokens
    therefore has no continuation tokens. Cached per tokenizer."""
    key = id(tok)
    if key not in _CONTINUATION:
        special = set(getattr(tok, "all_special_ids", []) or [])
        probe = tok("1", add_special_tokens=False)["input_ids"][-1:]
        head = len(tok.decode(probe))
        V = len(tok)
        texts = tok.batch_decode([probe + [i] for i in range(V)])
        m = torch.zeros(V, dtype=torch.bool)
        for i, t in enumerate(texts):
            r = t[head:]
            m[i] = i not in special and bool(r) and (r[0].isalnum() or (r[0] in ".," and len(r) > 1 and r[1].isdigit()))
        _CONTINUATION[key] = m
    return _CONTINUATION[key]


def deciding_index(margins: Sequence[float], position: str = "decide") -> int:
    """The deciding answer token ``k*`` from the margins ``d_k`` of one problem.

    ``"decide"``: the first ``k`` with ``d_k <= 0`` (where greedy decoding leaves the gold
    answer), else the ``k`` with the smallest margin. ``"first"``: always 0.

    ``"decide"`` depends on the label (a wrong problem is read at its first wrong token, a correct
    one at its smallest margin): it describes where a problem was decided, but a test *of*
    correctness must read a label-free position (:data:`LABEL_FREE_POSITIONS`, :func:`read_view`).
    """
    if position == "first":
        return 0
    if position != "decide":
        raise ValueError(f"unknown answer position rule {position!r}; use one of {POSITIONS}")
    for k, d in enumerate(margins):
        if d <= 0:
            return k
    return int(min(range(len(margins)), key=lambda k: margins[k]))


#: label-free read positions for tests of correctness: ``"first"`` reads the first answer token
#: (the last prompt token ``T_1``, the same position whatever the label); ``"greedy"`` reads each
#: position of the model's own greedy path (:func:`greedy_path`). Never ``"decide"``, whose ``k*``
#: is the first *wrong* token and so depends on the label it would be tested against.
LABEL_FREE_POSITIONS = ("first", "greedy")


def read_view(enc: Encoded) -> Encoded:
    """The label-free read view of ``enc``: the plain prompts, ``T = T_1`` (the position where the
    first answer token is predicted) for every problem, whatever its label. For single-token
    answers this is the deciding view itself (``k* = 0``)."""
    return enc.base()


def is_multi_token(enc: Encoded) -> bool:
    """Whether any problem of ``enc`` has an answer of several tokens (then ``decide`` and the
    label-free read position differ)."""
    return any(len(enc.full(i)[1]) > 1 for i in range(len(enc)))


@torch.no_grad()
def greedy_path(model: Any, enc: Encoded, n_tokens: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The model's own greedy continuation of each prompt of :func:`read_view` (``n_tokens``
    steps, never the gold tokens): ``tokens [N, n]`` and, at each step, the label-free
    confidence ``margin [N, n]`` (top-1 minus top-2 logit) and ``max_prob [N, n]``. Reading a
    correctness score at each of these positions (or at their minimum margin) picks no position
    with the label."""
    base = read_view(enc)
    device = next(model.parameters()).device
    toks, margins, probs = [], [], []
    for _, x, T in base.batches(batch_size, device=device):
        seqs = [x[r, : int(T[r]) + 1].tolist() for r in range(len(T))]
        bt, bm, bp = [], [], []
        for _ in range(n_tokens):
            S = max(map(len, seqs))
            xb = torch.full((len(seqs), S), base.pad_id, dtype=torch.long, device=device)
            for r, s in enumerate(seqs):
                xb[r, : len(s)] = torch.tensor(s, device=device)
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            lg = model(xb)[torch.arange(len(seqs), device=device), last].float()
            top = lg.topk(2, -1)
            bt.append(top.indices[:, 0].cpu())
            bm.append((top.values[:, 0] - top.values[:, 1]).cpu())
            bp.append(lg.softmax(-1).max(-1).values.cpu())
            seqs = [s + [int(t)] for s, t in zip(seqs, top.indices[:, 0].tolist())]
        toks.append(torch.stack(bt, 1))
        margins.append(torch.stack(bm, 1))
        probs.append(torch.stack(bp, 1))
    return {"tokens": torch.cat(toks), "margin": torch.cat(margins), "max_prob": torch.cat(probs)}


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` as an int >= 1, else a ``ValueError`` that says what to pass."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (problems per forward pass, e.g. 64), "
                         f"got {batch_size!r}")
    return int(batch_size)


def _check_label_args(model: Any, enc: Any, batch_size: Any) -> None:
    check_batch_size(batch_size)
    if isinstance(model, str) or not hasattr(model, "tokenizer"):
        raise TypeError(f"label() takes a model loaded with so2lib.load_model(...), not {type(model).__name__} "
                        f"{model!r}"[:200])
    if not isinstance(enc, Encoded):
        raise TypeError(f"label() takes the problems encoded with so2lib.encode(model, problems, template), "
                        f"not {type(enc).__name__}")


def _after_final_norm(hooks: Sequence[tuple[str, Any]]) -> bool:
    """Whether a hook sits at or after the final norm's output (then the whole pass is run)."""
    return any(not str(n).startswith("blocks.") and str(n) not in ("hook_embed", "hook_pos_embed", "ln_final.hook_in")
               for n, _ in hooks)


@torch.no_grad()
def label(model: Any, enc: Encoded, batch_size: int = 64, progress: bool = True,
          hooks: Sequence[tuple[str, Any]] = (), position: str = "decide", stop: bool = True) -> pd.DataFrame:
    """Label every problem correct or not with one teacher-forced forward pass per batch.

    Answer token ``a_k`` is predicted at ``T_k`` with margin ``d_k = logit(a_k) - max_{v != a_k}
    logit(v)``; a problem is correct iff every ``d_k > 0`` and (with ``stop``) greedy decoding
    then ends the answer: at the position after the last gold token the best token that ends it
    scores above the best token that would extend it (:func:`continuation_mask`; ``57`` followed
    by ``8`` is ``578``, wrong). That is exactly when greedy decoding writes the gold answer and
    nothing glued to it. The stop margin is ``stop_margin`` and ``stopped``; a problem whose answer
    tokens are all right but which does not stop keeps its deciding token at the smallest margin
    (there is no gold token to read there). The per-problem columns describe the **deciding token** ``k*``
    (:func:`deciding_index` with ``position``; for an analysis view, its own ``k*``, so that a
    hooked run is read at the clean run's position):

    ``correct``, ``pred_token`` (argmax at ``T_k*``), ``gold_token`` (``a_k*``), ``alt_token``
    (highest-scoring other token at ``T_k*``), ``answer_logit``, ``logit_diff`` (``d_k*``),
    ``answer_pos`` (``T_k*``), ``decide_k`` (``k*``), ``prompt_pos`` (``T_1``),
    ``n_answer_tokens``, ``margin_min`` (smallest ``d_k``), ``first_wrong`` (first ``k`` with
    ``d_k <= 0``, -1 if none), ``first_logit_diff`` (``d_0``) and ``first_token`` (``a_0``).

    The pass stops before the final norm; the final norm and unembedding run only at the rows
    read (:func:`answer_rows`), with the same numbers as the whole pass. ``hooks`` (ablations,
    edits) apply to the pass; a hook at or after the final norm's output runs the whole pass.
    For several edits of the same problems, :func:`label_edits` is cheaper.
    """
    from so2lib.engine import partial as PA

    _check_label_args(model, enc, batch_size)
    device = next(model.parameters()).device
    cont = continuation_mask(model.tokenizer).to(device) if stop else None
    whole = _after_final_norm(hooks)
    rows: list[dict[str, Any]] = []
    for idx, x, T in enc.batches(batch_size, with_answer=True, device=device,
                                 desc="labelling" if progress else None):
        rr, pp, counts = answer_rows(enc, idx, stop)
        rr, pp = rr.to(device), pp.to(device)
        if whole:
            with model.hooks(fwd_hooks=list(hooks)):
                logits = model(x)[rr, pp]
        else:
            logits = PA.logits_at(model, PA.final_resid(model, x, hooks)[rr, pp])
        rows += label_from_logits(enc, list(idx), logits, counts, cont, position)
    return pd.DataFrame(rows)


def length_order(enc: Encoded, with_answer: bool = True) -> np.ndarray:
    """Problem indices by sequence length (stable): batches of similar lengths carry little padding."""
    n = [len(p) + (len(a) if with_answer else 0) for p, a in zip(enc.prompt_ids, enc.answer_ids)]
    return np.argsort(np.asarray(n, dtype=np.int64), kind="stable")


@torch.no_grad()
def label_edits(model: Any, enc: Encoded, edits: Sequence[Any], batch_size: int = 64, position: str = "decide",
                stop: bool = True, progress: bool = False, desc: str = "labelling edits") -> list[pd.DataFrame]:
    """:func:`label` of ``enc`` under each neuron edit of ``edits`` (:data:`so2lib.engine.partial.Edit`;
    ``{}`` is the clean pass), one DataFrame per edit, in ``enc``'s order.

    Cheaper than one :func:`label` call per edit, with the same numbers up to float rounding
    (batch composition): the problems are batched by length (:func:`length_order`, little
    padding), each batch's clean residual is computed once and every edited pass starts at the
    edit's first layer from it; edits with the same first layer are stacked into one pass
    (the batch repeated, each copy with its own edit) of at most ``batch_size`` x the longest
    sequence rows x positions (the largest plain batch); an edit's own first layer is skipped
    where its MLP writes linearly (:func:`so2lib.engine.partial.run_edits`); logits only at the
    rows read."""
    from so2lib.engine import partial as PA

    _check_label_args(model, enc, batch_size)
    device = next(model.parameters()).device
    cont = continuation_mask(model.tokenizer).to(device) if stop else None
    order = length_order(enc, True)
    longest = max((len(p) + len(a) for p, a in zip(enc.prompt_ids, enc.answer_ids)), default=1)
    budget = batch_size * longest  # rows x positions of the largest plain batch
    rows_per = batch_size if len(edits) <= 1 else max(1, batch_size // min(len(edits), 8))
    out: list[list[dict[str, Any]]] = [[] for _ in edits]
    starts = range(0, len(enc), rows_per)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        idx = [int(i) for i in order[s:s + rows_per]]
        x, _ = enc.batch(idx, with_answer=True, device=device)
        rr, pp, counts = answer_rows(enc, idx, stop)
        res = PA.run_edits(model, x, (rr, pp), edits, budget)
        for j, r in enumerate(res):
            out[j] += label_from_logits(enc, idx, PA.logits_at(model, r), counts, cont, position)
    inv = np.argsort(order, kind="stable")
    return [pd.DataFrame(o).iloc[inv].reset_index(drop=True) if len(o) else pd.DataFrame(o) for o in out]


def answer_rows(enc: Encoded, idx: Sequence[int], stop: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Where :func:`label` reads the logits of the problems ``idx`` of a batch: ``(row, pos)``
    index tensors of every answer position ``T_1 .. T_n`` (and the stop position after the last
    gold token with ``stop``), and the count per problem."""
    rr, pp, counts = [], [], []
    for r, i in enumerate(idx):
        p, ans = enc.full(i)
        k = len(ans) + bool(stop)
        rr += [r] * k
        pp += list(range(len(p) - 1, len(p) - 1 + k))
        counts.append(k)
    return torch.tensor(rr, dtype=torch.long), torch.tensor(pp, dtype=torch.long), counts


def label_from_logits(enc: Encoded, idx: Sequence[int], logits: torch.Tensor, counts: Sequence[int],
                      cont: torch.Tensor | None, position: str = "decide") -> list[dict[str, Any]]:
    """:func:`label`'s rows for the problems ``idx`` from their answer-position logits only
    (``logits [sum(counts), V]`` at the positions of :func:`answer_rows`, in that order; with
    ``cont``, the last row of each problem is its stop position). Vectorised over the batch; the
    same values as reading each problem's rows on its own."""
    idx = list(idx)
    if not idx:
        return []
    device = logits.device
    lt_all = logits.float()
    answers = [enc.full(i)[1] for i in idx]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    a_rows = torch.as_tensor(np.concatenate([s + np.arange(len(a)) for s, a in zip(starts, answers)]),
                             dtype=torch.long, device=device)
    a_tok = torch.as_tensor([t for a in answers for t in a], dtype=torch.long, device=device)
    lt = lt_all[a_rows]  # [sum n, V]
    ar = torch.arange(len(a_rows), device=device)
    g = lt[ar, a_tok]
    masked = lt.clone()
    masked[ar, a_tok] = -float("inf")
    alt_logit, alt = masked.max(-1)
    pred = lt.argmax(-1)
    d_all = (g - alt_logit).tolist()
    g_all, alt_all, pred_all = g.tolist(), alt.tolist(), pred.tolist()
    if cont is not None:
        s_rows = torch.as_tensor(starts + np.asarray([len(a) for a in answers]), dtype=torch.long, device=device)
        nxt = lt_all[s_rows]  # [b, V]
        c = torch.zeros(nxt.shape[-1], dtype=torch.bool, device=device)
        c[: min(len(cont), len(c))] = cont[: len(c)].to(device)
        if c.any():
            ds_all = (nxt.masked_fill(c, -float("inf")).max(-1).values
                      - nxt.masked_fill(~c, -float("inf")).max(-1).values).tolist()
        else:
            ds_all = [float("inf")] * len(idx)
    else:
        ds_all = [float("inf")] * len(idx)
    out, o = [], 0
    for j, (i, ans) in enumerate(zip(idx, answers)):
        n = len(ans)
        d = d_all[o:o + n]
        t0 = len(enc.full(i)[0]) - 1
        k = enc.prefix(i) if enc.n_prefix is not None else deciding_index(d, position)
        wrong = [q for q, dq in enumerate(d) if dq <= 0]
        ds = ds_all[j]
        out.append({"correct": not wrong and ds > 0, "stopped": ds > 0, "stop_margin": ds,
                    "pred_token": pred_all[o + k], "gold_token": ans[k], "alt_token": alt_all[o + k],
                    "answer_logit": g_all[o + k], "logit_diff": d[k], "answer_pos": t0 + k, "decide_k": k,
                    "prompt_pos": t0, "n_answer_tokens": n, "margin_min": min(d),
                    "first_wrong": wrong[0] if wrong else -1, "first_logit_diff": d[0], "first_token": ans[0]})
        o += n
    return out


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
