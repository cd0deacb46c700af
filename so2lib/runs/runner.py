"""Run the numbered notebooks headless with papermill, in order, into one run directory.

    python -m so2lib.runs.runner --run-dir outputs/runs/embedded            # embedded model
    python -m so2lib.runs.runner --run-dir outputs/runs/gpt2 --model gpt2 -p device cuda
    python -m so2lib.runs.runner --list-params                              # what -p accepts
    python -m so2lib.runs.runner --run-dir outputs/runs/x -p target_mde 0.03  # n_val, n_train sized by power

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
import contextlib
import errno
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from so2lib.runs.params import ParameterError, notebook_parameters, validate
from so2lib.runs.rundir import (NOTEBOOKS_DIR, OWNER_ENV, DamagedArtifact, Run, RunDirUnusable, RunInUse,
                                RunLock)

RESERVED = ("run_dir",)


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the executed copy that shows where."""


_SIGINTS: list[float] = []  # when Ctrl-C reached the runner (the kernel manager may swallow the exception)


def _on_sigint(signum: int, frame: Any) -> None:
    """Python's default Ctrl-C behaviour (KeyboardInterrupt), remembering that it happened."""
    _SIGINTS.append(time.perf_counter())
    raise KeyboardInterrupt


class RunInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped the run; finished steps are kept (the message says how to resume)."""


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
            only: list[str] | None = None, fresh_kernels: bool = False) -> dict[str, float]:
    """Validate ``params``, lock ``run_dir`` and execute the notebooks in order.

    The notebooks share **one kernel** (``fresh_kernels=False``): its user namespace is cleared
    (``%reset -f``) before each notebook, so a notebook sees none of the previous one's
    variables, while the imported modules (torch, transformers, TransformerLens: about 10-20 s
    per start on 2 cores) stay loaded. ``fresh_kernels=True`` starts a kernel per notebook, as
    plain ``papermill`` does; both give the same artifacts (tests).

    Raises :class:`ParameterError` before any work, :class:`RunInUse` when another runner holds
    the directory, and :class:`NotebookFailed` when a notebook fails (earlier notebooks' times
    are recorded, the earlier good executed copy is kept)."""
    import papermill as pm

    from so2lib.runs import power

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
    try:
        Run(run_dir_p)  # a damaged manifest.json is refused here, before any notebook starts
    except BaseException:
        lock.release()
        raise
    old_owner = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())  # the kernels inherit it: they work under this lock
    if sizing:
        Run(run_dir_p).record("power", sizing)
    out_dir = run_dir_p / "notebooks"
    tail = _Tail(run_dir_p / "progress.log")
    times: dict[str, float] = {}
    km = None
    current: list = []  # [notebook name, start time] while a notebook runs
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _disk_error(e, out_dir) from None
        tail.start()
        for nb in nbs:
            print(f"== {nb.name}", flush=True)
            own = {k: v for k, v in parameters.items() if k in declared[nb.name]}
            final = out_dir / nb.name
            tmp = out_dir / f".{nb.stem}.running.ipynb"
            t0 = time.perf_counter()
            current[:] = [nb.name, t0]
            try:
                with _kernel_stderr(run_dir_p / KERNEL_LOG):
                    if not fresh_kernels:
                        km = _shared_kernel(km, nb)
                    pm.execute_notebook(str(nb), str(tmp), parameters=own, cwd=str(NOTEBOOKS_DIR),
                                        progress_bar=False, log_output=False,
                                        **({"km": km} if km is not None else {}))
                    if _SIGINTS and _SIGINTS[-1] >= t0:  # Ctrl-C during it, swallowed on the way out
                        raise KeyboardInterrupt
            except BaseException as e:
                times[nb.name] = round(time.perf_counter() - t0, 1)
                failed = out_dir / f"{nb.stem}.failed.ipynb"
                interrupted = isinstance(e, KeyboardInterrupt) or bool(_SIGINTS and _SIGINTS[-1] >= t0)
                try:
                    if tmp.exists():
                        os.replace(tmp, failed)
                        os.chmod(failed, 0o644)
                except OSError:
                    pass
                note = _record(run_dir_p, times, {nb.name: "interrupted" if interrupted else "failed"})
                if interrupted:
                    raise RunInterrupted(f"interrupted (Ctrl-C) during notebook {nb.name} after "
                                         f"{times[nb.name]} s; every finished step is kept in {run_dir_p}{note}")
                if isinstance(e, SystemExit):
                    raise
                if isinstance(e, OSError):
                    raise _disk_error(e, tmp) from None
                kept = f"; the last good copy {final} is kept" if final.exists() else ""
                what = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
                raise NotebookFailed(f"notebook {nb.name} failed after {times[nb.name]} s: {what}\n"
                                     f"  the executed copy with the error is {failed}{kept}{note}") from None
            try:
                os.replace(tmp, final)
                os.chmod(final, 0o644)
                (out_dir / f"{nb.stem}.failed.ipynb").unlink(missing_ok=True)  # superseded by this good copy
            except OSError as e:
                raise _disk_error(e, final) from None
            times[nb.name] = round(time.perf_counter() - t0, 1)
            current.clear()
            tail.poll()
            print(f"   {nb.name}: {times[nb.name]} s", flush=True)
            note = _record(run_dir_p, times, {nb.name: "ok"})
            if note:
                print("   " + note.lstrip("; "), flush=True)
        run = Run(run_dir_p)
        if run.has("accuracy"):
            from so2lib.views.report import write_report

            print(f"report: {write_report(run)}", flush=True)
    except KeyboardInterrupt:  # between notebooks, while the report is written, or (shared kernel)
        if current:  # re-raised by the kernel manager after the notebook's own handler above
            name, t0 = current
            times[name] = round(time.perf_counter() - t0, 1)
            note = _record(run_dir_p, times, {name: "interrupted"})
            raise RunInterrupted(f"interrupted (Ctrl-C) during notebook {name} after {times[name]} s; every "
                                 f"finished step is kept in {run_dir_p}{note}") from None
        _record(run_dir_p, times, {})
        raise RunInterrupted(f"interrupted (Ctrl-C); every finished step is kept in {run_dir_p}") from None
    finally:
        if km is not None:
            try:
                if km.has_kernel:
                    km.shutdown_kernel(now=True)
            except BaseException:  # noqa: BLE001 - gone already, or Ctrl-C's interrupt re-raised by
                pass  # the kernel manager's event loop: never let cleanup replace the run's own error
        tail.stop.set()
        if tail.is_alive():
            tail.join(timeout=2)
        if old_owner is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = old_owner
        lock.release()
    return times


def _shared_kernel(km: Any, nb: Path) -> Any:
    """The runner's one kernel: a manager not yet started for the first notebook (papermill
    starts it in the notebooks' folder), then the same kernel with its namespace cleared."""
    from jupyter_client.manager import KernelManager

    if km is None or not km.has_kernel:
        name = json.loads(nb.read_text()).get("metadata", {}).get("kernelspec", {}).get("name", "python3")
        return KernelManager(kernel_name=name)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive("%reset -f", timeout=60, output_hook=lambda msg: None)
        if reply["content"].get("status") != "ok":
            raise RuntimeError(f"could not clear the shared kernel before {nb.name}: {reply['content']}")
    finally:
        kc.stop_channels()
    return km


