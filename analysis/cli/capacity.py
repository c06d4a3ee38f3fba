"""Capacity: how many live streams one server holds at a TTFT target, DTD streams against re-sending.

    python -m analysis.cli.capacity [--quick] [--video PATH ...] [--modes dtd-eager resend ...]
                                    [--slo-ms 500] [--ask-every 10] [--fps 1] [--speed 1] [--window 30]
                                    [--step-seconds 60] [--max-streams 32] [--size bench7b | --model PATH]
                                    [--out results/capacity]

Each clip (default: the shared clips of ``../shared/videos``, else the bundled one) is decoded once
at ``--fps`` (at most 448 px on its longer side) and looped: N streams play it at real time ×
``--speed``, each asking a short question (``--max-tokens``, default 4) every ``--ask-every`` seconds
of stream time from a random phase (seeded: ``--seed``; the same phases for every mode at equal N).
Per mode, N ramps 1, 2, 4, 8, ... until a step misses the target, then bisects between the last N
that held and the first that did not (:func:`analysis.lib.capacity.ramp`, at most ``--max-streams``);
each step runs N streams for ``--step-seconds`` of wall time. The target
(:func:`analysis.lib.capacity.verdict`): TTFT p95 ≤ ``--slo-ms`` AND no frame (live streams) or
question (re-send) later than one ask interval behind real time AND no 429 / 5xx on an append AND
no failed question AND every stream opened. Nothing is retried: a 429 is counted, not waited out.

Modes (same clips, same checkpoint, one server at a time, started and stopped here; loopback only):

* ``dtd-eager``, ``dtd-feature``, ``dtd-lazy``: live streams (``POST /v1/streams``; frames appended
  ``--append-every`` seconds of stream time at a time) on the DTD server (``python -m vllm_plugin.serve
  --dtd-streams``), opened with ``prefill: eager`` (pixel criterion), eager with ``dtd_criterion:
  feature`` (the vision tower encodes each step on arrival, in the API server) and ``prefill: lazy``.
  TTFT: the server's ``stream_state.ttft_s`` (from the question's arrival at the stream route to its
  first generated token: waiting for the stream, its pending prefill and the engine included); the
  client's end-to-end time is recorded beside it (``e2e_*``).
* ``resend``: stock vLLM (``python -m vllm.entrypoints.openai.api_server``, the plugin NOT loaded),
  prefix caching on (vLLM's default, passed explicitly: as users run it). Each question sends the
  last ``--window`` seconds of the stream as ONE video to ``/v1/chat/completions`` (the loop before
  the stream's start counts as its past: every window is full, a re-send deployment's steady state).
  Every distinct window of the looped clip is encoded once, before the server starts (PyAV, H.264),
  and sent by ``file://`` URL (``--allowed-local-media-path``): no client CPU per question. Its
  frames arrive with the question, so its lag is the question's own lateness (0 while every answer
  comes back within one ask interval) and its TTFT includes the window's prefill.
* ``resend-dtd``: the same requests through the DTD server (DTD without streams).
  TTFT for both re-send modes: the client's, streamed (``stream: true``), to the first chunk with a
  choice (vLLM sends it with the engine's first generated token; ``ignore_eos``, so there is one).

Per (clip, mode, N) row: TTFT p50/p95 (ms), e2e p50/p95, the largest lag, frames/s the server
received (live: appended; re-send: frames of the windows sent, each frame re-sent many times), engine
prompt and prefilled tokens/s (deltas of ``vllm:prompt_tokens_total`` and, subtracted,
``vllm:prompt_tokens_cached_total``), peak KV-cache usage (``vllm:kv_cache_usage_perc``), CPU % of
the API-server process(es) (psutil, 100 = one core), peak server RSS, appends, 429s, 5xx, errors.
Writes ``capacity.json``, ``capacity.csv`` and ``capacity.html`` (streams vs TTFT p95 per mode and
clip, the SLO line; plotly.js inline: renders offline).

Per clip a line ``<clip>: capacity_dtd=… capacity_resend=… capacity_ratio=… ttft_p95_ms_at_capacity=…
goal capacity_ratio >= G: met | NOT met`` (G = 4 on the fixed-view ``videollava_ui_screenrec``, 2 on
the others; re-send holding no stream prints the ratio as ``inf`` and says so). The last line is
``capacity_dtd=<N> capacity_resend=<N> capacity_ratio=<ratio> ttft_p95_ms_at_capacity=<ms>``
(dtd-eager and resend) of the clip furthest below its goal. Exit status 1 when a clip's goal is NOT
met. ``--quick``: dtd-eager and resend only, 30 s steps, N ≤ 8.

Caveats: every stream loops the same clip from its first frame, so equal windows (re-send) or
equal first chunks (streams) of different streams are equal requests that vLLM's prefix cache may
share; DTD streams start empty at every step (their context grows for step-seconds × speed of
stream time; a conversation at its budget and its re-anchors are what ``analysis.soak_stream``
measures).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from analysis.harness.tiny_model import add_model_arguments, model_from_arguments
from analysis.lib import capacity as lib
from analysis.lib.paths import check_videos, default_videos, results_dir

QUESTION = "What is happening now?"
GRACE_S = 5.0  # wall seconds past a step's end (plus one ask interval) before its late streams are cut
IDLE_TIMEOUT_S = 120.0  # at most this long waiting for the server to finish a step's requests
QUICK = {"step_seconds": 30.0, "max_streams": 8}
FULL = {"step_seconds": 60.0, "max_streams": 32}


@dataclass
class Clip:
    name: str
    images: list[str]  # the frames at --fps, base64 PNG (what live streams append)
    windows: dict[tuple[int, ...], Path] = field(default_factory=dict)  # re-send: frame indexes -> mp4

    def window(self, end: int, frames: int) -> Path:
        return self.windows[lib.window_frames(end, frames, len(self.images))]


def prepare_clip(video: Path, args, media: Path, resend: bool) -> Clip:
    """The clip's frames encoded once for live streams, and (``resend``) every distinct re-send
    window of the looped clip as an H.264 mp4 of the same frames."""
    from PIL import Image

    from analysis.lib.soak import encoded_clip
    from analysis.lib.video import VideoDecodeError, write_video

    clip = Clip(video.stem, encoded_clip(video, args.fps))
    if not clip.images:
        raise VideoDecodeError(f"no frames at {args.fps:g} fps")
    if resend:
        frames = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in clip.images]
        h, w = frames[0].shape[0] // 2 * 2, frames[0].shape[1] // 2 * 2  # even sizes (4:2:0)
        arr = np.stack([f[:h, :w] for f in frames])
        wf = window_frame_count(args)
        for end in range(len(clip.images)):  # a window depends on its end modulo the clip's length
            key = lib.window_frames(end, wf, len(clip.images))
            if key not in clip.windows:
                path = media / f"{clip.name}_w{len(clip.windows):04d}.mp4"
                clip.windows[key] = write_video(path, arr[list(key)], args.fps, lossless=False)
    return clip


def window_frame_count(args) -> int:
    return max(2, int(round(args.window * args.fps)))


# ------------------------------------------------------------------------------------------- the server side


def _metrics_text(url: str) -> str:
    return requests.get(url + "/metrics", timeout=10).text


def counters(url: str) -> dict[str, float]:
    from analysis.harness.server import metric_sum

    try:
        text = _metrics_text(url)
    except requests.RequestException:
        return {}
    return {
        "prompt_tokens": metric_sum(text, "vllm:prompt_tokens_total"),
        "cached_tokens": metric_sum(text, "vllm:prompt_tokens_cached_total"),
    }


def wait_idle(url: str, timeout: float = IDLE_TIMEOUT_S) -> None:
    """Until the engine runs and queues no request (the last step's work done), at most ``timeout``."""
    from analysis.harness.server import metric_sum

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = _metrics_text(url)
        except requests.ConnectionError:
            return  # no server: nothing to wait for (the step counts its failures)
        except requests.RequestException:
            text = None
        if text is not None and (
            metric_sum(text, "vllm:num_requests_running") + metric_sum(text, "vllm:num_requests_waiting") == 0
        ):
            return
        time.sleep(0.5)


def api_cpu_seconds(root: int | None) -> dict[int, float]:
    """CPU seconds (user + system) of the server's API-server process(es), by pid."""
    if root is None:
        return {}
    import psutil

    try:
        proc = psutil.Process(root)
        children = []
        for p in proc.children(recursive=True):
            try:
                children.append((p.pid, f"{p.name()} {' '.join(p.cmdline())}"))
            except psutil.Error:
                pass
        out = {}
        for pid in lib.api_server_pids(root, children):
            try:
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
            except psutil.Error:
                pass
        return out
    except psutil.Error:
        return {}


class Measured:
    """The server side of one step: counters before and after, API CPU, and samples of KV usage and
    RSS every second while it runs (:func:`analysis.lib.soak.sample_server`)."""

    def __init__(self, url: str, pid: int | None, soak):
        from analysis.lib.soak import sample_server

        self.url, self.pid, self.soak = url, pid, soak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=sample_server, args=(url, pid, soak, 1.0, self._stop), daemon=True)

    def __enter__(self):
        self.before, self.cpu_before = counters(self.url), api_cpu_seconds(self.pid)
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.monotonic() - self.t0
        self._stop.set()
        self._thread.join(timeout=30)
        self.cpu_after, self.after = api_cpu_seconds(self.pid), counters(self.url)

    def server(self) -> dict:
        d = {k: self.after[k] - self.before[k] for k in self.before if k in self.after}
        kv = [s["kv_usage"] for s in self.soak.samples if s["kv_usage"] is not None]
        rss = [s["rss_total_mb"] for s in self.soak.samples if s["rss_total_mb"] is not None]
        return {
            **d,
            "kv_usage_peak": max(kv, default=None),
            "rss_peak_mb": max(rss, default=None),
            "api_cpu_percent": lib.cpu_percent(self.cpu_before, self.cpu_after, self.wall_s),
        }


