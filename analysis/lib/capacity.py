"""How many live streams one server holds at a latency target: the pure part of
``python -m analysis.cli.capacity`` (no server, no HTTP; unit-tested in tests/unit/test_capacity_units.py).

* :func:`ramp`: N = 1, 2, 4, 8, ... until a step fails, then bisection between the last N that held
  and the first that did not, bounded by a maximum N: the largest N that holds, exactly, when holding
  is monotone in N, in about 2·log2(capacity) steps.
* :func:`verdict`: one step's samples against the target (TTFT p95 ≤ the SLO, no frame later than one
  ask interval, no 429 / 5xx on appends, no failed question, every stream opened), with its reasons.
* :func:`aggregate`: one (clip, mode, N) row of the report; :func:`capacity_of`, :func:`clip_summary`,
  :func:`headline`, :func:`last_line` / :func:`parse_last_line`: the verdicts per clip and the last line.
* :func:`write_results`: JSON, CSV and an offline HTML report (plotly.js inline: no CDN).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.lib.summary import percentile

MODES = ("dtd-eager", "dtd-feature", "dtd-lazy", "resend", "resend-dtd")
QUICK_MODES = ("dtd-eager", "resend")
# the stream settings each live-stream mode opens its streams with (POST /v1/streams)
STREAM_SETTINGS: dict[str, dict[str, Any]] = {
    "dtd-eager": {"prefill": "eager", "dtd_criterion": "pixel"},
    "dtd-feature": {"prefill": "eager", "dtd_criterion": "feature"},
    "dtd-lazy": {"prefill": "lazy", "dtd_criterion": "pixel"},
}
RESEND_MODES = ("resend", "resend-dtd")
# the server each mode runs on: "dtd" (python -m vllm_plugin.serve --dtd-streams), "stock" (vLLM, plugin not loaded)
SERVER_OF = {"dtd-eager": "dtd", "dtd-feature": "dtd", "dtd-lazy": "dtd", "resend": "stock", "resend-dtd": "dtd"}
# where each mode's TTFT comes from: the stream's stream_state.ttft_s, or the client (first streamed chunk)
TTFT_SOURCE = {mode: ("client" if mode in RESEND_MODES else "server") for mode in MODES}
HEADLINE_DTD, HEADLINE_RESEND = "dtd-eager", "resend"

# goals: capacity_ratio >= 4 on the fixed-view clip (a screen recording), >= 2 on the handheld / camera ones
FIXED_VIEW_CLIPS = ("videollava_ui_screenrec", "screen_recording")
GOAL_FIXED_VIEW = 4.0
GOAL_OTHER = 2.0


def goal_for(clip: str) -> float:
    """The capacity_ratio goal of a clip (by its file stem)."""
    return GOAL_FIXED_VIEW if clip in FIXED_VIEW_CLIPS else GOAL_OTHER


def servers_in_order(modes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``modes`` grouped by the server they run on, servers in the order of their first mode: one
    server start per group."""
    groups: dict[str, list[str]] = {}
    for m in modes:
        groups.setdefault(SERVER_OF[m], []).append(m)
    return list(groups.items())


# ------------------------------------------------------------------------------------------------- the ramp


@dataclass
class Ramp:
    """The ramp's outcome: ``capacity`` (the largest N that held; 0 when N = 1 did not), every step
    as (N, held) in the order run, and ``bounded``: ``capacity`` is the maximum N allowed (it held
    there, so the true capacity may be higher)."""

    capacity: int
    tried: list[tuple[int, bool]] = field(default_factory=list)
    bounded: bool = False


