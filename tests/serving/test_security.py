"""Security over HTTP: no file read outside --allowed-local-media-path, stream routes only where
allow-listed, stream ids unguessable and a stream reachable only by its own id."""

import base64
import os
import re

import requests

from vllm_plugin.client import open_stream


def _chat_video(srv, url):
    return requests.post(
        srv.base_url + "/v1/chat/completions",
        timeout=120,
        json={
            "model": srv.model,
            "max_tokens": 2,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "what"}],
                }
            ],
        },
    )


def test_no_file_read_outside_the_allowed_media_path(dtd_server, media_dir):
    link = media_dir / "passwd_link.mp4"
    if not link.is_symlink():
        os.symlink("/etc/passwd", link)
    outside_dir = media_dir / "inner"
    outside_dir.mkdir(exist_ok=True)
    for url in (
        "file:///etc/passwd",
        f"file://{media_dir}/../../../../etc/passwd",
        f"file://{outside_dir}/../../../../../etc/passwd",
        f"file://{media_dir}/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"file://{link}",
        "file://localhost/etc/passwd",
    ):
        r = _chat_video(dtd_server, url)
        assert r.status_code == 400, (url, r.status_code, r.text[:300])
        assert "root:" not in r.text
    # images go through the same media connector
    r = requests.post(
        dtd_server.base_url + "/v1/chat/completions",
        timeout=60,
        json={
            "model": dtd_server.model,
            "max_tokens": 2,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
                        {"type": "text", "text": "x"},
                    ],
                }
            ],
        },
    )
    assert r.status_code == 400 and "root:" not in r.text


def test_stream_uploads_are_bytes_never_paths_or_urls(dtd_server):
    s = open_stream(dtd_server.base_url, fps=2.0)
    try:
        for value in ("file:///etc/passwd", "/etc/passwd", "http://127.0.0.1:1/x.mp4"):
            r = requests.post(f"{s.url}/frames", json={"video": value}, timeout=60)
            assert r.status_code == 400 and "root:" not in r.text, (value, r.text[:200])
            r = requests.post(f"{s.url}/frames", json={"frames": [{"image": value}]}, timeout=60)
            assert r.status_code == 400 and "root:" not in r.text, (value, r.text[:200])
    finally:
        s.close()


def test_the_stock_baseline_runs_no_dtd_code(stock_server, dtd_server, synthetic_mp4, synthetic_clip, media_dir):
    """Baselines are what a user gets without us: the stock server runs with no plugin loaded, so
    every vLLM rule the plugin relaxes or wraps is vLLM's own there (and is not on the DTD server)."""
    body = lambda srv: {
        "model": srv.model,
        "max_tokens": 2,
        "mm_processor_kwargs": {"dtd_threshold": 0.1},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{synthetic_mp4}"}},
                    {"type": "text", "text": "what"},
                ],
            }
        ],
    }
    stock = requests.post(stock_server.base_url + "/v1/chat/completions", json=body(stock_server), timeout=120)
    assert stock.status_code == 400 and "--trust-request-mm-kwargs" in stock.text  # vLLM's rule, unpatched
    assert "x-dtd-stats" not in stock.headers
    ours = requests.post(dtd_server.base_url + "/v1/chat/completions", json=body(dtd_server), timeout=120)
    assert ours.status_code == 200 and "x-dtd-stats" in ours.headers
    # a one-frame video: vLLM's own ZeroDivisionError (a 500) on stock, the plugin's 400 on the DTD server
    from analysis.lib.video import write_video

    one = write_video(media_dir / "one_frame_for_stock.mp4", synthetic_clip.frames[:1], 2.0)
    bad = {
        "model": stock_server.model,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{one}"}},
                    {"type": "text", "text": "what"},
                ],
            }
        ],
    }
    assert requests.post(stock_server.base_url + "/v1/chat/completions", json=bad, timeout=120).status_code >= 500
    assert (
        requests.post(
            dtd_server.base_url + "/v1/chat/completions", json={**bad, "model": dtd_server.model}, timeout=120
        ).status_code
        == 400
    )
    metrics = requests.get(stock_server.base_url + "/metrics", timeout=30).text
    assert "vllm_dtd_" not in metrics and "vllm_dtd_" in requests.get(dtd_server.base_url + "/metrics", timeout=30).text


def test_the_stock_server_has_no_stream_routes(stock_server):
    # the plugin is installed in this venv; the baseline loads none of its plugins (the opt-in rule
    # of vLLM's endpoint plugins is tested in test_plugin_units.py)
    paths = requests.get(stock_server.base_url + "/openapi.json", timeout=30).json()["paths"]
    assert not any(p.startswith("/v1/streams") for p in paths)
    assert requests.post(stock_server.base_url + "/v1/streams", json={}, timeout=30).status_code == 404


def test_stream_ids_are_unguessable_and_isolate_streams(dtd_server, synthetic_clip):
    a = open_stream(dtd_server.base_url, fps=2.0)
    b = open_stream(dtd_server.base_url, fps=2.0)
    try:
        for s in (a, b):
            token = s.id.removeprefix("strm-")
            assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", token), s.id  # >= 192 random bits
        assert a.id != b.id
        # there is no way to list streams
        assert requests.get(dtd_server.base_url + "/v1/streams", timeout=30).status_code in (404, 405)
        pushed_a = a.push(synthetic_clip.frames[:4])
        # one character off is another (non-existent) stream
        near = a.id[:-1] + ("A" if a.id[-1] != "A" else "B")
        r = requests.post(
            f"{dtd_server.base_url}/v1/streams/{near}/frames",
            timeout=30,
            json={"frames": [{"image": base64.b64encode(b"x").decode()}]},
        )
        assert r.status_code == 404
        for path in ("", "/events"):
            assert requests.get(f"{dtd_server.base_url}/v1/streams/{near}{path}", timeout=30).status_code == 404
        # B saw none of A's frames, in its state or in its answers
        assert b.status()["frames"] == 0 and a.status()["frames"] == 4
        pushed_b = b.push(synthetic_clip.frames[10:14])
        ans_b = b.ask("what do you see?", max_tokens=1)
        ans_a = a.ask("what do you see?", max_tokens=1)
        # each answer's prompt holds exactly its own stream's kept tokens
        assert ans_a["stream_state"]["video_tokens_per_chunk"] == [sum(pushed_a["kept_per_step"])]
        assert ans_b["stream_state"]["video_tokens_per_chunk"] == [sum(pushed_b["kept_per_step"])]
    finally:
        a.close()
        b.close()
