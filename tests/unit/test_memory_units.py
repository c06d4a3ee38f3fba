"""Streams of hours without a server: the memory policy's selection, re-anchoring, and what it frees."""

import numpy as np
import pytest
import torch

from vllm_plugin.core import DTDConfig
from vllm_plugin.entrypoints.options import GIVEN_MASK, GIVEN_TIMES
from vllm_plugin.errors import InvalidOption, RateLimited, StreamFull, TooLarge
from vllm_plugin.streams.memory import Budget, MemorySettings, RecentKeyframesPolicy, RecentPolicy, item_cost
from vllm_plugin.streams.session import Limits, StreamManager, StreamSettings

TPS = 2


def _memory(**given):
    """Memory settings as an open request's ``memory`` object gives them."""
    return MemorySettings.parse(given)


def test_policy_is_validated_and_defaults_to_a_share_of_the_context():
    p = MemorySettings()
    assert p.keep == "recent+keyframes" and p.budget(16384) == 12288 and p.budget(None) is None
    assert p.as_dict() == {
        "keep": "recent+keyframes",
        "max_keyframes": 8,
        "context_tokens": None,
        "keep_turns": 2,
        "anchor_fraction": 0.5,
    }
    assert _memory(context_tokens=1000).budget(16384) == 1000 and _memory(context_tokens=9000).budget(4096) == 4096
    assert _memory(keep="recent").as_dict() == {
        "keep": "recent",
        "context_tokens": None,
        "keep_turns": 2,
        "anchor_fraction": 0.5,
    }
    for bad, field in [
        (dict(keep="all"), "memory.keep"),
        (dict(keep=["recent"]), "memory.keep"),
        (dict(context_tokens=10), "memory.context_tokens"),
        (dict(context_tokens=1.5), "memory.context_tokens"),
        (dict(max_keyframes=-1), "memory.max_keyframes"),
        (dict(keep_turns=1000), "memory.keep_turns"),
        (dict(anchor_fraction=1.0), "memory.anchor_fraction"),
        (dict(frames=3), "memory.frames"),
        # an option of another policy is not one of this policy's
        (dict(keep="recent", max_keyframes=3), "memory.max_keyframes"),
    ]:
        with pytest.raises(InvalidOption) as e:
            _memory(**bad)
        assert e.value.field == field and str(e.value).startswith(field), (bad, str(e.value))
    with pytest.raises(InvalidOption, match=r"^keep_turns must be in \[0, 64\], got -1$"):
        MemorySettings(keep_turns=-1)
    with pytest.raises(InvalidOption, match="max_keyframes must be in"):
        RecentKeyframesPolicy(max_keyframes=300)


def test_the_open_requests_flat_fields_are_the_memory_objects_keys_and_errors_name_them_as_sent():
    m = MemorySettings.from_request(None, context_tokens=1024, memory_keep="recent", keep_turns=1)
    assert m.as_dict() == {"keep": "recent", "context_tokens": 1024, "keep_turns": 1, "anchor_fraction": 0.5}
    assert (
        MemorySettings.from_request({"keep": "recent", "context_tokens": 1024, "keep_turns": 1}).as_dict()
        == m.as_dict()
    )
    both = MemorySettings.from_request({"max_keyframes": 2}, context_tokens=2048)
    assert (both.keep, both.policy.max_keyframes, both.context_tokens) == ("recent+keyframes", 2, 2048)
    for memory, flat, field in [
        (None, {"memory_keep": "all"}, "memory_keep"),
        ({"keep": "all"}, {}, "memory.keep"),
        (None, {"max_keyframes": -1}, "max_keyframes"),
        ({"keep": "x"}, {"memory_keep": "recent"}, "memory.keep"),
        ("recent", {}, "memory"),
        ({"max_keyframes": -1}, {}, "memory.max_keyframes"),
    ]:
        with pytest.raises(InvalidOption) as e:
            MemorySettings.from_request(memory, **flat)
        assert e.value.field == field and field in str(e.value), (memory, flat, str(e.value))
    assert "memory_keep must be one of ['recent', 'recent+keyframes'" in str(
        pytest.raises(InvalidOption, MemorySettings.from_request, None, memory_keep="all").value
    )


def _select(policy, chunks, kept, target, keys=(), step_overhead=0.0):
    """What ``policy`` selects after observing ``keys`` as scene changes (and the first step)."""
    for s in keys:
        policy.observe(s, kept[s], scene_change=s > 0)
    return policy.select(chunks, Budget(target, item_cost(kept, TPS, 2, step_overhead), TPS))


