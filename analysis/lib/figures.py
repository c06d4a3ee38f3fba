"""Plotly figure builders (pure: data in, figure out). Used by the demo, the CLIs and the notebooks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import plotly.graph_objects as go


def kept_tokens_figure(
    kept_per_step: Sequence[int],
    tokens_per_step: int,
    times: Sequence[float] | None = None,
    events: Iterable[float] = (),
    title: str = "DTD: kept visual tokens per temporal step",
) -> go.Figure:
    """Bars of kept tokens per temporal step (x = time in s when ``times`` is given), a line at the
    undropped count, and vertical markers at ``events`` (scene cuts, same x unit)."""
    x = list(times) if times is not None else list(range(len(kept_per_step)))
    fig = go.Figure()
    fig.add_bar(x=x, y=list(kept_per_step), name="kept", marker_color="#2b7bba")
    fig.add_scatter(
        x=x, y=[tokens_per_step] * len(x), name="without DTD", mode="lines", line=dict(dash="dash", color="#999")
    )
    for e in events:
        fig.add_vline(x=e, line=dict(color="#d62728", dash="dot"), annotation_text="cut")
    fig.update_layout(
        title=title,
        xaxis_title="time (s)" if times is not None else "temporal step",
        yaxis_title="tokens",
        bargap=0.1,
        template="plotly_white",
    )
    return fig


def shift_figure(
    offsets: Sequence[Sequence[int]],
    times: Sequence[float] | None = None,
    title: str = "motion reference: estimated translation per step",
) -> go.Figure:
    """Lines of the (dy, dx) in tokens at which each step's reference was read (``Decision.offsets``:
    the camera translation the ``motion`` reference estimated; (0, 0) for other references)."""
    x = list(times) if times is not None else list(range(len(offsets)))
    fig = go.Figure()
    fig.add_scatter(x=x, y=[int(o[0]) for o in offsets], name="dy (rows)", mode="lines+markers")
    fig.add_scatter(x=x, y=[int(o[1]) for o in offsets], name="dx (columns)", mode="lines+markers")
    fig.update_layout(
        title=title,
        xaxis_title="time (s)" if times is not None else "temporal step",
        yaxis_title="tokens",
        template="plotly_white",
    )
    return fig


def stream_ttft_figure(
    stream_rows: Sequence[dict], stock_rows: Sequence[dict] = (), events: Iterable[float] = ()
) -> go.Figure:
    """Time to first token per question over the stream: our stream (a) vs re-sending the video (b).
    Rows: {"time_s", "ttft_s", "prefilled_tokens"}; ``events``: scene-change times."""
    fig = go.Figure()
    fig.add_scatter(
        x=[r["time_s"] for r in stream_rows],
        y=[r["ttft_s"] * 1000 for r in stream_rows],
        mode="lines+markers",
        name="DTD stream (KV reused)",
    )
    if stock_rows:
        fig.add_scatter(
            x=[r["time_s"] for r in stock_rows],
            y=[r["ttft_s"] * 1000 for r in stock_rows],
            mode="lines+markers",
            name="stock vLLM, whole video each time",
        )
    for e in events:
        fig.add_vline(x=e, line=dict(color="#d62728", dash="dot"))
    fig.update_layout(
        title="Time to first token per question",
        xaxis_title="stream time (s)",
        yaxis_title="TTFT (ms)",
        template="plotly_white",
    )
    return fig


def threshold_figure(rows: Sequence[dict], title: str = "DTD: drop ratio vs threshold") -> go.Figure:
    """Drop ratio against threshold, one line per (video, criterion, metric, reference) — sweep rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["video"], r["criterion"], r["metric"], r["reference"]), []).append(r)
    fig = go.Figure()
    for key, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["threshold"])
        fig.add_scatter(
            x=[r["threshold"] for r in rs], y=[r["drop_ratio"] for r in rs], mode="lines+markers", name=" / ".join(key)
        )
    fig.update_layout(
        title=title,
        xaxis_title="threshold τ",
        yaxis_title="dropped fraction of video tokens",
        yaxis_range=[0, 1],
        template="plotly_white",
    )
    return fig


