"""Loading models as TransformerLens 4 bridges, and the weights and hook names so2lib reads.

Every model is a ``TransformerBridge`` in compatibility mode: norm weights folded into the
following matrices and writing weights centred, so each norm is ``x / scale(x)`` (plus
centering) and its scale is the hook ``blocks.{l}.ln1.hook_scale``.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import dataclasses
import functools
import gc
import inspect
import os
import textwrap
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
    (``"smollm2-135m"``, ``"gemma3-270m"``, see :mod:`so2lib.data.sources`) or a ``.gguf`` file -> its converted folder
    in the so2lib cache (converted once); a local folder -> itself; else the hub name."""
    from so2lib.data.embedded import EMBEDDED_DIR
    from so2lib.data.sources import gguf_model_path, is_named, named_model_path

    if name is None or str(name) == "embedded":
        if not (EMBEDDED_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded model is missing from {EMBEDDED_DIR}; train it again with "
                "`python -m so2lib.data.embedded`")
        return str(EMBEDDED_DIR)
    if is_named(str(name)):
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


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device, counting what PyTorch holds cached but unallocated (``None``
    for other devices)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def processing_bytes(n_params: int, dtype: torch.dtype = torch.float32) -> int:
    """Device memory that ``enable_compatibility_mode`` needs over the loaded model: a copy of
    every weight in float32 (TransformerLens upcasts 16-bit weights to process them; float64
    stays float64), plus 10 % for the fold temporaries. Measured on an H100 and an H200 for a
    bfloat16 Llama-3-8B shape: 1.02x ``n_params * 4`` bytes over the loaded model (3.04x its
    weights in all); on CPU, float32 Llama-3.2-1B shape: 2.2x its weights in all."""
    return int(n_params * max(4, dtype.itemsize) * 1.1)


def choose_processing_device(process_on: str | None, device: torch.device, n_params: int,
                             free_bytes: int | None, dtype: torch.dtype = torch.float32) -> str:
    """Where to process the weights: ``"device"`` or ``"cpu"``. ``None`` (auto) picks the CPU only
    for a GPU whose free memory (``free_bytes``) is under :func:`processing_bytes`. The host's
    RAM is not checked: processing on the CPU needs about 3x the weights there."""
    _check_process_on(process_on)
    if device.type == "cpu":
        return "device"
    if process_on is not None:
        return process_on
    return "cpu" if free_bytes is not None and free_bytes < processing_bytes(n_params, dtype) else "device"


def _check_process_on(process_on: str | None) -> None:
    if process_on not in (None, "device", "cpu"):
        raise ValueError(f"process_on={process_on!r}: use None (auto), 'device' or 'cpu'")


