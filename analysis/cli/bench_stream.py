"""Benchmark: a live DTD stream vs re-sending the whole video so far to stock vLLM.

    python -m analysis.cli.bench_stream [--minutes 5] [--video PATH] [--fps 2] [--every 10] [--size bench7b]
                                        [--modes eager,lazy,feature] [--out results/bench_stream]

A clip (looped to ``--minutes``) is played at ``--fps``, appended one second of video at a time; a
question is asked every ``--every`` seconds of video. (a) DTD streams on one server, one after the
other, in the ``--modes`` given: ``eager`` (pixel DTD, frames enter the KV cache as they arrive: the
bench waits until they have, as a real-time stream would have between questions), ``lazy`` (pixel DTD,
the frames since the last question are prefilled with it), ``feature`` (feature-level DTD, eager; the
API server's vision tower encodes each step on arrival); (b) stock vLLM (the same build, no plugin)
gets the whole video so far in every request. Checkpoint ``--size`` (default ``bench7b``: an encoder
as costly, relative to its LLM, as Qwen2.5-VL-7B's). Servers are started and stopped here, one after
the other so they do not share the 2 cores. Per question: time to first token (max_tokens=1, at the
client) and prefilled (= prompt − cached) tokens.

The last line compares the FIRST mode (default eager) with stock: ``ttft_ratio=<(a)/(b) TTFT at the
last question> prefill_ratio=<same for prefilled tokens> question_prefill_tokens=<mean prefilled
tokens per question of (a)> ttft_growth=<(a) TTFT p50 of the last 5 questions / the first 5>``.

The clip is decoded here (the streams get its frames as images): one that cannot be decoded is
reported on one line (``skipped <clip>: <reason>``) and, as it is the only clip, the tool exits
non-zero with that message, before any server starts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from analysis.harness.server import context_args, video_question
from analysis.harness.tiny_model import add_model_arguments, model_from_arguments
from analysis.lib.paths import results_dir
from analysis.lib.video import SAMPLE_VIDEO, VideoDecodeError, load_video, write_video
from vllm_plugin.streams.session import Geometry

QUESTION = "What is happening now?"
BENCH_SIZE = (168, 280)  # frames resized to 6x10 tokens per temporal step so that (b) fits a 32k context


def prepare_frames(video: Path, fps: float, minutes: float) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    v = load_video(video, fps=fps)
    h, w = BENCH_SIZE
    base = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in v.frames])
    n = int(round(minutes * 60 * fps))
    frames = np.concatenate([base] * (n // len(base) + 1))[:n]
    return frames, np.arange(n) / fps


def question_points(n_frames: int, fps: float, every: float) -> list[int]:
    """Frame counts at which a question is asked (every ``every`` s, whole temporal steps)."""
    tps = Geometry().temporal_patch_size
    step = max(tps, int(round(every * fps)) // tps * tps)
    return list(range(step, n_frames + 1, step))


MODES: dict[str, dict[str, Any]] = {  # open_stream's settings
    "eager": {"prefill": "eager"},
    "lazy": {"prefill": "lazy"},
    "feature": {"prefill": "eager", "dtd_criterion": "feature"},
}


def run_stream(srv, frames, stamps, points, fps, mode: str) -> list[dict]:
    from vllm_plugin.client import open_stream

    rows = []
    s = open_stream(srv.base_url, fps=fps, **MODES[mode])
    s.ask("warm up", max_tokens=1)
    done, per_append = 0, max(1, int(round(fps)))  # one second of video per append
    for n in points:
        for a in range(done, n, per_append):
            b = min(n, a + per_append)
            s.push(frames[a:b], stamps[a:b])
        done = n
        s.wait_prefilled()  # eager: what arrived is in the KV cache (a real-time stream had the time)
        t0 = time.perf_counter()
        r = s.ask(QUESTION, max_tokens=1)
        dt = time.perf_counter() - t0
        u = r["usage"]
        rows.append(
            {
                "time_s": float(stamps[n - 1]),
                "ttft_s": dt,
                "prompt_tokens": u["prompt_tokens"],
                "prefilled_tokens": u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"],
                "chunks": r["stream_state"]["chunks"],
            }
        )
        print(
            f"  (a:{mode}) t={rows[-1]['time_s']:6.1f}s ttft {dt * 1000:7.0f} ms "
            f"prefilled {rows[-1]['prefilled_tokens']:6d} "
            f"of {u['prompt_tokens']:6d} ({rows[-1]['chunks']} chunks)",
            flush=True,
        )
    s.close()
    return rows


def run_streams(model: Path, frames, stamps, points, fps, server_args, modes: list[str]) -> tuple[dict, dict]:
    """Every mode on one DTD server; returns (rows per mode, the server's encoder seconds per mode)."""
    from analysis.harness.server import VLLMServer

    out, encoder = {}, {}
    with VLLMServer(model, server_args + ["--dtd-streams"], module="vllm_plugin.serve") as srv:
        for mode in modes:
            before = srv.metric("vllm_dtd_encoder_seconds_total")
            out[mode] = run_stream(srv, frames, stamps, points, fps, mode)
            encoder[mode] = srv.metric("vllm_dtd_encoder_seconds_total") - before
    return out, encoder


def run_stock(model: Path, frames, stamps, points, fps, server_args, media: Path) -> list[dict]:
    from analysis.harness.server import VLLMServer

    rows = []
    with VLLMServer(
        model,
        server_args
        + ["--allowed-local-media-path", str(media), "--media-io-kwargs", json.dumps({"video": {"num_frames": -1}})],
    ) as srv:
        client = srv.client()
        client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "warm up"}], max_tokens=1)
        for n in points:
            path = write_video(media / f"so_far_{n}.mp4", frames[:n], fps)
            t0 = time.perf_counter()
            r = client.chat.completions.create(
                model=srv.model,
                max_tokens=1,
                temperature=0,
                messages=video_question(f"file://{path}", QUESTION),
            )
            dt = time.perf_counter() - t0
            cached = (r.usage.prompt_tokens_details.cached_tokens or 0) if r.usage.prompt_tokens_details else 0
            rows.append(
                {
                    "time_s": float(stamps[n - 1]),
                    "ttft_s": dt,
                    "prompt_tokens": r.usage.prompt_tokens,
                    "prefilled_tokens": r.usage.prompt_tokens - cached,
                }
            )
            print(
                f"  (b) t={rows[-1]['time_s']:6.1f}s ttft {dt * 1000:7.0f} ms "
                f"prefilled {rows[-1]['prefilled_tokens']:6d} "
                f"of {r.usage.prompt_tokens:6d}",
                flush=True,
            )
            path.unlink()
    return rows


