"""Live video streams: frames arrive over time, DTD runs causally, questions reuse the KV cache.

No vLLM import: this is the state and bookkeeping; :mod:`vllm_plugin.streams.service` and
:mod:`vllm_plugin.streams.routes` put it behind HTTP and the engine.

How a question reuses the past
------------------------------
Frames are resized once, on arrival, to the size the served processor gives them (``Geometry.sizer``;
transformers' ``smart_resize`` where no processor is at hand), so the processor does not resize
them again. At
every question the complete temporal steps that arrived since the previous question become ONE new
video item (a "chunk"); the conversation is kept as token ids (:mod:`vllm_plugin.streams.prompt`,
through the model's chat template)::

    <system> <user: [chunk 0] question 1> <assistant: answer 1> <user: [chunk 1] question 2> ...

Past chunks are byte-identical items in byte-identical places, so vLLM's prefix cache (block
hashes mix in each item's content hash) serves everything before the new chunk, and its encoder
work is not redone: a question costs the new frames and the new text only.

DTD runs once per temporal step, causally, when the step's frames arrive (the first step of the
stream is kept whole; every later one is compared with the step before it, across chunk borders).
The mask decided then is the one the prompt uses: a chunk's item carries its steps' masks in its
metadata (``dtd_keep_mask``) and the processor takes them as they are. Kept tokens of the past never
change; chunked DTD equals DTD on the whole stream.

The per-step kept fraction is the scene-change signal: when it rises to ``event_level`` or above
(from below) the stream records an event, and may answer a standing question (proactive response).

Streams of hours
----------------
A stream's conversation has a budget and a memory policy
(:class:`vllm_plugin.streams.memory.MemorySettings`, declared at open). Before a request would take
it past the budget, the stream re-anchors (:meth:`Conversation.reanchor`): its video items become
the policy's selection (keyframes, the latest chunks), and the frames, masks and kept encoder outputs
nothing selected needs are freed. Memory then follows the policy, not the stream's age; the limits
on what a client sends are per append (frames, bytes) and per second (appends), and on what a stream
holds (frames, bytes).

A :class:`Stream` is its parts, each with its own lock: :class:`~vllm_plugin.streams.store.FrameStore`
(frames and bytes), :class:`~vllm_plugin.streams.decision.DecisionState` (the DTD decision),
:class:`~vllm_plugin.streams.conversation.Conversation` (chunks, items, re-anchoring) and
:class:`~vllm_plugin.streams.events.EventLog` (events). Errors are the plugin's own
(:mod:`vllm_plugin.errors`); the routes give them their HTTP statuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from vllm_plugin import settings
from vllm_plugin.core import DTDConfig
from vllm_plugin.errors import (
    DTDError,
    InvalidOption,
    InvalidRequest,
    RateLimited,
    StreamFull,
    StreamNotFound,
    TooLarge,
    TooManyStreams,
    Unavailable,
)
from vllm_plugin.streams.conversation import Conversation
from vllm_plugin.streams.decision import DecisionState
from vllm_plugin.streams.events import EventLog, RateLimiter
from vllm_plugin.streams.memory import MemorySettings
from vllm_plugin.streams.store import ByteAccount, FrameStore

logger = logging.getLogger("vllm.dtd_plugin")
ENV_PREFIX = "DTD_STREAM_"  # limits from the environment: DTD_STREAM_<FIELD> (vllm_plugin.settings)

_ID = re.compile(r"strm-(0|[1-9][0-9]{0,3})-[A-Za-z0-9_-]+\Z")


def stream_id(owner: int) -> str:
    """``strm-<owner process index>-<192 random bits>``."""
    return f"strm-{owner}-{secrets.token_urlsafe(24)}"


def stream_owner(sid: str) -> int | None:
    """The API-server process index a stream id names (None if it is not a stream id)."""
    m = _ID.match(sid)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Limits:
    max_streams: int = 16
    max_frames: int = 7200  # held per stream (frames its memory policy freed do not count)
    max_bytes: int = 4 * 1024**3  # decoded frames kept per stream
    max_chunks: int = 1000  # video items per prompt (server's --limit-mm-per-prompt must allow it)
    idle_seconds: float = 600.0
    max_upload_bytes: int = 64 * 1024**2  # one append request
    max_frames_per_append: int = 256  # frames kept from one append (sampled at the stream's fps)
    max_appends_per_second: float = 50.0  # per stream (429 beyond)
    max_events: int = 1024  # events a stream keeps for GET /events (older ones go; indices stay)
    max_frame_pixels: int = 4096 * 4096  # one uploaded frame or video frame, checked before decoding
    max_decoded_pixels: int = 2**28  # all frames one video upload decodes to (sampled or not)
    max_total_bytes: int = 8 * 1024**3  # decoded frames held by all streams of this server
    max_pending_encode_steps: int = 256  # temporal steps waiting for the vision tower, all feature streams (429 beyond)
    max_chunk_frames: int = 64  # frames of one video item (a request's encoder work and the engine's copy of it)
    max_chunk_bytes: int = 64 * 1024**2  # decoded bytes of one video item
    engine_timeout_s: float = 300.0  # no output from the engine for this long: the request is aborted (503)

    @classmethod
    def from_env(cls, env=None) -> Limits:
        """``DTD_STREAM_<FIELD>`` of ``env`` (default ``os.environ``) for every field, read by
        :mod:`vllm_plugin.settings` (whose table has the same defaults)."""
        return cls(**{f: settings.get(ENV_PREFIX + f.upper(), env) for f in cls.__dataclass_fields__})

    def per_process(self, count: int) -> Limits:
        """The share of one of ``count`` API-server processes: streams live in the process that
        opened them, so the server-wide caps (streams, bytes held) are split evenly."""
        if count <= 1:
            return self
        return replace(
            self,
            max_streams=max(1, self.max_streams // count),
            max_total_bytes=max(1, self.max_total_bytes // count),
            max_pending_encode_steps=max(1, self.max_pending_encode_steps // count),
        )


@dataclass(frozen=True)
class Geometry:
    """Qwen2-VL family sizing: frames resized so both sides are multiples of ``factor`` (patch ×
    merge) and the area lies within [min_pixels, max_pixels] (``smart_resize``). ``sizer``, when
    set, answers instead: the served processor's own answer (see
    :func:`vllm_plugin.streams.service.processor_sizer`), so every size setting the server applies
    (``--mm-processor-kwargs``, ``videos_kwargs``, the checkpoint's preprocessor config) is honoured."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 448 * 448
    temporal_patch_size: int = 2
    sizer: Callable[[int, int], tuple[int, int]] | None = field(default=None, compare=False, repr=False)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_video_processor(cls, vp, overrides: dict | None = None, sizer=None) -> Geometry:
        """From the HF video processor, with the server's ``--mm-processor-kwargs`` size keys
        (``size``, ``min_pixels``, ``max_pixels``) applied as the processor applies them: frames
        resized to this geometry are not resized again when the processor sees them."""
        o = overrides or {}
        size = {**dict(getattr(vp, "size", None) or {}), **dict(o.get("size") or {})}
        if o.get("min_pixels") is not None:
            size["shortest_edge"] = o["min_pixels"]
        if o.get("max_pixels") is not None:
            size["longest_edge"] = o["max_pixels"]
        return cls(
            patch_size=int(vp.patch_size),
            merge_size=int(vp.merge_size),
            sizer=sizer,
            min_pixels=int(size.get("shortest_edge", getattr(vp, "min_pixels", cls.min_pixels))),
            max_pixels=int(size.get("longest_edge", getattr(vp, "max_pixels", cls.max_pixels))),
            temporal_patch_size=int(vp.temporal_patch_size),
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes a frame to: transformers' Qwen2-VL ``smart_resize``,
        the function its video processor calls."""
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        if height < 1 or width < 1:
            raise InvalidRequest(f"frame size {width}x{height} is not usable", "frames")
        try:
            if self.sizer is not None:
                return self.sizer(height, width)
            return smart_resize(
                height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
            )
        except ValueError as e:
            raise InvalidRequest(f"frame size {width}x{height} is not usable: {e}", "frames") from None


PREFILL_MODES = ("eager", "lazy")


@dataclass
class StreamSettings:
    """``prefill``: ``"eager"`` — complete temporal steps enter the KV cache as they arrive (a
    prompt-only request continuing the conversation), so a question prefills only its own text;
    ``"lazy"`` — the steps since the last question are prefilled with the next question."""

    fps: float = 2.0
    dtd: DTDConfig = field(default_factory=DTDConfig)
    event_level: float = 0.5  # kept fraction of a step that signals a scene change
    standing_question: str | None = None
    instructions: str | None = None  # a system message before every turn of the stream's conversation
    answer_max_tokens: int = 64
    prefill: str = "eager"
    memory: MemorySettings = field(default_factory=MemorySettings)
    # eager: a stretch of steps where DTD kept nothing becomes a chunk once it is this long, so its
    # frames are freed by later re-anchors instead of waiting, held, for the next change
    max_static_steps: int = 8

    def __post_init__(self):
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 60):
            raise InvalidOption("fps", f"fps must be in (0, 60], got {self.fps!r}")
        if self.prefill not in PREFILL_MODES:
            raise InvalidOption("prefill", f"prefill must be one of {list(PREFILL_MODES)}, got {self.prefill!r}")
        if not (isinstance(self.event_level, (int, float)) and 0 < self.event_level <= 1):
            raise InvalidOption("event_level", f"event_level must be in (0, 1], got {self.event_level!r}")


def _view(part: str, name: str) -> Any:
    """A read-only attribute of :class:`Stream`: ``<part>.<name>`` (a value, or a bound method)."""
    return property(lambda stream: getattr(getattr(stream, part), name), doc=f"``self.{part}.{name}``")


class Stream:
    """One live stream, composed of its parts:

    * :attr:`store` — frames, their times, per-step results and the bytes they take
      (:class:`vllm_plugin.streams.store.FrameStore`);
    * :attr:`decision` — the causal DTD decision and the reference it carries
      (:class:`vllm_plugin.streams.decision.DecisionState`);
    * :attr:`conversation` — chunks, items, re-anchoring with the memory policy, and the text
      (:class:`vllm_plugin.streams.conversation.Conversation`);
    * :attr:`events` — scene changes and the other events (:class:`vllm_plugin.streams.events.EventLog`).

    ``encoder`` (feature criterion): an :class:`vllm_plugin.streams.encoding.EncodeQueue`; each
    temporal step is encoded once, when its frames arrive, and its kept outputs are what the engine
    receives at question time."""

    def __init__(
        self,
        stream_id: str,
        settings: StreamSettings,
        geometry: Geometry,
        limits: Limits,
        bytes_account: ByteAccount | None = None,
        encoder=None,
    ):
        self.id = stream_id
        self.settings = settings
        self.geometry = geometry
        self.limits = limits
        self.created = self.last_active = time.monotonic()
        self.feature = settings.dtd.enabled and settings.dtd.criterion == "feature"
        if self.feature and encoder is None:
            raise InvalidOption(
                "dtd_criterion", "dtd_criterion: 'feature' needs the server's vision tower, which is not available here"
            )
        self.encoder = encoder
        self.store = FrameStore(geometry, limits.max_bytes, bytes_account)
        self.decision = DecisionState(
            settings.dtd, geometry.patch_size, geometry.merge_size, geometry.temporal_patch_size
        )
        self.conversation = Conversation(stream_id, self.store, settings.fps, settings.memory, limits)
        self.events = EventLog(limits.max_events, settings.event_level, settings.dtd.enabled)
        self.appends = RateLimiter(limits.max_appends_per_second)
        self.append_lock = threading.Lock()  # one append at a time (held while its steps are decided, or encoded)
        self.chat_lock = asyncio.Lock()  # one question (or eager prefill) at a time per stream
        self.prefill_task: asyncio.Task | None = None  # the running eager prefill, if any
        self.reanchoring: Any = None  # a re-anchor being prefilled ahead (service.ReanchorPlan), if any
        self.eager_stopped: str | None = None  # why eager prefill stopped for this stream (then lazy)
        self.closed = False
        self._submitted = False  # this append's steps went to the encoder (it releases their reservation)

    # -- the parts' most used views: ``stream.<name>`` is ``stream.<part>.<name>`` -------------------
    frames = _view("store", "frames")
    steps = _view("store", "steps")
    nbytes = _view("store", "nbytes")
    kept_per_step = _view("store", "kept_per_step")
    step_masks = _view("store", "step_masks")
    step_embeds = _view("store", "step_embeds")
    step_first = _view("store", "step_first")
    cut_chunk = _view("conversation", "cut_chunk")
    video_items = _view("conversation", "video_items")
    chunk_frames = _view("conversation", "chunk_frames")
    backlog = _view("conversation", "backlog")

    # -- appends ------------------------------------------------------------------------------------
    def touch(self) -> None:
        self.last_active = time.monotonic()

    def admit_append(self) -> None:
        """The per-stream append rate (``max_appends_per_second``, over the last second)."""
        if not self.appends.admit(time.monotonic()):
            raise RateLimited(
                f"at most {self.limits.max_appends_per_second:g} appends per second per stream: "
                "send more frames per append"
            )

    def fit(self, frame: np.ndarray) -> np.ndarray:
        """One frame resized to the stream's size (set by its first frame)."""
        return self.store.fit(frame)

    def add_frames(self, frames: list[np.ndarray], timestamps: list[float] | None = None) -> dict:
        """Append frames (any size; resized to the stream's), decide the new complete steps.
        Returns ``{"events": events they raised, "kept_per_step": kept tokens of the temporal
        steps this append completed}``. Thread-safe; nothing of a refused append is kept."""
        lim, store = self.limits, self.store
        if not frames:
            raise InvalidRequest("no frames given", "frames")
        if len(frames) > lim.max_frames_per_append:
            raise TooLarge(f"at most {lim.max_frames_per_append} frames per append")
        with self.append_lock:
            if len(frames) > lim.max_frames // 2:
                raise TooLarge(
                    f"at most {lim.max_frames // 2} frames per append (half of the {lim.max_frames} "
                    "frames a stream may hold)"
                )
            if store.held_frames + len(frames) > lim.max_frames:
                if self.settings.prefill == "eager" and not self.eager_stopped:  # frees them as it catches up
                    raise RateLimited(
                        f"the stream holds {store.held_frames} frames and may hold {lim.max_frames}: "
                        "they wait for its eager prefill; retry in a moment"
                    )
                raise StreamFull(
                    f"stream is full: it holds {store.held_frames} frames and may hold {lim.max_frames} "
                    "(frames are freed once a question has taken them and the conversation re-anchors)"
                )
            resized = [store.fit(f) for f in frames]
            add_bytes, stamps = store.check(resized, timestamps, self.settings.fps)
            new_steps = (len(store.frames) + len(resized)) // self.geometry.temporal_patch_size - store.steps
            reserved = new_steps if self.feature else 0
            if reserved:
                self.encoder.reserve(reserved)  # 429 when the tower is behind; raises before anything is added
            try:
                store.add(resized, stamps, add_bytes)  # the server-wide cap; raises before anything is added
            except BaseException:
                if reserved:
                    self.encoder.release(reserved)
                raise
            self.touch()
            done = len(store.kept_per_step)
            state = self.decision.state
            self._submitted = False
            try:
                events = self._analyze(reserved)
            except Exception as e:  # nothing of this append is kept: the stream stays as it was
                if reserved and not self._submitted:
                    self.encoder.release(reserved)  # the queue releases what it was given
                store.take_back_steps(done)
                store.take_back(len(resized), add_bytes)
                self.decision.rewind(state)
                if isinstance(e, DTDError):
                    raise
                logger.warning("DTD stream %s: analysing new frames failed: %s", self.id, e)
                raise Unavailable(f"the new frames could not be analysed ({e}); nothing was added, retry") from e
            return {"events": events, "kept_per_step": store.kept_per_step[done:]}

    def release(self) -> None:
        """Give the stream's bytes back to the server-wide account (closed or expired)."""
        self.closed = True
        with self.append_lock:
            self.store.release()

    def _step_tokens(self, frames: np.ndarray, steps: int, reserved: int) -> torch.Tensor:
        """Tokens (steps, H, W, C) of complete temporal steps: encoder outputs (feature criterion, one
        tower call shared with other streams' steps) or pixels."""
        if not self.feature:
            return self.decision.pixel_tokens(frames)
        factor = self.geometry.factor
        if reserved != steps:
            raise RuntimeError(f"{steps} new temporal steps, {reserved} reserved with the encoder")
        future = self.encoder.submit(frames, steps)
        self._submitted = True
        return future.result().view(steps, frames.shape[1] // factor, frames.shape[2] // factor, -1)

    def _analyze(self, reserved: int = 0) -> list[dict]:
        store, tps = self.store, self.geometry.temporal_patch_size
        done = len(store.kept_per_step)
        if store.steps <= done:
            return []
        steps = store.steps - done
        new = store.frames[done * tps : store.steps * tps]  # not in a chunk yet: held
        tokens = self._step_tokens(np.stack([f for f in new if f is not None]), steps, reserved)
        d = getattr(self.encoder, "decision_dim", None) if self.feature else None
        mask = self.decision.decide(
            tokens if d is None else tokens[..., :d]
        )  # Qwen3-VL: the main output, not the DeepStack levels
        if self.feature:  # kept encoder outputs are held like frames: against the stream's and the server's byte caps
            store.add_outputs(
                [tokens[t][mask[t]].clone() for t in range(steps)], [tokens[t, 0, 0].clone() for t in range(steps)]
            )
        kept = store.add_masks(mask)
        new_events = []
        for i, k in enumerate(kept):
            step = done + i
            frac = k / store.tokens_per_step
            change = self.events.scene_change(step, frac)
            self.conversation.observe(step, k, change)
            if change:
                new_events.append(
                    {
                        "type": "scene_change",
                        "step": step,
                        "frame": step * tps,
                        "time": store.timestamps[step * tps],
                        "kept_fraction": frac,
                    }
                )
        store.add_kept(kept)  # now a chunk may take these steps
        return [self.events.add(e) for e in new_events]

    # -- eager prefill ------------------------------------------------------------------------------
    def eager_due(self) -> bool:
        """An eager prefill has something to do: new kept tokens, or a static stretch of
        ``max_static_steps`` steps (cut so that its frames can be freed)."""
        conv = self.conversation
        return (
            bool(conv.uncut_kept())
            or len(conv.uncut_steps()) >= self.settings.max_static_steps
            or (conv.full() and len(conv.uncut_steps()) > 0)
        )

    def status(self) -> dict:
        store, conv, dtd = self.store, self.conversation, self.settings.dtd
        return {
            "id": self.id,
            "frames": len(store.frames),
            "steps": store.steps,
            "chunks": len(conv.chunks),
            "questions": conv.questions,
            "prefills": conv.prefills,
            "events": self.events.count,
            "bytes": store.nbytes,
            "size": list(store.size) if store.size else None,
            "fps": self.settings.fps,
            "tokens_per_step": store.tokens_per_step,
            "kept_per_step": list(store.kept_per_step),
            "temporal_patch_size": self.geometry.temporal_patch_size,
            "time": store.timestamps[-1] if store.timestamps else None,
            "dtd": dataclasses.asdict(dtd),  # enabled, threshold, metric, reference, criterion, drop_ratio
            "prefill": self.settings.prefill,
            # eager: frames that arrived are not all in the KV cache yet (a prefill runs or is about to)
            "prefill_pending": self.settings.prefill == "eager"
            and not self.eager_stopped
            and (self.prefill_task is not None or conv.uncut_kept() > 0),
            "eager_stopped": self.eager_stopped,
            "event_level": self.settings.event_level,
            "standing_question": self.settings.standing_question,
            "instructions": self.settings.instructions,
            "memory": self.settings.memory.as_dict(),
            "context_tokens": conv.context_tokens,
            "reanchors": conv.reanchors,
            "held_frames": store.held_frames,
            "evicted_frames": store.evicted_frames,
            "chunk_ranges": [list(c) for c in conv.chunks],
            "keyframes": conv.keyframes(),
        }


class StreamManager:
    """Open streams, their limits and idle expiry. Thread-safe.

    ``owner`` is the index of this API-server process: it is part of every stream id, so that a
    request reaching another process can be forwarded to the one holding the stream."""

    def __init__(self, limits: Limits = Limits(), geometry: Geometry = Geometry(), owner: int = 0):
        self.limits = limits
        self.geometry = geometry
        self.owner = owner
        self.bytes = ByteAccount(limits.max_total_bytes)
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()

    def sweep(self) -> list[str]:
        """Free the streams idle for longer than ``limits.idle_seconds`` (called on a timer and on
        every stream request)."""
        now = time.monotonic()
        with self._lock:
            dead = [sid for sid, s in self._streams.items() if now - s.last_active > self.limits.idle_seconds]
            gone = [self._streams.pop(sid) for sid in dead]
        for s in gone:
            s.release()
        return dead

    def open(self, settings: StreamSettings, encoder=None) -> Stream:
        self.sweep()
        with self._lock:
            if len(self._streams) >= self.limits.max_streams:
                raise TooManyStreams(f"too many open streams (at most {self.limits.max_streams})")
            sid = stream_id(self.owner)
            stream = Stream(sid, settings, self.geometry, self.limits, self.bytes, encoder=encoder)
            self._streams[sid] = stream
            return stream

    def get(self, stream_id: str) -> Stream:
        self.sweep()
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFound("no such stream (unknown id, closed, or expired after being idle)")
        stream.touch()
        return stream

    def close(self, stream_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(stream_id, None)
        if stream is None:
            raise StreamNotFound("no such stream")
        stream.release()

    def __len__(self) -> int:
        return len(self._streams)
