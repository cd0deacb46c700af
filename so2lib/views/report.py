"""The run's front page: ``report.html``, a self-contained research summary of one run directory.

It shows what was run (model, data, per-task counts, times), the headline figures (accuracy per
task, layer ablation, first- vs second-order per layer), the validation table with its nulls and
verdicts, and the application results against their baselines. Every section opens with one
sentence saying what the reader is looking at, and the page links to the executed notebooks.
The page embeds plotly.js once, so it opens offline. Sections whose artifacts are missing are
left out; a section that cannot be drawn says so instead of breaking the page.

    python -m so2lib.views.report outputs/runs/embedded      # (re)write and print the summary
"""

from __future__ import annotations

import dataclasses
import html
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from so2lib.runs.rundir import Run, atomic_write
from so2lib.stats import study_holm, wilson_interval
from so2lib.views.summary import compact_text, fmt

# ----------------------------------------------------------------------------- formatting


def table_html(df: pd.DataFrame, verdict_col: str | None = None) -> str:
    """An HTML table with every cell formatted by :func:`fmt`; nothing is cut off. Rows whose
    ``verdict_col`` is established / refuted / inconclusive / not testable (or an older run's pass /
    fail) are coloured; rows measured on the training split (``split == "training"``) are marked."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, r in df.iterrows():
        classes = []
        if verdict_col and verdict_col in df.columns:
            classes.append(f"v-{str(r[verdict_col]).replace(' ', '-')}")
        if "split" in df.columns and str(r["split"]) == "training":
            classes.append("s-training")
        cls = f' class="{" ".join(classes)}"' if classes else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r.values) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def dict_table(d: dict[str, Any], prefix: str = "") -> pd.DataFrame:
    """A flat ``{item: value}`` table from a nested dict (keys of nested dicts joined by ': ')."""
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not all(str(x).isdigit() for x in v):
            rows += dict_table(v, f"{key}: ").to_dict("records")
        else:
            rows.append({"item": key.replace("_", " "), "value": fmt(v)})
    return pd.DataFrame(rows, columns=["item", "value"])


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass
class Section:
    """One block of the report: a title, one sentence for the reader, then tables and figures."""

    title: str
    sentence: str
    tables: list[tuple[str, pd.DataFrame]] = dataclasses.field(default_factory=list)
    figures: list[go.Figure] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _get(run: Run, name: str) -> Any:
    return run.load(name) if run.has(name) else None


def section_run(run: Run) -> Section:
    m = run.manifest
    model = m.get("model", {})
    data = m.get("data", {})
    cfg = m.get("config", {})
    what = {"model": model.get("name", cfg.get("model")),
            "layers x d_model x d_mlp": f"{model.get('n_layers')} x {model.get('d_model')} x {model.get('d_mlp')}"
            if model else None,
            "problems (train / validation)": f"{fmt(data.get('n_train'))} / {fmt(data.get('n_val'))}",
            "seed": cfg.get("seed"),
            "template": fmt(data.get("template")) if data.get("template") else None,
            "machine": f"{m.get('machine', {}).get('cpus')} CPUs, GPU: {m.get('machine', {}).get('gpu') or 'none'}",
            "torch / transformer-lens": f"{m.get('versions', {}).get('torch')} / "
                                        f"{m.get('versions', {}).get('transformer-lens')}"}
    s = Section("What was run", "The model, the problems and the machine of this run; every number below "
                "comes from this run directory.")
    s.tables.append(("", dict_table({k: v for k, v in what.items() if v is not None})))
    per_task = data.get("per_task")
    if per_task:
        s.tables.append(("Problems per task (generated and kept after tokenization filters)",
                         pd.DataFrame([{"task": t, **v} for t, v in per_task.items()])))
    else:
        probs = _get(run, "problems")
        if probs is not None:
            counts = pd.DataFrame([{"task": p["task"], "split": sp} for sp in ("train", "val") for p in probs[sp]])
            if len(counts):
                s.tables.append(("Problems per task", counts.groupby(["task", "split"]).size()
                                 .unstack(fill_value=0).reset_index()))
    nbs = m.get("notebook_seconds", {})
    if nbs:
        times = pd.DataFrame([{"notebook": k, "seconds": round(float(v), 1)} for k, v in nbs.items()])
        times.loc[len(times)] = {"notebook": "total", "seconds": round(float(times.seconds.sum()), 1)}
        s.tables.append(("Wall time per notebook", times))
    return s


def section_accuracy(run: Run) -> Section | None:
    acc = _get(run, "accuracy")
    if acc is None:
        return None
    val = acc[acc.split == "val"].drop(columns="split").rename_axis("task").reset_index()
    lo, hi = (np.array(v) for v in zip(*(wilson_interval(int(k), int(n))
                                          for k, n in zip(val.n_correct.values, val.n.values))))
    val = val.assign(ci_low=lo, ci_high=hi)
    fig = go.Figure(go.Bar(x=val.task, y=val.accuracy, text=[f"{a:.0%}" for a in val.accuracy],
                           error_y=dict(type="data", symmetric=False, array=hi - val.accuracy,
                                        arrayminus=val.accuracy - lo)))
    fig.update_layout(title="Validation accuracy per task (95% Wilson interval)", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.05], height=380)
    s = Section("Accuracy per task", "How often the model's greedy answer is exactly the gold answer on "
                "held-out validation problems; the bars' whiskers are 95% intervals. The analyses below need "
                "both correct and incorrect problems.", figures=[fig])
    s.tables.append(("", val))
    return s


def section_layers(run: Run) -> Section | None:
    abl = _get(run, "layer_ablation")
    if abl is None:
        return None
    sel = _get(run, "selection") or {}
    crit = sel.get("critical_layers", [])
    fig = px.bar(abl, x="layer", y="accuracy_drop", color="kind", barmode="group",
                 title="Accuracy drop when one MLP layer's output is replaced (forward pass, training split)")
    fig.update_layout(yaxis_tickformat=".0%", height=380)
    for l in crit:
        fig.add_vline(x=l, line_dash="dot", line_color="gray")
    s = Section("Which MLP layers matter", "Each MLP layer's output is replaced by its training mean (or by "
                f"zero) in a real forward pass; the dotted lines mark the critical layers ({fmt(crit)}) "
                "chosen from this ablation for the neuron-level analysis.", figures=[fig])
    out = _get(run, "output_space_ablation")
    if out is not None and {"layer", "ablation", "accuracy_drop"} <= set(out.columns):
        f2 = px.bar(out, x="layer", y="accuracy_drop", color="ablation", barmode="group",
                    error_y=(out.ci_high - out.accuracy_drop) if "ci_high" in out.columns else None,
                    error_y_minus=(out.accuracy_drop - out.ci_low) if "ci_low" in out.columns else None,
                    title="Per layer: accuracy drop when the second-order or the direct part is mean-replaced "
                          "(validation), or the whole output (forward pass, training split)")
        f2.update_layout(yaxis_tickformat=".0%", height=400)
        s.figures.append(f2)
        s.notes.append("Second order vs first order: where a layer's influence on the answer flows. A small "
                       "second-order bar next to a large total bar means the layer acts mostly directly or "
                       "through paths that are neither.")
    return s


def _verdicts(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "verdict" not in df.columns and "pass" in df.columns:  # older runs
        df["verdict"] = df["pass"].map({True: "pass", False: "fail"}).fillna("not testable")
        df = df.drop(columns="pass")
    return df


VERDICT_TABLES = (("validation_table", "Characterization (notebook 03)"),
                  ("decomposition_table", "Sparse decomposition (notebook 04)"),
                  ("applications_table", "Applications (notebook 05)"))


def section_validation(run: Run) -> Section | None:
    found = [(name, title, _verdicts(run.load(name))) for name, title in VERDICT_TABLES if run.has(name)]
    if not found:
        return None
    # the primary rows of all tables Holm-adjusted together (each artifact adjusts within itself)
    found = [(n, t, df) for (n, t, _), df in zip(found, study_holm([df for _, _, df in found]))]
    s = Section("Validation table", "Every row of every verdict table. Each row is an estimate, usually the "
                "estimate minus its control (the strongest alternative explanation), with a 95% interval that "
                "resamples problems: 'established' when the whole interval lies on the target's side and excludes "
                "the control, 'refuted' when it lies on the other side (or within the stated margin of the "
                "control), 'inconclusive' otherwise (the minimum detectable effect, mde, says what this n could "
                "resolve), 'not testable' when the data cannot measure it, and why. The primary rows of all tables "
                "are Holm-adjusted together (p_holm, across the study; an established primary row needs p_holm < 0.05). Rows measured on the training split are marked (split = training, blue edge).")
    verdicts = pd.concat([df.verdict for _, _, df in found if "verdict" in df.columns])
    s.notes.append("Verdicts: " + ", ".join(f"{fmt(int(v))} {k}" for k, v in verdicts.value_counts().items()))
    allrows = pd.concat([df for _, _, df in found], ignore_index=True)
    if "split" in allrows:
        tr = allrows[allrows.split == "training"]
        s.notes.append(f"Measured on the training split: {len(tr)} of {len(allrows)} rows"
                       + (" (" + "; ".join(map(str, tr.measure)) + ")" if len(tr) else "") + ".")
    if "primary" in allrows:
        pr = allrows[allrows.primary.fillna(False).astype(bool)]
        if len(pr):
            s.notes.append("Primary rows: " + "; ".join(f"{m}: {v} (p_holm {fmt(ph)})" for m, v, ph in
                                                         zip(pr.measure, pr.verdict, pr.p_holm)) + ".")
    for _, title, df in found:
        s.tables.append((title if len(found) > 1 else "", df))
    return s


def section_protocol(run: Run) -> Section | None:
    clip = _get(run, "clip_protocol")
    if clip is None or not len(clip):
        return None
    df = clip.copy()
    df["label"] = "layer " + df.layer.astype(str) + " (" + df.neurons.astype(str) + ")"
    fig = px.bar(df, x="label", y="accuracy_change_points", color="edit", barmode="group",
                 error_y=df.ci_high_points - df.accuracy_change_points,
                 error_y_minus=df.accuracy_change_points - df.ci_low_points,
                 title="CLIP protocol per source layer: validation accuracy change (points, 95% paired bootstrap)")
    fig.update_layout(height=420, xaxis_title="", yaxis_title="accuracy change (points)")
    s = Section("The CLIP protocol, per layer", "Every neuron's second-order effect of a layer is replaced by its "
                "training mean ('mean'), only the significant or only the insignificant ones are, or each is "
                "replaced by its rank-1 (PC1) version; bars are accuracy changes against the clean model on "
                "validation problems. Rank-1 is faithful when it recovers most of the mean-ablation drop.",
                figures=[fig])
    cols = [c for c in ("layer", "neurons", "edit", "accuracy", "accuracy_change_points", "ci_low_points",
                        "ci_high_points", "logit_diff_change", "mcnemar_p", "gained", "lost", "n",
                        "recovered_share", "recovered_ci_low", "recovered_ci_high", "recovered_note")
            if c in df.columns]
    s.tables.append(("", df[cols]))
    return s


def section_applications(run: Run) -> Section | None:
    names = [n for n in ("error_analysis", "error_analysis_causal", "correctness_direction_auroc",
                         "polysemanticity_null", "adversarial",
                         "adversarial_guided", "editing", "editing_curve", "polysemanticity_summary",
                         "applications_summary") if run.has(n)]
    if not names:
        return None
    s = Section("Applications against their baselines", "Error analysis, adversarial problems, "
                "polysemanticity and neuron editing, each next to the baseline it has to beat (random edits, "
                "random neuron sets, permutation nulls, random directions), on validation problems except where "
                "the split column says training (the error analysis' discoveries, polysemanticity).")
    summary = _get(run, "applications_summary")
    for name in names:
        obj = run.load(name)
        if name == "applications_summary":
            flat = {k: v for k, v in obj.items() if not isinstance(v, list)}
            if flat:
                s.tables.append(("Summary", dict_table(flat)))
            continue
        if isinstance(obj, pd.DataFrame):
            title = name.replace("_", " ").capitalize()
            if len(obj) > 30:
                title += f" (first 30 of {len(obj)} rows; all in the run's artifact {name})"
            s.tables.append((title, obj.head(30)))
            if name == "editing_curve" and "factor" in obj.columns:
                ys = [c for c in obj.columns if c != "factor" and obj[c].dtype.kind == "f"
                      and not c.startswith(("ci_", "p_"))][:6]
                if ys:
                    fig = px.line(obj, x="factor", y=ys, markers=True,
                                  title="Neuron editing: validation accuracy against the scaling factor")
                    fig.update_layout(height=380, yaxis_tickformat=".0%")
                    s.figures.append(fig)
        elif isinstance(obj, dict):  # bootstrap replicates and per-neuron flags are artifacts, not table cells
            curve = obj.get("curve")
            obj = {k: v for k, v in obj.items() if k not in ("boots", "diff_boot", "within_boot", "flags", "curve")}
            s.tables.append((name.replace("_", " ").capitalize(), dict_table(obj)))
            if name == "polysemanticity_null" and isinstance(curve, list) and curve:
                curve = pd.DataFrame(curve)
                s.tables.append(("Polysemanticity: sensitivity to the coefficient threshold (training)", curve))
                ys = [c for c in ("share", "null_mean", "null_q95") if c in curve.columns]
                fig = px.line(curve, x="threshold", y=ys, markers=True,
                              title="Polysemantic share of the selected neurons and of random directions in their "
                                    "span, against the coefficient threshold (training)")
                fig.update_layout(height=380, yaxis_tickformat=".0%")
                s.figures.append(fig)
    if summary is None and not s.tables:
        return None
    return s


SECTIONS: tuple[Callable[[Run], Section | None], ...] = (
    section_run, section_accuracy, section_layers, section_validation, section_protocol, section_applications)


def sections(run: Run) -> list[Section]:
    """Every section whose artifacts exist; one that fails to build becomes a short error note."""
    out = []
    for make in SECTIONS:
        try:
            s = make(run)
        except Exception as e:  # a report must not hide the rest of the run
            s = Section(make.__name__.removeprefix("section_").replace("_", " ").capitalize(),
                        "This section could not be drawn from the run's artifacts.",
                        notes=[f"{type(e).__name__}: {e}"])
        if s is not None:
            out.append(s)
    return out


# ----------------------------------------------------------------------------- notebooks and page


def export_notebooks(run: Run) -> list[tuple[str, str | None]]:
    """Executed notebooks of the run as ``(ipynb path, html path or None)``, relative to the run;
    each is exported to HTML beside itself (nbconvert) so a browser can open it."""
    folder = run.path / "notebooks"
    out = []
    for nb in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        target = nb.with_suffix(".html")
        try:
            if not target.exists() or target.stat().st_mtime < nb.stat().st_mtime:
                from nbconvert import HTMLExporter

                body, _ = HTMLExporter().from_filename(str(nb))
                atomic_write(target, lambda p, b=body: p.write_text(b))
            out.append((f"notebooks/{nb.name}", f"notebooks/{target.name}"))
        except Exception:
            out.append((f"notebooks/{nb.name}", None))
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
p.lead{color:#444} p.note{color:#555;font-size:14px}
table{border-collapse:collapse;margin:.6em 0 1.2em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top;text-align:left;white-space:normal}
th{background:#f4f4f4} caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
tr.v-pass td,tr.v-established td{background:#e8f6e8} tr.v-fail td,tr.v-refuted td{background:#fbe9e9}
tr.v-inconclusive td{background:#fff6dc} tr.v-not-testable td{background:#f3f3f3}
tr.s-training td:first-child{border-left:4px solid #4a78c2}
nav a{margin-right:1em}
"""


