"""Play frames into a DTD stream at real-time speed and ask questions as it goes (library part of
``python -m analysis.cli.stream_example``, the demo and notebook 03)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vllm_plugin.client import StreamClient, open_stream

__all__ = ["PlayRecord", "open_stream", "play", "print_answer", "print_event"]


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
    on_answer: Callable[[dict], None] | None = None,
    on_event: Callable[[dict], None] | None = None,
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
            q = {
                "time": float(stamps[-1]),
                "ttft_s": r["stream_state"]["ttft_s"],
                "e2e_s": time.perf_counter() - t0,
                "prompt_tokens": u["prompt_tokens"],
                "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                "answer": r["choices"][0]["message"]["content"],
            }
            rec.questions.append(q)
            on_answer and on_answer(q)
            next_q = stamps[-1] + ask_every
    time.sleep(0.2)
    rec.events += stream.events()
    st = stream.status()
    rec.kept_per_step, rec.tokens_per_step = st["kept_per_step"], st["tokens_per_step"]
    rec.step_seconds = st["temporal_patch_size"] / st["fps"]
    return rec


def print_answer(q: dict) -> None:
    print(
        f"[t={q['time']:6.1f}s] ttft {q['ttft_s'] * 1000:6.0f} ms | prompt {q['prompt_tokens']:5d} tokens, "
        f"{q['cached_tokens']:5d} from cache | {q['answer']!r}",
        flush=True,
    )


def print_event(e: dict) -> None:
    if e["type"] == "scene_change":
        print(
            f"[t={e['time']:6.1f}s] EVENT scene change at step {e['step']} "
            f"(kept {e['kept_fraction']:.0%} of the frame)",
            flush=True,
        )
    elif e["type"] == "answer":
        print(f"[t={e['time']:6.1f}s] PROACTIVE {e['question']!r} -> {e['text']!r}", flush=True)
    else:
        print(f"EVENT {e}", flush=True)
