"""Brute-force frozen-path ablation: the independent check of the engine, and the naive baseline.

Follows ``docs/method.md``: scale one neuron by ``1 + K`` (the model is linear in
it once everything else is frozen), freeze every attention pattern, query and key (some adapters
ignore an edit of the pattern alone) and every norm scale (input, post-attention, post-MLP,
q/k norms), freeze the MLP outputs after the neuron's layer and, for the exact per-layer path,
the attention outputs of every later layer but one. The direct term is measured by its own
run with every later attention output frozen too, so post-MLP norms need no formula here.
Costs one forward pass per (neuron, later layer).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from so2lib.engine import models as M

#: hook-name endings the brute force replaces by their clean values (besides later MLP/attention outputs)
FREEZE = ("attn.hook_pattern", "attn.hook_q", "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k", "hook_scale")


def freezing_hooks(model: Any) -> list[str]:
    """Names of every hook the brute force freezes: patterns, queries, keys (rotated too) and
    every norm scale."""
    return [n for n in model.hook_dict if n.endswith(FREEZE)]


def _clean_run(model: Any, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    names = freezing_hooks(model)
    names += [n for n in model.hook_dict if n.endswith(("hook_mlp_out", "hook_attn_out", "mlp.hook_post"))]
    names.append(M.FINAL_RESID)
    store: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[name] = x.detach().clone()
        return hook

    with model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
        model(tokens)
    return store


def _replace(value: torch.Tensor) -> Callable:
    return lambda x, hook: value


@torch.no_grad()
def frozen_path_effect(model: Any, tokens: torch.Tensor, answer_pos: torch.Tensor, layer: int, neuron: int,
                       through: int | None = None, K: float = 1000.0,
                       clean: dict[str, torch.Tensor] | None = None,
                       direct: torch.Tensor | bool = True) -> torch.Tensor:
    """Contribution ``[b, d_model]`` of ``neuron`` of MLP ``layer`` at T, before the final norm,
    through the attention of later layers, with patterns, norm scales and later MLPs frozen.

    ``through=l'`` also freezes the attention output of every later layer except ``l'``
    (the doc's step 4): the exact contribution through layer ``l'``. ``through=None`` leaves
    all later attention live, so head-to-head composition leaks in (not the definition).
    ``direct``: ``True`` measures the neuron's direct write at T with a second run (every later
    attention output frozen) and subtracts it; a ``[b, d_model]`` tensor is subtracted as is
    (reuse across ``through``); ``False`` returns the raw difference (one forward pass).
    """
    L = model.cfg.n_layers
    clean = clean or _clean_run(model, tokens)
    ar = torch.arange(len(answer_pos), device=tokens.device)

    def boost(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x.clone()
        x[..., neuron] *= 1 + K
        return x

    def run(frozen_attn: set[int]) -> torch.Tensor:
        hooks = [(M.mlp_post(layer), boost)]
        hooks += [(n, _replace(clean[n])) for n in freezing_hooks(model) if n in clean]
        for lp in range(layer + 1, L):
            hooks.append((M.mlp_out(lp), _replace(clean[M.mlp_out(lp)])))
            if lp in frozen_attn:
                hooks.append((M.attn_out(lp), _replace(clean[M.attn_out(lp)])))
        out: dict[str, torch.Tensor] = {}

        def grab(x: torch.Tensor, hook: Any) -> None:
            out["final"] = x.detach().clone()

        hooks.append((M.FINAL_RESID, grab))
        with model.hooks(fwd_hooks=hooks):
            model(tokens)
        return (out["final"] - clean[M.FINAL_RESID])[ar, answer_pos].double() / K

    later = set(range(layer + 1, L))
    diff = run(set() if through is None else later - {through})
    if direct is False:
        return diff.float()
    if direct is True:
        direct = run(later)  # the neuron's own write at T (through its post-MLP norm, if any)
    return (diff - direct.double()).float()


@torch.no_grad()
def brute_force_second_order(model: Any, tokens: torch.Tensor, answer_pos: torch.Tensor, layer: int,
                             neuron: int, freeze_other_attention: bool = True, K: float = 1000.0) -> torch.Tensor:
    """``[b, d_model]``: with ``freeze_other_attention`` the sum over later layers of the exact
    per-layer contributions (one forward each); without it, one forward with all later
    attention live (what a straightforward port does, and wrong by head-to-head composition)."""
    clean = _clean_run(model, tokens)
    if not freeze_other_attention:
        return frozen_path_effect(model, tokens, answer_pos, layer, neuron, None, K, clean)
    total = torch.zeros(tokens.shape[0], model.cfg.d_model, device=tokens.device)
    L = model.cfg.n_layers
    if layer + 1 >= L:
        return total
    # the raw difference with every later attention output frozen is the direct term
    direct = frozen_path_effect(model, tokens, answer_pos, layer, neuron, L, K, clean, direct=False)
    for lp in range(layer + 1, L):
        total += frozen_path_effect(model, tokens, answer_pos, layer, neuron, lp, K, clean, direct=direct)
    return total
