"""The cross-model table (so2lib.phases.compare) on two synthetic run directories."""

import json
import re

import numpy as np
import pytest

from so2lib.phases import compare as C
from so2lib.runs.rundir import Run
from so2lib.stats import validation_row, verdict_table


def _run(path, model, rows, seed=0, n_val=100, extra=None, table="validation_table"):
    run = Run(path, model=model, seed=seed, n_train=200, n_val=n_val, tasks=["addition"], template="fewshot",
              n_shots=3)
    run.record("data", {"n_train": 200, "n_val": n_val, "hash": 123 + seed})
    df = verdict_table([validation_row(m, x, ci, 0.0, 0.0, "how", resampled="problems") for m, x, ci in rows])
    run.save(table, df, phase="03")
    for name, df2 in (extra or {}).items():
        run.save(name, df2, phase="04")
    return path


ROWS_A = [("ablation drop", 0.10, (0.05, 0.15)),          # established
          ("size differs", 0.10, (0.08, 0.12)),           # established
          ("opposite", 0.10, (0.05, 0.15)),               # established
          ("weak", 0.02, (-0.01, 0.05)),                  # inconclusive
          ("refuted both", -0.10, (-0.15, -0.05)),        # refuted
          ("only in A", 0.2, (0.1, 0.3))]
ROWS_B = [("ablation drop", 0.12, (0.07, 0.17)),
          ("size differs", 0.30, (0.25, 0.35)),
          ("opposite", -0.10, (-0.15, -0.05)),
          ("weak", 0.10, (0.05, 0.15)),
          ("refuted both", -0.08, (-0.12, -0.04)),
          ("only in B", 0.2, (0.1, 0.3))]


def test_each_outcome_of_the_criterion(tmp_path):
    a = _run(tmp_path / "a", "model-a", ROWS_A)
    b = _run(tmp_path / "b", "model-b", ROWS_B, seed=1)
    res = C.compare_runs([a, b])
    out = res["table"].outcome
    assert out["ablation drop"] == "replicates"
    assert out["size differs"] == "same verdict, sizes differ"
    assert out["opposite"] == "contradicts"
    assert out["weak"] == "undetermined"          # cannot tell is not a failure to replicate
    assert out["refuted both"] == "replicates"
    assert out["only in A"] == "not comparable" and "missing in model-b" in res["table"].note["only in A"]
    assert res["table"].loc["only in B", "model-a: verdict"] == "missing"
    assert res["labels"] == ["model-a", "model-b"]
    assert res["counts"]["replicates"] == 2 and sum(res["counts"].values()) == 7
    # the header says the problem sets differ and lists the seed as a mismatched input
    h = res["header"]
    assert not h["same_problems"] and "seed" in h["mismatched"] and "model" not in h["mismatched"]
    assert "MISMATCHED INPUTS" in C.header_text(h) and "seed" in C.header_text(h)
    fig = C.figure(res)
    assert len(fig.data) >= 3 and len(fig.layout.annotations) == 2  # one panel per run
    s = C.summary_table(res)
    assert s.loc["ablation drop", "outcome"] == "replicates" and "[0.05, 0.15] established" in s.loc["ablation drop", "model-a"]


def test_classify_by_hand():
    e = lambda lo, hi: {"verdict": "established", "ci_low": lo, "ci_high": hi}  # noqa: E731
    assert C.classify([e(0, 1), e(0.5, 2), e(0.9, 3)]) == "replicates"     # 0.9..1 is in every interval
    assert C.classify([e(0, 1), e(0.5, 2), e(1.1, 3)]) == "same verdict, sizes differ"
    assert C.classify([e(0, 1), None]) == "not comparable"
    assert C.classify([e(0, 1), {"verdict": "not testable", "ci_low": np.nan, "ci_high": np.nan}]) == "not comparable"
    assert C.classify([e(0, 1), {"verdict": "inconclusive", "ci_low": -1, "ci_high": 1}]) == "undetermined"
    # a description tests nothing: never counted as a replication, even with overlapping intervals
    d = {"verdict": "description", "ci_low": 0, "ci_high": 1}
    assert C.classify([d, dict(d)]) == "description" and C.classify([e(0, 1), d]) == "description"


def test_same_inputs_say_no_mismatch_and_the_cli_prints(tmp_path, capsys):
    a = _run(tmp_path / "a", "model-a", ROWS_A)
    b = _run(tmp_path / "b", "model-b", ROWS_A)
    before = (tmp_path / "a" / "manifest.json").read_text()
    C.main([str(a), str(b), "--html", str(tmp_path / "c.html"), "--csv", str(tmp_path / "c.csv")])
    text = capsys.readouterr().out
    assert "No mismatched inputs beyond the model" in text and "replicates" in text
    assert (tmp_path / "c.html").exists() and (tmp_path / "c.csv").exists()
    page = (tmp_path / "c.html").read_text()
    # plotly.js embedded, no script loaded from the network: the figures render offline
    assert "<script" in page and not re.search(r"<script[^>]*\bsrc=", page)
    assert (tmp_path / "a" / "manifest.json").read_text() == before  # read-only
    assert not (tmp_path / "a" / "progress.log").exists()


