"""Benchmark: video preprocessing in the API server, vLLM's loader against the plugin's.

    python -m analysis.cli.bench_preprocess [--video PATH ...] [--fps 2] [--concurrency 4]
                                            [--out results/bench_preprocess]

Per clip (default: the ORIGINAL files of ``../shared/videos``, as a user would send them):

1. **Equivalence**, in this process, with the checkpoint's own HF video processor
   (:func:`analysis.lib.preprocess.compare_loaders`): sampled frame indices and processor grid (must
   be equal), mean and max |Δ| of the processed pixels (0-255; only the resampling filter differs),
   the pixel-level DTD mask agreement at the server's default τ.
2. **Through a real server** (``python -m vllm_plugin.serve``, processor cache and prefix caching off
   so every request does the whole work): API-server preprocessing seconds per request (video decode
   + multimodal processor + DTD decision: the plugin's ``vllm_dtd_video_preprocess_seconds`` counter,
   requests one at a time, median of ``--requests``) with vLLM's loader (the request's
   ``media_io_kwargs {"video": {"fast_decode": false}}``: vLLM's ``qwen2_vl`` loader on OpenCV, the
   frames bit for bit) and with the plugin's (the server default); then requests/s and TTFT p50 at
   ``--concurrency``, each way.
3. **Stock vLLM** (plugin not loaded; ``--no-stock`` skips it): requests/s and TTFT at the same
   concurrency, the baseline a user has without this project.

A clip the plugin's loader or a server refuses (its codec is not in the server's
``DTD_VIDEO_CODECS``, a size limit, a file that does not decode: a 400) is reported on one line
(``skipped <clip>: <reason>``) and left out; the others are measured. When every clip is refused
the tool exits non-zero with that message.

Writes ``bench_preprocess.json`` and ``.html``. The last line is
``preprocess_speedup=<median over clips> mask_agreement=<min over clips>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from analysis.cli.bench import _metrics, none_left, one_request, run_load, server_args, skip, timing
from analysis.harness.tiny_model import add_model_arguments, model_from_arguments
from analysis.lib.paths import check_videos, default_videos, results_dir
from analysis.lib.reports import write_results

EXACT = {"video": {"fast_decode": False}}
FALLBACK_NOTE = " (the plugin's loader handed this file to vLLM's)"


def equivalence(clips: dict[str, Path], model: Path, fps: float, dtd, refused: dict[str, str]) -> dict:
    """Step (1): :func:`analysis.lib.preprocess.compare_loaders` per clip, printed; a clip a loader
    refuses is reported, recorded in ``refused`` and left out of the result."""
    from analysis.lib.preprocess import ClipRefused, compare_loaders

    eq = {}
    for name, path in clips.items():
        try:
            c = eq[name] = compare_loaders(path, model, fps=fps, dtd=dtd)
        except ClipRefused as e:
            refused[name] = e.reason
            skip(name, e.reason)
            continue
        print(
            f"  {c.clip:30s} frames {c.frames:4d} indices {'=' if c.indices_equal else '≠'} grid "
            f"{'=' if c.grid_equal else '≠'} {c.grid} |Δ| mean {c.mean_abs_diff:.2f} max {c.max_abs_diff:.0f} "
            f"mask agreement {c.mask_agreement:.4f}{'' if c.planned else FALLBACK_NOTE}",
            flush=True,
        )
    return eq


def refusal(r: dict) -> str | None:
    """The server's refusal of a request (a 4xx answer), one line; None when it was not refused."""
    status = r.get("status")
    if isinstance(status, int) and 400 <= status < 500:
        return f"the server refused it ({status}): {' '.join(str(r.get('error', '')).split())[:300]}"
    return None


def preprocess_seconds(srv, path: Path, media_io, n: int) -> list[float]:
    """API-server preprocessing seconds of ``n`` requests, one at a time (counter deltas)."""
    out = []
    for _ in range(n):
        before = timing(_metrics(srv.base_url))["preprocess_s"]
        r = one_request(srv.base_url, srv.model, path, 1, media_io=media_io)
        if r["status"] != 200:
            raise SystemExit(f"{path.name}: request failed: {r}")
        out.append(timing(_metrics(srv.base_url))["preprocess_s"] - before)
    return out


