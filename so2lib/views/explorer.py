"""Neuron explorer: pick a layer and a neuron, see what it does.

Shows the neuron's second-order effect distribution on correct vs incorrect problems, its top
problems with per-token activation highlighting, its first- vs second-order magnitude and (for
selected neurons) its concept decomposition.

Interactive with ipywidgets when a person drives the kernel (JupyterLab, Colab, VS Code);
static output (the default neuron's view, no widgets) when the notebook is executed by
papermill/nbclient, which is detected from the kernel (nbclient executes without stdin,
see :func:`so2lib.runs.progress.interactive`), so plain ``papermill`` needs no environment
variable: nbclient never sees an ``Output`` widget being written (writing many outputs into
one under nbclient hangs it). ``SO2LIB_HEADLESS=1`` still forces the static view.
"""

from __future__ import annotations

import html
import os
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import torch

from so2lib.engine import models as M
from so2lib.phases.effects import load_effects
from so2lib.runs.progress import interactive
from so2lib.views.plots import use_notebook_renderers


def headless() -> bool:
    """Whether to show static output: no person at the kernel, or ``SO2LIB_HEADLESS`` set."""
    return bool(os.environ.get("SO2LIB_HEADLESS")) or not interactive()


class Explorer:
    """The interactive explorer: ``box`` is its widget. It shows itself once, when built;
    returned as a cell's last value it displays nothing more (no second copy)."""

    def __init__(self, box: Any):
        self.box = box

    @property
    def children(self) -> Any:
        return self.box.children

    def _ipython_display_(self) -> None:
        pass


def token_html(tokens: list[str], acts: np.ndarray, scale: float) -> str:
    """Tokens as HTML spans shaded by activation (blue positive, red negative)."""
    spans = []
    for t, a in zip(tokens, acts):
        alpha = min(1.0, abs(float(a)) / scale) if scale > 0 else 0.0
        rgb = "30,100,230" if a >= 0 else "220,50,50"
        spans.append(f'<span title="{a:.3f}" style="background: rgba({rgb},{alpha:.2f}); padding:1px 2px; '
                     f'margin:1px; border-radius:3px; font-family:monospace">{html.escape(t)}</span>')
    return "".join(spans)


@torch.no_grad()
def neuron_view(setup: Any, layer: int, neuron: int, cards: dict | None = None, top_k: int = 6) -> dict[str, Any]:
    """Everything the explorer shows for one neuron (validation split): a figure, HTML, tables."""
    run, model = setup.run, setup.model
    so = np.asarray(load_effects(run, "val", "second_ld")[:, layer, neuron])
    fo = np.asarray(load_effects(run, "val", "direct_ld")[:, layer, neuron])
    ok = setup.labels["val"].correct.values.astype(bool)
    df = pd.DataFrame({"second-order effect (logit diff)": so, "outcome": np.where(ok, "correct", "incorrect")})
    fig = px.histogram(df, x="second-order effect (logit diff)", color="outcome", barmode="overlay", nbins=40,
                       title=f"L{layer} N{neuron}: second-order effect on validation problems")
    top = np.argsort(-np.abs(so))[:top_k]
    enc = setup.enc["val"]
    x, T = enc.batch(top.tolist(), device=next(model.parameters()).device)
    store = {}
    with model.hooks(fwd_hooks=[(M.mlp_post(layer), lambda t, hook: store.__setitem__("p", t[..., neuron].float().cpu()))]):
        model(x)
    acts = store["p"].numpy()
    scale = float(np.abs(acts).max())
    terms = token_attribution(setup, layer, neuron, top, x, T)  # [k, S]
    tscale = float(np.abs(terms).max()) if terms.size else 0.0
    probs = setup.problems.val
    lines = []
    for r, i in enumerate(top):
        toks = model.tokenizer.convert_ids_to_tokens(enc.prompt_ids[i])
        verdict = "✓" if ok[i] else "✗"
        lines.append(f"<div>{verdict} <b>{so[i]:+.3f}</b> (direct {fo[i]:+.3f}) {token_html(toks, acts[r, : len(toks)], scale)}"
                     f" → gold <code>{html.escape(probs[i].answer)}</code><br>"
                     f"<small>attribution</small> {token_html(toks, terms[r, : len(toks)], tscale)}</div>")
    mags = {"mean |first-order|": float(np.abs(fo).mean()), "mean |second-order|": float(np.abs(so).mean()),
            "second / first": float(np.abs(so).mean() / max(np.abs(fo).mean(), 1e-12))}
    card = (cards or {}).get((layer, neuron))
    return {"figure": fig, "top_html": "".join(lines), "magnitudes": mags, "card": card}