def load_model(name: str | os.PathLike | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
               n_devices: int | None = None, max_memory: dict | None = None,
               process_on: str | None = None):
    """Load a causal LM as a TransformerLens 4 ``TransformerBridge`` in compatibility mode.

    Args:
        name: a hub name (``"gpt2"``, ``"EleutherAI/pythia-160m"``, ...), a local Hugging Face
            folder (config + weights + tokenizer), or ``None`` for the embedded default model.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: ``torch.float32`` (default), ``bfloat16``, ``float16`` or ``float64`` (or their names).
            Weights are loaded directly in this dtype.
        device_map, n_devices, max_memory: multi-device placement for models larger than one
            device, passed to ``TransformerBridge.boot_transformers`` (accelerate-style:
            ``device_map="auto"`` with ``max_memory={0: "70GiB", 1: "70GiB"}``, or an explicit
            ``{"model.layers.0": "cuda:0", ...}`` map). Mutually exclusive with ``device``.
            :class:`so2lib.SecondOrderEngine` computes each layer's products where its weights live.
        process_on: where TransformerLens folds and centres the weights (in float32): ``"device"``
            (fast; on a GPU the load peaks at 2x the weights for float32 models, 3x for bfloat16),
            ``"cpu"`` (the model goes to the CPU for processing and back: the GPU holds about 1x
            the weights at most, the CPU's RAM the 2-3x), or ``None`` (default): the CPU when the
            GPU's free memory is under :func:`processing_bytes`, else the device. Multi-device
            placements always process where the weights live.

    Raises a ``RuntimeError`` that says what to do when a hub model is neither reachable nor cached.
    """
    from transformer_lens.model_bridge import TransformerBridge

    dt = _dtype(dtype)
    if name is not None and Path(name).expanduser().is_file() and not str(name).endswith(".gguf"):
        raise FileNotFoundError(
            f"{name} is a file, not a model folder: pass the folder that holds config.json, the "
            "weights and the tokenizer (or a hub name)")
    multi = device_map is not None or n_devices is not None
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was asked for but this machine has no CUDA GPU visible to torch "
            f"(torch {torch.__version__}). Use device='cpu' (or leave device unset), or install a "
            "CUDA build of torch on a GPU machine.")
    if multi and device is not None:
        raise ValueError("pass either device or device_map/n_devices, not both")
    _check_process_on(process_on)
    if multi and process_on == "cpu":
        raise ValueError("process_on='cpu' applies to a model on one device; with device_map/n_devices "
                         "TransformerLens processes each layer where it lives (leave process_on unset)")
    path = resolve_model_path(name)
    local = Path(path).is_dir()
    if local:
        _check_model_folder(Path(path), name)
    kw: dict[str, Any] = {}
    if multi:
        kw.update(device_map=device_map, n_devices=n_devices, max_memory=max_memory)
    else:
        kw["device"] = device or default_device()
    try:
        bridge = TransformerBridge.boot_transformers(path, dtype=dt, **kw)
    except Exception as e:
        msg = str(e)
        if local:
            raise _local_load_error(Path(path), name, e) from e
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
    target = next(bridge.parameters()).device
    where = "device"
    if not multi:
        n_params = sum(p.numel() for p in bridge.parameters())
        where = choose_processing_device(process_on, target, n_params, free_device_memory(target), dt)
    if where == "cpu":
        bridge.to("cpu", print_details=False)
        _release_freed_memory(bridge)
    with _lean_weight_processing():
        bridge.enable_compatibility_mode(disable_warnings=True)
    if where == "cpu":
        bridge.to(target, print_details=False)
    _release_freed_memory(bridge)
    bridge.so2lib_processed_on = "multi-device" if multi else "cpu" if where == "cpu" else str(target)
    bridge.eval()
    bridge.so2lib_name = "embedded" if name is None else str(name)
    return bridge


_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "*.pt", "*.pth", "tf_model.h5",
                 "flax_model.msgpack")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "tokenizer_config.json")


def _fix_hint(name: Any, folder: Path) -> str:
    from so2lib.data.embedded import EMBEDDED_DIR

    if name is None or str(name) == "embedded" or folder.resolve() == EMBEDDED_DIR.resolve():
        return ("restore the embedded model (`git checkout -- data/models/so2lib-tiny-math`) or train it "
                "again (`make model`)")
    return (f"copy or download the model's files into {folder} again (or save the model there with "
            f"model.save_pretrained({str(folder)!r}) and tokenizer.save_pretrained(...))")


def _check_model_folder(folder: Path, name: Any) -> None:
    """A local model folder must hold weights and a tokenizer beside its config.json."""
    weights = [p for pat in _WEIGHT_FILES for p in folder.glob(pat)]
    if not weights:
        raise FileNotFoundError(
            f"model folder {folder} holds config.json but no weights (model.safetensors, pytorch_model.bin "
            f"or their shards): the download or copy is incomplete; {_fix_hint(name, folder)}")
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {folder} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json): the "
            f"download or copy is incomplete; {_fix_hint(name, folder)}")


def _local_load_error(folder: Path, name: Any, e: Exception) -> RuntimeError:
    """A clear error for a local folder whose files cannot be read (no hub advice: it is local)."""
    msg = f"{type(e).__name__}: {str(e)[:300]}"
    damaged = ("safetensor" in type(e).__name__.lower() or "safetensor" in str(e).lower()
               or any(s in str(e) for s in ("deserializ", "header", "unpickl", "invalid load key",
                                            "PytorchStreamReader", "incomplete metadata", "truncated")))
    if damaged:
        return RuntimeError(f"could not load model {str(name or 'embedded')!r}: the weights in folder {folder} are damaged (truncated or corrupt file): {msg}. "
                            f"{_fix_hint(name, folder).capitalize()}")
    return RuntimeError(f"could not load model {str(name or 'embedded')!r} from folder {folder}: {msg}. Check that its config.json, "
                        f"weights and tokenizer belong together; {_fix_hint(name, folder)}")