def figure(rows: list[dict]):
    import plotly.graph_objects as go

    names = [r["clip"] for r in rows]
    fig = go.Figure(
        [
            go.Bar(name="vLLM's loader", x=names, y=[r["served_s_vllm"] for r in rows]),
            go.Bar(name="plugin's loader", x=names, y=[r["served_s_fast"] for r in rows]),
        ]
    )
    fig.update_layout(
        barmode="group",
        yaxis_title="API-server preprocessing s / request",
        title="Video preprocessing per request (decode + processor + DTD decision)",
    )
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.bench_preprocess", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--video", type=Path, nargs="+", help="clips (default: ../shared/videos/*.mp4, else the bundled clip)"
    )
    ap.add_argument("--fps", type=float, default=2.0, help="sampling rate (vLLM's Qwen2-VL loader default: 2)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=3, help="requests per clip and loader, one at a time")
    ap.add_argument("--load-requests", type=int, default=8, help="requests per clip and loader at --concurrency")
    add_model_arguments(ap, "test")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock vLLM server")
    ap.add_argument("--out", type=Path, default=results_dir("bench_preprocess"))
    args = ap.parse_args(argv)
    videos = args.video or default_videos()
    check_videos(ap, videos)

    from analysis.harness.server import VLLMServer
    from vllm_plugin.entrypoints.options import dtd_config_from_kwargs

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_from_arguments(ap, args)
    media = Path(tempfile.mkdtemp(prefix="dtd-bench-pre-"))
    try:
        clips = {}
        for v in videos:  # the original bytes, in a directory the servers may read
            clips[v.name] = Path(shutil.copy(v, media / v.name))
        print(f"{len(clips)} clips at {args.fps:g} fps; checkpoint {model.name}", flush=True)

        print("(1) equivalence, in process", flush=True)
        cfg = dtd_config_from_kwargs({})
        refused: dict[str, str] = {}
        eq = equivalence(clips, model, args.fps, cfg, refused)
        clips = {name: path for name, path in clips.items() if name in eq}
        if not clips:
            raise none_left(refused)

        extra = ["--media-io-kwargs", json.dumps({"video": {"fps": args.fps}})]
        rows = {name: {"clip": name, **eq[name].as_row()} for name in clips}
        print("(2) DTD-vLLM: vLLM's loader (fast_decode false) and the plugin's", flush=True)
        with VLLMServer(
            model, server_args(media, extra), module="vllm_plugin.serve", log_path=args.out / "dtd.log"
        ) as srv:
            for name, path in list(clips.items()):
                for mio in (EXACT, None):  # warm-up, each loader; a refused clip is left out
                    why = refusal(one_request(srv.base_url, srv.model, path, 1, media_io=mio))
                    if why:
                        break
                if why:
                    refused[name] = why
                    skip(name, why)
                    del clips[name], rows[name]
                    continue
                exact = preprocess_seconds(srv, path, EXACT, args.requests)
                fast = preprocess_seconds(srv, path, None, args.requests)
                load_exact = run_load(
                    srv.base_url, srv.model, path, args.load_requests, args.concurrency, 4, None, media_io=EXACT
                )
                load_fast = run_load(srv.base_url, srv.model, path, args.load_requests, args.concurrency, 4, None)
                row = rows[name]
                row.update(
                    served_s_vllm=statistics.median(exact),
                    served_s_fast=statistics.median(fast),
                    req_s_vllm=load_exact["req_per_s"],
                    req_s_fast=load_fast["req_per_s"],
                    ttft_p50_vllm=load_exact.get("ttft_p50_s"),
                    ttft_p50_fast=load_fast.get("ttft_p50_s"),
                    prompt_tokens_vllm=load_exact.get("prompt_tokens"),
                    prompt_tokens_fast=load_fast.get("prompt_tokens"),
                )
                row["served_speedup"] = row["served_s_vllm"] / max(row["served_s_fast"], 1e-9)
                print(
                    f"  {name:30s} preprocess {row['served_s_vllm']:6.2f}s -> {row['served_s_fast']:6.2f}s "
                    f"(x{row['served_speedup']:.2f}) | c={args.concurrency} {row['req_s_vllm']:.2f} -> "
                    f"{row['req_s_fast']:.2f} req/s, "
                    f"ttft p50 {row['ttft_p50_vllm']:.2f} -> {row['ttft_p50_fast']:.2f}s",
                    flush=True,
                )

        if not args.no_stock:
            print("(3) stock vLLM (plugin not loaded)", flush=True)
            with VLLMServer(model, server_args(media, extra), log_path=args.out / "stock.log") as srv:
                for name, path in clips.items():
                    why = refusal(one_request(srv.base_url, srv.model, path, 1))
                    if why:  # stock vLLM's own refusal: the clip's DTD numbers stay, without a stock baseline
                        skip(f"{name} (stock vLLM)", why)
                        continue
                    load = run_load(srv.base_url, srv.model, path, args.load_requests, args.concurrency, 4, None)
                    rows[name].update(
                        req_s_stock=load["req_per_s"],
                        ttft_p50_stock=load.get("ttft_p50_s"),
                        prompt_tokens_stock=load.get("prompt_tokens"),
                    )
                    print(
                        f"  {name:30s} c={args.concurrency} {load['req_per_s']:.2f} req/s, ttft p50 "
                        f"{load.get('ttft_p50_s', float('nan')):.2f}s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(media, ignore_errors=True)

    table = list(rows.values())
    if not table:
        raise none_left(refused)
    speedup = statistics.median(r["served_speedup"] for r in table)
    agreement = min(r["mask_agreement"] for r in table)
    summary = {
        "fps": args.fps,
        "concurrency": args.concurrency,
        "checkpoint": model.name,
        "preprocess_speedup": speedup,
        "mask_agreement": agreement,
        "clips": table,
        "refused": refused,
        "seconds": time.perf_counter() - t_start,
    }
    write_results(
        args.out, "bench_preprocess", summary, [figure(table)], "Video preprocessing: vLLM's loader vs the plugin's"
    )
    print(f"wrote {args.out / 'bench_preprocess.json'} in {summary['seconds']:.0f} s")
    print(f"preprocess_speedup={speedup:.2f} mask_agreement={agreement:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
