"""Token-level attribution: the per-source-position terms of a neuron's second-order effect.

The shared definition (``shared/docs/second_order.md``) is a sum over source positions ``i <= T``:

    phi_n = sum_i  sum_{l' > l, h}  A[l', h, T, i] * p_i / s[l', i] * (w_n W_V[l', h] W_O[l', h])

The term of position ``i`` says how much of the effect the heads carry from what the neuron
wrote at ``i`` (the language analogue of the CLIP paper's per-patch segmentation). The terms
sum *exactly* to the engine's effect (:class:`~so2lib.engine.second_order.SecondOrderEngine`), with
the same frozen patterns, norm scales, post-attention / post-MLP norms and grouped-query heads.

- :func:`position_terms`: ``[b, D, S, n]`` terms projected on per-problem directions (logit
  difference and/or correctness direction), in logit units;
- :func:`position_vectors`: ``[b, S, n, d_model]`` full-vector terms (small ``n`` only);
- :func:`operand_positions`: token positions of the final question's operands;
- :func:`operand_share_check`: share of |attribution| on operand tokens against the
  attention-only share (activation held at its per-problem mean over positions), for the selected neurons on validation problems.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from so2lib.engine.capture import AnswerRows, capture_batch
from so2lib.engine.second_order import SecondOrderEngine


def _heads_A(rows: AnswerRows, lp: int) -> torch.Tensor:
    """``[b, H, S]``: attention from ``T`` divided by the input-norm scale at the key (and by the
    post-attention norm scale at ``T`` where the block has one), exactly as the engine's coefficients."""
    A = rows.pattern[:, lp] / rows.scale[:, lp, None, :]
    if rows.attn_out_scale is not None:
        A = A / rows.attn_out_scale[:, lp, None, None]
    return A


@torch.no_grad()
def position_terms(engine: SecondOrderEngine, rows: AnswerRows, directions: torch.Tensor, layer: int,
                   neurons: Sequence[int] | torch.Tensor, hold_mean_to: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``[b, D, S, n]``: the term of each source position ``i`` in the projected second-order
    effect of ``neurons`` of ``layer`` on ``directions [b, D, d_model]`` (final normalized
    residual space; divided here by the frozen final-norm scale at T, as
    :meth:`SecondOrderEngine.project`). Summed over ``S`` it equals ``project(...)["second"]``.

    ``hold_mean_to`` (``[b]`` answer positions T): the **attention-only** terms, with each
    neuron's activation held at its per-problem mean over positions ``0..T`` (what attention alone
    does with a constant neuron), the null of the operand-share test."""
    dev = engine.device
    neurons = torch.as_tensor(neurons, dtype=torch.long, device=dev)
    U = engine._final_dirs(rows, directions.float().to(dev))  # [b, D, dm]
    p = engine._acts(rows, layer, neurons)  # [b, S, n]
    if hold_mean_to is not None:
        T_ = torch.as_tensor(hold_mean_to, device=p.device)
        mask = (torch.arange(p.shape[1], device=p.device)[None] <= T_[:, None]).to(p.dtype)  # [b, S]
        mean = (p * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [b, n]
        p = mean[:, None].expand_as(p)
    b, D = U.shape[:2]
    S, n = p.shape[1], p.shape[2]
    out = torch.zeros(b, D, S, n, device=dev)
    for lp in range(layer + 1, engine.info.n_layers):
        w = engine.weights(lp)
        wv = engine.product(layer, lp, neurons)  # [kv, n, dh]
        kv = wv.shape[0]
        o = torch.einsum("hem,bDm->bhDe", w.W_O, U.to(w.device))
        o = o.reshape(b, kv, -1, D, o.shape[-1])
        MU = torch.einsum("bgGDe,gne->bgGDn", o, wv).flatten(1, 2)  # [b, H, D, n]
        A = _heads_A(rows, lp).to(w.device)  # [b, H, S]
        out += torch.einsum("bhS,bhDn->bDSn", A, MU).to(dev) * p[:, None].to(dev)
    return out


@torch.no_grad()
def position_vectors(engine: SecondOrderEngine, rows: AnswerRows, layer: int,
                     neurons: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``[b, S, n, d_model]`` full-vector terms; summed over ``S`` they equal :meth:`SecondOrderEngine.vectors`."""
    dev = engine.device
    neurons = torch.as_tensor(neurons, dtype=torch.long, device=dev)
    p = engine._acts(rows, layer, neurons)  # [b, S, n]
    b, S, n = p.shape
    out = torch.zeros(b, S, n, engine.info.d_model, device=dev)
    for lp in range(layer + 1, engine.info.n_layers):
        w = engine.weights(lp)
        wv = engine.product(layer, lp, neurons)  # [kv, n, dh]
        kv = wv.shape[0]
        G = w.W_O.shape[0] // kv
        WO = w.W_O.reshape(kv, G, w.W_O.shape[1], -1)
        R = torch.einsum("gne,gGem->ngGm", wv, WO).flatten(1, 2)  # [n, H, dm]
        A = _heads_A(rows, lp).to(w.device)  # [b, H, S]
        out += torch.einsum("bhS,nhm->bSnm", A, R).to(dev) * p[..., None].to(dev)
    return out


