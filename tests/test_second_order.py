"""The engine against the brute-force frozen-path ablation of docs/method.md."""

import pytest
import torch

from so2lib.engine.bruteforce import brute_force_second_order
from so2lib.engine.capture import capture_batch
from so2lib.engine.second_order import SecondOrderEngine, second_order_effects

from conftest import ARCHS


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 500, (4, 10), generator=g)
    tokens[:, 0] = 0
    T = torch.tensor([9, 6, 3, 7])
    for r, t in enumerate(T):
        tokens[r, t + 1:] = 0  # right padding
    return tokens, T


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_engine_matches_brute_force(arch, layer, tiny_models):
    model = tiny_models[arch]
    tokens, T = padded_batch(layer)
    neurons = [1, 17, 40]
    eff = second_order_effects(model, tokens, T, layer, neurons)
    assert eff.shape == (4, 3, model.cfg.d_model) and eff.dtype == torch.float32
    for j, n in enumerate(neurons):
        bf = brute_force_second_order(model, tokens, T, layer, n)
        assert bf.norm() > 1e-4
        assert rel_err(eff[:, j], bf) < 2e-5, (arch, layer, n)


@pytest.mark.parametrize("arch", ARCHS)
def test_brute_force_without_step_4_disagrees(arch, tiny_models):
    """Leaving the other later attention layers live lets head-to-head composition leak in:
    with three attention layers after layer 0 the two differ by far more than rounding, so the
    exactness test above can fail."""
    model = tiny_models[arch]
    tokens, T = padded_batch(1)
    eff = second_order_effects(model, tokens, T, 0, [17])[:, 0]
    naive = brute_force_second_order(model, tokens, T, 0, 17, freeze_other_attention=False)
    assert rel_err(eff, naive) > 0.05


def test_last_layer_has_no_second_order_effect(tiny_models):
    model = tiny_models["gpt2"]
    tokens, T = padded_batch()
    eff = second_order_effects(model, tokens, T, model.cfg.n_layers - 1, [0, 1])
    assert eff.abs().max() == 0


def test_padding_is_exact(tiny_models):
    model = tiny_models["neox"]
    tokens, T = padded_batch(3)
    both = second_order_effects(model, tokens, T, 1)
    for r in range(4):
        alone = second_order_effects(model, tokens[r:r + 1, : T[r] + 1], T[r:r + 1], 1)
        torch.testing.assert_close(both[r:r + 1], alone, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_projections_equal_projected_vectors(arch, tiny_models):
    model = tiny_models[arch]
    tokens, T = padded_batch(2)
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    eng = SecondOrderEngine(model, correctness_dir=d)
    rows = capture_batch(model, tokens, T, range(model.cfg.n_layers))
    ans, alt = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12])
    proj = eng.projected(rows, T, ans, alt)
    U = eng.directions(ans, alt) / rows.final_scale[:, None, None]  # [b, D, dm]
    ar = torch.arange(4)
    for l in range(model.cfg.n_layers):
        vec = eng.vectors(rows, l)  # [b, n, dm]
        expect = torch.einsum("bnm,bDm->bDn", vec, U)
        torch.testing.assert_close(proj["second"][:, :, l], expect, atol=1e-5, rtol=1e-4)
        direct = rows.mlp_post[l][ar, T][:, :, None] * model.W_out[l][None]  # [b, n, dm]
        torch.testing.assert_close(proj["direct"][:, :, l], torch.einsum("bnm,bDm->bDn", direct, U),
                                   atol=1e-5, rtol=1e-4)
        # the logit-difference projection is what the logits see: check with W_U directly
        if l == 0:
            from so2lib.engine.capture import final_normed
            normed = final_normed(vec[:, 0], rows.final_scale, model)
            ld = normed @ (model.W_U[:, ans] - model.W_U[:, alt])
            torch.testing.assert_close(proj["second"][:, 0, 0, 0], ld.diagonal(), atol=1e-5, rtol=1e-4)


def _engine_and_rows(model, pad=2):
    """An engine (all-ones correctness direction) and the captured rows of the padded test batch."""
    tokens, T = padded_batch(pad)
    eng = SecondOrderEngine(model, correctness_dir=torch.ones(model.cfg.d_model))
    rows = capture_batch(model, tokens, T, range(model.cfg.n_layers))
    return eng, rows, T, torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12])


@pytest.mark.parametrize("arch", ARCHS)
def test_per_head_breakdown_sums_to_projection(arch, tiny_models):
    eng, rows, T, ans, alt = _engine_and_rows(tiny_models[arch], 4)
    model = tiny_models[arch]
    neurons = torch.tensor([3, 9])
    ph = eng.per_head(rows, T, ans, alt, 1, neurons)  # [b, D, n, L, H]
    assert ph[..., :2, :].abs().max() == 0
    proj = eng.projected(rows, T, ans, alt, layers=[1])["second"][:, :, 0][:, :, neurons]
    torch.testing.assert_close(ph.sum((-1, -2)), proj, atol=1e-6, rtol=1e-5)


