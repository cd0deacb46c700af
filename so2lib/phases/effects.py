"""Phase 2 over a whole problem set: projected effects of every neuron, full vectors of the
selected ones, streamed to disk batch by batch and resumable.

Arrays written under the run directory (``.npy``, memory-mappable):

- ``{split}_second_ld``, ``{split}_second_cd``, ``{split}_direct_ld``, ``{split}_direct_cd``:
  ``[problems, layers, d_mlp]`` float32, second-order / direct effects projected on the answer
  logit difference (``ld``) and on the correctness direction (``cd``), in logit units;
- ``{split}_vectors_L{l}``: ``[problems, n_selected, d_model]`` float16, full second-order
  vectors of the selected neurons of critical layer ``l`` (residual at T, before the final norm).

Each split's arrays carry a row table of per-row content digests, written only after the
rows are flushed: an interrupted, truncated or damaged stream resumes by recomputing exactly
the rows whose content is missing, whatever batch size wrote the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.lib.format import open_memmap

from so2lib.data.labels import Encoded, check_classes
from so2lib.engine.capture import answer_activations, capture_batch
from so2lib.engine.second_order import SecondOrderEngine
from so2lib.phases.selection import load_selection
from so2lib.phases.study import Setup
from so2lib.runs import progress as _progress
from so2lib.runs.progress import tqdm
from so2lib.runs.rundir import Run, _npy_expected_size, atomic_write, content_hash

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


def _row_digests(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``[len(rows)]`` uint64 content digest of each row of ``a`` (never 0: 0 marks a missing row)."""
    out = np.empty(len(rows), dtype=np.uint64)
    for j, r in enumerate(rows):
        d = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(a[r]).tobytes(), digest_size=8).digest(), "little")
        out[j] = d or 1
    return out


