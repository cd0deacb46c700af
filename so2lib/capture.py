"""One forward pass per batch that keeps only what later phases need.

Hooks slice at the answer position ``T`` inside the forward pass, so an attention pattern
costs ``[batch, heads, seq]`` instead of ``[batch, heads, seq, seq]``; nothing else is cached.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from . import models as M
from .labels import Encoded


@dataclasses.dataclass
class AnswerRows:
    """Activations of one batch (float32, on the model's device).

    - ``mlp_post[l]``: ``[b, S, d_mlp]`` post-activations of MLP layer ``l`` at every position
      (only for the requested layers);
    - ``pattern``: ``[b, L, H, S]`` attention of every head from query ``T`` to every key;
    - ``scale``: ``[b, L, S]`` input-norm scale of every layer at every position;
    - ``final_scale``: ``[b]`` final-norm scale at ``T``;
    - ``final_resid``: ``[b, d_model]`` residual before the final norm at ``T``;
    - ``logits``: ``[b, d_vocab]`` at ``T`` (when asked for).
    """

    mlp_post: dict[int, torch.Tensor]
    pattern: torch.Tensor
    scale: torch.Tensor
    final_scale: torch.Tensor
    final_resid: torch.Tensor
    logits: torch.Tensor | None


def _rows(t: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    return t[torch.arange(len(T), device=t.device), T]


@torch.no_grad()
def capture_batch(model: Any, tokens: torch.Tensor, T: torch.Tensor, mlp_layers: Sequence[int] = (),
                  want_logits: bool = False) -> AnswerRows:
    """Run one forward pass on ``tokens [b, S]`` and keep the answer-row activations."""
    L = model.cfg.n_layers
    store: dict[str, torch.Tensor] = {}

    def keep(name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[name] = fn(x).float()
        return hook

    ar = torch.arange(len(T), device=tokens.device)
    hooks = [(M.mlp_post(l), keep(M.mlp_post(l), lambda x: x)) for l in mlp_layers]
    hooks += [(M.attn_pattern(l), keep(M.attn_pattern(l), lambda x: x[ar, :, T])) for l in range(L)]
    hooks += [(M.ln1_scale(l), keep(M.ln1_scale(l), lambda x: x[..., 0])) for l in range(L)]
    hooks += [(M.FINAL_SCALE, keep(M.FINAL_SCALE, lambda x: x[ar, T, 0])),
              (M.FINAL_RESID, keep(M.FINAL_RESID, lambda x: x[ar, T]))]
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    return AnswerRows(
        mlp_post={l: store[M.mlp_post(l)] for l in mlp_layers},
        pattern=torch.stack([store[M.attn_pattern(l)] for l in range(L)], 1),
        scale=torch.stack([store[M.ln1_scale(l)] for l in range(L)], 1),
        final_scale=store[M.FINAL_SCALE],
        final_resid=store[M.FINAL_RESID],
        logits=_rows(logits, T).float() if want_logits else None,
    )


@torch.no_grad()
def answer_activations(model: Any, enc: Encoded, layers: Sequence[int], batch_size: int = 64,
                       progress: bool = True) -> dict[str, torch.Tensor]:
    """Memory-bounded capture over a whole problem set, moved to CPU batch by batch.

    Returns ``mlp_post_T [n, len(layers), d_mlp]`` (activations at T), ``final_resid [n, d_model]``,
    ``final_scale [n]`` and ``final_normed [n, d_model]`` (the final normalized residual at T).
    """
    device = next(model.parameters()).device
    acts, resid, scale = [], [], []
    for _, x, T in enc.batches(batch_size, device=device, desc="capture" if progress else None):
        r = capture_batch(model, x, T, layers)
        if layers:
            acts.append(torch.stack([_rows(r.mlp_post[l], T) for l in layers], 1).cpu())
        resid.append(r.final_resid.cpu())
        scale.append(r.final_scale.cpu())
    resid_t, scale_t = torch.cat(resid), torch.cat(scale)
    return {"mlp_post_T": torch.cat(acts) if acts else None, "final_resid": resid_t, "final_scale": scale_t,
            "final_normed": final_normed(resid_t, scale_t, model)}


def final_normed(resid: torch.Tensor, scale: torch.Tensor, model: Any) -> torch.Tensor:
    """The final norm's output (before unembedding): centred for LayerNorm, then / scale."""
    if M.ModelInfo.of(model).norm == "LN":
        resid = resid - resid.mean(-1, keepdim=True)
    return resid / scale[:, None]


@torch.no_grad()
def position_means(model: Any, enc: Encoded, hook_names: Sequence[str], batch_size: int = 64,
                   progress: bool = True) -> torch.Tensor:
    """``[len(hook_names), width]``: each hook's activation averaged over every real position
    (``<= T``, pads excluded) of every problem of ``enc``; accumulated in float64."""
    dev = next(model.parameters()).device
    total: torch.Tensor | None = None
    count = 0
    for _, x, T in enc.batches(batch_size, device=dev, desc="position means" if progress else None):
        mask = (torch.arange(x.shape[1], device=dev)[None] <= T[:, None]).double()  # [b, S]
        store: dict[str, torch.Tensor] = {}

        def summer(name: str) -> Callable:
            def hook(t: torch.Tensor, hook: Any) -> None:
                store[name] = torch.einsum("bs,bsd->d", mask, t.double())
            return hook
        with model.hooks(fwd_hooks=[(n, summer(n)) for n in hook_names]):
            model(x)
        batch = torch.stack([store[n] for n in hook_names])
        total = batch if total is None else total + batch
        count += int(mask.sum())
    return (total / count).float()