def ramp(holds: Callable[[int], bool], max_n: int) -> Ramp:
    """Double N from 1 while ``holds(N)`` (never past ``max_n``: the last doubling is cut to it), then
    bisect between the last N that held and the first that did not. Each N is tried once; at most
    about 2·log2(max_n) + 2 calls."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    tried: list[tuple[int, bool]] = []

    def check(n: int) -> bool:
        ok = bool(holds(n))
        tried.append((n, ok))
        return ok

    lo, hi, n = 0, None, 1  # lo: the largest N that held; hi: the smallest that did not
    while hi is None:
        if check(n):
            lo = n
            if n == max_n:
                return Ramp(lo, tried, bounded=True)
            n = min(2 * n, max_n)
        else:
            hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if check(mid):
            lo = mid
        else:
            hi = mid
    return Ramp(lo, tried)


def question_phases(streams: int, ask_every: float, fps: float, seed: int, step: int = 0) -> list[float]:
    """The stream time of each stream's first question: one frame in, plus a random phase within one
    ask interval (seeded by ``seed``, the step's N and the stream: equal for every mode at equal N)."""
    import random

    return [1.0 / fps + random.Random(f"{seed}-{step}-{i}").uniform(0.0, ask_every) for i in range(streams)]


def question_times(first: float, ask_every: float, seconds: float) -> list[float]:
    """Stream times of one stream's questions: ``first``, then every ``ask_every``, up to ``seconds``
    (a bounded list)."""
    if ask_every <= 0:
        raise ValueError("ask_every must be > 0")
    out, t = [], first
    while t <= seconds + 1e-9:
        out.append(t)
        t += ask_every
    return out


def window_frames(end: int, window: int, clip_len: int) -> tuple[int, ...]:
    """The clip's frame indexes of the last ``window`` frames up to frame ``end`` (inclusive) of a
    stream that loops a ``clip_len``-frame clip: index mod ``clip_len``, the loop before the stream's
    first frame counting as its past (a camera that has been running: every window is full, as in a
    re-send deployment's steady state). ``window`` is rounded down to an even count (Qwen's temporal
    patches are frame pairs), at least 2. Depends on ``end`` mod ``clip_len`` only."""
    if window < 1 or clip_len < 1:
        raise ValueError("window and clip_len must be >= 1")
    n = max(2, window - window % 2)
    return tuple((end - n + 1 + j) % clip_len for j in range(n))


def frame_at(t: float, fps: float) -> int:
    """The frame a question at stream time ``t`` comes after: the first one stamped at or after
    ``t`` (a live stream asks once the append holding it returned), at least frame 1."""
    return max(1, math.ceil(t * fps - 1e-9))


# ------------------------------------------------------------------------------------------ samples, verdict


@dataclass
class StepSamples:
    """What one step (N streams for a while) measured. ``lag_s``: wall seconds each append (live
    streams) or question (re-send) came after it was due (the stream's real time), plus, for a stream
    the step's deadline cut, how late its next frame was then; ``append_status``: each append's HTTP
    status (or the exception's name); ``failed_questions``: questions with no answer (an error, or
    no token); ``errors``: every failure's text."""

    streams: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)
    append_status: list[int | str] = field(default_factory=list)
    failed_questions: int = 0
    opened: int | None = None  # streams opened (live streams; None: re-send, nothing to open)
    frames: int = 0  # frames the server received (live: appended; re-send: in the windows sent)
    errors: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]


def _http(status: int | str) -> int | None:
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def verdict(s: StepSamples, slo_ms: float, max_lag_s: float) -> Verdict:
    """The target, with every reason it is missed: TTFT p95 ≤ ``slo_ms`` (no answered question is a
    miss), no lag over ``max_lag_s`` (one ask interval, wall seconds), no 429 and no 5xx on an
    append, no other failed append, no failed question, every stream opened."""
    reasons = []
    if s.ttft_s:
        p95 = percentile(s.ttft_s, 0.95) * 1000
        if p95 > slo_ms:
            reasons.append(f"TTFT p95 {p95:.0f} ms > {slo_ms:g} ms")
    else:
        reasons.append("no question answered")
    lag = max(s.lag_s, default=0.0)
    if lag > max_lag_s:
        reasons.append(f"fell {lag:.1f} s behind real time (more than one ask interval, {max_lag_s:g} s)")
    codes = [_http(x) for x in s.append_status]
    n429 = sum(c == 429 for c in codes)
    n5xx = sum(c is not None and c >= 500 for c in codes)
    other = sum(c is None or (c >= 400 and c != 429 and c < 500) for c in codes)
    if n429:
        reasons.append(f"{n429} appends refused with 429")
    if n5xx:
        reasons.append(f"{n5xx} appends failed with 5xx")
    if other:
        reasons.append(f"{other} appends failed otherwise")
    if s.failed_questions:
        reasons.append(f"{s.failed_questions} questions failed")
    if s.opened is not None and s.opened < s.streams:
        reasons.append(f"{s.streams - s.opened} of {s.streams} streams did not open")
    return Verdict(not reasons, reasons)


