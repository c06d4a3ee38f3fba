"""Ablation CLI: DTD over videos × thresholds × metrics × references (× criteria).

    python -m analysis.cli.sweep --video PATH... --thresholds 0.5:1.0:0.05 --metric cosine,l1
        --references previous,last_kept,motion --out results/ [--criterion pixel,feature] [--fps 1] [--model PATH]

Writes ``results.parquet`` and ``results.csv`` (one row per cell: kept, total, drop ratio, time of
the decision, held error, kept tokens and the reference's offset per temporal step) and
``report.html`` (drop ratio vs threshold, kept tokens per frame, the table). A rerun with the same
``--out`` skips the cells already there. Thresholds outside a metric's range (cosine [-1, 1], l1
[0, 1]) are skipped. ``--videos`` defaults to the shared clips (``../shared/videos``) when given none.

When the references include ``previous`` and ``motion`` and the thresholds include the criterion's
default τ (pixel L1: 0.05), it prints the motion reference's measure per clip — dropped share and held
error of each reference, motion's dropped tokens over previous's — and the goal's verdict
(handheld clip ``moviepy_airplane``: ×1.5 at no higher held error; fixed-view clips within 2%); the
last line is ``motion_goal=met|NOT met``, and the exit status is 1 when NOT met.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.lib.sweeps import reference_comparison, run_sweep
from analysis.lib.workbench import parse_range
from vllm_plugin.core import CRITERIA, METRICS, default_threshold, reference_names

SHARED_VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "videos"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--video", "--videos", nargs="+", type=Path, help="default: the shared clips (../shared/videos/*.mp4)"
    )
    ap.add_argument("--thresholds", required=True, help="start:stop:step (stop included) or a comma list")
    ap.add_argument("--metric", default="cosine,l1")
    ap.add_argument(
        "--reference", "--references", default="previous,last_kept", help=f"a comma list of {list(reference_names())}"
    )
    ap.add_argument("--criterion", default="pixel", help="pixel and/or feature (the vision encoder's output)")
    ap.add_argument(
        "--model",
        default=None,
        help="checkpoint of any family DTD serves (Qwen2.5-VL, Qwen3-VL, Qwen2-VL) for feature tokens "
        "(default: the tiny Qwen2.5-VL test one)",
    )
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--max-frames", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    try:
        thresholds = parse_range(args.thresholds)
    except ValueError as e:
        ap.error(str(e))
    if not args.video:
        args.video = sorted(SHARED_VIDEOS.glob("*.mp4"))
        if not args.video:
            ap.error(f"--video: none given and no clips in {SHARED_VIDEOS}")
    metrics, references, criteria = split(args.metric), split(args.reference), split(args.criterion)
    for name, values, allowed in (
        ("--metric", metrics, METRICS),
        ("--references", references, reference_names()),
        ("--criterion", criteria, CRITERIA),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            ap.error(f"{name}: {bad or values} not in {list(allowed)}")

    df, ran = run_sweep(
        args.video,
        thresholds,
        metrics,
        references,
        criteria,
        args.out,
        model_path=args.model,
        fps=args.fps,
        max_frames=args.max_frames,
        progress=not args.quiet,
    )
    report = args.out / "report.html" if len(df) else None
    print(
        f"{ran} cells run, {len(df) - ran} already in {args.out}; results.csv/.parquet"
        + (f", {report}" if report else "")
    )
    return motion_measure(df, criteria, metrics, thresholds)


def motion_measure(df, criteria, metrics, thresholds) -> int:
    """Print the motion reference's measure at each criterion's default τ (where swept); 1 if a goal is NOT met."""
    failed, printed = False, False
    for criterion in criteria:
        for metric in metrics:
            tau = default_threshold(metric, criterion)
            if not any(abs(t - tau) < 1e-9 for t in thresholds):
                continue
            rows = [r for r in reference_comparison(df, tau, criterion, metric) if "motion_drop_ratio_vs_previous" in r]
            for r in rows:
                printed = True
                verdict = "" if "met" not in r else f"  goal {r['goal']}: {'met' if r['met'] else 'NOT met'}"
                failed |= r.get("met") is False
                print(
                    f"{criterion}/{metric} τ={tau:g} {r['video']}: dropped previous {r['previous_drop']:.3f} "
                    f"motion {r['motion_drop']:.3f} (x{r['motion_drop_ratio_vs_previous']:.3f}), held error previous "
                    f"{r['previous_held_error']:.4f} motion {r['motion_held_error']:.4f}{verdict}"
                )
    if printed:
        print(f"motion_goal={'NOT met' if failed else 'met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
