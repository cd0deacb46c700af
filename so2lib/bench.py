"""Benchmark: the second-order engine against a plain forward pass and a naive per-neuron
ablation baseline, and its memory on a billion-parameter shape.

    python -m so2lib.bench                       # everything below, CPU (about 10 min on 2 cores)
    python -m so2lib.bench --device cuda --models gpt2-small-shaped --problems 5000 --batch-size 250 \
        --llama-dtype bfloat16 --llama-8b --llama-problems 64 --max-memory 8GiB   # on a GPU

Sections (all in one run):

- **projected** (per model): projected second-order + direct effects of *every* neuron of
  *every* layer on the logit difference and the correctness direction, forward passes
  included; the same problems through a plain forward pass (ratio = engine / forward time); and
  the naive baseline, one frozen-path ablation forward pass per neuron (patterns, q/k, norm
  scales and later MLPs frozen, neuron scaled), timed on a sample of neurons.
- **public API** (GPT-2-small shape): ``so2lib.projected_effects`` on all problems in one call,
  sub-batched by the engine's default budget.
- **full vectors** (GPT-2-small shape): ``second_order_effects`` for all neurons of layer 0 on
  one batch against the naive per-neuron ablation of the same batch (one forward each),
  extrapolated from a sample of neurons: the ratio.
- **bfloat16**: the projected effects of a bfloat16 copy against float32 (relative error).
- **memory** (random Llama-3.2-1B shape: 16 layers, d_model 2048, d_mlp 8192, 32 heads, 8 KV
  heads, so2lib's 2,107-token vocabulary; with ``--llama-8b`` also a Llama-3-8B shape: 32
  layers, d_model 4096, d_mlp 14336), in a fresh process: peak memory of loading and of
  all-neuron projected effects (``so2lib.projected_effects``) under a ``max_memory`` budget,
  against the resident model + budget (process RSS on CPU, allocated GPU memory on CUDA).

The GPT-2-small-shaped model is randomly initialised (12 layers, d_model 768, d_mlp 3072, 12
heads) and reads the few-shot prompts; the embedded model reads its compact prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from so2lib.data.labels import encode
from so2lib.data.tasks import Template, make_problem_set
from so2lib.engine.bruteforce import _clean_run, frozen_path_effect
from so2lib.engine.capture import capture_batch
from so2lib.engine.models import load_model
from so2lib.engine.second_order import SecondOrderEngine, engine_for, second_order_effects


def gpt2_small_shaped(folder: Path, seed: int = 0) -> Path:
    """Write a randomly initialised GPT-2-small-shaped model with so2lib's tokenizer to ``folder``."""
    import transformers

    from so2lib.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=768, n_layer=12, n_head=12,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _fixed_direction(d_model: int) -> torch.Tensor:
    """A stand-in correctness direction, the same in every process (seeded)."""
    return torch.randn(d_model, generator=torch.Generator().manual_seed(0))


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
                device: str, label: str, approximations: bool = True) -> dict[str, Any]:
    probs = make_problem_set(n_problems, 0, seed=0, heldout=False).train
    enc = encode(model, probs, template)
    L, n_mlp = model.cfg.n_layers, model.cfg.d_mlp
    gold = enc.gold
    alt = (gold + 1) % model.cfg.d_vocab  # any fixed alternative: cost does not depend on it
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # ---- engine: all neurons, all layers, both projections
    t_setup = time.perf_counter()
    engine = SecondOrderEngine(model, correctness_dir=_fixed_direction(model.cfg.d_model))
    _sync(device)
    t_setup = time.perf_counter() - t_setup
    t_engine, exact = _time_engine(engine, model, enc, gold, alt, batch_size, device, f"engine {label}")
    peak_engine = _peak_mb(device)
    # ---- plain forward passes over the same batches
    t0 = time.perf_counter()
    for _, x, T in enc.batches(batch_size, device=device, desc=None):
        model(x)
    _sync(device)
    t_forward = time.perf_counter() - t0
    # ---- opt-in approximations on the same problems: error against exact, speed-up
    approx = {}
    if approximations:
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
        "forward_s": round(t_forward, 3), "engine_over_forward": round(t_engine / t_forward, 2),
        "engine_problems_per_s": round(n_problems / t_engine, 2),
        "engine_neuron_problems_per_s": round(engine_rate),
        "naive_neurons_timed": len(sample), "naive_s": round(t_naive, 3),
        "naive_neuron_problems_per_s": round(naive_rate),
        "ratio": round(engine_rate / naive_rate, 1),
        "engine_all_neurons_5000_problems_est_s": round(5000 / (n_problems / t_engine), 1),
        "approximations": approx,
        "peak_memory_mb": round(peak_engine, 1), "peak_memory_kind": "CUDA allocated" if device.startswith("cuda") else "process RSS",
    }


