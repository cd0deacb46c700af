import pytest
import torch

from so2lib.engine.capture import answer_activations, capture_batch, final_normed
from so2lib.data.labels import encode
from so2lib.data.tasks import make_problem_set

from conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_full_cache_rows(arch, tiny_models):
    model = tiny_models[arch]
    tokens = torch.randint(2, 300, (3, 8))
    T = torch.tensor([7, 4, 2])
    rows = capture_batch(model, tokens, T, [0, 2], want_logits=True)
    logits, cache = model.run_with_cache(tokens)
    ar = torch.arange(3)
    assert set(rows.mlp_post) == {0, 2}
    torch.testing.assert_close(rows.mlp_post[2], cache["blocks.2.mlp.hook_post"])
    for l in range(model.cfg.n_layers):
        torch.testing.assert_close(rows.pattern[:, l], cache[f"blocks.{l}.attn.hook_pattern"][ar, :, T])
        torch.testing.assert_close(rows.scale[:, l], cache[f"blocks.{l}.ln1.hook_scale"][..., 0])
    torch.testing.assert_close(rows.final_resid, cache["ln_final.hook_in"][ar, T])
    torch.testing.assert_close(rows.logits, logits[ar, T])
    # the final normalized residual reproduces the logits through W_U
    normed = final_normed(rows.final_resid, rows.final_scale, model)
    torch.testing.assert_close(normed @ model.W_U + model.b_U, logits[ar, T], atol=1e-4, rtol=1e-4)


def test_answer_activations_over_a_problem_set(tiny_models):
    model = tiny_models["llama"]
    enc = encode(model, make_problem_set(20, 0, seed=2).train)
    a = answer_activations(model, enc, [1, 3], batch_size=6, progress=False)
    assert a["mlp_post_T"].shape == (20, 2, model.cfg.d_mlp)
    x, T = enc.batch([5])
    _, cache = model.run_with_cache(x)
    torch.testing.assert_close(a["mlp_post_T"][5, 1], cache["blocks.3.mlp.hook_post"][0, T[0]])
