"""Run directories: atomic artifact writes, resumable steps, and ``manifest.json``.

A run directory holds every artifact of a run and a manifest recording the model, data,
seeds, package versions, per-step timings and the artifact list. Each artifact is written to
a temporary file and renamed into place, so an interrupted run never leaves a half-written
artifact; :meth:`Run.step` skips work whose artifact already exists.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

PACKAGES = ("so2lib", "torch", "transformers", "transformer-lens", "scikit-learn", "numpy", "pandas",
            "plotly", "papermill", "datasets")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp)`` then rename ``tmp`` onto ``path`` (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _suffix(obj: Any) -> str:
    if isinstance(obj, pd.DataFrame):
        return ".parquet"
    if isinstance(obj, (dict, list, str, int, float)) and not _has_tensor(obj):
        return ".json"
    return ".pt"


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    return False


def _read(path: Path) -> Any:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, weights_only=False)


class Run:
    """A run directory. ``Run("outputs/runs/default", model="embedded", seed=0)`` opens or creates it.

    Keyword arguments are recorded in the manifest's ``config`` (a later phase adds its own).
    """

    def __init__(self, path: str | os.PathLike, **config: Any):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.path / "manifest.json"
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text())
        else:
            self.manifest = {"created": _now(), "config": {}, "artifacts": {}, "timings": {},
                             "versions": versions(), "machine": _machine()}
        self.manifest["config"].update(config)
        self.manifest["versions"] = versions()
        self._save_manifest()

    # ------------------------------------------------------------------ manifest

    def _save_manifest(self) -> None:
        atomic_write(self.manifest_path, lambda p: p.write_text(json.dumps(self.manifest, indent=1, default=str)))

    def record(self, key: str, value: Any) -> None:
        """Record a top-level manifest entry (e.g. ``"data"``, ``"model"``)."""
        self.manifest[key] = value
        self._save_manifest()

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

    def save(self, name: str, obj: Any, phase: str | None = None, key: str | None = None) -> Path:
        """Write ``obj`` atomically as ``name`` (DataFrame -> parquet, JSON-able -> json, else torch).

        ``key``: the input key it was computed from (:meth:`key_for`)."""
        path = self.path / f"{name}{_suffix(obj)}"
        atomic_write(path, lambda tmp: _write_as(obj, tmp, path.suffix))
        self.manifest["artifacts"][name] = {"file": path.name, "phase": phase, "written": _now(), "key": key}
        self._save_manifest()
        return path

    def load(self, name: str) -> Any:
        p = self.artifact_path(name)
        if p is None:
            raise FileNotFoundError(
                f"run {self.path} has no artifact {name!r}; run the notebook of the phase that "
                f"writes it first (artifacts here: {sorted(self.manifest['artifacts'])})")
        return _read(p)

    def key_for(self, name: str, params: dict[str, Any] | None = None, deps: Sequence[str] = ()) -> str:
        """The input key of step ``name``: a hash of its parameters and of its inputs' keys.

        Keys chain: an artifact's key covers everything upstream of it, so a changed parameter
        changes the key of exactly the steps downstream of it. Raises when an input is missing.
        """
        dep_keys = {}
        for d in deps:
            entry = self.manifest["artifacts"].get(d)
            if entry is None or not self.has(d):
                raise FileNotFoundError(
                    f"step {name!r} needs artifact {d!r}, which run {self.path} does not have yet; "
                    f"run the notebook that writes it first (artifacts here: {sorted(self.manifest['artifacts'])})")
            dep_keys[d] = entry.get("key")
        blob = json.dumps({"name": name, "params": params or {}, "deps": dep_keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fresh(self, name: str, key: str) -> bool:
        """Whether artifact ``name`` exists and was computed from inputs with this ``key``."""
        entry = self.manifest["artifacts"].get(name)
        return entry is not None and entry.get("key") == key and self.has(name)

    def step(self, name: str, fn: Callable[[], Any], phase: str | None = None, *,
             params: dict[str, Any] | None = None, deps: Sequence[str] = ()) -> Any:
        """Return artifact ``name``, computing it with ``fn()`` (timed, saved) unless it exists and
        was computed from the same ``params`` and the same versions of the artifacts ``deps``."""
        key = self.key_for(name, params, deps)
        if self.fresh(name, key):
            return self.load(name)
        t0 = time.perf_counter()
        obj = fn()
        self.manifest["timings"][name] = round(time.perf_counter() - t0, 3)
        self.save(name, obj, phase, key=key)
        return obj

    def file(self, name: str) -> Path:
        """A path inside the run for artifacts written by other means (e.g. memory-mapped arrays)."""
        return self.path / name

    def register(self, name: str, file: str, phase: str | None = None, key: str | None = None) -> None:
        """Record a file written by other means as artifact ``name`` (``key`` as in :meth:`save`)."""
        self.manifest["artifacts"][name] = {"file": file, "phase": phase, "written": _now(), "key": key}
        self._save_manifest()

    def time(self, name: str, seconds: float) -> None:
        self.manifest["timings"][name] = round(seconds, 3)
        self._save_manifest()


def _write_as(obj: Any, tmp: Path, suffix: str) -> None:
    # pandas/torch pick formats from the object, not the tmp file's name
    if suffix == ".parquet":
        obj.to_parquet(tmp)
    elif suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1, default=str))
    else:
        torch.save(obj, tmp)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), "gpu": gpu}
