"""Run the numbered notebooks headless with papermill, in order, into one run directory.

    python -m so2lib.runner --run-dir outputs/runs/embedded            # embedded model
    python -m so2lib.runner --run-dir outputs/runs/gpt2 --model gpt2 -p device cuda
    python -m so2lib.runner --list-params                              # what -p accepts
    python -m so2lib.runner --run-dir outputs/runs/x -p target_mde 0.03  # n_val, n_train sized by power

Parameters are checked against the notebooks' ``parameters`` cells before any work: an
unknown name, a wrong type or an impossible value stops the run with the list of valid ones.
The runner locks the run directory (a second runner gets "run ... is in use by PID ...").
Executed copies land in ``RUN_DIR/notebooks/``: each notebook runs into a temporary copy that
replaces the previous good one only when it succeeds; a failed one is kept beside it as
``NN_name.failed.ipynb`` until the notebook next succeeds. Each notebook's wall time is recorded in the run's manifest as soon
as it ends. Progress (steps and long loops, from ``RUN_DIR/progress.log``) is printed as it
comes. Finished steps inside a notebook are skipped on a re-run (resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .params import ParameterError, notebook_parameters, validate
from .runs import OWNER_ENV, NOTEBOOKS_DIR, Run, RunInUse, RunLock

RESERVED = ("run_dir",)


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the executed copy that shows where."""


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        unknown = sorted(set(only) - {p.name[:2] for p in found})
        if unknown:
            raise ParameterError(f"no notebook numbered {unknown}; there are {[p.name[:2] for p in found]}")
        found = [p for p in found if p.name[:2] in only]
    return found


def declared_parameters(nbs: list[Path]) -> dict[str, dict[str, Any]]:
    """``{notebook file name: {parameter: default}}`` from each notebook's ``parameters`` cell."""
    return {nb.name: notebook_parameters(nb) for nb in nbs}


def _value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


class _Tail(threading.Thread):
    """Print the lines appended to ``path`` (the run's progress log) while the notebooks run."""

    def __init__(self, path: Path, prefix: str = "   "):
        super().__init__(daemon=True)
        self.path, self.prefix, self.stop = path, prefix, threading.Event()
        self.pos = path.stat().st_size if path.exists() else 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.pos)
            chunk = f.read()
        lines = chunk.split("\n")
        done = "\n".join(lines[:-1])  # keep a partial last line for the next poll
        self.pos += len(done.encode()) + (1 if len(lines) > 1 else 0)
        for line in lines[:-1]:
            print(self.prefix + line, flush=True)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.poll()
        self.poll()


def run_all(run_dir: str, model: str | None = None, params: dict | None = None,
            only: list[str] | None = None) -> dict[str, float]:
    """Validate ``params``, lock ``run_dir`` and execute the notebooks in order.

    Raises :class:`ParameterError` before any work, :class:`RunInUse` when another runner holds
    the directory, and :class:`NotebookFailed` when a notebook fails (earlier notebooks' times
    are recorded, the earlier good executed copy is kept)."""
    import papermill as pm

    from . import power

    params, sizing = power.apply(dict(params or {}))  # -p target_mde: n_val and n_train sized by power
    if sizing:
        print(power.describe(sizing), flush=True)
    nbs = notebooks(only)
    if not nbs:
        raise ParameterError(f"no notebooks found in {NOTEBOOKS_DIR}")
    declared = declared_parameters(nbs)
    validate(params, declared, reserved=RESERVED)
    run_dir_p = Path(run_dir).resolve()
    parameters = {"run_dir": str(run_dir_p), **params}
    if model:
        parameters["model_name"] = model
    lock = RunLock(run_dir_p).acquire()
    old_owner = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())  # the kernels inherit it: they work under this lock
    if sizing:
        Run(run_dir_p).record("power", sizing)
    out_dir = run_dir_p / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    tail = _Tail(run_dir_p / "progress.log")
    tail.start()
    times: dict[str, float] = {}
    try:
        for nb in nbs:
            print(f"== {nb.name}", flush=True)
            own = {k: v for k, v in parameters.items() if k in declared[nb.name]}
            final = out_dir / nb.name
            tmp = out_dir / f".{nb.stem}.running.ipynb"
            t0 = time.perf_counter()
            try:
                pm.execute_notebook(str(nb), str(tmp), parameters=own, cwd=str(NOTEBOOKS_DIR),
                                    progress_bar=False, log_output=False)
            except BaseException as e:
                times[nb.name] = round(time.perf_counter() - t0, 1)
                failed = out_dir / f"{nb.stem}.failed.ipynb"
                if tmp.exists():
                    os.replace(tmp, failed)
                    os.chmod(failed, 0o644)
                _record(run_dir_p, times, {nb.name: "failed"})
                kept = f"; the last good copy {final} is kept" if final.exists() else ""
                what = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                raise NotebookFailed(f"notebook {nb.name} failed after {times[nb.name]} s: {what}\n"
                                     f"  the executed copy with the error is {failed}{kept}") from None
            os.replace(tmp, final)
            os.chmod(final, 0o644)
            (out_dir / f"{nb.stem}.failed.ipynb").unlink(missing_ok=True)  # superseded by this good copy
            times[nb.name] = round(time.perf_counter() - t0, 1)
            tail.poll()
            print(f"   {nb.name}: {times[nb.name]} s", flush=True)
            _record(run_dir_p, times, {nb.name: "ok"})
        run = Run(run_dir_p)
        if run.has("accuracy"):
            from .report import write_report

            print(f"report: {write_report(run)}", flush=True)
    finally:
        tail.stop.set()
        tail.join(timeout=2)
        if old_owner is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = old_owner
        lock.release()
    return times


def _record(run_dir: Path, times: dict[str, float], status: dict[str, str]) -> None:
    run = Run(run_dir)
    run.record("notebook_seconds", {**run.manifest.get("notebook_seconds", {}), **times})
    run.record("notebook_status", {**run.manifest.get("notebook_status", {}), **status})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="outputs/runs/embedded")
    ap.add_argument("--model", default=None, help="hub name or local folder (default: embedded model)")
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 01 02")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="notebook parameter (JSON value or string); see --list-params")
    ap.add_argument("--list-params", action="store_true", help="print every notebook's parameters and exit")
    a = ap.parse_args(argv)
    try:
        if a.list_params:
            for nb, ps in declared_parameters(notebooks(a.only)).items():
                print(nb)
                for k, v in ps.items():
                    print(f"  {k} = {v!r}")
            return
        t0 = time.perf_counter()
        times = run_all(a.run_dir, a.model, {k: _value(v) for k, v in a.param}, a.only)
    except (ParameterError, RunInUse, NotebookFailed) as e:
        sys.exit(f"error: {e}")
    total = time.perf_counter() - t0
    print(f"done: {len(times)} notebooks in {total:.0f} s; run directory {a.run_dir}", flush=True)


if __name__ == "__main__":
    main()
