"""The DTD vLLM plugin against a REAL server (tiny checkpoint, CPU, HTTP, openai client)."""

import json

import pytest
import requests

from analysis.harness.checks import assert_same_greedy, served_top_logprobs
from conftest import BLOCK_SIZE, chat_video, chat_with_stats
from vllm_plugin.core import DTDConfig, dtd_keep_mask, mask_digest, pixel_tokens

Q = "what happens"


def _raw_chat(srv, video_url, mm_kwargs=None, max_tokens=4):
    body = {
        "model": srv.model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video_url", "video_url": {"url": video_url}}, {"type": "text", "text": Q}],
            }
        ],
    }
    if mm_kwargs is not None:
        body["mm_processor_kwargs"] = mm_kwargs
    return requests.post(srv.base_url + "/v1/chat/completions", json=body, timeout=300)


# vLLM's own video loader (bit-identical frames): the reference pipeline resizes with the HF processor,
# the plugin's default loader with swscale (tests/serving/test_video_loader_serving.py compares the two)
EXACT_LOADER = {"video": {"fast_decode": False}}


@pytest.mark.parametrize("mm", [{"dtd_enabled": False}, {"dtd_threshold": 0.0}])
def test_no_drop_equals_stock_vllm(dtd_server, stock_server, synthetic_mp4, mm):
    ours, stats = chat_with_stats(dtd_server, synthetic_mp4, **mm)
    stock = chat_video(stock_server.client(), stock_server.model, synthetic_mp4, Q)
    assert stats and stats[0]["kept"] == stats[0]["total"] == 24 * 64
    assert ours.usage.prompt_tokens == stock.usage.prompt_tokens
    assert_same_greedy(*served_top_logprobs(ours), *served_top_logprobs(stock))


def test_prompt_tokens_are_text_plus_kept_video(dtd_server, stock_server, synthetic_mp4, synthetic_clip):
    ours, stats = chat_with_stats(dtd_server, synthetic_mp4)  # server defaults: pixel L1, tau 0.05
    stock = chat_video(stock_server.client(), stock_server.model, synthetic_mp4, Q)
    (s,) = stats
    text_tokens = stock.usage.prompt_tokens - s["total"]
    assert ours.usage.prompt_tokens == text_tokens + s["kept"]
    assert s["kept"] < s["total"]
    assert (
        s["kept"] == int(synthetic_clip.changed.sum()) and s["kept_per_step"] == synthetic_clip.expected_kept_per_step()
    )
    assert not {"kept_per_frame", "tokens_per_frame"} & set(s)  # release 0.1's names are gone


CASES = [
    ("synthetic", {"dtd_threshold": 0.05}),
    ("real", {"dtd_threshold": 0.05}),
    ("real", {"dtd_threshold": 0.1, "dtd_reference": "last_kept"}),
    ("real", {"dtd_threshold": 0.995, "dtd_metric": "cosine"}),
]


@pytest.mark.parametrize("clip, mm", CASES, ids=[f"{c}-{json.dumps(m)}" for c, m in CASES])
def test_served_equals_core_mask_and_reference_pipeline(
    dtd_server, served_reference, synthetic_mp4, real_clip_mp4, clip, mm
):
    """The served keep mask is dtd_keep_mask on the same processed pixels, and greedy outputs
    (token ids and top-5 log-probabilities) equal the transformers reference at the same setting
    (and the served dtype, with its tolerances: analysis/harness/checks.py)."""
    from analysis.lib.video import load_video

    reference = served_reference
    path = synthetic_mp4 if clip == "synthetic" else real_clip_mp4
    v = load_video(path, fps=None)
    cfg = DTDConfig(
        threshold=mm["dtd_threshold"], metric=mm.get("dtd_metric", "l1"), reference=mm.get("dtd_reference", "previous")
    )
    video = reference.process_video(v.frames, v.fps)
    mask = dtd_keep_mask(pixel_tokens(video.pixel_values, video.grid_thw), cfg.threshold, cfg.metric, cfg.reference)

    # the synthetic clip is not resized (224x224): the plugin's loader gives the same pixels
    resp, (s,) = chat_with_stats(dtd_server, path, media_io=None if clip == "synthetic" else EXACT_LOADER, **mm)
    assert s["mask_sha256"] == mask_digest(mask)
    assert s["kept"] == int(mask.sum()) < s["total"]

    prepared = reference.prepare(Q, video=video, dtd=cfg)
    assert resp.usage.prompt_tokens == prepared.num_prompt_tokens
    ids, tops = served_top_logprobs(resp)
    gen = reference.generate(prepared, max_new_tokens=len(ids), stop_at_eos=False)
    assert_same_greedy(ids, tops, gen.token_ids, gen.top_logprobs)