# ------------------------------------------------------------------------------------------------ the streams


def measured_threads(url: str, pid: int | None, soak, run, n: int) -> Measured:
    """``run(i)`` for i < ``n``, one thread each, measured (:class:`Measured`) until all have ended."""
    with Measured(url, pid, soak) as m:
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return m


def live_step(url: str, pid: int | None, clip: Clip, mode: str, n: int, args) -> tuple[lib.StepSamples, dict]:
    """N live streams (:func:`analysis.lib.soak.play_stream`, one thread each) for one step."""
    from analysis.lib.soak import Soak, play_stream

    soak = Soak()
    appends: list[dict] = []
    seconds = args.step_seconds * args.speed  # stream time per stream
    frames = int(seconds * args.fps)
    phases = lib.question_phases(n, args.ask_every, args.fps, args.seed, n)
    rng = random.Random(f"{args.seed}-{n}-start")
    base = time.monotonic() + 1.0
    # the streams' schedules spread over one append so that they do not all push at the same instant
    starts = [base + rng.uniform(0.0, args.append_every / args.speed) for _ in range(n)]
    deadline = base + args.step_seconds + args.ask_every / args.speed + args.append_every / args.speed + GRACE_S
    ended: list[float] = [0.0] * n

    def run(i: int) -> None:
        try:
            play_stream(
                url,
                i,
                clip.images,
                args.fps,
                seconds,
                args.speed,
                starts[i],
                args.ask_every,
                args.append_every,
                lib.STREAM_SETTINGS[mode],
                soak,
                QUESTION,
                args.max_tokens,
                first_question=phases[i],
                deadline=deadline,
                client={"retries": 0, "timeout": args.request_timeout},
                appends=appends,
            )
        except Exception as e:  # noqa: BLE001 - counted: the step goes on with the other streams
            soak.error(f"stream {i}", e)
        finally:
            ended[i] = time.monotonic()

    m = measured_threads(url, pid, soak, run, n)
    lags = [a["lag_s"] for a in appends]
    last = (frames - 1) / args.fps
    for i, sent in soak.progress.items():  # a stream the deadline cut: how late its next frame was then
        if sent < last - 1e-9:
            lags.append(max(0.0, ended[i] - (starts[i] + (sent + 1 / args.fps) / args.speed)))
    samples = lib.StepSamples(
        streams=n,
        wall_s=m.wall_s,
        ttft_s=[q["ttft_s"] for q in soak.questions],
        e2e_s=[q["e2e_s"] for q in soak.questions],
        lag_s=lags,
        append_status=[a["status"] for a in appends],
        failed_questions=len(soak.failed),
        opened=len(soak.progress),
        frames=sum(a["frames"] for a in appends if a["status"] == 200),
        errors=list(soak.errors),
    )
    return samples, m.server()


