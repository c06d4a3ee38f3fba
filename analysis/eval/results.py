"""Results of an accuracy run: a resumable store, per-task summaries and the offline HTML report.

``results.jsonl`` holds one line per (question, mode) and ``passes.jsonl`` one per (video, mode):
both are appended as each pass ends, so an interrupted run loses at most the pass it was in and a
rerun with the same ``--out`` skips what is there. ``results.parquet``/``results.csv`` (per question),
``summary.csv`` (per task and mode) and ``report.html`` are rewritten from the store at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis.eval.runner import Pass
from analysis.lib.reports import write_report

SUMMARY_COLUMNS = [
    "mode_key",
    "mode",
    "criterion",
    "metric",
    "threshold",
    "benchmark",
    "task",
    "questions",
    "accuracy",
    "unparsed",
    "errors",
    "drop_ratio",
    "prompt_tokens",
    "video_tokens",
    "ttft_s",
]


class Store:
    """The run directory's JSON-lines files (a torn last line, from a killed run, is ignored)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows_path, self.passes_path = self.out / "results.jsonl", self.out / "passes.jsonl"

    @staticmethod
    def _read(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def check_settings(self, settings: dict) -> None:
        """Record what the results were measured with (``run.json``) or, when the directory holds a
        run already, refuse different settings: its rows would be mixed with the new ones."""
        path = self.out / "run.json"
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff:
                raise ValueError(
                    f"{self.out} holds a run with other settings ("
                    + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                    + "): give another --out, or remove it"
                )
        else:
            path.write_text(json.dumps(settings, indent=2), encoding="utf-8")

    def rows(self) -> list[dict]:
        """Every row, the latest per (question, mode)."""
        latest = {(r["qid"], r["mode_key"]): r for r in self._read(self.rows_path)}
        return list(latest.values())

    def done(self) -> set[tuple[str, str]]:
        return {(r["qid"], r["mode_key"]) for r in self.rows()}

    def passes(self) -> dict[tuple[str, str], Pass]:
        return {(p["video"], p["mode"]): Pass(**p) for p in self._read(self.passes_path)}

    def add(self, rows: Iterable[dict], totals: Pass) -> None:
        """The pass's totals first, then its rows: a pass counts as done when both are there."""
        with open(self.passes_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(totals.__dict__) + "\n")
        with open(self.rows_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, default=_json_default) + "\n" for r in rows)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x)} is not JSON serializable")


def summarize(df: pd.DataFrame, by: Iterable[str] = ("task",)) -> pd.DataFrame:
    """Per mode (and ``by``): questions; accuracy as the benchmarks count it (right answers over
    questions; OVO-Bench forward tasks: right probes over probes) over the questions the server
    answered (a question with a refused ask, e.g. a prompt longer than the context, is left out, as
    StreamingBench's count.py leaves out empty replies, and counted in ``errors``); questions with an
    unreadable reply (``unparsed``, scored wrong); mean drop ratio, prompt tokens, video tokens, TTFT."""
    if df.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    keys = ["mode_key", "mode", "criterion", "metric", "threshold", *by]
    ok = df["errors"] == 0
    df = df.assign(
        unparsed=~df["parsed"].astype(bool) & ok,
        points=df["points"].where(ok, 0.0),
        out_of=df["out_of"].where(ok, 0),
        errors=(~ok).astype(int),
    )
    g = df.groupby(keys, dropna=False, sort=False)
    out = g.agg(
        questions=("qid", "count"),
        points=("points", "sum"),
        out_of=("out_of", "sum"),
        unparsed=("unparsed", "sum"),
        errors=("errors", "sum"),
        drop_ratio=("drop_ratio", "mean"),
        prompt_tokens=("prompt_tokens", "mean"),
        video_tokens=("video_tokens", "mean"),
        ttft_s=("ttft_s", "mean"),
    ).reset_index()
    out.insert(out.columns.get_loc("points"), "accuracy", out["points"] / out["out_of"].where(out["out_of"] > 0))
    return out.drop(columns=["points", "out_of"])


def ovo_scores(df: pd.DataFrame) -> pd.DataFrame:
    """OVO-Bench's own aggregate per mode (its ``score.py``): accuracy per task (forward tasks per
    probe), the mean of the tasks of each category (backward, realtime, forward), and ``total``: the
    mean of the categories present."""
    from analysis.eval.formats import OVO_BACKWARD, OVO_FORWARD, OVO_REALTIME

    d = df[df["benchmark"] == "ovobench"] if not df.empty else df
    if d.empty:
        return pd.DataFrame(columns=["mode_key", "backward", "realtime", "forward", "total"])
    task = summarize(d, by=("task",))
    group = {
        **{t: "backward" for t in OVO_BACKWARD},
        **{t: "realtime" for t in OVO_REALTIME},
        **{t: "forward" for t in OVO_FORWARD},
    }
    task["category"] = task["task"].map(group)
    cat = task.groupby(["mode_key", "category"], sort=False)["accuracy"].mean().unstack("category")
    out = cat.reindex(columns=["backward", "realtime", "forward"])
    out["total"] = out.mean(axis=1, skipna=True)
    return out.reset_index()


def save(df: pd.DataFrame, out: Path) -> None:
    df.to_csv(out / "results.csv", index=False)
    df.to_parquet(out / "results.parquet", index=False)
    summarize(df, by=("benchmark", "task")).to_csv(out / "summary.csv", index=False)


def write_eval_report(df: pd.DataFrame, out: Path, title: str = "Accuracy vs drop ratio") -> Path:
    """``out/report.html`` (offline): accuracy vs drop ratio per mode and criterion, accuracy per task
    and mode, and the per-task table."""
    from analysis.lib.figures import accuracy_figure, task_accuracy_figure

    overall = summarize(df, by=())
    per_task = summarize(df, by=("benchmark", "task"))
    fmt = lambda x: f"{x:.4g}"
    extra = "<h2>Per task</h2>" + per_task.to_html(index=False, float_format=fmt)
    ovo = ovo_scores(df)
    if not ovo.empty:
        extra += "<h2>OVO-Bench aggregate (its score.py: category means of task means)</h2>" + ovo.to_html(
            index=False, float_format=fmt
        )
    return write_report(out / "report.html", [accuracy_figure(overall), task_accuracy_figure(per_task)], title, extra)


def headline(df: pd.DataFrame, mode_key: str | None = None) -> str:
    """``questions=N accuracy=A drop_ratio=D`` of one mode (default: the first DTD mode, else the
    first mode of the run)."""
    if df.empty:
        return "questions=0 accuracy=nan drop_ratio=nan"
    keys = list(dict.fromkeys(df["mode_key"]))
    if mode_key is None:
        mode_key = next((k for k in keys if k.startswith("dtd/")), keys[0])
    s = summarize(df[df["mode_key"] == mode_key], by=()).iloc[0]
    drop = s["drop_ratio"]
    return f"questions={s['questions']} accuracy={s['accuracy']:.4f} drop_ratio={0.0 if math.isnan(drop) else drop:.4f}"
