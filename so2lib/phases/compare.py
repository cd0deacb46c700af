"""The cross-model table: two or more run directories side by side, one row per claim.

    python -m so2lib.phases.compare outputs/runs/smollm2 outputs/runs/gemma3          # prints the table
    python -m so2lib.phases.compare A B --html compare.html                            # and writes a page
    python -m so2lib.phases.compare --export outputs/runs/gemma3 gemma3.json           # a run's summary file

Each argument is a run directory or a summary file written by ``--export`` (the run's manifest and
its current verdict tables, a few hundred kB): a summary can be committed and compared later against
a run made on another machine or day, without the run directory.

Each run's verdict tables (:data:`so2lib.views.report.VERDICT_TABLES`) are read read-only; rows are
matched by ``measure`` and classified by the criterion of ``docs/compare.md`` (written before any
result): ``replicates``, ``same verdict, sizes differ``, ``contradicts``, ``undetermined``,
``not comparable``. The header lists each run's inputs and every recorded setting that differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from so2lib.runs.rundir import Run
from so2lib.stats import study_holm

DECISIVE = ("established", "refuted")
OUTCOMES = ("replicates", "same verdict, sizes differ", "contradicts", "undetermined", "description",
            "not comparable")
# settings that differ between runs of different models by design
BY_DESIGN = {"model", "calibration.levels"}


class CompareError(ValueError):
    """Inputs that cannot be compared (not a run directory, no verdict tables, fewer than two)."""


EXPORT_FORMAT = "so2lib run summary"
EXPORT_VERSION = 1


class RunSummary:
    """A run read back from an ``--export`` file: its manifest and verdict tables, with the
    ``path`` / ``manifest`` / ``has`` / ``load`` that :func:`verdict_rows` and :func:`header` read."""

    def __init__(self, path: Path, manifest: dict[str, Any], tables: dict[str, pd.DataFrame]):
        self.path, self.manifest, self._tables = path, manifest, tables

    def has(self, name: str) -> bool:
        return name in self._tables

    def load(self, name: str) -> pd.DataFrame:
        return self._tables[name].copy()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str)):
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def export_summary(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``out``: the run's manifest and every verdict table it holds, each loaded through the
    run's checks (present, intact, current: a stale table raises, as in the report). Returns ``out``."""
    run = open_read_only(run_dir)
    tables = {name: {"columns": [str(c) for c in df.columns],
                     "rows": [[_jsonable(v) for v in r] for r in df.itertuples(index=False)]}
              for name, df in _verdict_tables(run).items()}
    doc = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "source": str(Path(run_dir).resolve()),
           "manifest": _jsonable(run.manifest), "tables": tables}
    out = Path(out)
    out.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return out


def _open_summary(p: Path) -> RunSummary:
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f"{p} is not a run summary ({e}): write one with "
                           f"python -m so2lib.phases.compare --export RUN_DIR {p.name}") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise CompareError(f"{p} is not a run summary (no format {EXPORT_FORMAT!r}): write one with "
                           f"python -m so2lib.phases.compare --export RUN_DIR {p.name}")
    if doc.get("version") != EXPORT_VERSION:
        raise CompareError(f"{p} is a run summary of version {doc.get('version')}; this so2lib reads "
                           f"version {EXPORT_VERSION}: export the run again")
    tables = {n: pd.DataFrame(t["rows"], columns=t["columns"]) for n, t in doc["tables"].items()}
    return RunSummary(p, doc["manifest"], tables)


def open_read_only(path: str | Path) -> Run | RunSummary:
    """A :class:`Run` on an existing run directory that writes nothing (no manifest update, no
    lock, no progress log), or a :class:`RunSummary` for a ``.json`` file written by
    :func:`export_summary`; raises :class:`CompareError` for anything else."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return _open_summary(p)
    if not p.is_dir():
        raise CompareError(f"{path} is not a directory: pass run directories (made by so2lib.runs.runner) "
                           f"or run summaries (.json, from --export)")
    if not (p / "manifest.json").is_file():
        raise CompareError(f"{path} is not a run directory: it has no manifest.json")
    run = Run.__new__(Run)
    run.path, run.manifest_path, run._inputs = p, p / "manifest.json", {}
    m = run._read_manifest()
    run.manifest = m
    return run


def _label(run: Run | RunSummary, used: set[str]) -> str:
    base = str(run.manifest.get("config", {}).get("model") or run.path.stem)
    name, i = base, 2
    while name in used:
        name, i = f"{base} ({run.path.stem})" if i == 2 else f"{base} #{i}", i + 1
    used.add(name)
    return name


def _verdict_tables(run: Run | RunSummary) -> dict[str, pd.DataFrame]:
    """The verdict tables a run holds, ``{name: table}`` in report order, each loaded through the
    run's checks (a damaged or stale table raises); refuses a run with none of them."""
    from so2lib.views.report import VERDICT_TABLES

    tables = {name: run.load(name) for name, _title in VERDICT_TABLES if run.has(name)}
    if not tables:
        raise CompareError(f"{run.path} holds none of the verdict tables "
                           f"{[n for n, _ in VERDICT_TABLES]}: run notebooks 03-05 into it first")
    return tables


