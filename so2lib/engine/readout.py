"""The model's own readout at the answer position: final norm, unembedding, and the two answer
metrics (correct, logit difference). Pure tensor functions on residuals ``[b, d_model]``."""

from __future__ import annotations

from typing import Any

import torch

from so2lib.engine import models as M


def final_logits(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, V]`` from residuals ``[b, d_model]`` at T: the model's final norm (centering
    for LayerNorm, scale recomputed with its epsilon; folded weights) then ``W_U`` and ``b_U``."""
    x = resid.float()
    if M.ModelInfo.of(model).norm == "LN":
        x = x - x.mean(-1, keepdim=True)
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.eps)
    W_U = model.W_U.detach().float().to(x.device)
    return x @ W_U + M.unembed_bias(model).detach().float().to(x.device)


def answer_metrics(logits: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``correct [b]`` (argmax is the gold token) and ``logit_diff [b]`` (gold minus best other)."""
    ar = torch.arange(len(gold))
    g = logits[ar, gold]
    other = logits.clone()
    other[ar, gold] = -float("inf")
    return logits.argmax(-1) == gold, g - other.max(-1).values
