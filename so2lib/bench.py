"""Benchmark: the second-order engine against a naive per-neuron ablation baseline.

    python -m so2lib.bench                       # embedded model + GPT-2-small-shaped model, CPU
    python -m so2lib.bench --models gpt2-small-shaped --device cuda --problems 5000

On the same problems it times

- **engine**: projected second-order + direct effects of *every* neuron of *every* layer on
  the logit difference and the correctness direction (one forward pass per batch + einsums);
- **naive**: one frozen-path ablation forward pass per neuron (patterns, norm scales and later
  MLPs frozen, neuron scaled), batched over problems, the way a straightforward port of the
  CLIP code works; timed on a sample of neurons and reported per neuron-problem.

It prints problems/s, neuron-problems/s, the ratio and peak memory. The GPT-2-small-shaped model
is randomly initialised (12 layers, d_model 768, d_mlp 3072, 12 heads; so2lib's 2,107-token
vocabulary) and reads the few-shot prompts; the embedded model reads its compact prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .bruteforce import _clean_run, frozen_path_effect
from .capture import capture_batch
from .labels import encode
from .models import load_model
from .second_order import SecondOrderEngine
from .tasks import Template, make_problem_set


def gpt2_small_shaped(folder: Path, seed: int = 0) -> Path:
    """Write a randomly initialised GPT-2-small-shaped model with so2lib's tokenizer to ``folder``."""
    import transformers

    from .tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=768, n_layer=12, n_head=12,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def _time_engine(engine: SecondOrderEngine, model: Any, enc: Any, gold: torch.Tensor, alt: torch.Tensor,
                 batch_size: int, device: str, desc: str, **kw: Any) -> tuple[float, torch.Tensor]:
    """Seconds for all neurons' projected effects over ``enc``, and the second-order values
    on the logit difference ``[problems, layers, d_mlp]`` (on CPU)."""
    L = model.cfg.n_layers
    out = []
    t0 = time.perf_counter()
    for rows_idx, x, T in enc.batches(batch_size, device=device, desc=desc):
        rows = capture_batch(model, x, T, range(L))
        proj = engine.projected(rows, T, gold[rows_idx.start:rows_idx.stop], alt[rows_idx.start:rows_idx.stop], **kw)
        out.append(proj["second"][:, 0].to("cpu", non_blocking=True))
    _sync(device)
    return time.perf_counter() - t0, torch.cat(out)


@torch.no_grad()
def bench_model(model: Any, template: Template, n_problems: int, batch_size: int, naive_neurons: int,
                device: str, label: str) -> dict[str, Any]:
    probs = make_problem_set(n_problems, 0, seed=0, heldout=False).train
    enc = encode(model, probs, template)
    L, n_mlp = model.cfg.n_layers, model.cfg.d_mlp
    gold = enc.gold
    alt = (gold + 1) % model.cfg.d_vocab  # any fixed alternative: cost does not depend on it
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # ---- engine: all neurons, all layers, both projections
    t_setup = time.perf_counter()
    engine = SecondOrderEngine(model, correctness_dir=torch.randn(model.cfg.d_model))
    _sync(device)
    t_setup = time.perf_counter() - t_setup
    t_engine, exact = _time_engine(engine, model, enc, gold, alt, batch_size, device, f"engine {label}")
    peak_engine = _peak_mb(device)
    # ---- opt-in approximations on the same problems: error against exact, speed-up
    approx = {}
    for name, kw, eng in (("low_rank_ov_r32", {}, SecondOrderEngine(model, correctness_dir=engine.correctness_dir, ov_rank=32)),
                          ("skip_below_p95", {"skip_percentile": 95.0}, engine)):
        t, vals = _time_engine(eng, model, enc, gold, alt, batch_size, device, f"{name} {label}", **kw)
        approx[name] = {"rel_error": round(float((vals - exact).norm() / exact.norm()), 5),
                        "speedup": round(t_engine / t, 2)}
    # ---- naive: one frozen-path ablation forward per neuron, on the same problems
    g = torch.Generator().manual_seed(0)
    sample = [(int(l), int(n)) for l, n in zip(torch.randint(0, L - 1, (naive_neurons,), generator=g),
                                               torch.randint(0, n_mlp, (naive_neurons,), generator=g))]
    t0 = time.perf_counter()
    for rows_idx, x, T in enc.batches(batch_size, device=device, desc=f"naive {label}"):
        clean = _clean_run(model, x)
        for l, n in sample:
            frozen_path_effect(model, x, T, l, n, None, clean=clean, direct=False)
    _sync(device)
    t_naive = time.perf_counter() - t0
    n_neurons = L * n_mlp
    engine_rate = n_problems * n_neurons / t_engine
    naive_rate = n_problems * len(sample) / t_naive
    return {
        "model": label, "device": device, "problems": n_problems, "batch_size": batch_size,
        "layers": L, "d_mlp": n_mlp, "neurons": n_neurons, "mean_prompt_tokens": round(float(enc.answer_pos.float().mean()) + 1, 1),
        "engine_setup_s": round(t_setup, 3), "engine_s": round(t_engine, 3),
        "engine_problems_per_s": round(n_problems / t_engine, 2),
        "engine_neuron_problems_per_s": round(engine_rate),
        "naive_neurons_timed": len(sample), "naive_s": round(t_naive, 3),
        "naive_neuron_problems_per_s": round(naive_rate),
        "ratio": round(engine_rate / naive_rate, 1),
        "engine_all_neurons_5000_problems_est_s": round(5000 / (n_problems / t_engine), 1),
        "approximations": approx,
        "peak_memory_mb": round(peak_engine, 1), "peak_memory_kind": "CUDA allocated" if device.startswith("cuda") else "process RSS",
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["embedded", "gpt2-small-shaped"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--problems", type=int, default=None, help="default: 1000 embedded, 64 GPT-2-shaped on CPU")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--naive-neurons", type=int, default=8)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = ap.parse_args(argv)
    results = []
    cuda = a.device.startswith("cuda")
    for name in a.models:
        if name == "gpt2-small-shaped":
            folder = gpt2_small_shaped(Path(tempfile.mkdtemp()))
            model, tmpl = load_model(folder, a.device, a.dtype), Template("fewshot", n_shots=3)
            n = a.problems or (2000 if cuda else 64)
        else:
            model, tmpl = load_model(None if name == "embedded" else name, a.device, a.dtype), Template("compact")
            n = a.problems or (5000 if cuda else 1000)
        r = bench_model(model, tmpl, n, a.batch_size, a.naive_neurons, a.device, name)
        r["machine"] = torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
    print("\nmodel              | problems/s | neuron-problems/s (engine) | naive  | ratio")
    for r in results:
        print(f"{r['model']:<18} | {r['engine_problems_per_s']:>10} | {r['engine_neuron_problems_per_s']:>26,} | "
              f"{r['naive_neuron_problems_per_s']:>6,} | {r['ratio']:,}x")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
