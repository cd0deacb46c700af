import pytest
import torch

from so2lib import load_model
from so2lib.models import ModelInfo, value_output_weights, value_weights_per_query_head

from conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_architectures_load_offline_and_run(arch, tiny_models):
    m = tiny_models[arch]
    info = ModelInfo.of(m)
    assert info.n_layers == 4 and info.d_model == 32
    assert info.parallel == (arch == "neox")
    assert info.norm == ("RMS" if arch == "llama" else "LN")
    assert info.n_kv_heads == (2 if arch == "llama" else 4)
    logits = m(torch.randint(2, 100, (2, 7)))
    assert logits.shape == (2, 7, info.d_vocab) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_post_times_w_out_is_mlp_out(arch, tiny_models):
    """The neuron write p * w_n that the engine assumes is exactly what the MLP adds."""
    m = tiny_models[arch]
    _, cache = m.run_with_cache(torch.randint(2, 100, (2, 6)))
    for l in range(m.cfg.n_layers):
        rec = cache[f"blocks.{l}.mlp.hook_post"] @ m.W_out[l]
        try:
            rec = rec + m.b_out[l]
        except Exception:  # bias-free (Llama): the bridge raises
            pass
        torch.testing.assert_close(rec, cache[f"blocks.{l}.hook_mlp_out"], atol=1e-5, rtol=1e-5)


def test_gqa_value_weights_expand_per_query_head(tiny_models):
    m = tiny_models["llama"]
    W_V = m.W_V  # one entry per kv head
    assert W_V.shape[1] == 2
    per_q = value_weights_per_query_head(m)
    assert per_q.shape[1] == 4
    for h in range(4):
        torch.testing.assert_close(per_q[:, h], W_V[:, h // 2].float())
    OV = value_output_weights(m)
    torch.testing.assert_close(OV[1, 3], W_V[1, 1].float() @ m.W_O[1, 3].float())


def test_unknown_hub_model_offline_says_what_to_do():
    with pytest.raises(RuntimeError, match="local folder"):
        load_model("so2lib-no-such-org/no-such-model-xyz", device="cpu")


def test_missing_local_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"), device="cpu")


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        load_model(None, device="cpu", dtype="float8")


def test_embedded_model_loads_and_numbers_are_single_tokens():
    m = load_model(None, device="cpu")
    tok = m.tokenizer
    for n in (0, 7, 57, 999, 1998):
        assert len(tok(f" {n}", add_special_tokens=False)["input_ids"]) == 1
    assert m.cfg.n_layers >= 2


def test_cuda_without_gpu_gets_a_hint(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        load_model(None, device="cuda")


def test_file_given_as_model_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        load_model(str(f), device="cpu")


def test_load_model_passes_placement_through(tiny_dirs, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge
    seen = {}
    real = TransformerBridge.boot_transformers

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(TransformerBridge, "boot_transformers", spy)
    load_model(tiny_dirs["gpt2"], device_map={"": "cpu"}, max_memory={"cpu": "2GiB"})
    assert seen["device_map"] == {"": "cpu"} and seen["max_memory"] == {"cpu": "2GiB"} and "device" not in seen
