"""Run directories that cannot lie: checked artifacts, input-keyed steps, a lock, ``manifest.json``.

A run directory holds every artifact of a run and a manifest recording the model, data,
seeds, package versions, per-step timings and, for each artifact:

- ``hash``: its *content* hash (tensors, arrays and frames hashed by dtype, shape and values,
  not by file bytes: ``torch.save`` embeds temporary names), checked on every load;
- ``key``: its input key (:meth:`Run.key_for`), a hash of the parameters it was computed from
  and of its inputs' keys and content hashes;
- ``inputs``: the keys and hashes its inputs had when it was computed, so that an artifact whose
  inputs changed since is refused on load (:class:`StaleArtifact`) instead of mixing old and new.

Each artifact is written to a temporary file and renamed into place (mode 0644, subject to
the umask), so an interrupted run never leaves a half-written artifact. :meth:`Run.step`
recomputes an artifact whose inputs changed, that is missing, damaged or fails its
``validate`` check, and loads it otherwise. A damaged artifact that is not a step raises
:class:`DamagedArtifact`, naming the notebook that recomputes it.

Concurrent writers: manifest updates are read-modify-write under a file lock (no update is
lost); :class:`RunLock` gives one runner a run directory (``so2lib.runs.runner`` holds it), and
:class:`Run` refuses to open a directory locked by another live process.
"""

from __future__ import annotations

import ast
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from so2lib.runs import progress

PACKAGES = ("so2lib", "torch", "transformers", "transformer-lens", "scikit-learn", "numpy", "pandas",
            "plotly", "papermill", "datasets")
LOCK_FILE = ".lock"
BATCH_FREE = frozenset({"problems"})  # steps that run no batched forward pass: not keyed by the batch size
_MISSING = object()
OWNER_ENV = "SO2LIB_RUN_OWNER"  # set by so2lib.runs.runner for its kernels: the PID that holds the lock
NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"


class MissingArtifact(FileNotFoundError):
    """The run has no such artifact yet (the message names the notebook that writes it)."""


class DamagedArtifact(RuntimeError):
    """An artifact's file is unreadable or its content differs from the hash in the manifest."""


class StaleArtifact(RuntimeError):
    """An artifact was computed from inputs that have changed since."""


class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunDirUnusable(RuntimeError):
    """The run directory is a file, lies under a file, or cannot be written (read-only storage,
    full disk); the message says what to do."""


