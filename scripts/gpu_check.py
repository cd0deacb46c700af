"""Exactness of the engine on a device: every family against the brute force, on that device.

    python scripts/gpu_check.py cuda [out.json]

Builds the tiny random models of the test suite (GPT-2, NeoX/parallel, Llama/GQA, MQA, Gemma-2,
Gemma-3, OLMo-2, Qwen3) on ``device`` in float32 and reports, per family, the load-time
self-check's worst relative error and the relative L2 error of ``second_order_effects``
against ``brute_force_second_order`` (one frozen-path forward pass per later head) for two
neurons. The test suite runs the same comparison on the CPU; this runs it on a GPU, where the
kernels differ. Prints a table; exits 1 when an error exceeds 1e-4.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import build_tiny  # noqa: E402
from test_families import build_family, padded_batch  # noqa: E402

from so2lib.engine.bruteforce import brute_force_second_order  # noqa: E402
from so2lib.engine.models import load_model  # noqa: E402
from so2lib.engine.second_order import check_weights, second_order_effects  # noqa: E402

FAMILIES = ("gpt2", "neox", "llama", "mqa", "gemma2", "gemma3", "olmo2", "qwen3")


def main(device: str, out: str | None = None) -> int:
    root = Path(tempfile.mkdtemp())
    rows, worst = [], 0.0
    for i, fam in enumerate(FAMILIES):
        t0 = time.perf_counter()
        folder = (build_tiny if fam in ("gpt2", "neox", "llama") else build_family)(fam, root / fam)
        model = load_model(folder, device=device, dtype="float32")
        check = max(check_weights(model).values())
        tokens, T = padded_batch(i)
        tokens, T = tokens.to(device), T.to(device)
        neurons = [2, 33]
        eff = second_order_effects(model, tokens, T, 1, neurons)
        errs = []
        for j, n in enumerate(neurons):
            bf = brute_force_second_order(model, tokens, T, 1, n)
            errs.append(float((eff[:, j] - bf).norm() / bf.norm()))
        # the same model with its weights processed on the CPU and moved back (process_on="cpu")
        moved = load_model(folder, device=device, dtype="float32", process_on="cpu")
        sd, sm = model.state_dict(), moved.state_dict()
        same_keys = sd.keys() == sm.keys() and all(sm[k].device == sd[k].device for k in sd)
        w_diff = max(float((sm[k].float() - sd[k].float()).norm() / sd[k].float().norm().clamp_min(1e-30)) for k in sd)
        l_diff = float((moved(tokens) - model(tokens)).norm() / model(tokens).norm())
        e_diff = float((second_order_effects(moved, tokens, T, 1, neurons) - eff).norm() / eff.norm())
        moved_ok = same_keys and moved.so2lib_processed_on == "cpu"
        r = {"family": fam, "device": str(eff.device), "self_check": check, "engine_vs_brute_force": max(errs),
             "process_on_cpu": {"same_keys_and_devices": moved_ok, "weights_rel_diff": w_diff,
                                "logits_rel_diff": l_diff, "effects_rel_diff": e_diff},
             "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(r)
        worst = max(worst, check, max(errs), w_diff, l_diff, e_diff, 0.0 if moved_ok else 1.0)
        print(f"{fam:<7} {r['device']:<7} self-check {check:.1e}  engine vs brute force {max(errs):.1e}  "
              f"processed on CPU: weights {w_diff:.1e} logits {l_diff:.1e} effects {e_diff:.1e}"
              f"{'' if moved_ok else '  KEYS/DEVICES DIFFER'}", flush=True)
    if out:
        Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
                                         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                                         "families": rows}, indent=1))
    print(f"worst relative error {worst:.1e}: {'PASS' if worst < 1e-4 else 'FAIL'} (tolerance 1e-4)")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda", sys.argv[2] if len(sys.argv) > 2 else None))
