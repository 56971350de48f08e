"""Benchmark figures: average rank with its seed-to-seed range, and noise groups (pure plotly, no engine)."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from dashboard.views.plots import _layout, colour_of


def rank_figure(methods: Sequence[str], avg: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                groups: Sequence[str], n_datasets: int, n_seeds: int) -> go.Figure:
    """One row per method (best at the top): a dot at its average rank over datasets and a bar from the best to
    the worst of its per-seed average ranks. Methods joined by a grey band share a noise group: their bars
    overlap, so this sweep cannot tell them apart."""
    fig = go.Figure()
    n = len(methods)
    letters = sorted({c for g in groups for c in g if c != "—"})
    for letter in letters:
        rows = [i for i, g in enumerate(groups) if letter in g]
        x0 = min(lo[i] for i in rows)
        x1 = max(hi[i] for i in rows)
        fig.add_shape(type="rect", x0=x0 - 0.05, x1=x1 + 0.05, y0=min(rows) - 0.35, y1=max(rows) + 0.35,
                      fillcolor="rgba(120,120,120,0.12)", line={"width": 0}, layer="below")
        fig.add_annotation(x=x1 + 0.05, y=min(rows) - 0.3, text=f"within noise ({letter})", showarrow=False,
                           xanchor="left", font={"size": 10, "color": "#666"})
    for i, m in enumerate(methods):
        fig.add_trace(go.Scatter(
            x=[avg[i]], y=[i], mode="markers", marker={"size": 12, "color": colour_of(i)}, name=m,
            error_x={"type": "data", "symmetric": False, "array": [max(0.0, hi[i] - avg[i])],
                     "arrayminus": [max(0.0, avg[i] - lo[i])], "color": colour_of(i), "thickness": 2, "width": 6},
            hovertemplate=(f"{m}<br>average rank %{{x:.2f}}<br>per seed {lo[i]:.2f}–{hi[i]:.2f}"
                           f"<br>group {groups[i]}<extra></extra>")))
    fig.update_yaxes(tickvals=list(range(n)), ticktext=list(methods), autorange="reversed")
    fig.update_xaxes(range=[0.5, max([n + 0.5, *hi]) if n else 1.5], dtick=1)
    _layout(fig, f"Average rank over {n_datasets} dataset(s) · bars: range over {n_seeds} seed(s)",
            "average rank (1 = best)", "", height=max(220, 90 + 45 * n))
    fig.update_layout(showlegend=False)
    return fig
