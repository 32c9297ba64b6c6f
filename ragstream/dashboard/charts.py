"""Plotly figures as plain JSON specs (`{"data": [...], "layout": {...}}`).

The browser renders them with the plotly.js that the `plotly` package ships, served by the
dashboard itself (no CDN). Figures are built as dicts rather than `plotly.graph_objects`:
the same spec, without the validation cost on every page load.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

__all__ = ["bars", "lines", "stacked", "waterfall"]

Figure = dict[str, Any]

_COLOURS = {
    "ok": "#2e7d32",
    "blocked": "#f9a825",
    "error": "#c62828",
    "no_response": "#6d4c41",
    "block": "#c62828",
    "mask": "#f9a825",
    "flag": "#1565c0",
}


def _x(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _layout(title: str, y_title: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "font": {"size": 14}},
        "margin": {"l": 56, "r": 16, "t": 40, "b": 40},
        "height": 300,
        "legend": {"orientation": "h", "y": -0.2},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
        "hovermode": "x unified",
        **extra,
    }


def stacked(
    rows: Iterable[dict[str, Any]], *, x: str, group: str, y: str, title: str, y_title: str = ""
) -> Figure:
    """Stacked bars of `y` over `x`, one series per value of `group`."""
    by: dict[str, tuple[list[Any], list[Any]]] = defaultdict(lambda: ([], []))
    for row in rows:
        xs, ys = by[str(row[group])]
        xs.append(_x(row[x]))
        ys.append(row[y])
    data = [
        {
            "type": "bar",
            "name": name,
            "x": xs,
            "y": ys,
            **({"marker": {"color": _COLOURS[name]}} if name in _COLOURS else {}),
        }
        for name, (xs, ys) in sorted(by.items())
    ]
    return {"data": data, "layout": _layout(title, y_title, barmode="stack")}


def lines(
    rows: Iterable[dict[str, Any]],
    *,
    x: str,
    ys: Sequence[str] = (),
    group: str | None = None,
    y: str | None = None,
    title: str,
    y_title: str = "",
    y_range: tuple[float, float] | None = None,
) -> Figure:
    """Lines over `x`: one per column in `ys`, or one per value of `group` (of column `y`)."""
    rows = list(rows)
    data: list[dict[str, Any]] = []
    if group is not None and y is not None:
        by: dict[str, tuple[list[Any], list[Any]]] = defaultdict(lambda: ([], []))
        for row in rows:
            xs, vals = by[str(row[group])]
            xs.append(_x(row[x]))
            vals.append(row[y])
        data = [
            {"type": "scatter", "mode": "lines+markers", "name": name, "x": xs, "y": vals}
            for name, (xs, vals) in sorted(by.items())
        ]
    else:
        for col in ys:
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": col,
                    "x": [_x(r[x]) for r in rows],
                    "y": [r[col] for r in rows],
                }
            )
    layout = _layout(title, y_title)
    if y_range is not None:
        layout["yaxis"]["range"] = list(y_range)
    return {"data": data, "layout": layout}


def bars(
    rows: Iterable[dict[str, Any]], *, label: str, value: str, title: str, group: str | None = None
) -> Figure:
    """Horizontal bars of `value` per `label` (stacked by `group` when given)."""
    rows = list(rows)
    data: list[dict[str, Any]]
    if group is None:
        data = [
            {
                "type": "bar",
                "orientation": "h",
                "y": [str(r[label]) for r in rows],
                "x": [r[value] for r in rows],
                "name": value,
            }
        ]
    else:
        by: dict[str, tuple[list[Any], list[Any]]] = defaultdict(lambda: ([], []))
        for r in rows:
            ls, vs = by[str(r[group])]
            ls.append(str(r[label]))
            vs.append(r[value])
        data = [
            {
                "type": "bar",
                "orientation": "h",
                "name": g,
                "y": ls,
                "x": vs,
                **({"marker": {"color": _COLOURS[g]}} if g in _COLOURS else {}),
            }
            for g, (ls, vs) in sorted(by.items())
        ]
    layout = _layout(title, barmode="stack", hovermode="closest")
    layout["yaxis"] = {"automargin": True, "autorange": "reversed"}
    layout["height"] = max(220, 60 + 24 * len({str(r[label]) for r in rows}))
    return {"data": data, "layout": layout}


def waterfall(spans: Sequence[tuple[str, float, float]], *, title: str) -> Figure:
    """A trace's stages as horizontal bars: (name, start ms, duration ms), first at the top."""
    data = [
        {
            "type": "bar",
            "orientation": "h",
            "y": [name for name, _, _ in spans],
            "x": [round(duration, 1) for _, _, duration in spans],
            "base": [round(start, 1) for _, start, _ in spans],
            "text": [f"{duration:,.0f} ms" for _, _, duration in spans],
            "textposition": "auto",
            "hovertemplate": "%{y}: %{x:,.1f} ms from %{base:,.1f} ms<extra></extra>",
            "marker": {"color": "#1565c0"},
        }
    ]
    layout = _layout(title, hovermode="closest", showlegend=False)
    layout["xaxis"] = {"title": {"text": "ms since the query was submitted"}, "rangemode": "tozero"}
    layout["yaxis"] = {"automargin": True, "autorange": "reversed"}
    layout["height"] = max(220, 60 + 28 * len(spans))
    return {"data": data, "layout": layout}