def _dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a run directory: it is a file, or under one."""
    if path.exists() and not path.is_dir():
        return f"run directory {path} is a file, not a folder: pass another run directory (or move the file away)"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return (f"run directory {path} cannot be created: {parent} is a file, not a folder; "
                        "pass another run directory")
            break
    return None


def _write_error(path: Path, e: OSError, what: str = "") -> RunDirUnusable:
    """A clear error for a failed write into run directory ``path`` (read-only, disk full, ...)."""
    import errno

    where = f" ({what})" if what else ""
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return RunDirUnusable(f"disk full at {path}{where}; free space and run again; nothing computed is lost "
                              "(finished steps are kept and the run resumes from them)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return RunDirUnusable(
            f"run directory {path} is read-only{where}: a run writes its results there. Its finished results "
            f"can still be read (so2lib.runs.rundir.Run({str(path)!r}).load(name)); to resume or extend the run, copy "
            "the folder to writable storage and run there")
    return RunDirUnusable(f"cannot write into run directory {path}{where}: {type(e).__name__}: {e}")


def ensure_run_dir(path: Path) -> Path:
    """Create run directory ``path`` (and its parents), or raise :class:`RunDirUnusable` saying why not."""
    why = _dir_problem(path)
    if why:
        raise RunDirUnusable(why)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e) from None
    return path


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    return tuple(_versions_now().items())


def versions() -> dict[str, str]:
    """Python's and the recorded packages' versions (read once per process)."""
    return dict(_versions())


def _versions_now() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp)`` then rename ``tmp`` onto ``path`` (same folder, so the rename is atomic).

    The file gets ordinary permissions (0644 under the usual umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- content hashes


def _hash_array(h: Any, a: np.ndarray) -> None:
    a = np.asarray(a)
    h.update(f"array|{a.dtype.str}|{a.shape}|".encode())
    if a.ndim == 0:
        h.update(a.tobytes())
        return
    rows = max(1, (1 << 24) // max(1, a[0].nbytes if a.shape[0] else 1))
    for i in range(0, a.shape[0], rows):  # chunked: memory-mapped arrays are not read at once
        h.update(np.ascontiguousarray(a[i:i + rows]).tobytes())


def _hash_into(h: Any, obj: Any) -> None:
    """Feed ``obj``'s content into the hash ``h``. Containers and scalars are encoded into one
    buffer and fed at once (a JSON-like artifact of 5,000 problems is hundreds of thousands of
    scalars: one ``update`` each cost a second per load); the bytes are exactly those of feeding
    each piece on its own (tested against that reference), so recorded hashes stay valid."""
    buf: list[bytes] = []
    _encode_into(h, obj, buf)
    if buf:
        h.update(b"".join(buf))


_SCALAR_TAG = {str: b"str|", int: b"int|", float: b"float|", bool: b"bool|", type(None): b"NoneType|"}


def _encode_into(h: Any, obj: Any, buf: list[bytes]) -> None:
    t = type(obj)
    if t is str:
        buf += (b"str|", _json_str(obj).encode(), b"|")
    elif t is int or t is bool or obj is None:
        buf += (_SCALAR_TAG[t], json.dumps(obj).encode(), b"|")
    elif t is float:
        buf += (b"float|", (repr(obj) if obj == obj and obj not in (_INF, -_INF) else json.dumps(obj)).encode(), b"|")
    elif isinstance(obj, dict):
        buf.append(f"dict|{len(obj)}|".encode())
        for k in sorted(obj, key=str):
            ks = str(k)
            buf += (b"str|", _json_str(ks).encode(), b"|")
            _encode_into(h, obj[k], buf)
    elif isinstance(obj, (list, tuple)):
        buf.append(f"seq|{len(obj)}|".encode())
        for v in obj:
            _encode_into(h, v, buf)
    else:  # everything else as before, in the hash's byte order: flush what is buffered first
        if buf:
            h.update(b"".join(buf))
            buf.clear()
        _hash_other(h, obj)


_INF = float("inf")
_json_str = json.encoder.encode_basestring_ascii  # what json.dumps(str) writes (ensure_ascii)


def _hash_other(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype in (torch.bfloat16,) or t.dtype.is_complex:
            t = t.reshape(-1).view(torch.uint8)
        h.update(t.numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        _hash_array(h, obj)
    elif isinstance(obj, pd.DataFrame):
        h.update(f"frame|{list(map(str, obj.columns))}|{[str(d) for d in obj.dtypes]}|".encode())
        try:
            h.update(pd.util.hash_pandas_object(obj, index=True).values.tobytes())
        except TypeError:  # unhashable cells (lists, dicts)
            h.update(obj.to_json(orient="split", default_handler=str, double_precision=15).encode())
    elif isinstance(obj, pd.Series):
        _hash_into(h, obj.to_frame())
    elif isinstance(obj, np.generic):
        _hash_into(h, obj.item())
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        h.update(f"{type(obj).__name__}|{json.dumps(obj)}|".encode())
    elif hasattr(obj, "__dict__"):
        h.update(f"obj|{type(obj).__qualname__}|".encode())
        _hash_into(h, vars(obj))
    else:
        h.update(f"repr|{obj!r}|".encode())


def content_hash(obj: Any) -> str:
    """A hash of ``obj``'s content: tensors and arrays by dtype, shape and values, frames by
    columns, dtypes, index and values, containers recursively. Files written twice from the
    same content hash the same, whatever bytes the format embeds."""
    h = hashlib.blake2b(digest_size=16)
    _hash_into(h, obj)
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading and writing


def _suffix(obj: Any) -> str:
    if isinstance(obj, pd.DataFrame):
        return ".parquet"
    if isinstance(obj, (dict, list, str, int, float)) and not _has_tensor(obj):
        return ".json"
    return ".pt"


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    return False


def _npy_expected_size(path: Path) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """``(shape, dtype, header bytes, expected file size)`` of an ``.npy`` file from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read[version](f)
        offset = f.tell()
    return tuple(shape), dtype, offset, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _read(path: Path) -> Any:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".npy":
        shape, _, _, size = _npy_expected_size(path)
        if path.stat().st_size != size:
            raise ValueError(f"{path.name} is {path.stat().st_size} bytes, its header says {size} "
                             f"(shape {shape}): truncated or padded")
        return np.load(path, mmap_mode="r")
    if path.suffix == ".html":
        return path.read_text()
    return torch.load(path, weights_only=False)


