"""Engine memory for one long static video: the worker's peak RSS after start-up and after the request.

    python -m analysis.cli.engine_memory [--frames 256] [--side 448] [--max-model-len 1024]

Starts the DTD server (tiny checkpoint, CPU) with ``--max-model-len``, reads the engine worker's
peak resident memory (VmHWM) once it is up (start-up includes vLLM's profiling run), sends a warm-up
request (``--warmup-frames`` frames of the same video: the first inference of a fresh engine grows
its memory whatever the input), reads it again, then sends one chat request with a static video of
``--frames`` frames of ``--side``² at 2 fps and reads it a third time. Prints
``startup_peak_mb=… warm_peak_mb=… after_peak_mb=… ratio=… ratio_warm=… tokens_before_dtd=… kept=…``
(``ratio``: after / start-up, the goal's measure; ``ratio_warm``: after / after the warm-up, what the
long video itself adds); exits non-zero when the peak after the request is higher than at start-up
(the goal is "NOT met").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--warmup-frames", type=int, default=4, help="0: no warm-up request")
    args = ap.parse_args(argv)

    from analysis.harness.server import VLLMServer, context_args, video_question
    from analysis.harness.tiny_model import ensure_tiny_model
    from analysis.lib.video import write_video

    media = Path(tempfile.mkdtemp(prefix="engine-memory-"))
    frames = np.full((args.frames, args.side, args.side, 3), 120, np.uint8)
    frames[:, args.side // 4 : args.side // 2, args.side // 4 : args.side // 2] = 30
    video = write_video(media / "static.mp4", frames, 2.0)
    short = write_video(media / "short.mp4", frames[: max(2, args.warmup_frames)], 2.0)
    serve = [
        *context_args(args.max_model_len),
        "--media-io-kwargs",
        json.dumps({"video": {"num_frames": -1}}),
        "--allowed-local-media-path",
        str(media),
    ]

    def ask(srv, path):
        raw = srv.client().chat.completions.with_raw_response.create(
            model=srv.model,
            max_tokens=4,
            temperature=0.0,
            messages=video_question(f"file://{path}", "what happens"),
        )
        return json.loads(raw.headers.get("x-dtd-stats", '{"videos": [{}]}'))["videos"][0]

    with VLLMServer(ensure_tiny_model("test"), serve, module="vllm_plugin.serve") as srv:
        startup = srv.worker_peak_mb()
        if args.warmup_frames:
            ask(srv, short)
        warm = srv.worker_peak_mb()
        stats = ask(srv, video)
        after = srv.worker_peak_mb()
    met = after <= startup
    print(
        f"startup_peak_mb={startup:.0f} warm_peak_mb={warm:.0f} after_peak_mb={after:.0f} ratio={after / startup:.4f} "
        f"ratio_warm={after / warm:.4f} tokens_before_dtd={stats.get('total')} kept={stats.get('kept')} "
        f"goal={'met' if met else 'NOT met'}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
