"""Ablation CLI: DTD over videos × thresholds × metrics × references (× criteria).

    python -m analysis.cli.sweep --video PATH... --thresholds 0.5:1.0:0.05 --metric cosine,l1
        --reference previous,last_kept --out results/ [--criterion pixel,feature] [--fps 1] [--model PATH]

Writes ``results.parquet`` and ``results.csv`` (one row per cell: kept, total, drop ratio, time of
the decision, kept tokens per temporal step) and ``report.html`` (drop ratio vs threshold, kept tokens per
frame, the table). A rerun with the same ``--out`` skips the cells already there. Thresholds outside
a metric's range (cosine [-1, 1], l1 [0, 1]) are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.lib.sweeps import run_sweep
from analysis.lib.workbench import parse_range
from vllm_plugin.core import CRITERIA, METRICS, REFERENCES

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", nargs="+", required=True, type=Path)
    ap.add_argument("--thresholds", required=True, help="start:stop:step (stop included) or a comma list")
    ap.add_argument("--metric", default="cosine,l1")
    ap.add_argument("--reference", default="previous,last_kept")
    ap.add_argument("--criterion", default="pixel", help="pixel and/or feature (the vision encoder's output)")
    ap.add_argument("--model", default=None, help="checkpoint of any family DTD serves (Qwen2.5-VL, Qwen3-VL, Qwen2-VL) for feature tokens (default: the tiny Qwen2.5-VL test one)")
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
    metrics, references, criteria = split(args.metric), split(args.reference), split(args.criterion)
    for name, values, allowed in (("--metric", metrics, METRICS), ("--reference", references, REFERENCES),
                                  ("--criterion", criteria, CRITERIA)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            ap.error(f"{name}: {bad or values} not in {list(allowed)}")

    df, ran = run_sweep(args.video, thresholds, metrics, references, criteria, args.out, model_path=args.model,
                        fps=args.fps, max_frames=args.max_frames, progress=not args.quiet)
    report = args.out / "report.html" if len(df) else None
    print(f"{ran} cells run, {len(df) - ran} already in {args.out}; results.csv/.parquet" + (f", {report}" if report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
