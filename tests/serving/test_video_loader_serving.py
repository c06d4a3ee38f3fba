"""The plugin's video loader in a REAL server: the default for ``video_url``, equivalent to vLLM's
loader, bit-identical to stock in exact mode, guarded, correct under concurrency."""

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from analysis.harness.checks import assert_same_greedy, served_top_logprobs

EXACT = {"video": {"fast_decode": False}}


def _chat(srv, url, media_io=None, mm=None, logprobs=False):
    body = {
        "model": srv.model,
        "max_tokens": 4,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "what happens"}],
            }
        ],
    }
    if media_io is not None:
        body["media_io_kwargs"] = media_io
    if mm is not None:
        body["mm_processor_kwargs"] = mm
    if logprobs:
        body.update(logprobs=True, top_logprobs=5, return_tokens_as_token_ids=True)
    return requests.post(srv.base_url + "/v1/chat/completions", json=body, timeout=300)


def _stats(r) -> dict:
    assert r.status_code == 200, r.text[:300]
    return json.loads(r.headers["x-dtd-stats"])["videos"][0]


def test_the_plugins_loader_is_the_default_and_agrees_with_vllms(dtd_server, real_clip_mp4):
    """The real clip (640x360) is scaled to the processor's 336x588 by swscale instead of the HF
    processor's resize: the same grid, DTD decides (almost) every token the same."""
    assert "DTD video loader 'dtd_fast'" in dtd_server.log_path.read_text()
    fast = _stats(_chat(dtd_server, f"file://{real_clip_mp4}"))
    exact = _stats(_chat(dtd_server, f"file://{real_clip_mp4}", EXACT))
    assert fast["total"] == exact["total"] and fast["tokens_per_step"] == exact["tokens_per_step"]
    assert abs(fast["kept"] - exact["kept"]) <= 0.01 * fast["total"]


def test_exact_mode_is_stock_vllm_bit_for_bit(dtd_server, stock_server, real_clip_mp4):
    url = f"file://{real_clip_mp4}"
    ours = _chat(dtd_server, url, EXACT, mm={"dtd_enabled": False}, logprobs=True)
    stock = _chat(stock_server, url, logprobs=True)
    assert ours.status_code == stock.status_code == 200
    assert ours.json()["usage"]["prompt_tokens"] == stock.json()["usage"]["prompt_tokens"]

    class R:  # the openai-client shape served_top_logprobs reads
        def __init__(self, j):
            from types import SimpleNamespace as N

            self.choices = [
                N(
                    logprobs=N(
                        content=[
                            N(token=c["token"], top_logprobs=[N(**t) for t in c["top_logprobs"]])
                            for c in j["choices"][0]["logprobs"]["content"]
                        ]
                    )
                )
            ]

    assert_same_greedy(*served_top_logprobs(R(ours.json())), *served_top_logprobs(R(stock.json())))


def test_fast_decode_needs_no_trust_but_a_boolean(dtd_server, synthetic_mp4):
    url = f"file://{synthetic_mp4}"
    r = _chat(dtd_server, url, {"video": {"fast_decode": "yes"}})
    assert r.status_code == 400 and "media_io_kwargs.video.fast_decode" in r.json()["error"]["message"]
    r = _chat(dtd_server, url, {"video": {"fast_decode": True, "fps": 1}})  # other media_io keys: vLLM's rule
    assert r.status_code == 400 and "trust-request-mm-kwargs" in r.json()["error"]["message"]
    assert _chat(dtd_server, url, {"video": {"fast_decode": True}}).status_code == 200


@pytest.mark.parametrize(
    "payload",
    [
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        b"ffconcat version 1.0\nfile 'synthetic.mp4'\n",
        b"GIF89a" + b"\x00" * 64,
    ],
    ids=["hls", "ffconcat", "gif"],
)
def test_video_urls_are_only_self_contained_containers(dtd_server, payload):
    url = "data:video/mp4;base64," + base64.b64encode(payload).decode()
    for media_io in (None, EXACT):
        r = _chat(dtd_server, url, media_io)
        assert r.status_code == 400 and "not a video container this server accepts" in r.json()["error"]["message"], (
            r.text
        )
    assert dtd_server.alive()


def test_concurrent_requests_are_each_correct(dtd_server, real_clip_mp4, media_dir):
    """Four different videos decoded at once (none in the processor cache yet), then each alone (a
    request-level ``dtd_enabled: true``, the default, is a new cache key): the same masks."""
    from analysis.lib.video import load_video, write_video

    frames = load_video(real_clip_mp4, fps=None).frames
    urls = [
        f"file://{write_video(media_dir / f'concurrent_{i}.mp4', frames[i : i + 10], 2.0, lossless=False)}"
        for i in range(4)
    ]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda u: _stats(_chat(dtd_server, u))["mask_sha256"], urls))
    alone = [_stats(_chat(dtd_server, u, mm={"dtd_enabled": True}))["mask_sha256"] for u in urls]
    assert together == alone and len(set(alone)) == 4
