"""Streams of hours without a server: the memory policy's selection, re-anchoring, and what it frees."""

import numpy as np
import pytest
import torch

from vllm_plugin.core import DTDConfig
from vllm_plugin.entrypoints.options import GIVEN_MASK, GIVEN_TIMES
from vllm_plugin.streams.memory import MemoryPolicy, PolicyError, select_anchor
from vllm_plugin.streams.session import Limits, StreamError, StreamManager, StreamSettings

TPS = 2


def test_policy_is_validated_and_defaults_to_a_share_of_the_context():
    p = MemoryPolicy()
    assert p.keep == "recent+keyframes" and p.budget(16384) == 12288 and p.budget(None) is None
    assert MemoryPolicy(context_tokens=1000).budget(16384) == 1000 and MemoryPolicy(context_tokens=9000).budget(4096) == 4096
    for bad in [dict(keep="all"), dict(context_tokens=10), dict(context_tokens=1.5), dict(max_keyframes=-1),
                dict(keep_turns=1000), dict(anchor_fraction=1.0)]:
        with pytest.raises(PolicyError):
            MemoryPolicy(**bad)


def test_selection_keeps_the_latest_chunks_and_keyframes_within_the_target():
    kept = [10] * 40  # 40 steps of 10 kept tokens; chunks of 4 steps (8 frames)
    chunks = [(a, a + 8) for a in range(0, 80, 8)]
    keys = [0, 3, 9, 13, 30]
    # recent only: the latest chunks while they fit (42 tokens each: 40 kept + 2)
    a = select_anchor(chunks, kept, keys, TPS, MemoryPolicy(keep="recent"), target=130)
    assert a.ranges == chunks[-3:] and a.keyframes == [] and a.tokens == 126
    # with keyframes: the latest ones before the latest chunk (12 tokens each), then older chunks while
    # they and the keyframes still outside the window fit
    a = select_anchor(chunks, kept, keys, TPS, MemoryPolicy(max_keyframes=2), target=130)
    assert a.keyframes == [13, 30] and a.ranges == [(26, 28), (60, 62), *chunks[-2:]] and a.tokens == 108
    # a keyframe the window reaches is served inside its chunk (30 is in chunk (56, 64))
    a = select_anchor(chunks, kept, keys, TPS, MemoryPolicy(max_keyframes=3), target=200)
    assert a.keyframes == [9, 13] and (60, 62) not in a.ranges and a.ranges[-4:] == chunks[-4:]
    # the latest chunk stays whatever the target; keyframes that do not fit go, oldest first
    a = select_anchor(chunks, kept, keys, TPS, MemoryPolicy(max_keyframes=8), target=60)
    assert a.ranges == [(60, 62), chunks[-1]] and a.keyframes == [30]
    assert select_anchor(chunks, kept, keys, TPS, MemoryPolicy(), target=1).ranges == [chunks[-1]]
    # Qwen3-VL's time text per step counts
    a = select_anchor(chunks, kept, [], TPS, MemoryPolicy(keep="recent"), target=130, step_overhead=8)
    assert a.ranges == chunks[-1:]


def _long_stream(clip, loops: int, budget: int, policy: MemoryPolicy, append: int = 5, **limits):
    """A stream driven as the service drives it (a chunk per append, re-anchor before the conversation
    passes ``budget``); yields (stream, anchor or None, frames sent so far) after every append."""
    frames = np.concatenate([clip.frames] * loops)
    s = StreamManager(Limits(**limits)).open(StreamSettings(fps=2.0, dtd=DTDConfig(threshold=0.05), event_level=0.5,
                                                             memory=policy))
    context = 0
    for i in range(0, len(frames), append):
        s.add_frames(list(frames[i:i + append]))
        steps = s.uncut_steps()
        anchor = None
        if len(steps):
            incoming = s.chunk_tokens(steps.start * TPS, steps.stop * TPS) + 2
            if s.chunks and context + incoming > budget:
                anchor = s.reanchor(int(policy.anchor_fraction * budget))
                context = anchor.tokens
            s.cut_chunk()
            context += incoming
        yield s, anchor, frames[: i + append]


