"""Tiny randomly initialised models of each architecture, booted offline from temp folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from so2lib.engine.models import load_model
from so2lib.data.tokenizer import build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(arch: str, vocab: int, n_layers: int = 4):
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=n_layers, n_head=4, n_inner=64, n_positions=64,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **common)
    if arch == "neox":
        return transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5,
                                          use_parallel_residual=True, **common)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                        pad_token_id=0, **common)
    raise ValueError(arch)


def build_tiny(arch: str, folder: Path, seed: int = 0, n_layers: int = 4) -> Path:
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), n_layers))
    # random init is tiny; scale up so attention patterns and activations are far from uniform
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


ARCHS = ("gpt2", "neox", "llama")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {a: build_tiny(a, root / a) for a in ARCHS}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    return {a: load_model(d, device="cpu") for a, d in tiny_dirs.items()}


@pytest.fixture(params=ARCHS)
def tiny(request, tiny_models):
    return tiny_models[request.param]
