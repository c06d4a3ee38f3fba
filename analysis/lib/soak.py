"""A soak of long streams: play a looped clip into streams for hours of stream time, ask as it goes,
and summarize per window of stream time (library part of ``python -m analysis.soak_stream``)."""

from __future__ import annotations

import base64
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests

from analysis.lib.summary import percentile

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WAIT_S = 0.01  # a question "waited for a re-anchor" when its reanchor_wait_s is above this
TTFT_P95_OVER_P50 = 2.0  # goal: every window's TTFT p95 (after the first re-anchor) <= this x the soak's p50
RSS_FLAT = 0.05  # goal: every server process's RSS within +-5% over the soak's last hour
RSS_LAST_S = 3600.0  # ... the last hour of stream time (the second half of a soak shorter than 2 h)


def check_loopback(url: str) -> str:
    """``url`` without its trailing slash, if it names this machine (the soak sends hours of frames)."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the soak runs against a server on this machine only (loopback), not {host!r}")
    return url.rstrip("/")


def encoded_clip(video: Path, fps: float, max_side: int = 448) -> list[str]:
    """The clip's frames at ``fps``, at most ``max_side`` px on the longer side, PNG + base64, encoded
    once (the soak loops them)."""
    from analysis.lib.video import load_video
    from vllm_plugin.media import encode_png, resize_frame

    frames = load_video(video, fps=fps).frames
    h, w = frames.shape[1:3]
    scale = min(1.0, max_side / max(h, w))
    size = (max(28, int(h * scale)), max(28, int(w * scale)))
    return [base64.b64encode(encode_png(resize_frame(f, *size) if scale < 1 else f)).decode() for f in frames]


@dataclass
class Soak:
    """Everything a soak records: per question answered (``questions``: with a first token), per
    question that failed (``failed``: the request raised, or the answer had no token or no
    ``stream_state``), per sample (server memory, KV usage), errors and the streams' events."""

    questions: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    progress: dict = field(default_factory=dict)  # stream -> stream time of its latest frame sent
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stream_time(self) -> float:
        """Where the slowest stream is (the time the server has seen from all of them)."""
        with self.lock:
            return min(self.progress.values()) if self.progress else 0.0

    def error(self, where: str, e: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{where}: {type(e).__name__}: {str(e)[:300]}")

    def fail(self, stream: int, t: float, e: BaseException) -> None:
        """A question at stream time ``t`` that got no answer: counted as failed and as an error."""
        self.error(f"stream {stream} question at t={t:.1f}", e)
        with self.lock:
            self.failed.append({"stream": stream, "time": t, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def _number(v) -> float | None:
    """``v`` as a float, or None when it is missing or not a number (a field an older server lacks)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def record_answer(soak: Soak, stream: int, t: float, r, e2e_s: float, lag_s: float) -> dict | None:
    """One question's chat.completion ``r`` (asked at stream time ``t``) into ``soak``: a row of
    ``soak.questions``, or, when it has no first token (``stream_state.ttft_s`` missing or None) or
    is not a chat.completion with a ``stream_state``, a failed question (None returned). Never
    raises: a field the server does not send is None (``reanchor_wait_s``: unknown) or, for
    ``answered_during_reanchor``, False."""
    st = r.get("stream_state") if isinstance(r, dict) else None
    if not isinstance(st, dict):
        soak.fail(stream, t, RuntimeError("the answer has no stream_state"))
        return None
    ttft = _number(st.get("ttft_s"))
    if ttft is None:
        choices = r.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        reason = first.get("finish_reason") if isinstance(first, dict) else None
        soak.fail(stream, t, RuntimeError(f"no token generated (finish_reason {reason!r})"))
        return None
    u = r.get("usage")
    u = u if isinstance(u, dict) else {}
    details = u.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    prompt = _number(u.get("prompt_tokens"))
    cached = _number(details.get("cached_tokens")) or 0.0
    per_chunk = st.get("video_tokens_per_chunk")
    chunk_tokens = [_number(v) for v in per_chunk] if isinstance(per_chunk, list) else [None]
    row = {
        "stream": stream,
        "time": t,
        "ttft_s": ttft,
        "e2e_s": e2e_s,
        "lag_s": lag_s,
        "prompt_tokens": None if prompt is None else int(prompt),
        "prefilled_tokens": None if prompt is None else int(prompt - cached),
        "context_tokens": st.get("context_tokens"),
        "reanchors": st.get("reanchors"),
        "chunks": st.get("chunks"),
        "held_frames": st.get("held_frames"),
        "evicted_frames": st.get("evicted_frames"),
        "video_tokens": None if None in chunk_tokens else int(sum(v or 0.0 for v in chunk_tokens)),
        "reanchor_wait_s": _number(st.get("reanchor_wait_s")),
        "stream_wait_s": _number(st.get("stream_wait_s")),
        "answered_during_reanchor": bool(st.get("answered_during_reanchor", False)),
    }
    with soak.lock:
        soak.questions.append(row)
    return row


def play_stream(
    base_url: str,
    index: int,
    images: list[str],
    fps: float,
    seconds: float,
    speed: float,
    t0: float,
    ask_every: float,
    append_every: float,
    settings: dict,
    soak: Soak,
    question: str,
    max_tokens: int,
    *,
    first_question: float | None = None,
    deadline: float | None = None,
    client: dict | None = None,
    appends: list | None = None,
) -> None:
    """One stream: frames stamped ``k / fps`` (the clip looped, a bounded number of times: ``seconds``
    of stream time), sent ``append_every`` seconds of stream time at a time, at ``speed`` × real time
    from wall time ``t0``; a question every ``ask_every`` seconds of stream time.

    For the capacity benchmark (``analysis.cli.capacity``): ``first_question``, the stream time of the
    first question (default ``ask_every``); ``deadline``, a wall time (``time.monotonic()``) after
    which no more frames are sent; ``client``, attributes set on the opened
    :class:`~vllm_plugin.client.StreamClient` (``retries``: 0 counts a 429 instead of retrying it;
    ``timeout``); ``appends``, a list that gets ``{stream, time, frames, status, lag_s}`` per append
    (``status``: 200, the HTTP status of a refusal or the exception's name; ``lag_s``: wall seconds
    after its last frame was due, when the append returned)."""
    from vllm_plugin.client import open_stream

    try:
        s = open_stream(base_url, fps=fps, **settings)
    except Exception as e:  # noqa: BLE001 - counted, the soak goes on with the other streams
        soak.error(f"stream {index} open", e)
        return
    for name, value in (client or {}).items():
        setattr(s, name, value)
    n = int(seconds * fps)
    per = max(1, int(round(append_every * fps)))
    next_q = ask_every if first_question is None else first_question
    try:
        for k in range(0, n, per):
            b = min(n, k + per)
            stamps = [i / fps for i in range(k, b)]
            if deadline is not None and time.monotonic() >= deadline:
                break
            wait = t0 + stamps[-1] / speed - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            status: int | str = 200
            try:
                s.push_encoded([images[i % len(images)] for i in range(k, b)], stamps)
            except Exception as e:  # noqa: BLE001
                status = getattr(e, "status", type(e).__name__)
                soak.error(f"stream {index} append at t={stamps[0]:.1f}", e)
                continue
            finally:
                with soak.lock:
                    soak.progress[index] = stamps[-1]
                    if appends is not None:
                        lag = max(0.0, time.monotonic() - (t0 + stamps[-1] / speed))
                        appends.append(
                            {"stream": index, "time": stamps[-1], "frames": b - k, "status": status, "lag_s": lag}
                        )
            if stamps[-1] + 1e-9 < next_q:
                continue
            next_q += ask_every
            try:
                t_ask = time.perf_counter()
                r = s.ask(question, max_tokens=max_tokens)
                e2e = time.perf_counter() - t_ask
            except Exception as e:  # noqa: BLE001 - a failed question, counted; the stream goes on
                soak.fail(index, stamps[-1], e)
                continue
            keep_events(s, index, soak)
            record_answer(soak, index, stamps[-1], r, e2e, max(0.0, time.monotonic() - (t0 + stamps[-1] / speed)))
        keep_events(s, index, soak)
    finally:
        try:
            s.close()
        except Exception as e:  # noqa: BLE001
            soak.error(f"stream {index} close", e)


def keep_events(s, index: int, soak: Soak) -> None:
    """The stream's re-anchor and error events since the last call (read as they come: a stream keeps
    its latest ``max_events`` only)."""
    try:
        events = [e for e in s.events() if e.get("type") in ("reanchor", "error")]
    except Exception as e:  # noqa: BLE001
        soak.error(f"stream {index} events", e)
        return
    with soak.lock:
        soak.events += [{"stream": index, **e} for e in events]


def kv_usage(base_url: str) -> float | None:
    """vLLM's ``vllm:kv_cache_usage_perc`` (0..1, summed over engines), or None."""
    from analysis.harness.server import metric_sum

    try:
        return metric_sum(requests.get(base_url + "/metrics", timeout=10).text, "vllm:kv_cache_usage_perc")
    except (requests.RequestException, ValueError):
        return None


def sample_server(base_url: str, pid: int | None, soak: Soak, every_s: float, stop: threading.Event) -> None:
    """Every ``every_s`` wall seconds while the streams run: the server's RSS by process (with
    ``pid``) and KV usage, stamped with the stream time the slowest stream has reached."""
    from analysis.cli.load import tree_rss_by_process

    while not stop.is_set():
        rss = tree_rss_by_process(pid) if pid else {}
        usage = kv_usage(base_url)
        sample = {
            "time": soak.stream_time(),
            "rss_mb": rss,
            "rss_total_mb": sum(rss.values()) if rss else None,
            "kv_usage": usage,
        }
        with soak.lock:
            soak.samples.append(sample)
        stop.wait(every_s)


def run_soak(
    base_url: str,
    pid: int | None,
    images: list[str],
    streams: int,
    hours: float,
    speed: float,
    fps: float,
    ask_every: float,
    append_every: float,
    settings: dict,
    question: str = "What is happening now?",
    max_tokens: int = 4,
    sample_every_s: float = 5.0,
) -> Soak:
    """``streams`` streams at once (one thread each), every loop bounded by ``hours`` of stream time."""
    soak = Soak()
    stop = threading.Event()
    t0 = time.monotonic() + 1.0
    sampler = threading.Thread(target=sample_server, args=(base_url, pid, soak, sample_every_s, stop), daemon=True)
    sampler.start()
    threads = [
        threading.Thread(
            target=play_stream,
            args=(
                base_url,
                k,
                images,
                fps,
                hours * 3600,
                speed,
                t0,
                ask_every,
                append_every,
                settings,
                soak,
                question,
                max_tokens,
            ),
        )
        for k in range(streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join(timeout=30)
    return soak


def _process_kind(name: str) -> str:
    return name.split("[", 1)[0]


def _answered(q: dict) -> bool:
    return _number(q.get("ttft_s")) is not None


def _values(rows: list[dict], key: str) -> list[float]:
    """The numbers ``rows`` hold under ``key`` (missing and None left out)."""
    return [v for v in (_number(r.get(key)) for r in rows) if v is not None]


def _reanchor_times(soak: Soak) -> list[float]:
    return [t for t in (_number(e.get("time")) for e in soak.events if e.get("type") == "reanchor") if t is not None]


def _waits(qs: list[dict]) -> dict:
    """Re-anchor waits of answered questions ``qs``: how many waited (``reanchor_wait_s`` > WAIT_S),
    their sum and max (s), how many the server did not report (None: an older server), and how many
    were answered on the previous conversation while a re-anchor's prefill ran."""
    known = _values(qs, "reanchor_wait_s")
    waited = [w for w in known if w > WAIT_S]
    return {
        "reanchor_waits": len(waited),
        "reanchor_wait_sum_s": sum(waited),
        "reanchor_wait_max_s": max(waited, default=0.0),
        "reanchor_wait_unknown": len(qs) - len(known),
        "answered_during_reanchor": sum(bool(q.get("answered_during_reanchor")) for q in qs),
    }


def windows(soak: Soak, window_s: float, end_s: float | None = None) -> list[dict]:
    """Per ``window_s`` of stream time: questions answered (``questions``) and failed (``failed``),
    TTFT p50/p95 (server-measured) of the answered ones, the re-anchor waits (:func:`_waits`),
    prefilled and context tokens, re-anchors that happened in it (all streams), held frames, server
    RSS by process kind (last sample in the window), KV usage (max); windows up to ``end_s`` of
    stream time. A window without answered questions has no TTFT keys; fields a question lacks are
    left out of the means."""
    out = []
    times = _values(soak.questions, "time") + _values(soak.failed, "time") + _values(soak.samples, "time")
    end = end_s if end_s is not None else max(times + [0.0])
    reanchor_times = _reanchor_times(soak)

    def inside(t, w, lo, hi):
        return t is not None and (lo < t <= hi or (w == 0 and t == 0))

    w = 0
    while w * window_s < end:
        lo, hi = w * window_s, (w + 1) * window_s
        qs = [q for q in soak.questions if inside(_number(q.get("time")), w, lo, hi)]
        answered = [q for q in qs if _answered(q)]
        failed = len(qs) - len(answered) + sum(inside(_number(f.get("time")), w, lo, hi) for f in soak.failed)
        ss = [
            s for s in soak.samples if _number(s.get("time")) is not None and lo <= min(s["time"], end - 1e-9) < hi
        ]  # samples after the end: the last window
        row: dict = {
            "window": w,
            "start_s": lo,
            "end_s": hi,
            "questions": len(answered),
            "failed": failed,
            "reanchors": sum(lo < t <= hi for t in reanchor_times),
            **_waits(answered),
        }
        if answered:
            ttft = _values(answered, "ttft_s")
            row.update(ttft_p50_ms=statistics.median(ttft) * 1000, ttft_p95_ms=percentile(ttft, 0.95) * 1000)
            for key, name, how in (
                ("prefilled_tokens", "prefilled_mean", statistics.mean),
                ("context_tokens", "context_mean", statistics.mean),
                ("context_tokens", "context_max", max),
                ("held_frames", "held_frames_max", max),
                ("lag_s", "lag_max_s", max),
            ):
                vs = _values(answered, key)
                if vs:
                    row[name] = how(vs)
        if ss:
            last = ss[-1]
            kinds: dict[str, float] = {}
            for name, mb in (last.get("rss_mb") or {}).items():
                kinds[_process_kind(name)] = kinds.get(_process_kind(name), 0.0) + mb
            row.update(
                rss_total_mb=last.get("rss_total_mb"),
                rss_by_process=kinds,
                kv_usage_max=max(_values(ss, "kv_usage"), default=None),
            )
        out.append(row)
        w += 1
    return out


def rss_flatness(soak: Soak, hours: float) -> dict:
    """RSS over the soak's last hour of stream time (its second half when it is shorter than 2 h),
    per server process (``name[pid]``, as sampled): each process's largest deviation from its first
    sample in that span, as a fraction of it. Processes not in every sample of the span (one that
    started or ended in it) are listed apart and not measured. ``rss_flat_max_dev`` is None when
    the span has fewer than two samples with RSS."""
    total = hours * 3600
    start = total - RSS_LAST_S if total >= 2 * RSS_LAST_S else total / 2
    span = [s for s in soak.samples if s.get("rss_mb") and _number(s.get("time")) is not None and s["time"] >= start]
    out: dict = {
        "rss_flat_span_s": [start, total],
        "rss_flat_samples": len(span),
        "rss_flat_by_process": {},
        "rss_flat_partial_processes": [],
        "rss_flat_max_dev": None,
    }
    if len(span) < 2:
        return out
    names = sorted(set().union(*(s["rss_mb"] for s in span)))
    throughout = [n for n in names if all((_number(s["rss_mb"].get(n)) or 0.0) > 0 for s in span)]
    out["rss_flat_partial_processes"] = [n for n in names if n not in throughout]
    for n in throughout:
        first = span[0]["rss_mb"][n]
        out["rss_flat_by_process"][n] = max(abs(s["rss_mb"][n] - first) / first for s in span)
    if out["rss_flat_by_process"]:
        out["rss_flat_max_dev"] = max(out["rss_flat_by_process"].values())
    return out


def summary(soak: Soak, wins: list[dict], hours: float) -> dict:
    """The soak's numbers and, in :func:`goals`, its verdict.

    * ``questions``: answered; ``failed_questions``: asked and not answered (counted, and in
      ``errors`` too with the requests that failed and the streams' own error events).
    * ``ttft_p50_s``: the median TTFT of every answered question of the whole soak (before the
      first re-anchor too). ``window_p95_max_ratio``: the largest TTFT p95 of the goal windows over
      it (the goal: at most TTFT_P95_OVER_P50). The goal windows are the windows with answered
      questions that start at or after the first re-anchor (before it the conversation is still
      filling up to its budget, so its questions are cheaper than any later one); without a
      re-anchor, or when no window starts after it, every window with answered questions.
    * ``reanchor_waits``: answered questions whose ``reanchor_wait_s`` > WAIT_S (the whole soak),
      with the sum and max of those waits; ``reanchor_wait_unknown``: answered questions whose
      server did not report it; ``answered_during_reanchor``.
    * RSS flatness per server process: :func:`rss_flatness`.
    * Kept as information: the TTFT p95 of the first and last windows with questions (``ttft_ratio``:
      last / first; "first" is the first window that starts after the first re-anchor, or without
      one or with fewer than two windows after it the first window with questions;
      ``ttft_p95_window0`` keeps the very first window's value), RSS growth from the first sample
      after the first re-anchor to the end (in all, by process kind, and over the second half)."""
    reanchors = _reanchor_times(soak)
    first_anchor = min(reanchors, default=None)
    asked = [w for w in wins if w.get("ttft_p95_ms") is not None]
    steady = [w for w in asked if first_anchor is not None and w["start_s"] >= first_anchor]
    window0 = asked[0]["ttft_p95_ms"] / 1000 if asked else None
    goal_windows = steady or asked
    if len(steady) >= 2:
        asked = steady
    answered = [q for q in soak.questions if _answered(q)]
    ttft = _values(answered, "ttft_s")
    p50 = statistics.median(ttft) if ttft else None
    worst = max(goal_windows, key=lambda w: w["ttft_p95_ms"], default=None)
    rss = [s for s in soak.samples if _number(s.get("rss_total_mb")) is not None and _number(s.get("time")) is not None]
    after = [s for s in rss if first_anchor is not None and s["time"] >= first_anchor]
    growth = (after[-1]["rss_total_mb"] - after[0]["rss_total_mb"]) if len(after) >= 2 else None
    # where it grew (by process kind), and whether it still grows in the second half (caches full by then)
    by_kind: dict[str, float] = {}
    if len(after) >= 2:
        for name, mb in (after[-1].get("rss_mb") or {}).items():
            by_kind[_process_kind(name)] = by_kind.get(_process_kind(name), 0.0) + mb
        for name, mb in (after[0].get("rss_mb") or {}).items():
            by_kind[_process_kind(name)] = by_kind.get(_process_kind(name), 0.0) - mb
    half = [x for x in rss if x["time"] >= rss[-1]["time"] / 2] if rss else []
    growth_half = (half[-1]["rss_total_mb"] - half[0]["rss_total_mb"]) if len(half) >= 2 else None
    failed = len(soak.failed) + len(soak.questions) - len(answered)
    out = {
        "hours": hours,
        "questions": len(answered),
        "failed_questions": failed,
        # requests that failed (failed questions among them), streams' error events (an eager prefill that failed),
        # and rows of questions without a first token that were not recorded through Soak.fail
        "errors": len(soak.errors)
        + sum(e.get("type") == "error" for e in soak.events)
        + len(soak.questions)
        - len(answered),
        "reanchors": len(reanchors),
        "ttft_p50_s": p50,
        "window_p95_max_ratio": (worst["ttft_p95_ms"] / 1000 / p50) if worst and p50 else None,
        "window_p95_max_window": worst["window"] if worst else None,
        "window_p95_max_s": worst["ttft_p95_ms"] / 1000 if worst else None,
        "goal_windows": [w["window"] for w in goal_windows],
        **_waits(answered),
        "ttft_p95_first": asked[0]["ttft_p95_ms"] / 1000 if asked else None,
        "ttft_p95_last": asked[-1]["ttft_p95_ms"] / 1000 if asked else None,
        "ttft_first_window": asked[0]["window"] if asked else None,
        "ttft_p95_window0": window0,
        "rss_growth_mb": growth,
        "rss_growth_by_process_mb": by_kind,
        "rss_growth_second_half_mb": growth_half,
        "first_reanchor_s": first_anchor,
        "rss_after_first_reanchor_mb": after[0]["rss_total_mb"] if after else None,
        "rss_end_mb": rss[-1]["rss_total_mb"] if rss else None,
        "rss_sampled": bool(rss),
        **rss_flatness(soak, hours),
    }
    out["ttft_ratio"] = (out["ttft_p95_last"] / out["ttft_p95_first"]) if asked and out["ttft_p95_first"] else None
    return out


def goals(s: dict) -> list[dict]:
    """The soak's goals from :func:`summary`: each {"goal", "value" (what was measured, in words),
    "met"}. A goal that could not be measured is not met (no answered question; a server that does
    not report ``reanchor_wait_s``; fewer than two RSS samples in the span), except RSS when the soak
    sampled none at all (no server pid): then it is no goal of this run.

    1. errors = 0: no request failed, no question went unanswered, no stream error event.
    2. TTFT: every goal window's TTFT p95 <= TTFT_P95_OVER_P50 x the whole soak's TTFT p50 (see
       :func:`summary` for the windows and the p50).
    3. No question waited for a re-anchor's prefill: ``reanchor_waits`` = 0 over the whole soak.
    4. RSS of every server process flat within +-RSS_FLAT over the last hour of stream time (the
       second half of a soak shorter than 2 h): :func:`rss_flatness`."""

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    out = [
        {
            "goal": "errors = 0",
            "value": f"errors {s['errors']} (failed questions {s['failed_questions']})",
            "met": s["errors"] == 0 and s["failed_questions"] == 0,
        }
    ]
    ratio = s["window_p95_max_ratio"]
    out.append(
        {
            "goal": f"every window's TTFT p95 after the first re-anchor <= {TTFT_P95_OVER_P50:g} x the soak's TTFT p50",
            "value": (
                f"max p95 / p50 = {f(ratio, '.2f')} (window {s['window_p95_max_window']}: p95 "
                f"{f(s['window_p95_max_s'] and s['window_p95_max_s'] * 1000, '.0f')} ms; p50 of all "
                f"{s['questions']} answered questions {f(s['ttft_p50_s'] and s['ttft_p50_s'] * 1000, '.0f')} ms; "
                f"{len(s['goal_windows'])} windows from window {(s['goal_windows'] or [None])[0]})"
            ),
            "met": ratio is not None and ratio <= TTFT_P95_OVER_P50,
        }
    )
    unknown = s["reanchor_wait_unknown"]
    out.append(
        {
            "goal": "no question waits for a re-anchor's prefill",
            "value": (
                f"{s['reanchor_waits']} waited > {WAIT_S:g} s (sum {s['reanchor_wait_sum_s']:.2f} s, max "
                f"{s['reanchor_wait_max_s']:.2f} s); {s['answered_during_reanchor']} answered during a re-anchor"
                + (f"; not reported for {unknown} questions (server without reanchor_wait_s)" if unknown else "")
                + ("; no answered question" if not s["questions"] else "")
            ),
            "met": s["questions"] > 0 and unknown == 0 and s["reanchor_waits"] == 0,
        }
    )
    if s["rss_sampled"]:
        lo, hi = s["rss_flat_span_s"]
        per = ", ".join(f"{k} {v * 100:.1f}%" for k, v in s["rss_flat_by_process"].items())
        partial = s["rss_flat_partial_processes"]
        out.append(
            {
                "goal": f"RSS of every server process flat (±{RSS_FLAT * 100:g}%) over {lo / 60:g}-{hi / 60:g} min",
                "value": (
                    f"largest deviation {f(s['rss_flat_max_dev'] and s['rss_flat_max_dev'] * 100, '.1f')}% over "
                    f"{s['rss_flat_samples']} samples ({per or 'no process measured'})"
                    + (f"; not there throughout: {', '.join(partial)}" if partial else "")
                ),
                "met": s["rss_flat_max_dev"] is not None and s["rss_flat_max_dev"] <= RSS_FLAT,
            }
        )
    return out


def last_line(s: dict) -> str:
    def f(v, fmt):
        return "nan" if v is None else format(v, fmt)

    waits = None if s["questions"] and s["reanchor_wait_unknown"] == s["questions"] else s["reanchor_waits"]
    return (
        f"hours={s['hours']:g} questions={s['questions']} errors={s['errors']} "
        f"ttft_p95_first={f(s['ttft_p95_first'], '.4f')} ttft_p95_last={f(s['ttft_p95_last'], '.4f')} "
        f"rss_growth_mb={f(s['rss_growth_mb'], '.1f')} reanchor_waits={f(waits, 'd')} "
        f"window_p95_max_ratio={f(s['window_p95_max_ratio'], '.3f')}"
    )


def stream_questions(soak: Soak, stream: int = 0) -> list[dict]:
    """One stream's answered questions with every key the long-stream figure reads (None if missing)."""
    keys = ("time", "ttft_s", "context_tokens", "held_frames", "evicted_frames", "reanchor_wait_s")
    return [{k: q.get(k) for k in keys} for q in soak.questions if q.get("stream") == stream and _answered(q)]


def mark_waits(fig, questions: list[dict]) -> None:
    """On a :func:`analysis.lib.figures.long_stream_figure` (its TTFT panel, row 2): the questions
    that waited for a re-anchor's prefill, as red crosses."""
    waited = [q for q in questions if (_number(q.get("reanchor_wait_s")) or 0.0) > WAIT_S]
    fig.add_scatter(
        x=[q["time"] / 60 for q in waited],
        y=[q["ttft_s"] * 1000 for q in waited],
        name="waited for a re-anchor",
        mode="markers",
        marker=dict(symbol="x", size=8, color="#d62728"),
        row=2,
        col=1,
    )


def windows_figure(wins: list[dict], ttft_p50_s: float | None, title: str = "Per window: TTFT and re-anchor waits"):
    """Per window of stream time (all streams): TTFT p50 and p95 (ms) with the goal line
    TTFT_P95_OVER_P50 x the soak's p50 (top), and bars of the questions that waited for a re-anchor's
    prefill, answered during one, and failed (bottom), with the sum of the waits (s, right axis)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, specs=[[{}], [{"secondary_y": True}]])
    x = [(w["start_s"] + w["end_s"]) / 120 for w in wins]
    for key, name, color in (("ttft_p50_ms", "TTFT p50 (ms)", "#2b7bba"), ("ttft_p95_ms", "TTFT p95 (ms)", "#444")):
        fig.add_scatter(
            x=x, y=[w.get(key) for w in wins], name=name, mode="lines+markers", line=dict(color=color), row=1, col=1
        )
    if ttft_p50_s:
        goal = TTFT_P95_OVER_P50 * ttft_p50_s * 1000
        fig.add_scatter(
            x=[wins[0]["start_s"] / 60, wins[-1]["end_s"] / 60] if wins else [],
            y=[goal, goal],
            name=f"goal: p95 <= {TTFT_P95_OVER_P50:g} x soak p50",
            mode="lines",
            line=dict(color="#999", dash="dash"),
            row=1,
            col=1,
        )
    for key, name, color in (
        ("reanchor_waits", "questions that waited for a re-anchor", "#d62728"),
        ("answered_during_reanchor", "answered during a re-anchor", "#2ca02c"),
        ("failed", "failed questions", "#000"),
    ):
        fig.add_bar(x=x, y=[w.get(key, 0) for w in wins], name=name, marker_color=color, row=2, col=1)
    fig.add_scatter(
        x=x,
        y=[w.get("reanchor_wait_sum_s", 0.0) for w in wins],
        name="sum of re-anchor waits (s)",
        mode="lines+markers",
        line=dict(color="#ff7f0e", dash="dot"),
        row=2,
        col=1,
        secondary_y=True,
    )
    fig.update_yaxes(title_text="TTFT (ms)", row=1, col=1)
    fig.update_yaxes(title_text="questions", row=2, col=1, secondary_y=False)
    fig.update_yaxes(title_text="waits (s)", row=2, col=1, secondary_y=True)
    fig.update_xaxes(title_text="stream time (min), window midpoints", row=2, col=1)
    fig.update_layout(title=title, template="plotly_white", height=600, barmode="group")
    return fig


def keyframe_times(soak: Soak, fps: float, temporal_patch_size: int = 2, stream: int = 0) -> list[float]:
    """Stream times of the keyframes one stream held after its last re-anchor (its long-term memory)."""
    last = [e for e in soak.events if e.get("stream") == stream and e.get("type") == "reanchor"][-1:]
    return sorted(s * temporal_patch_size / fps for e in last for s in e.get("keyframes") or [])
