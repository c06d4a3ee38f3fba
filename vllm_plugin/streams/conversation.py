"""A stream's conversation: its video items ("chunks", frame ranges of the stream) cut from the
decided steps and built once each, re-anchored by the memory policy, and its text
(:class:`vllm_plugin.streams.prompt.ChatPrompt`, set by the service). No vLLM import.

At every question (or eager prefill) the complete temporal steps not yet in a chunk become ONE new
video item. Past chunks are byte-identical items in byte-identical places, so vLLM's prefix cache
serves everything before the new one. Before a request would take the conversation past its budget,
:meth:`Conversation.reanchor` replaces the items by the policy's selection and frees the rest.
"""

from __future__ import annotations

import threading
from typing import Any, cast

import numpy as np
import torch

from vllm_plugin.entrypoints.options import GIVEN_EMBEDS, GIVEN_MASK, GIVEN_TIMES
from vllm_plugin.errors import StreamFull
from vllm_plugin.streams.memory import Anchor, Budget, MemorySettings, item_cost
from vllm_plugin.streams.store import FrameStore


class Conversation:
    """Args:
        stream_id: the stream's id (part of each item's cache identity).
        store: the stream's frames and per-step data.
        fps: the stream's frame rate (each item is a video of its own at that rate).
        memory: the stream's memory settings; the conversation works on its own copy of the policy.
        limits: the stream limits (:class:`vllm_plugin.streams.session.Limits`).

    ``lock`` guards the chunk cuts and items: held briefly, never while encoding, so the event loop
    may take it; a chunk holds decided steps only (their masks exist), whatever an append is doing."""

    def __init__(self, stream_id: str, store: FrameStore, fps: float, memory: MemorySettings, limits):
        self.stream_id = stream_id
        self.store = store
        self.fps = fps
        self.memory = memory
        self.policy = memory.policy.fresh()
        self.limits = limits
        self.tps = store.temporal_patch_size
        self.chunks: list[tuple[int, int]] = []  # frame ranges [start, end) of the video items, in prompt order
        self.next_frame = 0  # the first frame not in a chunk yet
        self.key_ranges: set[tuple[int, int]] = set()  # one-step items the policy added (keyframes)
        self.reanchors = 0
        self.prompt: Any = None  # the conversation's text: a ChatPrompt, set by the service (restart)
        self.context_tokens = 0  # prompt + answer tokens of the conversation, as the engine last counted them
        self.step_overhead = 0.0  # prompt tokens per temporal step besides its kept ones (time text), measured
        self.questions = 0
        self.prefills = 0  # eager prefills done
        self._items: dict[tuple[int, int], tuple[np.ndarray, dict]] = {}  # built items, by frame range
        self.lock = threading.Lock()

    # -- steps as they are decided ---------------------------------------------------------------------
    def observe(self, step: int, kept: int, scene_change: bool) -> None:
        """A new temporal step was decided (before a chunk may take it): the policy sees it."""
        with self.lock:
            self.policy.observe(step, kept, scene_change)

    # -- cutting chunks --------------------------------------------------------------------------------
    def chunk_frames(self) -> int:
        """Frames one video item may hold: ``max_chunk_frames`` and ``max_chunk_bytes``, whole temporal
        steps, at least one."""
        size = self.store.size
        frame_bytes = max(1, size[0] * size[1] * 3) if size else 1
        frames = min(self.limits.max_chunk_frames, self.limits.max_chunk_bytes // frame_bytes)
        return max(self.tps, frames // self.tps * self.tps)

    def cut_chunk(self, steps: int | None = None) -> tuple[int, int] | None:
        """Make the oldest decided temporal steps not yet in a chunk the next video item, at most
        :meth:`chunk_frames` of them (None if there are none): a backlog becomes several items, each
        bounded in frames and bytes (see :meth:`backlog`). ``steps``: of the first ``steps`` decided
        steps only (those a caller measured before; an append may decide more meanwhile)."""
        with self.lock:
            start = self.next_frame
            decided = len(self.store.kept_per_step) if steps is None else min(steps, len(self.store.kept_per_step))
            end = min(decided * self.tps, start + self.chunk_frames())
            if end <= start:
                return None
            if len(self.chunks) >= self.limits.max_chunks:
                raise StreamFull(f"stream has {len(self.chunks)} video chunks, the most one prompt may hold")
            self.chunks.append((start, end))
            self.next_frame = end
            return start, end

    def backlog(self, steps: int | None = None) -> bool:
        """More decided frames wait (of the first ``steps`` decided steps) than one chunk may hold."""
        decided = len(self.store.kept_per_step) if steps is None else min(steps, len(self.store.kept_per_step))
        return decided * self.tps - self.next_frame > self.chunk_frames()

    def uncut_steps(self) -> range:
        """The decided temporal steps not in a chunk yet."""
        return range(self.next_frame // self.tps, len(self.store.kept_per_step))

    def uncut_kept(self) -> int:
        """Kept tokens of the complete temporal steps not yet in a chunk (0 when none, or when DTD
        dropped all of theirs: an eager prefill then waits, so static stretches add no chunk)."""
        return sum(self.store.kept_per_step[self.next_frame // self.tps :])

    def chunk_tokens(self, a: int, b: int) -> int:
        """Video tokens the item of frames ``[a, b)`` holds (a chunk that keeps none serves one)."""
        return max(1, sum(self.store.kept_per_step[a // self.tps : b // self.tps]))

    def full(self) -> bool:
        """The stream holds half of ``max_frames`` or nears ``max_chunks``: re-anchor now (an append
        holds at most half of ``max_frames``, so one that arrives before then fits)."""
        return self.store.held_frames >= self.limits.max_frames // 2 or len(self.chunks) + 1 >= self.limits.max_chunks

    def drop_last_chunk(self) -> None:
        """The request that cut the latest chunk did not happen: its steps go with the next one."""
        with self.lock:
            a, b = self.chunks.pop()
            self.next_frame = a
            if (a, b) not in self.chunks:
                self._items.pop((a, b), None)

    # -- items -----------------------------------------------------------------------------------------
    def _build_item(self, a: int, b: int) -> tuple[np.ndarray, dict]:
        tps, store = self.tps, self.store
        frames = np.stack(cast(list[np.ndarray], store.frames[a:b]))  # held: in a chunk
        # the stream keeps one copy of its pixels: its frames become views of the item
        store.frames[a:b] = list(frames)
        # the item as a video of its own, every frame sampled: the processor's sampled fps
        # (len(frames_indices) / total_num_frames × fps) is then the stream's, and Qwen2.5-VL's
        # second_per_grid_ts = temporal_patch_size / fps, whatever the chunk's place in the stream.
        # (Stream-wide indices made it grow with the chunk's start: temporal M-RoPE indices of hours,
        # past the rotary table, killed the engine.) Step times: GIVEN_TIMES below.
        meta = {
            "fps": float(self.fps),
            "total_num_frames": b - a,
            "frames_indices": list(range(b - a)),
            "duration": (b - a) / self.fps,
            "video_backend": "dtd_stream",
        }
        mask = torch.stack(cast(list[torch.Tensor], store.step_masks[a // tps : b // tps]))
        if store.step_embeds:  # feature criterion: the kept encoder outputs go with the item
            rows = cast(list[torch.Tensor], store.step_embeds[a // tps : b // tps])
            embeds = torch.cat(rows)
            # one copy: the steps' rows become views of the item's
            store.step_embeds[a // tps : b // tps] = list(embeds.split([len(e) for e in rows]))
            if not mask.any():  # nothing kept in the whole chunk: serve its first token
                mask = mask.clone()
                mask.view(-1)[0] = True
                embeds = cast(torch.Tensor, store.step_first[a // tps])[None]
            meta[GIVEN_EMBEDS] = embeds
        meta[GIVEN_MASK] = mask.numpy()
        # each step's time as the client stamped its frames (the mean of the step's frames,
        # Qwen3-VL's rule): pauses and other rates than the stream's stay in the prompt
        stamps = store.timestamps[a:b]
        meta[GIVEN_TIMES] = [float(np.mean(stamps[i : i + tps])) for i in range(0, len(stamps), tps)]
        return frames, meta

    def video_items(self) -> list[tuple[np.ndarray, dict]]:
        """All chunks as (frames, metadata) video items, byte-identical from question to question
        (built once per frame range: a range's content never changes). The metadata carries the
        chunk's keep mask, bool (T, H, W): the masks its steps got when they arrived."""
        with self.lock:
            for r in self.chunks:
                if r not in self._items:
                    self._items[r] = self._build_item(*r)
            return [self._items[r] for r in self.chunks]

    def item_uuids(self) -> list[str]:
        """Cache identities of the chunks (vLLM's ``multi_modal_uuids``): the content of a frame range
        of a stream never changes (its masks were decided on arrival, its DTD settings are fixed), so
        (stream, range) names it, before and after re-anchors; vLLM then need not hash past frames."""
        return [self._uuid(r) for r in self.chunks]

    def _uuid(self, r: tuple[int, int]) -> str:
        return f"{self.stream_id}/frames{r[0]}-{r[1]}"

    def keyframes(self) -> list[int]:
        """The temporal steps of the one-step items the policy added at the last re-anchor."""
        return sorted(a // self.tps for a, _ in self.key_ranges)

    # -- memory ----------------------------------------------------------------------------------------
    def reanchor(self, target: int, item_overhead: int = 2, step_overhead: float = 0.0) -> Anchor:
        """Re-anchor now: :meth:`plan` then :meth:`apply` (nothing carried). The caller rebuilds the
        conversation's text (:meth:`ChatPrompt.restart`)."""
        anchor = self.plan(target, item_overhead, step_overhead)
        self.apply(anchor, len(self.chunks))
        return anchor

    def plan(self, target: int, item_overhead: int = 2, step_overhead: float = 0.0) -> Anchor:
        """The memory policy's selection for a re-anchor (at most ``target`` tokens; a quarter of the
        frame limit, and ``anchor_fraction`` of the item limit: a re-anchor leaves room before the
        next), with the items it adds built (their frames copied out of the chunks that go). Nothing
        else changes: the conversation goes on as it is (its questions may still be answered on it)
        until :meth:`apply`."""
        tps, store = self.tps, self.store
        with self.lock:
            plain = [c for c in self.chunks if c not in self.key_ranges]
            budget = Budget(
                target,
                item_cost(store.kept_per_step, tps, item_overhead, step_overhead),
                tps,
                max_frames=self.limits.max_frames // 4 - (len(store.frames) - self.next_frame),
                max_items=int(self.memory.anchor_fraction * self.limits.max_chunks),
            )
            anchor = self.policy.select(plain, budget)
            if plain and plain[-1] not in anchor.ranges:
                raise RuntimeError(f"memory policy {self.policy.name!r} did not keep the latest chunk {plain[-1]}")
            if any(not (0 <= a < b <= self.next_frame) for a, b in anchor.ranges):
                raise RuntimeError(f"memory policy {self.policy.name!r} selected frames outside the conversation")
            for r in anchor.ranges:
                if r not in self._items:
                    self._items[r] = self._build_item(*r)
            return anchor

    def apply(self, anchor: Anchor, planned_chunks: int) -> list[tuple[int, int]]:
        """Make a :meth:`plan` the conversation: its items, then the chunks cut after the plan (the
        conversation had ``planned_chunks`` then: questions answered on it meanwhile cut the rest),
        which are returned; every frame, mask and kept encoder output before :attr:`next_frame` that
        no item holds is freed."""
        tps = self.tps
        with self.lock:
            carried = self.chunks[planned_chunks:]
            self.chunks = list(anchor.ranges) + carried
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
            return carried

    def items_of(self, ranges) -> tuple[list[tuple[np.ndarray, dict]], list[str]]:
        """The video items and cache identities of these chunk ranges (built: planned or in the
        conversation)."""
        with self.lock:
            return [self._items[r] for r in ranges], [self._uuid(r) for r in ranges]

    def _free(self, frames: list[int]) -> None:
        """Free these frames (cut, in no selected item) and what their steps hold; the policy forgets
        the steps left with no frame. Under :attr:`lock`."""
        self.policy.forget(self.store.free(frames))

    def _chunk_steps(self, start: int, stop: int, max_tokens: int | None, max_steps: int) -> int:
        """How many steps from ``start`` (before ``stop``) one chunk takes: at most ``max_steps``, and
        (``max_tokens``) at most that many kept tokens together; at least one when any waits."""
        kept = self.store.kept_per_step
        n, total = 0, 0
        while start + n < stop and n < max_steps:
            total += kept[start + n]
            if n and max_tokens is not None and total > max_tokens:
                break
            n += 1
        return n

    def steps_within(self, max_tokens: int) -> int:
        """How many of the oldest steps not in a chunk yet hold at most ``max_tokens`` kept tokens
        together (at least one when any waits): an eager stream's next chunk, when more wait."""
        steps = self.uncut_steps()
        return self._chunk_steps(steps.start, steps.stop, max_tokens, len(steps))

    def chunks_to_cut(self, max_tokens: int | None = None) -> int:
        """The chunks :meth:`cut_chunk` would make of the steps not in a chunk yet, each of at most
        :meth:`chunk_frames` frames and (``max_tokens``, an eager stream's bound) that many kept tokens
        (:meth:`steps_within`), as its callers cut them one after the other."""
        steps, per_chunk = self.uncut_steps(), self.chunk_frames() // self.tps
        s, chunks = steps.start, 0
        while s < steps.stop:
            s, chunks = s + self._chunk_steps(s, steps.stop, max_tokens, per_chunk), chunks + 1
        return chunks

    def drop_uncut(self, max_tokens: int, keep_steps: int | None = None) -> int:
        """Bound the next chunk: free the oldest steps not in a chunk yet while their kept tokens are
        more than ``max_tokens`` (the latest step always stays), or (``keep_steps``) all but the latest
        ``keep_steps``; returns the frames dropped. A lazy stream asked nothing for longer than its
        budget holds keeps the latest frames, as the policy does."""
        tps, kept = self.tps, self.store.kept_per_step
        with self.lock:
            steps = self.uncut_steps()
            total, s = sum(kept[steps.start : steps.stop]), steps.start
            if keep_steps is not None:
                s = max(steps.start, steps.stop - max(1, keep_steps))
            while keep_steps is None and total > max_tokens and s < steps.stop - 1:
                total -= kept[s]
                s += 1
            if s == steps.start:
                return 0
            a, b = self.next_frame, s * tps
            self.next_frame = b
            self._free(list(range(a, b)))
            return b - a

    # -- text and tokens -------------------------------------------------------------------------------
    def restart(self, prompt, context_tokens: int) -> None:
        """The conversation's text starts over (after :meth:`reanchor`): ``prompt`` is the new
        :class:`ChatPrompt`; ``context_tokens`` its estimated length until the engine counts it."""
        self.prompt = prompt
        self.context_tokens = context_tokens

    def counted(self, prompt_tokens: int, prompt_ids: int, answer: int = 0) -> None:
        """What the engine counted for a request of the conversation: ``prompt_tokens`` (placeholders
        expanded) for ``prompt_ids`` ids sent, and ``answer`` tokens that stay in it. Sets
        :attr:`context_tokens` and :attr:`step_overhead` (prompt tokens per temporal step besides the
        kept ones)."""
        if not prompt_tokens:
            return
        self.context_tokens = prompt_tokens + answer
        steps = sum((b - a) // self.tps for a, b in self.chunks)
        video = sum(self.chunk_tokens(a, b) for a, b in self.chunks)
        if steps:
            self.step_overhead = max(0.0, (prompt_tokens - (prompt_ids - len(self.chunks)) - video) / steps)
