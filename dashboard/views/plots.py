"""Plotly figures of the dashboard, as pure functions of plain lists and dicts (no engine, no Streamlit)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

PALETTE = ["#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF",
           "#FECB52", "#1F77B4", "#8C564B", "#E377C2", "#7F7F7F", "#BCBD22", "#17BECF", "#D62728"]


@dataclass(frozen=True)
class Curve:
    """One method's curve: x and y points and the area shown in the legend (None when undefined)."""

    method: str
    x: Sequence[float]
    y: Sequence[float]
    area: float | None = None


def colour_of(i: int) -> str:
    """A stable colour for the i-th method."""
    return PALETTE[i % len(PALETTE)]


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str, height: int = 380) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=height,
                      margin={"l": 50, "r": 10, "t": 45, "b": 45},
                      legend={"font": {"size": 11}, "x": 0.99, "xanchor": "right", "y": 0.02, "yanchor": "bottom",
                              "bgcolor": "rgba(255,255,255,0.8)"},
                      template="plotly_white")
    return fig


def roc_figure(curves: Sequence[Curve], title: str = "Image-level ROC", area_name: str = "AUROC") -> go.Figure:
    """Overlaid ROC curves, one trace per method, the area in each legend entry, and the chance diagonal."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#aaa"},
                             name="chance (0.5)", hoverinfo="skip"))
    for i, c in enumerate(curves):
        fig.add_trace(go.Scatter(x=list(c.x), y=list(c.y), mode="lines", line={"color": colour_of(i), "width": 2},
                                 name=f"{c.method} ({area_name} {_fmt(c.area)})",
                                 hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<extra>" + c.method + "</extra>"))
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, title, "false-positive rate (good images flagged)", "true-positive rate (defects caught)")


def pr_figure(curves: Sequence[Curve], base_rate: float | None = None, title: str = "Image-level precision-recall"
              ) -> go.Figure:
    """Overlaid precision-recall curves (x = recall, y = precision), AP in the legend, the base rate as a line."""
    fig = go.Figure()
    if base_rate is not None:
        fig.add_trace(go.Scatter(x=[0, 1], y=[base_rate, base_rate], mode="lines", hoverinfo="skip",
                                 line={"dash": "dot", "color": "#aaa"}, name=f"chance ({base_rate:.2f})"))
    for i, c in enumerate(curves):
        fig.add_trace(go.Scatter(x=list(c.x), y=list(c.y), mode="lines", line={"color": colour_of(i), "width": 2},
                                 name=f"{c.method} (AP {_fmt(c.area)})", line_shape="hv",
                                 hovertemplate="recall %{x:.3f}<br>precision %{y:.3f}<extra>" + c.method + "</extra>"))
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, title, "recall", "precision")


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points not dominated when both x and y are better higher, ordered by x."""
    pts = [(float(x), float(y), i) for i, (x, y) in enumerate(zip(xs, ys, strict=True))]
    front = []
    for x, y, i in pts:
        dominated = any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2, _ in pts)
        if not dominated:
            front.append((x, i))
    return [i for _, i in sorted(front)]


def speed_accuracy_figure(methods: Sequence[str], speed: Sequence[float], accuracy: Sequence[float],
                          speed_title: str = "test images per second (higher is faster)",
                          accuracy_title: str = "image AUROC") -> go.Figure:
    """Accuracy against speed, one marker per method, with the Pareto front (best trade-offs) joined by a line."""
    fig = go.Figure()
    front = pareto_front(speed, accuracy)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[speed[i] for i in front], y=[accuracy[i] for i in front], mode="lines",
                                 line={"color": "#999", "dash": "dash"}, name="Pareto front", hoverinfo="skip"))
    for i, m in enumerate(methods):
        on = i in front
        fig.add_trace(go.Scatter(
            x=[speed[i]], y=[accuracy[i]], mode="markers+text", text=[m], textposition="top center",
            marker={"size": 14 if on else 10, "color": colour_of(i), "symbol": "star" if on else "circle",
                    "line": {"width": 1, "color": "#333"}},
            name=m + (" ★ best trade-off" if on else ""),
            hovertemplate=f"{m}<br>%{{x:.1f}} img/s<br>AUROC %{{y:.3f}}<extra></extra>"))
    fig.update_xaxes(type="log" if speed and max(speed) / max(min(speed), 1e-9) > 20 else "linear")
    _layout(fig, "Accuracy vs speed (★ = on the Pareto front)", speed_title, accuracy_title)
    fig.update_layout(showlegend=False)
    return fig


