"""Play frames into a DTD stream at real-time speed and ask questions as it goes (library part of
``python -m analysis.cli.stream_example``, the demo and notebook 03)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vllm_plugin.client import StreamClient, open_stream

__all__ = ["PlayRecord", "data_uri", "open_stream", "play", "play_realtime", "print_answer", "print_event"]


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


def data_uri(frame: np.ndarray) -> str:
    """A frame as an ``input_image`` URL of OpenAI's Realtime API (PNG: the pixels the HTTP client sends)."""
    import base64

    from vllm_plugin.media import encode_png

    return "data:image/png;base64," + base64.b64encode(encode_png(frame)).decode()


def user_message(*parts: dict) -> Any:
    """A user message item of OpenAI's Realtime API with these content parts (typed ``Any``: the SDK's
    TypedDicts have no ``dtd`` extension)."""
    return {"type": "message", "role": "user", "content": list(parts)}


async def play_realtime(
    base_url: str,
    model: str,
    frames: np.ndarray,
    timestamps: np.ndarray,
    ask_every: float = 4.0,
    question: str = "What is happening?",
    speed: float = 1.0,
    max_tokens: int = 16,
    on_answer: Callable[[dict], None] | None = None,
    on_event: Callable[[dict], None] | None = None,
    stream_settings: dict | None = None,
) -> PlayRecord:
    """:func:`play` over OpenAI's Realtime API (``/v1/realtime``) with the official ``openai`` SDK:
    one ``input_image`` item per frame (acknowledged once the server holds it), a question as an
    ``input_text`` item then ``response.create``; the stream's settings in ``session.dtd``. Events
    (``dtd.scene_change``, ``dtd.proactive_answer``) are recorded as :func:`play` records them."""
    from openai import AsyncOpenAI

    rec = PlayRecord()
    client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    async with client.realtime.connect(model=model) as conn:

        async def until(kind: str):
            async for e in conn:
                if e.type.startswith("dtd."):
                    event = {**e.model_dump(), "type": "answer" if e.type == "dtd.proactive_answer" else e.type[4:]}
                    rec.events.append(event)
                    on_event and on_event(event)
                elif e.type == "error":
                    raise RuntimeError(f"realtime error {e.error.code}: {e.error.message}")
                elif e.type == kind:
                    return e
            raise RuntimeError(f"the socket closed before {kind}")

        session: Any = {"type": "realtime", "dtd": stream_settings or {}}  # (the SDK's types lack the extension)
        await conn.session.update(session=session)
        await until("session.updated")
        t_start, next_q = time.monotonic(), ask_every
        for i, (frame, t) in enumerate(zip(frames, timestamps)):
            if speed > 0:
                wait = t_start + float(t) / speed - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            image = {"type": "input_image", "image_url": data_uri(frame), "dtd": {"timestamp": float(t)}}
            await conn.conversation.item.create(item=user_message(image))
            await until("conversation.item.done")
            if float(t) + 1e-9 < next_q and i + 1 < len(frames):
                continue
            t0 = time.perf_counter()
            await conn.conversation.item.create(item=user_message({"type": "input_text", "text": question}))
            await until("conversation.item.done")
            await conn.response.create(response={"max_output_tokens": max_tokens})
            done = (await until("response.done")).response
            q = {
                "time": float(t),
                "ttft_s": done.dtd["stream_state"]["ttft_s"],
                "e2e_s": time.perf_counter() - t0,
                "prompt_tokens": done.usage.input_tokens,
                "cached_tokens": done.usage.input_token_details.cached_tokens,
                "answer": done.output[0].content[0].text,
            }
            rec.questions.append(q)
            on_answer and on_answer(q)
            next_q = float(t) + ask_every
        await conn.session.update(session={"type": "realtime"})  # session.updated carries the stream's status
        st = (await until("session.updated")).session.dtd["stream"]
    rec.kept_per_step, rec.tokens_per_step = st["kept_per_step"], st["tokens_per_step"]
    rec.step_seconds = st["temporal_patch_size"] / st["fps"]
    return rec