def render(run: Run, secs: list[Section], notebooks: list[tuple[str, str | None]]) -> str:
    """The whole HTML page (plotly.js embedded once, so it opens offline)."""
    parts = [f"<h1>so2lib run summary</h1><p class='lead'>Run directory <code>{html.escape(str(run.path))}</code>."
             " Second-order effects of MLP neurons on math and logic problems; the method is described in the "
             "project's <code>docs/</code>.</p>"]
    if notebooks:
        links = " ".join(f"<a href='{html.escape(h or p)}'>{html.escape(Path(p).stem)}</a>" for p, h in notebooks)
        parts.append(f"<nav><b>Executed notebooks:</b> {links}</nav>")
    parts.append("<nav><b>Sections:</b> " + " ".join(
        f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(secs)) + "</nav>")
    first_fig = True
    for i, s in enumerate(secs):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2><p class='lead'>{html.escape(s.sentence)}</p>")
        for fig in s.figures:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=first_fig, config={"displaylogo": False}))
            first_fig = False
        for caption, df in s.tables:
            cap = f"<p class='note'><b>{html.escape(caption)}</b></p>" if caption else ""
            parts.append(cap + table_html(df, verdict_col="verdict"))
        for note in s.notes:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>so2lib run summary</title>"
            f"<style>{CSS}</style></head><body>" + "".join(parts) + "</body></html>")


def text_summary(secs: list[Section]) -> str:
    """The same content as compact plain text for the terminal, at most 100 columns
    (:func:`so2lib.views.summary.compact_text`: verdict tables as measure, estimate, interval, control,
    verdict; the long explanations stay in the page)."""
    return compact_text(secs)


def write_report(run: Run | str | Path, quiet: bool = False) -> Path:
    """Write ``report.html`` into the run directory, print a text summary, return the path."""
    run = run if isinstance(run, Run) else Run(run)
    secs = sections(run)
    page = render(run, secs, export_notebooks(run))
    path = run.path / "report.html"
    atomic_write(path, lambda p: p.write_text(page))
    run.register("report", path.name, "report")
    if not quiet:
        print(text_summary(secs))
    return path


if __name__ == "__main__":
    print(write_report(sys.argv[1] if len(sys.argv) > 1 else "outputs/runs/embedded"))
