"""Benchmark: DTD-vLLM against stock vLLM, same build, same checkpoint, same requests.

    python -m analysis.cli.bench [--quick] [--video PATH ...] [--concurrency 4] [--out results/bench]

Each clip (the real clips of ``../shared/videos`` when present, else the bundled one, plus the
synthetic clip) is cut to its first ``--frames`` frames at ``--fps`` and re-encoded at its native
resolution as ordinary H.264: the servers decode it and resize it to the checkpoint's 448² pixel
budget, as they would a user's video, and both get the same file. Servers run one after the other
on a tiny checkpoint (``--size``), with prefix caching and
the processor cache OFF so that every request is computed in full:

1. DTD-vLLM (``python -m vllm_plugin.serve``, server default τ): per clip, ``--requests`` requests at
   concurrency 1 and ``2 × --requests`` at concurrency N (streamed, ``max_tokens`` = ``--max-tokens``):
   prompt tokens, requests/s, TTFT p50/p95 (first streamed token at the client), end-to-end
   latency, peak KV cache usage (``vllm:kv_cache_usage_perc``), and the max number of such requests
   the KV cache holds at once. The DTD decision's share of preprocessing (video decoding plus the
   multimodal processor) comes from the plugin's ``vllm_dtd_decision_seconds`` /
   ``vllm_dtd_video_preprocess_seconds`` counters, over the concurrency-1 requests (the work itself;
   under concurrency both include waiting for the 2 cores; that share is reported too).
2. Stock vLLM: the same requests; then the **uniform frame subsampling** baseline at the DTD
   budget (whole temporal steps chosen uniformly so the video tokens match DTD's kept count).
3. vLLM's own **EVS** (``--video-pruning-rate`` at DTD's drop ratio): one request; on vLLM 0.32's
   CPU engine it crashes the engine, which is recorded as the result.

1a. The same DTD server and requests with **vLLM's own video loader** (the request's ``media_io_kwargs
   {"video": {"fast_decode": false}}``; the server default is the plugin's loader, which decodes only
   the sampled frames and scales them to the processor's size): requests/s next to the plugin's and
   its share of the token ceiling. ``--no-loader-comparison`` skips it.
1b. The same DTD server with **feature-level DTD** (``dtd_criterion: feature`` per request): the API
   server's vision tower encodes each video once and decides on its outputs; the engine gets the kept
   rows. Its tower seconds per request come from ``vllm_dtd_encoder_seconds`` (stock and pixel DTD run
   the same encoder on the same frames inside the engine). ``--no-feature`` skips it.

Per clip it prints the throughput ratio DTD/stock next to its ceiling (stock/DTD prompt tokens: what
a purely prefill-bound server could gain), and, at equal token budget, how much of each frame the
kept tokens still show (``held_error``: mean |token − last kept token at its place|, pixel scale
0–1; lower is better). Writes ``bench.json`` and ``bench.html``. The last line is
``throughput_ratio=<dtd/stock requests/s> ceiling=<total/kept tokens> dtd_overhead=<share>`` (pixel
level), followed by ``vllm_loader_throughput_ratio=…`` (DTD with vLLM's video loader / stock) and
``feature_throughput_ratio=… feature_dtd_overhead=…`` when those ran. ``--reference motion`` (or any
registered reference) runs the DTD server with that ``dtd_reference`` (pixel level), so its
``dtd_overhead`` is the decision's share with that reference.
A clip that cannot be read here, or that the DTD server refuses (a 400: e.g. a size limit), is reported
on one line (``skipped <clip>: <reason>``) and left out; the run goes on with the others, and exits
non-zero when none of the clips given (or found) is left.
Checkpoint ``--size`` (default ``bench7b``: an encoder as costly, relative to its LLM, as
Qwen2.5-VL-7B's)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import requests

from analysis.harness.server import context_args, metric_sum, video_question
from analysis.harness.tiny_model import add_model_arguments, model_from_arguments
from analysis.lib.paths import check_videos, default_videos, results_dir
from analysis.lib.reports import write_results
from analysis.lib.summary import percentile
from analysis.lib.video import write_video

if TYPE_CHECKING:
    import torch

QUESTION = "Describe what happens in the video."


@dataclass
class Clip:
    name: str
    path: Path  # the clip as both servers get it (processor size, lossless)
    tokens_per_step: int
    steps: int
    pixel: torch.Tensor  # (T, H, W, C) pixel tokens, for the equal-budget comparison
    frames: np.ndarray
    fps: float
    given: bool = True  # one of the clips given (or found), not the synthetic one

    @property
    def video_tokens(self) -> int:
        return self.steps * self.tokens_per_step


def skip(clip: str, reason: str) -> None:
    """The one line a refused clip gets."""
    print(f"  skipped {clip}: {reason}", flush=True)


def prepare_clips(
    videos: list[Path],
    fps: float,
    max_frames: int,
    media: Path,
    synthetic: bool = True,
    refused: dict[str, str] | None = None,
) -> list[Clip]:
    """Each clip's first ``max_frames`` frames at ``fps``, at its NATIVE resolution, re-encoded as
    ordinary H.264 (the servers decode and resize them, as they would a user's video). A clip that
    does not decode is reported (:func:`skip`), recorded in ``refused`` and left out."""
    from analysis.lib.synthetic import make_clip
    from analysis.lib.video import VideoDecodeError, load_video
    from analysis.lib.workbench import load_tokens

    sources = []
    for v in videos:
        try:
            sources.append((Path(v).stem, load_video(v, fps=fps, max_frames=max_frames).frames, True))
        except VideoDecodeError as e:
            reason = f"cannot be read: {' '.join(str(e).split())}"
            if refused is not None:
                refused[Path(v).name] = reason
            skip(Path(v).name, reason)
    if synthetic:
        every = max(1, int(round(2.0 / fps)))  # the synthetic clip is 2 fps, 448x448
        sources.append(("synthetic", make_clip(cells=16).frames[::every][:max_frames], False))
    clips = []
    for name, frames, given in sources:
        # even sizes (4:2:0)
        frames = frames[: len(frames) // 2 * 2, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
        path = write_video(media / f"{name}.mp4", frames, fps, lossless=False)
        vt = load_tokens(path, fps=fps)  # what the model sees: the encoded frames at the processor's size
        clips.append(Clip(name, path, vt.tokens_per_step, vt.grid[0], vt.pixel, frames, fps, given))
    return clips


def uniform_subsample(clip: Clip, kept_video_tokens: int, media: Path) -> tuple[Path, torch.Tensor]:
    """Whole temporal steps chosen uniformly (the first included) so that the video tokens match
    ``kept_video_tokens``; returns the clip file and the equivalent (T, H, W) keep mask."""
    import torch

    k = min(clip.steps, max(1, int(round(kept_video_tokens / clip.tokens_per_step))))
    chosen = sorted(set(np.linspace(0, clip.steps - 1, k).round().astype(int).tolist()))
    frames = np.concatenate([clip.frames[2 * s : 2 * s + 2] for s in chosen])
    mask = torch.zeros(clip.pixel.shape[:3], dtype=torch.bool)
    mask[chosen] = True
    return write_video(media / f"{clip.name}_uniform{k}.mp4", frames, clip.fps, lossless=False), mask


# ---------------------------------------------------------------------------------------------- requests


def _metrics(base_url: str) -> str:
    return requests.get(base_url + "/metrics", timeout=10).text


def kv_capacity_tokens(text: str) -> int | None:
    """Tokens the KV cache holds, from vLLM's ``vllm:cache_config_info`` labels."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            try:
                return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
            except (KeyError, ValueError):
                return None
    return None


def one_request(
    base_url: str,
    model: str,
    video: Path,
    max_tokens: int,
    mm: dict | None = None,
    media_io: dict | None = None,
    question: str = QUESTION,
    timeout: float = 1800,
) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": video_question(f"file://{video}", question),
    }
    if mm:
        body["mm_processor_kwargs"] = mm
    if media_io:
        body["media_io_kwargs"] = media_io
    t0 = time.perf_counter()
    ttft, usage = None, None
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=timeout) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.text[:300]}
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):  # an error after the response started (status 200)
                return {"status": "stream error", "error": str(chunk["error"])[:300]}
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {
        "status": 200,
        "ttft_s": ttft,
        "e2e_s": time.perf_counter() - t0,
        "prompt_tokens": usage["prompt_tokens"] if usage else None,
    }


