"""Partial forward passes: start at a layer from a cached residual, stop before the unembedding,
compute logits only where they are read.

- :func:`run_from`: run blocks ``start..L-1`` on the residual entering block ``start``
  (``blocks.{start}.hook_resid_pre`` of a clean pass), with hooks, and return the residual before
  the final norm (``ln_final.hook_in``), without the final norm and unembedding of every
  position. Blocks below ``start`` are skipped (their HF layers are replaced by the identity for
  the call), so a pass from layer ``l`` costs ``(L - l) / L`` of a forward pass.
- :func:`logits_at`: the model's own final norm and unembedding (with a final softcap, if any)
  on residual rows only.
- :func:`resid_pre`: one clean pass that keeps the residual entering every requested block (and
  stops there).
- :func:`run_edits`: several neuron edits (:data:`Edit`: post-activations ``t * mul + add`` on
  chosen neurons) of one batch, each pass starting at the edit's first layer from the clean
  residual, several edits stacked into one pass (the batch repeated, each copy with its own
  edit), returning the residual before the final norm at the rows that are read.

Same numbers as a whole forward pass (tested on every family of the test suite).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch

from so2lib.engine import models as M
from so2lib.engine.readout import final_logits, softcap


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
    """``{l: [b, S, d_model]}``: the residual entering each block of ``layers`` in a clean pass,
    stopped once the last of them is reached (no later block, no unembedding)."""
    store: dict[int, torch.Tensor] = {}
    layers = sorted({int(l) for l in layers})
    if not layers:
        return store
    last = layers[-1]

    def keep(l: int):
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[l] = x.detach().clone()
            if l == last:
                raise _Stop(x)
        return hook
    hooks = [(f"blocks.{l}.hook_resid_pre", keep(l)) for l in layers]
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


#: Logits ``[..., V]`` (float32) of residual rows before the final norm: the model's own final norm,
#: unembedding and softcap (:func:`so2lib.engine.readout.final_logits`, under its name here).
logits_at = final_logits


@torch.no_grad()
def logits_at_tokens(model: Any, resid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of :func:`logits_at` at ``tokens`` only: ``[..., k]`` (float32) for residual rows
    ``[..., d_model]`` and token ids ``[..., k]``; the same final norm and softcap, and ``k``
    columns of the unembedding instead of all ``V`` (for readouts of a few fixed tokens, such as
    the gold and alternative tokens' logit difference)."""
    shape = resid.shape[:-1]
    x = model.ln_final(resid.reshape(1, -1, resid.shape[-1]))[0]  # [m, d_model]
    tok = tokens.reshape(x.shape[0], -1).to(x.device)
    W = model.W_U.detach()
    b = M.unembed_bias(model).detach().to(x.device)
    logits = softcap(model, (torch.einsum("md,mkd->mk", x, W.T[tok].to(x.dtype)) + b[tok].to(x.dtype)).float())
    return logits.reshape(*shape, tok.shape[-1])


#: One intervention on MLP neurons: ``{layer: (neurons [n] long, mul [n], add [n])}``; at every
#: position the post-activations (``blocks.{layer}.mlp.hook_post``) of the neurons become
#: ``t * mul + add`` (``mul = factor, add = 0``: scaling; ``mul = 0, add = value``: replacement).
#: ``{}`` is the clean pass.
Edit = Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def scale_edit(neurons: Mapping[int, Sequence[int]], factor: float) -> dict[int, tuple[torch.Tensor, ...]]:
    """The :data:`Edit` that multiplies the chosen neurons' activations by ``factor`` (``{}`` for 1)."""
    if float(factor) == 1.0:
        return {}
    out = {}
    for l, ns in neurons.items():
        idx = torch.as_tensor(list(ns), dtype=torch.long)
        if len(idx):
            out[int(l)] = (idx, torch.full((len(idx),), float(factor)), torch.zeros(len(idx)))
    return out


