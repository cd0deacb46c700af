"""The embedded default model: a small GPT-2 that so2lib trains on its own problem sets.

Train it again from scratch (about 10 minutes on 2 CPU cores)::

    python -m so2lib.data.embedded --out data/models/so2lib-tiny-math

It is trained only on problems outside the held-out partition (:func:`so2lib.data.tasks.is_heldout`),
with the loss on the answer token, and written in Hugging Face format with a model card.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from so2lib.data.tasks import GENERATORS, TASKS, Problem, is_heldout, make_problem_set
from so2lib.data.tokenizer import build_tokenizer

EMBEDDED_NAME = "so2lib-tiny-math"
EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / EMBEDDED_NAME

ARCH = dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, n_positions=48)


def _encode(tok, problems: list[Problem], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BOS + prompt + answer, right-padded. Returns tokens [B, S], answer pos T [B], gold [B]."""
    seqs, T, gold = [], [], []
    for p in problems:
        ids = [tok.bos_token_id] + tok(p.compact, add_special_tokens=False)["input_ids"]
        a = tok(" " + p.answer, add_special_tokens=False)["input_ids"]
        assert len(a) == 1, p
        seqs.append(ids + a)
        T.append(len(ids) - 1)
        gold.append(a[0])
    S = max(map(len, seqs))
    x = torch.full((len(seqs), S), tok.pad_token_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    return x.to(device), torch.tensor(T, device=device), torch.tensor(gold, device=device)


def _training_pool(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p = GENERATORS[TASKS[len(out) % len(TASKS)]](rng)
        if not is_heldout(p):
            out.append(p)
    return out


@torch.no_grad()
def accuracy_by_task(model, tok, problems: list[Problem], batch_size: int = 500) -> dict[str, float]:
    """Share of problems whose answer token is the argmax at T (teacher forcing), per task."""
    hits: dict[str, list[bool]] = defaultdict(list)
    model.eval()
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        x, T, gold = _encode(tok, chunk)
        h = model.transformer(x).last_hidden_state[torch.arange(len(chunk)), T]
        pred = model.lm_head(h).argmax(-1)
        for p, ok in zip(chunk, (pred == gold).tolist()):
            hits[p.task].append(ok)
    acc = {t: sum(v) / len(v) for t, v in hits.items()}
    acc["overall"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return acc


def train(out: Path = EMBEDDED_DIR, steps: int = 4000, batch_size: int = 256, lr: float = 2e-3,
          seed: int = 0, pool: int = 400_000, threads: int = 2, log_every: int = 500) -> dict:
    """Train the embedded model and write it (weights, tokenizer, model card) to ``out``."""
    import transformers

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tok = build_tokenizer()
    cfg = transformers.GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ARCH)
    model = transformers.GPT2LMHeadModel(cfg)
    t_data = time.time()
    X, XT, XG = _encode(tok, _training_pool(pool, seed=1_000_003 + seed))  # tokenized once
    order = torch.argsort(XT, stable=True)  # batches of similar length: less padding to compute
    held = make_problem_set(0, 600, seed=seed + 777, heldout=True).val
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    log = []
    for step in range(steps):
        model.train()
        start = int(torch.randint(len(X) - batch_size, (1,), generator=gen))
        idx = order[start : start + batch_size]
        T, gold = XT[idx], XG[idx]
        x = X[idx, : int(T.max()) + 1]
        h = model.transformer(x).last_hidden_state[torch.arange(batch_size), T]
        logits = model.lm_head(h)
        loss = torch.nn.functional.cross_entropy(logits, gold)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == steps - 1:
            acc = accuracy_by_task(model, tok, held)
            log.append({"step": step + 1, "loss": round(loss.item(), 4), "heldout_acc": round(acc["overall"], 4),
                        "seconds": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    final_eval = make_problem_set(0, 3000, seed=0, heldout=True).val  # the default eval draw
    acc = accuracy_by_task(model, tok, final_eval)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "architecture": ARCH,
            "vocab_size": len(tok), "train_seconds": round(time.time() - t0, 1),
            "data_seconds": round(t0 - t_data, 1), "threads": threads,
            "heldout_accuracy": {k: round(v, 4) for k, v in acc.items()}, "log": log,
            "torch": torch.__version__, "transformers": transformers.__version__}
    (out / "training.json").write_text(json.dumps(info, indent=1))
    (out / "README.md").write_text(_model_card(info))
    return info


def _model_card(info: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.1%} |" for k, v in info["heldout_accuracy"].items())
    a = info["architecture"]
    return f"""# {EMBEDDED_NAME}

A small GPT-2-architecture model trained by so2lib on its own synthetic problem sets, so that
the whole pipeline runs offline. It is a research fixture, not a capable model.

- Architecture: GPT-2, {a['n_layer']} layers, d_model {a['n_embd']}, {a['n_head']} heads,
  d_mlp {a['n_inner']}, context {a['n_positions']}; vocabulary {info['vocab_size']} word-level
  tokens in which every integer 0-1999 is one token (`so2lib/data/tokenizer.py`).
- Prompt format: compact, e.g. `12 + 7 =` -> ` 19`, `max ( 12 , 7 ) =` -> ` 12`,
  `x + 7 = 19 ; x =` -> ` 12`, `not ( true and false ) =` -> ` true`, always after BOS.
- Training data: problems from `so2lib.data.tasks` generators (addition, subtraction,
  multiplication, comparison, one-step algebra, propositional logic) **outside** the held-out
  partition (`so2lib.data.tasks.is_heldout`: sha256 of the compact prompt mod 5 == 0), so every
  problem set built with `heldout=True` is unseen. Loss on the answer token only.
- Seed {info['seed']}, {info['steps']} steps, batch {info['batch_size']}, AdamW lr {info['lr']}
  (cosine), {info['threads']} CPU threads: {info['data_seconds']} s to generate and tokenize the
  training pool, then {info['train_seconds']} s of training, on a 2-core machine
  (torch {info['torch']}, transformers {info['transformers']}).

Train it again from scratch (one command, about as long as above on 2 CPU cores):

    python -m so2lib.data.embedded --out data/models/{EMBEDDED_NAME}

## Held-out accuracy (3,000 problems, seed 0, teacher-forced argmax = greedy)

| task | accuracy |
|---|---|
{rows}

Errors are systematic: larger operands and carries/borrows fail far more often than
one-digit problems (see notebook 01's accuracy breakdown).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    info = train(a.out, a.steps, a.batch_size, a.lr, a.seed, threads=a.threads)
    print(json.dumps(info["heldout_accuracy"], indent=1))


if __name__ == "__main__":
    main()
