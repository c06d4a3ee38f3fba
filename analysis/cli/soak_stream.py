"""Soak: streams of hours (accelerated) through the DTD server, with their memory policy at work.

    python -m analysis.soak_stream --hours 2 --speed 20 [--streams 1] [--video PATH] [--fps 1]
                                   [--ask-every 10] [--context-tokens N] [--memory-keep recent|recent+keyframes]
                                   [--url http://127.0.0.1:PORT --server-pid PID] [--out results/soak] [--png FILE]

A clip (default: the bundled handheld clip) is decoded once at ``--fps``, encoded once, and looped
for ``--hours`` of stream time into ``--streams`` streams (one thread each; every loop is bounded by
the stream time), one second of video per append, at ``--speed`` × real time; each stream asks a
short question every ``--ask-every`` seconds of stream time. Without ``--url`` a DTD server (tiny
``test`` checkpoint, or ``--model``) is started here and stopped at the end; with ``--url`` the server
must be on this machine (loopback). Streams re-anchor as their policy says (``--context-tokens``,
``--memory-keep``, ``--max-keyframes``, ``--keep-turns``; the server's defaults otherwise).

Per ``--window`` seconds of stream time (default 600): questions answered and failed (a failed
question is counted, the soak goes on), TTFT p50/p95 (measured by the server), the questions that
waited for a re-anchor's prefill (``stream_state.reanchor_wait_s`` > 0.01 s; their sum and max) and
those answered during one (``answered_during_reanchor``), prefilled and context tokens, re-anchors,
frames held, the server's RSS by process kind and KV-cache usage. Writes soak.json, windows.csv and
soak.html (offline: context tokens, frames held / evicted, re-anchors, keyframes and TTFT of stream 0
over stream time, its questions that waited marked; per window TTFT p50/p95 and the waits; ``--png``:
a screenshot of it, headless Chromium).

Goals (:func:`analysis.lib.soak.goals`), each printed with its value and "met" / "NOT met"; the exit
status is 1 when one is not met: errors = 0 (failed questions included); after the first re-anchor
(the windows that start after it), every window's TTFT p95 ≤ 2 × the TTFT p50 of all the soak's
answered questions; no question waited for a re-anchor's prefill (unknown, from a server that does
not report it: not met); the RSS of every server process within ±5% of its first sample over the
last hour of stream time (the second half when the soak is shorter than 2 h; only with a server pid).
The last line is ``hours=… questions=… errors=… ttft_p95_first=… ttft_p95_last=… rss_growth_mb=…
reanchor_waits=… window_p95_max_ratio=…`` (the first/last p95 and the RSS growth: information).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from analysis.harness.tiny_model import add_model_arguments, model_from_arguments
from analysis.lib import soak as lib
from analysis.lib.paths import results_dir
from analysis.lib.video import SAMPLE_VIDEO


def _mb(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.soak_stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=2.0, help="stream time per stream")
    ap.add_argument("--speed", type=float, default=20.0, help="stream seconds per wall second")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--video", type=Path, default=SAMPLE_VIDEO)
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--ask-every", type=float, default=10.0, help="seconds of stream time between questions")
    ap.add_argument("--append-every", type=float, default=1.0, help="seconds of stream time per append")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--context-tokens", type=int, help="the streams' budget (default: the server's policy default)")
    ap.add_argument("--memory-keep", choices=["recent", "recent+keyframes"])
    ap.add_argument("--max-keyframes", type=int)
    ap.add_argument("--keep-turns", type=int)
    ap.add_argument("--criterion", choices=["pixel", "feature"], default="pixel")
    ap.add_argument("--threshold", type=float, help="dtd_threshold (default: the server's)")
    ap.add_argument("--window", type=float, default=600.0, help="seconds of stream time per report row")
    ap.add_argument("--url", help="a DTD server on this machine started with --dtd-streams (default: start one here)")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid, for its RSS")
    ap.add_argument("--mm-cache-gb", type=float, default=0.25, help="the started server's --mm-processor-cache-gb")
    add_model_arguments(ap, "test")
    ap.add_argument("--out", type=Path, default=results_dir("soak"))
    ap.add_argument("--png", type=Path, help="also save the plot as a PNG (headless Chromium)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.hours <= 0 or args.hours > 48 or args.speed <= 0 or args.streams < 1 or args.fps <= 0 or args.window <= 0:
        ap.error("--hours in (0, 48], --speed, --fps, --window > 0, --streams >= 1")
    settings = {
        k: v
        for k, v in {
            "context_tokens": args.context_tokens,
            "memory_keep": args.memory_keep,
            "max_keyframes": args.max_keyframes,
            "keep_turns": args.keep_turns,
            "dtd_criterion": args.criterion,
            "dtd_threshold": args.threshold,
            "prefill": "eager",
        }.items()
        if v is not None
    }
    if args.url:
        try:
            url = lib.check_loopback(args.url)
        except ValueError as e:
            ap.error(str(e))
    images = lib.encoded_clip(args.video, args.fps)
    print(
        f"{args.video.name}: {len(images)} frames at {args.fps:g} fps, looped for {args.hours:g} h of stream time "
        f"into {args.streams} stream(s) at {args.speed:g}x; a question every {args.ask_every:g} s; {settings}",
        flush=True,
    )

    def go(url, pid):
        return lib.run_soak(
            url,
            pid,
            images,
            args.streams,
            args.hours,
            args.speed,
            args.fps,
            args.ask_every,
            args.append_every,
            settings,
            max_tokens=args.max_tokens,
            sample_every_s=min(5.0, args.window / args.speed / 3),
        )  # a few samples per window

    if args.url:
        soak = go(url, args.server_pid)
        info: dict[str, object] = {"url": url}
    else:
        from analysis.harness.server import VLLMServer

        model = model_from_arguments(ap, args)
        server_args = [
            "--dtd-streams",
            "--block-size",
            "32",
            "--enable-prompt-tokens-details",
            "--mm-processor-cache-gb",
            str(args.mm_cache_gb),
        ]
        env = {"DTD_STREAM_MAX_STREAMS": str(args.streams + 4)}
        with VLLMServer(model, server_args, module="vllm_plugin.serve", env=env) as srv:
            print(f"server: {srv.base_url} ({model.name}; log {srv.log_path})", flush=True)
            assert srv.proc is not None  # started by the with
            soak = go(srv.base_url, srv.proc.pid)
        info = {"model": str(model), "server_args": server_args}

    return finish(soak, args, info)


def table(wins: list[dict]) -> list[str]:
    """The per-window table's lines (a window without questions, or a field missing, shows "-")."""

    def num(row, key, fmt):
        v = row.get(key)
        return format(v, fmt) if v is not None else "-"

    out = [
        f"{'window (min)':>12} {'q':>4} {'fail':>4} {'TTFT p50':>9} {'p95 ms':>7} {'waits':>5} {'sum s':>6} "
        f"{'max s':>6} {'during':>6} {'prefilled':>9} {'context':>8} {'max':>6} {'re-anch':>7} {'held fr':>7} "
        f"{'RSS MB':>7} {'KV use':>6}  RSS by process"
    ]
    for row in wins:
        rss = ", ".join(f"{k} {v:.0f}" for k, v in sorted((row.get("rss_by_process") or {}).items()))
        out.append(
            f"{row['start_s'] / 60:5.0f}-{row['end_s'] / 60:<6.0f} {num(row, 'questions', '4d')} "
            f"{num(row, 'failed', '4d')} {num(row, 'ttft_p50_ms', '9.1f')} {num(row, 'ttft_p95_ms', '7.1f')} "
            f"{num(row, 'reanchor_waits', '5d')} {num(row, 'reanchor_wait_sum_s', '6.2f')} "
            f"{num(row, 'reanchor_wait_max_s', '6.2f')} {num(row, 'answered_during_reanchor', '6d')} "
            f"{num(row, 'prefilled_mean', '9.1f')} {num(row, 'context_mean', '8.0f')} "
            f"{num(row, 'context_max', '6.0f')} {num(row, 'reanchors', '7d')} {num(row, 'held_frames_max', '7.0f')} "
            f"{num(row, 'rss_total_mb', '7.0f')} {num(row, 'kv_usage_max', '6.3f')}  {rss}"
        )
    return out


