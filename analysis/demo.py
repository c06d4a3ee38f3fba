"""The demo: serve the tiny Qwen2.5-VL with DTD in vLLM, send it the bundled clip, then stream it.

    python -m analysis.demo [--video PATH] [--fps 1] [--threshold 0.05] [--metric l1] [--speed 1]
                            [--ask-every 4] [--out results/demo]
    python -m analysis.demo --reference-only     # no server: the transformers reference pipeline

Builds (or reuses) the tiny checkpoint and starts ``python -m vllm_plugin.serve --dtd-streams`` on a
free loopback port. 1) One request with the whole clip, DTD off then on (OpenAI API): prompt
tokens and time to first token. 2) The clip played into a live stream at real-time speed with a
question every few seconds: per-question latency and cached tokens, scene-change events. Prints the
kept tokens per frame, writes a plotly figure, stops the server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from analysis.video import SAMPLE_VIDEO
from vllm_plugin.dtd import DTDConfig


def _timed_chat(client, model: str, url: str, question: str, mm: dict) -> dict:
    """One streamed chat request: time to first token, end-to-end time, usage, DTD stats."""
    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model, stream=True, stream_options={"include_usage": True}, max_tokens=16, temperature=0.0,
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]}],
        extra_body={"mm_processor_kwargs": mm},
    )
    stats = json.loads(raw.headers.get("x-dtd-stats", '{"videos": []}'))["videos"]
    ttft, usage, text = None, None, ""
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - t0, "e2e_s": time.perf_counter() - t0,
            "prompt_tokens": usage.prompt_tokens if usage else None, "stats": stats[0] if stats else None, "text": text}


def run_served(args) -> dict:
    from analysis.server import VLLMServer
    from analysis.tiny_model import ensure_tiny_model

    model = ensure_tiny_model("test")
    media = Path(tempfile.mkdtemp(prefix="dtd-demo-"))
    clip = media / args.video.name
    shutil.copy(args.video, clip)
    server_args = [
        "--dtd-streams", "--block-size", "32",
        "--allowed-local-media-path", str(media),
        "--media-io-kwargs", json.dumps({"video": {"num_frames": -1, "fps": args.fps}}),
        "--mm-processor-kwargs", json.dumps({"dtd_threshold": args.threshold, "dtd_metric": args.metric, "dtd_reference": args.reference}),
    ]
    print(f"starting vLLM with DTD on {model.name} (python -m vllm_plugin.serve; ~1-2 min on a CPU) ...", flush=True)
    t0 = time.perf_counter()
    try:
        with VLLMServer(model, server_args, module="vllm_plugin.serve") as srv:
            print(f"server up in {time.perf_counter() - t0:.0f} s at {srv.base_url}", flush=True)
            client = srv.client()
            url = f"file://{clip}"
            client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)  # warm-up
            vanilla = _timed_chat(client, srv.model, url, args.question, {"dtd_enabled": False})
            dtd = _timed_chat(client, srv.model, url, args.question, {})
            again = _timed_chat(client, srv.model, url, args.question, {})
            print(f"whole clip in one request: prompt tokens {dtd['prompt_tokens']} with DTD vs {vanilla['prompt_tokens']} "
                  f"without; time to first token {dtd['ttft_s'] * 1000:.0f} ms vs {vanilla['ttft_s'] * 1000:.0f} ms "
                  f"({again['ttft_s'] * 1000:.0f} ms when repeated: prefix + multimodal caches)", flush=True)
            pace = f"{args.speed:g}x real time" if args.speed > 0 else "full speed"
            print(f"\nstreaming {args.video.name} at {pace}, a question every {args.ask_every:g} s:", flush=True)
            stream = _play(srv.base_url, args)
    finally:
        shutil.rmtree(media, ignore_errors=True)
    return {"vanilla": vanilla, "dtd": dtd, "dtd_cached": again, "stream": stream}


def _play(base_url: str, args) -> dict:
    from analysis.stream_example import play, print_answer, print_event
    from analysis.video import load_video
    from vllm_plugin.client import open_stream

    v = load_video(args.video, fps=args.fps)
    s = open_stream(base_url, fps=args.fps, dtd_threshold=args.threshold, dtd_metric=args.metric)
    try:
        rec = play(s, v.frames, v.timestamps, ask_every=args.ask_every, question=args.question, speed=args.speed,
                   on_answer=print_answer, on_event=print_event)
    finally:
        s.close()
    return {"questions": rec.questions, "events": rec.events, "kept_per_step": rec.kept_per_step,
            "tokens_per_step": rec.tokens_per_step}


def run_reference(args) -> dict:
    from analysis.reference import ReferencePipeline
    from analysis.tiny_model import ensure_tiny_model
    from analysis.video import load_video

    video = load_video(args.video, fps=args.fps, max_frames=64)
    pipe = ReferencePipeline(ensure_tiny_model("test"))
    processed = pipe.process_video(video.frames, args.fps)
    out = {}
    for name, cfg in (("vanilla", DTDConfig(enabled=False)),
                      ("dtd", DTDConfig(threshold=args.threshold, metric=args.metric, reference=args.reference))):
        t0 = time.perf_counter()
        prepared = pipe.prepare(args.question, video=processed, dtd=cfg)
        pipe.logits(prepared)
        out[name] = {"ttft_s": time.perf_counter() - t0, "e2e_s": None, "prompt_tokens": prepared.num_prompt_tokens,
                     "stats": prepared.stats.as_dict(), "text": ""}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", type=Path, default=SAMPLE_VIDEO)
    ap.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--metric", default="l1", choices=["l1", "cosine"])
    ap.add_argument("--reference", default="previous", choices=["previous", "last_kept"])
    ap.add_argument("--question", default="What happens in this video?")
    ap.add_argument("--speed", type=float, default=1.0, help="stream playback: 1 = real time, 0 = as fast as possible")
    ap.add_argument("--ask-every", type=float, default=4.0, help="stream: seconds of video between questions")
    ap.add_argument("--out", type=Path, default=Path("results/demo"))
    ap.add_argument("--reference-only", action="store_true", help="no vLLM server: the transformers reference pipeline")
    args = ap.parse_args(argv)
    DTDConfig(threshold=args.threshold, metric=args.metric, reference=args.reference)  # fail fast on bad values

    res = run_reference(args) if args.reference_only else run_served(args)
    d, v = res["dtd"], res["vanilla"]
    s = d["stats"]
    if "stream" in res:  # the live stream's causal DTD over every frame played
        st = res["stream"]
        kept = st["kept_per_step"]
        s = {"kept_per_frame": kept, "tokens_per_frame": st["tokens_per_step"], "kept": sum(kept),
             "total": st["tokens_per_step"] * len(kept), "drop_ratio": 1 - sum(kept) / max(1, st["tokens_per_step"] * len(kept))}
    tpf = s["tokens_per_frame"]
    step_s = 2.0 / args.fps  # one temporal step = temporal_patch_size frames
    print(f"\n{args.video.name}: {len(s['kept_per_frame'])} temporal steps x {tpf} tokens "
          f"(pixel-level {args.metric}, tau={args.threshold}, reference={args.reference})")
    print(f"{'step':>4} {'time_s':>7} {'kept':>5} {'of':>4}  bar")
    for i, k in enumerate(s["kept_per_frame"]):
        print(f"{i:>4} {i * step_s:>7.1f} {k:>5} {tpf:>4}  {'#' * round(40 * k / tpf)}")
    print(f"video tokens: {s['kept']} kept of {s['total']} (drop ratio {s['drop_ratio']:.1%})")
    print(f"prompt tokens (whole clip, one request): {d['prompt_tokens']} with DTD vs {v['prompt_tokens']} without")
    label = "reference prefill" if args.reference_only else "time to first token"
    print(f"{label}: {d['ttft_s'] * 1000:.0f} ms with DTD vs {v['ttft_s'] * 1000:.0f} ms without")
    if "stream" in res and res["stream"]["questions"]:
        qs = res["stream"]["questions"]
        ttfts = ", ".join(f"{q['ttft_s'] * 1000:.0f}" for q in qs)
        cached = ", ".join(str(q["cached_tokens"]) for q in qs)
        print(f"stream: {len(qs)} questions, time to first token {ttfts} ms; cached prompt tokens {cached}")

    from analysis.figures import kept_tokens_figure

    args.out.mkdir(parents=True, exist_ok=True)
    events = [e["time"] for e in res.get("stream", {}).get("events", []) if e["type"] == "scene_change"]
    fig = kept_tokens_figure(s["kept_per_frame"], tpf, times=[i * step_s for i in range(len(s["kept_per_frame"]))],
                             events=events, title=f"DTD on {args.video.name}: kept tokens per frame (drop {s['drop_ratio']:.0%})")
    html = args.out / "kept_tokens.html"
    fig.write_html(html, include_plotlyjs="cdn")
    (args.out / "demo.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"plot: {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
