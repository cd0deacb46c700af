"""Partial forward passes: start at a layer from a cached residual, stop before the unembedding,
compute logits only where they are read.

- :func:`run_from`: run blocks ``start..L-1`` on the residual entering block ``start``
  (``blocks.{start}.hook_resid_pre`` of a clean pass), with hooks, and return the residual before
  the final norm (``ln_final.hook_in``), without the final norm and unembedding of every
  position. Blocks below ``start`` are skipped (their HF layers are replaced by the identity for
  the call), so a pass from layer ``l`` costs ``(L - l) / L`` of a forward pass.
- :func:`logits_at`: the model's own final norm and unembedding (with a final softcap, if any)
  on residual rows only.
- :func:`resid_pre`: one clean pass that keeps the residual entering every requested block.

Same numbers as a whole forward pass (tested on every family of the test suite).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from so2lib.engine import models as M


class _Stop(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


def _out_kind(model: Any) -> Any:
    """What the HF decoder layers return (a bare tensor, or a tuple of that length), probed once."""
    kind = getattr(model, "_so2lib_block_out", None)
    if kind is not None:
        return kind
    seen: dict[str, Any] = {}
    comp = model.blocks[0].original_component

    def grab(mod: Any, args: Any, out: Any) -> None:
        seen["out"] = out
    h = comp.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        h.remove()
    out = seen["out"]
    kind = "tensor" if isinstance(out, torch.Tensor) else len(out)
    model._so2lib_block_out = kind
    return kind


@contextlib.contextmanager
def skipping(model: Any, start: int) -> Iterator[None]:
    """Within the context, HF decoder layers ``0..start-1`` return their input unchanged."""
    if start <= 0:
        yield
        return
    kind = _out_kind(model)
    comps = [model.blocks[l].original_component for l in range(start)]

    def ident(hidden_states: torch.Tensor = None, *args: Any, **kwargs: Any) -> Any:
        if hidden_states is None:
            hidden_states = args[0]
        return hidden_states if kind == "tensor" else (hidden_states,) + (None,) * (kind - 1)
    for c in comps:
        c.forward = ident
    try:
        yield
    finally:
        for c in comps:
            del c.forward  # back to the class's forward


@torch.no_grad()
def resid_pre(model: Any, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``{l: [b, S, d_model]}``: the residual entering each block of ``layers`` in a clean pass
    (stopped before the unembedding)."""
    store: dict[int, torch.Tensor] = {}

    def keep(l: int):
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[l] = x.detach().clone()
        return hook

    def stop(x: torch.Tensor, hook: Any) -> None:
        raise _Stop(x)
    hooks = [(f"blocks.{l}.hook_resid_pre", keep(l)) for l in layers] + [(M.FINAL_RESID, stop)]
    try:
        with model.hooks(fwd_hooks=hooks):
            model(tokens)
    except _Stop:
        pass
    return store


@torch.no_grad()
def run_from(model: Any, resid: torch.Tensor, start: int, hooks: Sequence[tuple[str, Any]] = ()) -> torch.Tensor:
    """``[b, S, d_model]``: the residual before the final norm after running blocks
    ``start..L-1`` (with ``hooks``) on ``resid``, the residual entering block ``start``."""
    out: dict[str, torch.Tensor] = {}

    def stop(x: torch.Tensor, hook: Any) -> None:
        raise _Stop(x)
    try:
        with skipping(model, start), model.hooks(fwd_hooks=list(hooks) + [(M.FINAL_RESID, stop)]):
            model(resid, start_at_layer=start) if resid.is_floating_point() else model(resid)
    except _Stop as e:
        out["r"] = e.value
    return out["r"]


@torch.no_grad()
def final_resid(model: Any, tokens: torch.Tensor, hooks: Sequence[tuple[str, Any]] = ()) -> torch.Tensor:
    """``[b, S, d_model]``: the residual before the final norm of a whole pass on ``tokens`` (with
    ``hooks``), without the unembedding."""
    return run_from(model, tokens, 0, hooks)


@torch.no_grad()
def logits_at(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., V]`` (float32) of residual rows ``[..., d_model]`` before the final norm:
    the model's own final norm and unembedding, then its final softcap if it has one."""
    shape = resid.shape[:-1]
    x = resid.reshape(1, -1, resid.shape[-1])
    logits = model.unembed(model.ln_final(x)).float()
    cap = getattr(model.cfg, "output_logits_soft_cap", None) or 0.0
    if cap and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits.reshape(*shape, -1)