class KVSampler:
    """Peak ``vllm:kv_cache_usage_perc`` while a run is in flight."""

    def __init__(self, base_url: str, every: float = 0.25):
        self.base_url, self.every, self.peak = base_url, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, metric_sum(_metrics(self.base_url), "vllm:kv_cache_usage_perc"))
            except requests.RequestException:
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_load(
    base_url: str,
    model: str,
    video: Path,
    n: int,
    concurrency: int,
    max_tokens: int,
    capacity: int | None,
    mm: dict | None = None,
    media_io: dict | None = None,
) -> dict:
    with KVSampler(base_url) as kv, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda _: one_request(base_url, model, video, max_tokens, mm, media_io), range(n)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    row = {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(ok),
        "errors": [r for r in results if r["status"] != 200][:3],
        "wall_s": wall,
        "req_per_s": len(ok) / wall if wall else 0.0,
        "kv_peak_perc": kv.peak,
    }
    if ok:
        ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
        e2e = [r["e2e_s"] for r in ok]
        row.update(
            prompt_tokens=ok[0]["prompt_tokens"],
            ttft_p50_s=statistics.median(ttft),
            ttft_p95_s=percentile(ttft, 0.95),
            e2e_p50_s=statistics.median(e2e),
            e2e_p95_s=percentile(e2e, 0.95),
        )
        if capacity and ok[0]["prompt_tokens"]:
            row["max_concurrent"] = capacity // (ok[0]["prompt_tokens"] + max_tokens)
    return row


