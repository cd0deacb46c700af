"""Progress of long work: bars for a person at a notebook, lines in the run's progress log.

Where progress goes depends on who is watching:

- a person at a notebook (JupyterLab, Colab, VS Code: the kernel was asked to allow stdin):
  ``tqdm.auto`` bars that close when done (``leave=False``);
- a notebook executed by papermill/nbclient (no stdin): nothing in the notebook, so executed
  copies carry no stale ``0%`` bars; lines go to ``RUN_DIR/progress.log``, which
  ``so2lib.runs.runner`` prints to the terminal as they come;
- a plain Python process (scripts, tests): a text bar on stderr.

:class:`so2lib.runs.rundir.Run` points :data:`LOG` at its run directory when opened.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

LOG: Path | None = None  # progress log of the run opened last in this process
EVERY_S = 5.0  # seconds between log lines of one bar


def _kernel() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    return getattr(ip, "kernel", None) if ip is not None else None


def in_kernel() -> bool:
    """Whether this code runs inside a Jupyter kernel."""
    return _kernel() is not None


def interactive() -> bool:
    """Whether a person drives this kernel. nbclient (papermill) executes cells with
    ``allow_stdin=False``; JupyterLab, Colab and VS Code allow stdin."""
    k = _kernel()
    return bool(k is not None and getattr(k, "_allow_stdin", False))


def log(line: str) -> None:
    """Append one line to the run's progress log (and to stderr outside a kernel)."""
    if LOG is not None:
        try:
            with open(LOG, "a") as f:
                f.write(f"{_dt.datetime.now().strftime('%H:%M:%S')} {line}\n")
        except OSError:
            pass
    if not in_kernel():
        print(line, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Under papermill/nbclient, turn off the widget progress bars of transformers and the
    Hugging Face hub (e.g. "Loading weights"), which would stay in executed notebooks at 0%."""
    if not in_kernel() or interactive():
        return
    try:
        from transformers.utils import logging as tl
        tl.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


class _LogBar:
    """An iterable that logs ``desc i/total`` every :data:`EVERY_S` seconds and at the end."""

    def __init__(self, iterable: Iterable | None, desc: str | None, total: int | None):
        self.iterable = iterable
        self.desc = desc or "progress"
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n = total, 0
        self.t0 = self.last = time.perf_counter()

    def __iter__(self) -> Iterator:
        for x in self.iterable or ():
            yield x
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= EVERY_S:
            self.last = now
            log(f"    {self.desc}: {self.n}/{self.total if self.total is not None else '?'} "
                f"({now - self.t0:.0f} s)")

    def close(self) -> None:
        if self.n and time.perf_counter() - self.t0 >= EVERY_S:
            log(f"    {self.desc}: {self.n}/{self.total if self.total is not None else '?'} done "
                f"in {time.perf_counter() - self.t0:.0f} s")
        self.n = 0

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def __enter__(self) -> "_LogBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tqdm(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
         disable: bool = False, leave: bool = False, **kw: Any) -> Any:
    """A progress bar for ``iterable`` that suits who is watching (see the module docstring).

    Bars never stay behind (``leave`` is ignored: always ``False``)."""
    if disable:
        from tqdm import tqdm as plain
        return plain(iterable, desc=desc, total=total, disable=True)
    if in_kernel() and not interactive():
        return _LogBar(iterable, desc, total)
    if in_kernel():
        from tqdm.auto import tqdm as auto
        return auto(iterable, desc=desc, total=total, leave=False, **kw)
    from tqdm import tqdm as plain
    return plain(iterable, desc=desc, total=total, leave=False, file=sys.stderr, **kw)
