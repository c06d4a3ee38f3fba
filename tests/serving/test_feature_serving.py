"""Feature-level DTD and eager prefill on a REAL vLLM server (tiny checkpoint, CPU, HTTP).

The API server's vision tower decides; the engine gets the kept rows (``video_embeds``). Streams
encode each temporal step once, on arrival, and (``prefill: eager``) put it in the KV cache before
any question."""

import threading

import pytest

from analysis.harness.checks import (
    assert_same_greedy,
    assert_same_kept,
    assert_same_mask,
    chat_with_stats,
    served_top_logprobs,
)
from conftest import BLOCK_SIZE
from vllm_plugin.client import open_stream
from vllm_plugin.core import DTDConfig

Q = "what happens"
ENCODED = "vllm_dtd_encoder_steps_total"


@pytest.mark.parametrize(
    "clip, mm",
    [
        ("synthetic", {"dtd_criterion": "feature"}),
        ("real", {"dtd_criterion": "feature"}),
        ("real", {"dtd_criterion": "feature", "dtd_threshold": 0.8, "dtd_reference": "last_kept"}),
    ],
)
def test_served_feature_dtd_equals_the_reference_pipeline(
    dtd_server, served_reference, synthetic_mp4, real_clip_mp4, clip, mm
):
    """Same keep mask (digest), same prompt length, greedy tokens and top-5 logprobs within 1e-4 of the
    transformers reference with feature DTD (float32; bf16: analysis/harness/checks.py); the video is
    encoded once (in the API server)."""
    from analysis.lib.video import load_video

    reference = served_reference
    path = synthetic_mp4 if clip == "synthetic" else real_clip_mp4
    v = load_video(path, fps=None)
    video = reference.process_video(v.frames, v.fps)
    cfg = DTDConfig(
        criterion="feature", threshold=mm.get("dtd_threshold"), reference=mm.get("dtd_reference", "previous")
    )
    prepared = reference.prepare(Q, video=video, dtd=cfg)
    assert 0 < int(prepared.mask.sum()) < prepared.mask.numel()

    before = dtd_server.metric(ENCODED) or 0.0
    # the real clip through vLLM's own loader: the reference resizes with the HF processor (the
    # plugin's loader with swscale; tests/serving/test_video_loader_serving.py); the synthetic one is not resized
    media_io = None if clip == "synthetic" else {"video": {"fast_decode": False}}
    resp, (s,) = chat_with_stats(dtd_server, path, Q, media_io=media_io, **mm)
    same_mask = assert_same_mask(s, reference, prepared, cfg)  # float32: the same digest
    assert dtd_server.metric(ENCODED) - before == video.grid_thw[0]  # every temporal step once, none in the engine
    if not same_mask:  # bf16: a near-threshold tie decided the other way, the prompts differ
        return
    assert resp.usage.prompt_tokens == prepared.num_prompt_tokens
    ids, tops = served_top_logprobs(resp)
    gen = reference.generate(prepared, max_new_tokens=len(ids), stop_at_eos=False)
    assert_same_greedy(ids, tops, gen.token_ids, gen.top_logprobs)


def _wait_prefilled(stream):
    st = stream.wait_prefilled(timeout=120)
    assert not st["prefill_pending"], "eager prefill did not catch up"
    return st


def test_feature_stream_encodes_on_arrival_and_a_question_adds_no_encoding(
    dtd_server, served_reference, synthetic_clip
):
    frames = synthetic_clip.frames
    reference, cfg = served_reference, DTDConfig(criterion="feature")
    prepared = reference.prepare(Q, video=reference.process_video(frames, 2.0), dtd=cfg)
    s = open_stream(dtd_server.base_url, fps=2.0, dtd_criterion="feature")
    try:
        before = dtd_server.metric(ENCODED) or 0.0
        kept = []
        for a, b in ((0, 6), (6, 7), (7, 20), (20, 36), (36, 48)):  # ragged appends, odd frame counts included
            kept += s.push(frames[a:b])["kept_per_step"]
        assert_same_kept(kept, reference, prepared, cfg)  # chunked = whole, step by step (float32: equal)
        assert dtd_server.metric(ENCODED) - before == 24
        _wait_prefilled(s)
        encoded = dtd_server.metric(ENCODED)
        a = s.ask("what now?", max_tokens=2, return_token_ids=True)
        assert dtd_server.metric(ENCODED) == encoded  # a question after eager prefill encodes nothing
        st = s.status()
        assert st["dtd"]["criterion"] == "feature" and st["prefill"] == "eager" and st["prefills"] >= 1
        assert sum(a["stream_state"]["video_tokens_per_chunk"]) >= sum(kept)
    finally:
        s.close()


