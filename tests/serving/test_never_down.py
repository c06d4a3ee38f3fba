"""One legal request must never take the server down or stall it (REAL server, tiny checkpoint, CPU, HTTP).

Each case was a repro on the previous main: the engine died (a position past the rotary table), a
stream stopped answering for good (a processor-cache miss), or every route stalled (work on the event
loop). The DTD test server runs with a small multimodal processor cache (``--mm-processor-cache-gb``,
conftest) so that a stream's items are evicted within a test.
"""

import threading
import time

import numpy as np
import pytest
import requests

from analysis.harness.checks import (
    assert_server_healthy,
    check_fps_past_the_table_is_refused,
    check_sparse_stream_is_answered,
)
from conftest import chat_with_stats
from vllm_plugin.client import StreamHTTPError, open_stream


def test_a_stream_whose_fps_would_pass_the_rotary_table_is_refused_at_open(dtd_server):
    check_fps_past_the_table_is_refused(dtd_server)


def test_a_sparse_lazy_stream_is_answered_and_the_engine_lives(dtd_server):
    check_sparse_stream_is_answered(dtd_server)


def test_a_stream_whose_items_leave_the_processor_cache_keeps_answering(dtd_server):
    """Six chunks of 32 frames are more than the test server's processor cache holds: vLLM's cache
    evicts items the next request counts on. Before: "Expected a cached item" and every later
    question a 500. Now: every question is answered."""
    s = open_stream(dtd_server.base_url, fps=2.0, prefill="lazy", dtd_threshold=0.05)
    try:
        # noise: DTD keeps every token, so every item carries all of its patches (4.8 MB per 32 frames)
        frames = np.random.default_rng(0).integers(0, 256, (192, 224, 224, 3), dtype=np.uint8)
        for q in range(6):
            s.push(frames[q * 32 : (q + 1) * 32])
            a = s.ask(f"question {q}", max_tokens=2)
            assert a["choices"][0]["message"]["content"] is not None
    finally:
        s.close()
    # the cache did lose items the requests counted on (the path this test is about was taken)
    assert "processor cache lost an item" in dtd_server.log_path.read_text(errors="replace")
    assert_server_healthy(dtd_server)


def _longest_health_stall(srv, during) -> tuple[float, object]:
    """Run ``during()`` in a thread while polling /health; returns (longest gap between answers, its result)."""
    out, done = {}, threading.Event()

    def run():
        try:
            out["result"] = during()
        except Exception as e:  # noqa: BLE001 -- reported to the test
            out["result"] = e
        finally:
            done.set()

    t = threading.Thread(target=run)
    longest, last = 0.0, time.monotonic()
    t.start()
    while not done.is_set():
        requests.get(srv.base_url + "/health", timeout=60)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
        time.sleep(0.02)
    t.join()
    return longest, out["result"]


def test_a_huge_question_or_standing_question_does_not_stall_the_server(dtd_server, synthetic_clip):
    s = open_stream(dtd_server.base_url, fps=2.0, prefill="lazy")
    try:
        s.push(synthetic_clip.frames[:4])
        text = "word " * (7_600_000 // 5)
        stall, result = _longest_health_stall(dtd_server, lambda: s.ask(text, max_tokens=2))
        print(f"longest /health stall during a 7.6-MB question: {stall:.2f} s")
        assert isinstance(result, StreamHTTPError) and result.status == 400, result
        assert stall < 2.0
        stall, result = _longest_health_stall(
            dtd_server, lambda: open_stream(dtd_server.base_url, fps=2.0, standing_question="why " * 250_000)
        )
        print(f"longest /health stall during a 1-MB standing question: {stall:.2f} s")
        assert isinstance(result, StreamHTTPError) and result.status == 400, result
        assert stall < 2.0
        assert s.ask("what happens?", max_tokens=2)["choices"][0]["message"]["content"] is not None
    finally:
        s.close()
    assert_server_healthy(dtd_server)


def test_a_question_refused_for_max_tokens_changes_no_stream_state(dtd_server, synthetic_clip):
    s = open_stream(dtd_server.base_url, fps=2.0, prefill="lazy", context_tokens=1024)
    try:
        s.push(synthetic_clip.frames[:16])
        s.ask("first", max_tokens=2)
        s.push(synthetic_clip.frames[16:32])
        before = s.status()
        with pytest.raises(StreamHTTPError) as e:
            s.ask("too long an answer", max_tokens=10**6)
        assert e.value.status == 400 and "max_tokens" in str(e.value)
        after = s.status()
        for key in ("frames", "chunks", "reanchors", "held_frames", "evicted_frames", "chunk_ranges", "questions"):
            assert after[key] == before[key], key
    finally:
        s.close()


def test_a_data_uri_without_a_comma_is_a_400(dtd_server):
    s = open_stream(dtd_server.base_url, fps=2.0)
    try:
        r = requests.post(s.url + "/frames", json={"frames": [{"image": "data:image/png;base64"}]}, timeout=60)
        assert r.status_code == 400 and "comma" in r.json()["error"]["message"]
    finally:
        s.close()


def test_a_long_static_video_is_encoded_in_bounded_groups(dtd_server, media_dir):
    """256 static 448x448 frames: 32,768 video tokens before DTD, one step's worth after. The engine
    encodes only the steps that keep a token, in calls of at most what it profiled: the worker's peak
    memory does not rise (before: every patch of the video in one call)."""
    from analysis.lib.video import write_video

    frames = np.full((256, 448, 448, 3), 120, np.uint8)
    frames[:, 100:200, 100:200] = 30
    path = write_video(media_dir / "static448.mp4", frames, 2.0)
    before = dtd_server.worker_peak_mb()
    resp, (st,) = chat_with_stats(dtd_server, path)
    after = dtd_server.worker_peak_mb()
    print(f"worker peak RSS {before:.0f} -> {after:.0f} MiB; tokens {st['kept']} of {st['total']}")
    assert st["total"] == 128 * 256 and st["kept"] <= 2 * 256
    assert resp.choices[0].message.content is not None
    assert after <= before + 16, (before, after)
    assert_server_healthy(dtd_server)


def test_a_lazy_stream_backlog_becomes_bounded_items(dtd_server):
    """A lazy stream asked nothing for 256 frames: before, one video item of all of them (np.stack on
    the event loop, the whole item in the worker). Now items of at most max_chunk_frames (64),
    prefilled in turn; the question is answered and /health never stalls for long."""
    s = open_stream(dtd_server.base_url, fps=2.0, prefill="lazy")
    try:
        frame = np.full((224, 224, 3), 60, np.uint8)
        for _ in range(2):
            s.push([frame] * 128)
        stall, a = _longest_health_stall(dtd_server, lambda: s.ask("what happens?", max_tokens=2))
        print(f"longest /health stall during a 256-frame backlog question: {stall:.2f} s")
        assert not isinstance(a, Exception), a
        ranges = s.status()["chunk_ranges"]
        assert ranges and max(b - a for a, b in ranges) <= 64, ranges
        assert stall < 2.0
    finally:
        s.close()