def resend_step(
    url: str, pid: int | None, model: str, clip: Clip, mode: str, n: int, args
) -> tuple[lib.StepSamples, dict]:
    """N re-send streams (one thread each) for one step: each question is one request with the
    stream's last ``--window`` seconds as one video (:func:`analysis.cli.bench.one_request`)."""
    from analysis.cli.bench import one_request
    from analysis.lib.soak import Soak

    soak = Soak()
    lags: list[float] = []
    sent_frames = [0]
    seconds = args.step_seconds * args.speed
    wf = window_frame_count(args)
    per_window = len(lib.window_frames(0, wf, len(clip.images)))
    phases = lib.question_phases(n, args.ask_every, args.fps, args.seed, n)
    rng = random.Random(f"{args.seed}-{n}-start")
    base = time.monotonic() + 1.0
    starts = [base + rng.uniform(0.0, args.append_every / args.speed) for _ in range(n)]
    deadline = base + args.step_seconds + args.ask_every / args.speed + args.append_every / args.speed + GRACE_S

    def run(i: int) -> None:
        for t in lib.question_times(phases[i], args.ask_every, seconds):
            k = lib.frame_at(t, args.fps)
            due = starts[i] + (k / args.fps) / args.speed  # when its frame arrived, live
            now = time.monotonic()
            if now >= deadline:  # this stream fell behind: its question is late by this much
                with soak.lock:
                    lags.append(max(0.0, now - due))
                return
            if due > now:
                time.sleep(due - now)
            lag = max(0.0, time.monotonic() - due)
            path = clip.window(k, wf)
            try:
                r = one_request(url, model, path, args.max_tokens, question=QUESTION, timeout=args.request_timeout)
            except Exception as e:  # noqa: BLE001 - a failed question, counted; the stream goes on
                soak.fail(i, t, e)
                with soak.lock:
                    lags.append(lag)
                continue
            with soak.lock:
                lags.append(lag)
            if r.get("status") != 200 or r.get("ttft_s") is None:
                soak.fail(i, t, RuntimeError(f"status {r.get('status')}: {r.get('error', 'no token')}"))
                continue
            with soak.lock:
                sent_frames[0] += per_window
                soak.questions.append(
                    {
                        "stream": i,
                        "time": t,
                        "ttft_s": r["ttft_s"],
                        "e2e_s": r["e2e_s"],
                        "lag_s": lag,
                        "prompt_tokens": r.get("prompt_tokens"),
                    }
                )

    m = measured_threads(url, pid, soak, run, n)
    samples = lib.StepSamples(
        streams=n,
        wall_s=m.wall_s,
        ttft_s=[q["ttft_s"] for q in soak.questions],
        e2e_s=[q["e2e_s"] for q in soak.questions],
        lag_s=lags,
        failed_questions=len(soak.failed),
        frames=sent_frames[0],
        errors=list(soak.errors),
    )
    return samples, m.server()


