"""Ablation CLI: DTD over videos × thresholds × metrics × references (× criteria).

    python -m analysis.sweep --video PATH... --thresholds 0.5:1.0:0.05 --metric cosine,l1
        --reference previous,last_kept --out results/ [--criterion pixel,feature] [--fps 1] [--model PATH]

Writes ``results.parquet`` and ``results.csv`` (one row per cell: kept, total, drop ratio, time of
the decision, kept tokens per frame) and ``report.html`` (drop ratio vs threshold, kept tokens per
frame, the table). A rerun with the same ``--out`` skips the cells already there. Thresholds outside
a metric's range (cosine [-1, 1], l1 [0, 1]) are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from analysis.workbench import cell_key, load_tokens, parse_range, sweep

COLUMNS = ["video", "criterion", "metric", "reference", "threshold", "kept", "total", "drop_ratio", "seconds",
           "tokens_per_frame", "frames", "fps", "kept_per_frame"]


def load_results(out: Path) -> pd.DataFrame:
    csv = out / "results.csv"
    if not csv.is_file():
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(csv)
    df["kept_per_frame"] = df["kept_per_frame"].map(json.loads)
    return df


def save_results(df: pd.DataFrame, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    flat = df.copy()
    flat["kept_per_frame"] = flat["kept_per_frame"].map(json.dumps)
    flat.to_csv(out / "results.csv", index=False)
    try:
        flat.to_parquet(out / "results.parquet", index=False)
    except ImportError:  # pyarrow is in the notebook extra; CSV always works
        pass


def write_report(df: pd.DataFrame, out: Path) -> Path:
    from analysis.figures import kept_tokens_figure, threshold_figure

    rows = df.to_dict("records")
    parts = [threshold_figure(rows).to_html(full_html=False, include_plotlyjs="cdn")]
    for (video, criterion, metric, reference), g in df.groupby(["video", "criterion", "metric", "reference"]):
        mid = g.sort_values("threshold").iloc[len(g) // 2]
        fig = kept_tokens_figure(mid["kept_per_frame"], int(mid["tokens_per_frame"]),
                                 title=f"{video}: {criterion}/{metric}/{reference}, τ={mid['threshold']:g} "
                                       f"(drop {mid['drop_ratio']:.0%})")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    table = df.drop(columns=["kept_per_frame"]).sort_values(["video", "criterion", "metric", "reference", "threshold"])
    html = ("<html><head><meta charset='utf-8'><title>DTD sweep</title></head><body><h1>DTD sweep</h1>"
            + "".join(parts) + table.to_html(index=False, float_format=lambda x: f"{x:.4g}") + "</body></html>")
    path = out / "report.html"
    path.write_text(html)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", nargs="+", required=True, type=Path)
    ap.add_argument("--thresholds", required=True, help="start:stop:step (stop included) or a comma list")
    ap.add_argument("--metric", default="cosine,l1")
    ap.add_argument("--reference", default="previous,last_kept")
    ap.add_argument("--criterion", default="pixel", help="pixel and/or feature (the vision encoder's output)")
    ap.add_argument("--model", default=None, help="Qwen2.5-VL checkpoint for feature tokens (default: the tiny test one)")
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
    for name, values, allowed in (("--metric", metrics, ("cosine", "l1")), ("--reference", references, ("previous", "last_kept")),
                                  ("--criterion", criteria, ("pixel", "feature"))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            ap.error(f"{name}: {bad or values} not in {list(allowed)}")

    old = load_results(args.out)
    done = {cell_key(r["video"], r["criterion"], r["metric"], r["reference"], r["threshold"]) for r in old.to_dict("records")}
    videos = [load_tokens(p, fps=args.fps, max_frames=args.max_frames) for p in args.video]
    rows = sweep(videos, thresholds, metrics, references, criteria, model_path=args.model, skip=done, progress=not args.quiet)
    df = pd.concat([old, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True) if rows else old
    save_results(df, args.out)
    report = write_report(df, args.out) if len(df) else None
    print(f"{len(rows)} cells run, {len(old)} already in {args.out}; results.csv/.parquet" + (f", {report}" if report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
