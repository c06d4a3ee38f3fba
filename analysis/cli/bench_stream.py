"""Benchmark: a live DTD stream vs re-sending the whole video so far to stock vLLM.

    python -m analysis.cli.bench_stream [--minutes 5] [--video PATH] [--fps 2] [--every 10] [--out results/bench_stream]

A clip (looped to ``--minutes``) is played at ``--fps``; a question is asked every ``--every``
seconds of video. (a) our stream: frames are appended to a DTD stream, each question reuses the KV
cache of the past; (b) stock vLLM (the same build, no plugin) gets the whole video so far in every
request. Both on the ``bench`` tiny checkpoint (prefill-dominated), servers started and stopped
here, one after the other so they do not share the 2 cores. Per question: time to first token
(a request with max_tokens=1, measured at the client) and prefilled (= prompt − cached) tokens.
The last line is ``ttft_ratio=<(a)/(b) at the last question> prefill_ratio=<same for prefilled tokens>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from analysis.harness.tiny_model import SIZES
from analysis.lib.paths import results_dir
from vllm_plugin.streams.session import Geometry
from analysis.lib.video import SAMPLE_VIDEO, load_video, write_video

QUESTION = "What is happening now?"
BENCH_SIZE = (168, 280)  # frames resized to 6x10 tokens per temporal step so that (b) fits a 32k context


def prepare_frames(video: Path, fps: float, minutes: float) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    v = load_video(video, fps=fps)
    h, w = BENCH_SIZE
    base = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in v.frames])
    n = int(round(minutes * 60 * fps))
    frames = np.concatenate([base] * (n // len(base) + 1))[:n]
    return frames, np.arange(n) / fps


def question_points(n_frames: int, fps: float, every: float) -> list[int]:
    """Frame counts at which a question is asked (every ``every`` s, whole temporal steps)."""
    tps = Geometry().temporal_patch_size
    step = max(tps, int(round(every * fps)) // tps * tps)
    return list(range(step, n_frames + 1, step))


def run_stream(model: Path, frames, stamps, points, fps, server_args) -> list[dict]:
    from analysis.harness.server import VLLMServer
    from vllm_plugin.client import open_stream

    rows = []
    with VLLMServer(model, server_args + ["--dtd-streams"], module="vllm_plugin.serve") as srv:
        s = open_stream(srv.base_url, fps=fps)
        s.ask("warm up", max_tokens=1)
        done = 0
        for n in points:
            s.push(frames[done:n], stamps[done:n])
            done = n
            t0 = time.perf_counter()
            r = s.ask(QUESTION, max_tokens=1)
            dt = time.perf_counter() - t0
            u = r["usage"]
            rows.append({"time_s": float(stamps[n - 1]), "ttft_s": dt, "prompt_tokens": u["prompt_tokens"],
                         "prefilled_tokens": u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]})
            print(f"  (a) t={rows[-1]['time_s']:6.1f}s ttft {dt * 1000:7.0f} ms prefilled {rows[-1]['prefilled_tokens']:6d} "
                  f"of {u['prompt_tokens']:6d}", flush=True)
        s.close()
    return rows


def run_stock(model: Path, frames, stamps, points, fps, server_args, media: Path) -> list[dict]:
    from analysis.harness.server import VLLMServer

    rows = []
    with VLLMServer(model, server_args + ["--allowed-local-media-path", str(media), "--media-io-kwargs",
                                          json.dumps({"video": {"num_frames": -1}})]) as srv:
        client = srv.client()
        client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "warm up"}], max_tokens=1)
        for n in points:
            path = write_video(media / f"so_far_{n}.mp4", frames[:n], fps)
            t0 = time.perf_counter()
            r = client.chat.completions.create(
                model=srv.model, max_tokens=1, temperature=0,
                messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{path}"}},
                                                       {"type": "text", "text": QUESTION}]}])
            dt = time.perf_counter() - t0
            cached = (r.usage.prompt_tokens_details.cached_tokens or 0) if r.usage.prompt_tokens_details else 0
            rows.append({"time_s": float(stamps[n - 1]), "ttft_s": dt, "prompt_tokens": r.usage.prompt_tokens,
                         "prefilled_tokens": r.usage.prompt_tokens - cached})
            print(f"  (b) t={rows[-1]['time_s']:6.1f}s ttft {dt * 1000:7.0f} ms prefilled {rows[-1]['prefilled_tokens']:6d} "
                  f"of {r.usage.prompt_tokens:6d}", flush=True)
            path.unlink()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.bench_stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--video", type=Path, default=SAMPLE_VIDEO)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--every", type=float, default=10.0, help="seconds of video between questions")
    ap.add_argument("--size", default="bench", choices=sorted(SIZES), help="tiny checkpoint size (bench7b: an encoder as costly, relative to the LLM, as Qwen2.5-VL-7B's)")
    ap.add_argument("--out", type=Path, default=results_dir("bench_stream"))
    args = ap.parse_args(argv)

    from analysis.harness.tiny_model import ensure_tiny_model

    model = ensure_tiny_model(args.size)
    frames, stamps = prepare_frames(args.video, args.fps, args.minutes)
    points = question_points(len(frames), args.fps, args.every)
    server_args = ["--max-model-len", "32768", "--max-num-batched-tokens", "32768", "--block-size", "32",
                   "--enable-prompt-tokens-details", "--limit-mm-per-prompt", json.dumps({"video": len(points) + 1})]
    print(f"{args.video.name} looped to {args.minutes:g} min at {args.fps:g} fps: {len(frames)} frames "
          f"({BENCH_SIZE[1]}x{BENCH_SIZE[0]}), {len(points)} questions, checkpoint {model.name}", flush=True)
    media = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        print("(a) DTD stream, KV cache reused across questions", flush=True)
        a = run_stream(model, frames, stamps, points, args.fps, server_args)
        print("(b) stock vLLM, whole video so far in every request", flush=True)
        b = run_stock(model, frames, stamps, points, args.fps, server_args, media)
    finally:
        shutil.rmtree(media, ignore_errors=True)

    print(f"\n{'t (s)':>7} {'ttft a (ms)':>12} {'ttft b (ms)':>12} {'prefill a':>10} {'prefill b':>10}")
    for ra, rb in zip(a, b):
        print(f"{ra['time_s']:7.1f} {ra['ttft_s'] * 1000:12.0f} {rb['ttft_s'] * 1000:12.0f} {ra['prefilled_tokens']:10d} {rb['prefilled_tokens']:10d}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_stream.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "stream": a, "stock": b}, indent=2))
    try:
        from analysis.lib.figures import stream_ttft_figure
        from analysis.lib.reports import write_report

        write_report(args.out / "bench_stream.html", [stream_ttft_figure(a, b)], "DTD stream vs stock: time to first token")
    except ImportError:
        pass
    ttft_ratio = a[-1]["ttft_s"] / b[-1]["ttft_s"]
    prefill_ratio = a[-1]["prefilled_tokens"] / max(1, b[-1]["prefilled_tokens"])
    print(f"ttft_ratio={ttft_ratio:.4f} prefill_ratio={prefill_ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
