"""Bad input over HTTP against the REAL DTD server: every case gets a clear 4xx (or a clean SSE
error), the engine never dies, and other requests and streams lose nothing."""

import base64
import json
import threading

import numpy as np
import pytest
import requests

from analysis.lib.video import write_video
from conftest import generated_when_settled
from vllm_plugin.client import open_stream


def _chat(srv, content, mm_kwargs=None, max_tokens=2, **body):
    req = {
        "model": srv.model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
        **body,
    }
    if mm_kwargs is not None:
        req["mm_processor_kwargs"] = mm_kwargs
    return requests.post(srv.base_url + "/v1/chat/completions", json=req, timeout=300)


def _video(url):
    return [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "what happens"}]


def _data_url(path, mime="video/mp4"):
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _error(r) -> str:
    return r.json()["error"]["message"]


def _assert_4xx(r, *words):
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:400])
    msg = _error(r)
    for w in words:
        assert w in msg, (w, msg)


@pytest.fixture(scope="module")
def bad_media(media_dir, synthetic_clip):
    import av

    out = {}
    out["empty"] = media_dir / "empty.mp4"
    out["empty"].write_bytes(b"")
    zero = media_dir / "zero_frames.mp4"  # a valid container with a video stream and no frames
    c = av.open(str(zero), "w")
    s = c.add_stream("libx264rgb", rate=2)
    s.width, s.height, s.pix_fmt = 64, 64, "rgb24"
    c.start_encoding()
    c.close()
    out["zero_frames"] = zero
    out["one_frame"] = write_video(media_dir / "one_frame.mp4", synthetic_clip.frames[:1], 2.0)
    out["text"] = media_dir / "notes.mp4"
    out["text"].write_text("this is not a video\n" * 50)
    from vllm_plugin.media import encode_png

    out["png"] = media_dir / "frame.png"
    out["png"].write_bytes(encode_png(synthetic_clip.frames[0]))
    out["png_as_mp4"] = media_dir / "frame_png.mp4"
    out["png_as_mp4"].write_bytes(out["png"].read_bytes())
    out["dir"] = media_dir / "a_directory.mp4"
    out["dir"].mkdir(exist_ok=True)
    return out


@pytest.mark.parametrize(
    "name,words",
    [
        ("empty", ["video_url"]),
        ("zero_frames", ["video_url"]),
        ("one_frame", ["video_url", "at least 2"]),
        ("text", ["video_url"]),
        ("png_as_mp4", ["video_url"]),
        ("dir", ["video_url"]),
    ],
)
def test_unusable_video_files_are_400(dtd_server, bad_media, name, words):
    r = _chat(dtd_server, _video(f"file://{bad_media[name]}"))
    _assert_4xx(r, *words)


def test_missing_file_is_400_not_500(dtd_server, media_dir):
    _assert_4xx(_chat(dtd_server, _video(f"file://{media_dir}/no_such_video.mp4")), "video_url", "no such file")


@pytest.mark.parametrize("mime", ["video/mp4", "image/png", "text/plain"])
def test_data_urls_of_the_wrong_kind_are_4xx(dtd_server, bad_media, mime):
    _assert_4xx(_chat(dtd_server, _video(_data_url(bad_media["png"], mime))))
    _assert_4xx(_chat(dtd_server, _video("data:video/mp4;base64,%%%not-base64")))


def test_a_video_sent_as_an_image_is_4xx(dtd_server, synthetic_mp4):
    r = _chat(
        dtd_server,
        [{"type": "image_url", "image_url": {"url": f"file://{synthetic_mp4}"}}, {"type": "text", "text": "hi"}],
    )
    _assert_4xx(r)


def test_tiny_video_is_served(dtd_server, media_dir):
    # 1x1 pixels: the processor resizes it up to one 28x28 patch grid; nothing to reject
    path = write_video(media_dir / "one_by_one.mp4", np.full((4, 1, 1, 3), 200, np.uint8), 2.0)
    r = _chat(dtd_server, _video(f"file://{path}"))
    assert r.status_code == 200, r.text[:400]
    assert r.json()["usage"]["completion_tokens"] == 2