def set_edit(layer: int, neurons: Sequence[int], values: torch.Tensor | Sequence[float]
             ) -> dict[int, tuple[torch.Tensor, ...]]:
    """The :data:`Edit` that sets the neurons' activations of ``layer`` to ``values`` (e.g. their means)."""
    idx = torch.as_tensor(list(neurons), dtype=torch.long)
    v = torch.as_tensor(values, dtype=torch.float32).reshape(-1).expand(len(idx))
    return {int(layer): (idx, torch.zeros(len(idx)), v.clone())}


def _stacked_hook(edits: Sequence[Edit], layer: int, b: int):
    """A hook for MLP layer ``layer`` on ``k = len(edits)`` stacked copies of a ``b``-row batch:
    copy ``j`` gets edit ``j`` (its neurons ``t * mul + add``; others unchanged). Called with
    ``cols`` (the sorted neurons edited in any copy), it edits a tensor of those columns only."""
    U_all = sorted({int(n) for e in edits if layer in e for n in e[layer][0].tolist()})
    k, u = len(edits), len(U_all)
    pos = {n: i for i, n in enumerate(U_all)}
    mul, add = torch.ones(k, u), torch.zeros(k, u)
    for j, e in enumerate(edits):
        if layer in e:
            idx, m, a = e[layer]
            at = torch.tensor([pos[int(n)] for n in idx.tolist()], dtype=torch.long)
            mul[j, at] = m.float()
            add[j, at] = a.float()
    U = torch.tensor(U_all, dtype=torch.long)

    def edit(sub: torch.Tensor) -> torch.Tensor:  # [k*b, ..., u]
        v = sub.reshape(k, -1, *sub.shape[1:])
        shape = (k, 1) + (1,) * (v.dim() - 3) + (u,)
        m = mul.to(sub.device, sub.dtype).reshape(shape)
        a = add.to(sub.device, sub.dtype).reshape(shape)
        return (v * m + a).reshape(sub.shape)

    def hook(t: torch.Tensor, hook: Any, cols: Sequence[int] | None = None) -> torch.Tensor:
        if cols is not None:
            assert list(cols) == U_all
            return edit(t)
        out = t.clone()
        Ud = U.to(t.device)
        out[..., Ud] = edit(t[..., Ud])
        return out
    return hook


def mlp_out_is_linear(model: Any, layer: int) -> bool:
    """Whether MLP layer ``layer`` writes ``hook_post @ W_out (+ b_out)`` into the residual (no
    post-MLP norm), so that a neuron edit adds ``delta @ W_out`` to the residual after the block."""
    return M.ln2_post_scale(layer) not in model.hook_dict and M.post_norm_gain(model, layer, "ln2_post") is None


