"""The model's own readout at the answer position: final norm, unembedding, final softcap, and
the two answer metrics (correct, logit difference). Pure tensor functions on residuals
``[..., d_model]``."""

from __future__ import annotations

from typing import Any

import torch

from so2lib.engine import models as M



def softcap_of(model: Any) -> float:
    """The model's final logit softcap (``cfg.output_logits_soft_cap``; Gemma-2 has 30), 0 if none."""
    return float(getattr(model.cfg, "output_logits_soft_cap", None) or 0.0)


def softcap(model: Any, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit softcap, ``cap * tanh(logits / cap)``, where it has one (else
    ``logits`` unchanged). Monotone: it never changes an argmax, only logit differences."""
    cap = softcap_of(model)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def readout_params(model: Any) -> dict[str, Any]:
    """Step parameters that name what :func:`final_logits` changed on this model: the final
    softcap (``{"logit_softcap": cap}``, Gemma-2) and an unfolded final-norm gain
    (``{"final_norm_gain": "applied"}``, OLMo-2); ``{}`` for every other model, whose readout was
    already exact (so their keys do not change). Steps whose results read logits through
    :func:`final_logits` add it to their parameters: a run made before these were applied there
    recomputes them instead of mixing the two readouts."""
    cap = softcap_of(model)
    return {**({"logit_softcap": cap} if cap > 0 else {}),
            **({"final_norm_gain": "applied"} if M.final_norm_gain(model) is not None else {})}


@torch.no_grad()
def final_logits(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., V]`` (float32) of residual rows ``[..., d_model]`` before the final norm
    (at T, possibly edited): the model's own final norm module and unembedding, then its final
    softcap if it has one, exactly as its forward pass reads them out. The norm module, not a
    recomputed ``x / scale(x)``: some adapters leave norm weights unfolded (OLMo-2), where a
    recomputed norm without the gains is off by whole logits."""
    shape = resid.shape[:-1]
    W_U = model.W_U
    x = resid.reshape(1, -1, resid.shape[-1]).to(W_U.device, W_U.dtype)
    logits = softcap(model, model.unembed(model.ln_final(x)).float())
    return logits.reshape(*shape, -1)


def answer_metrics(logits: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``correct [b]`` (argmax is the gold token) and ``logit_diff [b]`` (gold minus best other)."""
    ar = torch.arange(len(gold))
    g = logits[ar, gold]
    other = logits.clone()
    other[ar, gold] = -float("inf")
    return logits.argmax(-1) == gold, g - other.max(-1).values
