import json

import pandas as pd
import pytest
import torch

from so2lib.runs import Run, atomic_write


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