def cpu_percent(before: Mapping[int, float], after: Mapping[int, float], wall_s: float) -> float | None:
    """CPU % (100 = one core) of processes over ``wall_s``, from their CPU seconds (user + system)
    at the start and the end, by pid; a pid only at the end counts from 0 (started during the step)."""
    if wall_s <= 0 or not after:
        return None
    return 100.0 * sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items()) / wall_s


def api_server_pids(root: int, processes: Iterable[tuple[int, str]]) -> list[int]:
    """The API-server processes of a server started as ``root``: the root (one API server runs in
    the main process) and every process whose title names an API server (``ApiServer_<i>`` with
    ``--api-server-count``, ``APIServer_DPRank_<r>``; vLLM's process titles), not its engine cores
    or workers. ``processes``: (pid, name or command line) of the root's descendants."""
    return [root] + [pid for pid, title in processes if pid != root and "apiserver" in title.lower()]


def _ms(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    return (statistics.median(xs) if q == 0.5 else percentile(xs, q)) * 1000


def aggregate(clip: str, mode: str, s: StepSamples, v: Verdict, server: Mapping[str, Any]) -> dict:
    """One (clip, mode, N) row. ``server``: what the server's side measured over the step:
    ``prompt_tokens`` / ``cached_tokens`` (deltas of ``vllm:prompt_tokens_total`` /
    ``vllm:prompt_tokens_cached_total``), ``kv_usage_peak`` (``vllm:kv_cache_usage_perc``, 0..1),
    ``api_cpu_percent``, ``rss_peak_mb``."""
    codes = [_http(x) for x in s.append_status]
    wall = s.wall_s if s.wall_s > 0 else float("nan")
    prompt, cached = server.get("prompt_tokens"), server.get("cached_tokens")
    return {
        "clip": clip,
        "mode": mode,
        "streams": s.streams,
        "passed": v.passed,
        "reasons": list(v.reasons),
        "ttft_source": TTFT_SOURCE[mode],
        "questions": len(s.ttft_s),
        "failed_questions": s.failed_questions,
        "ttft_p50_ms": _ms(s.ttft_s, 0.5),
        "ttft_p95_ms": _ms(s.ttft_s, 0.95),
        "e2e_p50_ms": _ms(s.e2e_s, 0.5),
        "e2e_p95_ms": _ms(s.e2e_s, 0.95),
        "lag_max_s": max(s.lag_s, default=0.0),
        "frames_per_s": s.frames / wall,
        "prompt_tokens_per_s": None if prompt is None else prompt / wall,
        "prefill_tokens_per_s": None if prompt is None else (prompt - (cached or 0.0)) / wall,
        "kv_usage_peak": server.get("kv_usage_peak"),
        "api_cpu_percent": server.get("api_cpu_percent"),
        "rss_peak_mb": server.get("rss_peak_mb"),
        "appends": len(codes),
        "http_429": sum(c == 429 for c in codes),
        "http_5xx": sum(c is not None and c >= 500 for c in codes),
        "errors": len(s.errors),
        "error_samples": s.errors[:3],
        "wall_s": s.wall_s,
    }


# ------------------------------------------------------------------------------------- capacity, last line


def capacity_of(rows: Iterable[Mapping[str, Any]]) -> int:
    """The largest N that held below the smallest N that did not (0 when N = 1 did not), from one
    (clip, mode)'s rows: :func:`ramp`'s answer, read back from the report."""
    rows = list(rows)
    failed = min((r["streams"] for r in rows if not r["passed"]), default=math.inf)
    return max((r["streams"] for r in rows if r["passed"] and r["streams"] < failed), default=0)


def ratio(dtd: int | None, resend: int | None) -> float | None:
    """dtd / resend streams: inf when re-send holds none and DTD some, nan when neither holds any,
    None when a mode did not run."""
    if dtd is None or resend is None:
        return None
    if resend == 0:
        return math.inf if dtd > 0 else math.nan
    return dtd / resend


def clip_summary(clip: str, rows: Iterable[Mapping[str, Any]], max_streams: int) -> dict:
    """A clip's capacities per mode, the headline ratio (dtd-eager / resend), dtd-eager's TTFT p95 at
    its capacity, the goal and whether it is met (None: a headline mode did not run)."""
    rows = [r for r in rows if r["clip"] == clip]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    caps = {m: capacity_of(r for r in rows if r["mode"] == m) for m in modes}
    dtd, resend = caps.get(HEADLINE_DTD), caps.get(HEADLINE_RESEND)
    at = [r for r in rows if r["mode"] == HEADLINE_DTD and r["streams"] == dtd]
    r = ratio(dtd, resend)
    goal = goal_for(clip)
    notes = []
    if resend == 0 and dtd:
        notes.append("re-send holds 0 streams at the SLO: capacity_ratio is inf")
    bounded = [m for m, c in caps.items() if c >= max_streams]
    if bounded:
        notes.append(f"{', '.join(bounded)} held --max-streams {max_streams}: a lower bound (raise it)")
    return {
        "clip": clip,
        "capacity": caps,
        "capacity_dtd": dtd,
        "capacity_resend": resend,
        "capacity_ratio": r,
        "ttft_p95_ms_at_capacity": at[0]["ttft_p95_ms"] if at else None,
        "goal": goal,
        "met": None if r is None else (not math.isnan(r) and r >= goal),
        "notes": notes,
    }


def headline(summaries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The clip the last line reports: the one furthest below its goal (lowest ratio / goal; a
    ratio that could not be computed counts lowest), the first on ties."""

    def score(s):
        r = s["capacity_ratio"]
        return -math.inf if r is None or math.isnan(r) else r / s["goal"]

    return min(summaries, key=score) if summaries else None


def _num(v: float | int | None, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def last_line(s: Mapping[str, Any] | None) -> str:
    """``capacity_dtd=<N> capacity_resend=<N> capacity_ratio=<ratio> ttft_p95_ms_at_capacity=<ms>``
    (a value that does not exist: ``nan``; the ratio when re-send holds no stream: ``inf``)."""
    s = s or {}
    return (
        f"capacity_dtd={_num(s.get('capacity_dtd'), 'd')} capacity_resend={_num(s.get('capacity_resend'), 'd')} "
        f"capacity_ratio={_num(s.get('capacity_ratio'), '.2f')} "
        f"ttft_p95_ms_at_capacity={_num(s.get('ttft_p95_ms_at_capacity'), '.0f')}"
    )


LAST_LINE = re.compile(
    r"capacity_dtd=(\d+|nan) capacity_resend=(\d+|nan) capacity_ratio=(\d+(?:\.\d+)?|inf|nan) "
    r"ttft_p95_ms_at_capacity=(\d+|nan)"
)


def parse_last_line(line: str) -> dict[str, float]:
    """The values of :func:`last_line` (``nan`` / ``inf`` as floats); ``ValueError`` for another line."""
    m = LAST_LINE.fullmatch(line.strip())
    if not m:
        raise ValueError(f"not a capacity last line: {line!r}")
    keys = ("capacity_dtd", "capacity_resend", "capacity_ratio", "ttft_p95_ms_at_capacity")
    return {k: float(v) for k, v in zip(keys, m.groups())}


def clip_line(s: Mapping[str, Any]) -> str:
    """A clip's line: its values as in the last line, the goal and met / NOT met."""
    verdict = (
        "not judged (dtd-eager and resend did not both run)" if s["met"] is None else ("met" if s["met"] else "NOT met")
    )
    notes = f" ({'; '.join(s['notes'])})" if s["notes"] else ""
    return f"{s['clip']}: {last_line(s)} goal capacity_ratio >= {s['goal']:g}: {verdict}{notes}"


# ------------------------------------------------------------------------------------------------- writing


def jsonable(v: Any) -> Any:
    """``v`` with every non-finite float as the string ``"inf"`` / ``"-inf"`` / ``"nan"`` (strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """One line per (clip, mode, N); list values joined by ``"; "``."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: "; ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in r.items()})
    return path