def timing(text: str) -> dict[str, float]:
    """The plugin's cumulative DTD decision, video preprocessing and API-server vision tower seconds
    (0 on stock vLLM; the tower runs for feature-level DTD only)."""
    return {
        "decision_s": metric_sum(text, "vllm_dtd_decision_seconds_total"),
        "preprocess_s": metric_sum(text, "vllm_dtd_video_preprocess_seconds_total"),
        "encoder_s": metric_sum(text, "vllm_dtd_encoder_seconds_total"),
    }


def measure(
    srv, clips: dict[str, Path], args, label: str, mm: dict | None = None, media_io: dict | None = None
) -> dict[str, dict]:
    text = _metrics(srv.base_url)
    capacity = kv_capacity_tokens(text)
    out = {}
    for name, path in clips.items():
        one_request(srv.base_url, srv.model, path, 1, mm, media_io)  # warm-up (first-request compilation, caches)
        t0 = timing(_metrics(srv.base_url))
        c1 = run_load(srv.base_url, srv.model, path, args.requests, 1, args.max_tokens, capacity, mm, media_io)
        t1 = timing(_metrics(srv.base_url))
        c1["timing"] = {k: t1[k] - t0[k] for k in t0}  # one request at a time: the work itself, no contention
        c1["encoder_s_per_request"] = c1["timing"]["encoder_s"] / args.requests
        cn = run_load(
            srv.base_url, srv.model, path, 2 * args.requests, args.concurrency, args.max_tokens, capacity, mm, media_io
        )
        for row in (c1, cn):
            if row["ok"] < row["requests"]:
                raise SystemExit(f"[{label}] {name}: {row['requests'] - row['ok']} requests failed: {row['errors']}")
        out[name] = {"c1": c1, "cN": cn, "kv_capacity_tokens": capacity}
        print(
            f"  [{label}] {name:28s} prompt {c1.get('prompt_tokens')!s:>6} | c=1 {c1['req_per_s']:6.2f} req/s "
            f"ttft p50 {c1.get('ttft_p50_s', float('nan')):6.2f}s | c={args.concurrency} {cn['req_per_s']:6.2f} req/s "
            f"ttft p95 {cn.get('ttft_p95_s', float('nan')):6.2f}s kv peak {cn['kv_peak_perc']:5.1%} "
            f"| fits {c1.get('max_concurrent')}",
            flush=True,
        )
    return out