def verdict_rows(run: Run | RunSummary) -> pd.DataFrame:
    """Every verdict row of a run (all of its verdict tables), keyed by ``measure``; the
    ``table`` column names the table; primary rows carry the study-wide Holm adjustment
    (:func:`so2lib.stats.study_holm`). Refuses a run with none of them."""
    from so2lib.views.report import _verdicts

    frames = []
    for name, raw in _verdict_tables(run).items():
        df = _verdicts(raw)
        if "measure" not in df.columns:
            raise CompareError(f"{run.path}: table {name!r} has no 'measure' column")
        frames.append(df.assign(table=name))
    frames = study_holm(frames)  # primary rows: Holm across the run's tables, as its report reads them
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates("measure", keep="first").set_index("measure")


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def classify(rows: Sequence[dict[str, Any] | None]) -> str:
    """The outcome of one claim over the runs (``None``: the run lacks the row), by the
    criterion of docs/compare.md."""
    if any(r is None for r in rows) or any(r.get("verdict") == "not testable" for r in rows):
        return "not comparable"
    if any(r.get("verdict") == "description" for r in rows):
        return "description"
    verdicts = [r.get("verdict") for r in rows]
    if "established" in verdicts and "refuted" in verdicts:
        return "contradicts"
    if all(v in DECISIVE for v in verdicts) and len(set(verdicts)) == 1:
        lo = [_num(r.get("ci_low")) for r in rows]
        hi = [_num(r.get("ci_high")) for r in rows]
        if any(math.isnan(x) for x in lo + hi):
            return "not comparable"
        return "replicates" if max(lo) <= min(hi) else "same verdict, sizes differ"
    return "undetermined"


def _settings(run: Run | RunSummary) -> dict[str, Any]:
    """The recorded inputs of a run, flattened (what the header compares)."""
    m = run.manifest
    cfg = dict(m.get("config", {}))
    phase1 = cfg.pop("phase1", {}) or {}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if k not in ("device", "batch_size"):
            out[k] = v
    for k, v in phase1.items():
        out.setdefault(k, v)
    data = m.get("data", {})
    for k in ("n_train", "n_val", "hash", "position"):
        if k in data:
            out[f"data.{k}"] = data[k]
    cal = m.get("calibration")
    if cal:
        out["calibration.levels"] = {t: v.get("level") for t, v in cal.get("tasks", {}).items()}
    for name, entry in sorted(m.get("artifacts", {}).items()):
        if entry.get("params"):
            for k, v in entry["params"].items():
                if k in ("model", "dtype", "template"):
                    continue
                out.setdefault(f"{name}.{k}", v)
    return out


def header(runs: Sequence[Run], labels: Sequence[str]) -> dict[str, Any]:
    """Per run its main inputs, and every setting that differs (``mismatched``: not by design)."""
    sets = [_settings(r) for r in runs]
    keys = sorted(set().union(*sets))
    differ = {k: [s.get(k) for s in sets] for k in keys if len({repr(s.get(k)) for s in sets}) > 1}
    per_run = []
    for r, lab, s in zip(runs, labels, sets):
        m = r.manifest
        per_run.append({"run": lab, "dir": str(r.path), "model": s.get("model"), "n_train": m.get("data", {}).get("n_train"),
                        "n_val": m.get("data", {}).get("n_val"), "seed": s.get("seed"), "tasks": s.get("tasks"),
                        "template": s.get("template"), "n_shots": s.get("n_shots"),
                        "calibrated": bool(m.get("calibration")), "problems_hash": m.get("data", {}).get("hash"),
                        "machine": (m.get("machine") or {}).get("cpu") or (m.get("machine") or {}).get("platform"),
                        "notebook_seconds": sum((m.get("notebook_seconds") or {}).values()) or None})
    mismatched = {k: v for k, v in differ.items() if k not in BY_DESIGN and not k.startswith("data.hash")}
    return {"runs": per_run, "differs": differ, "mismatched": mismatched,
            "same_problems": len({repr(s.get("data.hash")) for s in sets}) == 1}