def verdict(s: dict, out=print) -> int:
    """Print each goal of the summary ``s`` with its measured value and "met" / "NOT met", then the
    old numbers as information; the exit status: 1 when a goal is not met, else 0."""
    gs = lib.goals(s)
    for g in gs:
        out(f"goal: {g['goal']}: {'met' if g['met'] else 'NOT met'} ({g['value']})")
    if not s["rss_sampled"]:
        out("RSS: not measured (no server pid: --server-pid with --url)")
    ratio = float("nan") if s["ttft_ratio"] is None else s["ttft_ratio"]
    p95_window0 = float("nan") if s["ttft_p95_window0"] is None else s["ttft_p95_window0"]
    out(
        f"information: ttft_p95_last / ttft_p95_first {ratio:.2f} (first = window {s['ttft_first_window']}; "
        f"window 0: p95 {p95_window0:.4f} s); re-anchors {s['reanchors']} (first at {s['first_reanchor_s']} s); "
        f"RSS after the first re-anchor {_mb(s['rss_after_first_reanchor_mb'])} MB -> end {_mb(s['rss_end_mb'])} "
        f"MB, growth by process { {k: round(v) for k, v in s['rss_growth_by_process_mb'].items()} }, in the "
        f"second half {_mb(s['rss_growth_second_half_mb'])} MB"
    )
    return 0 if all(g["met"] for g in gs) else 1