def server_args(media: Path, extra: list[str]) -> list[str]:
    return [
        *context_args(32768),
        "--block-size",
        "32",
        "--no-enable-prefix-caching",
        "--mm-processor-cache-gb",
        "0",
        "--allowed-local-media-path",
        str(media),
        "--limit-mm-per-prompt",
        json.dumps({"video": 1}),
        *extra,
    ]


class ClipRefused(Exception):
    """The server answered a clip with a 4xx (its video guards, a size limit...)."""


def none_left(refused: dict[str, str]) -> SystemExit:
    return SystemExit(
        f"every clip was refused ({'; '.join(f'{c}: {r}' for c, r in refused.items())}): nothing to measure"
    )


def served_dtd_stats(srv, path: Path, mm: dict | None = None) -> dict:
    """The server's ``x-dtd-stats`` of the clip's video. Raises :class:`ClipRefused` for a 4xx."""
    body = {
        "model": srv.model,
        "max_tokens": 1,
        "messages": video_question(f"file://{path}", QUESTION),
    }
    if mm:
        body["mm_processor_kwargs"] = mm
    r = requests.post(srv.base_url + "/v1/chat/completions", json=body, timeout=600)
    if 400 <= r.status_code < 500:
        raise ClipRefused(f"the server refused it ({r.status_code}): {' '.join(r.text.split())[:300]}")
    r.raise_for_status()
    return json.loads(r.headers["x-dtd-stats"])["videos"][0]


def try_evs(model: Path, media: Path, clip: Clip, rate: float, log_dir: Path) -> dict:
    """vLLM's own pruning at the same drop ratio: one request; record what happens."""
    from analysis.harness.server import ServerError, VLLMServer

    rate = min(0.95, max(0.05, round(rate, 2)))
    srv = VLLMServer(model, server_args(media, ["--video-pruning-rate", str(rate)]), log_path=log_dir / "evs.log")
    try:
        srv.start()
    except ServerError as e:
        return {"pruning_rate": rate, "outcome": "server did not start", "detail": str(e)[-500:]}
    try:
        r = one_request(srv.base_url, srv.model, clip.path, 4)
        time.sleep(2)
        alive = srv.alive()
        if r["status"] == 200 and alive:
            return {"pruning_rate": rate, "outcome": "ran", "prompt_tokens": r["prompt_tokens"], "e2e_s": r["e2e_s"]}
        # the root cause: the first logged "SomethingError: ..." line
        log = srv.log_path.read_text(errors="replace").splitlines()
        cause = next((m.group(0) for ln in log if " ERROR " in ln and (m := re.search(r"\b\w+Error: .*", ln))), "")
        return {
            "pruning_rate": rate,
            "outcome": f"crashed ({r['status']}; engine {'alive' if alive else 'dead'})",
            "detail": cause[:400],
        }
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- report


