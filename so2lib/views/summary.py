"""The end-of-run text summary for a terminal: compact tables that fit 100 columns.

Verdict tables (any frame with a ``verdict`` column, columns as in
:data:`so2lib.stats.TABLE_COLUMNS`) become five columns: measure, estimate, interval, control
and verdict; an inconclusive row shows its minimum detectable effect (``mde``) and a row
measured on the training split is marked ``[train]``. Other tables keep their columns as far
as they fit (cells are shortened with ``…``; columns that do not fit are named below the
table). The long explanations (the ``how`` column) stay in ``report.html`` and
``docs/measurements.md``. Built from the columns that are there: any rows, missing columns
and missing values are tolerated.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Iterable

import numpy as np
import pandas as pd

WIDTH = 100
VERDICT_COLUMNS = ("measure", "estimate", "interval", "control", "verdict")


def fmt(v: Any) -> str:
    """One cell as text: integers without decimals, floats to 3 significant digits (4 decimals
    for small shares), booleans as yes/no, missing values as an empty cell."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return ""
        if math.isinf(f):
            return "∞" if f > 0 else "-∞"
        if f.is_integer() and abs(f) < 1e15:
            return str(int(f))
        return f"{f:.3g}" if abs(f) >= 1e-3 else f"{f:.2e}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, np.ndarray):
        return ", ".join(fmt(x) for x in v.tolist())
    if isinstance(v, dict):
        return "; ".join(f"{k}: {fmt(x)}" for k, x in v.items())
    return str(v)


def _fmt(v: Any) -> str:
    try:
        return fmt(v)
    except Exception:  # noqa: BLE001 - a summary never fails on an odd cell
        return str(v)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _cut(s: str, n: int) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else (s[:max(n - 1, 0)] + "…" if n > 0 else "")


def _interval(lo: Any, hi: Any) -> str:
    lo, hi = _num(lo), _num(hi)
    if math.isnan(lo) and math.isnan(hi):
        return ""
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def verdict_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The five compact columns of a verdict table (strings)."""
    out = []
    for _, r in df.iterrows():
        get = lambda c: r[c] if c in r.index else None  # noqa: E731
        measure = _fmt(get("measure"))
        if str(get("split") or "").lower().startswith("train"):
            measure += " [train]"
        verdict = _fmt(get("verdict"))
        mde = _num(get("mde"))
        if verdict == "inconclusive" and not math.isnan(mde):
            verdict += f" (mde {_fmt(mde)})"
        if get("primary") is True and not math.isnan(_num(get("p_holm"))):
            verdict += f" p_holm={_fmt(_num(get('p_holm')))}"
        out.append({"measure": measure, "estimate": _fmt(get("measured")),
                    "interval": _interval(get("ci_low"), get("ci_high")), "control": _fmt(get("control") if "control" in r.index else get("null")),
                    "verdict": verdict})
    return pd.DataFrame(out, columns=list(VERDICT_COLUMNS))


def fit_table(df: pd.DataFrame, width: int = WIDTH, wide_first: bool = True) -> list[str]:
    """``df`` (string cells) as text lines of at most ``width`` characters: the first column
    (the name) takes the room the others leave; other cells are cut at 24 characters; columns
    that do not fit are left out and named in a last line."""
    cols = [str(c) for c in df.columns]
    cells = [[" ".join(str(v).split()) for v in row] for row in df.astype(str).values.tolist()]
    if not cols:
        return []
    cap = [min(max([len(c)] + [len(r[j]) for r in cells]), 24 if j else 10 ** 6) for j, c in enumerate(cols)]
    keep = len(cols)
    while keep > 1 and sum(cap[1:keep]) + 2 * (keep - 1) + 8 > width:
        keep -= 1
    rest = width - (sum(cap[1:keep]) + 2 * (keep - 1))
    cap[0] = max(8, min(cap[0], rest))
    if sum(cap[:keep]) + 2 * (keep - 1) > width:  # one very wide column alone
        cap[0] = width
    lines = []
    for row in [cols] + cells:
        parts = []
        for j in range(keep):
            t = _cut(row[j], cap[j])
            numeric = j > 0 and row is not cols and _looks_numeric(t)
            parts.append(t.rjust(cap[j]) if numeric else t.ljust(cap[j]))
        lines.append("  ".join(parts).rstrip())
    if keep < len(cols):
        lines.append(_cut(f"(also in report.html: {', '.join(cols[keep:])})", width))
    return lines


def _looks_numeric(s: str) -> bool:
    return bool(s) and s.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).replace("+", "", 1).isdigit()


def table_lines(df: pd.DataFrame, width: int = WIDTH) -> list[str]:
    """A verdict table in its compact form, any other table fitted to ``width``."""
    if "verdict" in df.columns:
        lines = fit_table(verdict_rows(df), width)
        if "split" in df.columns and df["split"].astype(str).str.lower().str.startswith("train").any():
            lines.append("[train]: measured on training problems (the other rows on held-out validation problems)")
        return lines
    return fit_table(df.map(_fmt), width)


def compact_text(sections: Iterable[Any], width: int = WIDTH) -> str:
    """Sections of the report (``title``, ``tables``, ``notes``) as terminal text no wider than
    ``width``; ends by pointing to the full explanations."""
    out: list[str] = []
    for s in sections:
        out.append("")
        out.append(_cut(f"== {s.title}", width))
        for caption, df in s.tables:
            if caption:
                out.append(_cut(f"-- {caption}", width))
            if not isinstance(df, pd.DataFrame) or df.empty:
                out.append("(empty)")
                continue
            out += table_lines(df, width)
        for note in s.notes:
            out += textwrap.wrap(str(note), width) or [""]
    out.append("")
    out += textwrap.wrap("How each row is measured, its control and its verdict rule: report.html and "
                         "docs/measurements.md.", width)
    return "\n".join(line[:width] for line in out)