def _w_out(model: Any, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]``: the output weight of MLP layer ``layer`` as the forward pass uses it."""
    W = model.blocks[layer].mlp.W_out.detach()
    return W.T if W.shape[0] != model.cfg.d_mlp and W.shape[-1] == model.cfg.d_mlp else W


@torch.no_grad()
def clean_states(model: Any, tokens: torch.Tensor, resid_layers: Sequence[int] = (), post_layers: Sequence[int] = (),
                 final: bool = False, mid_layers: Sequence[int] = ()) -> dict[str, Any]:
    """One clean pass on ``tokens``, stopped at the last thing it keeps: ``resid[l]`` (the residual
    entering block ``l``), ``mid[l]`` (``blocks.{l}.hook_resid_mid``, after its attention),
    ``post[l]`` (MLP post-activations of layer ``l``) and, with ``final``, the residual before the
    final norm (``final``), all ``[b, S, .]``."""
    L = model.cfg.n_layers
    want = [(4 * int(l), f"blocks.{int(l)}.hook_resid_pre", "resid", int(l)) for l in set(resid_layers)]
    want += [(4 * int(l) + 1, f"blocks.{int(l)}.hook_resid_mid", "mid", int(l)) for l in set(mid_layers)]
    want += [(4 * int(l) + 2, M.mlp_post(int(l)), "post", int(l)) for l in set(post_layers)]
    if final:
        want.append((4 * L, M.FINAL_RESID, "final", -1))
    out: dict[str, Any] = {"resid": {}, "post": {}, "mid": {}}
    if not want:
        return out
    last = max(w[0] for w in want)

    def keep(rank: int, kind: str, l: int):
        def hook(x: torch.Tensor, hook: Any) -> None:
            if kind == "final":
                out["final"] = x.detach().clone()
            else:
                out[kind][l] = x.detach().clone()
            if rank == last:
                raise _Stop(x)
        return hook
    try:
        with model.hooks(fwd_hooks=[(name, keep(r, k, l)) for r, name, k, l in sorted(want)]):
            model(tokens)
    except _Stop:
        pass
    return out


@torch.no_grad()
def run_edits(model: Any, tokens: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], edits: Sequence[Edit],
              max_tokens: int | None = None, skip_edited: bool = True) -> list[torch.Tensor]:
    """Per edit of ``edits``: ``[R, d_model]``, the residual before the final norm at ``rows``
    (``(row, position)`` index tensors into ``tokens [b, S]``) of a pass on ``tokens`` with that
    edit. Same numbers as one hooked forward pass per edit (up to float rounding), cheaper:

    - one clean pass keeps what the edited passes start from; an edit whose first layer is ``l``
      starts at block ``l`` from the clean residual entering it, or (``skip_edited``, when the
      layer's MLP writes linearly into the residual: :func:`mlp_out_is_linear`) at block ``l + 1``
      from the clean residual plus the edit's change of the MLP output ``(t' - t) @ W_out``;
    - edits with the same starting point are stacked, up to ``max_tokens`` rows x positions per
      pass (the batch repeated, each copy with its own edit; ``None``: one edit per pass);
    - the clean edit ``{}`` is the clean pass itself.
    """
    L = model.cfg.n_layers
    b, S = tokens.shape[:2]
    rr, pp = rows[0].to(tokens.device), rows[1].to(tokens.device)
    first = {i: min(e) for i, e in enumerate(edits) if e}
    delta = {l: skip_edited and mlp_out_is_linear(model, l) for l in set(first.values())}
    resid = {l + 1 for l in first.values() if delta[l] and l + 1 < L} | {l for l in first.values() if not delta[l]}
    st = clean_states(model, tokens, sorted(resid), sorted(l for l in delta if delta[l]),
                      final=len(first) < len(edits) or any(delta[l] and l + 1 == L for l in delta))
    out: list[torch.Tensor | None] = [None] * len(edits)
    for i, e in enumerate(edits):
        if not e:
            out[i] = st["final"][rr, pp]
    k = max(1, int(max_tokens) // max(b * S, 1)) if max_tokens else 1
    for s in sorted(set(first.values())):
        group = [i for i, f in first.items() if f == s]
        for c in range(0, len(group), k):
            chunk = group[c:c + k]
            es = [edits[i] for i in chunk]
            n = len(chunk)
            if delta[s]:
                base = st["final"] if s + 1 == L else st["resid"][s + 1]
                x = base.repeat(n, *([1] * (base.dim() - 1)))
                post = st["post"][s]
                U = sorted({int(q) for e in es if s in e for q in e[s][0].tolist()})
                if U:
                    Ut = torch.tensor(U, dtype=torch.long, device=post.device)
                    sub = post[..., Ut]  # [b, S, u]
                    edited = _stacked_hook(es, s, b)(sub.repeat(n, 1, 1), None, cols=U)
                    d = (edited - sub.repeat(n, 1, 1)) @ _w_out(model, s)[Ut].to(post.dtype)
                    x = x + d.to(x.dtype)
                layers = sorted({l for e in es for l in e if l > s})
                hooks = [(M.mlp_post(l), _stacked_hook(es, l, b)) for l in layers]
                r = x if s + 1 == L else run_from(model, x, s + 1, hooks)
            else:
                layers = sorted({l for e in es for l in e})
                hooks = [(M.mlp_post(l), _stacked_hook(es, l, b)) for l in layers]
                base = st["resid"][s]
                x = base if n == 1 else base.repeat(n, *([1] * (base.dim() - 1)))
                r = run_from(model, x, s, hooks)
            for j, i in enumerate(chunk):
                out[i] = r[j * b + rr, pp]
    return out  # type: ignore[return-value]