def summarize(
    clips: list[Clip],
    dtd: dict,
    stock: dict,
    uniform: dict,
    held: dict,
    decision: dict,
    feature: dict | None = None,
    feature_decision: dict | None = None,
    dtd_vllm_loader: dict | None = None,
) -> dict:
    """Per clip and overall ratios. ``dtd`` is pixel-level DTD (the server default); ``feature``, when
    measured, feature-level DTD on the same server (vision tower in the API server)."""
    per_clip = []
    for c in clips:
        d, s, u = dtd[c.name]["cN"], stock[c.name]["cN"], uniform.get(c.name, {}).get("cN", {})
        ratio = d["req_per_s"] / s["req_per_s"] if s["req_per_s"] else float("nan")
        ceiling = s["prompt_tokens"] / d["prompt_tokens"]
        f = (feature or {}).get(c.name)
        feat = (
            {}
            if f is None
            else {
                "feature_prompt_tokens": f["cN"]["prompt_tokens"],
                "feature_throughput_ratio": f["cN"]["req_per_s"] / s["req_per_s"] if s["req_per_s"] else float("nan"),
                "feature_ttft_p50_ratio_c1": f["c1"]["ttft_p50_s"] / stock[c.name]["c1"]["ttft_p50_s"],
                "feature_encoder_s_per_request": f["c1"].get("encoder_s_per_request"),
            }
        )
        v = (dtd_vllm_loader or {}).get(c.name)
        if v is not None:  # pixel-level DTD with vLLM's own video loader on the same server
            vr = v["cN"]["req_per_s"] / s["req_per_s"] if s["req_per_s"] else float("nan")
            feat.update(vllm_loader_throughput_ratio=vr, vllm_loader_of_ceiling=vr / ceiling)
        per_clip.append(
            {
                **feat,
                "clip": c.name,
                "video_tokens": c.video_tokens,
                "kept_video_tokens": held[c.name]["kept"],
                "stock_prompt_tokens": s["prompt_tokens"],
                "dtd_prompt_tokens": d["prompt_tokens"],
                "uniform_prompt_tokens": u.get("prompt_tokens"),
                "throughput_ratio": ratio,
                "ceiling": ceiling,
                "of_ceiling": ratio / ceiling,
                "uniform_throughput_ratio": (u["req_per_s"] / s["req_per_s"]) if u and s["req_per_s"] else None,
                "ttft_p50_ratio_c1": dtd[c.name]["c1"]["ttft_p50_s"] / stock[c.name]["c1"]["ttft_p50_s"],
                "dtd_held_error": held[c.name]["dtd"],
                "uniform_held_error": held[c.name]["uniform"],
            }
        )
    tot_s = sum(stock[c.name]["cN"]["wall_s"] for c in clips)
    tot_d = sum(dtd[c.name]["cN"]["wall_s"] for c in clips)
    tok_s = sum(stock[c.name]["cN"]["prompt_tokens"] for c in clips)
    tok_d = sum(dtd[c.name]["cN"]["prompt_tokens"] for c in clips)

    def share(prefix="", timing=decision):
        d, p = timing.get(f"{prefix}decision_s"), timing.get(f"{prefix}preprocess_s")
        return d / p if d is not None and p else float("nan")

    out = {
        "per_clip": per_clip,
        "throughput_ratio": tot_s / tot_d,
        "ceiling": tok_s / tok_d,
        "dtd_overhead": share(),
        "dtd_overhead_whole_run": share("all_"),
    }
    if dtd_vllm_loader:
        out["vllm_loader_throughput_ratio"] = tot_s / sum(dtd_vllm_loader[c.name]["cN"]["wall_s"] for c in clips)
    if feature:
        out["feature_throughput_ratio"] = tot_s / sum(feature[c.name]["cN"]["wall_s"] for c in clips)
        out["feature_ceiling"] = tok_s / sum(feature[c.name]["cN"]["prompt_tokens"] for c in clips)
        out["feature_dtd_overhead"] = share(timing=feature_decision or {})
    return out