def finish(soak: lib.Soak, args: argparse.Namespace, info: dict) -> int:
    """After the streams: windows, summary, soak.json, windows.csv, the table, soak.html (and the
    PNG), the goals and the last line; returns the exit status (:func:`verdict`)."""
    wins = lib.windows(soak, args.window, end_s=args.hours * 3600)
    s = lib.summary(soak, wins, args.hours)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                **info,
                "summary": s,
                "windows": wins,
                "questions": soak.questions,
                "failed": soak.failed,
                "samples": soak.samples,
                "events": soak.events,
                "errors": soak.errors,
            },
            indent=1,
        )
    )
    cols = [
        "window",
        "start_s",
        "questions",
        "failed",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "reanchor_waits",
        "reanchor_wait_sum_s",
        "reanchor_wait_max_s",
        "reanchor_wait_unknown",
        "answered_during_reanchor",
        "prefilled_mean",
        "context_mean",
        "context_max",
        "reanchors",
        "held_frames_max",
        "rss_total_mb",
        "kv_usage_max",
        "lag_max_s",
    ]
    with open(args.out / "windows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["rss_by_process"], extrasaction="ignore")
        w.writeheader()
        for row in wins:
            w.writerow({**row, "rss_by_process": json.dumps(row.get("rss_by_process", {}))})
    print()
    for line in table(wins):
        print(line)
    for err in soak.errors[:20]:
        print("error:", err)
    from analysis.lib.figures import long_stream_figure
    from analysis.lib.reports import write_report

    first = lib.stream_questions(soak, 0)
    reanchors = [e["time"] for e in soak.events if e.get("stream") == 0 and e.get("type") == "reanchor"]
    budget = args.context_tokens or next(
        (e.get("budget") for e in soak.events if e.get("type") == "reanchor" and e.get("budget")), None
    )
    fig = long_stream_figure(
        first,
        reanchors,
        lib.keyframe_times(soak, args.fps),
        budget=budget,
        title=f"Stream 0 of {args.streams}: {args.hours:g} h at {args.speed:g}x, {len(reanchors)} re-anchors",
    )
    lib.mark_waits(fig, first)
    per_window = lib.windows_figure(
        wins, s["ttft_p50_s"], title=f"All {args.streams} stream(s), per {args.window:g} s of stream time"
    )
    html = write_report(args.out / "soak.html", [fig, per_window], "DTD stream soak")
    print(f"report: {html}")
    if args.png:
        import tempfile

        from analysis.harness.browser import assert_report_renders, chromium_driver

        driver = chromium_driver(tempfile.mkdtemp(prefix="soak-chrome-"))
        try:
            assert_report_renders(driver, html, args.png, expected_plots=2)
        finally:
            driver.quit()
        print(f"plot: {args.png}")
    code = verdict(s)
    print(lib.last_line(s))
    return code


if __name__ == "__main__":
    sys.exit(main())
