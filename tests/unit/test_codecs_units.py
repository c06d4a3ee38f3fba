"""The video codec allow-list (``DTD_VIDEO_CODECS``) of the guards every client video passes
(``video_url`` requests through the plugin's loader, stream uploads), and the benchmark tools going
on past a clip that is refused (no server)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from vllm.multimodal.video import Qwen2VLVideoBackend

from vllm_plugin.entrypoints import video_loader as vl
from vllm_plugin.media import (
    CODECS_ENV,
    DEFAULT_VIDEO_CODECS,
    CodecNotAccepted,
    MediaTooLarge,
    VideoDecodeError,
    decode_video_upload,
    video_codecs,
)

FAST = vl.loader_class(Qwen2VLVideoBackend)


def make_clip(codec: str = "msmpeg4", fmt: str = "avi", w: int = 64, h: int = 64, n: int = 16, fps: int = 8) -> bytes:
    """``n`` frames of a moving gradient (every frame differs), encoded in memory with PyAV."""
    buf = io.BytesIO()
    y, x = np.mgrid[0:h, 0:w]
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            rgb = np.stack([(x * 3 + i * 9) % 256, (y * 3 + i * 5) % 256, np.full_like(x, i * 13 % 256)], -1)
            for p in s.encode(av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def msmpeg4_avi() -> bytes:
    """MS-MPEG4 v3 (FFmpeg's ``msmpeg4`` encoder: DivX 3 / MP43) in AVI, as older cameras and
    computer-vision sample data store video."""
    data = make_clip("msmpeg4")
    assert data[:4] == b"RIFF" and data[8:12] == b"AVI "
    return data


@pytest.fixture(autouse=True)
def _default_codecs(monkeypatch):
    monkeypatch.delenv(CODECS_ENV, raising=False)
    monkeypatch.setattr(vl, "_SIZING", None)


def _keep(frame):
    return frame


def _guarded_codec(data: bytes) -> str:
    """The decoder the ``video_url`` loader's guards let through (the function the loader calls)."""
    with vl._guarded(data) as (_, stream):
        return stream.codec_context.codec.name


# ---------------------------------------------------------------------------------------------- the list


def test_default_list_covers_what_vllms_loaders_meet():
    codecs = video_codecs()
    defaults = set(DEFAULT_VIDEO_CODECS)
    assert {"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"} <= defaults  # cameras, phones, browsers
    # older cameras and CV sample data: MPEG-1/2, MS-MPEG4 v1-v3, H.263, WMV 1-3 / VC-1, Theora, Sorenson FLV
    assert {"mpeg1video", "mpeg2video", "msmpeg4v1", "msmpeg4v2", "msmpeg4", "h263"} <= defaults
    assert {"wmv1", "wmv2", "wmv3", "vc1", "theora", "flv"} <= defaults
    for name in DEFAULT_VIDEO_CODECS:
        if name in av.codecs_available:  # (a default this FFmpeg build lacks is left out)
            assert name in codecs.names
    assert "png" not in codecs.names and "prores" not in codecs.names and "ffv1" not in codecs.names
    # codecs by FFmpeg's canonical name: msmpeg4 decodes msmpeg4v3, flv decodes flv1, libdav1d av1
    assert {"msmpeg4v3", "flv1", "av1"} <= codecs.ids
    probe = codecs.probe.split(",")  # what FFmpeg's probing may open: every allowed decoder, software only
    assert set(codecs.names) <= set(probe) and "libdav1d" in probe
    assert not any(n.endswith(("_cuvid", "_qsv", "_amf", "_v4l2m2m")) for n in probe)


def test_the_variable_replaces_the_list(monkeypatch):
    monkeypatch.setenv(CODECS_ENV, " h264 , msmpeg4v3,flv1,, ")
    codecs = video_codecs()
    assert codecs.names == ("h264", "msmpeg4v3", "flv1")
    assert codecs.ids == {"h264", "msmpeg4v3", "flv1"}
    assert codecs.probe.split(",")[:3] == ["h264", "msmpeg4", "flv"]  # the decoders' own names
    monkeypatch.setenv(CODECS_ENV, "av1")  # av1 streams are decoded by libdav1d: matched by codec
    assert "libdav1d" in video_codecs().probe.split(",")
    assert video_codecs().accepts(av.codec.Codec("libdav1d", "r"))
    assert not video_codecs().accepts(av.codec.Codec("h264", "r"))


@pytest.mark.parametrize(
    "value,match",
    [
        ("h264,nosuchdecoder", r"DTD_VIDEO_CODECS: .*no decoder named 'nosuchdecoder'"),
        ("h264,libx264", r"DTD_VIDEO_CODECS: .*no decoder named 'libx264'"),  # an encoder only
        ("aac", r"DTD_VIDEO_CODECS: 'aac' is not a video decoder"),
        (",", r"DTD_VIDEO_CODECS=',' names nothing"),
    ],
)
def test_a_bad_list_fails_clearly_at_start(monkeypatch, msmpeg4_avi, value, match):
    monkeypatch.setenv(CODECS_ENV, value)
    with pytest.raises(ValueError, match=match) as e:
        video_codecs()
    assert not isinstance(e.value, VideoDecodeError)  # the server's error, not the client's
    # the server's start: install() checks it first (the API server's processor is built at start)
    with pytest.raises(ValueError, match=match):
        vl.install(None, None, {})
    with pytest.raises(ValueError, match=match):  # and never a client's 400 in its place
        decode_video_upload(msmpeg4_avi, 2.0, _keep, 256, 10**7, 10**9)


# ---------------------------------------------------------------------------------------------- MS-MPEG4 AVI


def test_msmpeg4_avi_passes_the_guards_by_default(msmpeg4_avi, monkeypatch):
    calls, real_open = [], av.open

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", spy)
    assert _guarded_codec(msmpeg4_avi) == "msmpeg4"  # the video_url loader's guards
    probe = calls[0]["container_options"]["codec_whitelist"].split(",")
    assert calls[0]["format"] == "avi" and "msmpeg4" in probe and "h264" in probe
    # the whole video_url loader: vLLM's frames (AVI goes to vLLM's loader, behind the guards)
    ref, ref_md = Qwen2VLVideoBackend.load_bytes(msmpeg4_avi, fps=2)
    for fast in (True, False):
        got, md = FAST.load_bytes(msmpeg4_avi, fps=2, fast_decode=fast)
        assert np.array_equal(got, ref) and md["frames_indices"] == ref_md["frames_indices"] == [0, 4, 8, 12]
    # a stream upload: the same list
    frames, times = decode_video_upload(msmpeg4_avi, 2.0, _keep, 256, 10**7, 10**9)
    assert len(frames) == 4 and frames[0].shape == (64, 64, 3) and times[1] == pytest.approx(0.5)


def test_a_list_without_it_refuses_it_naming_codec_and_variable(msmpeg4_avi, monkeypatch):
    monkeypatch.setenv(CODECS_ENV, "h264")
    match = r"video codec 'msmpeg4' is not accepted .*accepted: h264.*DTD_VIDEO_CODECS"
    with pytest.raises(CodecNotAccepted, match=match):
        _guarded_codec(msmpeg4_avi)
    for fast in (True, False):  # whichever loader would decode it (vLLM's decodes it otherwise)
        with pytest.raises(CodecNotAccepted, match=match):
            FAST.load_bytes(msmpeg4_avi, fps=2, fast_decode=fast)
    with pytest.raises(CodecNotAccepted, match=match):
        decode_video_upload(msmpeg4_avi, 2.0, _keep, 256, 10**7, 10**9)
    assert issubclass(CodecNotAccepted, VideoDecodeError) and not issubclass(CodecNotAccepted, MediaTooLarge)  # a 400
    monkeypatch.setenv(CODECS_ENV, "h264,msmpeg4")  # the variable adds it back
    assert _guarded_codec(msmpeg4_avi) == "msmpeg4"


def test_av1_by_its_software_decoder(monkeypatch):
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("no AV1 encoder in this FFmpeg")
    data = make_clip("libsvtav1", fmt="matroska", n=4)
    assert _guarded_codec(data) == "libdav1d"  # allowed as "av1" (the codec libdav1d decodes)
    monkeypatch.setenv(CODECS_ENV, "av1")
    assert len(decode_video_upload(data, 8.0, _keep, 256, 10**7, 10**9)[0]) == 4
    monkeypatch.setenv(CODECS_ENV, "h264")
    with pytest.raises(CodecNotAccepted, match="'libdav1d'"):
        decode_video_upload(data, 8.0, _keep, 256, 10**7, 10**9)


# ---------------------------------------------------------------------------------------------- size guards


NEW_CODECS = [
    ("msmpeg4", 64, 64),
    ("msmpeg4v2", 64, 64),
    ("wmv1", 64, 64),
    ("wmv2", 64, 64),
    ("h263", 176, 144),
    ("flv", 64, 64),
]


@pytest.mark.parametrize("codec,w,h", NEW_CODECS)
def test_size_guards_hold_for_the_added_codecs(codec, w, h, monkeypatch):
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} encoder in this FFmpeg")
    data = make_clip(codec, w=w, h=h, n=8)
    assert len(decode_video_upload(data, 2.0, _keep, 256, 10**7, 10**9)[0]) == 2  # accepted by default
    # these decoders check their size against FFmpeg's cap as they open: refused from the header's size
    with pytest.raises(MediaTooLarge, match=f"{w}x{h}"):
        decode_video_upload(data, 2.0, _keep, 256, w * h - 1, 10**9)
    with pytest.raises(MediaTooLarge, match=f"8 frames of {w}x{h}"):  # the decoded-pixel budget
        decode_video_upload(data, 2.0, _keep, 256, 10**7, 8 * w * h - 1)
    import vllm.envs as envs

    monkeypatch.setattr(envs, "VLLM_MAX_IMAGE_PIXELS", w * h - 1, raising=False)
    monkeypatch.setenv("VLLM_MAX_IMAGE_PIXELS", str(w * h - 1))
    with pytest.raises((ValueError, MediaTooLarge), match="pixels"):  # the video_url loader
        FAST.load_bytes(data, fps=2)


