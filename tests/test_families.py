"""The engine on every decoder family it claims: sandwich/post-norm blocks (Gemma-2, Gemma-3,
OLMo-2, which also has no input norm), QK-norm (Qwen3, OLMo-2, Gemma-3) and multi-query
attention; each against the brute force of docs/method.md. Also: the load-time
self-check, the brute force's freezing hooks, the memory budget, device maps and API errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from so2lib.engine.bruteforce import _clean_run, brute_force_second_order, freezing_hooks
from so2lib.engine.capture import capture_batch
from so2lib.engine.models import load_model
from so2lib.engine.second_order import (SecondOrderEngine, UnsupportedModelError, check_weights, engine_for,
                                 projected_effects, second_order_effects)
from so2lib.data.tokenizer import build_tokenizer

FAMILIES = ("gemma2", "gemma3", "olmo2", "qwen3", "mqa")


def family_config(fam: str, vocab: int, n_layers: int = 4):
    c = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, hidden_size=32,
             num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)
    if fam == "gemma2":
        return transformers.Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **c)  # a cap that bites
    if fam == "gemma3":
        return transformers.Gemma3TextConfig(head_dim=8, **c)
    if fam == "olmo2":
        return transformers.Olmo2Config(**c)
    if fam == "qwen3":
        return transformers.Qwen3Config(head_dim=8, **c)
    if fam == "mqa":
        c["num_key_value_heads"] = 1
        return transformers.LlamaConfig(**c)
    raise ValueError(fam)


def build_family(fam: str, folder, seed: int = 0, n_layers: int = 4):
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(family_config(fam, len(tok), n_layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
            elif p.dim() == 1 and "norm" in name:  # non-trivial norm gains, so their handling is tested
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fam_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: load_model(build_family(f, root / f), device="cpu") for f in FAMILIES}


def padded_batch(seed=0, b=3, S=9):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 500, (b, S), generator=g)
    T = torch.tensor([S - 1, 5, 3][:b])
    for r, t in enumerate(T):
        tokens[r, t + 1:] = 0
    return tokens, T


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_families_have_what_they_claim(fam_models):
    hd = {f: m.hook_dict for f, m in fam_models.items()}
    for f in ("gemma2", "gemma3", "olmo2"):
        assert "blocks.1.ln1_post.hook_scale" in hd[f] and "blocks.1.ln2_post.hook_scale" in hd[f]
    assert "blocks.1.ln1.hook_scale" not in hd["olmo2"]  # OLMo-2 reads the residual directly
    for f in ("qwen3", "olmo2", "gemma3"):
        assert "blocks.1.attn.k_norm.hook_scale" in hd[f]
    assert fam_models["mqa"].W_V.shape[1] == 1


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_engine_matches_brute_force(fam, fam_models):
    model = fam_models[fam]
    tokens, T = padded_batch(FAMILIES.index(fam))
    layer = 1
    neurons = [2, 33]
    eff = second_order_effects(model, tokens, T, layer, neurons)
    for j, n in enumerate(neurons):
        bf = brute_force_second_order(model, tokens, T, layer, n)
        assert bf.norm() > 1e-4
        assert rel_err(eff[:, j], bf) < 1e-4, (fam, n, rel_err(eff[:, j], bf))


@pytest.mark.parametrize("fam", ("gemma2", "olmo2"))
def test_family_projection_and_direct_effect(fam, fam_models):
    """With post-MLP norms the direct effect is p_T / r_T * (w_n * gain): compare with the
    brute force's separately measured direct write, and projected_effects with the vectors."""
    from so2lib.engine.bruteforce import frozen_path_effect
    model = fam_models[fam]
    tokens, T = padded_batch(5)
    eng = engine_for(model)
    rows = capture_batch(model, tokens, T, [0])
    dirs = torch.randn(2, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    proj = projected_effects(model, tokens, T, dirs, layers=[0])
    from so2lib.engine.capture import final_normed
    vec = eng.vectors(rows, 0)  # [b, n, dm]
    b, n, dm = vec.shape
    normed = final_normed(vec.transpose(0, 1).reshape(-1, dm), rows.final_scale.repeat(n), model).reshape(n, b, dm)
    torch.testing.assert_close(proj["second"][:, :, 0], torch.einsum("nbm,Dm->bDn", normed, dirs), atol=1e-5, rtol=1e-4)
    g = torch.ones(dm) if eng.final_gain is None else eng.final_gain
    U = dirs * g / rows.final_scale[:, None, None]
    n = 7
    direct = frozen_path_effect(model, tokens, T, 0, n, model.cfg.n_layers, direct=False).double()
    torch.testing.assert_close(proj["direct"][:, :, 0, n].double(), torch.einsum("bm,bDm->bD", direct, U.double()),
                               atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("fam", ("gemma2", "olmo2", "qwen3"))
def test_each_freezing_hook_is_honoured(fam, fam_models):
    """An edit of every kind of hook the brute force freezes must change the forward pass;
    otherwise freezing it would be a no-op and the check could not fail."""
    model = fam_models[fam]
    tokens, _ = padded_batch(1)
    clean = _clean_run(model, tokens)
    base = clean["ln_final.hook_in"]
    kinds = {}
    for n in freezing_hooks(model):
        if n in clean and n.startswith("blocks.1."):
            kinds.setdefault(n.split(".", 2)[2], n)
    expect = {"attn.hook_pattern", "attn.hook_q", "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k"}
    if fam in ("gemma2", "olmo2"):
        expect |= {"ln1_post.hook_scale", "ln2_post.hook_scale"}
    if fam in ("olmo2", "qwen3"):
        expect |= {"attn.q_norm.hook_scale", "attn.k_norm.hook_scale"}
    if fam != "olmo2":
        expect |= {"ln1.hook_scale", "ln2.hook_scale"}
    assert expect <= set(kinds), set(kinds)
    for kind, name in kinds.items():
        v = clean[name]
        g = torch.Generator().manual_seed(0)
        pert = v * (1 + 0.5 * torch.rand(v.shape, generator=g))
        if kind.endswith("hook_pattern"):
            pert = pert / pert.sum(-1, keepdim=True)
        out = {}
        with model.hooks(fwd_hooks=[(name, lambda x, hook, p=pert: p),
                                    ("ln_final.hook_in", lambda x, hook: out.__setitem__("r", x.clone()))]):
            model(tokens)
        assert (out["r"] - base).abs().max() > 1e-4, f"{fam}: editing {name} does not change the output"


def test_self_check_passes_on_every_family(fam_models, tiny_models):
    for m in list(fam_models.values()) + list(tiny_models.values()):
        worst = check_weights(m)
        assert max(worst.values()) < 1e-4, worst


def test_self_check_catches_a_mismatch(tmp_path):
    model = load_model(build_family("gemma2", tmp_path / "g"), device="cpu")
    w = model.blocks[2].attn.o.weight
    with torch.no_grad():
        w.mul_(1.5)  # the bridge would now read a W_O its forward pass no longer uses...
    # ...only if they disagree: perturb the weight read, not the forward, via monkeypatching
    orig = type(model.blocks[2].attn).W_O
    try:
        type(model.blocks[2].attn).W_O = property(lambda self: orig.fget(self) * 1.01)
        with pytest.raises(UnsupportedModelError, match="layer 0: hook_attn_out differs"):
            SecondOrderEngine(model)
    finally:
        type(model.blocks[2].attn).W_O = orig
    SecondOrderEngine(model)  # consistent again (the in-place edit is read by both)


def test_self_check_names_the_post_norm_gain(tmp_path, monkeypatch):
    import so2lib.engine.models as M
    model = load_model(build_family("olmo2", tmp_path / "o"), device="cpu")
    real = M.post_norm_gain
    monkeypatch.setattr(M, "post_norm_gain", lambda m, l, which: None if which == "ln2_post" else real(m, l, which))
    with pytest.raises(UnsupportedModelError, match="hook_mlp_out differs"):
        check_weights(model)


def test_unsupported_family_raises_clearly(tmp_path):
    """Mixture-of-experts MLPs have no per-neuron post-activations: a clear error, not numbers."""
    tok = build_tokenizer()
    cfg = transformers.MixtralConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mx")
    tok.save_pretrained(tmp_path / "mx")
    try:
        model = load_model(tmp_path / "mx", device="cpu")
    except RuntimeError as e:  # the bridge cannot boot it: load_model says so
        assert "could not load model" in str(e)
        return
    with pytest.raises(UnsupportedModelError, match="not supported|cannot compute"):
        SecondOrderEngine(model)


# ------------------------------------------------------------------ memory budget and devices

def test_budget_zero_recomputes_products_with_same_result(tiny_models):
    model = tiny_models["llama"]
    tokens, T = padded_batch(2)
    rows = capture_batch(model, tokens, T, range(4))
    full = SecondOrderEngine(model)
    none = SecondOrderEngine(model, max_memory=0)
    ans, alt = torch.tensor([5, 6, 7]), torch.tensor([9, 10, 11])
    a, b = full.projected(rows, T, ans, alt), none.projected(rows, T, ans, alt)
    assert none._prod_bytes == 0 and full._prod_bytes > 0
    torch.testing.assert_close(a["second"], b["second"])
    torch.testing.assert_close(full.vectors(rows, 0), none.vectors(rows, 0))
    # GQA: one product per key/value head, shared by its query heads
    assert full._prod[(0, 1)].shape == (2, model.cfg.d_mlp, model.cfg.d_head)


def test_budget_sizes_sub_batches_with_the_same_result(tiny_models):
    """projected_effects under a budget that allows one problem per forward pass (and caches
    no product) gives what one batch gives; each sub-batch is cut after its last answer."""
    model = tiny_models["llama"]
    tokens, T = padded_batch(3)
    dirs = torch.randn(2, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    big = SecondOrderEngine(model)
    small = SecondOrderEngine(model, max_memory=1)
    assert small.rows_per_batch(tokens.shape[1]) == 1 and big.rows_per_batch(tokens.shape[1]) >= len(T)
    assert small.cache_bytes == 0
    # two problems per pass: the first sub-batch mixes answer positions 8 and 5 (cut after 8)
    two = SecondOrderEngine(model, max_memory=4 * 2 * big.bytes_per_problem(tokens.shape[1]) + 3)
    two_rows = two.rows_per_batch(tokens.shape[1])
    assert big.rows_per_batch(9, n_layers=1) > big.rows_per_batch(9)  # fewer captured layers, more rows
    a = projected_effects(model, tokens, T, dirs, engine=big)
    rows = capture_batch(model, tokens, T, range(model.cfg.n_layers))
    whole = big.project(rows, T, dirs[None].expand(len(T), -1, -1))
    for k in ("second", "direct"):
        torch.testing.assert_close(a[k], whole[k], rtol=1e-5, atol=1e-6)
    per_problem = dirs[None] * torch.tensor([1.0, -2.0, 0.5])[:, None, None]  # [b, n_dirs, d_model]
    want = big.project(rows, T, per_problem)
    for eng in (small, two):
        for d, ref in ((dirs, whole), (per_problem, want)):
            got = projected_effects(model, tokens, T, d, engine=eng)
            for k in ("second", "direct"):
                torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert small._prod_bytes == 0 and two_rows == 2, two_rows


def test_budget_shares(tiny_models):
    """max_memory is shared out: 3/8 cached products, 1/4 one batch's activations, 1/8 scratch."""
    e = SecondOrderEngine(tiny_models["llama"], max_memory="1GiB", check=False)
    assert (e.cache_bytes, e.activation_bytes, e.chunk_bytes) == (3 * 2**27, 2**28, 2**27)
    assert SecondOrderEngine(tiny_models["llama"], check=False).max_memory == 2 * 2**30  # CPU default
    # tiny Llama: 6 (source, later) layer pairs, each product [2 kv heads, 64 neurons, 8] float32 = 4 KiB
    tight = SecondOrderEngine(tiny_models["llama"], max_memory=32 * 2**10, check=False)  # caches 12 KiB
    tokens, T = padded_batch(0)
    tight.projected(capture_batch(tight.model, tokens, T, range(4)), T, torch.tensor([5, 6, 7]), torch.tensor([9, 10, 11]))
    assert tight.cache_bytes == 12 * 2**10 and tight._prod_bytes == 12 * 2**10 and len(tight._prod) == 3


def test_budget_parsing():
    from so2lib.engine.second_order import _bytes
    assert _bytes("1GiB") == 2**30 and _bytes("500MB") == 500 * 10**6 and _bytes(123) == 123
    with pytest.raises(ValueError, match="max_memory"):
        _bytes("lots")


def test_device_map_with_cpu_placements(tiny_dirs):
    """Layers placed by an explicit device_map (all CPU here: the path a multi-GPU map takes)."""
    dm = {"": "cpu"}
    m = load_model(tiny_dirs["llama"], dtype="float32", device_map=dm)
    ref = load_model(tiny_dirs["llama"], device="cpu")
    tokens, T = padded_batch(3)
    a = second_order_effects(m, tokens, T, 0, [1, 5])
    b = second_order_effects(ref, tokens, T, 0, [1, 5])
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="either device or device_map"):
        load_model(tiny_dirs["llama"], device="cpu", device_map=dm)


# ------------------------------------------------------------------ API errors

def test_api_errors(tiny_models):
    model = tiny_models["gpt2"]
    tokens, T = padded_batch()
    d = model.cfg.d_mlp
    with pytest.raises(ValueError, match=r"\[64\].*out of range"):
        second_order_effects(model, tokens, T, 0, [1, d])
    with pytest.raises(ValueError, match=r"\[-1\]"):
        second_order_effects(model, tokens, T, 0, [-1, 2])
    with pytest.raises(ValueError, match="non-integer"):
        second_order_effects(model, tokens, T, 0, [1.5, 2])
    with pytest.raises(ValueError, match=r"\[3\] appear more than once"):
        second_order_effects(model, tokens, T, 0, [3, 4, 3])
    with pytest.raises(ValueError, match="empty"):
        second_order_effects(model, tokens[:0], T[:0], 0)
    bad = tokens.clone()
    bad[0, 0] = model.cfg.d_vocab + 3
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        second_order_effects(model, bad, T, 0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        projected_effects(model, bad, T, torch.ones(1, model.cfg.d_model))
    with pytest.raises(ValueError, match="directions must be"):
        projected_effects(model, tokens, T, torch.ones(model.cfg.d_model))
    with pytest.raises(ValueError, match="out of range"):
        projected_effects(model, tokens, T, torch.ones(1, model.cfg.d_model), layers=[7])


def test_engine_is_reused_and_rebuilt_after_an_edit(tiny_dirs):
    model = load_model(tiny_dirs["gpt2"], device="cpu")
    tokens, T = padded_batch()
    second_order_effects(model, tokens, T, 0, [1])
    eng = engine_for(model)
    assert engine_for(model) is eng
    with torch.no_grad():
        model.blocks[2].attn.o.weight.mul_(2.0)
    assert engine_for(model) is not eng


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_clip_protocol_path_matches_full_vectors(fam, fam_models):
    """The all-neuron CLIP protocol's coefficient path (Gram norms, residual edits) reproduces the
    engine's full vectors on sandwich-norm, QK-norm and MQA blocks too."""
    from so2lib.phases import protocol as P
    model, layer = fam_models[fam], 0
    tokens, T = padded_batch(2)
    eng = engine_for(model)
    rows = capture_batch(model, tokens, T, [layer])
    full = eng.vectors(rows, layer).float().cpu()
    w = P.LayerWeights(model, layer, eng)
    c = P.coefficients(eng, rows, layer)
    torch.testing.assert_close(P.quad(c, w.gram(chunk=13)), full.pow(2).sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.edit(c), full.sum(1), rtol=1e-4, atol=1e-5)


def test_default_budget_is_half_the_free_gpu_memory(monkeypatch):
    import so2lib.engine.models as M
    from so2lib.engine.second_order import default_max_memory
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(M, "free_device_memory", lambda d: 100 * 2**30 if d.type == "cuda" else None)
    assert default_max_memory(cuda) == 50 * 2**30 and default_max_memory(torch.device("cpu")) == 2 * 2**30
    monkeypatch.setattr(M, "free_device_memory", lambda d: 2**30)  # a nearly full GPU: the 2 GiB floor
    assert default_max_memory(cuda) == 2 * 2**30


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_logits_at_tokens(fam, fam_models):
    """The few-token readout (effect budget) equals the whole unembedding's columns, softcap included."""
    from so2lib.engine import partial as P
    m = fam_models[fam]
    x, _ = padded_batch()
    r = P.final_resid(m, x)
    tok = torch.randint(0, m.cfg.d_vocab, (*r.shape[:-1], 3), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(P.logits_at_tokens(m, r, tok), P.logits_at(m, r).gather(-1, tok), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_final_logits_equal_the_forward_pass(fam, fam_models):
    """The residual-edit readout of phases 3 and 5 (``final_logits``) is the model's own logits,
    final softcap included (the Gemma-2 config caps at 2, which bites; uncapped logits differ) and
    the final norm's gain where the bridge leaves it unfolded (OLMo-2)."""
    from so2lib.engine import partial as P
    from so2lib.engine.readout import final_logits, readout_params, softcap_of
    m = fam_models[fam]
    x, _ = padded_batch()
    r = P.final_resid(m, x)
    ref = m(x).float()
    got = final_logits(m, r.reshape(-1, r.shape[-1])).reshape(ref.shape)
    assert torch.allclose(got, ref, atol=2e-4, rtol=1e-4), (got - ref).abs().max()
    assert (softcap_of(m) > 0) == (fam == "gemma2") and bool(readout_params(m)) == (fam in ("gemma2", "olmo2"))
    if fam == "gemma2":  # the check can fail: without the cap the logits are not the model's
        cap = softcap_of(m)
        uncapped = cap * torch.atanh((ref / cap).clamp(-1 + 1e-6, 1 - 1e-6))
        assert not torch.allclose(uncapped, ref, atol=2e-4, rtol=1e-4)