def test_input_validation(tiny_models):
    model = tiny_models["gpt2"]
    tokens, T = padded_batch()
    with pytest.raises(ValueError, match="out of range"):
        second_order_effects(model, tokens, T, 9)
    with pytest.raises(ValueError, match="answer_pos"):
        second_order_effects(model, tokens, torch.tensor([1, 2]), 0)


def test_low_precision_activations_close_to_float32(tiny_dirs):
    from so2lib.engine.models import load_model
    m32 = load_model(tiny_dirs["gpt2"], device="cpu")
    m16 = load_model(tiny_dirs["gpt2"], device="cpu", dtype="bfloat16")
    tokens, T = padded_batch()
    a = second_order_effects(m32, tokens, T, 0)
    b = second_order_effects(m16, tokens, T, 0)
    assert b.dtype == torch.float32
    assert rel_err(b, a) < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_projected_effects_equal_projected_full_vectors(arch, tiny_models):
    from so2lib import projected_effects
    from so2lib.engine.capture import final_normed
    model = tiny_models[arch]
    tokens, T = padded_batch(5)
    g = torch.Generator().manual_seed(2)
    dirs = torch.randn(4, 3, model.cfg.d_model, generator=g)  # per-problem directions
    out = projected_effects(model, tokens, T, dirs, layers=[0, 2])
    assert out["second"].shape == (4, 3, 2, model.cfg.d_mlp) == out["direct"].shape
    rows = capture_batch(model, tokens, T, [0, 2])
    for j, l in enumerate([0, 2]):
        vec = second_order_effects(model, tokens, T, l)  # [b, n, dm]
        for r in range(4):
            normed = final_normed(vec[r], rows.final_scale[r].expand(vec.shape[1]), model)
            torch.testing.assert_close(out["second"][r, :, j], dirs[r] @ normed.T, atol=1e-5, rtol=1e-4)
    shared = projected_effects(model, tokens, T, dirs[0], layers=[1])
    torch.testing.assert_close(shared["second"][0], projected_effects(model, tokens, T, dirs[:, :, :] * 0 + dirs[0], layers=[1])["second"][0])


def test_second_order_effects_reuses_its_engine(tiny_models):
    from so2lib.engine.second_order import engine_for
    model = tiny_models["llama"]
    tokens, T = padded_batch()
    second_order_effects(model, tokens, T, 0, [1])
    eng = engine_for(model)
    second_order_effects(model, tokens, T, 1, [1])
    assert engine_for(model) is eng and (0, 1) in eng._prod and (1, 2) in eng._prod


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_direction_path_equals_the_per_problem_path(arch, tiny_models):
    """A direction the same for every problem takes the shared path (weight side formed once);
    one problem at a time takes the per-problem path: the effects agree."""
    import dataclasses

    model = tiny_models[arch]
    tokens, T = padded_batch(2)
    eng = SecondOrderEngine(model, correctness_dir=torch.randn(model.cfg.d_model,
                                                               generator=torch.Generator().manual_seed(2)))
    rows = capture_batch(model, tokens, T, range(model.cfg.n_layers))
    ans, alt = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12])
    dirs = eng.directions(ans, alt)
    batch = eng.project(rows, T, dirs)
    for i in range(len(T)):
        one = dataclasses.replace(
            rows, mlp_post={l: v[i:i + 1] for l, v in rows.mlp_post.items()}, pattern=rows.pattern[i:i + 1],
            scale=rows.scale[i:i + 1], final_scale=rows.final_scale[i:i + 1], final_resid=rows.final_resid[i:i + 1],
            attn_out_scale=None if rows.attn_out_scale is None else rows.attn_out_scale[i:i + 1],
            mlp_out_scale={l: v[i:i + 1] for l, v in rows.mlp_out_scale.items()})
        single = eng.project(one, T[i:i + 1], dirs[i:i + 1])
        for k in ("second", "direct"):
            torch.testing.assert_close(batch[k][i:i + 1], single[k], atol=1e-6, rtol=1e-5)
        if i == 1:  # planted: another problem's effects are not these
            assert not torch.allclose(batch["second"][:1, 1], single["second"][:, 1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_projection_of_chosen_neurons_equals_the_full_projection(arch, tiny_models):
    eng, rows, T, ans, alt = _engine_and_rows(tiny_models[arch])
    idx = torch.tensor([3, 0, 17])
    full = eng.projected(rows, T, ans, alt)
    some = eng.projected(rows, T, ans, alt, neurons=idx)
    for k in ("second", "direct"):
        assert some[k].shape[-1] == 3
        torch.testing.assert_close(some[k], full[k][..., idx], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(some[k], full[k][..., idx.flip(0)])  # planted: another order differs
