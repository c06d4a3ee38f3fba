"""Decoding what a client uploads (no server): only self-contained containers from the allow-list,
never a demuxer that opens other files; sizes checked before decoding; images by header."""

import io
import os
import time

import av
import numpy as np
import pytest

from vllm_plugin.media import (
    MediaTooLarge,
    VideoDecodeError,
    decode_image,
    decode_video,
    decode_video_upload,
    sniff_container,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_video(fmt: str, codec: str, w: int, h: int, n: int, fps: int = 30) -> bytes:
    """n black frames, encoded in memory."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        black = av.VideoFrame.from_ndarray(np.zeros((h, w, 3), np.uint8), format="rgb24")
        for _ in range(n):
            for p in s.encode(black):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _keep(frame):
    return frame


@pytest.mark.parametrize(
    "fmt,codec,demuxer",
    [
        ("mp4", "h264", "mov"),
        ("mov", "h264", "mov"),
        ("matroska", "h264", "matroska"),
        ("webm", "libvpx-vp9", "matroska"),
        ("avi", "mpeg4", "avi"),
        ("mpegts", "h264", "mpegts"),
    ],
)
def test_allowed_containers_decode(fmt, codec, demuxer):
    data = make_video(fmt, codec, 64, 48, 6, fps=6)
    assert sniff_container(data) == demuxer
    frames, times = decode_video_upload(data, 2.0, _keep, 256, 10**7, 10**9)
    assert len(frames) == 2 and frames[0].shape == (48, 64, 3) and times[0] == pytest.approx(0.0)


def _refs_inside_cwd():
    """Uploads that make an FFmpeg demuxer open a file relative to the working directory."""
    asset = "assets/moviepy_airplane.mp4"
    return {
        "ffconcat": f"ffconcat version 1.0\nfile '{asset}'\n".encode(),
        "concat_safe0": f"ffconcat version 1.0\nfile '{REPO}/{asset}'\n".encode(),
        "hls": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{asset}\n#EXT-X-ENDLIST\n".encode(),
        "image2_pattern": b"assets/frame%03d.png",
        "png": _png(),
        "text": b"hello, I am not a video at all" * 20,
        "subfile": f"subfile,,start,0,end,0,,:{asset}".encode(),
    }


def _png():
    from vllm_plugin.media import encode_png

    return encode_png(np.zeros((8, 8, 3), np.uint8))


def test_reference_following_uploads_are_refused_before_ffmpeg_sees_them(monkeypatch):
    monkeypatch.chdir(REPO)
    # the attack is real: FFmpeg's probing decodes a file the ffconcat list names
    frames, *_ = decode_video(_refs_inside_cwd()["ffconcat"], fps=1.0, max_frames=2)
    assert len(frames) == 2
    for data in _refs_inside_cwd().values():
        with pytest.raises(VideoDecodeError, match="not a video container"):
            decode_video_upload(data, 2.0, _keep, 256, 10**7, 10**9)


def test_the_demuxer_is_chosen_explicitly_with_external_references_off(monkeypatch):
    # FFmpeg never probes an upload, and QuickTime external data references stay off
    data = make_video("mp4", "h264", 64, 48, 4, fps=4)
    calls, real_open = [], av.open

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", spy)
    decode_video_upload(data, 2.0, _keep, 256, 10**7, 10**9)
    (kw,) = calls
    assert kw["format"] == "mov" and kw["io_open"] is not None
    opts = dict(kw["container_options"])
    probe = opts.pop("codec_whitelist").split(",")  # the decoders FFmpeg's probing may open
    assert opts == {"enable_drefs": "0", "use_absolute_path": "0", "max_streams": "4"}
    assert "h264" in probe and "prores" not in probe and "ffv1" not in probe


def test_many_tracks_are_refused_before_ffmpeg_probes_them():
    # FFmpeg decodes a frame of every track while opening (stream-info probing): 20 tracks of
    # 2048x2048 would cost memory before any check; the demuxer refuses past 4 tracks
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        tracks = []
        for _ in range(20):
            s = c.add_stream("h264", rate=2)
            s.width, s.height, s.pix_fmt = 2048, 2048, "yuv420p"
            tracks.append(s)
        black = av.VideoFrame.from_ndarray(np.zeros((2048, 2048, 3), np.uint8), format="rgb24")
        for s in tracks:
            for p in [*s.encode(black), *s.encode()]:
                c.mux(p)
    with pytest.raises(MediaTooLarge, match="at most 4 tracks"):
        decode_video_upload(buf.getvalue(), 2.0, _keep, 256, 4096 * 4096, 2**30)
    two = make_video("mp4", "h264", 64, 48, 4, fps=2)  # an ordinary file still decodes
    assert len(decode_video_upload(two, 2.0, _keep, 256, 10**7, 10**9)[0]) == 4


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = make_video("mp4", "h264", 1920, 1080, 256)  # ~28 KB, 1.6 GB of RGB frames
    assert len(bomb) < 64 * 1024
    t0 = time.perf_counter()
    with pytest.raises(MediaTooLarge, match="declares 256 frames of 1920x1080"):
        decode_video_upload(bomb, 2.0, _keep, 256, 4096 * 4096, 2**28)
    assert time.perf_counter() - t0 < 1.0  # nothing was decoded


def test_a_bomb_without_a_frame_count_stops_at_the_budget():
    # two MPEG-TS segments back to back, both starting at time 0: the container's duration (the
    # only frame-count hint MPEG-TS has) says 121 frames, the decoder produces 240. What it
    # actually decodes is counted, frame by frame.
    bomb = make_video("mpegts", "h264", 1280, 720, 120) * 2
    seen = []

    def fit(frame):
        seen.append(frame.shape)
        return frame[:4, :4].copy()  # what a stream keeps: the resized frame, not the full one

    with pytest.raises(MediaTooLarge, match="decodes to more than"):
        decode_video_upload(bomb, 30.0, fit, 256, 4096 * 4096, 200 * 1280 * 720)
    assert 0 < len(seen) <= 200  # (the second segment's frames are decoded, not sampled: its clock went back)


def test_frame_size_is_checked_before_decoding():
    data = make_video("matroska", "h264", 640, 480, 2, fps=2)
    with pytest.raises(MediaTooLarge, match="640x480"):
        decode_video_upload(data, 2.0, _keep, 256, 320 * 240, 10**9)


def test_each_frame_is_fitted_before_the_next_is_decoded():
    data = make_video("mp4", "h264", 320, 240, 8, fps=4)
    order = []
    real = av.container.InputContainer.decode

    def decode(self, *args, **kwargs):
        for frame in real(self, *args, **kwargs):
            order.append("decoded")
            yield frame

    def fit(frame):
        order.append("fit")
        return frame[:2, :2].copy()  # only what fit returns is kept

    import unittest.mock

    with unittest.mock.patch.object(av.container.InputContainer, "decode", decode):
        frames, _ = decode_video_upload(data, 4.0, fit, 256, 10**7, 10**9)
    assert len(frames) == 8 and all(f.shape == (2, 2, 3) for f in frames)
    assert order == ["decoded", "fit"] * 8  # one full-size frame alive at a time


def test_images_only_png_jpeg_webp_and_pixel_cap_before_decoding():
    from PIL import Image

    def enc(fmt, size=(16, 8)):
        buf = io.BytesIO()
        Image.new("RGB", size, (1, 2, 3)).save(buf, format=fmt)
        return buf.getvalue()

    for fmt in ("PNG", "JPEG", "WEBP"):
        assert decode_image(enc(fmt)).shape == (8, 16, 3)
    for fmt in ("GIF", "BMP", "TIFF", "PPM"):
        with pytest.raises(ValueError, match="PNG, JPEG or WebP"):
            decode_image(enc(fmt))
    big = enc("PNG", (3000, 3000))  # small file, 9 M pixels
    with pytest.raises(MediaTooLarge, match="3000x3000"):
        decode_image(big, max_pixels=4096 * 2048)


def test_only_common_video_codecs_are_decoded():
    buf = io.BytesIO()
    with av.open(buf, "w", format="mov") as c:  # PNG frames in a QuickTime movie: a valid file
        s = c.add_stream("png", rate=2)
        s.width, s.height, s.pix_fmt = 64, 48, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    with pytest.raises(VideoDecodeError, match="codec 'png' is not accepted"):
        decode_video_upload(buf.getvalue(), 2.0, _keep, 256, 10**7, 10**9)