def test_spread_keeps_the_ends_and_thins_evenly():
    from vllm_plugin.streams.memory import spread

    assert spread([1, 2, 3], 5) == [1, 2, 3] and spread([1, 2, 3], 0) == [] and spread([1, 2, 3], 1) == [3]
    assert spread(list(range(10)), 4) == [0, 3, 6, 9] and spread(list(range(10)), 2) == [0, 9]
    # by time, not by count: a burst of recent scene changes does not push out the old ones
    assert spread([0, 100, 200, 290, 291, 292, 293, 294, 295, 296, 300], 4) == [0, 100, 200, 300]


def test_selection_keeps_the_latest_chunks_and_keyframes_within_the_target():
    kept = [10] * 40  # 40 steps of 10 kept tokens; chunks of 4 steps (8 frames)
    chunks = [(a, a + 8) for a in range(0, 80, 8)]
    keys = [0, 3, 9, 13, 30]
    # recent only: the latest chunks while they fit (42 tokens each: 40 kept + 2)
    a = _select(RecentPolicy(), chunks, kept, 130, keys)
    assert a.ranges == chunks[-3:] and a.keyframes == [] and a.tokens == 126
    # with keyframes (12 tokens each): at most max_keyframes of those before the window, spread over them
    # (the stream's first step always among them); older chunks join while they and those keyframes fit
    a = _select(RecentKeyframesPolicy(max_keyframes=2), chunks, kept, 130, keys)
    assert a.keyframes == [0, 30] and a.ranges == [(0, 2), (60, 62), *chunks[-2:]] and a.tokens == 108
    # a keyframe the window reaches is served inside its chunk (30 is in chunk (56, 64))
    a = _select(RecentKeyframesPolicy(max_keyframes=3), chunks, kept, 200, keys)
    assert a.keyframes == [0, 9, 13] and a.ranges == [(0, 2), (18, 20), (26, 28), *chunks[-3:]] and a.tokens == 162
    # the latest chunk stays whatever the target; keyframes that do not fit are thinned (spread again)
    a = _select(RecentKeyframesPolicy(max_keyframes=8), chunks, kept, 60, keys)
    assert a.ranges == [(60, 62), chunks[-1]] and a.keyframes == [30]
    assert _select(RecentKeyframesPolicy(), chunks, kept, 1, keys).ranges == [chunks[-1]]
    # steps whose frames were freed are no keyframe any more
    p = RecentKeyframesPolicy(max_keyframes=3)
    _select(p, chunks, kept, 200, keys)
    p.forget([9, 13, 14])
    assert p.select(chunks, Budget(200, item_cost(kept, TPS), TPS)).keyframes == [0, 3]
    # no cap: every chunk (the keyframes are inside the window); the item cap counts the keyframes too:
    # the window stops, the keyframes are thinned
    a = _select(RecentKeyframesPolicy(max_keyframes=3), chunks, kept, 10**6, keys)
    assert a.keyframes == [] and a.ranges == chunks
    p = RecentKeyframesPolicy(max_keyframes=3)
    for k in keys:
        p.observe(k, kept[k], scene_change=k > 0)
    a = p.select(chunks, Budget(10**6, item_cost(kept, TPS), TPS, max_items=3))
    assert a.ranges[-1] == chunks[-1] and len(a.ranges) == 3 and len(a.keyframes) == 2
    # Qwen3-VL's time text per step counts
    a = _select(RecentPolicy(), chunks, kept, 130, step_overhead=8)
    assert a.ranges == chunks[-1:]


def _long_stream(clip, loops: int, budget: int, policy: MemorySettings, append: int = 5, **limits):
    """A stream driven as the service drives it (a chunk per append, re-anchor before the conversation
    passes ``budget``); yields (stream, anchor or None, frames sent so far) after every append."""
    frames = np.concatenate([clip.frames] * loops)
    s = StreamManager(Limits(**limits)).open(
        StreamSettings(fps=2.0, dtd=DTDConfig(threshold=0.05), event_level=0.5, memory=policy)
    )
    conv = s.conversation
    context = 0
    for i in range(0, len(frames), append):
        s.add_frames(list(frames[i : i + append]))
        steps = conv.uncut_steps()
        anchor = None
        if len(steps):
            incoming = conv.chunk_tokens(steps.start * TPS, steps.stop * TPS) + 2
            if conv.chunks and (context + incoming > budget or conv.full()):
                anchor = conv.reanchor(int(policy.anchor_fraction * budget))
                context = anchor.tokens
            conv.cut_chunk()
            context += incoming
        yield s, anchor, frames[: i + append]