# --- Loading in bounded memory ------------------------------------------------------------------
#
# ``enable_compatibility_mode`` (TransformerLens 4.3) processes the weights as a state dict that
# passes through stages (``ProcessWeights.fold_layer_norm``, ``center_unembed``,
# ``fold_value_biases``, ``refactor_factored_attn_matrices``), each of which begins by cloning
# every tensor of its input: ``{k: v.clone() for k, v in state_dict.items()}``. The caller keeps
# the input alive until the stage returns, so at each stage the live model, the previous
# stage's copy and the new copy coexist: 3x the weights (5x the weights' size for bfloat16
# models, which are upcast to float32 for processing). The processed tensors then become the
# model's parameters (no further copy).
#
# ``_lean_weight_processing`` makes each such stage receive its input as a dict that hands its
# entries over as the clone reads them, and empties the caller's dict, so every input tensor
# is freed as soon as its copy exists (the live model's own tensors stay, the modules hold
# them). The stages compute exactly what they computed before, on the same tensors, so the
# result is bit-identical; only the peak drops from 3x to about 2x the weights. A stage whose
# source does not begin with that clone (another TransformerLens version) is left unpatched.

_DEEP_COPYING_STAGES = ("fold_layer_norm", "center_unembed", "fold_value_biases",
                        "refactor_factored_attn_matrices")
LEAN_WEIGHT_PROCESSING = True  # set False to load exactly as TransformerLens does (for comparison)


class _HandOverDict(dict):
    """A state dict whose ``items()`` removes each entry as it yields it."""

    def items(self):  # type: ignore[override]
        for k in list(self.keys()):
            yield k, self.pop(k)


def _begins_with_deep_copy(fn: Any) -> bool:
    """Whether ``fn``'s first statement (after its docstring) is
    ``state_dict = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}``
    (which rebinds the name, so the stage cannot read its argument again)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else []
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    if not body or not isinstance(body[0], ast.Assign):
        return False
    st = body[0]
    want = "state_dict = {k: v.clone() if isinstance(v, torch.Tensor) else v for (k, v) in state_dict.items()}"
    return ast.unparse(st).replace("(k, v)", "k, v") == want.replace("(k, v)", "k, v")


def _hand_over(stage: Any) -> Any:
    @functools.wraps(stage)
    def run(state_dict, *args, **kwargs):
        if type(state_dict) is not dict:  # only plain dicts: anything else as TransformerLens does
            return stage(state_dict, *args, **kwargs)
        handed = _HandOverDict(state_dict)
        state_dict.clear()  # the caller's reference no longer keeps the input tensors alive
        return stage(handed, *args, **kwargs)
    return run


@contextlib.contextmanager
def _lean_weight_processing():
    """Patch the deep-copying ``ProcessWeights`` stages for the duration of a load (see above)."""
    if not LEAN_WEIGHT_PROCESSING:
        yield
        return
    try:
        from transformer_lens.weight_processing import ProcessWeights
    except ImportError:
        yield
        return
    saved = {}
    for name in _DEEP_COPYING_STAGES:
        raw = ProcessWeights.__dict__.get(name)
        if isinstance(raw, staticmethod) and _begins_with_deep_copy(raw.__func__):
            saved[name] = raw
            setattr(ProcessWeights, name, staticmethod(_hand_over(raw.__func__)))
    try:
        yield
    finally:
        for name, raw in saved.items():
            setattr(ProcessWeights, name, raw)


def trim_heap() -> None:
    """Give glibc's free heap pages back to the system (``malloc_trim``; no-op elsewhere).
    Freed tensors under glibc's mmap threshold (up to 32 MiB) otherwise stay in the process."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _release_freed_memory(model: Any) -> None:
    """Return the memory the load freed: collect cycles, trim the heap (:func:`trim_heap`), and
    empty PyTorch's CUDA cache where CUDA is in use (also after a model left the GPU to be
    processed on the CPU)."""
    gc.collect()
    trim_heap()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


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


def ln1_post_scale(l: int) -> str:
    """Scale of the norm applied to the attention output before it joins the residual (Gemma-2/3, OLMo-2)."""
    return f"blocks.{l}.ln1_post.hook_scale"


def ln2_post_scale(l: int) -> str:
    """Scale of the norm applied to the MLP output before it joins the residual (Gemma-2/3, OLMo-2)."""
    return f"blocks.{l}.ln2_post.hook_scale"