def test_huge_frames_are_resized_and_served(dtd_server, media_dir):
    # 4K frames: the processor resizes them to its max_pixels; the prompt still fits
    g = np.zeros((4, 2160, 3840, 3), np.uint8)
    g[..., 0] = np.arange(3840) % 256
    g[..., 1] = (np.arange(2160) % 256)[:, None]
    path = write_video(media_dir / "uhd.mp4", g, 2.0, lossless=False)
    r = _chat(dtd_server, _video(f"file://{path}"))
    assert r.status_code == 200, r.text[:400]


def test_a_long_video_is_served_and_one_beyond_the_context_is_400(dtd_server, media_dir):
    # 30 minutes at 1 fps: Qwen2.5-VL's loader samples at most 768 frames
    def clip(side):
        levels = (np.arange(1800) * 7 % 251).astype(np.uint8)
        return np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (1800, side, side, 3)))

    small = write_video(media_dir / "long_small.mp4", clip(56), 1.0, lossless=False)
    r = _chat(dtd_server, _video(f"file://{small}"))
    assert r.status_code == 200, r.text[:400]
    # at 448x448 that is 384 steps x 256 tokens, far beyond the test server's 16k context
    big = write_video(media_dir / "long_big.mp4", clip(448), 1.0, lossless=False)
    _assert_4xx(_chat(dtd_server, _video(f"file://{big}")), "maximum context length")
    assert dtd_server.alive()


@pytest.mark.parametrize(
    "mm",
    [
        "not a dict",
        [1, 2],
        {"dtd_threshold": None},
        {"dtd_threshold": float("nan")},
        {"dtd_enabled": 1},
        {"dtd_metric": ["l1"]},
        {"dtd_threshold": 1e308},
    ],
)
def test_invalid_mm_processor_kwargs_are_4xx(dtd_server, synthetic_mp4, mm):
    body = json.dumps(
        {
            "model": dtd_server.model,
            "max_tokens": 2,
            "mm_processor_kwargs": mm,
            "messages": [{"role": "user", "content": _video(f"file://{synthetic_mp4}")}],
        },
        allow_nan=True,
    )
    r = requests.post(
        dtd_server.base_url + "/v1/chat/completions",
        data=body,
        headers={"content-type": "application/json"},
        timeout=300,
    )
    assert 400 <= r.status_code < 500, (mm, r.status_code, r.text[:300])


def test_oversize_and_bomb_frames_are_4xx(dtd_server):
    import io

    from PIL import Image

    s = open_stream(dtd_server.base_url, fps=2.0)
    try:
        buf = io.BytesIO()
        Image.new("RGB", (20000, 16), (10, 20, 30)).save(buf, format="PNG")  # tiny file, too wide
        r = requests.post(
            f"{s.url}/frames", json={"frames": [{"image": base64.b64encode(buf.getvalue()).decode()}]}, timeout=60
        )
        _assert_4xx(r, "frames[0]", "size")
        # a body beyond the upload limit (64 MiB) is refused before decoding
        r = requests.post(f"{s.url}/frames", json={"video": "A" * (88 * 2**20)}, timeout=120)
        assert r.status_code == 413, r.text[:300]
        assert s.status()["frames"] == 0
    finally:
        s.close()


