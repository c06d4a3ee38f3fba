"""Accuracy at a drop ratio on streaming-video benchmarks, through a server's stream routes.

    python -m analysis.eval_stream --format streamingbench|ovobench --data FILE.json --videos DIR
        (--url URL | --model PATH) [--modes full,dtd,uniform] [--thresholds a:b:s] [--criterion feature]
        [--metric cosine] [--fps 1] [--limit N] --out DIR

Each video is played into streams (``/v1/streams``) up to each question's time — only frames stamped
at or before it are ever sent, checked at every ask — and the question is asked with the benchmark's
own prompt (``analysis.eval.conventions``). Modes run on the same questions: ``full`` (DTD off),
``dtd`` (each τ of the grid, each criterion) and ``uniform`` (DTD off at a lower frame rate with as
many video tokens as the DTD pass of the same τ). ``--model PATH`` starts ``python -m
vllm_plugin.serve --dtd-streams`` on that checkpoint for the run (``--serve-args`` adds flags).

Writes to ``--out``: results.jsonl/passes.jsonl (the resumable store: a rerun skips the passes done),
results.parquet + results.csv (per question and mode), summary.csv (per task and mode) and
report.html (offline). The last line: ``questions=N accuracy=A drop_ratio=D`` of the first DTD mode
(else the first mode); the lines before it give every mode.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from analysis.eval.evaluate import evaluate
from analysis.eval.formats import FORMATS, load_questions
from analysis.eval.results import headline, ovo_scores, summarize
from analysis.eval.runner import MODES, modes_grid
from analysis.lib.workbench import parse_range
from vllm_plugin.core import CRITERIA, METRICS
from vllm_plugin.core.config import DEFAULT_METRICS, default_threshold, validate_threshold


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m analysis.eval_stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--data", required=True, type=Path, help="the benchmark's question file (JSON)")
    ap.add_argument("--videos", required=True, type=Path, help="folder holding the benchmark's videos")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server with the DTD plugin and --dtd-streams")
    src.add_argument("--model", type=Path, help="a checkpoint: starts python -m vllm_plugin.serve --dtd-streams on it")
    ap.add_argument("--serve-args", default="", help="extra flags for the server --model starts (one string)")
    ap.add_argument("--served-model", default=None, help="model name to send (default: the server's)")
    ap.add_argument("--modes", default="full,dtd,uniform", help=f"comma list of {list(MODES)}")
    ap.add_argument(
        "--thresholds",
        default=None,
        help="τ grid: start:stop:step (stop included) or a comma list (default: the criterion's default τ)",
    )
    ap.add_argument("--criterion", default="feature", help=f"comma list of {list(CRITERIA)} (the paper's: feature)")
    ap.add_argument(
        "--metric", default=None, help=f"one of {list(METRICS)} (default: cosine for feature, l1 for pixel)"
    )
    ap.add_argument("--fps", type=float, default=1.0, help="frames per second played (the paper's evaluation: 1)")
    ap.add_argument("--limit", type=int, default=None, help="the first N questions of the file only")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    args.mode_names, args.criteria = split(args.modes), split(args.criterion)
    bad = [c for c in args.criteria if c not in CRITERIA]
    if bad or not args.criteria:
        ap.error(f"--criterion: {bad or args.criteria} not in {list(CRITERIA)}")
    if args.metric is not None and args.metric not in METRICS:
        ap.error(f"--metric: {args.metric!r} not in {list(METRICS)}")
    metrics = {c: args.metric or DEFAULT_METRICS[c] for c in args.criteria}
    try:
        grid = parse_range(args.thresholds) if args.thresholds else None
        thresholds = {c: grid or [default_threshold(metrics[c], c)] for c in args.criteria}
        for c in args.criteria:
            for t in thresholds[c]:
                validate_threshold(t, metrics[c], "--thresholds")
        args.mode_list = modes_grid(args.mode_names, args.criteria, metrics, thresholds)
    except ValueError as e:
        ap.error(str(e))
    if not 0 < args.fps <= 60:
        ap.error("--fps must be in (0, 60] (the stream routes' range)")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    if not args.videos.is_dir():
        ap.error(f"--videos: {args.videos} is not a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        questions, issues = load_questions(args.data, args.format)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for issue in issues:
        print(f"skipped malformed entry: {issue}", file=sys.stderr)
    if args.limit:
        questions = questions[: args.limit]
    if not questions:
        print("error: no question to ask", file=sys.stderr)
        return 2
    from analysis.harness.server import ServerError, answers, check_streams

    server = None
    url = args.url
    if url is not None:
        if not answers(url):
            print(f"error: no vLLM server answers at {url} (start one, or give --model PATH)", file=sys.stderr)
            return 2
        try:
            check_streams(url)
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.model is not None:
        from analysis.harness.server import VLLMServer, gpu_available

        extra = ["--dtd-streams", *shlex.split(args.serve_args)]
        server = VLLMServer(args.model, extra, module="vllm_plugin.serve", cpu_defaults=not gpu_available())
        print(
            f"starting python -m vllm_plugin.serve on {args.model} (log: {server.log_path})",
            file=sys.stderr,
            flush=True,
        )
        server.start()
        url = server.base_url
    try:
        out = evaluate(
            questions,
            args.videos,
            url,
            args.mode_list,
            args.out,
            fps=args.fps,
            model=args.served_model,
            progress=not args.quiet,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    df = out.results
    print(
        f"{out.ran} passes run, {out.skipped} already in {args.out}; {len(issues)} malformed entries, "
        f"{len(out.missing)} videos missing, {len(out.failed)} passes failed; results.csv/.parquet, summary.csv"
        + (f", {out.report}" if out.report else "")
    )
    if not df.empty:
        for r in summarize(df, by=()).to_dict("records"):
            print(
                f"mode={r['mode_key']} questions={r['questions']} accuracy={r['accuracy']:.4f} "
                f"unparsed={r['unparsed']} errors={r['errors']} drop_ratio={r['drop_ratio']:.4f} "
                f"prompt_tokens={r['prompt_tokens']:.0f} ttft_s={r['ttft_s']:.3f}"
            )
        for r in ovo_scores(df).to_dict("records"):
            print(
                f"mode={r['mode_key']} ovobench "
                + " ".join(f"{k}={r[k]:.4f}" for k in ("backward", "realtime", "forward", "total") if r[k] == r[k])
            )
    print(headline(df))
    return 0


if __name__ == "__main__":
    sys.exit(main())
