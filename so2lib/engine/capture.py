"""One forward pass per batch that keeps only what later phases need.

Hooks slice at the answer position ``T`` inside the forward pass, so an attention pattern
costs ``[batch, heads, seq]`` instead of ``[batch, heads, seq, seq]``; nothing else is cached.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from so2lib.data.labels import Encoded
from so2lib.engine import models as M


@dataclasses.dataclass
class AnswerRows:
    """Activations of one batch (float32, on the model's device).

    - ``mlp_post[l]``: ``[b, S, d_mlp]`` post-activations of MLP layer ``l`` at every position
      (only for the requested layers);
    - ``pattern``: ``[b, L, H, S]`` attention of every head from query ``T`` to every key;
    - ``scale``: ``[b, L, S]`` input-norm scale of every layer at every position;
    - ``final_scale``: ``[b]`` final-norm scale at ``T``;
    - ``final_resid``: ``[b, d_model]`` residual before the final norm at ``T``;
    - ``logits``: ``[b, d_vocab]`` at ``T`` (when asked for);
    - ``attn_out_scale``: ``[b, L]`` scale at ``T`` of each layer's post-attention norm (Gemma-2/3,
      OLMo-2), or ``None`` when no layer has one;
    - ``mlp_out_scale``: ``{l: [b, S]}`` scale of layer ``l``'s post-MLP norm at every position
      (only for the requested layers that have one): neuron ``n`` writes
      ``p_i^n / mlp_out_scale[i] * (w_n * gain)`` into the residual.

    Blocks without an input norm (OLMo-2) get ``scale`` 1. Everything is gathered on the device
    of the model's first layer, whatever the placement of the others.
    """

    mlp_post: dict[int, torch.Tensor]
    pattern: torch.Tensor
    scale: torch.Tensor
    final_scale: torch.Tensor
    final_resid: torch.Tensor
    logits: torch.Tensor | None
    attn_out_scale: torch.Tensor | None = None
    mlp_out_scale: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


def _rows(t: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    return t[torch.arange(len(T), device=t.device), T]


class _Stopped(Exception):
    pass


def _stop(x: torch.Tensor, hook: Any) -> None:
    raise _Stopped


@torch.no_grad()
def capture_batch(model: Any, tokens: torch.Tensor, T: torch.Tensor, mlp_layers: Sequence[int] = (),
                  want_logits: bool = False) -> AnswerRows:
    """Run one forward pass on ``tokens [b, S]`` and keep the answer-row activations."""
    L = model.cfg.n_layers
    store: dict[str, torch.Tensor] = {}

    dev = tokens.device

    def keep(name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[name] = fn(x).float().to(dev)
        return hook

    def at_T(x: torch.Tensor) -> torch.Tensor:
        return x[torch.arange(len(T), device=x.device), T.to(x.device)]

    def pattern_T(x: torch.Tensor) -> torch.Tensor:
        return x[torch.arange(len(T), device=x.device), :, T.to(x.device)]

    has = model.hook_dict
    hooks = [(M.mlp_post(l), keep(M.mlp_post(l), lambda x: x)) for l in mlp_layers]
    hooks += [(M.ln2_post_scale(l), keep(M.ln2_post_scale(l), lambda x: x[..., 0]))
              for l in mlp_layers if M.ln2_post_scale(l) in has]
    hooks += [(M.attn_pattern(l), keep(M.attn_pattern(l), pattern_T)) for l in range(L)]
    hooks += [(M.ln1_scale(l), keep(M.ln1_scale(l), lambda x: x[..., 0])) for l in range(L) if M.ln1_scale(l) in has]
    post_attn = [l for l in range(L) if M.ln1_post_scale(l) in has]
    hooks += [(M.ln1_post_scale(l), keep(M.ln1_post_scale(l), lambda x: at_T(x)[..., 0])) for l in post_attn]
    hooks += [(M.FINAL_SCALE, keep(M.FINAL_SCALE, lambda x: at_T(x)[..., 0])),
              (M.FINAL_RESID, keep(M.FINAL_RESID, at_T))]
    logits = None
    if want_logits:
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens)
    else:  # stop after the final norm: no unembedding of every position
        try:
            with model.hooks(fwd_hooks=hooks + [("ln_final.hook_out", _stop)]):
                model(tokens)
        except _Stopped:
            pass
    b, S = tokens.shape
    ones = torch.ones(b, S, device=dev)
    attn_scale = None
    if post_attn:
        attn_scale = torch.stack([store.get(M.ln1_post_scale(l), ones[:, 0]) for l in range(L)], 1)
    return AnswerRows(
        mlp_post={l: store[M.mlp_post(l)] for l in mlp_layers},
        pattern=torch.stack([store[M.attn_pattern(l)] for l in range(L)], 1),
        scale=torch.stack([store.get(M.ln1_scale(l), ones) for l in range(L)], 1),
        final_scale=store[M.FINAL_SCALE],
        final_resid=store[M.FINAL_RESID],
        logits=_rows(logits, T.to(logits.device)).float().to(dev) if want_logits else None,
        attn_out_scale=attn_scale,
        mlp_out_scale={l: store[M.ln2_post_scale(l)] for l in mlp_layers if M.ln2_post_scale(l) in store},
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
    """The final norm's output (before unembedding, ``ln_final.hook_out``): centred for LayerNorm,
    then / scale, times the norm's gain where the bridge did not fold it into ``W_U`` (OLMo-2)."""
    if M.ModelInfo.of(model).norm == "LN":
        resid = resid - resid.mean(-1, keepdim=True)
    out = resid / scale[:, None]
    g = M.final_norm_gain(model)
    return out if g is None else out * g.to(out)


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
        stop = [] if any(not str(n).startswith("blocks.") for n in hook_names) else [("ln_final.hook_in", _stop)]
        try:  # block hooks only: stop before the final norm (no unembedding of every position)
            with model.hooks(fwd_hooks=[(n, summer(n)) for n in hook_names] + stop):
                model(x)
        except _Stopped:
            pass
        batch = torch.stack([store[n] for n in hook_names])
        total = batch if total is None else total + batch
        count += int(mask.sum())
    return (total / count).float()
