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
import pandas as pd
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .capture import answer_activations, capture_batch
from .labels import Encoded, check_classes
from .runs import Run, atomic_write
from .second_order import SecondOrderEngine
from .selection import load_selection
from .study import Setup

PROJECTED = ("second_ld", "second_cd", "direct_ld", "direct_cd")


def correctness_direction(final_normed: torch.Tensor, correct: torch.Tensor | np.ndarray,
                          tasks: Any = None) -> torch.Tensor:
    """``d = mean(correct) - mean(incorrect)`` of final normalized residuals ``[n, d_model]`` at T.

    ``tasks`` (``[n]`` labels): residuals are first centred within each task (its mean removed),
    so that a task whose accuracy differs from the others does not turn ``d`` into a task
    direction. Pass training-split values only. Raises when either class is empty.
    """
    c = torch.tensor(np.asarray(correct), dtype=torch.bool)
    check_classes(c, "the training split (correctness direction)")
    x = final_normed
    if tasks is not None:
        t = np.asarray(tasks)
        x = x.clone()
        for name in np.unique(t):
            m = torch.as_tensor(t == name)
            x[m] = x[m] - x[m].mean(0)
    return x[c].mean(0) - x[~c].mean(0)


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
                    progress: bool = True, key: str | None = None) -> dict[str, Path]:
    """Compute and stream Phase 2 effects for ``enc`` (one split); resumes unfinished work.

    ``key``: the input key (:meth:`Run.key_for`) recorded with the arrays."""
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
        run.register(f"{split}_{k}", f.name, "02", key=key)
    run.time(f"effects_{split}", time.perf_counter() - t0 + run.manifest["timings"].get(f"effects_{split}", 0))
    return files


def load_effects(run: Run, split: str, kind: str) -> np.ndarray:
    """A Phase 2 array of ``split`` (``"second_ld"``, ..., ``"vectors_L3"``), memory-mapped read-only."""
    p = run.artifact_path(f"{split}_{kind}")
    if p is None:
        raise FileNotFoundError(f"run {run.path} has no {split}_{kind}; run notebook 02 first")
    return np.load(p, mmap_mode="r")


# ----------------------------------------------------------------------------- the phase, for notebooks


def second_order_phase(setup: Setup, ov_rank: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Phase 2: correctness direction (training split), then projected effects of every neuron
    and full vectors of the selected neurons for both splits, streamed into the run."""
    run, model, bs = setup.run, setup.model, setup.batch_size
    crit, selected = load_selection(run)

    def direction() -> dict[str, Any]:
        acts = answer_activations(model, setup.enc["train"], [], bs, progress)
        tasks = [p.task for p in setup.problems.train]
        return {"d": correctness_direction(acts["final_normed"], setup.labels["train"].correct.values, tasks),
                "final_normed_train": acts["final_normed"], "final_resid_train": acts["final_resid"]}
    cd = run.step("correctness_direction", direction, "02", params={"centred_within_task": True},
                  deps=["labels_train"])
    engine = SecondOrderEngine(model, correctness_dir=cd["d"], ov_rank=ov_rank)
    for split in ("train", "val"):
        key = run.key_for(f"effects_{split}", {"ov_rank": ov_rank},
                          ["selection", "correctness_direction", f"labels_{split}"])
        compute_effects(model, setup.enc[split], setup.labels[split], run, split, cd["d"], selected, bs,
                        engine, progress, key=key)
    run.record("phase2", {"ov_rank": ov_rank, "critical_layers": crit,
                          "n_selected": {str(l): len(n) for l, n in selected.items()}})
    return {"critical_layers": crit, "selected": selected, "correctness_direction": cd["d"]}


def layer_magnitudes(run: Run, split: str = "val") -> pd.DataFrame:
    """Per layer: mean |effect| per neuron-problem, first vs second order, on both projections."""
    rows = []
    for proj in ("ld", "cd"):
        first = np.abs(load_effects(run, split, f"direct_{proj}")).mean((0, 2))
        second = np.abs(load_effects(run, split, f"second_{proj}")).mean((0, 2))
        for l, (f, s) in enumerate(zip(first, second)):
            rows.append({"layer": l, "projection": proj, "first_order": float(f), "second_order": float(s),
                         "second_over_first": float(s / f) if f > 0 else float("nan")})
    return pd.DataFrame(rows)


def neuron_effect_table(run: Run, labels: pd.DataFrame, split: str = "val", proj: str = "ld") -> pd.DataFrame:
    """Per neuron: mean |second-order effect| overall and on correct / incorrect problems, and
    mean signed effect, with the direct effect alongside."""
    so = np.asarray(load_effects(run, split, f"second_{proj}"))  # [N, L, n]
    fo = np.asarray(load_effects(run, split, f"direct_{proj}"))
    ok = labels.correct.values.astype(bool)
    L, n = so.shape[1:]
    df = pd.DataFrame({
        "layer": np.repeat(np.arange(L), n), "neuron": np.tile(np.arange(n), L),
        "mean_abs": np.abs(so).mean(0).ravel(),
        "mean_abs_correct": np.abs(so[ok]).mean(0).ravel() if ok.any() else np.nan,
        "mean_abs_incorrect": np.abs(so[~ok]).mean(0).ravel() if (~ok).any() else np.nan,
        "mean_signed": so.mean(0).ravel(),
        "direct_mean_abs": np.abs(fo).mean(0).ravel(),
    })
    return df


def effect_distribution(run: Run, split: str = "val", proj: str = "ld") -> pd.DataFrame:
    """Long table of per-neuron mean |effect| per layer (first and second order) for plotting."""
    frames = []
    for order, kind in (("first", "direct"), ("second", "second")):
        m = np.abs(load_effects(run, split, f"{kind}_{proj}")).mean(0)  # [L, n]
        L, n = m.shape
        frames.append(pd.DataFrame({"layer": np.repeat(np.arange(L), n), "order": order, "value": m.ravel()}))
    return pd.concat(frames, ignore_index=True)