@pytest.mark.parametrize("criterion", ["pixel", "feature"])
def test_eager_prefill_leaves_a_question_only_its_own_text(dtd_server, synthetic_clip, tiny_model_path, criterion):
    """prompt − cached ≤ the question's own tokens (after the turn's last video) + one KV block; lazy
    prefill pays the new frames with the question."""
    from transformers import AutoTokenizer

    vision_end = AutoTokenizer.from_pretrained(tiny_model_path).convert_tokens_to_ids("<|vision_end|>")
    eager = open_stream(dtd_server.base_url, fps=2.0, dtd_criterion=criterion, prefill="eager")
    lazy = open_stream(dtd_server.base_url, fps=2.0, dtd_criterion=criterion, prefill="lazy")
    try:
        for q in range(3):
            part = synthetic_clip.frames[q * 16 : (q + 1) * 16]
            eager.push(part)
            lazy.push(part)
            _wait_prefilled(eager)
            e = eager.ask(f"question {q}?", max_tokens=2, return_token_ids=True)
            z = lazy.ask(f"question {q}?", max_tokens=2, return_token_ids=True)
            ids = e["stream_state"]["prompt_token_ids"]
            own = len(ids) - 1 - max(i for i, t in enumerate(ids) if t == vision_end)
            prefilled = e["usage"]["prompt_tokens"] - e["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert prefilled <= own + BLOCK_SIZE, (q, own, e["usage"])
            lazy_prefilled = z["usage"]["prompt_tokens"] - z["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert lazy_prefilled >= z["stream_state"]["video_tokens_per_chunk"][-1] > 0  # the new frames
    finally:
        eager.close()
        lazy.close()


def test_eight_concurrent_eager_streams_lose_no_frame(dtd_server, synthetic_clip):
    """8 streams (4 with DTD off: every token counts; 4 feature-level) append and ask concurrently
    with eager prefill: every answer's prompt holds exactly the frames appended before it."""
    frames = synthetic_clip.frames[:32]
    errors, results = [], {}

    def run(i):
        settings = {"dtd_enabled": False} if i % 2 == 0 else {"dtd_criterion": "feature"}
        s = open_stream(dtd_server.base_url, fps=2.0, **settings)
        try:
            seen = []
            kept = []
            for q in range(4):
                kept += s.push(frames[q * 8 : (q + 1) * 8])["kept_per_step"]
                a = s.ask(f"stream {i} question {q}?", max_tokens=2)
                seen.append(
                    (
                        sum(a["stream_state"]["video_tokens_per_chunk"]),
                        len(a["stream_state"]["video_tokens_per_chunk"]),
                        sum(kept),
                        a["stream_state"]["frames"],
                    )
                )
            results[i] = seen
        except Exception as e:  # reported below
            errors.append((i, repr(e)))
        finally:
            s.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(600) for t in threads]
    assert not errors, errors
    assert sorted(results) == list(range(8))
    for i, seen in results.items():
        for q, (video_tokens, chunks, kept, nframes) in enumerate(seen):
            assert nframes == (q + 1) * 8
            if i % 2 == 0:
                assert video_tokens == kept == (q + 1) * 4 * 64  # DTD off: every token of every frame before it
            else:  # a chunk where DTD kept nothing serves one token
                assert kept <= video_tokens <= kept + chunks