def test_a_long_stream_reanchors_serves_exactly_its_selection_and_frees_the_rest(synthetic_clip):
    policy = _memory(max_keyframes=3)
    anchors, peak_held, frame_bytes = 0, 0, synthetic_clip.frames[0].nbytes
    for s, anchor, sent in _long_stream(synthetic_clip, loops=8, budget=400, policy=policy):
        conv, store = s.conversation, s.store
        items = conv.video_items()
        # every item is its frame range of the stream, as sent, with the masks and times decided on arrival
        for (a, b), (pix, meta) in zip(conv.chunks, items):
            assert np.array_equal(pix, sent[a:b])
            assert [int(m.sum()) for m in meta[GIVEN_MASK]] == store.kept_per_step[a // TPS : b // TPS]
            assert meta[GIVEN_TIMES] == [pytest.approx((a + 2 * k + 0.5) / 2.0) for k in range((b - a) // TPS)]
        # no frame lost: what is not in an item is not cut yet, or was freed by a re-anchor
        held = {i for a, b in conv.chunks for i in range(a, b)} | set(range(conv.next_frame, len(store.frames)))
        assert {i for i, f in enumerate(store.frames) if f is not None} == held
        assert store.held_frames == len(held) and store.nbytes == len(held) * frame_bytes
        assert conv.chunks == sorted(conv.chunks) and all(
            b <= c for (_, b), (c, _) in zip(conv.chunks, conv.chunks[1:])
        )
        if anchor is not None:
            anchors += 1
            assert conv.chunks[: len(anchor.ranges)] == anchor.ranges  # then the new chunk
            # keyframes: the stream's first step or steps whose kept fraction crossed event_level
            crossed = {e["step"] for e in s.events if e["type"] == "scene_change"} | {0}
            assert set(anchor.keyframes) <= crossed and len(anchor.keyframes) <= policy.policy.max_keyframes
            assert conv.keyframes() == anchor.keyframes
            # the policy's candidates are the crossings whose frames are still held
            assert set(conv.policy.candidates) <= crossed
            assert all(store.frames[k * TPS] is not None for k in conv.policy.candidates)
            peak_held = max(peak_held, store.held_frames)
    assert anchors >= 3 and conv.reanchors == anchors and store.evicted_frames > len(store.frames) // 2
    # memory follows the policy: what is held after the first re-anchors stays bounded
    assert peak_held < 0.4 * len(store.frames)
    assert sum(m is not None for m in store.step_masks) * TPS <= store.held_frames + TPS
    # each stream works on its own copy of the policy: the settings' one saw nothing
    assert policy.policy.candidates == [] and conv.policy is not policy.policy


def test_recent_policy_keeps_no_keyframes_and_frees_the_older_frames(synthetic_clip):
    for s, anchor, _ in _long_stream(synthetic_clip, loops=4, budget=300, policy=_memory(keep="recent")):
        if anchor is not None:
            assert anchor.keyframes == [] and s.conversation.key_ranges == set()
            assert s.conversation.chunks[0][0] > 0  # the start of the stream is gone
    assert s.conversation.reanchors >= 3


def test_held_frames_and_append_rate_are_the_limits_not_the_stream_age(synthetic_clip):
    from vllm_plugin.streams.routes import http_status

    # 48 held frames at most: a stream of 8 loops (384 frames) runs because re-anchors free frames
    for s, _, _ in _long_stream(synthetic_clip, loops=8, budget=300, policy=MemorySettings(), max_frames=48):
        assert s.store.held_frames <= 48
    assert len(s.frames) == 8 * len(synthetic_clip.frames)
    # without re-anchors (lazy, no question) the same stream is refused, clearly; an eager one is told
    # to retry (its prefill frees frames as it catches up); an append of more than half the cap never fits
    for prefill, error, status in [("lazy", StreamFull, 409), ("eager", RateLimited, 429)]:
        t = StreamManager(Limits(max_frames=48)).open(StreamSettings(fps=2.0, prefill=prefill))
        t.add_frames(list(synthetic_clip.frames[:20]))
        t.add_frames(list(synthetic_clip.frames[20:40]))
        with pytest.raises(error, match="holds 40 frames and may hold 48") as e:
            t.add_frames(list(synthetic_clip.frames[40:48]) * 2)
        assert http_status(e.value) == status
        with pytest.raises(TooLarge, match="at most 24 frames per append") as e:
            t.add_frames(list(synthetic_clip.frames[:25]))
        assert http_status(e.value) == 413
    r = StreamManager(Limits(max_appends_per_second=3)).open(StreamSettings(fps=2.0))
    for _ in range(3):
        r.admit_append()
    with pytest.raises(RateLimited, match="appends per second") as e:
        r.admit_append()
    assert http_status(e.value) == 429


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
    s = m.open(
        StreamSettings(fps=2.0, dtd=DTDConfig(criterion="feature", threshold=0.9), event_level=0.5), encoder=Tower()
    )
    frames = np.concatenate([synthetic_clip.frames] * 3)
    for i in range(0, len(frames), 8):
        s.add_frames(list(frames[i : i + 8]))
        s.cut_chunk()
        s.video_items()
    before = s.nbytes
    s.conversation.reanchor(target=200)
    assert s.nbytes < before and m.bytes.held == s.nbytes
    freed = [k for k, e in enumerate(s.step_embeds) if e is None]
    assert freed and all(s.step_masks[k] is None and s.step_first[k] is None for k in freed)
    s.video_items()  # the kept items still build


def test_soak_windows_summary_and_figure():
    from analysis.lib.figures import long_stream_figure
    from analysis.lib.soak import Soak, check_loopback, keyframe_times, last_line, summary, windows

    soak = Soak()
    for t in range(10, 1800, 10):  # 30 min of stream time, a question every 10 s; TTFT 20 ms, 24 ms, then 30 ms
        ttft = 0.02 if t < 600 else 0.024 if t <= 1200 else 0.03
        soak.questions.append(
            {
                "stream": 0,
                "time": float(t),
                "ttft_s": ttft,
                "prefilled_tokens": 40,
                "context_tokens": 500 + t % 300,
                "held_frames": 30,
                "evicted_frames": t // 2,
                "lag_s": 0.0,
            }
        )
    soak.samples = [
        {
            "time": float(t),
            "rss_mb": {"python[1]": 1000.0, "VLLM::EngineCore[2]": 900.0 + t / 100},
            "rss_total_mb": 1900.0 + t / 100,
            "kv_usage": 0.1,
        }
        for t in range(0, 1801, 60)
    ]
    soak.events = [
        {"stream": 0, "type": "reanchor", "time": 300.0, "keyframes": [0, 40], "budget": 1024},
        {"stream": 0, "type": "reanchor", "time": 900.0, "keyframes": [40], "budget": 1024},
    ]
    wins = windows(soak, 600)
    assert [w["questions"] for w in wins] == [60, 60, 59] and [w["reanchors"] for w in wins] == [1, 1, 0]
    assert wins[0]["ttft_p95_ms"] == pytest.approx(20) and wins[2]["ttft_p50_ms"] == pytest.approx(30)
    assert wins[1]["rss_by_process"] == {"python": 1000.0, "VLLM::EngineCore": pytest.approx(900 + 1140 / 100)}
    s = summary(soak, wins, 0.5)
    # TTFT "first": the first window that starts after the first re-anchor (window 0 still filled up to the budget)
    assert s["ttft_first_window"] == 1 and s["ttft_p95_window0"] == pytest.approx(0.02)
    assert s["ttft_ratio"] == pytest.approx(1.25) and s["rss_growth_mb"] == pytest.approx((1800 - 300) / 100)
    assert s["rss_growth_by_process_mb"] == {"python": 0.0, "VLLM::EngineCore": pytest.approx(15.0)}
    assert s["rss_growth_second_half_mb"] == pytest.approx((1800 - 900) / 100)
    assert (
        last_line(s) == "hours=0.5 questions=179 errors=0 ttft_p95_first=0.0240 ttft_p95_last=0.0300 "
        "rss_growth_mb=15.0 reanchor_waits=nan window_p95_max_ratio=1.250"  # no reanchor_wait_s: an older server
    )
    assert keyframe_times(soak, fps=1.0) == [80.0]  # held after the last re-anchor
    fig = long_stream_figure(soak.questions, [300.0, 900.0], [0.0, 80.0], budget=1024)
    assert {t.name for t in fig.data} == {
        "context tokens",
        "budget (context_tokens)",
        "frames held",
        "frames evicted",
        "keyframes held at the end",
        "TTFT (ms)",
    }
    assert len(fig.layout.shapes) == 2  # the re-anchors
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://10.0.0.2:8000")


def test_oldest_steps_not_in_a_chunk_are_dropped_to_bound_the_next_one(synthetic_clip):
    s = StreamManager().open(StreamSettings(fps=2.0, dtd=DTDConfig(threshold=0.05), event_level=0.5, prefill="lazy"))
    s.add_frames(list(synthetic_clip.frames))  # 24 steps; 64 kept at steps 0, 12, 16, 20
    conv = s.conversation
    assert conv.policy.candidates == [0, 12, 16, 20]
    before = s.nbytes
    dropped = conv.drop_uncut(max_tokens=100)
    kept = s.kept_per_step
    assert dropped % TPS == 0 and conv.next_frame == dropped and sum(kept[dropped // TPS :]) <= 100
    assert sum(kept[dropped // TPS - 1 :]) > 100  # no more than needed
    assert all(f is None for f in s.frames[:dropped]) and s.store.evicted_frames == dropped
    assert s.nbytes == before - dropped * synthetic_clip.frames[0].nbytes
    assert 0 not in conv.policy.candidates and s.cut_chunk() == (dropped, len(synthetic_clip.frames))
    assert conv.drop_uncut(0) == 0  # nothing uncut: nothing to drop


@pytest.mark.parametrize("max_tokens", [None, 1, 64, 70, 100, 1000])
@pytest.mark.parametrize("max_chunk_frames", [4, 8, 64])
def test_the_chunks_to_cut_are_the_chunks_cut(synthetic_clip, max_tokens, max_chunk_frames):
    """``chunks_to_cut`` (what a question while a re-anchor is prefilled counts against the item limit)
    equals the chunks cut one after the other, bounded in frames and (an eager stream's) kept tokens."""
    m = StreamManager(Limits(max_chunk_frames=max_chunk_frames))
    s = m.open(StreamSettings(fps=2.0, dtd=DTDConfig(threshold=0.05), event_level=0.5, prefill="lazy"))
    s.add_frames(list(synthetic_clip.frames))  # 24 steps; 64 kept at steps 0, 12, 16, 20
    conv = s.conversation
    expected = conv.chunks_to_cut(max_tokens)
    cut = 0
    while True:
        bound = None if max_tokens is None else conv.uncut_steps().start + conv.steps_within(max_tokens)
        if conv.cut_chunk(bound) is None:
            break
        cut += 1
    assert expected == cut > 0 and conv.chunks_to_cut(max_tokens) == 0


_ONEDNN_PROBE = r"""
import ctypes, random, torch
import vllm._custom_ops as ops
f = ctypes.CDLL(None).MallocExtension_GetNumericProperty
f.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
def live():
    v = ctypes.c_size_t(0); f(b"generic.current_allocated_bytes", ctypes.byref(v)); return v.value / 2**20
handler = ops.create_onednn_mm(torch.randn(768, 256).t(), 32)  # what vLLM's CPU linear layers use
random.seed(0)
base, after = live(), []
for m in random.sample(range(1, 2048), 120):  # a new token count per step, as in a stream
    ops.onednn_mm(handler, torch.randn(m, 256), None)
    after.append(live() - base)
print(after[39], after[-1])
"""


def test_the_cpu_workers_growth_is_onednns_primitive_cache_and_it_has_a_cap():
    """Why vLLM's CPU worker grows over a stream's first hour (docs/benchmarks.md, "Soak"): every new
    token count of a step creates oneDNN matmul primitives, kept in oneDNN's process-wide primitive
    cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024 by default); the cache is capped, so the growth stops.
    Live heap bytes from TCMalloc, the allocator vLLM preloads on the CPU."""
    import glob
    import os
    import subprocess
    import sys

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's oneDNN linear layers are its CPU path")
    lib = (glob.glob("/lib/*/libtcmalloc_minimal.so.4") + glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4"))[:1]
    if not lib:
        pytest.skip("no libtcmalloc_minimal.so.4 on this machine")

    def run(capacity):
        env = {**os.environ, "LD_PRELOAD": lib[0], "OMP_NUM_THREADS": "1"}
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if capacity is not None:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
        out = subprocess.run(
            [sys.executable, "-c", _ONEDNN_PROBE], env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return [float(x) for x in out.stdout.split()[-2:]]

    at40, at120 = run(None)  # default cap (1024 primitives): grows with every new shape
    assert at120 - at40 > 10, (at40, at120)
    at40, at120 = run(16)  # a cap of 16: full after a few shapes, then flat
    assert abs(at120 - at40) < 3, (at40, at120)
