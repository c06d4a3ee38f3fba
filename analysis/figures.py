"""Plotly figure builders (pure: data in, figure out). Used by the demo, the CLIs and the notebooks."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import plotly.graph_objects as go


def kept_tokens_figure(
    kept_per_frame: Sequence[int],
    tokens_per_frame: int,
    times: Optional[Sequence[float]] = None,
    events: Iterable[float] = (),
    title: str = "DTD: kept visual tokens per frame",
) -> go.Figure:
    """Bars of kept tokens per temporal step (x = time in s when ``times`` is given), a line at the
    undropped count, and vertical markers at ``events`` (scene cuts, same x unit)."""
    x = list(times) if times is not None else list(range(len(kept_per_frame)))
    fig = go.Figure()
    fig.add_bar(x=x, y=list(kept_per_frame), name="kept", marker_color="#2b7bba")
    fig.add_scatter(x=x, y=[tokens_per_frame] * len(x), name="without DTD", mode="lines", line=dict(dash="dash", color="#999"))
    for e in events:
        fig.add_vline(x=e, line=dict(color="#d62728", dash="dot"), annotation_text="cut")
    fig.update_layout(
        title=title, xaxis_title="time (s)" if times is not None else "temporal step", yaxis_title="tokens",
        bargap=0.1, template="plotly_white",
    )
    return fig