def has_hook(model: Any, name: str) -> bool:
    return name in model.hook_dict


def _opt(obj: Any, attr: str) -> torch.Tensor | None:
    try:
        v = getattr(obj, attr)
    except Exception:  # bias-free models: the bridge raises
        return None
    return v if isinstance(v, torch.Tensor) else None


@torch.no_grad()
def post_norm_gain(model: Any, layer: int, which: str) -> torch.Tensor | None:
    """``[d_model]`` float32 elementwise gain of post-norm ``which`` (``"ln1_post"``/``"ln2_post"``)
    of ``layer``, or ``None`` when the block has none. Read by running the norm on a constant
    vector (whose RMS is its value), so conventions such as Gemma's ``1 + weight`` need no
    special case; the engine's self-check verifies it against the forward pass."""
    mod = getattr(model.blocks[layer], which, None)
    if mod is None:
        return None
    p = next(mod.parameters(), None)
    dev = p.device if p is not None else layer_device(model, layer)
    dt = p.dtype if p is not None else torch.float32
    x = torch.full((1, 1, model.cfg.d_model), 1e3 if dt != torch.float16 else 10.0, device=dev, dtype=dt)
    return mod(x)[0, 0].float()


@torch.no_grad()
def final_norm_gain(model: Any) -> torch.Tensor | None:
    """``[d_model]`` float32 gain of the final norm when the bridge did not fold it into ``W_U``
    (OLMo-2), else ``None``: the final normalized residual (``ln_final.hook_out``, what ``W_U``
    reads) is ``centre(resid) / ln_final.hook_scale * gain``."""
    if "RMS" not in str(model.cfg.normalization_type):
        return None
    mod = getattr(model, "ln_final", None)
    if mod is None:
        return None
    p = next(mod.parameters(), None)
    dt = p.dtype if p is not None else torch.float32
    dev = p.device if p is not None else next(model.parameters()).device
    x = torch.full((1, 1, model.cfg.d_model), 1e3 if dt != torch.float16 else 10.0, device=dev, dtype=dt)
    g = mod(x)[0, 0].float()
    return None if torch.allclose(g, torch.ones_like(g), atol=1e-6) else g


def layer_device(model: Any, layer: int) -> torch.device:
    """Device of ``layer``'s MLP weights (layers may live on different devices under a device_map)."""
    return model.blocks[layer].mlp.W_out.device


@dataclasses.dataclass
class LayerWeights:
    """Float32 weights of one block as the engine uses them, on the block's device.

    ``W_V [n_kv_heads, d_model, d_head]`` (input-norm weights folded by the bridge),
    ``W_O [n_heads, d_head, d_model]`` and ``W_out [d_mlp, d_model]`` with any post-norm gain
    folded in (the post-norm *scale* is per position and applied to the activations).
    """

    W_V: torch.Tensor
    W_O: torch.Tensor
    W_out: torch.Tensor
    b_V: torch.Tensor | None
    b_O: torch.Tensor | None
    b_out: torch.Tensor | None
    attn_gain: torch.Tensor | None
    mlp_gain: torch.Tensor | None
    device: torch.device


@torch.no_grad()
def layer_weights(model: Any, layer: int, dtype: torch.dtype = torch.float32) -> LayerWeights:
    """Read :class:`LayerWeights` of ``layer`` (one block at a time: no all-layer copies)."""
    blk = model.blocks[layer]
    W_V = blk.attn.W_V.detach().to(dtype)
    W_O = blk.attn.W_O.detach().to(dtype)
    W_out = blk.mlp.W_out.detach().to(dtype)
    if W_out.shape[0] != model.cfg.d_mlp and W_out.shape[-1] == model.cfg.d_mlp:
        W_out = W_out.T
    ga, gm = post_norm_gain(model, layer, "ln1_post"), post_norm_gain(model, layer, "ln2_post")
    b_O, b_out = _opt(blk.attn, "b_O"), _opt(blk.mlp, "b_out")
    return LayerWeights(
        W_V=W_V, W_O=W_O if ga is None else W_O * ga.to(W_O)[None, None], W_out=W_out if gm is None else W_out * gm.to(W_out)[None],
        b_V=_opt(blk.attn, "b_V"), b_O=None if b_O is None else b_O.detach().to(dtype),
        b_out=None if b_out is None else b_out.detach().to(dtype), attn_gain=ga, mlp_gain=gm, device=W_out.device)
