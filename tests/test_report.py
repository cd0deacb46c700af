"""The run report: formatting, sections from artifacts, and drawing in a real browser."""

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from so2lib.views.report import fmt, sections, write_report
from so2lib.runs.rundir import Run


def test_fmt_integers_floats_and_missing():
    assert fmt(12.0) == "12" and fmt(np.int64(7)) == "7"
    assert fmt(0.12345) == "0.123" and fmt(float("nan")) == "" and fmt(None) == ""
    assert fmt(True) == "yes" and fmt([0, 2]) == "0, 2"


def _fake_run(path) -> Run:
    run = Run(path)
    run.record("model", {"name": "tiny", "n_layers": 4, "d_model": 8, "d_mlp": 16})
    run.record("data", {"n_train": 60, "n_val": 40,
                        "per_task": {"addition": {"generated": 50, "kept": 50}, "logic": {"generated": 50, "kept": 48}}})
    run.record("notebook_seconds", {"01_setup_and_selection.ipynb": 12.3, "02_second_order_effects.ipynb": 4.0})
    acc = pd.DataFrame({"n": [20, 20, 40], "n_correct": [10, 15, 25], "accuracy": [0.5, 0.75, 0.625],
                        "mean_logit_diff": [0.1, 0.9, 0.5], "split": "val"}, index=["addition", "logic", "overall"])
    run.save("accuracy", acc)
    run.save("layer_ablation", pd.DataFrame({"layer": [0, 0, 1, 1], "kind": ["mean", "zero"] * 2,
                                             "accuracy": [0.4, 0.3, 0.6, 0.6], "accuracy_drop": [0.2, 0.3, 0.0, 0.0]}))
    run.save("selection", {"critical_layers": [0, 2], "neurons": {"0": [1, 2]}, "top_n": 2, "by": "combined"})
    run.save("validation_table", pd.DataFrame({
        "measure": ["sparsity", "rank-1 recovery"], "measured": [0.4, float("nan")], "ci_low": [0.3, float("nan")],
        "ci_high": [0.5, float("nan")], "null": [0.1, 0.0], "target": ["> 0.2", "> 0.5"],
        "verdict": ["pass", "not testable"], "how": ["a long explanation " * 12, "no drop to recover"]}))
    from so2lib.stats import validation_row, verdict_table
    nan = float("nan")
    rows = [validation_row(f"row {k}", 0.1 * k, (0.1 * k - 0.05, 0.1 * k + 0.05), 0.0, 0.2, "how", resampled="problems", primary=k == 4,
                           split="training" if k % 2 else "validation", p=0.001) for k in range(5)]
    rows.append(validation_row("untestable", nan, (nan, nan), nan, 0.0, "how", resampled="problems", reason="not measurable: nothing"))
    run.save("decomposition_table", verdict_table(rows))
    return run


def test_report_sections_and_page(tmp_path):
    run = _fake_run(tmp_path / "r")
    titles = [s.title for s in sections(run)]
    assert titles == ["What was run", "Accuracy per task", "Which MLP layers matter", "Validation table"]
    page = write_report(run, quiet=True).read_text()
    assert page.count("<h2") == 4 and page.count("class='lead'") >= 5  # one sentence per section
    assert "a long explanation " * 12 in page  # nothing cut off
    assert "12.0" not in re.sub(r"<script.*?</script>", "", page, flags=re.S)  # counts print as integers
    assert ">nan<" not in page.lower() and "v-not-testable" in page
    # every row of every verdict table, the new verdicts coloured, training rows marked and counted
    for k in range(5):
        assert f"<td>row {k}</td>" in page
    assert "<td>untestable</td>" in page
    assert "v-established" in page and "v-refuted" in page and "v-inconclusive" in page
    assert page.count("s-training") == 2 + 1  # two training rows and the CSS rule
    assert "Measured on the training split: 2 of 8 rows" in page
    assert "Primary rows: row 4: established" in page
    assert page.count("plotly.js v") <= 2  # plotly.js embedded once (its banner appears once or twice)


@pytest.mark.skipif(not (shutil.which("chromium-headless-shell") or shutil.which("chromium")),
                    reason="no headless Chromium on this machine (apt-get install chromium-headless-shell)")
def test_report_figures_draw_in_chromium(tmp_path):
    run = _fake_run(tmp_path / "r")
    path = write_report(run, quiet=True)
    n_figures = sum(len(s.figures) for s in sections(run))
    exe = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    # plotly draws each figure as <svg class="main-svg"> inside its div once plotly.js has run
    drawn = len(re.findall(r'<div[^>]*class="[^"]*js-plotly-plot', dom))
    assert n_figures >= 2 and drawn == n_figures, (drawn, n_figures)
    assert dom.count('class="main-svg"') >= n_figures


def test_report_shows_the_polysemanticity_sensitivity_curve(tmp_path):
    run = _fake_run(tmp_path / "r")
    curve = pd.DataFrame({"threshold": [0.05, 0.15, 0.3], "share": [0.9, 0.5, 0.1],
                          "null_mean": [0.95, 0.6, 0.2], "null_q95": [1.0, 0.7, 0.3]})
    run.save("polysemanticity_null", {"share": 0.5, "point": -0.1, "null": [0.6], "boots": [0.0],
                                     "curve": curve.to_dict("records")})  # as phase 5 stores it
    s = [x for x in sections(run) if x.title.startswith("Applications")][0]
    titles = [t for t, _ in s.tables]
    assert any("sensitivity to the coefficient threshold" in t for t in titles)
    assert any("threshold" in (f.layout.title.text or "") for f in s.figures)