def test_client_disconnect_mid_answer_frees_the_request(dtd_server, synthetic_clip):
    s = open_stream(dtd_server.base_url, fps=2.0)
    other = open_stream(dtd_server.base_url, fps=2.0)
    try:
        s.push(synthetic_clip.frames[:8])
        other.push(synthetic_clip.frames[8:16])
        # SSE: read the first chunk of a long answer (tokens are being generated), then hang up. This
        # model writes ~600 tokens/s here: the answer would run ~20 s to max_tokens, and with
        # ignore_eos only an abort ends it earlier.
        generated = dtd_server.metric("vllm:generation_tokens_total")
        max_tokens = 12000
        with requests.post(
            f"{s.url}/chat/completions",
            stream=True,
            timeout=120,
            json={
                "messages": [{"role": "user", "content": "tell a long story"}],
                "max_tokens": max_tokens,
                "stream": True,
                "temperature": 1.0,
                "ignore_eos": True,
            },
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held: a dropped generator closes urllib3's chunked connection
            assert next(lines).startswith(b"data: {")
        total = generated_when_settled(dtd_server, within=60) - generated
        assert 0 < total < max_tokens, f"{total} of {max_tokens} tokens generated: the answer was not aborted"
        # an answer budget beyond the context left is a 400, before the event stream starts
        r = requests.post(
            f"{s.url}/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9, "stream": True},
        )
        _assert_4xx(r, "max_tokens", "context")
        assert s.status()["questions"] == 0  # the turn that was cut off is not part of the conversation
        # the same through vLLM's own endpoint (its first chunk, the role, follows the first token)
        generated = dtd_server.metric("vllm:generation_tokens_total")
        with requests.post(
            dtd_server.base_url + "/v1/chat/completions",
            stream=True,
            timeout=120,
            json={
                "model": dtd_server.model,
                "max_tokens": max_tokens,
                "stream": True,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": "tell a long story"}],
            },
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held: a dropped generator closes urllib3's chunked connection
            assert next(lines).startswith(b"data: {")
        total = generated_when_settled(dtd_server, within=60) - generated
        assert 0 < total < max_tokens, f"{total} of {max_tokens} tokens generated: vLLM did not abort"
        # both streams answer at once, with their frames intact
        a = s.ask("still there?", max_tokens=2, ignore_eos=True)
        b = other.ask("and you?", max_tokens=2, ignore_eos=True)
        assert a["usage"]["completion_tokens"] == 2 and b["usage"]["completion_tokens"] == 2
        assert s.status()["frames"] == 8 and other.status()["frames"] == 8
    finally:
        s.close()
        other.close()


def test_concurrent_appends_and_questions_on_one_stream(dtd_server, synthetic_clip):
    s = open_stream(dtd_server.base_url, fps=2.0)
    errors, answers = [], []

    def push(i):
        try:
            s.push(synthetic_clip.frames[i * 2 : (i + 1) * 2])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def ask():
        try:
            answers.append(s.ask("now?", max_tokens=2, ignore_eos=True))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=push, args=(i,)) for i in range(12)] + [
            threading.Thread(target=ask) for _ in range(3)
        ]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        assert s.status()["frames"] == 24
        # every question saw a whole number of steps of the frames pushed so far
        assert all(a["usage"]["completion_tokens"] == 2 for a in answers)
        final = s.ask("all of it?", max_tokens=1)
        assert sum(final["stream_state"]["video_tokens_per_chunk"]) > 0
    finally:
        s.close()


def test_the_engine_survived_everything(dtd_server, synthetic_mp4):
    assert dtd_server.alive()
    log = dtd_server.log_path.read_text()
    assert "EngineDeadError" not in log and "EngineCore encountered a fatal error" not in log
    r = _chat(dtd_server, _video(f"file://{synthetic_mp4}"))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def _upload(s, data: bytes):
    return requests.post(f"{s.url}/frames", json={"video": base64.b64encode(data).decode()}, timeout=120)


def test_uploads_that_reference_other_files_are_400_and_read_nothing(dtd_server, tmp_path):
    """FFmpeg demuxers that open what an upload names (ffconcat lists, HLS playlists, image2
    patterns) are never reached: the server decodes uploads only as MP4/MOV, Matroska/WebM, AVI or
    MPEG-TS, chosen from the leading bytes. The server runs in this process's working directory;
    the bundled clip is named relative to it, as an attacker would name a file on the server."""
    import io
    import os

    from PIL import Image

    from conftest import REPO

    target = os.path.relpath(REPO / "assets" / "moviepy_airplane.mp4")  # what the server would open
    uploads = {
        "ffconcat": f"ffconcat version 1.0\nfile '{target}'\n".encode(),
        "hls": (
            f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\n{target}\n#EXT-X-ENDLIST\n"
        ).encode(),
        "image2 pattern": b"assets/frame%03d.png",
    }
    s = open_stream(dtd_server.base_url, fps=2.0)
    try:
        for name, data in uploads.items():
            r = _upload(s, data)
            _assert_4xx(r, "video:", "not a video container")
            assert r.status_code == 400, (name, r.text[:300])
        for fmt in ("GIF", "BMP", "TIFF"):  # images: PNG, JPEG, WebP only
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (9, 9, 9)).save(buf, format=fmt)
            r = requests.post(
                f"{s.url}/frames", timeout=60, json={"frames": [{"image": base64.b64encode(buf.getvalue()).decode()}]}
            )
            _assert_4xx(r, "frames[0]", "PNG, JPEG or WebP")
        assert s.status()["frames"] == 0
    finally:
        s.close()


