"""Plotly figures for the notebooks (render in JupyterLab, Colab and exported HTML)."""

from __future__ import annotations

import sys

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio


def use_notebook_renderers() -> str:
    """Pick plotly renderers that work in JupyterLab, Colab and exported HTML.

    Colab gets its own renderer; elsewhere the JupyterLab mimetype plus an HTML copy with
    plotly.js embedded once per notebook, so executed notebooks exported to HTML (and viewed
    offline) still show the figures. Called on import of this module.
    """
    pio.renderers.default = "colab" if "google.colab" in sys.modules else "plotly_mimetype+notebook"
    return pio.renderers.default


use_notebook_renderers()


def accuracy_by_task(table: pd.DataFrame, title: str = "Accuracy per task") -> go.Figure:
    df = table.reset_index().rename(columns={"index": "task"})
    fig = px.bar(df, x="task", y="accuracy", text=df.accuracy.map("{:.0%}".format),
                 hover_data=["n", "n_correct", "mean_logit_diff"], title=title)
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    return fig


def ablation_drop(ablation: pd.DataFrame, critical: list[int] | None = None) -> go.Figure:
    fig = px.bar(ablation, x="layer", y="accuracy_drop", color="kind", barmode="group",
                 hover_data=["accuracy", "mean_logit_diff", "logit_diff_drop"],
                 title="Accuracy drop when each MLP layer's output is ablated (training split)")
    fig.update_yaxes(tickformat=".0%")
    for l in critical or []:
        fig.add_vline(x=l, line_dash="dot", line_color="gray")
    return fig


def score_distributions(scores: pd.DataFrame, selected: dict[int, list[int]] | None = None) -> go.Figure:
    df = scores.melt(id_vars=["layer", "neuron"], var_name="score", value_name="value")
    if selected:
        sel = {(l, n) for l, ns in selected.items() for n in ns}
        df["selected"] = [(l, n) in sel for l, n in zip(df.layer, df.neuron)]
    fig = px.box(df, x="layer", y="value", color="selected" if selected else None, facet_col="score",
                 points=False, title="Neuron scores per layer (training split, at the answer position)")
    fig.update_yaxes(matches=None, showticklabels=True, type="log")
    return fig


def effect_distributions(long: pd.DataFrame, title: str) -> go.Figure:
    """``long`` with columns layer, order (first/second), value."""
    fig = px.violin(long, x="layer", y="value", color="order", box=True, points=False, title=title)
    return fig


def bars(df: pd.DataFrame, x: str, y: str, color: str | None = None, title: str = "", **kw) -> go.Figure:
    return px.bar(df, x=x, y=y, color=color, barmode="group", title=title, **kw)
