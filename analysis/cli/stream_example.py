"""Play a video file into a DTD stream at real-time speed and ask questions as it goes.

    python -m analysis.cli.stream_example --url http://127.0.0.1:8000 [--video PATH] [--fps 2]
        [--ask-every 4] [--question "What is happening?"] [--speed 1.0] [--standing-question "What changed?"]

Needs a server started with ``python -m vllm_plugin.serve --dtd-streams --model ...``. Prints each
answer with its time-to-first-token and how many prompt tokens came from the cache, every
scene-change event and proactive answer, and the kept tokens per temporal step at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.lib.play import play, print_answer, print_event
from analysis.lib.video import SAMPLE_VIDEO, load_video
from vllm_plugin.client import open_stream


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options of both stream examples (this one, over HTTP, and ``realtime_example``)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--url", required=True)
    ap.add_argument("--video", type=Path, default=SAMPLE_VIDEO)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--ask-every", type=float, default=4.0, help="seconds of stream time between questions")
    ap.add_argument("--question", default="What is happening?")
    ap.add_argument("--standing-question", default=None)
    ap.add_argument("--speed", type=float, default=1.0, help="1 = real time, 0 = as fast as possible")
    ap.add_argument("--threshold", type=float, default=None)
    return ap


def main(argv=None) -> int:
    ap = parser("python -m analysis.cli.stream_example", __doc__.split("\n\n")[0])
    args = ap.parse_args(argv)
    v = load_video(args.video, fps=args.fps)
    settings = {"standing_question": args.standing_question}
    if args.threshold is not None:
        settings["dtd_threshold"] = args.threshold
    s = open_stream(args.url, fps=args.fps, **settings)
    try:
        rec = play(
            s,
            v.frames,
            v.timestamps,
            args.ask_every,
            args.question,
            args.speed,
            on_answer=print_answer,
            on_event=print_event,
        )
    finally:
        s.close()
    print("kept tokens per temporal step:", rec.kept_per_step, f"(of {rec.tokens_per_step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