def overlay_image(frame, keep_step, cell: int = 28, dim: float = 0.3, tint=(220, 40, 40)):
    """One frame (uint8 (h, w, 3)) with its DROPPED tokens darkened and tinted; ``keep_step``: bool
    (H, W) mask of that temporal step (True = kept), h = H·cell, w = W·cell."""
    import numpy as np

    frame = np.asarray(frame, dtype=np.float32)
    keep = np.asarray(keep_step, dtype=bool)
    big = np.repeat(np.repeat(keep, cell, axis=0), cell, axis=1)[: frame.shape[0], : frame.shape[1]]
    shaded = frame * dim + np.asarray(tint, np.float32) * (1 - dim) * 0.5
    out = np.where(big[..., None], frame, shaded)
    return out.clip(0, 255).astype("uint8")


def _png_uri(image) -> str:
    """uint8 (h, w, 3) -> a PNG data URI (compact in notebooks and HTML, unlike a nested-list z)."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def overlay_figure(
    frames,
    mask,
    step: int | None = None,
    step_times: Sequence[float] | None = None,
    title: str = "kept (clear) and dropped (shaded) tokens",
) -> go.Figure:
    """Frames with dropped tokens shaded. ``frames``: uint8 (N, h, w, 3) with N = 2·T;
    ``mask``: bool (T, H, W). One step when ``step`` is given, else a slider over all steps."""
    import numpy as np

    mask = np.asarray(mask)
    T = mask.shape[0]
    steps = range(T) if step is None else [step]
    images = [go.Image(source=_png_uri(overlay_image(frames[2 * t], mask[t]))) for t in steps]
    label = (lambda t: f"t={step_times[t]:.1f}s") if step_times is not None else (lambda t: f"step {t}")
    if step is not None:
        fig = go.Figure(images[0])
        kept = int(mask[step].sum())
        fig.update_layout(title=f"{title} — {label(step)}: {kept}/{mask[step].size} kept", template="plotly_white")
        return fig
    fig = go.Figure(images[0], frames=[go.Frame(data=[im], name=str(t)) for t, im in enumerate(images)])
    fig.update_layout(
        title=title,
        template="plotly_white",
        sliders=[
            {
                "steps": [
                    {
                        "args": [[str(t)], {"frame": {"duration": 0, "redraw": True}, "mode": "immediate"}],
                        "label": label(t),
                        "method": "animate",
                    }
                    for t in range(T)
                ],
                "currentvalue": {"prefix": "frame: "},
            }
        ],
    )
    return fig


def serving_figure(rows: Sequence[dict], title: str = "Serving: latency and prompt tokens vs threshold") -> go.Figure:
    """Rows from :func:`analysis.lib.workbench.serving_sweep` (threshold None = DTD off, drawn at x = -0.05)."""
    from plotly.subplots import make_subplots

    first = [r for r in rows if r.get("repeat", 0) == 0]
    xs = [(-0.05 if r["threshold"] is None else r["threshold"]) for r in first]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=xs, y=[r["latency_s"] * 1000 for r in first], mode="lines+markers", name="latency (ms)")
    fig.add_scatter(
        x=xs, y=[r["prompt_tokens"] for r in first], mode="lines+markers", name="prompt tokens", secondary_y=True
    )
    fig.update_layout(title=title, xaxis_title="threshold τ (−0.05: DTD off)", template="plotly_white")
    fig.update_yaxes(title_text="latency (ms)", secondary_y=False)
    fig.update_yaxes(title_text="prompt tokens", secondary_y=True)
    return fig


def accuracy_figure(summary, title: str = "Accuracy vs dropped video tokens") -> go.Figure:
    """One point per mode (rows of :func:`analysis.eval.results.summarize` without ``by``): x = mean
    drop ratio, y = accuracy; DTD and uniform joined by criterion/metric over τ, full video a star."""
    rows = summary.to_dict("records") if hasattr(summary, "to_dict") else list(summary)
    fig = go.Figure()
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["criterion"], r["metric"]), []).append(r)
    for (mode, criterion, metric), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["drop_ratio"] if r["drop_ratio"] == r["drop_ratio"] else 0.0)
        name = "full video" if mode == "full" else f"{mode} ({criterion}/{metric})"
        fig.add_scatter(
            x=[r["drop_ratio"] for r in rs],
            y=[r["accuracy"] for r in rs],
            name=name,
            mode="markers" if mode == "full" else "lines+markers",
            marker=dict(size=14 if mode == "full" else 8, symbol="star" if mode == "full" else "circle"),
            text=[
                f"τ={r['threshold']:g}" if r["threshold"] == r["threshold"] and r["threshold"] is not None else ""
                for r in rs
            ],
            hovertemplate="%{text} drop %{x:.1%} accuracy %{y:.1%}",
        )
    fig.update_layout(
        title=title,
        xaxis_title="dropped fraction of video tokens",
        yaxis_title="accuracy",
        xaxis_range=[-0.02, 1.02],
        yaxis_range=[0, 1.02],
        template="plotly_white",
    )
    return fig


def task_accuracy_figure(per_task, title: str = "Accuracy per task and mode") -> go.Figure:
    """Grouped bars: accuracy per task (x), one bar per mode (rows of ``summarize(by=("benchmark", "task"))``)."""
    rows = per_task.to_dict("records") if hasattr(per_task, "to_dict") else list(per_task)
    fig = go.Figure()
    for key in dict.fromkeys(r["mode_key"] for r in rows):
        rs = [r for r in rows if r["mode_key"] == key]
        fig.add_bar(x=[r["task"] for r in rs], y=[r["accuracy"] for r in rs], name=key)
    fig.update_layout(
        title=title, yaxis_title="accuracy", yaxis_range=[0, 1.02], barmode="group", template="plotly_white"
    )
    return fig


def long_stream_figure(
    questions: Sequence[dict],
    reanchors: Iterable[float] = (),
    keyframes: Iterable[float] = (),
    budget: int | None = None,
    title: str = "A long stream: context and time to first token",
) -> go.Figure:
    """A long stream over stream time (hours shown in minutes). Top: the conversation's context
    tokens at each question, frames held and frames evicted by re-anchors, the budget; re-anchors as
    dotted lines, kept keyframes as diamonds. Bottom: time to first token per question.
    ``questions``: rows {"time", "context_tokens", "held_frames", "evicted_frames", "ttft_s"} of one stream."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        row_heights=[0.6, 0.4],
        specs=[[{"secondary_y": True}], [{}]],
    )
    t = [q["time"] / 60 for q in questions]

    def curve(key: str, name: str, color: str, secondary_y: bool = False) -> None:
        """One row of ``questions`` over stream time, in the top panel (frames: right axis)."""
        fig.add_scatter(
            x=t,
            y=[q[key] for q in questions],
            name=name,
            mode="lines",
            line=dict(color=color),
            row=1,
            col=1,
            secondary_y=secondary_y,
        )

    curve("context_tokens", "context tokens", "#2b7bba")
    if budget:
        fig.add_scatter(
            x=[t[0], t[-1]] if t else [],
            y=[budget, budget],
            name="budget (context_tokens)",
            mode="lines",
            line=dict(color="#999", dash="dash"),
            row=1,
            col=1,
        )
    curve("held_frames", "frames held", "#2ca02c", secondary_y=True)
    curve("evicted_frames", "frames evicted", "#ff7f0e", secondary_y=True)
    keys = sorted(set(keyframes))
    if keys:
        fig.add_scatter(
            x=[k / 60 for k in keys],
            y=[0] * len(keys),
            name="keyframes held at the end",
            mode="markers",
            marker=dict(symbol="diamond", size=9, color="#9467bd"),
            row=1,
            col=1,
        )
    for r in reanchors:
        fig.add_vline(x=r / 60, line=dict(color="#d62728", dash="dot", width=1), row=1, col=1)
    fig.add_scatter(
        x=t,
        y=[q["ttft_s"] * 1000 for q in questions],
        name="TTFT (ms)",
        mode="markers",
        marker=dict(size=4, color="#444"),
        row=2,
        col=1,
    )
    fig.update_yaxes(title_text="tokens", row=1, col=1, secondary_y=False)
    fig.update_yaxes(title_text="frames", row=1, col=1, secondary_y=True)
    fig.update_yaxes(title_text="TTFT (ms)", row=2, col=1)
    fig.update_xaxes(title_text="stream time (min); dotted: re-anchors", row=2, col=1)
    fig.update_layout(title=title, template="plotly_white", height=700)
    return fig