def _write_as(obj: Any, tmp: Path, suffix: str) -> None:
    # pandas/torch pick formats from the object, not the tmp file's name
    if suffix == ".parquet":
        obj.to_parquet(tmp)
    elif suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1, default=str))
    else:
        torch.save(obj, tmp)


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> content hash, per process


def _file_hash(path: Path, obj: Any | None = None) -> str:
    st = path.stat()
    k = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _VERIFIED:
        _VERIFIED[k] = content_hash(_read(path) if obj is None else obj)
    return _VERIFIED[k]


# ----------------------------------------------------------------------------- which notebook writes what


@lru_cache(maxsize=1)
def _writers() -> list[tuple[re.Pattern, str]]:
    """``(name pattern, phase)`` of every ``.step/.save/.register`` call in so2lib's source whose
    name and phase are literal (f-strings become patterns), plus the Phase 2 arrays."""
    exact, fuzzy = [], []
    for src in Path(__file__).resolve().parents[1].rglob("*.py"):
        try:
            tree = ast.parse(src.read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("step", "save", "register") and node.args):
                continue
            phase = node.args[2] if len(node.args) >= 3 else next(
                (k.value for k in node.keywords if k.arg == "phase"), None)
            if not (isinstance(phase, ast.Constant) and isinstance(phase.value, str)
                    and re.fullmatch(r"\d\d", phase.value)):
                continue
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                exact.append((re.compile(re.escape(name.value)), phase.value))
            elif isinstance(name, ast.JoinedStr):
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else ".+" for v in name.values]
                if sum(len(v.value) for v in name.values if isinstance(v, ast.Constant)) >= 3:
                    fuzzy.append((re.compile("".join(parts)), phase.value))
    arrays = [(re.compile(r"(train|val)_(second|direct)_(ld|cd)|(train|val)_vectors_L\d+"), "02")]
    return exact + arrays + fuzzy


def notebook_of_phase(phase: str | None) -> str | None:
    if not phase:
        return None
    found = sorted(NOTEBOOKS_DIR.glob(f"{phase}_*.ipynb"))
    return found[0].stem if found else (f"{phase}" if re.fullmatch(r"\d\d", phase) else None)


def writer_notebook(name: str, phase: str | None = None) -> str | None:
    """The notebook that writes artifact ``name`` (from the recorded phase or from the source)."""
    if phase is None:
        phase = next((p for pat, p in _writers() if pat.fullmatch(name)), None)
    return notebook_of_phase(phase)


def _hint(name: str, phase: str | None = None) -> str:
    nb = writer_notebook(name, phase)
    return f"run notebook {nb} first" if nb else "run the notebook of the phase that writes it first"


