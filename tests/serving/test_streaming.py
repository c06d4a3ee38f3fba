"""Stream routes on a REAL vLLM server (endpoint plugin, tiny checkpoint, CPU, HTTP)."""

import base64
import threading

import numpy as np
import pytest
import requests

from conftest import BLOCK_SIZE, TEST_MAX_STREAMS
from vllm_plugin.client import StreamHTTPError, open_stream


@pytest.fixture
def stream(dtd_server):
    s = open_stream(dtd_server.base_url, fps=2.0, dtd_threshold=0.05)
    yield s
    try:
        s.close()
    except StreamHTTPError:
        pass


def test_routes_are_in_openapi(dtd_server):
    paths = requests.get(dtd_server.base_url + "/openapi.json", timeout=30).json()["paths"]
    for p in (
        "/v1/streams",
        "/v1/streams/{stream_id}/frames",
        "/v1/streams/{stream_id}/chat/completions",
        "/v1/streams/{stream_id}/events",
        "/v1/streams/{stream_id}",
    ):
        assert p in paths, p


def test_questions_reuse_the_past(stream, synthetic_clip):
    c = synthetic_clip
    answers = []
    for q in range(3):
        stream.push(c.frames[q * 16 : (q + 1) * 16])
        answers.append(stream.ask(f"question {q}: what happens?", max_tokens=4, return_token_ids=True))
    prev = None
    for a in answers:
        st = a["stream_state"]
        ids = st["prompt_token_ids"]
        assert a["usage"]["prompt_tokens"] == len(ids)
        if prev is not None:
            past = prev["prompt_token_ids"] + prev["completion_token_ids"]
            assert ids[: len(past)] == past  # the past prefix is byte-stable
            cached = a["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= (len(past) // BLOCK_SIZE) * BLOCK_SIZE  # everything before is reused, up to whole blocks
            assert cached >= sum(st["video_tokens_per_chunk"][:-1])  # at least all frames before it
        prev = st
    # served video tokens per chunk == the stream's causal DTD (== DTD over the whole clip)
    kept = c.expected_kept_per_step()
    assert answers[-1]["stream_state"]["video_tokens_per_chunk"] == [sum(kept[0:8]), sum(kept[8:16]), sum(kept[16:24])]
    assert stream.status()["kept_per_step"] == kept


def test_questions_not_remembered_leave_no_turn_and_share_the_frames(stream, synthetic_clip, tiny_model_path):
    """``remember: false`` (how the accuracy harness asks): each question sees all frames so far and
    no past question; the frames before it come from the prefix cache."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    c = synthetic_clip
    stream.push(c.frames[:16])
    a = stream.ask("first question?", max_tokens=3, return_token_ids=True, remember=False)
    stream.push(c.frames[16:32])
    b = stream.ask("second question?", max_tokens=3, return_token_ids=True, remember=False)
    ids_a, ids_b = a["stream_state"]["prompt_token_ids"], b["stream_state"]["prompt_token_ids"]
    shared = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    assert sum(a["stream_state"]["video_tokens_per_chunk"]) < shared  # the first chunk is a common prefix
    assert b["stream_state"]["video_tokens_per_chunk"][0] == a["stream_state"]["video_tokens_per_chunk"][0]
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] >= (shared // BLOCK_SIZE) * BLOCK_SIZE > 0
    text = tok.decode(ids_b)
    assert (
        "first question" not in text
        and text.count("<|im_start|>user") == 1
        and text.count("<|im_start|>assistant") == 1
    )
    assert text.count("<|vision_start|>") == 2 and text.endswith("second question?<|im_end|>\n<|im_start|>assistant\n")
    assert stream.status()["questions"] == 2


def test_a_question_costs_only_the_new_frames(dtd_server, synthetic_clip):
    """Prefilled (uncached) tokens per question stay bounded while the stream grows."""
    s = open_stream(dtd_server.base_url, fps=2.0, dtd_enabled=False)
    try:
        uncached = []
        for q in range(3):
            s.push(synthetic_clip.frames[q * 16 : (q + 1) * 16])
            u = s.ask("what now?", max_tokens=2)["usage"]
            uncached.append(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"])
        new_video = 8 * 64  # each question brings 8 steps x 64 tokens (DTD off)
        assert all(x <= new_video + 2 * BLOCK_SIZE + 64 for x in uncached[1:]), uncached
    finally:
        s.close()


def test_scene_change_events_and_proactive_answer(dtd_server, synthetic_clip):
    s = open_stream(
        dtd_server.base_url, fps=2.0, event_level=0.5, standing_question="What changed?", answer_max_tokens=3
    )
    try:
        for i in range(0, 48, 6):
            s.push(synthetic_clip.frames[i : i + 6])
        import time

        deadline = time.monotonic() + 120
        events = []
        while time.monotonic() < deadline:
            events += s.events()
            if sum(e["type"] == "answer" for e in events) >= 3:
                break
            time.sleep(0.5)
        changes = [e for e in events if e["type"] == "scene_change"]
        assert [e["step"] for e in changes] == [12, 16, 20]
        for cut in synthetic_clip.cut_steps:
            assert any(abs(e["step"] - cut) <= 1 for e in changes)
        answers = [e for e in events if e["type"] == "answer"]
        assert len(answers) == 3 and all(a["question"] == "What changed?" for a in answers)
        assert {a["trigger"] for a in answers} == {e["index"] for e in changes}
    finally:
        s.close()


def test_sse_answer(stream, synthetic_clip):
    stream.push(synthetic_clip.frames[:8])
    chunks = list(stream.ask_stream("what happens?", max_tokens=3))
    assert chunks, "no events"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1, chunks
    text = "".join(ch["choices"][0]["delta"]["content"] for ch in chunks[:-1])
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    # the conversation recorded exactly the streamed answer
    follow = stream.ask("and?", max_tokens=1, return_token_ids=True)
    assert follow["usage"]["prompt_tokens"] > chunks[-1]["usage"]["prompt_tokens"]
    assert chunks[-1]["stream_state"]["ttft_s"] is not None and isinstance(text, str)


def test_video_chunk_upload(stream, synthetic_mp4):
    r = stream.push_video(synthetic_mp4)
    assert r["frames"] == 48 and r["steps"] == 24
    a = stream.ask("what happens?", max_tokens=2)
    assert a["stream_state"]["video_tokens_per_chunk"] == [460]


def test_limits_and_unknown_ids_are_4xx_and_others_keep_working(dtd_server, stream, synthetic_clip):
    base = dtd_server.base_url
    stream.push(synthetic_clip.frames[:8])
    # unknown / closed ids
    for method, path in [
        ("post", "/frames"),
        ("post", "/chat/completions"),
        ("get", "/events"),
        ("get", ""),
        ("delete", ""),
    ]:
        r = getattr(requests, method)(
            f"{base}/v1/streams/strm-doesnotexist{path}", json={"frames": [], "messages": []}, timeout=30
        )
        assert r.status_code in (404, 422), (path, r.status_code)
    # bad frames, bad settings
    r = requests.post(
        f"{stream.url}/frames", json={"frames": [{"image": base64.b64encode(b"not an image").decode()}]}, timeout=30
    )
    assert r.status_code == 400 and "frames[0]" in r.json()["error"]["message"]
    r = requests.post(f"{stream.url}/frames", json={"frames": [{"image": "%%%"}]}, timeout=30)
    assert r.status_code == 400
    r = requests.post(f"{base}/v1/streams", json={"dtd_threshold": 3}, timeout=30)
    assert r.status_code == 400 and "dtd_threshold" in r.json()["error"]["message"]
    r = requests.post(f"{base}/v1/streams", json={"model": "other-model"}, timeout=30)
    assert r.status_code == 404
    # more than a stream may take at once (the test server lets a stream hold 256 frames: 128 per append)
    with pytest.raises(StreamHTTPError) as e:
        stream.push(np.repeat(synthetic_clip.frames[:1], 130, axis=0))
    assert e.value.status == 413 and "at most 128 frames per append" in str(e.value)
    # too many streams (the test server allows TEST_MAX_STREAMS)
    extra = []
    with pytest.raises(StreamHTTPError) as e:
        for _ in range(TEST_MAX_STREAMS):
            extra.append(open_stream(base, fps=2.0))
    assert e.value.status == 429
    for s in extra:
        s.close()
    # the stream and the server keep answering
    assert stream.ask("still there?", max_tokens=2, ignore_eos=True)["usage"]["completion_tokens"] == 2
    assert requests.get(base + "/health", timeout=10).status_code == 200


def test_concurrent_appends_lose_no_frames(stream, synthetic_clip):
    errors = []

    def push(i):
        try:
            stream.push(synthetic_clip.frames[i * 4 : (i + 1) * 4])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and stream.status()["frames"] == 32