LLAMA_SHAPES = {  # hidden, intermediate, layers, heads, key/value heads
    "1b": (2048, 8192, 16, 32, 8),   # Llama-3.2-1B
    "8b": (4096, 14336, 32, 32, 8),  # Llama-3-8B
}


def llama_shaped(folder: Path, shape: str = "1b", n_layers: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """Write a randomly initialised Llama-shaped model (:data:`LLAMA_SHAPES`; ``n_layers`` of its
    layers, default all) with so2lib's tokenizer to ``folder``. ``device`` is where the random
    weights are drawn (a GPU draws an 8B shape in seconds)."""
    import transformers

    from so2lib.data.tokenizer import build_tokenizer

    d, f, L, H, kv = LLAMA_SHAPES[shape]
    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=f,
                                   num_hidden_layers=n_layers or L, num_attention_heads=H, num_key_value_heads=kv,
                                   max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                   tie_word_embeddings=True)
    with torch.device(device):
        m = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    m.save_pretrained(folder)
    del m
    tok.save_pretrained(folder)
    return folder


def llama_1b_shaped(folder: Path, n_layers: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A Llama-3.2-1B shape with ``n_layers`` layers (see :func:`llama_shaped`)."""
    return llama_shaped(folder, "1b", n_layers, seed, dtype)


@torch.no_grad()
def bench_public(model: Any, template: Template, n_problems: int, device: str) -> dict[str, Any]:
    """``so2lib.projected_effects`` on the whole problem set in one call, with the engine's
    default budget (it picks its own sub-batches): seconds, and the sub-batch it chose."""
    from so2lib.engine.second_order import projected_effects

    probs = make_problem_set(n_problems, 0, seed=0, heldout=False).train
    enc = encode(model, probs, template)
    _, x, T = next(iter(enc.batches(n_problems, device=device, desc=None)))
    eng = SecondOrderEngine(model, correctness_dir=_fixed_direction(model.cfg.d_model))
    U = eng.directions(enc.gold.to(eng.device), (enc.gold.to(eng.device) + 1) % model.cfg.d_vocab)
    _sync(device)
    t0 = time.perf_counter()
    out = projected_effects(model, x, T, U, engine=eng)
    _sync(device)
    t = time.perf_counter() - t0
    assert out["second"].shape == (n_problems, U.shape[1], model.cfg.n_layers, model.cfg.d_mlp)
    return {"problems": n_problems, "seconds": round(t, 3), "budget_mb": round(eng.max_memory / 2**20),
            "rows_per_batch": eng.rows_per_batch(int(T.max()) + 1)}


@torch.no_grad()
def bench_full_vectors(model: Any, template: Template, n_problems: int, naive_neurons: int, device: str,
                       layer: int = 0) -> dict[str, Any]:
    """All neurons of ``layer``: ``second_order_effects`` on one batch of ``n_problems`` against one
    naive frozen-path ablation forward pass per neuron on the same batch (sampled, extrapolated)."""
    probs = make_problem_set(n_problems, 0, seed=1, heldout=False).train
    enc = encode(model, probs, template)
    _, x, T = next(iter(enc.batches(n_problems, device=device, desc=None)))
    n_mlp = model.cfg.d_mlp
    t0 = time.perf_counter()
    eng = engine_for(model)
    second_order_effects(model, x, T, layer)
    _sync(device)
    t_cold = time.perf_counter() - t0  # includes building the engine (self-check + products)
    t0 = time.perf_counter()
    v = second_order_effects(model, x, T, layer)
    _sync(device)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    model(x)
    _sync(device)
    t_fwd = time.perf_counter() - t0
    clean = _clean_run(model, x)
    g = torch.Generator().manual_seed(0)
    sample = torch.randint(0, n_mlp, (naive_neurons,), generator=g).tolist()
    t0 = time.perf_counter()
    for n in sample:
        frozen_path_effect(model, x, T, layer, n, None, clean=clean, direct=False)
    _sync(device)
    t_naive = (time.perf_counter() - t0) / len(sample) * n_mlp
    assert v.shape == (len(T), n_mlp, model.cfg.d_model) and eng is engine_for(model)
    return {"layer": layer, "problems": len(T), "neurons": n_mlp, "mean_prompt_tokens": round(float(T.float().mean()) + 1, 1),
            "engine_first_call_s": round(t_cold, 3), "engine_s": round(t_warm, 3), "forward_s": round(t_fwd, 3),
            "engine_over_forward": round(t_warm / t_fwd, 2),
            "naive_neurons_timed": len(sample), "naive_all_neurons_est_s": round(t_naive, 1),
            "ratio": round(t_naive / t_warm, 1), "ratio_first_call": round(t_naive / t_cold, 1)}


@torch.no_grad()
def bench_low_precision(folder: Path, template: Template, n_problems: int, device: str,
                        dtype: str = "bfloat16") -> dict[str, Any]:
    """Projected all-neuron effects of a ``dtype`` copy of the model against float32 (activations
    accumulate in float32 either way): relative error of second-order and direct effects."""
    out = {}
    for dt in ("float32", dtype):
        m = load_model(folder, device, dt)
        probs = make_problem_set(n_problems, 0, seed=2, heldout=False).train
        enc = encode(m, probs, template)
        _, x, T = next(iter(enc.batches(n_problems, device=device, desc=None)))
        gold = enc.gold.to(device)
        eng = SecondOrderEngine(m)
        rows = capture_batch(m, x, T, range(m.cfg.n_layers))
        t0 = time.perf_counter()
        out[dt] = eng.projected(rows, T, gold, (gold + 1) % m.cfg.d_vocab)
        out[dt + "_s"] = time.perf_counter() - t0
        del m, eng
    err = {k: round(float((out[dtype][k] - out["float32"][k]).norm() / out["float32"][k].norm()), 5)
           for k in ("second", "direct")}
    return {"dtype": dtype, "problems": n_problems, "rel_error_second": err["second"], "rel_error_direct": err["direct"]}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    return _status_mb("VmHWM")


def _current_rss_mb() -> float:
    return _status_mb("VmRSS")


@torch.no_grad()
def memory_worker(folder: str, n_problems: int, max_memory: str, dtype: str, device: str = "cpu",
                  process_on: str | None = None, save: str | None = None) -> dict[str, Any]:
    """Run in a fresh process: peak memory of loading, then of all-neuron projected effects
    (:func:`so2lib.projected_effects`, which sizes its sub-batches from ``max_memory``).

    On CPU the memory is the process's RSS; on CUDA it is what torch allocated on the GPU
    (``max_memory_allocated``), with the CPU RSS of loading besides. ``process_on`` goes to
    :func:`load_model`; ``save`` writes the logits at T and the second-order effects (to compare
    loads)."""
    from so2lib.engine.second_order import projected_effects

    cuda = device.startswith("cuda")
    base = _rss_mb()
    t0 = time.perf_counter()
    model = load_model(folder, device, dtype, process_on=process_on)
    _sync(device)
    t_load = time.perf_counter() - t0
    rss_load = _rss_mb()
    if cuda:
        peak_load, resident = torch.cuda.max_memory_allocated() / 2**20, torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_load, resident = rss_load, _current_rss_mb()
        try:  # reset the peak so that the effects' own peak is measured, not the loading peak
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    probs = make_problem_set(n_problems, 0, seed=0, heldout=False).train
    enc = encode(model, probs, Template("fewshot", n_shots=3))
    t0 = time.perf_counter()
    eng = SecondOrderEngine(model, correctness_dir=_fixed_direction(model.cfg.d_model), max_memory=max_memory)
    _, x, T = next(iter(enc.batches(n_problems, device=device, desc=None)))
    gold = enc.gold.to(eng.device)
    U = eng.directions(gold, (gold + 1) % model.cfg.d_vocab)  # [b, 2, d_model]: logit difference, correctness
    out = projected_effects(model, x, T, U, engine=eng)
    _sync(device)
    t_eff = time.perf_counter() - t0
    assert out["second"].shape == (n_problems, 2, model.cfg.n_layers, model.cfg.d_mlp)
    assert bool(out["second"].isfinite().all())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
    budget_mb = eng.max_memory / 2**20
    if save:
        logits = model(x[:8])[torch.arange(min(8, len(T))), T[:8]].float().cpu()
        torch.save({"logits": logits, "second": out["second"][:8].cpu()}, save)
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "memory": "CUDA allocated" if cuda else "process RSS",
            "layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "d_mlp": model.cfg.d_mlp,
            "neurons": model.cfg.n_layers * model.cfg.d_mlp, "dtype": dtype, "problems": n_problems,
            "prompt_tokens": int(T.max()) + 1, "rows_per_batch": eng.rows_per_batch(int(T.max()) + 1),
            "processed_on": getattr(model, "so2lib_processed_on", None),
            "interpreter_mb": round(base), "weights_mb": round(weights_mb), "load_s": round(t_load, 1),
            "peak_after_load_mb": round(peak_load), "cpu_rss_peak_load_mb": round(rss_load),
            "resident_after_load_mb": round(resident),
            "load_peak_over_weights": round(peak_load / weights_mb, 2),
            "budget_mb": round(budget_mb), "cached_products_mb": round(eng._prod_bytes / 2**20),
            "effects_s": round(t_eff, 1), "peak_after_effects_mb": round(peak),
            "peak_over_resident_mb": round(peak - resident),
            "within_resident_plus_budget": bool(peak <= resident + budget_mb)}


def bench_memory(shape: str, n_layers: int | None, n_problems: int, max_memory: str, dtype: str,
                 device: str = "cpu", process_on: tuple[str, ...] = ("auto",)) -> list[dict[str, Any]]:
    """Write a random Llama shape (drawn on ``device``), then measure it in a fresh process per
    ``process_on`` value (``"auto"``, ``"device"``, ``"cpu"``: see :func:`load_model`); later
    values also report their logits' and effects' relative difference from the first."""
    import shutil

    d, f, L, H, kv = LLAMA_SHAPES[shape]
    size = (n_layers or L) * (d * d * (2 + 2 * kv / H) + 3 * d * f) * _torch_dtype(dtype).itemsize
    shm = Path("/dev/shm")  # RAM-backed: an 8B shape is written and read back in seconds
    tmp = shm if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * size else Path(tempfile.gettempdir())
    root = Path(tempfile.mkdtemp(dir=tmp))
    folder = root / f"llama{shape}"
    t0 = time.perf_counter()
    llama_shaped(folder, shape, n_layers, dtype=_torch_dtype(dtype), device=device)
    t_write = time.perf_counter() - t0
    results, first = [], None
    try:
        for k, where in enumerate(process_on):
            save = root / f"out{k}.pt"
            cmd = [sys.executable, "-m", "so2lib.bench", "--memory-worker", str(folder), "--problems", str(n_problems),
                   "--max-memory", max_memory, "--dtype", dtype, "--device", device, "--save", str(save)]
            if where != "auto":
                cmd += ["--process-on", where]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"memory worker failed: {r.stderr[-3000:]}")
            out = json.loads(r.stdout.strip().splitlines()[-1])
            out.update(shape=f"Llama-{shape}", process_on=where, write_random_model_s=round(t_write, 1))
            saved = torch.load(save)
            if first is None:
                first = saved
            else:
                for key in ("logits", "second"):
                    out[f"{key}_rel_diff_vs_{process_on[0]}"] = float((saved[key] - first[key]).norm() / first[key].norm().clamp_min(1e-30))
            results.append(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- the peer


@torch.no_grad()
def bench_peer(model: Any, template: Template, n_problems: int, batch_size: int, device: str,
               label: str, repeats: int = 2) -> dict[str, Any]:
    """so2lib against the exact-path attribution-patching peer (:mod:`so2lib.engine.peer`) on the same
    batches: projected second-order + direct effects of every neuron of every layer on the two
    built-in directions (logit difference to a fixed alternative, a fixed correctness
    direction), capture included. Each side is timed ``repeats`` times (best kept, interleaved),
    on prompts cut after their answer position; agreement is the largest absolute difference."""
    from so2lib.engine.peer import attribution_patching

    probs = make_problem_set(n_problems, 0, seed=0, heldout=False).train
    enc = encode(model, probs, template)
    L = model.cfg.n_layers
    from so2lib.data.labels import label as label_problems
    lab = label_problems(model, enc, batch_size, progress=False)  # the study's readout: gold vs the best other token
    gold, alt = torch.tensor(lab.gold_token.values), torch.tensor(lab.alt_token.values)
    eng = SecondOrderEngine(model, correctness_dir=_fixed_direction(model.cfg.d_model))
    batches = [(r, x[:, :int(T.max()) + 1], T) for r, x, T in enc.batches(batch_size, device=device, desc=None)]
    t_so, t_peer, diff, scale = [], [], {"second": 0.0, "direct": 0.0}, {"second": 0.0, "direct": 0.0}
    c_so, c_peer = [], []  # process CPU seconds (less disturbed than wall time on a shared machine)
    for rep in range(repeats):
        so_out, peer_out = [], []
        t0, c0 = time.perf_counter(), time.process_time()
        for r, x, T in batches:
            rows = capture_batch(model, x, T, range(L))
            so_out.append(eng.projected(rows, T, gold[r.start:r.stop], alt[r.start:r.stop]))
            del rows
        _sync(device)
        t_so.append(time.perf_counter() - t0)
        c_so.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        for r, x, T in batches:
            U = eng.directions(gold[r.start:r.stop].to(eng.device), alt[r.start:r.stop].to(eng.device))
            peer_out.append(attribution_patching(model, x, T, U))
        _sync(device)
        t_peer.append(time.perf_counter() - t0)
        c_peer.append(time.process_time() - c0)
    for a_, b_ in zip(so_out, peer_out):
        for k in diff:
            diff[k] = max(diff[k], float((a_[k] - b_[k]).abs().max()))
            scale[k] = max(scale[k], float(a_[k].abs().max()))
    t0 = time.perf_counter()
    for _, x, T in batches:
        model(x)
    _sync(device)
    t_fwd = time.perf_counter() - t0
    return {"model": label, "device": device, "problems": n_problems, "batch_size": batch_size,
            "directions": 2, "layers": L, "d_mlp": model.cfg.d_mlp,
            "so2lib_s": round(min(t_so), 3), "peer_s": round(min(t_peer), 3), "forward_s": round(t_fwd, 3),
            "speedup": round(min(t_peer) / min(t_so), 2),
            "so2lib_over_forward": round(min(t_so) / t_fwd, 2), "peer_over_forward": round(min(t_peer) / t_fwd, 2),
            "max_abs_diff_second": diff["second"], "max_abs_diff_direct": diff["direct"],
            "max_abs_second": scale["second"], "max_abs_direct": scale["direct"],
            "all_so2lib_s": [round(t, 3) for t in t_so], "all_peer_s": [round(t, 3) for t in t_peer],
            "so2lib_cpu_s": round(min(c_so), 3), "peer_cpu_s": round(min(c_peer), 3),
            "speedup_cpu_time": round(min(c_peer) / min(c_so), 2), "load": _load()}


# ----------------------------------------------------------------------------- the pipeline


def fpe_table(timings: dict[str, float], forward_s: float, n_layers: int,
              phases: dict[str, str] | None = None) -> "pd.DataFrame":
    """Steps sorted by cost: ``step``, ``phase``, ``seconds``, ``fpe`` (seconds / one plain
    forward pass over the run's problems) and ``share`` of the whole. ``attrs`` hold the total,
    the budget ``n_layers + 30`` and whether the total is within it."""
    import pandas as pd

    phases = phases or {}
    df = pd.DataFrame({"step": list(timings), "phase": [phases.get(k, "") for k in timings],
                       "seconds": [float(v) for v in timings.values()]})
    df["fpe"] = df.seconds / forward_s
    total = float(df.seconds.sum())
    df["share"] = df.seconds / total if total > 0 else 0.0
    df = df.sort_values("seconds", ascending=False, kind="stable").reset_index(drop=True)
    df.attrs.update({"total_fpe": float(df.fpe.sum()), "budget_fpe": n_layers + 30,
                     "within_budget": float(df.fpe.sum()) <= n_layers + 30, "forward_s": forward_s})
    return df


def _step_phase(manifest: dict[str, Any], step: str) -> str:
    arts = manifest.get("artifacts", {})
    if step in arts:
        return str(arts[step].get("phase") or "")
    if step.startswith("effects_"):
        return "02"
    return next((str(e.get("phase")) for n, e in arts.items() if n.startswith(step) and e.get("phase")), "")


@torch.no_grad()
def forward_seconds(setup: Any, repeats: int = 3) -> float:
    """Seconds of one plain forward pass over the run's training and validation problems
    (teacher-forced prompts and answers, as labelling reads them) in the run's batch size, on
    its device and dtype: the median of ``repeats`` passes."""
    model = setup.model
    dev = next(model.parameters()).device
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in ("train", "val"):
            for _, x, _T in setup.prompt_enc[s].batches(setup.batch_size, with_answer=True, device=dev):
                model(x)
        _sync(str(dev))
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def pipeline(run_dir: str, model: str | None, params: dict[str, Any], run: bool = True) -> dict[str, Any]:
    """Run the five notebooks (``so2lib.runs.runner``) into ``run_dir`` unless ``run`` is False, then
    time one plain forward pass over its problems in this process and express every recorded
    step (manifest ``timings``) and notebook in forward-pass equivalents; records the result as
    the manifest's ``fpe`` entry and returns it."""
    from so2lib.phases.study import open_run
    from so2lib.runs import runner
    from so2lib.runs.rundir import Run

    if run:
        runner.run_all(run_dir, model, params)
    m = json.loads((Path(run_dir) / "manifest.json").read_text())
    cfg = m["config"]
    # the batch size each batched step ran with (the manifest records it per artifact, not per run)
    bs = params.get("batch_size") or m["artifacts"].get("labels_train", {}).get("params", {}).get("batch_size")
    setup = open_run(run_dir, model, n_train=cfg["n_train"], n_val=cfg["n_val"], seed=cfg["seed"],
                     device=cfg.get("device"), dtype=cfg.get("dtype"), progress=False,
                     **({"batch_size": int(bs)} if bs else {}))
    fwd = forward_seconds(setup)
    m = json.loads((Path(run_dir) / "manifest.json").read_text())
    timings = {k: v for k, v in m["timings"].items()}
    L = setup.model.cfg.n_layers
    phases = {k: _step_phase(m, k) for k in timings}
    steps = fpe_table(timings, fwd, L, phases)
    nbs = m.get("notebook_seconds", {})
    other = {}
    for nb, sec in nbs.items():
        inside = float(steps[steps.phase == nb[:2]].seconds.sum())
        other[nb] = round(max(0.0, sec - inside), 3)  # model loading, kernel start, tables, figures
    out = {"forward_s": round(fwd, 4), "n_layers": L, "budget_fpe": L + 30,
           "problems": len(setup.problems.train) + len(setup.problems.val), "batch_size": setup.batch_size,
           "device": str(next(setup.model.parameters()).device), "dtype": str(next(setup.model.parameters()).dtype),
           "steps_fpe": round(steps.attrs["total_fpe"], 2), "within_budget": bool(steps.attrs["within_budget"]),
           "notebook_seconds": nbs, "notebook_fpe": {k: round(v / fwd, 2) for k, v in nbs.items()},
           "notebooks_fpe": round(sum(nbs.values()) / fwd, 2), "outside_steps_s": other,
           "steps": [{"step": r.step, "phase": r.phase, "seconds": round(r.seconds, 3), "fpe": round(r.fpe, 2),
                      "share": round(r.share, 4)} for r in steps.itertuples()],
           "machine": _machine_line(), "load": _load()}
    Run(run_dir).record("fpe", out)
    return out


def bench_protocol(run_dir: str, model: str | None, n_train: int, n_val: int, layers: Sequence[int],
                   n_refit: int = 20, batch_size: int = 50) -> dict[str, Any]:
    """The CLIP protocol (:func:`so2lib.phases.protocol.run_protocol`, all neurons of ``layers``) on
    the first ``n_train`` / ``n_val`` problems of an existing run directory, without and with
    ``n_refit`` refits of the fit per layer, in one process: the seconds of each and their ratio."""
    from so2lib.phases import protocol as P
    from so2lib.phases.study import open_run

    cfg = json.loads((Path(run_dir) / "manifest.json").read_text())["config"]
    setup = open_run(run_dir, model, n_train=cfg["n_train"], n_val=cfg["n_val"], seed=cfg["seed"],
                     device=cfg.get("device"), dtype=cfg.get("dtype"), progress=False, batch_size=batch_size)
    tr, va = setup.enc["train"].subset(range(n_train)), setup.enc["val"].subset(range(n_val))
    gold = torch.tensor(setup.labels["val"].gold_token.values[:n_val])
    scopes = {l: {"all": None} for l in layers}
    out: dict[str, Any] = {"layers": list(layers), "n_train": n_train, "n_val": n_val, "n_refit": n_refit}
    # plain, with refits, plain again (the first run is cold): the faster plain run counts
    for name, kw in (("plain_s", {}), ("refit_s", {"refit": {l: n_refit for l in layers}}), ("plain_s", {})):
        t0 = time.perf_counter()
        P.run_protocol(setup.model, tr, va, gold, list(layers), scopes, 0.02, batch_size, progress=False, **kw)
        out[name] = round(min(out.get(name, float("inf")), time.perf_counter() - t0), 2)
    out["refit_over_plain"] = round(out["refit_s"] / out["plain_s"], 2)
    out["machine"], out["load"] = _machine_line(), _load()
    return out


def _machine_line() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def print_pipeline(r: dict[str, Any], top: int = 12) -> None:
    print(f"\none plain forward pass over {r['problems']} problems (batch {r['batch_size']}, {r['device']}, "
          f"{r['dtype']}): {r['forward_s']} s")
    print(f"{'step':<32} {'phase':>5} {'seconds':>9} {'FPE':>8} {'share':>6}")
    for s in r["steps"][:top]:
        print(f"{s['step']:<32} {s['phase']:>5} {s['seconds']:>9.2f} {s['fpe']:>8.2f} {100 * s['share']:>5.1f}%")
    rest = r["steps"][top:]
    if rest:
        print(f"{'(' + str(len(rest)) + ' more steps)':<32} {'':>5} {sum(s['seconds'] for s in rest):>9.2f} "
              f"{sum(s['fpe'] for s in rest):>8.2f} {100 * sum(s['share'] for s in rest):>5.1f}%")
    print(f"whole study, cached steps: {r['steps_fpe']} FPE (budget n_layers + 30 = {r['budget_fpe']}: "
          f"{'within' if r['within_budget'] else 'OVER'}); notebooks' wall time {sum(r['notebook_seconds'].values()):.1f} s "
          f"= {r['notebooks_fpe']} FPE (outside the steps: {r['outside_steps_s']})")


def _torch_dtype(name: str | None) -> torch.dtype:
    from so2lib.engine.models import _dtype
    return _dtype(name)


def _save(results: dict[str, Any], out: Path | None) -> None:
    """Write what is measured so far (a run cut short keeps its finished sections)."""
    if out is not None:
        out.write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["embedded", "gpt2-small-shaped"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--problems", type=int, default=None, help="default: 1000 embedded, 64 GPT-2-shaped on CPU")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--naive-neurons", type=int, default=8)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--no-approximations", action="store_true")
    ap.add_argument("--vector-problems", type=int, default=32, help="batch for the full-vector ratio")
    ap.add_argument("--llama-layers", type=int, default=16, help="layers of the Llama-3.2-1B shape (0: skip)")
    ap.add_argument("--llama-8b", action="store_true", help="also a Llama-3-8B shape (32 layers; GPU-sized)")
    ap.add_argument("--llama-problems", type=int, default=16)
    ap.add_argument("--llama-dtype", default="float32")
    ap.add_argument("--max-memory", default="1GiB", help="engine budget for the Llama shapes")
    ap.add_argument("--llama-process-on", nargs="+", default=["auto"], choices=["auto", "device", "cpu"],
                    help="where loading processes the weights (load_model's process_on); several: compare")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--process-on", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--pipeline", action="store_true",
                    help="run the five notebooks and give every step's wall time and forward-pass equivalents")
    ap.add_argument("--run-dir", default=None, help="--pipeline: run directory (default: a new temporary one)")
    ap.add_argument("--model", default=None, help="--pipeline: model name (default: the embedded model)")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="--pipeline: notebook parameter, as for so2lib.runs.runner")
    ap.add_argument("--no-run", action="store_true", help="--pipeline: only measure an existing run directory")
    ap.add_argument("--protocol", default=None, metavar="LAYERS",
                    help="only the CLIP protocol with and without refits on --run-dir's first --problems "
                         "training (and half as many validation) problems, source layers e.g. 0,11")
    ap.add_argument("--peer", action="store_true",
                    help="only so2lib against the attribution-patching peer (--models, --problems, --batch-size)")
    a = ap.parse_args(argv)
    if a.pipeline:
        from so2lib.runs.runner import _value
        params = {k: _value(v) for k, v in a.param}
        params.setdefault("zero_ablation", False)
        run_dir = a.run_dir or tempfile.mkdtemp(prefix="so2lib-pipeline-")
        r = pipeline(run_dir, a.model, params, run=not a.no_run)
        print_pipeline(r)
        _save(r, a.out)
        return r
    if a.protocol:
        n = a.problems or 200
        r = bench_protocol(a.run_dir, a.model, n, max(1, n // 2), [int(x) for x in a.protocol.split(",")])
        print(json.dumps(r, indent=1), flush=True)
        _save(r, a.out)
        return r
    if a.peer:
        rs = []
        for name in a.models:
            if name == "gpt2-small-shaped":
                model, tmpl = load_model(gpt2_small_shaped(Path(tempfile.mkdtemp())), a.device, a.dtype), Template("fewshot", n_shots=3)
            else:
                model, tmpl = load_model(None if name == "embedded" else name, a.device, a.dtype), Template("compact")
            n = a.problems or (1000 if name == "embedded" else 64)
            r = bench_peer(model, tmpl, n, a.batch_size, a.device, name)
            print(json.dumps(r, indent=1), flush=True)
            rs.append(r)
        _save({"peer": rs, "machine": _machine_line(), "load": _load()}, a.out)
        return {"peer": rs}
    if a.memory_worker:
        r = memory_worker(a.memory_worker, a.problems or 16, a.max_memory, a.dtype or "float32", a.device,
                          a.process_on, a.save)
        print(json.dumps(r))
        return r
    results: dict[str, Any] = {"projected": []}
    cuda = a.device.startswith("cuda")
    machine = torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    results["machine"] = machine
    for name in a.models:
        if name == "gpt2-small-shaped":
            folder = gpt2_small_shaped(Path(tempfile.mkdtemp()))
            model, tmpl = load_model(folder, a.device, a.dtype), Template("fewshot", n_shots=3)
            n = a.problems or (2000 if cuda else 64)
        else:
            model, tmpl = load_model(None if name == "embedded" else name, a.device, a.dtype), Template("compact")
            n = a.problems or (5000 if cuda else 1000)
        r = bench_model(model, tmpl, n, a.batch_size, a.naive_neurons, a.device, name, not a.no_approximations)
        r["machine"] = machine
        results["projected"].append(r)
        print(json.dumps(r, indent=1), flush=True)
        _save(results, a.out)
        results.setdefault("peer", []).append(bench_peer(model, tmpl, n, a.batch_size, a.device, name))
        print(json.dumps(results["peer"][-1], indent=1), flush=True)
        _save(results, a.out)
        if name == "gpt2-small-shaped":
            results["public_api"] = bench_public(model, tmpl, n, a.device)
            print(json.dumps(results["public_api"], indent=1), flush=True)
            _save(results, a.out)
            results["full_vectors"] = bench_full_vectors(model, tmpl, a.vector_problems, a.naive_neurons, a.device)
            print(json.dumps(results["full_vectors"], indent=1), flush=True)
            _save(results, a.out)
            del model
            results["low_precision"] = [bench_low_precision(folder, tmpl, 16, a.device, dt)
                                        for dt in (("bfloat16", "float16") if cuda else ("bfloat16",))]
            print(json.dumps(results["low_precision"], indent=1), flush=True)
            _save(results, a.out)
    shapes = ([("1b", a.llama_layers)] if a.llama_layers else []) + ([("8b", None)] if a.llama_8b else [])
    for shape, n_layers in shapes:
        rs = bench_memory(shape, n_layers, a.llama_problems, a.max_memory, a.llama_dtype, a.device,
                          tuple(a.llama_process_on))
        results.setdefault("memory", []).extend(rs)
        print(json.dumps(rs, indent=1), flush=True)
        _save(results, a.out)
    print("\nmodel              | problems/s | engine/forward | neuron-problems/s (engine) | naive  | ratio")
    for r in results["projected"]:
        print(f"{r['model']:<18} | {r['engine_problems_per_s']:>10} | {r['engine_over_forward']:>14} | "
              f"{r['engine_neuron_problems_per_s']:>26,} | {r['naive_neuron_problems_per_s']:>6,} | {r['ratio']:,}x")
    for r in results.get("peer", []):
        print(f"{r['model']}: so2lib {r['so2lib_s']} s vs attribution-patching peer {r['peer_s']} s on the same "
              f"{r['problems']} problems: {r['speedup']}x faster; agreement (max abs diff) second "
              f"{r['max_abs_diff_second']:.1e}, direct {r['max_abs_diff_direct']:.1e}")
    if "public_api" in results:
        pa = results["public_api"]
        print(f"projected_effects, all neurons x {pa['problems']} problems in one call (budget {pa['budget_mb']} MiB, "
              f"{pa['rows_per_batch']} problems per pass): {pa['seconds']} s")
    if "full_vectors" in results:
        fv = results["full_vectors"]
        print(f"full vectors, all {fv['neurons']} neurons of layer {fv['layer']}, {fv['problems']} problems: "
              f"{fv['engine_s']} s vs naive {fv['naive_all_neurons_est_s']} s: {fv['ratio']:,}x "
              f"({fv['ratio_first_call']:,}x on the first call)")
    for m in results.get("memory", []):
        print(f"{m['shape']} shape ({m['layers']} layers, {m['dtype']}, {m['memory']}, processed on {m['processed_on']}, "
              f"load {m['load_s']} s): weights {m['weights_mb']} MiB, "
              f"load peak {m['peak_after_load_mb']} MiB, resident {m['resident_after_load_mb']} MiB; all "
              f"{m['neurons']:,} neurons x {m['problems']} problems in {m['effects_s']} s, peak {m['peak_after_effects_mb']} MiB "
              f"(+{m['peak_over_resident_mb']} MiB over resident; budget {m['budget_mb']} MiB: "
              f"{'within' if m['within_resident_plus_budget'] else 'OVER'})")
    _save(results, a.out)
    return results


if __name__ == "__main__":
    main()
