"""The exact second-order effect of MLP neurons (``shared/docs/second_order.md``).

For neuron ``n`` of MLP layer ``l`` at answer position ``T``::

    phi_n = sum_{l'>l} sum_h sum_{i<=T} A[l',h,T,i] * p_i^n / s[l',i] * (w_n @ W_V[l',h] @ W_O[l',h])

It factors into a per-problem **coefficient** ``c[b, (l',h), n] = sum_i A/s * p`` (one einsum
over positions) and weight-only products. Everything weight-only is computed once, in
float32, by :class:`SecondOrderEngine`; a batch then costs one forward pass plus einsums,
with no loop over neurons or heads.

Projections onto a direction ``u`` of the final normalized residual use the frozen final-norm
scale ``s_f``: ``phi . u / s_f``. Two directions are built in: the answer logit difference
(``W_U[:, answer] - W_U[:, alternative]``, per problem) and the correctness direction
(fixed, from the training split).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import models as M
from .capture import AnswerRows, capture_batch


def coefficients(rows: AnswerRows, layer: int, neurons: torch.Tensor | None = None) -> torch.Tensor:
    """``c [b, K, n]``: attention-weighted, scale-divided activations of ``layer``'s neurons for
    every head ``k = (l' - layer - 1) * H + h`` of every later layer ``l'``.

    ``c[b,k,n] = sum_i A[b,l',h,T,i] * p[b,i,n] / s[b,l',i]``. Pads after ``T`` get zero
    attention from ``T``, so padded rows are exact.
    """
    p = rows.mlp_post[layer]
    if neurons is not None:
        p = p[..., neurons]
    A = rows.pattern[:, layer + 1:] / rows.scale[:, layer + 1:, None, :]  # [b, L', H, S]
    b, Lp, H, S = A.shape
    return torch.bmm(A.reshape(b, Lp * H, S), p)  # [b, K, n]


class SecondOrderEngine:
    """Weight-only products for the second-order effects of a model, computed once.

    Args:
        model: a compatibility-mode ``TransformerBridge``.
        layers: source MLP layers to prepare (default: all).
        correctness_dir: ``[d_model]`` direction in the final normalized residual space
            (``mean(correct) - mean(incorrect)`` on the training split), or ``None``.
        ov_rank: optional low-rank approximation of each head's OV circuit (``None`` = exact).

    Memory: ``sum_l K_l * d_mlp * d_head`` floats (for GPT-2 small, about 0.6 GB in float32).
    """

    def __init__(self, model: Any, layers: Sequence[int] | None = None,
                 correctness_dir: torch.Tensor | None = None, ov_rank: int | None = None):
        self.model = model
        self.info = M.ModelInfo.of(model)
        self.layers = list(range(self.info.n_layers)) if layers is None else list(layers)
        dev = next(model.parameters()).device
        self.device = dev
        with torch.no_grad():
            W_V = M.value_weights_per_query_head(model).to(dev)  # [L, H, dm, dh]
            W_O = model.W_O.detach().float().to(dev)  # [L, H, dh, dm]
            if ov_rank is not None:
                W_V, W_O = _low_rank_ov(W_V, W_O, ov_rank)
            self.W_O = W_O
            self.W_V = W_V
            self.W_out = model.W_out.detach().float().to(dev)  # [L, n, dm]
            self.W_U = model.W_U.detach().float().to(dev)  # [dm, V]
            self.final_center = self.info.norm == "LN"
            # wv[l] = w_n @ W_V[l', h] for every later head: [K_l, n, dh]
            self.wv = {l: torch.einsum("nm,khmd->khnd", self.W_out[l], W_V[l + 1:]).flatten(0, 1)
                       for l in self.layers}
        self.correctness_dir = None if correctness_dir is None else correctness_dir.detach().float().to(dev)

    # ------------------------------------------------------------------ directions

    @torch.no_grad()
    def directions(self, answer: torch.Tensor, alternative: torch.Tensor) -> torch.Tensor:
        """``[b, D, d_model]`` per-problem directions before the final-norm division:
        D=0 the logit difference, D=1 the correctness direction (when set)."""
        u = (self.W_U[:, answer] - self.W_U[:, alternative]).T  # [b, dm]
        dirs = [u]
        if self.correctness_dir is not None:
            dirs.append(self.correctness_dir.expand_as(u))
        U = torch.stack(dirs, 1)
        if self.final_center:  # the final LayerNorm centres; a centred direction reads the same
            U = U - U.mean(-1, keepdim=True)
        return U

    # ------------------------------------------------------------------ projected effects

    @torch.no_grad()
    def projected(self, rows: AnswerRows, T: torch.Tensor, answer: torch.Tensor,
                  alternative: torch.Tensor, layers: Sequence[int] | None = None,
                  skip_percentile: float | None = None) -> dict[str, torch.Tensor]:
        """Projected first- and second-order effects of every neuron of ``layers``.

        Returns ``second [b, D, len(layers), d_mlp]`` and ``direct [b, D, len(layers), d_mlp]``
        in logit units (D as in :meth:`directions`), already divided by the final-norm scale.
        ``skip_percentile`` (approximation, opt-in): zero activations whose magnitude is below
        that percentile of the layer's batch before computing the coefficients.
        """
        layers = self.layers if layers is None else list(layers)
        U = self.directions(answer.to(self.device), alternative.to(self.device)) / rows.final_scale[:, None, None]
        ou = torch.einsum("lhdm,bDm->blhDd", self.W_O, U)  # [b, L, H, D, dh]
        ar = torch.arange(len(T), device=self.device)
        second, direct = [], []
        for l in layers:
            src = rows if skip_percentile is None else _sparsified(rows, l, skip_percentile)
            c = coefficients(src, l)  # [b, K, n]
            o = ou[:, l + 1:].flatten(1, 2)  # [b, K, D, dh]
            # MU[b, K, D, n] = o . wv ; then sum over heads weighted by c
            MU = torch.einsum("bkDe,kne->bkDn", o, self.wv[l])
            second.append(torch.einsum("bkn,bkDn->bDn", c, MU))
            pT = rows.mlp_post[l][ar, T.to(self.device)]  # [b, n]
            direct.append(pT[:, None, :] * torch.einsum("nm,bDm->bDn", self.W_out[l], U))
        return {"second": torch.stack(second, 2), "direct": torch.stack(direct, 2)}

    # ------------------------------------------------------------------ full vectors

    @torch.no_grad()
    def vectors(self, rows: AnswerRows, layer: int, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """Full second-order effect vectors ``[b, n, d_model]`` (residual at T, before the final norm)."""
        c = coefficients(rows, layer, neurons)  # [b, K, n]
        wv = self.wv[layer] if neurons is None else self.wv[layer][:, neurons]  # [K, n, dh]
        WO = self.W_O[layer + 1:].flatten(0, 1)  # [K, dh, dm]
        out = torch.zeros(c.shape[0], c.shape[2], self.info.d_model, device=self.device)
        # chunk over later layers to bound the [b, H, n, dh] intermediate
        H = self.info.n_heads
        for s in range(0, c.shape[1], H):
            z = c[:, s:s + H, :, None] * wv[None, s:s + H]  # [b, H, n, dh]
            out += torch.einsum("bknd,kdm->bnm", z, WO[s:s + H])
        return out

    @torch.no_grad()
    def layer_sum(self, rows: AnswerRows, layer: int) -> torch.Tensor:
        """``[b, d_model]``: the sum of the second-order vectors of all neurons of ``layer``."""
        z = torch.einsum("bkn,knd->bkd", coefficients(rows, layer), self.wv[layer])  # [b, K, dh]
        return torch.einsum("bkd,kdm->bm", z, self.W_O[layer + 1:].flatten(0, 1))

    @torch.no_grad()
    def per_head(self, rows: AnswerRows, T: torch.Tensor, answer: torch.Tensor, alternative: torch.Tensor,
                 layer: int, neurons: torch.Tensor) -> torch.Tensor:
        """Per-head breakdown ``[b, D, n, L, H]`` of the projected second-order effect of
        ``neurons`` of ``layer``; heads of layers ``<= layer`` are zero. Sums to :meth:`projected`."""
        U = self.directions(answer.to(self.device), alternative.to(self.device)) / rows.final_scale[:, None, None]
        ou = torch.einsum("lhdm,bDm->blhDd", self.W_O[layer + 1:], U).flatten(1, 2)  # [b, K, D, dh]
        c = coefficients(rows, layer, neurons)
        contrib = c[:, None] * torch.einsum("bkDe,kne->bDkn", ou, self.wv[layer][:, neurons])  # [b, D, K, n]
        b, D, K, n = contrib.shape
        out = torch.zeros(b, D, n, self.info.n_layers, self.info.n_heads, device=self.device)
        out[:, :, :, layer + 1:] = contrib.permute(0, 1, 3, 2).reshape(b, D, n, -1, self.info.n_heads)
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
    return AnswerRows(mp, rows.pattern, rows.scale, rows.final_scale, rows.final_resid, rows.logits)


@torch.no_grad()
def second_order_effects(model: Any, tokens: torch.Tensor, answer_pos: torch.Tensor, layer: int,
                         neurons: Sequence[int] | torch.Tensor | None = None,
                         engine: SecondOrderEngine | None = None) -> torch.Tensor:
    """Second-order effects ``[batch, n_neurons, d_model]`` (float32) of neurons of MLP ``layer``.

    Args:
        tokens: ``[batch, seq]`` token ids, right-padded.
        answer_pos: ``[batch]`` answer position T of each row (last real prompt token).
        layer: source MLP layer.
        neurons: neuron indices (default: all ``d_mlp``).
        engine: a prepared :class:`SecondOrderEngine` to reuse across calls.

    The result lives in the residual stream at T before the final norm, like the direct effect
    ``p_T^n * w_n``. The last layer has no later heads: its effects are zero.
    """
    dev = next(model.parameters()).device
    L = model.cfg.n_layers
    if not 0 <= layer < L:
        raise ValueError(f"layer {layer} out of range: the model has MLP layers 0..{L - 1}")
    tokens, answer_pos = tokens.to(dev), torch.as_tensor(answer_pos).to(dev)
    if answer_pos.shape != (tokens.shape[0],) or int(answer_pos.max()) >= tokens.shape[1] or int(answer_pos.min()) < 0:
        raise ValueError("answer_pos must be [batch] positions inside tokens [batch, seq]")
    idx = None if neurons is None else torch.as_tensor(neurons, dtype=torch.long, device=dev)
    engine = engine or SecondOrderEngine(model, layers=[layer])
    rows = capture_batch(model, tokens, answer_pos, [layer])
    return engine.vectors(rows, layer, idx)
