"""Run the numbered notebooks headless with papermill, in order, into one run directory.

    python -m so2lib.runner --run-dir outputs/runs/embedded            # embedded model
    python -m so2lib.runner --run-dir outputs/runs/gpt2 --model gpt2 -p device cuda

Executed copies land in ``RUN_DIR/notebooks/``; each notebook's wall time is recorded in the
run's manifest. Finished steps inside a notebook are skipped on a re-run (resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if p.name[:2] in only]
    return found


def _value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def run_all(run_dir: str, model: str | None = None, params: dict | None = None,
            only: list[str] | None = None) -> dict[str, float]:
    import papermill as pm

    from .runs import Run

    run_dir_p = Path(run_dir).resolve()
    out_dir = run_dir_p / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"run_dir": str(run_dir_p), **(params or {})}
    if model:
        parameters["model_name"] = model
    times = {}
    os.environ["SO2LIB_HEADLESS"] = "1"  # the kernels inherit it: widgets degrade to static output
    for nb in notebooks(only):
        print(f"== {nb.name}", flush=True)
        t0 = time.perf_counter()
        pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=parameters,
                            cwd=str(NOTEBOOKS_DIR), progress_bar=False, log_output=False)
        times[nb.name] = round(time.perf_counter() - t0, 1)
        print(f"   {times[nb.name]} s", flush=True)
    run = Run(run_dir_p)
    run.record("notebook_seconds", {**run.manifest.get("notebook_seconds", {}), **times})
    if run.has("accuracy"):
        from .report import write_report

        print(f"report: {write_report(run)}", flush=True)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="outputs/runs/embedded")
    ap.add_argument("--model", default=None, help="hub name or local folder (default: embedded model)")
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 01 02")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="papermill parameter (JSON value or string)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    times = run_all(a.run_dir, a.model, {k: _value(v) for k, v in a.param}, a.only)
    total = time.perf_counter() - t0
    print(f"done: {len(times)} notebooks in {total:.0f} s; run directory {a.run_dir}", flush=True)
    if not times:
        sys.exit("no notebooks found")


if __name__ == "__main__":
    main()
