"""A short summary of a run (accuracy, critical layers, validation table, application results),
printed and saved as ``report.html`` in the run directory."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from .runs import Run, atomic_write


def _get(run: Run, name: str) -> Any:
    return run.load(name) if run.has(name) else None


def summary_tables(run: Run) -> dict[str, pd.DataFrame | dict | str]:
    """What the report shows, as tables (missing phases are skipped)."""
    out: dict[str, Any] = {}
    m = run.manifest
    out["run"] = pd.DataFrame([{"model": m.get("model", {}).get("name"), "problems (train/val)":
                                f"{m.get('data', {}).get('n_train')}/{m.get('data', {}).get('n_val')}",
                                "seed": m.get("config", {}).get("seed"),
                                "notebook seconds": json.dumps(m.get("notebook_seconds", {}))}])
    acc = _get(run, "accuracy")
    if acc is not None:
        out["accuracy (validation)"] = acc[acc.split == "val"].drop(columns="split").rename_axis("task").reset_index().round(3)
    sel = _get(run, "selection")
    if sel is not None:
        out["critical layers"] = pd.DataFrame([{"critical layers": sel["critical_layers"],
                                                "selected per layer": sel["top_n"], "selected by": sel["by"]}])
    val = _get(run, "validation_table")
    if val is not None:
        out["validation table"] = val
    app = _get(run, "applications_summary")
    if app is not None:
        out["error analysis"] = pd.DataFrame(app["error_analysis"]).round(3)
        out["polysemanticity"] = pd.DataFrame([{"polysemantic share": app["polysemantic_share"],
                                                **{f"layer {k}": v for k, v in app["polysemantic_share_by_layer"].items()}}]).round(3)
        adv = pd.DataFrame(app["adversarial"]).round(3)
        adv.loc[len(adv)] = {"edit": f"ratios: number concepts / random = {app['adversarial_ratio']:.2f}; "
                                     f"neuron-guided / random = {app.get('adversarial_ratio_guided', float('nan')):.2f}"}
        out["adversarial problems (flip rate, 95% CI)"] = adv
        out["neuron editing"] = pd.DataFrame({"item": list(app["editing"]),
                                              "value": [json.dumps(v) if isinstance(v, dict) else v
                                                        for v in app["editing"].values()]})
    return out


def write_report(run: Run | str | Path) -> Path:
    """Write ``report.html`` into the run directory, print a text summary, return the path."""
    run = run if isinstance(run, Run) else Run(run)
    tables = summary_tables(run)
    parts = [f"<h1>so2lib run summary</h1><p>{html.escape(str(run.path))}</p>"]
    for title, df in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>" + df.to_html(index=False, na_rep="", escape=True))
        print(f"\n== {title}\n{df.to_string(index=False)}")
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>so2lib run</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto} table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>"
           + "".join(parts) + "</body></html>")
    path = run.path / "report.html"
    atomic_write(path, lambda p: p.write_text(doc))
    run.register("report", path.name, "report")
    return path