def _rss_mb(pid: int, field: str = "VmHWM") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def _reset_peak_rss(pid: int) -> float:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux: ``clear_refs`` 5); returns it."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _rss_mb(pid, "VmHWM")


def test_decompression_bomb_uploads_are_413_and_cost_no_memory(dtd_server, synthetic_clip):
    """A 28-KB H.264 chunk of 256 black 1080p frames (1.6 GB of RGB) is refused from its header;
    one whose container understates its frames (two MPEG-TS segments both starting at 0) is
    stopped at the decoded-pixel budget, frames decoded one at a time. The API server's peak RSS
    (VmHWM, reset first; this server's API process is the launcher) barely moves."""
    from test_media_units import make_video

    bomb = make_video("mp4", "h264", 1920, 1080, 256)
    hidden = make_video("mpegts", "h264", 1920, 1080, 100) * 2  # says ~101 frames, decodes 200
    assert len(bomb) < 64 * 1024
    s = open_stream(dtd_server.base_url, fps=2.0)
    try:
        s.push(synthetic_clip.frames[:2])
        peak = _reset_peak_rss(dtd_server.proc.pid)  # from here on, VmHWM is the peak during the bombs
        r = _upload(s, bomb)
        assert r.status_code == 413, r.text[:300]
        assert "declares 256 frames of 1920x1080" in _error(r) and "decoded pixels per upload" in _error(r)
        r = _upload(s, hidden)
        assert r.status_code == 413, r.text[:300]
        assert "decodes to more than" in _error(r)
        grew = _rss_mb(dtd_server.proc.pid) - peak
        print(f"API server RSS {peak:.0f} MB before the bombs, peak grew by {grew:.0f} MB during both")
        assert grew < 300, f"peak RSS of the API server grew by {grew:.0f} MB"
        assert s.status()["frames"] == 2  # nothing added
        assert s.ask("still fine?", max_tokens=1)["usage"]["completion_tokens"] == 1
    finally:
        s.close()


def test_a_question_without_sse_is_aborted_when_its_client_hangs_up(dtd_server, synthetic_clip):
    s = open_stream(dtd_server.base_url, fps=2.0)
    try:
        s.push(synthetic_clip.frames[:4])
        generated = dtd_server.metric("vllm:generation_tokens_total")
        max_tokens = 12000  # ~20 s here; only an abort ends it sooner (ignore_eos)
        try:
            r = requests.post(
                f"{s.url}/chat/completions",
                timeout=(10, 3),
                json={
                    "messages": [{"role": "user", "content": "tell a long story"}],
                    "max_tokens": max_tokens,
                    "temperature": 1.0,
                    "ignore_eos": True,
                },
            )
            pytest.fail(
                f"the question returned before the client hung up: {r.status_code} {r.text[:300]} ... {r.text[-700:]}"
            )
        except requests.exceptions.ReadTimeout:
            pass  # the client hangs up after 3 s
        total = generated_when_settled(dtd_server, within=60) - generated
        assert 0 < total < max_tokens, f"{total} of {max_tokens} tokens generated: the answer was not aborted"
        assert s.status()["questions"] == 0  # the unseen turn is not part of the conversation
        assert s.ask("again?", max_tokens=2, ignore_eos=True)["usage"]["completion_tokens"] == 2
    finally:
        s.close()
