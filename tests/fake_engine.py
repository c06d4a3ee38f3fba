"""A fake :class:`vllm_plugin.streams.service.Engine` for unit tests of the stream service (no model,
no vLLM): the tiny checkpoint's tokenizer and chat template, and a ``generate`` that answers "a cat"."""

import asyncio
import re
from types import SimpleNamespace

import numpy as np

from vllm_plugin import errors
from vllm_plugin.entrypoints.options import GIVEN_MASK


class FakeEngine:
    """An engine with no model behind it: the tiny checkpoint's tokenizer and chat template, and a
    ``generate`` that answers "a cat" and records every request (the placeholders expanded to the
    kept tokens of each video item, as the engine's processor expands them)."""

    def __init__(self, model_path, max_model_len=4096, prefix_caching=True):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.chat_template = (model_path / "chat_template.jinja").read_text()
        self.video_pad = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.answer_ids = self.tokenizer.encode("a cat", add_special_tokens=False) + [im_end]
        self.served_names = ["tiny"]
        self.max_model_len = max_model_len
        self.server_dtd = {"dtd_threshold": 0.05}
        self.prefix_caching = prefix_caching
        self.dp_ranks = 1
        self.position_room = 10**6
        self.requests: list[tuple[dict, dict]] = []

    def step_positions(self, fps):
        return 2.0 / fps

    def item_positions(self, steps, h, w, fps):
        return int((steps - 1) * self.step_positions(fps)) + max(h, w)

    def sampling_params(self, max_tokens, temperature=0.0, ignore_eos=False):
        return {"max_tokens": max_tokens, "temperature": temperature, "ignore_eos": ignore_eos}

    async def generate(self, prompt, params, request_id, data_parallel_rank=None):
        self.requests.append((prompt, params))
        videos = iter(prompt.get("multi_modal_data", {}).get("video", []))
        ids = []
        for t in prompt["prompt_token_ids"]:
            ids += [t] * (max(1, int(np.asarray(next(videos)[1][GIVEN_MASK]).sum())) if t == self.video_pad else 1)
        out = self.answer_ids[: params["max_tokens"]]
        done = len(out) == len(self.answer_ids)
        yield SimpleNamespace(
            request_id=request_id,
            prompt_token_ids=ids,
            num_cached_tokens=0,
            finished=True,
            outputs=[
                SimpleNamespace(
                    text=self.tokenizer.decode(out, skip_special_tokens=True),
                    token_ids=out,
                    finish_reason="stop" if done else "length",
                    stop_reason=None,
                )
            ],
        )

    def encoder(self, max_pending_steps):
        raise errors.InvalidOption(
            "dtd_criterion", "dtd_criterion: 'feature' needs a vision tower; this engine has none"
        )


_KIND = re.compile(r"-(q|prefill|reanchor)[0-9]")


def request_kind(request_id: str) -> str:
    """What a stream's engine request is: ``"q"`` (a question), ``"prefill"`` (an eager prefill),
    ``"reanchor"`` (a piece of a re-anchor) or ``""``. Read right after the stream id's first 12
    characters, as the service names them (``<stream id[:12]>-<kind><n>-<hex>``), never searched for in
    the whole id: the id's random part may hold ``-q`` itself (1 stream in ~60)."""
    m = _KIND.match(request_id, 12)
    return m.group(1) if m else ""


async def until(predicate, seconds: float = 20.0) -> None:
    """Wait (polling every 10 ms) until ``predicate()`` holds; AssertionError after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")