@torch.no_grad()
def token_attribution(setup: Any, layer: int, neuron: int, idx: Sequence[int], x: torch.Tensor,
                      T: torch.Tensor) -> np.ndarray:
    """``[len(idx), S]``: per-source-position terms of the neuron's second-order effect on the
    logit difference (gold minus the clean run's alternative) for validation problems ``idx``
    (:func:`so2lib.engine.attribution.position_terms`; they sum to the effect)."""
    from so2lib.engine.attribution import position_terms
    from so2lib.engine.capture import capture_batch
    from so2lib.engine.second_order import engine_for

    model = setup.model
    if layer >= model.cfg.n_layers - 1:
        return np.zeros(tuple(x.shape))
    eng = engine_for(model)
    lab = setup.labels["val"]
    rows = capture_batch(model, x, T, [layer])
    U = eng.directions(torch.as_tensor(lab.gold_token.values[list(idx)]),
                       torch.as_tensor(lab.alt_token.values[list(idx)]))[:, :1]
    return position_terms(eng, rows, U, layer, [neuron])[:, 0, :, 0].cpu().numpy()


def show_neuron(setup: Any, layer: int, neuron: int, cards: dict | None = None) -> None:
    """Display one neuron's view (works headless: plain HTML, plotly and tables)."""
    from IPython.display import HTML, display

    use_notebook_renderers()
    v = neuron_view(setup, layer, neuron, cards)
    display(HTML(f"<h4>Layer {layer}, neuron {neuron}</h4>"))
    display(pd.DataFrame([v["magnitudes"]]).round(5))
    v["figure"].show()
    display(HTML("<p>Top validation problems by |second-order effect| (first line: token shading = activation; "
                 "second line: per-position attribution of the second-order effect on the logit difference, "
                 "blue = toward the gold answer; the terms sum to the effect):</p>"
                 + v["top_html"]))
    if v["card"] is not None:
        display(HTML("<p>Concept decomposition (OMP over read-out + data concepts):</p>"))
        display(v["card"].round(4))
    else:
        display(HTML("<p><i>No concept decomposition: not a selected neuron (no full effect vectors).</i></p>"))


def explorer(setup: Any, cards: dict | None = None, default: tuple[int, int] | None = None,
             interactive: bool | None = None) -> Explorer | None:
    """An ipywidgets explorer (layer and neuron pickers) when a person drives the kernel; the
    static view of ``default`` otherwise (returns ``None``). ``interactive`` forces either."""
    from IPython.display import display

    L, n_mlp = setup.model.cfg.n_layers, setup.model.cfg.d_mlp
    if default is None:
        default = next(iter(cards)) if cards else (0, 0)
    if interactive is None:
        interactive = not headless()
    if not interactive:
        show_neuron(setup, *default, cards)
        return None
    import ipywidgets as W

    layer = W.Dropdown(options=list(range(L)), value=default[0], description="layer")
    neuron = W.BoundedIntText(value=default[1], min=0, max=n_mlp - 1, description="neuron")
    picks = sorted(n for (l, n) in (cards or {}) if l == default[0])
    chooser = W.Dropdown(options=["(type a neuron)"] + picks, description="selected")
    out = W.Output()

    def refresh(*_: Any) -> None:
        with out:
            out.clear_output(wait=True)
            show_neuron(setup, int(layer.value), int(neuron.value), cards)

    def pick(change: Any) -> None:
        if isinstance(change["new"], int):
            neuron.value = change["new"]

    def relayer(change: Any) -> None:
        chooser.options = ["(type a neuron)"] + sorted(n for (l, n) in (cards or {}) if l == change["new"])
        refresh()

    layer.observe(relayer, names="value")
    neuron.observe(refresh, names="value")
    chooser.observe(pick, names="value")
    box = W.VBox([W.HBox([layer, neuron, chooser]), out])
    display(box)
    refresh()
    return Explorer(box)
