"""Play a video file into a DTD stream at real-time speed and ask questions as it goes.

    python -m analysis.stream_example --url http://127.0.0.1:8000 [--video PATH] [--fps 2]
        [--ask-every 4] [--question "What is happening?"] [--speed 1.0] [--standing-question "What changed?"]

Needs a server started with ``python -m vllm_plugin.serve --dtd-streams --model ...``. Prints each
answer with its time-to-first-token and how many prompt tokens came from the cache, every
scene-change event and proactive answer, and the kept tokens per temporal step at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from analysis.video import SAMPLE_VIDEO, load_video
from vllm_plugin.client import StreamClient, open_stream


@dataclass
class PlayRecord:
    questions: list[dict] = field(default_factory=list)  # time, ttft_s, prompt_tokens, cached, answer
    events: list[dict] = field(default_factory=list)
    kept_per_step: list[int] = field(default_factory=list)
    tokens_per_step: int = 0
    step_seconds: float = 1.0


def play(
    stream: StreamClient,
    frames: np.ndarray,
    timestamps: np.ndarray,
    ask_every: float = 4.0,
    question: str = "What is happening?",
    speed: float = 1.0,
    max_tokens: int = 16,
    on_answer: Optional[Callable[[dict], None]] = None,
    on_event: Optional[Callable[[dict], None]] = None,
    push_batch: int = 2,
) -> PlayRecord:
    """Push frames at ``speed`` × real time (0 = as fast as possible); ask every ``ask_every``
    seconds of stream time and once at the end."""
    rec = PlayRecord()
    t_start = time.monotonic()
    next_q = ask_every
    for i in range(0, len(frames), push_batch):
        batch, stamps = frames[i : i + push_batch], timestamps[i : i + push_batch]
        if speed > 0:
            wait = t_start + stamps[-1] / speed - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        stream.push(batch, stamps)
        for e in stream.events():
            rec.events.append(e)
            on_event and on_event(e)
        if stamps[-1] + 1e-9 >= next_q or i + push_batch >= len(frames):
            t0 = time.perf_counter()
            r = stream.ask(question, max_tokens=max_tokens)
            u = r["usage"]
            q = {"time": float(stamps[-1]), "ttft_s": r["stream_state"]["ttft_s"], "e2e_s": time.perf_counter() - t0,
                 "prompt_tokens": u["prompt_tokens"], "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                 "answer": r["choices"][0]["message"]["content"]}
            rec.questions.append(q)
            on_answer and on_answer(q)
            next_q = stamps[-1] + ask_every
    time.sleep(0.2)
    rec.events += stream.events()
    st = stream.status()
    rec.kept_per_step, rec.tokens_per_step = st["kept_per_step"], st["tokens_per_step"]
    return rec


def print_answer(q: dict) -> None:
    print(f"[t={q['time']:6.1f}s] ttft {q['ttft_s'] * 1000:6.0f} ms | prompt {q['prompt_tokens']:5d} tokens, "
          f"{q['cached_tokens']:5d} from cache | {q['answer']!r}", flush=True)


def print_event(e: dict) -> None:
    if e["type"] == "scene_change":
        print(f"[t={e['time']:6.1f}s] EVENT scene change at step {e['step']} (kept {e['kept_fraction']:.0%} of the frame)", flush=True)
    elif e["type"] == "answer":
        print(f"[t={e['time']:6.1f}s] PROACTIVE {e['question']!r} -> {e['text']!r}", flush=True)
    else:
        print(f"EVENT {e}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.stream_example", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--video", type=Path, default=SAMPLE_VIDEO)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--ask-every", type=float, default=4.0, help="seconds of stream time between questions")
    ap.add_argument("--question", default="What is happening?")
    ap.add_argument("--standing-question", default=None)
    ap.add_argument("--speed", type=float, default=1.0, help="1 = real time, 0 = as fast as possible")
    ap.add_argument("--threshold", type=float, default=None)
    args = ap.parse_args(argv)
    v = load_video(args.video, fps=args.fps)
    settings = {"standing_question": args.standing_question}
    if args.threshold is not None:
        settings["dtd_threshold"] = args.threshold
    s = open_stream(args.url, fps=args.fps, **settings)
    try:
        rec = play(s, v.frames, v.timestamps, args.ask_every, args.question, args.speed,
                   on_answer=print_answer, on_event=print_event)
    finally:
        s.close()
    print("kept tokens per temporal step:", rec.kept_per_step, f"(of {rec.tokens_per_step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
