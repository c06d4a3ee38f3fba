"""Load test: many live streams at once against a DTD server, for a bounded time.

    python -m analysis.cli.load [--url URL] [--streams 50] [--seconds 120] [--out results/load]

Every stream (one thread each) opens, then until the deadline appends one temporal step (the
server's ``temporal_patch_size`` frames) every step's duration of wall time (real-time speed) and
asks a short question every ``--ask-every`` seconds; at the end it checks the server holds exactly
the frames it sent, and closes. Every loop stops by itself at the deadline. Without ``--url`` a DTD
server (tiny ``test`` checkpoint, stream limits raised to fit) is started and stopped here. Reports
HTTP status counts, latencies, frames accounted for and the server's resident memory (RSS of its
process tree, sampled every second). The last line is ``streams=… requests=… 5xx=… frames_lost=… rss_peak_mb=…``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

from analysis.lib.paths import results_dir
from analysis.lib.summary import percentile
from vllm_plugin.streams.session import Geometry


def tree_rss_by_process(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of a process and each of its children, by ``name[pid]``."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            out[f"{p.name()}[{p.pid}]"] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children, in MiB."""
    return sum(tree_rss_by_process(pid).values())


def _frames(side: int) -> list[str]:
    """The synthetic clip at ``side``² px, PNG and base64 encoded once (cycled by every stream)."""
    import base64

    from PIL import Image

    from analysis.lib.synthetic import make_clip
    from vllm_plugin.media import encode_png

    return [
        base64.b64encode(encode_png(np.asarray(Image.fromarray(f).resize((side, side))))).decode()
        for f in make_clip().frames
    ]


def stream_worker(
    base_url: str, deadline: float, fps: float, ask_every: float, frames: list[str], offset: int, record
) -> dict:
    """One stream's bounded life. ``record(kind, status, seconds)`` is called for every request."""
    http = requests.Session()

    def call(kind, method, url, **kw):
        t0 = time.perf_counter()
        try:
            r = http.request(method, url, timeout=300, **kw)
            status = r.status_code
        except requests.RequestException as e:
            r, status = None, f"{type(e).__name__}"
        record(kind, status, time.perf_counter() - t0)
        return r

    r = call("open", "post", f"{base_url}/v1/streams", json={"fps": fps})
    if r is None or r.status_code != 200:
        return {"opened": False, "sent": 0, "held": 0}
    url = f"{base_url}/v1/streams/{r.json()['id']}"
    tps = r.json()["temporal_patch_size"]  # frames per temporal step: pushed one step at a time
    sent, i = 0, offset
    step_s = tps / fps
    next_push, next_ask = time.monotonic(), time.monotonic() + ask_every
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_ask and sent:
            call(
                "ask",
                "post",
                f"{url}/chat/completions",
                json={"messages": [{"role": "user", "content": "What is happening now?"}], "max_tokens": 2},
            )
            next_ask += ask_every
            continue
        if now >= next_push:
            batch = [{"image": frames[(i + k) % len(frames)]} for k in range(tps)]
            r = call("append", "post", f"{url}/frames", json={"frames": batch})
            if r is not None and r.status_code == 200:
                sent += tps
            i += tps
            next_push += step_s
            continue
        time.sleep(min(next_push, next_ask, deadline) - now if min(next_push, next_ask, deadline) > now else 0)
    r = call("status", "get", url)
    held = r.json()["frames"] if r is not None and r.status_code == 200 else -1
    call("close", "delete", url)
    return {"opened": True, "sent": sent, "held": held}


def run_load(
    base_url: str,
    streams: int = 50,
    seconds: float = 120.0,
    fps: float = 2.0,
    ask_every: float = 10.0,
    side: int = 112,
    server_pid: int | None = None,
) -> dict:
    frames = _frames(side)
    lock = threading.Lock()
    log: list[tuple[str, object, float]] = []
    rss: list[float] = []

    def record(kind, status, dt):
        with lock:
            log.append((kind, status, dt))

    stop = threading.Event()

    def sample_rss():
        while not stop.is_set():
            rss.append(tree_rss_mb(server_pid))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample_rss, daemon=True) if server_pid else None
    if sampler:
        sampler.start()
    by_process_start = tree_rss_by_process(server_pid) if server_pid else {}
    rss_start = sum(by_process_start.values()) if server_pid else None
    deadline = time.monotonic() + seconds
    results: list[dict | None] = [None] * streams

    def run(k):
        # spread the streams' schedules over one step so they do not all push at the same instant
        time.sleep(k * (Geometry().temporal_patch_size / fps) / streams)
        results[k] = stream_worker(base_url, deadline, fps, ask_every, frames, 7 * k, record)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    if sampler:
        sampler.join()
    statuses = Counter(str(s) for _, s, _ in log)
    by_kind = {}
    for kind in ("open", "append", "ask", "status", "close"):
        dts = sorted(dt for k, _, dt in log if k == kind)
        if dts:
            by_kind[kind] = {"n": len(dts), "p50_s": statistics.median(dts), "p95_s": percentile(dts, 0.95)}
    res = [r for r in results if r]
    return {
        "streams": streams,
        "seconds": seconds,
        "wall_s": wall,
        "requests": len(log),
        "statuses": dict(statuses),
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5")),
        "failed": sum(n for s, n in statuses.items() if not s.startswith("2")),
        "opened": sum(r["opened"] for r in res),
        "frames_sent": sum(r["sent"] for r in res),
        "frames_lost": sum(abs(r["sent"] - r["held"]) for r in res if r["opened"]),
        "latency": by_kind,
        "rss_start_mb": rss_start,
        "rss_peak_mb": max(rss) if rss else None,
        "rss_end_mb": rss[-1] if rss else None,
        "rss_by_process_mb": {"start": by_process_start, "end": tree_rss_by_process(server_pid) if server_pid else {}},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running DTD server started with --dtd-streams (default: start one here)")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid, to report its RSS")
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--ask-every", type=float, default=10.0)
    ap.add_argument("--side", type=int, default=112)
    ap.add_argument(
        "--mm-cache-gb",
        type=float,
        default=0.5,
        help="the started server's --mm-processor-cache-gb (vLLM's default: 4)",
    )
    ap.add_argument("--out", type=Path, default=results_dir("load"))
    args = ap.parse_args(argv)

    def go(url, pid):
        print(f"{args.streams} streams x {args.seconds:g} s against {url}", flush=True)
        return run_load(url, args.streams, args.seconds, args.fps, args.ask_every, args.side, pid)

    if args.url:
        out = go(args.url.rstrip("/"), args.server_pid)
    else:
        from analysis.harness.server import VLLMServer
        from analysis.harness.tiny_model import ensure_tiny_model

        env = {
            "DTD_STREAM_MAX_STREAMS": str(args.streams + 8),
            "DTD_STREAM_MAX_FRAMES": str(int(args.seconds * args.fps) + 64),
        }
        server_args = ["--dtd-streams", "--block-size", "32", "--mm-processor-cache-gb", str(args.mm_cache_gb)]
        with VLLMServer(ensure_tiny_model("test"), server_args, module="vllm_plugin.serve", env=env) as srv:
            assert srv.proc is not None  # started by the with
            out = go(srv.base_url, srv.proc.pid)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    print(
        f"streams={out['opened']} requests={out['requests']} 5xx={out['server_errors']} failed={out['failed']} "
        f"frames_lost={out['frames_lost']} rss_peak_mb={out['rss_peak_mb'] or 0:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