def ttft_growth(rows: list[dict], k: int = 5) -> float:
    """TTFT p50 of the last ``k`` questions / the first ``k``."""
    import statistics

    first, last = [r["ttft_s"] for r in rows[:k]], [r["ttft_s"] for r in rows[-k:]]
    return statistics.median(last) / statistics.median(first)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.bench_stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--video", type=Path, default=SAMPLE_VIDEO)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--every", type=float, default=10.0, help="seconds of video between questions")
    ap.add_argument(
        "--modes",
        default="eager,lazy,feature",
        help=f"DTD stream modes, in order, the first one is compared: {sorted(MODES)}",
    )
    add_model_arguments(ap, "bench7b")
    ap.add_argument("--out", type=Path, default=results_dir("bench_stream"))
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {sorted(MODES)}")

    try:
        frames, stamps = prepare_frames(args.video, args.fps, args.minutes)
    except VideoDecodeError as e:
        reason = f"cannot be read: {' '.join(str(e).split())}"
        print(f"  skipped {args.video.name}: {reason}", flush=True)
        raise SystemExit(f"every clip was refused ({args.video.name}: {reason}): nothing to measure") from None
    model = model_from_arguments(ap, args)
    points = question_points(len(frames), args.fps, args.every)
    server_args = [
        *context_args(32768),
        "--block-size",
        "32",
        "--enable-prompt-tokens-details",
        # eager streams cut a chunk per append with kept tokens (at most one per second of video)
        "--limit-mm-per-prompt",
        json.dumps({"video": int(len(frames) / args.fps) + len(points) + 2}),
    ]
    print(
        f"{args.video.name} looped to {args.minutes:g} min at {args.fps:g} fps: {len(frames)} frames "
        f"({BENCH_SIZE[1]}x{BENCH_SIZE[0]}), {len(points)} questions, checkpoint {model.name}",
        flush=True,
    )
    media = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        print(f"(a) DTD streams ({', '.join(modes)}), KV cache reused across questions", flush=True)
        a, encoder_s = run_streams(model, frames, stamps, points, args.fps, server_args, modes)
        print("(b) stock vLLM, whole video so far in every request", flush=True)
        b = run_stock(model, frames, stamps, points, args.fps, server_args, media)
    finally:
        shutil.rmtree(media, ignore_errors=True)

    head = " ".join(f"{'ttft ' + m:>13} {'prefill ' + m:>14}" for m in modes)
    print(f"\n{'t (s)':>7} {head} {'ttft stock':>11} {'prefill stock':>14}")
    for i, rb in enumerate(b):
        cells = " ".join(f"{a[m][i]['ttft_s'] * 1000:11.0f}ms {a[m][i]['prefilled_tokens']:14d}" for m in modes)
        print(f"{rb['time_s']:7.1f} {cells} {rb['ttft_s'] * 1000:9.0f}ms {rb['prefilled_tokens']:14d}")
    summary = {}
    for m in modes:
        rows = a[m]
        summary[m] = {
            "ttft_ratio": rows[-1]["ttft_s"] / b[-1]["ttft_s"],
            "prefill_ratio": rows[-1]["prefilled_tokens"] / max(1, b[-1]["prefilled_tokens"]),
            "question_prefill_tokens": sum(r["prefilled_tokens"] for r in rows) / len(rows),
            "ttft_growth": ttft_growth(rows),
            "encoder_s": encoder_s[m],
            "chunks": rows[-1]["chunks"],
        }
        print(
            f"  {m:8s} "
            + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary[m].items())
        )
    summary["stock"] = {"ttft_growth": ttft_growth(b)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_stream.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "checkpoint": model.name,
                "streams": a,
                "stock": b,
                "summary": summary,
            },
            indent=2,
        )
    )
    try:
        from analysis.lib.figures import stream_ttft_figure
        from analysis.lib.reports import write_report

        write_report(
            args.out / "bench_stream.html",
            [stream_ttft_figure(a[modes[0]], b)],
            "DTD stream vs stock: time to first token",
        )
    except ImportError:
        pass
    s0 = summary[modes[0]]
    print(
        f"ttft_ratio={s0['ttft_ratio']:.4f} prefill_ratio={s0['prefill_ratio']:.4f} "
        f"question_prefill_tokens={s0['question_prefill_tokens']:.1f} ttft_growth={s0['ttft_growth']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