def compare_runs(dirs: Sequence[str | Path]) -> dict[str, Any]:
    """Read the runs and build ``{"header", "table", "labels", "counts"}``. ``table``: one row
    per claim (union of all runs' measures, first-seen order), with per run
    ``{label}: measured / ci_low / ci_high / verdict / split / mde`` and the ``outcome``."""
    if len(dirs) < 2:
        raise CompareError(f"compare needs two or more run directories, got {len(dirs)}")
    runs = [open_read_only(d) for d in dirs]
    used: set[str] = set()
    labels = [_label(r, used) for r in runs]
    tables = [verdict_rows(r) for r in runs]
    order: list[str] = []
    for t in tables:
        order += [m for m in t.index if m not in order]
    recs = []
    for m in order:
        rows = [t.loc[m].to_dict() if m in t.index else None for t in tables]
        rec: dict[str, Any] = {"measure": m, "table": next(r["table"] for r in rows if r is not None)}
        for lab, r in zip(labels, rows):
            for c in ("measured", "ci_low", "ci_high", "verdict", "mde", "split"):
                rec[f"{lab}: {c}"] = (r.get(c) if r is not None else ("missing" if c == "verdict" else None))
        rec["outcome"] = classify(rows)
        missing = [lab for lab, r in zip(labels, rows) if r is None]
        rec["note"] = f"missing in {', '.join(missing)}" if missing else ""
        recs.append(rec)
    table = pd.DataFrame(recs).set_index("measure")
    counts = {o: int((table.outcome == o).sum()) for o in OUTCOMES}
    return {"header": header(runs, labels), "table": table, "labels": labels, "counts": counts}


def header_text(h: dict[str, Any]) -> str:
    lines = ["Runs compared:"]
    for r in h["runs"]:
        lines.append(f"  - {r['run']}: {r['dir']} | model {r['model']} | n_train {r['n_train']}, n_val {r['n_val']}, "
                     f"seed {r['seed']} | tasks {r['tasks']} | template {r['template']}, shots {r['n_shots']} | "
                     f"calibrated {r['calibrated']} | problems hash {r['problems_hash']}")
    lines.append("Same problem set: " + ("yes" if h["same_problems"] else "no (different problems in each run)"))
    if h["mismatched"]:
        lines.append("MISMATCHED INPUTS (a difference in verdict may come from these, not from the model):")
        for k, v in h["mismatched"].items():
            lines.append(f"  - {k}: " + " | ".join(map(repr, v)))
    else:
        lines.append("No mismatched inputs beyond the model" + (" and the calibrated levels" if any(
            k == "calibration.levels" for k in h["differs"]) else "") + ".")
    return "\n".join(lines)


