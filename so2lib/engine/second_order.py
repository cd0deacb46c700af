"""The exact second-order effect of MLP neurons (``docs/method.md``).

For neuron ``n`` of MLP layer ``l`` at answer position ``T``::

    phi_n = sum_{l'>l} sum_h sum_{i<=T} A[l',h,T,i] * p_i^n / s[l',i] / r[l,i] / q[l',T]
                                         * (w_n @ W_V[l',g(h)] @ W_O[l',h])

with ``s`` the input-norm scale of layer ``l'`` (1 where a block has none, as in OLMo-2), ``r``
the post-MLP norm scale of layer ``l`` and ``q`` the post-attention norm scale of layer ``l'``
(both 1 for plain pre-norm blocks; Gemma-2/3 and OLMo-2 have them; their gains are folded into
``w_n`` and ``W_O``), and ``g(h)`` the key/value group of query head ``h``.

It factors into a per-problem **coefficient** ``c[b, h, n] = sum_i A/s/r/q * p`` (one batched
matmul over positions per later layer) and weight-only products ``w_n @ W_V[l', g]``, shared by
the query heads of a key/value group. :class:`SecondOrderEngine` computes those products per
(source layer, later layer) on the device where the later layer's weights live, keeps them
while they fit in its ``max_memory`` budget and recomputes the rest on the fly; everything
accumulates in float32 whatever the model's dtype. A batch costs one forward pass plus
einsums, with no loop over neurons.

Projections onto a direction ``u`` of the final normalized residual use the frozen final-norm
scale ``s_f``: ``phi . u / s_f``. Two directions are built in: the answer logit difference
(``W_U[:, answer] - W_U[:, alternative]``, per problem) and the correctness direction
(fixed, from the training split); :func:`projected_effects` takes any.

On construction the engine checks on a few tokens that its weight extraction reproduces the
model's own forward pass (:func:`check_weights`) and raises :class:`UnsupportedModelError`
naming what differs, rather than return wrong numbers.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np
import torch

from so2lib.engine import models as M
from so2lib.engine.capture import AnswerRows, capture_batch

DEFAULT_MAX_MEMORY = 2 * 2**30  # bytes the engine may add over the model on CPU (see SecondOrderEngine)


class UnsupportedModelError(ValueError):
    """The engine's weight extraction does not reproduce this model's forward pass."""


def default_max_memory(device: torch.device) -> int:
    """The engine's default budget: on a GPU half of its free memory (counting what PyTorch holds
    cached but unallocated), at least 2 GiB; elsewhere :data:`DEFAULT_MAX_MEMORY` (2 GiB)."""
    free = M.free_device_memory(device)
    return DEFAULT_MAX_MEMORY if free is None else max(DEFAULT_MAX_MEMORY, free // 2)


def _bytes(x: int | float | str | None) -> int:
    if x is None:
        return DEFAULT_MAX_MEMORY
    if isinstance(x, (int, float)):
        return int(x)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(x), re.I)
    if not m:
        raise ValueError(f"max_memory={x!r}: give bytes (int) or a size such as '4GiB' or '500MB'")
    base = 1024 if m.group(3) or not m.group(2) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index((m.group(2) or "_").upper()))


# ---------------------------------------------------------------------------------- self-check

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


@torch.no_grad()
def check_weights(model: Any, tokens: torch.Tensor | None = None, tol: float | None = None) -> dict[str, float]:
    """Check on a few tokens that the weights the engine reads reproduce the forward pass.

    Per layer: ``hook_v = norm1(resid_pre) @ W_V (+ b_V)``; ``hook_attn_out = post_norm(hook_z @ W_O
    (+ b_O))``; ``hook_mlp_out = post_norm(hook_post @ W_out (+ b_out))``; ``resid_post = resid_pre +
    attn_out + mlp_out``; and the final norm is ``centre(resid) / ln_final.hook_scale`` (its gain
    folded into ``W_U``). Returns the worst relative error of each check; raises
    :class:`UnsupportedModelError` naming the layer and relation that differ, or the hook that is
    missing. ``tol`` defaults to 1e-3 (float32/64) or 5e-2 (16-bit models).
    """
    info = M.ModelInfo.of(model)
    dev = next(model.parameters()).device
    dt = next(model.parameters()).dtype
    tol = tol if tol is not None else (5e-2 if dt in (torch.float16, torch.bfloat16) else 1e-3)
    if tokens is None:
        tokens = (torch.arange(9, device=dev) * 7 + 2) % info.d_vocab
        tokens = tokens[None]
    name = getattr(model, "so2lib_name", type(model).__name__)
    hd = model.hook_dict
    need = []
    for l in range(info.n_layers):
        need += [f"blocks.{l}.hook_resid_pre", f"blocks.{l}.attn.hook_v", f"blocks.{l}.attn.hook_z",
                 M.attn_out(l), M.mlp_post(l), M.mlp_out(l), f"blocks.{l}.hook_resid_post", M.attn_pattern(l)]
    need += [M.FINAL_RESID, M.FINAL_SCALE, "ln_final.hook_out"]
    missing = [n for n in need if n not in hd]
    if missing:
        raise UnsupportedModelError(
            f"model {name!r} ({info.n_layers} layers) lacks the hook(s) {missing[:4]}: so2lib's second-order "
            "engine needs per-head values (hook_v/hook_z), attention patterns, MLP post-activations "
            "(mixture-of-experts MLPs have none) and the final norm. This architecture is not supported.")
    opt = [n for l in range(info.n_layers) for n in (M.ln1_scale(l), M.ln1_post_scale(l), M.ln2_post_scale(l)) if n in hd]
    store: dict[str, torch.Tensor] = {}

    def keep(n: str):
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[n] = x.detach().double().to(dev)
        return hook

    with model.hooks(fwd_hooks=[(n, keep(n)) for n in need + opt]):
        model(tokens.to(dev))
    worst: dict[str, float] = {"hook_v": 0.0, "hook_attn_out": 0.0, "hook_mlp_out": 0.0, "residual": 0.0}
    center = info.norm == "LN"
    problems = []
    for l in range(info.n_layers):
        try:
            w = M.layer_weights(model, l, torch.float64)
        except Exception as e:
            raise UnsupportedModelError(
                f"model {name!r} is not supported by so2lib's second-order engine: layer {l}'s "
                f"{type(model.blocks[l].mlp).__name__} / {type(model.blocks[l].attn).__name__} do not expose "
                f"per-neuron W_out and per-head W_V/W_O ({type(e).__name__}: {str(e)[:200]}); "
                "mixture-of-experts MLPs are not supported.") from e
        x = store[f"blocks.{l}.hook_resid_pre"]
        if center:
            x = x - x.mean(-1, keepdim=True)
        if M.ln1_scale(l) in store:
            x = x / store[M.ln1_scale(l)]
        v = torch.einsum("bsm,kmd->bskd", x, w.W_V.to(dev))
        if w.b_V is not None:
            v = v + w.b_V.double().to(dev)
        y = torch.einsum("bshd,hdm->bsm", store[f"blocks.{l}.attn.hook_z"], w.W_O.to(dev))
        if w.b_O is not None:
            y = y + (w.b_O.to(dev) if w.attn_gain is None else w.b_O.to(dev) * w.attn_gain.double().to(dev))
        if M.ln1_post_scale(l) in store:
            y = y / store[M.ln1_post_scale(l)]
        o = store[M.mlp_post(l)] @ w.W_out.to(dev)
        if w.b_out is not None:
            o = o + (w.b_out.to(dev) if w.mlp_gain is None else w.b_out.to(dev) * w.mlp_gain.double().to(dev))
        if M.ln2_post_scale(l) in store:
            o = o / store[M.ln2_post_scale(l)]
        checks = {"hook_v": (v, store[f"blocks.{l}.attn.hook_v"], "norm1(resid_pre) @ W_V (+ b_V)"),
                  "hook_attn_out": (y, store[M.attn_out(l)], "post_attention_norm(hook_z @ W_O (+ b_O))"),
                  "hook_mlp_out": (o, store[M.mlp_out(l)], "post_mlp_norm(hook_post @ W_out (+ b_out))"),
                  "residual": (store[f"blocks.{l}.hook_resid_pre"] + store[M.attn_out(l)] + store[M.mlp_out(l)],
                               store[f"blocks.{l}.hook_resid_post"], "hook_resid_pre + hook_attn_out + hook_mlp_out")}
        for key, (got, want, what) in checks.items():
            if got.shape != want.shape:
                problems.append(f"layer {l}: {key} has shape {tuple(want.shape)} but {what} gives {tuple(got.shape)}")
                continue
            e = _rel(got, want)
            worst[key] = max(worst[key], e)
            if e > tol:
                problems.append(f"layer {l}: {key} differs from {what} by {e:.2g} (relative, tolerance {tol:g})")
    xf = store[M.FINAL_RESID]
    if center:
        xf = xf - xf.mean(-1, keepdim=True)
    gf = M.final_norm_gain(model)
    xf = xf / store[M.FINAL_SCALE]
    if gf is not None:
        xf = xf * gf.double().to(dev)
    e = _rel(xf, store["ln_final.hook_out"])
    worst["final_norm"] = e
    if e > tol:
        problems.append(f"final norm: ln_final.hook_out differs from centre(resid)/ln_final.hook_scale*gain by {e:.2g}")
    if problems:
        raise UnsupportedModelError(
            f"so2lib's second-order engine cannot compute exact effects for model {name!r}: its weight "
            f"extraction does not reproduce the forward pass. " + "; ".join(problems[:5])
            + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            + ". Supported: pre-norm, parallel, sandwich/post-norm (Gemma-2/3, OLMo-2), QK-norm and GQA/MQA "
            "decoders loaded with so2lib.load_model.")
    return worst


# ---------------------------------------------------------------------------------- engine

class SecondOrderEngine:
    """Weight-only products for the second-order effects of a model, computed once and kept
    within a memory budget.

    Args:
        model: a compatibility-mode ``TransformerBridge`` (possibly spread over devices).
        layers: source MLP layers to prepare (default: all).
        correctness_dir: ``[d_model]`` direction in the final normalized residual space
            (``mean(correct) - mean(incorrect)`` on the training split), or ``None``.
        ov_rank: optional low-rank approximation of each head's OV circuit (``None`` = exact).
        max_memory: budget in bytes (or ``"4GiB"``) for what the engine holds over the model's
            own weights (default :func:`default_max_memory`: 2 GiB on CPU, half the free memory
            on a GPU), not counting the outputs its callers keep, shared out as: 3/8 for cached products
            ``w_n @ W_V[l', g]`` (``[n_kv_heads, d_mlp, d_head]`` per (source layer, later layer);
            those beyond it are recomputed on the fly for each batch), 1/4 for the captured
            activations of one batch (:meth:`rows_per_batch`, which :func:`projected_effects`
            follows), 1/8 for the scratch of one chunk (at least 16 MiB), and the rest as headroom
            for weight-product temporaries and allocator slack.
        check: run :func:`check_weights` first (default ``True``).

    Memory of all products: ``sum_l (L - l - 1) * n_kv_heads * d_mlp * d_head`` floats (GPT-2 small
    0.6 GB, Llama-3.2-1B 2.0 GB, Llama-3-8B 29 GB in float32).
    """

    def __init__(self, model: Any, layers: Sequence[int] | None = None,
                 correctness_dir: torch.Tensor | None = None, ov_rank: int | None = None,
                 max_memory: int | str | None = None, check: bool = True):
        self.model = model
        self.info = M.ModelInfo.of(model)
        self.layers = list(range(self.info.n_layers)) if layers is None else list(layers)
        self.device = next(model.parameters()).device
        self.ov_rank = ov_rank
        self.max_memory = default_max_memory(self.device) if max_memory is None else _bytes(max_memory)
        self.cache_bytes = self.max_memory * 3 // 8
        self.activation_bytes = self.max_memory // 4
        self.chunk_bytes = max(16 * 2**20, self.max_memory // 8)
        self.check = check_weights(model) if check else None
        self._fp32 = next(model.parameters()).dtype in (torch.float32, torch.float64)
        self._w: dict[int, M.LayerWeights] = {}
        self._prod: dict[tuple[int, int], torch.Tensor] = {}
        self._prod_bytes = 0
        self.W_U = model.W_U.detach()  # [dm, V], the model's own tensor (columns upcast when read)
        self.final_center = self.info.norm == "LN"
        g = M.final_norm_gain(model)
        self.final_gain = None if g is None else g.to(self.device)
        self.correctness_dir = None if correctness_dir is None else correctness_dir.detach().float().to(self.device)

    # ------------------------------------------------------------------ weights and products

    def weights(self, l: int) -> M.LayerWeights:
        """Float32 weights of layer ``l`` on its own device (kept when the model is float32: no copy)."""
        if l in self._w:
            return self._w[l]
        w = M.layer_weights(self.model, l, torch.float32)
        if self.ov_rank is not None:
            G = self.info.n_heads // w.W_V.shape[0]
            WV = w.W_V.repeat_interleave(G, 0) if G > 1 else w.W_V
            WV, WO = _low_rank_ov(WV[None], w.W_O[None], self.ov_rank)
            w = M.LayerWeights(WV[0], WO[0], w.W_out, None, None, None, w.attn_gain, w.mlp_gain, w.device)
        if self._fp32 or self.ov_rank is not None:
            self._w[l] = w
        return w

    @property
    def W_out(self) -> torch.Tensor:
        """``[L, d_mlp, d_model]`` float32 (post-MLP norm gain folded), stacked on first use (compatibility)."""
        if not hasattr(self, "_W_out_all"):
            self._W_out_all = torch.stack([self.weights(l).W_out.to(self.device) for l in range(self.info.n_layers)])
        return self._W_out_all

    @torch.no_grad()
    def product(self, l: int, lp: int, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """``[n_kv_heads, n, d_head]`` = ``w_n @ W_V[lp, g]`` for neurons of source layer ``l``, on
        the device of layer ``lp``; cached while within ``max_memory``."""
        key = (l, lp)
        if key in self._prod:
            p = self._prod[key]
            return p if neurons is None else p[:, neurons.to(p.device)]
        wl, wlp = self.weights(l), self.weights(lp)
        W_out = wl.W_out.to(wlp.device)
        if neurons is not None:
            W_out = W_out[neurons.to(wlp.device)]
        p = torch.einsum("nm,gmd->gnd", W_out, wlp.W_V)
        if neurons is None:
            size = p.numel() * p.element_size()
            if self._prod_bytes + size <= self.cache_bytes:
                self._prod[key] = p
                self._prod_bytes += size
        return p

    def bytes_per_problem(self, seq_len: int, n_layers: int | None = None) -> int:
        """Bytes one problem of ``seq_len`` tokens costs while captured: float32 ``mlp_post
        [seq_len, d_mlp]`` of ``n_layers`` source layers (default all), patterns and norm scales,
        plus the forward pass's own transients, counted as 12 MLP widths, 4 attention rows, 8
        residual widths and the logits per token (on CPU the heap keeps about that much of a
        pass's freed memory between its kept activations)."""
        i = self.info
        nl = i.n_layers if n_layers is None else n_layers
        return 4 * seq_len * (nl * i.d_mlp + 2 * i.n_layers * (i.n_heads + 1)
                              + 12 * i.d_mlp + 4 * i.n_heads * seq_len + 8 * i.d_model + i.d_vocab)

    def rows_per_batch(self, seq_len: int, n_layers: int | None = None) -> int:
        """Problems per forward pass (at least 1) whose :meth:`bytes_per_problem` fit in a quarter
        of ``max_memory``."""
        return max(1, self.activation_bytes // self.bytes_per_problem(seq_len, n_layers))

    # ------------------------------------------------------------------ coefficients

    def _acts(self, rows: AnswerRows, layer: int, neurons: torch.Tensor | None) -> torch.Tensor:
        """``[b, S, n]`` activations as written to the residual (post-MLP norm scale divided out)."""
        p = rows.mlp_post[layer]
        if neurons is not None:
            p = p[..., neurons.to(p.device)]
        r = rows.mlp_out_scale.get(layer)
        return p if r is None else p / r[..., None]

    def _coef(self, rows: AnswerRows, p: torch.Tensor, lp: int) -> torch.Tensor:
        """``[b, H, n]`` coefficients of the heads of later layer ``lp``, on ``lp``'s device."""
        A = rows.pattern[:, lp] / rows.scale[:, lp, None, :]  # [b, H, S]
        if rows.attn_out_scale is not None:
            A = A / rows.attn_out_scale[:, lp, None, None]
        dev = self.weights(lp).device
        return torch.bmm(A.to(dev), p.to(dev))

    def _read_dirs(self, U: torch.Tensor) -> torch.Tensor:
        """Directions ``[..., d_model]`` as the residual reads them through the final norm, before
        its per-problem scale: centred for LayerNorm, times the gain where not folded into W_U."""
        if self.final_center:  # the final LayerNorm centres; a centred direction reads the same
            U = U - U.mean(-1, keepdim=True)
        if self.final_gain is not None:  # the final norm's gain, where not folded into W_U (OLMo-2)
            U = U * self.final_gain
        return U

    def _final_dirs(self, rows: AnswerRows, U: torch.Tensor) -> torch.Tensor:
        return self._read_dirs(U) / rows.final_scale[:, None, None].to(U.device)

    # ------------------------------------------------------------------ directions

    @torch.no_grad()
    def directions(self, answer: torch.Tensor, alternative: torch.Tensor) -> torch.Tensor:
        """``[b, D, d_model]`` per-problem directions before the final-norm division:
        D=0 the logit difference, D=1 the correctness direction (when set)."""
        dev = self.W_U.device
        u = (self.W_U[:, answer.to(dev)].float() - self.W_U[:, alternative.to(dev)].float()).T.to(self.device)  # [b, dm]
        dirs = [u]
        if self.correctness_dir is not None:
            dirs.append(self.correctness_dir.expand_as(u))
        U = torch.stack(dirs, 1)
        if self.final_center:
            U = U - U.mean(-1, keepdim=True)
        return U

    # ------------------------------------------------------------------ projected effects

    @torch.no_grad()
    def projected(self, rows: AnswerRows, T: torch.Tensor, answer: torch.Tensor,
                  alternative: torch.Tensor, layers: Sequence[int] | None = None,
                  skip_percentile: float | None = None, neurons: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor]:
        """Projected first- and second-order effects of every neuron of ``layers``.

        Returns ``second [b, D, len(layers), d_mlp]`` and ``direct [b, D, len(layers), d_mlp]``
        in logit units (D as in :meth:`directions`), already divided by the final-norm scale.
        ``skip_percentile`` (approximation, opt-in): zero activations whose magnitude is below
        that percentile of the layer's batch before computing the coefficients. ``neurons [k]``:
        only those neurons of each layer (last dimension ``k``).
        """
        if neurons is not None:
            return self.project(rows, T, self.directions(answer, alternative), layers, skip_percentile, neurons)
        if skip_percentile is None and self.factored:
            basis, idx, wts = self._token_basis(answer, alternative)
            b, D = len(answer), wts.shape[1]
            # weight side once per basis direction and an n-batched matmul, against once per
            # problem-direction: cheaper when K (b + d_head) < b D d_head
            if basis.shape[0] * (b + self.info.d_head) < b * D * self.info.d_head:
                return self.project_factored(rows, T, basis, idx, wts, layers)
        return self.project(rows, T, self.directions(answer, alternative), layers, skip_percentile)

    #: ``True``: :meth:`projected` uses :meth:`project_factored` where its arithmetic is smaller.
    #: Off by default: on 2 CPU cores its gathers cost more than they save (docs/performance.md);
    #: both give the same effects up to float rounding.
    factored: bool = False

    @torch.no_grad()
    def _token_basis(self, answer: torch.Tensor, alternative: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The built-in directions as combinations of a few shared ones: ``basis [K, d_model]``
        (the unembedding columns of the distinct answer and alternative tokens of the batch,
        then the correctness direction), ``idx [b, Q]`` (the basis directions problem ``b``
        uses) and ``weights [b, D, Q]`` with ``directions()[b, d] = sum_q weights[b, d, q] *
        basis[idx[b, q]]`` (before centring)."""
        dev = self.W_U.device
        a, alt = answer.to(dev).long(), alternative.to(dev).long()
        toks, inv = torch.unique(torch.cat([a, alt]), return_inverse=True)
        b = len(a)
        basis = [self.W_U[:, toks].float().T.to(self.device)]
        idx = [inv[:b].to(self.device), inv[b:].to(self.device)]
        one, zero = torch.ones(b, device=self.device), torch.zeros(b, device=self.device)
        wts = [torch.stack([one, -one], -1)]  # the logit difference
        if self.correctness_dir is not None:
            basis.append(self.correctness_dir[None])
            idx.append(torch.full((b,), len(toks), device=self.device, dtype=torch.long))
            wts = [torch.cat([wts[0], zero[:, None]], -1), torch.stack([zero, zero, one], -1)]
        return torch.cat(basis), torch.stack(idx, 1), torch.stack(wts, 1)

    @torch.no_grad()
    def project_factored(self, rows: AnswerRows, T: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor,
                         weights: torch.Tensor, layers: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """:meth:`project` for directions that combine a few shared ones:
        ``directions[b, d] = sum_q weights[b, d, q] * basis[idx[b, q]]`` (``basis [K, d_model]``
        in the final normalized residual space, ``idx [b, Q]``, ``weights [b, D, Q]``).

        The weight side ``w_n W_V W_O u_k`` is formed once per basis direction and later head
        (``K`` products, not ``b * D``); the coefficients of all later heads come from one
        batched matmul per source layer; each problem gathers the weight side of its own
        basis directions. Same outputs as
        :meth:`project` on the expanded directions, up to float rounding."""
        layers = self.layers if layers is None else list(layers)
        dev = self.device
        B = basis.float().to(dev)
        if self.final_center:
            B = B - B.mean(-1, keepdim=True)
        if self.final_gain is not None:
            B = B * self.final_gain
        K = B.shape[0]
        b, D, Q = weights.shape
        wts = weights.float().to(dev) / rows.final_scale.to(dev)[:, None, None]  # [b, D, Q]
        idx = idx.to(dev)
        L, H, n = self.info.n_layers, self.info.n_heads, self.info.d_mlp
        A = rows.pattern / rows.scale[:, :, None, :]  # [b, L, H, S]
        if rows.attn_out_scale is not None:
            A = A / rows.attn_out_scale[:, :, None, None]
        ob = {}
        ar = torch.arange(b, device=dev)
        second = torch.zeros(b, D, len(layers), n, device=dev)
        direct = torch.zeros(b, D, len(layers), n, device=dev)
        for j, l in enumerate(layers):
            p = self._acts(rows, l, None)  # [b, S, n]
            wl = self.weights(l)
            later = list(range(l + 1, L))
            if later:
                c = torch.bmm(A[:, l + 1:].flatten(1, 2), p).reshape(b, len(later), H, n)
                acc = torch.zeros(b, Q, n, device=dev)  # sum_{l', h} c * (w_n W_V W_O u_idx)
                for i, lp in enumerate(later):
                    w = self.weights(lp)
                    if lp not in ob:  # [kv, G, K, dh]
                        o = torch.einsum("hem,Km->hKe", w.W_O, B.to(w.device))
                        ob[lp] = o.reshape(w.W_V.shape[0], -1, K, o.shape[-1])
                    wv = self.product(l, lp)  # [kv, n, dh]
                    MB = torch.einsum("gGKe,gne->KgGn", ob[lp], wv).flatten(1, 2).to(dev)  # [K, H, n]
                    acc += (c[:, i, None] * MB[idx]).sum(2)  # [b, Q, H, n] -> [b, Q, n]
                second[:, :, j] = torch.bmm(wts, acc)
            WB = (B.to(wl.device) @ wl.W_out.T).to(dev)  # [K, n]
            pT = p[ar, T.to(dev)]  # [b, n]
            direct[:, :, j] = pT[:, None] * torch.bmm(wts, WB[idx])
        return {"second": second, "direct": direct}

    @torch.no_grad()
    def project(self, rows: AnswerRows, T: torch.Tensor, directions: torch.Tensor,
                layers: Sequence[int] | None = None, skip_percentile: float | None = None,
                neurons: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Effects of every neuron of ``layers`` projected on ``directions [b, D, d_model]`` of the
        final normalized residual (divided here by the frozen final-norm scale at T).
        Returns ``second``/``direct`` ``[b, D, len(layers), d_mlp]`` float32 on :attr:`device`
        (``neurons [k]``: only those neurons of each layer, ``[b, D, len(layers), k]``)."""
        layers = self.layers if layers is None else list(layers)
        idx = None if neurons is None else torch.as_tensor(neurons, dtype=torch.long).to(self.device)
        dirs = directions.float().to(self.device)
        U = self._final_dirs(rows, dirs)  # [b, D, dm]
        b, D, _ = U.shape
        n = self.info.d_mlp if idx is None else len(idx)
        ar = torch.arange(b, device=self.device)
        # a direction the same for every problem (the correctness direction) differs per problem
        # only by the final-norm scale: its weight side w_n W_V W_O u is formed once, not per problem
        shared = [d for d in range(D) if b > 1 and bool((dirs[:, d] == dirs[:1, d]).all())]
        own = [d for d in range(D) if d not in shared]
        inv_scale = 1.0 / rows.final_scale.float().to(self.device)  # [b]
        Us = self._read_dirs(dirs[0, shared]) if shared else None  # [Ds, dm]
        Uo = U[:, own]
        Do = len(own)
        second, direct = [], []
        ou, os_ = {}, {}
        for l in layers:
            src = rows if skip_percentile is None else _sparsified(rows, l, skip_percentile)
            p = self._acts(src, l, idx)  # [b, S, n]
            acc = torch.zeros(b, D, n, device=self.device)
            for lp in range(l + 1, self.info.n_layers):
                w = self.weights(lp)
                kv = w.W_V.shape[0]
                c = self._coef(src, p, lp)  # [b, H, n]
                G = c.shape[1] // kv
                c = c.reshape(b, kv, G, n)
                wv = self.product(l, lp, idx)  # [kv, n, dh]
                if Do:
                    if lp not in ou:  # [b, kv, G, Do, dh]
                        o = torch.einsum("hem,bDm->bhDe", w.W_O, Uo.to(w.device))
                        ou[lp] = o.reshape(b, kv, G, Do, o.shape[-1])
                    o = ou[lp]
                    step = max(1, self.chunk_bytes // max(1, 4 * b * G * Do * n))  # kv groups per chunk
                    part = torch.zeros(b, Do, n, device=w.device)
                    for g0 in range(0, kv, step):
                        MU = torch.einsum("bgGDe,gne->bgGDn", o[:, g0:g0 + step], wv[g0:g0 + step])
                        MU *= c[:, g0:g0 + step, :, None]
                        part += MU.sum((1, 2))
                    acc[:, own] += part.to(self.device)
                if shared:
                    if lp not in os_:  # [kv, G, Ds, dh], before the per-problem scale
                        o = torch.einsum("hem,Dm->hDe", w.W_O, Us.to(w.device))
                        os_[lp] = o.reshape(kv, G, len(shared), o.shape[-1])
                    MS = torch.einsum("gGDe,gne->gGDn", os_[lp], wv)  # [kv, G, Ds, n]
                    part = torch.einsum("bgGn,gGDn->bDn", c, MS)
                    acc[:, shared] += part.to(self.device) * inv_scale[:, None, None]
            second.append(acc)
            wl = self.weights(l)
            pT = self._acts(rows, l, idx)[ar, T.to(self.device)]  # [b, n]
            W_out = wl.W_out if idx is None else wl.W_out[idx.to(wl.W_out.device)]
            direct.append(pT[:, None, :] * torch.einsum("nm,bDm->bDn", W_out, U.to(wl.device)).to(self.device))
        return {"second": torch.stack(second, 2), "direct": torch.stack(direct, 2)}

    # ------------------------------------------------------------------ full vectors

    @torch.no_grad()
    def vectors(self, rows: AnswerRows, layer: int, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """Full second-order effect vectors ``[b, n, d_model]`` (residual at T, before the final norm).

        Per later layer and chunk of heads, forms each head's OV rows ``R[h, n] = w_n W_V W_O[h]``
        (``[heads, n, d_model]``) once and contracts them with the coefficients: ``d_head`` times
        less arithmetic than scaling ``w_n W_V`` per problem before ``W_O``."""
        if neurons is not None:
            neurons = torch.as_tensor(neurons, dtype=torch.long, device=self.device)
        p = self._acts(rows, layer, neurons)
        b, _, n = p.shape
        dm = self.info.d_model
        out = torch.zeros(b, n, dm, device=self.device)
        for lp in range(layer + 1, self.info.n_layers):
            w = self.weights(lp)
            c = self._coef(rows, p, lp)  # [b, H, n]
            wv = self.product(layer, lp, neurons)  # [kv, n, dh]
            kv = wv.shape[0]
            G = w.W_O.shape[0] // kv
            WO = w.W_O.reshape(kv, G, w.W_O.shape[1], dm)
            gstep = max(1, self.chunk_bytes // max(1, 4 * G * n * dm))
            part = torch.zeros(n, b, dm, device=w.device)
            for g0 in range(0, kv, gstep):
                g1 = min(kv, g0 + gstep)
                R = torch.einsum("gne,gGem->ngGm", wv[g0:g1], WO[g0:g1]).flatten(1, 2)  # [n, h, dm]
                cc = c.reshape(b, kv, G, n)[:, g0:g1].flatten(1, 2).permute(2, 0, 1)  # [n, b, h]
                part.baddbmm_(cc, R)
            out += part.transpose(0, 1).to(self.device)
        return out

    @torch.no_grad()
    def layer_sum(self, rows: AnswerRows, layer: int) -> torch.Tensor:
        """``[b, d_model]``: the sum of the second-order vectors of all neurons of ``layer``."""
        p = self._acts(rows, layer, None)
        out = torch.zeros(p.shape[0], self.info.d_model, device=self.device)
        for lp in range(layer + 1, self.info.n_layers):
            w = self.weights(lp)
            wv = self.product(layer, lp)
            kv = wv.shape[0]
            c = self._coef(rows, p, lp).reshape(p.shape[0], kv, -1, p.shape[2])  # [b, kv, G, n]
            z = torch.einsum("bgGn,gne->bgGe", c, wv).flatten(1, 2)  # [b, H, dh]
            out += torch.einsum("bhe,hem->bm", z, w.W_O).to(self.device)
        return out

    @torch.no_grad()
    def per_head(self, rows: AnswerRows, T: torch.Tensor, answer: torch.Tensor, alternative: torch.Tensor,
                 layer: int, neurons: torch.Tensor) -> torch.Tensor:
        """Per-head breakdown ``[b, D, n, L, H]`` of the projected second-order effect of
        ``neurons`` of ``layer``; heads of layers ``<= layer`` are zero. Sums to :meth:`projected`."""
        U = self._final_dirs(rows, self.directions(answer, alternative))
        neurons = torch.as_tensor(neurons, dtype=torch.long, device=self.device)
        p = self._acts(rows, layer, neurons)
        b, D, n = U.shape[0], U.shape[1], len(neurons)
        out = torch.zeros(b, D, n, self.info.n_layers, self.info.n_heads, device=self.device)
        for lp in range(layer + 1, self.info.n_layers):
            w = self.weights(lp)
            wv = self.product(layer, lp, neurons)
            kv = wv.shape[0]
            o = torch.einsum("hem,bDm->bhDe", w.W_O, U.to(w.device))
            o = o.reshape(b, kv, -1, D, o.shape[-1])
            c = self._coef(rows, p, lp).reshape(b, kv, -1, n)
            contrib = c[:, :, :, None] * torch.einsum("bgGDe,gne->bgGDn", o, wv)  # [b, kv, G, D, n]
            out[:, :, :, lp] = contrib.flatten(1, 2).permute(0, 2, 3, 1).to(self.device)
        return out


def _low_rank_ov(W_V: torch.Tensor, W_O: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` approximation of every head's ``W_V @ W_O``, as new ``(W_V, W_O)``."""
    OV = torch.einsum("lhmd,lhdn->lhmn", W_V, W_O)
    U, S, Vh = torch.linalg.svd(OV)
    r = min(r, W_V.shape[-1])
    return U[..., :r] * S[..., None, :r], Vh[..., :r, :]


def _sparsified(rows: AnswerRows, layer: int, pct: float) -> AnswerRows:
    p = rows.mlp_post[layer]
    thr = torch.quantile(p.abs().flatten()[:: max(1, p.numel() // 1_000_000)].float(), pct / 100)
    mp = dict(rows.mlp_post)
    mp[layer] = torch.where(p.abs() >= thr, p, torch.zeros_like(p))
    return AnswerRows(mp, rows.pattern, rows.scale, rows.final_scale, rows.final_resid, rows.logits,
                      rows.attn_out_scale, rows.mlp_out_scale)


# ---------------------------------------------------------------------------------- public API

def _fingerprint(model: Any) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def engine_for(model: Any, max_memory: int | str | None = None) -> SecondOrderEngine:
    """The :class:`SecondOrderEngine` of ``model`` (all layers), built once and reused while the
    model's weights are unchanged (an in-place edit of any parameter rebuilds it)."""
    fp = _fingerprint(model)
    cached = getattr(model, "_so2lib_engine", None)
    if cached is not None and cached[0] == fp and (max_memory is None or cached[1].max_memory == _bytes(max_memory)):
        return cached[1]
    eng = SecondOrderEngine(model, max_memory=max_memory)
    model._so2lib_engine = (fp, eng)
    return eng


def _check_model(model: Any, what: str) -> None:
    """Refuse anything but a loaded model (a hub name, a path, an HF model) with what to do."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{what}() takes a loaded model, not the name {str(model)!r}: load it first with "
                        f"model = so2lib.load_model({str(model)!r}), then call {what}(model, ...)")
    if not hasattr(model, "cfg") or not hasattr(model, "parameters"):
        raise TypeError(f"{what}() takes a TransformerLens model from so2lib.load_model(...), not "
                        f"{type(model).__name__}")


def _check_layer(layer: Any, L: int) -> int:
    """``layer`` as a Python int (numpy and 0-d torch integers accepted), or a clear error."""
    if isinstance(layer, torch.Tensor) and layer.numel() == 1 and not layer.is_floating_point() \
            and layer.dtype != torch.bool:
        layer = int(layer.item())
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an integer MLP layer index 0..{L - 1}, not {type(layer).__name__} {layer!r}")
    if not 0 <= int(layer) < L:
        raise ValueError(f"layer {int(layer)} out of range: the model has MLP layers 0..{L - 1}")
    return int(layer)


def _check_inputs(model: Any, tokens: Any, answer_pos: Any) -> tuple[torch.Tensor, torch.Tensor]:
    dev = next(model.parameters()).device
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq] token ids; got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)}): pass at least one problem of at least one token")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer token ids, not {tokens.dtype}")
    V = model.cfg.d_vocab
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= V:
        bad = tokens[(tokens < 0) | (tokens >= V)].unique()[:5].tolist()
        raise ValueError(f"token ids {bad} are outside the model's vocabulary 0..{V - 1}: tokenize with the model's own tokenizer")
    answer_pos = torch.as_tensor(answer_pos)
    if answer_pos.shape != (tokens.shape[0],) or answer_pos.is_floating_point() \
            or int(answer_pos.max()) >= tokens.shape[1] or int(answer_pos.min()) < 0:
        raise ValueError(f"answer_pos must be [batch] = [{tokens.shape[0]}] integer positions inside tokens "
                         f"[batch, seq] = {list(tokens.shape)}; got {answer_pos.tolist()}")
    return tokens.to(dev).long(), answer_pos.to(dev).long()


def _check_neurons(neurons: Any, d_mlp: int, layer: int) -> torch.Tensor:
    t = torch.as_tensor(neurons)
    if t.dim() == 0:
        t = t[None]
    if t.dim() != 1:
        raise ValueError(f"neurons must be a 1-D list of indices; got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("neurons is empty: pass at least one neuron index (or None for all)")
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        if t.dtype == torch.bool or t.is_complex() or not torch.equal(t, t.round()):
            bad = [x for x in t.tolist() if x != int(x)][:5] if not t.is_complex() and t.dtype != torch.bool else t.tolist()[:5]
            raise ValueError(f"neurons must be integer indices; got non-integer {bad}")
        t = t.long()
    t = t.long()
    bad = t[(t < 0) | (t >= d_mlp)].tolist()
    if bad:
        raise ValueError(f"neuron indices {bad[:8]} of layer {layer} are out of range 0..{d_mlp - 1} "
                         "(negative indices are not accepted)")
    u, counts = t.unique(return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"neuron indices {u[counts > 1].tolist()[:8]} appear more than once: pass each neuron once")
    return t


@torch.no_grad()
def second_order_effects(model: Any, tokens: torch.Tensor, answer_pos: torch.Tensor, layer: int,
                         neurons: Sequence[int] | torch.Tensor | None = None,
                         engine: SecondOrderEngine | None = None) -> torch.Tensor:
    """Second-order effects ``[batch, n_neurons, d_model]`` (float32) of neurons of MLP ``layer``.

    Args:
        tokens: ``[batch, seq]`` token ids, right-padded.
        answer_pos: ``[batch]`` answer position T of each row (last real prompt token).
        layer: source MLP layer.
        neurons: distinct neuron indices (default: all ``d_mlp``).
        engine: a prepared :class:`SecondOrderEngine`; by default the model's own, built on
            the first call and reused (see :func:`engine_for`).

    The result lives in the residual stream at T before the final norm, like the direct effect
    ``p_T^n * w_n``. The last layer has no later heads: its effects are zero. All neurons of a
    layer cost one forward pass plus ``(L - layer - 1) * n_heads * d_mlp * d_model * (d_head + batch)``
    multiply-adds.
    """
    _check_model(model, "second_order_effects")
    L = model.cfg.n_layers
    layer = _check_layer(layer, L)
    tokens, answer_pos = _check_inputs(model, tokens, answer_pos)
    idx = None if neurons is None else _check_neurons(neurons, model.cfg.d_mlp, layer)
    engine = engine or engine_for(model)
    rows = capture_batch(model, tokens, answer_pos, [layer])
    return engine.vectors(rows, layer, idx)


@torch.no_grad()
def projected_effects(model: Any, tokens: torch.Tensor, answer_pos: torch.Tensor, directions: torch.Tensor,
                      layers: Sequence[int] | None = None, engine: SecondOrderEngine | None = None
                      ) -> dict[str, torch.Tensor]:
    """Second-order and direct effects of every neuron of ``layers`` projected on ``directions``.

    Args:
        tokens: ``[batch, seq]`` token ids, right-padded; ``answer_pos``: ``[batch]`` positions T.
        directions: ``[n_dirs, d_model]`` (shared) or ``[batch, n_dirs, d_model]`` (per problem)
            directions in the **final normalized residual** space (what the unembedding reads);
            the effects are divided by the frozen final-norm scale at T (and centred for LayerNorm).
        layers: source MLP layers (default: all).

    Returns ``{"second", "direct"}``, each ``[batch, n_dirs, n_layers, d_mlp]`` float32, e.g. with
    ``directions = W_U[:, a] - W_U[:, b]`` the change of the logit difference (no softcap).
    Uses the model's cached engine and its memory budget: the batch runs in sub-batches of
    :meth:`SecondOrderEngine.rows_per_batch` problems, each cut after its last answer position
    (causal attention: later tokens change nothing at T). The outputs (``2 * batch * n_dirs *
    n_layers * d_mlp`` floats, on the engine's device) come on top of the budget.
    """
    _check_model(model, "projected_effects")
    L = model.cfg.n_layers
    if layers is not None and not isinstance(layers, (list, tuple, range, np.ndarray, torch.Tensor)):
        layers = [layers]  # one layer given as a number
    layers = list(range(L)) if layers is None else list(layers)
    bad = [l for l in layers if isinstance(l, (bool, np.bool_)) or not isinstance(l, (int, np.integer, torch.Tensor))
           or not 0 <= int(l) < L]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the model has MLP layers 0..{L - 1}")
    layers = [int(l) for l in layers]
    tokens, answer_pos = _check_inputs(model, tokens, answer_pos)
    d = torch.as_tensor(directions).float()
    dm, b = model.cfg.d_model, tokens.shape[0]
    if d.dim() == 2 and d.shape[1] == dm:
        d = d[None].expand(b, -1, -1)
    if d.dim() != 3 or d.shape[0] != b or d.shape[2] != dm:
        raise ValueError(f"directions must be [n_dirs, {dm}] or [{b}, n_dirs, {dm}]; got {tuple(torch.as_tensor(directions).shape)}")
    engine = engine or engine_for(model)
    step = engine.rows_per_batch(int(answer_pos.max()) + 1, len(layers))
    shape = (b, d.shape[1], len(layers), model.cfg.d_mlp)
    out = {k: torch.empty(shape, device=engine.device) for k in ("second", "direct")}
    for s in range(0, b, step):
        T = answer_pos[s:s + step]
        x = tokens[s:s + step, :int(T.max()) + 1]
        rows = capture_batch(model, x, T, layers)
        part = engine.project(rows, T, d[s:s + step], layers)
        del rows
        for k in out:
            out[k][s:s + step] = part[k]
        del part
        if tokens.device.type == "cpu":
            M.trim_heap()  # the next sub-batch reuses the memory instead of growing the heap
    return out
