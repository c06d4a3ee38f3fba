"""Play benchmark videos into a server's streams and ask their questions at their times.

One *pass* = one video × one :class:`Mode`: a new stream (``/v1/streams``) gets the video's frames
(decoded here at ``fps``) in time order; before each ask only the frames stamped at or before the
ask's time have been sent, and the server's own stream time is checked against it after every ask
(:class:`TimeTravel` if not). Questions are asked with ``remember: false``: each sees every frame so
far and none of the other questions (as the benchmarks ask them), while the frames already in the
stream are served from vLLM's prefix cache.

Modes, compared on the same questions in one run:

* ``full``    — DTD off: every token of every frame;
* ``dtd``     — DTD at one (criterion, metric, τ);
* ``uniform`` — DTD off, the video sampled at a lower frame rate so that it sends as many video
  tokens as the ``dtd`` pass of the same setting sent over the whole video (the baseline the paper
  compares with): ``fps × kept fraction``, frames picked evenly from the ``fps`` ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from analysis.eval.conventions import Ask, Reply, Verdict, asks_for, finished, follow_up, score, stream_start
from analysis.eval.formats import Question
from vllm_plugin.client import StreamClient, StreamHTTPError, open_stream

MODES = ("full", "dtd", "uniform")
PUSH_BATCH = 8  # frames per append


class TimeTravel(AssertionError):
    """The server's stream held a frame stamped after the question's time."""


@dataclass(frozen=True)
class Mode:
    """How a pass serves the video. ``criterion``/``metric``/``threshold``: the DTD setting (of the
    ``dtd`` pass a ``uniform`` pass matches in tokens); None for ``full``."""

    name: str
    criterion: str | None = None
    metric: str | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.name not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.name!r}")

    @property
    def key(self) -> str:
        """``full``, ``dtd/feature/cosine/0.5``, ``uniform/feature/cosine/0.5``."""
        if self.name == "full":
            return "full"
        return f"{self.name}/{self.criterion}/{self.metric}/{self.threshold:g}"

    @property
    def dtd_key(self) -> str:
        return Mode("dtd", self.criterion, self.metric, self.threshold).key

    def stream_settings(self) -> dict:
        if self.name == "dtd":
            return {
                "dtd_enabled": True,
                "dtd_criterion": self.criterion,
                "dtd_metric": self.metric,
                "dtd_threshold": self.threshold,
            }
        return {"dtd_enabled": False}


def modes_grid(
    names: Sequence[str],
    criteria: Sequence[str],
    metrics: Mapping[str, str],
    thresholds: Mapping[str, Sequence[float]],
) -> list[Mode]:
    """The modes of a run in the order they run: ``full``, every ``dtd`` setting, every ``uniform``
    one (a ``uniform`` pass needs the ``dtd`` pass of its setting: asking for ``uniform`` runs it).
    ``metrics``/``thresholds``: per criterion."""
    bad = [n for n in names if n not in MODES]
    if bad or not names:
        raise ValueError(f"modes must be among {list(MODES)}, got {list(names)}")
    settings = [(c, metrics[c], float(t)) for c in criteria for t in thresholds[c]]
    out = [Mode("full")] if "full" in names else []
    if "dtd" in names or "uniform" in names:
        out += [Mode("dtd", *s) for s in settings]
    if "uniform" in names:
        out += [Mode("uniform", *s) for s in settings]
    return out


def uniform_indices(times: np.ndarray, kept_fraction: float) -> np.ndarray:
    """Indices of ``times`` (frames at a constant rate) kept by sampling at ``kept_fraction`` of it:
    evenly spaced, the first frame always."""
    n = len(times)
    f = min(1.0, max(kept_fraction, 1.0 / max(n, 1)))
    return np.unique(np.minimum(np.round(np.arange(0, n, 1.0 / f)).astype(int), n - 1))


@dataclass
class Pass:
    """What a pass measured for the video as a whole (the ``uniform`` pass's budget)."""

    video: str
    mode: str
    frames: int
    steps: int
    tokens_per_step: int
    kept_tokens: int

    @property
    def kept_fraction(self) -> float:
        return self.kept_tokens / max(1, self.steps * self.tokens_per_step)


def run_pass(
    base_url: str,
    video: str,
    frames: np.ndarray,
    times: np.ndarray,
    fps: float,
    questions: Sequence[Question],
    mode: Mode,
    tokens_per_step: int,
    temporal_patch_size: int = 2,
    budget: Pass | None = None,
    model: str | None = None,
    on_ask: Callable[[Question, Ask, Reply], None] | None = None,
) -> tuple[list[dict], Pass]:
    """Play ``frames`` (uint8 (N, H, W, 3) at ``fps``, stamped ``times`` in seconds of the video)
    into new streams and ask ``questions`` (all of one video) at their times: one stream per start
    (:func:`stream_start`: 0, or a StreamingBench proactive question's own start). ``tokens_per_step``
    and ``temporal_patch_size``: how the server holds this video (the ``full`` count a drop ratio is
    measured against). ``budget``: the
    ``dtd`` pass a ``uniform`` pass matches. Returns one row per question and the pass's totals
    (of the stream from 0, or of all streams when there is none from 0)."""
    stream_fps, sel = fps, np.arange(len(frames))
    if mode.name == "uniform":
        if budget is None:
            raise ValueError(f"a uniform pass needs the tokens of {mode.dtd_key} on {video}")
        sel = uniform_indices(times, budget.kept_fraction)
        stream_fps = fps * len(sel) / max(1, len(frames))
    groups: dict[float, list[Question]] = {}
    for q in questions:
        groups.setdefault(stream_start(q), []).append(q)
    rows_by_qid: dict[str, dict] = {}
    frames_n = steps = kept = 0
    for start, qs in sorted(groups.items()):
        keep = sel[times[sel] >= start - 1e-6]
        stream = open_stream(base_url, model=model, fps=stream_fps, **mode.stream_settings())
        try:
            full_times = times[times >= start - 1e-6] - start
            for r in _play(
                stream,
                frames[keep],
                times[keep] - start,
                full_times,
                start,
                qs,
                mode,
                (tokens_per_step, temporal_patch_size),
                on_ask,
            ):
                rows_by_qid[r["qid"]] = r
            st = stream.status()
        finally:
            try:
                stream.close()
            except StreamHTTPError:
                pass
        if start == 0.0 or 0.0 not in groups:
            frames_n, steps, kept = (
                frames_n + st["frames"],
                steps + len(st["kept_per_step"]),
                kept + sum(st["kept_per_step"]),
            )
    return [rows_by_qid[q.qid] for q in questions], Pass(video, mode.key, frames_n, steps, tokens_per_step, kept)


def _play(
    stream: StreamClient,
    frames: np.ndarray,
    times: np.ndarray,
    full_times: np.ndarray,
    start: float,
    questions: Sequence[Question],
    mode: Mode,
    step: tuple[int, int],
    on_ask,
) -> list[dict]:
    """One stream: frames stamped ``times`` (s from the stream's start, which is ``start`` s into the
    video); ``full_times``: the stamps a ``full`` pass sends (the drop ratio's denominator)."""
    plan = sorted(
        ((a.time, qi, ai) for qi, q in enumerate(questions) for ai, a in enumerate(asks_for(q))), key=lambda x: x[:3]
    )
    replies: list[list[Reply]] = [[] for _ in questions]
    done = [False] * len(questions)
    sent = 0
    refused: str | None = None  # the server refused frames: later asks of this stream are errors too
    tokens_per_step, tps = step

    def ask_now(q: Question, ask: Ask, t: float) -> Reply:
        nonlocal sent, refused
        upto = int(np.searchsorted(times, t + 1e-6, side="right"))  # frames stamped at or before the ask
        while sent < upto and refused is None:
            batch = slice(sent, min(upto, sent + PUSH_BATCH))
            try:
                stream.push(frames[batch], times[batch].tolist())
            except StreamHTTPError as e:  # e.g. 409 stream full: the video is longer than the server's stream limits
                refused = f"frames refused: {e}"
            sent = batch.stop
        if refused is not None:
            return Reply(time=t + start, text="", role=ask.role, index=ask.index, error=refused)
        if sent:
            stream.wait_prefilled()  # a live stream's frames are in the KV cache before a question comes
        t0 = time.perf_counter()
        try:
            r = stream.ask(ask.prompt, max_tokens=ask.max_tokens, remember=False)
        except StreamHTTPError as e:
            return Reply(time=t + start, text="", role=ask.role, index=ask.index, error=str(e))
        state = r["stream_state"]
        if state["time"] is not None and state["time"] > t + 1e-6:
            raise TimeTravel(
                f"{q.qid}: the stream held a frame at {state['time'] + start:.3f} s of the video "
                f"when asked at {t + start:.3f} s"
            )
        full_frames = int(np.searchsorted(full_times, t + 1e-6, side="right"))
        return Reply(
            time=t + start,
            text=r["choices"][0]["message"]["content"] or "",
            role=ask.role,
            index=ask.index,
            prompt_tokens=r["usage"]["prompt_tokens"],
            video_tokens=sum(state["video_tokens_per_chunk"]),
            full_video_tokens=(full_frames // tps) * tokens_per_step,
            ttft_s=state["ttft_s"],
            e2e_s=time.perf_counter() - t0,
            last_frame_time=None if state["time"] is None else state["time"] + start,
        )

    for t, qi, ai in plan:
        q = questions[qi]
        ask: Ask | None = asks_for(q)[ai]
        while ask is not None and not done[qi]:
            reply = ask_now(q, ask, t - start)
            replies[qi].append(reply)
            on_ask and on_ask(q, ask, reply)
            done[qi] = finished(q, reply)
            ask = follow_up(q, reply)
    return [row(q, mode, replies[qi], score(q, replies[qi])) for qi, q in enumerate(questions)]


def row(q: Question, mode: Mode, replies: list[Reply], verdict: Verdict) -> dict:
    """One result row: the question, the mode, the verdict and what its asks cost. Tokens, TTFT and
    drop ratio are of the question's decisive ask (the last one it made)."""
    last = replies[-1] if replies else Reply(time=q.time, text="")
    video, full = last.video_tokens, last.full_video_tokens
    return {
        "qid": q.qid,
        "benchmark": q.benchmark,
        "video": q.video,
        "task": q.task,
        "kind": q.kind,
        "question_time": q.time,
        "mode": mode.name,
        "mode_key": mode.key,
        "criterion": mode.criterion,
        "metric": mode.metric,
        "threshold": mode.threshold,
        "score": verdict.score,
        "points": verdict.points,
        "out_of": verdict.out_of,
        "correct": verdict.score >= 1.0,
        "parsed": verdict.parsed,
        "prediction": verdict.prediction,
        "answer": q.answer,
        "reply": last.text,
        "response_time": verdict.response_time,
        "asks": len(replies),
        "errors": sum(1 for r in replies if r.error),
        "error": next((r.error for r in replies if r.error), None),
        "prompt_tokens": last.prompt_tokens,
        "video_tokens": video,
        "full_video_tokens": full,
        "drop_ratio": (1.0 - video / full) if full else math.nan,
        "ttft_s": last.ttft_s,
        "e2e_s": last.e2e_s,
        "last_frame_time": max((r.last_frame_time for r in replies if r.last_frame_time is not None), default=None),
        "last_ask_time": max((r.time for r in replies), default=q.time),
    }