# ----------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / LOCK_FILE).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _in_use_message(path: Path, info: dict[str, Any]) -> str:
    return (f"run {path} is in use by PID {info.get('pid', '?')} (since {info.get('started', '?')}: "
            f"{info.get('cmd', '?')}); wait for it to finish, or use another run directory")


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``RUN_DIR/.lock``, which holds the PID).

    A dead holder's lock is released by the system, so a stale ``.lock`` file is taken over.
    ``acquire`` raises :class:`RunInUse` naming the live holder's PID.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, retries: int = 5) -> "RunLock":
        ensure_run_dir(self.path)
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _write_error(self.path, e, f"cannot create its lock file {LOCK_FILE}") from None
        for i in range(retries):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if i == retries - 1:
                    os.close(fd)
                    raise RunInUse(_in_use_message(self.path, _lock_info(self.path))) from None
                time.sleep(0.1)  # a Run() checking the lock holds it for microseconds
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                                     "cmd": " ".join(sys.argv)[:200]}).encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise _write_error(self.path, e, f"cannot write its lock file {LOCK_FILE}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_lock(path: Path) -> None:
    """Raise :class:`RunInUse` when a live process other than this one (or the runner that
    started it) holds the run's lock."""
    f = path / LOCK_FILE
    if not f.exists():
        return
    fd = os.open(f, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return  # nobody holds it (a dead holder's file is stale)
        except BlockingIOError:
            pass
    finally:
        os.close(fd)
    info = _lock_info(path)
    owner = {str(os.getpid()), os.environ.get(OWNER_ENV, "")}
    if str(info.get("pid")) not in owner:
        raise RunInUse(_in_use_message(path, info))


# ----------------------------------------------------------------------------- the run


class Run:
    """A run directory. ``Run("outputs/runs/default", model="embedded", seed=0)`` opens or creates it.

    Keyword arguments are recorded in the manifest's ``config`` (a later phase adds its own).
    Opening an existing run only reads it: nothing is written until something is recorded or
    saved (the package versions are recorded with the next write), so a finished run can be
    read from read-only storage. Raises :class:`RunInUse` when another process's runner holds
    the directory, :class:`RunDirUnusable` when the path is a file or lies under one.
    """

    batch_size: int | None = None  # set by study.open_run: part of every step's input key

    def __init__(self, path: str | os.PathLike, **config: Any):
        self.path = Path(path)
        if not self.path.is_dir():
            ensure_run_dir(self.path)
        check_lock(self.path)
        self.manifest_path = self.path / "manifest.json"
        self._inputs: dict[str, dict[str, Any]] = {}  # input key -> what key_for saw (for register)
        existing = self._read_manifest()
        self.manifest = existing or self._new_manifest()
        self.manifest["config"].update(config)
        if existing is None or any(existing["config"].get(k, _MISSING) != v for k, v in config.items()):
            self._update(lambda m: None)
        progress.LOG = self.path / "progress.log"
        progress.quiet_libraries()

    # ------------------------------------------------------------------ manifest

    @staticmethod
    def _new_manifest() -> dict[str, Any]:
        return {"created": _now(), "config": {}, "artifacts": {}, "timings": {},
                "versions": versions(), "machine": _machine()}

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            m = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise DamagedArtifact(
                f"{self.manifest_path} is damaged ({e}); the artifacts cannot be checked without it. "
                f"Restore it, or start again in a new run directory (or delete {self.path})") from None
        for k, v in self._new_manifest().items():
            m.setdefault(k, v)
        return m

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to the manifest on disk (re-read under a file lock, so updates by
        other processes are kept) and to this object's copy; this process's config wins."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lk = open(self.path / ".manifest.lock", "a")
        except OSError as e:
            raise _write_error(self.path, e, "cannot update manifest.json") from None
        with lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                m = self._read_manifest() or self.manifest
                m["config"].update(self.manifest.get("config", {}))
                m["versions"] = versions()
                change(m)
                try:
                    atomic_write(self.manifest_path, lambda p: p.write_text(json.dumps(m, indent=1, default=str)))
                except OSError as e:
                    raise _write_error(self.path, e, "cannot update manifest.json") from None
                self.manifest = m
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)

    def _save_manifest(self) -> None:
        self._update(lambda m: None)

    def record(self, key: str, value: Any) -> None:
        """Record a top-level manifest entry (e.g. ``"data"``, ``"model"``)."""
        self._update(lambda m: m.__setitem__(key, value))

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    # ------------------------------------------------------------------ artifacts

    def artifact_path(self, name: str) -> Path | None:
        entry = self.manifest["artifacts"].get(name)
        if entry is None:
            return None
        p = self.path / entry["file"]
        return p if p.exists() else None

    def has(self, name: str) -> bool:
        return self.artifact_path(name) is not None

    def _entry(self, name: str, file: str, phase: str | None, key: str | None, h: str,
               params: dict[str, Any] | None = None) -> dict[str, Any]:
        seen = self._inputs.get(key or "", {})
        return {"file": file, "phase": phase, "written": _now(), "key": key, "hash": h,
                "params": params if params is not None else seen.get("params"),
                "inputs": seen.get("inputs", {})}

    def save(self, name: str, obj: Any, phase: str | None = None, key: str | None = None,
             params: dict[str, Any] | None = None) -> Path:
        """Write ``obj`` atomically as ``name`` (DataFrame -> parquet, JSON-able -> json, else torch).

        ``key``: the input key it was computed from (:meth:`key_for`). The content hash is taken
        from the file read back, so the manifest describes what a later load will see."""
        path = self.path / f"{name}{_suffix(obj)}"
        try:
            atomic_write(path, lambda tmp: _write_as(obj, tmp, path.suffix))
        except OSError as e:
            raise _write_error(self.path, e, f"cannot write {path.name}") from None
        h = _file_hash(path)
        entry = self._entry(name, path.name, phase, key, h, params)
        self._update(lambda m: m["artifacts"].__setitem__(name, entry))
        return path

    def verify(self, name: str) -> Any:
        """Load artifact ``name`` and check it against the manifest's content hash; raise
        :class:`MissingArtifact` or :class:`DamagedArtifact` (with how to recover)."""
        entry = self.manifest["artifacts"].get(name)
        p = self.artifact_path(name)
        if p is None:
            phase = entry.get("phase") if entry else None
            raise MissingArtifact(f"run {self.path} has no artifact {name!r}: {_hint(name, phase)} "
                                  f"(artifacts here: {sorted(self.manifest['artifacts'])})")
        recover = (f"re-run notebook {writer_notebook(name, entry.get('phase'))} (it recomputes it)"
                   if writer_notebook(name, entry.get("phase")) else f"delete {p.name} and recompute it")
        try:
            obj = _read(p)
        except Exception as e:  # noqa: BLE001 - any reader error means a damaged file
            raise DamagedArtifact(f"artifact {name!r} ({p}) is damaged: {type(e).__name__}: {e}; "
                                  f"{recover}") from None
        want = entry.get("hash")
        if want is not None and _file_hash(p, obj) != want:
            raise DamagedArtifact(f"artifact {name!r} ({p}) does not hold what was written (content hash "
                                  f"differs from the manifest's): the file was changed or damaged; {recover}")
        return obj

    def stale_reason(self, name: str, _seen: frozenset = frozenset()) -> str | None:
        """Why artifact ``name`` no longer matches its inputs (``None`` when it does)."""
        entry = self.manifest["artifacts"].get(name) or {}
        for d, (k, h) in (entry.get("inputs") or {}).items():
            cur = self.manifest["artifacts"].get(d)
            if cur is None:
                return f"its input {d!r} is gone"
            if [cur.get("key"), cur.get("hash")] != [k, h]:
                ps = cur.get("params") or {}
                now = ", ".join(f"{p}={v!r}" for p, v in sorted(ps.items())) if ps else "other inputs"
                return f"its input {d!r} was recomputed since (now from {now})"
            if d not in _seen:
                why = self.stale_reason(d, _seen | {name})
                if why:
                    return f"its input {d!r} is stale: {why}"
        return None

    def load(self, name: str, validate: Callable[[Any], None] | None = None) -> Any:
        """Artifact ``name``, checked: present (else the error names the notebook that writes it),
        intact (content hash), current (its inputs unchanged since) and, with ``validate``, valid."""
        obj = self.verify(name)
        why = self.stale_reason(name)
        if why:
            entry = self.manifest["artifacts"][name]
            raise StaleArtifact(f"artifact {name!r} of run {self.path} is out of date: {why}; re-run notebook "
                                f"{writer_notebook(name, entry.get('phase')) or 'that writes it'} to recompute it")
        if validate is not None:
            validate(obj)
        return obj

    def key_for(self, name: str, params: dict[str, Any] | None = None, deps: Sequence[str] = ()) -> str:
        """The input key of step ``name``: a hash of its parameters and of its inputs' keys and
        content hashes.

        Keys chain: an artifact's key covers everything upstream of it, so a changed parameter
        changes the key of exactly the steps downstream of it. Raises when an input is missing
        or out of date (computed from inputs that changed since)."""
        params = self._with_batch_size(params, name)
        inputs = {}
        for d in deps:
            entry = self.manifest["artifacts"].get(d)
            if entry is None or not self.has(d):
                raise MissingArtifact(
                    f"step {name!r} needs artifact {d!r}, which run {self.path} does not have yet: "
                    f"{_hint(d, (entry or {}).get('phase'))} (artifacts here: {sorted(self.manifest['artifacts'])})")
            why = self.stale_reason(d)
            if why:
                raise StaleArtifact(f"step {name!r} needs artifact {d!r}, which is out of date: {why}; re-run "
                                    f"notebook {writer_notebook(d, entry.get('phase')) or 'that writes it'} first")
            inputs[d] = [entry.get("key"), entry.get("hash")]
        blob = json.dumps({"name": name, "params": params or {}, "deps": inputs}, sort_keys=True, default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self._inputs[key] = {"params": json.loads(json.dumps(params or {}, default=str)), "inputs": inputs}
        return key

    def _with_batch_size(self, params: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
        """``params`` plus the run's ``batch_size`` (when set): batched forward passes pad rows to
        the batch's length, which changes float rounding, so a result computed with another batch
        size is another result (recomputed, never mixed) and the manifest records, per artifact,
        the batch size it was computed with."""
        if self.batch_size is None or name in BATCH_FREE or (params and "batch_size" in params):
            return params
        return {**(params or {}), "batch_size": self.batch_size}

    def fresh(self, name: str, key: str) -> bool:
        """Whether artifact ``name`` exists and was computed from inputs with this ``key``."""
        entry = self.manifest["artifacts"].get(name)
        return entry is not None and entry.get("key") == key and self.has(name)

    def step(self, name: str, fn: Callable[[], Any], phase: str | None = None, *,
             params: dict[str, Any] | None = None, deps: Sequence[str] = (),
             validate: Callable[[Any], None] | None = None, allow_empty: bool = True) -> Any:
        """Return artifact ``name``, computing it with ``fn()`` (timed, saved) unless it exists, is
        intact, was computed from the same ``params`` and the same versions of the artifacts
        ``deps``, and passes ``validate``.

        ``validate(obj)`` raises on an invalid result: a fresh result that fails is not saved
        (the error propagates), a cached one that fails is recomputed. ``allow_empty=False``
        refuses empty tables the same way."""
        key = self.key_for(name, params, deps)
        tag = f"[{phase or '--'}] {name}"
        if self.fresh(name, key):
            try:
                obj = self.load(name, validate=lambda o: _check_result(name, o, validate, allow_empty))
                return obj
            except (DamagedArtifact, StaleArtifact, ValueError) as e:
                progress.log(f"{tag}: cached copy unusable ({str(e)[:160]}); recomputing")
        progress.log(f"{tag} ...")
        t0 = time.perf_counter()
        obj = fn()
        _check_result(name, obj, validate, allow_empty)
        dt = round(time.perf_counter() - t0, 3)
        self.save(name, obj, phase, key=key, params=self._with_batch_size(params, name) or {})
        self._update(lambda m: m["timings"].__setitem__(name, dt))
        progress.log(f"{tag} done in {dt:.1f} s")
        return obj

    def file(self, name: str) -> Path:
        """A path inside the run for artifacts written by other means (e.g. memory-mapped arrays)."""
        return self.path / name

    def register(self, name: str, file: str, phase: str | None = None, key: str | None = None,
                 content: str | None = None) -> None:
        """Record a file written by other means as artifact ``name`` (``key`` as in :meth:`save`).

        Its content hash is computed from the file unless given as ``content``."""
        p = self.path / file
        h = content if content is not None else _file_hash(p)
        entry = self._entry(name, file, phase, key, h)
        self._update(lambda m: m["artifacts"].__setitem__(name, entry))

    def forget(self, *names: str) -> None:
        """Drop artifacts from the manifest (their files stay until overwritten)."""
        self._update(lambda m: [m["artifacts"].pop(n, None) for n in names])

    def time(self, name: str, seconds: float) -> None:
        self._update(lambda m: m["timings"].__setitem__(name, round(seconds, 3)))


def _check_result(name: str, obj: Any, validate: Callable[[Any], None] | None, allow_empty: bool) -> None:
    if not allow_empty and isinstance(obj, pd.DataFrame) and obj.empty:
        raise ValueError(f"step {name!r} produced an empty table; it is not saved "
                         "(check the parameters, e.g. batch_size >= 1 and enough problems)")
    if validate is not None:
        validate(obj)


def expect_rows(n: int, columns: Sequence[str] = ()) -> Callable[[Any], None]:
    """A ``validate`` for :meth:`Run.step`: a table of exactly ``n`` rows with ``columns``."""
    def check(df: Any) -> None:
        if not isinstance(df, pd.DataFrame) or len(df) != n or not set(columns) <= set(df.columns):
            got = f"{len(df)} rows, columns {list(df.columns)}" if isinstance(df, pd.DataFrame) else type(df).__name__
            raise ValueError(f"expected a table of {n} rows with columns {list(columns)}, got {got}")
    return check


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), "gpu": gpu}
