"""OpenAI chat-completions shapes for stream answers, and the one place time-to-first-token is measured."""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from vllm_plugin.entrypoints.options import GIVEN_MASK


class Timing:
    """Wall time of one answer: ``ttft_s`` when the first generated token is seen, ``e2e_s`` at the end."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ttft_s: float | None = None
        self.sent_s: float | None = None  # when its request reached the engine
        self.reanchor_wait_s = 0.0  # waited for a re-anchor prefilled ahead (the old conversation could not take it)
        self.during_reanchor = False  # answered on the old conversation while a re-anchor was prefilled ahead
        self.reanchored = False  # its own prompt was a re-anchored conversation (it prefilled the re-anchor)

    def sent(self) -> None:
        """The question's request goes to the engine now."""
        self.sent_s = time.perf_counter() - self.t0

    def saw(self, out) -> None:
        if self.ttft_s is None and out.outputs and out.outputs[0].token_ids:
            self.ttft_s = time.perf_counter() - self.t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def video_tokens_per_chunk(items, prompt_ids: list[int], video_pad: int) -> list[int]:
    """Kept video tokens of each chunk in a served prompt: its keep mask's count (one token for a chunk
    that kept none, as the processor serves it), for the leading ``items`` whose counts add up to the
    video placeholders of the served (expanded) prompt (later chunks were cut after it was sent). A
    family may split a chunk into several placeholder runs (Qwen3-VL: one per temporal step), so the
    prompt gives the total only."""
    served = sum(1 for t in prompt_ids if t == video_pad)
    counts: list[int] = []
    for _, meta in items:
        if sum(counts) >= served:
            break
        counts.append(max(1, int(np.asarray(meta[GIVEN_MASK]).sum())))
    if served != sum(counts):  # a bug, not the client's: said in the log, the answer stands
        logging.getLogger("vllm.dtd_plugin").error(
            "DTD stream: the served prompt holds %d video tokens, its chunks' masks keep %d", served, sum(counts)
        )
    return counts


def usage(out) -> dict:
    o = out.outputs[0]
    prompt_tokens = len(out.prompt_token_ids or [])
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(o.token_ids),
        "total_tokens": prompt_tokens + len(o.token_ids),
        "prompt_tokens_details": {"cached_tokens": int(out.num_cached_tokens or 0)},
    }


def completion(out, model: str, state: dict) -> dict:
    """A ``chat.completion`` from a finished vLLM ``RequestOutput``, with the stream's ``stream_state``."""
    o = out.outputs[0]
    return {
        "id": f"chatcmpl-{out.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish_reason}
        ],
        "usage": usage(out),
        "stream_state": state,
    }


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def delta_chunk(out, model: str, text: str) -> dict:
    return {
        "id": f"chatcmpl-{out.request_id}",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": out.outputs[0].finish_reason}],
    }


def final_chunk(final: dict) -> dict:
    """The last SSE chunk: no choices, the usage and stream state of the whole answer."""
    return {
        "id": final["id"],
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": final["usage"],
        "stream_state": final["stream_state"],
    }


DONE = "data: [DONE]\n\n"