def per_defect_figure(methods: Sequence[str], defect_types: Sequence[str],
                      values: Sequence[Sequence[float | None]]) -> go.Figure:
    """Heatmap table: rows = methods, columns = defect types, cell = image AUROC of that type (text inside)."""
    z = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float).reshape(
        len(methods), len(defect_types))
    text = [["n/a" if v is None else f"{v:.3f}" for v in row] for row in values]
    fig = go.Figure(go.Heatmap(z=z, x=list(defect_types), y=list(methods), text=text, texttemplate="%{text}",
                               colorscale="RdYlGn", zmin=0.5, zmax=1.0, colorbar={"title": "AUROC"},
                               hovertemplate="%{y} on %{x}: %{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Image AUROC per defect type", "defect type", "method", height=max(220, 70 + 40 * len(methods)))


def score_figure(scores: Sequence[float], labels: Sequence[int], threshold: float | None, method: str) -> go.Figure:
    """Scores of good and defective images as two strips with the decision threshold drawn as a line."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=int)
    fig = go.Figure()
    rng = np.random.default_rng(0)
    for lab, name, col in ((0, "good", "#2ca02c"), (1, "defective", "#d62728")):
        sel = s[y == lab]
        fig.add_trace(go.Scatter(x=sel, y=lab + rng.uniform(-0.15, 0.15, sel.size), mode="markers", name=name,
                                 marker={"color": col, "size": 8, "opacity": 0.7},
                                 hovertemplate="score %{x:.4g}<extra>" + name + "</extra>"))
    if threshold is not None:
        fig.add_vline(x=threshold, line={"color": "#333", "dash": "dash"}, annotation_text="threshold")
    fig.update_yaxes(tickvals=[0, 1], ticktext=["good", "defective"], range=[-0.5, 1.5])
    _layout(fig, f"{method}: score of every test image", "anomaly score (higher = more anomalous)", "", height=240)
    fig.update_layout(legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"})
    return fig


def labelled_curve_figure(ks: Sequence[int], series: dict[str, list[dict]], reference: dict | None,
                          metric: str = "image_auroc", title: str = "Image AUROC against labelled anomalies K",
                          y_title: str = "image AUROC") -> go.Figure:
    """One line per weakly supervised method: `metric` against K, error bars from each point's ``<metric>_ci``
    when present; the reference (best unsupervised method, ``{"method", "value", "ci"}``) as a flat line with its
    interval as a band. Points whose value is None (a failed run, e.g. K = 0) are left out of their line."""
    fig = go.Figure()
    lo_k, hi_k = (min(ks), max(ks)) if ks else (0, 1)
    if reference is not None:
        ci = reference.get("ci")
        if ci:
            fig.add_trace(go.Scatter(x=[lo_k, hi_k, hi_k, lo_k], y=[ci[0], ci[0], ci[1], ci[1]], fill="toself",
                                     mode="lines", fillcolor="rgba(120,120,120,0.15)", line={"width": 0},
                                     hoverinfo="skip", name=f"{reference['method']} 95% interval"))
        fig.add_trace(go.Scatter(x=[lo_k, hi_k], y=[reference["value"]] * 2, mode="lines",
                                 line={"dash": "dash", "color": "#444", "width": 2},
                                 name=f"{reference['method']}, unsupervised ({_fmt(reference['value'])})",
                                 hovertemplate=f"{reference['method']}: %{{y:.3f}}<extra>no labels</extra>"))
    for i, (method, points) in enumerate(series.items()):
        pts = [p for p in points if p.get(metric) is not None]
        if not pts:
            continue
        cis = [p.get(f"{metric}_ci") for p in pts]
        err = None
        if any(cis):
            err = {"type": "data", "symmetric": False, "thickness": 1.5, "width": 5,
                   "array": [(c[1] - p[metric]) if c else 0 for c, p in zip(cis, pts, strict=True)],
                   "arrayminus": [(p[metric] - c[0]) if c else 0 for c, p in zip(cis, pts, strict=True)]}
        fig.add_trace(go.Scatter(x=[p["k"] for p in pts], y=[p[metric] for p in pts], mode="lines+markers",
                                 line={"color": colour_of(i), "width": 2}, marker={"size": 8}, error_y=err,
                                 name=method, hovertemplate="K = %{x}<br>" + y_title + " %{y:.3f}<extra>" + method
                                 + "</extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(ks), type="linear")
    fig.update_yaxes(range=[0, 1.02])
    fig = _layout(fig, title, "labelled anomalies per defect type (K)", y_title)
    fig.update_layout(legend={"x": 0.01, "xanchor": "left", "y": 0.02, "yanchor": "bottom"})
    return fig


def size_figure(widths: Sequence[int], heights: Sequence[int], splits: Sequence[str]) -> go.Figure:
    """Image sizes as a scatter of width against height (one trace per split) with the square diagonal."""
    fig = go.Figure()
    for i, split in enumerate(dict.fromkeys(splits)):
        sel = [k for k, s in enumerate(splits) if s == split]
        fig.add_trace(go.Scatter(x=[widths[k] for k in sel], y=[heights[k] for k in sel], mode="markers",
                                 name=split, marker={"color": colour_of(i), "size": 6, "opacity": 0.6},
                                 hovertemplate="%{x}×%{y} px<extra>" + split + "</extra>"))
    top = max([*widths, *heights, 1])
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="square",
                             line={"dash": "dot", "color": "#999"}, hoverinfo="skip"))
    return _layout(fig, "Image sizes", "width (px)", "height (px)", height=320)