MODE_COLORS = {
    "dtd-eager": "#d62728",
    "dtd-feature": "#9467bd",
    "dtd-lazy": "#ff7f0e",
    "resend": "#7f7f7f",
    "resend-dtd": "#1f77b4",
}


def figure(rows: Sequence[Mapping[str, Any]], slo_ms: float):
    """Streams (x) against TTFT p95 (y, ms), a line per mode and one panel per clip; the SLO as a
    dashed line; a step that missed the target is an ×."""
    from plotly.subplots import make_subplots

    clips = list(dict.fromkeys(r["clip"] for r in rows)) or ["(no clip)"]
    fig = make_subplots(rows=len(clips), cols=1, subplot_titles=clips, vertical_spacing=0.3 / max(1, len(clips)))
    shown: set[str] = set()  # one legend entry per mode
    for i, clip in enumerate(clips, start=1):
        for mode in MODES:
            pts = sorted((r for r in rows if r["clip"] == clip and r["mode"] == mode), key=lambda r: r["streams"])
            if not pts:
                continue
            fig.add_scatter(
                x=[r["streams"] for r in pts],
                y=[r["ttft_p95_ms"] for r in pts],
                mode="lines+markers",
                name=mode,
                legendgroup=mode,
                showlegend=mode not in shown,
                line=dict(color=MODE_COLORS[mode]),
                marker=dict(symbol=["circle" if r["passed"] else "x" for r in pts], size=10),
                text=["held" if r["passed"] else "; ".join(r["reasons"]) for r in pts],
                row=i,
                col=1,
            )
            shown.add(mode)
        fig.add_hline(
            y=slo_ms, line=dict(color="black", dash="dash"), annotation_text=f"SLO {slo_ms:g} ms", row=i, col=1
        )
        fig.update_xaxes(title_text="concurrent streams", type="log", dtick=math.log10(2), row=i, col=1)
        fig.update_yaxes(title_text="TTFT p95 (ms)", row=i, col=1)
    fig.update_layout(
        title="Streams per server at the TTFT target (× = the step missed it)",
        template="plotly_white",
        height=380 * len(clips) + 120,
    )
    return fig


