import pytest
import torch

from so2lib import load_model
from so2lib.engine.models import ModelInfo, value_output_weights, value_weights_per_query_head

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


def _load_both_ways(folder, dtype="float32"):
    """The model loaded with so2lib's lean weight processing and exactly as TransformerLens does."""
    import so2lib.engine.models as M

    out = []
    for lean in (True, False):
        old, M.LEAN_WEIGHT_PROCESSING = M.LEAN_WEIGHT_PROCESSING, lean
        try:
            out.append(load_model(folder, device="cpu", dtype=dtype))
        finally:
            M.LEAN_WEIGHT_PROCESSING = old
    return out


@pytest.mark.parametrize("arch", ARCHS + ("gemma2", "gemma3", "olmo2", "qwen3", "mqa"))
def test_lean_loading_is_bit_identical(arch, tiny_dirs, tmp_path):
    """Handing each processing stage its input (load_model's memory saving) changes no weight
    and no logit, in float32 and in bfloat16 (which TransformerLens upcasts to process)."""
    from test_families import build_family

    folder = tiny_dirs[arch] if arch in ARCHS else build_family(arch, tmp_path / arch)
    x = torch.randint(2, 100, (2, 7))
    for dtype in ("float32", "bfloat16"):
        lean, plain = _load_both_ways(folder, dtype)
        sl, sp = lean.state_dict(), plain.state_dict()
        assert sl.keys() == sp.keys()
        for k in sl:
            assert torch.equal(sl[k], sp[k]), k
        assert torch.equal(lean(x), plain(x))


def test_lean_loading_patches_only_during_the_load(tiny_dirs, monkeypatch):
    from transformer_lens.weight_processing import ProcessWeights

    import so2lib.engine.models as M

    before = {n: ProcessWeights.__dict__[n] for n in M._DEEP_COPYING_STAGES}
    # the stages so2lib relies on still begin by deep-copying their input (else nothing is saved)
    assert all(M._begins_with_deep_copy(s.__func__) for s in before.values())
    seen = {}
    orig = ProcessWeights.process_weights

    def spy(*a, **kw):
        seen.update({n: ProcessWeights.__dict__[n] for n in M._DEEP_COPYING_STAGES})
        return orig(*a, **kw)

    monkeypatch.setattr(ProcessWeights, "process_weights", staticmethod(spy))
    load_model(tiny_dirs["llama"], device="cpu")
    assert all(seen[n] is not before[n] for n in before)  # patched while processing
    assert all(ProcessWeights.__dict__[n] is before[n] for n in before)  # and restored


def test_hand_over_frees_each_input_as_it_is_copied():
    """The first stage's clone frees the previous stage's tensors one by one: at no point do two
    copies of the whole state dict exist."""
    import weakref

    import so2lib.engine.models as M

    sd = {f"w{i}": torch.randn(10) for i in range(5)}
    refs = [weakref.ref(v) for v in sd.values()]
    alive = []

    def stage(state_dict):
        """A stage that deep-copies its input first, as TransformerLens's do."""
        state_dict = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
        return state_dict

    assert M._begins_with_deep_copy(stage)
    orig_clone = torch.Tensor.clone

    def counting_clone(self, *a, **kw):
        alive.append(sum(r() is not None for r in refs))
        return orig_clone(self, *a, **kw)

    torch.Tensor.clone = counting_clone
    try:
        out = M._hand_over(stage)(sd)
    finally:
        torch.Tensor.clone = orig_clone
    assert sd == {} and alive == [5, 4, 3, 2, 1] and len(out) == 5


def test_where_the_weights_are_processed():
    from so2lib.engine.models import choose_processing_device, processing_bytes
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    n = 10**9
    assert processing_bytes(n) == int(4.4e9) == processing_bytes(n, torch.bfloat16)
    assert processing_bytes(n, torch.float64) == int(8.8e9)  # float64 is processed as float64
    assert choose_processing_device(None, cpu, n, None) == "device"
    assert choose_processing_device("cpu", cpu, n, None) == "device"  # already there
    assert choose_processing_device(None, cuda, n, 40 * 2**30) == "device"
    assert choose_processing_device(None, cuda, n, 4 * 2**30) == "cpu"  # 4 GiB < 4.4 GB needed
    assert choose_processing_device("device", cuda, n, 1) == "device"
    assert choose_processing_device("cpu", cuda, n, 80 * 2**30) == "cpu"
    with pytest.raises(ValueError, match="process_on"):
        choose_processing_device("gpu", cuda, n, None)


def test_processing_away_from_the_device_gives_the_same_model(tiny_dirs, monkeypatch):
    """The process-on-CPU path (model moved out, processed, moved back) on a CPU-only machine:
    the same weights and logits as processing in place. The GPU run checks the real move."""
    import so2lib.engine.models as M

    from transformer_lens.model_bridge import TransformerBridge

    x = torch.randint(2, 100, (2, 7))
    plain = load_model(tiny_dirs["llama"], device="cpu", dtype="bfloat16")
    calls = []
    real_to, real_compat = TransformerBridge.to, TransformerBridge.enable_compatibility_mode

    def to(self, *a, **kw):
        calls.append(("to", str(a[0])))
        return real_to(self, *a, **kw)

    def compat(self, *a, **kw):
        calls.append(("process", str(next(self.parameters()).device)))
        return real_compat(self, *a, **kw)
    monkeypatch.setattr(TransformerBridge, "to", to)
    monkeypatch.setattr(TransformerBridge, "enable_compatibility_mode", compat)
    monkeypatch.setattr(M, "choose_processing_device", lambda *a: "cpu")
    moved = load_model(tiny_dirs["llama"], device="cpu", dtype="bfloat16", process_on="cpu")
    assert calls == [("to", "cpu"), ("process", "cpu"), ("to", "cpu")], calls
    assert moved.so2lib_processed_on == "cpu"
    sp, sm = plain.state_dict(), moved.state_dict()
    assert sp.keys() == sm.keys() and all(torch.equal(sp[k], sm[k]) for k in sp)
    assert torch.equal(plain(x), moved(x))


def test_process_on_is_checked_before_loading(tiny_dirs, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def boom(*a, **kw):
        raise AssertionError("booted before checking process_on")
    monkeypatch.setattr(TransformerBridge, "boot_transformers", boom)
    with pytest.raises(ValueError, match="process_on='gpu'"):
        load_model(tiny_dirs["llama"], device="cpu", process_on="gpu")
    with pytest.raises(ValueError, match="device_map"):
        load_model(tiny_dirs["llama"], device_map={"": "cpu"}, process_on="cpu")
