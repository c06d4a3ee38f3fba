"""A small client for the DTD stream routes.

from vllm_plugin.client import open_stream
s = open_stream("http://127.0.0.1:8000", fps=2, standing_question="What changed?")
s.push(frames)                       # uint8 (N, H, W, 3) RGB frames (PNG over the wire), or
s.push_video("clip.mp4")             # a video chunk, sampled at the stream's fps by the server
r = s.ask("What is happening?")      # OpenAI chat.completion dict, usage incl. cached tokens
for e in s.events(): ...             # scene changes and proactive answers
s.close()
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests

from vllm_plugin.media import encode_png
from vllm_plugin.streams.memory import FLAT_FIELDS


class StreamHTTPError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _check(resp: requests.Response) -> dict:
    if resp.status_code >= 400:
        try:
            msg = resp.json()["error"]["message"]
        except Exception:
            msg = resp.text[:500]
        raise StreamHTTPError(resp.status_code, msg)
    return resp.json()


class StreamClient:
    """``retries``: an append refused with 429 or 503 (the server's vision tower is behind, or its frame
    memory is full) is sent again after the server's ``Retry-After``, up to this many times."""

    def __init__(
        self,
        base_url: str,
        stream_id: str,
        session: requests.Session | None = None,
        timeout: float = 600,
        retries: int = 30,
    ):
        self.base_url = base_url.rstrip("/")
        self.id = stream_id
        self.http = session or requests.Session()
        self.timeout = timeout
        self.retries = retries
        self._after = -1

    def _append(self, body: dict) -> dict:
        for attempt in range(self.retries + 1):
            resp = self.http.post(self.url + "/frames", json=body, timeout=self.timeout)
            if resp.status_code not in (429, 503) or attempt == self.retries:
                return _check(resp)
            time.sleep(min(30.0, float(resp.headers.get("Retry-After") or 1.0)))
        raise AssertionError("unreachable")

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/streams/{self.id}"

    def push(
        self, frames: Sequence[np.ndarray] | np.ndarray, timestamps: Sequence[float] | np.ndarray | None = None
    ) -> dict:
        """Append frames; returns {frames, steps, events (raised by these frames), kept_per_step}."""
        items = []
        for i, f in enumerate(frames):
            item: dict[str, Any] = {"image": base64.b64encode(encode_png(f)).decode()}
            if timestamps is not None:
                item["timestamp"] = float(timestamps[i])
            items.append(item)
        return self._append({"frames": items})

    def push_encoded(self, images: Sequence[str], timestamps: Sequence[float] | None = None) -> dict:
        """Append frames already encoded (base64 PNG/JPEG/WebP), e.g. a clip encoded once and looped."""
        items: list[dict[str, Any]] = [{"image": b} for b in images]
        if timestamps is not None:
            for item, t in zip(items, timestamps):
                item["timestamp"] = float(t)
        return self._append({"frames": items})

    def push_video(self, video: str | Path | bytes, start_time: float | None = None) -> dict:
        data = video if isinstance(video, (bytes, bytearray)) else Path(video).read_bytes()
        body: dict[str, Any] = {"video": base64.b64encode(data).decode()}
        if start_time is not None:
            body["start_time"] = start_time
        return self._append(body)

    def ask(
        self,
        question: str,
        max_tokens: int = 64,
        temperature: float = 0.0,
        return_token_ids: bool = False,
        ignore_eos: bool = False,
        remember: bool = True,
    ) -> dict:
        """A question at the current point: the chat.completion dict (usage.prompt_tokens_details.
        cached_tokens shows the reused past; stream_state has ttft_s). ``ignore_eos`` answers exactly
        ``max_tokens`` tokens (benchmarks, tests). ``remember=False``: the turn does not stay in the
        conversation (later questions see the frames, not this question and its answer)."""
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "return_token_ids": return_token_ids,
            "ignore_eos": ignore_eos,
            "remember": remember,
        }
        return _check(self.http.post(self.url + "/chat/completions", json=body, timeout=self.timeout))

    def ask_stream(self, question: str, max_tokens: int = 64, remember: bool = True) -> Iterator[dict]:
        """Server-sent events: chunks with choices[0].delta.content, then a usage chunk."""
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "stream": True,
            "remember": remember,
        }
        with self.http.post(self.url + "/chat/completions", json=body, stream=True, timeout=self.timeout) as r:
            if r.status_code >= 400:
                _check(r)
            for raw in r.iter_lines(decode_unicode=True):
                line = raw.decode() if isinstance(raw, bytes) else raw
                if not line or not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                yield json.loads(data)

    def events(self, after: int | None = None) -> list[dict]:
        """Events after index ``after`` (default: those not returned yet)."""
        after = self._after if after is None else after
        out = _check(self.http.get(self.url + "/events", params={"after": after}, timeout=self.timeout))
        if out["events"]:
            self._after = max(self._after, out["events"][-1]["index"])
        return out["events"]

    def iter_events(self, poll_s: float = 0.5, until: float | None = None) -> Iterator[dict]:
        while until is None or time.monotonic() < until:
            yield from self.events()
            time.sleep(poll_s)

    def wait_prefilled(self, timeout: float = 300.0, poll_s: float = 0.1) -> dict:
        """Wait until every frame that arrived is in the KV cache (``prefill: eager``); returns the status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if not st.get("prefill_pending") or time.monotonic() > deadline:
                return st
            time.sleep(poll_s)

    def status(self) -> dict:
        return _check(self.http.get(self.url, timeout=self.timeout))

    def close(self) -> None:
        _check(self.http.delete(self.url, timeout=self.timeout))


def open_stream(
    base_url: str, model: str | None = None, fps: float | None = None, memory: dict | None = None, **settings
) -> StreamClient:
    """Open a stream. ``fps`` and ``settings`` (dtd_enabled, dtd_threshold, dtd_metric, dtd_reference,
    dtd_criterion, prefill, event_level, standing_question, answer_max_tokens) left out take the
    server's defaults. ``memory``: the memory policy object (``{"keep": "recent+keyframes",
    "max_keyframes": 8, "context_tokens": 4096, "keep_turns": 2}``; the server validates it); its
    keys may also be given as the keyword arguments ``context_tokens``, ``memory_keep``,
    ``max_keyframes``, ``keep_turns``, sent inside ``memory``."""
    memory = dict(memory or {})
    for flat, key in FLAT_FIELDS.items():
        value = settings.pop(flat, None)
        if value is None:
            continue
        if memory.get(key) is not None:
            raise ValueError(f"{flat} and memory[{key!r}] are the same option: give one of them")
        memory[key] = value
    http = requests.Session()
    body = {
        "model": model,
        **({"fps": fps} if fps is not None else {}),
        **settings,
        **({"memory": memory} if memory else {}),
    }
    info = _check(http.post(base_url.rstrip("/") + "/v1/streams", json=body, timeout=60))
    return StreamClient(base_url, info["id"], http)
