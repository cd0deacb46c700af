import json

import pandas as pd
import pytest
import torch

from so2lib.runs.rundir import Run, atomic_write


def test_step_computes_once_and_resumes(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return pd.DataFrame({"a": [1, 2]})

    run = Run(tmp_path / "r", model="m", seed=3)
    a = run.step("table", work, "01")
    b = Run(tmp_path / "r").step("table", work, "01")  # a fresh process would reopen like this
    assert calls == [1]
    assert a.equals(b)
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["config"] == {"model": "m", "seed": 3}
    assert m["artifacts"]["table"]["file"] == "table.parquet"
    assert "table" in m["timings"] and "torch" in m["versions"] and "python" in m["versions"]


def test_formats(tmp_path):
    run = Run(tmp_path)
    run.save("j", {"x": [1, 2]})
    run.save("t", {"w": torch.arange(3)})
    assert run.load("j") == {"x": [1, 2]}
    assert torch.equal(run.load("t")["w"], torch.arange(3))
    with pytest.raises(FileNotFoundError, match="notebook"):
        run.load("missing")


def test_failed_write_leaves_old_artifact_intact(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_failed_step_is_not_recorded(tmp_path):
    run = Run(tmp_path)

    def fail():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.step("x", fail)
    assert not run.has("x")


def test_saved_files_have_ordinary_permissions(tmp_path):
    run = Run(tmp_path)
    for name, obj in (("j", {"a": 1}), ("t", torch.ones(2)), ("f", pd.DataFrame({"a": [1]}))):
        assert run.save(name, obj).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_changed_parameter_recomputes_exactly_the_downstream_steps(tmp_path):
    calls = []

    def steps(run, n):
        run.step("a", lambda: calls.append("a") or {"n": n}, "01", params={"n": n})
        run.step("b", lambda: calls.append("b") or {"x": 1}, "01")  # independent of n
        run.step("c", lambda: calls.append("c") or {"m": run.load("a")["n"] * 2}, "01", deps=["a", "b"])

    steps(Run(tmp_path), 1)
    steps(Run(tmp_path), 1)
    assert calls == ["a", "b", "c"]
    steps(Run(tmp_path), 2)
    assert calls == ["a", "b", "c", "a", "c"]
    assert Run(tmp_path).load("c") == {"m": 4}


def test_artifact_from_changed_input_is_refused_until_recomputed(tmp_path):
    from so2lib.runs.rundir import StaleArtifact

    run = Run(tmp_path)
    run.step("a", lambda: {"n": 1}, "01", params={"n": 1})
    run.step("c", lambda: {"m": 2}, "02", deps=["a"])
    run.step("a", lambda: {"n": 5}, "01", params={"n": 5})
    with pytest.raises(StaleArtifact, match="'a' was recomputed since \\(now from n=5\\).*re-run notebook 02"):
        run.load("c")


def test_shared_kernel_clears_the_namespace_and_keeps_modules(tmp_path):
    """The runner's one kernel: a notebook sees none of the previous notebook's variables, and
    modules imported before stay imported (planted: without the reset the variable is seen)."""
    import nbformat
    import papermill as pm

    from so2lib.runs import runner

    def nb(path, *sources):
        n = nbformat.v4.new_notebook()
        n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        n.cells = [nbformat.v4.new_code_cell(s) for s in sources]
        nbformat.write(n, path)
        return path
    a = nb(tmp_path / "a.ipynb", "import json, sys\nleft_over = 41\nsys.modules['json'].marker = 7")
    b = nb(tmp_path / "b.ipynb", "import sys\nseen = 'left_over' in globals()\n"
                                 "kept = getattr(sys.modules['json'], 'marker', None)\nprint(seen, kept)")
    km = runner._shared_kernel(None, a)
    try:
        pm.execute_notebook(str(a), str(tmp_path / "a.out.ipynb"), km=km, progress_bar=False)
        assert km.has_kernel  # papermill started it and left it running
        km = runner._shared_kernel(km, b)
        out = pm.execute_notebook(str(b), str(tmp_path / "b.out.ipynb"), km=km, progress_bar=False)
        assert out.cells[0].outputs[0]["text"].strip() == "False 7"
        # planted: the same kernel without the reset still holds b's variables
        c = nb(tmp_path / "c.ipynb", "print('seen' in globals())")
        out = pm.execute_notebook(str(c), str(tmp_path / "c.out.ipynb"), km=km, progress_bar=False)
        assert out.cells[0].outputs[0]["text"].strip() == "True"
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