def test_a_long_stream_reanchors_serves_exactly_its_selection_and_frees_the_rest(synthetic_clip):
    policy = MemoryPolicy(max_keyframes=3)
    anchors, peak_held, frame_bytes = 0, 0, synthetic_clip.frames[0].nbytes
    for s, anchor, sent in _long_stream(synthetic_clip, loops=8, budget=400, policy=policy):
        items = s.video_items()
        # every item is its frame range of the stream, as sent, with the masks and times decided on arrival
        for (a, b), (pix, meta) in zip(s.chunks, items):
            assert np.array_equal(pix, sent[a:b])
            assert [int(m.sum()) for m in meta[GIVEN_MASK]] == s.kept_per_step[a // TPS:b // TPS]
            assert meta[GIVEN_TIMES] == [pytest.approx((a + 2 * k + 0.5) / 2.0) for k in range((b - a) // TPS)]
        # no frame lost: what is not in an item is not cut yet, or was freed by a re-anchor
        held = {i for a, b in s.chunks for i in range(a, b)} | set(range(s.next_frame, len(s.frames)))
        assert {i for i, f in enumerate(s.frames) if f is not None} == held
        assert s.held_frames == len(held) and s.nbytes == len(held) * frame_bytes
        assert s.chunks == sorted(s.chunks) and all(b <= c for (_, b), (c, _) in zip(s.chunks, s.chunks[1:]))
        if anchor is not None:
            anchors += 1
            assert s.chunks[: len(anchor.ranges)] == anchor.ranges  # then the new chunk
            # keyframes: the stream's first step or steps whose kept fraction crossed event_level
            crossed = {e["step"] for e in s.events if e["type"] == "scene_change"} | {0}
            assert set(anchor.keyframes) <= crossed and len(anchor.keyframes) <= policy.max_keyframes
            assert sorted(a // TPS for a, _ in s.key_ranges) == anchor.keyframes
            peak_held = max(peak_held, s.held_frames)
    assert anchors >= 3 and s.reanchors == anchors and s.evicted_frames > len(s.frames) // 2
    # memory follows the policy: what is held after the first re-anchors stays bounded
    assert peak_held < 0.4 * len(s.frames)
    assert sum(m is not None for m in s.step_masks) * TPS <= s.held_frames + TPS


def test_recent_policy_keeps_no_keyframes_and_frees_the_older_frames(synthetic_clip):
    for s, anchor, _ in _long_stream(synthetic_clip, loops=4, budget=300, policy=MemoryPolicy(keep="recent")):
        if anchor is not None:
            assert anchor.keyframes == [] and s.key_ranges == set()
            assert s.chunks[0][0] > 0  # the start of the stream is gone
    assert s.reanchors >= 3


def test_held_frames_and_append_rate_are_the_limits_not_the_stream_age(synthetic_clip):
    # 48 held frames at most: a stream of 8 loops (384 frames) runs because re-anchors free frames
    for s, _, _ in _long_stream(synthetic_clip, loops=8, budget=300, policy=MemoryPolicy(), max_frames=48):
        assert s.held_frames <= 48
    assert len(s.frames) == 8 * len(synthetic_clip.frames)
    # without re-anchors (no question, no eager prefill) the same stream is refused, clearly
    t = StreamManager(Limits(max_frames=48)).open(StreamSettings(fps=2.0))
    t.add_frames(list(synthetic_clip.frames[:40]))
    with pytest.raises(StreamError, match="holds 40 frames and may hold 48") as e:
        t.add_frames(list(synthetic_clip.frames[40:48]) * 2)
    assert e.value.status == 409
    r = StreamManager(Limits(max_appends_per_second=3)).open(StreamSettings(fps=2.0))
    for _ in range(3):
        r.admit_append()
    with pytest.raises(StreamError, match="appends per second") as e:
        r.admit_append()
    assert e.value.status == 429


def test_feature_streams_free_kept_encoder_outputs(synthetic_clip):
    """Feature criterion with a stand-in tower (the pixels' tokens as "encoder outputs"): the kept
    rows of evicted steps are freed and the bytes account follows."""
    from concurrent.futures import Future

    from vllm_plugin.core import frame_tokens

    class Tower:
        decision_dim = None

        def reserve(self, n):
            pass

        def release(self, n):
            pass

        def submit(self, frames, steps):
            f = Future()
            f.set_result(frame_tokens(torch.from_numpy(frames)).reshape(-1, 3 * 2 * 14 * 14).float())
            return f

    m = StreamManager()
    s = m.open(StreamSettings(fps=2.0, dtd=DTDConfig(criterion="feature", threshold=0.9), event_level=0.5), encoder=Tower())
    frames = np.concatenate([synthetic_clip.frames] * 3)
    for i in range(0, len(frames), 8):
        s.add_frames(list(frames[i:i + 8]))
        s.cut_chunk()
        s.video_items()
    before = s.nbytes
    s.reanchor(target=200)
    assert s.nbytes < before and m.bytes.held == s.nbytes
    freed = [k for k, e in enumerate(s.step_embeds) if e is None]
    assert freed and all(s.step_masks[k] is None and s.step_first[k] is None for k in freed)
    s.video_items()  # the kept items still build
