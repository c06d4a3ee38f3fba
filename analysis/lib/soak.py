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
    """Everything a soak records: per question and per sample (server memory, KV usage)."""

    questions: list[dict] = field(default_factory=list)
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
) -> None:
    """One stream: frames stamped ``k / fps`` (the clip looped, a bounded number of times: ``seconds``
    of stream time), sent ``append_every`` seconds of stream time at a time, at ``speed`` × real time
    from wall time ``t0``; a question every ``ask_every`` seconds of stream time."""
    from vllm_plugin.client import open_stream

    try:
        s = open_stream(base_url, fps=fps, **settings)
    except Exception as e:  # noqa: BLE001 - counted, the soak goes on with the other streams
        soak.error(f"stream {index} open", e)
        return
    n = int(seconds * fps)
    per = max(1, int(round(append_every * fps)))
    next_q = ask_every
    try:
        for k in range(0, n, per):
            b = min(n, k + per)
            stamps = [i / fps for i in range(k, b)]
            wait = t0 + stamps[-1] / speed - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                s.push_encoded([images[i % len(images)] for i in range(k, b)], stamps)
            except Exception as e:  # noqa: BLE001
                soak.error(f"stream {index} append at t={stamps[0]:.1f}", e)
                continue
            finally:
                with soak.lock:
                    soak.progress[index] = stamps[-1]
            if stamps[-1] + 1e-9 < next_q:
                continue
            next_q += ask_every
            try:
                t_ask = time.perf_counter()
                r = s.ask(question, max_tokens=max_tokens)
                e2e = time.perf_counter() - t_ask
            except Exception as e:  # noqa: BLE001
                soak.error(f"stream {index} question at t={stamps[-1]:.1f}", e)
                continue
            keep_events(s, index, soak)
            u, st = r["usage"], r["stream_state"]
            if st.get("ttft_s") is None:  # answered without a token: counted as a failed question, not a latency
                soak.error(
                    f"stream {index} question at t={stamps[-1]:.1f}",
                    RuntimeError(f"no token generated (finish_reason {r['choices'][0].get('finish_reason')!r})"),
                )
                continue
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            with soak.lock:
                soak.questions.append(
                    {
                        "stream": index,
                        "time": stamps[-1],
                        "ttft_s": st["ttft_s"],
                        "e2e_s": e2e,
                        "lag_s": max(0.0, time.monotonic() - (t0 + stamps[-1] / speed)),
                        "prompt_tokens": u["prompt_tokens"],
                        "prefilled_tokens": u["prompt_tokens"] - cached,
                        "context_tokens": st["context_tokens"],
                        "reanchors": st["reanchors"],
                        "chunks": st["chunks"],
                        "held_frames": st["held_frames"],
                        "evicted_frames": st["evicted_frames"],
                        "video_tokens": int(sum(st["video_tokens_per_chunk"])),
                    }
                )
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
        events = [e for e in s.events() if e["type"] in ("reanchor", "error")]
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


def windows(soak: Soak, window_s: float, end_s: float | None = None) -> list[dict]:
    """Per ``window_s`` of stream time: questions, TTFT p50/p95 (server-measured), prefilled and
    context tokens, re-anchors that happened in it (all streams), held frames, server RSS by process
    kind (last sample in the window), KV usage (max); windows up to ``end_s`` of stream time."""
    out = []
    end = (
        end_s
        if end_s is not None
        else max([q["time"] for q in soak.questions] + [s["time"] for s in soak.samples] + [0.0])
    )
    reanchor_times = [e["time"] for e in soak.events if e["type"] == "reanchor"]
    w = 0
    while w * window_s < end:
        lo, hi = w * window_s, (w + 1) * window_s
        qs = [q for q in soak.questions if lo < q["time"] <= hi or (w == 0 and q["time"] == 0)]
        ss = [
            s for s in soak.samples if lo <= min(s["time"], end - 1e-9) < hi
        ]  # samples after the end: the last window
        row = {
            "window": w,
            "start_s": lo,
            "end_s": hi,
            "questions": len(qs),
            "reanchors": sum(lo < t <= hi for t in reanchor_times),
        }
        if qs:
            ttft = [q["ttft_s"] for q in qs]
            row.update(
                ttft_p50_ms=statistics.median(ttft) * 1000,
                ttft_p95_ms=percentile(ttft, 0.95) * 1000,
                prefilled_mean=statistics.mean(q["prefilled_tokens"] for q in qs),
                context_mean=statistics.mean(q["context_tokens"] for q in qs),
                context_max=max(q["context_tokens"] for q in qs),
                held_frames_max=max(q["held_frames"] for q in qs),
                lag_max_s=max(q["lag_s"] for q in qs),
            )
        if ss:
            last = ss[-1]
            kinds: dict[str, float] = {}
            for name, mb in (last["rss_mb"] or {}).items():
                kinds[_process_kind(name)] = kinds.get(_process_kind(name), 0.0) + mb
            row.update(
                rss_total_mb=last["rss_total_mb"],
                rss_by_process=kinds,
                kv_usage_max=max((s["kv_usage"] for s in ss if s["kv_usage"] is not None), default=None),
            )
        out.append(row)
        w += 1
    return out