@torch.no_grad()
def attribute(model: Any, engine: SecondOrderEngine, enc: Any, idx: Sequence[int], layer: int,
              neurons: Sequence[int], gold: Sequence[int], alt: Sequence[int]) -> dict[str, Any]:
    """Per-position terms on the logit difference (gold minus ``alt``) and, when the engine has
    one, on the correctness direction, for problems ``idx`` of ``enc`` (an analysis view).

    Returns ``terms [b, D, S, n]`` (numpy), ``T [b]`` and ``tokens`` (per problem, up to T)."""
    x, T = enc.batch(list(idx), device=engine.device)
    rows = capture_batch(model, x, T, [layer])
    U = engine.directions(torch.as_tensor(np.asarray(gold)), torch.as_tensor(np.asarray(alt)))
    terms = position_terms(engine, rows, U, layer, neurons).cpu().numpy()
    toks = [model.tokenizer.convert_ids_to_tokens(x[r, : int(T[r]) + 1].tolist()) for r in range(len(idx))]
    return {"terms": terms, "T": T.cpu().numpy(), "tokens": toks}


# ----------------------------------------------------------------------------- operand positions

ARITHMETIC = ("addition", "subtraction", "multiplication", "comparison")


def _spans(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Text of ``ids`` and each token's character span (incremental decoding)."""
    spans, prev = [], ""
    for k in range(len(ids)):
        cur = tokenizer.decode(list(ids[: k + 1]))
        start = min(len(prev), len(cur))
        spans.append((start, len(cur)))
        prev = cur
    return prev, spans


def operand_positions(tokenizer: Any, ids: Sequence[int], prompt_end: int, problem: Any,
                      window: int = 48) -> list[int]:
    """Positions (indices into ``ids``) of the tokens that write the final question's operands
    (``meta["a"]``, ``meta["b"]``) in the last ``window`` tokens up to ``prompt_end`` (the last
    prompt token, ``T_1``). Empty when the problem has no operands or they cannot be located."""
    m = getattr(problem, "meta", {}) or {}
    if problem.task not in ARITHMETIC or "a" not in m or "b" not in m:
        return []
    lo = max(0, prompt_end + 1 - window)
    text, spans = _spans(tokenizer, ids[lo: prompt_end + 1])
    found: set[int] = set()
    end = len(text)
    for v in (m["b"], m["a"]):  # b is written after a: search backwards
        hits = [h for h in re.finditer(rf"(?<!\d){v}(?!\d)", text[:end])]
        if not hits:
            return []
        s, e = hits[-1].span()
        found |= {lo + k for k, (a, b) in enumerate(spans) if a < e and b > s and b > a}
        end = s
    return sorted(found)


def operand_share(terms_abs: np.ndarray, positions: Sequence[int], T: int) -> tuple[float, float]:
    """(share of ``|terms|`` over positions ``0..T`` on ``positions``, position-count null share)."""
    tot = float(terms_abs[: T + 1].sum())
    if tot <= 0 or not positions:
        return float("nan"), float("nan")
    return float(terms_abs[list(positions)].sum() / tot), len(positions) / (T + 1)


@torch.no_grad()
def operand_share_check(setup: Any, neurons: dict[int, Sequence[int]], max_problems: int = 200,
                        batch_size: int = 32, seed: int = 0) -> pd.DataFrame:
    """Per validation arithmetic problem (up to ``max_problems``) and selected neuron: the share
    of its |per-position attribution| (logit difference) on the final question's operand tokens
    and its null ``null``: the same share of the attention-only terms (activation held at its
    per-problem mean over positions, :func:`position_terms`). Problems whose operands
    cannot be located are left out. Columns: ``problem, task, carry, layer, neuron, share, null``."""
    model, enc = setup.model, setup.enc["val"]
    lab = setup.labels["val"]
    probs = setup.problems.val
    prompt_pos = lab.prompt_pos.values
    cand = [i for i, p in enumerate(probs) if p.task in ARITHMETIC]
    rng = np.random.default_rng(seed)
    if len(cand) > max_problems:
        cand = sorted(rng.choice(cand, max_problems, replace=False).tolist())
    pos = {}
    for i in cand:
        ids = list(enc.prompt_ids[i])
        ps = operand_positions(model.tokenizer, ids, int(prompt_pos[i]), probs[i])
        if ps:
            pos[i] = ps
    keep = sorted(pos)
    layers = [l for l in neurons if len(neurons[l])]
    rows: list[dict[str, Any]] = []
    if not keep or not layers:
        return pd.DataFrame(columns=["problem", "task", "carry", "digits", "layer", "neuron", "share", "null"])
    from so2lib.engine.second_order import engine_for
    engine = engine_for(model)
    gold, alt = lab.gold_token.values, lab.alt_token.values
    for s in range(0, len(keep), batch_size):
        idx = keep[s: s + batch_size]
        x, T = enc.batch(idx, device=engine.device)
        caps = capture_batch(model, x, T, layers)
        U = engine.directions(torch.as_tensor(gold[idx]), torch.as_tensor(alt[idx]))[:, :1]
        for l in layers:
            terms = position_terms(engine, caps, U, l, list(neurons[l]))[:, 0].abs().cpu().numpy()  # [b, S, n]
            held = position_terms(engine, caps, U, l, list(neurons[l]), hold_mean_to=T)[:, 0].abs().cpu().numpy()
            for r, i in enumerate(idx):
                for j, n in enumerate(neurons[l]):
                    sh, _ = operand_share(terms[r, :, j], pos[i], int(T[r]))
                    nu, _ = operand_share(held[r, :, j], pos[i], int(T[r]))
                    if sh == sh and nu == nu:
                        rows.append({"problem": i, "task": probs[i].task,
                                     "carry": probs[i].meta.get("carry", probs[i].meta.get("borrow")),
                                     "digits": probs[i].meta.get("max_digits"),
                                     "layer": l, "neuron": int(n), "share": sh, "null": nu})
    return pd.DataFrame(rows, columns=["problem", "task", "carry", "digits", "layer", "neuron", "share", "null"])