def warm_up(url: str, model: str, clip: Clip, mode: str, args) -> None:
    """One unmeasured question (first-request compilation, the feature tower's loading)."""
    from analysis.cli.bench import one_request
    from vllm_plugin.client import open_stream

    try:
        if mode in lib.RESEND_MODES:
            r = one_request(url, model, clip.window(1, window_frame_count(args)), 1, question=QUESTION)
            if r.get("status") != 200:
                print(f"  warm-up {mode}: {r}", flush=True)
            return
        s = open_stream(url, fps=args.fps, **lib.STREAM_SETTINGS[mode])
        try:
            s.push_encoded(clip.images[:4], [i / args.fps for i in range(min(4, len(clip.images)))])
            s.ask(QUESTION, max_tokens=1)
        finally:
            s.close()
    except Exception as e:  # noqa: BLE001 - its steps will show it
        print(f"  warm-up {mode} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def step_line(row: dict) -> str:
    verdict = "held" if row["passed"] else "MISSED: " + "; ".join(row["reasons"])
    return (
        f"  [{row['clip']}] {row['mode']:11s} N={row['streams']:<3d} ttft p50/p95 {_f(row['ttft_p50_ms'], '.0f')}/"
        f"{_f(row['ttft_p95_ms'], '.0f')} ms ({row['ttft_source']}) lag {row['lag_max_s']:.1f} s "
        f"frames/s {row['frames_per_s']:.1f} prefill tok/s {_f(row['prefill_tokens_per_s'], '.0f')} "
        f"kv {_f(row['kv_usage_peak'], '.0%')} api cpu {_f(row['api_cpu_percent'], '.0f')}% "
        f"429 {row['http_429']} errors {row['errors']} -> {verdict}"
    )


def measure_mode(url: str, pid: int | None, model: str, clip: Clip, mode: str, args, rows: list[dict]) -> lib.Ramp:
    """One mode's ramp on one clip (after a warm-up question): a row per N tried, into ``rows``."""
    warm_up(url, model, clip, mode, args)

    def holds(n: int) -> bool:
        wait_idle(url)
        if mode in lib.RESEND_MODES:
            samples, server = resend_step(url, pid, model, clip, mode, n, args)
        else:
            samples, server = live_step(url, pid, clip, mode, n, args)
        v = lib.verdict(samples, args.slo_ms, args.ask_every / args.speed)
        row = lib.aggregate(clip.name, mode, samples, v, server)
        rows.append(row)
        print(step_line(row), flush=True)
        return v.passed

    r = lib.ramp(holds, args.max_streams)
    print(f"  [{clip.name}] {mode}: capacity {r.capacity}{' (at --max-streams)' if r.bounded else ''}", flush=True)
    return r


# --------------------------------------------------------------------------------------------------- the CLI


def server_args(kind: str, media: Path) -> list[str]:
    """The flags of the server a kind of mode runs on (``dtd``: the DTD server with streams;
    ``stock``: vLLM without the plugin). Prefix caching is vLLM's default; passed to say so."""
    common = [
        "--block-size",
        "32",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--allowed-local-media-path",
        str(media),
    ]
    if kind == "dtd":
        return ["--dtd-streams", *common]
    return [*common, "--limit-mm-per-prompt", json.dumps({"video": 1})]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.capacity", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"dtd-eager and resend only, {QUICK['step_seconds']:g} s steps, N <= {QUICK['max_streams']}",
    )
    ap.add_argument(
        "--video", type=Path, nargs="+", help="clips (default: ../shared/videos/*.mp4, else the bundled clip)"
    )
    ap.add_argument("--modes", nargs="+", choices=lib.MODES, help="default: all five (--quick: dtd-eager resend)")
    ap.add_argument("--speed", type=float, default=1.0, help="stream seconds per wall second")
    ap.add_argument("--fps", type=float, default=1.0, help="frames per second of stream time")
    ap.add_argument("--ask-every", type=float, default=10.0, help="seconds of stream time between a stream's questions")
    ap.add_argument("--append-every", type=float, default=1.0, help="seconds of stream time per append (live)")
    ap.add_argument("--slo-ms", type=float, default=500.0, help="the TTFT p95 target")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of stream a re-send question sends")
    ap.add_argument("--max-streams", type=int, help=f"the ramp's bound (default {FULL['max_streams']})")
    ap.add_argument("--step-seconds", type=float, help=f"wall seconds per N (default {FULL['step_seconds']:g})")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a request counts as failed")
    ap.add_argument("--seed", type=int, default=0, help="the questions' random phases")
    add_model_arguments(ap, "bench7b")
    ap.add_argument("--out", type=Path, default=results_dir("capacity"))
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.modes = list(dict.fromkeys(args.modes or (lib.QUICK_MODES if args.quick else lib.MODES)))
    if args.step_seconds is None:
        args.step_seconds = preset["step_seconds"]
    if args.max_streams is None:
        args.max_streams = int(preset["max_streams"])
    if min(args.speed, args.fps, args.ask_every, args.append_every, args.slo_ms, args.window) <= 0:
        ap.error("--speed, --fps, --ask-every, --append-every, --slo-ms and --window must be > 0")
    if args.step_seconds <= 0 or args.max_streams < 1 or args.max_tokens < 1 or args.request_timeout <= 0:
        ap.error("--step-seconds, --request-timeout > 0; --max-streams, --max-tokens >= 1")
    if args.max_streams > 1024:
        ap.error("--max-streams: at most 1024 (one thread per stream)")
    check_videos(ap, args.video or [])
    model = model_from_arguments(ap, args)

    from analysis.harness.server import VLLMServer
    from analysis.lib.soak import check_loopback
    from analysis.lib.video import VideoDecodeError

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    media = Path(tempfile.mkdtemp(prefix="dtd-capacity-"))
    rows: list[dict] = []
    ramps: dict[str, dict[str, dict]] = {}
    servers: dict[str, list[str]] = {}
    try:
        resend = any(m in lib.RESEND_MODES for m in args.modes)
        clips = []
        for v in args.video or default_videos():
            try:
                clips.append(prepare_clip(Path(v), args, media, resend))
            except VideoDecodeError as e:  # reported on one line and left out, as the bench does
                print(f"  skipped {Path(v).name}: cannot be read: {' '.join(str(e).split())}", flush=True)
        if not clips:
            raise SystemExit("no clip could be read: nothing to measure")
        print(
            f"{len(clips)} clip(s) at {args.fps:g} fps x{args.speed:g}; modes {', '.join(args.modes)}; "
            f"checkpoint {model.name}; SLO TTFT p95 <= {args.slo_ms:g} ms, a question every {args.ask_every:g} s; "
            f"{args.step_seconds:g} s per N, N <= {args.max_streams}",
            flush=True,
        )
        for kind, modes in lib.servers_in_order(args.modes):
            extra = server_args(kind, media)
            servers[kind] = extra
            env = {"DTD_STREAM_MAX_STREAMS": str(args.max_streams + 2)} if kind == "dtd" else {}
            module = "vllm_plugin.serve" if kind == "dtd" else "vllm.entrypoints.openai.api_server"
            print(f"server: {kind} ({module} {' '.join(extra)})", flush=True)
            # die_with_parent: a tool killed mid-run (SIGTERM, SIGKILL) leaves no server behind holding memory
            with VLLMServer(
                model, extra, module=module, env=env, log_path=args.out / f"{kind}.log", die_with_parent=True
            ) as srv:
                url = check_loopback(srv.base_url)
                pid = srv.proc.pid if srv.proc is not None else None
                for clip in clips:
                    for mode in modes:
                        r = measure_mode(url, pid, srv.model, clip, mode, args, rows)
                        ramps.setdefault(clip.name, {})[mode] = {
                            "capacity": r.capacity,
                            "tried": r.tried,
                            "bounded": r.bounded,
                        }
    finally:
        shutil.rmtree(media, ignore_errors=True)

    summaries = [lib.clip_summary(c.name, rows, args.max_streams) for c in clips]
    print()
    for s in summaries:
        print(lib.clip_line(s))
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "checkpoint": str(model),
        "servers": servers,
        "ttft_source": {m: lib.TTFT_SOURCE[m] for m in args.modes},
        "rows": rows,
        "ramps": ramps,
        "summaries": summaries,
        "seconds": time.perf_counter() - t_start,
    }
    paths = lib.write_results(args.out, result, args.slo_ms)
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['html']}; took {result['seconds']:.0f} s")
    head = lib.headline(summaries)
    if head is not None and head["capacity_ratio"] == math.inf:
        print("(re-send holds 0 streams at the SLO: capacity_ratio is printed as inf)")
    print(lib.last_line(head))
    return 1 if any(s["met"] is False for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