def summary(soak: Soak, wins: list[dict], hours: float) -> dict:
    """The soak's verdict: TTFT p95 of the first and last windows with questions, RSS growth from the
    first sample after the first re-anchor to the end (in all, by process kind, and over the second
    half of the stream time alone: caches with a cap fill early, a leak goes on), and the goals.

    "First" is the first window that starts after the first re-anchor, as for RSS: before it the
    conversation is still filling up to its budget, so its questions are cheaper than any later one
    and the ratio would measure that ramp, not a trend over hours (``ttft_p95_window0`` keeps the
    very first window's value). Without a re-anchor, or with fewer than two windows after it, it is
    the first window with questions."""
    first_anchor = min((e["time"] for e in soak.events if e["type"] == "reanchor"), default=None)
    asked = [w for w in wins if w["questions"]]
    steady = [w for w in asked if first_anchor is not None and w["start_s"] >= first_anchor]
    window0 = asked[0]["ttft_p95_ms"] / 1000 if asked else None
    if len(steady) >= 2:
        asked = steady
    rss = [s for s in soak.samples if s["rss_total_mb"] is not None]
    after = [s for s in rss if first_anchor is not None and s["time"] >= first_anchor]
    growth = (after[-1]["rss_total_mb"] - after[0]["rss_total_mb"]) if len(after) >= 2 else None
    # where it grew (by process kind), and whether it still grows in the second half (caches full by then)
    by_kind: dict[str, float] = {}
    if len(after) >= 2:
        for name, mb in after[-1]["rss_mb"].items():
            by_kind[_process_kind(name)] = by_kind.get(_process_kind(name), 0.0) + mb
        for name, mb in after[0]["rss_mb"].items():
            by_kind[_process_kind(name)] = by_kind.get(_process_kind(name), 0.0) - mb
    half = [x for x in rss if x["time"] >= rss[-1]["time"] / 2] if rss else []
    growth_half = (half[-1]["rss_total_mb"] - half[0]["rss_total_mb"]) if len(half) >= 2 else None
    # errors: requests that failed, and streams' own error events (an eager prefill that failed)
    out = {
        "hours": hours,
        "questions": len(soak.questions),
        "errors": len(soak.errors) + sum(e["type"] == "error" for e in soak.events),
        "reanchors": sum(e["type"] == "reanchor" for e in soak.events),
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
    }
    out["ttft_ratio"] = (out["ttft_p95_last"] / out["ttft_p95_first"]) if asked and out["ttft_p95_first"] else None
    return out


def last_line(s: dict) -> str:
    def f(v, fmt):
        return "nan" if v is None else format(v, fmt)

    return (
        f"hours={s['hours']:g} questions={s['questions']} errors={s['errors']} "
        f"ttft_p95_first={f(s['ttft_p95_first'], '.4f')} ttft_p95_last={f(s['ttft_p95_last'], '.4f')} "
        f"rss_growth_mb={f(s['rss_growth_mb'], '.1f')}"
    )


def keyframe_times(soak: Soak, fps: float, temporal_patch_size: int = 2, stream: int = 0) -> list[float]:
    """Stream times of the keyframes one stream held after its last re-anchor (its long-term memory)."""
    last = [e for e in soak.events if e["stream"] == stream and e["type"] == "reanchor"][-1:]
    return sorted(s * temporal_patch_size / fps for e in last for s in e["keyframes"])
