"""Runs sized by power (-p target_mde)."""

import pytest

from so2lib.runs import power, runner
from so2lib.runs.params import ParameterError
from so2lib.stats import min_detectable_change


def test_size_reaches_the_target_and_is_the_smallest():
    s = power.size_by_power(0.03)
    assert s["mde"] <= 0.03 < min_detectable_change(0.55, s["n_val"] - 1)  # smallest n that reaches it
    assert s["n_val"] == 4312 and s["n_train"] == 2 * s["n_val"]  # 2.8^2 * 0.495 / 0.03^2 = 4312.0
    assert s["mde_per_task"] > s["mde"]
    low = power.size_by_power(0.03, discordance=0.1)  # paired outcomes that rarely flip need fewer problems
    assert low["n_val"] < s["n_val"] and low["mde"] <= 0.03
    assert power.size_by_power(0.5)["n_val"] == 30  # never below the notebooks' minimum
    with pytest.raises(ParameterError, match="target_mde"):
        power.size_by_power(3)


def test_apply_sets_counts_and_refuses_conflicts():
    p, s = power.apply({"target_mde": 0.05, "tasks": ["addition", "logic"], "seed": 1})
    assert p == {"n_val": s["n_val"], "n_train": s["n_train"], "tasks": ["addition", "logic"], "seed": 1}
    assert s["n_tasks"] == 2 and "minimum detectable" in power.describe(s)
    assert power.apply({"seed": 1}) == ({"seed": 1}, None)
    with pytest.raises(ParameterError, match="not both"):
        power.apply({"target_mde": 0.05, "n_val": 100})
    with pytest.raises(ParameterError, match="only apply"):
        power.apply({"power_accuracy": 0.5})


def test_runner_sizes_the_run_and_prints_the_sensitivity(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_execute(nb, out, parameters, **kw):
        seen[nb] = parameters
        raise KeyboardInterrupt  # stop after the first notebook received its parameters
    import papermill
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    with pytest.raises(runner.RunInterrupted):  # the runner turns Ctrl-C into RunInterrupted
        runner.run_all(str(tmp_path / "run"), params={"target_mde": 0.1}, only=["01"])
    (params,) = seen.values()
    s = power.size_by_power(0.1)
    assert params["n_val"] == s["n_val"] and params["n_train"] == s["n_train"] and "target_mde" not in params
    assert "sized by power: n_val=" in capsys.readouterr().out
    from so2lib.runs.rundir import Run
    assert Run(tmp_path / "run").manifest["power"]["n_val"] == s["n_val"]