# ---------------------------------------------------------------------------------------------- benchmark tools


@pytest.fixture
def clip_files(tmp_path, msmpeg4_avi):
    good = tmp_path / "cv_sample.avi"
    good.write_bytes(msmpeg4_avi)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)  # an MP4 header, then garbage
    return good, corrupt


def test_bench_preprocess_reports_a_refused_clip_and_goes_on(clip_files, tiny_model_path, monkeypatch, capsys):
    from analysis.cli import bench_preprocess
    from vllm_plugin.entrypoints.options import dtd_config_from_kwargs

    good, corrupt = clip_files
    refused: dict[str, str] = {}
    eq = bench_preprocess.equivalence(
        {corrupt.name: corrupt, good.name: good}, tiny_model_path, 2.0, dtd_config_from_kwargs({}), refused
    )
    out = capsys.readouterr().out
    assert list(eq) == [good.name] and eq[good.name].indices_equal and eq[good.name].grid_equal
    assert list(refused) == [corrupt.name] and "the plugin's video loader refused it" in refused[corrupt.name]
    assert f"skipped {corrupt.name}: " in out and "Traceback" not in out

    # a codec the list leaves out: refused by the plugin's loader, in process, as the server would
    monkeypatch.setenv(CODECS_ENV, "h264")
    refused.clear()
    assert (
        bench_preprocess.equivalence({good.name: good}, tiny_model_path, 2.0, dtd_config_from_kwargs({}), refused) == {}
    )
    assert "CodecNotAccepted" in refused[good.name] and "'msmpeg4'" in refused[good.name]

    # every clip refused: a non-zero exit with the reasons, before any server starts
    import analysis.harness.server as server

    class NoServer:
        def __init__(self, *a, **k):
            raise AssertionError("a server was started")

    monkeypatch.setattr(server, "VLLMServer", NoServer)
    with pytest.raises(SystemExit) as e:
        bench_preprocess.main(
            ["--video", str(corrupt), str(good), "--model", str(tiny_model_path), "--out", str(good.parent / "out")]
        )
    assert "every clip was refused" in str(e.value.code) and corrupt.name in str(e.value.code)
    assert server.VLLMServer is NoServer

    # a server's 400 is a refusal, a 500 is not
    assert "refused it (400)" in bench_preprocess.refusal({"status": 400, "error": "video codec 'x' is not accepted"})
    assert bench_preprocess.refusal({"status": 500, "error": "boom"}) is None
    assert bench_preprocess.refusal({"status": 200}) is None


def test_bench_and_bench_stream_skip_an_unreadable_clip(clip_files, tmp_path, capsys):
    from analysis.cli import bench, bench_stream

    good, corrupt = clip_files
    refused: dict[str, str] = {}
    clips = bench.prepare_clips([corrupt, good], 2.0, 4, tmp_path, synthetic=False, refused=refused)
    assert [c.name for c in clips] == ["cv_sample"] and clips[0].given and list(refused) == [corrupt.name]
    assert f"skipped {corrupt.name}: cannot be read" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # the only clip (bench_stream plays one): a non-zero exit, no server
        bench_stream.main(["--video", str(corrupt), "--model", str(tmp_path / "no-model")])
    assert "every clip was refused" in str(e.value.code)