@pytest.mark.parametrize(
    "mm, field",
    [
        ({"dtd_threshold": 1.5}, "dtd_threshold"),
        ({"dtd_threshold": "high"}, "dtd_threshold"),
        ({"dtd_metric": "l2"}, "dtd_metric"),
        ({"dtd_reference": "first"}, "dtd_reference"),
        ({"dtd_enabled": "yes"}, "dtd_enabled"),
        ({"dtd_criterion": "features"}, "dtd_criterion"),
        ({"dtd_typo": 1}, "dtd_typo"),
        ({"dtd_metric": "cosine", "dtd_threshold": -2}, "dtd_threshold"),
    ],
)
def test_bad_dtd_values_are_400_naming_the_field(dtd_server, synthetic_mp4, mm, field):
    r = _raw_chat(dtd_server, f"file://{synthetic_mp4}", mm)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_other_mm_kwargs_still_need_trust(dtd_server, synthetic_mp4):
    r = _raw_chat(dtd_server, f"file://{synthetic_mp4}", {"dtd_threshold": 0.1, "max_pixels": 10**9})
    assert r.status_code == 400 and "trust-request-mm-kwargs" in r.json()["error"]["message"]


def test_corrupt_and_missing_videos_are_400_and_server_keeps_answering(dtd_server, media_dir, synthetic_mp4):
    bad = media_dir / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 500)
    truncated = media_dir / "truncated.mp4"
    truncated.write_bytes(synthetic_mp4.read_bytes()[:2000])
    for url in (f"file://{bad}", f"file://{truncated}", "file:///etc/passwd"):
        r = _raw_chat(dtd_server, url)
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text[:300])
    assert dtd_server.alive()
    ok = _raw_chat(dtd_server, f"file://{synthetic_mp4}")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0


def test_same_video_twice_hits_prefix_and_mm_caches(dtd_server, real_clip_mp4):
    mm = {"dtd_threshold": 0.07}  # a setting no other test uses: the first request is cold
    hits0 = dtd_server.metric("vllm:mm_cache_hits_total")
    first, s1 = chat_with_stats(dtd_server, real_clip_mp4, **mm)
    second, s2 = chat_with_stats(dtd_server, real_clip_mp4, **mm)
    # cold: at most the text blocks before the video can come from other requests' cache
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - s1[0]["kept"]
    cached = second.usage.prompt_tokens_details.cached_tokens
    block = BLOCK_SIZE  # cached tokens come in whole KV blocks
    assert cached >= (second.usage.prompt_tokens // block) * block - block and cached > 0
    assert dtd_server.metric("vllm:mm_cache_hits_total") >= hits0 + 1
    assert s1 == s2  # stats are reported for cached items too


def test_stats_reach_metrics_and_log(dtd_server, synthetic_mp4):
    before_in = dtd_server.metric("vllm_dtd_video_tokens_in_total")
    before_kept = dtd_server.metric("vllm_dtd_video_tokens_kept_total")
    _, (s,) = chat_with_stats(dtd_server, synthetic_mp4, dtd_threshold=0.2)
    assert dtd_server.metric("vllm_dtd_video_tokens_in_total") == before_in + s["total"]
    assert dtd_server.metric("vllm_dtd_video_tokens_kept_total") == before_kept + s["kept"]
    assert f"DTD: video tokens kept {s['kept']} of {s['total']}" in dtd_server.log_path.read_text()


def test_plugin_loads_in_every_process_without_errors(dtd_server):
    log = dtd_server.log_path.read_text()
    assert "Qwen2_5_VLDTDForConditionalGeneration" in log
    for bad in ("Failed to load plugin", "already registered", "Traceback", "EngineDeadError"):
        assert bad not in log
    # the API server and the engine core are separate processes, both ran the plugin
    r = requests.post(
        dtd_server.base_url + "/v1/chat/completions",
        json={"model": dtd_server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200


def test_text_only_requests_are_untouched(dtd_server, stock_server):
    def run(srv):
        return srv.client().chat.completions.create(
            model=srv.model,
            messages=[{"role": "user", "content": "describe the scene"}],
            max_tokens=5,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
            extra_body={"return_tokens_as_token_ids": True},
        )

    a, b = run(dtd_server), run(stock_server)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert_same_greedy(*served_top_logprobs(a), *served_top_logprobs(b))
