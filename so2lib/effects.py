"""Phase 2 over a whole problem set: projected effects of every neuron, full vectors of the
selected ones, streamed to disk batch by batch and resumable.

Arrays written under the run directory (``.npy``, memory-mappable):

- ``{split}_second_ld``, ``{split}_second_cd``, ``{split}_direct_ld``, ``{split}_direct_cd``:
  ``[problems, layers, d_mlp]`` float32, second-order / direct effects projected on the answer
  logit difference (``ld``) and on the correctness direction (``cd``), in logit units;
- ``{split}_vectors_L{l}``: ``[problems, n_selected, d_model]`` float16, full second-order
  vectors of the selected neurons of critical layer ``l`` (residual at T, before the final norm).

A progress file records finished batches; it is updated only after their rows are flushed,
so an interrupted run resumes where it stopped and never trusts a half-written batch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .capture import capture_batch
from .labels import Encoded, check_classes
from .runs import Run, atomic_write
from .second_order import SecondOrderEngine

PROJECTED = ("second_ld", "second_cd", "direct_ld", "direct_cd")


def correctness_direction(final_normed: torch.Tensor, correct: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``d = mean(correct) - mean(incorrect)`` of final normalized residuals ``[n, d_model]`` at T.

    Pass training-split values only. Raises when either class is empty.
    """
    c = torch.tensor(np.asarray(correct), dtype=torch.bool)
    check_classes(c, "the training split (correctness direction)")
    return final_normed[c].mean(0) - final_normed[~c].mean(0)


def _memmap(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    if path.exists():
        arr = open_memmap(path, mode="r+")
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise ValueError(f"{path} holds {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}; "
                             "remove it or use another run directory")
        return arr
    return open_memmap(path, mode="w+", dtype=dtype, shape=shape)


@torch.no_grad()
def compute_effects(model: Any, enc: Encoded, labels: Any, run: Run, split: str,
                    correctness_dir: torch.Tensor, selected: dict[int, list[int]],
                    batch_size: int = 64, engine: SecondOrderEngine | None = None,
                    progress: bool = True) -> dict[str, Path]:
    """Compute and stream Phase 2 effects for ``enc`` (one split); resumes unfinished work."""
    enc.require_single_token("second-order effects on the answer logit difference")
    L, n_mlp, dm = model.cfg.n_layers, model.cfg.d_mlp, model.cfg.d_model
    N = len(enc)
    engine = engine or SecondOrderEngine(model, correctness_dir=correctness_dir)
    dev = engine.device
    files = {k: run.file(f"{split}_{k}.npy") for k in PROJECTED}
    files |= {f"vectors_L{l}": run.file(f"{split}_vectors_L{l}.npy") for l in selected}
    arrays = {k: _memmap(files[k], (N, L, n_mlp), np.float32) for k in PROJECTED}
    arrays |= {f"vectors_L{l}": _memmap(files[f"vectors_L{l}"], (N, len(ns), dm), np.float16)
               for l, ns in selected.items()}
    prog_path = run.file(f"{split}_effects_progress.json")
    done = set(json.loads(prog_path.read_text())["done"]) if prog_path.exists() else set()
    gold = torch.tensor(labels.gold_token.values)
    alt = torch.tensor(labels.alt_token.values)
    sel_idx = {l: torch.tensor(ns, device=dev) for l, ns in selected.items()}
    starts = list(range(0, N, batch_size))
    t0 = time.perf_counter()
    for s in tqdm(starts, desc=f"effects ({split})", disable=not progress, leave=False):
        if s in done:
            continue
        rows_idx = range(s, min(s + batch_size, N))
        x, T = enc.batch(rows_idx, device=dev)
        rows = capture_batch(model, x, T, range(L))
        proj = engine.projected(rows, T, gold[s:s + len(rows_idx)], alt[s:s + len(rows_idx)])
        for D, suffix in enumerate(("ld", "cd")):
            arrays[f"second_{suffix}"][s:s + len(rows_idx)] = proj["second"][:, D].cpu().numpy()
            arrays[f"direct_{suffix}"][s:s + len(rows_idx)] = proj["direct"][:, D].cpu().numpy()
        for l, idx in sel_idx.items():
            arrays[f"vectors_L{l}"][s:s + len(rows_idx)] = engine.vectors(rows, l, idx).cpu().numpy().astype(np.float16)
        for a in arrays.values():
            a.flush()
        done.add(s)
        atomic_write(prog_path, lambda p: p.write_text(json.dumps({"done": sorted(done), "n": N})))
    for k, f in files.items():
        run.register(f"{split}_{k}", f.name, "02")
    run.time(f"effects_{split}", time.perf_counter() - t0 + run.manifest["timings"].get(f"effects_{split}", 0))
    return files


def load_effects(run: Run, split: str, kind: str) -> np.ndarray:
    """A Phase 2 array of ``split`` (``"second_ld"``, ..., ``"vectors_L3"``), memory-mapped read-only."""
    p = run.artifact_path(f"{split}_{kind}")
    if p is None:
        raise FileNotFoundError(f"run {run.path} has no {split}_{kind}; run notebook 02 first")
    return np.load(p, mmap_mode="r")
