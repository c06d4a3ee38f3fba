"""The demo: serve the tiny Qwen2.5-VL with DTD in vLLM and show what DTD does on two bundled clips.

    python -m analysis.cli.demo [--video PATH ...] [--fps 1] [--threshold 0.05] [--metric l1] [--speed 1]
                            [--ask-every 4] [--out results/demo]
    python -m analysis.cli.demo --reference-only     # no server: the transformers reference pipeline

Builds (or reuses) the tiny checkpoint and starts ``python -m vllm_plugin.serve --dtd-streams`` on a
free loopback port. For each clip (default: the handheld ``moviepy_airplane.mp4`` and the screen
recording ``screen_recording.mp4``): 1) one request with the whole clip, DTD off then on (OpenAI
API): prompt tokens and time to first token; 2) the clip played into a live stream at real-time
speed with a question every few seconds: latency, cached tokens, scene-change events; 3) the same
stream with feature-level DTD (the paper's criterion: cosine of the vision tower's outputs, each
temporal step encoded once, on arrival, in the API server; eager prefill); 4) at the end, the first
clip's pixel-level stream again through OpenAI's Realtime API (``/v1/realtime``, the official
``openai`` SDK): its kept tokens per step match the HTTP stream's. Prints the kept
tokens per temporal step and a side-by-side table of both clips, writes an HTML report that renders
offline (plotly.js beside it), stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from analysis.harness.server import video_question
from analysis.lib.paths import SAMPLE_VIDEO, SCREEN_VIDEO, results_dir
from vllm_plugin.core import METRICS, DTDConfig, default_threshold, reference_names


def _timed_chat(client, model: str, url: str, question: str, mm: dict) -> dict:
    """One streamed chat request: time to first token, end-to-end time, usage, DTD stats."""
    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=16,
        temperature=0.0,
        messages=video_question(url, question),
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
    return {
        "ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
        "e2e_s": time.perf_counter() - t0,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "stats": stats[0] if stats else None,
        "text": text,
    }


def run_served(args) -> dict:
    from analysis.harness.server import VLLMServer
    from analysis.harness.tiny_model import ensure_tiny_model

    model = ensure_tiny_model("test")
    media = Path(tempfile.mkdtemp(prefix="dtd-demo-"))
    for v in args.video:
        shutil.copy(v, media / v.name)
    server_args = [
        "--dtd-streams",
        "--block-size",
        "32",
        "--allowed-local-media-path",
        str(media),
        "--media-io-kwargs",
        json.dumps({"video": {"num_frames": -1, "fps": args.fps}}),
        "--mm-processor-kwargs",
        json.dumps({"dtd_threshold": args.threshold, "dtd_metric": args.metric, "dtd_reference": args.reference}),
    ]
    print(f"starting vLLM with DTD on {model.name} (python -m vllm_plugin.serve; ~1-2 min on a CPU) ...", flush=True)
    t0 = time.perf_counter()
    out = {}
    try:
        with VLLMServer(model, server_args, module="vllm_plugin.serve") as srv:
            print(f"server up in {time.perf_counter() - t0:.0f} s at {srv.base_url}", flush=True)
            client = srv.client()
            client.chat.completions.create(
                model=srv.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )  # warm-up
            for video in args.video:
                url = f"file://{media / video.name}"
                vanilla = _timed_chat(client, srv.model, url, args.question, {"dtd_enabled": False})
                dtd = _timed_chat(client, srv.model, url, args.question, {})
                again = _timed_chat(client, srv.model, url, args.question, {})
                print(
                    f"\n{video.name}, whole clip in one request: prompt tokens {dtd['prompt_tokens']} with DTD vs "
                    f"{vanilla['prompt_tokens']} without; time to first token {dtd['ttft_s'] * 1000:.0f} ms vs "
                    f"{vanilla['ttft_s'] * 1000:.0f} ms ({again['ttft_s'] * 1000:.0f} ms when repeated: prefix + "
                    "multimodal caches)",
                    flush=True,
                )
                pace = f"{args.speed:g}x real time" if args.speed > 0 else "full speed"
                print(f"streaming {video.name} at {pace}, a question every {args.ask_every:g} s:", flush=True)
                pixel = _play(srv.base_url, video, args)
                encoded = srv.metric("vllm_dtd_encoder_steps_total")
                print(
                    f"the same stream with feature-level DTD (cosine of the vision tower's outputs, "
                    f"tau={default_threshold('cosine', 'feature')}; each step encoded once, on arrival):",
                    flush=True,
                )
                feature = _play(srv.base_url, video, args, criterion="feature")
                feature["steps_encoded"] = int(srv.metric("vllm_dtd_encoder_steps_total") - encoded)
                print(
                    f"vision tower in the API server: {feature['steps_encoded']} temporal steps encoded for "
                    f"{len(feature['kept_per_step'])} steps streamed (the engine encoded none of them)",
                    flush=True,
                )
                out[video.name] = {
                    "vanilla": vanilla,
                    "dtd": dtd,
                    "dtd_cached": again,
                    "stream": pixel,
                    "stream_feature": feature,
                }
            first = args.video[0]
            print(
                f"\nthe same pixel-level stream of {first.name} through OpenAI's Realtime API "
                f"({srv.base_url.replace('http', 'ws')}/v1/realtime, the official openai SDK):",
                flush=True,
            )
            realtime = _play(srv.base_url, first, args, realtime_model=srv.model)
            http = out[first.name]["stream"]["kept_per_step"]
            print(
                f"kept tokens per step {'identical to' if realtime['kept_per_step'] == http else 'DIFFERENT from'} "
                f"the HTTP stream's ({sum(realtime['kept_per_step'])} of "
                f"{len(http) * out[first.name]['stream']['tokens_per_step']})",
                flush=True,
            )
            out[first.name]["stream_realtime"] = realtime
    finally:
        shutil.rmtree(media, ignore_errors=True)
    return out


def _play(base_url: str, video: Path, args, criterion: str = "pixel", realtime_model: str | None = None) -> dict:
    """Play ``video`` into a stream: the HTTP routes, or ``/v1/realtime`` (``realtime_model``: the served name)."""
    from analysis.lib.play import play, play_realtime, print_answer, print_event
    from analysis.lib.video import load_video
    from vllm_plugin.client import open_stream

    v = load_video(video, fps=args.fps)
    settings = (
        {"dtd_threshold": args.threshold, "dtd_metric": args.metric}
        if criterion == "pixel"
        else {"dtd_criterion": criterion}
    )
    common = dict(
        ask_every=args.ask_every,
        question=args.question,
        speed=args.speed,
        on_answer=print_answer,
        on_event=print_event,
    )
    if realtime_model is not None:
        stream_settings = {"fps": args.fps, **settings}
        rec = asyncio.run(
            play_realtime(base_url, realtime_model, v.frames, v.timestamps, stream_settings=stream_settings, **common)
        )
    else:
        s = open_stream(base_url, fps=args.fps, **settings)
        try:
            rec = play(s, v.frames, v.timestamps, **common)
        finally:
            s.close()
    return {
        "questions": rec.questions,
        "events": rec.events,
        "kept_per_step": rec.kept_per_step,
        "tokens_per_step": rec.tokens_per_step,
        "step_seconds": rec.step_seconds,
    }


def run_reference(args) -> dict:
    from analysis.harness.tiny_model import ensure_tiny_model
    from analysis.lib.reference import ReferencePipeline
    from analysis.lib.video import load_video

    pipe = ReferencePipeline(ensure_tiny_model("test"))
    out = {}
    for video_path in args.video:
        video = load_video(video_path, fps=args.fps, max_frames=64)
        processed = pipe.process_video(video.frames, args.fps)
        res = {}
        for name, cfg in (
            ("vanilla", DTDConfig(enabled=False)),
            ("dtd", DTDConfig(threshold=args.threshold, metric=args.metric, reference=args.reference)),
        ):
            t0 = time.perf_counter()
            prepared = pipe.prepare(args.question, video=processed, dtd=cfg)
            pipe.logits(prepared)
            assert prepared.stats is not None  # prepared with a video
            res[name] = {
                "ttft_s": time.perf_counter() - t0,
                "e2e_s": None,
                "prompt_tokens": prepared.num_prompt_tokens,
                "stats": prepared.stats.as_dict(),
                "text": "",
            }
        res["step_seconds"] = pipe.temporal_patch_size / args.fps
        out[video_path.name] = res
    return out


def clip_stats(res: dict, stream: str = "stream") -> dict:
    """Kept tokens per temporal step of one clip: the live stream's causal DTD over every frame played
    (served demo; ``stream="stream_feature"``: the feature-level stream), else the one-request DTD
    stats (reference pipeline)."""
    if stream in res:
        st = res[stream]
        kept, per = st["kept_per_step"], st["tokens_per_step"]
        return {
            "kept_per_step": kept,
            "tokens_per_step": per,
            "kept": sum(kept),
            "total": per * len(kept),
            "drop_ratio": 1 - sum(kept) / max(1, per * len(kept)),
            "step_seconds": st["step_seconds"],
        }
    return {**res["dtd"]["stats"], "step_seconds": res["step_seconds"]}


def print_clip(name: str, s: dict, args) -> None:
    tps = s["tokens_per_step"]
    print(
        f"\n{name}: {len(s['kept_per_step'])} temporal steps x {tps} tokens "
        f"(pixel-level {args.metric}, tau={args.threshold}, reference={args.reference})"
    )
    print(f"{'step':>4} {'time_s':>7} {'kept':>5} {'of':>4}  bar")
    for i, k in enumerate(s["kept_per_step"]):
        print(f"{i:>4} {i * s['step_seconds']:>7.1f} {k:>5} {tps:>4}  {'#' * round(40 * k / tps)}")


def side_by_side(res: dict, reference_only: bool) -> list[str]:
    """The table that opens the demo's summary: one column per clip."""
    names = list(res)
    w = max(22, *(len(n) + 2 for n in names))
    rows = [("", names)]
    stats = {n: clip_stats(res[n]) for n in names}
    rows.append(("video tokens kept", [f"{stats[n]['kept']} of {stats[n]['total']}" for n in names]))
    rows.append(("dropped by DTD", [f"{stats[n]['drop_ratio']:.1%}" for n in names]))
    rows.append(
        (
            "prompt tokens (DTD / off)",
            [f"{res[n]['dtd']['prompt_tokens']} / {res[n]['vanilla']['prompt_tokens']}" for n in names],
        )
    )
    label = "prefill ms (DTD / off)" if reference_only else "TTFT ms (DTD / off)"
    rows.append(
        (label, [f"{res[n]['dtd']['ttft_s'] * 1000:.0f} / {res[n]['vanilla']['ttft_s'] * 1000:.0f}" for n in names])
    )
    if not reference_only:
        rows.append(
            (
                "stream questions: TTFT ms",
                [", ".join(f"{q['ttft_s'] * 1000:.0f}" for q in res[n]["stream"]["questions"]) for n in names],
            )
        )
        feat = {n: clip_stats(res[n], "stream_feature") for n in names}
        rows.append(
            (
                "feature-level: kept",
                [f"{feat[n]['kept']} of {feat[n]['total']} ({feat[n]['drop_ratio']:.1%} dropped)" for n in names],
            )
        )
        rows.append(
            (
                "feature stream: TTFT ms",
                [", ".join(f"{q['ttft_s'] * 1000:.0f}" for q in res[n]["stream_feature"]["questions"]) for n in names],
            )
        )
    w = max(w, *(len(v) + 2 for _, values in rows for v in values))
    return [f"{label:<27}" + "".join(f"{v:>{w}}" for v in values) for label, values in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", type=Path, nargs="+", default=[SAMPLE_VIDEO, SCREEN_VIDEO])
    ap.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    ap.add_argument("--threshold", type=float, default=None, help="default: the metric's pixel-level default")
    ap.add_argument("--metric", default="l1", choices=list(METRICS))
    ap.add_argument("--reference", default="previous", choices=list(reference_names()))
    ap.add_argument("--question", default="What happens in this video?")
    ap.add_argument("--speed", type=float, default=1.0, help="stream playback: 1 = real time, 0 = as fast as possible")
    ap.add_argument("--ask-every", type=float, default=4.0, help="stream: seconds of video between questions")
    ap.add_argument("--out", type=Path, default=results_dir("demo"))
    ap.add_argument("--reference-only", action="store_true", help="no vLLM server: the transformers reference pipeline")
    args = ap.parse_args(argv)
    if args.threshold is None:
        args.threshold = default_threshold(args.metric)
    if args.reference != "previous" and not args.reference_only:
        ap.error(
            "--reference last_kept: the served demo streams, and streams compare with the previous step only; "
            "use it with --reference-only"
        )
    DTDConfig(threshold=args.threshold, metric=args.metric, reference=args.reference)  # fail fast on bad values

    res = run_reference(args) if args.reference_only else run_served(args)
    for name in res:
        print_clip(name, clip_stats(res[name]), args)
    print("\nDTD side by side (the same model and settings; only the video differs):")
    for line in side_by_side(res, args.reference_only):
        print(line)

    from analysis.lib.figures import kept_tokens_figure
    from analysis.lib.reports import write_report

    figs = []
    for name, r in res.items():
        for key, level in (("stream", "pixel-level"), ("stream_feature", "feature-level")):
            if key == "stream_feature" and key not in r:
                continue
            s = clip_stats(r, key)
            events = [e["time"] for e in r.get(key, {}).get("events", []) if e["type"] == "scene_change"]
            figs.append(
                kept_tokens_figure(
                    s["kept_per_step"],
                    s["tokens_per_step"],
                    times=[i * s["step_seconds"] for i in range(len(s["kept_per_step"]))],
                    events=events,
                    title=f"{level} DTD on {name}: kept tokens per temporal step (drop {s['drop_ratio']:.0%})",
                )
            )
    html = write_report(args.out / "kept_tokens.html", figs, "DTD demo: kept video tokens per temporal step")
    (args.out / "demo.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"report: {html} (opens offline: plotly.js is beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
