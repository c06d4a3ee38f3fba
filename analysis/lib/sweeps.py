"""Threshold sweeps saved to disk: results.csv / results.parquet and an offline HTML report. The
``python -m analysis.cli.sweep`` tool and notebook 02 both call :func:`run_sweep`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis.lib.figures import kept_tokens_figure, threshold_figure
from analysis.lib.reports import write_report
from analysis.lib.workbench import cell_key, load_tokens, sweep

COLUMNS = ["video", "criterion", "metric", "reference", "threshold", "kept", "total", "drop_ratio", "seconds",
           "tokens_per_step", "frames", "fps", "kept_per_step"]


def load_results(out: Path) -> pd.DataFrame:
    csv = out / "results.csv"
    if not csv.is_file():
        return pd.DataFrame(columns=COLUMNS)
    # results of release 0.1 named the per-step columns "per frame": read them under today's names
    df = pd.read_csv(csv).rename(columns={"kept_per_frame": "kept_per_step", "tokens_per_frame": "tokens_per_step"})
    df["kept_per_step"] = df["kept_per_step"].map(json.loads)
    return df


def save_results(df: pd.DataFrame, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    flat = df.copy()
    flat["kept_per_step"] = flat["kept_per_step"].map(json.dumps)
    flat.to_csv(out / "results.csv", index=False)
    try:
        flat.to_parquet(out / "results.parquet", index=False)
    except ImportError:  # pyarrow is in the notebook extra; CSV always works
        pass


def write_sweep_report(df: pd.DataFrame, out: Path) -> Path:
    """``out/report.html``: drop ratio vs threshold, kept tokens per step of the middle threshold of
    each (video, criterion, metric, reference), and the table. Renders offline."""
    rows = df.to_dict("records")
    figs = [threshold_figure(rows)]
    for (video, criterion, metric, reference), g in df.groupby(["video", "criterion", "metric", "reference"]):
        mid = g.sort_values("threshold").iloc[len(g) // 2]
        fig = kept_tokens_figure(mid["kept_per_step"], int(mid["tokens_per_step"]),
                                 title=f"{video}: {criterion}/{metric}/{reference}, τ={mid['threshold']:g} "
                                       f"(drop {mid['drop_ratio']:.0%})")
        figs.append(fig)
    table = df.drop(columns=["kept_per_step"]).sort_values(["video", "criterion", "metric", "reference", "threshold"])
    return write_report(out / "report.html", figs, "DTD sweep", table.to_html(index=False, float_format=lambda x: f"{x:.4g}"))


def run_sweep(videos: Sequence[Path], thresholds: Sequence[float], metrics: Sequence[str], references: Sequence[str],
              criteria: Sequence[str], out: Path, model_path=None, fps: float = 1.0, max_frames: int = 64,
              progress: bool = True) -> tuple[pd.DataFrame, int]:
    """Run the cells of the grid not yet in ``out`` (results.csv), save results and report.
    Returns (all results, number of cells run now)."""
    old = load_results(out)
    done = {cell_key(r["video"], r["criterion"], r["metric"], r["reference"], r["threshold"]) for r in old.to_dict("records")}
    tokens = [load_tokens(p, fps=fps, max_frames=max_frames) for p in videos]
    rows = sweep(tokens, thresholds, metrics, references, criteria, model_path=model_path, skip=done, progress=progress)
    df = pd.concat([old, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True) if rows else old
    save_results(df, out)
    if len(df):
        write_sweep_report(df, out)
    return load_results(out), len(rows)  # read back: the column types of a saved sweep