def summary_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """The per-clip verdicts as an HTML table."""
    head = (
        "<tr><th>clip</th><th>capacity per mode</th><th>ratio</th><th>TTFT p95 at capacity (ms)</th><th>goal</th></tr>"
    )
    body = []
    for s in summaries:
        caps = ", ".join(f"{m} {c}" for m, c in s["capacity"].items())
        met = "not judged" if s["met"] is None else ("met" if s["met"] else "NOT met")
        body.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(x))}</td>"
                for x in (
                    s["clip"],
                    caps,
                    _num(s["capacity_ratio"], ".2f"),
                    _num(s["ttft_p95_ms_at_capacity"], ".0f"),
                    f"≥ {s['goal']:g}: {met}",
                )
            )
            + "</tr>"
        )
    return f"<table border='1' cellpadding='4'>{head}{''.join(body)}</table>"


def write_results(out: Path, result: Mapping[str, Any], slo_ms: float) -> dict[str, Path]:
    """``capacity.json`` (``result``, strict JSON), ``capacity.csv`` (its ``rows``) and
    ``capacity.html`` (:func:`figure` and the per-clip table; plotly.js inline, renders offline)."""
    from analysis.lib.reports import write_report

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "capacity.json",
        "csv": out / "capacity.csv",
        "html": out / "capacity.html",
    }
    paths["json"].write_text(json.dumps(jsonable(result), indent=2, allow_nan=False))
    write_csv(paths["csv"], result["rows"])
    write_report(
        paths["html"],
        [figure(result["rows"], slo_ms)],
        "Capacity: live streams per server at the TTFT target",
        extra_html=summary_table(result.get("summaries", [])),
        inline=True,
    )
    return paths
