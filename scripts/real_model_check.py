"""Check a real named model end to end before a study: load, the engine's load-time self-check,
the engine against the brute force on a real prompt, and what the labels rest on (tokenizer,
chat template, BOS, how digits tokenize, greedy answers on a few problems).

    python scripts/real_model_check.py gemma3-270m
    python scripts/real_model_check.py smollm2-135m
"""

from __future__ import annotations

import sys
import time

import torch


def main(name: str) -> None:
    from so2lib.engine.bruteforce import brute_force_second_order
    from so2lib.data.labels import bos_ids, encode, has_chat_template, label, prompt_text
    from so2lib.engine.models import ModelInfo, load_model
    from so2lib.engine.second_order import check_weights, second_order_effects
    from so2lib.data.tasks import Template, make_problem_set

    t0 = time.perf_counter()
    model = load_model(name, device="cpu")
    print(f"loaded {name} in {time.perf_counter() - t0:.1f} s: {ModelInfo.of(model)}")
    c = model.cfg
    print("sliding window:", getattr(c, "use_local_attn", None), getattr(c, "window_size", None),
          "| attn types:", sorted(set(map(str, getattr(c, "attn_types", None) or [])))[:3])
    t0 = time.perf_counter()
    chk = check_weights(model)
    print(f"self-check (worst relative error per relation, tol 1e-3) in {time.perf_counter() - t0:.1f} s:", chk)
    tok = model.tokenizer
    print("tokenizer:", type(tok).__name__, "| chat template:", has_chat_template(tok),
          "| BOS prepended:", tok.convert_ids_to_tokens(bos_ids(model, "auto")))
    for s in (" 7", " 57", " 1234", " 98765", " true", " false"):
        print(f"  {s!r} ->", tok.convert_ids_to_tokens(tok(s, add_special_tokens=False)["input_ids"]))
    ps = make_problem_set(0, 12, seed=0).val
    tm = Template("fewshot", n_shots=3, chat=has_chat_template(tok))
    print("prompt example:", repr(prompt_text(model, ps[0], tm)[-200:]))
    enc = encode(model, ps, tm)
    print("answer tokens:", tok.convert_ids_to_tokens(enc.answer_ids[0]), "gold", repr(ps[0].answer))
    lab = label(model, enc, 8, progress=False)
    for p, ok in zip(ps, lab.correct.values):
        print(f"  {p.task:15s} {p.compact!r:32s} gold {p.answer!r:8s} correct={bool(ok)}")
    # engine against the brute force on one real prompt (the second one's right-padded batch)
    e2 = encode(model, ps[:2], tm)
    S = max(len(x) for x in e2.prompt_ids)
    tokens = torch.full((2, S), e2.pad_id)
    for i, x in enumerate(e2.prompt_ids):
        tokens[i, :len(x)] = torch.tensor(x)
    T = e2.answer_pos
    layer = c.n_layers // 2
    neurons = [3, 100]
    t0 = time.perf_counter()
    eff = second_order_effects(model, tokens, T, layer, neurons)
    for j, n in enumerate(neurons):
        bf = brute_force_second_order(model, tokens, T, layer, n)
        rel = float((eff[:, j] - bf).norm() / bf.norm().clamp_min(1e-12))
        print(f"engine vs brute force, layer {layer} neuron {n}: relative error {rel:.2e} (|bf| {float(bf.norm()):.3g})")
        assert rel < 1e-3, rel
    print(f"engine vs brute force in {time.perf_counter() - t0:.1f} s: OK")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m")
