"""Loading models as TransformerLens 4 bridges, and the weights and hook names so2lib reads.

Every model is a ``TransformerBridge`` in compatibility mode: norm weights folded into the
following matrices and writing weights centred, so each norm is ``x / scale(x)`` (plus
centering) and its scale is the hook ``blocks.{l}.ln1.hook_scale``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch



def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {list(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_model_path(name: str | os.PathLike | None) -> str:
    """``None``/``"embedded"`` -> the embedded model's folder; a named offline model
    (``"smollm2-135m"``, see :mod:`so2lib.sources`) or a ``.gguf`` file -> its converted folder
    in the so2lib cache (converted once); a local folder -> itself; else the hub name."""
    from .embedded import EMBEDDED_DIR
    from .sources import NAMED, gguf_model_path, named_model_path

    if name is None or str(name) == "embedded":
        if not (EMBEDDED_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded model is missing from {EMBEDDED_DIR}; train it again with "
                "`python -m so2lib.embedded`")
        return str(EMBEDDED_DIR)
    if str(name) in NAMED:
        return str(named_model_path(str(name)))
    if str(name).endswith(".gguf"):
        return str(gguf_model_path(name))
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is a folder but holds no config.json: not a Hugging Face model folder")
        return str(p)
    if str(name).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name} does not exist")
    return str(name)


def load_model(name: str | os.PathLike | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = None):
    """Load a causal LM as a TransformerLens 4 ``TransformerBridge`` in compatibility mode.

    Args:
        name: a hub name (``"gpt2"``, ``"EleutherAI/pythia-160m"``, ...), a local Hugging Face
            folder (config + weights + tokenizer), or ``None`` for the embedded default model.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: ``torch.float32`` (default), ``bfloat16``, ``float16`` or ``float64`` (or their names).

    Raises a ``RuntimeError`` that says what to do when a hub model is neither reachable nor cached.
    """
    from transformer_lens.model_bridge import TransformerBridge

    dt = _dtype(dtype)
    path = resolve_model_path(name)
    device = device or default_device()
    try:
        bridge = TransformerBridge.boot_transformers(path, device=device, dtype=dt)
    except Exception as e:
        msg = str(e)
        offline = any(s in msg for s in ("resolve", "connect", "Connection", "offline", "couldn't",
                                         "Can't load", "not a valid model identifier", "does not appear",
                                         "Repository Not Found", "401", "404", "OSError", "local_files_only"))
        if offline or isinstance(e, OSError):
            raise RuntimeError(
                f"could not load model {name!r}: it is not a local folder, and the Hugging Face hub "
                "is unreachable or the model is not cached (or the name is misspelled). On a "
                f"machine with internet run `huggingface-cli download {name}` (or load it once), "
                "or pass the path of a local folder with config, weights and tokenizer. "
                f"Underlying error: {type(e).__name__}: {msg[:300]}") from e
        raise RuntimeError(f"could not load model {name!r}: {type(e).__name__}: {msg[:500]}") from e
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    bridge.so2lib_name = "embedded" if name is None else str(name)
    return bridge


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Shapes and architecture facts so2lib needs."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    parallel: bool
    norm: str  # "LN" or "RMS"

    @staticmethod
    def of(model: Any) -> "ModelInfo":
        c = model.cfg
        return ModelInfo(c.n_layers, c.n_heads, c.n_key_value_heads or c.n_heads, c.d_model,
                         c.d_head, c.d_mlp, c.d_vocab, c.n_ctx, bool(c.parallel_attn_mlp),
                         "RMS" if "RMS" in str(c.normalization_type) else "LN")


# Hook names (TransformerLens names; the bridge aliases them in compatibility mode).
def mlp_post(l: int) -> str:
    return f"blocks.{l}.mlp.hook_post"


def attn_pattern(l: int) -> str:
    return f"blocks.{l}.attn.hook_pattern"


def ln1_scale(l: int) -> str:
    return f"blocks.{l}.ln1.hook_scale"


def mlp_out(l: int) -> str:
    return f"blocks.{l}.hook_mlp_out"


def attn_out(l: int) -> str:
    return f"blocks.{l}.hook_attn_out"


FINAL_SCALE = "ln_final.hook_scale"
FINAL_RESID = "ln_final.hook_in"  # residual stream before the final norm


@torch.no_grad()
def value_output_weights(model: Any) -> torch.Tensor:
    """Per-query-head OV circuits, ``[layers, n_heads, d_model, d_model]`` in float32.

    Grouped-query attention: query head ``h`` uses key/value head ``h // (n_heads // n_kv)``.
    """
    W_V, W_O = model.W_V.detach().float(), model.W_O.detach().float()  # [L, kv, dm, dh], [L, H, dh, dm]
    H = W_O.shape[1]
    if W_V.shape[1] != H:
        W_V = W_V.repeat_interleave(H // W_V.shape[1], dim=1)
    return torch.einsum("lhmd,lhdn->lhmn", W_V, W_O)


@torch.no_grad()
def value_weights_per_query_head(model: Any) -> torch.Tensor:
    """``W_V`` expanded to one entry per query head: ``[layers, n_heads, d_model, d_head]`` float32."""
    W_V = model.W_V.detach().float()
    H = model.cfg.n_heads
    return W_V.repeat_interleave(H // W_V.shape[1], dim=1) if W_V.shape[1] != H else W_V


def unembed_bias(model: Any) -> torch.Tensor:
    """``b_U`` or zeros for bias-free unembeddings."""
    try:
        b = model.b_U
    except Exception:
        b = None
    return torch.zeros(model.cfg.d_vocab, device=model.W_U.device) if b is None else b