def _memmap(path: Path, shape: tuple[int, ...], dtype: Any) -> tuple[np.memmap, int]:
    """Open ``path`` as a writable ``.npy`` memmap of ``shape``/``dtype``; create it when missing
    or of another shape, dtype or header. Returns ``(array, rows_present)``: the rows that lie
    wholly inside the file as found (a truncated file is padded back to full size, and its
    missing rows are reported so they are recomputed, never read as zeros)."""
    if path.exists():
        try:
            shp, dt, offset, size = _npy_expected_size(path)
        except (ValueError, OSError, EOFError):
            shp, dt, offset, size = None, None, 0, 0
        if shp == tuple(shape) and dt == np.dtype(dtype):
            have = path.stat().st_size
            row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            present = min(shape[0], max(0, (have - offset) // row)) if row else shape[0]
            if have > size:
                path.unlink()
            else:
                return open_memmap(path, mode="r+"), int(present)  # r+ pads a short file with zeros
        else:
            path.unlink()
    return open_memmap(path, mode="w+", dtype=dtype, shape=shape), 0


def _stream_state(run: Run, split: str) -> tuple[Path, Path]:
    return run.file(f"{split}_effects_stream.json"), run.file(f"{split}_effects_rows.npy")


def _start_fresh(run: Run, split: str) -> None:
    """Remove every Phase 2 array of ``split`` (and its registrations): they were computed from
    other inputs."""
    names = [n for n in run.manifest["artifacts"] if n.startswith(f"{split}_")
             and (n[len(split) + 1:] in PROJECTED or n[len(split) + 1:].startswith("vectors_L"))]
    run.forget(*names)
    for f in list(run.path.glob(f"{split}_vectors_L*.npy")) + [run.file(f"{split}_{k}.npy") for k in PROJECTED] \
            + list(_stream_state(run, split)) + [run.file(f"{split}_effects_progress.json")]:
        f.unlink(missing_ok=True)


@torch.no_grad()
def compute_effects(model: Any, enc: Encoded, labels: Any, run: Run, split: str,
                    correctness_dir: torch.Tensor, selected: dict[int, list[int]],
                    batch_size: int = 64, engine: SecondOrderEngine | None = None,
                    progress: bool = True, key: str | None = None) -> dict[str, Path]:
    """Compute and stream Phase 2 effects for ``enc`` (one split); resumes unfinished work.

    ``key``: the input key (:meth:`Run.key_for`) the arrays are computed from. The arrays carry
    a stream record (``{split}_effects_stream.json``: key, row count, shapes) and a row table
    (``{split}_effects_rows.npy``, ``[arrays, rows]`` uint64): the content digest of each finished
    row of each array, written after the row is flushed. On a re-run, a row counts as done only
    when every array holds it with its recorded digest, so a truncated, zeroed or half-written
    array is recomputed row by row, whatever batch size wrote it. Arrays from another key (or
    other shapes) are removed and computed from scratch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    L, n_mlp, dm = model.cfg.n_layers, model.cfg.d_mlp, model.cfg.d_model
    N = len(enc)
    engine = engine or SecondOrderEngine(model, correctness_dir=correctness_dir)
    dev = engine.device
    shapes = {k: ((N, L, n_mlp), "float32") for k in PROJECTED}
    shapes |= {f"vectors_L{l}": ((N, len(ns), dm), "float16") for l, ns in selected.items()}
    names = sorted(shapes)
    meta_path, rows_path = _stream_state(run, split)
    meta = {"key": key, "n": N, "arrays": {k: [list(s), d] for k, (s, d) in shapes.items()}}
    try:
        old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    except json.JSONDecodeError:
        old = None
    if old != meta:
        _start_fresh(run, split)
        atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta)))
    files = {k: run.file(f"{split}_{k}.npy") for k in names}
    digests, _ = _memmap(rows_path, (len(names), N), np.uint64)
    arrays = {}
    for j, k in enumerate(names):
        arrays[k], present = _memmap(files[k], tuple(shapes[k][0]), shapes[k][1])
        digests[j, present:] = 0
    # a row is done when every array holds the content its digest says
    done = (np.asarray(digests) != 0).all(0)
    for j, k in enumerate(names):
        idx = np.flatnonzero(done)
        bad = idx[_row_digests(arrays[k], idx) != np.asarray(digests[j, idx])]
        done[bad] = False
    digests.flush()
    todo = np.flatnonzero(~done)
    gold = torch.tensor(labels.gold_token.values)
    alt = torch.tensor(labels.alt_token.values)
    sel_idx = {l: torch.tensor(ns, device=dev) for l, ns in selected.items()}
    # whole batches of the batch_size grid that hold an unfinished row: a row's float rounding
    # depends on its batch (padding), so with the same batch size a resume is bit-identical
    batches = [np.arange(s, min(s + batch_size, N)) for s in range(0, N, batch_size)
               if not done[s:s + batch_size].all()]
    if len(todo):
        _progress.log(f"[02] effects ({split}): {len(todo)} of {N} problems to compute")
    t0 = time.perf_counter()
    for rows_idx in tqdm(batches, desc=f"effects ({split})", disable=not progress, leave=False):
        x, T = enc.batch(rows_idx.tolist(), device=dev)
        rows = capture_batch(model, x, T, range(L))
        ri = torch.as_tensor(rows_idx)
        proj = engine.projected(rows, T, gold[ri], alt[ri])
        for D, suffix in enumerate(("ld", "cd")):
            arrays[f"second_{suffix}"][rows_idx] = proj["second"][:, D].cpu().numpy()
            arrays[f"direct_{suffix}"][rows_idx] = proj["direct"][:, D].cpu().numpy()
        for l, idx in sel_idx.items():
            arrays[f"vectors_L{l}"][rows_idx] = engine.vectors(rows, l, idx).cpu().numpy().astype(np.float16)
        for a in arrays.values():
            a.flush()
        for j, k in enumerate(names):  # only after the rows are on disk
            digests[j, rows_idx] = _row_digests(arrays[k], rows_idx)
        digests.flush()
    for k in names:
        arrays[k].flush()
        os.chmod(files[k], 0o644)
        run.register(f"{split}_{k}", files[k].name, "02", key=key, content=content_hash(np.asarray(arrays[k])))
    resumed = len(todo) < N  # add the time of the earlier, interrupted passes
    run.time(f"effects_{split}", time.perf_counter() - t0
             + (run.manifest["timings"].get(f"effects_{split}", 0) if resumed else 0))
    return files


def load_effects(run: Run, split: str, kind: str) -> np.ndarray:
    """A Phase 2 array of ``split`` (``"second_ld"``, ..., ``"vectors_L3"``), memory-mapped read-only.

    Checked against the manifest's content hash and the inputs it was computed from: a
    missing, damaged or out-of-date array raises an error that says to re-run notebook 02."""
    return run.load(f"{split}_{kind}")


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
