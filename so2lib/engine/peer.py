"""The engine's strongest peer: attribution patching with autograd on the exact frozen path.

A careful user can get the *same* projected second-order effect as
:class:`~so2lib.engine.second_order.SecondOrderEngine` from one forward pass and one backward pass per
direction, by making the path of ``docs/method.md`` the only one autograd sees:

- every attention pattern and every norm scale is detached (queries, keys and norms then carry
  no gradient, and each block is linear in what earlier blocks wrote);
- each MLP post-activation is replaced by a fresh leaf (no path through later MLPs);
- each attention output is detached where it enters the residual stream (no head-to-head
  composition), and the readout is the sum over layers of the attention outputs *at the answer
  position* projected on the direction (divided by the frozen final-norm scale).

The readout is then linear in every leaf, so ``sum_i leaf_i * d readout / d leaf_i`` is exactly
the second-order effect of each neuron (summed over source positions). The direct effect is
``p_T * w_n . u`` (no backward needed). :func:`attribution_patching` returns what
:meth:`SecondOrderEngine.project` returns; ``python -m so2lib.bench --peer`` times the two on the
same inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from so2lib.engine import models as M


def _detach(x: torch.Tensor, hook: Any) -> torch.Tensor:
    return x.detach()


def attribution_patching(model: Any, tokens: torch.Tensor, answer_pos: torch.Tensor, directions: torch.Tensor,
                         layers: Sequence[int] | None = None, detach_attention: bool = True) -> dict[str, torch.Tensor]:
    """``{"second", "direct"}`` ``[b, D, len(layers), d_mlp]``: effects of every neuron of
    ``layers`` projected on ``directions [b, D, d_model]`` of the final normalized residual
    (as :meth:`SecondOrderEngine.project`), by one forward pass and ``D`` backward passes.
    ``detach_attention=False`` leaves head-to-head composition in (not the definition: a check
    that can fail)."""
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else list(layers)
    info = M.ModelInfo.of(model)
    dev = tokens.device
    b = tokens.shape[0]
    ar = torch.arange(b, device=dev)
    T = answer_pos.to(dev)
    leaves: dict[int, torch.Tensor] = {}
    reads: list[torch.Tensor] = []
    store: dict[str, torch.Tensor] = {}

    def leaf(l: int):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            v = x.detach().float().requires_grad_(True)
            leaves[l] = v
            return v.to(x.dtype)
        return hook

    def read_attn(x: torch.Tensor, hook: Any) -> torch.Tensor:
        reads.append(x[ar, T].float())  # [b, dm], keeps the graph
        return x.detach() if detach_attention else x

    def keep(name: str):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            store[name] = x.detach()
            return x.detach()
        return hook

    g = M.final_norm_gain(model)  # before the hooks: it runs the final norm on a probe
    hd = model.hook_dict
    hooks = [(n, _detach) for n in hd if n.endswith(("attn.hook_pattern", "hook_scale")) and n != M.FINAL_SCALE
             and not any(n == M.ln2_post_scale(l) for l in range(L))]
    hooks += [(M.ln2_post_scale(l), keep(M.ln2_post_scale(l))) for l in range(L) if M.ln2_post_scale(l) in hd]
    hooks += [(M.FINAL_SCALE, keep(M.FINAL_SCALE))]
    hooks += [(M.mlp_post(l), leaf(l)) for l in range(L)]
    hooks += [(M.attn_out(l), read_attn) for l in range(L)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens)
        U = directions.float().to(dev)
        if info.norm == "LN":
            U = U - U.mean(-1, keepdim=True)
        if g is not None:
            U = U * g.to(U)
        U = U / store[M.FINAL_SCALE][ar, T, 0].float()[:, None, None]  # [b, D, dm]
        resid_read = torch.stack(reads).sum(0)  # [b, dm]: every attention output at T
        src = [leaves[l] for l in layers]
        D = U.shape[1]
        second = torch.empty(b, D, len(layers), info.d_mlp, device=dev)
        for d in range(D):
            r = (resid_read * U[:, d]).sum()
            grads = torch.autograd.grad(r, src, retain_graph=d < D - 1, allow_unused=True)
            for j, (p, gr) in enumerate(zip(src, grads)):
                second[:, d, j] = 0 if gr is None else (p.detach() * gr).sum(1)
    direct = torch.empty_like(second)
    with torch.no_grad():
        for j, l in enumerate(layers):
            w = M.layer_weights(model, l, torch.float32)
            pT = leaves[l].detach()[ar, T]
            r = store.get(M.ln2_post_scale(l))
            if r is not None:
                pT = pT / r[ar, T, 0].float()[:, None]
            direct[:, :, j] = pT[:, None, :] * torch.einsum("nm,bDm->bDn", w.W_out.to(dev), U)
    return {"second": second, "direct": direct}
