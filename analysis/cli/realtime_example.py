"""Play a video file, as a webcam would send it, through OpenAI's Realtime API (``/v1/realtime``) with
the official ``openai`` SDK, and ask questions as it goes.

    python -m analysis.cli.realtime_example --url http://127.0.0.1:8000 [--model NAME] [--video PATH]
        [--fps 2] [--ask-every 4] [--question "What is happening?"] [--speed 1.0]
        [--standing-question "What changed?"] [--threshold 0.05] [--criterion pixel|feature]

Needs a server started with ``python -m vllm_plugin.serve --dtd-streams --model ...``. One frame per
``conversation.item.create`` (an ``input_image`` data URI, with its stream time in the ``dtd``
extension), a question as an ``input_text`` item then ``response.create``; prints each answer with its
time to first token and the prompt tokens that came from vLLM's prefix cache, every ``dtd.*`` event
(scene changes, proactive answers), and the kept tokens per temporal step at the end. The SDK calls are
in :func:`analysis.lib.play.play_realtime`.
"""

from __future__ import annotations

import asyncio
import sys

import requests

from analysis.cli.stream_example import parser
from analysis.lib.play import play_realtime, print_answer, print_event
from analysis.lib.video import load_video


def main(argv=None) -> int:
    ap = parser("python -m analysis.cli.realtime_example", __doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the server's first served model")
    ap.add_argument("--criterion", default=None, choices=["pixel", "feature"])
    args = ap.parse_args(argv)
    model = args.model or requests.get(args.url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]
    v = load_video(args.video, fps=args.fps)
    settings = {"fps": args.fps, "standing_question": args.standing_question}
    if args.threshold is not None:
        settings["dtd_threshold"] = args.threshold
    if args.criterion is not None:
        settings["dtd_criterion"] = args.criterion
    rec = asyncio.run(
        play_realtime(
            args.url,
            model,
            v.frames,
            v.timestamps,
            args.ask_every,
            args.question,
            args.speed,
            on_answer=print_answer,
            on_event=print_event,
            stream_settings=settings,
        )
    )
    print("kept tokens per temporal step:", rec.kept_per_step, f"(of {rec.tokens_per_step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
