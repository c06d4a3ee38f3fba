"""The demo: DTD on the bundled clip with the tiny checkpoint.

    python -m analysis.demo [--video PATH] [--fps 1] [--threshold 0.05] [--metric l1] [--out results/demo]

Builds (or reuses) the tiny Qwen2.5-VL checkpoint, decodes the clip, runs the reference
(transformers) pipeline with and without DTD, prints the kept tokens per frame and the prefill
latency of both, and writes a plotly figure of kept tokens per frame.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from analysis.video import SAMPLE_VIDEO, load_video
from vllm_plugin.dtd import DTDConfig


def run_reference(args) -> dict:
    from analysis.reference import ReferencePipeline
    from analysis.tiny_model import ensure_tiny_model

    model = ensure_tiny_model("test")
    video = load_video(args.video, fps=args.fps, max_frames=args.max_frames)
    pipe = ReferencePipeline(model)
    processed = pipe.process_video(video.frames, args.fps)
    dtd = DTDConfig(threshold=args.threshold, metric=args.metric, reference=args.reference, criterion=args.criterion)
    results = {}
    for name, cfg in (("vanilla", DTDConfig(enabled=False)), ("dtd", dtd)):
        t0 = time.perf_counter()
        prepared = pipe.prepare(args.question, video=processed, dtd=cfg)
        t1 = time.perf_counter()
        pipe.logits(prepared)
        t2 = time.perf_counter()
        results[name] = {"prompt_tokens": prepared.num_prompt_tokens, "prepare_s": t1 - t0, "prefill_s": t2 - t1, "stats": prepared.stats.as_dict()}
    T = processed.llm_grid[0]
    results["step_times"] = [float(video.timestamps[min(2 * t, len(video) - 1)]) for t in range(T)]
    results["config"] = {"video": str(args.video), "fps": args.fps, "grid": processed.llm_grid, **dtd.__dict__}
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", type=Path, default=SAMPLE_VIDEO)
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--max-frames", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--metric", default="l1", choices=["l1", "cosine"])
    ap.add_argument("--reference", default="previous", choices=["previous", "last_kept"])
    ap.add_argument("--criterion", default="pixel", choices=["pixel", "feature"])
    ap.add_argument("--question", default="What happens in this video?")
    ap.add_argument("--out", type=Path, default=Path("results/demo"))
    args = ap.parse_args(argv)

    res = run_reference(args)
    d, v = res["dtd"], res["vanilla"]
    s = d["stats"]
    print(f"video {args.video.name}: {res['config']['grid'][0]} temporal steps x {s['tokens_per_frame']} tokens "
          f"(DTD {args.criterion}/{args.metric} tau={args.threshold}, reference={args.reference})")
    print(f"{'step':>4} {'time_s':>7} {'kept':>5} {'of':>4}  bar")
    for i, (k, t) in enumerate(zip(s["kept_per_frame"], res["step_times"])):
        print(f"{i:>4} {t:>7.1f} {k:>5} {s['tokens_per_frame']:>4}  {'#' * round(40 * k / s['tokens_per_frame'])}")
    print(f"video tokens: {s['kept']} kept of {s['total']} (drop ratio {s['drop_ratio']:.1%})")
    print(f"prompt tokens: {d['prompt_tokens']} with DTD vs {v['prompt_tokens']} without")
    print(f"reference prefill latency: {d['prefill_s'] * 1000:.0f} ms with DTD vs {v['prefill_s'] * 1000:.0f} ms without "
          f"(DTD decision + encoder {d['prepare_s'] * 1000:.0f} ms)")

    from analysis.figures import kept_tokens_figure

    args.out.mkdir(parents=True, exist_ok=True)
    fig = kept_tokens_figure(s["kept_per_frame"], s["tokens_per_frame"], times=res["step_times"],
                             title=f"DTD on {args.video.name}: kept tokens per frame (drop {s['drop_ratio']:.0%})")
    html = args.out / "kept_tokens.html"
    fig.write_html(html, include_plotlyjs="cdn")
    (args.out / "demo.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"plot: {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
