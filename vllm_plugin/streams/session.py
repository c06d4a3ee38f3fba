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
A stream's conversation has a budget (:class:`vllm_plugin.streams.memory.MemoryPolicy`, declared at
open). Before a request would take it past the budget, the stream re-anchors
(:meth:`Stream.reanchor`): its video items become the policy's selection (keyframes, the latest
chunks), and the frames, masks and kept encoder outputs nothing selected needs are freed. Memory
then follows the policy, not the stream's age; the limits on what a client sends are per append
(frames, bytes) and per second (appends), and on what a stream holds (frames, bytes).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch

from vllm_plugin.core import DTDConfig, dtd_keep_mask, frame_tokens, next_reference
from vllm_plugin.entrypoints.options import GIVEN_EMBEDS, GIVEN_MASK, GIVEN_TIMES
from vllm_plugin.media import resize_frame
from vllm_plugin.streams.memory import Anchor, MemoryPolicy, select_anchor

logger = logging.getLogger("vllm.dtd_plugin")
ENV_PREFIX = "DTD_STREAM_"  # limits from the environment: DTD_STREAM_<FIELD>
OLD_ENV_PREFIX = "VLLM_DTD_STREAM_"  # release 0.1; still read, with a warning (vLLM warns about unknown VLLM_* names)

_ID = re.compile(r"strm-(0|[1-9][0-9]{0,3})-[A-Za-z0-9_-]+\Z")


def stream_id(owner: int) -> str:
    """``strm-<owner process index>-<192 random bits>``."""
    return f"strm-{owner}-{secrets.token_urlsafe(24)}"


def stream_owner(sid: str) -> Optional[int]:
    """The API-server process index a stream id names (None if it is not a stream id)."""
    m = _ID.match(sid)
    return int(m.group(1)) if m else None