def figure(result: dict[str, Any]):
    """Side-by-side interval plot: one panel per run, one line per claim (estimate and 95%
    interval), coloured by verdict; the outcome in the hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tab, labels = result["table"], result["labels"]
    colours = {"established": "#1b9e77", "refuted": "#d95f02", "inconclusive": "#7570b3",
               "not testable": "#999999", "description": "#66a61e", "missing": "#cccccc"}
    fig = make_subplots(rows=1, cols=len(labels), shared_yaxes=True, subplot_titles=labels)
    ys = list(tab.index)
    for j, lab in enumerate(labels, 1):
        for v, col in colours.items():
            sel = tab[tab[f"{lab}: verdict"] == v]
            if sel.empty:
                continue
            x = pd.to_numeric(sel[f"{lab}: measured"], errors="coerce")
            lo = pd.to_numeric(sel[f"{lab}: ci_low"], errors="coerce")
            hi = pd.to_numeric(sel[f"{lab}: ci_high"], errors="coerce")
            fig.add_trace(go.Scatter(
                x=x, y=list(sel.index), mode="markers", marker=dict(color=col, size=8), name=v,
                legendgroup=v, showlegend=j == 1,
                error_x=dict(type="data", symmetric=False, array=(hi - x).tolist(), arrayminus=(x - lo).tolist()),
                customdata=sel["outcome"], hovertemplate="%{y}<br>%{x:.3g}<br>outcome: %{customdata}<extra>" + v + "</extra>"),
                row=1, col=j)
    fig.update_yaxes(categoryorder="array", categoryarray=ys[::-1])
    fig.update_layout(title="Verdict rows side by side (estimate and 95% interval per run)",
                      height=max(400, 22 * len(ys) + 150))
    return fig


def outcome_figure(result: dict[str, Any]):
    """Bar chart of the outcomes (how many claims replicate, contradict, ...)."""
    import plotly.express as px

    c = result["counts"]
    return px.bar(x=list(c), y=list(c.values()), labels={"x": "outcome", "y": "claims"},
                  title="Claims by cross-run outcome (criterion: docs/compare.md)")


def summary_table(result: dict[str, Any]) -> pd.DataFrame:
    """A compact view: per run ``estimate [lo, hi] verdict``, then the outcome."""
    tab, labels = result["table"], result["labels"]

    def cell(row: pd.Series, lab: str) -> str:
        v = row[f"{lab}: verdict"]
        if v == "missing":
            return "missing"
        x, lo, hi = (_num(row[f"{lab}: {c}"]) for c in ("measured", "ci_low", "ci_high"))
        tr = " (training)" if row.get(f"{lab}: split") == "training" else ""
        return f"{x:.3g} [{lo:.3g}, {hi:.3g}] {v}{tr}" if not math.isnan(x) else f"{v}{tr}"
    out = pd.DataFrame({lab: [cell(r, lab) for _, r in tab.iterrows()] for lab in labels}, index=tab.index)
    out["outcome"] = tab.outcome
    return out


def write_html(result: dict[str, Any], path: str | Path) -> Path:
    """The table and its figures as one self-contained page: plotly.js is embedded (about 4.6 MB),
    as in ``report.html``, so the figures render offline."""
    import html

    path = Path(path)
    body = [f"<h1>so2lib cross-run comparison</h1><pre>{html.escape(header_text(result['header']))}</pre>",
            "<p>Criterion: docs/compare.md (fixed before any result).</p>",
            summary_table(result).to_html(), figure(result).to_html(full_html=False, include_plotlyjs=True),
            outcome_figure(result).to_html(full_html=False, include_plotlyjs=False)]
    path.write_text("<html><head><meta charset='utf-8'></head><body>" + "\n".join(body) + "</body></html>")
    return path


#: the notebook each verdict table comes from (the README's tables name it)
_TABLE_NOTEBOOK = {"validation_table": "03", "decomposition_table": "04", "applications_table": "05"}


def markdown_rows(run: str | Path) -> str:
    """Every verdict row of one run (directory or summary) as a markdown table, as the README shows
    them: notebook, row, estimate with its 95% interval, control, verdict (with the minimum
    detectable effect of an inconclusive row, and ``primary`` with the study-wide ``p_holm``), split."""
    from so2lib.views.summary import _fmt, _interval

    df = verdict_rows(open_read_only(run))
    out = ["| table | row | estimate [95% interval] | control | verdict | split |", "|---|---|---|---|---|---|"]
    for m, r in df.iterrows():
        est = "" if math.isnan(_num(r.get("measured"))) else _fmt(r.get("measured"))
        if est and not math.isnan(_num(r.get("ci_low"))):
            est += " " + _interval(r.get("ci_low"), r.get("ci_high"))
        ctrl = "" if math.isnan(_num(r.get("control"))) or not est else _fmt(r.get("control"))
        v = str(r.get("verdict"))
        if v == "inconclusive" and not math.isnan(_num(r.get("mde"))):
            v += f" (mde {_fmt(r.get('mde'))})"
        if r.get("primary") is True or r.get("primary") == 1:
            v += ", primary" + ("" if math.isnan(_num(r.get("p_holm"))) else f", p_holm {_fmt(r.get('p_holm'))}")
        out.append(f"| {_TABLE_NOTEBOOK.get(r.get('table'), r.get('table'))} | {m} | {est} | {ctrl} | {v} | "
                   f"{r.get('split') or ''} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="two or more run directories or run summaries (.json)")
    ap.add_argument("--export", nargs=2, metavar=("RUN_DIR", "OUT_JSON"),
                    help="write RUN_DIR's manifest and verdict tables to OUT_JSON and stop")
    ap.add_argument("--html", help="also write the table and figures to this HTML file")
    ap.add_argument("--csv", help="also write the full table to this CSV file")
    ap.add_argument("--markdown", metavar="RUN", help="print every verdict row of one run (directory or summary) "
                                                       "as a markdown table, as the README shows them, and stop")
    a = ap.parse_args(argv)
    if a.markdown:
        try:
            print(markdown_rows(a.markdown))
        except (CompareError, FileNotFoundError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        return
    if a.export:
        try:
            print(f"wrote {export_summary(*a.export)}")
        except (CompareError, FileNotFoundError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        return
    try:
        res = compare_runs(a.runs)
    except (CompareError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(header_text(res["header"]))
    with pd.option_context("display.width", 250, "display.max_colwidth", 60, "display.max_rows", 500):
        print(summary_table(res).to_string())
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in res["counts"].items()))
    if a.csv:
        res["table"].to_csv(a.csv)
    if a.html:
        print(f"wrote {write_html(res, a.html)}")


if __name__ == "__main__":
    main()