def test_unusable_inputs_are_refused(tmp_path):
    a = _run(tmp_path / "a", "model-a", ROWS_A)
    with pytest.raises(C.CompareError, match="two or more"):
        C.compare_runs([a])
    with pytest.raises(C.CompareError, match="not a directory"):
        C.compare_runs([a, tmp_path / "nope"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(C.CompareError, match="not a run directory"):
        C.compare_runs([a, tmp_path / "plain"])
    Run(tmp_path / "empty", model="m")
    with pytest.raises(C.CompareError, match="none of the verdict tables"):
        C.compare_runs([a, tmp_path / "empty"])
    with pytest.raises(SystemExit, match="error: .*not a run directory"):
        C.main([str(a), str(tmp_path / "plain")])


def test_rows_from_several_tables_and_duplicate_models(tmp_path):
    import pandas as pd
    dec = verdict_table([validation_row("pc1 share", 0.3, (0.2, 0.4), 0.0, 0.0, "how", resampled="problems")])
    a = _run(tmp_path / "a", "same", ROWS_A, extra={"decomposition_table": dec})
    b = _run(tmp_path / "b", "same", ROWS_A, extra={"decomposition_table": dec})
    res = C.compare_runs([a, b])
    assert res["labels"][0] == "same" and res["labels"][1] != "same"
    assert res["table"].loc["pc1 share", "table"] == "decomposition_table"
    assert res["table"].loc["pc1 share", "outcome"] == "replicates"


def test_notebook_06_builds_the_table_headless(tmp_path):
    pm = pytest.importorskip("papermill")
    from so2lib.runs.rundir import NOTEBOOKS_DIR
    a = _run(tmp_path / "a", "model-a", ROWS_A)
    b = _run(tmp_path / "b", "model-b", ROWS_B, seed=1)
    out = tmp_path / "06.ipynb"
    pm.execute_notebook(str(NOTEBOOKS_DIR / "06_compare.ipynb"), str(out), cwd=str(NOTEBOOKS_DIR), progress_bar=False,
                        parameters={"run_dir": str(a), "compare_with": [str(b)], "html": str(tmp_path / "c.html")})
    text = json.dumps([c.get("outputs", []) for c in json.loads(out.read_text())["cells"]])
    assert "MISMATCHED INPUTS" in text and "replicates" in text and "contradicts" in text
    assert (tmp_path / "c.html").exists()


def test_a_run_summary_compares_like_its_directory(tmp_path, capsys):
    dec = verdict_table([validation_row("pc1 share", 0.3, (0.2, float("nan")), 0.0, 0.0, "how", resampled="problems")])
    a = _run(tmp_path / "a", "model-a", ROWS_A, extra={"decomposition_table": dec})
    b = _run(tmp_path / "b", "model-b", ROWS_B, seed=1)
    C.main(["--export", str(a), str(tmp_path / "a.json")])
    assert "wrote" in capsys.readouterr().out
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["format"] == C.EXPORT_FORMAT and set(doc["tables"]) == {"validation_table", "decomposition_table"}
    direct = C.compare_runs([a, b])
    via = C.compare_runs([tmp_path / "a.json", b])
    import pandas as pd
    pd.testing.assert_frame_equal(direct["table"], via["table"], check_dtype=False)
    assert direct["header"]["differs"] == via["header"]["differs"] and via["labels"] == ["model-a", "model-b"]
    # files that are not summaries are refused with what to do
    (tmp_path / "x.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(C.CompareError, match="not a run summary.*--export"):
        C.compare_runs([tmp_path / "x.json", b])
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(C.CompareError, match="not a run summary"):
        C.compare_runs([tmp_path / "y.json", b])
    bad = dict(doc, version=99)
    (tmp_path / "z.json").write_text(json.dumps(bad))
    with pytest.raises(C.CompareError, match="version 99"):
        C.compare_runs([tmp_path / "z.json", b])
    (tmp_path / "empty").mkdir()
    Run(tmp_path / "empty", model="m")
    with pytest.raises(SystemExit, match="none of the verdict tables"):
        C.main(["--export", str(tmp_path / "empty"), str(tmp_path / "e.json")])


def test_markdown_rows_print_every_row_of_one_run(tmp_path, capsys):
    a = _run(tmp_path / "a", "gpt2", ROWS_A)
    md = C.markdown_rows(a).splitlines()
    assert md[0].startswith("| table | row | estimate") and len(md) == 2 + len(ROWS_A)
    assert "| 03 | ablation drop | 0.1 [0.05, 0.15] | 0 | established | validation |" in md
    assert any("| weak |" in r and "inconclusive (mde" in r for r in md)
    C.main(["--markdown", str(a)])
    assert capsys.readouterr().out.strip().splitlines() == md
    with pytest.raises(SystemExit):
        C.main(["--markdown", str(tmp_path / "missing")])