class StreamError(Exception):
    """An HTTP-mappable error: ``status`` is the 4xx code."""

    status = 400

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        if status is not None:
            self.status = status


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

    @classmethod
    def from_env(cls, env) -> "Limits":
        """``DTD_STREAM_<FIELD>`` for every field (``VLLM_DTD_STREAM_<FIELD>``, the 0.1 name, is read
        too, with a deprecation warning: vLLM 0.32 warns about every unknown ``VLLM_*`` variable and
        refuses them under ``--fail-on-environ-validation``)."""

        def get(name, default, typ):
            raw = env.get(ENV_PREFIX + name.upper())
            old = env.get(OLD_ENV_PREFIX + name.upper())
            if raw in (None, "") and old not in (None, ""):
                logger.warning("%s%s is deprecated: use %s%s", OLD_ENV_PREFIX, name.upper(), ENV_PREFIX, name.upper())
                raw = old
            return typ(raw) if raw not in (None, "") else default

        return cls(**{f: get(f, getattr(cls, f), type(getattr(cls, f))) for f in cls.__dataclass_fields__})

    def per_process(self, count: int) -> "Limits":
        """The share of one of ``count`` API-server processes: streams live in the process that
        opened them, so the server-wide caps (streams, bytes held) are split evenly."""
        if count <= 1:
            return self
        return replace(self, max_streams=max(1, self.max_streams // count),
                       max_total_bytes=max(1, self.max_total_bytes // count),
                       max_pending_encode_steps=max(1, self.max_pending_encode_steps // count))


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
    sizer: Optional[Callable[[int, int], tuple[int, int]]] = field(default=None, compare=False, repr=False)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_video_processor(cls, vp, overrides: Optional[dict] = None, sizer=None) -> "Geometry":
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
            patch_size=int(vp.patch_size), merge_size=int(vp.merge_size), sizer=sizer,
            min_pixels=int(size.get("shortest_edge", getattr(vp, "min_pixels", cls.min_pixels))),
            max_pixels=int(size.get("longest_edge", getattr(vp, "max_pixels", cls.max_pixels))),
            temporal_patch_size=int(vp.temporal_patch_size),
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes a frame to: transformers' Qwen2-VL ``smart_resize``,
        the function its video processor calls."""
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        if height < 1 or width < 1:
            raise StreamError(f"frame size {width}x{height} is not usable")
        try:
            if self.sizer is not None:
                return self.sizer(height, width)
            return smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:
            raise StreamError(f"frame size {width}x{height} is not usable: {e}") from None


PREFILL_MODES = ("eager", "lazy")


@dataclass
class StreamSettings:
    """``prefill``: ``"eager"`` — complete temporal steps enter the KV cache as they arrive (a
    prompt-only request continuing the conversation), so a question prefills only its own text;
    ``"lazy"`` — the steps since the last question are prefilled with the next question."""

    fps: float = 2.0
    dtd: DTDConfig = field(default_factory=DTDConfig)
    event_level: float = 0.5  # kept fraction of a step that signals a scene change
    standing_question: Optional[str] = None
    answer_max_tokens: int = 64
    prefill: str = "eager"
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    # eager: a stretch of steps where DTD kept nothing becomes a chunk once it is this long, so its
    # frames are freed by later re-anchors instead of waiting, held, for the next change
    max_static_steps: int = 8

    def __post_init__(self):
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 60):
            raise StreamError(f"fps must be in (0, 60], got {self.fps!r}")
        if self.prefill not in PREFILL_MODES:
            raise StreamError(f"prefill must be one of {list(PREFILL_MODES)}, got {self.prefill!r}")
        if not (isinstance(self.event_level, (int, float)) and 0 < self.event_level <= 1):
            raise StreamError(f"event_level must be in (0, 1], got {self.event_level!r}")
        if self.dtd.reference != "previous":
            raise StreamError("dtd_reference: streams support 'previous' (the carried reference is the last frame)")


class Stream:
    """``encoder`` (feature criterion): an :class:`vllm_plugin.streams.encoding.EncodeQueue`; each
    temporal step is encoded once, when its frames arrive, and its kept outputs are what the engine
    receives at question time."""

    def __init__(self, stream_id: str, settings: StreamSettings, geometry: Geometry, limits: Limits,
                 bytes_account: Optional["ByteAccount"] = None, encoder=None):
        self.id = stream_id
        self.settings = settings
        self.geometry = geometry
        self.limits = limits
        self.created = self.last_active = time.monotonic()
        self.size: Optional[tuple[int, int]] = None  # (height, width) after resizing
        self.frames: list[np.ndarray] = []
        self.timestamps: list[float] = []
        self.nbytes = 0
        # causal DTD for the signal / events
        self._ref_tokens: Optional[torch.Tensor] = None
        self.step_masks: list[torch.Tensor] = []  # bool (H, W) per temporal step: decided once, served as is
        # feature criterion: per temporal step its kept encoder outputs (kept, hidden) and its first
        # row (hidden,) (a chunk with no kept token serves that one)
        self.encoder = encoder
        self.feature = settings.dtd.enabled and settings.dtd.criterion == "feature"
        if self.feature and encoder is None:
            raise StreamError("dtd_criterion: 'feature' needs the server's vision tower, which is not available here")
        self.step_embeds: list[torch.Tensor] = []
        self.step_first: list[torch.Tensor] = []
        self._submitted = False  # this append's steps went to the encoder (it releases their reservation)
        self.eager_stopped: Optional[str] = None  # why eager prefill stopped for this stream (then lazy)
        self.kept_per_step: list[int] = []
        self.tokens_per_step = 0
        self.events: list[dict] = []
        self._event_count = 0
        self._events_lock = threading.Lock()  # events and keyframe candidates: appends and the event loop both add
        self._above = False
        self.keyframe_steps: list[int] = []  # the first step and scene changes whose frames are still held
        # conversation
        self.chunks: list[tuple[int, int]] = []  # frame ranges [start, end) of the video items, in prompt order
        self.next_frame = 0  # the first frame not in a chunk yet
        self._items: dict[tuple[int, int], tuple[np.ndarray, dict]] = {}  # built items, by frame range
        self.key_ranges: set[tuple[int, int]] = set()  # chunks that are keyframes kept by a re-anchor
        self.reanchors = 0
        self.evicted_frames = 0
        self.context_tokens = 0  # prompt + answer tokens of the conversation, as the engine last counted them
        self.step_overhead = 0.0  # prompt tokens per temporal step besides its kept ones (time text), measured
        self._appends: deque = deque()
        self._appends_lock = threading.Lock()
        self._bytes_lock = threading.Lock()
        self.conversation = None  # a vllm_plugin.streams.prompt.ChatPrompt, set by the service
        self.questions = 0
        self.frames_lock = threading.Lock()  # appends (held while their steps are analysed, or encoded)
        # chunk cuts and items: held briefly, never while encoding, so the event loop may take it; a
        # chunk holds analysed steps only (their masks exist), whatever an append is doing
        self.chunks_lock = threading.Lock()
        self._size_lock = threading.Lock()
        self._bytes = bytes_account
        self.chat_lock = asyncio.Lock()  # one question (or eager prefill) at a time per stream
        self.prefill_task = None  # the running eager prefill (an asyncio.Task), if any
        self.prefills = 0  # eager prefills done
        self.closed = False

    # -- frames ---------------------------------------------------------------------------------
    def touch(self) -> None:
        self.last_active = time.monotonic()

    @property
    def steps(self) -> int:
        return len(self.frames) // self.geometry.temporal_patch_size

    @property
    def held_frames(self) -> int:
        return len(self.frames) - self.evicted_frames

    def _add_bytes(self, n: int) -> None:
        with self._bytes_lock:
            self.nbytes += n

    def admit_append(self) -> None:
        """The per-stream append rate (``max_appends_per_second``, over the last second): 429 beyond."""
        now = time.monotonic()
        with self._appends_lock:
            while self._appends and now - self._appends[0] > 1.0:
                self._appends.popleft()
            if len(self._appends) >= self.limits.max_appends_per_second:
                raise StreamError(f"at most {self.limits.max_appends_per_second:g} appends per second per stream: "
                                  "send more frames per append", 429)
            self._appends.append(now)

    def fit(self, frame: np.ndarray) -> np.ndarray:
        """One frame resized to the stream's size (set by its first frame)."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise StreamError(f"a frame must be uint8 (H, W, 3) RGB, got {frame.dtype} {frame.shape}")
        if self.size is None:
            with self._size_lock:  # concurrent first appends agree on one size
                if self.size is None:
                    self.size = self.geometry.target_size(*frame.shape[:2])
        return resize_frame(frame, *self.size)

    def add_frames(self, frames: list[np.ndarray], timestamps: Optional[list[float]] = None) -> dict:
        """Append frames (any size; resized to the stream's), analyze the new complete steps.
        Returns ``{"events": events they raised, "kept_per_step": kept tokens of the temporal
        steps this append completed}``. Thread-safe."""
        if not frames:
            raise StreamError("no frames given")
        if len(frames) > self.limits.max_frames_per_append:
            raise StreamError(f"at most {self.limits.max_frames_per_append} frames per append", 413)
        with self.frames_lock:
            if len(frames) > self.limits.max_frames // 2:
                raise StreamError(f"at most {self.limits.max_frames // 2} frames per append (half of the {self.limits.max_frames} "
                                  "frames a stream may hold)", 413)
            if self.held_frames + len(frames) > self.limits.max_frames:
                if self.settings.prefill == "eager" and not self.eager_stopped:  # frees them as it catches up
                    raise StreamError(f"the stream holds {self.held_frames} frames and may hold {self.limits.max_frames}: "
                                      "they wait for its eager prefill; retry in a moment", 429)
                raise StreamError(f"stream is full: it holds {self.held_frames} frames and may hold {self.limits.max_frames} "
                                  "(frames are freed once a question has taken them and the conversation re-anchors)", 409)
            resized = [self.fit(f) for f in frames]
            add_bytes = sum(f.nbytes for f in resized)
            if self.nbytes + add_bytes > self.limits.max_bytes:
                raise StreamError(f"stream is full: at most {self.limits.max_bytes} bytes of frames", 409)
            last = self.timestamps[-1] if self.timestamps else -1.0 / self.settings.fps
            if timestamps is None:
                timestamps = [last + (i + 1) / self.settings.fps for i in range(len(resized))]
            if len(timestamps) != len(resized) or any(not math.isfinite(t) for t in timestamps):
                raise StreamError("timestamps must be finite numbers, one per frame")
            if any(b <= a for a, b in zip([last, *timestamps], timestamps)):
                raise StreamError("timestamps must increase")
            new_steps = (len(self.frames) + len(resized)) // self.geometry.temporal_patch_size - self.steps
            if self.feature and new_steps:
                self.encoder.reserve(new_steps)  # 429 when the tower is behind; raises before anything is added
            try:
                if self._bytes is not None:
                    self._bytes.reserve(add_bytes)  # the server-wide cap; raises before anything is added
            except StreamError:
                if self.feature and new_steps:
                    self.encoder.release(new_steps)
                raise
            self.frames.extend(resized)
            self.timestamps.extend(float(t) for t in timestamps)
            self._add_bytes(add_bytes)
            self.touch()
            done = len(self.kept_per_step)
            self._submitted = False
            try:
                events = self._analyze(reserved=new_steps if self.feature else 0)
            except Exception as e:  # nothing of this append is kept: the stream stays as it was
                if self.feature and new_steps and not self._submitted:
                    self.encoder.release(new_steps)  # the queue releases what it was given
                del self.frames[-len(resized):], self.timestamps[-len(resized):]
                self._add_bytes(-add_bytes)
                if self._bytes is not None:
                    self._bytes.release(add_bytes)
                if isinstance(e, StreamError):
                    raise
                logger.warning("DTD stream %s: analysing new frames failed: %s", self.id, e)
                raise StreamError(f"the new frames could not be analysed ({e}); nothing was added, retry", 503) from e
            return {"events": events, "kept_per_step": self.kept_per_step[done:]}

    def release(self) -> None:
        """Give the stream's frame bytes back to the server-wide account (closed or expired)."""
        self.closed = True
        with self.frames_lock, self._bytes_lock:
            if self._bytes is not None:
                self._bytes.release(self.nbytes)
                self._bytes = None

    def _step_tokens(self, frames: np.ndarray, steps: int, reserved: int) -> torch.Tensor:
        """Tokens (steps, H, W, C) of complete temporal steps: encoder outputs (feature criterion, one
        tower call shared with other streams' steps) or pixels."""
        g = self.geometry
        H, W = frames.shape[1] // g.factor, frames.shape[2] // g.factor
        if self.feature:
            if reserved != steps:
                raise RuntimeError(f"{steps} new temporal steps, {reserved} reserved with the encoder")
            future = self.encoder.submit(frames, steps)
            self._submitted = True
            return future.result().view(steps, H, W, -1)
        return frame_tokens(torch.from_numpy(frames), merge_size=g.merge_size, patch_size=g.patch_size,
                            temporal_patch_size=g.temporal_patch_size)

    def _analyze(self, reserved: int = 0) -> list[dict]:
        tps = self.geometry.temporal_patch_size
        done = len(self.kept_per_step)
        if self.steps <= done:
            return []
        tokens = self._step_tokens(np.stack(self.frames[done * tps : self.steps * tps]), self.steps - done, reserved)
        cfg = self.settings.dtd
        ref = self._ref_tokens
        d = getattr(self.encoder, "decision_dim", None) if self.feature else None
        decide = tokens if d is None else tokens[..., :d]  # Qwen3-VL: the main output, not the DeepStack levels
        if cfg.enabled:
            mask = dtd_keep_mask(decide, cfg.threshold, cfg.metric, cfg.reference, initial_reference=self._ref_tokens)
            ref = next_reference(decide, mask, cfg.reference, self._ref_tokens)
        else:  # DTD off: every token is served, so every token is counted
            mask = torch.ones(tokens.shape[:3], dtype=torch.bool)
        if self.feature:
            embeds = [tokens[t][mask[t]].clone() for t in range(tokens.shape[0])]
            firsts = [tokens[t, 0, 0].clone() for t in range(tokens.shape[0])]
            # kept encoder outputs are held like frames: against the stream's and the server's byte caps
            extra = sum(e.numel() * e.element_size() for e in embeds + firsts)
            if self.nbytes + extra > self.limits.max_bytes:
                raise StreamError(f"stream is full: at most {self.limits.max_bytes} bytes of frames and kept encoder outputs", 409)
            if self._bytes is not None:
                self._bytes.reserve(extra)
            self._add_bytes(extra)
            self.step_embeds += embeds
            self.step_first += firsts
        self._ref_tokens = ref
        self.tokens_per_step = int(mask[0].numel())
        self.step_masks.extend(mask.unbind(0))
        new_events = []
        for i, kept in enumerate(mask.reshape(mask.shape[0], -1).sum(1).tolist()):
            step = done + i
            self.kept_per_step.append(int(kept))
            if step == 0:
                with self._events_lock:
                    self.keyframe_steps.append(0)
            frac = kept / self.tokens_per_step
            if cfg.enabled and step >= 1 and frac >= self.settings.event_level and not self._above:
                new_events.append({
                    "type": "scene_change", "step": step, "frame": step * tps,
                    "time": self.timestamps[step * tps], "kept_fraction": frac,
                })
                with self._events_lock:
                    self.keyframe_steps.append(step)
            self._above = frac >= self.settings.event_level if step >= 1 else False
        return [self.add_event(e) for e in new_events]

    def add_event(self, event: dict) -> dict:
        with self._events_lock:
            event = {"index": self._event_count, **event}
            self._event_count += 1
            self.events.append(event)
            if len(self.events) > self.limits.max_events:
                del self.events[: len(self.events) - self.limits.max_events]
            return event

    # -- questions ---------------------------------------------------------------------------------
    def chunk_frames(self) -> int:
        """Frames one video item may hold: ``max_chunk_frames`` and ``max_chunk_bytes``, whole temporal steps, at least one."""
        tps = self.geometry.temporal_patch_size
        frame_bytes = max(1, self.size[0] * self.size[1] * 3) if self.size else 1
        frames = min(self.limits.max_chunk_frames, self.limits.max_chunk_bytes // frame_bytes)
        return max(tps, frames // tps * tps)

    def cut_chunk(self) -> Optional[tuple[int, int]]:
        """Make the oldest analysed temporal steps not yet in a chunk the next video item, at most
        :meth:`chunk_frames` of them (None if there are none): a backlog becomes several items, each
        bounded in frames and bytes (see :meth:`backlog`)."""
        with self.chunks_lock:
            start = self.next_frame
            end = min(len(self.kept_per_step) * self.geometry.temporal_patch_size, start + self.chunk_frames())
            if end <= start:
                return None
            if len(self.chunks) >= self.limits.max_chunks:
                raise StreamError(f"stream has {len(self.chunks)} video chunks, the most one prompt may hold", 409)
            self.chunks.append((start, end))
            self.next_frame = end
            return start, end

    def backlog(self) -> bool:
        """More analysed frames wait than one chunk may hold."""
        return len(self.kept_per_step) * self.geometry.temporal_patch_size - self.next_frame > self.chunk_frames()

    def uncut_steps(self) -> range:
        """The analysed temporal steps not in a chunk yet."""
        return range(self.next_frame // self.geometry.temporal_patch_size, len(self.kept_per_step))

    def uncut_kept(self) -> int:
        """Kept tokens of the complete temporal steps not yet in a chunk (0 when none, or when DTD
        dropped all of theirs: an eager prefill then waits, so static stretches add no chunk)."""
        return sum(self.kept_per_step[self.next_frame // self.geometry.temporal_patch_size:])

    def eager_due(self) -> bool:
        """An eager prefill has something to do: new kept tokens, or a static stretch of
        ``max_static_steps`` steps (cut so that its frames can be freed)."""
        return (bool(self.uncut_kept()) or len(self.uncut_steps()) >= self.settings.max_static_steps
                or (self.memory_full() and len(self.uncut_steps()) > 0))

    def memory_full(self) -> bool:
        """The stream holds half of ``max_frames`` or nears ``max_chunks``: re-anchor now (an append
        holds at most half of ``max_frames``, so one that arrives before then fits)."""
        return self.held_frames >= self.limits.max_frames // 2 or len(self.chunks) + 1 >= self.limits.max_chunks

    def chunk_tokens(self, a: int, b: int) -> int:
        """Video tokens the item of frames ``[a, b)`` holds (a chunk that keeps none serves one)."""
        tps = self.geometry.temporal_patch_size
        return max(1, sum(self.kept_per_step[a // tps:b // tps]))

    def _build_item(self, a: int, b: int) -> tuple[np.ndarray, dict]:
        tps = self.geometry.temporal_patch_size
        frames = np.stack(self.frames[a:b])
        # the stream keeps one copy of its pixels: its frames become views of the item
        self.frames[a:b] = list(frames)
        # the item as a video of its own, every frame sampled: the processor's sampled fps
        # (len(frames_indices) / total_num_frames × fps) is then the stream's, and Qwen2.5-VL's
        # second_per_grid_ts = temporal_patch_size / fps, whatever the chunk's place in the stream.
        # (Stream-wide indices made it grow with the chunk's start: temporal M-RoPE indices of hours,
        # past the rotary table, killed the engine.) Step times: GIVEN_TIMES below.
        meta = {
            "fps": float(self.settings.fps), "total_num_frames": b - a, "frames_indices": list(range(b - a)),
            "duration": (b - a) / self.settings.fps, "video_backend": "dtd_stream",
        }
        mask = torch.stack(self.step_masks[a // tps : b // tps])
        if self.feature:
            rows = self.step_embeds[a // tps : b // tps]
            embeds = torch.cat(rows)
            # one copy: the steps' rows become views of the item's
            self.step_embeds[a // tps : b // tps] = list(embeds.split([len(e) for e in rows]))
            if not mask.any():  # nothing kept in the whole chunk: serve its first token
                mask = mask.clone()
                mask.view(-1)[0] = True
                embeds = self.step_first[a // tps][None]
            meta[GIVEN_EMBEDS] = embeds
        meta[GIVEN_MASK] = mask.numpy()
        # each step's time as the client stamped its frames (the mean of the step's frames,
        # Qwen3-VL's rule): pauses and other rates than the stream's stay in the prompt
        stamps = self.timestamps[a:b]
        meta[GIVEN_TIMES] = [float(np.mean(stamps[i:i + tps])) for i in range(0, len(stamps), tps)]
        return frames, meta

    def video_items(self) -> list[tuple[np.ndarray, dict]]:
        """All chunks as (frames, metadata) video items, byte-identical from question to question
        (built once per frame range: a range's content never changes). The metadata carries the
        chunk's keep mask, bool (T, H, W): the masks its steps got when they arrived."""
        with self.chunks_lock:
            for r in self.chunks:
                if r not in self._items:
                    self._items[r] = self._build_item(*r)
            return [self._items[r] for r in self.chunks]

    def item_uuids(self) -> list[str]:
        """Cache identities of the chunks (vLLM's ``multi_modal_uuids``): the content of a frame range
        of a stream never changes (its masks were decided on arrival, its DTD settings are fixed), so
        (stream, range) names it, before and after re-anchors; vLLM then need not hash past frames."""
        return [f"{self.id}/frames{a}-{b}" for a, b in self.chunks]

    def drop_last_chunk(self) -> None:
        with self.chunks_lock:
            a, b = self.chunks.pop()
            self.next_frame = a
            if (a, b) not in self.chunks:
                self._items.pop((a, b), None)

    def reanchor(self, target: int, item_overhead: int = 2, step_overhead: float = 0.0) -> Anchor:
        """Replace the conversation's video items by the memory policy's selection
        (:func:`vllm_plugin.streams.memory.select_anchor`, at most ``target`` tokens), build the
        items of the keyframes it keeps (their frames copied out of the chunks that go), and free
        every frame, mask and kept encoder output before :attr:`next_frame` that no selected item
        holds. The caller rebuilds the conversation's text (:meth:`ChatPrompt.restart`)."""
        tps = self.geometry.temporal_patch_size
        with self.chunks_lock:
            plain = [c for c in self.chunks if c not in self.key_ranges]
            share = self.settings.memory.anchor_fraction
            anchor = select_anchor(plain, self.kept_per_step, self.keyframe_steps, tps, self.settings.memory,
                                   target, item_overhead, step_overhead,
                                   # a quarter of the frame limit: a re-anchor leaves room before the next
                                   max_frames=self.limits.max_frames // 4 - (len(self.frames) - self.next_frame),
                                   max_items=int(share * self.limits.max_chunks))
            self.chunks = list(anchor.ranges)
            self.key_ranges = {(s * tps, (s + 1) * tps) for s in anchor.keyframes}
            for r in self.chunks:
                if r not in self._items:
                    self._items[r] = self._build_item(*r)
            self._items = {r: self._items[r] for r in self.chunks}
            held = np.zeros(self.next_frame, dtype=bool)
            for a, b in self.chunks:
                held[a:b] = True
            self._free(np.flatnonzero(~held).tolist())
            self.reanchors += 1
            return anchor

    def _free(self, frames: list[int]) -> None:
        """Free these frames (cut, in no selected item) and the per-step data of steps left with no
        frame: pixels, keep masks, kept encoder outputs; the byte accounts follow. Under chunks_lock."""
        tps = self.geometry.temporal_patch_size
        freed = 0
        for i in frames:
            f = self.frames[i]
            if f is not None:
                freed += f.nbytes
                self.frames[i] = None
                self.evicted_frames += 1
        for s in sorted({i // tps for i in frames}):
            if self.step_masks[s] is not None and all(f is None for f in self.frames[s * tps:(s + 1) * tps]):
                self.step_masks[s] = None
                if self.feature:
                    freed += self.step_embeds[s].numel() * self.step_embeds[s].element_size()
                    freed += self.step_first[s].numel() * self.step_first[s].element_size()
                    self.step_embeds[s] = self.step_first[s] = None
        held = {s for a, b in self.chunks for s in range(a // tps, b // tps)}
        with self._events_lock:
            self.keyframe_steps = [s for s in self.keyframe_steps if s * tps >= self.next_frame or s in held]
        with self._bytes_lock:  # with release(): a close meanwhile releases exactly what is left
            self.nbytes -= freed
            if self._bytes is not None:
                self._bytes.release(freed)

    def drop_uncut(self, max_tokens: int, keep_steps: Optional[int] = None) -> int:
        """Bound the next chunk: free the oldest steps not in a chunk yet while their kept tokens are
        more than ``max_tokens`` (the latest step always stays), or (``keep_steps``) all but the latest
        ``keep_steps``; returns the frames dropped. A lazy stream asked nothing for longer than its
        budget holds keeps the latest frames, as the policy does."""
        tps = self.geometry.temporal_patch_size
        with self.chunks_lock:
            steps = self.uncut_steps()
            total, s = sum(self.kept_per_step[steps.start:steps.stop]), steps.start
            if keep_steps is not None:
                s = max(steps.start, steps.stop - max(1, keep_steps))
            while keep_steps is None and total > max_tokens and s < steps.stop - 1:
                total -= self.kept_per_step[s]
                s += 1
            if s == steps.start:
                return 0
            a, b = self.next_frame, s * tps
            self.next_frame = b
            self._free(list(range(a, b)))
            return b - a

    def status(self) -> dict:
        return {
            "id": self.id, "frames": len(self.frames), "steps": self.steps, "chunks": len(self.chunks),
            "questions": self.questions, "prefills": self.prefills, "events": self._event_count, "bytes": self.nbytes,
            "size": list(self.size) if self.size else None, "fps": self.settings.fps,
            "tokens_per_step": self.tokens_per_step, "kept_per_step": list(self.kept_per_step),
            "temporal_patch_size": self.geometry.temporal_patch_size,
            "time": self.timestamps[-1] if self.timestamps else None,
            "dtd": {"enabled": self.settings.dtd.enabled, "threshold": self.settings.dtd.threshold,
                    "metric": self.settings.dtd.metric, "reference": self.settings.dtd.reference,
                    "criterion": self.settings.dtd.criterion},
            "prefill": self.settings.prefill,
            # eager: frames that arrived are not all in the KV cache yet (a prefill runs or is about to)
            "prefill_pending": self.settings.prefill == "eager" and not self.eager_stopped
                               and (self.prefill_task is not None or self.uncut_kept() > 0),
            "eager_stopped": self.eager_stopped,
            "event_level": self.settings.event_level, "standing_question": self.settings.standing_question,
            "memory": self.settings.memory.as_dict(), "context_tokens": self.context_tokens,
            "reanchors": self.reanchors, "held_frames": self.held_frames, "evicted_frames": self.evicted_frames,
            "chunk_ranges": [list(c) for c in self.chunks],
            "keyframes": sorted(a // self.geometry.temporal_patch_size for a, _ in self.key_ranges),
        }


class ByteAccount:
    """Decoded frame bytes held by all streams of one process, against ``limits.max_total_bytes``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        with self._lock:
            if self.held + n > self.limit:
                raise StreamError(f"the server holds {self.held} bytes of stream frames and allows at most "
                                  f"{self.limit}: retry when streams have closed", 429)
            self.held += n

    def release(self, n: int) -> None:
        with self._lock:
            self.held = max(0, self.held - n)


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
                raise StreamError(f"too many open streams (at most {self.limits.max_streams})", 429)
            sid = stream_id(self.owner)
            stream = Stream(sid, settings, self.geometry, self.limits, self.bytes, encoder=encoder)
            self._streams[sid] = stream
            return stream

    def get(self, stream_id: str) -> Stream:
        self.sweep()
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamError("no such stream (unknown id, closed, or expired after being idle)", 404)
        stream.touch()
        return stream

    def close(self, stream_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(stream_id, None)
        if stream is None:
            raise StreamError("no such stream", 404)
        stream.release()

    def __len__(self) -> int:
        return len(self._streams)