KERNEL_LOG = "kernels.log"  # the kernels' own stderr (their start-up warnings, their shutdown on Ctrl-C)


@contextlib.contextmanager
def _kernel_stderr(path: Path):
    """Send file descriptor 2 to ``path`` while a notebook runs: the kernel inherits it, so its
    log lines (and the traceback it prints when Ctrl-C shuts it down) go to the run's
    ``kernels.log`` instead of the terminal. The notebook's own errors still reach the runner."""
    try:
        f = open(path, "ab")
    except OSError:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        f.close()


def _disk_error(e: OSError, path: Path) -> Exception:
    """A full disk (or another write failure) while saving ``path``, said plainly."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RunDirUnusable(f"disk full at {e.filename or path}; free space and run again; nothing computed "
                              "is lost (finished steps are kept and the run resumes from them)")
    return RunDirUnusable(f"could not write {e.filename or path}: {type(e).__name__}: {e}")


def _record(run_dir: Path, times: dict[str, float], status: dict[str, str]) -> str:
    """Record notebook times and status in the manifest; ``""``, or a note on why it could not be."""
    try:
        run = Run(run_dir)
        run.record("notebook_seconds", {**run.manifest.get("notebook_seconds", {}), **times})
        run.record("notebook_status", {**run.manifest.get("notebook_status", {}), **status})
        return ""
    except (DamagedArtifact, RunDirUnusable, OSError) as e:
        return f"; the notebook times could not be recorded ({str(e)[:300]})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="outputs/runs/embedded")
    ap.add_argument("--model", default=None, help="hub name or local folder (default: embedded model)")
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 01 02")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="notebook parameter (JSON value or string); see --list-params")
    ap.add_argument("--list-params", action="store_true", help="print every notebook's parameters and exit")
    ap.add_argument("--fresh-kernels", action="store_true",
                    help="a new kernel per notebook (default: one kernel, its namespace cleared between notebooks)")
    a = ap.parse_args(argv)
    # Ctrl-C stops the run even when the shell that started it ignores SIGINT (background jobs)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        if a.list_params:
            for nb, ps in declared_parameters(notebooks(a.only)).items():
                print(nb)
                for k, v in ps.items():
                    print(f"  {k} = {v!r}")
            return
        t0 = time.perf_counter()
        times = run_all(a.run_dir, a.model, {k: _value(v) for k, v in a.param}, a.only, fresh_kernels=a.fresh_kernels)
    except (RunInterrupted, KeyboardInterrupt) as e:
        again = shlex.join([sys.executable, "-m", "so2lib.runs.runner",
                            *(sys.argv[1:] if argv is None else argv)])
        print(f"{e or 'interrupted (Ctrl-C)'}\nresume with the same command (finished steps are loaded, not recomputed):\n  {again}",
              file=sys.stderr, flush=True)
        sys.exit(130)
    except (ParameterError, RunInUse, NotebookFailed, RunDirUnusable, DamagedArtifact) as e:
        sys.exit(f"error: {e}")
    total = time.perf_counter() - t0
    print(f"done: {len(times)} notebooks in {total:.0f} s; run directory {a.run_dir}", flush=True)


if __name__ == "__main__":
    main()