def report_figure(summary: dict, dtd: dict, stock: dict, uniform: dict, feature: dict | None = None):
    from plotly.subplots import make_subplots

    names = [r["clip"] for r in summary["per_clip"]]
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=(
            "requests/s at concurrency N",
            "TTFT p50 at concurrency 1 (s)",
            "prompt tokens",
            "throughput ratio vs ceiling",
        ),
    )
    panels = (  # (row, col, what a clip's measure shows there); the first panel holds the legend
        (1, 1, lambda m: m["cN"]["req_per_s"]),
        (1, 2, lambda m: m["c1"].get("ttft_p50_s")),
        (2, 1, lambda m: m["c1"].get("prompt_tokens")),
    )
    for label, data, color in (
        ("stock", stock, "#888"),
        ("DTD pixel", dtd, "#d62728"),
        ("DTD feature", feature or {}, "#9467bd"),
        ("uniform (DTD budget)", uniform, "#1f77b4"),
    ):
        present = [n for n in names if n in data]
        for row, col, value in panels:
            fig.add_bar(
                x=present,
                y=[value(data[n]) for n in present],
                name=label,
                marker_color=color,
                row=row,
                col=col,
                legendgroup=label,
                showlegend=None if (row, col) == (1, 1) else False,
            )
    fig.add_bar(
        x=names,
        y=[r["throughput_ratio"] for r in summary["per_clip"]],
        name="DTD/stock req/s",
        marker_color="#d62728",
        row=2,
        col=2,
    )
    fig.add_scatter(
        x=names,
        y=[r["ceiling"] for r in summary["per_clip"]],
        mode="markers",
        name="ceiling (stock/DTD tokens)",
        marker=dict(symbol="line-ew-open", size=30, color="black", line=dict(width=3)),
        row=2,
        col=2,
    )
    fig.update_layout(
        title=f"DTD (pixel) vs stock vLLM: throughput ratio {summary['throughput_ratio']:.2f} "
        f"(ceiling {summary['ceiling']:.2f}), DTD decision {100 * summary['dtd_overhead']:.1f}% of preprocessing",
        barmode="group",
        template="plotly_white",
        height=800,
    )
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller requests: under 10 minutes on 2 CPU cores")
    ap.add_argument(
        "--video", type=Path, nargs="+", help="clips (default: ../shared/videos/*.mp4, else the bundled clip)"
    )
    ap.add_argument("--no-synthetic", action="store_true", help="leave out the synthetic clip")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, help="requests per clip at concurrency 1 (twice that at N)")
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--frames", type=int, help="frames per clip")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--no-evs", action="store_true", help="skip the EVS attempt")
    add_model_arguments(ap, "bench7b")
    ap.add_argument(
        "--reference",
        default="previous",
        help="the DTD server's dtd_reference (pixel level): previous, last_kept, motion or any registered one",
    )
    ap.add_argument("--no-feature", action="store_true", help="skip feature-level DTD (the API server's vision tower)")
    ap.add_argument(
        "--no-loader-comparison",
        action="store_true",
        help="skip DTD with vLLM's own video loader (media_io_kwargs fast_decode false)",
    )
    ap.add_argument("--out", type=Path, default=results_dir("bench"))
    args = ap.parse_args(argv)
    args.requests = args.requests or (2 if args.quick else 4)
    from vllm_plugin.core import reference_names

    if args.reference not in reference_names():
        ap.error(f"--reference: {args.reference!r} is not one of {list(reference_names())}")
    args.frames = args.frames or (12 if args.quick else 32)
    if args.frames < 2:
        ap.error("--frames must be at least 2")
    check_videos(ap, args.video or [])

    from analysis.harness.server import VLLMServer
    from analysis.lib.workbench import held_error
    from vllm_plugin.core import decide_steps
    from vllm_plugin.entrypoints.options import dtd_config_from_kwargs

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_from_arguments(ap, args)
    media = Path(tempfile.mkdtemp(prefix="dtd-bench-"))
    try:
        videos = args.video or default_videos()
        refused: dict[str, str] = {}
        clips = prepare_clips(videos, args.fps, args.frames, media, not args.no_synthetic, refused)
        if not any(c.given for c in clips):  # (the synthetic clip alone is no benchmark of the clips asked for)
            raise none_left(refused)
        print(
            f"{len(clips)} clips at {args.fps:g} fps, ≤{args.frames} frames; checkpoint {model.name}; "
            f"concurrency 1 and {args.concurrency}",
            flush=True,
        )
        cfg = dtd_config_from_kwargs({"dtd_reference": args.reference})
        dtd_defaults = ["--mm-processor-kwargs", json.dumps({"dtd_reference": args.reference})]

        print("(1) DTD-vLLM", flush=True)
        with VLLMServer(
            model, server_args(media, dtd_defaults), module="vllm_plugin.serve", log_path=args.out / "dtd.log"
        ) as srv:
            served = {}
            for c in list(clips):  # the first request of each clip: one the server refuses is left out
                try:
                    served[c.name] = served_dtd_stats(srv, c.path)
                except ClipRefused as e:
                    refused[c.path.name] = str(e)
                    skip(c.path.name, str(e))
                    clips.remove(c)
            if not any(c.given for c in clips):
                raise none_left(refused)
            before = timing(_metrics(srv.base_url))
            dtd = measure(srv, {c.name: c.path for c in clips}, args, "DTD")
            after = timing(_metrics(srv.base_url))
            dtd_vllm_loader = None
            if not args.no_loader_comparison:  # the same requests decoded by vLLM's own video loader
                dtd_vllm_loader = measure(
                    srv,
                    {c.name: c.path for c in clips},
                    args,
                    "DTD, vLLM's loader",
                    media_io={"video": {"fast_decode": False}},
                )
            feature, feature_decision, served_feature = None, None, {}
            if not args.no_feature:
                mm = {"dtd_criterion": "feature"}
                served_feature = {c.name: served_dtd_stats(srv, c.path, mm) for c in clips}
                feature = measure(srv, {c.name: c.path for c in clips}, args, "DTD feature", mm)
                feature_decision = {k: sum(feature[c.name]["c1"]["timing"][k] for c in clips) for k in before}
        # the headline share: requests one at a time (concurrency 1); the whole run (with contention) beside it
        decision = {k: sum(dtd[c.name]["c1"]["timing"][k] for c in clips) for k in before}
        decision.update({f"all_{k}": after[k] - before[k] for k in before})

        # equal budget: the kept count the server reported; what the kept tokens show of each frame:
        # the same DTD decision on our own decode of the file (PyAV + PIL, within rounding of the server's)
        held, uniform_paths = {}, {}
        for c in clips:
            kept = served[c.name]["kept"]
            pixel_decision = decide_steps(c.pixel, cfg)  # (not `decision`: the timings above, summarized below)
            mask = pixel_decision.mask
            uniform_paths[c.name], umask = uniform_subsample(c, kept, media)
            held[c.name] = {
                "kept": kept,
                "local_kept": int(mask.sum()),
                "uniform_kept": int(umask.sum()),
                "dtd": held_error(c.pixel, mask, pixel_decision.offsets),
                "uniform": held_error(c.pixel, umask),
            }

        print("(2) stock vLLM, then uniform frame subsampling at the DTD budget", flush=True)
        with VLLMServer(model, server_args(media, []), log_path=args.out / "stock.log") as srv:
            stock = measure(srv, {c.name: c.path for c in clips}, args, "stock")
            uniform = measure(srv, uniform_paths, args, "uniform")

        evs = {"outcome": "skipped (--no-evs)"}
        if not args.no_evs:
            print("(3) vLLM EVS (--video-pruning-rate) at the DTD drop ratio", flush=True)
            drop = 1 - sum(h["kept"] for h in held.values()) / sum(c.video_tokens for c in clips)
            evs = try_evs(model, media, clips[0], drop, args.out)
            print(f"  [EVS] {evs['outcome']} {evs.get('detail', '')[:200]}", flush=True)
    finally:
        shutil.rmtree(media, ignore_errors=True)

    summary = summarize(clips, dtd, stock, uniform, held, decision, feature, feature_decision, dtd_vllm_loader)
    print(
        f"\n{'clip':28s} {'tokens s/d/u':>18s} {'ratio':>6s} {'ceil':>6s} {'%ceil':>6s} {'unif':>6s} "
        f"{'ttft c1':>7s} {'held dtd':>8s} {'held unif':>9s}"
    )
    for r in summary["per_clip"]:
        print(
            f"{r['clip']:28s} {r['stock_prompt_tokens']:>6d}/{r['dtd_prompt_tokens']:>5d}/"
            f"{r['uniform_prompt_tokens'] or 0:>5d} "
            f"{r['throughput_ratio']:6.2f} {r['ceiling']:6.2f} {100 * r['of_ceiling']:5.0f}% "
            f"{r['uniform_throughput_ratio'] or 0:6.2f} "
            f"{r['ttft_p50_ratio_c1']:7.2f} {r['dtd_held_error']:8.4f} {r['uniform_held_error']:9.4f}"
        )
    if dtd_vllm_loader:
        print(f"\n{'clip':28s} {'req/s ratio to stock: plugin loader / vLLM loader':>50s} {'of ceiling':>16s}")
        for r in summary["per_clip"]:
            print(
                f"{r['clip']:28s} {r['throughput_ratio']:>33.2f} / {r['vllm_loader_throughput_ratio']:<14.2f} "
                f"{100 * r['of_ceiling']:6.0f}% / {100 * r['vllm_loader_of_ceiling']:3.0f}%"
            )
    if feature:
        print(
            f"\n{'clip':28s} {'prompt tokens stock/pixel/feature':>34s} {'req/s ratio pixel/feature':>26s} "
            f"{'ttft c1 ratio pixel/feature':>28s} {'encoder s/req (feature, API server)':>36s}"
        )
        for r in summary["per_clip"]:
            print(
                f"{r['clip']:28s} {r['stock_prompt_tokens']:>14d}/{r['dtd_prompt_tokens']:>6d}/"
                f"{r['feature_prompt_tokens']:>6d} "
                f"{r['throughput_ratio']:>13.2f}/{r['feature_throughput_ratio']:<12.2f} "
                f"{r['ttft_p50_ratio_c1']:>14.2f}/"
                f"{r['feature_ttft_p50_ratio_c1']:<13.2f} {r['feature_encoder_s_per_request']:>36.3f}"
            )
        assert feature_decision is not None  # measured with `feature`
        print(
            f"feature-level DTD decision {feature_decision['decision_s']:.3f} s "
            f"of {feature_decision['preprocess_s']:.3f} s of video preprocessing at concurrency 1 "
            f"(vision tower {feature_decision['encoder_s']:.3f} s, counted apart)"
        )
    print(
        f"DTD decision {decision['decision_s']:.3f} s of {decision['preprocess_s']:.3f} s "
        f"of video preprocessing at concurrency 1 "
        f"({decision['all_decision_s']:.3f} s of {decision['all_preprocess_s']:.3f} s over the whole run); "
        f"EVS: {evs['outcome']}; took {time.perf_counter() - t_start:.0f} s"
    )
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "checkpoint": model.name,
        "summary": summary,
        "dtd": dtd,
        "stock": stock,
        "uniform": uniform,
        "held": held,
        "decision": decision,
        "evs": evs,
        "served_stats": served,
        "refused": refused,
        "feature": feature,
        "feature_decision": feature_decision,
        "served_feature_stats": served_feature,
        "dtd_vllm_loader": dtd_vllm_loader,
        "seconds": time.perf_counter() - t_start,
    }
    figures = [report_figure(summary, dtd, stock, uniform, feature)]
    write_results(args.out, "bench", result, figures, "DTD serving benchmark", default=float)
    last = (
        f"throughput_ratio={summary['throughput_ratio']:.3f} ceiling={summary['ceiling']:.3f} "
        f"dtd_overhead={summary['dtd_overhead']:.4f}"
    )
    if dtd_vllm_loader:
        last += f" vllm_loader_throughput_ratio={summary['vllm_loader_throughput_ratio']:.3f}"
    if feature:
        last += (
            f" feature_throughput_ratio={summary['feature_throughput_ratio']:.3f}"
            f" feature_dtd_overhead={summary['feature_dtd_overhead']:.4f}"
        )
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
