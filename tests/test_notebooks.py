"""Every notebook runs once under plain ``papermill`` (no SO2LIB_* environment variable) on a
tiny profile of the embedded model, in order, into one run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from so2lib.runs import runner

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_train": 400, "n_val": 120, "batch_size": 32, "top_n_neurons": 4, "significant_share": 0.05,
        "budget_neurons": 2, "m": 8, "k_edit": 2, "n_random_sets": 2}


def test_every_notebook_runs_under_plain_papermill(tmp_path):
    pytest.importorskip("papermill")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SO2LIB_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's so2lib
    env.setdefault("OMP_NUM_THREADS", "1")
    for nb in runner.notebooks():
        declared = runner.declared_parameters([nb])[nb.name]
        args = [a for k, v in ({"run_dir": str(run_dir)} | TINY).items() if k in declared
                for a in ("-y", json.dumps({k: v}))]
        out = tmp_path / nb.name
        p = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(out), "--cwd", str(nb.parent),
                            *args], env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, f"{nb.name}:\n{p.stderr[-3000:]}"
        cells = json.loads(out.read_text())["cells"]
        text = json.dumps([c.get("outputs", []) for c in cells])
        assert "0%|" not in text, f"{nb.name} keeps a stale progress bar"
        assert "application/vnd.jupyter.widget-view+json" not in text, f"{nb.name} left a widget"
    assert (run_dir / "manifest.json").exists()
    # the runner's one shared kernel (namespace cleared between notebooks) gives the same artifacts
    # as a fresh papermill kernel per notebook
    shared = tmp_path / "shared"
    runner.run_all(str(shared), params=TINY)
    plain, ours = (json.loads((d / "manifest.json").read_text())["artifacts"] for d in (run_dir, shared))
    assert set(plain) == set(ours)
    # (the HTML report names the run directory and the notebooks' wall times: it must differ)
    differ = sorted(k for k in plain if plain[k]["hash"] != ours[k]["hash"] and k != "report")
    assert not differ, f"artifacts that differ between fresh and shared kernels: {differ}"


def test_notebooks_are_committed_clean():
    """Without outputs or execution counts, every cell with an id (nbformat 4.5), and a first
    markdown cell that names the notebooks it needs."""
    for nb_path in runner.notebooks():
        nb = json.loads(Path(nb_path).read_text())
        assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5), nb_path
        for c in nb["cells"]:
            assert c.get("id"), f"{nb_path.name}: a cell without an id"
            if c["cell_type"] == "code":
                assert not c.get("outputs") and c.get("execution_count") is None, f"{nb_path.name} has outputs"
        first = nb["cells"][0]
        assert first["cell_type"] == "markdown" and "need" in "".join(first["source"]).lower(), nb_path.name
