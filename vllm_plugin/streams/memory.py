"""A stream's memory policy: what stays in its conversation when the conversation reaches its budget.

No vLLM import: the policy and the selection are plain data and arithmetic;
:mod:`vllm_plugin.streams.session` applies the selection (frees what is not selected) and
:mod:`vllm_plugin.streams.service` rebuilds the conversation and prefills it.

Re-anchoring
------------
A stream's conversation is its video chunks (one video item per eager prefill or question with new
frames) and its turns. Before a request would take the conversation past ``context_tokens``, the
stream **re-anchors**: a new conversation is built from

* **keyframes** (``keep="recent+keyframes"``): the stream's first temporal step and every step
  whose kept fraction rose to ``event_level`` (the scene changes, :class:`Stream` events), each a
  one-step video item with the tokens DTD kept for it when it arrived; of those before the recent
  window at most ``max_keyframes``, spread evenly over the time they span (the stream's first step
  and the latest always among them: long-term memory over the whole stream, not only before the
  window); a
  keyframe a re-anchor drops is gone (its frames are freed);
* **recent**: the latest chunks, whole and unchanged, as many as fit in ``anchor_fraction`` of the
  budget together with the keyframes before them (always at least the latest one);
* **turns**: the last ``keep_turns`` questions and answers, as text turns before the videos.

Time. Every kept token keeps the place it had in its video item: a recent chunk is the same item
(same frames, same mask, same step times), and a keyframe's item is its one step. What each family
was trained on decides how time across items reaches the model:

* Qwen3-VL writes each step's time as text (``<t seconds>``) and reads time from nothing else; the
  items carry the steps' original stream times (``dtd_step_times``), so a keyframe from minute 3
  says ``<180.0 seconds>`` after any number of re-anchors.
* Qwen2.5-VL and Qwen2-VL have no time text: their temporal M-RoPE index is time since the start of
  the video item (``t × second_per_grid_t × tokens_per_second``), as in training, where one video
  is one item. Inside an item that is kept exactly; between items the model sees their order, as it
  does for the chunks of any stream. Absolute stream time is NOT put into the positions: a stream of
  hours would push temporal indices past anything the model was trained on (and past the rotary
  table of ``max_position_embeddings``), and a re-anchor would change the index of every past token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

KEEP_CHOICES = ("recent", "recent+keyframes")
CONTEXT_FRACTION = 0.75  # default budget: this share of the server's max model length


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class MemoryPolicy:
    """``context_tokens``: the conversation's budget in tokens (None: ``CONTEXT_FRACTION`` of the
    server's max model length); ``keep``: ``"recent"`` or ``"recent+keyframes"``; ``max_keyframes``:
    keyframes kept at most; ``keep_turns``: past question/answer turns carried over as text;
    ``anchor_fraction``: share of the budget the re-anchored conversation may fill (the rest is room
    for new frames before the next re-anchor)."""

    context_tokens: Optional[int] = None
    keep: str = "recent+keyframes"
    max_keyframes: int = 8
    keep_turns: int = 2
    anchor_fraction: float = 0.5

    def __post_init__(self):
        if self.keep not in KEEP_CHOICES:
            raise PolicyError(f"memory_keep must be one of {list(KEEP_CHOICES)}, got {self.keep!r}")
        if self.context_tokens is not None and not (isinstance(self.context_tokens, int) and self.context_tokens >= 256):
            raise PolicyError(f"context_tokens must be an integer >= 256, got {self.context_tokens!r}")
        if not (isinstance(self.max_keyframes, int) and 0 <= self.max_keyframes <= 256):
            raise PolicyError(f"max_keyframes must be in [0, 256], got {self.max_keyframes!r}")
        if not (isinstance(self.keep_turns, int) and 0 <= self.keep_turns <= 64):
            raise PolicyError(f"keep_turns must be in [0, 64], got {self.keep_turns!r}")
        if not (isinstance(self.anchor_fraction, (int, float)) and 0.05 <= self.anchor_fraction <= 0.9):
            raise PolicyError(f"anchor_fraction must be in [0.05, 0.9], got {self.anchor_fraction!r}")

    def budget(self, max_model_len: Optional[int]) -> Optional[int]:
        """The budget in tokens for a server of ``max_model_len`` (None: no budget known)."""
        if self.context_tokens is not None:
            return self.context_tokens if not max_model_len else min(self.context_tokens, max_model_len)
        return int(CONTEXT_FRACTION * max_model_len) if max_model_len else None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Anchor:
    """A re-anchor's selection: frame ranges ``[a, b)`` in stream order (keyframe steps, then the
    recent chunks), which of them are keyframes, and the estimated video tokens they hold."""

    ranges: list[tuple[int, int]]
    keyframes: list[int]  # temporal steps
    tokens: int


def select_anchor(chunks: Sequence[tuple[int, int]], kept_per_step: Sequence[int], keyframe_steps: Sequence[int],
                  temporal_patch_size: int, policy: MemoryPolicy, target: int, item_overhead: int = 2,
                  step_overhead: float = 0.0, max_frames: Optional[int] = None, max_items: Optional[int] = None) -> Anchor:
    """What a re-anchored conversation holds.

    Args:
        chunks: frame ranges ``[a, b)`` of the conversation's video items, in stream order; the
            last one is the latest.
        kept_per_step: kept tokens of every temporal step of the stream (index = step).
        keyframe_steps: candidate keyframes (temporal steps), ascending.
        temporal_patch_size: frames per temporal step.
        policy: the stream's policy.
        target: tokens the selection may hold (videos and their per-item overhead).
        item_overhead: tokens one video item adds besides its kept tokens (its placeholder's frame).
        step_overhead: tokens one temporal step adds besides its kept tokens (Qwen3-VL's time text).
        max_frames, max_items: the frames and video items the selection may hold besides the latest
            chunk (a stream's frame and item limits: a static camera fills them before any budget).
    Returns:
        :class:`Anchor`: the latest chunk is always selected; older chunks join the recent window,
        latest first, while the window and the keyframes before it fit in ``target``; the keyframes
        are the candidates before the window, at most ``max_keyframes`` of them spread evenly over
        the time the candidates span (:func:`spread`: the oldest and the latest always among them),
        thinned the same way until they fit.
    """
    if not chunks:
        return Anchor([], [], 0)
    tps = temporal_patch_size

    def tokens(a: int, b: int) -> int:
        return max(1, sum(kept_per_step[a // tps:b // tps])) + item_overhead + int(step_overhead * (b - a) // tps)

    with_keys = policy.keep == "recent+keyframes" and policy.max_keyframes > 0
    candidates = sorted(set(keyframe_steps)) if with_keys else []

    def keys_before(frame: int, k: int = policy.max_keyframes) -> list[int]:
        return spread([s for s in candidates if s * tps < frame], k)

    def cost(keys: list[int]) -> int:
        return sum(tokens(s * tps, (s + 1) * tps) for s in keys)

    recent = [chunks[-1]]
    used = tokens(*chunks[-1])
    frames, items = chunks[-1][1] - chunks[-1][0], 1
    frame_cap = max_frames if max_frames is not None else float("inf")
    item_cap = max_items if max_items is not None else float("inf")

    def fits(used: int, frames: int, items: int, keys: list[int]) -> bool:
        return used + cost(keys) <= target and frames + tps * len(keys) <= frame_cap and items + len(keys) <= item_cap

    for a, b in reversed(chunks[:-1]):
        if not fits(used + tokens(a, b), frames + b - a, items + 1, keys_before(a)):
            break
        recent.insert(0, (a, b))
        used, frames, items = used + tokens(a, b), frames + b - a, items + 1
    keys = keys_before(recent[0][0])
    while keys and not fits(used, frames, items, keys):
        keys = spread(keys, len(keys) - 1)
    used += cost(keys)
    return Anchor([(s * tps, (s + 1) * tps) for s in keys] + recent, keys, used)


def spread(items: Sequence[int], k: int) -> list[int]:
    """At most ``k`` of ``items`` (ascending temporal steps), spread evenly over the time they span: for
    ``k`` targets evenly spaced from the first to the last, the nearest item (the first and the last
    always kept when ``k >= 2``, the last when ``k == 1``; duplicates merge, so fewer may come back).
    Applied at every re-anchor, the keyframes stay spread over the whole stream, its start included,
    instead of crowding before the recent window."""
    items = list(items)
    if k <= 0:
        return []
    if len(items) <= k:
        return items
    if k == 1:
        return items[-1:]
    lo, hi = items[0], items[-1]
    arr = np.asarray(items, dtype=np.float64)
    picked = {items[int(np.abs(arr - (lo + (hi - lo) * i / (k - 1))).argmin())] for i in range(k)}
    return sorted(picked)
