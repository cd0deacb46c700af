"""The smoke checker fails on what it is meant to catch."""

import json

from so2lib.phases import study
from so2lib.runs.smoke import check


def test_smoke_check_catches_missing_phases_and_dropped_problems(tmp_path):
    setup = study.open_run(str(tmp_path / "r"), None, n_train=12, n_val=6, min_counts=False, device="cpu", progress=False)
    bad = check(setup.run.path)
    assert any("phase 02 wrote no artifact" in b for b in bad)
    assert any("executed notebooks" in b for b in bad)
    assert not any("whitespace" in b or "kept" in b for b in bad)
    m = json.loads((setup.run.path / "manifest.json").read_text())
    m["data"]["per_task"]["addition"]["kept"] = 1
    (setup.run.path / "manifest.json").write_text(json.dumps(m))
    assert any(b.startswith("task addition kept 1 of") for b in check(setup.run.path))
    nbdir = setup.run.path / "notebooks"
    nbdir.mkdir()
    cell = {"cell_type": "code", "execution_count": 1, "metadata": {}, "source": "",
            "outputs": [{"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": []}]}
    for n in ("01_a", "02_b", "03_c", "04_d", "05_e", "06_compare"):  # a later notebook (06) may follow
        (nbdir / f"{n}.ipynb").write_text(json.dumps({"cells": [cell] if n == "05_e" else [], "metadata": {}}))
    bad = check(setup.run.path)
    assert "notebook 05_e.ipynb failed: ValueError: boom" in bad and not any("executed notebooks" in b for b in bad)
