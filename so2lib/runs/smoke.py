"""Smoke profile on a real pretrained model: all five notebooks with small counts, then checks.

    python -m so2lib.runs.smoke --run outputs/runs/smoke-smollm2     # run the notebooks, then check
    python -m so2lib.runs.smoke outputs/runs/smoke-smollm2           # check an existing run

Checks (each failure is listed; exit status 1 if any):
- every synthetic task keeps at least ``min_kept`` (90%) of its generated problems;
- the first answer token and the deciding token of every problem are never whitespace;
- every phase (01-05) wrote artifacts, and every artifact file exists; every notebook ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from so2lib.data.tasks import TASKS

# small counts: the whole profile takes minutes on 2 CPU cores
SMOKE_PARAMS = {"n_train": 60, "n_val": 30, "n_shots": 1, "chat": False, "batch_size": 24,
                "top_n_neurons": 16, "device": "cpu", "zero_ablation": False}


def check(run_dir: str | Path, min_kept: float = 0.9) -> list[str]:
    """Problems found in run ``run_dir`` (empty list: all checks pass)."""
    import pandas as pd
    from transformers import AutoTokenizer

    from so2lib.engine.models import resolve_model_path
    from so2lib.runs.rundir import Run

    run = Run(run_dir)
    m = run.manifest
    if "model" not in m:
        return [f"run {run_dir} has no model: notebook 01 did not get far (see the runner's error above)"]
    bad: list[str] = []
    per = m.get("data", {}).get("per_task", {})
    if not per:
        bad.append("manifest has no data.per_task")
    for t, v in per.items():
        share = v["kept"] / max(v["generated"], 1)
        if t in TASKS and share < min_kept:
            bad.append(f"task {t} kept {v['kept']} of {v['generated']} problems ({share:.0%} < {min_kept:.0%}): {v.get('dropped')}")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None if m["model"]["name"] == "embedded" else m["model"]["name"]))
    for split in ("train", "val"):
        if not run.has(f"labels_{split}"):
            bad.append(f"no labels_{split}")
            continue
        lab = pd.read_parquet(run.artifact_path(f"labels_{split}"))
        for col in ("first_token", "gold_token"):
            ws = [int(t) for t in lab[col] if tok.decode([int(t)]).strip() == ""]
            if ws:
                bad.append(f"{split}: {len(ws)} problems whose {col} is whitespace (e.g. {tok.convert_ids_to_tokens(ws[:3])})")
    phases = {a.get("phase") for a in m["artifacts"].values()}
    for ph in ("01", "02", "03", "04", "05"):
        if ph not in phases:
            bad.append(f"phase {ph} wrote no artifact")
    for name, a in m["artifacts"].items():
        if not (run.path / a["file"]).exists():
            bad.append(f"artifact {name}: file {a['file']} is missing")
    nbs = sorted((run.path / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    phase_nbs = [p.name[:2] for p in nbs if p.name[:2] in ("01", "02", "03", "04", "05")]
    if phase_nbs != ["01", "02", "03", "04", "05"]:  # once each; later notebooks (06 compare) may follow
        bad.append(f"executed notebooks: {[p.name for p in nbs]}, expected 01-05 once each")
    for p in nbs:
        nb = json.loads(p.read_text())
        errs = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        if errs or nb.get("metadata", {}).get("papermill", {}).get("exception"):
            e = errs[0] if errs else {}
            bad.append(f"notebook {p.name} failed: {e.get('ename', '?')}: {str(e.get('evalue', ''))[:200]}")
        elif any(c["cell_type"] == "code" and c.get("execution_count") is None for c in nb["cells"]):
            bad.append(f"notebook {p.name} did not run to its end")
    return bad


def summary(run_dir: str | Path) -> dict:
    """Per-task generated/kept/accuracy, deciding-token counts and wall times of a run."""
    import pandas as pd

    from so2lib.runs.rundir import Run

    run = Run(run_dir)
    m = run.manifest
    probs = run.load("problems")
    out = {"model": m["model"]["name"], "per_task": m["data"]["per_task"], "notebook_seconds": m.get("notebook_seconds")}
    for split in ("train", "val"):
        lab = pd.read_parquet(run.artifact_path(f"labels_{split}"))
        tasks = [p["task"] for p in probs[split]]
        out[f"accuracy_{split}"] = lab.assign(task=tasks).groupby("task").correct.mean().round(3).to_dict()
        out[f"decide_k_{split}"] = {int(k): int(v) for k, v in lab.decide_k.value_counts().sort_index().items()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default=None)
    ap.add_argument("--run", metavar="RUN_DIR", help="run the five notebooks into RUN_DIR first")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--min-kept", type=float, default=0.9)
    a = ap.parse_args(argv)
    run_dir = a.run or a.run_dir
    if run_dir is None:
        ap.error("give RUN_DIR or --run RUN_DIR")
    if a.run:
        from so2lib.runs.runner import run_all

        t0 = time.perf_counter()
        try:
            run_all(a.run, a.model, dict(SMOKE_PARAMS))
        except Exception as e:  # the checks below say which notebook failed and why
            print(f"the notebooks stopped: {type(e).__name__}: {e}", flush=True)
        print(f"smoke run: {time.perf_counter() - t0:.0f} s", flush=True)
    bad = check(run_dir, a.min_kept)
    try:
        print(json.dumps(summary(run_dir), indent=1, default=str))
    except Exception as e:  # a run that stopped early has no summary
        print(f"no summary: {type(e).__name__}: {e}")
    if bad:
        print("SMOKE CHECK FAILED:\n- " + "\n- ".join(bad))
        sys.exit(1)
    print("smoke check passed")


if __name__ == "__main__":
    main()
